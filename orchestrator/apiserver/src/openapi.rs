//! OpenAPI documents served at /openapi/v2 and /openapi/v3: the built-in
//! kinds' generated once at start-up (the same definitions type their
//! patches), each custom group version's built when its CRDs change, so
//! `kubectl explain` sees a custom kind as soon as it is served.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::Result;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use tapestry_apimachinery::PatchSchema;
use tapestry_openapi::{OpenApi, ResourceInfo};

use crate::discovery::KUBE_GIT_VERSION;
use crate::error::ApiError;
use crate::registry::{Registry, ResourceDef};

mod v2proto;

/// The media type of the v2 document in protobuf.
const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";
/// The older name of the same, which client-go still asks for. `@` is no
/// token character, so Go's media type parser rejects it in a
/// Content-Type: it is answered as [`V2_PROTOBUF`], as kube-apiserver does.
const V2_PROTOBUF_DEPRECATED: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

pub struct OpenApiDocs {
    docs: Arc<OpenApi>,
    /// The v2 document in protobuf and its hash, encoded when first asked
    /// for: only kubectl's fallbacks read it.
    v2_protobuf: OnceLock<(Vec<u8>, String)>,
    custom: RwLock<CustomDocs>,
}

/// One custom kind in one version, as its CRD describes it.
#[derive(Clone)]
pub struct CustomKind {
    pub info: ResourceInfo,
    /// The version's openAPIV3Schema.
    pub schema: serde_json::Value,
}

#[derive(Default)]
struct CustomDocs {
    /// CRD name → the kinds it serves.
    by_crd: BTreeMap<String, Vec<CustomKind>>,
    /// Group-version path (`apis/example.com/v1`) → its documents.
    by_group_version: BTreeMap<String, Arc<LazyDocs>>,
}

/// A custom group version's documents, built when first asked for: most
/// are never read (clients read the group versions they use), and each
/// holds every definition its kinds reach.
struct LazyDocs {
    kinds: Vec<CustomKind>,
    /// Changes whenever the kinds do; the v3 index names the document by it.
    hash: String,
    built: OnceLock<Result<Arc<OpenApi>, String>>,
}

impl LazyDocs {
    fn new(kinds: Vec<CustomKind>) -> Self {
        let mut digest = Sha256::new();
        for kind in &kinds {
            digest.update(format!("{:?}", kind.info));
            digest.update(kind.schema.to_string());
        }
        let hash = digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        LazyDocs {
            kinds,
            hash,
            built: OnceLock::new(),
        }
    }

    fn docs(&self) -> Result<Arc<OpenApi>, String> {
        self.built
            .get_or_init(|| {
                let mut builder = OpenApi::builder().version(emulated_version()).v3_only();
                for kind in &self.kinds {
                    builder =
                        builder.definition(kind.info.definition.clone(), published_schema(kind));
                }
                let infos: Vec<ResourceInfo> = self.kinds.iter().map(|k| k.info.clone()).collect();
                builder
                    .build(&infos)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

fn json_bytes(bytes: &[u8], cache: &str, etag: Option<&str>) -> Response {
    document_bytes(bytes, "application/json", cache, etag)
}

fn document_bytes(bytes: &[u8], content_type: &str, cache: &str, etag: Option<&str>) -> Response {
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache),
        ],
        bytes.to_vec(),
    )
        .into_response();
    if let Some(tag) = etag.and_then(|t| http::HeaderValue::from_str(&format!("\"{t}\"")).ok()) {
        resp.headers_mut().insert(header::ETAG, tag);
    }
    resp
}

/// What the OpenAPI documents need to know of a served resource.
pub fn resource_info(d: &ResourceDef) -> ResourceInfo {
    ResourceInfo {
        group: d.group.clone(),
        version: d.version.clone(),
        kind: d.kind.clone(),
        plural: d.plural.clone(),
        namespaced: d.namespaced,
        verbs: crate::discovery::VERBS
            .iter()
            .map(|v| v.to_string())
            .collect(),
        subresources: d
            .subresources
            .iter()
            .map(|s| s.kind.name().to_string())
            .collect(),
        definition: d.definition.clone(),
        strategic_merge: d.strategic_merge,
    }
}

impl OpenApiDocs {
    pub fn build(registry: &Registry) -> Result<Self> {
        let infos: Vec<ResourceInfo> = registry
            .builtin()
            .iter()
            .map(|d| resource_info(d))
            .collect();
        let docs = OpenApi::builder()
            .version(emulated_version())
            .build(&infos)
            .map_err(|e| anyhow::anyhow!("building OpenAPI documents: {e}"))?;
        Ok(OpenApiDocs {
            docs: Arc::new(docs),
            v2_protobuf: OnceLock::new(),
            custom: RwLock::new(CustomDocs::default()),
        })
    }

    /// Describe what the CRD `crd` serves now (nothing: it is gone), and
    /// rebuild the documents of the group versions that changed.
    pub fn set_custom(&self, crd: &str, kinds: Vec<CustomKind>) {
        let mut custom = self.custom.write().unwrap_or_else(|p| p.into_inner());
        let gv_of = |k: &CustomKind| group_version_path(&k.info.group, &k.info.version);
        let mut touched: BTreeSet<String> = custom
            .by_crd
            .get(crd)
            .into_iter()
            .flatten()
            .map(gv_of)
            .collect();
        touched.extend(kinds.iter().map(gv_of));
        if kinds.is_empty() {
            custom.by_crd.remove(crd);
        } else {
            custom.by_crd.insert(crd.to_string(), kinds);
        }
        for gv in touched {
            let members: Vec<CustomKind> = custom
                .by_crd
                .values()
                .flatten()
                .filter(|k| gv_of(k) == gv)
                .cloned()
                .collect();
            if members.is_empty() {
                custom.by_group_version.remove(&gv);
            } else {
                custom
                    .by_group_version
                    .insert(gv, Arc::new(LazyDocs::new(members)));
            }
        }
    }

    pub fn schema(&self) -> Arc<dyn PatchSchema> {
        self.docs.clone()
    }

    pub fn names(&self) -> Arc<dyn tapestry_kubeproto::JsonNames + Send + Sync> {
        self.docs.clone()
    }

    /// The custom documents of a v3 group-version path, if it is one.
    fn custom_docs(&self, path: &str) -> Option<Arc<LazyDocs>> {
        self.custom
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_group_version
            .get(path)
            .cloned()
    }

    /// Swagger 2.0, as JSON or in gnostic's protobuf form, whichever the
    /// Accept header ranks first (JSON for `*/*` or no header); 406 when it
    /// takes neither, as kube-apiserver answers.
    pub fn v2(&self, headers: &HeaderMap) -> Response {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut resp = match negotiate_v2(accept) {
            Some(V2Form::Json) => json_bytes(
                self.docs.v2_json(),
                "no-cache, private",
                Some(self.docs.v2_hash()),
            ),
            Some(V2Form::Protobuf) => {
                let (bytes, hash) = self.v2_protobuf.get_or_init(|| {
                    let doc: serde_json::Value =
                        serde_json::from_slice(self.docs.v2_json()).unwrap_or_default();
                    let bytes = v2proto::document(&doc);
                    let hash = tapestry_openapi::hex_sha256(&bytes);
                    (bytes, hash)
                });
                document_bytes(bytes, V2_PROTOBUF, "no-cache, private", Some(hash))
            }
            None => ApiError::NotAcceptable(format!(
                "/openapi/v2 is served as application/json or {V2_PROTOBUF}"
            ))
            .into_response(),
        };
        resp.headers_mut()
            .insert(header::VARY, http::HeaderValue::from_static("Accept"));
        resp
    }

    pub fn v3_index(&self) -> Response {
        let mut paths = serde_json::Map::new();
        let url = |gv: &str, hash: &str| serde_json::json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")});
        for gv in self.docs.v3_paths() {
            paths.insert(
                gv.to_string(),
                url(gv, self.docs.v3_hash(gv).unwrap_or_default()),
            );
        }
        let custom = self.custom.read().unwrap_or_else(|p| p.into_inner());
        for (gv, lazy) in &custom.by_group_version {
            paths.insert(gv.clone(), url(gv, &lazy.hash));
        }
        let body = serde_json::to_vec(&serde_json::json!({ "paths": paths })).unwrap_or_default();
        json_bytes(&body, "no-cache, private", None)
    }

    pub fn v3(&self, path: &str, query: &HashMap<String, String>) -> Response {
        let (docs, hash) = match self.custom_docs(path) {
            Some(lazy) => match lazy.docs() {
                Ok(docs) => (docs, lazy.hash.clone()),
                Err(e) => {
                    return ApiError::Internal(format!("OpenAPI document {path}: {e}"))
                        .into_response()
                }
            },
            None => match self.docs.v3_hash(path) {
                Some(hash) => (self.docs.clone(), hash.to_string()),
                None => return not_found(path),
            },
        };
        let Some(doc) = docs.v3_group_version_json(path) else {
            return not_found(path);
        };
        // A request naming the current hash may be cached forever.
        let immutable = query.get("hash") == Some(&hash);
        let cache = if immutable {
            "public, immutable, max-age=31536000"
        } else {
            "no-cache, private"
        };
        json_bytes(doc, cache, Some(&hash))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum V2Form {
    Json,
    Protobuf,
}

/// The form of the v2 document to answer `accept` with: the first media
/// range, by quality, that one of the forms matches (an empty header
/// takes anything).
fn negotiate_v2(accept: &str) -> Option<V2Form> {
    let accept = if accept.trim().is_empty() {
        "*/*"
    } else {
        accept
    };
    let mut ranges: Vec<(f32, &str)> = accept
        .split(',')
        .filter_map(|clause| {
            let mut parts = clause.split(';');
            let range = parts.next()?.trim();
            let quality: f32 = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map_or(Some(1.0), |q| q.trim().parse().ok())?;
            (quality > 0.0).then_some((quality, range))
        })
        .collect();
    // Stable: equal qualities keep the client's order.
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let forms = [
        ("application/json", V2Form::Json),
        (V2_PROTOBUF, V2Form::Protobuf),
        (V2_PROTOBUF_DEPRECATED, V2Form::Protobuf),
    ];
    for (_, range) in ranges {
        let (ty, sub) = range.split_once('/').unwrap_or((range, ""));
        for (media, form) in &forms {
            let (mty, msub) = media.split_once('/').unwrap_or((*media, ""));
            if (ty == "*" || ty.eq_ignore_ascii_case(mty))
                && (sub == "*" || sub.eq_ignore_ascii_case(msub))
            {
                return Some(*form);
            }
        }
    }
    None
}

fn not_found(path: &str) -> Response {
    ApiError::NotFound(crate::error::Target {
        resource: format!("openapi/v3/{path}"),
        ..Default::default()
    })
    .into_response()
}

/// The Kubernetes version the documents describe (`v1.33.0`).
fn emulated_version() -> &'static str {
    KUBE_GIT_VERSION
        .split('+')
        .next()
        .unwrap_or(KUBE_GIT_VERSION)
}

/// `apis/<group>/<version>`, as the v3 index names a group version.
fn group_version_path(group: &str, version: &str) -> String {
    format!("apis/{group}/{version}")
}

/// A custom kind's schema as published, the way kube-apiserver publishes
/// it: `metadata` is ObjectMeta, `apiVersion` and `kind` are described,
/// and what only the server evaluates (CEL rules) is left out.
fn published_schema(kind: &CustomKind) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("x-kubernetes-validations");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut schema = kind.schema.clone();
    strip(&mut schema);
    if !schema.is_object() {
        schema = serde_json::json!({"type": "object"});
    }
    let props = schema
        .as_object_mut()
        .expect("made an object above")
        .entry("properties")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(props) = props.as_object_mut() {
        props.insert("apiVersion".into(), serde_json::json!({"type": "string",
            "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"}));
        props.insert("kind".into(), serde_json::json!({"type": "string",
            "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"}));
        props.insert("metadata".into(), serde_json::json!({
            "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
            "$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}));
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_negotiation_follows_the_accept_header() {
        use V2Form::*;
        for (accept, form) in [
            ("", Some(Json)),
            ("*/*", Some(Json)),
            ("application/json", Some(Json)),
            ("application/json, */*", Some(Json)),
            // client-go's discovery client.
            (V2_PROTOBUF_DEPRECATED, Some(Protobuf)),
            (V2_PROTOBUF, Some(Protobuf)),
            (
                "application/json;q=0.5, application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
                Some(Protobuf),
            ),
            ("application/*", Some(Json)),
            ("application/json;q=0", None),
            ("application/yaml", None),
            ("application/vnd.kubernetes.protobuf", None),
        ] {
            assert_eq!(negotiate_v2(accept), form, "{accept}");
        }
    }

    #[tokio::test]
    async fn v2_is_served_as_json_and_as_protobuf() {
        let server = crate::testing::start().await;
        let (status, headers, json) = server
            .raw("GET", "/openapi/v2", "", "application/json", String::new())
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(json["swagger"], "2.0");
        assert!(json["definitions"]["io.k8s.api.core.v1.Pod"].is_object());

        let (status, headers, _) = server
            .raw(
                "GET",
                "/openapi/v2",
                "",
                V2_PROTOBUF_DEPRECATED,
                String::new(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], V2_PROTOBUF);
        assert_eq!(headers[header::VARY], "Accept");
        let docs = &server.engine.openapi;
        let (bytes, _) = docs.v2_protobuf.get().expect("encoded when asked for");
        // Document.swagger (field 1) comes first, as in the JSON.
        assert!(bytes.starts_with(b"\x0a\x032.0"), "{:?}", &bytes[..8]);
        assert!(bytes.len() > 100_000, "{} bytes", bytes.len());

        let (status, _, answer) = server
            .raw("GET", "/openapi/v2", "", "application/yaml", String::new())
            .await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(answer["reason"], "NotAcceptable");
    }
}
