//! Service account tokens: JWTs the server signs (ES256) for the
//! TokenRequest API (`kubectl create token`, the kubelet's projected
//! tokens), checked on every request that carries one. A token names its
//! account and, when bound, the pod it was issued for: it stops working
//! when either is deleted (or replaced by one of the same name), and at
//! its expiry. The public key is published as JWKS with an OIDC discovery
//! document, so other systems can verify tokens too.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::objects::decode;
use crate::pki::User;
use crate::rest::Api;

/// The `iss` of every token, and the audience a token without one is for.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// A TokenRequest's lifetime unless it asks otherwise, and the shortest it
/// may ask for.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// The longest lifetime granted; longer requests get this.
pub const MAX_EXPIRATION_SECONDS: i64 = 48 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    jwk: Value,
}

impl TokenIssuer {
    /// The signing key `pki/sa.key` (made on first start, 0600).
    pub fn load_or_create(pki_dir: &Path) -> Result<TokenIssuer> {
        let path = pki_dir.join("sa.key");
        if !path.exists() {
            let key = KeyPair::generate().context("generating the service account key")?;
            crate::pki::write_private(&path, &key.serialize_pem())?;
        }
        let pem =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let key = KeyPair::from_pem(&pem).with_context(|| format!("parsing {}", path.display()))?;
        let public = key.public_key_raw();
        anyhow::ensure!(
            public.len() == 65 && public[0] == 4,
            "{}: not a P-256 key",
            path.display()
        );
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let (x, y) = (b64(&public[1..33]), b64(&public[33..65]));
        let kid = b64(&Sha256::digest(public));
        Ok(TokenIssuer {
            encoding: EncodingKey::from_ec_der(&key.serialize_der()),
            decoding: DecodingKey::from_ec_components(&x, &y)
                .context("the service account key's public half")?,
            jwk: json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                        "kid": kid, "x": x, "y": y}),
            kid,
        })
    }

    pub fn sign(&self, claims: &Claims) -> Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).context("signing a token")
    }

    /// The claims of a token this server signed that has not expired and
    /// is meant for one of `audiences`; why not otherwise.
    pub fn verify(&self, token: &str, audiences: &[String]) -> Result<Claims, String> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(audiences);
        v.leeway = 0;
        v.validate_nbf = true;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map(|t| t.claims)
            .map_err(|e| format!("invalid service account token: {e}"))
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk]})
    }

    pub fn discovery(&self) -> Value {
        json!({
            "issuer": ISSUER,
            "jwks_uri": format!("{ISSUER}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }
}

/// Whether a bearer token looks like a JWT (three base64url parts) rather
/// than a token-file token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("ey")
}

/// The user of a service account token meant for one of `audiences`
/// (none: this server's own), if it verifies and its account (and pod)
/// still exist; why not otherwise.
pub async fn authenticate(api: &Api, token: &str, audiences: &[String]) -> Result<User, String> {
    if !looks_like_jwt(token) {
        return Err("not a token this server knows".into());
    }
    let issuer = api
        .service_account_tokens
        .get()
        .ok_or("service account tokens are not set up")?;
    let own = [ISSUER.to_string()];
    let audiences = if audiences.is_empty() {
        &own[..]
    } else {
        audiences
    };
    let claims = issuer.verify(token, audiences)?;
    user_of(api, &claims).await
}

/// The user of a verified token, if its account (and pod) still exist as
/// the ones it was issued for.
async fn user_of(api: &Api, claims: &Claims) -> Result<User, String> {
    let k = &claims.kubernetes;
    let object = |plural: &str, name: &str| {
        let plural = plural.to_string();
        let name = name.to_string();
        async move {
            let def = api
                .registry
                .get("", "v1", &plural)
                .ok_or_else(|| format!("{plural} are not served"))?;
            let kv = api
                .store
                .get(&def.key(Some(&k.namespace), &name))
                .await
                .map_err(|e| e.to_string())?;
            let Some(kv) = kv else { return Ok(None) };
            decode(&def, &kv).map(Some).map_err(|e| e.to_string())
        }
    };
    let uid = |obj: &Option<Value>| {
        obj.as_ref()
            .and_then(|o| o.pointer("/metadata/uid"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let sa = &k.serviceaccount;
    if uid(&object("serviceaccounts", &sa.name).await?).as_deref() != Some(sa.uid.as_str()) {
        return Err(format!(
            "service account {}/{} (uid {}) no longer exists",
            k.namespace, sa.name, sa.uid
        ));
    }
    let mut user = service_account_user(&k.namespace, &sa.name, &sa.uid);
    if let Some(pod) = &k.pod {
        let obj = object("pods", &pod.name).await?;
        if uid(&obj).as_deref() != Some(pod.uid.as_str()) {
            return Err(format!(
                "the pod {}/{} (uid {}) the token was bound to no longer exists",
                k.namespace, pod.name, pod.uid
            ));
        }
        // As kube-apiserver: who the token's pod is, and (where it is
        // bound) its node, for authorizers and signers to check.
        use tapestry_runtime::csr::{EXTRA_NODE_NAME, EXTRA_POD_NAME, EXTRA_POD_UID};
        user.extra
            .insert(EXTRA_POD_NAME.into(), vec![pod.name.clone()]);
        user.extra
            .insert(EXTRA_POD_UID.into(), vec![pod.uid.clone()]);
        if let Some(node) = obj
            .as_ref()
            .and_then(|o| o.pointer("/spec/nodeName"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            user.extra
                .insert(EXTRA_NODE_NAME.into(), vec![node.to_string()]);
        }
    }
    Ok(user)
}

/// `system:serviceaccount:NS:NAME` in its groups.
pub fn service_account_user(namespace: &str, name: &str, uid: &str) -> User {
    User {
        name: format!("system:serviceaccount:{namespace}:{name}"),
        uid: uid.to_string(),
        groups: vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
        ],
        ..Default::default()
    }
}
