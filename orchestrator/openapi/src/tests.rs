use super::*;
use tapestry_apimachinery::{FieldKind, ListType, PatchStrategy};

fn res(
    group: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    subresources: &[&str],
    definition: &str,
) -> ResourceInfo {
    let verbs = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    ResourceInfo {
        group: group.into(),
        version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
        namespaced,
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        subresources: subresources.iter().map(|s| s.to_string()).collect(),
        definition: definition.into(),
        strategic_merge: true,
    }
}

/// The resources the API server serves.
pub(crate) fn served() -> Vec<ResourceInfo> {
    let mut binding = res(
        "",
        "Binding",
        "bindings",
        true,
        &[],
        "io.k8s.api.core.v1.Binding",
    );
    binding.verbs = vec!["create".into()];
    vec![
        res(
            "",
            "Namespace",
            "namespaces",
            false,
            &["status", "finalize"],
            "io.k8s.api.core.v1.Namespace",
        ),
        res(
            "",
            "Node",
            "nodes",
            false,
            &["status", "proxy"],
            "io.k8s.api.core.v1.Node",
        ),
        res(
            "",
            "Pod",
            "pods",
            true,
            &[
                "status",
                "binding",
                "eviction",
                "log",
                "exec",
                "attach",
                "portforward",
                "ephemeralcontainers",
            ],
            "io.k8s.api.core.v1.Pod",
        ),
        res(
            "",
            "Service",
            "services",
            true,
            &["status"],
            "io.k8s.api.core.v1.Service",
        ),
        res(
            "",
            "Endpoints",
            "endpoints",
            true,
            &[],
            "io.k8s.api.core.v1.Endpoints",
        ),
        res(
            "",
            "ConfigMap",
            "configmaps",
            true,
            &[],
            "io.k8s.api.core.v1.ConfigMap",
        ),
        res(
            "",
            "Secret",
            "secrets",
            true,
            &[],
            "io.k8s.api.core.v1.Secret",
        ),
        res(
            "",
            "ServiceAccount",
            "serviceaccounts",
            true,
            &["token"],
            "io.k8s.api.core.v1.ServiceAccount",
        ),
        res("", "Event", "events", true, &[], "io.k8s.api.core.v1.Event"),
        binding,
        res(
            "apps",
            "Deployment",
            "deployments",
            true,
            &["status", "scale"],
            "io.k8s.api.apps.v1.Deployment",
        ),
        res(
            "apps",
            "ReplicaSet",
            "replicasets",
            true,
            &["status", "scale"],
            "io.k8s.api.apps.v1.ReplicaSet",
        ),
        res(
            "apps",
            "DaemonSet",
            "daemonsets",
            true,
            &["status"],
            "io.k8s.api.apps.v1.DaemonSet",
        ),
        res(
            "coordination.k8s.io",
            "Lease",
            "leases",
            true,
            &[],
            "io.k8s.api.coordination.v1.Lease",
        ),
        res(
            "discovery.k8s.io",
            "EndpointSlice",
            "endpointslices",
            true,
            &[],
            "io.k8s.api.discovery.v1.EndpointSlice",
        ),
        res(
            "events.k8s.io",
            "Event",
            "events",
            true,
            &[],
            "io.k8s.api.events.v1.Event",
        ),
    ]
}

fn built() -> OpenApi {
    OpenApi::new(&served()).expect("builds")
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "kind": kind, "version": version})
}

#[test]
fn v2_document_structure() {
    let doc = parse(built().v2_json());
    assert_eq!(doc["swagger"], "2.0");
    let defs = doc["definitions"].as_object().unwrap();
    let deployment = &defs["io.k8s.api.apps.v1.Deployment"];
    assert!(deployment["description"]
        .as_str()
        .unwrap()
        .contains("Deployment"));
    assert_eq!(
        deployment["x-kubernetes-group-version-kind"],
        json!([gvk("apps", "v1", "Deployment")])
    );
    assert_eq!(
        defs["io.k8s.api.apps.v1.DeploymentList"]["x-kubernetes-group-version-kind"],
        json!([gvk("apps", "v1", "DeploymentList")])
    );
    assert_eq!(
        defs["io.k8s.apimachinery.pkg.apis.meta.v1.Status"]["x-kubernetes-group-version-kind"],
        json!([gvk("", "v1", "Status")])
    );
    assert_eq!(
        defs["io.k8s.api.autoscaling.v1.Scale"]["x-kubernetes-group-version-kind"],
        json!([gvk("autoscaling", "v1", "Scale")])
    );
    let replicas = &defs["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["replicas"];
    assert!(replicas["description"]
        .as_str()
        .unwrap()
        .contains("desired pods"));
    let containers = &defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
    assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
    assert_eq!(containers["x-kubernetes-patch-strategy"], "merge");
    assert_eq!(containers["x-kubernetes-list-type"], "map");

    let item = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"];
    let patch = &item["patch"];
    assert_eq!(patch["x-kubernetes-action"], "patch");
    assert_eq!(
        patch["x-kubernetes-group-version-kind"],
        gvk("apps", "v1", "Deployment")
    );
    assert_eq!(patch["operationId"], "patchAppsV1NamespacedDeployment");
    let names: Vec<&str> = patch["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["body", "dryRun", "fieldManager", "fieldValidation", "force"] {
        assert!(names.contains(&p), "{p} in {names:?}");
    }
    assert!(patch["consumes"]
        .as_array()
        .unwrap()
        .contains(&json!("application/strategic-merge-patch+json")));
    assert_eq!(item["get"]["operationId"], "readAppsV1NamespacedDeployment");
    assert_eq!(
        doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"]["put"]
            ["x-kubernetes-group-version-kind"],
        gvk("autoscaling", "v1", "Scale")
    );
    assert_eq!(
        doc["paths"]["/api/v1/pods"]["get"]["operationId"],
        "listCoreV1PodForAllNamespaces"
    );
    assert_eq!(
        doc["paths"]["/api/v1/namespaces/{namespace}/bindings"]["post"]["operationId"],
        "createCoreV1NamespacedBinding"
    );
    assert!(doc["paths"]["/api/v1/namespaces/{namespace}/bindings/{name}"].is_null());
    assert_eq!(
        doc["paths"]["/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"]["get"]
            ["operationId"],
        "listCoordinationV1NamespacedLease"
    );
}

/// Every `$ref` in `doc` names something under `prefix`.
fn assert_refs_resolve(doc: &Value, schemas: &Map<String, Value>, prefix: &str, what: &str) {
    let mut refs = Vec::new();
    collect_all_refs(doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{what}: ref {r} not under {prefix}"));
        assert!(schemas.contains_key(name), "{what}: dangling ref {r}");
    }
}

fn collect_all_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    out.push(v.as_str().expect("string ref"));
                } else {
                    collect_all_refs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_all_refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves() {
    let api = built();
    let v2 = parse(api.v2_json());
    assert_refs_resolve(
        &v2,
        v2["definitions"].as_object().unwrap(),
        "#/definitions/",
        "v2",
    );
    for gv in api.v3_paths() {
        let doc = parse(api.v3_group_version_json(gv).unwrap());
        assert_refs_resolve(
            &doc,
            doc["components"]["schemas"].as_object().unwrap(),
            "#/components/schemas/",
            gv,
        );
        // OpenAPI 3.0 ignores siblings of `$ref`; none may be left.
        let mut stack = vec![&doc];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(m) => {
                    assert!(
                        !m.contains_key("$ref") || m.len() == 1,
                        "{gv}: $ref with siblings: {v}"
                    );
                    stack.extend(m.values());
                }
                Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }
    }
}

#[test]
fn v3_index_and_documents() {
    let api = built();
    let index = parse(api.v3_index_json());
    let paths = index["paths"].as_object().unwrap();
    let mut keys: Vec<&str> = paths.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "api/v1",
            "apis/apps/v1",
            "apis/coordination.k8s.io/v1",
            "apis/discovery.k8s.io/v1",
            "apis/events.k8s.io/v1"
        ]
    );
    for (gv, entry) in paths {
        let url = entry["serverRelativeURL"].as_str().unwrap();
        let hash = api.v3_hash(gv).unwrap();
        assert_eq!(url, format!("/openapi/v3/{gv}?hash={hash}"));
        assert_eq!(hash, hex_sha256(api.v3_group_version_json(gv).unwrap()));
    }
    assert!(api.v3_group_version_json("apis/batch/v1").is_none());

    let apps = parse(api.v3_group_version_json("apis/apps/v1").unwrap());
    assert_eq!(apps["openapi"], "3.0.0");
    let schemas = apps["components"]["schemas"].as_object().unwrap();
    let deployment = &schemas["io.k8s.api.apps.v1.Deployment"];
    assert_eq!(
        deployment["x-kubernetes-group-version-kind"],
        json!([gvk("apps", "v1", "Deployment")])
    );
    // A described reference is wrapped for 3.0.
    let spec = &deployment["properties"]["spec"];
    assert_eq!(
        spec["allOf"],
        json!([{"$ref": "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"}])
    );
    assert!(spec["description"].is_string());
    let strategy = &schemas["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["strategy"];
    assert_eq!(strategy["x-kubernetes-patch-strategy"], "retainKeys");
    // Only what the group version uses.
    assert!(!schemas.contains_key("io.k8s.api.coordination.v1.Lease"));
    assert!(schemas.contains_key("io.k8s.api.core.v1.PodSpec"));
    assert!(apps["paths"]["/api/v1/pods"].is_null());

    let core = parse(api.v3_group_version_json("api/v1").unwrap());
    assert!(core["paths"]["/apis/apps/v1/deployments"].is_null());
    assert!(core["paths"]["/api/v1/"]["get"].is_object());
}

#[test]
fn v3_write_operations_carry_field_validation() {
    let api = built();
    let mut patches = 0;
    for gv in api.v3_paths() {
        let doc = parse(api.v3_group_version_json(gv).unwrap());
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["post", "put", "patch"] {
                let op = &item[method];
                // Only operations with an object body (not connect streams).
                if op.is_null() || op["requestBody"].is_null() {
                    continue;
                }
                let has = op["parameters"].as_array().unwrap().iter().any(|p| {
                    p["name"] == "fieldValidation"
                        && p["in"] == "query"
                        && p["schema"]["type"] == "string"
                });
                assert!(has, "{method} {path} lacks fieldValidation");
                assert!(
                    op["x-kubernetes-group-version-kind"].is_object(),
                    "{method} {path}"
                );
                if method == "patch" {
                    patches += 1;
                    let content = op["requestBody"]["content"].as_object().unwrap();
                    assert!(content.contains_key("application/apply-patch+yaml"));
                }
            }
        }
    }
    assert!(patches > 20, "{patches}");
}

fn field(api: &OpenApi, t: &str, f: &str) -> FieldSchema {
    api.field(t, f)
        .unwrap_or_else(|| panic!("{t}.{f}"))
        .into_owned()
}

fn object(name: &str) -> FieldKind {
    FieldKind::Object {
        type_name: name.into(),
    }
}

fn list(item: FieldKind, list_type: ListType) -> FieldKind {
    FieldKind::List {
        item: Box::new(item),
        list_type,
    }
}

fn keys(k: &[&str]) -> ListType {
    ListType::Map {
        keys: k.iter().map(|k| k.to_string()).collect(),
    }
}

#[test]
fn patch_schema_resolves_fields() {
    let api = built();
    let containers = field(&api, "io.k8s.api.core.v1.PodSpec", "containers");
    assert_eq!(
        containers.kind,
        list(object("io.k8s.api.core.v1.Container"), keys(&["name"]))
    );
    assert_eq!(containers.patch_merge_key.as_deref(), Some("name"));
    assert_eq!(containers.patch_strategies, [PatchStrategy::Merge]);

    let volumes = field(&api, "io.k8s.api.core.v1.PodSpec", "volumes");
    assert_eq!(
        volumes.patch_strategies,
        [PatchStrategy::Merge, PatchStrategy::RetainKeys]
    );
    assert_eq!(
        volumes.kind,
        list(object("io.k8s.api.core.v1.Volume"), keys(&["name"]))
    );

    let ports = field(&api, "io.k8s.api.core.v1.Container", "ports");
    assert_eq!(ports.patch_merge_key.as_deref(), Some("containerPort"));
    assert_eq!(
        ports.kind,
        list(
            object("io.k8s.api.core.v1.ContainerPort"),
            keys(&["containerPort", "protocol"])
        )
    );
    let svc_ports = field(&api, "io.k8s.api.core.v1.ServiceSpec", "ports");
    assert_eq!(
        svc_ports.kind,
        list(
            object("io.k8s.api.core.v1.ServicePort"),
            keys(&["port", "protocol"])
        )
    );
    assert_eq!(
        field(&api, "io.k8s.api.core.v1.Container", "env")
            .patch_merge_key
            .as_deref(),
        Some("name")
    );
    assert_eq!(
        field(&api, "io.k8s.api.core.v1.Container", "volumeMounts")
            .patch_merge_key
            .as_deref(),
        Some("mountPath")
    );
    assert_eq!(
        field(&api, "io.k8s.api.core.v1.Container", "command").kind,
        list(FieldKind::Scalar, ListType::Atomic)
    );

    let finalizers = field(
        &api,
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
    );
    assert_eq!(finalizers.kind, list(FieldKind::Scalar, ListType::Set));
    assert_eq!(finalizers.patch_strategies, [PatchStrategy::Merge]);
    let owners = field(
        &api,
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
    );
    assert_eq!(owners.patch_merge_key.as_deref(), Some("uid"));
    let labels = field(
        &api,
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "labels",
    );
    assert_eq!(
        labels.kind,
        FieldKind::Map {
            value: Box::new(FieldKind::Scalar)
        }
    );
    assert_eq!(
        field(
            &api,
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
            "creationTimestamp"
        )
        .kind,
        FieldKind::Scalar
    );
    // Quantity values are scalars.
    assert_eq!(
        field(&api, "io.k8s.api.core.v1.ResourceRequirements", "limits").kind,
        FieldKind::Map {
            value: Box::new(FieldKind::Scalar)
        }
    );

    let strategy = field(&api, "io.k8s.api.apps.v1.DeploymentSpec", "strategy");
    assert_eq!(strategy.patch_strategies, [PatchStrategy::RetainKeys]);
    assert_eq!(
        strategy.kind,
        object("io.k8s.api.apps.v1.DeploymentStrategy")
    );
    assert_eq!(
        field(&api, "io.k8s.api.apps.v1.Deployment", "spec").kind,
        object("io.k8s.api.apps.v1.DeploymentSpec")
    );
    let conditions = field(&api, "io.k8s.api.apps.v1.DeploymentStatus", "conditions");
    assert_eq!(
        conditions.kind,
        list(
            object("io.k8s.api.apps.v1.DeploymentCondition"),
            keys(&["type"])
        )
    );
    let addresses = field(&api, "io.k8s.api.core.v1.NodeStatus", "addresses");
    assert_eq!(addresses.patch_merge_key.as_deref(), Some("type"));
    let host_ips = field(&api, "io.k8s.api.core.v1.PodStatus", "hostIPs");
    assert_eq!(
        host_ips.kind,
        list(object("io.k8s.api.core.v1.HostIP"), ListType::Atomic)
    );
    assert_eq!(host_ips.patch_merge_key.as_deref(), Some("ip"));

    let items = field(&api, "io.k8s.api.apps.v1.DeploymentList", "items");
    assert_eq!(
        items.kind,
        list(object("io.k8s.api.apps.v1.Deployment"), ListType::Atomic)
    );
    assert!(api.field("io.k8s.api.core.v1.PodSpec", "nope").is_none());
    assert!(api.field("io.example.Nope", "spec").is_none());
}

/// Every row of the extension table names a real field of the right shape,
/// checked against all built-in types (not only the served ones).
#[test]
fn extension_table_matches_the_types() {
    let mut generator = generator();
    for name in registry::builtin_names() {
        assert!(registry::generate_builtin(&mut generator, &name));
    }
    let defs = generator.take_definitions(false);
    for (short, field, ext) in extensions::TABLE {
        let name = extensions::full_name(short);
        let def = defs.get(&name).unwrap_or_else(|| panic!("no type {name}"));
        if field.is_empty() {
            assert_eq!(def["type"], "object", "{name}");
            assert!(ext.list_type.is_none() && ext.merge_key.is_none(), "{name}");
            continue;
        }
        let prop = &def["properties"][*field];
        assert!(prop.is_object(), "no field {name}.{field}");
        if ext.list_type.is_some() || ext.merge_key.is_some() {
            assert_eq!(prop["type"], "array", "{name}.{field}");
        }
        if ext.map_type.is_some() || ext.strategy == Some("retainKeys") {
            assert!(
                prop["type"] == "object" || prop["$ref"].is_string(),
                "{name}.{field}"
            );
        }
        // Map keys are fields of the items.
        if !ext.map_keys.is_empty() {
            let item = prop["items"]["$ref"]
                .as_str()
                .unwrap()
                .trim_start_matches("#/definitions/");
            for key in ext.map_keys.iter().chain(ext.merge_key.iter()) {
                assert!(
                    defs[item]["properties"][*key].is_object(),
                    "{name}.{field}: {item}.{key}"
                );
            }
        }
    }
}

/// Every default names a real scalar field of a built-in type.
#[test]
fn default_table_matches_the_types() {
    let mut generator = generator();
    for name in registry::builtin_names() {
        assert!(registry::generate_builtin(&mut generator, &name));
    }
    let defs = generator.take_definitions(false);
    for (short, field, _) in extensions::DEFAULTS {
        let name = extensions::full_name(short);
        let prop = &defs[&name]["properties"][*field];
        assert_eq!(prop["type"], "string", "{name}.{field}");
    }
}

#[test]
fn patch_schema_knows_defaults_and_atomic_maps() {
    let api = built();
    const CORE: &str = "io.k8s.api.core.v1.";
    const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.";
    for t in [
        "io.k8s.api.core.v1.ContainerPort",
        "io.k8s.api.core.v1.ServicePort",
        "io.k8s.api.core.v1.EndpointPort",
        "io.k8s.api.discovery.v1.EndpointPort",
    ] {
        assert_eq!(api.field_default(t, "protocol"), Some(json!("TCP")), "{t}");
    }
    assert_eq!(
        api.field_default(&format!("{CORE}ContainerPort"), "containerPort"),
        None
    );
    assert_eq!(api.field_default(&format!("{CORE}Nope"), "protocol"), None);
    // The documents publish the defaults too, as Kubernetes' do.
    let v2 = parse(api.v2_json());
    assert_eq!(
        v2["definitions"]["io.k8s.api.core.v1.ContainerPort"]["properties"]["protocol"]["default"],
        "TCP"
    );
    let v3 = parse(api.v3_group_version_json("api/v1").unwrap());
    assert_eq!(
        v3["components"]["schemas"]["io.k8s.api.core.v1.ServicePort"]["properties"]["protocol"]
            ["default"],
        "TCP"
    );

    for t in [
        format!("{META}LabelSelector"),
        format!("{META}OwnerReference"),
        format!("{CORE}ObjectReference"),
        format!("{CORE}LocalObjectReference"),
        format!("{CORE}NodeSelector"),
        "io.k8s.api.discovery.v1.EndpointPort".to_string(),
    ] {
        assert!(api.atomic_type(&t), "{t}");
    }
    for t in [
        format!("{META}ObjectMeta"),
        format!("{CORE}PodSpec"),
        format!("{CORE}ServiceSpec"),
        "io.example.Nope".to_string(),
    ] {
        assert!(!api.atomic_type(&t), "{t}");
    }

    // Atomic map fields: the map kind is kept (strategic merge patch still
    // merges them) and the flag tells apply to own them whole.
    let string_map = FieldKind::Map {
        value: Box::new(FieldKind::Scalar),
    };
    for (t, f) in [("ServiceSpec", "selector"), ("PodSpec", "nodeSelector")] {
        let fs = field(&api, &format!("{CORE}{t}"), f);
        assert!(fs.atomic, "{t}.{f}");
        assert_eq!(fs.kind, string_map, "{t}.{f}");
    }
    assert!(!field(&api, &format!("{META}ObjectMeta"), "labels").atomic);
    assert!(!field(&api, &format!("{CORE}PodSpec"), "containers").atomic);
    // A field of an atomic type is not itself marked; the type is.
    assert!(!field(&api, "io.k8s.api.apps.v1.DeploymentSpec", "selector").atomic);
}

#[test]
fn custom_atomic_markers_are_honoured() {
    let mut r = served();
    r.push(res(
        "tapestry.io",
        "TapPolicy",
        "tappolicies",
        true,
        &[],
        "io.tapestry.v1.TapPolicy",
    ));
    let api = OpenApi::builder()
        .definition(
            "io.tapestry.v1.TapPolicy",
            json!({
                "type": "object",
                "properties": {
                    "match": {"type": "object", "additionalProperties": {"type": "string"}, "x-kubernetes-map-type": "atomic"},
                    "target": {"type": "object", "properties": {"name": {"type": "string", "default": "all"}}, "x-kubernetes-map-type": "atomic"},
                },
            }),
        )
        .build(&r)
        .unwrap();
    assert!(field(&api, "io.tapestry.v1.TapPolicy", "match").atomic);
    assert!(field(&api, "io.tapestry.v1.TapPolicy", "target").atomic);
    assert!(api.atomic_type("io.tapestry.v1.TapPolicy.target"));
    assert_eq!(
        api.field_default("io.tapestry.v1.TapPolicy.target", "name"),
        Some(json!("all"))
    );
}

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T00:01:00Z";

fn deployment(match_labels: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": match_labels},
            "template": {"metadata": {"labels": {"app": "web", "tier": "front"}},
                         "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
        }
    })
}

fn conflict_paths(err: tapestry_apimachinery::ApplyError) -> Vec<String> {
    match err {
        tapestry_apimachinery::ApplyError::Conflicts(cs) => {
            cs.into_iter().map(|c| c.path).collect()
        }
        other => panic!("{other}"),
    }
}

/// Server-side apply through the real schema: `LabelSelector` is atomic, so
/// a selector is one owned value, replaced (not merged) by the next apply.
#[test]
fn apply_replaces_atomic_label_selector() {
    use tapestry_apimachinery::{apply, owned_paths, record_update};
    let api = built();
    const DEPLOY: &str = "io.k8s.api.apps.v1.Deployment";
    let mut live = deployment(json!({"app": "web"}));
    record_update(None, &mut live, "creator", &api, DEPLOY, T0);

    let cfg = deployment(json!({"tier": "front"}));
    let err = apply(Some(&live), &cfg, "mgr", false, &api, DEPLOY, T1).unwrap_err();
    assert_eq!(conflict_paths(err), [".spec.selector"]);

    let obj = apply(Some(&live), &cfg, "mgr", true, &api, DEPLOY, T1).unwrap();
    // Merged field by field this would be {app: web, tier: front}.
    assert_eq!(
        obj["spec"]["selector"],
        json!({"matchLabels": {"tier": "front"}})
    );
    let owned = owned_paths(&obj, "mgr");
    assert!(owned.contains(&".spec.selector".to_string()), "{owned:?}");
    assert!(!owned.iter().any(|p| p.starts_with(".spec.selector.")));
    assert!(!owned_paths(&obj, "creator").contains(&".spec.selector".to_string()));
}

fn service(selector: Value, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": selector, "ports": ports}
    })
}

/// `ServiceSpec.selector` is an atomic map field, and a port without
/// `protocol` is keyed by the schema default, matching the live TCP port.
#[test]
fn apply_service_atomic_selector_and_defaulted_port_keys() {
    use tapestry_apimachinery::{apply, owned_paths, record_update};
    let api = built();
    const SVC: &str = "io.k8s.api.core.v1.Service";
    // As stored after defaulting: the port has its protocol.
    let mut live = service(
        json!({"app": "web"}),
        json!([{"port": 80, "protocol": "TCP"}]),
    );
    record_update(None, &mut live, "creator", &api, SVC, T0);

    let cfg = service(
        json!({"tier": "front"}),
        json!([{"port": 80, "targetPort": 8080}]),
    );
    let err = apply(Some(&live), &cfg, "mgr", false, &api, SVC, T1).unwrap_err();
    // The port is the live item (same key) and targetPort is new, so the
    // selector, contested as a whole, is the only conflict.
    assert_eq!(conflict_paths(err), [".spec.selector"]);

    let obj = apply(Some(&live), &cfg, "mgr", true, &api, SVC, T1).unwrap();
    assert_eq!(obj["spec"]["selector"], json!({"tier": "front"}));
    assert_eq!(
        obj["spec"]["ports"],
        json!([{"port": 80, "protocol": "TCP", "targetPort": 8080}])
    );
    let owned = owned_paths(&obj, "mgr");
    for p in [
        ".spec.selector",
        ".spec.ports[port=80,protocol=\"TCP\"]",
        ".spec.ports[port=80,protocol=\"TCP\"].targetPort",
    ] {
        assert!(owned.contains(&p.to_string()), "{p} not in {owned:?}");
    }
    assert!(!owned.iter().any(|p| p.starts_with(".spec.selector.")));
}

#[test]
fn unknown_inputs_are_errors() {
    let mut r = served();
    r[0].definition = "io.example.v1.Nope".into();
    assert_eq!(
        OpenApi::new(&r).unwrap_err(),
        Error::UnknownDefinition("io.example.v1.Nope".into())
    );
    let mut r = served();
    r[0].subresources.push("frobnicate".into());
    assert!(matches!(
        OpenApi::new(&r),
        Err(Error::UnknownSubresource(_))
    ));
}

#[test]
fn extra_definitions_are_served() {
    let mut r = served();
    r.push(res(
        "tapestry.io",
        "TapPolicy",
        "tappolicies",
        true,
        &["status"],
        "io.tapestry.v1.TapPolicy",
    ));
    let api = OpenApi::builder()
        .definition(
            "io.tapestry.v1.TapPolicy",
            json!({
                "description": "A tap policy.",
                "type": "object",
                "properties": {
                    "metadata": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                    "spec": {
                        "type": "object",
                        "properties": {"tools": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}},
                    },
                },
            }),
        )
        .build(&r)
        .unwrap();
    let doc = parse(api.v3_group_version_json("apis/tapestry.io/v1").unwrap());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert_eq!(
        schemas["io.tapestry.v1.TapPolicy"]["x-kubernetes-group-version-kind"],
        json!([gvk("tapestry.io", "v1", "TapPolicy")])
    );
    assert!(schemas.contains_key("io.tapestry.v1.TapPolicyList"));
    assert!(schemas.contains_key("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"));
    assert_eq!(
        doc["paths"]["/apis/tapestry.io/v1/namespaces/{namespace}/tappolicies/{name}"]["patch"]
            ["operationId"],
        "patchTapestryIoV1NamespacedTapPolicy"
    );
    // Inline object schemas are indexed under a derived name.
    let spec = field(&api, "io.tapestry.v1.TapPolicy", "spec");
    assert_eq!(spec.kind, object("io.tapestry.v1.TapPolicy.spec"));
    assert_eq!(
        field(&api, "io.tapestry.v1.TapPolicy.spec", "tools").kind,
        list(FieldKind::Scalar, ListType::Set)
    );
}

#[test]
fn builds_quickly() {
    let resources = served();
    let start = std::time::Instant::now();
    let api = OpenApi::new(&resources).unwrap();
    let elapsed = start.elapsed();
    eprintln!("built in {elapsed:?}, v2 {} bytes", api.v2_json().len());
    for gv in api.v3_paths() {
        eprintln!(
            "v3 {gv}: {} bytes",
            api.v3_group_version_json(gv).unwrap().len()
        );
    }
    // Generous: unoptimized test builds are several times slower than release.
    assert!(elapsed < std::time::Duration::from_secs(2), "{elapsed:?}");
}

/// A type with a schemars schema, the way Tapestry's own resources get one.
struct Probe;

impl JsonSchema for Probe {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "io.tapestry.v1.Probe".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> k8s_openapi::schemars::Schema {
        let meta = generator
            .subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>()
            .to_value();
        k8s_openapi::schemars::json_schema!({
            "description": "A probe.",
            "type": "object",
            "properties": {
                "metadata": {"anyOf": [meta, {"type": "null"}], "description": "Metadata."},
                "note": {"type": ["string", "null"]},
                "ports": {"type": ["array", "null"], "items": {"type": "integer"}, "x-kubernetes-list-type": "set"},
            },
        })
    }
}

#[test]
fn schemars_types_are_served_without_null_types() {
    let mut r = served();
    r.push(res(
        "tapestry.io",
        "Probe",
        "probes",
        false,
        &[],
        "io.tapestry.v1.Probe",
    ));
    let api = OpenApi::builder().schema::<Probe>().build(&r).unwrap();
    let v2 = parse(api.v2_json());
    let probe = &v2["definitions"]["io.tapestry.v1.Probe"];
    assert_eq!(
        probe["properties"]["metadata"],
        json!({"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "description": "Metadata."})
    );
    assert_eq!(probe["properties"]["note"]["type"], "string");
    assert_eq!(
        field(&api, "io.tapestry.v1.Probe", "metadata").kind,
        object("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    );
    assert_eq!(
        field(&api, "io.tapestry.v1.Probe", "ports").kind,
        list(FieldKind::Scalar, ListType::Set)
    );
    // The built-in ObjectMeta still carries its extensions.
    assert_eq!(
        field(
            &api,
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
            "ownerReferences"
        )
        .patch_merge_key
        .as_deref(),
        Some("uid")
    );
}
