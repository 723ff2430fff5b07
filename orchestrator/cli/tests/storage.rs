//! Persistent storage through the machine's kubectl against a real
//! `tapestry server` with hollow nodes: StorageClasses, PersistentVolumes
//! and claims as kubectl shows them, binding, refusals naming the field,
//! and a claim in use kept by its finalizer until its pod is gone.

mod common;

use common::{require_kubectl, wait_for, Hollow, Server};

const STATIC: &str = r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: manual
provisioner: kubernetes.io/no-provisioner
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pv-small
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  hostPath: {path: /tmp/tapestry-pv-small}
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pv-big
spec:
  capacity: {storage: 5Gi}
  accessModes: [ReadWriteOnce, ReadOnlyMany]
  storageClassName: manual
  hostPath: {path: /tmp/tapestry-pv-big}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  resources: {requests: {storage: 2Gi}}
"#;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: user
spec:
  containers:
  - name: c
    image: busybox
    volumeMounts: [{name: data, mountPath: /data}]
  volumes:
  - name: data
    persistentVolumeClaim: {claimName: data}
"#;

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

/// The whitespace-separated words of the line of `out` starting with
/// `name`.
fn row(out: &str, name: &str) -> Vec<String> {
    out.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn jsonpath(s: &Server, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let expr = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &expr]);
    s.ok(&args)
}

#[test]
fn a_claim_binds_the_smallest_fitting_volume_and_kubectl_shows_them() {
    let Some((s, _h)) = cluster() else { return };
    s.ok_stdin(&["apply", "-f", "-"], STATIC);
    wait_for(30, "the claim bound", || {
        let phase = jsonpath(&s, &["pvc", "data"], "{.status.phase}");
        (phase == "Bound").then_some(())
    });
    assert_eq!(
        jsonpath(&s, &["pvc", "data"], "{.spec.volumeName}"),
        "pv-big"
    );
    assert_eq!(
        jsonpath(
            &s,
            &["pvc", "data"],
            "{.metadata.annotations.pv\\.kubernetes\\.io/bind-completed}"
        ),
        "yes"
    );
    wait_for(30, "the volume Bound, the other Available", || {
        let big = jsonpath(&s, &["pv", "pv-big"], "{.status.phase}");
        let small = jsonpath(&s, &["pv", "pv-small"], "{.status.phase}");
        (big == "Bound" && small == "Available").then_some(())
    });

    let out = s.ok(&["get", "pv,pvc,sc"]);
    let headers: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("NAME"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        headers,
        [
            "NAME CAPACITY ACCESS MODES RECLAIM POLICY STATUS CLAIM STORAGECLASS VOLUMEATTRIBUTESCLASS REASON AGE",
            "NAME STATUS VOLUME CAPACITY ACCESS MODES STORAGECLASS VOLUMEATTRIBUTESCLASS AGE",
            "NAME PROVISIONER RECLAIMPOLICY VOLUMEBINDINGMODE ALLOWVOLUMEEXPANSION AGE",
        ],
        "{out}"
    );
    assert_eq!(
        row(&out, "persistentvolume/pv-big")[1..8],
        [
            "5Gi",
            "RWO,ROX",
            "Retain",
            "Bound",
            "default/data",
            "manual",
            "<unset>"
        ]
        .map(String::from),
        "{out}"
    );
    assert_eq!(
        row(&out, "persistentvolumeclaim/data")[1..7],
        ["Bound", "pv-big", "5Gi", "RWO,ROX", "manual", "<unset>"].map(String::from),
        "{out}"
    );
    assert_eq!(
        row(&out, "storageclass.storage.k8s.io/manual")[1..5],
        [
            "kubernetes.io/no-provisioner",
            "Delete",
            "Immediate",
            "false"
        ]
        .map(String::from),
        "{out}"
    );
    let short = s.ok(&["get", "sc", "--no-headers"]);
    assert!(
        short.lines().any(|l| l.starts_with("local-path (default)")),
        "the built-in default class: {short}"
    );
}

#[test]
fn bad_volumes_and_claims_are_refused_naming_the_field() {
    let Some((s, _h)) = cluster() else { return };
    let err = s
        .kubectl_stdin(
            &["apply", "-f", "-"],
            r#"
apiVersion: v1
kind: PersistentVolume
metadata: {name: bad}
spec:
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Keep
  hostPath: {path: /tmp/a}
  nfs: {server: nfs.example.com, path: /b}
"#,
        )
        .stderr;
    let err = String::from_utf8_lossy(&err);
    for want in [
        "spec.capacity: Required value",
        "spec.persistentVolumeReclaimPolicy: Unsupported value: \"Keep\"",
        "spec.nfs: Forbidden: may not specify more than 1 volume type",
    ] {
        assert!(err.contains(want), "{want} in: {err}");
    }
    let out = s.kubectl_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: c}\nspec: {}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.accessModes: Required value")
            && err.contains("spec.resources[storage]: Required value"),
        "{err}"
    );
    // A bound claim's spec is fixed but for its storage request.
    s.ok_stdin(&["apply", "-f", "-"], STATIC);
    wait_for(30, "the claim bound", || {
        (jsonpath(&s, &["pvc", "data"], "{.status.phase}") == "Bound").then_some(())
    });
    let err = s.fails(&[
        "patch",
        "pvc",
        "data",
        "--type=merge",
        "-p",
        r#"{"spec":{"accessModes":["ReadWriteMany"]}}"#,
    ]);
    assert!(
        err.contains("spec: Forbidden: spec is immutable after creation"),
        "{err}"
    );
    let err = s.fails(&[
        "patch",
        "sc",
        "manual",
        "--type=merge",
        "-p",
        r#"{"provisioner":"example.com/other"}"#,
    ]);
    assert!(
        err.contains("provisioner: Forbidden: updates to provisioner are forbidden."),
        "{err}"
    );
}

#[test]
fn a_claim_in_use_is_kept_until_its_pod_is_gone() {
    let Some((s, _h)) = cluster() else { return };
    s.ok_stdin(&["apply", "-f", "-"], STATIC);
    s.ok_stdin(&["apply", "-f", "-"], POD);
    wait_for(60, "the pod running", || {
        (jsonpath(&s, &["pod", "user"], "{.status.phase}") == "Running").then_some(())
    });
    assert_eq!(
        jsonpath(&s, &["pvc", "data"], "{.metadata.finalizers}"),
        r#"["kubernetes.io/pvc-protection"]"#
    );
    s.ok(&["delete", "pvc", "data", "--wait=false"]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = s.ok(&["get", "pvc", "data", "--no-headers"]);
    assert_eq!(row(&out, "data")[1], "Terminating", "{out}");

    s.ok(&["delete", "pod", "user", "--wait=false"]);
    wait_for(60, "the claim gone with its pod", || {
        let out = s.kubectl(&["get", "pvc", "data"]);
        (!out.status.success()).then_some(())
    });
    // Retain: the volume keeps its data, Released.
    wait_for(30, "the volume Released", || {
        (jsonpath(&s, &["pv", "pv-big"], "{.status.phase}") == "Released").then_some(())
    });
    // A volume not bound goes when deleted.
    s.ok(&["delete", "pv", "pv-small"]);
}
