//! Command-line errors: bad input is refused with a message naming what is
//! wrong and a non-zero exit, before anything touches the kernel.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tap-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_rules_name_the_field() {
    for (rule, needle) in [
        ("proto=tcq", "unknown protocol `tcq`"),
        ("port=99999", "port"),
        ("cidr=10.0.0.1/8", "host bits"),
        ("dir=sideways", "unknown direction"),
        ("colour=red", "colour"),
        ("proto=icmp,port=80", "no ports"),
    ] {
        let (code, err) = run(&[
            "run",
            "--iface",
            "lo",
            "--aggregator",
            "http://127.0.0.1:1",
            "--rule",
            rule,
        ]);
        assert_ne!(code, 0, "{rule}");
        assert!(
            err.contains("--rule") && err.contains(needle),
            "{rule}: {err}"
        );
    }
}

#[test]
fn bad_values_are_refused() {
    let (code, err) = run(&[
        "run",
        "--iface",
        "lo",
        "--aggregator",
        "http://127.0.0.1:1",
        "--snaplen",
        "0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--snaplen"), "{err}");
    let (code, err) = run(&["run", "--aggregator", "http://127.0.0.1:1"]);
    assert_ne!(code, 0);
    assert!(err.contains("--iface"), "{err}");
    let (code, err) = run(&["run", "--iface", "lo", "--aggregator", "not a url"]);
    assert_ne!(code, 0);
    assert!(err.contains("--aggregator"), "{err}");
}

#[test]
fn missing_interface_is_an_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("CI").is_some() {
            panic!("missing_interface_is_an_error needs root (CI is set)");
        }
        eprintln!("SKIPPED missing_interface_is_an_error: needs root");
        return;
    }
    let (code, err) = run(&[
        "run",
        "--iface",
        "no-such-if0",
        "--aggregator",
        "http://127.0.0.1:1",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no-such-if0") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn bad_policy_files_name_the_policy_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.json");
    for (json, needle) in [
        (
            r#"[{"name": "web", "rules": [{"ports": ["90-80"]}]}]"#,
            "range `90-80`: start is above end at line 1",
        ),
        (
            r#"[{"name": "web", "rules": [{"protocol": "udp", "ports": ["80"], "direction": "up"}]}]"#,
            "unknown variant `up`",
        ),
        (r#"[{"name": "web", "snaplen": 0}]"#, "snaplen"),
        (r#"[{"name": "Bad Name"}]"#, "[0] (Bad Name): name"),
        (r#"[{"name": "a"}, {"name": "a"}]"#, "used twice"),
        (r#"{"name": "a"}"#, "not a valid JSON array"),
        (r#"[]"#, "no policies"),
    ] {
        std::fs::write(&file, json).unwrap();
        let (code, err) = run(&[
            "run",
            "--iface",
            "lo",
            "--aggregator",
            "http://127.0.0.1:1",
            "--policy-file",
            file.to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "{json}");
        assert!(
            err.contains("--policy-file") && err.contains(needle),
            "{json}: {err}"
        );
    }
}

#[test]
fn tls_settings_must_agree_with_the_url() {
    let (code, err) = run(&[
        "run",
        "--iface",
        "lo",
        "--aggregator",
        "https://127.0.0.1:1",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is https") && err.contains("--tls-cert"),
        "{err}"
    );
    let (code, err) = run(&[
        "run",
        "--iface",
        "lo",
        "--aggregator",
        "http://127.0.0.1:1",
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
        "--tls-ca",
        "ca.pem",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("https://HOST:PORT"), "{err}");
    // A certificate from a signing request needs a cluster to ask.
    let (code, err) = run(&[
        "run",
        "--iface",
        "lo",
        "--aggregator",
        "https://127.0.0.1:1",
        "--tls-from-csr",
        "tap.pem",
        "--tls-ca",
        "ca.pem",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--tls-from-csr"), "{err}");
}
