//! The structural schema of one CRD version (`openAPIV3Schema`), parsed once
//! when the CRD is stored and shared by validation, pruning, defaulting,
//! CEL rules and server-side apply.
//!
//! A structural schema (as Kubernetes defines it) gives every node a type,
//! except where `x-kubernetes-int-or-string` or
//! `x-kubernetes-preserve-unknown-fields` says the value is open; the
//! logical junctors (`allOf`, `anyOf`, `oneOf`, `not`) only add value
//! validations and never new fields.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::cel::CompiledRule;

/// The JSON type a node requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaType {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

impl SchemaType {
    pub fn name(self) -> &'static str {
        match self {
            SchemaType::Object => "object",
            SchemaType::Array => "array",
            SchemaType::String => "string",
            SchemaType::Integer => "integer",
            SchemaType::Number => "number",
            SchemaType::Boolean => "boolean",
        }
    }
}

/// `x-kubernetes-list-type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole (also the default for lists without a list type).
    Atomic,
    /// Scalars, unique, merged by value.
    Set,
    /// Objects identified by `x-kubernetes-list-map-keys`, unique by them.
    Map { keys: Vec<String> },
}

/// `x-kubernetes-map-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    Granular,
    Atomic,
}

/// One `x-kubernetes-validations` entry, with its rule compiled.
#[derive(Clone, Debug)]
pub struct ValidationRule {
    pub rule: String,
    pub message: Option<String>,
    pub message_expression: Option<String>,
    /// `FieldValueInvalid` (the default), `FieldValueForbidden`,
    /// `FieldValueRequired` or `FieldValueDuplicate`.
    pub reason: Option<String>,
    /// Where errors point, relative to the node (e.g. `.spec.replicas`).
    pub field_path: Option<String>,
    pub optional_old_self: bool,
    pub compiled: Arc<CompiledRule>,
}

/// A compiled `pattern`.
#[derive(Clone, Debug)]
pub struct Pattern {
    /// As written in the schema (error messages quote it).
    pub source: String,
    pub regex: regex::Regex,
}

/// One node of a structural schema.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    /// None: any type (int-or-string, preserve-unknown-fields, or a node
    /// inside a logical junctor).
    pub type_: Option<SchemaType>,
    pub nullable: bool,
    pub format: Option<String>,
    pub description: Option<String>,
    pub default: Option<Value>,
    pub enum_values: Vec<Value>,
    pub pattern: Option<Pattern>,
    pub min_length: Option<i64>,
    pub max_length: Option<i64>,
    pub min_items: Option<i64>,
    pub max_items: Option<i64>,
    pub min_properties: Option<i64>,
    pub max_properties: Option<i64>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: bool,
    pub exclusive_maximum: bool,
    pub multiple_of: Option<f64>,
    pub required: Vec<String>,
    /// Named fields of an object.
    pub properties: BTreeMap<String, Schema>,
    /// Values of a map (an object with arbitrary keys).
    pub additional_properties: Option<Box<Schema>>,
    /// Items of an array.
    pub items: Option<Box<Schema>>,
    pub preserve_unknown_fields: bool,
    pub int_or_string: bool,
    /// An embedded Kubernetes object: apiVersion, kind and metadata.
    pub embedded_resource: bool,
    pub list_type: Option<ListType>,
    pub map_type: Option<MapType>,
    pub validations: Vec<ValidationRule>,
    /// Value validations only: they constrain values, never add fields.
    pub all_of: Vec<Schema>,
    pub any_of: Vec<Schema>,
    pub one_of: Vec<Schema>,
    pub not: Option<Box<Schema>>,
}
