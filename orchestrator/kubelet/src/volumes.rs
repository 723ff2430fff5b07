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

fn host_nameservers() -> Vec<String> {
    fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        // The host's loopback resolvers are not reachable from a pod.
        .filter(|s| !s.starts_with("127.") && s != "::1")
        .collect()
}

/// /etc/hosts, /etc/hostname and /etc/resolv.conf for a pod with its own
/// network namespace.
pub fn etc_files(pod: &Pod, pod_dir: &Path, pod_ip: &str) -> Result<Vec<(&'static str, PathBuf)>> {
    let dir = pod_dir.join("etc");
    fs::create_dir_all(&dir)?;
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or(pod.metadata.name.clone())
        .unwrap_or_default();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{name}\n"
    );
    let mut resolv = format!("search {ns}.svc.cluster.local svc.cluster.local cluster.local\n");
    for ns in host_nameservers() {
        resolv.push_str(&format!("nameserver {ns}\n"));
    }
    resolv.push_str("options ndots:5\n");
    let files = [
        ("hosts", hosts),
        ("hostname", format!("{name}\n")),
        ("resolv.conf", resolv),
    ];
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
}
