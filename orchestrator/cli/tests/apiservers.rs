//! Several `tapestry server` processes on one etcd, each with a data
//! directory of its own: they all start, whichever bootstraps the cluster,
//! and the `kubernetes` Service's endpoints list exactly the live ones.

mod common;

use std::time::{Duration, Instant};

use common::{require_kubectl, wait_for, Server};
use serde_json::Value;
use tapestry_store::conformance::EtcdServer;

/// The lease duration the servers run with here; they renew every third.
const LEASE: Duration = Duration::from_secs(3);

/// An etcd and the arguments of servers sharing it; None (the test
/// skips) without kubectl or etcd outside CI.
fn etcd_and_server_args() -> Option<(EtcdServer, Vec<String>)> {
    if !require_kubectl() {
        return None;
    }
    let etcd = EtcdServer::start()?;
    let args = vec![
        format!("--store={}", etcd.store_arg()),
        "--no-controllers".into(),
        "--no-scheduler".into(),
        format!("--endpoint-lease-duration={}s", LEASE.as_secs()),
    ];
    Some((etcd, args))
}

fn start(args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(&args)
}

/// `ADDRESS:PORT` of every endpoint of the `kubernetes` Endpoints and of
/// its EndpointSlices, as `s` serves them, each sorted.
fn listed(s: &Server) -> (Vec<String>, Vec<String>) {
    let json = |args: &[&str]| -> Value {
        serde_json::from_str(&s.ok(args)).expect("kubectl printed JSON")
    };
    let eps = json(&["get", "endpoints", "kubernetes", "-o", "json"]);
    let mut from_endpoints = Vec::new();
    for subset in eps["subsets"].as_array().into_iter().flatten() {
        let port = &subset["ports"][0]["port"];
        for a in subset["addresses"].as_array().into_iter().flatten() {
            from_endpoints.push(format!("{}:{port}", a["ip"].as_str().unwrap_or("")));
        }
    }
    let slices = json(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=kubernetes",
        "-o",
        "json",
    ]);
    let mut from_slices = Vec::new();
    for slice in slices["items"].as_array().into_iter().flatten() {
        let port = &slice["ports"][0]["port"];
        for ep in slice["endpoints"].as_array().into_iter().flatten() {
            for a in ep["addresses"].as_array().into_iter().flatten() {
                from_slices.push(format!("{}:{port}", a.as_str().unwrap_or("")));
            }
        }
    }
    from_endpoints.sort();
    from_slices.sort();
    (from_endpoints, from_slices)
}

fn address(s: &Server) -> String {
    format!("127.0.0.1:{}", s.port)
}

/// Wait until `via` lists exactly `servers`; returns how long it took.
fn wait_listed(via: &Server, servers: &[&Server], secs: u64) -> Duration {
    let mut want: Vec<String> = servers.iter().map(|s| address(s)).collect();
    want.sort();
    let started = Instant::now();
    let what = format!("the kubernetes endpoints to list {want:?}");
    wait_for(secs, &what, || {
        let (endpoints, slices) = listed(via);
        (endpoints == want && slices == want).then_some(())
    });
    started.elapsed()
}

/// Two servers started one after the other both serve, and both are in
/// the endpoints; one that stops cleanly leaves them before it exits, one
/// that is killed drops out once its lease expires.
#[test]
fn kubernetes_endpoints_list_every_live_server() {
    // Declared first, so etcd is dropped after the servers that use it.
    let Some((_etcd, args)) = etcd_and_server_args() else {
        return;
    };
    let a = start(&args);
    let mut b = start(&args);
    for s in [&a, &b] {
        assert_eq!(s.ok(&["get", "--raw", "/readyz"]), "ok");
        // b wrote both into the endpoints before it served.
        wait_listed(s, &[&a, &b], 5);
    }

    let status = b.terminate();
    assert!(status.success(), "b exited with {status}");
    // Removed before the process exited, not when its lease runs out.
    assert_eq!(listed(&a), (vec![address(&a)], vec![address(&a)]));

    b.spawn();
    wait_listed(&a, &[&a, &b], 5);
    b.kill();
    // The lease lasts 3 s unrenewed from when a last saw it renewed (up
    // to a renewal period after b renewed it), and a notices on its next
    // pass: at most the lease duration and two periods.
    let took = wait_listed(&a, &[&a], 15);
    eprintln!("a killed server left the endpoints after {took:?}");
    assert!(
        took <= LEASE + LEASE * 2 / 3 + Duration::from_secs(1),
        "a killed server stayed {took:?} in the endpoints"
    );
}

/// Servers started at the same moment race to bootstrap the cluster (the
/// `kubernetes` Service and its ClusterIP among it): every one of them
/// starts, and there is one `kubernetes` Service, on the first address.
#[test]
fn servers_starting_together_all_start() {
    // Declared first, so etcd is dropped after the servers that use it.
    let Some((_etcd, args)) = etcd_and_server_args() else {
        return;
    };
    let servers: Vec<Server> = std::thread::scope(|scope| {
        let started: Vec<_> = (0..3).map(|_| scope.spawn(|| start(&args))).collect();
        started
            .into_iter()
            .map(|t| t.join().expect("a server failed to start"))
            .collect()
    });
    let all: Vec<&Server> = servers.iter().collect();
    for s in &servers {
        assert_eq!(
            s.ok(&[
                "get",
                "service",
                "kubernetes",
                "-o",
                "jsonpath={.spec.clusterIPs}"
            ]),
            r#"["10.96.0.1"]"#
        );
        wait_listed(s, &all, 5);
    }
    let err = servers[0].fails(&[
        "create",
        "service",
        "clusterip",
        "taken",
        "--clusterip=10.96.0.1",
        "--tcp=80",
    ]);
    assert!(err.contains("provided IP is already allocated"), "{err}");
}

/// An etcd that serves TLS and takes only clients with a certificate its
/// CA signed: the server connects with `--etcd-cafile/--etcd-certfile/
/// --etcd-keyfile` and serves; without a client certificate it cannot.
#[test]
fn a_server_on_an_etcd_that_requires_client_certificates() {
    use std::process::{Command, Stdio};
    if !require_kubectl() || EtcdServer::start().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let ext = |name: &str, body: &str| std::fs::write(dir.path().join(name), body).unwrap();
    ext(
        "server.ext",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
    ext("client.ext", "extendedKeyUsage=clientAuth\n");
    let script = format!(
        "set -e; cd {d}
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=etcd-ca \
           -keyout ca.key -out ca.crt -days 1 2>/dev/null
         for who in server client; do
           openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=$who \
             -keyout $who.key -out $who.csr 2>/dev/null
           openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -extfile $who.ext -days 1 \
             -out $who.crt 2>/dev/null
         done"
    );
    let made = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (client, peer) = (
        tapestry_store::conformance::free_port(),
        tapestry_store::conformance::free_port(),
    );
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = Command::new("etcd")
        .args(["--name", "tls", "--data-dir", &format!("{d}/etcd")])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("tls={peer_url}")])
        .args([
            "--cert-file",
            &format!("{d}/server.crt"),
            "--key-file",
            &format!("{d}/server.key"),
        ])
        .args([
            "--trusted-ca-file",
            &format!("{d}/ca.crt"),
            "--client-cert-auth",
        ])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting etcd");
    wait_for(20, "etcd listening", || {
        std::net::TcpStream::connect(("127.0.0.1", client)).ok()
    });
    let store = format!("--store=etcd://127.0.0.1:{client}");
    let tls = [
        format!("--etcd-cafile={d}/ca.crt"),
        format!("--etcd-certfile={d}/client.crt"),
        format!("--etcd-keyfile={d}/client.key"),
    ];
    let mut args = vec![store.as_str(), "--no-controllers", "--no-scheduler"];
    args.extend(tls.iter().map(String::as_str));
    let server = Server::start_with(&args);
    server.ok(&["create", "configmap", "over-tls", "--from-literal=k=v"]);
    assert_eq!(
        server.ok(&["get", "configmap", "over-tls", "-o", "jsonpath={.data.k}"]),
        "v"
    );

    // Without a client certificate etcd refuses the connection, and the
    // server says where it could not connect.
    let refused = Command::new(env!("CARGO_BIN_EXE_tapestry"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &format!("{d}/plain"),
            &store,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("connecting to etcd at 127.0.0.1:{client}")),
        "{err}"
    );
    drop(server);
    let _ = etcd.kill();
    let _ = etcd.wait();
}
