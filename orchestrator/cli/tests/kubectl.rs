//! The machine's unmodified kubectl against `tapestry server`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{require_kubectl, Server};

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: demo
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata:
  name: web-secret
  namespace: demo
data:
  password: czNjcmV0
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: busybox:local
        command: ["httpd", "-f", "-p", "8080"]
        ports:
        - containerPort: 8080
        env:
        - name: GREETING
          valueFrom:
            configMapKeyRef:
              name: web-config
              key: greeting
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
"#;

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path.to_string_lossy().into_owned()
}

#[test]
fn discovery_and_health() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let version = s.ok(&["version"]);
    assert!(version.contains("Server Version: v1.33"), "{version}");
    let resources = s.ok(&["api-resources"]);
    for (name, short) in [
        ("pods", "po"),
        ("services", "svc"),
        ("deployments", "deploy"),
        ("replicasets", "rs"),
        ("replicationcontrollers", "rc"),
        ("daemonsets", "ds"),
        ("cronjobs", "cj"),
        ("namespaces", "ns"),
        ("nodes", "no"),
        ("configmaps", "cm"),
        ("endpoints", "ep"),
        ("serviceaccounts", "sa"),
        ("events", "ev"),
        ("leases", "lease"),
    ] {
        let line = resources
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from api-resources:\n{resources}"));
        assert!(line.split_whitespace().any(|w| w == short), "{line}");
    }
    assert_eq!(s.ok(&["get", "--raw", "/readyz"]), "ok");
    // `all` covers pods, services and workloads.
    s.ok(&["get", "all", "-A"]);
    let explain = s.ok(&["explain", "deployment.spec.replicas"]);
    assert!(
        explain.to_lowercase().contains("number of desired pods"),
        "{explain}"
    );
    let explain = s.ok(&["explain", "cronjob.spec.schedule"]);
    assert!(explain.contains("Cron format"), "{explain}");
}

#[test]
fn apply_is_idempotent_and_configures_changes() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let file = write(s.data_dir(), "app.yaml", APP);
    let first = s.ok(&["apply", "-f", &file]);
    for line in [
        "namespace/demo created",
        "configmap/web-config created",
        "secret/web-secret created",
        "deployment.apps/web created",
        "service/web created",
    ] {
        assert!(first.contains(line), "{first}");
    }
    let second = s.ok(&["apply", "-f", &file]);
    assert_eq!(second.matches("unchanged").count(), 5, "{second}");

    let changed = write(
        s.data_dir(),
        "app2.yaml",
        &APP.replace("replicas: 2", "replicas: 3"),
    );
    let diff = s.kubectl(&["diff", "-f", &changed]);
    // kubectl diff exits 1 when there are differences.
    assert_eq!(
        diff.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    assert!(diff_text.contains("+  replicas: 3"), "{diff_text}");
    let third = s.ok(&["apply", "-f", &changed]);
    assert!(third.contains("deployment.apps/web configured"), "{third}");
    assert!(third.contains("configmap/web-config unchanged"), "{third}");
    assert_eq!(
        s.ok(&[
            "get",
            "deploy",
            "web",
            "-n",
            "demo",
            "-o",
            "jsonpath={.spec.replicas} {.metadata.generation}"
        ]),
        "3 2"
    );

    let ssa = s.ok(&["apply", "--server-side", "-f", &changed]);
    assert!(
        ssa.contains("deployment.apps/web serverside-applied"),
        "{ssa}"
    );
    let managers = s.ok(&[
        "get",
        "deploy",
        "web",
        "-n",
        "demo",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]);
    assert!(managers.contains("kubectl"), "{managers}");

    let listing = s.ok(&["get", "deploy,svc,cm", "-n", "demo"]);
    assert!(
        listing.contains("READY   UP-TO-DATE   AVAILABLE   AGE"),
        "{listing}"
    );
    assert!(listing.contains("TYPE        CLUSTER-IP"), "{listing}");
    assert!(listing.contains("DATA   AGE"), "{listing}");
    let ip = s.ok(&[
        "get",
        "svc",
        "web",
        "-n",
        "demo",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert!(ip.starts_with("10.9"), "ClusterIP {ip:?}");
}

#[test]
fn everyday_commands() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let file = write(s.data_dir(), "app.yaml", APP);
    s.ok(&["apply", "-f", &file]);
    let ns = ["-n", "demo"];
    let with_ns = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(ns.iter())
            .map(|a| a.to_string())
            .collect()
    };
    let run = |args: &[&str]| {
        let v = with_ns(args);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        s.ok(&refs)
    };

    run(&["label", "deploy", "web", "tier=front"]);
    run(&["annotate", "deploy", "web", "owner=team-a"]);
    assert_eq!(
        run(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.labels.tier}/{.metadata.annotations.owner}"
        ]),
        "front/team-a"
    );
    assert!(
        run(&["get", "deploy", "-l", "tier=front", "-o", "name"]).contains("deployment.apps/web")
    );
    assert!(run(&["get", "deploy", "-l", "tier=back", "-o", "name"]).is_empty());

    run(&[
        "patch",
        "deploy",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"minReadySeconds":5}}"#,
    ]);
    run(&[
        "patch",
        "deploy",
        "web",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/revisionHistoryLimit","value":3}]"#,
    ]);
    run(&[
        "patch",
        "deploy",
        "web",
        "--type",
        "strategic",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:local"}]}}}}"#,
    ]);
    let names = run(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[*].name}",
    ]);
    let mut names: Vec<&str> = names.split_whitespace().collect();
    names.sort();
    assert_eq!(
        names,
        ["sidecar", "web"],
        "strategic merge keeps containers by name"
    );
    assert_eq!(
        run(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.minReadySeconds} {.spec.revisionHistoryLimit}"
        ]),
        "5 3"
    );

    run(&["scale", "deploy", "web", "--replicas=5"]);
    assert_eq!(
        run(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "5"
    );

    // kubectl edit with a non-interactive editor.
    let editor = write(
        s.data_dir(),
        "editor.sh",
        "#!/bin/sh\nsed -i 's/greeting: hello/greeting: edited/' \"$1\"\n",
    );
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = s
        .kubectl_cmd(&["edit", "cm", "web-config", "-n", "demo"])
        .env("KUBE_EDITOR", &editor)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        run(&["get", "cm", "web-config", "-o", "jsonpath={.data.greeting}"]),
        "edited"
    );

    let yaml = run(&["get", "deploy", "web", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Deployment") && yaml.contains("replicas: 5"),
        "{yaml}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(&["get", "svc", "web", "-o", "json"])).unwrap();
    assert_eq!(json["spec"]["ports"][0]["targetPort"], 8080);

    // Errors name the problem.
    let exists = s.fails(&["create", "-f", &file]);
    assert!(
        exists.contains("AlreadyExists") || exists.contains("already exists"),
        "{exists}"
    );
    let bad = write(
        s.data_dir(),
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: Bad_Name\n  namespace: demo\nspec:\n  containers:\n  - name: c\n",
    );
    let invalid = s.fails(&["create", "-f", &bad]);
    assert!(invalid.contains("metadata.name"), "{invalid}");
    assert!(invalid.contains("spec.containers[0].image"), "{invalid}");

    run(&["delete", "svc", "web"]);
    assert!(s
        .fails(&["get", "svc", "web", "-n", "demo"])
        .contains("NotFound"));
    run(&["create", "cm", "a", "--from-literal=k=v"]);
    run(&["create", "cm", "b", "--from-literal=k=v"]);
    run(&["delete", "cm", "--all"]);
    assert!(run(&["get", "cm", "-o", "name"]).is_empty());
}

#[test]
fn get_watch_prints_changes_as_they_happen() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    s.ok(&["create", "cm", "first", "--from-literal=a=1"]);
    let mut watch = s
        .kubectl_cmd(&["get", "cm", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if seen.iter().any(|l: &String| l.contains(needle)) {
                return;
            }
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push(line);
            }
        }
        panic!("watch never printed {needle:?}; saw {seen:?}");
    };
    wait_for("first");
    s.ok(&["create", "cm", "second", "--from-literal=a=1"]);
    wait_for("second");
    s.ok(&["delete", "cm", "second"]);
    wait_for("DELETED");
    let _ = watch.kill();
    let _ = watch.wait();
}

/// A kind the server does not serve gets Kubernetes' answer. kubectl
/// cannot validate such a kind on the server, so it first reads the
/// protobuf /openapi/v2 to validate on its side (and stops with "failed to
/// download openapi" without it); then mapping the kind fails.
#[test]
fn applying_an_unserved_kind_says_no_matches_for_kind() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let runtime_class = write(
        s.data_dir(),
        "runtimeclass.yaml",
        r#"
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: gvisor
handler: runsc
"#,
    );
    let mapping = format!(
        r#"resource mapping not found for name: "gvisor" namespace: "" from "{runtime_class}": no matches for kind "RuntimeClass" in version "node.k8s.io/v1""#
    );
    for args in [
        &["apply", "--dry-run=server", "-f", &runtime_class][..],
        &["apply", "-f", &runtime_class][..],
        &["create", "-f", &runtime_class][..],
    ] {
        let err = s.fails(args);
        assert!(err.contains(&mapping), "kubectl {args:?}: {err}");
        assert!(err.contains("ensure CRDs are installed first"), "{err}");
        assert!(!err.contains("openapi"), "{err}");
    }
    // A kind missing from a group that is served.
    let driver = write(
        s.data_dir(),
        "csidriver.yaml",
        "apiVersion: storage.k8s.io/v1\nkind: CSIDriver\nmetadata:\n  name: d\n",
    );
    let err = s.fails(&["apply", "-f", &driver]);
    assert!(
        err.contains(r#"no matches for kind "CSIDriver" in version "storage.k8s.io/v1""#),
        "{err}"
    );
}

/// The protobuf /openapi/v2 also carries kubectl's own validation of a
/// `List` (which it never leaves to the server) and `explain` in the v2
/// format.
#[test]
fn lists_are_validated_and_explained_with_the_v2_document() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let list = |image_field: &str| {
        format!(
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: listed
  data:
    k: v
- apiVersion: apps/v1
  kind: Deployment
  metadata:
    name: listed
  spec:
    selector:
      matchLabels: {{app: listed}}
    strategy:
      rollingUpdate: {{maxSurge: 1, maxUnavailable: "25%"}}
    template:
      metadata:
        labels: {{app: listed}}
      spec:
        containers:
        - name: web
          {image_field}: busybox
"#
        )
    };
    let bad = write(s.data_dir(), "bad-list.yaml", &list("imagez"));
    let err = s.fails(&["apply", "-f", &bad]);
    assert!(
        err.contains(r#"unknown field "imagez" in io.k8s.api.core.v1.Container"#),
        "{err}"
    );
    let good = write(s.data_dir(), "list.yaml", &list("image"));
    let applied = s.ok(&["apply", "-f", &good]);
    assert!(applied.contains("configmap/listed created"), "{applied}");
    assert!(
        applied.contains("deployment.apps/listed created"),
        "{applied}"
    );
    let explain = s.ok(&[
        "explain",
        "--output=plaintext-openapiv2",
        "deployment.spec.replicas",
    ]);
    assert!(explain.contains("replicas <integer>"), "{explain}");
}

#[test]
fn unauthenticated_requests_are_refused() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start();
    let url = format!("{}/api/v1/namespaces", s.url());
    let anonymous = s.curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]);
    assert_eq!(String::from_utf8_lossy(&anonymous.stdout), "401");
    let wrong = s.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Authorization: Bearer nope",
        &url,
    ]);
    assert_eq!(String::from_utf8_lossy(&wrong.stdout), "401");
    let token = format!("Authorization: Bearer {}", s.admin_token());
    let ok = s.curl(&["-o", "/dev/null", "-w", "%{http_code}", "-H", &token, &url]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "200");
    let health = s.curl(&["-w", " %{http_code}", &format!("{}/healthz", s.url())]);
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok 200");
    let metrics = s.curl(&["-H", &token, &format!("{}/metrics", s.url())]);
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(text.contains("apiserver_request_total"), "{text}");
    assert!(
        text.contains("apiserver_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[test]
fn sigterm_shuts_down_cleanly() {
    if !require_kubectl() {
        return;
    }
    let mut s = Server::start();
    s.ok(&["create", "cm", "kept", "--from-literal=a=1"]);
    let status = s.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    s.spawn();
    assert_eq!(
        s.ok(&["get", "cm", "kept", "-o", "jsonpath={.data.a}"]),
        "1"
    );
}

/// pods/binding, as a scheduler uses it: the pod gets its node and
/// PodScheduled=True in the same write, and a second binding is refused.
#[test]
fn binding_assigns_the_node_and_marks_the_pod_scheduled() {
    if !require_kubectl() {
        return;
    }
    // No scheduler: the binding below is the pod's only one.
    let s = Server::start_with(&["--no-scheduler"]);
    s.ok_stdin(
        &["create", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"bound"},
            "spec":{"containers":[{"name":"c","image":"busybox"}]}}"#,
    );
    let binding = write(
        s.data_dir(),
        "binding.json",
        r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"bound"},
            "target":{"apiVersion":"v1","kind":"Node","name":"node-a"}}"#,
    );
    let url = "/api/v1/namespaces/default/pods/bound/binding";
    s.ok(&["create", "--raw", url, "-f", &binding]);
    let got = s.ok(&[
        "get",
        "pod",
        "bound",
        "-o",
        r#"jsonpath={.spec.nodeName} {.status.conditions[?(@.type=="PodScheduled")].status}"#,
    ]);
    assert_eq!(got, "node-a True");
    let err = s.fails(&["create", "--raw", url, "-f", &binding]);
    assert!(err.contains("already assigned to node"), "{err}");
}
