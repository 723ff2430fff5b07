//! StatefulSets and workload history, driven by the machine's kubectl
//! against real `tapestry server` and `tapestry hollow` processes: pods
//! made in ordinal order, each once the one before is Ready; stable names
//! and claims; rolling updates with `rollout status|history|undo` for
//! StatefulSets and DaemonSets; scale-down from the top, claims kept; a
//! PodDisruptionBudget holding `kubectl drain` back until it can spare a pod.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::{require_kubectl, wait_for, Hollow, Server};

fn cluster() -> Option<(Server, Hollow)> {
    if !require_kubectl() {
        return None;
    }
    let s = Server::start_with(&["--leader-elect=false"]);
    let h = Hollow::start(&s, "hollow", 3);
    wait_for(30, "3 Ready nodes", || {
        let out = s.ok(&["get", "nodes", "--no-headers"]);
        (out.lines().filter(|l| l.contains(" Ready")).count() == 3).then_some(())
    });
    Some((s, h))
}

/// `name phase ready image revision` of the pods `selector` selects that
/// are not being deleted.
fn live_pods(s: &Server, selector: &str) -> Vec<Vec<String>> {
    let out = s.ok(&[
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.phase} \
         {.status.conditions[?(@.type==\"Ready\")].status} {.spec.containers[0].image} \
         {.metadata.labels.controller-revision-hash} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]);
    let mut rows: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|f| f.len() >= 5 && f.get(5).is_none_or(|d| d.is_empty()))
        .collect();
    rows.sort();
    rows
}

fn wait_ready(s: &Server, selector: &str, names: &[&str]) -> Vec<Vec<String>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let rows = live_pods(s, selector);
        let got: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        if got == names && rows.iter().all(|r| r[1] == "Running" && r[2] == "True") {
            return rows;
        }
        if std::time::Instant::now() > deadline {
            let pods = s.ok(&["get", "pods", "-o", "wide"]);
            let events = s.ok(&["get", "events"]);
            panic!("{names:?} not Running and Ready after 60 s: {rows:?}\n{pods}\n{events}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Each pod's first appearance, with the pods Ready at that moment.
type Arrivals = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// Watch pods of `selector`, recording their arrivals.
fn watch_arrivals(s: &Server, selector: &str) -> (std::process::Child, Arrivals) {
    let mut child = s
        .kubectl_cmd(&[
            "get",
            "pods",
            "-l",
            selector,
            "-w",
            "--no-headers",
            "-o",
            "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type==\"Ready\")].status",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = child.stdout.take().expect("stdout");
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    std::thread::spawn(move || {
        let mut ready: HashMap<String, bool> = HashMap::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 2 {
                continue;
            }
            if !ready.contains_key(f[0]) {
                let mut before: Vec<String> = ready
                    .iter()
                    .filter(|(_, r)| **r)
                    .map(|(n, _)| n.clone())
                    .collect();
                before.sort();
                seen.lock().unwrap().push((f[0].to_string(), before));
            }
            ready.insert(f[0].to_string(), f[1] == "True");
        }
    });
    (child, arrivals)
}

/// Three static volumes for the claims (hollow nodes offer no local-path
/// storage), then the governing Service and the set.
const SET: &str = r#"
{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-a"},
 "spec": {"storageClassName": "manual", "capacity": {"storage": "1Gi"},
          "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/srv/pv-a"}}}
---
{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-b"},
 "spec": {"storageClassName": "manual", "capacity": {"storage": "1Gi"},
          "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/srv/pv-b"}}}
---
{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-c"},
 "spec": {"storageClassName": "manual", "capacity": {"storage": "1Gi"},
          "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/srv/pv-c"}}}
---
{"apiVersion": "v1", "kind": "Service",
 "metadata": {"name": "web"},
 "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]}}
---
{"apiVersion": "apps/v1", "kind": "StatefulSet",
 "metadata": {"name": "web"},
 "spec": {"serviceName": "web", "replicas": 3,
          "selector": {"matchLabels": {"app": "web"}},
          "template": {"metadata": {"labels": {"app": "web"}},
                       "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
          "volumeClaimTemplates": [{"metadata": {"name": "data"},
              "spec": {"storageClassName": "manual", "accessModes": ["ReadWriteOnce"],
                       "resources": {"requests": {"storage": "1Gi"}}}}]}}
"#;

/// A set whose claims go when it scales down or is deleted.
const DB: &str = r#"
{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-d"},
 "spec": {"storageClassName": "manual", "capacity": {"storage": "1Gi"},
          "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/srv/pv-d"}}}
---
{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-e"},
 "spec": {"storageClassName": "manual", "capacity": {"storage": "1Gi"},
          "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/srv/pv-e"}}}
---
{"apiVersion": "apps/v1", "kind": "StatefulSet",
 "metadata": {"name": "db"},
 "spec": {"serviceName": "db", "replicas": 2, "podManagementPolicy": "Parallel",
          "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Delete"},
          "selector": {"matchLabels": {"app": "db"}},
          "template": {"metadata": {"labels": {"app": "db"}},
                       "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
          "volumeClaimTemplates": [{"metadata": {"name": "data"},
              "spec": {"storageClassName": "manual", "accessModes": ["ReadWriteOnce"],
                       "resources": {"requests": {"storage": "1Gi"}}}}]}}
"#;

#[test]
fn statefulset_orders_pods_keeps_names_and_claims_and_rolls_back() {
    let Some((s, _h)) = cluster() else { return };
    let (mut watch, arrivals) = watch_arrivals(&s, "app=web");
    std::thread::sleep(std::time::Duration::from_millis(500));
    s.ok_stdin(&["apply", "-f", "-"], SET);
    wait_ready(&s, "app=web", &["web-0", "web-1", "web-2"]);
    let _ = watch.kill();
    let _ = watch.wait();
    // OrderedReady: each pod appears only once every one before it is Ready.
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(
        arrivals,
        [
            ("web-0".to_string(), vec![]),
            ("web-1".to_string(), vec!["web-0".to_string()]),
            (
                "web-2".to_string(),
                vec!["web-0".to_string(), "web-1".to_string()]
            ),
        ],
        "order of arrival, with the pods Ready at that moment"
    );
    let table = s.ok(&["get", "statefulset", "web", "--no-headers"]);
    assert!(table.contains("3/3"), "{table}");
    // One claim per ordinal; hostnames under the headless Service.
    let claims = s.ok(&["get", "pvc", "-o", "name"]);
    assert_eq!(
        claims.lines().collect::<Vec<_>>(),
        [
            "persistentvolumeclaim/data-web-0",
            "persistentvolumeclaim/data-web-1",
            "persistentvolumeclaim/data-web-2"
        ]
    );
    let pod = s.ok(&[
        "get",
        "pod",
        "web-1",
        "-o",
        "jsonpath={.spec.hostname}.{.spec.subdomain} {.spec.volumes[?(@.name==\"data\")].persistentVolumeClaim.claimName}",
    ]);
    assert_eq!(pod, "web-1.web data-web-1");
    let hostnames = wait_for(30, "hostnames in the EndpointSlice", || {
        let out = s.ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[0].endpoints[*].hostname}",
        ]);
        (out == "web-0 web-1 web-2").then_some(out)
    });
    assert_eq!(hostnames, "web-0 web-1 web-2");

    // A deleted pod comes back under its name.
    let uid = s.ok(&["get", "pod", "web-1", "-o", "jsonpath={.metadata.uid}"]);
    // Not `--wait`: kubectl's wait lists by name after its first get, and a
    // web-1 made again in between (hollow nodes let pods go at once) looks to
    // it like the old one still there, so it would wait for a week.
    s.ok(&["delete", "pod", "web-1", "--wait=false"]);
    wait_for(60, "web-1 made again", || {
        let again = s.ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[?(@.metadata.name==\"web-1\")]}{.metadata.uid}{end}",
        ]);
        (!again.is_empty() && again != uid).then_some(())
    });
    wait_ready(&s, "app=web", &["web-0", "web-1", "web-2"]);

    // A rolling update, from the highest ordinal down.
    s.ok(&["set", "image", "statefulset/web", "c=busybox:1.36"]);
    let out = s.ok(&["rollout", "status", "statefulset/web", "--timeout=90s"]);
    // kubectl words it so whenever a partition is set (it defaults to 0).
    assert!(
        out.contains("partitioned roll out complete: 3 new pods"),
        "{out}"
    );
    let rows = wait_ready(&s, "app=web", &["web-0", "web-1", "web-2"]);
    assert!(rows.iter().all(|r| r[3] == "busybox:1.36"), "{rows:?}");
    let revisions = s.ok(&["get", "controllerrevisions", "--no-headers"]);
    assert_eq!(revisions.lines().count(), 2, "{revisions}");
    assert!(revisions.contains("statefulset.apps/web"), "{revisions}");
    let history = s.ok(&["rollout", "history", "statefulset/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    s.ok(&["rollout", "undo", "statefulset/web"]);
    s.ok(&["rollout", "status", "statefulset/web", "--timeout=90s"]);
    let rows = wait_ready(&s, "app=web", &["web-0", "web-1", "web-2"]);
    assert!(rows.iter().all(|r| r[3] == "busybox"), "{rows:?}");
    // Going back renumbered the first revision instead of adding one.
    let numbers = s.ok(&[
        "get",
        "controllerrevisions",
        "-o",
        "jsonpath={.items[*].revision}",
    ]);
    let mut numbers: Vec<&str> = numbers.split(' ').collect();
    numbers.sort();
    assert_eq!(numbers, ["2", "3"]);

    // Scaling down goes from the top; the claims stay.
    s.ok(&["scale", "statefulset", "web", "--replicas=1"]);
    wait_ready(&s, "app=web", &["web-0"]);
    let claims = s.ok(&["get", "pvc", "-o", "name"]);
    assert_eq!(claims.lines().count(), 3, "{claims}");

    // Kubernetes' rules for what may change.
    let err = s.fails(&[
        "patch",
        "statefulset",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"serviceName":"other"}}"#,
    ]);
    assert!(
        err.contains("updates to statefulset spec for fields other than"),
        "{err}"
    );
    // Claims that go with the set: on scale-down and on deletion.
    s.ok_stdin(&["apply", "-f", "-"], DB);
    wait_ready(&s, "app=db", &["db-0", "db-1"]);
    s.ok(&["scale", "statefulset", "db", "--replicas=1"]);
    wait_ready(&s, "app=db", &["db-0"]);
    let claims_of_db = || {
        let out = s.ok(&["get", "pvc", "-l", "app=db", "-o", "name"]);
        out.lines().map(str::to_string).collect::<Vec<_>>()
    };
    wait_for(30, "data-db-1 deleted after the scale-down", || {
        (claims_of_db() == ["persistentvolumeclaim/data-db-0"]).then_some(())
    });
    s.ok(&["delete", "statefulset", "db"]);
    wait_for(60, "data-db-0 deleted with its set", || {
        claims_of_db().is_empty().then_some(())
    });

    let bad = SET.replace(
        "\"replicas\": 3",
        "\"replicas\": 3, \"podManagementPolicy\": \"Random\"",
    );
    let out = s.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.podManagementPolicy: Unsupported value: \"Random\""),
        "{err}"
    );
}

#[test]
fn daemonset_rollout_history_and_undo() {
    let Some((s, _h)) = cluster() else { return };
    let ds = r#"{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"agent"},
      "spec":{"selector":{"matchLabels":{"app":"agent"}},
        "template":{"metadata":{"labels":{"app":"agent"}},"spec":{"containers":[{"name":"a","image":"busybox"}]}}}}"#;
    s.ok_stdin(&["create", "-f", "-"], ds);
    s.ok(&["rollout", "status", "daemonset/agent", "--timeout=60s"]);
    s.ok(&["set", "image", "daemonset/agent", "a=busybox:1.36"]);
    s.ok(&["rollout", "status", "daemonset/agent", "--timeout=90s"]);
    let history = s.ok(&["rollout", "history", "daemonset/agent"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    s.ok(&["rollout", "undo", "daemonset/agent"]);
    s.ok(&["rollout", "status", "daemonset/agent", "--timeout=90s"]);
    let image = s.ok(&[
        "get",
        "daemonset",
        "agent",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(image, "busybox");
    wait_for(60, "every daemon back on busybox", || {
        let rows = live_pods(&s, "app=agent");
        (rows.len() == 3 && rows.iter().all(|r| r[3] == "busybox" && r[2] == "True")).then_some(())
    });
    // Undo to a named revision that does not exist is refused.
    let err = s.fails(&["rollout", "undo", "daemonset/agent", "--to-revision=9"]);
    assert!(err.contains("unable to find specified revision"), "{err}");
}

#[test]
fn drain_waits_for_the_disruption_budget() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=2",
    ]);
    s.ok(&[
        "create",
        "pdb",
        "web",
        "--selector=app=web",
        "--min-available=2",
    ]);
    let budget = |field: &str| {
        s.ok(&[
            "get",
            "pdb",
            "web",
            "-o",
            &format!("jsonpath={{.status.{field}}}"),
        ])
    };
    wait_for(60, "two healthy pods, no disruption allowed", || {
        (budget("currentHealthy") == "2" && budget("expectedPods") == "2").then_some(())
    });
    assert_eq!(budget("disruptionsAllowed"), "0");
    let table = s.ok(&["get", "pdb", "web", "--no-headers"]);
    let cells: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(cells[..4], ["web", "2", "N/A", "0"], "{table}");

    // Draining a node with one of the pods: refused, retried, given up.
    let node = s.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[0].spec.nodeName}",
    ]);
    let out = s.kubectl(&["drain", &node, "--ignore-daemonsets", "--timeout=8s"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "drain went through the budget: {said}"
    );
    assert!(
        said.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{said}"
    );
    assert_eq!(
        live_pods(&s, "app=web").len(),
        2,
        "no pod was evicted: {said}"
    );

    // A third pod makes one disruption allowed: the drain proceeds.
    s.ok(&["scale", "deployment", "web", "--replicas=3"]);
    wait_for(60, "one disruption allowed", || {
        (budget("disruptionsAllowed") == "1").then_some(())
    });
    let out = s.ok(&["drain", &node, "--ignore-daemonsets", "--timeout=60s"]);
    assert!(out.contains("evicted"), "{out}");
    wait_for(60, "three healthy pods off the drained node", || {
        let out = s.ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName} {.status.conditions[?(@.type==\"Ready\")].status} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        let rows: Vec<&str> = out.lines().collect();
        (rows.len() == 3
            && rows
                .iter()
                .all(|r| !r.starts_with(&format!("{node} ")) && r.ends_with("True ")))
        .then_some(())
    });
}
