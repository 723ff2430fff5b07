//! RBAC as a cluster's users meet it: credentials minted with `tapestry
//! user add`, roles bound with kubectl, refusals worded like
//! kube-apiserver's, and `kubectl auth can-i` / `whoami` answering.

mod common;

use std::process::Command;

use common::{require_kubectl, wait_for, Server};

/// `tapestry ARGS --data-dir DIR` on the server's data directory: its
/// output, trimmed.
fn tapestry_ok(server: &Server, args: &[&str]) -> String {
    let (ok, out, err) = tapestry_run(server, args);
    assert!(ok, "tapestry {}: {err}", args.join(" "));
    out
}

/// `tapestry ARGS --data-dir DIR`: (success, stdout trimmed, stderr).
fn tapestry_run(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tapestry"))
        .args(args)
        .arg("--data-dir")
        .arg(server.data_dir())
        .output()
        .expect("running tapestry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A kubeconfig for a new user in `groups`, from `tapestry user add`.
fn add_user(server: &Server, name: &str, groups: &[&str]) -> String {
    let mut args = vec!["user", "add", name];
    for g in groups {
        args.extend(["--group", g]);
    }
    tapestry_ok(server, &args)
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
        (!unauthenticated(&r.2)).then_some(r)
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

/// The data directory holds every Secret (the store), the CA's key and
/// every token: after a start under umask 000 only root can read them.
/// The scheduler and controller manager have roles of their own, nodes
/// join with bootstrap tokens that can do nothing but ask for a
/// certificate, and the review kinds are in discovery.
#[test]
fn components_and_joining_nodes_get_only_their_own_rights() {
    if !require_kubectl() {
        return;
    }
    let server = Server::start();
    let can = |who: &str, question: &str| {
        let mut args = vec!["auth", "can-i", "--as", who];
        args.extend(question.split_whitespace());
        let out = server.kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let scheduler = "system:kube-scheduler";
    assert_eq!(
        can(scheduler, "create pods --subresource=binding -n default"),
        "yes"
    );
    assert_eq!(can(scheduler, "list nodes"), "yes");
    assert_eq!(can(scheduler, "get secrets -n default"), "no");
    assert_eq!(can(scheduler, "create pods -n default"), "no");
    let manager = "system:kube-controller-manager";
    assert_eq!(can(manager, "create pods -n default"), "yes");
    assert_eq!(can(manager, "delete secrets -n default"), "yes");
    assert_eq!(can(manager, "create secrets -n default"), "no");
    assert_eq!(can(manager, "escalate clusterroles"), "no");
    assert_eq!(can(manager, "impersonate users"), "no");
    // The scheduler and controllers at work under those identities.
    server.ok(&["create", "deployment", "web", "--image=busybox:local"]);
    wait_for(20, "the deployment's replica set", || {
        let out = server.ok(&["get", "replicasets", "-o", "name"]);
        out.contains("replicaset.apps/web-").then_some(())
    });

    // A bootstrap token authenticates as system:bootstrap:ID and may only
    // ask for certificates.
    let token = tapestry_ok(&server, &["token", "create", "--ttl", "10m"]);
    let (id, _) = token.split_once('.').expect("ID.SECRET");
    let (ok, whoami) = with_token(&server, &token, "auth whoami");
    assert!(
        ok && whoami.contains(&format!("system:bootstrap:{id}"))
            && whoami.contains("system:bootstrappers"),
        "{whoami}"
    );
    let (ok, out) = with_token(&server, &token, "get csr");
    assert!(ok, "{out}");
    let (ok, out) = with_token(&server, &token, "get pods");
    assert!(!ok && out.contains("forbidden"), "{out}");
    let (ok, out) = with_token(&server, &token, "get secrets -n kube-system");
    assert!(!ok && out.contains("forbidden"), "{out}");
    let (ok, out) = with_token(&server, "abcdef.0123456789abcdef", "get csr");
    assert!(!ok && unauthenticated(&out), "{out}");
    let (ok, _, err) = tapestry_run(&server, &["token", "create", "--ttl", "5s"]);
    assert!(!ok && err.contains("--ttl"), "{err}");

    let resources = server.ok(&["api-resources", "--api-group=authorization.k8s.io"]);
    assert!(
        resources.contains("selfsubjectaccessreviews"),
        "{resources}"
    );
    let resources = server.ok(&["api-resources", "--api-group=certificates.k8s.io"]);
    assert!(
        resources.contains("certificatesigningrequests") && resources.contains("csr"),
        "{resources}"
    );
}

#[test]
fn the_data_directory_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = tapestry_store::conformance::free_port();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} server --listen 127.0.0.1:{port} --data-dir {}",
            env!("CARGO_BIN_EXE_tapestry"),
            data.display()
        ))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = || {
        Command::new("kubectl")
            .env("KUBECONFIG", data.join("kubeconfig"))
            .args(["get", "--raw", "/readyz"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    wait_for(30, "the server ready", || ready().then_some(()));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut wrong = Vec::new();
    if mode(&data) != 0o700 {
        wrong.push(format!("{}: {:o}", data.display(), mode(&data)));
    }
    let mut files = vec![
        data.join("store.redb"),
        data.join("tokens.csv"),
        data.join("kubeconfig"),
        data.join("node-token"),
    ];
    for d in ["pki", "credentials"] {
        assert_eq!(mode(&data.join(d)), 0o700, "{d}");
        files.extend(
            std::fs::read_dir(data.join(d))
                .unwrap()
                .map(|e| e.unwrap().path()),
        );
    }
    assert!(files.len() > 8, "{files:?}");
    for f in &files {
        if mode(f) != 0o600 {
            wrong.push(format!("{}: {:o}", f.display(), mode(f)));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(wrong.is_empty(), "readable by others: {wrong:?}");
}

/// POST a review as the admin; returns its status.
fn review(server: &Server, path: &str, body: serde_json::Value) -> serde_json::Value {
    let out = server.curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {}", server.admin_token()),
        "-H",
        "Content-Type: application/json",
        "--data",
        &body.to_string(),
        &format!("{}{path}", server.url()),
    ]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    answer["status"].clone()
}

fn token_review(server: &Server, token: &str) -> serde_json::Value {
    review(
        server,
        "/apis/authentication.k8s.io/v1/tokenreviews",
        serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "spec": {"token": token}}),
    )
}

/// kubectl's words for a 401.
fn unauthenticated(stderr: &str) -> bool {
    stderr.contains("provide credentials") || stderr.contains("(Unauthorized)")
}

/// kubectl with a bare bearer token (no kubeconfig user): (success,
/// stdout and stderr).
fn with_token(server: &Server, token: &str, command_line: &str) -> (bool, String) {
    let out = Command::new("kubectl")
        .args(["--server", &server.url(), "--certificate-authority"])
        .arg(server.data_dir().join("pki/ca.crt"))
        .args(["--token", token])
        .args(command_line.split_whitespace())
        .env("KUBECONFIG", "/dev/null")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn service_account_tokens_authenticate_until_their_pod_or_account_goes() {
    if !require_kubectl() {
        return;
    }
    let server = Server::start();
    server.ok(&["create", "namespace", "a"]);
    server.ok(&["create", "serviceaccount", "robot", "-n", "a"]);
    let token = server.ok(&["create", "token", "robot", "-n", "a", "--duration=15m"]);
    let token = token.trim();

    // TokenReview knows it; RBAC decides what it may do.
    let status = token_review(&server, token);
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(status["user"]["username"], "system:serviceaccount:a:robot");
    let groups = status["user"]["groups"].to_string();
    assert!(groups.contains("system:serviceaccounts:a"), "{groups}");
    let (ok, err) = with_token(&server, token, "get pods -n a");
    assert!(
        !ok && err.contains(r#"User "system:serviceaccount:a:robot" cannot list resource "pods""#),
        "{err}"
    );
    server.ok(&[
        "create",
        "rolebinding",
        "robot-view",
        "-n",
        "a",
        "--clusterrole=view",
        "--serviceaccount=a:robot",
    ]);
    wait_for(10, "the robot's binding in force", || {
        with_token(&server, token, "get pods -n a").0.then_some(())
    });
    let (ok, err) = with_token(&server, token, "get secrets -n a");
    assert!(!ok && err.contains("forbidden"), "{err}");
    let bad = format!("{}x", &token[..token.len() - 1]);
    let (ok, err) = with_token(&server, &bad, "get pods -n a");
    assert!(!ok && unauthenticated(&err), "a forged signature: {err}");

    // A token bound to a pod dies with the pod.
    server.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec:\n  serviceAccountName: robot\n  containers: [{name: c, image: busybox:local}]\n",
    );
    let pod_spec = server.ok(&["get", "pod", "p", "-n", "a", "-o", "json"]);
    let pod: serde_json::Value = serde_json::from_str(&pod_spec).unwrap();
    let mounts = pod["spec"]["containers"][0]["volumeMounts"].to_string();
    assert!(
        mounts.contains("/var/run/secrets/kubernetes.io/serviceaccount"),
        "the account's token is mounted: {mounts}"
    );
    let bound = server.ok(&[
        "create",
        "token",
        "robot",
        "-n",
        "a",
        "--bound-object-kind=Pod",
        "--bound-object-name=p",
    ]);
    let bound = bound.trim();
    assert!(with_token(&server, bound, "get pods -n a").0);
    server.ok(&[
        "delete",
        "pod",
        "p",
        "-n",
        "a",
        "--grace-period=0",
        "--force",
    ]);
    wait_for(10, "the pod gone", || {
        (!server
            .kubectl(&["get", "pod", "p", "-n", "a"])
            .status
            .success())
        .then_some(())
    });
    let (ok, err) = with_token(&server, bound, "get pods -n a");
    assert!(!ok && unauthenticated(&err), "{err}");
    assert_eq!(token_review(&server, bound)["authenticated"], false);
    assert!(
        with_token(&server, token, "get pods -n a").0,
        "the unbound token lives on"
    );

    // An account's deletion ends every token of it.
    server.ok(&["delete", "serviceaccount", "robot", "-n", "a"]);
    assert_eq!(token_review(&server, token)["authenticated"], false);

    // Other systems verify tokens with the published key.
    let discovery = server.ok(&["get", "--raw", "/.well-known/openid-configuration"]);
    assert!(
        discovery.contains(
            r#""jwks_uri":"https://kubernetes.default.svc.cluster.local/openid/v1/jwks""#
        ),
        "{discovery}"
    );
    let jwks = server.ok(&["get", "--raw", "/openid/v1/jwks"]);
    assert!(jwks.contains(r#""alg":"ES256""#), "{jwks}");
}

#[test]
fn a_client_certificate_names_its_user_and_groups() {
    if !require_kubectl() {
        return;
    }
    let server = Server::start();
    let erin = tapestry_ok(
        &server,
        &[
            "user", "add", "erin", "--group", "ops", "--cert", "--days", "30",
        ],
    );
    let kubeconfig = std::fs::read_to_string(&erin).unwrap();
    assert!(kubeconfig.contains("client-certificate-data") && !kubeconfig.contains("token:"));
    let tokens = std::fs::read_to_string(server.data_dir().join("tokens.csv")).unwrap();
    assert!(
        !tokens.contains("erin"),
        "a certificate user is stored nowhere"
    );

    let (ok, who, err) = as_user(&erin, "auth whoami");
    assert!(ok, "{err}");
    assert!(who.contains("erin") && who.contains("ops"), "{who}");
    let (ok, _, err) = as_user(&erin, "get pods -n default");
    assert!(
        !ok && err.contains(r#"User "erin" cannot list resource "pods""#),
        "{err}"
    );
    server.ok(&[
        "create",
        "clusterrolebinding",
        "ops-view",
        "--clusterrole=view",
        "--group=ops",
    ]);
    wait_for(10, "the group's binding in force", || {
        as_user(&erin, "get pods -n default").0.then_some(())
    });
}

/// A CertificateSigningRequest manifest for `signer`, asking for `cn` in
/// `orgs` with `names`, written to a file in `dir`; its path.
fn csr_file(
    dir: &std::path::Path,
    name: &str,
    signer: &str,
    (cn, orgs, names): (&str, &[&str], &[String]),
    purpose: &str,
) -> String {
    let (_, pem) = tapestry_runtime::csr::request(cn, orgs, names).unwrap();
    let manifest = serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "signerName": signer,
            "request": k8s_openapi::ByteString(pem.into_bytes()),
            "usages": ["digital signature", "key encipherment", purpose],
        },
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, manifest.to_string()).unwrap();
    path.display().to_string()
}

#[test]
fn taps_and_aggregators_get_certificates_only_for_their_own_node_and_addresses() {
    if !require_kubectl() {
        return;
    }
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    // The namespace and accounts the fleet manager deploys into (the
    // server's bootstrap roles name them).
    server.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: tapestry-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: tap-agent, namespace: tapestry-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: aggregator, namespace: tapestry-system}\n",
    );
    // Pods bound to node-a (no node runs them: binding is what counts).
    server.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: tap-a, namespace: tapestry-system}\nspec:\n  nodeName: node-a\n  serviceAccountName: tap-agent\n  containers: [{name: c, image: busybox:local}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: agg, namespace: tapestry-system}\nspec:\n  nodeName: node-a\n  serviceAccountName: aggregator\n  containers: [{name: c, image: busybox:local}]\n",
    );
    server.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: aggregator, namespace: tapestry-system}\nspec:\n  ports: [{port: 50051}]\n",
    );
    let pod_token = |sa: &str, pod: &str| {
        server
            .ok(&[
                "create",
                "token",
                sa,
                "-n",
                "tapestry-system",
                "--bound-object-kind=Pod",
                &format!("--bound-object-name={pod}"),
            ])
            .trim()
            .to_string()
    };
    let tap_token = pod_token("tap-agent", "tap-a");
    // The token's pod and node are part of who it is.
    let status = token_review(&server, &tap_token);
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/node-name"],
        serde_json::json!(["node-a"]),
        "{status}"
    );
    let unbound = server
        .ok(&["create", "token", "tap-agent", "-n", "tapestry-system"])
        .trim()
        .to_string();
    let signer = tapestry_runtime::csr::TAP_CLIENT_SIGNER;
    let tap = |node: &str| format!("tapestry:tap:{node}");
    let ask = |token: &str, name: &str, cn: &str| {
        let file = csr_file(
            dir.path(),
            name,
            signer,
            (cn, &["tapestry:taps"], &[]),
            "client auth",
        );
        let (ok, out) = with_token(&server, token, &format!("create -f {file}"));
        assert!(ok, "{out}");
    };
    ask(&tap_token, "tap-own-node", &tap("node-a"));
    ask(&tap_token, "tap-other-node", &tap("node-b"));
    ask(&unbound, "tap-no-pod", &tap("node-a"));
    let certificate = |name: &str| {
        let out = server.ok(&["get", "csr", name, "-o", "jsonpath={.status.certificate}"]);
        (!out.trim().is_empty()).then_some(())
    };
    wait_for(20, "the tap's certificate for its own node", || {
        certificate("tap-own-node")
    });

    // The aggregator: its pod's address and its Service's name, nothing else.
    let agg_token = pod_token("aggregator", "agg");
    let pod_ip = server.ok(&[
        "get",
        "pod",
        "agg",
        "-n",
        "tapestry-system",
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    let serving = tapestry_runtime::csr::AGGREGATOR_SERVING_SIGNER;
    let ask_serving = |name: &str, names: &[String]| {
        let file = csr_file(
            dir.path(),
            name,
            serving,
            ("tapestry:aggregator", &[], names),
            "server auth",
        );
        let (ok, out) = with_token(&server, &agg_token, &format!("create -f {file}"));
        assert!(ok, "{out}");
    };
    // No node runs the pod, so it has no address yet: only the name.
    assert!(pod_ip.trim().is_empty(), "{pod_ip}");
    ask_serving("agg-own", &["aggregator.tapestry-system.svc".to_string()]);
    ask_serving("agg-foreign", &["kubernetes.default.svc".to_string()]);
    ask_serving("agg-foreign-ip", &["10.9.9.9".to_string()]);
    wait_for(20, "the aggregator's certificate for its own names", || {
        certificate("agg-own")
    });

    // What was not theirs waits for a person, never signed.
    std::thread::sleep(std::time::Duration::from_secs(2));
    for name in [
        "tap-other-node",
        "tap-no-pod",
        "agg-foreign",
        "agg-foreign-ip",
    ] {
        let conditions = server.ok(&["get", "csr", name, "-o", "jsonpath={.status.conditions}"]);
        assert!(conditions.trim().is_empty(), "{name}: {conditions}");
        assert!(certificate(name).is_none(), "{name} was signed");
    }
    // A tap's account may not ask for a serving certificate at all.
    let (ok, out) = with_token(
        &server,
        &tap_token,
        "auth can-i create certificatesigningrequests --subresource=aggregatorserving",
    );
    assert!(!ok || out.trim() == "no", "{out}");
}
