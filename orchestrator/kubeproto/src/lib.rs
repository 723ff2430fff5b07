//! Decoding of Kubernetes' protobuf encoding
//! (`application/vnd.kubernetes.protobuf`) into the JSON form of the same
//! object.
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` envelope whose
//! `typeMeta` names the object's apiVersion and kind and whose `raw` holds the
//! object's message. Field numbers and types come from a table generated from
//! the k8s-pb sources (`src/messages.txt`, `scripts/gen-kubeproto.py`); the
//! decoder walks it at run time, so no per-type code exists.
//!
//! JSON names come from the caller's OpenAPI definitions ([`JsonNames`]),
//! because the proto field names alone lose casing (`volume_id` is
//! `volumeID`, `pod_ip` is `podIP`).
//!
//! Zero values: Kubernetes' Go encoder writes every non-pointer field, so an
//! unset `minReadySeconds` arrives as 0 just like a set `replicas: 0`. The
//! table records, from the Go types, which fields are pointers or lack
//! `omitempty`; as in kube-apiserver's JSON, zero values of the other fields
//! are left out. For the few types without that information, empty strings
//! are dropped and other zero values kept.

mod schema;
mod wire;

use std::collections::HashMap;

use base64::Engine;
use serde_json::{Map, Number, Value};

use crate::schema::{schema, Field, Kind, Message, Scalar, Shape, Zero};
use crate::wire::{Reader, FIXED32, FIXED64, LEN, VARINT};

/// Prefix of every body in Kubernetes' protobuf encoding.
pub const MAGIC: &[u8; 4] = b"k8s\0";

/// Media type of Kubernetes' protobuf encoding.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// Nesting limit for messages (and embedded objects); real objects stay far
/// below it, and it bounds the recursion on hostile input.
pub const MAX_DEPTH: usize = 100;

const META: &str = "k8s.io.apimachinery.pkg.apis.meta.v1";

/// JSON property names of OpenAPI definitions, used to restore the exact
/// casing of field names.
pub trait JsonNames {
    /// Property names of a definition such as `io.k8s.api.core.v1.ConfigMap`,
    /// or `None` when it is unknown.
    fn properties(&self, definition: &str) -> Option<Vec<String>>;
}

/// A [`JsonNames`] knowing no definitions: every name is the lowerCamelCase
/// form of the proto field name.
#[derive(Clone, Copy, Debug, Default)]
pub struct CamelCaseNames;

impl JsonNames for CamelCaseNames {
    fn properties(&self, _definition: &str) -> Option<Vec<String>> {
        None
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("body does not start with the Kubernetes protobuf magic \"k8s\\0\"")]
    MissingMagic,
    #[error("protobuf data ends in the middle of a value")]
    Truncated,
    #[error("protobuf varint is longer than 64 bits")]
    VarintOverflow,
    #[error("invalid protobuf field number {0}")]
    InvalidFieldNumber(u64),
    #[error("unsupported protobuf wire type {0}")]
    InvalidWireType(u8),
    #[error("field {message}.{field} has wire type {wire}, which does not match its type")]
    WrongWireType {
        message: String,
        field: String,
        wire: u8,
    },
    #[error("envelope has no apiVersion and kind")]
    MissingTypeMeta,
    #[error("unsupported content encoding {0:?}")]
    UnsupportedContentEncoding(String),
    #[error("no protobuf type known for apiVersion {api_version:?}, kind {kind:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("field {message}.{field} is not valid UTF-8")]
    InvalidUtf8 { message: String, field: String },
    #[error("field {message}.{field}: {reason}")]
    InvalidValue {
        message: String,
        field: String,
        reason: String,
    },
    #[error("objects are nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Decodes a body in Kubernetes' protobuf encoding into the object's JSON
/// form, with `kind` and `apiVersion` set from the envelope.
pub fn decode(body: &[u8], names: &dyn JsonNames) -> Result<Value, DecodeError> {
    let mut decoder = Decoder {
        names,
        cache: HashMap::new(),
    };
    decoder.object(body, 0)
}

struct Decoder<'n> {
    names: &'n dyn JsonNames,
    /// Property names per message, looked up once per decode.
    cache: HashMap<&'static str, Option<Vec<String>>>,
}

/// `runtime.Unknown` and its `typeMeta`.
#[derive(Default)]
struct Envelope<'a> {
    api_version: String,
    kind: String,
    raw: &'a [u8],
    content_encoding: String,
}

fn envelope_string(bytes: &[u8], field: &str) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 {
        message: "runtime.Unknown".into(),
        field: field.into(),
    })
}

fn envelope_wire(field: &str, wire: u8) -> DecodeError {
    DecodeError::WrongWireType {
        message: "runtime.Unknown".into(),
        field: field.into(),
        wire,
    }
}

fn parse_envelope(buf: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    let mut env = Envelope::default();
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let (tag, wire) = r.key()?;
        let name = match tag {
            1 => "typeMeta",
            2 => "raw",
            3 => "contentEncoding",
            4 => "contentType",
            _ => {
                r.skip(wire)?;
                continue;
            }
        };
        if wire != LEN {
            return Err(envelope_wire(name, wire));
        }
        let bytes = r.bytes()?;
        match tag {
            1 => {
                let mut tm = Reader::new(bytes);
                while !tm.is_empty() {
                    let (tag, wire) = tm.key()?;
                    let target = match tag {
                        1 => &mut env.api_version,
                        2 => &mut env.kind,
                        _ => {
                            tm.skip(wire)?;
                            continue;
                        }
                    };
                    if wire != LEN {
                        return Err(envelope_wire("typeMeta", wire));
                    }
                    *target = envelope_string(tm.bytes()?, "typeMeta")?;
                }
            }
            2 => env.raw = bytes,
            3 => env.content_encoding = envelope_string(bytes, name)?,
            _ => {}
        }
    }
    Ok(env)
}

/// `k8s.io.api.core.v1.ConfigMap` -> `io.k8s.api.core.v1.ConfigMap`; the Go
/// module names keep their dashes in OpenAPI definition names.
fn definition_name(message: &str) -> String {
    let rest = message.strip_prefix("k8s.io.").unwrap_or(message);
    let rest = rest
        .replacen("apiextensions_apiserver.", "apiextensions-apiserver.", 1)
        .replacen("kube_aggregator.", "kube-aggregator.", 1);
    format!("io.k8s.{rest}")
}

fn lower_camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn number_i(v: i64) -> Value {
    Value::Number(v.into())
}

fn number_u(v: u64) -> Value {
    Value::Number(v.into())
}

/// Go's `time.Duration.String()`: "1h0m0s", "1m30s", "1.5s", "300ms", "0s".
fn go_duration(d: i64) -> String {
    fn decimal(v: u64, scale: u64) -> String {
        let (int, frac) = (v / scale, v % scale);
        if frac == 0 {
            return int.to_string();
        }
        let width = scale.ilog10() as usize;
        let frac = format!("{frac:0width$}");
        format!("{int}.{}", frac.trim_end_matches('0'))
    }
    if d == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    if d < 0 {
        out.push('-');
    }
    let u = d.unsigned_abs();
    const SECOND: u64 = 1_000_000_000;
    if u < SECOND {
        let (scale, unit) = match u {
            0..1_000 => (1, "ns"),
            1_000..1_000_000 => (1_000, "µs"),
            _ => (1_000_000, "ms"),
        };
        out.push_str(&decimal(u, scale));
        out.push_str(unit);
        return out;
    }
    let hours = u / (3600 * SECOND);
    let minutes = u % (3600 * SECOND) / (60 * SECOND);
    let seconds = u % (60 * SECOND);
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&decimal(seconds, SECOND));
    out.push('s');
    out
}

impl Decoder<'_> {
    /// A complete body: magic, envelope, then the object's message.
    fn object(&mut self, body: &[u8], depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let rest = body.strip_prefix(MAGIC).ok_or(DecodeError::MissingMagic)?;
        let env = parse_envelope(rest)?;
        if !env.content_encoding.is_empty() {
            return Err(DecodeError::UnsupportedContentEncoding(
                env.content_encoding,
            ));
        }
        if env.kind.is_empty() || env.api_version.is_empty() {
            return Err(DecodeError::MissingTypeMeta);
        }
        let message = self.message_for(&env.api_version, &env.kind)?;
        let mut out = Map::new();
        out.insert("kind".into(), Value::String(env.kind));
        out.insert("apiVersion".into(), Value::String(env.api_version));
        if let Value::Object(fields) = self.message(env.raw, message, depth + 1)? {
            // The envelope is authoritative for the type.
            out.extend(
                fields
                    .into_iter()
                    .filter(|(k, _)| k != "kind" && k != "apiVersion"),
            );
        }
        Ok(Value::Object(out))
    }

    fn message_for(&self, api_version: &str, kind: &str) -> Result<&'static str, DecodeError> {
        let s = schema();
        let found = s
            .packages
            .get(api_version)
            .and_then(|pkg| s.messages.get_key_value(format!("{pkg}.{kind}").as_str()))
            // Options and status types (DeleteOptions, Status, ...) are sent
            // with any group's apiVersion.
            .or_else(|| s.messages.get_key_value(format!("{META}.{kind}").as_str()));
        match found {
            Some((name, _)) => Ok(name),
            None => Err(DecodeError::UnknownKind {
                api_version: api_version.into(),
                kind: kind.into(),
            }),
        }
    }

    /// The caller's definitions decide; the Go JSON name from the table and
    /// then lowerCamelCase cover types they lack.
    fn json_name(&mut self, message: &'static str, field: &Field) -> String {
        let names = self.names;
        let props = self
            .cache
            .entry(message)
            .or_insert_with(|| names.properties(&definition_name(message)));
        let bare: String = field.snake.chars().filter(|&c| c != '_').collect();
        props
            .iter()
            .flatten()
            .find(|p| p.eq_ignore_ascii_case(&bare))
            .cloned()
            .or_else(|| field.json.map(str::to_string))
            .unwrap_or_else(|| lower_camel(field.snake))
    }

    fn message(
        &mut self,
        buf: &[u8],
        name: &'static str,
        depth: usize,
    ) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let Some(msg) = schema().messages.get(name) else {
            // Every referenced type is in the generated table; an absent one
            // would be a generator defect, reported rather than panicking.
            return Err(DecodeError::UnknownKind {
                api_version: String::new(),
                kind: name.into(),
            });
        };
        if let Some(special) = self.special(buf, name, msg, depth)? {
            return Ok(special);
        }
        let mut out = Map::new();
        // JSON key -> (declaration position, position inside an inline struct).
        let mut rank: HashMap<String, (usize, usize)> = HashMap::new();
        let mut r = Reader::new(buf);
        while !r.is_empty() {
            let (tag, wire) = r.key()?;
            let Some(field) = msg.fields.get(&tag) else {
                r.skip(wire)?;
                continue;
            };
            let ctx = Ctx {
                message: name,
                field: field.snake,
            };
            if let Shape::Inline(inner) = field.shape {
                if wire != LEN {
                    return Err(ctx.wrong_wire(wire));
                }
                if let Value::Object(fields) = self.message(r.bytes()?, inner, depth + 1)? {
                    for (i, (k, v)) in fields.into_iter().enumerate() {
                        rank.insert(k.clone(), (field.pos, i));
                        out.insert(k, v);
                    }
                }
                continue;
            }
            let key = self.json_name(name, field);
            rank.insert(key.clone(), (field.pos, 0));
            match field.shape {
                Shape::Inline(_) => {}
                Shape::One(kind, zero) => {
                    let value = self.value(&mut r, wire, kind, ctx, depth)?;
                    let unset = match (zero, kind) {
                        (Zero::Keep, _) | (_, Kind::Message(_)) => false,
                        (Zero::Omit, _) => is_zero(&value),
                        (Zero::Unknown, _) => value.as_str() == Some(""),
                    };
                    if unset {
                        out.remove(&key);
                        continue;
                    }
                    // A singular message sent twice merges, as in protobuf.
                    match (out.get_mut(&key), value) {
                        (Some(Value::Object(prev)), Value::Object(next)) => prev.extend(next),
                        (_, value) => {
                            out.insert(key, value);
                        }
                    }
                }
                Shape::Repeated(kind) => {
                    let slot = out.entry(key).or_insert_with(|| Value::Array(Vec::new()));
                    if !slot.is_array() {
                        *slot = Value::Array(Vec::new());
                    }
                    let Value::Array(list) = slot else {
                        continue;
                    };
                    let packable = matches!(kind, Kind::Scalar(s) if !matches!(s, Scalar::String | Scalar::Bytes));
                    if packable && wire == LEN {
                        let mut packed = Reader::new(r.bytes()?);
                        let inner = match kind {
                            Kind::Scalar(Scalar::Double | Scalar::Fixed64 | Scalar::Sfixed64) => {
                                FIXED64
                            }
                            Kind::Scalar(Scalar::Float | Scalar::Fixed32 | Scalar::Sfixed32) => {
                                FIXED32
                            }
                            _ => VARINT,
                        };
                        while !packed.is_empty() {
                            list.push(self.value(&mut packed, inner, kind, ctx, depth)?);
                        }
                    } else {
                        list.push(self.value(&mut r, wire, kind, ctx, depth)?);
                    }
                }
                Shape::Map(key_kind, value_kind) => {
                    if wire != LEN {
                        return Err(ctx.wrong_wire(wire));
                    }
                    let entry = r.bytes()?;
                    let (k, v) = self.map_entry(entry, key_kind, value_kind, ctx, depth)?;
                    let map = out.entry(key).or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(map) = map {
                        map.insert(k, v);
                    }
                }
            }
        }
        let mut entries: Vec<(String, Value)> = out.into_iter().collect();
        entries.sort_by_key(|(k, _)| rank.get(k).copied().unwrap_or((usize::MAX, 0)));
        Ok(Value::Object(entries.into_iter().collect()))
    }

    fn map_entry(
        &mut self,
        buf: &[u8],
        key_kind: Scalar,
        value_kind: Kind,
        ctx: Ctx,
        depth: usize,
    ) -> Result<(String, Value), DecodeError> {
        let mut key = None;
        let mut value = None;
        let mut r = Reader::new(buf);
        while !r.is_empty() {
            let (tag, wire) = r.key()?;
            match tag {
                1 => key = Some(self.value(&mut r, wire, Kind::Scalar(key_kind), ctx, depth)?),
                2 => value = Some(self.value(&mut r, wire, value_kind, ctx, depth)?),
                _ => r.skip(wire)?,
            }
        }
        // JSON object keys are strings; integer-keyed maps print their number.
        let key = match key {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let value = match value {
            Some(v) => v,
            // An absent value is the type's zero value.
            None => match value_kind {
                Kind::Message(m) => self.message(&[], m, depth + 1)?,
                Kind::Scalar(Scalar::String | Scalar::Bytes) => Value::String(String::new()),
                Kind::Scalar(Scalar::Bool) => Value::Bool(false),
                Kind::Scalar(_) => number_i(0),
            },
        };
        Ok((key, value))
    }

    fn value(
        &mut self,
        r: &mut Reader<'_>,
        wire: u8,
        kind: Kind,
        ctx: Ctx,
        depth: usize,
    ) -> Result<Value, DecodeError> {
        let expected = match kind {
            Kind::Message(_) | Kind::Scalar(Scalar::String | Scalar::Bytes) => LEN,
            Kind::Scalar(Scalar::Double | Scalar::Fixed64 | Scalar::Sfixed64) => FIXED64,
            Kind::Scalar(Scalar::Float | Scalar::Fixed32 | Scalar::Sfixed32) => FIXED32,
            Kind::Scalar(_) => VARINT,
        };
        if wire != expected {
            return Err(ctx.wrong_wire(wire));
        }
        let scalar = match kind {
            Kind::Message(m) => return self.message(r.bytes()?, m, depth + 1),
            Kind::Scalar(s) => s,
        };
        Ok(match scalar {
            Scalar::String => {
                let bytes = r.bytes()?;
                let s = std::str::from_utf8(bytes).map_err(|_| ctx.bad_utf8())?;
                Value::String(s.to_string())
            }
            // JSON carries bytes as standard base64, as Go's encoding/json does.
            Scalar::Bytes => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(r.bytes()?))
            }
            Scalar::Bool => Value::Bool(r.varint()? != 0),
            // Negative int32s are sign-extended to ten bytes on the wire.
            Scalar::Int32 => number_i(i64::from(r.varint()? as i64 as i32)),
            Scalar::Int64 => number_i(r.varint()? as i64),
            Scalar::Uint32 => number_u(u64::from(r.varint()? as u32)),
            Scalar::Uint64 => number_u(r.varint()?),
            Scalar::Sint32 => {
                let v = r.varint()? as u32;
                number_i(i64::from((v >> 1) as i32 ^ -((v & 1) as i32)))
            }
            Scalar::Sint64 => {
                let v = r.varint()?;
                number_i((v >> 1) as i64 ^ -((v & 1) as i64))
            }
            Scalar::Fixed32 => number_u(u64::from(r.fixed32()?)),
            Scalar::Sfixed32 => number_i(i64::from(r.fixed32()? as i32)),
            Scalar::Fixed64 => number_u(r.fixed64()?),
            Scalar::Sfixed64 => number_i(r.fixed64()? as i64),
            Scalar::Double => float(f64::from_bits(r.fixed64()?), ctx)?,
            Scalar::Float => float(f64::from(f32::from_bits(r.fixed32()?)), ctx)?,
        })
    }

    /// Types whose JSON form is not an object of their fields.
    fn special(
        &mut self,
        buf: &[u8],
        name: &'static str,
        msg: &Message,
        depth: usize,
    ) -> Result<Option<Value>, DecodeError> {
        const SPECIAL: &[&str] = &[
            "k8s.io.apimachinery.pkg.apis.meta.v1.Time",
            "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime",
            "k8s.io.apimachinery.pkg.apis.meta.v1.Duration",
            "k8s.io.apimachinery.pkg.apis.meta.v1.FieldsV1",
            "k8s.io.apimachinery.pkg.api.resource.Quantity",
            "k8s.io.apimachinery.pkg.util.intstr.IntOrString",
            "k8s.io.apimachinery.pkg.runtime.RawExtension",
        ];
        // CustomResourceDefinition schemas, in v1 and v1beta1.
        const SCHEMA_TYPES: &[&str] = &[
            ".JSON",
            ".JSONSchemaPropsOrArray",
            ".JSONSchemaPropsOrBool",
            ".JSONSchemaPropsOrStringArray",
        ];
        let short = match name.rfind('.') {
            Some(i) => &name[i..],
            None => return Ok(None),
        };
        let special = SPECIAL.contains(&name)
            || (name.starts_with("k8s.io.apiextensions_apiserver.")
                && SCHEMA_TYPES.iter().any(|t| t.eq_ignore_ascii_case(short)));
        if !special {
            return Ok(None);
        }
        // Read the fields generically, then render them.
        let Value::Object(fields) = self.plain(buf, name, msg, depth)? else {
            return Ok(None);
        };
        let int = |k: &str| fields.get(k).and_then(Value::as_i64).unwrap_or(0);
        let string = |k: &str| {
            fields
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let invalid = |field: &str, reason: String| DecodeError::InvalidValue {
            message: name.into(),
            field: field.into(),
            reason,
        };
        let short = SCHEMA_TYPES
            .iter()
            .find(|t| t.eq_ignore_ascii_case(short))
            .copied()
            .unwrap_or(short);
        let value = match short {
            // The zero time renders as null, as Go's metav1.Time does (e.g.
            // the always-present `creationTimestamp` of a new object).
            ".Time" | ".MicroTime" => {
                let (secs, nanos) = (int("seconds"), int("nanos"));
                if secs == 0 && nanos == 0 {
                    Value::Null
                } else {
                    let nanos = u32::try_from(nanos)
                        .ok()
                        .filter(|n| *n < 1_000_000_000)
                        .ok_or_else(|| invalid("nanos", format!("{nanos} is out of range")))?;
                    let t = chrono::DateTime::from_timestamp(secs, nanos)
                        .ok_or_else(|| invalid("seconds", format!("{secs} is out of range")))?;
                    let format = if short == ".Time" {
                        "%Y-%m-%dT%H:%M:%SZ"
                    } else {
                        "%Y-%m-%dT%H:%M:%S%.6fZ"
                    };
                    Value::String(t.format(format).to_string())
                }
            }
            ".Duration" => Value::String(go_duration(int("duration"))),
            // Go's zero Quantity marshals as "0".
            ".Quantity" => match string("string") {
                s if s.is_empty() => Value::String("0".into()),
                s => Value::String(s),
            },
            ".IntOrString" => match int("type") {
                0 => number_i(int("intVal")),
                1 => Value::String(string("strVal")),
                other => return Err(invalid("type", format!("unknown IntOrString type {other}"))),
            },
            ".JSONSchemaPropsOrArray" => match fields.get("jSonSchemas") {
                Some(list @ Value::Array(items)) if !items.is_empty() => list.clone(),
                _ => fields.get("schema").cloned().unwrap_or(Value::Null),
            },
            ".JSONSchemaPropsOrBool" => match fields.get("schema") {
                Some(schema) => schema.clone(),
                None => Value::Bool(
                    fields
                        .get("allows")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                ),
            },
            ".JSONSchemaPropsOrStringArray" => match fields.get("property") {
                Some(list @ Value::Array(items)) if !items.is_empty() => list.clone(),
                _ => fields.get("schema").cloned().unwrap_or(Value::Null),
            },
            ".RawExtension" | ".FieldsV1" | ".JSON" => {
                let raw = fields.get("raw").and_then(Value::as_str).unwrap_or("");
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .map_err(|e| invalid("raw", e.to_string()))?;
                if raw.is_empty() {
                    Value::Null
                } else if raw.starts_with(MAGIC) {
                    // An embedded object in protobuf form.
                    self.object(&raw, depth + 1)?
                } else {
                    serde_json::from_slice(&raw)
                        .map_err(|e| invalid("raw", format!("embedded JSON: {e}")))?
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(value))
    }

    /// A message's fields keyed by lowerCamelCase proto names, for the
    /// special types whose rendering reads them directly.
    fn plain(
        &mut self,
        buf: &[u8],
        name: &'static str,
        msg: &Message,
        depth: usize,
    ) -> Result<Value, DecodeError> {
        let mut out = Map::new();
        let mut r = Reader::new(buf);
        while !r.is_empty() {
            let (tag, wire) = r.key()?;
            let Some(field) = msg.fields.get(&tag) else {
                r.skip(wire)?;
                continue;
            };
            let ctx = Ctx {
                message: name,
                field: field.snake,
            };
            let key = lower_camel(field.snake);
            match field.shape {
                Shape::One(kind, _) => {
                    let value = self.value(&mut r, wire, kind, ctx, depth)?;
                    out.insert(key, value);
                }
                // Only non-packable kinds (strings, messages) repeat here.
                Shape::Repeated(kind) => {
                    let value = self.value(&mut r, wire, kind, ctx, depth)?;
                    let slot = out.entry(key).or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(list) = slot {
                        list.push(value);
                    }
                }
                Shape::Inline(_) | Shape::Map(..) => r.skip(wire)?,
            }
        }
        Ok(Value::Object(out))
    }
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

fn float(v: f64, ctx: Ctx) -> Result<Value, DecodeError> {
    Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| DecodeError::InvalidValue {
            message: ctx.message.into(),
            field: ctx.field.into(),
            reason: format!("{v} has no JSON form"),
        })
}

#[derive(Clone, Copy)]
struct Ctx {
    message: &'static str,
    field: &'static str,
}

impl Ctx {
    fn wrong_wire(self, wire: u8) -> DecodeError {
        DecodeError::WrongWireType {
            message: self.message.into(),
            field: self.field.into(),
            wire,
        }
    }

    fn bad_utf8(self) -> DecodeError {
        DecodeError::InvalidUtf8 {
            message: self.message.into(),
            field: self.field.into(),
        }
    }
}

#[cfg(test)]
mod tests;
