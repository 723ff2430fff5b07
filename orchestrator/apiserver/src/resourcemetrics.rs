//! `metrics.k8s.io/v1beta1`: NodeMetrics (`nodes`) and PodMetrics (`pods`),
//! read-only, as metrics-server serves them.
//!
//! A background task scrapes every node's kubelet `/metrics/resource`
//! (through the authenticated kubelet client of [`crate::nodeproxy`]) every
//! resolution period ([`SCRAPE_INTERVAL`] by default), keeps the last two samples per node in memory and
//! answers with the CPU rate between them (the `window`) and the latest
//! working set.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use chrono::{TimeZone, Utc};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tapestry_store::ListOptions;
use tokio_util::sync::CancellationToken;

use crate::authz::{Attributes, Authorizer};
use crate::error::{ApiError, Target};
use crate::nodeproxy::KubeletClient;
use crate::rest::Api;
use crate::selectors::LabelSelector;
use tapestry_apimachinery::tokens::User;

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
/// How often every kubelet is scraped by default (metrics-server's
/// `--metric-resolution` default).
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(15);
/// How soon a node with a single sample is scraped again, so its first
/// rate is not a whole interval away.
const FIRST_RATE_AFTER: Duration = Duration::from_secs(5);
/// Largest `/metrics/resource` body read from a kubelet.
const MAX_SCRAPE: usize = 16 << 20;
/// Most nodes scraped at once.
const MAX_NODES: usize = 5000;
/// Kubelets scraped at the same time.
const SCRAPES_AT_ONCE: usize = 32;

/// `(plural, kind)` of the served resources, both get and list.
const RESOURCES: &[(&str, &str, bool)] = &[
    ("nodes", "NodeMetrics", false),
    ("pods", "PodMetrics", true),
];

/// Discovery entries (`APIResourceList` shape) for `group`/`version`.
pub fn discovery_resources(group: &str, version: &str) -> Vec<Value> {
    if group != GROUP || version != VERSION {
        return Vec::new();
    }
    RESOURCES
        .iter()
        .map(|(plural, kind, namespaced)| {
            json!({"name": plural, "singularName": "", "namespaced": namespaced,
                   "kind": kind, "verbs": ["get", "list"]})
        })
        .collect()
}

/// Aggregated discovery entries for `group`/`version`.
pub fn aggregated_resources(group: &str, version: &str) -> Vec<Value> {
    if group != GROUP || version != VERSION {
        return Vec::new();
    }
    RESOURCES
        .iter()
        .map(|(plural, kind, namespaced)| {
            json!({
                "resource": plural,
                "responseKind": {"group": GROUP, "version": VERSION, "kind": kind},
                "scope": if *namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": "",
                "verbs": ["get", "list"],
            })
        })
        .collect()
}

/// CPU seconds and working set bytes of one thing at one time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
}

/// One scrape of one kubelet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Milliseconds since the epoch, from the kubelet's timestamps.
    pub time_ms: i64,
    pub node: Point,
    /// (namespace, pod) → the pod and its containers.
    pub pods: BTreeMap<(String, String), PodPoint>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodPoint {
    pub pod: Point,
    pub containers: BTreeMap<String, Point>,
}

/// `name{a="b",...}` → (name, labels).
fn parse_series(s: &str) -> Option<(&str, BTreeMap<String, String>)> {
    let Some(open) = s.find('{') else {
        return Some((s, BTreeMap::new()));
    };
    let name = &s[..open];
    let body = s[open + 1..].strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
    Some((name, labels))
}

/// Read kubelet's `/metrics/resource` text. Unknown families are skipped;
/// a malformed line of a known family is an error.
pub fn parse_resource_metrics(text: &str) -> Result<Sample, String> {
    let mut sample = Sample::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The series may hold spaces only inside quoted label values.
        let split = match line.rfind('}') {
            Some(close) => close + 1,
            None => line.find(' ').unwrap_or(line.len()),
        };
        let (series, rest) = line.split_at(split);
        let name = series.split('{').next().unwrap_or("");
        if !name.starts_with("node_")
            && !name.starts_with("pod_")
            && !name.starts_with("container_")
        {
            continue;
        }
        let (name, labels) =
            parse_series(series).ok_or_else(|| format!("malformed series {series:?}"))?;
        let mut fields = rest.split_whitespace();
        let value: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("malformed value in {line:?}"))?;
        if let Some(ts) = fields.next().and_then(|t| t.parse::<i64>().ok()) {
            sample.time_ms = sample.time_ms.max(ts);
        }
        if !value.is_finite() {
            continue;
        }
        let pod_key = || Some((labels.get("namespace")?.clone(), labels.get("pod")?.clone()));
        let set = |p: &mut Point, cpu: bool| {
            if cpu {
                p.cpu = Some(value)
            } else {
                p.memory = Some(value)
            }
        };
        match name {
            "node_cpu_usage_seconds_total" => set(&mut sample.node, true),
            "node_memory_working_set_bytes" => set(&mut sample.node, false),
            "pod_cpu_usage_seconds_total" | "pod_memory_working_set_bytes" => {
                if let Some(k) = pod_key() {
                    let p = sample.pods.entry(k).or_default();
                    set(&mut p.pod, name.starts_with("pod_cpu"));
                }
            }
            "container_cpu_usage_seconds_total" | "container_memory_working_set_bytes" => {
                if let (Some(k), Some(c)) = (pod_key(), labels.get("container")) {
                    let p = sample.pods.entry(k).or_default();
                    let c = p.containers.entry(c.clone()).or_default();
                    set(c, name.starts_with("container_cpu"));
                }
            }
            _ => {}
        }
    }
    Ok(sample)
}

/// CPU in cores and memory in bytes over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub cores: f64,
    pub memory: f64,
}

/// The usage between two samples of one thing `seconds` apart: none
/// without both CPU values and the latest memory, or when the counter went
/// back (a restart).
pub fn rate(prev: &Point, cur: &Point, seconds: f64) -> Option<Rate> {
    let (a, b, memory) = (prev.cpu?, cur.cpu?, cur.memory?);
    if seconds <= 0.0 || b < a {
        return None;
    }
    Some(Rate {
        cores: (b - a) / seconds,
        memory,
    })
}

/// A pod's container rates: none unless every container has one, as
/// metrics-server reports a pod only whole.
pub fn pod_rates(prev: &PodPoint, cur: &PodPoint, seconds: f64) -> Option<Vec<(String, Rate)>> {
    if cur.containers.is_empty() {
        return None;
    }
    cur.containers
        .iter()
        .map(|(name, c)| Some((name.clone(), rate(prev.containers.get(name)?, c, seconds)?)))
        .collect()
}

fn cpu_quantity(cores: f64) -> String {
    format!("{}n", (cores * 1e9).round().max(0.0) as u64)
}

fn memory_quantity(bytes: f64) -> String {
    format!("{}Ki", (bytes.max(0.0) / 1024.0).round() as u64)
}

fn timestamp(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn window(seconds: f64) -> String {
    let s = format!("{seconds:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

#[derive(Default)]
struct NodeSamples {
    prev: Option<Sample>,
    cur: Option<Sample>,
}

impl NodeSamples {
    /// The previous and latest samples and the seconds between them.
    fn pair(&self) -> Option<(&Sample, &Sample, f64)> {
        let (p, c) = (self.prev.as_ref()?, self.cur.as_ref()?);
        let seconds = (c.time_ms - p.time_ms) as f64 / 1000.0;
        (seconds > 0.0).then_some((p, c, seconds))
    }
}

/// The scraper and its samples.
pub struct ResourceMetrics {
    api: Arc<Api>,
    client: KubeletClient,
    nodes: Mutex<HashMap<String, NodeSamples>>,
    /// How often every kubelet is scraped.
    resolution: Duration,
}

impl ResourceMetrics {
    /// Start scraping every `resolution` in the background until `shutdown`.
    pub fn start(
        api: Arc<Api>,
        client: KubeletClient,
        resolution: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let me = Arc::new(ResourceMetrics {
            api,
            client,
            nodes: Mutex::new(HashMap::new()),
            resolution: resolution.max(Duration::from_secs(1)),
        });
        let task = me.clone();
        tokio::spawn(async move {
            loop {
                let wait = task.scrape_all().await;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        me
    }

    /// One node's sample, if its kubelet answered within 10 s.
    async fn scrape_node(&self, node: &Value) -> Option<(String, Sample)> {
        let name = node.pointer("/metadata/name").and_then(Value::as_str)?;
        match tokio::time::timeout(Duration::from_secs(10), self.scrape(name, node)).await {
            Ok(Ok(s)) => Some((name.to_string(), s)),
            Ok(Err(e)) => {
                tracing::debug!(node = name, "resource metrics: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Scrape every node once; returns how long to wait for the next round.
    async fn scrape_all(&self) -> Duration {
        let nodes = match self.list("nodes", None).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("resource metrics: listing nodes: {e:?}");
                return self.resolution;
            }
        };
        let names: std::collections::HashSet<String> = nodes
            .iter()
            .filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str))
            .map(String::from)
            .collect();
        // A bounded number of kubelets at a time, not one dial per node at once.
        let permits = tokio::sync::Semaphore::new(SCRAPES_AT_ONCE);
        let scrapes = nodes.iter().take(MAX_NODES).map(|n| async {
            let _permit = permits.acquire().await.ok()?;
            self.scrape_node(n).await
        });
        let results = futures::future::join_all(scrapes).await;
        let mut map = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| names.contains(k));
        for (name, sample) in results.into_iter().flatten() {
            let e = map.entry(name).or_default();
            if e.cur.as_ref().is_some_and(|c| c.time_ms >= sample.time_ms) {
                continue;
            }
            e.prev = e.cur.take();
            e.cur = Some(sample);
        }
        if map.values().any(|s| s.prev.is_none() && s.cur.is_some()) {
            FIRST_RATE_AFTER.min(self.resolution)
        } else {
            self.resolution
        }
    }

    async fn scrape(&self, name: &str, node: &Value) -> Result<Sample, String> {
        let (tls, host) = self.client.dial(name, node).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get("/metrics/resource")
            .header(http::header::HOST, &host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("/metrics/resource: {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_SCRAPE)
            .collect()
            .await
            .map_err(|e| format!("reading /metrics/resource: {e}"))?
            .to_bytes();
        let mut sample = parse_resource_metrics(&String::from_utf8_lossy(&body))?;
        if sample.time_ms == 0 {
            sample.time_ms = Utc::now().timestamp_millis();
        }
        Ok(sample)
    }

    async fn list(&self, plural: &str, ns: Option<&str>) -> Result<Vec<Value>, ApiError> {
        let def = self
            .api
            .registry
            .get("", "v1", plural)
            .ok_or_else(|| ApiError::Internal(format!("{plural} not registered")))?;
        let items = self
            .api
            .store
            .list(&def.key_prefix(ns), ListOptions::default())
            .await
            .map_err(ApiError::internal)?
            .items;
        Ok(items
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    fn node_metrics(&self, node: &Value) -> Option<Value> {
        let name = node.pointer("/metadata/name")?.as_str()?;
        let map = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let (p, c, seconds) = map.get(name)?.pair()?;
        let r = rate(&p.node, &c.node, seconds)?;
        Some(json!({
            "metadata": {"name": name, "labels": node.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                         "creationTimestamp": crate::objects::now_rfc3339()},
            "timestamp": timestamp(c.time_ms),
            "window": window(seconds),
            "usage": {"cpu": cpu_quantity(r.cores), "memory": memory_quantity(r.memory)},
        }))
    }

    fn pod_metrics(&self, pod: &Value) -> Option<Value> {
        let name = pod.pointer("/metadata/name")?.as_str()?;
        let ns = pod.pointer("/metadata/namespace")?.as_str()?;
        let node = pod.pointer("/spec/nodeName")?.as_str()?;
        let map = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let (p, c, seconds) = map.get(node)?.pair()?;
        let key = (ns.to_string(), name.to_string());
        let rates = pod_rates(p.pods.get(&key)?, c.pods.get(&key)?, seconds)?;
        let containers: Vec<Value> = rates
            .into_iter()
            .map(|(n, r)| json!({"name": n, "usage": {"cpu": cpu_quantity(r.cores), "memory": memory_quantity(r.memory)}}))
            .collect();
        Some(json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": pod.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                         "creationTimestamp": crate::objects::now_rfc3339()},
            "timestamp": timestamp(c.time_ms),
            "window": window(seconds),
            "containers": containers,
        }))
    }

    /// Answer a request under `/apis/metrics.k8s.io/`, or `None` for any
    /// other path.
    pub async fn serve(
        &self,
        authz: &Authorizer,
        user: &User,
        method: &Method,
        path: &str,
        query: &HashMap<String, String>,
    ) -> Option<Response> {
        let rest = path.strip_prefix("/apis/metrics.k8s.io/")?;
        let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
        // The group and version documents are discovery's.
        if parts.len() < 2 {
            return None;
        }
        Some(
            self.serve_inner(authz, user, method, &parts, query)
                .await
                .unwrap_or_else(IntoResponse::into_response),
        )
    }

    async fn serve_inner(
        &self,
        authz: &Authorizer,
        user: &User,
        method: &Method,
        parts: &[&str],
        query: &HashMap<String, String>,
    ) -> Result<Response, ApiError> {
        let (version, rest) = parts.split_first().unwrap_or((&"", &[]));
        if *version != VERSION {
            return Ok(not_found_path(&parts.join("/")));
        }
        let (ns, plural, name) = match rest {
            ["nodes"] => (None, "nodes", None),
            ["nodes", n] => (None, "nodes", Some(*n)),
            ["pods"] => (None, "pods", None),
            ["pods", n] => (None, "pods", Some(*n)),
            ["namespaces", ns, "pods"] => (Some(*ns), "pods", None),
            ["namespaces", ns, "pods", n] => (Some(*ns), "pods", Some(*n)),
            _ => return Ok(not_found_path(&parts.join("/"))),
        };
        if plural == "pods" && name.is_some() && ns.is_none() {
            return Ok(not_found_path(&parts.join("/")));
        }
        let kind = if plural == "nodes" {
            "NodeMetrics"
        } else {
            "PodMetrics"
        };
        let target = Target {
            group: GROUP.into(),
            resource: plural.into(),
            kind: kind.into(),
            name: name.unwrap_or_default().into(),
        };
        let verb = match (method, name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                return Err(ApiError::MethodNotSupported {
                    target,
                    verb: "watch".into(),
                })
            }
            (&Method::GET, None) => "list",
            _ => {
                return Err(ApiError::MethodNotSupported {
                    target,
                    verb: method.as_str().to_lowercase(),
                })
            }
        };
        authz.check(
            user,
            &Attributes::resource(verb, GROUP, plural, "", ns, name),
        )?;
        let selector =
            LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
                .map_err(|e| ApiError::BadRequest(format!("labelSelector: {e}")))?;
        let objects = self.list(plural, ns).await?;
        let metrics = |o: &Value| {
            if plural == "nodes" {
                self.node_metrics(o)
            } else {
                self.pod_metrics(o)
            }
        };
        if let Some(name) = name {
            let obj = objects
                .iter()
                .find(|o| o.pointer("/metadata/name").and_then(Value::as_str) == Some(name));
            let Some(mut m) = obj.and_then(metrics) else {
                return Err(ApiError::NotFound(target));
            };
            m["kind"] = json!(kind);
            m["apiVersion"] = json!(format!("{GROUP}/{VERSION}"));
            return Ok(json_response(&m));
        }
        let items: Vec<Value> = objects
            .iter()
            .filter(|o| selector.matches_object(o))
            .filter_map(metrics)
            .collect();
        Ok(json_response(&json!({
            "kind": format!("{kind}List"),
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "metadata": {},
            "items": items,
        })))
    }
}

fn not_found_path(path: &str) -> Response {
    let mut r = json_response(
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": "NotFound", "details": {}, "code": 404,
        "message": format!("the server could not find the requested resource (/apis/{GROUP}/{path})")}),
    );
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

fn json_response(v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    *r.status_mut() = StatusCode::OK;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP container_cpu_usage_seconds_total [STABLE] x
# TYPE container_cpu_usage_seconds_total counter
container_cpu_usage_seconds_total{container="app",namespace="default",pod="web"} 2.5 1700000015000
container_cpu_usage_seconds_total{container="side",namespace="default",pod="web"} 1 1700000015000
container_memory_working_set_bytes{container="app",namespace="default",pod="web"} 1048576 1700000015000
container_memory_working_set_bytes{container="side",namespace="default",pod="web"} 2048 1700000015000
node_cpu_usage_seconds_total 100 1700000015000
node_memory_working_set_bytes 2e+09 1700000015000
pod_cpu_usage_seconds_total{namespace="default",pod="web"} 3.5 1700000015000
pod_memory_working_set_bytes{namespace="default",pod="web"} 1050624 1700000015000
scrape_error 0
"#;

    #[test]
    fn parses_kubelet_text() {
        let s = parse_resource_metrics(TEXT).unwrap();
        assert_eq!(s.time_ms, 1700000015000);
        assert_eq!(s.node.cpu, Some(100.0));
        assert_eq!(s.node.memory, Some(2e9));
        let web = &s.pods[&("default".to_string(), "web".to_string())];
        assert_eq!(web.pod.cpu, Some(3.5));
        assert_eq!(web.containers["app"].memory, Some(1048576.0));
        assert_eq!(web.containers.len(), 2);
        let (name, labels) = parse_series(r#"x{a="q\"u ote",b="2"}"#).unwrap();
        assert_eq!(name, "x");
        assert_eq!(labels["a"], "q\"u ote");
        assert!(parse_resource_metrics("node_cpu_usage_seconds_total abc").is_err());
        assert!(parse_resource_metrics("node_cpu_usage_seconds_total{a=1} 2").is_err());
    }

    #[test]
    fn rates_over_the_window() {
        let cur = parse_resource_metrics(TEXT).unwrap();
        let prev = parse_resource_metrics(
            &TEXT
                .replace("2.5 1700000015000", "1 1700000000000")
                .replace(" 1 1700000015000", " 0.25 1700000000000")
                .replace(
                    "node_cpu_usage_seconds_total 100",
                    "node_cpu_usage_seconds_total 70",
                )
                .replace("1700000015000", "1700000000000"),
        )
        .unwrap();
        let seconds = (cur.time_ms - prev.time_ms) as f64 / 1000.0;
        assert_eq!(seconds, 15.0);
        let node = rate(&prev.node, &cur.node, seconds).unwrap();
        assert_eq!(node.cores, 2.0);
        assert_eq!(node.memory, 2e9);
        let key = ("default".to_string(), "web".to_string());
        let rates = pod_rates(&prev.pods[&key], &cur.pods[&key], seconds).unwrap();
        assert_eq!(rates[0].0, "app");
        assert!((rates[0].1.cores - 0.1).abs() < 1e-9);
        assert!((rates[1].1.cores - 0.05).abs() < 1e-9);
        assert_eq!(cpu_quantity(rates[0].1.cores), "100000000n");
        assert_eq!(memory_quantity(rates[0].1.memory), "1024Ki");
        // A counter that went back (restart) or a missing sample: no rate.
        assert!(rate(&cur.node, &prev.node, seconds).is_none());
        assert!(rate(&Point::default(), &cur.node, seconds).is_none());
        let mut partial = prev.pods[&key].clone();
        partial.containers.remove("side");
        assert!(pod_rates(&partial, &cur.pods[&key], seconds).is_none());
        assert_eq!(window(15.0), "15s");
        assert_eq!(window(14.5), "14.5s");
        assert_eq!(timestamp(1700000015000), "2023-11-14T22:13:35Z");
    }

    #[test]
    fn discovery_entries() {
        assert_eq!(discovery_resources(GROUP, VERSION).len(), 2);
        assert!(discovery_resources(GROUP, "v1").is_empty());
        assert_eq!(
            aggregated_resources(GROUP, VERSION)[1]["scope"],
            "Namespaced"
        );
    }
}
