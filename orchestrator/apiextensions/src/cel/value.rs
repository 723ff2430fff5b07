//! CEL values. Input is never converted up front: a value borrows the
//! request's JSON together with the schema node that types it and reads it
//! on access, so all rules of a node share one input at no cost and a rule
//! pays only for what it reads.
//!
//! Typing follows Kubernetes' table: `integer` → int, `number` → double,
//! `string` → string (format `byte` → bytes, `date` and `date-time` →
//! timestamp, `duration` → duration), arrays → lists (`set` and `map` list
//! types compare regardless of order), objects → maps. Properties of an
//! object are read by their escaped names (`self.x__dash__y` is `x-y`), map
//! keys are read as written. Without a schema (int-or-string, unknown
//! fields) a value is typed by its JSON form: integers → int (above int64:
//! uint), other numbers → double.

use std::cmp::Ordering;
use std::ops::Deref;
use std::sync::Arc;

use base64::Engine;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map as JsonMap, Number, Value as Json};

use super::cost::{error, Fault, Meter};
use super::time;
use crate::schema::{ListType, Schema, SchemaType};

/// Deepest values compared or printed; deeper ones are an error.
pub const MAX_VALUE_DEPTH: usize = 256;

#[derive(Clone, Debug)]
pub(super) enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(Str<'a>),
    Bytes(Bytes<'a>),
    List(List<'a>),
    Map(Map<'a>),
    Timestamp(DateTime<Utc>),
    /// Nanoseconds, as Go's `time.Duration` (what CEL in Kubernetes uses).
    Duration(i64),
    Type(CelType),
    Optional(Option<Arc<Value<'a>>>),
}

/// Text borrowed from the input or the rule, or built by evaluation.
#[derive(Clone, Debug)]
pub(super) enum Str<'a> {
    Borrowed(&'a str),
    Shared(Arc<str>),
}

impl Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Str::Borrowed(s) => s,
            Str::Shared(s) => s,
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Shared(Arc<[u8]>),
}

impl Deref for Bytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Borrowed(b) => b,
            Bytes::Shared(b) => b,
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum List<'a> {
    /// A JSON array and the schema of the array (not of its items).
    Json(&'a [Json], Option<&'a Schema>),
    Built(Arc<[Value<'a>]>),
}

#[derive(Clone, Debug)]
pub(super) enum Map<'a> {
    /// A JSON object and its schema.
    Json(&'a JsonMap<String, Json>, Option<&'a Schema>),
    /// A map literal: keys are ints, uints, bools or strings, unique.
    Built(Arc<[(Value<'a>, Value<'a>)]>),
}

/// CEL's types, as `type()` returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CelType {
    Null,
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    List,
    Map,
    Timestamp,
    Duration,
    Type,
    Optional,
}

impl CelType {
    pub(super) fn name(self) -> &'static str {
        match self {
            CelType::Null => "null_type",
            CelType::Bool => "bool",
            CelType::Int => "int",
            CelType::Uint => "uint",
            CelType::Double => "double",
            CelType::String => "string",
            CelType::Bytes => "bytes",
            CelType::List => "list",
            CelType::Map => "map",
            CelType::Timestamp => "google.protobuf.Timestamp",
            CelType::Duration => "google.protobuf.Duration",
            CelType::Type => "type",
            CelType::Optional => "optional_type",
        }
    }

    /// The types a rule can name as identifiers.
    pub(super) fn named(name: &str) -> Option<CelType> {
        Some(match name {
            "null_type" => CelType::Null,
            "bool" => CelType::Bool,
            "int" => CelType::Int,
            "uint" => CelType::Uint,
            "double" => CelType::Double,
            "string" => CelType::String,
            "bytes" => CelType::Bytes,
            "list" => CelType::List,
            "map" => CelType::Map,
            "type" => CelType::Type,
            _ => return None,
        })
    }
}

impl<'a> Value<'a> {
    /// `json` typed by `schema` (see the module doc).
    pub(super) fn from_json(
        json: &'a Json,
        schema: Option<&'a Schema>,
        meter: &mut Meter<'_>,
    ) -> Result<Self, Fault> {
        Ok(match json {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => number(n, schema),
            Json::String(s) => return string(s, schema, meter),
            Json::Array(items) => Value::List(List::Json(items, schema)),
            Json::Object(fields) => Value::Map(Map::Json(fields, schema)),
        })
    }

    pub(super) fn type_of(&self) -> CelType {
        match self {
            Value::Null => CelType::Null,
            Value::Bool(_) => CelType::Bool,
            Value::Int(_) => CelType::Int,
            Value::Uint(_) => CelType::Uint,
            Value::Double(_) => CelType::Double,
            Value::String(_) => CelType::String,
            Value::Bytes(_) => CelType::Bytes,
            Value::List(_) => CelType::List,
            Value::Map(_) => CelType::Map,
            Value::Timestamp(_) => CelType::Timestamp,
            Value::Duration(_) => CelType::Duration,
            Value::Type(_) => CelType::Type,
            Value::Optional(_) => CelType::Optional,
        }
    }

    pub(super) fn type_name(&self) -> &'static str {
        self.type_of().name()
    }

    pub(super) fn string(s: impl Into<Arc<str>>) -> Self {
        Value::String(Str::Shared(s.into()))
    }

    pub(super) fn list(items: Vec<Value<'a>>) -> Self {
        Value::List(List::Built(items.into()))
    }

    /// A count as an int (counts never reach `i64::MAX`).
    pub(super) fn count(n: usize) -> Self {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

fn number<'a>(n: &Number, schema: Option<&Schema>) -> Value<'a> {
    let double = schema.is_some_and(|s| s.type_ == Some(SchemaType::Number));
    match (n.as_i64(), n.as_u64()) {
        (Some(i), _) if !double => Value::Int(i),
        (None, Some(u)) if !double => Value::Uint(u),
        _ => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
    }
}

fn string<'a>(
    s: &'a str,
    schema: Option<&Schema>,
    meter: &mut Meter<'_>,
) -> Result<Value<'a>, Fault> {
    let format = schema
        .filter(|schema| schema.type_ == Some(SchemaType::String))
        .and_then(|schema| schema.format.as_deref());
    match format {
        Some("byte") => {
            meter.build(s.len())?;
            match base64::engine::general_purpose::STANDARD.decode(s) {
                Ok(bytes) => Ok(Value::Bytes(Bytes::Shared(bytes.into()))),
                Err(_) => error("invalid byte string: not base64"),
            }
        }
        Some("duration") => {
            meter.scan(s.len())?;
            match time::parse_duration(s) {
                Ok(nanos) => Ok(Value::Duration(nanos)),
                Err(reason) => error(format!("invalid duration string: {reason}")),
            }
        }
        Some("date") => match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            Ok(date) => time::timestamp(Some(date.and_time(Default::default()).and_utc())),
            Err(e) => error(format!("invalid date string: {e}")),
        },
        Some("date-time") => match DateTime::parse_from_rfc3339(s) {
            Ok(time) => time::timestamp(Some(time.to_utc())),
            Err(e) => error(format!("invalid date-time string: {e}")),
        },
        _ => Ok(Value::String(Str::Borrowed(s))),
    }
}

impl<'a> List<'a> {
    pub(super) fn len(&self) -> usize {
        match self {
            List::Json(items, _) => items.len(),
            List::Built(items) => items.len(),
        }
    }

    pub(super) fn get(
        &self,
        index: usize,
        meter: &mut Meter<'_>,
    ) -> Result<Option<Value<'a>>, Fault> {
        match self {
            List::Json(items, schema) => items
                .get(index)
                .map(|item| Value::from_json(item, schema.and_then(|s| s.items.as_deref()), meter))
                .transpose(),
            List::Built(items) => Ok(items.get(index).cloned()),
        }
    }

    /// Whether order does not matter to equality (`set` and `map` lists).
    fn unordered(&self) -> bool {
        matches!(
            self,
            List::Json(
                _,
                Some(Schema {
                    list_type: Some(ListType::Set | ListType::Map { .. }),
                    ..
                })
            )
        )
    }
}

impl<'a> Map<'a> {
    pub(super) fn len(&self) -> usize {
        match self {
            Map::Json(fields, _) => fields.len(),
            Map::Built(entries) => entries.len(),
        }
    }

    /// The value at `key`, `None` when there is none.
    pub(super) fn get(
        &self,
        key: &Value<'_>,
        meter: &mut Meter<'_>,
    ) -> Result<Option<Value<'a>>, Fault> {
        match self {
            Map::Json(..) => match key {
                Value::String(name) => self.field(name, None, meter),
                _ => Ok(None),
            },
            Map::Built(entries) => {
                for (k, v) in entries.iter() {
                    meter.charge(1)?;
                    if key_equal(k, key, meter)? {
                        return Ok(Some(v.clone()));
                    }
                }
                Ok(None)
            }
        }
    }

    /// The value at string key `name`. Properties of an object (a schema
    /// with properties) are named escaped; `unescaped` is `name` already
    /// unescaped (`Some(None)`: not a valid escape), or `None` to unescape
    /// it here.
    pub(super) fn field(
        &self,
        name: &str,
        unescaped: Option<Option<&str>>,
        meter: &mut Meter<'_>,
    ) -> Result<Option<Value<'a>>, Fault> {
        match self {
            Map::Json(fields, schema) => match json_field(fields, *schema, name, unescaped, meter)?
            {
                Some((value, child)) => Value::from_json(value, child, meter).map(Some),
                None => Ok(None),
            },
            Map::Built(_) => self.get(&Value::String(Str::Borrowed(name)), meter),
        }
    }

    /// Whether there is a value at string key `name` (see [`Map::field`]).
    pub(super) fn has_field(
        &self,
        name: &str,
        unescaped: Option<Option<&str>>,
        meter: &mut Meter<'_>,
    ) -> Result<bool, Fault> {
        match self {
            Map::Json(fields, schema) => {
                Ok(json_field(fields, *schema, name, unescaped, meter)?.is_some())
            }
            Map::Built(_) => Ok(self
                .get(&Value::String(Str::Borrowed(name)), meter)?
                .is_some()),
        }
    }

    /// Whether `key` is a key (CEL's `in`).
    pub(super) fn contains(&self, key: &Value<'_>, meter: &mut Meter<'_>) -> Result<bool, Fault> {
        match (self, key) {
            (Map::Json(..), Value::String(name)) => self.has_field(name, None, meter),
            (Map::Json(..), _) => Ok(false),
            (Map::Built(_), _) => Ok(self.get(key, meter)?.is_some()),
        }
    }
}

/// The JSON at `name` in an object or map, with its schema.
fn json_field<'a>(
    fields: &'a JsonMap<String, Json>,
    schema: Option<&'a Schema>,
    name: &str,
    unescaped: Option<Option<&str>>,
    meter: &mut Meter<'_>,
) -> Result<Option<(&'a Json, Option<&'a Schema>)>, Fault> {
    let (key, child) = match schema.filter(|s| !s.properties.is_empty()) {
        Some(object) => {
            let unescaped = match unescaped {
                Some(known) => known.map(std::borrow::Cow::Borrowed),
                None => unescape(name),
            };
            let Some(key) = unescaped else {
                return Ok(None);
            };
            let child = object.properties.get(key.as_ref());
            (key, child)
        }
        None => (
            std::borrow::Cow::Borrowed(name),
            schema.and_then(|s| s.additional_properties.as_deref()),
        ),
    };
    meter.scan(key.len())?;
    Ok(fields.get(key.as_ref()).map(|value| (value, child)))
}

/// Kubernetes' unescaping of property names: `__dash__` → `-`, `__dot__`
/// → `.`, `__slash__` → `/`, `__underscores__` → `__`, and a whole name
/// `__word__` → `word` for CEL's reserved words. `None` when the name holds
/// another `__…__` sequence.
pub(super) fn unescape(name: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !name.contains("__") {
        return Some(std::borrow::Cow::Borrowed(name));
    }
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut copied = 0;
    let mut at = 0;
    while at + 4 < bytes.len() {
        // `__`, then one or more non-underscores, then `__`.
        let run = bytes[at + 2..].iter().take_while(|b| **b != b'_').count();
        let close = at + 2 + run;
        if !(bytes[at] == b'_'
            && bytes[at + 1] == b'_'
            && run > 0
            && name[close..].starts_with("__"))
        {
            at += 1;
            continue;
        }
        let word = &name[at + 2..close];
        let replacement = match word {
            "underscores" => "__",
            "dot" => ".",
            "dash" => "-",
            "slash" => "/",
            _ if RESERVED_WORDS.contains(&word) && at == 0 && close + 2 == name.len() => word,
            _ => return None,
        };
        out.push_str(&name[copied..at]);
        out.push_str(replacement);
        at = close + 2;
        copied = at;
    }
    out.push_str(&name[copied..]);
    Some(std::borrow::Cow::Owned(out))
}

/// CEL's reserved words, which Kubernetes escapes as `__word__`.
const RESERVED_WORDS: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

/// Map keys are compared as values, numbers across types (`{1: x}[1u]`).
fn key_equal(a: &Value<'_>, b: &Value<'_>, meter: &mut Meter<'_>) -> Result<bool, Fault> {
    equal(a, b, meter, 0)
}

/// CEL's `==`: numbers compare across int, uint and double; other values
/// of different types are unequal.
pub(super) fn equal(
    a: &Value<'_>,
    b: &Value<'_>,
    meter: &mut Meter<'_>,
    depth: usize,
) -> Result<bool, Fault> {
    if depth > MAX_VALUE_DEPTH {
        return error(format!(
            "values nested deeper than {MAX_VALUE_DEPTH} levels"
        ));
    }
    meter.charge(1)?;
    Ok(match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::String(a), Value::String(b)) => {
            meter.scan(a.len().min(b.len()))?;
            **a == **b
        }
        (Value::Bytes(a), Value::Bytes(b)) => {
            meter.scan(a.len().min(b.len()))?;
            **a == **b
        }
        (Value::Timestamp(a), Value::Timestamp(b)) => a == b,
        (Value::Duration(a), Value::Duration(b)) => a == b,
        (Value::Type(a), Value::Type(b)) => a == b,
        (Value::Optional(a), Value::Optional(b)) => match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => equal(a, b, meter, depth + 1)?,
            _ => false,
        },
        (Value::List(a), Value::List(b)) => list_equal(a, b, meter, depth)?,
        (Value::Map(a), Value::Map(b)) => map_equal(a, b, meter, depth)?,
        _ => numeric_order(a, b) == Some(Ordering::Equal),
    })
}

fn list_equal(
    a: &List<'_>,
    b: &List<'_>,
    meter: &mut Meter<'_>,
    depth: usize,
) -> Result<bool, Fault> {
    if a.len() != b.len() {
        return Ok(false);
    }
    let unordered = a.unordered() || b.unordered();
    for i in 0..a.len() {
        let Some(x) = a.get(i, meter)? else {
            return Ok(false);
        };
        let found = if unordered {
            // Items of these lists are unique: each needs a match.
            let mut found = false;
            for j in 0..b.len() {
                if let Some(y) = b.get(j, meter)? {
                    if equal(&x, &y, meter, depth + 1)? {
                        found = true;
                        break;
                    }
                }
            }
            found
        } else {
            match b.get(i, meter)? {
                Some(y) => equal(&x, &y, meter, depth + 1)?,
                None => false,
            }
        };
        if !found {
            return Ok(false);
        }
    }
    Ok(true)
}

fn map_equal(a: &Map<'_>, b: &Map<'_>, meter: &mut Meter<'_>, depth: usize) -> Result<bool, Fault> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for key in Keys::of(a) {
        let key = key?;
        let (Some(x), Some(y)) = (map_value(a, &key, meter)?, map_value(b, &key, meter)?) else {
            return Ok(false);
        };
        if !equal(&x, &y, meter, depth + 1)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A key's value, keys read as written (escaping is for field selection).
fn map_value<'a>(
    map: &Map<'a>,
    key: &Value<'_>,
    meter: &mut Meter<'_>,
) -> Result<Option<Value<'a>>, Fault> {
    match (map, key) {
        (Map::Json(fields, schema), Value::String(name)) => {
            meter.scan(name.len())?;
            let child = match schema {
                Some(s) if !s.properties.is_empty() => s.properties.get(&**name),
                Some(s) => s.additional_properties.as_deref(),
                None => None,
            };
            fields
                .get(&**name)
                .map(|value| Value::from_json(value, child, meter))
                .transpose()
        }
        (Map::Json(..), _) => Ok(None),
        (Map::Built(_), _) => map.get(key, meter),
    }
}

/// The keys of a map, in its order.
pub(super) enum Keys<'a> {
    Json(serde_json::map::Keys<'a>),
    Built(Arc<[(Value<'a>, Value<'a>)]>, usize),
}

impl<'a> Keys<'a> {
    pub(super) fn of(map: &Map<'a>) -> Self {
        match map {
            Map::Json(fields, _) => Keys::Json(fields.keys()),
            Map::Built(entries) => Keys::Built(Arc::clone(entries), 0),
        }
    }
}

impl<'a> Iterator for Keys<'a> {
    type Item = Result<Value<'a>, Fault>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Keys::Json(keys) => keys.next().map(|k| Ok(Value::String(Str::Borrowed(k)))),
            Keys::Built(entries, at) => {
                let key = entries.get(*at)?.0.clone();
                *at += 1;
                Some(Ok(key))
            }
        }
    }
}

/// The order of two numbers of any numeric types, exactly (`None`: not
/// both numbers, or a NaN).
pub(super) fn numeric_order(a: &Value<'_>, b: &Value<'_>) -> Option<Ordering> {
    const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_TO_64: f64 = 18_446_744_073_709_551_616.0;
    // An integer against a double: the integer parts first, then the
    // fraction decides.
    fn int_double(i: i64, d: f64) -> Option<Ordering> {
        if d.is_nan() {
            return None;
        }
        if d < -TWO_TO_63 {
            return Some(Ordering::Greater);
        }
        if d >= TWO_TO_63 {
            return Some(Ordering::Less);
        }
        Some(
            i.cmp(&(d.trunc() as i64))
                .then(0.0.partial_cmp(&d.fract())?),
        )
    }
    fn uint_double(u: u64, d: f64) -> Option<Ordering> {
        if d.is_nan() {
            return None;
        }
        if d < 0.0 {
            return Some(Ordering::Greater);
        }
        if d >= TWO_TO_64 {
            return Some(Ordering::Less);
        }
        Some(
            u.cmp(&(d.trunc() as u64))
                .then(0.0.partial_cmp(&d.fract())?),
        )
    }
    match (a, b) {
        (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
        (Value::Uint(a), Value::Uint(b)) => Some(a.cmp(b)),
        (Value::Double(a), Value::Double(b)) => a.partial_cmp(b),
        (Value::Int(a), Value::Uint(b)) => Some(i128::from(*a).cmp(&i128::from(*b))),
        (Value::Uint(a), Value::Int(b)) => Some(i128::from(*a).cmp(&i128::from(*b))),
        (Value::Int(a), Value::Double(b)) => int_double(*a, *b),
        (Value::Double(a), Value::Int(b)) => int_double(*b, *a).map(Ordering::reverse),
        (Value::Uint(a), Value::Double(b)) => uint_double(*a, *b),
        (Value::Double(a), Value::Uint(b)) => uint_double(*b, *a).map(Ordering::reverse),
        _ => None,
    }
}

fn is_number(value: &Value<'_>) -> bool {
    matches!(value, Value::Int(_) | Value::Uint(_) | Value::Double(_))
}

/// CEL's ordering (`<`, `isSorted`, `min`): numbers across types, strings,
/// bytes, bools, timestamps and durations. `Ok(None)` for NaN; an error for
/// values that have no order.
pub(super) fn compare(
    a: &Value<'_>,
    b: &Value<'_>,
    meter: &mut Meter<'_>,
) -> Result<Option<Ordering>, Fault> {
    Ok(Some(match (a, b) {
        (Value::String(x), Value::String(y)) => {
            meter.scan(x.len().min(y.len()))?;
            x.as_bytes().cmp(y.as_bytes())
        }
        (Value::Bytes(x), Value::Bytes(y)) => {
            meter.scan(x.len().min(y.len()))?;
            (**x).cmp(&**y)
        }
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Timestamp(x), Value::Timestamp(y)) => x.cmp(y),
        (Value::Duration(x), Value::Duration(y)) => x.cmp(y),
        _ if is_number(a) && is_number(b) => return Ok(numeric_order(a, b)),
        _ => {
            return error(format!(
                "no such overload: {} compared with {}",
                a.type_name(),
                b.type_name()
            ))
        }
    }))
}
