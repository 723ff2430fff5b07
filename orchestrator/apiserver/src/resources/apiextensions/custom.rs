//! A custom resource is one more [`ResourceDef`], built at run time from
//! its CRD: one definition per served version, with the CRD's names, its
//! structural schema (pruning, defaulting, validation and CEL rules on
//! every write; defaults on every read), printer columns, selectable
//! fields, status and scale subresources, and field types for
//! server-side apply. Versions share one storage and differ only in
//! `apiVersion` (conversion strategy None).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use tapestry_apiextensions::columns::PrinterColumns;
use tapestry_apiextensions::patch_schema::CustomPatchSchema;
use tapestry_apiextensions::schema::Schema;
use tapestry_apiextensions::{default, prune, validate};
use tapestry_apimachinery::PatchSchema;

use super::customresourcedefinition::json_pointer;
use crate::error::Cause;
use crate::objects::unknown_fields;
use crate::registry::{typed_codec, Behaviour, Decoded, Generation, ResourceDef};
use crate::rest::scale::{ScaleRest, SelectorSource};
use crate::rest::status::StatusRest;
use crate::tables::{self, TablePrinter};
use crate::validation::NameRule;

/// One served version of a CRD, ready to serve.
pub struct ServedVersion {
    pub def: ResourceDef,
    /// The version's `openAPIV3Schema` as written, for the OpenAPI documents.
    pub schema_json: Value,
}

/// What a CRD serves, from its spec and the names it was accepted under.
/// `terminating`: the CRD is being deleted (no creates). Errors name what
/// could not be built (the CRD passed validation, so they mean a CRD stored
/// before a stricter check).
pub fn served_versions(
    crd: &Value,
    builtin_schema: &Arc<dyn PatchSchema>,
    terminating: bool,
) -> Result<Vec<ServedVersion>, String> {
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or("");
    let names = crd
        .pointer("/status/acceptedNames")
        .filter(|n| {
            !n.get("plural")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
        })
        .or_else(|| crd.pointer("/spec/names"))
        .cloned()
        .unwrap_or(json!({}));
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let list = |v: &Value, key: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let kind = text(&names, "kind");
    let plural = text(&names, "plural");
    let namespaced = crd.pointer("/spec/scope").and_then(Value::as_str) == Some("Namespaced");
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let storage_version = versions
        .iter()
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .map(|v| text(v, "name"))
        .ok_or("no storage version")?;
    let stored_versions = crd
        .pointer("/status/storedVersions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut served = Vec::new();
    for version in versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool) == Some(true))
    {
        let name = text(version, "name");
        let path = format!("spec.versions[{name}]");
        let schema_json = version
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        let schema = Arc::new(
            Schema::parse(&schema_json, &format!("{path}.schema.openAPIV3Schema"))
                .map_err(|causes| render(&causes))?,
        );
        let columns = PrinterColumns::compile(
            version.get("additionalPrinterColumns"),
            &format!("{path}.additionalPrinterColumns"),
        )
        .map_err(|causes| render(&causes))?;
        let api_version = format!("{group}/{name}");
        let has_status = version.pointer("/subresources/status").is_some();
        let mut subresources = Vec::new();
        if has_status {
            subresources.push(StatusRest::def());
        }
        if let Some(scale) = version.pointer("/subresources/scale") {
            let pointer = |key: &str| {
                scale
                    .get(key)
                    .and_then(Value::as_str)
                    .and_then(json_pointer)
            };
            subresources.push(ScaleRest::def(ScaleRest {
                spec_replicas: pointer("specReplicasPath").ok_or("invalid specReplicasPath")?,
                status_replicas: pointer("statusReplicasPath")
                    .ok_or("invalid statusReplicasPath")?,
                selector: pointer("labelSelectorPath")
                    .map(SelectorSource::Text)
                    .unwrap_or(SelectorSource::None),
            }));
        }
        let field_selectors = version
            .get("selectableFields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let path = f.get("jsonPath")?.as_str()?;
                Some((
                    path.trim_start_matches('.').to_string(),
                    json_pointer(path)?,
                ))
            })
            .collect();
        let definition = definition_name(group, &name, &kind);
        // Stored objects are served as stored when every one of them was
        // written as this version under the schema it has now: the CRD spec
        // never changed (generation 1), so each was pruned and defaulted by
        // this schema on its way in and reading it through the schema again
        // would change nothing. Otherwise each read prunes and defaults by
        // the current schema, as kube-apiserver's decoding from storage does.
        let written_as_served = name == storage_version
            && !stored_versions.is_empty()
            && stored_versions
                .iter()
                .all(|v| v.as_str() == Some(name.as_str()))
            && crd.pointer("/metadata/generation").and_then(Value::as_i64) == Some(1);
        let behaviour = CustomBehaviour {
            schema: schema.clone(),
            has_status,
            api_version: api_version.clone(),
            storage_api_version: format!("{group}/{storage_version}"),
            serves_stored_form: written_as_served,
        };
        let codec_schema = schema.clone();
        served.push(ServedVersion {
            def: ResourceDef {
                group: group.to_string(),
                version: name.clone(),
                kind: kind.clone(),
                list_kind: non_empty(text(&names, "listKind"), || format!("{kind}List")),
                plural: plural.clone(),
                singular: non_empty(text(&names, "singular"), || kind.to_lowercase()),
                short_names: list(&names, "shortNames"),
                categories: list(&names, "categories"),
                namespaced,
                name_rule: NameRule::Dns1123Subdomain,
                subresources,
                patch_schema: Some(Arc::new(CustomPatchSchema::new(
                    &definition,
                    &schema,
                    builtin_schema.clone(),
                ))),
                definition,
                storage: storage(group, &plural),
                generation: if has_status {
                    Generation::Spec
                } else {
                    Generation::AllButMetadata
                },
                codec: Arc::new(move |obj: &Value| decode(&codec_schema, obj)),
                behaviour: Arc::new(behaviour),
                hook: None,
                table: Arc::new(CustomColumns(columns)),
                field_selectors,
                strategic_merge: false,
                terminating,
                retired: Default::default(),
            },
            schema_json,
        });
    }
    Ok(served)
}

fn non_empty(value: String, fallback: impl FnOnce() -> String) -> String {
    if value.is_empty() {
        fallback()
    } else {
        value
    }
}

fn render(causes: &[Cause]) -> String {
    causes
        .iter()
        .map(Cause::render)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The storage segment of a custom kind's objects (kube-apiserver's
/// `/registry/<group>/<plural>/` layout).
fn storage(group: &str, plural: &str) -> String {
    format!("{group}/{plural}")
}

/// The key prefix under which a custom kind's objects are stored, in every
/// namespace.
pub fn instances_prefix(group: &str, plural: &str) -> String {
    format!("/registry/{}/", storage(group, plural))
}

/// The OpenAPI definition name kube-apiserver gives a custom kind: the
/// group reversed, then version and kind (`com.example.v1.Widget`).
pub fn definition_name(group: &str, version: &str, kind: &str) -> String {
    let reversed: Vec<&str> = group.split('.').rev().collect();
    format!("{}.{version}.{kind}", reversed.join("."))
}

/// A client-sent custom object in canonical form: metadata through the
/// ObjectMeta type (as every object's metadata), everything else pruned to
/// the schema. Defaults come later, with the strategy's, so an applied
/// configuration owns only what it says.
fn decode(schema: &Schema, obj: &Value) -> Result<Decoded, String> {
    let mut out = obj.clone();
    let mut dropped = Vec::new();
    if let Some(meta) = obj.get("metadata") {
        let canonical = typed_codec::<ObjectMeta>(meta).map_err(|e| format!("metadata: {e}"))?;
        unknown_fields(meta, &canonical, &mut "metadata".to_string(), &mut dropped);
        out["metadata"] = canonical;
    }
    dropped.extend(prune::prune(schema, &mut out));
    Ok(Decoded {
        obj: out,
        dropped: Some(dropped),
    })
}

/// The strategy of one custom resource version.
struct CustomBehaviour {
    schema: Arc<Schema>,
    has_status: bool,
    api_version: String,
    storage_api_version: String,
    serves_stored_form: bool,
}

impl Behaviour for CustomBehaviour {
    fn default(&self, obj: &mut Value) {
        default::default(&self.schema, obj);
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        if self.has_status {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate::validate(&self.schema, obj, None)
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        validate::validate(&self.schema, new, Some(old))
    }

    fn validate_status_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        validate::validate(&self.schema, new, Some(old))
    }

    fn to_storage(&self, mut obj: Value) -> Value {
        obj["apiVersion"] = json!(self.storage_api_version);
        obj
    }

    fn to_served(&self, mut obj: Value) -> Value {
        obj["apiVersion"] = json!(self.api_version);
        prune::prune(&self.schema, &mut obj);
        default::default(&self.schema, &mut obj);
        obj
    }

    fn serves_stored_form(&self) -> bool {
        self.serves_stored_form
    }
}

/// The CRD version's printer columns as a Table.
struct CustomColumns(PrinterColumns);

impl TablePrinter for CustomColumns {
    fn column_definitions(&self) -> Value {
        self.0.definitions()
    }

    fn cells(&self, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
        self.0
            .cells(obj, &|timestamp| json!(tables::since(timestamp, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_names_reverse_the_group() {
        assert_eq!(
            definition_name("example.com", "v1", "Widget"),
            "com.example.v1.Widget"
        );
        assert_eq!(
            definition_name("tapestry.io", "v1alpha1", "TapPolicy"),
            "io.tapestry.v1alpha1.TapPolicy"
        );
    }
}
