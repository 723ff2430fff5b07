//! The structural schema of one CRD version (`openAPIV3Schema`), parsed once
//! when the CRD is stored and shared by validation, pruning, defaulting,
//! CEL rules and server-side apply.
//!
//! A structural schema (as Kubernetes defines it) gives every node a type,
//! except where `x-kubernetes-int-or-string` or
//! `x-kubernetes-preserve-unknown-fields` says the value is open; the
//! logical junctors (`allOf`, `anyOf`, `oneOf`, `not`) only add value
//! validations and never new fields.
//!
//! [`Schema::parse`] reads one version's raw `openAPIV3Schema` and refuses
//! what kube-apiserver refuses for `apiextensions.k8s.io/v1` CRDs, with its
//! wording and field paths: non-structural schemas, unsupported keywords,
//! inconsistent list and map types, invalid `pattern`s, defaults that do not
//! validate or carry unknown fields, and `x-kubernetes-validations` rules
//! that are malformed or do not compile. Keywords Kubernetes ignores are
//! ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;
use tapestry_apimachinery::Cause;

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

/// The deepest nesting of schema nodes (properties, items, junctors...)
/// [`Schema::parse`] accepts, so that no walk over a schema or the objects
/// it describes can exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// Field names Kubernetes reserves at a resource root for type and object
/// metadata.
pub(crate) const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

impl Schema {
    /// Parse and check one version's openAPIV3Schema (raw JSON). `path` is the field path of the
    /// schema in the CRD for error messages, e.g. "spec.versions[0].schema.openAPIV3Schema".
    pub fn parse(schema: &Value, path: &str) -> Result<Schema, Vec<Cause>> {
        let mut decoder = Decoder::default();
        let props = decoder.node(schema, path, 1);
        if !decoder.causes.is_empty() {
            return Err(decoder.causes);
        }

        let mut causes = Vec::new();
        if props.nullable {
            causes.push(Cause::forbidden(
                format!("{path}.nullable"),
                "nullable cannot be true at the root",
            ));
        }
        // kube-apiserver converts the schema to its structural form first; the
        // keywords that conversion rejects are reported again, better worded,
        // by the walk below, so its error only shows when nothing else does.
        let unsupported = unsupported_keyword(&props);
        let mut structural_ok = false;
        if unsupported.is_none() {
            let mut errs = Vec::new();
            structural(&props, Level::Root, path, &mut errs);
            completeness_of_junctors(&props, path, &mut errs);
            errs.sort_by_key(Cause::render);
            if errs.is_empty() {
                let draft = build(&props, path, &mut HashMap::new());
                default_errors(&draft, path, true, false, &mut errs);
                structural_ok = errs.is_empty();
            }
            causes.extend(errs);
        }

        let mut walk = Walk {
            cel: structural_ok,
            ..Walk::default()
        };
        walk.node(&props, path, &Context::default(), true, structural_ok);
        causes.append(&mut walk.schema_errs);
        causes.append(&mut walk.cel_errs);
        if causes.is_empty() {
            if let Some(message) = unsupported {
                causes.push(Cause::invalid(path, &Value::from(""), message));
            }
        }
        if !causes.is_empty() {
            return Err(causes);
        }

        let schema = build(&props, path, &mut walk.compiled);
        default_rule_errors(&schema, path, &mut causes);
        if causes.is_empty() {
            Ok(schema)
        } else {
            Err(causes)
        }
    }

    /// The node's type as Kubernetes' OpenAPI validation sees it:
    /// `x-kubernetes-int-or-string` stands for "integer or string".
    pub(crate) fn type_names(&self) -> Vec<&'static str> {
        if self.int_or_string {
            vec!["integer", "string"]
        } else {
            self.type_.map(SchemaType::name).into_iter().collect()
        }
    }
}

/// One node of the raw schema, decoded as kube-apiserver decodes
/// `JSONSchemaProps`; keywords it does not know are dropped.
#[derive(Clone, Debug, Default, PartialEq)]
struct Props {
    type_: String,
    format: String,
    title: String,
    description: String,
    default: Option<Value>,
    example: bool,
    external_docs: bool,
    nullable: bool,
    enum_values: Vec<Value>,
    pattern: String,
    maximum: Option<f64>,
    minimum: Option<f64>,
    exclusive_maximum: bool,
    exclusive_minimum: bool,
    max_length: Option<i64>,
    min_length: Option<i64>,
    max_items: Option<i64>,
    min_items: Option<i64>,
    max_properties: Option<i64>,
    min_properties: Option<i64>,
    unique_items: bool,
    multiple_of: Option<f64>,
    required: Vec<String>,
    items: Option<Items>,
    all_of: Vec<Props>,
    any_of: Vec<Props>,
    one_of: Vec<Props>,
    not: Option<Box<Props>>,
    properties: BTreeMap<String, Props>,
    additional_properties: Option<Additional>,
    /// Keywords Kubernetes refuses; only their presence matters.
    id: bool,
    schema_uri: bool,
    reference: bool,
    pattern_properties: bool,
    definitions: bool,
    /// Present (`Some`), and non-empty.
    dependencies: Option<bool>,
    additional_items: bool,
    preserve_unknown_fields: Option<bool>,
    embedded_resource: bool,
    int_or_string: bool,
    list_map_keys: Vec<String>,
    list_type: Option<String>,
    map_type: Option<String>,
    validations: Vec<RawRule>,
}

#[derive(Clone, Debug, PartialEq)]
enum Items {
    One(Box<Props>),
    /// The tuple form (`items: [...]`), which Kubernetes refuses.
    Many(Vec<Props>),
}

#[derive(Clone, Debug, PartialEq)]
enum Additional {
    Allows(bool),
    Schema(Box<Props>),
}

#[derive(Clone, Debug, Default, PartialEq)]
struct RawRule {
    rule: String,
    message: String,
    message_expression: String,
    reason: Option<String>,
    field_path: String,
    optional_old_self: Option<bool>,
}

impl RawRule {
    /// The rule as kube-apiserver shows it in compilation errors (its
    /// internal type, marshalled with Go's field names).
    fn shown(&self) -> Value {
        serde_json::json!({
            "Rule": self.rule,
            "Message": self.message,
            "MessageExpression": self.message_expression,
            "Reason": self.reason,
            "FieldPath": self.field_path,
            "OptionalOldSelf": self.optional_old_self,
        })
    }
}

/// The JSON type name of a value, as validation errors name it.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Decodes raw JSON into [`Props`]; a keyword of the wrong JSON type is a
/// cause (kube-apiserver refuses the whole request body for it).
#[derive(Default)]
struct Decoder {
    causes: Vec<Cause>,
}

impl Decoder {
    fn mismatch(&mut self, at: &str, value: &Value, want: &str) {
        self.causes.push(Cause::type_invalid(
            at,
            &Value::from(json_type(value)),
            format!("must be of type {want}"),
        ));
    }

    fn string(&mut self, value: &Value, at: &str) -> String {
        match value {
            Value::String(s) => s.clone(),
            other => {
                self.mismatch(at, other, "string");
                String::new()
            }
        }
    }

    fn boolean(&mut self, value: &Value, at: &str) -> bool {
        match value {
            Value::Bool(b) => *b,
            other => {
                self.mismatch(at, other, "boolean");
                false
            }
        }
    }

    fn integer(&mut self, value: &Value, at: &str) -> Option<i64> {
        let i = value.as_i64();
        if i.is_none() {
            self.mismatch(at, value, "integer");
        }
        i
    }

    fn number(&mut self, value: &Value, at: &str) -> Option<f64> {
        let f = value.as_f64();
        if f.is_none() {
            self.mismatch(at, value, "number");
        }
        f
    }

    fn strings(&mut self, value: &Value, at: &str) -> Vec<String> {
        match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.string(item, &format!("{at}[{i}]")))
                .collect(),
            other => {
                self.mismatch(at, other, "array");
                Vec::new()
            }
        }
    }

    fn object<'v>(
        &mut self,
        value: &'v Value,
        at: &str,
    ) -> Option<&'v serde_json::Map<String, Value>> {
        match value {
            Value::Object(map) => Some(map),
            other => {
                self.mismatch(at, other, "object");
                None
            }
        }
    }

    fn nodes(&mut self, value: &Value, at: &str, depth: usize) -> Vec<Props> {
        match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.node(item, &format!("{at}[{i}]"), depth + 1))
                .collect(),
            other => {
                self.mismatch(at, other, "array");
                Vec::new()
            }
        }
    }

    fn node_map(&mut self, value: &Value, at: &str, depth: usize) -> BTreeMap<String, Props> {
        let Some(map) = self.object(value, at) else {
            return BTreeMap::new();
        };
        map.iter()
            .map(|(k, v)| (k.clone(), self.node(v, &format!("{at}[{k}]"), depth + 1)))
            .collect()
    }

    fn node_or_bool(&mut self, value: &Value, at: &str, depth: usize) -> Option<Additional> {
        match value {
            Value::Bool(b) => Some(Additional::Allows(*b)),
            Value::Object(_) => Some(Additional::Schema(Box::new(self.node(
                value,
                at,
                depth + 1,
            )))),
            other => {
                self.mismatch(at, other, "object or boolean");
                None
            }
        }
    }

    fn rules(&mut self, value: &Value, at: &str) -> Vec<RawRule> {
        let Value::Array(items) = value else {
            self.mismatch(at, value, "array");
            return Vec::new();
        };
        let mut rules = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let Some(map) = self.object(item, &at) else {
                continue;
            };
            let mut rule = RawRule::default();
            for (key, value) in map {
                if value.is_null() {
                    continue;
                }
                let at = format!("{at}.{key}");
                match key.as_str() {
                    "rule" => rule.rule = self.string(value, &at),
                    "message" => rule.message = self.string(value, &at),
                    "messageExpression" => rule.message_expression = self.string(value, &at),
                    "reason" => rule.reason = Some(self.string(value, &at)),
                    "fieldPath" => rule.field_path = self.string(value, &at),
                    "optionalOldSelf" => rule.optional_old_self = Some(self.boolean(value, &at)),
                    _ => {}
                }
            }
            rules.push(rule);
        }
        rules
    }

    fn node(&mut self, value: &Value, path: &str, depth: usize) -> Props {
        let mut p = Props::default();
        if depth > MAX_DEPTH {
            self.causes.push(Cause::forbidden(
                path,
                format!("must not be nested more than {MAX_DEPTH} levels deep"),
            ));
            return p;
        }
        // A null schema decodes as an empty one.
        let map = match value {
            Value::Null => return p,
            other => match self.object(other, path) {
                Some(map) => map,
                None => return p,
            },
        };
        for (key, value) in map {
            // JSON null leaves a keyword unset, as in Go.
            if value.is_null() {
                continue;
            }
            let at = format!("{path}.{key}");
            match key.as_str() {
                "id" => p.id = !self.string(value, &at).is_empty(),
                "$schema" => p.schema_uri = !self.string(value, &at).is_empty(),
                "$ref" => {
                    self.string(value, &at);
                    p.reference = true;
                }
                "type" => p.type_ = self.string(value, &at),
                "format" => p.format = self.string(value, &at),
                "title" => p.title = self.string(value, &at),
                "description" => p.description = self.string(value, &at),
                "default" => p.default = Some(value.clone()),
                "example" => p.example = true,
                "externalDocs" => p.external_docs = self.object(value, &at).is_some(),
                "nullable" => p.nullable = self.boolean(value, &at),
                "enum" => match value {
                    Value::Array(values) => p.enum_values = values.clone(),
                    other => self.mismatch(&at, other, "array"),
                },
                "pattern" => p.pattern = self.string(value, &at),
                "maximum" => p.maximum = self.number(value, &at),
                "minimum" => p.minimum = self.number(value, &at),
                "multipleOf" => p.multiple_of = self.number(value, &at),
                "exclusiveMaximum" => p.exclusive_maximum = self.boolean(value, &at),
                "exclusiveMinimum" => p.exclusive_minimum = self.boolean(value, &at),
                "maxLength" => p.max_length = self.integer(value, &at),
                "minLength" => p.min_length = self.integer(value, &at),
                "maxItems" => p.max_items = self.integer(value, &at),
                "minItems" => p.min_items = self.integer(value, &at),
                "maxProperties" => p.max_properties = self.integer(value, &at),
                "minProperties" => p.min_properties = self.integer(value, &at),
                "uniqueItems" => p.unique_items = self.boolean(value, &at),
                "required" => p.required = self.strings(value, &at),
                "items" => {
                    p.items = match value {
                        Value::Array(_) => Some(Items::Many(self.nodes(value, &at, depth))),
                        _ => Some(Items::One(Box::new(self.node(value, &at, depth + 1)))),
                    }
                }
                "allOf" => p.all_of = self.nodes(value, &at, depth),
                "anyOf" => p.any_of = self.nodes(value, &at, depth),
                "oneOf" => p.one_of = self.nodes(value, &at, depth),
                "not" => p.not = Some(Box::new(self.node(value, &at, depth + 1))),
                "properties" => p.properties = self.node_map(value, &at, depth),
                "additionalProperties" => {
                    p.additional_properties = self.node_or_bool(value, &at, depth)
                }
                "patternProperties" => {
                    p.pattern_properties = !self.node_map(value, &at, depth).is_empty()
                }
                "definitions" => p.definitions = !self.node_map(value, &at, depth).is_empty(),
                "dependencies" => {
                    p.dependencies = self.object(value, &at).map(|m| !m.is_empty());
                }
                "additionalItems" => {
                    p.additional_items = self.node_or_bool(value, &at, depth).is_some()
                }
                "x-kubernetes-preserve-unknown-fields" => {
                    p.preserve_unknown_fields = Some(self.boolean(value, &at))
                }
                "x-kubernetes-embedded-resource" => p.embedded_resource = self.boolean(value, &at),
                "x-kubernetes-int-or-string" => p.int_or_string = self.boolean(value, &at),
                "x-kubernetes-list-map-keys" => p.list_map_keys = self.strings(value, &at),
                "x-kubernetes-list-type" => p.list_type = Some(self.string(value, &at)),
                "x-kubernetes-map-type" => p.map_type = Some(self.string(value, &at)),
                "x-kubernetes-validations" => p.validations = self.rules(value, &at),
                _ => {}
            }
        }
        p
    }
}

impl Props {
    fn preserves_unknown_fields(&self) -> bool {
        self.preserve_unknown_fields == Some(true)
    }

    fn single_items(&self) -> Option<&Props> {
        match &self.items {
            Some(Items::One(items)) => Some(items),
            _ => None,
        }
    }
}

/// Why kube-apiserver cannot convert the schema to its structural form:
/// the first keyword (anywhere in the tree) it does not support.
fn unsupported_keyword(p: &Props) -> Option<&'static str> {
    let here = [
        (p.id, "OpenAPIV3Schema 'id' is not supported"),
        (p.schema_uri, "OpenAPIV3Schema 'schema' is not supported"),
        (p.reference, "OpenAPIV3Schema '$ref' is not supported"),
        (
            p.pattern_properties,
            "OpenAPIV3Schema 'patternProperties' is not supported",
        ),
        (
            p.dependencies == Some(true),
            "OpenAPIV3Schema 'dependencies' is not supported",
        ),
        (
            p.additional_items,
            "OpenAPIV3Schema 'additionalItems' is not supported",
        ),
        (
            p.definitions,
            "OpenAPIV3Schema 'definitions' is not supported",
        ),
        (
            matches!(p.items, Some(Items::Many(_))),
            "OpenAPIV3Schema 'items' must be a schema, but is an array",
        ),
        (
            p.preserve_unknown_fields == Some(false),
            "internal error: 'x-kubernetes-preserve-unknown-fields' must be true or undefined",
        ),
    ]
    .into_iter()
    .find_map(|(found, message)| found.then_some(message));
    here.or_else(|| children(p).find_map(unsupported_keyword))
}

/// Every direct child node: items, properties, additionalProperties and the
/// junctors' branches.
fn children(p: &Props) -> impl Iterator<Item = &Props> {
    let items: Vec<&Props> = match &p.items {
        Some(Items::One(i)) => vec![i],
        Some(Items::Many(many)) => many.iter().collect(),
        None => Vec::new(),
    };
    let additional = match &p.additional_properties {
        Some(Additional::Schema(s)) => Some(&**s),
        _ => None,
    };
    items
        .into_iter()
        .chain(p.properties.values())
        .chain(additional)
        .chain(p.all_of.iter())
        .chain(p.any_of.iter())
        .chain(p.one_of.iter())
        .chain(p.not.as_deref())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Item,
    Field,
}

/// `{type: integer}`, `{type: string}`: the one `anyOf` allowed to declare
/// types, for `x-kubernetes-int-or-string`.
fn is_int_or_string_any_of(any_of: &[Props]) -> bool {
    let bare = |t: &str| Props {
        type_: t.into(),
        ..Props::default()
    };
    any_of.len() == 2 && any_of[0] == bare("integer") && any_of[1] == bare("string")
}

/// The structural invariants (kube's `ValidateStructural`).
fn structural(p: &Props, lvl: Level, path: &str, errs: &mut Vec<Cause>) {
    if p.type_ == "array" && p.items.is_none() {
        errs.push(Cause::required_because(
            format!("{path}.items"),
            "must be specified",
        ));
    }
    if let Some(items) = p.single_items() {
        structural(items, Level::Item, &format!("{path}.items"), errs);
    }
    for (k, v) in &p.properties {
        structural(v, Level::Field, &format!("{path}.properties[{k}]"), errs);
    }
    if let Some(additional) = &p.additional_properties {
        if lvl == Level::Root {
            errs.push(Cause::forbidden(
                format!("{path}.additionalProperties"),
                "must not be used at the root",
            ));
        }
        if let Additional::Schema(s) = additional {
            structural(
                s,
                Level::Field,
                &format!("{path}.additionalProperties"),
                errs,
            );
        }
    }

    if p.int_or_string && p.preserves_unknown_fields() {
        errs.push(Cause::invalid(
            format!("{path}.x-kubernetes-preserve-unknown-fields"),
            &Value::Bool(true),
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    if p.int_or_string && p.embedded_resource {
        errs.push(Cause::invalid(
            format!("{path}.x-kubernetes-embedded-resource"),
            &Value::Bool(true),
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }

    let skip_any_of = is_int_or_string_any_of(&p.any_of);
    let skip_first_all_of_any_of = p
        .all_of
        .first()
        .is_some_and(|first| is_int_or_string_any_of(&first.any_of));
    junctors_structural(p, skip_any_of, skip_first_all_of_any_of, lvl, path, errs);

    if p.embedded_resource && p.type_ != "object" {
        let detail = "must be object if x-kubernetes-embedded-resource is true";
        if p.type_.is_empty() {
            errs.push(Cause::required_because(format!("{path}.type"), detail));
        } else {
            errs.push(Cause::invalid(
                format!("{path}.type"),
                &Value::from(p.type_.as_str()),
                detail,
            ));
        }
    } else if p.type_.is_empty() && !p.int_or_string && !p.preserves_unknown_fields() {
        let detail = match lvl {
            Level::Root => "must not be empty at the root",
            Level::Item => "must not be empty for specified array items",
            Level::Field => "must not be empty for specified object fields",
        };
        errs.push(Cause::required_because(format!("{path}.type"), detail));
    }
    if p.embedded_resource && p.additional_properties.is_some() {
        errs.push(Cause::forbidden(
            format!("{path}.additionalProperties"),
            "must not be used if x-kubernetes-embedded-resource is set",
        ));
    }
    if lvl == Level::Root && !p.type_.is_empty() && p.type_ != "object" {
        errs.push(Cause::invalid(
            format!("{path}.type"),
            &Value::from(p.type_.as_str()),
            "must be object at the root",
        ));
    }

    let check_metadata = lvl == Level::Root || p.embedded_resource;
    if check_metadata {
        for field in ["kind", "apiVersion"] {
            if let Some(f) = p.properties.get(field) {
                if f.type_ != "string" {
                    errs.push(Cause::invalid(
                        format!("{path}.properties[{field}].type"),
                        &Value::from(f.type_.as_str()),
                        "must be string",
                    ));
                }
            }
        }
    }
    if let Some(metadata) = p.properties.get("metadata") {
        let at = format!("{path}.properties[metadata]");
        if check_metadata && metadata.type_ != "object" {
            errs.push(Cause::invalid(
                format!("{at}.type"),
                &Value::from(metadata.type_.as_str()),
                "must be object",
            ));
        }
        if lvl == Level::Root && !only_names(metadata) {
            errs.push(Cause::forbidden(
                at,
                "must not specify anything other than name and generateName, but metadata is implicitly specified",
            ));
        }
    }
    if p.embedded_resource && !p.preserves_unknown_fields() && p.properties.is_empty() {
        errs.push(Cause::required_because(
            format!("{path}.properties"),
            "must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields",
        ));
    }
}

/// Whether a root `metadata` schema constrains nothing but `name` and
/// `generateName` (its type and default aside, checked elsewhere).
fn only_names(metadata: &Props) -> bool {
    let mut rest = metadata.clone();
    let names = ["name", "generateName"]
        .iter()
        .filter(|k| rest.properties.contains_key(**k))
        .count();
    if names > 0 && names == rest.properties.len() {
        rest.properties.clear();
    }
    rest.type_.clear();
    rest.default = None;
    rest == Props::default()
}

/// The junctors of a node: what they may not declare (kube's
/// `validateValueValidation`), and its `pattern`.
fn junctors_structural(
    p: &Props,
    skip_any_of: bool,
    skip_first_all_of_any_of: bool,
    lvl: Level,
    path: &str,
    errs: &mut Vec<Cause>,
) {
    if !skip_any_of {
        for (i, branch) in p.any_of.iter().enumerate() {
            nested_structural(branch, false, lvl, &format!("{path}.anyOf[{i}]"), errs);
        }
    }
    for (i, branch) in p.all_of.iter().enumerate() {
        let skip = skip_first_all_of_any_of && i == 0;
        nested_structural(branch, skip, lvl, &format!("{path}.allOf[{i}]"), errs);
    }
    for (i, branch) in p.one_of.iter().enumerate() {
        nested_structural(branch, false, lvl, &format!("{path}.oneOf[{i}]"), errs);
    }
    if let Some(not) = &p.not {
        nested_structural(not, false, lvl, &format!("{path}.not"), errs);
    }
    if !p.pattern.is_empty() {
        if let Err(e) = compile_pattern(&p.pattern) {
            errs.push(Cause::invalid(
                format!("{path}.pattern"),
                &Value::from(p.pattern.as_str()),
                format!("must be a valid regular expression, but isn't: {e}"),
            ));
        }
    }
}

/// A node under a junctor: value validations only.
fn nested_structural(p: &Props, skip_any_of: bool, lvl: Level, path: &str, errs: &mut Vec<Cause>) {
    junctors_structural(p, skip_any_of, false, lvl, path, errs);
    if let Some(items) = p.single_items() {
        nested_structural(items, false, lvl, &format!("{path}.items"), errs);
    }
    for (k, v) in &p.properties {
        nested_structural(
            v,
            false,
            Level::Field,
            &format!("{path}.properties[{k}]"),
            errs,
        );
    }
    let forbid = |errs: &mut Vec<Cause>, keyword: &str, detail: &str| {
        errs.push(Cause::forbidden(format!("{path}.{keyword}"), detail));
    };
    if !p.type_.is_empty() {
        forbid(errs, "type", "must be empty to be structural");
    }
    if matches!(
        p.additional_properties,
        Some(Additional::Schema(_) | Additional::Allows(true))
    ) {
        forbid(
            errs,
            "additionalProperties",
            "must be undefined to be structural",
        );
    }
    if p.default.is_some() {
        forbid(errs, "default", "must be undefined to be structural");
    }
    if !p.title.is_empty() {
        forbid(errs, "title", "must be empty to be structural");
    }
    if !p.description.is_empty() {
        forbid(errs, "description", "must be empty to be structural");
    }
    if p.nullable {
        forbid(errs, "nullable", "must be false to be structural");
    }
    if p.preserves_unknown_fields() {
        forbid(
            errs,
            "x-kubernetes-preserve-unknown-fields",
            "must be false to be structural",
        );
    }
    if p.embedded_resource {
        forbid(
            errs,
            "x-kubernetes-embedded-resource",
            "must be false to be structural",
        );
    }
    if p.int_or_string {
        forbid(
            errs,
            "x-kubernetes-int-or-string",
            "must be false to be structural",
        );
    }
    if !p.list_map_keys.is_empty() {
        forbid(
            errs,
            "x-kubernetes-list-map-keys",
            "must be empty to be structural",
        );
    }
    if p.list_type.is_some() {
        forbid(
            errs,
            "x-kubernetes-list-type",
            "must be undefined to be structural",
        );
    }
    if p.map_type.is_some() {
        forbid(
            errs,
            "x-kubernetes-map-type",
            "must be undefined to be structural",
        );
    }
    if !p.validations.is_empty() {
        forbid(
            errs,
            "x-kubernetes-validations",
            "must be empty to be structural",
        );
    }
    if p.properties.contains_key("metadata") {
        forbid(
            errs,
            "properties[metadata]",
            "must not be specified in a nested context",
        );
    }
}

/// Every field or list the root's junctors mention must also be specified
/// outside them (kube checks the root's junctors, and what they nest).
fn completeness_of_junctors(root: &Props, path: &str, errs: &mut Vec<Cause>) {
    completeness(root, Some(root), path, path, errs);
}

fn completeness(v: &Props, s: Option<&Props>, s_path: &str, v_path: &str, errs: &mut Vec<Cause>) {
    if let Some(not) = &v.not {
        completeness_nested(not, s, s_path, &format!("{v_path}.not"), errs);
    }
    let branches = [
        ("allOf", &v.all_of),
        ("anyOf", &v.any_of),
        ("oneOf", &v.one_of),
    ];
    for (junctor, list) in branches {
        for (i, branch) in list.iter().enumerate() {
            completeness_nested(branch, s, s_path, &format!("{v_path}.{junctor}[{i}]"), errs);
        }
    }
}

fn completeness_nested(
    v: &Props,
    s: Option<&Props>,
    s_path: &str,
    v_path: &str,
    errs: &mut Vec<Cause>,
) {
    let Some(s) = s else {
        errs.push(Cause::required_because(
            s_path,
            format!("because it is defined in {v_path}"),
        ));
        return;
    };
    completeness(v, Some(s), s_path, v_path, errs);
    if let Some(items) = v.single_items() {
        completeness_nested(
            items,
            s.single_items(),
            &format!("{s_path}.items"),
            &format!("{v_path}.items"),
            errs,
        );
    }
    for (k, field) in &v.properties {
        let s_at = format!("{s_path}.properties[{k}]");
        let v_at = format!("{v_path}.properties[{k}]");
        match s.properties.get(k) {
            Some(s_field) => completeness_nested(field, Some(s_field), &s_at, &v_at, errs),
            None => errs.push(Cause::required_because(
                s_at,
                format!("because it is defined in {v_at}"),
            )),
        }
    }
}

/// Where the walk is, as kube's `specStandardValidator` tracks it.
#[derive(Clone, Default)]
struct Context {
    /// Why defaults are forbidden here, when they are.
    forbidden_defaults: Option<String>,
    /// Inside the type or object metadata of a resource.
    inside_resource_meta: bool,
    /// The highest ancestor whose children cannot be correlated with the
    /// old object (lists other than `map` lists).
    uncorrelatable: Option<String>,
}

impl Context {
    fn forbid_defaults(&self, reason: &str) -> Context {
        Context {
            forbidden_defaults: Some(reason.into()),
            ..self.clone()
        }
    }

    fn forbid_old_self(&self, path: &str) -> Context {
        Context {
            uncorrelatable: self.uncorrelatable.clone().or_else(|| Some(path.into())),
            ..self.clone()
        }
    }
}

const SUPPORTED_REASONS: [&str; 4] = [
    "FieldValueDuplicate",
    "FieldValueForbidden",
    "FieldValueInvalid",
    "FieldValueRequired",
];

/// The walk over the whole schema (kube's
/// `ValidateCustomResourceDefinitionOpenAPISchema`), compiling CEL rules
/// once the schema is otherwise valid.
#[derive(Default)]
struct Walk {
    cel: bool,
    schema_errs: Vec<Cause>,
    cel_errs: Vec<Cause>,
    /// Compiled rules by the path of their node.
    compiled: HashMap<String, Vec<Arc<CompiledRule>>>,
}

impl Walk {
    fn schema_err(&mut self, cause: Cause) {
        self.schema_errs.push(cause);
    }

    fn node(&mut self, p: &Props, path: &str, ctx: &Context, is_root: bool, cel: bool) {
        let start = self.schema_errs.len();
        self.keywords(p, path, ctx);

        if p.unique_items {
            self.schema_err(Cause::forbidden(
                format!("{path}.uniqueItems"),
                "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            ));
        }
        if let Some(additional) = &p.additional_properties {
            let at = format!("{path}.additionalProperties");
            // A map has no named fields: the two cannot be combined, and
            // `false` (no field at all) has no meaning here either.
            if !p.properties.is_empty() && !matches!(additional, Additional::Allows(true)) {
                self.schema_err(Cause::forbidden(
                    &at,
                    "additionalProperties and properties are mutual exclusive",
                ));
            } else if p.properties.is_empty() && matches!(additional, Additional::Allows(false)) {
                self.schema_err(Cause::forbidden(
                    &at,
                    "additionalProperties cannot be set to false",
                ));
            }
            if let Additional::Schema(s) = additional {
                let sub = if ctx.inside_resource_meta {
                    ctx.forbid_defaults("inside additionalProperties applying to object metadata")
                } else {
                    ctx.clone()
                };
                self.node(s, &at, &sub, false, cel);
            }
        }
        for (k, field) in &p.properties {
            let mut sub = ctx.clone();
            if !map_is_correlatable(p.map_type.as_deref()) {
                sub = sub.forbid_old_self(path);
            }
            if (is_root || p.embedded_resource) && META_FIELDS.contains(&k.as_str()) {
                sub.inside_resource_meta = true;
                if is_root {
                    sub = sub.forbid_defaults(&format!("in top-level {k}"));
                }
            }
            self.node(field, &format!("{path}.properties[{k}]"), &sub, false, cel);
        }
        if let Some(not) = &p.not {
            self.node(not, &format!("{path}.not"), ctx, false, false);
        }
        let branches = [
            ("allOf", &p.all_of),
            ("oneOf", &p.one_of),
            ("anyOf", &p.any_of),
        ];
        for (junctor, list) in branches {
            for (i, branch) in list.iter().enumerate() {
                self.node(branch, &format!("{path}.{junctor}[{i}]"), ctx, false, false);
            }
        }
        if let Some(items) = &p.items {
            let sub = if p.list_type.as_deref() == Some("map") {
                ctx.clone()
            } else {
                ctx.forbid_old_self(path)
            };
            match items {
                Items::One(s) => self.node(s, &format!("{path}.items"), &sub, false, cel),
                Items::Many(many) => {
                    for (i, s) in many.iter().enumerate() {
                        self.node(s, &format!("{path}.items[{i}]"), &sub, false, cel);
                    }
                }
            }
        }
        if p.preserve_unknown_fields == Some(false) {
            self.schema_err(Cause::invalid(
                format!("{path}.x-kubernetes-preserve-unknown-fields"),
                &Value::Bool(false),
                "must be true or undefined",
            ));
        }
        self.topology(p, path);
        self.rules(p, path, ctx, start, cel);
    }

    /// Keywords refused wherever they appear (kube's
    /// `specStandardValidatorV3.validate`).
    fn keywords(&mut self, p: &Props, path: &str, ctx: &Context) {
        const TYPES: [&str; 6] = ["array", "boolean", "integer", "number", "object", "string"];
        if !p.type_.is_empty() && !TYPES.contains(&p.type_.as_str()) {
            self.schema_err(Cause::unsupported(
                format!("{path}.type"),
                &Value::from(p.type_.as_str()),
                &TYPES,
            ));
        }
        if p.default.is_some() {
            if let Some(reason) = &ctx.forbidden_defaults {
                self.schema_err(Cause::forbidden(
                    format!("{path}.default"),
                    format!("must not be set {reason}"),
                ));
            }
        }
        let unsupported = [
            (p.id, "id"),
            (p.additional_items, "additionalItems"),
            (p.pattern_properties, "patternProperties"),
            (p.definitions, "definitions"),
            (p.dependencies.is_some(), "dependencies"),
            (p.reference, "$ref"),
        ];
        for (present, keyword) in unsupported {
            if present {
                self.schema_err(Cause::forbidden(
                    format!("{path}.{keyword}"),
                    format!("{keyword} is not supported"),
                ));
            }
        }
        if p.type_ == "null" {
            self.schema_err(Cause::forbidden(
                format!("{path}.type"),
                "type cannot be set to null, use nullable as an alternative",
            ));
        }
        if matches!(p.items, Some(Items::Many(_))) {
            self.schema_err(Cause::forbidden(
                format!("{path}.items"),
                "items must be a schema object and not an array",
            ));
        }
        if ctx.inside_resource_meta && p.embedded_resource {
            self.schema_err(Cause::forbidden(
                format!("{path}.x-kubernetes-embedded-resource"),
                "must not be used inside of resource meta",
            ));
        }
    }

    /// List and map types, and list map keys.
    fn topology(&mut self, p: &Props, path: &str) {
        let type_ = Value::from(p.type_.as_str());
        if p.map_type.is_some() && p.type_ != "object" {
            let detail = "must be object if x-kubernetes-map-type is specified";
            self.schema_err(if p.type_.is_empty() {
                Cause::required_because(format!("{path}.type"), detail)
            } else {
                Cause::invalid(format!("{path}.type"), &type_, detail)
            });
        }
        if let Some(map_type) = &p.map_type {
            if map_type != "atomic" && map_type != "granular" {
                self.schema_err(Cause::unsupported(
                    format!("{path}.x-kubernetes-map-type"),
                    &Value::from(map_type.as_str()),
                    &["atomic", "granular"],
                ));
            }
        }
        let items = p.single_items();
        if p.list_type.is_some() && p.type_ != "array" {
            let detail = "must be array if x-kubernetes-list-type is specified";
            self.schema_err(if p.type_.is_empty() {
                Cause::required_because(format!("{path}.type"), detail)
            } else {
                Cause::invalid(format!("{path}.type"), &type_, detail)
            });
        } else if let (Some("set"), Some(items)) = (p.list_type.as_deref(), items) {
            let detail = "must be atomic as item of a list with x-kubernetes-list-type=set";
            // kube shows the items' list type for both (null when unset).
            let shown = items.list_type.clone().map_or(Value::Null, Value::from);
            if items.type_ == "array" && items.list_type.as_deref().is_some_and(|t| t != "atomic") {
                self.schema_err(Cause::invalid(
                    format!("{path}.items.x-kubernetes-list-type"),
                    &shown,
                    detail,
                ));
            } else if items.type_ == "object" && items.map_type.as_deref() != Some("atomic") {
                self.schema_err(Cause::invalid(
                    format!("{path}.items.x-kubernetes-map-type"),
                    &shown,
                    detail,
                ));
            }
        }
        if let Some(list_type) = &p.list_type {
            if !["atomic", "set", "map"].contains(&list_type.as_str()) {
                self.schema_err(Cause::unsupported(
                    format!("{path}.x-kubernetes-list-type"),
                    &Value::from(list_type.as_str()),
                    &["atomic", "set", "map"],
                ));
            }
        }
        if !p.list_map_keys.is_empty() {
            let detail = "must be map if x-kubernetes-list-map-keys is non-empty";
            match p.list_type.as_deref() {
                None => self.schema_err(Cause::required_because(
                    format!("{path}.x-kubernetes-list-type"),
                    detail,
                )),
                Some("map") => {}
                Some(other) => self.schema_err(Cause::invalid(
                    format!("{path}.x-kubernetes-list-type"),
                    &Value::from(other),
                    detail,
                )),
            }
        }
        if p.list_type.as_deref() == Some("map") {
            self.map_list(p, path);
        }
        if let (Some(list_type @ ("set" | "map")), Some(items)) = (p.list_type.as_deref(), items) {
            if items.nullable {
                self.schema_err(Cause::forbidden(
                    format!("{path}.items.nullable"),
                    format!("cannot be nullable when x-kubernetes-list-type is {list_type}"),
                ));
            }
            if list_type == "map" {
                for k in &p.list_map_keys {
                    let Some(key) = items.properties.get(k) else {
                        continue;
                    };
                    let at = format!("{path}.items.properties[{k}]");
                    if !items.required.contains(k) && key.default.is_none() {
                        self.schema_err(Cause::required_because(
                            format!("{at}.default"),
                            "this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property",
                        ));
                    }
                    if key.nullable {
                        self.schema_err(Cause::forbidden(
                            format!("{at}.nullable"),
                            "this property is in x-kubernetes-list-map-keys, so it cannot be nullable",
                        ));
                    }
                }
            }
        }
    }

    fn map_list(&mut self, p: &Props, path: &str) {
        if p.list_map_keys.is_empty() {
            self.schema_err(Cause::required_because(
                format!("{path}.x-kubernetes-list-map-keys"),
                "must not be empty if x-kubernetes-list-type is map",
            ));
        }
        let items = match &p.items {
            None => {
                self.schema_err(Cause::required_because(
                    format!("{path}.items"),
                    "must have a schema if x-kubernetes-list-type is map",
                ));
                return;
            }
            Some(Items::Many(_)) => {
                self.schema_err(Cause::invalid(
                    format!("{path}.items"),
                    &Value::from("array"),
                    "must only have a single schema if x-kubernetes-list-type is map",
                ));
                return;
            }
            Some(Items::One(items)) => items,
        };
        if items.type_ != "object" {
            self.schema_err(Cause::invalid(
                format!("{path}.items.type"),
                &Value::from(items.type_.as_str()),
                "must be object if parent array's x-kubernetes-list-type is map",
            ));
            return;
        }
        let keys = Value::from(p.list_map_keys.clone());
        let mut seen = Vec::new();
        for k in &p.list_map_keys {
            match items.properties.get(k) {
                // kube shows the items' type here.
                Some(key) if key.type_ == "array" || key.type_ == "object" => {
                    self.schema_err(Cause::invalid(
                        format!("{path}.items.properties[{k}].type"),
                        &Value::from(items.type_.as_str()),
                        "must be a scalar type if parent array's x-kubernetes-list-type is map",
                    ))
                }
                Some(_) => {}
                None => self.schema_err(Cause::invalid(
                    format!("{path}.x-kubernetes-list-map-keys"),
                    &keys,
                    "entries must all be names of item properties",
                )),
            }
            if seen.contains(&k) {
                self.schema_err(Cause::invalid(
                    format!("{path}.x-kubernetes-list-map-keys"),
                    &keys,
                    "must not contain duplicate entries",
                ));
            }
            seen.push(k);
        }
    }

    /// `x-kubernetes-validations`: each entry's shape, then (when the schema
    /// is otherwise valid from this node down) its compilation.
    fn rules(&mut self, p: &Props, path: &str, ctx: &Context, start: usize, cel: bool) {
        let has_line_breaks = |s: &str| s.contains(['\n', '\r']);
        for (i, rule) in p.validations.iter().enumerate() {
            let at = format!("{path}.x-kubernetes-validations[{i}]");
            let trimmed_rule = rule.rule.trim();
            let trimmed_message = rule.message.trim();
            let message = Value::from(rule.message.as_str());
            if trimmed_rule.is_empty() {
                self.schema_err(Cause::required_because(
                    format!("{at}.rule"),
                    "rule is not specified",
                ));
            } else if !rule.message.is_empty() && trimmed_message.is_empty() {
                self.schema_err(Cause::invalid(
                    format!("{at}.message"),
                    &message,
                    "must be non-empty if specified",
                ));
            } else if has_line_breaks(trimmed_message) {
                self.schema_err(Cause::invalid(
                    format!("{at}.message"),
                    &message,
                    "must not contain line breaks",
                ));
            } else if has_line_breaks(trimmed_rule) && trimmed_message.is_empty() {
                self.schema_err(Cause::required_because(
                    format!("{at}.message"),
                    "message must be specified if rule contains line breaks",
                ));
            }
            if !rule.message_expression.is_empty() && rule.message_expression.trim().is_empty() {
                self.schema_err(Cause::required_because(
                    format!("{at}.messageExpression"),
                    "messageExpression must be non-empty if specified",
                ));
            }
            if let Some(reason) = &rule.reason {
                if !SUPPORTED_REASONS.contains(&reason.as_str()) {
                    self.schema_err(Cause::unsupported(
                        format!("{at}.reason"),
                        &Value::from(reason.as_str()),
                        &SUPPORTED_REASONS,
                    ));
                }
            }
            let field_path = Value::from(rule.field_path.as_str());
            if !rule.field_path.is_empty() && rule.field_path.trim().is_empty() {
                self.schema_err(Cause::invalid(
                    format!("{at}.fieldPath"),
                    &field_path,
                    "must be non-empty if specified",
                ));
            }
            if has_line_breaks(&rule.field_path) {
                self.schema_err(Cause::invalid(
                    format!("{at}.fieldPath"),
                    &field_path,
                    "must not contain line breaks",
                ));
            }
            if !rule.field_path.is_empty()
                && unsupported_keyword(p).is_none()
                && resolve_field_path(&rule.field_path, p).is_err()
            {
                self.schema_err(Cause::invalid(
                    format!("{at}.fieldPath"),
                    &field_path,
                    "must be a valid path",
                ));
            }
        }
        if p.validations.is_empty() || self.schema_errs.len() > start || !(cel && self.cel) {
            return;
        }
        let mut compiled = Vec::new();
        for (i, rule) in p.validations.iter().enumerate() {
            let at = format!("{path}.x-kubernetes-validations[{i}]");
            let message_expression =
                Some(rule.message_expression.as_str()).filter(|m| !m.is_empty());
            // optionalOldSelf on a rule that does not read oldSelf is
            // refused below.
            let optional = rule.optional_old_self.unwrap_or(false);
            match CompiledRule::compile(&rule.rule, message_expression, optional) {
                // The engine's message starts with "compilation failed".
                Err(e) => self.cel_errs.push(Cause::invalid(
                    format!("{at}.rule"),
                    &rule.shown(),
                    e.to_string(),
                )),
                Ok(c) => {
                    if c.is_transition() {
                        if let Some(within) = &ctx.uncorrelatable {
                            self.cel_errs.push(Cause::invalid(
                                format!("{at}.rule"),
                                &Value::from(rule.rule.as_str()),
                                format!("oldSelf cannot be used on the uncorrelatable portion of the schema within {within}"),
                            ));
                        }
                    } else if let Some(optional) = rule.optional_old_self {
                        self.cel_errs.push(Cause::invalid(
                            format!("{at}.optionalOldSelf"),
                            &Value::Bool(optional),
                            "may not be set if oldSelf is not used in rule",
                        ));
                    }
                    compiled.push(Arc::new(c));
                }
            }
        }
        if compiled.len() == p.validations.len() {
            self.compiled.insert(path.to_owned(), compiled);
        }
    }
}

/// Whether the fields of an object with this `x-kubernetes-map-type` can be
/// matched with the old object's.
fn map_is_correlatable(map_type: Option<&str>) -> bool {
    matches!(map_type, None | Some("granular" | "atomic"))
}

/// The [`Schema`] of checked [`Props`]; `compiled` holds the rules compiled
/// by the walk (none while defaults are being checked).
fn build(p: &Props, path: &str, compiled: &mut HashMap<String, Vec<Arc<CompiledRule>>>) -> Schema {
    let type_ = match p.type_.as_str() {
        "object" => Some(SchemaType::Object),
        "array" => Some(SchemaType::Array),
        "string" => Some(SchemaType::String),
        "integer" => Some(SchemaType::Integer),
        "number" => Some(SchemaType::Number),
        "boolean" => Some(SchemaType::Boolean),
        _ => None,
    };
    let list_type = p.list_type.as_deref().map(|t| match t {
        "set" => ListType::Set,
        "map" => ListType::Map {
            keys: p.list_map_keys.clone(),
        },
        _ => ListType::Atomic,
    });
    let map_type = p.map_type.as_deref().map(|t| match t {
        "atomic" => MapType::Atomic,
        _ => MapType::Granular,
    });
    let validations = match compiled.remove(path) {
        Some(rules) => p
            .validations
            .iter()
            .zip(rules)
            .map(|(raw, compiled)| ValidationRule {
                rule: raw.rule.clone(),
                message: Some(raw.message.clone()).filter(|m| !m.is_empty()),
                message_expression: Some(raw.message_expression.clone()).filter(|m| !m.is_empty()),
                reason: raw.reason.clone(),
                field_path: Some(raw.field_path.clone()).filter(|f| !f.is_empty()),
                optional_old_self: raw.optional_old_self.unwrap_or(false),
                compiled,
            })
            .collect(),
        None => Vec::new(),
    };
    let nested = |list: &[Props], junctor: &str, compiled: &mut HashMap<_, _>| -> Vec<Schema> {
        list.iter()
            .enumerate()
            .map(|(i, b)| build(b, &format!("{path}.{junctor}[{i}]"), compiled))
            .collect()
    };
    Schema {
        type_,
        nullable: p.nullable,
        format: Some(p.format.clone()).filter(|f| !f.is_empty()),
        description: Some(p.description.clone()).filter(|d| !d.is_empty()),
        default: p.default.clone(),
        enum_values: p.enum_values.clone(),
        pattern: Some(p.pattern.as_str())
            .filter(|s| !s.is_empty())
            .and_then(|s| compile_pattern(s).ok()),
        min_length: p.min_length,
        max_length: p.max_length,
        min_items: p.min_items,
        max_items: p.max_items,
        min_properties: p.min_properties,
        max_properties: p.max_properties,
        minimum: p.minimum,
        maximum: p.maximum,
        exclusive_minimum: p.exclusive_minimum,
        exclusive_maximum: p.exclusive_maximum,
        multiple_of: p.multiple_of,
        required: p.required.clone(),
        properties: p
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    build(v, &format!("{path}.properties[{k}]"), compiled),
                )
            })
            .collect(),
        // `true` allows any value: a schema that constrains nothing.
        additional_properties: match &p.additional_properties {
            Some(Additional::Schema(s)) => Some(Box::new(build(
                s,
                &format!("{path}.additionalProperties"),
                compiled,
            ))),
            Some(Additional::Allows(true)) => Some(Box::default()),
            _ => None,
        },
        items: p
            .single_items()
            .map(|i| Box::new(build(i, &format!("{path}.items"), compiled))),
        preserve_unknown_fields: p.preserves_unknown_fields(),
        int_or_string: p.int_or_string,
        embedded_resource: p.embedded_resource,
        list_type,
        map_type,
        validations,
        all_of: nested(&p.all_of, "allOf", compiled),
        any_of: nested(&p.any_of, "anyOf", compiled),
        one_of: nested(&p.one_of, "oneOf", compiled),
        not: p
            .not
            .as_ref()
            .map(|n| Box::new(build(n, &format!("{path}.not"), compiled))),
    }
}

/// Defaults must validate against their own node and carry no field
/// pruning would drop (kube's `ValidateDefaults`, without its CEL part).
/// `resource_root`: the node is the root of a resource (the schema root, or
/// an embedded resource); `inside_meta`: within a resource's type or object
/// metadata.
fn default_errors(
    s: &Schema,
    path: &str,
    resource_root: bool,
    inside_meta: bool,
    errs: &mut Vec<Cause>,
) {
    let embedded = s.embedded_resource || resource_root;
    let inside_meta = inside_meta && !embedded;
    if let Some(default) = &s.default {
        let at = format!("{path}.default");
        if inside_meta {
            errs.extend(crate::validate::value_errors(s, default, &at));
        } else {
            if has_unknown_fields(default, Some(s), embedded) {
                errs.push(Cause::invalid(&at, default, "must not have unknown fields"));
            }
            let meta = crate::validate::embedded_errors(s, default, &at, embedded);
            if meta.is_empty() {
                errs.extend(crate::validate::value_errors(s, default, &at));
            } else {
                errs.extend(meta);
            }
        }
    }
    if let Some(items) = &s.items {
        default_errors(items, &format!("{path}.items"), false, inside_meta, errs);
    }
    for (k, field) in &s.properties {
        let meta = inside_meta || (embedded && META_FIELDS.contains(&k.as_str()));
        default_errors(field, &format!("{path}.properties[{k}]"), false, meta, errs);
    }
}

/// The CEL rules of each defaulted node (and below) must hold for its
/// default, both as a transition from itself and as a new value.
fn default_rule_errors(s: &Schema, path: &str, errs: &mut Vec<Cause>) {
    if let Some(default) = &s.default {
        let at = format!("{path}.default");
        let mut found = crate::validate::rule_errors(s, default, Some(default), &at);
        if found.is_empty() {
            found = crate::validate::rule_errors(s, default, None, &at);
        }
        errs.extend(found);
    }
    if let Some(items) = &s.items {
        default_rule_errors(items, &format!("{path}.items"), errs);
    }
    for (k, field) in &s.properties {
        default_rule_errors(field, &format!("{path}.properties[{k}]"), errs);
    }
}

/// Whether pruning `value` with `s` would drop a field. Type and object
/// metadata of a resource root are never pruned.
fn has_unknown_fields(value: &Value, s: Option<&Schema>, resource_root: bool) -> bool {
    let keep_unknown = s.is_some_and(|s| s.preserve_unknown_fields);
    drops_fields(value, s, resource_root, keep_unknown)
}

/// `keep_unknown`: under `x-kubernetes-preserve-unknown-fields`, where
/// pruning keeps unknown fields but still prunes inside known ones (and,
/// for lists, inside their items).
fn drops_fields(
    value: &Value,
    s: Option<&Schema>,
    resource_root: bool,
    keep_unknown: bool,
) -> bool {
    match value {
        Value::Object(map) => {
            let Some(s) = s else {
                return !map.is_empty();
            };
            let keeps_meta = s.embedded_resource || resource_root;
            map.iter().any(|(k, v)| {
                if keeps_meta && META_FIELDS.contains(&k.as_str()) {
                    return false;
                }
                match s.properties.get(k).or(s.additional_properties.as_deref()) {
                    Some(field) => has_unknown_fields(v, Some(field), false),
                    None => !keep_unknown,
                }
            })
        }
        Value::Array(items) => {
            let item_schema = s.and_then(|s| s.items.as_deref());
            if keep_unknown {
                item_schema.is_some()
                    && items
                        .iter()
                        .any(|v| drops_fields(v, item_schema, false, true))
            } else {
                items
                    .iter()
                    .any(|v| has_unknown_fields(v, item_schema, false))
            }
        }
        _ => false,
    }
}

/// A node a rule's `fieldPath` can walk through.
pub(crate) trait PathNode {
    fn has_properties(&self) -> bool;
    fn property(&self, name: &str) -> Option<&Self>;
    /// `Some(None)`: `additionalProperties: true`, without a schema.
    fn additional(&self) -> Option<Option<&Self>>;
}

impl PathNode for Props {
    fn has_properties(&self) -> bool {
        !self.properties.is_empty()
    }
    fn property(&self, name: &str) -> Option<&Self> {
        self.properties.get(name)
    }
    fn additional(&self) -> Option<Option<&Self>> {
        match &self.additional_properties {
            Some(Additional::Schema(s)) => Some(Some(s)),
            Some(Additional::Allows(_)) => Some(None),
            None => None,
        }
    }
}

impl PathNode for Schema {
    fn has_properties(&self) -> bool {
        !self.properties.is_empty()
    }
    fn property(&self, name: &str) -> Option<&Self> {
        self.properties.get(name)
    }
    fn additional(&self) -> Option<Option<&Self>> {
        self.additional_properties.as_deref().map(Some)
    }
}

/// Resolve a rule's `fieldPath` (`.spec.replicas`, `['a.b']`) against the
/// rule's node: the field path it names (`spec.replicas`, `[a.b]` for a
/// map key), or why it names none.
pub(crate) fn resolve_field_path<N: PathNode>(path: &str, node: &N) -> Result<String, String> {
    let tokens = field_path_tokens(path);
    let mut tokens = tokens.iter().map(String::as_str);
    let mut out = String::new();
    let mut node = Some(node);
    while let Some(token) = tokens.next() {
        let name = match token {
            "[" => {
                let quoted = tokens.next().ok_or("unexpected end of JSON path")?;
                if quoted.len() < 2 || !quoted.starts_with('\'') || !quoted.ends_with('\'') {
                    return Err(format!("expected single quoted string but got {quoted}"));
                }
                let name = unescape_single_quoted(&quoted[1..quoted.len() - 1])?;
                match tokens.next() {
                    Some("]") => {}
                    Some(other) => return Err(format!("expected ] but got {other}")),
                    None => return Err("unexpected end of JSON path".into()),
                }
                name
            }
            "." => tokens
                .next()
                .ok_or("unexpected end of JSON path")?
                .to_owned(),
            other => return Err(format!("expected [ or . but got: {other}")),
        };
        let current = node.ok_or("does not refer to a valid field")?;
        if current.has_properties() {
            node = Some(
                current
                    .property(&name)
                    .ok_or("does not refer to a valid field")?,
            );
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&name);
        } else if let Some(additional) = current.additional() {
            node = additional;
            out.push_str(&format!("[{name}]"));
        } else {
            return Err("does not refer to a valid field".into());
        }
    }
    Ok(out)
}

/// Split a field path into `.`, `[`, `]` and the names between them; a
/// token that starts with `'` runs to the next unescaped `'`.
fn field_path_tokens(path: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        let len = if rest.starts_with('\'') {
            let bytes = rest.as_bytes();
            (1..bytes.len())
                .find(|&i| bytes[i] == b'\'' && bytes[i - 1] != b'\\')
                .map_or(rest.len(), |i| i + 1)
        } else {
            match rest.find(['.', '[', ']']) {
                Some(0) => 1,
                Some(i) => i,
                None => rest.len(),
            }
        };
        tokens.push(rest[..len].to_owned());
        rest = &rest[len..];
    }
    tokens
}

fn unescape_single_quoted(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let escaped = match chars.next() {
            Some('a') => '\u{7}',
            Some('b') => '\u{8}',
            Some('f') => '\u{c}',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('v') => '\u{b}',
            Some('\'') => '\'',
            Some('\\') => '\\',
            Some(other) => {
                return Err(format!(
                    "invalid string literal: invalid escape char \\{other}"
                ))
            }
            None => {
                out.push('\\');
                break;
            }
        };
        out.push(escaped);
    }
    Ok(out)
}

/// Compile a schema `pattern` with Go's (RE2) meaning.
///
/// Rust's `regex` follows RE2 closely; where they differ the pattern is
/// rewritten: `\d`, `\w`, `\s` and `\b` are ASCII-only in RE2 (Unicode in
/// `regex`), `\Q...\E` quotes literally, a `[` inside a class and `&&`, `--`
/// and `~~` there are literal, a `{` that starts no repetition is literal,
/// octal escapes are allowed, and repetition counts above 1000 are refused.
pub(crate) fn compile_pattern(source: &str) -> Result<Pattern, String> {
    let translated = translate_go_regex(source)?;
    regex::RegexBuilder::new(&translated)
        .octal(true)
        .build()
        .map(|regex| Pattern {
            source: source.to_owned(),
            regex,
        })
        .map_err(|e| {
            let text = e.to_string();
            let last = text.lines().last().unwrap_or_default();
            format!(
                "error parsing regexp: {}",
                last.trim().trim_start_matches("error: ")
            )
        })
}

fn translate_go_regex(source: &str) -> Result<String, String> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len() + 8);
    let mut in_class = false;
    let mut class_start = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at_class_start = std::mem::take(&mut class_start);
        match c {
            '\\' if i + 1 < chars.len() => {
                let e = chars[i + 1];
                i += 2;
                match e {
                    'd' | 'D' | 'w' | 'W' | 's' | 'S' => {
                        let set = match e.to_ascii_lowercase() {
                            'd' => "0-9",
                            'w' => "0-9A-Za-z_",
                            _ => r"\t\n\f\r ",
                        };
                        match (e.is_ascii_lowercase(), in_class) {
                            (true, true) => out.push_str(set),
                            (true, false) => out.push_str(&format!("[{set}]")),
                            (false, _) => out.push_str(&format!("[^{set}]")),
                        }
                    }
                    'b' | 'B' if !in_class => out.push_str(&format!("(?-u:\\{e})")),
                    'Q' => {
                        let mut literal = String::new();
                        while i < chars.len()
                            && !(chars[i] == '\\' && chars.get(i + 1) == Some(&'E'))
                        {
                            literal.push(chars[i]);
                            i += 1;
                        }
                        i = (i + 2).min(chars.len());
                        out.push_str(&regex::escape(&literal));
                    }
                    'p' | 'P' | 'x' if chars.get(i) == Some(&'{') => {
                        out.push('\\');
                        out.push(e);
                        while i < chars.len() {
                            out.push(chars[i]);
                            i += 1;
                            if chars[i - 1] == '}' {
                                break;
                            }
                        }
                    }
                    _ => {
                        out.push('\\');
                        out.push(e);
                    }
                }
                continue;
            }
            '[' if in_class => {
                if chars.get(i + 1) == Some(&':') {
                    // A POSIX class such as [:alpha:].
                    let end = (i + 2..chars.len().saturating_sub(1))
                        .find(|&j| chars[j] == ':' && chars[j + 1] == ']')
                        .map_or(chars.len(), |j| j + 2);
                    out.extend(&chars[i..end]);
                    i = end;
                    continue;
                }
                out.push_str(r"\[");
            }
            '[' => {
                in_class = true;
                out.push('[');
                if chars.get(i + 1) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                class_start = true;
            }
            ']' if in_class && at_class_start => out.push_str(r"\]"),
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            '-' if in_class && out.ends_with('-') && !out.ends_with("\\-") => out.push_str(r"\-"),
            '{' if !in_class => match repetition(&chars[i..]) {
                Some((len, counts)) => {
                    if counts.iter().any(|&n| n > 1000) {
                        let text: String = chars[i..i + len].iter().collect();
                        return Err(format!(
                            "error parsing regexp: invalid repeat count: `{text}`"
                        ));
                    }
                    out.extend(&chars[i..i + len]);
                    i += len;
                    continue;
                }
                None => out.push_str(r"\{"),
            },
            '}' if !in_class => out.push_str(r"\}"),
            _ => out.push(c),
        }
        i += 1;
    }
    Ok(out)
}

/// `{n}`, `{n,}` or `{n,m}` at the start of `chars`: its length and counts.
fn repetition(chars: &[char]) -> Option<(usize, Vec<u64>)> {
    let end = chars.iter().position(|&c| c == '}')?;
    let inner: String = chars[1..end].iter().collect();
    let (low, high) = match inner.split_once(',') {
        Some((low, high)) => (low, Some(high)),
        None => (inner.as_str(), None),
    };
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            Some(s.parse().unwrap_or(u64::MAX))
        }
    };
    let mut counts = vec![number(low)?];
    match high {
        Some("") | None => {}
        Some(high) => counts.push(number(high)?),
    }
    Some((end + 1, counts))
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    const P: &str = "spec.versions[0].schema.openAPIV3Schema";

    /// The causes of refusing `schema`, rendered as kube-apiserver renders them.
    fn refusals(schema: Value) -> Vec<String> {
        match Schema::parse(&schema, P) {
            Ok(_) => Vec::new(),
            Err(causes) => causes.iter().map(Cause::render).collect(),
        }
    }

    fn parses(schema: Value) -> Schema {
        Schema::parse(&schema, P).unwrap_or_else(|causes| panic!("refused: {causes:#?}"))
    }

    fn object(properties: Value) -> Value {
        json!({"type": "object", "properties": properties})
    }

    /// A CronTab-like schema: nested objects, a map list, an int-or-string,
    /// an embedded resource, defaults, enums, patterns and formats.
    pub(crate) fn crontab() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["cronSpec"],
                    "properties": {
                        "cronSpec": {"type": "string", "pattern": "^(\\d+|\\*)(/\\d+)?(\\s+(\\d+|\\*)(/\\d+)?){4}$"},
                        "image": {"type": "string", "maxLength": 64},
                        "replicas": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 10, "default": 1},
                        "color": {"type": "string", "enum": ["red", "green"]},
                        "maxSurge": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                        "startAt": {"type": "string", "format": "date-time"},
                        "ports": {
                            "type": "array",
                            "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["containerPort", "protocol"],
                            "items": {
                                "type": "object",
                                "required": ["containerPort"],
                                "properties": {
                                    "containerPort": {"type": "integer"},
                                    "protocol": {"type": "string", "default": "TCP"},
                                    "name": {"type": "string"}
                                }
                            }
                        },
                        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "template": {
                            "type": "object",
                            "x-kubernetes-embedded-resource": true,
                            "x-kubernetes-preserve-unknown-fields": true
                        },
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                },
                "status": {
                    "type": "object",
                    "properties": {"replicas": {"type": "integer"}}
                }
            }
        })
    }

    #[test]
    fn crontab_parses_into_its_structure() {
        let s = parses(crontab());
        assert_eq!(s.type_, Some(SchemaType::Object));
        let spec = &s.properties["spec"];
        assert_eq!(spec.required, vec!["cronSpec"]);
        let replicas = &spec.properties["replicas"];
        assert_eq!(replicas.type_, Some(SchemaType::Integer));
        assert_eq!(replicas.format.as_deref(), Some("int32"));
        assert_eq!(replicas.maximum, Some(10.0));
        assert_eq!(replicas.default, Some(json!(1)));
        assert_eq!(
            spec.properties["color"].enum_values,
            vec![json!("red"), json!("green")]
        );
        let surge = &spec.properties["maxSurge"];
        assert!(surge.int_or_string);
        assert_eq!(surge.type_, None);
        assert_eq!(surge.any_of[0].type_, Some(SchemaType::Integer));
        let ports = &spec.properties["ports"];
        assert_eq!(
            ports.list_type,
            Some(ListType::Map {
                keys: vec!["containerPort".into(), "protocol".into()]
            })
        );
        assert_eq!(spec.properties["tags"].list_type, Some(ListType::Set));
        assert_eq!(
            spec.properties["labels"]
                .additional_properties
                .as_ref()
                .and_then(|a| a.type_),
            Some(SchemaType::String)
        );
        let template = &spec.properties["template"];
        assert!(template.embedded_resource && template.preserve_unknown_fields);
        let pattern = spec.properties["cronSpec"].pattern.as_ref().unwrap();
        assert!(pattern.regex.is_match("*/5 * * * *"));
        assert!(!pattern.regex.is_match("five"));
    }

    #[test]
    fn every_node_needs_a_type() {
        let schema = json!({
            "properties": {
                "a": {},
                "b": {"type": "array", "items": {}},
                "c": {"type": "object", "additionalProperties": {}},
                "d": {"x-kubernetes-int-or-string": true},
                "e": {"x-kubernetes-preserve-unknown-fields": true}
            }
        });
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[a].type: Required value: must not be empty for specified object fields"),
                format!("{P}.properties[b].items.type: Required value: must not be empty for specified array items"),
                format!("{P}.properties[c].additionalProperties.type: Required value: must not be empty for specified object fields"),
                format!("{P}.type: Required value: must not be empty at the root"),
            ]
        );
    }

    #[test]
    fn the_root_is_an_object() {
        assert_eq!(
            refusals(json!({"type": "integer"})),
            vec![format!(
                "{P}.type: Invalid value: \"integer\": must be object at the root"
            )]
        );
        assert_eq!(
            refusals(json!({"type": "object", "nullable": true})),
            vec![format!(
                "{P}.nullable: Forbidden: nullable cannot be true at the root"
            )]
        );
    }

    #[test]
    fn unknown_types_and_null() {
        assert_eq!(
            refusals(object(json!({"a": {"type": "int"}, "b": {"type": "null"}}))),
            vec![
                format!("{P}.properties[a].type: Unsupported value: \"int\": supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\""),
                format!("{P}.properties[b].type: Unsupported value: \"null\": supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\""),
                format!("{P}.properties[b].type: Forbidden: type cannot be set to null, use nullable as an alternative"),
            ]
        );
    }

    #[test]
    fn properties_and_additional_properties_exclude_each_other() {
        let schema = object(json!({
            "m": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
            "f": {"type": "object", "additionalProperties": false},
            "t": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": true}
        }));
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[f].additionalProperties: Forbidden: additionalProperties cannot be set to false"),
                format!("{P}.properties[m].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"),
            ]
        );
        assert_eq!(
            refusals(json!({"type": "object", "additionalProperties": {"type": "string"}})),
            vec![format!(
                "{P}.additionalProperties: Forbidden: must not be used at the root"
            )]
        );
        // `true` next to properties is allowed: a schema that constrains nothing.
        let s = parses(object(json!({
            "t": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": true}
        })));
        assert!(s.properties["t"].additional_properties.is_some());
    }

    #[test]
    fn junctors_may_not_declare_structure() {
        let schema = json!({
            "type": "object",
            "properties": {"foo": {"type": "string"}},
            "anyOf": [{"type": "object", "description": "d", "title": "t", "nullable": true, "default": {}, "additionalProperties": {}}],
            "allOf": [{"properties": {"foo": {"x-kubernetes-int-or-string": true, "x-kubernetes-list-type": "atomic"}}}],
            "not": {"properties": {"metadata": {}}, "x-kubernetes-validations": [{"rule": "true"}]}
        });
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.allOf[0].properties[foo].x-kubernetes-int-or-string: Forbidden: must be false to be structural"),
                format!("{P}.allOf[0].properties[foo].x-kubernetes-list-type: Forbidden: must be undefined to be structural"),
                format!("{P}.anyOf[0].additionalProperties: Forbidden: must be undefined to be structural"),
                format!("{P}.anyOf[0].default: Forbidden: must be undefined to be structural"),
                format!("{P}.anyOf[0].description: Forbidden: must be empty to be structural"),
                format!("{P}.anyOf[0].nullable: Forbidden: must be false to be structural"),
                format!("{P}.anyOf[0].title: Forbidden: must be empty to be structural"),
                format!("{P}.anyOf[0].type: Forbidden: must be empty to be structural"),
                format!("{P}.not.properties[metadata]: Forbidden: must not be specified in a nested context"),
                format!("{P}.not.x-kubernetes-validations: Forbidden: must be empty to be structural"),
                format!("{P}.properties[metadata]: Required value: because it is defined in {P}.not.properties[metadata]"),
                // Checked in junctors too, after the structural errors.
                format!("{P}.allOf[0].properties[foo].type: Required value: must be array if x-kubernetes-list-type is specified"),
            ]
        );
    }

    #[test]
    fn junctors_only_constrain_specified_fields() {
        let schema = json!({
            "type": "object",
            "properties": {"a": {"type": "string"}, "l": {"type": "array", "items": {"type": "string"}}},
            "oneOf": [{"required": ["a"]}, {"properties": {"b": {"minLength": 1}}}],
            "not": {"properties": {"a": {"items": {}}, "l": {"items": {"maxLength": 3}}}}
        });
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[a].items: Required value: because it is defined in {P}.not.properties[a].items"),
                format!("{P}.properties[b]: Required value: because it is defined in {P}.oneOf[1].properties[b]"),
            ]
        );
    }

    #[test]
    fn int_or_string_patterns() {
        let s = parses(object(json!({
            "a": {"x-kubernetes-int-or-string": true},
            "b": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "c": {"x-kubernetes-int-or-string": true, "allOf": [{"anyOf": [{"type": "integer"}, {"type": "string"}]}, {"pattern": "^[0-9]+%?$"}]}
        })));
        assert_eq!(s.properties["c"].all_of.len(), 2);
        assert_eq!(
            refusals(object(json!({
                "a": {"x-kubernetes-int-or-string": true, "x-kubernetes-preserve-unknown-fields": true},
                "b": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}
            }))),
            vec![
                format!("{P}.properties[a].x-kubernetes-preserve-unknown-fields: Invalid value: true: must be false if x-kubernetes-int-or-string is true"),
                format!("{P}.properties[b].anyOf[0].type: Forbidden: must be empty to be structural"),
                format!("{P}.properties[b].anyOf[1].type: Forbidden: must be empty to be structural"),
            ]
        );
    }

    #[test]
    fn root_metadata_only_constrains_names() {
        assert!(Schema::parse(
            &object(json!({"metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}}})),
            P
        )
        .is_ok());
        assert_eq!(
            refusals(object(json!({"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}}))),
            vec![format!("{P}.properties[metadata]: Forbidden: must not specify anything other than name and generateName, but metadata is implicitly specified")]
        );
        assert_eq!(
            refusals(object(
                json!({"metadata": {"type": "string"}, "kind": {"type": "integer"}})
            )),
            vec![
                format!("{P}.properties[kind].type: Invalid value: \"integer\": must be string"),
                format!("{P}.properties[metadata].type: Invalid value: \"string\": must be object"),
            ]
        );
        assert_eq!(
            refusals(object(json!({"metadata": {"type": "object", "properties": {"name": {"type": "string", "default": "x"}}}}))),
            vec![format!("{P}.properties[metadata].properties[name].default: Forbidden: must not be set in top-level metadata")]
        );
    }

    #[test]
    fn unsupported_keywords() {
        assert_eq!(
            refusals(object(json!({
                "a": {"$ref": "#/definitions/x"},
                "b": {"type": "array", "uniqueItems": true, "items": {"type": "string"}},
                "c": {"type": "array", "items": [{"type": "string"}]},
                "d": {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
                "e": {"type": "string", "id": "e"}
            }))),
            vec![
                format!("{P}.properties[a].$ref: Forbidden: $ref is not supported"),
                format!("{P}.properties[b].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic"),
                format!("{P}.properties[c].items: Forbidden: items must be a schema object and not an array"),
                format!("{P}.properties[d].patternProperties: Forbidden: patternProperties is not supported"),
                format!("{P}.properties[e].id: Forbidden: id is not supported"),
            ]
        );
        // `$schema` only stops the structural conversion.
        assert_eq!(
            refusals(
                json!({"type": "object", "$schema": "http://json-schema.org/draft-04/schema#"})
            ),
            vec![format!(
                "{P}: Invalid value: \"\": OpenAPIV3Schema 'schema' is not supported"
            )]
        );
        assert_eq!(
            refusals(object(json!({"a": {"type": "string", "x-kubernetes-preserve-unknown-fields": false}}))),
            vec![format!("{P}.properties[a].x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined")]
        );
    }

    #[test]
    fn unknown_keywords_are_ignored() {
        let s = parses(
            json!({"type": "object", "x-custom": 1, "$comment": "c", "examples": [1],
            "properties": {"a": {"type": "string", "example": "x", "externalDocs": {"url": "u"}, "deprecated": true}}}),
        );
        assert_eq!(s.properties["a"].type_, Some(SchemaType::String));
    }

    #[test]
    fn list_and_map_types() {
        let schema = object(json!({
            "a": {"type": "object", "x-kubernetes-list-type": "set"},
            "b": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "bag"},
            "c": {"type": "array", "items": {"type": "object"}, "x-kubernetes-list-map-keys": ["k"]},
            "d": {"type": "string", "x-kubernetes-map-type": "atomic"},
            "e": {"type": "object", "x-kubernetes-map-type": "tree"},
            "f": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
            "g": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string", "nullable": true}}
        }));
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[a].type: Invalid value: \"object\": must be array if x-kubernetes-list-type is specified"),
                format!("{P}.properties[b].x-kubernetes-list-type: Unsupported value: \"bag\": supported values: \"atomic\", \"set\", \"map\""),
                format!("{P}.properties[c].x-kubernetes-list-type: Required value: must be map if x-kubernetes-list-map-keys is non-empty"),
                format!("{P}.properties[d].type: Invalid value: \"string\": must be object if x-kubernetes-map-type is specified"),
                format!("{P}.properties[e].x-kubernetes-map-type: Unsupported value: \"tree\": supported values: \"atomic\", \"granular\""),
                format!("{P}.properties[f].items.x-kubernetes-map-type: Invalid value: null: must be atomic as item of a list with x-kubernetes-list-type=set"),
                format!("{P}.properties[g].items.nullable: Forbidden: cannot be nullable when x-kubernetes-list-type is set"),
            ]
        );
    }

    #[test]
    fn map_list_keys() {
        let schema = object(json!({
            "l": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name", "sub", "missing", "name"],
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "nullable": true},
                        "sub": {"type": "object"}
                    }
                }
            },
            "m": {"type": "array", "x-kubernetes-list-type": "map"}
        }));
        let key_default = "Required value: this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property";
        let key_nullable =
            "Forbidden: this property is in x-kubernetes-list-map-keys, so it cannot be nullable";
        let keys = r#"["name","sub","missing","name"]"#;
        let l = format!("{P}.properties[l]");
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[m].items: Required value: must be specified"),
                format!("{l}.items.properties[sub].type: Invalid value: \"object\": must be a scalar type if parent array's x-kubernetes-list-type is map"),
                format!("{l}.x-kubernetes-list-map-keys: Invalid value: {keys}: entries must all be names of item properties"),
                format!("{l}.x-kubernetes-list-map-keys: Invalid value: {keys}: must not contain duplicate entries"),
                // Each listed key is checked, the duplicate twice (as kube does).
                format!("{l}.items.properties[name].default: {key_default}"),
                format!("{l}.items.properties[name].nullable: {key_nullable}"),
                format!("{l}.items.properties[sub].default: {key_default}"),
                format!("{l}.items.properties[name].default: {key_default}"),
                format!("{l}.items.properties[name].nullable: {key_nullable}"),
                format!("{P}.properties[m].x-kubernetes-list-map-keys: Required value: must not be empty if x-kubernetes-list-type is map"),
                format!("{P}.properties[m].items: Required value: must have a schema if x-kubernetes-list-type is map"),
            ]
        );
    }

    #[test]
    fn embedded_resources() {
        assert_eq!(
            refusals(object(json!({
                "a": {"x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true},
                "b": {"type": "object", "x-kubernetes-embedded-resource": true},
                "c": {"type": "array", "x-kubernetes-embedded-resource": true, "items": {"type": "string"}, "properties": {"x": {"type": "string"}}}
            }))),
            vec![
                format!("{P}.properties[a].type: Required value: must be object if x-kubernetes-embedded-resource is true"),
                format!("{P}.properties[b].properties: Required value: must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields"),
                format!("{P}.properties[c].type: Invalid value: \"array\": must be object if x-kubernetes-embedded-resource is true"),
            ]
        );
        assert_eq!(
            refusals(object(json!({
                "r": {"type": "object", "x-kubernetes-embedded-resource": true, "properties": {
                    "metadata": {"type": "object", "properties": {"m": {"type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true}}}
                }}
            }))),
            vec![format!("{P}.properties[r].properties[metadata].properties[m].x-kubernetes-embedded-resource: Forbidden: must not be used inside of resource meta")]
        );
    }

    #[test]
    fn defaults_must_validate_and_carry_no_unknown_fields() {
        let schema = object(json!({
            "replicas": {"type": "integer", "maximum": 5, "default": 7},
            "name": {"type": "string", "default": 3},
            "spec": {"type": "object", "properties": {"a": {"type": "string"}}, "default": {"a": "x", "b": "y"}},
            "res": {"type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true, "default": {"kind": "Pod"}}
        }));
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[name].default: Invalid value: \"integer\":  in body must be of type string: \"integer\""),
                format!("{P}.properties[replicas].default: Invalid value: 7:  in body should be less than or equal to 5"),
                format!("{P}.properties[res].default.apiVersion: Required value"),
                format!("{P}.properties[spec].default: Invalid value: {{\"a\":\"x\",\"b\":\"y\"}}: must not have unknown fields"),
            ]
        );
    }

    #[test]
    fn patterns_are_re2() {
        assert_eq!(
            refusals(object(json!({"a": {"type": "string", "pattern": "+"}, "b": {"type": "string", "pattern": "(?=x)"}, "c": {"type": "string", "pattern": "a{1001}"}}))),
            vec![
                format!("{P}.properties[a].pattern: Invalid value: \"+\": must be a valid regular expression, but isn't: error parsing regexp: repetition operator missing expression"),
                format!("{P}.properties[b].pattern: Invalid value: \"(?=x)\": must be a valid regular expression, but isn't: error parsing regexp: look-around, including look-ahead and look-behind, is not supported"),
                format!("{P}.properties[c].pattern: Invalid value: \"a{{1001}}\": must be a valid regular expression, but isn't: error parsing regexp: invalid repeat count: `{{1001}}`"),
            ]
        );
        let matches =
            |pattern: &str, text: &str| compile_pattern(pattern).unwrap().regex.is_match(text);
        // \d, \w, \s and \b are ASCII in RE2.
        assert!(matches(r"^\d+$", "42") && !matches(r"^\d+$", "٤٢"));
        assert!(!matches(r"^\w+$", "é") && matches(r"^\W$", "é"));
        assert!(matches(r"^[\d-]+$", "1-2") && !matches(r"^\s$", "\u{a0}"));
        // `[` in a class, `&&`, and a `{` that starts no repetition are literal.
        assert!(matches(r"^[[a]+$", "[a[") && matches(r"^[a&&b]+$", "&ab"));
        assert!(matches(r"^{x}$", "{x}") && matches(r"^a{2}$", "aa"));
        assert!(matches(r"^\Qa.b\E$", "a.b") && !matches(r"^\Qa.b\E$", "axb"));
        assert!(matches(r"^[[:alpha:]]+$", "ab") && matches(r"^\101$", "A"));
    }

    #[test]
    fn validation_rules_are_checked_before_compiling() {
        let rules = json!([
            {"rule": "  "},
            {"rule": "self.a > 0", "message": "  "},
            {"rule": "self.a > 0", "message": "two\nlines"},
            {"rule": "self.a >\n0"},
            {"rule": "self.a > 0", "messageExpression": " ", "reason": "FieldValueTooLong"},
            {"rule": "self.a > 0", "fieldPath": ".b"},
            {"rule": "self.a > 0", "fieldPath": ".a"}
        ]);
        let schema = object(
            json!({"s": {"type": "object", "properties": {"a": {"type": "integer"}}, "x-kubernetes-validations": rules}}),
        );
        let at = format!("{P}.properties[s].x-kubernetes-validations");
        assert_eq!(
            refusals(schema),
            vec![
                format!("{at}[0].rule: Required value: rule is not specified"),
                format!("{at}[1].message: Invalid value: \"  \": must be non-empty if specified"),
                format!("{at}[2].message: Invalid value: \"two\\nlines\": must not contain line breaks"),
                format!("{at}[3].message: Required value: message must be specified if rule contains line breaks"),
                format!("{at}[4].messageExpression: Required value: messageExpression must be non-empty if specified"),
                format!("{at}[4].reason: Unsupported value: \"FieldValueTooLong\": supported values: \"FieldValueDuplicate\", \"FieldValueForbidden\", \"FieldValueInvalid\", \"FieldValueRequired\""),
                format!("{at}[5].fieldPath: Invalid value: \".b\": must be a valid path"),
            ]
        );
    }

    #[test]
    fn rules_that_do_not_compile_are_refused() {
        let schema = object(
            json!({"s": {"type": "object", "x-kubernetes-validations": [{"rule": "self.a >", "message": "m"}]}}),
        );
        let causes = Schema::parse(&schema, P).unwrap_err();
        assert_eq!(causes.len(), 1);
        assert_eq!(
            causes[0].field,
            format!("{P}.properties[s].x-kubernetes-validations[0].rule")
        );
        assert_eq!(causes[0].reason, "FieldValueInvalid");
        let prefix = r#"Invalid value: {"Rule":"self.a >","Message":"m","MessageExpression":"","Reason":null,"FieldPath":"","OptionalOldSelf":null}: compilation failed: "#;
        assert!(
            causes[0].message.starts_with(prefix),
            "{}",
            causes[0].message
        );
    }

    #[test]
    fn transition_rules_need_correlatable_nodes() {
        let schema = object(json!({
            "l": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.a >= oldSelf.a"}]}},
            "s": {"type": "object", "properties": {"a": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.a > 0", "optionalOldSelf": true}]}
        }));
        assert_eq!(
            refusals(schema),
            vec![
                format!("{P}.properties[l].items.x-kubernetes-validations[0].rule: Invalid value: \"self.a >= oldSelf.a\": oldSelf cannot be used on the uncorrelatable portion of the schema within {P}.properties[l]"),
                format!("{P}.properties[s].x-kubernetes-validations[0].optionalOldSelf: Invalid value: true: may not be set if oldSelf is not used in rule"),
            ]
        );
        let s = parses(object(
            json!({"s": {"type": "object", "properties": {"a": {"type": "integer"}},
            "x-kubernetes-validations": [{"rule": "self.a > 0", "fieldPath": ".a", "reason": "FieldValueForbidden"}]}}),
        ));
        let rule = &s.properties["s"].validations[0];
        assert_eq!(rule.field_path.as_deref(), Some(".a"));
        assert_eq!(rule.reason.as_deref(), Some("FieldValueForbidden"));
    }

    #[test]
    fn field_paths_resolve_like_kube() {
        let s = parses(object(json!({
            "spec": {"type": "object", "properties": {
                "a.b": {"type": "string"},
                "m": {"type": "object", "additionalProperties": {"type": "object", "properties": {"x": {"type": "string"}}}}
            }}
        })));
        assert_eq!(
            resolve_field_path(".spec['a.b']", &s),
            Ok("spec.a.b".into())
        );
        assert_eq!(
            resolve_field_path(".spec.m['k.1'].x", &s),
            Ok("spec.m[k.1].x".into())
        );
        assert_eq!(
            resolve_field_path(".spec.nope", &s),
            Err("does not refer to a valid field".into())
        );
        assert_eq!(
            resolve_field_path("spec", &s),
            Err("expected [ or . but got: spec".into())
        );
        assert_eq!(
            resolve_field_path(".spec[a]", &s),
            Err("expected single quoted string but got a".into())
        );
    }

    #[test]
    fn keywords_of_the_wrong_json_type() {
        assert_eq!(
            refusals(json!({"type": "object", "properties": {"a": {"type": 5, "maxLength": 1.5, "required": "x"}}, "items": true})),
            vec![
                format!("{P}.properties[a].type: Invalid value: \"integer\": must be of type string"),
                format!("{P}.properties[a].maxLength: Invalid value: \"number\": must be of type integer"),
                format!("{P}.properties[a].required: Invalid value: \"string\": must be of type array"),
                format!("{P}.items: Invalid value: \"boolean\": must be of type object"),
            ]
        );
        assert_eq!(
            refusals(json!("object")),
            vec![format!(
                "{P}: Invalid value: \"string\": must be of type object"
            )]
        );
    }

    /// `json!` would serialize (recursively) a value it is given: build the
    /// nesting by hand.
    pub(crate) fn nested(depth: usize, wrap: impl Fn(Value) -> Value) -> Value {
        (0..depth).fold(json!({"type": "string"}), |inner, _| wrap(inner))
    }

    /// Take a deep value apart from the inside out; dropping it whole would
    /// recurse once per level.
    pub(crate) fn dismantle(mut value: Value) {
        let mut stack = Vec::new();
        loop {
            match &mut value {
                Value::Object(map) => stack.extend(std::mem::take(map).into_iter().map(|(_, v)| v)),
                Value::Array(items) => stack.append(items),
                _ => {}
            }
            match stack.pop() {
                Some(next) => value = next,
                None => break,
            }
        }
    }

    #[test]
    fn deep_schemas_are_refused_without_overflowing() {
        let schema = nested(5_000, |inner| {
            let mut properties = serde_json::Map::new();
            properties.insert("a".into(), inner);
            let mut node = serde_json::Map::new();
            node.insert("type".into(), json!("object"));
            node.insert("properties".into(), Value::Object(properties));
            Value::Object(node)
        });
        let causes = Schema::parse(&schema, P).unwrap_err();
        assert_eq!(causes.len(), 1);
        assert!(causes[0]
            .message
            .ends_with("must not be nested more than 64 levels deep"));
        assert_eq!(causes[0].field.matches("properties[a]").count(), MAX_DEPTH);
        dismantle(schema);
    }
}
