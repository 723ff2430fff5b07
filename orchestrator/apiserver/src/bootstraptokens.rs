//! Bootstrap tokens, as kubeadm joins nodes with them: `ID.SECRET`
//! (`[a-z0-9]{6}.[a-z0-9]{16}`), stored as a Secret `bootstrap-token-ID`
//! of type `bootstrap.kubernetes.io/token` in `kube-system` with an
//! expiration. A valid one authenticates as `system:bootstrap:ID` in
//! `system:bootstrappers`, which may only ask for a node client
//! certificate (a CertificateSigningRequest); the node then speaks as
//! itself. A token is useless after its expiration, and deleting its
//! Secret revokes it at once.

use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::pki::User;
use crate::rest::Api;

pub const NAMESPACE: &str = "kube-system";
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
pub const SECRET_PREFIX: &str = "bootstrap-token-";
/// The group every bootstrap token is in; extra groups must start with it.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";
/// The extra group of the tokens the server mints for joining nodes.
pub const NODE_JOIN_GROUP: &str = "system:bootstrappers:tapestry:node-join";
/// How long a token the server mints stays valid.
pub const DEFAULT_TTL: chrono::Duration = chrono::Duration::hours(24);
/// A token with less left than this is replaced at start.
const MIN_LEFT: chrono::Duration = chrono::Duration::hours(12);

/// `(id, secret)` of a well-formed token.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

/// A new random token.
pub fn generate() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let bytes: Vec<u8> = (0..2)
        .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
        .collect();
    let chars: String = bytes
        .iter()
        .take(22)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("{}.{}", &chars[..6], &chars[6..])
}

/// The Secret that makes `token` valid until `expires`.
pub fn secret(token: &str, expires: chrono::DateTime<chrono::Utc>, description: &str) -> Value {
    let (id, secret) = parse(token).unwrap_or_default();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{SECRET_PREFIX}{id}"), "namespace": NAMESPACE},
        "type": SECRET_TYPE,
        "stringData": {
            "description": description,
            "token-id": id,
            "token-secret": secret,
            "expiration": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "usage-bootstrap-authentication": "true",
            "usage-bootstrap-signing": "true",
            "auth-extra-groups": NODE_JOIN_GROUP,
        },
    })
}

fn data(secret: &Value, key: &str) -> Option<String> {
    let encoded = secret.pointer(&format!("/data/{key}"))?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The stored Secret of token `id`, if any.
async fn stored(api: &Api, id: &str) -> Result<Option<Value>, String> {
    let def = api
        .registry
        .get("", "v1", "secrets")
        .ok_or("secrets are not served")?;
    let kv = api
        .store
        .get(&def.key(Some(NAMESPACE), &format!("{SECRET_PREFIX}{id}")))
        .await
        .map_err(|e| e.to_string())?;
    kv.map(|kv| serde_json::from_slice(&kv.value).map_err(|e| e.to_string()))
        .transpose()
}

/// When the token's Secret says it expires (None: never), or why the
/// Secret does not make a valid token.
fn expiration(
    secret: &Value,
    id: &str,
    token_secret: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    if secret["type"] != SECRET_TYPE {
        return Err("not a bootstrap token Secret".into());
    }
    if data(secret, "token-id").as_deref() != Some(id) {
        return Err("token-id does not match".into());
    }
    let stored_secret = data(secret, "token-secret").unwrap_or_default();
    if !tapestry_apimachinery::tokens::constant_time_eq(
        stored_secret.as_bytes(),
        token_secret.as_bytes(),
    ) {
        return Err("wrong secret".into());
    }
    if data(secret, "usage-bootstrap-authentication").as_deref() != Some("true") {
        return Err("not usable for authentication".into());
    }
    match data(secret, "expiration") {
        None => Ok(None),
        Some(text) => chrono::DateTime::parse_from_rfc3339(&text)
            .map(|t| Some(t.with_timezone(&chrono::Utc)))
            .map_err(|_| format!("unreadable expiration {text:?}")),
    }
}

/// The user of a valid, unexpired bootstrap token; why not otherwise.
pub async fn authenticate(api: &Api, token: &str) -> Result<User, String> {
    let (id, token_secret) = parse(token).ok_or("not a bootstrap token")?;
    let secret = stored(api, id).await?.ok_or("no such bootstrap token")?;
    if secret.pointer("/metadata/deletionTimestamp").is_some() {
        return Err("bootstrap token is being deleted".into());
    }
    if let Some(expires) = expiration(&secret, id, token_secret)? {
        if expires <= chrono::Utc::now() {
            return Err(format!("bootstrap token {id} expired at {expires}"));
        }
    }
    let mut groups = vec![BOOTSTRAPPERS.to_string()];
    groups.extend(
        data(&secret, "auth-extra-groups")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|g| g.starts_with(&format!("{BOOTSTRAPPERS}:")))
            .map(str::to_string),
    );
    Ok(User {
        name: format!("system:bootstrap:{id}"),
        uid: String::new(),
        groups,
        ..Default::default()
    })
}

/// The user of a bearer token: from the token file, a bootstrap token, or
/// a service account token meant for one of `audiences` (none: this
/// server's own); why not otherwise.
pub async fn bearer_user(
    api: &Api,
    tokens: &crate::pki::LiveTokens,
    token: &str,
    audiences: &[String],
) -> Result<User, String> {
    if let Some(user) = tokens.authenticate(token) {
        return Ok(user);
    }
    if parse(token).is_some() {
        return authenticate(api, token).await;
    }
    crate::satokens::authenticate(api, token, audiences).await
}

/// Make sure `DIR/node-token` holds a bootstrap token valid for at least
/// 12 more hours, minting a new one (valid 24 hours) if not.
pub async fn ensure_join_token(api: &Api, data_dir: &Path) -> Result<()> {
    let path = data_dir.join("node-token");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let current = current.trim();
    if let Some((id, token_secret)) = parse(current) {
        if let Ok(Some(secret)) = stored(api, id).await {
            let left = expiration(&secret, id, token_secret).ok().map(|e| match e {
                Some(t) => t - chrono::Utc::now(),
                None => chrono::Duration::MAX,
            });
            if left.is_some_and(|l| l >= MIN_LEFT) {
                return Ok(());
            }
        }
    }
    let token = create(
        api,
        DEFAULT_TTL,
        "joins nodes of this cluster (tapestry server)",
    )
    .await?;
    crate::pki::write_private(&path, &format!("{token}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Keep `DIR/node-token` valid while the server runs (nodes added to a
/// long-running local cluster join with it).
pub async fn keep_join_token(
    api: std::sync::Arc<Api>,
    data_dir: std::path::PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
        if let Err(e) = ensure_join_token(&api, &data_dir).await {
            tracing::warn!("renewing the node join token: {e:#}");
        }
    }
}

/// Mint a token valid for `ttl`, stored through `api`.
pub async fn create(api: &Api, ttl: chrono::Duration, description: &str) -> Result<String> {
    let token = generate();
    let obj = secret(&token, chrono::Utc::now() + ttl, description);
    match api
        .create_internal("", "v1", "secrets", Some(NAMESPACE), obj)
        .await
    {
        Ok(()) => Ok(token),
        Err(ApiError::AlreadyExists(_)) => Box::pin(create(api, ttl, description)).await,
        Err(e) => anyhow::bail!("storing a bootstrap token: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_kubeadms_shape() {
        for _ in 0..100 {
            let t = generate();
            assert!(parse(&t).is_some(), "{t}");
        }
        assert!(parse("abcdef.0123456789abcdef").is_some());
        for bad in [
            "abcdef0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef.x",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_secret_checks_its_token() {
        let token = "abcdef.0123456789abcdef";
        let mut s = secret(token, chrono::Utc::now(), "test");
        // Stored form: stringData becomes data.
        let data: serde_json::Map<String, Value> = s["stringData"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let b = base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap().as_bytes());
                (k.clone(), json!(b))
            })
            .collect();
        s["data"] = Value::Object(data);
        assert!(expiration(&s, "abcdef", "0123456789abcdef").is_ok());
        assert!(expiration(&s, "abcdef", "0123456789abcdee").is_err());
        assert!(expiration(&s, "abcdeg", "0123456789abcdef").is_err());
        s["type"] = json!("Opaque");
        assert!(expiration(&s, "abcdef", "0123456789abcdef").is_err());
    }
}
