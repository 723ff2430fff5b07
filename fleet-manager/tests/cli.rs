//! `fleet-manager` as a program: how it refuses to start. (Cargo builds a
//! package's binaries for its integration tests, so this target also makes
//! `cargo test --workspace` build the `fleet-manager` the end-to-end tests
//! run.)

use std::process::Command;

const FLEET_MANAGER: &str = env!("CARGO_BIN_EXE_fleet-manager");

#[test]
fn an_unreadable_kubeconfig_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("no-such-kubeconfig");
    let out = Command::new(FLEET_MANAGER)
        .arg("serve")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cert-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--no-deploy"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&kubeconfig.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn a_status_period_out_of_range_is_refused() {
    let out = Command::new(FLEET_MANAGER)
        .args(["serve", "--status-period", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--status-period"), "{stderr}");
}
