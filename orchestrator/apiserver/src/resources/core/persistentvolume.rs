//! core/v1 PersistentVolumes: defaults (reclaim policy Retain, volume mode
//! Filesystem, phase Pending), Kubernetes' validation (one volume source,
//! a storage capacity, access modes, a node affinity for `local`), the
//! volume source and node affinity fixed once set, the
//! `kubernetes.io/pv-protection` finalizer, and kubectl's columns. The
//! binding controller (`tapestry_controllers`' persistentvolume module)
//! writes the status.

use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolume;
use serde_json::{json, Map, Value};
use tapestry_apimachinery::quantity::parse_milli;
use tapestry_apimachinery::validation::{dns1123_subdomain_errors, qualified_name_errors};

use crate::error::Cause;
use crate::registry::{names, selectable, Behaviour, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, name, s, wide, TableDef, AGE, NAME};

/// Kept on every PersistentVolume until it is no longer bound.
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";

pub const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

const VOLUME_MODES: &[&str] = &["Block", "Filesystem"];

/// The volume sources a PersistentVolume may name (exactly one of them).
const SOURCES: &[&str] = &[
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "cephfs",
    "cinder",
    "csi",
    "fc",
    "flexVolume",
    "flocker",
    "gcePersistentDisk",
    "glusterfs",
    "hostPath",
    "iscsi",
    "local",
    "nfs",
    "photonPersistentDisk",
    "portworxVolume",
    "quobyte",
    "rbd",
    "scaleIO",
    "storageos",
    "vsphereVolume",
];

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["pv"]),
        subresources: vec![StatusRest::def()],
        behaviour: Arc::new(PersistentVolumeBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Capacity", "capacity is the description of the persistent volume's resources and capacity."),
                col("Access Modes", "accessModes contains all ways the volume can be mounted."),
                col("Reclaim Policy", "persistentVolumeReclaimPolicy defines what happens to a persistent volume when released from its claim."),
                col("Status", "phase indicates if a volume is available, bound to a claim, or released by a claim."),
                col("Claim", "claimRef is part of a bi-directional binding between PersistentVolume and PersistentVolumeClaim."),
                col("StorageClass", "storageClassName is the name of StorageClass to which this persistent volume belongs."),
                col("VolumeAttributesClass", "Name of VolumeAttributesClass to which this persistent volume belongs."),
                col("Reason", "reason is a brief CamelCase string that describes any failure and is meant for machine parsing and tidy display in the CLI."),
                AGE,
                wide("VolumeMode", "volumeMode defines if a volume is intended to be used with a formatted filesystem or to remain in raw block state."),
            ],
            cells: |o, now| {
                let claim = match (s(o, "/spec/claimRef/namespace"), s(o, "/spec/claimRef/name")) {
                    (_, "") => String::new(),
                    (ns, n) => format!("{ns}/{n}"),
                };
                let mut phase = s(o, "/status/phase").to_string();
                if o.pointer("/metadata/deletionTimestamp").is_some() {
                    phase = "Terminating".into();
                }
                vec![
                    name(o),
                    json!(s(o, "/spec/capacity/storage")),
                    json!(access_modes_string(o.pointer("/spec/accessModes"))),
                    json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
                    json!(phase),
                    json!(claim),
                    json!(storage_class(o)),
                    or_unset(s(o, "/spec/volumeAttributesClassName")),
                    json!(s(o, "/status/reason")),
                    age(o, now),
                    or_unset(s(o, "/spec/volumeMode")),
                ]
            },
        }),
        field_selectors: selectable(&[("status.phase", "/status/phase")]),
        ..ResourceDef::of::<PersistentVolume>()
    }
}

/// kubectl's `<unset>` for an empty optional name.
pub(super) fn or_unset(v: &str) -> Value {
    json!(if v.is_empty() { "<unset>" } else { v })
}

/// The class of a volume or claim: `spec.storageClassName`, or the beta
/// annotation older objects carry.
pub(super) fn storage_class(o: &Value) -> String {
    match o.pointer("/spec/storageClassName").and_then(Value::as_str) {
        Some(c) => c.to_string(),
        None => o
            .pointer("/metadata/annotations/volume.beta.kubernetes.io~1storage-class")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

/// `RWO,ROX,RWX,RWOP`, as kubectl abbreviates access modes.
pub(super) fn access_modes_string(modes: Option<&Value>) -> String {
    let modes: Vec<&str> = modes
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut out = Vec::new();
    for (mode, short) in [
        ("ReadWriteOnce", "RWO"),
        ("ReadOnlyMany", "ROX"),
        ("ReadWriteMany", "RWX"),
        ("ReadWriteOncePod", "RWOP"),
    ] {
        if modes.contains(&mode) {
            out.push(short);
        }
    }
    out.join(",")
}

/// Access modes: at least one, each known, ReadWriteOncePod alone.
pub(super) fn validate_access_modes(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let field = format!("{path}.accessModes");
    let modes = spec
        .get("accessModes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if modes.is_empty() {
        causes.push(Cause::required_because(
            &field,
            "at least 1 access mode is required",
        ));
        return;
    }
    for m in &modes {
        if !m.as_str().is_some_and(|m| ACCESS_MODES.contains(&m)) {
            causes.push(Cause::unsupported(&field, m, ACCESS_MODES));
        }
    }
    if modes.len() > 1 && modes.iter().any(|m| m == "ReadWriteOncePod") {
        causes.push(Cause::forbidden(
            &field,
            "may not use ReadWriteOncePod with other access modes",
        ));
    }
}

pub(super) fn validate_volume_mode(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    if let Some(m) = spec.get("volumeMode").filter(|v| !v.is_null()) {
        if !m.as_str().is_some_and(|m| VOLUME_MODES.contains(&m)) {
            causes.push(Cause::unsupported(
                format!("{path}.volumeMode"),
                m,
                VOLUME_MODES,
            ));
        }
    }
}

pub(super) fn validate_class_name(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    if let Some(c) = spec
        .get("storageClassName")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
    {
        for e in dns1123_subdomain_errors(c) {
            causes.push(Cause::invalid(
                format!("{path}.storageClassName"),
                &json!(c),
                e,
            ));
        }
    }
}

/// A quantity at `field`: readable and not negative; its thousandths.
pub(super) fn validate_quantity(v: &Value, field: &str, causes: &mut Vec<Cause>) -> Option<i128> {
    let parsed = v.as_str().and_then(parse_milli);
    match parsed {
        None => {
            causes.push(Cause::invalid(
                field,
                v,
                "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
            ));
            None
        }
        Some(q) if q < 0 => {
            causes.push(Cause::invalid(
                field,
                v,
                "must be greater than or equal to 0",
            ));
            None
        }
        Some(q) => Some(q),
    }
}

/// The volume source a spec names (the first, if several).
pub fn volume_source(spec: &Map<String, Value>) -> Option<&'static str> {
    SOURCES
        .iter()
        .copied()
        .find(|s| spec.get(*s).is_some_and(|v| !v.is_null()))
}

struct PersistentVolumeBehaviour;

impl Behaviour for PersistentVolumeBehaviour {
    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.entry("persistentVolumeReclaimPolicy")
                .or_insert_with(|| json!("Retain"));
            spec.entry("volumeMode")
                .or_insert_with(|| json!("Filesystem"));
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        let Some(m) = obj.as_object_mut() else { return };
        m.insert("status".into(), json!({"phase": "Pending"}));
        add_finalizer(obj, PV_PROTECTION);
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let empty = Map::new();
        let spec = obj.get("spec").and_then(Value::as_object).unwrap_or(&empty);
        let spec_value = obj.get("spec").cloned().unwrap_or(json!({}));
        validate_access_modes(&spec_value, "spec", &mut causes);
        match spec.get("capacity").and_then(Value::as_object) {
            None => causes.push(Cause::required("spec.capacity")),
            Some(c) if c.is_empty() => causes.push(Cause::required("spec.capacity")),
            Some(c) => {
                if !c.contains_key("storage") || c.len() > 1 {
                    let keys: Vec<&String> = c.keys().collect();
                    causes.push(Cause::unsupported(
                        "spec.capacity",
                        &json!(keys),
                        &["storage"],
                    ));
                }
                for (k, v) in c {
                    validate_quantity(v, &format!("spec.capacity[{k}]"), &mut causes);
                }
            }
        }
        let policy = spec.get("persistentVolumeReclaimPolicy");
        if let Some(p) = policy.filter(|p| !p.is_null()) {
            if !matches!(p.as_str(), Some("Retain" | "Recycle" | "Delete")) {
                causes.push(Cause::unsupported(
                    "spec.persistentVolumeReclaimPolicy",
                    p,
                    &["Delete", "Recycle", "Retain"],
                ));
            }
        }
        validate_class_name(&spec_value, "spec", &mut causes);
        validate_volume_mode(&spec_value, "spec", &mut causes);
        let present: Vec<&str> = SOURCES
            .iter()
            .copied()
            .filter(|s| spec.get(*s).is_some_and(|v| !v.is_null()))
            .collect();
        match present.as_slice() {
            [] => causes.push(Cause::required_because(
                "spec",
                "must specify a volume type",
            )),
            [_] => {}
            [_, more @ ..] => {
                for extra in more {
                    causes.push(Cause::forbidden(
                        format!("spec.{extra}"),
                        "may not specify more than 1 volume type",
                    ));
                }
            }
        }
        for (source, field) in [
            ("hostPath", "path"),
            ("local", "path"),
            ("nfs", "path"),
            ("nfs", "server"),
        ] {
            if let Some(src) = spec.get(source).and_then(Value::as_object) {
                if src
                    .get(field)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    causes.push(Cause::required(format!("spec.{source}.{field}")));
                }
            }
        }
        if let Some(t) = spec
            .get("hostPath")
            .and_then(|h| h.get("type"))
            .and_then(Value::as_str)
        {
            const TYPES: &[&str] = &[
                "",
                "DirectoryOrCreate",
                "Directory",
                "FileOrCreate",
                "File",
                "Socket",
                "CharDevice",
                "BlockDevice",
            ];
            if !TYPES.contains(&t) {
                causes.push(Cause::unsupported(
                    "spec.hostPath.type",
                    &json!(t),
                    &TYPES[1..],
                ));
            }
        }
        if let Some(csi) = spec.get("csi").and_then(Value::as_object) {
            for f in ["driver", "volumeHandle"] {
                if csi.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                    causes.push(Cause::required(format!("spec.csi.{f}")));
                }
            }
        }
        let affinity = spec.get("nodeAffinity").filter(|v| !v.is_null());
        if spec.get("local").is_some_and(|v| !v.is_null()) && affinity.is_none() {
            causes.push(Cause::required_because(
                "spec.nodeAffinity",
                "Local volume requires node affinity",
            ));
        }
        if let Some(a) = affinity {
            validate_node_affinity(a, &mut causes);
        }
        if let Some(r) = spec.get("claimRef").filter(|v| !v.is_null()) {
            if s(r, "/name").is_empty() {
                causes.push(Cause::required("spec.claimRef.name"));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        let source = |o: &Value| -> Value {
            let spec = o.get("spec").and_then(Value::as_object);
            json!(SOURCES
                .iter()
                .map(|s| spec.and_then(|m| m.get(*s)).cloned().unwrap_or(Value::Null))
                .collect::<Vec<_>>())
        };
        if source(new) != source(old) {
            causes.push(Cause::forbidden(
                "spec.persistentvolumesource",
                "spec.persistentvolumesource is immutable after creation",
            ));
        }
        if new.pointer("/spec/volumeMode") != old.pointer("/spec/volumeMode") {
            causes.push(Cause::invalid(
                "spec.volumeMode",
                new.pointer("/spec/volumeMode").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        let old_affinity = old.pointer("/spec/nodeAffinity").filter(|v| !v.is_null());
        if old_affinity.is_some() && new.pointer("/spec/nodeAffinity") != old_affinity {
            causes.push(Cause::invalid(
                "spec.nodeAffinity",
                new.pointer("/spec/nodeAffinity").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        causes
    }

    fn validate_status_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        if let Some(p) = new.pointer("/status/phase").filter(|v| !v.is_null()) {
            const PHASES: &[&str] = &["Pending", "Available", "Bound", "Released", "Failed"];
            if !p.as_str().is_some_and(|p| PHASES.contains(&p)) {
                causes.push(Cause::unsupported("status.phase", p, PHASES));
            }
        }
        causes
    }
}

/// A node affinity's required terms: at least one, each with known
/// operators.
fn validate_node_affinity(a: &Value, causes: &mut Vec<Cause>) {
    let Some(required) = a.get("required").filter(|v| !v.is_null()) else {
        return;
    };
    let terms = required
        .get("nodeSelectorTerms")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let path = "spec.nodeAffinity.required.nodeSelectorTerms";
    if terms.is_empty() {
        causes.push(Cause::required_because(
            path,
            "must have at least one node selector term",
        ));
    }
    const OPS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"];
    for (i, term) in terms.iter().enumerate() {
        for list in ["matchExpressions", "matchFields"] {
            for (j, e) in term
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let at = format!("{path}[{i}].{list}[{j}]");
                let key = s(e, "/key");
                if list == "matchExpressions" {
                    for err in qualified_name_errors(key) {
                        causes.push(Cause::invalid(format!("{at}.key"), &json!(key), err));
                    }
                }
                let op = e.get("operator").cloned().unwrap_or(Value::Null);
                let values = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                match op.as_str() {
                    Some("In" | "NotIn") if values == 0 => causes.push(Cause::required_because(
                        format!("{at}.values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    )),
                    Some("Exists" | "DoesNotExist") if values > 0 => causes.push(Cause::forbidden(
                        format!("{at}.values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    )),
                    Some(o) if OPS.contains(&o) => {}
                    _ => causes.push(Cause::unsupported(format!("{at}.operator"), &op, OPS)),
                }
            }
        }
    }
}

/// Add `finalizer` to the object's finalizers unless it is there.
pub(super) fn add_finalizer(obj: &mut Value, finalizer: &str) {
    let Some(meta) = obj
        .as_object_mut()
        .map(|m| m.entry("metadata").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let list = meta.entry("finalizers").or_insert_with(|| json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    if let Some(list) = list.as_array_mut() {
        if !list.iter().any(|f| f == finalizer) {
            list.push(json!(finalizer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(c: Vec<Cause>) -> Vec<String> {
        c.into_iter().map(|c| c.field).collect()
    }

    fn pv() -> Value {
        json!({"metadata": {"name": "pv1"}, "spec": {"capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/data"}}})
    }

    #[test]
    fn defaults_finalizer_and_phase() {
        let b = PersistentVolumeBehaviour;
        let mut v = pv();
        b.default(&mut v);
        b.prepare_for_create(&mut v);
        assert_eq!(v["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(v["spec"]["volumeMode"], "Filesystem");
        assert_eq!(v["status"]["phase"], "Pending");
        assert_eq!(v["metadata"]["finalizers"], json!([PV_PROTECTION]));
        assert!(b.validate(&v).is_empty(), "{:?}", b.validate(&v));
    }

    #[test]
    fn bad_volumes_name_their_fields() {
        let b = PersistentVolumeBehaviour;
        let v = json!({"metadata": {"name": "pv1"}, "spec": {}});
        assert_eq!(
            fields(b.validate(&v)),
            ["spec.accessModes", "spec.capacity", "spec"]
        );
        let mut v = pv();
        v["spec"]["nfs"] = json!({"server": "s", "path": "/x"});
        v["spec"]["persistentVolumeReclaimPolicy"] = json!("Keep");
        v["spec"]["capacity"] = json!({"storage": "lots"});
        assert_eq!(
            fields(b.validate(&v)),
            [
                "spec.capacity[storage]",
                "spec.persistentVolumeReclaimPolicy",
                "spec.nfs"
            ]
        );
        let mut v = pv();
        v["spec"] = json!({"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "local": {"path": "/mnt"}});
        assert_eq!(fields(b.validate(&v)), ["spec.nodeAffinity"]);
    }

    #[test]
    fn the_source_is_fixed_but_capacity_may_grow() {
        let b = PersistentVolumeBehaviour;
        let old = pv();
        let mut new = old.clone();
        new["spec"]["capacity"]["storage"] = json!("2Gi");
        assert!(b.validate_update(&new, &old).is_empty());
        new["spec"]["hostPath"]["path"] = json!("/other");
        assert_eq!(
            fields(b.validate_update(&new, &old)),
            ["spec.persistentvolumesource"]
        );
    }

    #[test]
    fn columns() {
        let mut v = pv();
        v["spec"]["claimRef"] = json!({"namespace": "default", "name": "data"});
        v["spec"]["accessModes"] = json!(["ReadWriteOnce", "ReadOnlyMany"]);
        v["spec"]["persistentVolumeReclaimPolicy"] = json!("Retain");
        v["status"] = json!({"phase": "Bound"});
        let cells = (definition().table).cells(&v, chrono::Utc::now());
        assert_eq!(
            cells[..9],
            [
                json!("pv1"),
                json!("1Gi"),
                json!("RWO,ROX"),
                json!("Retain"),
                json!("Bound"),
                json!("default/data"),
                json!(""),
                json!("<unset>"),
                json!("")
            ]
        );
    }
}
