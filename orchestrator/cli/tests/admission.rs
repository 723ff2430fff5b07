//! Admission of what real manifests use, driven by the machine's kubectl
//! against real `tapestry server` and `tapestry hollow` processes:
//! LimitRanges filling container defaults and refusing pods outside their
//! bounds, ResourceQuotas refusing what would exceed them (also under
//! concurrent creates) and giving usage back when objects go; Ingresses,
//! IngressClasses and NetworkPolicies validated and printed as kubectl
//! prints them; PriorityClasses setting pods' priority.

mod common;

use std::sync::Arc;

use common::{require_kubectl, wait_for, Hollow, Server};

fn cluster() -> Option<(Server, Hollow)> {
    if !require_kubectl() {
        return None;
    }
    let s = Server::start_with(&["--leader-elect=false"]);
    let h = Hollow::start(&s, "hollow", 1);
    wait_for(30, "a Ready node", || {
        let out = s.ok(&["get", "nodes", "--no-headers"]);
        out.contains(" Ready").then_some(())
    });
    Some((s, h))
}

fn pod(name: &str, resources: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: c\n    image: busybox\n{resources}"
    )
}

fn cpu(request: &str, limit: &str) -> String {
    format!("    resources:\n      requests:\n        cpu: {request}\n      limits:\n        cpu: {limit}\n")
}

/// Wait until the quota controller has published `status.used`.
fn wait_counted(s: &Server, ns: &str, quota: &str, used_pods: &str) {
    wait_for(30, "the quota's status.used", || {
        let out = s.ok(&[
            "get",
            "quota",
            quota,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.used.pods}",
        ]);
        (out == used_pods).then_some(())
    });
}

#[test]
fn limit_ranges_fill_defaults_and_refuse_pods_over_max() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&["create", "namespace", "lr"]);
    s.ok_stdin(
        &["apply", "-n", "lr", "-f", "-"],
        "apiVersion: v1\nkind: LimitRange\nmetadata:\n  name: bounds\nspec:\n  limits:\n  - type: Container\n    max:\n      cpu: \"1\"\n    default:\n      cpu: 500m\n      memory: 128Mi\n    defaultRequest:\n      cpu: 100m\n",
    );
    let table = s.ok(&["get", "limits", "-n", "lr"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.lines().next().unwrap().contains("CREATED AT"),
        "{table}"
    );
    assert!(table.contains("bounds"), "{table}");

    s.ok_stdin(&["apply", "-n", "lr", "-f", "-"], &pod("plain", ""));
    let resources = s.ok(&[
        "get", "pod", "plain", "-n", "lr", "-o",
        "jsonpath={.spec.containers[0].resources.requests.cpu} {.spec.containers[0].resources.limits.cpu} {.spec.containers[0].resources.limits.memory} {.status.qosClass}",
    ]);
    assert_eq!(resources, "100m 500m 128Mi Burstable");

    let out = s.kubectl_stdin(
        &["apply", "-n", "lr", "-f", "-"],
        &pod("big", &cpu("2", "2")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "pods \"big\" is forbidden: maximum cpu usage per Container is 1, but limit is 2"
        ),
        "{err}"
    );

    let out = s.kubectl_stdin(
        &["apply", "-n", "lr", "-f", "-"],
        "apiVersion: v1\nkind: LimitRange\nmetadata:\n  name: upside-down\nspec:\n  limits:\n  - type: Container\n    max:\n      cpu: \"1\"\n    min:\n      cpu: \"2\"\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.limits[0].min[cpu]: Invalid value: \"2\": min value 2 is greater than max value 1"),
        "{err}"
    );
}

#[test]
fn a_quota_refuses_the_pod_past_its_limit_and_takes_it_after_a_deletion() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&["create", "namespace", "q"]);
    s.ok_stdin(
        &["apply", "-n", "q", "-f", "-"],
        "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: q\nspec:\n  hard:\n    pods: \"2\"\n    requests.cpu: \"1\"\n",
    );
    wait_counted(&s, "q", "q", "0");
    let table = s.ok(&["get", "quota", "-n", "q"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "AGE", "REQUEST", "LIMIT"], "{table}");
    assert!(table.contains("pods: 0/2, requests.cpu: 0/1"), "{table}");

    // A pod that does not say what it requests cannot be counted.
    let out = s.kubectl_stdin(&["apply", "-n", "q", "-f", "-"], &pod("bare", ""));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "pods \"bare\" is forbidden: failed quota: q: must specify requests.cpu for: c"
        ),
        "{err}"
    );

    for name in ["a", "b"] {
        s.ok_stdin(
            &["apply", "-n", "q", "-f", "-"],
            &pod(name, &cpu("100m", "100m")),
        );
    }
    let out = s.kubectl_stdin(
        &["apply", "-n", "q", "-f", "-"],
        &pod("c", &cpu("100m", "100m")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pods \"c\" is forbidden: exceeded quota: q, requested: pods=1, used: pods=2, limited: pods=2"),
        "{err}"
    );
    let table = s.ok(&["get", "quota", "q", "-n", "q", "--no-headers"]);
    assert!(table.contains("pods: 2/2, requests.cpu: 200m/1"), "{table}");

    s.ok(&["delete", "pod", "a", "-n", "q", "--wait=true"]);
    wait_for(30, "the deleted pod's usage given back", || {
        let out = s.kubectl_stdin(
            &["apply", "-n", "q", "-f", "-"],
            &pod("c", &cpu("100m", "100m")),
        );
        out.status.success().then_some(())
    });
    wait_counted(&s, "q", "q", "2");
}

#[test]
fn concurrent_creates_never_exceed_a_quota() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&["create", "namespace", "burst"]);
    s.ok_stdin(
        &["apply", "-n", "burst", "-f", "-"],
        "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: five\nspec:\n  hard:\n    pods: \"5\"\n    count/configmaps: \"3\"\n",
    );
    wait_counted(&s, "burst", "five", "0");
    let s = Arc::new(s);
    let threads: Vec<_> = (0..10)
        .map(|k| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.kubectl_stdin(
                    &["create", "-n", "burst", "-f", "-"],
                    &pod(&format!("p{k}"), ""),
                )
            })
        })
        .collect();
    let mut created = 0;
    for t in threads {
        let out = t.join().unwrap();
        if out.status.success() {
            created += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("exceeded quota: five"), "{err}");
        }
    }
    assert_eq!(created, 5);
    let pods = s.ok(&["get", "pods", "-n", "burst", "--no-headers"]);
    assert_eq!(pods.lines().count(), 5, "{pods}");

    // Other counted kinds: ConfigMaps (kube-root-ca.crt among them) are
    // taken until the quota is full, then refused.
    let mut refusal = None;
    for k in 0..4 {
        let out = s.kubectl(&["create", "configmap", &format!("cm{k}"), "-n", "burst"]);
        if !out.status.success() {
            refusal = Some((k, String::from_utf8_lossy(&out.stderr).into_owned()));
            break;
        }
    }
    let (k, err) = refusal.expect("a fourth ConfigMap refused");
    assert!(
        err.contains(&format!("configmaps \"cm{k}\" is forbidden: exceeded quota: five, requested: count/configmaps=1, used: count/configmaps=3, limited: count/configmaps=3")),
        "{err}"
    );
    let maps = s.ok(&["get", "configmaps", "-n", "burst", "--no-headers"]);
    assert_eq!(maps.lines().count(), 3, "{maps}");
}

#[test]
fn ingresses_classes_and_network_policies_apply_and_print_kubectl_columns() {
    let Some((s, _h)) = cluster() else { return };
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: nginx\n  annotations:\n    ingressclass.kubernetes.io/is-default-class: \"true\"\nspec:\n  controller: k8s.io/ingress-nginx\n",
    );
    let classes = s.ok(&["get", "ingressclass"]);
    let header: Vec<&str> = classes.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "CONTROLLER", "PARAMETERS", "AGE"],
        "{classes}"
    );
    assert!(classes.contains("k8s.io/ingress-nginx"), "{classes}");

    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: web\nspec:\n  rules:\n  - host: web.example.com\n    http:\n      paths:\n      - path: /\n        pathType: Prefix\n        backend:\n          service:\n            name: web\n            port:\n              number: 80\n",
    );
    let ing = s.ok(&["get", "ing"]);
    let header: Vec<&str> = ing.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS", "AGE"],
        "{ing}"
    );
    let row: Vec<&str> = ing.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["web", "nginx", "web.example.com", "80"], "{ing}");

    let out = s.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: bad\nspec:\n  rules:\n  - http:\n      paths:\n      - path: api\n        pathType: Prefix\n        backend:\n          service:\n            name: web\n            port:\n              number: 80\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "spec.rules[0].http.paths[0].path: Invalid value: \"api\": must be an absolute path"
        ),
        "{err}"
    );

    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: db\nspec:\n  podSelector:\n    matchLabels:\n      app: db\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: web\n    ports:\n    - port: 5432\n",
    );
    let pol = s.ok(&["get", "netpol"]);
    let header: Vec<&str> = pol.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "POD-SELECTOR", "AGE"], "{pol}");
    assert!(pol.contains("app=db"), "{pol}");
    let types = s.ok(&["get", "netpol", "db", "-o", "jsonpath={.spec.policyTypes}"]);
    assert_eq!(types, "[\"Ingress\"]");
}

#[test]
fn priority_classes_set_pod_priority() {
    let Some((s, _h)) = cluster() else { return };
    let pcs = s.ok(&["get", "pc"]);
    let header: Vec<&str> = pcs.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "VALUE", "GLOBAL-DEFAULT", "AGE", "PREEMPTIONPOLICY"],
        "{pcs}"
    );
    assert!(pcs.contains("system-cluster-critical"), "{pcs}");
    assert!(pcs.contains("2000001000"), "{pcs}");
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata:\n  name: high\nvalue: 1000\nglobalDefault: false\n",
    );
    s.ok_stdin(
        &["apply", "-f", "-"],
        &pod("important", "").replace("spec:\n", "spec:\n  priorityClassName: high\n"),
    );
    let prio = s.ok(&["get", "pod", "important", "-o", "jsonpath={.spec.priority}"]);
    assert_eq!(prio, "1000");
    let out = s.kubectl_stdin(
        &["apply", "-f", "-"],
        &pod("stray", "").replace("spec:\n", "spec:\n  priorityClassName: foo\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pods \"stray\" is forbidden: no PriorityClass with name foo was found"),
        "{err}"
    );
    let err = s.fails(&["create", "priorityclass", "huge", "--value=2000000000"]);
    assert!(
        err.contains("maximum allowed value of a user defined priority is 1000000000"),
        "{err}"
    );
}
