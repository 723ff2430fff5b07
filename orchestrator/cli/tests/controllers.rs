//! The scheduler and controller manager of `tapestry server`, driven by the
//! machine's kubectl against real `tapestry server` and `tapestry hollow`
//! processes.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::{require_kubectl, wait_for, Hollow, Server};

#[derive(Debug, Clone)]
struct PodRow {
    name: String,
    phase: String,
    node: String,
    deleting: bool,
}

fn pods(s: &Server, ns: &str, selector: &str) -> Vec<PodRow> {
    let out = s.ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.spec.nodeName} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            PodRow {
                name: f[0].to_string(),
                phase: f.get(1).unwrap_or(&"").to_string(),
                node: f.get(2).unwrap_or(&"").to_string(),
                deleting: f.get(3).is_some_and(|d| !d.is_empty()),
            }
        })
        .collect()
}

/// Wait until exactly `n` live pods match and all are Running.
fn wait_running(s: &Server, ns: &str, selector: &str, n: usize) -> Vec<PodRow> {
    wait_for(60, &format!("{n} running pods {selector}"), || {
        let live: Vec<PodRow> = pods(s, ns, selector)
            .into_iter()
            .filter(|p| !p.deleting)
            .collect();
        (live.len() == n && live.iter().all(|p| p.phase == "Running")).then_some(live)
    })
}

fn per_node(rows: &[PodRow]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r.node.clone()).or_default() += 1;
    }
    m
}

/// Fast node health checks, so a silent node is noticed in seconds.
const SERVER_ARGS: &[&str] = &[
    "--leader-elect=false",
    "--node-monitor-grace-period=3s",
    "--node-monitor-period=500ms",
];

fn ready_nodes(s: &Server, n: usize) {
    wait_for(30, &format!("{n} Ready nodes"), || {
        let out = s.ok(&["get", "nodes", "--no-headers"]);
        (out.lines().filter(|l| l.contains(" Ready")).count() == n).then_some(())
    });
}

fn cluster() -> Option<(Server, Hollow)> {
    if !require_kubectl() {
        return None;
    }
    let s = Server::start_with(SERVER_ARGS);
    let h = Hollow::start(&s, "hollow", 3);
    ready_nodes(&s, 3);
    Some((s, h))
}

/// Watch pods of `selector` with kubectl and track the fewest available
/// (ready, not being deleted) once `floor_after` were seen available.
fn watch_availability(
    s: &Server,
    selector: &str,
    floor_after: usize,
) -> (std::process::Child, Arc<Mutex<Option<usize>>>) {
    let mut child = s
        .kubectl_cmd(&[
            "get",
            "pods",
            "-l",
            selector,
            "-w",
            "--no-headers",
            "-o",
            "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type==\"Ready\")].status,DEL:.metadata.deletionTimestamp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = child.stdout.take().expect("stdout");
    let min = Arc::new(Mutex::new(None::<usize>));
    let m = min.clone();
    std::thread::spawn(move || {
        let mut state: HashMap<String, bool> = HashMap::new();
        let mut armed = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 {
                continue;
            }
            state.insert(f[0].to_string(), f[1] == "True" && f[2] == "<none>");
            let available = state.values().filter(|a| **a).count();
            if available >= floor_after {
                armed = true;
            }
            if armed {
                let mut g = m.lock().unwrap();
                *g = Some(g.map_or(available, |x| x.min(available)));
            }
        }
    });
    (child, min)
}

#[test]
fn deployment_scale_roll_out_undo_and_self_heal() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=6",
    ]);
    let rows = wait_running(&s, "default", "app=web", 6);
    let spread = per_node(&rows);
    assert_eq!(spread.len(), 3, "pods on every node: {spread:?}");
    assert!(
        spread.values().all(|c| *c == 2),
        "2 pods per node: {spread:?}"
    );

    s.ok(&["scale", "deployment", "web", "--replicas=9"]);
    wait_running(&s, "default", "app=web", 9);
    s.ok(&["scale", "deployment", "web", "--replicas=6"]);
    wait_running(&s, "default", "app=web", 6);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);

    // maxUnavailable defaults to 25%: 6 - 1 = 5 must stay available.
    let (mut watch, min) = watch_availability(&s, "app=web", 6);
    std::thread::sleep(std::time::Duration::from_secs(1));
    s.ok(&["set", "image", "deployment/web", "busybox=busybox:1.36"]);
    let out = s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let _ = watch.kill();
    let _ = watch.wait();
    let floor = min.lock().unwrap().expect("watch saw the pods");
    assert!(
        floor >= 5,
        "available pods dropped to {floor} during the rollout"
    );
    let image = s.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(image, "busybox:1.36");
    let rs = s.ok(&["get", "rs", "-l", "app=web", "--no-headers"]);
    assert_eq!(rs.lines().count(), 2, "old and new ReplicaSet: {rs}");

    s.ok(&["rollout", "undo", "deployment/web"]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let image = s.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(image, "busybox");
    let rows = wait_running(&s, "default", "app=web", 6);

    // A deleted pod is replaced.
    let victim = rows[0].name.clone();
    s.ok(&["delete", "pod", &victim, "--wait=false"]);
    let rows = wait_running(&s, "default", "app=web", 6);
    assert!(rows.iter().all(|r| r.name != victim));

    let events = s.ok(&[
        "get",
        "events",
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ]);
    for reason in ["Scheduled", "SuccessfulCreate", "ScalingReplicaSet"] {
        assert!(
            events.lines().any(|l| l == reason),
            "no {reason} event in {events}"
        );
    }
}

#[test]
fn scheduler_filters_and_failed_scheduling() {
    let Some((s, _h)) = cluster() else { return };
    // More cpu than any node (4 cores) has.
    let big = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"big"},
        "spec":{"containers":[{"name":"c","image":"busybox","resources":{"requests":{"cpu":"64"}}}]}}"#;
    s.ok_stdin(&["create", "-f", "-"], big);
    let msg = wait_for(30, "FailedScheduling event", || {
        let out = s.ok(&[
            "get",
            "events",
            "--field-selector",
            "reason=FailedScheduling,involvedObject.name=big",
            "-o",
            "jsonpath={.items[*].message}",
        ]);
        (!out.is_empty()).then_some(out)
    });
    assert!(
        msg.contains("0/3 nodes are available") && msg.contains("Insufficient cpu"),
        "{msg}"
    );
    let cond = s.ok(&[
        "get",
        "pod",
        "big",
        "-o",
        "jsonpath={.status.phase} {.status.conditions[?(@.type==\"PodScheduled\")].reason}",
    ]);
    assert_eq!(cond, "Pending Unschedulable");

    // nodeSelector.
    s.ok(&["label", "node", "hollow-1", "disk=ssd"]);
    let sel = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"picky"},
        "spec":{"nodeSelector":{"disk":"ssd"},"containers":[{"name":"c","image":"busybox"}]}}"#;
    s.ok_stdin(&["create", "-f", "-"], sel);
    let node = wait_for(30, "picky scheduled", || {
        let n = s.ok(&["get", "pod", "picky", "-o", "jsonpath={.spec.nodeName}"]);
        (!n.is_empty()).then_some(n)
    });
    assert_eq!(node, "hollow-1");

    // Taints keep pods off unless tolerated; cordon keeps new pods off.
    s.ok(&["taint", "node", "hollow-0", "dedicated=infra:NoSchedule"]);
    s.ok(&["cordon", "hollow-2"]);
    s.ok(&[
        "create",
        "deployment",
        "spread",
        "--image=busybox",
        "--replicas=4",
    ]);
    let rows = wait_running(&s, "default", "app=spread", 4);
    assert!(rows.iter().all(|r| r.node == "hollow-1"), "{rows:?}");
    let tolerant = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"tolerant"},
        "spec":{"nodeSelector":{"kubernetes.io/hostname":"hollow-0"},
                "tolerations":[{"key":"dedicated","operator":"Equal","value":"infra","effect":"NoSchedule"}],
                "containers":[{"name":"c","image":"busybox"}]}}"#;
    s.ok_stdin(&["create", "-f", "-"], tolerant);
    let node = wait_for(30, "tolerant scheduled", || {
        let n = s.ok(&["get", "pod", "tolerant", "-o", "jsonpath={.spec.nodeName}"]);
        (!n.is_empty()).then_some(n)
    });
    assert_eq!(node, "hollow-0");

    // Uncordoning is a cluster change: the big pod is retried, still fails,
    // and pods go to hollow-2 again.
    s.ok(&["uncordon", "hollow-2"]);
    s.ok(&["scale", "deployment", "spread", "--replicas=8"]);
    let rows = wait_running(&s, "default", "app=spread", 8);
    assert!(rows.iter().any(|r| r.node == "hollow-2"), "{rows:?}");
    assert!(rows.iter().all(|r| r.node != "hollow-0"), "{rows:?}");
}

#[test]
fn garbage_collection_and_namespace_deletion() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&["create", "namespace", "team"]);
    // Every namespace gets a default ServiceAccount.
    wait_for(30, "default ServiceAccount", || {
        s.kubectl(&["get", "serviceaccount", "default", "-n", "team"])
            .status
            .success()
            .then_some(())
    });
    s.ok(&[
        "create",
        "deployment",
        "a",
        "-n",
        "team",
        "--image=busybox",
        "--replicas=3",
    ]);
    s.ok(&[
        "create",
        "deployment",
        "keep",
        "--image=busybox",
        "--replicas=2",
    ]);
    s.ok(&[
        "create",
        "deployment",
        "gone",
        "--image=busybox",
        "--replicas=2",
    ]);
    wait_running(&s, "team", "app=a", 3);
    wait_running(&s, "default", "app=keep", 2);
    wait_running(&s, "default", "app=gone", 2);

    // Background (kubectl's default): ReplicaSets and pods follow.
    s.ok(&["delete", "deployment", "gone"]);
    wait_for(
        30,
        "ReplicaSets and pods of a deleted Deployment gone",
        || {
            let rs = s.ok(&["get", "rs", "-l", "app=gone", "--no-headers"]);
            (rs.trim().is_empty() && pods(&s, "default", "app=gone").is_empty()).then_some(())
        },
    );

    // Orphan: the ReplicaSet stays, without its owner reference.
    s.ok(&["delete", "deployment", "keep", "--cascade=orphan"]);
    wait_for(30, "orphaned ReplicaSet released", || {
        let refs = s.ok(&[
            "get",
            "rs",
            "-l",
            "app=keep",
            "-o",
            "jsonpath={.items[*].metadata.ownerReferences}",
        ]);
        let count = s
            .ok(&["get", "rs", "-l", "app=keep", "--no-headers"])
            .lines()
            .count();
        (count == 1 && refs.trim().is_empty()).then_some(())
    });
    assert_eq!(pods(&s, "default", "app=keep").len(), 2);

    // Foreground: kubectl waits until dependents are gone, then the owner.
    s.ok(&[
        "delete",
        "rs",
        "-l",
        "app=keep",
        "--cascade=foreground",
        "--timeout=60s",
    ]);
    assert!(pods(&s, "default", "app=keep").iter().all(|p| p.deleting));
    // ...and the owner itself is gone once they are.
    assert_eq!(
        s.ok(&[
            "get",
            "rs",
            "-l",
            "app=keep",
            "--no-headers",
            "--ignore-not-found"
        ])
        .trim(),
        ""
    );

    // Namespace deletion empties the namespace, then removes it.
    s.ok(&["delete", "namespace", "team", "--timeout=60s"]);
    let out = s.fails(&["get", "namespace", "team"]);
    assert!(
        out.contains("NotFound") || out.contains("not found"),
        "{out}"
    );
}

#[test]
fn silent_node_goes_not_ready_and_its_pods_move() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start_with(SERVER_ARGS);
    let _stable = Hollow::start(&s, "stable", 2);
    let mut doomed = Hollow::start(&s, "doomed", 1);
    ready_nodes(&s, 3);
    // Tolerate unreachable nodes for 2s instead of the default 300s.
    let deploy = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"mover"},
      "spec":{"replicas":6,"selector":{"matchLabels":{"app":"mover"}},
        "template":{"metadata":{"labels":{"app":"mover"}},
          "spec":{"tolerations":[
              {"key":"node.kubernetes.io/unreachable","operator":"Exists","effect":"NoExecute","tolerationSeconds":2},
              {"key":"node.kubernetes.io/not-ready","operator":"Exists","effect":"NoExecute","tolerationSeconds":2}],
            "containers":[{"name":"c","image":"busybox"}]}}}}"#;
    s.ok_stdin(&["create", "-f", "-"], deploy);
    let rows = wait_running(&s, "default", "app=mover", 6);
    assert!(rows.iter().any(|r| r.node == "doomed-0"), "{rows:?}");

    doomed.kill();
    wait_for(30, "doomed-0 NotReady", || {
        let st = s.ok(&[
            "get",
            "node",
            "doomed-0",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        (st == "Unknown").then_some(())
    });
    // The unreachable taints follow on the next node health check.
    wait_for(30, "unreachable taint on doomed-0", || {
        let taints = s.ok(&[
            "get",
            "node",
            "doomed-0",
            "-o",
            "jsonpath={.spec.taints[*].key}",
        ]);
        taints
            .contains("node.kubernetes.io/unreachable")
            .then_some(())
    });
    let rows = wait_for(60, "replacements on the healthy nodes", || {
        let live: Vec<PodRow> = pods(&s, "default", "app=mover")
            .into_iter()
            .filter(|p| !p.deleting)
            .collect();
        (live.len() == 6
            && live
                .iter()
                .all(|p| p.phase == "Running" && p.node != "doomed-0"))
        .then_some(live)
    });
    assert!(rows.iter().all(|r| r.node.starts_with("stable-")));
    let events = s.ok(&[
        "get",
        "events",
        "-A",
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ]);
    for reason in ["NodeNotReady", "Evicted"] {
        assert!(
            events.lines().any(|l| l == reason),
            "no {reason} event in {events}"
        );
    }
}

#[test]
fn drain_evicts_through_the_eviction_api() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&[
        "create",
        "deployment",
        "d",
        "--image=busybox",
        "--replicas=6",
    ]);
    wait_running(&s, "default", "app=d", 6);
    let out = s.ok(&["drain", "hollow-1", "--ignore-daemonsets", "--timeout=60s"]);
    assert!(out.contains("evicted"), "{out}");
    let unsched = s.ok(&[
        "get",
        "node",
        "hollow-1",
        "-o",
        "jsonpath={.spec.unschedulable}",
    ]);
    assert_eq!(unsched, "true");
    let rows = wait_running(&s, "default", "app=d", 6);
    assert!(rows.iter().all(|r| r.node != "hollow-1"), "{rows:?}");
}

#[test]
fn daemonset_job_and_endpoint_slices() {
    let Some((s, _h)) = cluster() else { return };
    // DaemonSet: one pod per node, and a node that joins later gets one.
    let ds = r#"{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"agent"},
      "spec":{"selector":{"matchLabels":{"app":"agent"}},
        "template":{"metadata":{"labels":{"app":"agent"}},"spec":{"containers":[{"name":"a","image":"busybox"}]}}}}"#;
    s.ok_stdin(&["create", "-f", "-"], ds);
    let rows = wait_running(&s, "default", "app=agent", 3);
    assert_eq!(per_node(&rows).len(), 3, "{rows:?}");
    let _late = Hollow::start(&s, "late", 1);
    let rows = wait_running(&s, "default", "app=agent", 4);
    assert!(rows.iter().any(|r| r.node == "late-0"), "{rows:?}");
    s.ok(&["rollout", "status", "daemonset/agent", "--timeout=60s"]);
    // A template change rolls every daemon.
    let before: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    s.ok(&["set", "image", "daemonset/agent", "a=busybox:1.36"]);
    s.ok(&["rollout", "status", "daemonset/agent", "--timeout=90s"]);
    let rows = wait_running(&s, "default", "app=agent", 4);
    assert!(rows.iter().all(|r| !before.contains(&r.name)), "{rows:?}");

    // Job: complete once its pods succeed (phase set through the status API,
    // as a kubelet would).
    s.ok(&["create", "job", "once", "--image=busybox", "--", "true"]);
    // The list is empty until the Job controller acts.
    let pod = wait_for(30, "job pod", || {
        pods(&s, "default", "job-name=once")
            .into_iter()
            .next()
            .map(|p| p.name)
    });
    s.ok(&[
        "patch",
        "pod",
        &pod,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Succeeded"}}"#,
    ]);
    s.ok(&[
        "wait",
        "--for=condition=complete",
        "job/once",
        "--timeout=30s",
    ]);
    let succeeded =
        |s: &Server| s.ok(&["get", "job", "once", "-o", "jsonpath={.status.succeeded}"]);
    assert_eq!(succeeded(&s), "1");
    // Counted, the pod no longer carries the tracking finalizer, and it
    // stays counted once it is gone.
    let finalizers =
        |s: &Server, pod: &str| s.ok(&["get", "pod", pod, "-o", "jsonpath={.metadata.finalizers}"]);
    wait_for(10, "the finalizer released", || {
        finalizers(&s, &pod).is_empty().then_some(())
    });
    s.ok(&["delete", "pod", &pod, "--wait=true"]);
    for _ in 0..10 {
        assert_eq!(succeeded(&s), "1");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // A running pod that is deleted counts as failed and is replaced; the
    // tracking finalizer holds it until it is counted, then lets it go.
    s.ok(&["create", "job", "retry", "--image=busybox", "--", "true"]);
    let first = wait_for(30, "retry's pod", || {
        pods(&s, "default", "job-name=retry")
            .into_iter()
            .find(|p| p.phase == "Running")
            .map(|p| p.name)
    });
    assert_eq!(
        finalizers(&s, &first),
        r#"["batch.kubernetes.io/job-tracking"]"#
    );
    s.ok(&["delete", "pod", &first, "--wait=true", "--timeout=30s"]);
    wait_for(30, "the deleted pod counted as failed and replaced", || {
        let failed = s.ok(&["get", "job", "retry", "-o", "jsonpath={.status.failed}"]);
        let replaced = pods(&s, "default", "job-name=retry")
            .iter()
            .any(|p| p.name != first && !p.deleting);
        (failed == "1" && replaced).then_some(())
    });
    // Orphaned pods are let go; deleting a Job deletes its pods outright.
    s.ok(&["delete", "job", "retry", "--cascade=orphan"]);
    let orphan = pods(&s, "default", "job-name=retry")
        .into_iter()
        .next()
        .expect("the orphaned pod")
        .name;
    wait_for(30, "the orphan released", || {
        finalizers(&s, &orphan).is_empty().then_some(())
    });
    s.ok(&["delete", "pod", &orphan, "--wait=true", "--timeout=30s"]);
    s.ok(&["delete", "job", "once", "--wait=true", "--timeout=30s"]);

    // EndpointSlices and Endpoints follow ready pods.
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=3",
    ]);
    s.ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    let rows = wait_running(&s, "default", "app=web", 3);
    let slice_ips = |s: &Server| {
        let out = s.ok(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o",
            "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.targetRef.name}{\"\\n\"}{end}"]);
        let mut v: Vec<String> = out.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    let mut names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    names.sort();
    wait_for(30, "slice with the 3 ready pods", || {
        (slice_ips(&s) == names).then_some(())
    });
    let ports = s.ok(&[
        "get",
        "endpoints",
        "web",
        "-o",
        "jsonpath={.subsets[0].ports[0].port}",
    ]);
    assert_eq!(ports, "8080");
    // A pod that is no longer ready leaves the ready set.
    let victim = &names[0];
    s.ok(&[
        "patch",
        "pod",
        victim,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
    ]);
    let rest: Vec<String> = names[1..].to_vec();
    wait_for(30, "not-ready pod out of the slice", || {
        (slice_ips(&s) == rest).then_some(())
    });
    s.ok(&["delete", "service", "web"]);
    wait_for(30, "slice removed with its Service", || {
        s.ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "--no-headers",
        ])
        .trim()
        .is_empty()
        .then_some(())
    });
}

/// Two schedulers elected through the same Lease: only the holder binds;
/// when it dies without giving the lease up, the other takes over once the
/// lease expires.
#[test]
fn leader_election_hands_over_when_the_leader_dies() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tapestry_runtime::leader::{run_elected, LeaderConfig};

    if !require_kubectl() {
        return;
    }
    let s = Server::start_with(&["--no-scheduler", "--leader-elect=false"]);
    let _h = Hollow::start(&s, "hollow", 2);
    ready_nodes(&s, 2);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let kubeconfig = s.kubeconfig();
    let client = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .expect("config");
            kube::Client::try_from(cfg).expect("client")
        })
    };
    let start = |id: &str| {
        let stats = std::sync::Arc::new(tapestry_scheduler::Stats::default());
        let mut cfg = LeaderConfig::new("kube-scheduler", id);
        cfg.lease_duration = Duration::from_secs(3);
        cfg.renew_deadline = Duration::from_secs(2);
        cfg.retry_period = Duration::from_millis(500);
        let c = client(&rt);
        let st = stats.clone();
        let task = rt.spawn(run_elected(
            c.clone(),
            cfg,
            tokio_util::sync::CancellationToken::new(),
            move |t| tapestry_scheduler::run(c.clone(), st.clone(), t),
        ));
        (task, stats)
    };
    let (a, a_stats) = start("scheduler-a");
    wait_for(20, "a holds the lease", || {
        let h = s.ok(&[
            "get",
            "lease",
            "kube-scheduler",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        (h == "scheduler-a").then_some(())
    });
    let (b, b_stats) = start("scheduler-b");
    s.ok(&[
        "create",
        "deployment",
        "first",
        "--image=busybox",
        "--replicas=4",
    ]);
    wait_running(&s, "default", "app=first", 4);
    wait_for(10, "a counted 4 binds", || {
        (a_stats.bound.load(Ordering::Relaxed) == 4).then_some(())
    });
    assert_eq!(
        b_stats.bound.load(Ordering::Relaxed),
        0,
        "the standby bound pods"
    );

    // "Kill" a: its task stops without releasing the lease.
    a.abort();
    wait_for(30, "b takes the lease over", || {
        let h = s.ok(&[
            "get",
            "lease",
            "kube-scheduler",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        (h == "scheduler-b").then_some(())
    });
    s.ok(&[
        "create",
        "deployment",
        "second",
        "--image=busybox",
        "--replicas=3",
    ]);
    wait_running(&s, "default", "app=second", 3);
    wait_for(10, "b counted 3 binds", || {
        (b_stats.bound.load(Ordering::Relaxed) == 3).then_some(())
    });
    assert_eq!(a_stats.bound.load(Ordering::Relaxed), 4);
    let transitions = s.ok(&[
        "get",
        "lease",
        "kube-scheduler",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.spec.leaseTransitions}",
    ]);
    assert_eq!(transitions, "1");
    b.abort();
}

/// Two `tapestry server` processes on one etcd: the one holding the Leases
/// schedules and reconciles, the other stands by; when the holder dies the
/// other takes over, and pods created through it are scheduled again.
#[test]
fn two_servers_on_one_etcd_hand_over() {
    if !require_kubectl() {
        return;
    }
    let Some(etcd) = tapestry_store::conformance::EtcdServer::start() else {
        return;
    };
    let store = format!("--store={}", etcd.store_arg());
    let args = [
        store.as_str(),
        "--leader-elect-lease-duration=3s",
        "--leader-elect-renew-deadline=2s",
        "--leader-elect-retry-period=500ms",
    ];
    let holder = |s: &Server, lease: &str| {
        s.ok(&[
            "get",
            "lease",
            lease,
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    let mut a = Server::start_with(&args);
    let first_leader = wait_for(20, "a holds the scheduler's lease", || {
        Some(holder(&a, "kube-scheduler")).filter(|h| !h.is_empty())
    });
    let b = Server::start_with(&args);
    // Nodes and clients go through b only; a acts through the shared store.
    let _h = Hollow::start(&b, "hollow", 2);
    ready_nodes(&b, 2);
    b.ok(&[
        "create",
        "deployment",
        "first",
        "--image=busybox",
        "--replicas=4",
    ]);
    wait_running(&b, "default", "app=first", 4);
    for lease in ["kube-scheduler", "kube-controller-manager"] {
        assert_eq!(holder(&b, lease), first_leader, "{lease} changed hands");
    }
    // Which scheduler bound each pod whose name starts with `prefix`, from
    // its Scheduled event.
    let schedulers = |prefix: &str, n: usize| {
        wait_for(20, "Scheduled events", || {
            let out = b.ok(&[
                "get",
                "events",
                "-o",
                r#"jsonpath={range .items[?(@.reason=="Scheduled")]}{.involvedObject.name} {.reportingInstance}{"\n"}{end}"#,
            ]);
            let instances: Vec<String> = out
                .lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.split_once(' ').map(|(_, i)| i.to_string()))
                .collect();
            (instances.len() == n).then_some(instances)
        })
    };
    let only_first = format!("default-scheduler-{first_leader}");
    assert!(
        schedulers("first-", 4).iter().all(|i| *i == only_first),
        "a pod was bound by another scheduler than {only_first}"
    );

    a.kill();
    let second_leader = wait_for(30, "b takes the leases over", || {
        let h = holder(&b, "kube-scheduler");
        (!h.is_empty() && h != first_leader).then_some(h)
    });
    b.ok(&[
        "create",
        "deployment",
        "second",
        "--image=busybox",
        "--replicas=2",
    ]);
    wait_running(&b, "default", "app=second", 2);
    assert_eq!(holder(&b, "kube-controller-manager"), second_leader);
    let only_second = format!("default-scheduler-{second_leader}");
    assert!(schedulers("second-", 2).iter().all(|i| *i == only_second));
}

/// Owner uid of each live pod matching `selector`.
fn owners(s: &Server, selector: &str) -> Vec<(String, String)> {
    s.ok(&[
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name},{.metadata.ownerReferences[0].uid},{.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.len() == 3 && f[2].is_empty()).then(|| (f[0].to_string(), f[1].to_string()))
    })
    .collect()
}

#[test]
fn replication_controller_keeps_adopts_scales_and_collects_pods() {
    let Some((s, _h)) = cluster() else { return };
    // Validation names the field.
    let bad = s.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"ReplicationController","metadata":{"name":"bad"},
          "spec":{"selector":{"app":"other"},"template":{"metadata":{"labels":{"app":"rcweb"}},
            "spec":{"containers":[{"name":"c","image":"nginx"}]}}}}"#,
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("spec.template.metadata.labels: Invalid value")
            && err.contains("`selector` does not match template `labels`"),
        "{err}"
    );

    // Selector, labels and replicas default from the template.
    s.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"ReplicationController","metadata":{"name":"web"},
          "spec":{"template":{"metadata":{"labels":{"app":"rcweb"}},
            "spec":{"containers":[{"name":"c","image":"nginx"}]}}}}"#,
    );
    let got = |p: &str| s.ok(&["get", "rc", "web", "-o", &format!("jsonpath={p}")]);
    assert_eq!(got("{.spec.selector}"), r#"{"app":"rcweb"}"#);
    assert_eq!(got("{.metadata.labels}"), r#"{"app":"rcweb"}"#);
    assert_eq!(got("{.spec.replicas}"), "1");
    s.ok(&["scale", "rc", "web", "--replicas=3"]);
    let rows = wait_running(&s, "default", "app=rcweb", 3);
    let uid = got("{.metadata.uid}");
    for r in &rows {
        let suffix = r.name.strip_prefix("web-").unwrap_or_default();
        assert_eq!(suffix.len(), 5, "{rows:?}");
    }
    assert!(owners(&s, "app=rcweb").iter().all(|(_, o)| *o == uid));
    wait_for(30, "rc status", || {
        let row = s.ok(&["get", "rc", "web", "--no-headers"]);
        let f: Vec<&str> = row.split_whitespace().collect();
        (f[1..4] == ["3", "3", "3"]).then_some(())
    });
    assert_eq!(got("{.status.availableReplicas}"), "3");
    assert_eq!(got("{.status.fullyLabeledReplicas}"), "3");
    assert_eq!(
        got("{.status.observedGeneration}"),
        got("{.metadata.generation}")
    );
    let table = s.ok(&["get", "rc", "-o", "wide"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "READY",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ]
    );
    assert!(table.contains("app=rcweb"), "{table}");
    assert!(s.ok(&["get", "all"]).contains("replicationcontroller/web"));

    // An orphan it selects is adopted (one pod too many is then deleted);
    // a pod relabelled out of its selector is released and replaced.
    s.ok(&["run", "stray", "--image=nginx", "--labels=app=rcweb"]);
    wait_for(30, "the orphan adopted and one pod removed", || {
        let o = owners(&s, "app=rcweb");
        (o.len() == 3 && o.iter().all(|(_, u)| *u == uid)).then_some(())
    });
    let leaver = wait_running(&s, "default", "app=rcweb", 3)[0].name.clone();
    s.ok(&["label", "pod", &leaver, "app=left", "--overwrite"]);
    wait_running(&s, "default", "app=rcweb", 3);
    wait_for(30, "the relabelled pod released", || {
        owners(&s, "app=left")
            .first()
            .is_some_and(|(_, u)| u.is_empty())
            .then_some(())
    });

    // kubectl scale goes through the scale subresource.
    s.ok(&["scale", "rc", "web", "--replicas=1"]);
    wait_running(&s, "default", "app=rcweb", 1);
    assert_eq!(
        s.ok(&["get", "rc", "web", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );

    // Deleting it takes its pods; the released one stays.
    s.ok(&["delete", "rc", "web"]);
    wait_for(60, "the rc's pods collected", || {
        pods(&s, "default", "app=rcweb").is_empty().then_some(())
    });
    assert_eq!(pods(&s, "default", "app=left").len(), 1);
}

/// Names of the Jobs whose names start with `prefix`.
fn jobs_named(s: &Server, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = s
        .ok(&["get", "jobs", "-o", "jsonpath={.items[*].metadata.name}"])
        .split_whitespace()
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Let a Job's pod succeed (as a kubelet reports it) and wait until the
/// Job is complete.
fn complete_job(s: &Server, job: &str) {
    let pod = wait_for(30, &format!("{job}'s pod"), || {
        pods(s, "default", &format!("job-name={job}"))
            .into_iter()
            .find(|p| p.phase == "Running")
            .map(|p| p.name)
    });
    s.ok(&[
        "patch",
        "pod",
        &pod,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Succeeded"}}"#,
    ]);
    s.ok(&[
        "wait",
        "--for=condition=complete",
        &format!("job/{job}"),
        "--timeout=30s",
    ]);
}

/// CronJobs, with the controller manager run here on a clock the test
/// moves (the API server, scheduler and a hollow node are a real
/// `tapestry server` and `tapestry hollow`): a Job per scheduled time,
/// Forbid holding a run while one is active, history limits, suspend,
/// `kubectl create job --from=cronjob/…`, and the Jobs collected with
/// their CronJob.
#[test]
fn cronjob_runs_on_schedule_forbids_overlap_and_prunes_history() {
    use chrono::{DateTime, Duration as Span, Utc};
    if !require_kubectl() {
        return;
    }
    let s = Server::start_with(&["--leader-elect=false", "--no-controllers"]);
    let _h = Hollow::start(&s, "hollow", 1);
    ready_nodes(&s, 1);
    let clock = tapestry_controllers::Clock::manual(Utc::now());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stop = tokio_util::sync::CancellationToken::new();
    let (kubeconfig, c, token) = (s.kubeconfig(), clock.clone(), stop.clone());
    rt.spawn(async move {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("client config");
        let client = kube::Client::try_from(config).expect("client");
        let config = tapestry_controllers::Config {
            cluster_cidr: tapestry_controllers::ClusterCidr::parse("10.244.0.0/16").unwrap(),
            node_monitor_grace_period: std::time::Duration::from_secs(40),
            node_monitor_period: std::time::Duration::from_secs(5),
            root_ca: None,
            signer: None,
            clock: c,
            hpa_sync_period: std::time::Duration::from_secs(15),
            hpa_downscale_stabilization: std::time::Duration::from_secs(300),
        };
        tapestry_controllers::run(client, config, token).await;
    });

    // A bad schedule or time zone is refused with the field path.
    let err = s.fails(&[
        "create",
        "cronjob",
        "bad",
        "--image=busybox",
        "--schedule=61 * * * *",
    ]);
    assert!(
        err.contains(r#"spec.schedule: Invalid value: "61 * * * *": "#),
        "{err}"
    );
    let manifest = |name: &str, extra: &str| {
        format!(
            r#"{{"apiVersion":"batch/v1","kind":"CronJob","metadata":{{"name":"{name}"}},
              "spec":{{"schedule":"*/1 * * * *",{extra}"jobTemplate":{{"spec":{{"template":{{
                "spec":{{"restartPolicy":"Never","containers":[{{"name":"c","image":"busybox"}}]}}}}}}}}}}}}"#
        )
    };
    let bad = s.kubectl_stdin(
        &["apply", "-f", "-"],
        &manifest("bad", r#""timeZone":"Mars/Olympus","#),
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains(
            r#"spec.timeZone: Invalid value: "Mars/Olympus": unknown time zone Mars/Olympus"#
        ),
        "{err}"
    );

    s.ok_stdin(
        &["apply", "-f", "-"],
        &manifest(
            "tick",
            r#""concurrencyPolicy":"Forbid","successfulJobsHistoryLimit":2,"#,
        ),
    );
    let get = |p: &str| s.ok(&["get", "cj", "tick", "-o", &format!("jsonpath={p}")]);
    assert_eq!(get("{.spec.failedJobsHistoryLimit}"), "1");
    assert_eq!(get("{.spec.suspend}"), "false");
    let header = s.ok(&["get", "cj"]);
    assert_eq!(
        header
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["NAME", "SCHEDULE", "TIMEZONE", "SUSPEND", "ACTIVE", "LAST", "SCHEDULE", "AGE"]
    );
    assert!(s.ok(&["get", "all"]).contains("cronjob.batch/tick"));

    // The minutes after the CronJob's creation, and the clock moved to
    // just past each.
    let created = DateTime::parse_from_rfc3339(&get("{.metadata.creationTimestamp}"))
        .unwrap()
        .with_timezone(&Utc);
    let minute = |n: i64| {
        DateTime::from_timestamp((created.timestamp().div_euclid(60) + n) * 60, 0).unwrap()
    };
    let move_to = |t: DateTime<Utc>| clock.advance(t + Span::seconds(5) - clock.now());
    let job_of = |t: DateTime<Utc>| format!("tick-{}", t.timestamp() / 60);

    move_to(minute(1));
    let first = job_of(minute(1));
    wait_for(30, "the first run", || {
        (jobs_named(&s, "tick-") == [first.clone()]).then_some(())
    });
    let job = |j: &str, p: &str| s.ok(&["get", "job", j, "-o", &format!("jsonpath={p}")]);
    assert_eq!(
        job(
            &first,
            "{.metadata.annotations.batch\\.kubernetes\\.io/cronjob-scheduled-timestamp}"
        ),
        minute(1).format("%Y-%m-%dT%H:%M:%SZ").to_string()
    );
    assert_eq!(
        job(&first, "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller}"),
        "CronJob/tick/true"
    );
    wait_for(10, "the run listed active", || {
        (get("{.status.active[*].name}") == first
            && get("{.status.lastScheduleTime}")
                == minute(1).format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .then_some(())
    });

    // Forbid: the next time comes while the first run is active.
    move_to(minute(2));
    wait_for(20, "JobAlreadyActive", || {
        (!s.ok(&[
            "get",
            "events",
            "--field-selector=reason=JobAlreadyActive",
            "-o",
            "name",
        ])
        .trim()
        .is_empty())
        .then_some(())
    });
    assert_eq!(jobs_named(&s, "tick-"), [first.as_str()]);
    // Once it is done, the held time runs (no starting deadline).
    complete_job(&s, &first);
    let second = job_of(minute(2));
    wait_for(30, "the held run", || {
        jobs_named(&s, "tick-").contains(&second).then_some(())
    });
    complete_job(&s, &second);

    // A third success: with a history of 2, the oldest goes.
    move_to(minute(3));
    let third = job_of(minute(3));
    wait_for(30, "the third run", || {
        jobs_named(&s, "tick-").contains(&third).then_some(())
    });
    complete_job(&s, &third);
    wait_for(30, "the oldest finished job deleted", || {
        (jobs_named(&s, "tick-") == [second.clone(), third.clone()]).then_some(())
    });
    wait_for(10, "status after the runs", || {
        (get("{.status.active}").is_empty() && !get("{.status.lastSuccessfulTime}").is_empty())
            .then_some(())
    });

    // kubectl create job --from=cronjob/…
    s.ok(&["create", "job", "by-hand", "--from=cronjob/tick"]);
    assert_eq!(
        job("by-hand", "{.metadata.annotations.cronjob\\.kubernetes\\.io/instantiate}/{.metadata.ownerReferences[0].name}"),
        "manual/tick"
    );

    // Suspended, it starts nothing.
    s.ok(&[
        "patch",
        "cj",
        "tick",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    let row = s.ok(&["get", "cj", "tick", "--no-headers"]);
    assert!(row.contains(" <none> ") && row.contains(" True "), "{row}");
    move_to(minute(4));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(!jobs_named(&s, "tick-").contains(&job_of(minute(4))));

    // Resumed under Replace, the held time runs; when the clock jumps
    // hours ahead, the latest time replaces the active run, with a
    // warning about the times missed.
    s.ok(&[
        "patch",
        "cj",
        "tick",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false,"concurrencyPolicy":"Replace"}}"#,
    ]);
    let fourth = job_of(minute(4));
    wait_for(30, "the resumed run", || {
        jobs_named(&s, "tick-").contains(&fourth).then_some(())
    });
    move_to(minute(200));
    let latest = job_of(minute(200));
    wait_for(30, "the active run replaced", || {
        let jobs = jobs_named(&s, "tick-");
        (jobs.contains(&latest) && !jobs.contains(&fourth)).then_some(())
    });
    wait_for(10, "the replacement listed active", || {
        (get("{.status.active[*].name}") == latest).then_some(())
    });
    let warned = s.ok(&[
        "get",
        "events",
        "--field-selector=reason=TooManyMissedTimes",
        "-o",
        "name",
    ]);
    assert!(!warned.trim().is_empty());
    let wide = s.ok(&["get", "cj", "tick", "-o", "wide"]);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[8..], ["CONTAINERS", "IMAGES", "SELECTOR"], "{wide}");

    // Its Jobs (the manual one too) go with it.
    s.ok(&["delete", "cj", "tick"]);
    wait_for(60, "the cronjob's jobs collected", || {
        (jobs_named(&s, "").is_empty()).then_some(())
    });
    stop.cancel();
}

/// `tapestry server`'s own controller manager, on the system clock: a
/// CronJob due every minute starts its Job when the minute comes.
#[test]
fn cronjob_starts_its_job_on_the_real_clock() {
    if !require_kubectl() {
        return;
    }
    let s = Server::start_with(SERVER_ARGS);
    s.ok(&[
        "create",
        "cronjob",
        "every",
        "--image=busybox",
        "--schedule=*/1 * * * *",
    ]);
    let job = wait_for(75, "the first minute's job", || {
        jobs_named(&s, "every-").into_iter().next()
    });
    let minutes: i64 = job["every-".len()..].parse().expect("minutes in the name");
    let scheduled = s.ok(&[
        "get",
        "job",
        &job,
        "-o",
        "jsonpath={.metadata.annotations.batch\\.kubernetes\\.io/cronjob-scheduled-timestamp}",
    ]);
    let at = chrono::DateTime::parse_from_rfc3339(&scheduled).expect("RFC 3339");
    assert_eq!(at.timestamp(), minutes * 60);
    wait_for(10, "lastScheduleTime", || {
        let last = s.ok(&[
            "get",
            "cj",
            "every",
            "-o",
            "jsonpath={.status.lastScheduleTime}",
        ]);
        (last == scheduled).then_some(())
    });
}
