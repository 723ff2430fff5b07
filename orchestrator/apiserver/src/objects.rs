//! Helpers over objects held as JSON values, and their storage encoding.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tapestry_store::KeyValue;

use crate::error::{ApiError, ApiResult};
use crate::registry::ResourceDef;

/// Kubernetes timestamps: RFC 3339, second precision, UTC.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn meta(obj: &Value) -> &Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    obj.get("metadata")
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

pub fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    meta(obj).get(field).and_then(Value::as_str).unwrap_or("")
}

pub fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .get("finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub fn is_terminating(obj: &Value) -> bool {
    meta(obj)
        .get("deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// Whether two objects differ in anything but metadata and status (and
/// apiVersion/kind): what generation tracks. Compares in place, without
/// copying either object.
pub fn spec_differs(a: &Value, b: &Value) -> bool {
    differs_outside(a, b, &["metadata", "status", "apiVersion", "kind"])
}

/// Whether two objects differ in any top-level member but `except`.
pub fn differs_outside(a: &Value, b: &Value, except: &[&str]) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a != b;
    };
    let counted = |m: &'_ Map<String, Value>| {
        m.iter()
            .filter(|(k, _)| !except.contains(&k.as_str()))
            .count()
    };
    counted(a) != counted(b)
        || a.iter()
            .filter(|(k, _)| !except.contains(&k.as_str()))
            .any(|(k, v)| b.get(k) != Some(v))
}

/// Paths present in `input` but dropped by decoding: unknown fields. The
/// path grows and shrinks in one buffer and is copied out only for an
/// unknown field; formatting it at every field cost as much as the decode.
pub fn unknown_fields(input: &Value, decoded: &Value, path: &mut String, out: &mut Vec<String>) {
    let len = path.len();
    match (input, decoded) {
        (Value::Object(i), Value::Object(d)) => {
            for (k, v) in i {
                if len > 0 {
                    path.push('.');
                }
                path.push_str(k);
                match d.get(k) {
                    Some(dv) => unknown_fields(v, dv, path, out),
                    None if v.is_null() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(i), Value::Array(d)) => {
            for (idx, (iv, dv)) in i.iter().zip(d).enumerate() {
                let _ = write!(path, "[{idx}]");
                unknown_fields(iv, dv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Decode a stored value into the object served for `def`.
pub fn decode(def: &ResourceDef, kv: &KeyValue) -> ApiResult<Value> {
    let obj: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("corrupt object at {}: {e}", kv.key)))?;
    let mut obj = def.behaviour.to_served(obj);
    meta_mut(&mut obj).insert(
        "resourceVersion".into(),
        Value::String(kv.mod_revision.to_string()),
    );
    Ok(obj)
}

/// Append the served JSON of a stored object to `out` without decoding it:
/// the stored bytes with `metadata.resourceVersion` spliced in, and
/// `metadata.managedFields` cut out when `omit_managed_fields`. Returns
/// false (and appends nothing) when the resource converts on read or the
/// stored value has no metadata object; callers then use [`decode`].
pub fn append_served(
    def: &ResourceDef,
    kv: &KeyValue,
    out: &mut Vec<u8>,
    omit_managed_fields: bool,
) -> bool {
    if !def.behaviour.serves_stored_form() {
        return false;
    }
    let json = &kv.value[..];
    let Some(open) = metadata_offset(json) else {
        return false;
    };
    let cut = omit_managed_fields
        .then(|| managed_fields_range(json, open))
        .flatten();
    let (before, after) = match cut {
        Some((from, to)) => (&json[open + 1..from], &json[to..]),
        None => (&json[open + 1..], &json[json.len()..]),
    };
    let empty = before
        .iter()
        .chain(after)
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    // The object plus the spliced-in resourceVersion, in one allocation.
    out.reserve(json.len() + 48);
    out.extend_from_slice(&json[..=open]);
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(itoa::Buffer::new().format(kv.mod_revision).as_bytes());
    out.extend_from_slice(if empty { b"\"" } else { b"\"," });
    out.extend_from_slice(before);
    out.extend_from_slice(after);
    true
}

/// The bytes to cut to drop the `managedFields` member from the metadata
/// object that opens at `open`: the member and one adjacent comma. None
/// when there is none (or the metadata is not as expected).
fn managed_fields_range(json: &[u8], open: usize) -> Option<(usize, usize)> {
    let mut at = open + 1;
    // Where the previous member's value ended, for a last member.
    let mut previous_end = None;
    loop {
        at = skip_whitespace(json, at);
        if json.get(at) != Some(&b'"') {
            return None;
        }
        let member = at;
        let key_end = string_end(json, at)?;
        let key = &json[at + 1..key_end - 1];
        at = skip_whitespace(json, key_end);
        if json.get(at) != Some(&b':') {
            return None;
        }
        let value_ends = value_end(json, skip_whitespace(json, at + 1))?;
        at = skip_whitespace(json, value_ends);
        let last = match json.get(at)? {
            b',' => false,
            b'}' => true,
            _ => return None,
        };
        if key == b"managedFields" {
            return Some(match (last, previous_end) {
                (false, _) => (member, at + 1),
                (true, Some(end)) => (end, value_ends),
                (true, None) => (member, value_ends),
            });
        }
        if last {
            return None;
        }
        previous_end = Some(value_ends);
        at += 1;
    }
}

/// Drops `metadata.managedFields` from a decoded object.
pub fn remove_managed_fields(obj: &mut Value) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        m.remove("managedFields");
    }
}

/// Where the top-level `metadata` object of a stored JSON object opens (the
/// offset of its `{`), found by walking the top-level keys only. Objects are
/// stored with `metadata` right after apiVersion and kind (see [`encode`]), so
/// this reads a few dozen bytes instead of parsing the whole object, which
/// was most of the cost of serving a list. None for anything unexpected
/// (callers then decode).
fn metadata_offset(json: &[u8]) -> Option<usize> {
    let mut at = skip_whitespace(json, 0);
    if json.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_whitespace(json, at);
        if json.get(at) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, at)?;
        let key = &json[at + 1..key_end - 1];
        at = skip_whitespace(json, key_end);
        if json.get(at) != Some(&b':') {
            return None;
        }
        at = skip_whitespace(json, at + 1);
        if key == b"metadata" {
            return (json.get(at) == Some(&b'{')).then_some(at);
        }
        at = skip_whitespace(json, value_end(json, at)?);
        match json.get(at) {
            Some(b',') => at += 1,
            _ => return None,
        }
    }
}

fn skip_whitespace(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The offset just past the string that opens at `at` (a `"`).
fn string_end(json: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[i] == b'"' {
            return Some(i + 1);
        }
        i += 2; // an escape: the next byte is never the closing quote
    }
}

/// The offset just past the JSON value that starts at `at`.
fn value_end(json: &[u8], at: usize) -> Option<usize> {
    match json.get(at)? {
        b'"' => string_end(json, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match json.get(i)? {
                    b'"' => {
                        i = string_end(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let len = json[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(json.len() - at);
            Some(at + len)
        }
    }
}

/// Append the served JSON of a stored object, by splicing when possible.
pub fn append_served_or_decode(
    def: &ResourceDef,
    kv: &KeyValue,
    out: &mut Vec<u8>,
    omit_managed_fields: bool,
) -> ApiResult<()> {
    if !append_served(def, kv, out, omit_managed_fields) {
        let mut obj = decode(def, kv)?;
        if omit_managed_fields {
            remove_managed_fields(&mut obj);
        }
        serde_json::to_writer(&mut *out, &obj).map_err(ApiError::internal)?;
    }
    Ok(())
}

/// What label and field selectors read from a stored object, parsed without
/// building the rest of it: `metadata.name`, `namespace` and `labels`, and
/// the resource's selectable fields. Filtered lists and watches test every
/// object, and most of an object (spec, status, managedFields) is then only
/// skipped over rather than allocated.
pub struct SelectorView {
    pick: Pick,
}

/// The members of a JSON object to keep: `Whole` keeps the value as it is.
enum Pick {
    Whole,
    Members(Vec<(String, Pick)>),
}

impl Pick {
    fn add(&mut self, path: &[&str]) {
        let Some((first, rest)) = path.split_first() else {
            *self = Pick::Whole;
            return;
        };
        let Pick::Members(members) = self else {
            return; // already kept whole
        };
        let at = match members.iter().position(|(name, _)| name == first) {
            Some(at) => at,
            None => {
                members.push(((*first).to_owned(), Pick::Members(Vec::new())));
                members.len() - 1
            }
        };
        members[at].1.add(rest);
    }
}

impl SelectorView {
    pub fn new(def: &ResourceDef) -> Self {
        let mut pick = Pick::Members(Vec::new());
        let pointers = ["/metadata/name", "/metadata/namespace", "/metadata/labels"]
            .into_iter()
            .chain(
                def.field_selectors
                    .iter()
                    .map(|(_, pointer)| pointer.as_str()),
            );
        for pointer in pointers {
            let path: Vec<&str> = pointer.split('/').skip(1).collect();
            pick.add(&path);
        }
        SelectorView { pick }
    }

    /// The object as selectors see it. Resources that convert on read are
    /// decoded whole.
    pub fn read(&self, def: &ResourceDef, kv: &KeyValue) -> ApiResult<Value> {
        if !def.behaviour.serves_stored_form() {
            return decode(def, kv);
        }
        let corrupt =
            |e: serde_json::Error| ApiError::Internal(format!("corrupt object at {}: {e}", kv.key));
        let mut de = serde_json::Deserializer::from_slice(&kv.value);
        let view = PickSeed(&self.pick).deserialize(&mut de).map_err(corrupt)?;
        de.end().map_err(corrupt)?;
        Ok(view)
    }
}

struct PickSeed<'a>(&'a Pick);

impl<'de> DeserializeSeed<'de> for PickSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        match self.0 {
            Pick::Whole => Value::deserialize(de),
            Pick::Members(members) => de.deserialize_any(PickVisitor(members)),
        }
    }
}

/// Keeps the picked members of an object; anything else where an object
/// was expected reads as null, as a missing field does.
struct PickVisitor<'a>(&'a [(String, Pick)]);

impl<'de> Visitor<'de> for PickVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(MemberName(name)) = map.next_key()? {
            match self.0.iter().find(|(wanted, _)| *wanted == name) {
                Some((wanted, pick)) => {
                    let value = map.next_value_seed(PickSeed(pick))?;
                    kept.insert(wanted.clone(), value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// An object member's name, borrowed from the input unless it had escapes.
struct MemberName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(name.to_owned())))
            }
        }
        de.deserialize_str(NameVisitor)
    }
}

/// Encode an object for storage; its resourceVersion is the store revision,
/// so it is not stored.
pub fn encode(def: &ResourceDef, obj: &Value) -> ApiResult<Bytes> {
    let bytes = if def.behaviour.serves_stored_form() {
        // Stored as served: serialize in place rather than copy the object
        // only to drop one field.
        serde_json::to_vec(&WithoutResourceVersion(obj))
    } else {
        let mut stored = def.behaviour.to_storage(obj.clone());
        meta_mut(&mut stored).remove("resourceVersion");
        serde_json::to_vec(&stored)
    };
    bytes.map(Bytes::from).map_err(ApiError::internal)
}

/// An object serialized without `metadata.resourceVersion`: the store's
/// revision is the version, so it is never stored.
struct WithoutResourceVersion<'a>(&'a Value);

impl serde::Serialize for WithoutResourceVersion<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Some(fields) = self.0.as_object() else {
            return self.0.serialize(s);
        };
        // apiVersion, kind and metadata lead, as Kubernetes writes them, so
        // reads find metadata without walking the spec (`metadata_offset`).
        const LEADING: [&str; 3] = ["apiVersion", "kind", "metadata"];
        let mut out = s.serialize_map(Some(fields.len()))?;
        for k in LEADING {
            match fields.get(k) {
                Some(Value::Object(meta)) if k == "metadata" => {
                    out.serialize_entry(k, &MetadataWithoutResourceVersion(meta))?
                }
                Some(v) => out.serialize_entry(k, v)?,
                None => {}
            }
        }
        for (k, v) in fields
            .iter()
            .filter(|(k, _)| !LEADING.contains(&k.as_str()))
        {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

struct MetadataWithoutResourceVersion<'a>(&'a Map<String, Value>);

impl serde::Serialize for MetadataWithoutResourceVersion<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().filter(|(k, _)| *k != "resourceVersion"))
    }
}

/// The store revision a client's resourceVersion string names.
pub fn parse_resource_version(rv: &str) -> ApiResult<i64> {
    rv.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::BadRequest(format!("invalid resource version: {rv:?}")))
}

/// `metadata` reduced to what PartialObjectMetadata carries.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// A random suffix as `generateName` uses (no vowels, no look-alikes).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let id = uuid::Uuid::new_v4();
    id.as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(value: &str) -> KeyValue {
        KeyValue {
            key: "/registry/leases/ns/a".into(),
            value: Bytes::from(value.to_string()),
            create_revision: 3,
            mod_revision: 7,
        }
    }

    fn def(group: &str, plural: &str) -> ResourceDef {
        [
            crate::resources::coordination::lease::definition(),
            crate::resources::events::event::definition(),
        ]
        .into_iter()
        .find(|d| d.group == group && d.plural == plural)
        .expect("resource exists")
    }

    /// Splicing must give exactly what decoding and re-encoding gives.
    #[test]
    fn served_bytes_equal_decoded_object() {
        let leases = def("coordination.k8s.io", "leases");
        for value in [
            r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"a","namespace":"ns"},"spec":{}}"#,
            r#"{"spec":{"metadata":{"x":1}},"metadata":{},"kind":"Lease"}"#,
            r#"{"kind":"Lease","metadata": { "name":"a" } }"#,
            r#"{"a":"x\"metadata\":{\\","b":[1,{"c":"]}"}],"n":-1.5e3,"t":true,"z":null , "metadata":{"name":"a"}}"#,
        ] {
            let kv = stored(value);
            let mut out = Vec::new();
            assert!(append_served(&leases, &kv, &mut out, false), "{value}");
            let spliced: Value = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(spliced, decode(&leases, &kv).unwrap(), "{value}");
            assert_eq!(spliced["metadata"]["resourceVersion"], "7");
        }
    }

    /// Cutting managedFields out of the stored bytes gives what decoding,
    /// removing them and re-encoding gives, wherever they sit.
    #[test]
    fn served_bytes_can_omit_managed_fields() {
        let leases = def("coordination.k8s.io", "leases");
        let mf = r#""managedFields":[{"manager":"m","fieldsV1":{"f:spec":{".":{},"f:x":{}}},"time":"t]}\"{"}]"#;
        for metadata in [
            format!("{{{mf}}}"),
            format!("{{ {mf} }}"),
            format!(r#"{{{mf},"name":"a"}}"#),
            format!(r#"{{"name":"a",{mf}}}"#),
            format!(r#"{{"name":"a" , {mf} , "uid":"u"}}"#),
            format!(r#"{{"name":"a",{mf} }}"#),
            r#"{"name":"a","labels":{"managedFields":"x"}}"#.to_string(),
            "{}".to_string(),
        ] {
            let value = format!(
                r#"{{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{metadata},"spec":{{"managedFields":[1]}}}}"#
            );
            let kv = stored(&value);
            let mut out = Vec::new();
            assert!(append_served(&leases, &kv, &mut out, true), "{value}");
            let spliced: Value = serde_json::from_slice(&out).expect("valid JSON");
            let mut want = decode(&leases, &kv).unwrap();
            remove_managed_fields(&mut want);
            assert_eq!(spliced, want, "{value}");
            assert_eq!(spliced["spec"]["managedFields"], json!([1]));
        }
    }

    /// Selectors see the same fields in the view as in the decoded object.
    #[test]
    fn selector_view_keeps_what_selectors_read() {
        // Pods' selectable fields, on a resource that needs no allocator.
        let mut pods = def("coordination.k8s.io", "leases");
        pods.field_selectors = crate::registry::selectable(&[
            ("spec.nodeName", "/spec/nodeName"),
            ("spec.restartPolicy", "/spec/restartPolicy"),
            ("status.phase", "/status/phase"),
            ("status.podIP", "/status/podIP"),
        ]);
        let view = SelectorView::new(&pods);
        let full = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns","uid":"u","labels":{"app":"web","t\u0069er":"x"},"managedFields":[{"manager":"m"}]},"spec":{"nodeName":"n1","containers":[{"name":"c","image":"i"}],"restartPolicy":"Always"},"status":{"phase":"Running","podIP":"10.0.0.1"}}"#;
        let got = view.read(&pods, &stored(full)).unwrap();
        assert_eq!(
            got,
            json!({
                "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web", "tier": "x"}},
                "spec": {"nodeName": "n1", "restartPolicy": "Always"},
                "status": {"phase": "Running", "podIP": "10.0.0.1"},
            })
        );
        let decoded = decode(&pods, &stored(full)).unwrap();
        for (label, _) in &pods.field_selectors {
            assert_eq!(
                pods.field_value(&got, label),
                pods.field_value(&decoded, label)
            );
        }
        // Odd shapes read as missing fields, as they do when decoded.
        for odd in [
            r#"{"metadata":"x","spec":[1,{"nodeName":"n"}],"status":7}"#,
            r#"{"metadata":{"labels":null},"spec":{"nodeName":3}}"#,
            "[]",
        ] {
            let got = view.read(&pods, &stored(odd)).unwrap();
            let decoded: Value = serde_json::from_str(odd).unwrap();
            for field in ["metadata.name", "spec.nodeName", "status.phase"] {
                assert_eq!(
                    pods.field_value(&got, field),
                    pods.field_value(&decoded, field),
                    "{odd} {field}"
                );
            }
        }
        assert!(view.read(&pods, &stored(r#"{"metadata":{"#)).is_err());
        assert!(view.read(&pods, &stored("{} x")).is_err());
    }

    #[test]
    fn odd_or_converted_values_fall_back_to_decoding() {
        let leases = def("coordination.k8s.io", "leases");
        for value in [
            r#"{"kind":"Lease"}"#,
            r#"{"metadata":null}"#,
            r#"[1]"#,
            "{",
            r#"{"spec":{"metadata":{"x":1}}}"#,
            r#"{"kind":"Lease" "metadata":{}}"#,
            r#"{"spec":"unterminated, "metadata":{}}"#,
        ] {
            let mut out = Vec::new();
            assert!(
                !append_served(&leases, &stored(value), &mut out, false),
                "{value}"
            );
            assert!(out.is_empty());
        }
        let events = def("events.k8s.io", "events");
        let kv = stored(r#"{"apiVersion":"v1","kind":"Event","metadata":{"name":"e"}}"#);
        let mut out = Vec::new();
        assert!(!append_served(&events, &kv, &mut out, false));
        append_served_or_decode(&events, &kv, &mut out, false).unwrap();
        let served: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(served["apiVersion"], "events.k8s.io/v1");
    }

    #[test]
    fn encoding_drops_only_the_resource_version() {
        let leases = def("coordination.k8s.io", "leases");
        let obj = json!({"kind": "Lease", "metadata": {"name": "a", "resourceVersion": "9",
                         "labels": {"resourceVersion": "kept"}}, "spec": {"resourceVersion": 1}});
        let stored: Value = serde_json::from_slice(&encode(&leases, &obj).unwrap()).unwrap();
        let mut expected = obj.clone();
        meta_mut(&mut expected).remove("resourceVersion");
        assert_eq!(stored, expected);
    }

    #[test]
    fn objects_are_stored_with_metadata_after_api_version_and_kind() {
        let leases = def("coordination.k8s.io", "leases");
        let obj = json!({"spec": {"holderIdentity": "x"}, "metadata": {"name": "a"},
                         "kind": "Lease", "apiVersion": "coordination.k8s.io/v1"});
        let stored = encode(&leases, &obj).unwrap();
        assert!(stored.starts_with(
            br#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"a"},"spec""#
        ));
        assert_eq!(metadata_offset(&stored), Some(65));
    }

    #[test]
    fn spec_changes_are_told_from_metadata_and_status_changes() {
        let a =
            json!({"kind": "D", "metadata": {"name": "a"}, "spec": {"r": 1}, "status": {"x": 1}});
        let mut b = a.clone();
        b["metadata"]["labels"] = json!({"k": "v"});
        b["status"]["x"] = json!(2);
        b["apiVersion"] = json!("v1");
        assert!(!spec_differs(&a, &b));
        b["spec"]["r"] = json!(2);
        assert!(spec_differs(&a, &b));
        let mut c = a.clone();
        c["template"] = json!({});
        assert!(spec_differs(&a, &c) && spec_differs(&c, &a));
    }
}
