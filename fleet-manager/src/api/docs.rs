//! `/docs`: the OpenAPI document read out to people — every endpoint with
//! its parameters, body and answers, then every schema — rendered once,
//! from the same document `/openapi.json` serves, with no scripts and
//! nothing fetched from elsewhere.

use std::fmt::Write;

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{OpenApi, RefOr};

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn operations(item: &utoipa::openapi::PathItem) -> Vec<(&'static str, &Operation)> {
    [
        ("GET", &item.get),
        ("POST", &item.post),
        ("PUT", &item.put),
        ("PATCH", &item.patch),
        ("DELETE", &item.delete),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
    .collect()
}

fn schema_name<T>(r: &RefOr<T>) -> Option<String> {
    match r {
        RefOr::Ref(r) => r.ref_location.rsplit('/').next().map(str::to_string),
        RefOr::T(_) => None,
    }
}

pub fn render(doc: &OpenApi) -> String {
    let mut out = String::new();
    let title = escape(&doc.info.title);
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}}\
         code,pre{{background:#f4f4f4;padding:.1em .3em}} pre{{padding:.6em;overflow-x:auto}}\
         .m{{display:inline-block;min-width:4.5em;font-weight:bold}} h3{{margin-bottom:.2em}}\
         td{{padding:.1em .6em;vertical-align:top}}</style></head><body>\
         <h1>{title} <small>{}</small></h1><p>{}</p>\
         <p>Send <code>Authorization: Bearer TOKEN</code> with every <code>/v1</code> request. \
         The machine-readable document is <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3.1).</p>\
         <pre>curl --cacert CA -H \"Authorization: Bearer $TOKEN\" https://HOST:8443/v1/tools \\\n  \
         -d '{{\"name\":\"wireshark\",\"type\":\"pcapOverIp\",\"listen\":\"127.0.0.1:57012\"}}'\n\
         curl --cacert CA -H \"Authorization: Bearer $TOKEN\" https://HOST:8443/v1/policies \\\n  \
         -d '{{\"name\":\"web\",\"namespaces\":[\"shop\"],\"podSelector\":{{\"matchLabels\":{{\"app\":\"web\"}}}},\"tools\":[\"wireshark\"]}}'\n\
         tshark -i TCP@127.0.0.1:57012</pre><h2>Endpoints</h2>",
        escape(&doc.info.version),
        escape(doc.info.description.as_deref().unwrap_or_default()),
    );
    for (path, item) in &doc.paths.paths {
        for (method, op) in operations(item) {
            let _ = write!(
                out,
                "<h3><span class=\"m\">{method}</span> <code>{}</code></h3><p>{}</p><table>",
                escape(path),
                escape(op.summary.as_deref().unwrap_or_default()),
            );
            for p in op.parameters.iter().flatten() {
                let place = match p.parameter_in {
                    ParameterIn::Path => "path",
                    ParameterIn::Query => "query",
                    ParameterIn::Header => "header",
                    ParameterIn::Cookie => "cookie",
                };
                let _ = write!(
                    out,
                    "<tr><td><code>{}</code></td><td>{place}</td><td>{}</td></tr>",
                    escape(&p.name),
                    escape(p.description.as_deref().unwrap_or_default()),
                );
            }
            if let Some(body) = &op.request_body {
                for (content_type, content) in &body.content {
                    let schema = content
                        .schema
                        .as_ref()
                        .and_then(schema_name)
                        .map(|n| format!("<a href=\"#{n}\">{n}</a>"))
                        .unwrap_or_else(|| "JSON object".into());
                    let _ = write!(
                        out,
                        "<tr><td>body</td><td><code>{}</code></td><td>{schema}</td></tr>",
                        escape(content_type)
                    );
                }
            }
            for (code, response) in &op.responses.responses {
                let RefOr::T(response) = response else {
                    continue;
                };
                let schema = response
                    .content
                    .values()
                    .filter_map(|c| c.schema.as_ref().and_then(schema_name))
                    .map(|n| format!(" → <a href=\"#{n}\">{n}</a>"))
                    .collect::<String>();
                let _ = write!(
                    out,
                    "<tr><td><b>{}</b></td><td colspan=\"2\">{}{schema}</td></tr>",
                    escape(code),
                    escape(&response.description),
                );
            }
            out.push_str("</table>");
        }
    }
    out.push_str("<h2>Schemas</h2>");
    if let Some(components) = &doc.components {
        for (name, schema) in &components.schemas {
            let text = serde_json::to_string_pretty(schema).unwrap_or_default();
            let _ = write!(
                out,
                "<h3 id=\"{0}\">{0}</h3><pre>{1}</pre>",
                escape(name),
                escape(&text)
            );
        }
    }
    out.push_str("</body></html>");
    out
}
