//! Custom resources as users meet them: CRDs applied with the machine's
//! kubectl and served at once, their objects validated against the schema
//! (CEL rules included), patched, scaled, watched and deleted; a kube-rs
//! `CustomResource` type round-tripping through `Api<T>`; and patches of
//! every type racing status writes without a single 409.

mod common;

use std::time::{Duration, Instant};

use common::{require_kubectl, wait_for, Server};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

const CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: crontabs.stable.example.com
spec:
  group: stable.example.com
  scope: Namespaced
  names:
    plural: crontabs
    singular: crontab
    kind: CronTab
    shortNames: [ct]
  versions:
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale:
        specReplicasPath: .spec.replicas
        statusReplicasPath: .status.replicas
        labelSelectorPath: .status.labelSelector
    additionalPrinterColumns:
    - name: Spec
      type: string
      jsonPath: .spec.cronSpec
    - name: Replicas
      type: integer
      jsonPath: .spec.replicas
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          spec:
            type: object
            description: What the cron tab runs and how often.
            required: [cronSpec, image]
            x-kubernetes-validations:
            - rule: self.minReplicas <= self.replicas
              message: replicas must be at least minReplicas
            properties:
              cronSpec:
                type: string
                description: The schedule, in cron syntax.
                pattern: '^(\d+|\*)(/\d+)?(\s+(\d+|\*)(/\d+)?){4}$'
              image:
                type: string
                x-kubernetes-validations:
                - rule: self == oldSelf
                  message: image is immutable
              replicas:
                type: integer
                minimum: 0
                maximum: 100
                default: 1
              minReplicas:
                type: integer
                default: 0
              policy:
                type: string
                enum: [Allow, Forbid, Replace]
          status:
            type: object
            properties:
              replicas: {type: integer}
              labelSelector: {type: string}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: backends.stable.example.com
spec:
  group: stable.example.com
  scope: Cluster
  names:
    plural: backends
    kind: Backend
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              endpoints:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [name]
                items:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string}
                    port: {type: integer}
"#;

const CRONTAB: &str = r#"
apiVersion: stable.example.com/v1
kind: CronTab
metadata:
  name: nightly
spec:
  cronSpec: "0 3 * * *"
  image: backup:1
  replicas: 2
"#;

fn established_within(s: &Server, crd: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let out = s.kubectl(&[
            "get",
            "crd",
            crd,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ]);
        if String::from_utf8_lossy(&out.stdout) == "True" {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{crd} not established within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn crds_with_kubectl() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let started = Instant::now();
    s.ok_stdin(&["apply", "-f", "-"], CRDS);
    established_within(&s, "crontabs.stable.example.com", Duration::from_secs(1));
    established_within(&s, "backends.stable.example.com", Duration::from_secs(1));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "kubectl apply and Established took {:?}",
        started.elapsed()
    );
    let crds = s.ok(&["get", "crds"]);
    assert!(crds.contains("crontabs.stable.example.com"), "{crds}");

    // Served at once: by plural, short name and explain.
    s.ok_stdin(&["apply", "-f", "-"], CRONTAB);
    let table = s.ok(&["get", "crontabs"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "SPEC", "REPLICAS", "AGE"], "{table}");
    assert!(table.contains("nightly   0 3 * * *   2"), "{table}");
    assert!(s.ok(&["get", "ct"]).contains("nightly"));
    let explain = s.ok(&["explain", "crontab.spec"]);
    assert!(
        explain.contains("What the cron tab runs and how often."),
        "{explain}"
    );
    assert!(
        explain.contains("cronSpec\t<string> -required-"),
        "{explain}"
    );

    // Defaults appear; a second version reads the same object.
    let obj = s.ok(&["get", "ct", "nightly", "-o", "jsonpath={.spec.minReplicas}"]);
    assert_eq!(obj, "0");
    let beta = s.ok(&[
        "get",
        "crontabs.v1beta1.stable.example.com",
        "nightly",
        "-o",
        "jsonpath={.apiVersion} {.spec.image}",
    ]);
    assert_eq!(beta, "stable.example.com/v1beta1 backup:1");

    // Invalid objects are refused with the field path.
    let invalid = |patch: &str, want: &str| {
        let err = s.fails(&["patch", "ct", "nightly", "--type", "merge", "-p", patch]);
        assert!(err.contains(want), "{patch}: want {want:?}\n{err}");
    };
    invalid(
        r#"{"spec":{"replicas":"many"}}"#,
        r#"spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string""#,
    );
    invalid(
        r#"{"spec":{"policy":"Sometimes"}}"#,
        r#"spec.policy: Unsupported value: "Sometimes": supported values: "Allow", "Forbid", "Replace""#,
    );
    invalid(
        r#"{"spec":{"cronSpec":"every day"}}"#,
        r#"spec.cronSpec: Invalid value: "every day": spec.cronSpec in body should match"#,
    );
    invalid(
        r#"{"spec":{"minReplicas":5}}"#,
        r#"spec: Invalid value: "object": replicas must be at least minReplicas"#,
    );
    invalid(
        r#"{"spec":{"image":"backup:2"}}"#,
        r#"spec.image: Invalid value: "string": image is immutable"#,
    );
    invalid(
        r#"{"spec":{"cronSpec":null}}"#,
        "spec.cronSpec: Required value",
    );

    // Unknown fields: refused under --validate=strict (kubectl's default),
    // pruned with a warning under --validate=warn.
    let unknown = CRONTAB.replace("replicas: 2", "replicas: 2\n  colour: blue");
    let out = s.kubectl_stdin(&["apply", "-f", "-"], &unknown);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "strict validation passed an unknown field"
    );
    assert!(err.contains(r#"unknown field "spec.colour""#), "{err}");
    let out = s.kubectl_stdin(&["apply", "--validate=warn", "-f", "-"], &unknown);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(r#"unknown field "spec.colour""#), "{err}");
    let spec = s.ok(&["get", "ct", "nightly", "-o", "jsonpath={.spec}"]);
    assert!(!spec.contains("colour"), "pruned: {spec}");

    // Every patch type Kubernetes allows, server-side apply and scale.
    s.ok(&[
        "patch",
        "ct",
        "nightly",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"policy":"Forbid"}}"#,
    ]);
    s.ok(&[
        "patch",
        "ct",
        "nightly",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
    ]);
    let err = s.fails(&["patch", "ct", "nightly", "-p", r#"{"spec":{"replicas":4}}"#]);
    assert!(
        err.contains("UnsupportedMediaType") || err.contains("unknown format"),
        "{err}"
    );
    s.ok(&["scale", "ct", "nightly", "--replicas=5"]);
    let spec = s.ok(&[
        "get",
        "ct",
        "nightly",
        "-o",
        "jsonpath={.spec.policy} {.spec.replicas}",
    ]);
    assert_eq!(spec, "Forbid 5");
    let backend = r#"
apiVersion: stable.example.com/v1
kind: Backend
metadata:
  name: api
spec:
  endpoints:
  - name: a
    port: 80
"#;
    s.ok_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=team-a",
            "-f",
            "-",
        ],
        backend,
    );
    let other = backend.replace("name: a\n    port: 80", "name: b\n    port: 81");
    s.ok_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "-f",
            "-",
        ],
        &other,
    );
    let endpoints = s.ok(&[
        "get",
        "backend",
        "api",
        "-o",
        "jsonpath={.spec.endpoints[*].name}",
    ]);
    assert_eq!(endpoints, "a b", "map-list items merge by key");
    let clash = backend.replace("port: 80", "port: 8080");
    let out = s.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "-f",
            "-",
        ],
        &clash,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("conflict"), "{err}");

    // Watches see changes.
    let mut watch = s
        .kubectl_cmd(&["get", "ct", "-w", "--output-watch-events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl get -w");
    std::thread::sleep(Duration::from_millis(500));
    s.ok(&[
        "patch",
        "ct",
        "nightly",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"policy":"Replace"}}"#,
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("watch output");
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.contains("ADDED") && events.contains("MODIFIED"),
        "{events}"
    );

    // Deleting the CRD deletes its objects and its discovery entry;
    // created again, it starts empty.
    s.ok(&["delete", "crd", "crontabs.stable.example.com"]);
    wait_for(10, "the CRD to go", || {
        let out = s.kubectl(&["get", "crd", "crontabs.stable.example.com"]);
        (!out.status.success()).then_some(())
    });
    let resources = s.ok(&["api-resources", "--api-group=stable.example.com"]);
    assert!(!resources.contains("crontabs"), "{resources}");
    assert!(resources.contains("backends"), "{resources}");
    s.ok_stdin(&["apply", "-f", "-"], CRDS);
    established_within(&s, "crontabs.stable.example.com", Duration::from_secs(1));
    let out = s.ok(&["get", "crontabs", "-o", "name"]);
    assert_eq!(out.trim(), "", "a recreated CRD starts empty");
}

/// A kube-rs operator's type, as an operator author writes it.
#[derive(kube::CustomResource, Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[kube(
    group = "ops.example.com",
    version = "v1",
    kind = "Database",
    namespaced,
    status = "DatabaseStatus",
    shortname = "db"
)]
struct DatabaseSpec {
    engine: String,
    storage_gb: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
struct DatabaseStatus {
    ready: bool,
}

async fn client(s: &Server) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(s.kubeconfig()).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(cfg).expect("client")
}

#[test]
fn kube_rs_custom_resource_round_trip() {
    let s = Server::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = client(&s).await;
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        crds.create(&PostParams::default(), &Database::crd())
            .await
            .expect("create the CRD");
        let started = Instant::now();
        loop {
            let crd = crds.get("databases.ops.example.com").await.expect("get CRD");
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "not established in 1s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let dbs: Api<Database> = Api::namespaced(client.clone(), "default");
        let mut events = watcher(dbs.clone(), watcher::Config::default()).boxed();
        let db = Database::new("orders", DatabaseSpec { engine: "postgres".into(), storage_gb: 20 });
        let created = dbs.create(&PostParams::default(), &db).await.expect("create");
        assert_eq!(created.spec.storage_gb, 20);
        let listed = dbs.list(&Default::default()).await.expect("list");
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].spec.engine, "postgres");

        let status = serde_json::json!({"status": {"ready": true}});
        let patched = dbs
            .patch_status("orders", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch status");
        assert!(patched.status.expect("status").ready);
        let applied = serde_json::json!({"apiVersion": "ops.example.com/v1", "kind": "Database",
            "spec": {"engine": "postgres", "storage_gb": 40}});
        let applied = dbs
            .patch("orders", &PatchParams::apply("db-operator").force(), &Patch::Apply(&applied))
            .await
            .expect("server-side apply");
        assert_eq!(applied.spec.storage_gb, 40);
        assert!(applied.status.expect("status kept").ready);

        // The watch saw the object arrive and change.
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            let mut sizes = Vec::new();
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(db) | watcher::Event::InitApply(db)) = event {
                    sizes.push(db.spec.storage_gb);
                    if db.spec.storage_gb == 40 {
                        return sizes;
                    }
                }
            }
            sizes
        })
        .await
        .expect("watch events in time");
        assert_eq!(seen.last(), Some(&40), "{seen:?}");
    });
}

/// Patches without a resourceVersion are reapplied to the latest object
/// when a status write got in between, as kube-apiserver's update loop
/// does: none of them may fail with 409 Conflict.
#[test]
fn patches_race_status_writes_without_conflicts() {
    let s = Server::start_with(&["--no-controllers", "--no-scheduler"]);
    s.ok_stdin(&["apply", "-f", "-"], CRDS);
    established_within(&s, "crontabs.stable.example.com", Duration::from_secs(2));
    s.ok_stdin(&["apply", "-f", "-"], CRONTAB);
    s.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: busybox}]
"#,
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = client(&s).await;
        let gvk = |group: &str, kind: &str, plural: &str| {
            kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk(group, "v1", kind),
                plural,
            )
        };
        let targets = [
            (gvk("apps", "Deployment", "deployments"), "web"),
            (gvk("stable.example.com", "CronTab", "crontabs"), "nightly"),
        ];
        for (resource, name) in &targets {
            let api: Api<kube::api::DynamicObject> =
                Api::namespaced_with(client.clone(), "default", resource);
            // A status writer that never stops while the patches run.
            let writer = {
                let api = api.clone();
                let name = name.to_string();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let status = serde_json::json!({"status": {"replicas": i % 7, "observedGeneration": i}});
                        let _ = api
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                            .await;
                    }
                })
            };
            let mut conflicts = Vec::new();
            for round in 0..40u32 {
                let value = format!("v{round}");
                let results = [
                    api.patch(name, &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"round": value}}}))).await.err(),
                    api.patch(name, &PatchParams::default(),
                        &Patch::<serde_json::Value>::Json(serde_json::from_value::<json_patch::Patch>(serde_json::json!(
                            [{"op": "add", "path": "/metadata/labels/json", "value": value}])).expect("json patch"))).await.err(),
                    api.patch(name, &PatchParams::apply("racer").force(),
                        &Patch::Apply(serde_json::json!({"apiVersion": resource.api_version, "kind": resource.kind,
                            "metadata": {"name": name, "annotations": {"applied": value}}}))).await.err(),
                    api.patch_scale(name, &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"spec": {"replicas": round % 5}}))).await.err(),
                    api.patch_status(name, &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"status": {"observedGeneration": 1000 + round}}))).await.err(),
                ];
                for e in results.into_iter().flatten() {
                    conflicts.push(format!("{}: {e}", resource.kind));
                }
            }
            writer.abort();
            assert!(conflicts.is_empty(), "patches failed: {conflicts:#?}");
        }
    });
}

const WIDGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: NAME
spec:
  group: shared.example.com
  scope: Namespaced
  names: {plural: PLURAL, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

fn widget_crd(plural: &str) -> String {
    WIDGETS
        .replace("NAME", &format!("{plural}.shared.example.com"))
        .replace("PLURAL", plural)
}

fn condition(s: &Server, crd: &str, kind: &str) -> String {
    s.ok(&[
        "get",
        "crd",
        crd,
        "-o",
        &format!("jsonpath={{.status.conditions[?(@.type==\"{kind}\")].status}}/{{.metadata.resourceVersion}}"),
    ])
}

/// Two servers on one etcd decide names from the stored CRDs alone: the
/// CRD that asked second for a taken kind is refused on both, and neither
/// rewrites the other's conditions.
#[test]
fn two_servers_agree_on_crd_names() {
    if !require_kubectl() {
        return;
    }
    // Declared first, so dropped after the servers that use it.
    let Some(etcd) = tapestry_store::conformance::EtcdServer::start() else {
        return;
    };
    let store = format!("--store={}", etcd.store_arg());
    let a = Server::start_with(&[store.as_str(), "--no-controllers", "--no-scheduler"]);
    a.ok_stdin(&["apply", "-f", "-"], &widget_crd("zzzs"));
    established_within(&a, "zzzs.shared.example.com", Duration::from_secs(2));
    a.ok_stdin(&["apply", "-f", "-"], &widget_crd("aaas"));
    let refused = wait_for(10, "aaas refused", || {
        let c = condition(&a, "aaas.shared.example.com", "NamesAccepted");
        c.starts_with("False/").then_some(c)
    });
    // A second server, and the first restarted, come to the same answer.
    let b = Server::start_with(&[store.as_str(), "--no-controllers", "--no-scheduler"]);
    std::thread::sleep(Duration::from_secs(1));
    for s in [&a, &b] {
        assert_eq!(
            condition(s, "aaas.shared.example.com", "NamesAccepted"),
            refused
        );
        assert!(condition(s, "zzzs.shared.example.com", "Established").starts_with("True/"));
        let out = s.kubectl_stdin(
            &["apply", "-f", "-"],
            "apiVersion: shared.example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.ok(&["get", "zzzs.shared.example.com", "w"]);
        let err = s.fails(&["get", "aaas.shared.example.com"]);
        assert!(
            err.contains("the server doesn't have a resource type"),
            "{err}"
        );
    }
    // Deleting the holder frees the kind for the other.
    a.ok(&["delete", "crd", "zzzs.shared.example.com"]);
    wait_for(10, "aaas accepted", || {
        condition(&b, "aaas.shared.example.com", "Established")
            .starts_with("True/")
            .then_some(())
    });
}

/// A CRD deleted while one of its objects is held by a finalizer goes
/// once the finalizer is removed, even across a server restart.
#[test]
fn crd_deletion_survives_a_restart() {
    if !require_kubectl() {
        return;
    }
    let mut s = Server::start_with(&["--no-controllers", "--no-scheduler"]);
    s.ok_stdin(&["apply", "-f", "-"], &widget_crd("widgets"));
    established_within(&s, "widgets.shared.example.com", Duration::from_secs(2));
    // kubectl finds the new kind through discovery, which may trail the
    // Established condition by a moment.
    wait_for(10, "a Widget created", || {
        s.kubectl_stdin(
            &["apply", "-f", "-"],
            "apiVersion: shared.example.com/v1\nkind: Widget\nmetadata: {name: held, finalizers: [example.com/hold]}\n",
        )
        .status
        .success()
        .then_some(())
    });
    s.ok(&[
        "delete",
        "crd",
        "widgets.shared.example.com",
        "--wait=false",
    ]);
    wait_for(10, "the object marked for deletion", || {
        let ts = s.ok(&[
            "get",
            "widgets.shared.example.com",
            "held",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ]);
        (!ts.is_empty()).then_some(())
    });
    s.kill();
    s.spawn();
    s.ok(&[
        "patch",
        "widgets.shared.example.com",
        "held",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    wait_for(10, "the CRD to go", || {
        (!s.kubectl(&["get", "crd", "widgets.shared.example.com"])
            .status
            .success())
        .then_some(())
    });
}

/// The garbage collector follows custom kinds: a ConfigMap owned by a
/// custom resource goes with it, and a foreground deletion of a custom
/// resource waits for its dependents, then completes.
#[test]
fn custom_resources_own_objects() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start_with(&["--no-scheduler"]);
    s.ok_stdin(&["apply", "-f", "-"], &widget_crd("widgets"));
    established_within(&s, "widgets.shared.example.com", Duration::from_secs(2));
    for name in ["background", "foreground"] {
        s.ok_stdin(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: shared.example.com/v1\nkind: Widget\nmetadata: {{name: {name}}}\n"
            ),
        );
        let uid = s.ok(&[
            "get",
            "widgets.shared.example.com",
            name,
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        s.ok_stdin(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-config\n  ownerReferences:\n  - {{apiVersion: shared.example.com/v1, kind: Widget, name: {name}, uid: {uid}}}\n"
            ),
        );
    }
    // The collector picks the new kind up before the owner goes.
    std::thread::sleep(Duration::from_secs(1));
    s.ok(&["delete", "widgets.shared.example.com", "background"]);
    wait_for(
        15,
        "the dependent of a deleted custom resource to go",
        || {
            (!s.kubectl(&["get", "configmap", "background-config"])
                .status
                .success())
            .then_some(())
        },
    );
    s.ok(&[
        "delete",
        "widgets.shared.example.com",
        "foreground",
        "--cascade=foreground",
        "--wait=false",
    ]);
    wait_for(15, "the foreground deletion to finish", || {
        let owner = s.kubectl(&["get", "widgets.shared.example.com", "foreground"]);
        let dependent = s.kubectl(&["get", "configmap", "foreground-config"]);
        (!owner.status.success() && !dependent.status.success()).then_some(())
    });
}
