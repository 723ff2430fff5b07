//! networking.k8s.io/v1 Ingresses: HTTP routes from hosts and paths to
//! Services. Served with Kubernetes' validation and kubectl's columns; an
//! Ingress without a class gets the default IngressClass (the one
//! annotated `ingressclass.kubernetes.io/is-default-class: "true"`, the
//! newest if several). No controller routes them.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::networking::v1::Ingress;
use serde_json::{json, Value};
use tapestry_apimachinery::validation::{dns1035_label_errors, dns1123_subdomain_errors};
use tapestry_store::{ListOptions, Store};

use super::{validate_host, validate_port};
use crate::error::{ApiResult, Cause};
use crate::registry::{names, Behaviour, Generation, ResourceDef, WriteHook};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, name, or_none, s, TableDef, AGE, NAME};

/// The annotation marking the cluster's default IngressClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The class annotation older Ingresses use instead of the field.
const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

pub fn definition(store: Arc<dyn Store>) -> ResourceDef {
    ResourceDef {
        short_names: names(&["ing"]),
        subresources: vec![StatusRest::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(IngressBehaviour),
        hook: Some(Arc::new(DefaultClass { store })),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Class",
                    "The name of the IngressClass resource that should be used.",
                ),
                col(
                    "Hosts",
                    "Hosts that incoming requests are matched against before the ingress rule",
                ),
                col(
                    "Address",
                    "Address is a list containing ingress points for the load-balancer",
                ),
                col("Ports", "Ports of TLS configurations that open"),
                AGE,
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    or_none(s(o, "/spec/ingressClassName")),
                    json!(hosts(o)),
                    json!(addresses(o)),
                    json!(if o
                        .pointer("/spec/tls")
                        .and_then(Value::as_array)
                        .is_some_and(|t| !t.is_empty())
                    {
                        "80, 443"
                    } else {
                        "80"
                    }),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<Ingress>()
    }
}

/// kubectl's HOSTS: the rules' hosts, `*` when none, three at most.
fn hosts(o: &Value) -> String {
    let list: Vec<&str> = o
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("host").and_then(Value::as_str))
        .filter(|h| !h.is_empty())
        .collect();
    if list.is_empty() {
        return "*".into();
    }
    if list.len() > 3 {
        return format!("{} + {} more...", list[..3].join(","), list.len() - 3);
    }
    list.join(",")
}

fn addresses(o: &Value) -> String {
    o.pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| {
            [s(i, "/ip"), s(i, "/hostname")]
                .into_iter()
                .find(|a| !a.is_empty())
        })
        .collect::<Vec<_>>()
        .join(",")
}

struct IngressBehaviour;

const PATH_TYPES: [&str; 3] = ["Exact", "ImplementationSpecific", "Prefix"];

fn validate_path(path: &str, path_type: &str, field: &str, causes: &mut Vec<Cause>) {
    let v = json!(path);
    if matches!(path_type, "Exact" | "Prefix") {
        if !path.starts_with('/') {
            causes.push(Cause::invalid(field, &v, "must be an absolute path"));
            return;
        }
        for bad in ["//", "/./", "/../", "%2f", "%2F"] {
            if path.contains(bad) {
                causes.push(Cause::invalid(
                    field,
                    &v,
                    format!("must not contain '{bad}'"),
                ));
            }
        }
        for bad in ["/..", "/."] {
            if path.ends_with(bad) {
                causes.push(Cause::invalid(
                    field,
                    &v,
                    format!("must not end with '{bad}'"),
                ));
            }
        }
    } else if !path.is_empty() && !path.starts_with('/') {
        causes.push(Cause::invalid(field, &v, "must be an absolute path"));
    }
}

fn validate_backend(b: &Value, field: &str, causes: &mut Vec<Cause>) {
    let service = b.get("service").filter(|v| !v.is_null());
    let resource = b.get("resource").filter(|v| !v.is_null());
    match (service, resource) {
        (Some(_), Some(_)) => causes.push(Cause::invalid(
            field,
            &json!(""),
            "cannot set both resource and service backends",
        )),
        (None, Some(r)) => {
            if s(r, "/kind").is_empty() {
                causes.push(Cause::required(format!("{field}.resource.kind")));
            }
            if s(r, "/name").is_empty() {
                causes.push(Cause::required(format!("{field}.resource.name")));
            }
        }
        (Some(svc), None) => {
            let name = s(svc, "/name");
            if name.is_empty() {
                causes.push(Cause::required(format!("{field}.service.name")));
            } else {
                for e in dns1035_label_errors(name) {
                    causes.push(Cause::invalid(
                        format!("{field}.service.name"),
                        &json!(name),
                        e,
                    ));
                }
            }
            let port_name = s(svc, "/port/name");
            let number = svc
                .pointer("/port/number")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            match (port_name.is_empty(), number) {
                (false, n) if n != 0 => causes.push(Cause::invalid(
                    field,
                    &json!(""),
                    "cannot set both port name & port number",
                )),
                (false, _) => validate_port(
                    &json!(port_name),
                    &format!("{field}.service.port.name"),
                    causes,
                ),
                (true, 0) => causes.push(Cause::required_because(
                    format!("{field}.service.port"),
                    "port name or number is required",
                )),
                (true, n) => {
                    validate_port(&json!(n), &format!("{field}.service.port.number"), causes)
                }
            }
        }
        (None, None) => causes.push(Cause::invalid(
            field,
            &json!(""),
            "resource or service backend is required",
        )),
    }
}

impl Behaviour for IngressBehaviour {
    fn prepare_for_create(&self, obj: &mut Value) {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let rules = spec
            .get("rules")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let default_backend = spec.get("defaultBackend").filter(|v| !v.is_null());
        if rules.is_empty() && default_backend.is_none() {
            causes.push(Cause::invalid(
                "spec",
                &json!(rules),
                "either `defaultBackend` or `rules` must be specified",
            ));
        }
        if let Some(b) = default_backend {
            validate_backend(b, "spec.defaultBackend", &mut causes);
        }
        let class = s(&spec, "/ingressClassName");
        if !class.is_empty() {
            for e in dns1123_subdomain_errors(class) {
                causes.push(Cause::invalid("spec.ingressClassName", &json!(class), e));
            }
        }
        for (i, rule) in rules.iter().enumerate() {
            let path = format!("spec.rules[{i}]");
            let host = s(rule, "/host");
            if !host.is_empty() {
                validate_host(host, &format!("{path}.host"), &mut causes);
            }
            let Some(http) = rule.get("http").filter(|v| !v.is_null()) else {
                continue;
            };
            let paths = http
                .get("paths")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if paths.is_empty() {
                causes.push(Cause::required(format!("{path}.http.paths")));
            }
            for (j, p) in paths.iter().enumerate() {
                let field = format!("{path}.http.paths[{j}]");
                let path_type = s(p, "/pathType");
                if path_type.is_empty() {
                    causes.push(Cause::required_because(
                        format!("{field}.pathType"),
                        "pathType must be specified",
                    ));
                } else if !PATH_TYPES.contains(&path_type) {
                    causes.push(Cause::unsupported(
                        format!("{field}.pathType"),
                        &json!(path_type),
                        &PATH_TYPES,
                    ));
                } else {
                    validate_path(
                        s(p, "/path"),
                        path_type,
                        &format!("{field}.path"),
                        &mut causes,
                    );
                }
                match p.get("backend") {
                    Some(b) => validate_backend(b, &format!("{field}.backend"), &mut causes),
                    None => causes.push(Cause::required(format!("{field}.backend"))),
                }
            }
        }
        let tls = spec
            .get("tls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, t) in tls.iter().enumerate() {
            let hosts = t
                .get("hosts")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (j, h) in hosts.iter().enumerate() {
                if let Some(h) = h.as_str() {
                    validate_host(h, &format!("spec.tls[{i}].hosts[{j}]"), &mut causes);
                }
            }
        }
        causes
    }
}

/// Fills `spec.ingressClassName` of a new Ingress that names no class
/// from the default IngressClass, as Kubernetes' DefaultIngressClass
/// admission does.
struct DefaultClass {
    store: Arc<dyn Store>,
}

#[async_trait]
impl WriteHook for DefaultClass {
    async fn on_create(&self, obj: &mut Value, _dry_run: bool) -> ApiResult<()> {
        let named = !s(obj, "/spec/ingressClassName").is_empty()
            || obj
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(CLASS_ANNOTATION))
                .is_some();
        if named {
            return Ok(());
        }
        let classes = self
            .store
            .list("/registry/ingressclasses/", ListOptions::default())
            .await
            .map_err(crate::error::ApiError::internal)?;
        let default = classes
            .items
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
            .filter(|c| {
                c.pointer("/metadata/annotations")
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .and_then(Value::as_str)
                    == Some("true")
            })
            .max_by(|a, b| {
                s(a, "/metadata/creationTimestamp").cmp(s(b, "/metadata/creationTimestamp"))
            });
        if let (Some(class), Some(spec)) =
            (default, obj.get_mut("spec").and_then(Value::as_object_mut))
        {
            spec.insert(
                "ingressClassName".into(),
                json!(s(&class, "/metadata/name")),
            );
        }
        Ok(())
    }

    async fn on_update(&self, _new: &mut Value, _old: &Value, _dry_run: bool) -> ApiResult<()> {
        Ok(())
    }

    async fn release(&self, _obj: &Value, _keep: Option<&Value>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: Value) -> Vec<String> {
        IngressBehaviour
            .validate(&json!({"spec": spec}))
            .into_iter()
            .map(|c| c.field)
            .collect()
    }

    fn rule(path: Value) -> Value {
        json!({"rules": [{"host": "web.example.com", "http": {"paths": [path]}}]})
    }

    #[test]
    fn ingresses_are_validated_as_kubernetes_does() {
        let good = json!({"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "web", "port": {"number": 80}}}});
        assert!(fields(rule(good)).is_empty());
        assert_eq!(fields(json!({})), ["spec"]);
        assert_eq!(
            fields(rule(
                json!({"path": "/", "backend": {"service": {"name": "web", "port": {"number": 80}}}})
            )),
            ["spec.rules[0].http.paths[0].pathType"]
        );
        assert_eq!(
            fields(rule(json!({"path": "api", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}))),
            ["spec.rules[0].http.paths[0].path"]
        );
        assert_eq!(
            fields(rule(json!({"path": "/", "pathType": "Exact",
                "backend": {"service": {"name": "Web_1", "port": {"number": 80}}}}))),
            ["spec.rules[0].http.paths[0].backend.service.name"]
        );
        assert_eq!(
            fields(rule(json!({"path": "/", "pathType": "Exact",
                "backend": {"service": {"name": "web", "port": {}}}}))),
            ["spec.rules[0].http.paths[0].backend.service.port"]
        );
        assert_eq!(
            fields(rule(json!({"path": "/", "pathType": "Exact",
                "backend": {"service": {"name": "web", "port": {"number": 70000}}}}))),
            ["spec.rules[0].http.paths[0].backend.service.port.number"]
        );
        assert_eq!(
            fields(json!({"rules": [{"host": "10.0.0.1"}]})),
            ["spec.rules[0].host"]
        );
        assert!(fields(json!({"rules": [{"host": "*.example.com"}]})).is_empty());
    }

    #[test]
    fn kubectl_columns() {
        let o = json!({"spec": {"rules": [{"host": "a"}, {"host": "b"}], "tls": [{}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.9"}]}}});
        assert_eq!(hosts(&o), "a,b");
        assert_eq!(addresses(&o), "10.0.0.9");
        assert_eq!(hosts(&json!({"spec": {}})), "*");
    }
}
