//! The fleet manager's REST API as the tests and benchmarks use it.

use serde_json::{json, Value};

use crate::{free_port, Cluster};

/// A PCAP-over-IP tool on a free loopback port; its address.
pub fn create_tool(c: &Cluster, name: &str) -> String {
    let addr = format!("127.0.0.1:{}", free_port());
    let body = json!({"name": name, "type": "pcapOverIp", "listen": addr}).to_string();
    let a = c.rest("POST", "/v1/tools", Some(&body));
    assert_eq!(a.status, 201, "{}", a.raw);
    addr
}

pub fn create_policy(c: &Cluster, body: Value) {
    let a = c.rest("POST", "/v1/policies", Some(&body.to_string()));
    assert_eq!(a.status, 201, "{}", a.raw);
}

/// Whether an object's status holds `Ready=True`.
pub fn ready_condition(status: &Value) -> bool {
    status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Whether the Node `name` reports `Ready=True` to the API server.
pub fn node_ready(c: &Cluster, name: &str) -> bool {
    let token = c.token();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(c.data().join("pki/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("https://{}/api/v1/nodes/{name}", c.api))
        .output();
    let Ok(out) = out else { return false };
    let node: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}
