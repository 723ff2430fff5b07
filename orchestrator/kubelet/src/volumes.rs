//! Pod volumes (emptyDir, hostPath, configMap, secret), the container
//! environment (env, envFrom, downward fields), and the pod's /etc files.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret};
use kube::Api;

use crate::images::ImageConfig;
use crate::Kubelet;

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

fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: i32,
    what: &str,
) -> Result<()> {
    // Rewritten whole on each container start so updates are picked up.
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let files: Vec<(String, &Vec<u8>, i32)> = match items {
        Some(items) => items
            .iter()
            .map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v, i.mode.unwrap_or(mode)))
                    .with_context(|| format!("{what}: key {:?} not found", i.key))
            })
            .collect::<Result<_>>()?,
        None => data.iter().map(|(k, v)| (k.clone(), v, mode)).collect(),
    };
    for (path, value, mode) in files {
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            bail!("{what}: item path {path:?} must be relative and must not contain '..'");
        }
        let p = dir.join(&path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, value)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode as u32 & 0o777))?;
    }
    Ok(())
}

/// Make every volume of the pod available on the host; returns volume
/// name → host path.
pub async fn prepare(
    kubelet: &Kubelet,
    pod: &Pod,
    pod_dir: &Path,
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
            let data = match config_map(kubelet, ns, &cm.name).await? {
                Some(d) => d,
                None if cm.optional == Some(true) => BTreeMap::new(),
                None => bail!("configmap {:?} not found ({field}.configMap)", cm.name),
            };
            write_keys(
                &dir,
                &data,
                cm.items.as_ref(),
                cm.default_mode.unwrap_or(0o644),
                &format!("{field}.configMap"),
            )?;
            dir
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let data = match secret(kubelet, ns, &name).await? {
                Some(d) => d,
                None if s.optional == Some(true) => BTreeMap::new(),
                None => bail!("secret {name:?} not found ({field}.secret)"),
            };
            write_keys(
                &dir,
                &data,
                s.items.as_ref(),
                s.default_mode.unwrap_or(0o644),
                &format!("{field}.secret"),
            )?;
            dir
        } else {
            bail!("{field} ({:?}): unsupported volume type (emptyDir, hostPath, configMap and secret are supported)", v.name);
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
