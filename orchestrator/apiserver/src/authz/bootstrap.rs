//! The roles and bindings every cluster starts with, reconciled at each
//! start as kube-apiserver does: a missing one is created, one that lost
//! rules or subjects gets them back, unless its
//! `rbac.authorization.kubernetes.io/autoupdate` annotation is `false`.
//! Rules are only ever added to what is stored, never taken away.

use anyhow::Result;
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{json, Value};

use super::{AUTHENTICATED, MASTERS};
use crate::error::ApiError;
use crate::resources::rbac::GROUP;
use crate::rest::Api;

const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";
const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];
const ALL: &[&str] = &["*"];

/// The group nodes' credentials carry.
pub use tapestry_runtime::csr::NODES_GROUP as NODES;
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
/// The identities of the scheduler and controller manager that run in the
/// server's process.
pub const SCHEDULER: &str = "system:kube-scheduler";
pub const CONTROLLER_MANAGER: &str = "system:kube-controller-manager";

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn urls(paths: &[&str], verbs: &[&str]) -> Value {
    json!({"nonResourceURLs": paths, "verbs": verbs})
}

pub fn cluster_admin_rules() -> Vec<PolicyRule> {
    serde_json::from_value(json!([rule(ALL, ALL, ALL), urls(ALL, ALL)])).unwrap_or_default()
}

/// Namespaced objects people read (everything but Secrets) and, for
/// edit, write.
fn workloads(verbs: &[&str], with_secrets: bool) -> Vec<Value> {
    let mut core = vec![
        "configmaps",
        "endpoints",
        "persistentvolumeclaims",
        "pods",
        "replicationcontrollers",
        "replicationcontrollers/scale",
        "serviceaccounts",
        "services",
    ];
    if with_secrets {
        core.push("secrets");
    }
    vec![
        rule(&[""], &core, verbs),
        rule(
            &["apps"],
            &[
                "daemonsets",
                "deployments",
                "deployments/scale",
                "replicasets",
                "replicasets/scale",
                "statefulsets",
                "statefulsets/scale",
            ],
            verbs,
        ),
        rule(&["batch"], &["jobs", "cronjobs"], verbs),
        rule(&["autoscaling"], &["horizontalpodautoscalers"], verbs),
        rule(
            &["networking.k8s.io"],
            &["ingresses", "networkpolicies"],
            verbs,
        ),
        rule(&["policy"], &["poddisruptionbudgets"], verbs),
        rule(&["discovery.k8s.io"], &["endpointslices"], verbs),
    ]
}

fn view_rules() -> Vec<Value> {
    let mut rules = workloads(READ, false);
    rules.push(rule(
        &[""],
        &[
            "pods/log",
            "pods/status",
            "services/status",
            "events",
            "limitranges",
            "resourcequotas",
            "namespaces",
            "namespaces/status",
        ],
        READ,
    ));
    rules.push(rule(
        &["apps"],
        &[
            "daemonsets/status",
            "deployments/status",
            "replicasets/status",
            "statefulsets/status",
            "controllerrevisions",
        ],
        READ,
    ));
    rules.push(rule(&["batch"], &["jobs/status", "cronjobs/status"], READ));
    rules.push(rule(&["networking.k8s.io"], &["ingresses/status"], READ));
    rules.push(rule(&["events.k8s.io"], &["events"], READ));
    rules.push(rule(&["metrics.k8s.io"], &["pods", "nodes"], READ));
    rules
}

fn edit_rules() -> Vec<Value> {
    let mut rules = view_rules();
    rules.extend(workloads(WRITE, true));
    rules.push(rule(&[""], &["secrets"], READ));
    rules.push(rule(
        &[""],
        &[
            "pods/exec",
            "pods/attach",
            "pods/portforward",
            "pods/eviction",
            "serviceaccounts/token",
        ],
        &["create", "get"],
    ));
    rules.push(rule(&["apps"], &["deployments/rollback"], WRITE));
    rules
}

fn admin_rules() -> Vec<Value> {
    let mut rules = edit_rules();
    rules.push(rule(
        &[GROUP],
        &["roles", "rolebindings"],
        &[READ, WRITE].concat(),
    ));
    rules.push(rule(
        &["authorization.k8s.io"],
        &["localsubjectaccessreviews"],
        &["create"],
    ));
    rules
}

/// What a node agent needs: its Node and Lease, the pods bound to it and
/// what they mount, Services and EndpointSlices for its proxy and DNS
/// (it publishes its own DNS endpoints), events.
pub(crate) fn node_rules() -> Vec<Value> {
    vec![
        rule(
            &[""],
            &["nodes"],
            &[
                "create", "get", "list", "watch", "patch", "update", "delete",
            ],
        ),
        rule(&[""], &["nodes/status"], &["patch", "update"]),
        rule(
            &[""],
            &["pods"],
            &["get", "list", "watch", "create", "delete"],
        ),
        rule(&[""], &["pods/status"], &["patch", "update"]),
        rule(&[""], &["pods/eviction"], &["create"]),
        rule(
            &[""],
            &["configmaps", "secrets", "persistentvolumeclaims"],
            &["get"],
        ),
        // Its pods' volumes, and the local-path volumes it cleans up:
        // NodeRestriction lets it change only a deleted local-path volume
        // of its own (to drop the cleanup finalizer).
        rule(
            &[""],
            &["persistentvolumes"],
            &[READ, &["patch", "update"]].concat(),
        ),
        rule(&[""], &["services", "endpoints", "namespaces"], READ),
        rule(&[""], &["events"], &["create", "patch", "update"]),
        rule(
            &["events.k8s.io"],
            &["events"],
            &["create", "patch", "update"],
        ),
        rule(&[""], &["serviceaccounts/token"], &["create"]),
        rule(
            &["discovery.k8s.io"],
            &["endpointslices"],
            &[READ, WRITE].concat(),
        ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &[READ, &["create", "update", "patch", "delete"]].concat(),
        ),
        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        rule(
            &["authorization.k8s.io"],
            &["subjectaccessreviews"],
            &["create"],
        ),
        // Renewing its own certificates.
        rule(
            &["certificates.k8s.io"],
            &["certificatesigningrequests"],
            &["create", "get", "list", "watch"],
        ),
    ]
}

/// The in-process scheduler (`system:kube-scheduler`): it watches pods
/// and nodes, binds pods and reports those it cannot place.
fn scheduler_rules() -> Vec<Value> {
    vec![
        rule(&[""], &["pods", "nodes"], READ),
        // Volume binding: a pod's claims, their volumes and classes; the
        // node chosen for a WaitForFirstConsumer claim is written on it.
        rule(
            &[""],
            &["persistentvolumeclaims", "persistentvolumes"],
            READ,
        ),
        rule(&[""], &["persistentvolumeclaims"], &["patch", "update"]),
        rule(&["storage.k8s.io"], &["storageclasses"], READ),
        rule(&[""], &["pods/binding", "bindings"], &["create"]),
        rule(&[""], &["pods/status"], &["patch", "update"]),
        rule(&[""], &["events"], &["create", "patch", "update"]),
        rule(
            &["events.k8s.io"],
            &["events"],
            &["create", "patch", "update"],
        ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &[READ, &["create", "update", "patch"]].concat(),
        ),
    ]
}

/// The in-process controller manager (`system:kube-controller-manager`):
/// the garbage collector and the namespace controller read, change and
/// delete objects of every kind; it creates only what its controllers
/// make. It cannot grant (`bind`, `escalate`) or act as anyone else.
fn controller_manager_rules() -> Vec<Value> {
    vec![
        rule(
            ALL,
            ALL,
            &[READ, &["patch", "update", "delete", "deletecollection"]].concat(),
        ),
        rule(
            &[""],
            &[
                "pods",
                "endpoints",
                "serviceaccounts",
                "configmaps",
                "events",
                "persistentvolumes",
                "persistentvolumeclaims",
            ],
            &["create"],
        ),
        rule(
            &["apps"],
            &["replicasets", "controllerrevisions"],
            &["create"],
        ),
        rule(&["batch"], &["jobs"], &["create"]),
        rule(&["discovery.k8s.io"], &["endpointslices"], &["create"]),
        rule(&["coordination.k8s.io"], &["leases"], &["create"]),
        rule(&["events.k8s.io"], &["events"], &["create"]),
        // The CSR approver asks whether a requester may have a tapestry
        // signer's certificate.
        rule(
            &["authorization.k8s.io"],
            &["subjectaccessreviews"],
            &["create"],
        ),
    ]
}

/// `(name, rules, the role it is aggregated into, the roles it
/// aggregates)`: `view` carries `aggregate-to-edit`, so `edit` holds what
/// a role labelled like `view` adds.
type BootstrapRole = (
    &'static str,
    Vec<Value>,
    Option<&'static str>,
    Option<&'static str>,
);

fn cluster_roles() -> Vec<BootstrapRole> {
    vec![
        (
            "cluster-admin",
            vec![rule(ALL, ALL, ALL), urls(ALL, ALL)],
            None,
            None,
        ),
        ("admin", admin_rules(), None, Some("admin")),
        ("edit", edit_rules(), Some("admin"), Some("edit")),
        ("view", view_rules(), Some("edit"), Some("view")),
        (
            "system:discovery",
            vec![urls(
                &[
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/healthz",
                    "/livez",
                    "/readyz",
                    "/openapi",
                    "/openapi/*",
                    "/version",
                    "/version/",
                ],
                &["get"],
            )],
            None,
            None,
        ),
        (
            "system:public-info-viewer",
            vec![urls(
                &["/healthz", "/livez", "/readyz", "/version", "/version/"],
                &["get"],
            )],
            None,
            None,
        ),
        (
            "system:basic-user",
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
            ],
            None,
            None,
        ),
        ("system:node", node_rules(), None, None),
        ("system:kube-scheduler", scheduler_rules(), None, None),
        (
            "system:kube-controller-manager",
            controller_manager_rules(),
            None,
            None,
        ),
        (
            "system:node-bootstrapper",
            vec![rule(
                &["certificates.k8s.io"],
                &["certificatesigningrequests"],
                &["create", "get", "list", "watch"],
            )],
            None,
            None,
        ),
        (
            "system:service-account-issuer-discovery",
            vec![urls(
                &["/.well-known/openid-configuration", "/openid/v1/jwks"],
                &["get"],
            )],
            None,
            None,
        ),
        (
            "system:auth-delegator",
            vec![
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
            ],
            None,
            None,
        ),
    ]
}

/// `(name of the binding and its ClusterRole, subjects)`.
fn cluster_role_bindings() -> Vec<(&'static str, Vec<Value>)> {
    let group = |g: &str| json!({"apiGroup": GROUP, "kind": "Group", "name": g});
    let user = |u: &str| json!({"apiGroup": GROUP, "kind": "User", "name": u});
    vec![
        ("cluster-admin", vec![group(MASTERS)]),
        ("system:discovery", vec![group(AUTHENTICATED)]),
        (
            "system:public-info-viewer",
            vec![group(AUTHENTICATED), group(UNAUTHENTICATED)],
        ),
        ("system:basic-user", vec![group(AUTHENTICATED)]),
        ("system:kube-scheduler", vec![user(SCHEDULER)]),
        (
            "system:kube-controller-manager",
            vec![user(CONTROLLER_MANAGER)],
        ),
        // Bootstrap tokens may ask for node certificates, nothing else.
        (
            "system:node-bootstrapper",
            vec![group(crate::bootstraptokens::BOOTSTRAPPERS)],
        ),
        (
            "system:service-account-issuer-discovery",
            vec![group("system:serviceaccounts")],
        ),
    ]
}

fn bootstrap_meta(name: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/bootstrapping"] = json!("rbac-defaults");
    json!({"name": name, "labels": labels, "annotations": {AUTOUPDATE: "true"}})
}

/// Rights of one of the server's own components: cluster-wide, and in
/// the namespace it works in.
struct Component {
    role: &'static str,
    subject: Value,
    cluster: Vec<Value>,
    local: Vec<Value>,
}

/// The namespace the fleet manager deploys taps and aggregators into.
const TAPESTRY_NAMESPACE: &str = "tapestry-system";

/// Asking for certificates, and the permission that makes the controller
/// manager approve a Tapestry signer's request (`certificatesigningrequests/SUB`).
fn certificate_rules(sub: &str) -> [Value; 2] {
    [
        rule(
            &["certificates.k8s.io"],
            &["certificatesigningrequests"],
            &["create", "get"],
        ),
        rule(
            &["certificates.k8s.io"],
            &[&format!("certificatesigningrequests/{sub}")],
            &["create"],
        ),
    ]
}

/// The tap-agent, aggregator and fleet manager (identities in
/// [`crate::pki::COMPONENTS`]): each only what it calls.
fn components() -> Vec<Component> {
    let sa = |name: &str| json!({"kind": "ServiceAccount", "name": name, "namespace": TAPESTRY_NAMESPACE});
    let tapestry = "tapestry.io";
    let apply = &["get", "list", "watch", "create", "patch", "update"][..];
    vec![
        Component {
            role: "tapestry:tap-agent",
            subject: sa("tap-agent"),
            cluster: vec![
                rule(&[""], &["pods", "namespaces", "nodes"], &["list", "watch"]),
                rule(&[tapestry], &["tappolicies"], &["list", "watch"]),
            ]
            .into_iter()
            // Its client certificate for the aggregator (approved only for
            // the node the asking pod runs on).
            .chain(certificate_rules("tapclient"))
            .collect(),
            local: vec![
                rule(
                    &["discovery.k8s.io"],
                    &["endpointslices"],
                    &["list", "watch"],
                ),
                rule(
                    &["coordination.k8s.io"],
                    &["leases"],
                    &["get", "create", "patch", "update"],
                ),
            ],
        },
        Component {
            role: "tapestry:aggregator",
            subject: sa("aggregator"),
            cluster: vec![
                rule(
                    &[tapestry],
                    &["tappolicies", "taptools"],
                    &["list", "watch"],
                ),
                rule(
                    &[tapestry],
                    &["tappolicies/status", "taptools/status"],
                    &["patch"],
                ),
                // Where pods run: taps' pod identities are checked.
                rule(&[""], &["pods"], &["list", "watch"]),
            ]
            .into_iter()
            // Its serving certificate (approved only for its own pod's
            // addresses and its namespace's Service names).
            .chain(certificate_rules("aggregatorserving"))
            .collect(),
            // Tools' bearer tokens (TapTool spec.tokenSecret).
            local: vec![rule(&[""], &["secrets"], &["get"])],
        },
        Component {
            role: "tapestry:fleet-manager",
            subject: json!({"apiGroup": GROUP, "kind": "User", "name": "system:tapestry:fleet-manager"}),
            cluster: vec![
                json!({"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                       "resourceNames": ["tappolicies.tapestry.io", "taptools.tapestry.io"],
                       "verbs": ["get", "create", "patch", "update"]}),
                json!({"apiGroups": [""], "resources": ["namespaces"],
                       "resourceNames": [TAPESTRY_NAMESPACE], "verbs": ["get", "create", "patch"]}),
                rule(&[""], &["nodes", "namespaces", "pods"], &["list", "watch"]),
                rule(
                    &[tapestry],
                    &["tappolicies", "taptools"],
                    &[READ, WRITE].concat(),
                ),
                rule(&[tapestry], &["tappolicies/status"], &["patch"]),
                rule(&[""], &["events"], &["create", "patch"]),
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
            ],
            local: vec![
                rule(&["coordination.k8s.io"], &["leases"], apply),
                rule(&["apps"], &["daemonsets", "deployments"], apply),
                rule(&[""], &["services", "serviceaccounts", "secrets"], apply),
            ],
        },
    ]
}

/// Create or repair every bootstrap role and binding.
pub async fn ensure(api: &Api) -> Result<()> {
    let prefix = "rbac.authorization.k8s.io/aggregate-to-";
    for (name, rules, carries, aggregates) in cluster_roles() {
        let labels = match carries {
            Some(to) => json!({format!("{prefix}{to}"): "true"}),
            None => json!({}),
        };
        let mut role = json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRole",
            "metadata": bootstrap_meta(name, labels), "rules": rules,
        });
        if let Some(from) = aggregates {
            role["aggregationRule"] = json!({"clusterRoleSelectors": [
                {"matchLabels": {format!("{prefix}{from}"): "true"}}]});
        }
        reconcile(api, "clusterroles", None, role).await?;
    }
    for (name, subjects) in cluster_role_bindings() {
        reconcile(
            api,
            "clusterrolebindings",
            None,
            binding("ClusterRoleBinding", name, "ClusterRole", subjects),
        )
        .await?;
    }
    unbind_nodes_from_node_role(api).await?;
    let ns =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TAPESTRY_NAMESPACE}});
    match api.create_internal("", "v1", "namespaces", None, ns).await {
        Ok(()) | Err(ApiError::AlreadyExists(_)) => {}
        Err(e) => anyhow::bail!("creating namespace {TAPESTRY_NAMESPACE}: {e}"),
    }
    for c in components() {
        let subjects = vec![c.subject.clone()];
        let role = json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRole",
            "metadata": bootstrap_meta(c.role, json!({})), "rules": c.cluster,
        });
        reconcile(api, "clusterroles", None, role).await?;
        reconcile(
            api,
            "clusterrolebindings",
            None,
            binding(
                "ClusterRoleBinding",
                c.role,
                "ClusterRole",
                subjects.clone(),
            ),
        )
        .await?;
        if !c.local.is_empty() {
            let mut role = json!({
                "apiVersion": format!("{GROUP}/v1"), "kind": "Role",
                "metadata": bootstrap_meta(c.role, json!({})), "rules": c.local,
            });
            role["metadata"]["namespace"] = json!(TAPESTRY_NAMESPACE);
            reconcile(api, "roles", Some(TAPESTRY_NAMESPACE), role).await?;
            let mut b = binding("RoleBinding", c.role, "Role", subjects);
            b["metadata"]["namespace"] = json!(TAPESTRY_NAMESPACE);
            reconcile(api, "rolebindings", Some(TAPESTRY_NAMESPACE), b).await?;
        }
    }
    Ok(())
}

/// Older clusters bound `system:node` to every node; the Node authorizer
/// now decides what each node may do, and that binding would let any node
/// read every Secret.
async fn unbind_nodes_from_node_role(api: &Api) -> Result<()> {
    let req = api
        .internal_request(
            GROUP,
            "v1",
            "clusterrolebindings",
            None,
            Some("system:node"),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let nodes = json!({"apiGroup": GROUP, "kind": "Group", "name": NODES});
    let result = api
        .update_object(&req, |stored| {
            let subjects = stored["subjects"].as_array().cloned().unwrap_or_default();
            if !subjects.contains(&nodes) {
                return Ok(None);
            }
            let mut new = stored.clone();
            new["subjects"] = json!(subjects
                .into_iter()
                .filter(|s| *s != nodes)
                .collect::<Vec<_>>());
            Ok(Some(new))
        })
        .await;
    match result {
        Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
        Err(e) => anyhow::bail!("unbinding nodes from system:node: {e}"),
    }
}

fn binding(kind: &str, name: &str, role_kind: &str, subjects: Vec<Value>) -> Value {
    json!({
        "apiVersion": format!("{GROUP}/v1"), "kind": kind,
        "metadata": bootstrap_meta(name, json!({})),
        "roleRef": {"apiGroup": GROUP, "kind": role_kind, "name": name},
        "subjects": subjects,
    })
}

/// Create `want`, or add to the stored object what it lacks of `want`'s
/// rules (roles) or subjects (bindings).
async fn reconcile(api: &Api, plural: &str, namespace: Option<&str>, want: Value) -> Result<()> {
    let name = want["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    match api
        .create_internal(GROUP, "v1", plural, namespace, want.clone())
        .await
    {
        Ok(()) | Err(ApiError::AlreadyExists(_)) => {}
        Err(e) => anyhow::bail!("creating {plural} {name}: {e}"),
    }
    let req = api
        .internal_request(GROUP, "v1", plural, namespace, Some(&name))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let field = if plural.ends_with("roles") {
        "rules"
    } else {
        "subjects"
    };
    api.update_object(&req, |stored| {
        if stored.pointer(&format!(
            "/metadata/annotations/{}",
            AUTOUPDATE.replace('/', "~1")
        )) == Some(&json!("false"))
        {
            return Ok(None);
        }
        let have = stored[field].as_array().cloned().unwrap_or_default();
        let missing: Vec<Value> = want[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| !have.contains(w))
            .cloned()
            .collect();
        let aggregation_lost = want.get("aggregationRule").is_some()
            && stored.get("aggregationRule") != want.get("aggregationRule");
        if missing.is_empty() && !aggregation_lost {
            return Ok(None);
        }
        let mut new = stored.clone();
        let mut all = have;
        all.extend(missing);
        new[field] = json!(all);
        if aggregation_lost {
            new["aggregationRule"] = want["aggregationRule"].clone();
        }
        Ok(Some(new))
    })
    .await
    .map_err(|e| anyhow::anyhow!("reconciling {plural} {name}: {e}"))?;
    Ok(())
}
