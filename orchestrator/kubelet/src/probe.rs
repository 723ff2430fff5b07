//! Liveness, readiness and startup probes: exec (through the runtime),
//! httpGet and tcpSocket (to the pod's IP).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Kubelet;

#[derive(Default, Debug)]
pub struct ProbeState {
    last_run: Option<Instant>,
    successes: i32,
    failures: i32,
    /// Current verdict (readiness: ready).
    pub ok: bool,
    pub succeeded_once: bool,
}

/// Run the probe if due; returns true when it just crossed its failure
/// threshold (the container is to be restarted, for liveness/startup).
pub async fn step(
    kubelet: &Kubelet,
    state: &mut ProbeState,
    p: &Probe,
    id: &str,
    ip: &str,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    let initial = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    if let Some(s) = started_at {
        if (chrono::Utc::now() - s).to_std().unwrap_or_default() < initial {
            return false;
        }
    }
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    if state.last_run.is_some_and(|t| t.elapsed() < period) {
        return false;
    }
    state.last_run = Some(Instant::now());
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let success = tokio::time::timeout(timeout, run(kubelet, p, id, ip))
        .await
        .unwrap_or(false);
    if success {
        state.successes += 1;
        state.failures = 0;
        if state.successes >= p.success_threshold.unwrap_or(1).max(1) {
            state.ok = true;
            state.succeeded_once = true;
        }
        false
    } else {
        state.failures += 1;
        state.successes = 0;
        if state.failures >= p.failure_threshold.unwrap_or(3).max(1) {
            state.ok = false;
            state.failures = 0;
            return true;
        }
        false
    }
}

fn port(p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(s) => s.parse().ok(),
    }
}

async fn run(kubelet: &Kubelet, p: &Probe, id: &str, ip: &str) -> bool {
    if let Some(e) = &p.exec {
        let args = e.command.clone().unwrap_or_default();
        let out = kubelet
            .runtime
            .exec_command(id, &args, false)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await;
        return out.is_ok_and(|o| o.status.success());
    }
    if let Some(t) = &p.tcp_socket {
        let host = t.host.clone().unwrap_or_else(|| ip.to_string());
        let Some(port) = port(&t.port) else {
            return false;
        };
        return TcpStream::connect((host.as_str(), port)).await.is_ok();
    }
    if let Some(h) = &p.http_get {
        let host = h.host.clone().unwrap_or_else(|| ip.to_string());
        let Some(port) = port(&h.port) else {
            return false;
        };
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let Ok(mut s) = TcpStream::connect((host.as_str(), port)).await else {
            return false;
        };
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\n\r\n"
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let Ok(n) = s.read(&mut buf).await else {
            return false;
        };
        let head = String::from_utf8_lossy(&buf[..n]);
        return head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (200..400).contains(&c));
    }
    false
}
