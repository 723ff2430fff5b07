//! HorizontalPodAutoscalers through the machine's kubectl against real
//! `tapestry server` and `tapestry hollow` processes: `kubectl autoscale`,
//! `kubectl get hpa` columns, one object seen through autoscaling/v2 and
//! autoscaling/v1, Kubernetes' defaults and field errors, and the
//! controller acting on what it can see without metrics (hollow pods have
//! none): the bounds are enforced and a missing CPU request is reported.

mod common;

use common::{require_kubectl, wait_for, Hollow, Server};
use serde_json::{json, Value};

fn cluster() -> Option<(Server, Hollow)> {
    if !require_kubectl() {
        return None;
    }
    let s = Server::start_with(&[
        "--leader-elect=false",
        "--horizontal-pod-autoscaler-sync-period=2s",
    ]);
    let h = Hollow::start(&s, "hollow", 1);
    wait_for(30, "a Ready node", || {
        let out = s.ok(&["get", "nodes", "--no-headers"]);
        out.contains(" Ready").then_some(())
    });
    Some((s, h))
}

fn get_json(s: &Server, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&s.ok(&all)).expect("json")
}

fn condition<'a>(hpa: &'a Value, kind: &str) -> Option<&'a Value> {
    hpa.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

#[test]
fn kubectl_autoscale_and_both_versions() {
    let Some((s, _h)) = cluster() else { return };
    let served = s.ok(&["api-resources", "--api-group=autoscaling"]);
    let line = served
        .lines()
        .find(|l| l.starts_with("horizontalpodautoscalers"))
        .unwrap_or_else(|| panic!("{served}"));
    assert!(
        line.split_whitespace().collect::<Vec<_>>()
            == [
                "horizontalpodautoscalers",
                "hpa",
                "autoscaling/v2",
                "true",
                "HorizontalPodAutoscaler"
            ],
        "{served}"
    );
    let all = s.ok(&["api-resources", "--categories=all", "-o", "name"]);
    assert!(
        all.contains("horizontalpodautoscalers.autoscaling"),
        "{all}"
    );
    let explain = s.ok(&["explain", "hpa.spec.maxReplicas"]);
    assert!(explain.contains("autoscaling"), "{explain}");

    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=1",
    ]);
    let out = s.ok(&[
        "autoscale",
        "deployment",
        "web",
        "--cpu-percent=50",
        "--min=1",
        "--max=5",
    ]);
    assert!(
        out.contains("horizontalpodautoscaler.autoscaling/web autoscaled"),
        "{out}"
    );

    // kubectl get hpa: Kubernetes' columns.
    let table = wait_for(30, "the autoscaler seeing 1 replica", || {
        let t = s.ok(&["get", "hpa"]);
        let row: Vec<String> = t
            .lines()
            .nth(1)?
            .split_whitespace()
            .map(String::from)
            .collect();
        (row.get(6).map(String::as_str) == Some("1")).then_some(t)
    });
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "REFERENCE",
            "TARGETS",
            "MINPODS",
            "MAXPODS",
            "REPLICAS",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..7],
        [
            "web",
            "Deployment/web",
            "cpu:",
            "<unknown>/50%",
            "1",
            "5",
            "1"
        ],
        "{table}"
    );

    // One object, two versions that agree.
    let v2 = get_json(
        &s,
        &["get", "horizontalpodautoscalers.v2.autoscaling", "web"],
    );
    let v1 = get_json(
        &s,
        &["get", "horizontalpodautoscalers.v1.autoscaling", "web"],
    );
    assert_eq!(v2["apiVersion"], "autoscaling/v2");
    assert_eq!(v1["apiVersion"], "autoscaling/v1");
    assert_eq!(v1["metadata"]["uid"], v2["metadata"]["uid"]);
    assert_eq!(v1["spec"]["scaleTargetRef"], v2["spec"]["scaleTargetRef"]);
    assert_eq!(v1["spec"]["minReplicas"], 1);
    assert_eq!(v2["spec"]["minReplicas"], 1);
    assert_eq!(v1["spec"]["maxReplicas"], 5);
    assert_eq!(v2["spec"]["maxReplicas"], 5);
    assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
    assert_eq!(
        v2["spec"]["metrics"],
        json!([{"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 50}}}])
    );
    assert_eq!(
        v1["status"]["currentReplicas"],
        v2["status"]["currentReplicas"]
    );
    assert_eq!(
        v1["status"]["desiredReplicas"],
        v2["status"]["desiredReplicas"]
    );
    // v1 carries v2's conditions in Kubernetes' annotation.
    let conditions = v1["metadata"]["annotations"]["autoscaling.alpha.kubernetes.io/conditions"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(conditions.contains("ScalingActive"), "{v1}");

    // The pods have no CPU request: the autoscaler says so and leaves the
    // replica count alone.
    let hpa = wait_for(30, "ScalingActive=False", || {
        let h = get_json(&s, &["get", "hpa", "web"]);
        (condition(&h, "ScalingActive")?["status"] == "False").then_some(h)
    });
    let active = condition(&hpa, "ScalingActive").unwrap();
    assert_eq!(active["reason"], "FailedGetResourceMetric", "{hpa}");
    let message = active["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("missing request for cpu in container busybox of Pod web-"),
        "{hpa}"
    );
    assert_eq!(
        s.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "1"
    );
    let events = s.ok(&[
        "get",
        "events",
        "--field-selector=involvedObject.kind=HorizontalPodAutoscaler,reason=FailedGetResourceMetric",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains("missing request for cpu"), "{events}");
    // Reported once, not on every 2 s sync.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let events = s.ok(&[
        "get",
        "events",
        "--field-selector=involvedObject.kind=HorizontalPodAutoscaler,reason=FailedGetResourceMetric",
        "-o",
        "name",
    ]);
    assert_eq!(events.lines().count(), 1, "{events}");

    // A v2-only metric survives a round trip through v1.
    s.ok_stdin(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "mem", "namespace": "default"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nothing"},
                "maxReplicas": 3,
                "metrics": [{"type": "Resource", "resource": {"name": "memory",
                    "target": {"type": "AverageValue", "averageValue": "100Mi"}}}],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 10}}}})
        .to_string(),
    );
    let mut v1 = get_json(
        &s,
        &["get", "horizontalpodautoscalers.v1.autoscaling", "mem"],
    );
    assert!(
        v1["spec"].get("targetCPUUtilizationPercentage").is_none(),
        "{v1}"
    );
    assert!(
        v1["metadata"]["annotations"]["autoscaling.tapestry.io/metrics"]
            .as_str()
            .is_some_and(|m| m.contains("100Mi")),
        "{v1}"
    );
    v1["spec"]["maxReplicas"] = json!(4);
    s.ok_stdin(&["replace", "-f", "-"], &v1.to_string());
    let v2 = get_json(
        &s,
        &["get", "horizontalpodautoscalers.v2.autoscaling", "mem"],
    );
    assert_eq!(v2["spec"]["maxReplicas"], 4);
    assert_eq!(
        v2["spec"]["metrics"][0]["resource"]["target"]["averageValue"], "100Mi",
        "{v2}"
    );
    assert_eq!(
        v2["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
        10
    );
    assert!(v2["metadata"]["annotations"]
        .get("autoscaling.tapestry.io/metrics")
        .is_none());
    s.ok(&["delete", "hpa", "mem"]);
}

#[test]
fn defaults_and_field_errors() {
    let Some((s, _h)) = cluster() else { return };
    let hpa = |spec: Value| {
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "web", "namespace": "default"}, "spec": spec})
        .to_string()
    };
    let target = json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"});

    // Kubernetes' defaults.
    s.ok_stdin(
        &["create", "-f", "-"],
        &hpa(json!({"scaleTargetRef": target, "maxReplicas": 3,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 30}}})),
    );
    let got = get_json(&s, &["get", "hpa", "web"]);
    assert_eq!(got["spec"]["minReplicas"], 1, "{got}");
    assert_eq!(
        got["spec"]["metrics"],
        json!([{"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 80}}}])
    );
    assert_eq!(
        got["spec"]["behavior"],
        json!({
            "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
                {"type": "Pods", "value": 4, "periodSeconds": 15},
                {"type": "Percent", "value": 100, "periodSeconds": 15}]},
            "scaleDown": {"stabilizationWindowSeconds": 30, "selectPolicy": "Max", "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15}]}})
    );
    let v1 = get_json(
        &s,
        &["get", "horizontalpodautoscalers.v1.autoscaling", "web"],
    );
    assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 80, "{v1}");
    s.ok(&["delete", "hpa", "web"]);

    // Field errors worded as kube-apiserver words them.
    let cases = [
        (
            json!({"scaleTargetRef": target, "minReplicas": 2, "maxReplicas": 0}),
            vec![
                "spec.maxReplicas: Invalid value: 0: must be greater than 0",
                "spec.maxReplicas: Invalid value: 0: must be greater than or equal to `minReplicas`",
            ],
        ),
        (
            json!({"scaleTargetRef": target, "minReplicas": 0, "maxReplicas": 3}),
            vec!["spec.minReplicas: Invalid value: 0: must be greater than or equal to 1"],
        ),
        (
            json!({"scaleTargetRef": {"name": "web"}, "maxReplicas": 3}),
            vec!["spec.scaleTargetRef.kind: Required value"],
        ),
        (
            json!({"scaleTargetRef": target, "maxReplicas": 3, "metrics": [
                {"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 0}}},
                {"type": "Magic"}]}),
            vec![
                "spec.metrics[0].resource.target.averageUtilization: Invalid value: 0: must be greater than 0",
                "spec.metrics[1].type: Unsupported value: \"Magic\"",
            ],
        ),
    ];
    for (spec, wanted) in cases {
        let out = s.kubectl_stdin(&["create", "-f", "-"], &hpa(spec.clone()));
        assert!(!out.status.success(), "{spec} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("The HorizontalPodAutoscaler \"web\" is invalid"),
            "{err}"
        );
        for w in wanted {
            assert!(err.contains(w), "{spec}: wanted {w:?} in {err}");
        }
    }
    // The v1 field is checked too.
    let out = s.kubectl_stdin(
        &["create", "-f", "-"],
        &json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "old", "namespace": "default"},
            "spec": {"scaleTargetRef": target, "maxReplicas": 3,
                "targetCPUUtilizationPercentage": -5}})
        .to_string(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "spec.targetCPUUtilizationPercentage: Invalid value: -5: must be greater than 0"
        ),
        "{err}"
    );
}

#[test]
fn replicas_are_kept_within_bounds() {
    let Some((s, _h)) = cluster() else { return };
    s.ok(&[
        "create",
        "deployment",
        "big",
        "--image=busybox",
        "--replicas=4",
    ]);
    s.ok(&["autoscale", "deployment", "big", "--min=1", "--max=2"]);
    wait_for(30, "the Deployment scaled to maxReplicas", || {
        (s.ok(&[
            "get",
            "deployment",
            "big",
            "-o",
            "jsonpath={.spec.replicas}",
        ]) == "2")
            .then_some(())
    });
    let hpa = wait_for(30, "the rescale in status", || {
        let h = get_json(&s, &["get", "hpa", "big"]);
        (h["status"]["desiredReplicas"] == 2 && h["status"]["lastScaleTime"].is_string())
            .then_some(h)
    });
    assert_eq!(
        condition(&hpa, "ScalingLimited").unwrap()["reason"],
        "TooManyReplicas",
        "{hpa}"
    );
    let events = wait_for(30, "a SuccessfulRescale event", || {
        let e = s.ok(&[
            "get",
            "events",
            "--field-selector=reason=SuccessfulRescale",
            "-o",
            "jsonpath={.items[*].message}",
        ]);
        (!e.is_empty()).then_some(e)
    });
    assert!(
        events.contains("New size: 2; reason: Current number of replicas above Spec.MaxReplicas"),
        "{events}"
    );
}
