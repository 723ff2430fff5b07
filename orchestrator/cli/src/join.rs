//! A node's credentials, as the kubelet's TLS bootstrap and certificate
//! rotation: a node without a client certificate joins with a bootstrap
//! token, asks for `system:node:NAME` (group `system:nodes`) through a
//! CertificateSigningRequest and speaks as itself from then on; it asks
//! for its serving certificate (its name and addresses) the same way. Both
//! are kept in the node's data directory (0600) and renewed at 70–90% of
//! their lifetime while the node runs; new connections use the new ones.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tapestry_runtime::certificate::{self, kept, save, unix_now, Ask};
use tapestry_runtime::csr::{self, KUBELET_CLIENT_SIGNER, KUBELET_SERVING_SIGNER, NODES_GROUP};
use tapestry_runtime::identity::LiveIdentity;
use tokio_util::sync::CancellationToken;

/// How soon a failed renewal is tried again.
const RENEWAL_RETRY: Duration = Duration::from_secs(30);

/// Where a node is and who it is.
pub struct Join {
    server: String,
    ca_pem: String,
    /// Used only when the node has no valid client certificate yet.
    bootstrap_token: Option<String>,
    /// Where the certificates are kept.
    dir: PathBuf,
    node_name: String,
    node_ip: IpAddr,
}

/// What a joined node holds.
pub struct Credentials {
    /// The node's API client, presenting its client certificate.
    pub client: kube::Client,
    /// Its serving certificate, for the kubelet API.
    pub serving: Arc<LiveIdentity>,
}

impl Join {
    /// A node that keeps its certificates under `DATA_DIR/kubelet/pki`.
    pub fn new(
        server: &str,
        ca_pem: &str,
        bootstrap_token: Option<String>,
        data_dir: &Path,
        node_name: &str,
        node_ip: IpAddr,
    ) -> Join {
        Join {
            server: server.to_string(),
            ca_pem: ca_pem.to_string(),
            bootstrap_token,
            dir: data_dir.join("kubelet/pki"),
            node_name: node_name.to_string(),
            node_ip,
        }
    }

    fn user(&self) -> String {
        csr::node_user(&self.node_name)
    }

    fn client_file(&self) -> PathBuf {
        self.dir.join("kubelet-client.pem")
    }

    fn serving_file(&self) -> PathBuf {
        self.dir.join("kubelet-serving.pem")
    }

    fn serving_names(&self) -> Vec<String> {
        vec![
            self.node_name.clone(),
            self.node_ip.to_string(),
            "localhost".into(),
        ]
    }

    /// The node's credentials: those kept from before while they are
    /// valid, new ones otherwise (joining with the bootstrap token if the
    /// client certificate is gone). Renewal runs until `shutdown`.
    pub async fn credentials(self, shutdown: CancellationToken) -> Result<Credentials> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .with_context(|| format!("securing {}", self.dir.display()))?;
        // Certificates from another cluster (a CA made anew) are of no use.
        let ca_file = self.dir.join("ca.crt");
        if std::fs::read_to_string(&ca_file).ok().as_deref() != Some(self.ca_pem.as_str()) {
            for f in [self.client_file(), self.serving_file()] {
                let _ = std::fs::remove_file(f);
            }
            std::fs::write(&ca_file, &self.ca_pem)
                .with_context(|| format!("writing {}", ca_file.display()))?;
        }
        let (cert, key) = match kept(&self.client_file(), &self.user(), &[]) {
            Some(pair) => pair,
            None => {
                let Some(token) = &self.bootstrap_token else {
                    bail!(
                        "no valid client certificate in {} and no bootstrap token to ask for one (--token-file)",
                        self.client_file().display()
                    );
                };
                let bootstrap = crate::node::node_client(&self.server, &self.ca_pem, token).await?;
                tracing::info!(node = %self.node_name, "joining with a bootstrap token");
                let pair = self
                    .request(&bootstrap, KUBELET_CLIENT_SIGNER, &[], "client auth")
                    .await
                    .context("asking for the node's client certificate")?;
                save(&self.client_file(), &pair)?;
                pair
            }
        };
        let identity = Arc::new(LiveIdentity::from_pem(&cert, &key).map_err(anyhow::Error::msg)?);
        let client = self.client(identity.clone()).await?;
        let serving_pair = match kept(&self.serving_file(), &self.user(), &self.serving_names()) {
            Some(pair) => pair,
            None => {
                let pair = self
                    .request(
                        &client,
                        KUBELET_SERVING_SIGNER,
                        &self.serving_names(),
                        "server auth",
                    )
                    .await
                    .context("asking for the node's serving certificate")?;
                save(&self.serving_file(), &pair)?;
                pair
            }
        };
        let serving = Arc::new(
            LiveIdentity::from_pem(&serving_pair.0, &serving_pair.1).map_err(anyhow::Error::msg)?,
        );
        tokio::spawn(self.renew(client.clone(), identity, serving.clone(), shutdown));
        Ok(Credentials { client, serving })
    }

    /// An HTTP/2 client to the API server presenting `identity`.
    async fn client(&self, identity: Arc<LiveIdentity>) -> Result<kube::Client> {
        let text = tapestry_apiserver::pki::kubeconfig(&self.server, &self.ca_pem, "node", "");
        let mut kc = kube::config::Kubeconfig::from_yaml(&text).context("node kubeconfig")?;
        for auth in &mut kc.auth_infos {
            auth.auth_info = None;
        }
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .context("node client configuration")?;
        crate::kubeclient::http2_with_identity(config, Some(identity))
    }

    /// Ask for a certificate from `signer` for this node (with `names` as
    /// subject alternative names) and wait until it is issued. Returns
    /// (certificate PEM, key PEM).
    async fn request(
        &self,
        client: &kube::Client,
        signer: &str,
        names: &[String],
        purpose: &str,
    ) -> Result<(String, String)> {
        let ask = Ask {
            signer: signer.into(),
            common_name: self.user(),
            organizations: vec![NODES_GROUP.into()],
            names: names.to_vec(),
            purpose: purpose.into(),
            generate_name: "node-csr-".into(),
            expiration_seconds: None,
        };
        certificate::obtain(client, &ask).await
    }

    /// Renew each certificate when it is due, until `shutdown`.
    async fn renew(
        self,
        client: kube::Client,
        identity: Arc<LiveIdentity>,
        serving: Arc<LiveIdentity>,
        shutdown: CancellationToken,
    ) {
        // Nodes that joined together renew apart.
        let jitter = certificate::jitter();
        loop {
            let due = |id: &LiveIdentity| {
                csr::validity(&id.cert_pem())
                    .map(|v| csr::renew_at(v, jitter))
                    .unwrap_or(0)
            };
            let (client_due, serving_due) = (due(&identity), due(&serving));
            let next = client_due.min(serving_due);
            let wait = (next - unix_now()).max(0) as u64;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            }
            let now = unix_now();
            let mut failed = false;
            if client_due <= now {
                failed |= self
                    .renew_one(
                        &client,
                        &identity,
                        KUBELET_CLIENT_SIGNER,
                        &[],
                        "client auth",
                        &self.client_file(),
                    )
                    .await
                    .is_err();
            }
            if serving_due <= now {
                failed |= self
                    .renew_one(
                        &client,
                        &serving,
                        KUBELET_SERVING_SIGNER,
                        &self.serving_names(),
                        "server auth",
                        &self.serving_file(),
                    )
                    .await
                    .is_err();
            }
            if failed {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RENEWAL_RETRY) => {}
                }
            }
        }
    }

    async fn renew_one(
        &self,
        client: &kube::Client,
        identity: &LiveIdentity,
        signer: &str,
        names: &[String],
        purpose: &str,
        file: &Path,
    ) -> Result<()> {
        let result = async {
            let pair = self.request(client, signer, names, purpose).await?;
            save(file, &pair)?;
            identity
                .replace(&pair.0, &pair.1)
                .map_err(anyhow::Error::msg)
        }
        .await;
        match &result {
            Ok(()) => tracing::info!(signer, file = %file.display(), "certificate renewed"),
            Err(e) => tracing::warn!(signer, "renewing a certificate: {e:#}"),
        }
        result
    }
}
