//! The message table generated from the k8s-pb sources (`messages.txt`, see
//! `scripts/gen-kubeproto.py`), parsed once on first use.

use std::collections::HashMap;
use std::sync::OnceLock;

const TABLE: &str = include_str!("messages.txt");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    String,
    Bytes,
    Bool,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Sint32,
    Sint64,
    Fixed32,
    Fixed64,
    Sfixed32,
    Sfixed64,
    Double,
    Float,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Scalar(Scalar),
    /// Full proto name of the message type, without the leading dot.
    Message(&'static str),
}

/// Whether a singular field's zero value is data. Go's encoder writes every
/// non-pointer field, so on the wire an unset `minReadySeconds` looks like a
/// set `replicas: 0`; the Go types' pointers and `omitempty` tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Zero {
    /// A pointer, or a field without `omitempty`: always rendered.
    Keep,
    /// A non-pointer `omitempty` field: its zero value means unset.
    Omit,
    /// No Go type information: empty strings are dropped, other zeros kept.
    Unknown,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Shape {
    One(Kind, Zero),
    Repeated(Kind),
    /// A Go embedded struct: its fields appear in the parent's JSON object.
    Inline(&'static str),
    Map(Scalar, Kind),
}

#[derive(Debug)]
pub(crate) struct Field {
    /// Declaration position, which is the Go struct's field order and so
    /// the JSON key order; the wire order is by field number instead.
    pub pos: usize,
    pub snake: &'static str,
    /// The Go type's JSON name, when known.
    pub json: Option<&'static str>,
    pub shape: Shape,
}

#[derive(Debug, Default)]
pub(crate) struct Message {
    pub fields: HashMap<u32, Field>,
}

#[derive(Debug, Default)]
pub(crate) struct Schema {
    pub messages: HashMap<&'static str, Message>,
    /// apiVersion (`v1`, `apps/v1`) -> proto package.
    pub packages: HashMap<&'static str, &'static str>,
}

pub(crate) fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| parse(TABLE))
}

fn scalar(s: &str) -> Option<Scalar> {
    Some(match s {
        "string" => Scalar::String,
        "bytes" => Scalar::Bytes,
        "bool" => Scalar::Bool,
        "int32" => Scalar::Int32,
        "int64" => Scalar::Int64,
        "uint32" => Scalar::Uint32,
        "uint64" => Scalar::Uint64,
        "sint32" => Scalar::Sint32,
        "sint64" => Scalar::Sint64,
        "fixed32" => Scalar::Fixed32,
        "fixed64" => Scalar::Fixed64,
        "sfixed32" => Scalar::Sfixed32,
        "sfixed64" => Scalar::Sfixed64,
        "double" => Scalar::Double,
        "float" => Scalar::Float,
        _ => return None,
    })
}

fn kind(s: &'static str) -> Kind {
    match s.strip_prefix('.') {
        Some(message) => Kind::Message(message),
        None => Kind::Scalar(scalar(s).unwrap_or_else(|| panic!("messages.txt: bad kind {s}"))),
    }
}

/// The table is generated and checked by the tests, so a malformed line is a
/// build defect, not an input error.
fn parse(table: &'static str) -> Schema {
    let mut schema = Schema::default();
    let mut current: Option<&'static str> = None;
    for line in table.lines() {
        let mut words = line.split_ascii_whitespace();
        match words.next() {
            None | Some("#") => {}
            Some("G") => {
                let (Some(api_version), Some(package)) = (words.next(), words.next()) else {
                    panic!("messages.txt: bad line {line}");
                };
                schema.packages.insert(api_version, package);
            }
            Some("M") => {
                let name = words.next().expect("messages.txt: message name");
                schema.messages.insert(name, Message::default());
                current = Some(name);
            }
            Some(tag) => {
                let tag: u32 = tag.parse().expect("messages.txt: tag");
                let mut words: Vec<&'static str> = words.collect();
                let json = match words.last().and_then(|w| w.strip_prefix('@')) {
                    Some(json) => {
                        words.pop();
                        Some(json)
                    }
                    None => None,
                };
                let shape = match words.as_slice() {
                    [_, "one", k] => Shape::One(kind(k), Zero::Unknown),
                    [_, "keep", k] => Shape::One(kind(k), Zero::Keep),
                    [_, "omit", k] => Shape::One(kind(k), Zero::Omit),
                    [_, "rep", k] => Shape::Repeated(kind(k)),
                    [_, "inl", k] => match kind(k) {
                        Kind::Message(m) => Shape::Inline(m),
                        Kind::Scalar(_) => panic!("messages.txt: inline scalar {line}"),
                    },
                    [_, "map", k, v] => {
                        Shape::Map(scalar(k).expect("messages.txt: map key kind"), kind(v))
                    }
                    _ => panic!("messages.txt: bad line {line}"),
                };
                let message = current.expect("messages.txt: field before message");
                let fields = &mut schema
                    .messages
                    .get_mut(message)
                    .expect("current message")
                    .fields;
                let field = Field {
                    pos: fields.len(),
                    snake: words[0],
                    json,
                    shape,
                };
                fields.insert(tag, field);
            }
        }
    }
    schema
}
