//! RBAC as a cluster's users meet it: credentials minted with `tapestry
//! user add`, roles bound with kubectl, refusals worded like
//! kube-apiserver's, and `kubectl auth can-i` / `whoami` answering.

mod common;

use std::process::Command;

use common::{require_kubectl, wait_for, Server};

/// A kubeconfig for a new user in `groups`, from `tapestry user add`.
fn add_user(server: &Server, name: &str, groups: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tapestry"));
    cmd.args(["user", "add", name, "--data-dir"])
        .arg(server.data_dir());
    for g in groups {
        cmd.args(["--group", g]);
    }
    let out = cmd.output().expect("running tapestry user add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// kubectl as the user of `kubeconfig`, with the arguments of
/// `command_line`: (success, stdout, stderr).
fn as_user(kubeconfig: &str, command_line: &str) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(command_line.split_whitespace())
        .output()
        .expect("running kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_viewer_sees_only_what_view_grants_in_its_namespace() {
    if !require_kubectl() {
        return;
    }
    let server = Server::start();
    server.ok(&["create", "namespace", "a"]);
    server.ok(&["create", "namespace", "b"]);
    server.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "a",
        "--from-literal=k=v",
    ]);
    server.ok(&["create", "configmap", "c", "-n", "a", "--from-literal=k=v"]);

    let alice = add_user(&server, "alice", &["developers"]);
    // The server reads its token file again within a second; until then
    // and until a binding exists, alice is who she is and may do nothing.
    let (_, _, err) = wait_for(10, "alice authenticated", || {
        let r = as_user(&alice, "get pods -n a");
        (!r.2.contains("provide credentials")).then_some(r)
    });
    assert!(
        err.contains(r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "a""#),
        "{err}"
    );

    server.ok(&[
        "create",
        "rolebinding",
        "alice-view",
        "-n",
        "a",
        "--clusterrole=view",
        "--user=alice",
    ]);
    wait_for(10, "the binding in force", || {
        as_user(&alice, "get configmaps -n a").0.then_some(())
    });
    let (ok, out, _) = as_user(&alice, "get configmaps -n a -o name");
    assert!(ok && out.contains("configmap/c"), "{out}");
    let (ok, _, err) = as_user(&alice, "get secrets -n a");
    assert!(!ok);
    assert!(
        err.contains(r#"secrets is forbidden: User "alice" cannot list resource "secrets" in API group "" in the namespace "a""#),
        "{err}"
    );
    let (ok, _, err) = as_user(&alice, "get pods -n b");
    assert!(!ok && err.contains(r#"in the namespace "b""#), "{err}");
    let (ok, _, err) = as_user(&alice, "get nodes");
    assert!(!ok && err.contains("at the cluster scope"), "{err}");
    let (ok, _, err) = as_user(&alice, "delete configmap c -n a");
    assert!(
        !ok && err.contains(r#"configmaps "c" is forbidden"#),
        "{err}"
    );

    // kubectl auth can-i, one question and the whole list.
    let can = |question: &str| {
        as_user(&alice, &format!("auth can-i {question}"))
            .1
            .trim()
            .to_string()
    };
    assert_eq!(can("list pods -n a"), "yes");
    assert_eq!(can("list secrets -n a"), "no");
    assert_eq!(can("create deployments -n a"), "no");
    assert_eq!(can("list pods -n b"), "no");
    let (ok, list, err) = as_user(&alice, "auth can-i --list -n a");
    assert!(ok, "{err}");
    let pods_line = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some("pods"))
        .unwrap_or_else(|| panic!("no pods line in:\n{list}"));
    assert!(
        pods_line.contains("get") && pods_line.contains("list"),
        "{list}"
    );
    assert!(
        !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some("secrets")),
        "view lists no secrets:\n{list}"
    );
    assert!(
        list.contains("selfsubjectaccessreviews.authorization.k8s.io"),
        "{list}"
    );
    // The admin, in system:masters, may do anything.
    assert_eq!(
        String::from_utf8_lossy(&server.kubectl(&["auth", "can-i", "delete", "nodes"]).stdout)
            .trim(),
        "yes"
    );

    // The admin may act as alice (kubectl --as); alice may not act as
    // anyone.
    let out = server.kubectl(&[
        "get",
        "secrets",
        "-n",
        "a",
        "--as=alice",
        "--as-group=developers",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(r#"User "alice" cannot list resource "secrets""#),
        "{err}"
    );
    assert!(server
        .kubectl(&["get", "configmaps", "-n", "a", "--as=alice"])
        .status
        .success());
    let (ok, _, err) = as_user(&alice, "get pods -n a --as=admin");
    assert!(
        !ok && err.contains(r#"cannot impersonate resource "users""#),
        "{err}"
    );

    // kubectl auth whoami.
    let (ok, who, err) = as_user(&alice, "auth whoami");
    assert!(ok, "{err}");
    assert!(who.contains("alice"), "{who}");
    assert!(
        who.contains("developers") && who.contains("system:authenticated"),
        "{who}"
    );
}

#[test]
fn an_editor_cannot_bind_cluster_admin_and_the_bootstrap_roles_are_there() {
    if !require_kubectl() {
        return;
    }
    let server = Server::start();
    for role in [
        "cluster-admin",
        "admin",
        "edit",
        "view",
        "system:node",
        "system:discovery",
    ] {
        server.ok(&["get", "clusterrole", role]);
    }
    server.ok(&["create", "namespace", "a"]);
    let bob = add_user(&server, "bob", &[]);
    server.ok(&[
        "create",
        "rolebinding",
        "bob-edit",
        "-n",
        "a",
        "--clusterrole=edit",
        "--user=bob",
    ]);
    wait_for(10, "bob's binding in force", || {
        as_user(&bob, "get deployments -n a").0.then_some(())
    });
    let (ok, _, err) = as_user(&bob, "create deployment web -n a --image=busybox:local");
    assert!(ok, "edit creates workloads: {err}");
    let (ok, _, err) = as_user(
        &bob,
        "create rolebinding root -n a --clusterrole=cluster-admin --user=bob",
    );
    assert!(!ok);
    assert!(
        err.contains(r#"User "bob" cannot create resource "rolebindings" in API group "rbac.authorization.k8s.io" in the namespace "a""#),
        "{err}"
    );
    // A namespace admin may bind what it holds, not more.
    let carol = add_user(&server, "carol", &[]);
    server.ok(&[
        "create",
        "rolebinding",
        "carol-admin",
        "-n",
        "a",
        "--clusterrole=admin",
        "--user=carol",
    ]);
    wait_for(10, "carol's binding in force", || {
        as_user(&carol, "get rolebindings -n a").0.then_some(())
    });
    let (ok, _, err) = as_user(
        &carol,
        "create rolebinding dev -n a --clusterrole=edit --user=dave",
    );
    assert!(ok, "admin holds every rule of edit: {err}");
    let (ok, _, err) = as_user(
        &carol,
        "create rolebinding root -n a --clusterrole=cluster-admin --user=carol",
    );
    assert!(!ok);
    assert!(
        err.contains(r#"user "carol" is attempting to grant RBAC permissions not currently held"#),
        "{err}"
    );
    let (ok, _, err) = as_user(
        &carol,
        "create role secrets-everywhere -n a --verb=* --resource=*.*",
    );
    assert!(!ok && err.contains("not currently held"), "{err}");
    // A deleted binding stops granting.
    server.ok(&["delete", "rolebinding", "bob-edit", "-n", "a"]);
    wait_for(10, "bob's rights gone", || {
        (!as_user(&bob, "get deployments -n a").0).then_some(())
    });
}
