//! The fleet manager's REST API against its own description: `/openapi.json`
//! is a valid OpenAPI 3.1 document naming every route the server serves and
//! every error each operation can answer, and schemathesis, generating
//! requests from it against a live server, finds no 5xx and no answer the
//! document does not describe.
//!
//! The Python tools come from the venv scripts/deps.sh makes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tapestry_e2e::*;

const VENV_BIN: &str = "/var/cache/tapestry/venv/bin";

/// Every route the fleet manager serves (fleet-manager/src/api/mod.rs) and
/// its methods.
const ROUTES: &[(&str, &[&str])] = &[
    ("/", &["get"]),
    ("/healthz", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
    ("/docs", &["get"]),
    ("/v1/policies", &["get", "post"]),
    ("/v1/policies/{name}", &["get", "put", "patch", "delete"]),
    ("/v1/policies/{name}/status", &["get"]),
    ("/v1/tools", &["get", "post"]),
    ("/v1/tools/{name}", &["get", "put", "patch", "delete"]),
    ("/v1/nodes", &["get"]),
    ("/v1/nodes/{name}", &["get"]),
];

/// A child process killed when the test ends, whatever happens.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Process { child, log }
    }

    /// Panics with the log if the process has exited.
    fn alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("{what} exited early ({status}):\n{log}");
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn venv(tool: &str) -> String {
    format!("{VENV_BIN}/{tool}")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `curl` against the fleet manager, trusting its self-signed certificate;
/// status line, headers and body as curl prints them with `-i`.
fn curl(cert: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(cert)
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status code of an answer `curl -i` printed (0: none).
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn openapi_document_is_valid_complete_and_the_server_keeps_to_it() {
    let schemathesis = venv("schemathesis");
    let validator = venv("openapi-spec-validator");
    if !require_programs(
        "openapi",
        &["curl", &schemathesis, &validator],
        &["tapestry", "fleet-manager"],
    ) {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let certs = dir.path().join("certs");
    let api = format!("127.0.0.1:{}", free_port());
    let mut server = Process::spawn(
        Command::new(program_path("tapestry").unwrap())
            .arg("server")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &api]),
        dir.path().join("server.log"),
    );
    wait_for(
        "the API server's kubeconfig",
        Duration::from_secs(60),
        || {
            server.alive("tapestry server");
            (data.join("kubeconfig").exists() && data.join("tokens.csv").exists()).then_some(())
        },
    );

    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("https://{listen}");
    let cert = certs.join("fleet-manager.crt");
    let mut fleet = Process::spawn(
        Command::new(program_path("fleet-manager").unwrap())
            .arg("serve")
            .arg("--kubeconfig")
            .arg(data.join("kubeconfig"))
            .arg("--token-file")
            .arg(data.join("tokens.csv"))
            .arg("--cert-dir")
            .arg(&certs)
            .args(["--listen", &listen, "--no-deploy"]),
        dir.path().join("fleet-manager.log"),
    );
    wait_for(
        "the fleet manager's /healthz",
        Duration::from_secs(60),
        || {
            server.alive("tapestry server");
            fleet.alive("fleet-manager");
            (status(&curl(&cert, &format!("{base}/healthz"), &[])) == 200).then_some(())
        },
    );
    let token = admin_token(&data);
    let auth = format!("Authorization: Bearer {token}");

    // (a) The document: valid OpenAPI 3.1, every route, every error.
    let answer = curl(&cert, &format!("{base}/openapi.json"), &[]);
    let (_, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let doc: Value = serde_json::from_str(body).expect("/openapi.json is JSON");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, body).unwrap();
    let out = Command::new(&validator).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator:\n{}",
        text(&out)
    );
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1"), "openapi is {version:?}");
    check_coverage(&doc);

    // Something to watch: every watch then opens with an event at once.
    let tool = r#"{"name":"watched","type":"pcapOverIp","listen":"127.0.0.1:1"}"#;
    let policy = r#"{"name":"watched","tools":["watched"]}"#;
    for (path, body) in [("/v1/tools", tool), ("/v1/policies", policy)] {
        let created = curl(
            &cert,
            &format!("{base}{path}"),
            &[
                "-H",
                &auth,
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
        );
        assert_eq!(status(&created), 201, "POST {path}: {created}");
        let watched = curl(
            &cert,
            &format!("{base}{path}?watch=true"),
            &["-N", "--max-time", "2", "-H", &auth],
        );
        assert!(
            status(&watched) == 200
                && watched.contains("content-type: text/event-stream")
                && watched.contains("event: ADDED")
                && watched.contains(r#""name":"watched""#),
            "{path}?watch=true: {watched}"
        );
        // A wrong query is refused before a watch starts.
        let refused = curl(
            &cert,
            &format!("{base}{path}?watch=true&limit=-1"),
            &["--max-time", "2", "-H", &auth],
        );
        assert_eq!(
            status(&refused),
            400,
            "{path}?watch=true&limit=-1: {refused}"
        );
    }

    // (b) schemathesis against the live API. A watch never ends by itself:
    // schemathesis reads an event stream until its request timeout, or
    // (max-stream-events) until the first event, which the objects above
    // make immediate.
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, "max-stream-events = 1\n").unwrap();
    let seed = std::env::var("TAPESTRY_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261206".into());
    let started = std::time::Instant::now();
    let out = Command::new(&schemathesis)
        .current_dir(dir.path())
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--header", &auth])
        .arg("--tls-verify")
        .arg(&cert)
        // Every check but positive_data_acceptance: the server also judges a
        // body by what a schema cannot say (that the tools a policy names
        // exist, that an address is free, that the name in the body is the
        // one in the URL), so a schema-valid body may rightly get 422.
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "100", "--request-timeout", "5"])
        // One seed, so a run can be repeated; set another to explore.
        .args(["--seed", &seed])
        .args(["--no-color", "--output-truncate", "false"])
        .output()
        .unwrap();
    fleet.alive("fleet-manager");
    let report = text(&out);
    assert!(
        out.status.success(),
        "schemathesis found problems ({}):\n{report}\n--- fleet-manager log ---\n{}",
        out.status,
        std::fs::read_to_string(&fleet.log).unwrap_or_default()
    );
    let summary = report.find("SUMMARY").map_or("", |at| {
        &report[report[..at].rfind('\n').map_or(0, |l| l + 1)..]
    });
    eprintln!("schemathesis passed in {:?}:\n{summary}", started.elapsed());
}

/// Every route is in `paths` with its methods; every operation that takes a
/// token documents 401 and 502 (the token may be checked with the cluster),
/// every one naming an object 404, every one with a query 400, every one
/// taking a body 400 and 422, and every error is a problem+json Problem.
fn check_coverage(doc: &Value) {
    let paths = doc["paths"].as_object().expect("paths");
    let mut wrong = Vec::new();
    for (path, methods) in ROUTES {
        for method in *methods {
            if paths[*path][*method].is_null() {
                wrong.push(format!(
                    "{} {path} is not documented",
                    method.to_uppercase()
                ));
            }
        }
    }
    let served: BTreeSet<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
    for (path, item) in paths {
        if !served.contains(path.as_str()) {
            wrong.push(format!(
                "{path} is documented but not in this test's ROUTES"
            ));
        }
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{} {path}", method.to_uppercase());
            let responses = op["responses"].as_object().cloned().unwrap_or_default();
            let mut required: Vec<&str> = Vec::new();
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                required.extend(["401", "502"]);
            }
            if path.contains("{name}") {
                required.push("404");
            }
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            if params.iter().any(|p| p["in"] == "query") {
                required.push("400");
            }
            if !op["requestBody"].is_null() {
                required.extend(["400", "422"]);
            }
            for code in required {
                if !responses.contains_key(code) {
                    wrong.push(format!("{at} does not document {code}"));
                }
            }
            for (code, response) in &responses {
                if code.as_str() < "400" {
                    continue;
                }
                let schema = &response["content"]["application/problem+json"]["schema"]["$ref"];
                if schema != "#/components/schemas/Problem" {
                    wrong.push(format!("{at}: {code} is not a problem+json Problem"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "/openapi.json:\n{}", wrong.join("\n"));
}
