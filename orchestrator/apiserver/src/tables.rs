//! Server-side printing (`as=Table`), with kubectl's familiar columns.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// One printed column (`TableColumnDefinition`).
pub struct Column {
    pub name: &'static str,
    pub kind: &'static str,
    pub format: &'static str,
    pub description: &'static str,
    /// 0 = always shown; 1 = only with `-o wide`.
    pub priority: u8,
}

pub const fn col(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind: "string",
        format: "",
        description,
        priority: 0,
    }
}

pub const fn wide(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind: "string",
        format: "",
        description,
        priority: 1,
    }
}

pub const NAME: Column = Column {
    name: "Name",
    kind: "string",
    format: "name",
    description: "Name must be unique within a namespace.",
    priority: 0,
};

pub const AGE: Column = col(
    "Age",
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

/// What `kubectl get` prints for a resource: its columns and each row's
/// cells. Built-ins use [`TableDef`]; custom resources their CRD's
/// printer columns.
pub trait TablePrinter: Send + Sync {
    /// `columnDefinitions` of a Table.
    fn column_definitions(&self) -> Value;
    /// One row's cells, in column order.
    fn cells(&self, obj: &Value, now: DateTime<Utc>) -> Vec<Value>;
}

/// Columns and the function computing a row's cells for one object.
pub struct TableDef {
    pub columns: Vec<Column>,
    pub cells: fn(&Value, DateTime<Utc>) -> Vec<Value>,
}

impl TableDef {
    /// The NAME and AGE columns every resource without its own printer gets.
    pub fn name_age() -> Self {
        TableDef {
            columns: vec![NAME, AGE],
            cells: |o, now| vec![name(o), age(o, now)],
        }
    }
}

impl TablePrinter for TableDef {
    fn column_definitions(&self) -> Value {
        self.columns
            .iter()
            .map(|c| {
                json!({
                    "name": c.name, "type": c.kind, "format": c.format,
                    "description": c.description, "priority": c.priority,
                })
            })
            .collect()
    }

    fn cells(&self, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
        (self.cells)(obj, now)
    }
}

pub fn s<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub fn i(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

pub fn name(obj: &Value) -> Value {
    Value::from(s(obj, "/metadata/name"))
}

pub fn age(obj: &Value, now: DateTime<Utc>) -> Value {
    Value::from(since(s(obj, "/metadata/creationTimestamp"), now))
}

pub fn len(obj: &Value, pointer: &str) -> usize {
    match obj.pointer(pointer) {
        Some(Value::Array(a)) => a.len(),
        Some(Value::Object(m)) => m.len(),
        _ => 0,
    }
}

pub fn or_none(v: &str) -> Value {
    Value::from(if v.is_empty() { "<none>" } else { v })
}

/// kubectl's short human durations: 45s, 5m10s, 3h, 12d.
pub fn since(timestamp: &str, now: DateTime<Utc>) -> String {
    let Ok(t) = DateTime::parse_from_rfc3339(timestamp) else {
        return "<unknown>".into();
    };
    human_duration((now - t.with_timezone(&Utc)).num_seconds().max(0))
}

pub fn human_duration(secs: i64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        format!("{}y{}d", d / 365, d % 365)
    } else {
        format!("{}y", d / 365)
    }
}

/// `a,b,c` of label-selector pairs, as kubectl prints selectors.
pub fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = Vec::new();
    let labels = sel.get("matchLabels").unwrap_or(sel);
    if let Some(m) = labels.as_object() {
        for (k, v) in m {
            if let Some(v) = v.as_str() {
                parts.push(format!("{k}={v}"));
            }
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = s(e, "/key");
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match s(e, "/operator") {
                "In" => parts.push(format!("{key} in ({})", values.join(","))),
                "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
                "Exists" => parts.push(key.to_string()),
                "DoesNotExist" => parts.push(format!("!{key}")),
                _ => {}
            }
        }
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

pub fn container_names_and_images(spec: Option<&Value>) -> (String, String) {
    let containers = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = containers
        .iter()
        .map(|c| c.get("name").and_then(Value::as_str).unwrap_or(""))
        .collect();
    let images: Vec<&str> = containers
        .iter()
        .map(|c| c.get("image").and_then(Value::as_str).unwrap_or(""))
        .collect();
    (names.join(","), images.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(130), "2m10s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(4 * 3600 + 60), "4h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(100 * 86400), "100d");
    }

    #[test]
    fn selectors() {
        let sel = json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "t", "operator": "In", "values": ["a","b"]}]});
        assert_eq!(selector_string(Some(&sel)), "app=web,t in (a,b)");
        assert_eq!(selector_string(None), "<none>");
    }
}
