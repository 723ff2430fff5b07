//! apiextensions.k8s.io/v1 CustomResourceDefinitions: defaults, the
//! validation kube-apiserver applies to a CRD (names, versions, structural
//! schemas, CEL rules, printer columns, subresources, selectable fields),
//! stored versions, and the cleanup finalizer a deletion adds. What a CRD
//! serves is built in [`super::custom`]; its conditions are kept by
//! [`super::controller`].

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{json, Value};
use tapestry_apiextensions::columns::PrinterColumns;
use tapestry_apiextensions::schema::Schema;

use crate::error::Cause;
use crate::registry::{names, Behaviour, Generation, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{col, name, s, TableDef, NAME};
use crate::validation::{dns1035_label_errors, dns1123_subdomain_errors};

/// Holds a CRD being deleted until all its objects are gone.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// Groups that need the API-approval annotation, as kube-apiserver has it.
const APPROVAL_ANNOTATION: &str = "api-approved.kubernetes.io";

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["crd", "crds"]),
        categories: names(&["api-extensions"]),
        subresources: vec![StatusRest::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(CrdStrategy),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Created At",
                    "CreationTimestamp is a timestamp representing the server time when this object was created.",
                ),
            ],
            cells: |o, _| vec![name(o), json!(s(o, "/metadata/creationTimestamp"))],
        }),
        ..ResourceDef::of::<CustomResourceDefinition>()
    }
}

struct CrdStrategy;

impl Behaviour for CrdStrategy {
    fn default(&self, obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        if let Some(names) = spec.get_mut("names").and_then(Value::as_object_mut) {
            let kind = names
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if !kind.is_empty() {
                if names
                    .get("singular")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    names.insert("singular".into(), json!(kind.to_lowercase()));
                }
                if names
                    .get("listKind")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    names.insert("listKind".into(), json!(format!("{kind}List")));
                }
            }
        }
        let conversion = spec.entry("conversion").or_insert_with(|| json!({}));
        if conversion
            .get("strategy")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            conversion["strategy"] = json!("None");
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        let stored: Vec<Value> = storage_version(obj).into_iter().map(Value::from).collect();
        obj["status"] = json!({
            "conditions": [],
            "acceptedNames": {"plural": "", "kind": ""},
            "storedVersions": stored,
        });
    }

    fn prepare_for_update(&self, new: &mut Value, _old: &Value) {
        // A new storage version joins the versions objects may be stored in.
        if let Some(version) = storage_version(new) {
            let stored = new["status"]["storedVersions"].as_array_mut();
            match stored {
                Some(list) if list.iter().any(|v| v == version.as_str()) => {}
                Some(list) => list.push(json!(version)),
                None => new["status"]["storedVersions"] = json!([version]),
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate_crd(obj)
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = validate_crd(new);
        for (field, pointer) in [("spec.group", "/spec/group"), ("spec.scope", "/spec/scope")] {
            if new.pointer(pointer) != old.pointer(pointer) {
                causes.push(Cause::invalid(
                    field,
                    new.pointer(pointer).unwrap_or(&Value::Null),
                    "field is immutable",
                ));
            }
        }
        causes.extend(validate_stored_versions(new));
        causes
    }

    fn validate_status_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        validate_stored_versions(new)
    }

    fn deletion_finalizers(&self) -> &'static [&'static str] {
        &[CLEANUP_FINALIZER]
    }
}

/// The version marked `storage: true`, if exactly one is.
fn storage_version(crd: &Value) -> Option<String> {
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array)?;
    let mut storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true));
    let first = storage.next()?;
    storage
        .next()
        .is_none()
        .then(|| s(first, "/name").to_string())
}

/// Every stored version must still be a version of the CRD, so its
/// objects stay readable, and the storage version must be among them.
fn validate_stored_versions(crd: &Value) -> Vec<Cause> {
    let Some(stored) = crd
        .pointer("/status/storedVersions")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let versions: HashSet<&str> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|v| s(v, "/name"))
        .collect();
    let mut causes: Vec<Cause> = stored
        .iter()
        .enumerate()
        .filter(|(_, v)| !versions.contains(v.as_str().unwrap_or("")))
        .map(|(i, v)| {
            Cause::invalid(
                format!("status.storedVersions[{i}]"),
                v,
                "must appear in spec.versions",
            )
        })
        .collect();
    if stored.is_empty() {
        causes.push(Cause::invalid(
            "status.storedVersions",
            &json!(stored),
            "must have at least one stored version",
        ));
    } else if let Some(storage) = storage_version(crd) {
        if !stored.iter().any(|v| v.as_str() == Some(storage.as_str())) {
            causes.push(Cause::invalid(
                "status.storedVersions",
                &json!(stored),
                format!("must have the storage version {storage}"),
            ));
        }
    }
    causes
}

fn label_causes(field: &str, value: &str, errors: Vec<String>) -> Vec<Cause> {
    errors
        .into_iter()
        .map(|e| Cause::invalid(field, &json!(value), e))
        .collect()
}

/// kube-apiserver's validation of a CustomResourceDefinition.
fn validate_crd(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let group = s(crd, "/spec/group");
    let plural = s(crd, "/spec/names/plural");
    let name = s(crd, "/metadata/name");
    if name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    } else {
        causes.extend(label_causes(
            "spec.group",
            group,
            dns1123_subdomain_errors(group),
        ));
        if !group.contains('.') {
            causes.push(Cause::invalid(
                "spec.group",
                &json!(group),
                "should be a domain with at least one dot",
            ));
        }
        let protected = group == "k8s.io"
            || group.ends_with(".k8s.io")
            || group == "kubernetes.io"
            || group.ends_with(".kubernetes.io");
        let approved = crd
            .pointer(&format!("/metadata/annotations/{APPROVAL_ANNOTATION}"))
            .and_then(Value::as_str)
            .is_some_and(|a| !a.is_empty());
        if protected && !approved {
            causes.push(Cause::required_because(
                format!("metadata.annotations[{APPROVAL_ANNOTATION}]"),
                format!("protected groups must have approval annotation \"{APPROVAL_ANNOTATION}\", see https://github.com/kubernetes/enhancements/pull/1111"),
            ));
        }
    }
    let scope = s(crd, "/spec/scope");
    if scope.is_empty() {
        causes.push(Cause::required("spec.scope"));
    } else if !["Cluster", "Namespaced"].contains(&scope) {
        causes.push(Cause::unsupported(
            "spec.scope",
            &json!(scope),
            &["Cluster", "Namespaced"],
        ));
    }
    causes.extend(validate_names(crd.pointer("/spec/names"), "spec.names"));
    if crd.pointer("/spec/preserveUnknownFields") == Some(&json!(true)) {
        causes.push(Cause::invalid(
            "spec.preserveUnknownFields",
            &json!(true),
            "cannot set to true, set x-kubernetes-preserve-unknown-fields to true in spec.versions[*].schema instead",
        ));
    }
    let strategy = s(crd, "/spec/conversion/strategy");
    if !strategy.is_empty() && strategy != "None" {
        // Conversion webhooks are not called: versions differ only by name.
        causes.push(Cause::unsupported(
            "spec.conversion.strategy",
            &json!(strategy),
            &["None"],
        ));
    }
    causes.extend(validate_versions(crd));
    causes
}

fn validate_names(names: Option<&Value>, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let names = names.cloned().unwrap_or(json!({}));
    let field = |f: &str| format!("{path}.{f}");
    for key in ["plural", "singular"] {
        let value = s(&names, &format!("/{key}"));
        if value.is_empty() {
            causes.push(Cause::required(field(key)));
        } else {
            causes.extend(label_causes(
                &field(key),
                value,
                dns1035_label_errors(value),
            ));
        }
    }
    for key in ["kind", "listKind"] {
        let value = s(&names, &format!("/{key}"));
        if value.is_empty() {
            causes.push(Cause::required(field(key)));
        } else {
            let errors = dns1035_label_errors(&value.to_lowercase());
            causes.extend(label_causes(&field(key), value, errors));
        }
    }
    let kind = s(&names, "/kind");
    if !kind.is_empty() && s(&names, "/listKind") == kind {
        causes.push(Cause::invalid(
            field("listKind"),
            &json!(kind),
            "kind and listKind may not be the same",
        ));
    }
    for (list, item_path) in [("shortNames", "shortNames"), ("categories", "categories")] {
        let mut seen = HashSet::new();
        for (i, v) in names
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{path}.{item_path}[{i}]");
            let value = v.as_str().unwrap_or("");
            causes.extend(label_causes(&at, value, dns1035_label_errors(value)));
            if !seen.insert(value) {
                causes.push(Cause::duplicate(at, v));
            }
        }
    }
    causes
}

fn validate_versions(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required_because(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
        return causes;
    }
    let storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if storage != 1 {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions.iter().map(|v| s(v, "/name")).collect::<Vec<_>>()),
            "must have exactly one version marked as storage version",
        ));
    }
    if !versions
        .iter()
        .any(|v| v.get("served").and_then(Value::as_bool) == Some(true))
    {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions.iter().map(|v| s(v, "/name")).collect::<Vec<_>>()),
            "must have at least one version marked as served",
        ));
    }
    let mut seen = HashSet::new();
    for (i, version) in versions.iter().enumerate() {
        let path = format!("spec.versions[{i}]");
        let name = s(version, "/name");
        if name.is_empty() {
            causes.push(Cause::required(format!("{path}.name")));
        } else {
            causes.extend(label_causes(
                &format!("{path}.name"),
                name,
                dns1035_label_errors(name),
            ));
            if !seen.insert(name) {
                causes.push(Cause::duplicate(format!("{path}.name"), &json!(name)));
            }
        }
        let schema_path = format!("{path}.schema.openAPIV3Schema");
        let schema = match version.pointer("/schema/openAPIV3Schema") {
            None | Some(Value::Null) => {
                causes.push(Cause::required_because(
                    &schema_path,
                    "schemas are required",
                ));
                None
            }
            Some(raw) => match Schema::parse(raw, &schema_path) {
                Ok(schema) => Some(schema),
                Err(errors) => {
                    causes.extend(errors);
                    None
                }
            },
        };
        if let Some(scale) = version.pointer("/subresources/scale") {
            causes.extend(validate_scale(scale, &format!("{path}.subresources.scale")));
        }
        if let Err(errors) = PrinterColumns::compile(
            version.get("additionalPrinterColumns"),
            &format!("{path}.additionalPrinterColumns"),
        ) {
            causes.extend(errors);
        }
        causes.extend(validate_selectable_fields(
            version.get("selectableFields"),
            schema.as_ref(),
            &format!("{path}.selectableFields"),
        ));
    }
    causes
}

fn validate_scale(scale: &Value, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let check = |field: &str, prefixes: &[&str], detail: &str, causes: &mut Vec<Cause>| {
        let value = s(scale, &format!("/{field}"));
        let at = format!("{path}.{field}");
        if value.is_empty() {
            if field != "labelSelectorPath" {
                causes.push(Cause::required(at));
            }
        } else if !prefixes.iter().any(|p| value.starts_with(p)) || json_pointer(value).is_none() {
            causes.push(Cause::invalid(at, &json!(value), detail));
        }
    };
    check(
        "specReplicasPath",
        &[".spec."],
        "should be a json path under .spec",
        &mut causes,
    );
    check(
        "statusReplicasPath",
        &[".status."],
        "should be a json path under .status",
        &mut causes,
    );
    check(
        "labelSelectorPath",
        &[".spec.", ".status."],
        "should be a json path under either .spec or .status",
        &mut causes,
    );
    causes
}

/// At most eight selectable fields, each a simple path to a string,
/// integer or boolean field of the schema.
fn validate_selectable_fields(
    fields: Option<&Value>,
    schema: Option<&Schema>,
    path: &str,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let fields = fields
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if fields.len() > 8 {
        causes.push(Cause::too_many(path, fields.len(), 8, "items"));
    }
    let mut seen = HashSet::new();
    for (i, field) in fields.iter().enumerate() {
        let at = format!("{path}[{i}].jsonPath");
        let json_path = s(field, "/jsonPath");
        let Some(pointer) = json_pointer(json_path) else {
            causes.push(Cause::invalid(
                &at,
                &json!(json_path),
                "must be a simple json path starting with .",
            ));
            continue;
        };
        if !seen.insert(json_path) {
            causes.push(Cause::duplicate(&at, &json!(json_path)));
        }
        if let Some(schema) = schema {
            use tapestry_apiextensions::schema::SchemaType;
            match schema_at(schema, &pointer).and_then(|s| s.type_) {
                Some(SchemaType::String | SchemaType::Integer | SchemaType::Boolean) => {}
                Some(_) => causes.push(Cause::invalid(
                    &at,
                    &json!(json_path),
                    "must point to a field of type string, boolean or integer",
                )),
                None => causes.push(Cause::invalid(
                    &at,
                    &json!(json_path),
                    "is an invalid path: does not refer to a valid field",
                )),
            }
        }
    }
    causes
}

/// The schema node a JSON pointer reaches through object properties.
fn schema_at<'s>(schema: &'s Schema, pointer: &str) -> Option<&'s Schema> {
    pointer
        .split('/')
        .skip(1)
        .try_fold(schema, |node, key| node.properties.get(key))
}

/// `.spec.replicas` → `/spec/replicas`; None unless a simple path of
/// field names.
pub fn json_pointer(path: &str) -> Option<String> {
    let rest = path.strip_prefix('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let simple = parts.iter().all(|p| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '$'))
    });
    simple.then(|| format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_paths_become_pointers() {
        assert_eq!(
            json_pointer(".spec.replicas").as_deref(),
            Some("/spec/replicas")
        );
        assert_eq!(
            json_pointer(".status.x-y_z").as_deref(),
            Some("/status/x-y_z")
        );
        for bad in ["spec.replicas", ".spec..x", ".spec.items[0]", ".", ""] {
            assert_eq!(json_pointer(bad), None, "{bad}");
        }
    }

    #[test]
    fn versions_need_one_storage_version_and_schemas() {
        let crd = json!({
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {"name": "v1", "served": true, "storage": true},
                {"name": "v1", "served": true, "storage": true,
                 "schema": {"openAPIV3Schema": {"type": "object"}}},
            ]}});
        let causes: Vec<String> = validate_crd(&crd).iter().map(Cause::render).collect();
        assert!(
            causes
                .iter()
                .any(|c| c.starts_with("spec.versions: Invalid value")
                    && c.ends_with("must have exactly one version marked as storage version")),
            "{causes:?}"
        );
        assert!(
            causes.contains(
                &"spec.versions[0].schema.openAPIV3Schema: Required value: schemas are required"
                    .to_string()
            ),
            "{causes:?}"
        );
        assert!(
            causes.contains(&"spec.versions[1].name: Duplicate value: \"v1\"".to_string()),
            "{causes:?}"
        );
    }

    #[test]
    fn names_must_match_and_groups_need_a_dot() {
        let crd = json!({
            "metadata": {"name": "widgets.example"},
            "spec": {"group": "example", "scope": "Global",
                "names": {"plural": "Widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
        let causes: Vec<String> = validate_crd(&crd).iter().map(Cause::render).collect();
        for want in [
            "metadata.name: Invalid value: \"widgets.example\": must be spec.names.plural+\".\"+spec.group",
            "spec.group: Invalid value: \"example\": should be a domain with at least one dot",
            "spec.scope: Unsupported value: \"Global\": supported values: \"Cluster\", \"Namespaced\"",
            "spec.names.singular: Required value",
        ] {
            assert!(causes.contains(&want.to_string()), "{want}\n{causes:#?}");
        }
        assert!(
            causes.iter().any(|c| c
                .starts_with("spec.names.plural: Invalid value: \"Widgets\": a DNS-1035 label")),
            "{causes:#?}"
        );
    }
}
