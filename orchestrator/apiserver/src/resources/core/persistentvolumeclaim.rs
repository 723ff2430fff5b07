//! core/v1 PersistentVolumeClaims: defaults (volume mode Filesystem,
//! phase Pending, the default StorageClass's name when none is given, as
//! Kubernetes' DefaultStorageClass admission fills it), validation, a spec
//! fixed after creation but for the storage request of a bound claim
//! (expansion) and the volume it binds to, the
//! `kubernetes.io/pvc-protection` finalizer, and kubectl's columns.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde_json::{json, Map, Value};
use tapestry_apimachinery::quantity::parse_milli;
use tapestry_store::{ListOptions, Store};

use super::persistentvolume::{
    access_modes_string, add_finalizer, or_unset, storage_class, validate_access_modes,
    validate_class_name, validate_quantity, validate_volume_mode,
};
use crate::error::{ApiError, ApiResult, Cause};
use crate::registry::{names, selectable, Behaviour, ResourceDef, WriteHook};
use crate::resources::storage::storageclass::is_default_class;
use crate::rest::status::StatusRest;
use crate::selectors::validate_selector;
use crate::tables::{age, col, name, s, wide, TableDef, AGE, NAME};

/// Kept on every claim until no pod uses it.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";

pub fn definition(store: Arc<dyn Store>) -> ResourceDef {
    ResourceDef {
        short_names: names(&["pvc"]),
        subresources: vec![StatusRest::def()],
        behaviour: Arc::new(ClaimBehaviour),
        hook: Some(Arc::new(DefaultStorageClass { store })),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Status", "phase represents the current phase of PersistentVolumeClaim."),
                col("Volume", "volumeName is the binding reference to the PersistentVolume backing this claim."),
                col("Capacity", "capacity represents the actual resources of the underlying volume."),
                col("Access Modes", "accessModes contains the desired access modes the volume should have."),
                col("StorageClass", "storageClassName is the name of the StorageClass required by the claim."),
                col("VolumeAttributesClass", "volumeAttributesClassName may be used to set the VolumeAttributesClass used by this claim."),
                AGE,
                wide("VolumeMode", "volumeMode defines what type of volume is required by the claim."),
            ],
            cells: claim_cells,
        }),
        field_selectors: selectable(&[("status.phase", "/status/phase")]),
        ..ResourceDef::of::<PersistentVolumeClaim>()
    }
}

fn claim_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let mut phase = s(o, "/status/phase").to_string();
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        phase = "Terminating".into();
    }
    let volume = s(o, "/spec/volumeName");
    let (capacity, modes) = if volume.is_empty() {
        (String::new(), String::new())
    } else {
        (
            s(o, "/status/capacity/storage").to_string(),
            access_modes_string(o.pointer("/status/accessModes")),
        )
    };
    vec![
        name(o),
        json!(phase),
        json!(volume),
        json!(capacity),
        json!(modes),
        json!(storage_class(o)),
        or_unset(s(o, "/spec/volumeAttributesClassName")),
        age(o, now),
        or_unset(s(o, "/spec/volumeMode")),
    ]
}

struct ClaimBehaviour;

impl Behaviour for ClaimBehaviour {
    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.entry("volumeMode")
                .or_insert_with(|| json!("Filesystem"));
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        let Some(m) = obj.as_object_mut() else { return };
        m.insert("status".into(), json!({"phase": "Pending"}));
        add_finalizer(obj, PVC_PROTECTION);
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        validate_access_modes(&spec, "spec", &mut causes);
        match spec.pointer("/resources/requests/storage") {
            None => causes.push(Cause::required("spec.resources[storage]")),
            Some(q) => {
                let field = "spec.resources[storage]";
                if validate_quantity(q, field, &mut causes) == Some(0) {
                    causes.push(Cause::invalid(field, q, "must be greater than zero"));
                }
            }
        }
        for (kind, map) in [
            ("requests", "/resources/requests"),
            ("limits", "/resources/limits"),
        ] {
            for (k, v) in spec
                .pointer(map)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                if k != "storage" {
                    validate_quantity(v, &format!("spec.resources.{kind}[{k}]"), &mut causes);
                }
            }
        }
        validate_class_name(&spec, "spec", &mut causes);
        validate_volume_mode(&spec, "spec", &mut causes);
        validate_selector(spec.get("selector"), "spec.selector", &mut causes);
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        let empty = Map::new();
        let spec_of = |o: &Value| {
            o.get("spec")
                .and_then(Value::as_object)
                .unwrap_or(&empty)
                .clone()
        };
        let (mut new_spec, mut old_spec) = (spec_of(new), spec_of(old));
        // The volume a claim binds to is written once, by the binder.
        if old_spec
            .get("volumeName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            set_or_remove(&mut old_spec, "volumeName", new_spec.get("volumeName"));
        }
        // A claim without a class may be given one later (retroactive
        // default class).
        if old_spec.get("storageClassName").is_none_or(Value::is_null) {
            set_or_remove(
                &mut old_spec,
                "storageClassName",
                new_spec.get("storageClassName"),
            );
        }
        let bound = s(old, "/status/phase") == "Bound";
        let request = |spec: &Map<String, Value>| {
            spec.get("resources")
                .and_then(|r| r.pointer("/requests/storage"))
                .cloned()
        };
        let (new_size, old_size) = (request(&new_spec), request(&old_spec));
        if bound {
            for spec in [&mut new_spec, &mut old_spec] {
                if let Some(r) = spec
                    .get_mut("resources")
                    .and_then(|r| r.get_mut("requests"))
                    .and_then(Value::as_object_mut)
                {
                    r.remove("storage");
                }
            }
        }
        for spec in [&mut new_spec, &mut old_spec] {
            spec.remove("volumeAttributesClassName");
        }
        if new_spec != old_spec {
            causes.push(Cause::forbidden(
                "spec",
                "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
            ));
        }
        let milli = |q: &Option<Value>| q.as_ref().and_then(Value::as_str).and_then(parse_milli);
        if let (true, Some(n), Some(o)) = (bound, milli(&new_size), milli(&old_size)) {
            if n < o {
                causes.push(Cause::forbidden(
                    "spec.resources.requests.storage",
                    "field can not be less than previous value",
                ));
            }
        }
        causes
    }

    fn validate_status_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        if let Some(p) = new.pointer("/status/phase").filter(|v| !v.is_null()) {
            const PHASES: &[&str] = &["Pending", "Bound", "Lost"];
            if !p.as_str().is_some_and(|p| PHASES.contains(&p)) {
                causes.push(Cause::unsupported("status.phase", p, PHASES));
            }
        }
        causes
    }
}

fn set_or_remove(spec: &mut Map<String, Value>, key: &str, value: Option<&Value>) {
    match value {
        Some(v) => {
            spec.insert(key.into(), v.clone());
        }
        None => {
            spec.remove(key);
        }
    }
}

/// The DefaultStorageClass admission: a claim created without
/// `spec.storageClassName` gets the default class's name (the newest
/// class annotated default, if several are, as Kubernetes picks); with no default class it is
/// left without one. An empty name (`""`) asks for no class and stays.
pub struct DefaultStorageClass {
    pub store: Arc<dyn Store>,
}

impl DefaultStorageClass {
    async fn default_class(&self) -> Option<String> {
        let listed = self
            .store
            .list("/registry/storageclasses/", ListOptions::default())
            .await
            .ok()?;
        let mut defaults: Vec<(String, String)> = listed
            .items
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
            .filter(is_default_class)
            .map(|c| {
                (
                    s(&c, "/metadata/creationTimestamp").to_string(),
                    s(&c, "/metadata/name").to_string(),
                )
            })
            .collect();
        // The newest; of those created in the same second, the first name.
        defaults.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        defaults.into_iter().next().map(|(_, name)| name)
    }
}

#[async_trait]
impl WriteHook for DefaultStorageClass {
    async fn on_create(&self, claim: &mut Value, _dry_run: bool) -> ApiResult<()> {
        let unset = claim
            .pointer("/spec/storageClassName")
            .is_none_or(Value::is_null)
            && claim
                .pointer("/metadata/annotations/volume.beta.kubernetes.io~1storage-class")
                .is_none();
        if !unset {
            return Ok(());
        }
        if let (Some(class), Some(spec)) = (
            self.default_class().await,
            claim.get_mut("spec").and_then(Value::as_object_mut),
        ) {
            spec.insert("storageClassName".into(), json!(class));
        }
        Ok(())
    }

    /// The PersistentVolumeClaimResize admission: a bound claim's request
    /// grows only if its class allows volume expansion.
    async fn on_update(&self, new: &mut Value, old: &Value, _dry_run: bool) -> ApiResult<()> {
        let request = |o: &Value| {
            o.pointer("/spec/resources/requests/storage")
                .and_then(Value::as_str)
                .and_then(parse_milli)
        };
        let grows = matches!((request(new), request(old)), (Some(n), Some(o)) if n > o);
        if !grows || s(old, "/status/phase") != "Bound" {
            return Ok(());
        }
        let class = storage_class(old);
        let key = format!("/registry/storageclasses/{class}");
        let expandable = match self.store.get(&key).await.ok().flatten() {
            Some(kv) => serde_json::from_slice::<Value>(&kv.value)
                .ok()
                .and_then(|c| c.get("allowVolumeExpansion").and_then(Value::as_bool))
                .unwrap_or(false),
            None => false,
        };
        if class.is_empty() || !expandable {
            return Err(ApiError::Forbidden(format!(
                "persistentvolumeclaims \"{}\" is forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize",
                s(old, "/metadata/name")
            )));
        }
        Ok(())
    }

    async fn release(&self, _obj: &Value, _keep: Option<&Value>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(c: Vec<Cause>) -> Vec<String> {
        c.into_iter().map(|c| c.field).collect()
    }

    fn claim() -> Value {
        json!({"metadata": {"name": "data", "namespace": "default"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    }

    #[test]
    fn required_fields() {
        let b = ClaimBehaviour;
        let c = json!({"metadata": {"name": "data"}, "spec": {}});
        let causes = b.validate(&c);
        assert_eq!(
            fields(causes.clone()),
            ["spec.accessModes", "spec.resources[storage]"]
        );
        assert_eq!(
            causes[0].render(),
            "spec.accessModes: Required value: at least 1 access mode is required"
        );
        assert_eq!(
            causes[1].render(),
            "spec.resources[storage]: Required value"
        );
        let mut c = claim();
        c["spec"]["resources"]["requests"]["storage"] = json!("0");
        assert_eq!(fields(b.validate(&c)), ["spec.resources[storage]"]);
    }

    #[test]
    fn defaults_finalizer_and_phase() {
        let b = ClaimBehaviour;
        let mut c = claim();
        b.default(&mut c);
        b.prepare_for_create(&mut c);
        assert_eq!(c["spec"]["volumeMode"], "Filesystem");
        assert_eq!(c["status"]["phase"], "Pending");
        assert_eq!(c["metadata"]["finalizers"], json!([PVC_PROTECTION]));
    }

    #[test]
    fn the_spec_is_fixed_but_a_bound_claim_may_grow() {
        let b = ClaimBehaviour;
        let mut old = claim();
        let mut new = old.clone();
        new["spec"]["volumeName"] = json!("pv1");
        assert!(
            b.validate_update(&new, &old).is_empty(),
            "binding is allowed"
        );
        new["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
        assert_eq!(
            fields(b.validate_update(&new, &old)),
            ["spec"],
            "not bound yet"
        );
        old["spec"]["volumeName"] = json!("pv1");
        old["status"] = json!({"phase": "Bound"});
        assert!(b.validate_update(&new, &old).is_empty(), "expansion");
        new["spec"]["resources"]["requests"]["storage"] = json!("500Mi");
        assert_eq!(
            fields(b.validate_update(&new, &old)),
            ["spec.resources.requests.storage"]
        );
        let mut other = old.clone();
        other["spec"]["volumeName"] = json!("pv2");
        assert_eq!(fields(b.validate_update(&other, &old)), ["spec"]);
    }

    /// A claim created without a class gets the default one; one asking
    /// for no class (`""`) keeps that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_default_class_is_filled_in() {
        let server = crate::testing::start().await;
        let sc = json!({"metadata": {"name": "fast", "annotations": {
            "storageclass.kubernetes.io/is-default-class": "true"}}, "provisioner": "example.com/fast"});
        server
            .send("POST", "/apis/storage.k8s.io/v1/storageclasses", &sc)
            .await;
        let claims = "/api/v1/namespaces/default/persistentvolumeclaims";
        let created = server.send("POST", claims, &claim()).await;
        assert_eq!(created["spec"]["storageClassName"], "fast", "{created}");
        assert_eq!(created["status"]["phase"], "Pending");
        let mut none = claim();
        none["metadata"]["name"] = json!("none");
        none["spec"]["storageClassName"] = json!("");
        let created = server.send("POST", claims, &none).await;
        assert_eq!(created["spec"]["storageClassName"], "", "{created}");
        let (code, answer) = server
            .request(
                "POST",
                claims,
                &json!({"metadata": {"name": "bad"}, "spec": {}}),
            )
            .await;
        assert_eq!(code, http::StatusCode::UNPROCESSABLE_ENTITY);
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("spec.resources[storage]: Required value"),
            "{message}"
        );

        // A bound claim grows only in a class that allows expansion.
        let data = format!("{claims}/data");
        server
            .send(
                "PATCH",
                &format!("{data}/status"),
                &json!({"status": {"phase": "Bound"}}),
            )
            .await;
        let grow = json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}});
        let (code, answer) = server.request("PATCH", &data, &grow).await;
        assert_eq!(code, http::StatusCode::FORBIDDEN, "{answer}");
        server
            .send(
                "PATCH",
                "/apis/storage.k8s.io/v1/storageclasses/fast",
                &json!({"allowVolumeExpansion": true}),
            )
            .await;
        let grown = server.send("PATCH", &data, &grow).await;
        assert_eq!(
            grown["spec"]["resources"]["requests"]["storage"], "2Gi",
            "{grown}"
        );
    }

    #[test]
    fn columns() {
        let mut c = claim();
        c["spec"]["volumeName"] = json!("pv1");
        c["spec"]["storageClassName"] = json!("local-path");
        c["status"] = json!({"phase": "Bound", "capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"]});
        let cells = claim_cells(&c, chrono::Utc::now());
        assert_eq!(
            cells[..7],
            [
                json!("data"),
                json!("Bound"),
                json!("pv1"),
                json!("2Gi"),
                json!("RWO"),
                json!("local-path"),
                json!("<unset>")
            ]
        );
    }
}
