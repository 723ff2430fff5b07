//! scheduling.k8s.io/v1 PriorityClasses: named pod priorities. Kubernetes'
//! validation (values above 1000000000 and the `system-` prefix are the
//! system's, value and preemptionPolicy immutable, one global default),
//! kubectl's columns, the built-in `system-cluster-critical` and
//! `system-node-critical`, and the Priority admission of pods: a pod's
//! `priorityClassName` (or the global default class) becomes its
//! `spec.priority` and `spec.preemptionPolicy`. Nothing preempts.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use serde_json::{json, Value};
use tapestry_store::{ListOptions, Store};

use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::meta_str;
use crate::registry::{names, Behaviour, ResourceDef, WriteHook};
use crate::tables::{age, col, name, s, TableDef, AGE, NAME};

/// The highest value a user's class may have.
pub const HIGHEST_USER_DEFINABLE: i64 = 1_000_000_000;
const PREEMPTION_POLICIES: [&str; 2] = ["Never", "PreemptLowerPriority"];

/// The classes every cluster has: name, value, description.
pub const SYSTEM_CLASSES: [(&str, i64, &str); 2] = [
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
];

/// A built-in class as the bootstrap creates it.
pub fn system_class(name: &str, value: i64, description: &str) -> Value {
    json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
           "metadata": {"name": name}, "value": value, "description": description,
           "preemptionPolicy": "PreemptLowerPriority"})
}

pub fn definition(store: Arc<dyn Store>) -> ResourceDef {
    ResourceDef {
        short_names: names(&["pc"]),
        behaviour: Arc::new(PriorityClassBehaviour),
        hook: Some(Arc::new(OneGlobalDefault { store })),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Value", "The value of this priority class."),
                col("Global-Default", "globalDefault specifies whether this PriorityClass should be considered as the default priority."),
                AGE,
                col("PreemptionPolicy", "PreemptionPolicy is the Policy for preempting pods with lower priority."),
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(o.get("value").and_then(Value::as_i64).unwrap_or(0)),
                    json!(o.get("globalDefault").and_then(Value::as_bool).unwrap_or(false)),
                    age(o, now),
                    json!(s(o, "/preemptionPolicy")),
                ]
            },
        }),
        ..ResourceDef::of::<PriorityClass>()
    }
}

struct PriorityClassBehaviour;

impl Behaviour for PriorityClassBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn default(&self, obj: &mut Value) {
        if let Some(m) = obj.as_object_mut() {
            m.entry("preemptionPolicy")
                .or_insert_with(|| json!("PreemptLowerPriority"));
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let name = meta_str(obj, "name");
        let value = obj.get("value").and_then(Value::as_i64).unwrap_or(0);
        if name.starts_with("system-") {
            let known = SYSTEM_CLASSES.iter().find(|(n, _, _)| *n == name);
            let detail = match known {
                None => Some(format!("priority class {name} is not known")),
                Some((_, v, _)) if *v != value => {
                    Some(format!("value of {name} PriorityClass must be {v}"))
                }
                Some(_) if obj.get("globalDefault").and_then(Value::as_bool) == Some(true) => Some(
                    format!("globalDefault of {name} PriorityClass must be false"),
                ),
                Some(_) => None,
            };
            if let Some(detail) = detail {
                causes.push(Cause::forbidden(
                    "metadata.name",
                    format!("priority class names with 'system-' prefix are reserved for system use only. error: {detail}"),
                ));
            }
        } else if value > HIGHEST_USER_DEFINABLE {
            causes.push(Cause::forbidden(
                "value",
                format!(
                    "maximum allowed value of a user defined priority is {HIGHEST_USER_DEFINABLE}"
                ),
            ));
        }
        if let Some(p) = obj.get("preemptionPolicy").and_then(Value::as_str) {
            if !PREEMPTION_POLICIES.contains(&p) {
                causes.push(Cause::unsupported(
                    "preemptionPolicy",
                    &json!(p),
                    &PREEMPTION_POLICIES,
                ));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if new.get("value") != old.get("value") {
            causes.push(Cause::forbidden(
                "value",
                "may not be changed in an update.",
            ));
        }
        if new.get("preemptionPolicy") != old.get("preemptionPolicy") {
            causes.push(Cause::invalid(
                "preemptionPolicy",
                new.get("preemptionPolicy").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        causes
    }
}

/// Every PriorityClass stored, read from `store`.
async fn classes(store: &dyn Store) -> ApiResult<Vec<Value>> {
    let list = store
        .list("/registry/priorityclasses/", ListOptions::default())
        .await
        .map_err(ApiError::internal)?;
    Ok(list
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// Kubernetes' Priority admission of PriorityClasses: only one may be
/// the global default.
struct OneGlobalDefault {
    store: Arc<dyn Store>,
}

impl OneGlobalDefault {
    async fn check(&self, obj: &Value) -> ApiResult<()> {
        if obj.get("globalDefault").and_then(Value::as_bool) != Some(true) {
            return Ok(());
        }
        let name = meta_str(obj, "name");
        let other = classes(&*self.store).await?.into_iter().find(|c| {
            c.get("globalDefault").and_then(Value::as_bool) == Some(true)
                && meta_str(c, "name") != name
        });
        match other {
            Some(c) => Err(ApiError::Forbidden(format!(
                "priorityclasses.scheduling.k8s.io \"{name}\" is forbidden: PriorityClass {} is already marked as default. Only one default can exist",
                meta_str(&c, "name")
            ))),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl WriteHook for OneGlobalDefault {
    async fn on_create(&self, obj: &mut Value, _dry_run: bool) -> ApiResult<()> {
        self.check(obj).await
    }

    async fn on_update(&self, new: &mut Value, _old: &Value, _dry_run: bool) -> ApiResult<()> {
        self.check(new).await
    }

    async fn release(&self, _obj: &Value, _keep: Option<&Value>) {}
}

/// The Priority admission of a pod being created: its class's value and
/// preemption policy, or the global default class's, or priority 0.
pub async fn admit_pod(store: &dyn Store, pod: &mut Value) -> ApiResult<()> {
    let pod_name = meta_str(pod, "name").to_string();
    let forbidden =
        |m: String| ApiError::Forbidden(format!("pods \"{pod_name}\" is forbidden: {m}"));
    let wanted = s(pod, "/spec/priorityClassName").to_string();
    let class = if wanted.is_empty() {
        classes(store)
            .await?
            .into_iter()
            .filter(|c| c.get("globalDefault").and_then(Value::as_bool) == Some(true))
            .min_by_key(|c| c.get("value").and_then(Value::as_i64).unwrap_or(0))
    } else {
        let kv = store
            .get(&format!("/registry/priorityclasses/{wanted}"))
            .await
            .map_err(ApiError::internal)?;
        match kv.and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok()) {
            Some(c) => Some(c),
            None => {
                return Err(forbidden(format!(
                    "no PriorityClass with name {wanted} was found"
                )))
            }
        }
    };
    let (name, value, policy) = match &class {
        Some(c) => (
            meta_str(c, "name").to_string(),
            c.get("value").and_then(Value::as_i64).unwrap_or(0),
            c.get("preemptionPolicy")
                .and_then(Value::as_str)
                .unwrap_or("PreemptLowerPriority")
                .to_string(),
        ),
        None => (String::new(), 0, "PreemptLowerPriority".to_string()),
    };
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    if let Some(given) = spec.get("priority").and_then(Value::as_i64) {
        if given != value {
            return Err(forbidden(format!(
                "the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name"
            )));
        }
    }
    if !name.is_empty() {
        spec.insert("priorityClassName".into(), json!(name));
    }
    spec.insert("priority".into(), json!(value));
    if class.is_some() || spec.get("preemptionPolicy").is_none() {
        spec.insert("preemptionPolicy".into(), json!(policy));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(obj: Value) -> Vec<String> {
        PriorityClassBehaviour
            .validate(&obj)
            .into_iter()
            .map(|c| c.field)
            .collect()
    }

    #[test]
    fn classes_are_validated_as_kubernetes_does() {
        assert!(fields(json!({"metadata": {"name": "high"}, "value": 1000})).is_empty());
        assert_eq!(
            fields(json!({"metadata": {"name": "huge"}, "value": 1_000_000_001})),
            ["value"]
        );
        assert_eq!(
            fields(json!({"metadata": {"name": "system-mine"}, "value": 1})),
            ["metadata.name"]
        );
        for (n, v, d) in SYSTEM_CLASSES {
            assert!(fields(system_class(n, v, d)).is_empty());
        }
        assert_eq!(
            fields(json!({"metadata": {"name": "x"}, "value": 1, "preemptionPolicy": "Sometimes"})),
            ["preemptionPolicy"]
        );
        let old = json!({"metadata": {"name": "x"}, "value": 1, "preemptionPolicy": "Never"});
        let new = json!({"metadata": {"name": "x"}, "value": 2, "preemptionPolicy": "Never"});
        assert_eq!(
            PriorityClassBehaviour.validate_update(&new, &old)[0].field,
            "value"
        );
    }

    #[tokio::test]
    async fn pods_take_their_class_value_or_the_global_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = tapestry_store::RedbStore::open(dir.path().join("db")).unwrap();
        let put = |name: &str, value: i64, default: bool| {
            let c = json!({"metadata": {"name": name}, "value": value, "globalDefault": default,
                           "preemptionPolicy": "Never"});
            (
                format!("/registry/priorityclasses/{name}"),
                serde_json::to_vec(&c).unwrap(),
            )
        };
        for (k, v) in [put("high", 1000, false), put("normal", 10, true)] {
            store.create(&k, v.into()).await.unwrap();
        }
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"priorityClassName": "high"}});
        admit_pod(&store, &mut pod).await.unwrap();
        assert_eq!(pod["spec"]["priority"], 1000);
        assert_eq!(pod["spec"]["preemptionPolicy"], "Never");
        let mut plain = json!({"metadata": {"name": "p"}, "spec": {}});
        admit_pod(&store, &mut plain).await.unwrap();
        assert_eq!(plain["spec"]["priorityClassName"], "normal");
        assert_eq!(plain["spec"]["priority"], 10);
        let mut unknown = json!({"metadata": {"name": "x"}, "spec": {"priorityClassName": "foo"}});
        assert_eq!(
            admit_pod(&store, &mut unknown)
                .await
                .unwrap_err()
                .to_string(),
            "pods \"x\" is forbidden: no PriorityClass with name foo was found"
        );
    }
}
