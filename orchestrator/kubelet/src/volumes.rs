//! Pod volumes (emptyDir, hostPath, configMap, secret, downwardAPI,
//! projected, persistentVolumeClaim), the container environment (env, envFrom, downward fields,
//! the API server's Service), and the pod's /etc files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, ProjectedVolumeSource, Secret,
    Service,
};
use kube::Api;
use tapestry_runtime::lock;

use crate::images::ImageConfig;
use crate::tokens::Tokens;
use crate::Kubelet;

/// A volume file's mode when neither the item nor the volume sets one.
pub const DEFAULT_MODE: i32 = 0o644;
/// How long a node that does not watch Services uses the `default/kubernetes`
/// Service it read before reading it again.
const API_SERVICE_TTL: Duration = Duration::from_secs(30);

async fn config_map(
    kubelet: &Kubelet,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<ConfigMap> = Api::namespaced(kubelet.client.clone(), ns);
    Ok(api.get_opt(name).await?.map(|cm| {
        let mut out: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        out.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        out
    }))
}

async fn secret(
    kubelet: &Kubelet,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<Secret> = Api::namespaced(kubelet.client.clone(), ns);
    Ok(api.get_opt(name).await?.map(|s| {
        let mut out: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        out.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        out
    }))
}

/// A file of a volume: its path inside the volume, content and mode.
#[derive(Debug, PartialEq)]
pub struct VolumeFile {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: i32,
}

/// The files of a configMap's or secret's keys: every key, or the ones
/// `items` names. A source that is `optional` may lack them.
fn key_files(
    data: Option<&BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    mode: i32,
    optional: bool,
    what: &str,
) -> Result<Vec<VolumeFile>> {
    let Some(data) = data else {
        return Ok(Vec::new());
    };
    let file = |path: &str, content: &Vec<u8>, mode: i32| VolumeFile {
        path: path.to_string(),
        content: content.clone(),
        mode,
    };
    let Some(items) = items else {
        return Ok(data.iter().map(|(k, v)| file(k, v, mode)).collect());
    };
    let mut files = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match data.get(&item.key) {
            Some(v) => files.push(file(&item.path, v, item.mode.unwrap_or(mode))),
            None if optional => {}
            None => bail!("{what}.items[{i}]: key {:?} not found", item.key),
        }
    }
    Ok(files)
}

/// A volume item's path must stay inside the volume.
pub fn check_path(path: &str, what: &str) -> Result<()> {
    if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
        bail!("{what}: item path {path:?} must be relative and must not contain '..'");
    }
    Ok(())
}

/// Replace `path` at once: readers see the old file or the new one, never
/// a partial one (a token is rewritten while its containers read it).
pub fn write_atomic(path: &Path, content: &[u8], mode: i32) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{}: not a file path", path.display());
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(content))
        // The umask must not narrow the mode asked for.
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode as u32 & 0o777)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    // An item path that was a directory before becomes a file.
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Remove the files under `dir` that are not `wanted`. Directories stay:
/// one may be a running container's subPath mount.
fn remove_stale(dir: &Path, wanted: &HashSet<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if fs::symlink_metadata(&path)?.is_dir() {
            remove_stale(&path, wanted)?;
        } else if !wanted.contains(&path) {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Make `dir` hold exactly `files`. The directory itself stays (running
/// containers have it mounted) and each file is replaced atomically, so a
/// container sees every file either old or new.
pub fn write_files(dir: &Path, files: &[VolumeFile], what: &str) -> Result<()> {
    let mut wanted = HashSet::new();
    for f in files {
        check_path(&f.path, what)?;
        if !wanted.insert(dir.join(&f.path)) {
            bail!("{what}: more than one item has path {:?}", f.path);
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Stale files go first, so that a path can turn into a directory.
    remove_stale(dir, &wanted)?;
    for f in files {
        write_atomic(&dir.join(&f.path), &f.content, f.mode)?;
    }
    Ok(())
}

/// Write a configMap's or secret's keys into `dir`; rewritten on each
/// container start so updates are picked up.
fn write_keys(
    dir: &Path,
    data: Option<&BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    mode: i32,
    optional: bool,
    what: &str,
) -> Result<()> {
    write_files(dir, &key_files(data, items, mode, optional, what)?, what)
}

/// What a projected volume's sources read from the API, by source index:
/// configMap and secret data (None: not found) and service account tokens.
#[derive(Default)]
pub struct Fetched {
    pub keys: HashMap<usize, Option<BTreeMap<String, Vec<u8>>>>,
    pub tokens: HashMap<usize, String>,
}

/// Read what a projected volume's sources need from the API. A missing
/// configMap or secret is the files' business (it may be optional); a
/// token that cannot be had fails the volume.
async fn fetch_projected(
    kubelet: &Kubelet,
    pod: &Pod,
    volume: &str,
    projected: &ProjectedVolumeSource,
    field: &str,
    tokens: &mut Tokens,
) -> Result<Fetched> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut fetched = Fetched::default();
    for (j, source) in projected.sources.iter().flatten().enumerate() {
        if let Some(cm) = &source.config_map {
            let data = config_map(kubelet, ns, &cm.name).await.with_context(|| {
                format!(
                    "reading configmap {:?} ({field}.sources[{j}].configMap)",
                    cm.name
                )
            })?;
            fetched.keys.insert(j, data);
        } else if let Some(s) = &source.secret {
            let data = secret(kubelet, ns, &s.name).await.with_context(|| {
                format!("reading secret {:?} ({field}.sources[{j}].secret)", s.name)
            })?;
            fetched.keys.insert(j, data);
        } else if let Some(t) = &source.service_account_token {
            let what = format!("{field}.sources[{j}].serviceAccountToken");
            let token = tokens.token(kubelet, pod, volume, j, t, &what).await?;
            fetched.tokens.insert(j, token);
        }
    }
    Ok(fetched)
}

/// The files of a projected volume, from its sources and what was
/// fetched for them.
pub fn projected_files(
    pod: &Pod,
    projected: &ProjectedVolumeSource,
    fetched: &Fetched,
    field: &str,
) -> Result<Vec<VolumeFile>> {
    let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
    let mut files = Vec::new();
    for (j, source) in projected.sources.iter().flatten().enumerate() {
        let what = format!("{field}.sources[{j}]");
        let data = fetched.keys.get(&j).and_then(Option::as_ref);
        if let Some(cm) = &source.config_map {
            let optional = cm.optional == Some(true);
            if data.is_none() && !optional {
                bail!("configmap {:?} not found ({what}.configMap)", cm.name);
            }
            let what = format!("{what}.configMap");
            files.extend(key_files(data, cm.items.as_ref(), mode, optional, &what)?);
        } else if let Some(s) = &source.secret {
            let optional = s.optional == Some(true);
            if data.is_none() && !optional {
                bail!("secret {:?} not found ({what}.secret)", s.name);
            }
            let what = format!("{what}.secret");
            files.extend(key_files(data, s.items.as_ref(), mode, optional, &what)?);
        } else if let Some(d) = &source.downward_api {
            let what = format!("{what}.downwardAPI");
            files.extend(downward_files(pod, d.items.as_deref(), mode, &what)?);
        } else if let Some(t) = &source.service_account_token {
            let token = fetched
                .tokens
                .get(&j)
                .with_context(|| format!("{what}.serviceAccountToken: no token"))?;
            files.push(VolumeFile {
                path: t.path.clone(),
                content: token.clone().into_bytes(),
                mode,
            });
        } else {
            bail!("{what}: unsupported source (serviceAccountToken, configMap, secret and downwardAPI are supported)");
        }
    }
    Ok(files)
}

/// The files of downward API items: fields of the pod.
fn downward_files(
    pod: &Pod,
    items: Option<&[DownwardAPIVolumeFile]>,
    mode: i32,
    what: &str,
) -> Result<Vec<VolumeFile>> {
    let mut files = Vec::new();
    for (k, item) in items.into_iter().flatten().enumerate() {
        let item_field = format!("{what}.items[{k}]");
        let Some(f) = &item.field_ref else {
            if item.resource_field_ref.is_some() {
                bail!("{item_field}.resourceFieldRef: not supported");
            }
            bail!("{item_field}: fieldRef is required");
        };
        let value = match f.field_path.as_str() {
            "metadata.labels" => Some(format_map(pod.metadata.labels.as_ref())),
            "metadata.annotations" => Some(format_map(pod.metadata.annotations.as_ref())),
            // The pod's addresses are for env only, as in Kubernetes.
            p if p.starts_with("status.") => None,
            p => field_value(pod, p, ""),
        }
        .with_context(|| {
            format!(
                "{item_field}.fieldRef: unsupported fieldPath {:?}",
                f.field_path
            )
        })?;
        files.push(VolumeFile {
            path: item.path.clone(),
            content: value.into_bytes(),
            mode: item.mode.unwrap_or(mode),
        });
    }
    Ok(files)
}

/// Labels or annotations as the downward API writes them: `key="value"`
/// lines, sorted by key.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    let lines: Vec<String> = map
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    lines.join("\n")
}

/// Make every volume of the pod available on the host; returns volume
/// name → host path.
pub async fn prepare(
    kubelet: &Kubelet,
    pod: &Pod,
    pod_dir: &Path,
    tokens: &mut Tokens,
) -> Result<HashMap<String, PathBuf>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = HashMap::new();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let dir = pod_dir.join("volumes").join(&v.name);
        let field = format!("spec.volumes[{i}]");
        let path = if v.empty_dir.is_some() {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
            dir
        } else if let Some(hp) = &v.host_path {
            let p = PathBuf::from(&hp.path);
            match hp.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => fs::create_dir_all(&p)?,
                "FileOrCreate" if !p.exists() => {
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::write(&p, b"")?;
                }
                "Directory" if !p.is_dir() => {
                    bail!("{field}.hostPath: {} is not a directory", hp.path)
                }
                "File" if !p.is_file() => bail!("{field}.hostPath: {} is not a file", hp.path),
                _ => {}
            }
            p
        } else if let Some(cm) = &v.config_map {
            let optional = cm.optional == Some(true);
            let data = config_map(kubelet, ns, &cm.name).await?;
            if data.is_none() && !optional {
                bail!("configmap {:?} not found ({field}.configMap)", cm.name);
            }
            write_keys(
                &dir,
                data.as_ref(),
                cm.items.as_ref(),
                cm.default_mode.unwrap_or(DEFAULT_MODE),
                optional,
                &format!("{field}.configMap"),
            )?;
            dir
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let optional = s.optional == Some(true);
            let data = secret(kubelet, ns, &name).await?;
            if data.is_none() && !optional {
                bail!("secret {name:?} not found ({field}.secret)");
            }
            write_keys(
                &dir,
                data.as_ref(),
                s.items.as_ref(),
                s.default_mode.unwrap_or(DEFAULT_MODE),
                optional,
                &format!("{field}.secret"),
            )?;
            dir
        } else if let Some(p) = &v.projected {
            let field = format!("{field}.projected");
            let fetched = fetch_projected(kubelet, pod, &v.name, p, &field, tokens).await?;
            write_files(&dir, &projected_files(pod, p, &fetched, &field)?, &field)?;
            tokens.written(&v.name);
            dir
        } else if let Some(claim) = &v.persistent_volume_claim {
            let field = format!("{field}.persistentVolumeClaim");
            crate::localpath::claim_dir(kubelet, ns, &claim.claim_name, &field).await?
        } else if let Some(d) = &v.downward_api {
            let field = format!("{field}.downwardAPI");
            let mode = d.default_mode.unwrap_or(DEFAULT_MODE);
            write_files(
                &dir,
                &downward_files(pod, d.items.as_deref(), mode, &field)?,
                &field,
            )?;
            dir
        } else {
            bail!("{field} ({:?}): unsupported volume type (emptyDir, hostPath, configMap, secret, downwardAPI, projected and persistentVolumeClaim are supported)", v.name);
        };
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

fn field_value(pod: &Pod, path: &str, pod_ip: &str) -> Option<String> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    Some(match path {
        "metadata.name" => m.name.clone()?,
        "metadata.namespace" => m.namespace.clone()?,
        "metadata.uid" => m.uid.clone()?,
        "spec.nodeName" => spec?.node_name.clone()?,
        "spec.serviceAccountName" => spec?.service_account_name.clone().unwrap_or_default(),
        "status.podIP" => pod_ip.to_string(),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone().unwrap_or_default(),
        p => {
            let (map, key) = p.split_once("['")?;
            let key = key.strip_suffix("']")?;
            match map {
                "metadata.labels" => m.labels.as_ref()?.get(key).cloned().unwrap_or_default(),
                "metadata.annotations" => m
                    .annotations
                    .as_ref()?
                    .get(key)
                    .cloned()
                    .unwrap_or_default(),
                _ => return None,
            }
        }
    })
}

/// `$(VAR)` references expand from `env`; `$$` escapes.
pub fn expand(s: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as `KEY=VALUE`, in Kubernetes' order:
/// image env, envFrom, env (later entries win).
pub async fn env(
    kubelet: &Kubelet,
    pod: &Pod,
    c: &Container,
    image: &ImageConfig,
    pod_ip: &str,
) -> Result<Vec<String>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
        vars.retain(|(x, _)| *x != k);
        vars.push((k, v));
    };
    for e in &image.env {
        if let Some((k, v)) = e.split_once('=') {
            set(&mut vars, k.to_string(), v.to_string());
        }
    }
    if !vars.iter().any(|(k, _)| k == "PATH") {
        set(
            &mut vars,
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or(pod.metadata.name.clone())
        .unwrap_or_default();
    set(&mut vars, "HOSTNAME".into(), hostname);
    // Every pod finds the API server, whatever its enableServiceLinks says.
    if let Some(svc) = api_service(kubelet).await? {
        for (k, v) in service_env(&svc) {
            set(&mut vars, k, v);
        }
    }
    for (i, ef) in c.env_from.iter().flatten().enumerate() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &ef.config_map_ref {
            match config_map(kubelet, ns, &r.name).await? {
                Some(d) => d,
                None if r.optional == Some(true) => continue,
                None => bail!(
                    "configmap {:?} not found (spec.containers[{}].envFrom[{i}].configMapRef)",
                    r.name,
                    c.name
                ),
            }
        } else if let Some(r) = &ef.secret_ref {
            match secret(kubelet, ns, &r.name).await? {
                Some(d) => d,
                None if r.optional == Some(true) => continue,
                None => bail!(
                    "secret {:?} not found (spec.containers[{}].envFrom[{i}].secretRef)",
                    r.name,
                    c.name
                ),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            set(
                &mut vars,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        let field = format!("spec.containers[{}].env[{i}]", c.name);
        let value = if let Some(v) = &e.value {
            let current: HashMap<String, String> = vars.iter().cloned().collect();
            expand(v, &current)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_value(pod, &f.field_path, pod_ip).with_context(|| {
                    format!(
                        "{field}.valueFrom.fieldRef: unsupported fieldPath {:?}",
                        f.field_path
                    )
                })?
            } else if let Some(r) = &from.config_map_key_ref {
                let data = config_map(kubelet, ns, &r.name).await?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => bail!(
                        "couldn't find key {} in ConfigMap {ns}/{} ({field})",
                        r.key,
                        r.name
                    ),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let data = secret(kubelet, ns, &r.name).await?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => bail!(
                        "couldn't find key {} in Secret {ns}/{} ({field})",
                        r.key,
                        r.name
                    ),
                }
            } else {
                bail!("{field}.valueFrom: only fieldRef, configMapKeyRef and secretKeyRef are supported");
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name.clone(), value);
    }
    Ok(vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// The `default/kubernetes` Service through which pods reach the API
/// server: from the node's watch of Services when it has one, else read
/// (and kept a little while). None when there is no such Service.
async fn api_service(kubelet: &Kubelet) -> Result<Option<Arc<Service>>> {
    if let Some(services) = kubelet.services.get() {
        if services.ready().now_or_never().is_some() {
            return Ok(services.get(Some("default"), "kubernetes"));
        }
    }
    if let Some((at, svc)) = &*lock(&kubelet.api_service) {
        if at.elapsed() < API_SERVICE_TTL {
            return Ok(svc.clone());
        }
    }
    let api: Api<Service> = Api::namespaced(kubelet.client.clone(), "default");
    let svc = api
        .get_opt("kubernetes")
        .await
        .context("reading Service default/kubernetes for KUBERNETES_SERVICE_HOST")?
        .map(Arc::new);
    *lock(&kubelet.api_service) = Some((Instant::now(), svc.clone()));
    Ok(svc)
}

/// A Service's variables as Kubernetes sets them in containers
/// (`NAME_SERVICE_HOST`, `NAME_SERVICE_PORT`, one per named port, and the
/// Docker link ones); none for a Service without a cluster IP.
fn service_env(svc: &Service) -> Vec<(String, String)> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ip = spec.cluster_ip.as_deref().unwrap_or_default();
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ip.is_empty() || ip == "None" || ports.is_empty() {
        return Vec::new();
    }
    let env_name = |s: &str| s.to_ascii_uppercase().replace('-', "_");
    let prefix = env_name(svc.metadata.name.as_deref().unwrap_or_default());
    let mut vars = vec![
        (format!("{prefix}_SERVICE_HOST"), ip.to_string()),
        (format!("{prefix}_SERVICE_PORT"), ports[0].port.to_string()),
    ];
    for p in ports {
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            let var = format!("{prefix}_SERVICE_PORT_{}", env_name(name));
            vars.push((var, p.port.to_string()));
        }
    }
    let host = |port: i32| match ip.contains(':') {
        true => format!("[{ip}]:{port}"),
        false => format!("{ip}:{port}"),
    };
    for (i, p) in ports.iter().enumerate() {
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let lower = proto.to_ascii_lowercase();
        let url = format!("{lower}://{}", host(p.port));
        if i == 0 {
            vars.push((format!("{prefix}_PORT"), url.clone()));
        }
        let port_prefix = format!("{prefix}_PORT_{}_{}", p.port, proto.to_ascii_uppercase());
        vars.push((port_prefix.clone(), url));
        vars.push((format!("{port_prefix}_PROTO"), lower));
        vars.push((format!("{port_prefix}_PORT"), p.port.to_string()));
        vars.push((format!("{port_prefix}_ADDR"), ip.to_string()));
    }
    vars
}

/// Where a pod's DNS queries go: the cluster DNS and its search path, or
/// the node's own resolvers, by the pod's `dnsPolicy` and `dnsConfig` as
/// the kubelet decides them; `host` is the node's resolv.conf. None for a
/// host-network pod that uses the node's file unchanged (it is mounted as
/// it is).
pub fn resolv_conf(
    pod: &Pod,
    cluster_dns: Option<std::net::IpAddr>,
    cluster_domain: &str,
    host: &str,
) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let host_network = spec.host_network == Some(true);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = cluster_dns.filter(|_| match policy {
        "ClusterFirst" => !host_network,
        "ClusterFirstWithHostNet" => true,
        _ => false,
    });
    if host_network && cluster.is_none() && policy != "None" && spec.dns_config.is_none() {
        return None;
    }
    let host_search: Vec<String> = host
        .lines()
        .filter_map(|l| l.trim().strip_prefix("search"))
        .flat_map(|s| s.split_whitespace().map(str::to_string))
        .collect();
    let (mut nameservers, mut search, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match (policy, cluster) {
            ("None", _) => Default::default(),
            (_, Some(ip)) => {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                let domain = cluster_domain;
                let mut search = vec![
                    format!("{ns}.svc.{domain}"),
                    format!("svc.{domain}"),
                    domain.to_string(),
                ];
                search.extend(host_search);
                (vec![ip.to_string()], search, vec!["ndots:5".into()])
            }
            _ => {
                let usable = tapestry_proxy::dns::nameservers(host)
                    .into_iter()
                    // The node's loopback resolvers are not the pod's.
                    .filter(|ip| host_network || !ip.is_loopback())
                    .map(|ip| ip.to_string())
                    .collect();
                let options = host
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("options"))
                    .flat_map(|s| s.split_whitespace().map(str::to_string))
                    .collect();
                (usable, host_search, options)
            }
        };
    if let Some(extra) = &spec.dns_config {
        nameservers.extend(extra.nameservers.iter().flatten().cloned());
        search.extend(extra.searches.iter().flatten().cloned());
        for option in extra.options.iter().flatten() {
            let Some(name) = option.name.as_deref() else {
                continue;
            };
            // A pod's option replaces the same option from the policy.
            options.retain(|o| o.split(':').next() != Some(name));
            options.push(match &option.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    search.retain(|s| seen.insert(s.clone()));
    // The resolver libraries read at most three nameservers and six
    // search domains, as the kubelet enforces.
    nameservers.truncate(3);
    search.truncate(6);
    let mut out = String::new();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for ns in nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    Some(out)
}

/// /etc/hosts and /etc/hostname for a pod with its own network namespace,
/// and /etc/resolv.conf for any pod that gets one of its own.
pub fn etc_files(
    pod: &Pod,
    pod_dir: &Path,
    pod_ip: Option<&str>,
    resolv: Option<String>,
) -> Result<Vec<(&'static str, PathBuf)>> {
    let dir = pod_dir.join("etc");
    fs::create_dir_all(&dir)?;
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or(pod.metadata.name.clone())
        .unwrap_or_default();
    let mut files = Vec::new();
    if let Some(ip) = pod_ip {
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{name}\n"
        );
        files.push(("hosts", hosts));
        files.push(("hostname", format!("{name}\n")));
    }
    if let Some(resolv) = resolv {
        files.push(("resolv.conf", resolv));
    }
    let mut out = Vec::new();
    for (n, content) in files {
        let p = dir.join(n);
        fs::write(&p, content)?;
        out.push((n, p));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let env: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("cost $5", &env), "cost $5");
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// What the API server's ServiceAccount admission injects.
    fn api_access_pod() -> (Pod, ProjectedVolumeSource) {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web", "tier": "front \"end\""}},
            "spec": {"containers": [{"name": "c"}], "serviceAccountName": "builder", "nodeName": "n1",
                "volumes": [{"name": "kube-api-access-abcde", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [
                        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
                        {"path": "meta/labels", "fieldRef": {"fieldPath": "metadata.labels"}, "mode": 0o600},
                        {"path": "meta/app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
                        {"path": "account", "fieldRef": {"fieldPath": "spec.serviceAccountName"}}]}},
                    {"secret": {"name": "extra", "optional": true}}]}}]},
        }))
        .unwrap();
        let projected = p.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
            .projected
            .clone()
            .unwrap();
        (p, projected)
    }

    fn api_access_fetched() -> Fetched {
        let ca: BTreeMap<String, Vec<u8>> = [
            ("ca.crt".to_string(), b"PEM".to_vec()),
            ("other".to_string(), b"x".to_vec()),
        ]
        .into();
        Fetched {
            keys: [(1, Some(ca)), (3, None)].into(),
            tokens: [(0, "jwt".to_string())].into(),
        }
    }

    #[test]
    fn projected_volume_layout_and_modes() {
        let (p, projected) = api_access_pod();
        let field = "spec.volumes[0].projected";
        let files = projected_files(&p, &projected, &api_access_fetched(), field).unwrap();
        let layout: Vec<(&str, &str, i32)> = files
            .iter()
            .map(|f| {
                (
                    f.path.as_str(),
                    std::str::from_utf8(&f.content).unwrap(),
                    f.mode,
                )
            })
            .collect();
        assert_eq!(
            layout,
            [
                ("token", "jwt", 0o644),
                ("ca.crt", "PEM", 0o644),
                ("namespace", "shop", 0o644),
                (
                    "meta/labels",
                    "app=\"web\"\ntier=\"front \\\"end\\\"\"",
                    0o600
                ),
                ("meta/app", "web", 0o644),
                ("account", "builder", 0o644),
            ]
        );

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kube-api-access-abcde");
        write_files(&dir, &files, field).unwrap();
        assert_eq!(fs::read_to_string(dir.join("token")).unwrap(), "jwt");
        assert_eq!(fs::read_to_string(dir.join("ca.crt")).unwrap(), "PEM");
        assert_eq!(fs::read_to_string(dir.join("namespace")).unwrap(), "shop");
        assert_eq!(mode_of(&dir.join("token")), 0o644);
        assert_eq!(mode_of(&dir.join("meta/labels")), 0o600);
        assert!(!dir.join("other").exists());

        // Written again in place: the directory (a running container's
        // mount) stays, files no longer projected go, no temp files stay.
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = inode(&dir);
        fs::write(dir.join("stale"), "x").unwrap();
        let fewer: Vec<VolumeFile> = files.into_iter().filter(|f| f.path != "meta/app").collect();
        write_files(&dir, &fewer, field).unwrap();
        assert_eq!(inode(&dir), before);
        assert!(!dir.join("stale").exists());
        assert!(!dir.join("meta/app").exists());
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["account", "ca.crt", "meta", "namespace", "token"]);

        // A replaced token file is a new file: readers never see half of it.
        let token = dir.join("token");
        let old = inode(&token);
        write_atomic(&token, b"jwt2", 0o440).unwrap();
        assert_eq!(fs::read_to_string(&token).unwrap(), "jwt2");
        assert_eq!(mode_of(&token), 0o440);
        assert_ne!(inode(&token), old);
    }

    #[test]
    fn projected_volume_errors_name_the_field() {
        let (p, projected) = api_access_pod();
        let field = "spec.volumes[0].projected";
        let err = |fetched: &Fetched, projected: &ProjectedVolumeSource| {
            format!(
                "{:#}",
                projected_files(&p, projected, fetched, field).unwrap_err()
            )
        };
        let mut fetched = api_access_fetched();
        fetched.keys.insert(1, None);
        assert_eq!(
            err(&fetched, &projected),
            "configmap \"kube-root-ca.crt\" not found (spec.volumes[0].projected.sources[1].configMap)"
        );
        fetched.keys.insert(1, Some(BTreeMap::new()));
        assert_eq!(
            err(&fetched, &projected),
            "spec.volumes[0].projected.sources[1].configMap.items[0]: key \"ca.crt\" not found"
        );
        let mut bad: ProjectedVolumeSource = serde_json::from_value(serde_json::json!({"sources": [
            {"downwardAPI": {"items": [{"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}}]}}]}))
        .unwrap();
        assert_eq!(
            err(&fetched, &bad),
            "spec.volumes[0].projected.sources[0].downwardAPI.items[0].fieldRef: unsupported fieldPath \"status.podIP\""
        );
        bad.sources.as_mut().unwrap()[0] = serde_json::from_value(serde_json::json!(
            {"downwardAPI": {"items": [{"path": "../x", "fieldRef": {"fieldPath": "metadata.name"}}]}}))
        .unwrap();
        let files = projected_files(&p, &bad, &fetched, field).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            format!("{:#}", write_files(tmp.path(), &files, field).unwrap_err()),
            "spec.volumes[0].projected: item path \"../x\" must be relative and must not contain '..'"
        );
        let twice = [("a", "1"), ("a", "2")].map(|(p, c)| VolumeFile {
            path: p.into(),
            content: c.into(),
            mode: 0o644,
        });
        assert!(write_files(tmp.path(), &twice, field).is_err());
    }

    #[test]
    fn optional_configmap_volumes_may_lack_keys() {
        let items: Vec<KeyToPath> = serde_json::from_value(
            serde_json::json!([{"key": "a", "path": "x/a", "mode": 0o400},
                                                      {"key": "b", "path": "b"}]),
        )
        .unwrap();
        let data: BTreeMap<String, Vec<u8>> = [("a".to_string(), b"1".to_vec())].into();
        let files = key_files(Some(&data), Some(&items), 0o644, true, "cm").unwrap();
        assert_eq!(
            files,
            [VolumeFile {
                path: "x/a".into(),
                content: b"1".to_vec(),
                mode: 0o400
            }]
        );
        assert!(key_files(Some(&data), Some(&items), 0o644, false, "cm").is_err());
        assert!(key_files(None, Some(&items), 0o644, true, "cm")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_api_servers_service_in_the_environment() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1",
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
        }))
        .unwrap();
        let env: Vec<String> = service_env(&svc)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            env,
            [
                "KUBERNETES_SERVICE_HOST=10.96.0.1",
                "KUBERNETES_SERVICE_PORT=443",
                "KUBERNETES_SERVICE_PORT_HTTPS=443",
                "KUBERNETES_PORT=tcp://10.96.0.1:443",
                "KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443",
                "KUBERNETES_PORT_443_TCP_PROTO=tcp",
                "KUBERNETES_PORT_443_TCP_PORT=443",
                "KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1",
            ]
        );
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes"},
            "spec": {"clusterIP": "None", "ports": [{"port": 443}]},
        }))
        .unwrap();
        assert!(service_env(&headless).is_empty());
    }

    #[test]
    fn resolv_conf_follows_the_dns_policy() {
        let host =
            "search corp.example\nnameserver 127.0.0.53\nnameserver 10.0.0.2\noptions edns0\n";
        let dns = Some("10.96.0.10".parse().unwrap());
        let resolv = |spec| resolv_conf(&pod(spec), dns, "cluster.local", host);
        let containers = serde_json::json!([{"name": "c"}]);
        assert_eq!(
            resolv(serde_json::json!({"containers": containers})).unwrap(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
        // The node's resolvers, without its loopback ones.
        assert_eq!(
            resolv(serde_json::json!({"containers": containers, "dnsPolicy": "Default"})).unwrap(),
            "search corp.example\nnameserver 10.0.0.2\noptions edns0\n"
        );
        // Host network: the node's file as it is, unless asked otherwise.
        assert_eq!(
            resolv(serde_json::json!({"containers": containers, "hostNetwork": true})),
            None
        );
        let with_host_net = resolv(serde_json::json!({"containers": containers,
            "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}));
        assert!(with_host_net.unwrap().contains("nameserver 10.96.0.10\n"));
        // None: only the pod's dnsConfig; options replace by name.
        let own = resolv(
            serde_json::json!({"containers": containers, "dnsPolicy": "None",
            "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["a.example"],
                          "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]}}),
        );
        assert_eq!(
            own.unwrap(),
            "search a.example\nnameserver 1.1.1.1\noptions ndots:2 rotate\n"
        );
        let merged = resolv(serde_json::json!({"containers": containers,
            "dnsConfig": {"options": [{"name": "ndots", "value": "1"}]}}));
        assert!(merged.unwrap().ends_with("options ndots:1\n"));
        // Without a cluster DNS, ClusterFirst falls back to the node's.
        let plain = resolv_conf(
            &pod(serde_json::json!({"containers": containers})),
            None,
            "cluster.local",
            host,
        );
        assert!(plain.unwrap().contains("nameserver 10.0.0.2"));
    }
}
