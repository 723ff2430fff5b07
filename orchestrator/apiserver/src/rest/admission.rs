//! Admission of a written object: decoding into its canonical form, unknown
//! fields, the namespace lifecycle, and the create and update preparation
//! every resource goes through (identity, generation, subresource rules,
//! the resource's own defaults and validation).

use serde_json::{json, Value};

use super::request::FieldValidation;
use super::{Api, Request};
use crate::error::{ApiError, ApiResult, Cause, Target};
use crate::objects::{
    differs_outside, is_terminating, meta, meta_mut, meta_str, now_rfc3339, random_suffix,
    unknown_fields,
};
use crate::registry::{Decoded, Generation, Subresource};
use crate::validation::{validate_object_meta, validate_object_meta_update};

impl Api {
    /// Decode, type-check and canonicalise a client-sent object. `stored`
    /// is the object a patch was applied to, when the write then records
    /// managed fields (which rewrites them whole).
    pub(super) fn admit_body(
        &self,
        req: &Request,
        mut obj: Value,
        warnings: &mut Vec<String>,
        stored: Option<&Value>,
    ) -> ApiResult<Value> {
        let def = &req.def;
        if !obj.is_object() {
            return Err(ApiError::BadRequest(format!(
                "{} in version {:?} cannot be handled as a {}: the body must be a JSON object",
                def.kind, def.version, def.kind
            )));
        }
        let api_version = def.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => obj["apiVersion"] = json!(api_version),
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::BadRequest(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )))
            }
        }
        match obj.get("kind").and_then(Value::as_str) {
            None | Some("") => obj["kind"] = json!(def.kind),
            Some(k) if k == def.kind => {}
            Some(k) => {
                return Err(ApiError::BadRequest(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    def.kind
                )))
            }
        }
        let body_ns = meta_str(&obj, "namespace").to_string();
        if def.namespaced {
            let url_ns = req.namespace.clone().unwrap_or_default();
            if !body_ns.is_empty() && body_ns != url_ns {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            meta_mut(&mut obj).insert("namespace".into(), json!(url_ns));
        } else if !body_ns.is_empty() {
            meta_mut(&mut obj).remove("namespace");
        }
        let set_aside = stored.and_then(|stored| set_aside_stored_managed_fields(&mut obj, stored));
        let codec = |obj: &Value| {
            (def.codec)(obj).map_err(|e| {
                ApiError::BadRequest(format!(
                    "{} in version \"{}\" cannot be handled as a {}: {e}",
                    def.kind, def.version, def.kind
                ))
            })
        };
        let Decoded {
            obj: mut decoded,
            dropped,
        } = codec(&obj)?;
        let validation = req.field_validation()?;
        if validation != FieldValidation::Ignore {
            let unknown = dropped.unwrap_or_else(|| {
                let mut unknown = Vec::new();
                unknown_fields(&obj, &decoded, &mut String::new(), &mut unknown);
                unknown
            });
            if !unknown.is_empty() {
                if validation == FieldValidation::Strict {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|f| format!("unknown field \"{f}\""))
                        .collect();
                    return Err(ApiError::BadRequest(format!(
                        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                        def.kind,
                        def.version,
                        def.kind,
                        list.join(", ")
                    )));
                }
                warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")));
            }
        }
        if let Some(managed) = set_aside {
            if let Err(managed) = put_back_managed_fields(&mut decoded, managed) {
                // The codec dropped the placeholder: decode it all.
                meta_mut(&mut obj).insert("managedFields".into(), managed);
                decoded = codec(&obj)?.obj;
            }
        }
        Ok(decoded)
    }

    /// Namespace lifecycle admission (kube-apiserver's NamespaceLifecycle
    /// plugin): objects are created only in namespaces that exist and are
    /// not being deleted.
    pub(super) async fn check_namespace(&self, req: &Request) -> ApiResult<()> {
        let Some(ns) = req.namespace.as_deref().filter(|_| req.def.namespaced) else {
            return Ok(());
        };
        let key = format!("/registry/namespaces/{ns}");
        let target = Target {
            group: String::new(),
            resource: "namespaces".into(),
            kind: "Namespace".into(),
            name: ns.to_string(),
        };
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(|e| ApiError::from_store(e, &target))?
            .ok_or(ApiError::NotFound(target))?;
        if namespace_terminating(&kv.value)? {
            return Err(ApiError::Forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                req.def.plural,
                req.name.clone().unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Create-path processing shared by POST and apply-creates.
    pub(super) fn prepare_create(&self, req: &Request, obj: &mut Value) -> ApiResult<()> {
        let def = &req.def;
        let m = meta_mut(obj);
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let generate = m
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() && !generate.is_empty() {
            m.insert(
                "name".into(),
                json!(format!("{generate}{}", random_suffix())),
            );
        }
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(f);
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if def.generation == Generation::Untracked {
            m.remove("generation");
        } else {
            m.insert("generation".into(), json!(1));
        }
        def.behaviour.default(obj);
        def.behaviour.prepare_for_create(obj);
        def.behaviour.record_requester(obj, req.user.as_deref());
        let mut causes = validate_object_meta(obj, def.namespaced, def.name_rule);
        causes.extend(def.behaviour.validate(obj));
        if !causes.is_empty() {
            return Err(invalid(req, obj, causes));
        }
        self.check_escalation(req, obj)?;
        super::noderestriction::check(req, obj)?;
        drop_empty_finalizers(obj);
        Ok(())
    }

    /// RBAC writes grant nothing the writer does not hold (see
    /// [`crate::authz::escalation`]).
    fn check_escalation(&self, req: &Request, obj: &Value) -> ApiResult<()> {
        match (req.user.as_deref(), self.authorizer.get()) {
            (Some(user), Some(authz)) if req.sub.is_none() => {
                crate::authz::escalation::check(authz, user, &req.def, obj)
            }
            _ => Ok(()),
        }
    }

    /// Update-path processing: carry over what clients may not change,
    /// apply the status subresource's rule, bump generation, validate.
    /// Other subresources' handlers build the whole new object themselves.
    pub(super) fn prepare_update(
        &self,
        req: &Request,
        new: &mut Value,
        old: &Value,
    ) -> ApiResult<()> {
        super::noderestriction::check(req, old)?;
        super::noderestriction::check_update(req, new, old)?;
        let def = &req.def;
        match req.sub {
            Some(Subresource::Approval) => {
                // Only the conditions change through approval.
                let conditions = new.pointer("/status/conditions").cloned();
                let managed = meta_mut(new).remove("managedFields");
                let mut merged = old.clone();
                if !merged.get("status").is_some_and(Value::is_object) {
                    merged["status"] = json!({});
                }
                match conditions {
                    Some(c) => merged["status"]["conditions"] = c,
                    None => {
                        if let Some(m) = merged["status"].as_object_mut() {
                            m.remove("conditions");
                        }
                    }
                }
                if let Some(managed) = managed {
                    meta_mut(&mut merged).insert("managedFields".into(), managed);
                }
                *new = merged;
            }
            Some(Subresource::Status) => {
                // Only status changes through the status subresource.
                // `new` is replaced by `merged` below, so its parts are taken.
                let status = new.as_object_mut().and_then(|m| m.remove("status"));
                let mut merged = old.clone();
                match status {
                    Some(s) => merged["status"] = s,
                    None => {
                        if let Some(m) = merged.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                // Keep metadata the client may legitimately send along.
                let mut carried = vec!["managedFields"];
                if def.behaviour.status_takes_labels_and_annotations() {
                    carried.extend(["labels", "annotations"]);
                }
                for field in carried {
                    match meta_mut(new).remove(field) {
                        Some(v) => {
                            meta_mut(&mut merged).insert(field.into(), v);
                        }
                        None if field != "managedFields" => {
                            meta_mut(&mut merged).remove(field);
                        }
                        None => {}
                    }
                }
                *new = merged;
            }
            None if def.has(Subresource::Status) => {
                // A write to the object itself keeps the stored status; a
                // subresource writes what it owns (a binding, for one, sets
                // the pod's PodScheduled condition).
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            _ => {}
        }
        let old_meta = meta(old);
        let m = meta_mut(new);
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(f) {
                Some(v) if f != "uid" || m.get("uid").is_none_or(|u| u.as_str() == Some("")) => {
                    m.insert(f.into(), v.clone());
                }
                None if f != "uid" => {
                    m.remove(f);
                }
                _ => {}
            }
        }
        m.remove("selfLink");
        def.behaviour.default(new);
        if req.sub.is_none() {
            def.behaviour.prepare_for_update(new, old);
        }
        let changed = match def.generation {
            Generation::Untracked => false,
            Generation::Spec => {
                differs_outside(new, old, &["metadata", "status", "apiVersion", "kind"])
            }
            Generation::AllButMetadata => {
                differs_outside(new, old, &["metadata", "apiVersion", "kind"])
            }
        };
        if changed {
            let gen = meta(old)
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(new).insert("generation".into(), json!(gen + 1));
        }
        let mut causes = validate_object_meta(new, def.namespaced, def.name_rule);
        causes.extend(validate_object_meta_update(new, old));
        match req.sub {
            // A scale write changes the object's own replica count: the
            // resource's update validation holds for it (a custom
            // resource's schema and rules among them).
            None | Some(Subresource::Scale) => {
                causes.extend(def.behaviour.validate_update(new, old))
            }
            Some(Subresource::Status | Subresource::Approval) => {
                causes.extend(def.behaviour.validate_status_update(new, old))
            }
            Some(_) => {}
        }
        if !causes.is_empty() {
            return Err(invalid(req, new, causes));
        }
        let grants = ["rules", "aggregationRule", "roleRef", "subjects"];
        if grants.iter().any(|f| new.get(*f) != old.get(*f)) {
            self.check_escalation(req, new)?;
        }
        drop_empty_finalizers(new);
        Ok(())
    }
}

/// An Invalid error for the object `obj` of the request.
pub(super) fn invalid(req: &Request, obj: &Value, causes: Vec<Cause>) -> ApiError {
    let mut target = req.target();
    target.name = meta_str(obj, "name").to_string();
    ApiError::Invalid { target, causes }
}

/// Kubernetes omits an empty finalizer list, so clients see none at all.
fn drop_empty_finalizers(obj: &mut Value) {
    let m = meta_mut(obj);
    if m.get("finalizers")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
    {
        m.remove("finalizers");
    }
}

/// Whether a stored namespace is being deleted, as [`is_terminating`] reads
/// it. Every create checks; decoding only `deletionTimestamp` skips
/// building the whole namespace.
fn namespace_terminating(stored: &[u8]) -> ApiResult<bool> {
    match serde_json::from_slice::<NamespaceDeletion>(stored) {
        Ok(namespace) => Ok(namespace.metadata.deletion_timestamp.is_some()),
        // Metadata that is not an object: read it as any object is read.
        Err(_) => serde_json::from_slice::<Value>(stored)
            .map(|ns| is_terminating(&ns))
            .map_err(ApiError::internal),
    }
}

#[derive(serde::Deserialize)]
struct NamespaceDeletion {
    #[serde(default)]
    metadata: NamespaceDeletionMeta,
}

#[derive(serde::Deserialize, Default)]
struct NamespaceDeletionMeta {
    /// Null reads as absent, as in [`is_terminating`].
    #[serde(rename = "deletionTimestamp", default)]
    deletion_timestamp: Option<serde::de::IgnoredAny>,
}

/// Managed fields a patch left exactly as stored skip the typed round trip
/// (they are often half of an object, and the write that follows decodes
/// and rewrites them whole): an empty list stands in for them, keeping their
/// place in the decoded object, and they are returned to go back there.
fn set_aside_stored_managed_fields(obj: &mut Value, stored: &Value) -> Option<Value> {
    let stored = stored.pointer("/metadata/managedFields")?;
    let slot = obj.pointer_mut("/metadata/managedFields")?;
    if slot != stored {
        return None;
    }
    Some(std::mem::replace(slot, Value::Array(Vec::new())))
}

/// Put set-aside managed fields back in their placeholder's place; gives
/// them back if the decoded object has no placeholder.
fn put_back_managed_fields(decoded: &mut Value, managed: Value) -> Result<(), Value> {
    match decoded.pointer_mut("/metadata/managedFields") {
        Some(slot) => {
            *slot = managed;
            Ok(())
        }
        None => Err(managed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::remove_managed_fields;
    use crate::registry::typed_codec;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn unknown_fields_are_named_by_their_full_path() {
        let pod = json!({
            "metadata": {"name": "p", "bogus": 1, "alsoNull": null},
            "spec": {"containers": [
                {"name": "a", "image": "busybox"},
                {"name": "b", "image": "busybox", "extra": {"deep": true}},
            ]},
            "top": "x",
        });
        let decoded = typed_codec::<Pod>(&pod).unwrap();
        let mut found = Vec::new();
        unknown_fields(&pod, &decoded, &mut String::new(), &mut found);
        assert_eq!(found, ["metadata.bogus", "spec.containers[1].extra", "top"]);
    }

    #[test]
    fn a_namespace_is_read_as_being_deleted_as_is_terminating_reads_it() {
        for ns in [
            json!({"metadata": {"name": "a"}}),
            json!({"metadata": {"name": "a", "deletionTimestamp": null}}),
            json!({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"finalizers": ["kubernetes"]}}),
            json!({"kind": "Namespace"}),
            json!({"metadata": null}),
            json!({"metadata": "x"}),
        ] {
            let stored = serde_json::to_vec(&ns).unwrap();
            assert_eq!(
                namespace_terminating(&stored).unwrap(),
                is_terminating(&ns),
                "{ns}"
            );
        }
        assert!(namespace_terminating(b"{").is_err());
    }

    /// Setting stored managed fields aside decodes a patched object as the
    /// whole round trip does: the same fields in the same order, and the
    /// managed fields with the same content (their key order is rewritten
    /// by the managed-fields bookkeeping that follows either way).
    #[test]
    fn stored_managed_fields_set_aside_decode_as_the_round_trip() {
        let entry = |manager: &str, sub: Option<&str>| {
            let mut e = json!({"manager": manager, "operation": "Update", "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}}}}}});
            if let Some(sub) = sub {
                e["subresource"] = json!(sub);
            }
            e
        };
        let stored = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "b"},
                         "managedFields": [entry("kubectl", None), entry("kubelet", Some("status"))]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending"}});
        let mut patched = stored.clone();
        patched["status"] =
            json!({"phase": "Running", "podIP": "10.0.0.1", "startTime": "2026-01-01T00:00:01Z"});
        patched["metadata"]["resourceVersion"] = json!("7");

        let whole = typed_codec::<Pod>(&patched).unwrap();
        let mut obj = patched.clone();
        let managed = set_aside_stored_managed_fields(&mut obj, &stored).expect("unchanged");
        assert_eq!(obj["metadata"]["managedFields"], json!([]));
        let mut decoded = typed_codec::<Pod>(&obj).unwrap();
        put_back_managed_fields(&mut decoded, managed).expect("placeholder kept");
        assert_eq!(decoded, whole);
        let without_managed = |v: &Value| {
            let mut v = v.clone();
            remove_managed_fields(&mut v);
            serde_json::to_string(&v).unwrap()
        };
        assert_eq!(without_managed(&decoded), without_managed(&whole));
        let order = |v: &Value| -> Vec<String> {
            v["metadata"].as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(order(&decoded), order(&whole));

        // Changed, added or absent managed fields take the whole round trip.
        let mut changed = patched.clone();
        changed["metadata"]["managedFields"][0]["manager"] = json!("other");
        assert!(set_aside_stored_managed_fields(&mut changed, &stored).is_none());
        let mut unstored = stored.clone();
        remove_managed_fields(&mut unstored);
        assert!(set_aside_stored_managed_fields(&mut patched.clone(), &unstored).is_none());
        let mut without = patched.clone();
        remove_managed_fields(&mut without);
        assert!(set_aside_stored_managed_fields(&mut without, &stored).is_none());
        // No placeholder to fill: the managed fields come back.
        assert_eq!(
            put_back_managed_fields(&mut json!({"metadata": {}}), json!([1])),
            Err(json!([1]))
        );
    }
}
