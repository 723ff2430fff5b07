//! The cluster's certificate authority, the API server's serving
//! certificate, bearer tokens and the admin kubeconfig, all created on first
//! start under the data directory and reused afterwards.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
}

pub(crate) fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The names and addresses the serving certificate is valid for.
pub fn serving_names(listen_ip: IpAddr, service_ip: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
        service_ip.to_string(),
    ];
    if !listen_ip.is_unspecified() {
        names.push(listen_ip.to_string());
    }
    if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

impl Pki {
    /// Load the PKI under `dir`, creating what is missing. The serving
    /// certificate is re-issued (by the same CA) when `names` changed.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Pki> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_crt = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        if !ca_crt.exists() || !ca_key.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "tapestry-ca");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2099, 12, 31);
            let cert = params.self_signed(&key)?;
            write_private(&ca_key, &key.serialize_pem())?;
            write_private(&ca_crt, &cert.pem())?;
            // A new CA invalidates any serving certificate signed by an old one.
            let _ = fs::remove_file(dir.join("apiserver.crt"));
        }
        let ca_cert_pem = fs::read_to_string(&ca_crt)?;
        let ca_key_pem = fs::read_to_string(&ca_key)?;
        let names_file = dir.join("apiserver.names");
        let wanted = names.join("\n");
        let crt = dir.join("apiserver.crt");
        let key = dir.join("apiserver.key");
        let current = fs::read_to_string(&names_file).unwrap_or_default();
        if !crt.exists() || !key.exists() || current != wanted {
            let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing ca.key")?;
            let issuer =
                Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).context("parsing ca.crt")?;
            let (cert, key_pem) = issue(&issuer, "kube-apiserver", &[], names, true)?;
            write_private(&key, &key_pem)?;
            write_private(&crt, &cert)?;
            write_private(&names_file, &wanted)?;
        }
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_cert_pem,
            serving_cert_pem: fs::read_to_string(&crt)?,
            serving_key_pem: fs::read_to_string(&key)?,
        })
    }

    /// Issue a certificate signed by the cluster CA (for node agents and
    /// other components). Returns (certificate PEM, key PEM).
    pub fn issue(
        &self,
        common_name: &str,
        orgs: &[&str],
        names: &[String],
        server: bool,
    ) -> Result<(String, String)> {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(self.dir.join("ca.key"))?)?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, ca_key)?;
        issue(&issuer, common_name, orgs, names, server)
    }
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    orgs: &[&str],
    names: &[String],
    server: bool,
) -> Result<(String, String)> {
    issue_until(issuer, common_name, orgs, names, server, None)
}

/// [`issue`], valid for `days` from today when given (else until 2099).
fn issue_until(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    orgs: &[&str],
    names: &[String],
    server: bool,
    days: Option<u32>,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = tapestry_runtime::csr::subject(common_name, orgs, names)?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = match days {
        Some(days) => {
            use chrono::Datelike;
            let end = chrono::Utc::now() + chrono::Duration::days(i64::from(days));
            rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8)
        }
        None => rcgen::date_time_ymd(2099, 12, 31),
    };
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

use std::sync::Arc;

use tapestry_apimachinery::tokens::TokenFile;
pub use tapestry_apimachinery::tokens::User;

/// Bearer tokens in kube-apiserver's `--token-auth-file` CSV format:
/// `token,user,uid,"group1,group2"`.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    file: TokenFile,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file =
            TokenFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Tokens { file })
    }

    pub fn authenticate(&self, token: &str) -> Option<&User> {
        self.file.authenticate(token)
    }

    /// Load the token file, creating it with an admin token if absent.
    /// Returns the tokens and the admin token.
    pub fn load_or_create(path: &Path) -> Result<(Tokens, String)> {
        if !path.exists() {
            let token = random_token();
            write_private(path, &format!("{token},admin,admin,\"system:masters\"\n"))?;
        }
        let tokens = Tokens::load(path)?;
        let admin = tokens
            .file
            .iter()
            .find(|(_, u)| u.name == "admin")
            .map(|(t, _)| t.clone())
            .with_context(|| format!("{} has no admin token", path.display()))?;
        Ok((tokens, admin))
    }
}

/// Files of a data directory that hold secrets or the whole cluster's
/// state, and directories of such files.
const PRIVATE_FILES: &[&str] = &["store.redb", "tokens.csv", "node-token", "kubeconfig"];
const PRIVATE_DIRS: &[&str] = &["pki", "credentials", "users"];

/// Makes `data_dir` (created if absent) 0700 and what it holds of the
/// store, keys, tokens and kubeconfigs 0600 (their directories 0700),
/// whatever the umask was when they were made. Run before the store is
/// opened and again once the server has written its files.
pub fn secure_data_dir(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let set = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {} to {mode:o}", path.display()))
    };
    set(data_dir, 0o700)?;
    for f in PRIVATE_FILES {
        let path = data_dir.join(f);
        if path.is_file() {
            set(&path, 0o600)?;
        }
    }
    for d in PRIVATE_DIRS {
        let dir = data_dir.join(d);
        if !dir.is_dir() {
            continue;
        }
        set(&dir, 0o700)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_file() {
                set(&path, 0o600)?;
            }
        }
    }
    Ok(())
}

/// The token file as the server reads it: read again when it changes
/// (`tapestry user add` appends to it), so new users need no restart.
pub struct LiveTokens {
    path: PathBuf,
    current: std::sync::RwLock<(Option<std::time::SystemTime>, Arc<Tokens>)>,
}

impl LiveTokens {
    pub fn load(path: &Path) -> Result<LiveTokens> {
        let modified = fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(LiveTokens {
            path: path.to_path_buf(),
            current: std::sync::RwLock::new((modified, Arc::new(Tokens::load(path)?))),
        })
    }

    pub fn authenticate(&self, token: &str) -> Option<User> {
        let tokens = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        tokens.authenticate(token).cloned()
    }

    /// Reads the file again if it changed; a file that no longer parses
    /// is reported and the tokens read before stay in force.
    pub fn refresh(&self) {
        let modified = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified == self.current.read().unwrap_or_else(|e| e.into_inner()).0 {
            return;
        }
        match Tokens::load(&self.path) {
            Ok(tokens) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (modified, Arc::new(tokens));
                tracing::info!(file = %self.path.display(), "tokens read again");
            }
            Err(e) => tracing::warn!("keeping the tokens read before: {e:#}"),
        }
    }
}

/// What a new user authenticates with.
pub enum Credential {
    /// A bearer token in the server's token file.
    Token,
    /// A client certificate from the cluster CA (CN = name, O = groups),
    /// valid for this many days; nothing is stored on the server, and it
    /// cannot be revoked before it expires.
    Certificate { days: u32 },
}

/// Adds a user with `groups` and writes a kubeconfig for it (0600) to
/// `out`: a token in the token file of `data_dir` (refused for a name
/// already there), or a client certificate. Either way RBAC decides what
/// the user may do.
pub fn add_user(
    data_dir: &Path,
    name: &str,
    groups: &[String],
    credential: Credential,
    out: &Path,
) -> Result<()> {
    if name.is_empty() || name.contains([',', '"', '\n']) {
        anyhow::bail!("user name {name:?}: must be non-empty, without commas, quotes or newlines");
    }
    if let Some(g) = groups
        .iter()
        .find(|g| g.is_empty() || g.contains([',', '"', '\n']))
    {
        anyhow::bail!("group {g:?}: must be non-empty, without commas, quotes or newlines");
    }
    let admin: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(data_dir.join("kubeconfig")).context("reading the admin kubeconfig")?,
    )?;
    let server = admin["clusters"][0]["cluster"]["server"]
        .as_str()
        .context("the admin kubeconfig names no server")?
        .to_string();
    let ca = fs::read_to_string(data_dir.join("pki/ca.crt")).context("reading pki/ca.crt")?;
    if let Credential::Certificate { days } = credential {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(data_dir.join("pki/ca.key"))?)
            .context("parsing pki/ca.key")?;
        let issuer = Issuer::from_ca_cert_pem(&ca, ca_key).context("parsing pki/ca.crt")?;
        let orgs: Vec<&str> = groups.iter().map(String::as_str).collect();
        let (cert, key) = issue_until(&issuer, name, &orgs, &[], false, Some(days))?;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let user = format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&cert),
            b64(&key)
        );
        return write_private(out, &kubeconfig_for(&server, &ca, name, &user));
    }
    let tokens_path = data_dir.join("tokens.csv");
    let text = fs::read_to_string(&tokens_path).with_context(|| {
        format!(
            "reading {} (has the server run with this --data-dir?)",
            tokens_path.display()
        )
    })?;
    let file =
        TokenFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", tokens_path.display()))?;
    if file.iter().any(|(_, u)| u.name == name) {
        anyhow::bail!(
            "user {name:?} already has a token in {}",
            tokens_path.display()
        );
    }
    let token = random_token();
    let mut f = fs::OpenOptions::new().append(true).open(&tokens_path)?;
    if !text.is_empty() && !text.ends_with('\n') {
        writeln!(f)?;
    }
    writeln!(f, "{token},{name},{name},\"{}\"", groups.join(","))?;
    f.sync_all()?;
    write_private(out, &kubeconfig(&server, &ca, name, &token))
}

/// Tapestry's own components that run beside the server, each with an
/// identity of its own: `(file name, user, groups)`. (The tap-agent and
/// aggregator run in pods, as their ServiceAccounts.)
pub const COMPONENTS: &[(&str, &str, &[&str])] =
    &[("fleet-manager", "system:tapestry:fleet-manager", &[])];

/// Make sure each of [`COMPONENTS`] has a token in the token file and a
/// kubeconfig `DIR/credentials/NAME.kubeconfig` (0600) for `server_url`.
/// Run before the token file is loaded.
pub fn ensure_component_credentials(data_dir: &Path, ca_pem: &str, server_url: &str) -> Result<()> {
    let tokens_path = data_dir.join("tokens.csv");
    let text = fs::read_to_string(&tokens_path)
        .with_context(|| format!("reading {}", tokens_path.display()))?;
    let file =
        TokenFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", tokens_path.display()))?;
    let dir = data_dir.join("credentials");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let mut appended = String::new();
    for (name, user, groups) in COMPONENTS {
        let token = match file.iter().find(|(_, u)| u.name == *user) {
            Some((token, _)) => token.clone(),
            None => {
                let token = random_token();
                appended.push_str(&format!("{token},{user},{user},\"{}\"\n", groups.join(",")));
                token
            }
        };
        write_private(
            &dir.join(format!("{name}.kubeconfig")),
            &kubeconfig(server_url, ca_pem, user, &token),
        )?;
    }
    if !appended.is_empty() {
        let mut f = fs::OpenOptions::new().append(true).open(&tokens_path)?;
        if !text.is_empty() && !text.ends_with('\n') {
            writeln!(f)?;
        }
        f.write_all(appended.as_bytes())?;
        f.sync_all()?;
    }
    Ok(())
}

pub fn random_token() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

/// A kubeconfig for `user` with a bearer token, trusting the cluster CA.
pub fn kubeconfig(server_url: &str, ca_pem: &str, user: &str, token: &str) -> String {
    kubeconfig_for(server_url, ca_pem, user, &format!("    token: {token}\n"))
}

/// A kubeconfig whose user entry holds `credentials` (indented lines).
fn kubeconfig_for(server_url: &str, ca_pem: &str, user: &str, credentials: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: tapestry\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {ca}\ncontexts:\n- name: tapestry\n  context:\n    cluster: tapestry\n    user: {user}\ncurrent-context: tapestry\nusers:\n- name: {user}\n  user:\n{credentials}"
    )
}

pub fn write_kubeconfig(path: &Path, contents: &str) -> Result<()> {
    write_private(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_is_created_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let first = Pki::load_or_create(dir.path(), &names).unwrap();
        let second = Pki::load_or_create(dir.path(), &names).unwrap();
        assert_eq!(first.ca_cert_pem, second.ca_cert_pem);
        assert_eq!(first.serving_cert_pem, second.serving_cert_pem);
        let more = vec!["localhost".to_string(), "10.0.0.1".to_string()];
        let third = Pki::load_or_create(dir.path(), &more).unwrap();
        assert_eq!(first.ca_cert_pem, third.ca_cert_pem);
        assert_ne!(first.serving_cert_pem, third.serving_cert_pem);
    }

    #[test]
    fn tokens_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        fs::write(&path, "t1,alice,u1,\"a,b\"\n# comment\nt2,bob,u2\n").unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.authenticate("t1").unwrap().groups, vec!["a", "b"]);
        assert_eq!(tokens.authenticate("t2").unwrap().name, "bob");
        assert!(tokens.authenticate("nope").is_none());
        fs::write(&path, "justonefield\n").unwrap();
        assert!(Tokens::load(&path).is_err());
    }
}
