//! Custom objects checked against their version's structural schema, as
//! kube-apiserver checks them after pruning and defaulting:
//!
//! 1. the OpenAPI value validations (kube-openapi's validator: types,
//!    formats, bounds, lengths, `pattern`, `enum`, `required`, the junctors),
//!    with kube's messages such as `spec.replicas: Invalid value: "string":
//!    spec.replicas in body must be of type integer: "string"`;
//! 2. embedded resources (`x-kubernetes-embedded-resource`): `apiVersion`,
//!    `kind` and their object metadata;
//! 3. `x-kubernetes-list-type` `set` and `map` uniqueness;
//! 4. `x-kubernetes-validations` CEL rules, unless an error above already
//!    makes the object unusable for them.
//!
//! On updates, validation ratchets as in Kubernetes 1.33: errors of a value
//! that equals its correlated old value (matched through object fields, map
//! values and `map` list items by key) are dropped, so objects stored under
//! an older schema can still be updated elsewhere; list uniqueness is only
//! enforced when the old object already satisfied it. Transition rules see
//! the correlated old value as `oldSelf`.
//!
//! Errors kube-openapi reports without a field (junctors, numeric format
//! ranges) are shown, as kube-apiserver shows them, at `<nil>`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Number, Value};
use tapestry_apimachinery::validation::{
    dns1035_label_errors, dns1123_label_errors, label_value_errors, path_segment_errors,
    qualified_name_errors,
};
use tapestry_apimachinery::Cause;

use crate::cel::{Budget, Failure, Input, Stop};
use crate::schema::{json_type, resolve_field_path, ListType, Schema, SchemaType};

/// Check `obj` (a whole custom object, after pruning and defaulting) against `schema`;
/// `old` is the stored object on updates. Causes carry field paths like `spec.replicas`.
pub fn validate(schema: &Schema, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let correlation = old.map(|old| Correlation::root(schema, obj, old));
    let mut causes = OpenApi { root: None }
        .check_ratcheted(schema, obj, "", correlation)
        .causes;
    embedded_walk(schema, obj, "", false, &mut causes);
    if old.is_none_or(|old| list_errors(schema, old).is_empty()) {
        causes.extend(list_errors(schema, obj));
    }
    if has_rules(schema) {
        if causes.iter().any(blocks_rules) {
            causes.push(Cause::invalid(
                "<nil>",
                &Value::Null,
                "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
            ));
        } else {
            let mut cel = Cel::default();
            let ratchet = Ratchet {
                current: correlation,
                parent: None,
            };
            cel.node(schema, obj, old, "", ratchet);
            causes.append(&mut cel.causes);
        }
    }
    causes
}

/// The OpenAPI value validations of `value` against `s`, errors rooted at
/// `field` (a default's path in the CRD).
pub(crate) fn value_errors(s: &Schema, value: &Value, field: &str) -> Vec<Cause> {
    OpenApi { root: Some(field) }
        .check(s, value, "", None)
        .causes
}

/// The embedded-resource checks of `value` against `s`, paths under
/// `field`; `resource_root`: `value` is itself a resource.
pub(crate) fn embedded_errors(
    s: &Schema,
    value: &Value,
    field: &str,
    resource_root: bool,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    embedded_walk(s, value, field, resource_root, &mut causes);
    causes
}

/// The CEL rules of `s` and below for `value` (`old` as `oldSelf`), paths
/// under `field`.
pub(crate) fn rule_errors(
    s: &Schema,
    value: &Value,
    old: Option<&Value>,
    field: &str,
) -> Vec<Cause> {
    let mut cel = Cel::default();
    cel.node(s, value, old, field, Ratchet::default());
    cel.causes
}

/// Errors that leave the object too malformed for CEL rules (kube's
/// "blocking" errors).
fn blocks_rules(cause: &Cause) -> bool {
    matches!(
        cause.reason,
        "FieldValueNotSupported"
            | "FieldValueRequired"
            | "FieldValueTooLong"
            | "FieldValueTooMany"
            | "FieldValueTypeInvalid"
    )
}

fn has_rules(s: &Schema) -> bool {
    !s.validations.is_empty()
        || s.items.as_deref().is_some_and(has_rules)
        || s.additional_properties.as_deref().is_some_and(has_rules)
        || s.properties.values().any(has_rules)
}

/// `parent.name` (`name` at the root), as Kubernetes' field paths join.
fn child_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// A field path, or kube's rendering of the empty one.
fn field_or_nil(path: &str) -> &str {
    if path.is_empty() {
        "<nil>"
    } else {
        path
    }
}

// ---------------------------------------------------------------------------
// Rendering values as Go does

/// Go's `%v` of a float64: shortest digits, exponent form below 1e-4 and
/// from 1e6 on (`1e+06`, `1e-05`).
fn go_float(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        return format!("{f}");
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

/// Go's `%q` of a string.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// kube's `field.Invalid`, with floats shown as Go shows them.
fn invalid(field: impl Into<String>, value: &Value, detail: impl AsRef<str>) -> Cause {
    match value {
        Value::Number(n) if n.is_f64() => Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: {}: {}",
                go_float(n.as_f64().unwrap_or_default()),
                detail.as_ref()
            ),
            field: field.into(),
        },
        _ => Cause::invalid(field, value, detail),
    }
}

/// kube's `field.TooLong` for a `maxLength`, with its singular and its
/// wording for a negative limit.
fn too_long(field: String, max: i64) -> Cause {
    match usize::try_from(max) {
        Ok(max) if max != 1 => Cause::too_long(field, max),
        _ => Cause {
            reason: "FieldValueTooLong",
            message: if max == 1 {
                "Too long: may not be more than 1 byte".into()
            } else {
                "Too long: value is too long".into()
            },
            field,
        },
    }
}

/// kube's `field.TooMany` for `maxItems` and `maxProperties` (both counted
/// in "items").
fn too_many(field: String, actual: usize, max: i64) -> Cause {
    match usize::try_from(max) {
        Ok(max) => Cause::too_many(field, actual, max, if max == 1 { "item" } else { "items" }),
        Err(_) => Cause {
            reason: "FieldValueTooMany",
            message: format!("Too many: {actual}: has too many items"),
            field,
        },
    }
}

// ---------------------------------------------------------------------------
// Ratcheting: old values correlated with new ones

/// A new value and the old value it corresponds to, under their structural
/// schema node (kube's `CorrelatedObject`).
#[derive(Clone, Copy)]
struct Correlation<'a> {
    new: &'a Value,
    old: &'a Value,
    schema: &'a Schema,
    root: bool,
}

impl<'a> Correlation<'a> {
    fn root(schema: &'a Schema, new: &'a Value, old: &'a Value) -> Self {
        Correlation {
            new,
            old,
            schema,
            root: true,
        }
    }

    /// The field `key` of an object; the type metadata of the resource root
    /// is never ratcheted.
    fn key(self, key: &str) -> Option<Self> {
        if self.root && (key == "apiVersion" || key == "kind") {
            return None;
        }
        self.field(key)
    }

    fn field(self, key: &str) -> Option<Self> {
        let (Value::Object(new), Value::Object(old)) = (self.new, self.old) else {
            return None;
        };
        let schema = self
            .schema
            .properties
            .get(key)
            .or(self.schema.additional_properties.as_deref())?;
        Some(Correlation {
            new: new.get(key)?,
            old: old.get(key)?,
            schema,
            root: false,
        })
    }

    /// Item `index` of a list; only `map` lists correlate, by their keys.
    fn index(self, index: usize) -> Option<Self> {
        let (Value::Array(new), Value::Array(old)) = (self.new, self.old) else {
            return None;
        };
        let Some(ListType::Map { keys }) = &self.schema.list_type else {
            return None;
        };
        let new = new.get(index)?;
        Some(Correlation {
            new,
            old: find_by_keys(old, keys, new)?,
            schema: self.schema.items.as_deref()?,
            root: false,
        })
    }

    /// Whether the value is unchanged, comparing correlated parts (so a
    /// reordered `map` list is unchanged) and refusing to compare fields the
    /// schema does not know.
    fn unchanged(self) -> bool {
        match (self.new, self.old) {
            (Value::Array(new), Value::Array(old)) => {
                if new.len() != old.len() {
                    return false;
                }
                if !matches!(self.schema.list_type, Some(ListType::Map { .. })) {
                    return new == old;
                }
                (0..new.len()).all(|i| self.index(i).is_some_and(Correlation::unchanged))
            }
            (Value::Object(new), Value::Object(old)) => {
                new.len() == old.len()
                    && new
                        .keys()
                        .all(|k| self.field(k).is_some_and(Correlation::unchanged))
            }
            (new, old) => new == old,
        }
    }
}

/// The item of a `map` list with the same key values as `item` (all keys
/// present and scalar).
fn find_by_keys<'v>(list: &'v [Value], keys: &[String], item: &Value) -> Option<&'v Value> {
    let key_of = |v: &'v Value| -> Option<Vec<&'v Value>> {
        keys.iter()
            .map(|k| {
                v.get(k)
                    .filter(|k| !k.is_object() && !k.is_array() && !k.is_null())
            })
            .collect()
    };
    let wanted: Vec<Value> = keys
        .iter()
        .map(|k| {
            item.get(k)
                .filter(|k| !k.is_object() && !k.is_array() && !k.is_null())
                .cloned()
        })
        .collect::<Option<_>>()?;
    list.iter()
        .find(|old| key_of(old).is_some_and(|key| key.iter().zip(&wanted).all(|(a, b)| *a == b)))
}

// ---------------------------------------------------------------------------
// OpenAPI value validations (kube-openapi's validator)

/// What one validator found: its errors (each once) and how many checks
/// applied, which picks the "closest" failing branch of `anyOf`/`oneOf`.
#[derive(Default)]
struct Outcome {
    causes: Vec<Cause>,
    matches: usize,
}

impl Outcome {
    fn matched() -> Self {
        Outcome {
            causes: Vec::new(),
            matches: 1,
        }
    }

    fn failed(cause: Cause) -> Self {
        Outcome {
            causes: vec![cause],
            matches: 0,
        }
    }

    fn add(&mut self, cause: Cause) {
        if !self.causes.contains(&cause) {
            self.causes.push(cause);
        }
    }

    fn merge(&mut self, other: Outcome) {
        for cause in other.causes {
            self.add(cause);
        }
        self.matches += other.matches;
    }

    fn is_valid(&self) -> bool {
        self.causes.is_empty()
    }
}

/// A number as Go decodes JSON: an int64 when it is written as one.
#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(n: &Number) -> Num {
        match n.as_i64() {
            Some(i) => Num::Int(i),
            None => Num::Float(n.as_f64().unwrap_or_default()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn value(self) -> Value {
        match self {
            Num::Int(i) => Value::from(i),
            Num::Float(f) => Value::from(f),
        }
    }
}

/// Whether a float is a JSON integer, with swag's tolerance (a relative
/// error under 1e-9 within ±(2^53-1)).
fn is_json_integer(f: f64) -> bool {
    const MAX: f64 = 9_007_199_254_740_991.0;
    if !f.is_finite() || !(-MAX..=MAX).contains(&f) {
        return false;
    }
    let g = f.trunc();
    if f == g {
        return true;
    }
    f > 0.0 && g != 0.0 && (f - g) / (f + g) < 1e-9
}

/// The formats kube-apiserver validates strings against (names with `-`
/// removed, as kube-openapi's registry normalizes them).
const STRING_FORMATS: [&str; 26] = [
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "k8sshortname",
    "k8slongname",
];

/// The format kube-apiserver keeps for a node: numeric formats on numbers,
/// known string formats on strings and untyped nodes; any other is ignored.
fn effective_format<'s>(types: &[&str], format: Option<&'s str>) -> Option<&'s str> {
    let format = format.filter(|f| !f.is_empty())?;
    let single = if types.len() == 1 { types[0] } else { "" };
    let kept = match single {
        "" | "string" => STRING_FORMATS.contains(&format.replace('-', "").as_str()),
        "integer" => format == "int32" || format == "int64",
        "number" => format == "float" || format == "double",
        _ => false,
    };
    kept.then_some(format)
}

struct OpenApi<'r> {
    /// Where errors are rooted: the object itself (`None`) or a default.
    root: Option<&'r str>,
}

impl OpenApi<'_> {
    /// kube-openapi's path of a value (`spec.replicas`, `.key` for a map
    /// key at the root) as a field path.
    fn field(&self, name: &str) -> String {
        let name = name.strip_prefix('.').unwrap_or(name);
        match (self.root, name) {
            (None, "") => "<nil>".into(),
            (Some(root), "") => root.into(),
            (None, name) => name.into(),
            (Some(root), name) => format!("{root}.{name}"),
        }
    }

    /// An error kube-openapi reports without a field.
    fn general(&self, message: String) -> Cause {
        Cause::invalid(self.root.unwrap_or("<nil>"), &Value::from(""), message)
    }

    /// Validate a value whose errors are dropped when it equals its
    /// correlated old value.
    fn check_ratcheted(
        &self,
        s: &Schema,
        v: &Value,
        path: &str,
        correlation: Option<Correlation>,
    ) -> Outcome {
        let mut outcome = self.check(s, v, path, correlation);
        if !outcome.is_valid() && correlation.is_some_and(Correlation::unchanged) {
            outcome.causes.clear();
        }
        outcome
    }

    /// All validators of one node, in kube-openapi's order.
    fn check(
        &self,
        s: &Schema,
        v: &Value,
        path: &str,
        correlation: Option<Correlation>,
    ) -> Outcome {
        let types = s.type_names();
        let format = effective_format(&types, s.format.as_deref());
        let mut out = Outcome::default();
        if v.is_null() {
            out.merge(self.check_type(&types, s.nullable, format, v, path));
            out.merge(self.check_enum(s, v, path));
            return out;
        }
        let run = |out: &mut Outcome, found: Outcome| {
            out.merge(found);
            out.matches += 1;
        };
        if !types.is_empty() || format.is_some() {
            run(
                &mut out,
                self.check_type(&types, s.nullable, format, v, path),
            );
        }
        run(&mut out, self.check_junctors(s, v, path, correlation));
        if let Value::String(text) = v {
            run(&mut out, self.check_string(s, text, path));
            if let Some(format) =
                format.filter(|f| STRING_FORMATS.contains(&f.replace('-', "").as_str()))
            {
                let mut found = Outcome::default();
                if !format_valid(format, text) {
                    found.add(Cause::type_invalid(
                        self.field(path),
                        v,
                        format!(
                            "{path} in body must be of type {format}: {}",
                            go_quote(text)
                        ),
                    ));
                }
                run(&mut out, found);
            }
        }
        if let Value::Number(n) = v {
            run(
                &mut out,
                self.check_number(s, &types, format, Num::of(n), path),
            );
        }
        if let Value::Array(items) = v {
            run(&mut out, self.check_items(s, items, path, correlation));
        }
        run(&mut out, self.check_enum(s, v, path));
        if let Value::Object(map) = v {
            run(&mut out, self.check_object(s, map, path, correlation));
        }
        out.matches += 1;
        out
    }

    fn check_type(
        &self,
        types: &[&str],
        nullable: bool,
        format: Option<&str>,
        v: &Value,
        path: &str,
    ) -> Outcome {
        let fail = |expected: &str, got: &str| {
            Outcome::failed(Cause::type_invalid(
                self.field(path),
                &Value::from(got),
                format!(
                    "{path} in body must be of type {expected}: {}",
                    go_quote(got)
                ),
            ))
        };
        if v.is_null() {
            return if !types.is_empty() && !nullable {
                fail(&types.join(","), "null")
            } else {
                Outcome::matched()
            };
        }
        let (found, found_format) = match v {
            Value::Number(n) if n.as_i64().is_some() => ("integer", "int64"),
            Value::Number(_) => ("number", "float64"),
            other => (json_type(other), ""),
        };
        let has = |t: &str| types.contains(&t);
        let float_is_int =
            found == "number" && has("integer") && v.as_f64().is_some_and(is_json_integer);
        let int_is_number = found == "integer" && has("number");
        let textual = v.is_string() || v.is_array();
        if let Some(format) = format {
            if !(textual || has(found) || found_format == format || float_is_int || int_is_number) {
                return fail(format, found_format);
            }
            if textual && !(has("number") || has("integer")) {
                return Outcome::matched();
            }
        }
        if !(has(found) || float_is_int || int_is_number) {
            return fail(&types.join(","), found);
        }
        Outcome::matched()
    }

    fn check_junctors(
        &self,
        s: &Schema,
        v: &Value,
        path: &str,
        correlation: Option<Correlation>,
    ) -> Outcome {
        let mut main = Outcome::default();
        let quoted = go_quote(path);
        if !s.any_of.is_empty() {
            let mut best: Option<Outcome> = None;
            let mut success = None;
            for branch in &s.any_of {
                let found = self.check(branch, v, path, correlation);
                if found.is_valid() {
                    success = Some(found);
                    best = None;
                    break;
                }
                if best.as_ref().is_none_or(|b| found.matches > b.matches) {
                    best = Some(found);
                }
            }
            if success.is_none() {
                main.add(self.general(format!(
                    "{quoted} must validate at least one schema (anyOf)"
                )));
            }
            if let Some(found) = best.or(success) {
                main.merge(found);
            }
        }
        if !s.one_of.is_empty() {
            let mut best: Option<Outcome> = None;
            let mut success = None;
            let mut valid = 0;
            for branch in &s.one_of {
                let found = self.check(branch, v, path, correlation);
                if found.is_valid() {
                    valid += 1;
                    best = None;
                    success.get_or_insert(found);
                    continue;
                }
                if valid == 0 && best.as_ref().is_none_or(|b| found.matches > b.matches) {
                    best = Some(found);
                }
            }
            if valid == 1 {
                main.merge(success.unwrap_or_default());
            } else {
                let detail = if valid == 0 {
                    "Found none valid".to_owned()
                } else {
                    format!("Found {valid} valid alternatives")
                };
                main.add(self.general(format!(
                    "{quoted} must validate one and only one schema (oneOf). {detail}"
                )));
                if let Some(found) = best {
                    main.merge(found);
                }
            }
        }
        if !s.all_of.is_empty() {
            let mut valid = 0;
            for branch in &s.all_of {
                let found = self.check(branch, v, path, correlation);
                valid += usize::from(found.is_valid());
                main.merge(found);
            }
            if valid != s.all_of.len() {
                let none = if valid == 0 { ". None validated" } else { "" };
                main.add(self.general(format!(
                    "{quoted} must validate all the schemas (allOf){none}"
                )));
            }
        }
        if let Some(not) = &s.not {
            if self.check(not, v, path, correlation).is_valid() {
                main.add(self.general(format!("{quoted} must not validate the schema (not)")));
            }
        }
        main.matches += 1;
        main
    }

    /// Length and pattern; kube-openapi stops at the first failure.
    fn check_string(&self, s: &Schema, text: &str, path: &str) -> Outcome {
        let length = text.chars().count() as i64;
        let value = Value::from(text);
        if let Some(max) = s.max_length.filter(|&max| length > max) {
            return Outcome::failed(too_long(self.field(path), max));
        }
        if let Some(min) = s.min_length.filter(|&min| length < min) {
            return Outcome::failed(invalid(
                self.field(path),
                &value,
                format!("{path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(pattern) = s.pattern.as_ref().filter(|p| !p.regex.is_match(text)) {
            return Outcome::failed(invalid(
                self.field(path),
                &value,
                format!("{path} in body should match '{}'", pattern.source),
            ));
        }
        Outcome::default()
    }

    /// Bounds and `multipleOf`. As kube-openapi does, a bound that fits the
    /// node's integer type is compared as an integer with an integer value
    /// (truncated), otherwise as a float; values and bounds that do not fit
    /// the node's type and format are errors of their own.
    fn check_number(
        &self,
        s: &Schema,
        types: &[&str],
        format: Option<&str>,
        data: Num,
        path: &str,
    ) -> Outcome {
        let numeric =
            (types.len() == 1 && (types[0] == "integer" || types[0] == "number")).then(|| types[0]);
        let format = format.filter(|_| numeric.is_some());
        let range_error = |n: Num, prefix: &str| -> Option<Cause> {
            let ty = numeric?;
            (!fits(n, ty, format)).then(|| {
                self.general(match format {
                    Some(f) => {
                        format!("{prefix} value must be of type {ty} with format {f} in {path}")
                    }
                    None => {
                        format!("{prefix} value must be of type {ty} (default format) in {path}")
                    }
                })
            })
        };
        let field = || self.field(path);
        let mut out = Outcome::matched();
        if let Some(e) = range_error(data, "Checked") {
            out.add(e);
        }

        let mut multiple = Outcome::default();
        if let Some(factor) = s.multiple_of {
            let bound_error = range_error(Num::Float(factor), "MultipleOf");
            let native = bound_error.is_none();
            if let Some(e) = bound_error {
                multiple.add(e);
            }
            let failure = match (native, data) {
                (true, Num::Int(i)) => {
                    let factor = factor as i64;
                    if factor <= 0 {
                        Some(invalid(
                            field(),
                            &Value::from(factor),
                            format!(
                                "factor MultipleOf declared for {path} must be positive: {factor}"
                            ),
                        ))
                    } else {
                        (i % factor != 0).then(|| {
                            invalid(
                                field(),
                                &data.value(),
                                format!("{path} in body should be a multiple of {factor}"),
                            )
                        })
                    }
                }
                _ => {
                    let x = data.as_f64();
                    if factor <= 0.0 {
                        Some(invalid(
                            field(),
                            &Value::from(factor),
                            format!(
                                "factor MultipleOf declared for {path} must be positive: {}",
                                go_float(factor)
                            ),
                        ))
                    } else {
                        let ratio = if factor < 1.0 {
                            1.0 / factor * x
                        } else {
                            x / factor
                        };
                        (!is_json_integer(ratio)).then(|| {
                            invalid(
                                field(),
                                &Value::from(x),
                                format!(
                                    "{path} in body should be a multiple of {}",
                                    go_float(factor)
                                ),
                            )
                        })
                    }
                }
            };
            if let Some(e) = failure {
                multiple.add(e);
            }
        }

        let bound = |limit: Option<f64>, exclusive: bool, prefix: &str, above: bool| -> Outcome {
            let mut found = Outcome::default();
            let Some(limit) = limit else {
                return found;
            };
            let bound_error = range_error(Num::Float(limit), prefix);
            let native = bound_error.is_none();
            if let Some(e) = bound_error {
                found.add(e);
            }
            let (outside, shown) = match (native, data) {
                (true, Num::Int(i)) => {
                    let l = limit as i64;
                    let outside = if above {
                        i > l || (exclusive && i == l)
                    } else {
                        i < l || (exclusive && i == l)
                    };
                    (outside, l.to_string())
                }
                _ => {
                    let x = data.as_f64();
                    let outside = if above {
                        x > limit || (exclusive && x == limit)
                    } else {
                        x < limit || (exclusive && x == limit)
                    };
                    (outside, go_float(limit))
                }
            };
            if outside {
                let relation = match (above, exclusive) {
                    (true, false) => "less than or equal to",
                    (true, true) => "less than",
                    (false, false) => "greater than or equal to",
                    (false, true) => "greater than",
                };
                found.add(invalid(
                    field(),
                    &data.value(),
                    format!("{path} in body should be {relation} {shown}"),
                ));
            }
            found
        };
        let minimum = bound(s.minimum, s.exclusive_minimum, "Minimum boundary", false);
        let maximum = bound(s.maximum, s.exclusive_maximum, "Maximum boundary", true);
        out.merge(multiple);
        out.merge(minimum);
        out.merge(maximum);
        out
    }

    fn check_items(
        &self,
        s: &Schema,
        items: &[Value],
        path: &str,
        correlation: Option<Correlation>,
    ) -> Outcome {
        let mut out = Outcome::default();
        if let Some(item_schema) = &s.items {
            for (i, item) in items.iter().enumerate() {
                let item_correlation = correlation.and_then(|c| c.index(i));
                out.merge(self.check_ratcheted(
                    item_schema,
                    item,
                    &format!("{path}[{i}]"),
                    item_correlation,
                ));
            }
        }
        let size = items.len();
        if let Some(min) = s.min_items.filter(|&min| (size as i64) < min) {
            out.add(invalid(
                self.field(path),
                &Value::from(size),
                format!("{path} in body should have at least {min} items"),
            ));
        }
        if let Some(max) = s.max_items.filter(|&max| (size as i64) > max) {
            out.add(too_many(self.field(path), size, max));
        }
        out
    }

    fn check_enum(&self, s: &Schema, v: &Value, path: &str) -> Outcome {
        if s.enum_values.is_empty() || s.enum_values.iter().any(|e| enum_matches(v, e)) {
            return Outcome::default();
        }
        let allowed: Vec<String> = s
            .enum_values
            .iter()
            .map(|e| {
                let text = match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                // The constructor quotes each value as Go's %q would,
                // without escaping: escape here.
                let quoted = go_quote(&text);
                quoted[1..quoted.len() - 1].to_owned()
            })
            .collect();
        let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
        Outcome::failed(Cause::unsupported(self.field(path), v, &allowed))
    }

    fn check_object(
        &self,
        s: &Schema,
        map: &Map<String, Value>,
        path: &str,
        correlation: Option<Correlation>,
    ) -> Outcome {
        let mut out = Outcome::default();
        let size = map.len();
        if let Some(min) = s.min_properties.filter(|&min| (size as i64) < min) {
            out.add(invalid(
                self.field(path),
                &Value::from(size),
                format!("{path} in body should have at least {min} properties"),
            ));
        }
        if let Some(max) = s.max_properties.filter(|&max| (size as i64) > max) {
            out.add(too_many(self.field(path), size, max));
        }
        if let Some(additional) = &s.additional_properties {
            for (key, value) in map {
                if !s.properties.contains_key(key) {
                    let field_correlation = correlation.and_then(|c| c.key(key));
                    out.merge(self.check_ratcheted(
                        additional,
                        value,
                        &format!("{path}.{key}"),
                        field_correlation,
                    ));
                }
            }
        }
        for (name, field) in &s.properties {
            if let Some(value) = map.get(name) {
                let field_correlation = correlation.and_then(|c| c.key(name));
                out.merge(self.check_ratcheted(
                    field,
                    value,
                    &child_path(path, name),
                    field_correlation,
                ));
            }
        }
        for name in &s.required {
            if !map.contains_key(name) {
                out.add(Cause::required(self.field(&format!("{path}.{name}"))));
            }
        }
        out
    }
}

/// Whether a number fits an integer or number node's format, as
/// kube-openapi checks values and bounds alike.
fn fits(n: Num, ty: &str, format: Option<&str>) -> bool {
    match (ty, n) {
        ("integer", Num::Int(i)) => format != Some("int32") || i32::try_from(i).is_ok(),
        ("integer", Num::Float(f)) => {
            let in_range = if format == Some("int32") {
                (f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&f)
            } else {
                (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f)
            };
            f.fract() == 0.0 && in_range
        }
        ("number", n) if format == Some("float") => (n.as_f64() as f32).is_finite(),
        _ => true,
    }
}

/// kube-openapi's enum match: equal values, numbers compared after Go's
/// conversion to the enum value's type (so 1 matches 1.0, and 1.5 matches
/// 1); null matches nothing.
fn enum_matches(v: &Value, allowed: &Value) -> bool {
    match (v, allowed) {
        (Value::Null, _) => false,
        (Value::Number(a), Value::Number(b)) => match (Num::of(a), Num::of(b)) {
            (Num::Int(a), Num::Int(b)) => a == b,
            (Num::Int(a), Num::Float(b)) => a as f64 == b,
            (Num::Float(a), Num::Int(b)) => a as i64 == b,
            (Num::Float(a), Num::Float(b)) => a == b,
        },
        (a, b) => a == b,
    }
}

// ---------------------------------------------------------------------------
// String formats (kube-openapi's registry)

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| unreachable!("built-in pattern {pattern}: {e}"))
}

static HOSTNAME: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"^([a-zA-Z0-9\p{S}\p{L}]((-?[a-zA-Z0-9\p{S}\p{L}]{0,62})?)|([a-zA-Z0-9\p{S}\p{L}](([-a-zA-Z0-9\p{S}\p{L}]{0,61}[a-zA-Z0-9\p{S}\p{L}])?)(\.)){1,}([a-zA-Z\p{L}]){2,63})$",
    )
});
static UUID: LazyLock<[Regex; 4]> = LazyLock::new(|| {
    [
        r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
        r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?3[0-9a-f]{3}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
        r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$",
        r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?5[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$",
    ]
    .map(regex)
});
static CREDIT_CARD: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"^(?:4[0-9]{12}(?:[0-9]{3})?|5[1-5][0-9]{14}|6(?:011|5[0-9][0-9])[0-9]{12}|3[47][0-9]{13}|3(?:0[0-5]|[68][0-9])[0-9]{11}|(?:2131|1800|35[0-9]{3})[0-9]{11})$",
    )
});
static SSN: LazyLock<Regex> = LazyLock::new(|| regex(r"^[0-9]{3}[- ]?[0-9]{2}[- ]?[0-9]{4}$"));
static HEX_COLOR: LazyLock<Regex> = LazyLock::new(|| regex(r"^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$"));
static RGB_COLOR: LazyLock<Regex> = LazyLock::new(|| {
    let byte = "(0|[1-9][0-9]?|1[0-9][0-9]?|2[0-4][0-9]|25[0-5])";
    let space = r"[\t\n\f\r ]*";
    regex(&format!(
        r"^rgb\({space}{byte}{space},{space}{byte}{space},{space}{byte}{space}\)$"
    ))
});
static BASE64: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$")
});
static DATE_TIME: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"^([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))$")
});
static DURATION_PART: LazyLock<Regex> =
    LazyLock::new(|| regex(r"(([0-9]+)[\t\n\f\r ]*([A-Za-zµ]+))"));
static SHORT_NAME: LazyLock<Regex> = LazyLock::new(|| regex(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"));
static LONG_NAME: LazyLock<Regex> =
    LazyLock::new(|| regex(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"));

/// Whether `text` is valid for a known string format.
fn format_valid(format: &str, text: &str) -> bool {
    match format.replace('-', "").as_str() {
        "bsonobjectid" => text.len() == 24 && text.bytes().all(|b| b.is_ascii_hexdigit()),
        "uri" => is_request_uri(text),
        "email" => is_email(text),
        "hostname" => {
            HOSTNAME.is_match(text) && text.len() <= 255 && text.split('.').all(|p| p.len() <= 63)
        }
        "ipv4" => parse_ip_sloppy(text).is_some() && text.contains('.'),
        "ipv6" => text.parse::<Ipv6Addr>().is_ok() && text.contains(':'),
        "cidr" => is_cidr(text),
        "mac" => is_mac(text),
        "uuid" => UUID[0].is_match(text),
        "uuid3" => UUID[1].is_match(text),
        "uuid4" => UUID[2].is_match(text),
        "uuid5" => UUID[3].is_match(text),
        "isbn" => is_isbn10(text) || is_isbn13(text),
        "isbn10" => is_isbn10(text),
        "isbn13" => is_isbn13(text),
        "creditcard" => is_credit_card(text),
        "ssn" => text.len() == 11 && SSN.is_match(text),
        "hexcolor" => HEX_COLOR.is_match(text),
        "rgbcolor" => RGB_COLOR.is_match(text),
        "byte" => BASE64.is_match(text),
        "date" => is_date(text),
        "datetime" => is_date_time(text),
        "duration" => is_duration(text),
        "k8sshortname" => text.len() <= 63 && SHORT_NAME.is_match(text),
        "k8slongname" => text.len() <= 253 && LONG_NAME.is_match(text),
        _ => true,
    }
}

/// Go's `time.Parse("2006-01-02", …)`: a four-digit year, two-digit month
/// and day, the day within its month.
fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b[r.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| b[r].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
    };
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// kube-openapi's `IsDateTime`: a date, `T` (any case), and a time of day
/// with an optional fraction and a `Z` or `±hh:mm` zone.
fn is_date_time(text: &str) -> bool {
    if text.len() < 4 {
        return false;
    }
    let lower = text.to_lowercase();
    let parts: Vec<&str> = lower.split('t').collect();
    if parts.len() < 2 || !is_date(parts[0]) {
        return false;
    }
    DATE_TIME.captures(parts[1]).is_some_and(|m| {
        let field = |i: usize| m.get(i).map_or("", |g| g.as_str());
        field(1) <= "23" && field(2) <= "59" && field(3) <= "59"
    })
}

/// kube-openapi's `ParseDuration`: Go's `time.ParseDuration`, or else any
/// `<number> <unit>` parts with units such as `s`, `sec`, `min`, `hours`,
/// `d`, `days`, `w`, `weeks`.
fn is_duration(text: &str) -> bool {
    if is_go_duration(text) {
        return true;
    }
    const UNITS: [&[&str]; 8] = [
        &["ns", "nano"],
        &["us", "µs", "micro"],
        &["ms", "milli"],
        &["s", "sec"],
        &["m", "min"],
        &["h", "hr", "hour"],
        &["d", "day"],
        &["w", "wk", "week"],
    ];
    let mut found = false;
    for part in DURATION_PART.captures_iter(text) {
        if part[2].parse::<i64>().is_err() {
            return false;
        }
        let unit = part[3].trim().to_lowercase();
        found |= UNITS.iter().any(|variants| {
            variants.iter().enumerate().any(|(i, variant)| {
                (i == variants.len() - 1 && unit.starts_with(variant)) || *variant == unit
            })
        });
    }
    found
}

/// Go's `time.ParseDuration` grammar and range (`1h30m`, `-1.5s`, `0`).
fn is_go_duration(text: &str) -> bool {
    const LIMIT: u128 = 1 << 63;
    let negative = text.starts_with('-');
    let mut s = text.strip_prefix(['-', '+']).unwrap_or(text);
    if s == "0" {
        return true;
    }
    if s.is_empty() {
        return false;
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        if !s.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return false;
        }
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let mut whole: u128 = 0;
        for d in s[..int_len].bytes() {
            whole = whole * 10 + u128::from(d - b'0');
            if whole > LIMIT {
                return false;
            }
        }
        s = &s[int_len..];
        let mut fraction = (0u128, 1u128);
        let mut frac_len = 0;
        if let Some(rest) = s.strip_prefix('.') {
            frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            for d in rest[..frac_len].bytes() {
                if fraction.1 < 1 << 60 {
                    fraction = (fraction.0 * 10 + u128::from(d - b'0'), fraction.1 * 10);
                }
            }
            s = &rest[frac_len..];
        }
        if int_len == 0 && frac_len == 0 {
            return false;
        }
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        let unit: u128 = match &s[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return false,
        };
        s = &s[unit_len..];
        total += whole * unit + fraction.0 * unit / fraction.1;
        if total > LIMIT {
            return false;
        }
    }
    negative || total < LIMIT
}

/// Go's `net.ParseMAC`: 6, 8 or 20 bytes as `xx:xx…`, `xx-xx…` or
/// `xxxx.xxxx…`.
fn is_mac(text: &str) -> bool {
    let b = text.as_bytes();
    let hex_pair = |i: usize| {
        b.get(i..i + 2)
            .is_some_and(|p| p.iter().all(u8::is_ascii_hexdigit))
    };
    if b.len() < 14 {
        return false;
    }
    let lengths = [6, 8, 20];
    if b[2] == b':' || b[2] == b'-' {
        if !(b.len() + 1).is_multiple_of(3) {
            return false;
        }
        let n = (b.len() + 1) / 3;
        lengths.contains(&n)
            && (0..n).all(|x| hex_pair(x * 3) && (x == n - 1 || b[x * 3 + 2] == b[2]))
    } else if b[4] == b'.' {
        if !(b.len() + 1).is_multiple_of(5) {
            return false;
        }
        let n = 2 * (b.len() + 1) / 5;
        lengths.contains(&n)
            && (0..n / 2).all(|g| {
                let at = g * 5;
                hex_pair(at) && hex_pair(at + 2) && (g == n / 2 - 1 || b[at + 4] == b'.')
            })
    } else {
        false
    }
}

/// An IPv4 address as Kubernetes' "sloppy" parser reads it (leading zeros
/// allowed, as before Go 1.17).
fn parse_ipv4_sloppy(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = u8::try_from(part.parse::<u32>().ok()?).ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// An IPv4 or IPv6 address, sloppy about IPv4 leading zeros (also in an
/// IPv6 address's embedded IPv4 tail).
fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    if !text.contains(':') {
        return parse_ipv4_sloppy(text).map(IpAddr::V4);
    }
    let (head, tail) = text.rsplit_once(':')?;
    let normalized = if tail.contains('.') {
        format!("{head}:{}", parse_ipv4_sloppy(tail)?)
    } else {
        text.to_owned()
    };
    normalized.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Some(ip) = parse_ip_sloppy(address) else {
        return false;
    };
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    !prefix.is_empty()
        && prefix.len() <= 8
        && prefix.bytes().all(|b| b.is_ascii_digit())
        && prefix.parse::<u32>().is_ok_and(|n| n <= bits)
}

/// Go's `url.ParseRequestURI`: an absolute URI or an absolute path.
fn is_request_uri(text: &str) -> bool {
    if text.is_empty() || text.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return false;
    }
    if text == "*" {
        return true;
    }
    let mut scheme = "";
    let mut rest = text;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' => {}
            b'0'..=b'9' | b'+' | b'-' | b'.' if i > 0 => {}
            b':' if i == 0 => return false,
            b':' => {
                scheme = &text[..i];
                rest = &text[i + 1..];
                break;
            }
            _ => break,
        }
    }
    let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
    if !rest.starts_with('/') {
        // An opaque URI such as `mailto:x`, or a relative path.
        return !scheme.is_empty();
    }
    let path = match rest.strip_prefix("//").filter(|_| !scheme.is_empty()) {
        Some(after) => {
            let (authority, path) = after.find('/').map_or((after, ""), |i| after.split_at(i));
            if !valid_authority(authority) {
                return false;
            }
            path
        }
        None => rest,
    };
    valid_escapes(path)
}

fn valid_authority(authority: &str) -> bool {
    let host = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let allowed = |c: char| c.is_ascii_alphanumeric() || "-._:~!$&'()*+,;=%@".contains(c);
            if !userinfo.chars().all(allowed) {
                return false;
            }
            host
        }
        None => authority,
    };
    let port = if let Some(bracketed) = host.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((_, port)) => port,
            None => return false,
        }
    } else {
        host.rfind(':').map_or("", |i| &host[i..])
    };
    (port.is_empty() || port.starts_with(':') && port[1..].bytes().all(|b| b.is_ascii_digit()))
        && valid_escapes(host)
}

/// Every `%` starts a two-digit hex escape.
fn valid_escapes(text: &str) -> bool {
    let b = text.as_bytes();
    (0..b.len()).all(|i| {
        b[i] != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
}

/// Go's `net/mail.ParseAddress`, for the common forms: `local@domain` or
/// `Name <local@domain>`, with a dot-atom or quoted local part and a
/// dot-atom or bracketed domain.
fn is_email(text: &str) -> bool {
    let text = text.trim();
    let address = match text.strip_suffix('>').and_then(|t| t.rsplit_once('<')) {
        Some((_name, address)) => address,
        None => text,
    };
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let atext = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom =
        |s: &str| !s.is_empty() && s.split('.').all(|p| !p.is_empty() && p.chars().all(atext));
    let quoted = |s: &str| s.len() >= 2 && s.starts_with('"') && s.ends_with('"');
    let literal = |s: &str| s.starts_with('[') && s.ends_with(']');
    (dot_atom(local) || quoted(local)) && (dot_atom(domain) || literal(domain))
}

fn is_isbn10(text: &str) -> bool {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'-')
        .collect();
    if digits.len() != 10
        || !digits[..9].iter().all(u8::is_ascii_digit)
        || !(digits[9].is_ascii_digit() || digits[9] == b'X')
    {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .zip(1u32..)
        .map(|(&d, weight)| weight * if d == b'X' { 10 } else { u32::from(d - b'0') })
        .sum();
    sum.is_multiple_of(11)
}

fn is_isbn13(text: &str) -> bool {
    let digits: Vec<u32> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'-')
        .map(|b| {
            if b.is_ascii_digit() {
                u32::from(b - b'0')
            } else {
                99
            }
        })
        .collect();
    if digits.len() != 13 || digits.iter().any(|&d| d > 9) {
        return false;
    }
    let sum: u32 = digits[..12]
        .iter()
        .zip([1, 3].iter().cycle())
        .map(|(d, w)| d * w)
        .sum();
    digits[12] == (10 - sum % 10) % 10
}

/// A card number (separators ignored) of a known issuer's shape, with a
/// valid Luhn check digit.
fn is_credit_card(text: &str) -> bool {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    if !CREDIT_CARD.is_match(&digits) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            match (i % 2 == 1, d * 2) {
                (true, doubled) if doubled >= 10 => doubled % 10 + 1,
                (true, doubled) => doubled,
                (false, _) => d,
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

// ---------------------------------------------------------------------------
// Embedded resources (x-kubernetes-embedded-resource)

/// Walk `value` with `s`, checking each embedded resource's type and object
/// metadata; `resource_root`: `value` itself is a resource.
fn embedded_walk(
    s: &Schema,
    value: &Value,
    path: &str,
    resource_root: bool,
    causes: &mut Vec<Cause>,
) {
    match value {
        Value::Object(map) => {
            if s.embedded_resource || resource_root {
                embedded_resource(map, path, causes);
            }
            for (k, v) in map {
                if let Some(field) = s.properties.get(k) {
                    embedded_walk(field, v, &child_path(path, k), false, causes);
                } else if let Some(additional) = &s.additional_properties {
                    embedded_walk(additional, v, &format!("{path}[{k}]"), false, causes);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = &s.items {
                for (i, item) in items.iter().enumerate() {
                    embedded_walk(item_schema, item, &format!("{path}[{i}]"), false, causes);
                }
            }
        }
        _ => {}
    }
}

fn embedded_resource(map: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    for required in ["apiVersion", "kind"] {
        if !map.contains_key(required) {
            causes.push(Cause::required(child_path(path, required)));
        }
    }
    for (k, v) in map {
        let at = child_path(path, k);
        match (k.as_str(), v) {
            ("apiVersion" | "kind", Value::String(s)) if s.is_empty() => {
                causes.push(Cause::invalid(at, v, "must not be empty"));
            }
            ("apiVersion", Value::String(s)) if s.matches('/').count() > 1 => {
                causes.push(Cause::invalid(
                    at,
                    v,
                    format!("unexpected GroupVersion string: {s}"),
                ));
            }
            ("kind", Value::String(s)) => {
                let errs = dns1035_label_errors(&s.to_lowercase());
                if !errs.is_empty() {
                    causes.push(Cause::invalid(
                        at,
                        v,
                        format!(
                            "may have mixed case, but should otherwise match: {}",
                            errs.join(",")
                        ),
                    ));
                }
            }
            ("apiVersion", Value::String(_)) => {}
            ("apiVersion" | "kind", _) => causes.push(Cause::invalid(at, v, "must be a string")),
            ("metadata", _) => object_meta(v, &at, causes),
            _ => {}
        }
    }
}

/// The Go type each `ObjectMeta` field decodes into, for decoding errors.
fn meta_field_type(field: &str) -> Option<&'static str> {
    Some(match field {
        "name" | "generateName" | "namespace" | "selfLink" | "uid" | "resourceVersion" => "string",
        "creationTimestamp" | "deletionTimestamp" => "v1.Time",
        "generation" | "deletionGracePeriodSeconds" => "int64",
        "labels" | "annotations" => "map[string]string",
        "ownerReferences" => "[]v1.OwnerReference",
        "finalizers" => "[]string",
        "managedFields" => "[]v1.ManagedFieldsEntry",
        _ => return None,
    })
}

/// Whether a JSON value decodes into a Go type of [`meta_field_type`].
fn decodes_as(value: &Value, go_type: &str) -> bool {
    let strings = |v: &Value| v.is_string() || v.is_null();
    match go_type {
        "string" | "v1.Time" => strings(value),
        "int64" => value.is_i64() || value.is_null(),
        "map[string]string" => {
            value.is_null() || value.as_object().is_some_and(|m| m.values().all(strings))
        }
        "[]string" => value.is_null() || value.as_array().is_some_and(|a| a.iter().all(strings)),
        "[]v1.OwnerReference" => {
            value.is_null()
                || value.as_array().is_some_and(|refs| {
                    refs.iter().all(|r| {
                        r.is_null()
                            || r.as_object().is_some_and(|r| {
                                r.iter().all(|(k, v)| match k.as_str() {
                                    "controller" | "blockOwnerDeletion" => {
                                        v.is_boolean() || v.is_null()
                                    }
                                    _ => strings(v),
                                })
                            })
                    })
                })
        }
        _ => value.is_null() || value.is_array(),
    }
}

/// Go's name for a JSON value's type in decoding errors.
fn go_json_type(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    }
}

/// An embedded resource's metadata: it must decode as `ObjectMeta`, and
/// passes the checks kube-apiserver makes on a created object (its name
/// only as a path segment; a missing name is allowed).
fn object_meta(value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let meta = match value {
        Value::Null => return,
        Value::Object(meta) => meta,
        other => {
            causes.push(Cause::invalid(
                path,
                other,
                format!(
                    "json: cannot unmarshal {} into Go value of type v1.ObjectMeta",
                    go_json_type(other)
                ),
            ));
            return;
        }
    };
    for (field, v) in meta {
        if let Some(go_type) = meta_field_type(field).filter(|t| !decodes_as(v, t)) {
            causes.push(Cause::invalid(
                path,
                value,
                format!(
                    "json: cannot unmarshal {} into Go struct field ObjectMeta.{field} of type {go_type}",
                    go_json_type(v)
                ),
            ));
            return;
        }
    }
    let text = |field: &str| meta.get(field).and_then(Value::as_str).unwrap_or("");
    let at = |field: &str| format!("{path}.{field}");
    let generate_name = text("generateName");
    for msg in path_segment_errors(generate_name, true) {
        causes.push(Cause::invalid(
            at("generateName"),
            &Value::from(generate_name),
            msg,
        ));
    }
    let name = text("name");
    for msg in path_segment_errors(name, false) {
        causes.push(Cause::invalid(at("name"), &Value::from(name), msg));
    }
    let namespace = text("namespace");
    if !namespace.is_empty() {
        for msg in dns1123_label_errors(namespace) {
            causes.push(Cause::invalid(
                at("namespace"),
                &Value::from(namespace),
                msg,
            ));
        }
    }
    if let Some(generation) = meta
        .get("generation")
        .and_then(Value::as_i64)
        .filter(|g| *g < 0)
    {
        causes.push(Cause::invalid(
            at("generation"),
            &Value::from(generation),
            "must be greater than or equal to 0",
        ));
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            for msg in qualified_name_errors(k) {
                causes.push(Cause::invalid(at("labels"), &Value::from(k.as_str()), msg));
            }
            for msg in label_value_errors(v.as_str().unwrap_or("")) {
                causes.push(Cause::invalid(at("labels"), v, msg));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let mut size = 0;
        for (k, v) in annotations {
            size += k.len() + v.as_str().map_or(0, str::len);
            for msg in qualified_name_errors(&k.to_lowercase()) {
                causes.push(Cause::invalid(
                    at("annotations"),
                    &Value::from(k.as_str()),
                    msg,
                ));
            }
        }
        if size > 256 * 1024 {
            causes.push(too_long(at("annotations"), 256 * 1024));
        }
    }
    if let Some(refs) = meta.get("ownerReferences").and_then(Value::as_array) {
        owner_references(refs, &at("ownerReferences"), causes);
    }
    if let Some(finalizers) = meta.get("finalizers").and_then(Value::as_array) {
        let names: Vec<&str> = finalizers.iter().filter_map(Value::as_str).collect();
        for name in &names {
            for msg in qualified_name_errors(name) {
                causes.push(Cause::invalid(at("finalizers"), &Value::from(*name), msg));
            }
        }
        if names.contains(&"orphan") && names.contains(&"foregroundDeletion") {
            causes.push(Cause::invalid(
                at("finalizers"),
                &Value::from(names.clone()),
                "finalizer orphan and foregroundDeletion cannot be both set",
            ));
        }
    }
}

fn owner_references(refs: &[Value], path: &str, causes: &mut Vec<Cause>) {
    let mut controller: Option<String> = None;
    for (i, r) in refs.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let text = |field: &str| r.get(field).and_then(Value::as_str).unwrap_or("");
        let api_version = text("apiVersion");
        let version_ok = match api_version.split_once('/') {
            Some((_, version)) => !version.is_empty() && !version.contains('/'),
            None => true,
        };
        if api_version.is_empty() {
            causes.push(Cause::required_because(
                format!("{at}.apiVersion"),
                "must not be empty",
            ));
        } else if !version_ok {
            causes.push(Cause::invalid(
                format!("{at}.apiVersion"),
                &Value::from(api_version),
                "must be <group>/<version> or <version>",
            ));
        }
        for field in ["kind", "name", "uid"] {
            if text(field).is_empty() {
                causes.push(Cause::required_because(
                    format!("{at}.{field}"),
                    "must not be empty",
                ));
            }
        }
        if api_version == "v1" && text("kind") == "Event" {
            causes.push(Cause::invalid(
                &at,
                r,
                "/v1, Kind=Event is disallowed from being an owner",
            ));
        }
        if r.get("controller").and_then(Value::as_bool) == Some(true) {
            let this = format!("{}/{}", text("kind"), text("name"));
            match &controller {
                Some(first) => causes.push(Cause::invalid(
                    path,
                    &Value::from(refs.to_vec()),
                    format!("Only one reference can have Controller set to true. Found \"true\" in references for {first} and {this}"),
                )),
                None => controller = Some(this),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// x-kubernetes-list-type: set and map uniqueness

fn list_errors(s: &Schema, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Value::Object(map) = obj {
        lists_in_object(s, map, "", &mut causes);
    }
    causes
}

fn lists_in_object(s: &Schema, map: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    if let Some(additional) = &s.additional_properties {
        for (k, v) in map {
            lists_in(additional, v, &format!("{path}[{k}]"), causes);
        }
    }
    for (k, v) in map {
        if let Some(field) = s.properties.get(k) {
            lists_in(field, v, &child_path(path, k), causes);
        }
    }
}

fn lists_in(s: &Schema, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    match value {
        Value::Object(map) => lists_in_object(s, map, path, causes),
        Value::Array(items) => {
            match &s.list_type {
                Some(ListType::Set) => {
                    for i in second_occurrences(&items.iter().collect::<Vec<_>>()) {
                        causes.push(Cause::duplicate(format!("{path}[{i}]"), &items[i]));
                    }
                }
                Some(ListType::Map { keys }) => map_list_errors(keys, items, path, causes),
                _ => {}
            }
            if let Some(item_schema) = &s.items {
                for (i, item) in items.iter().enumerate() {
                    lists_in(item_schema, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
}

/// The index of each value's second occurrence (kube reports each
/// duplicated value once).
fn second_occurrences(values: &[&Value]) -> Vec<usize> {
    (0..values.len())
        .filter(|&i| values[..i].iter().filter(|v| **v == values[i]).count() == 1)
        .collect()
}

fn map_list_errors(keys: &[String], items: &[Value], path: &str, causes: &mut Vec<Cause>) {
    if let Some((i, item)) = items
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_null() && !v.is_object())
    {
        causes.push(Cause::invalid(
            format!("{path}[{i}]"),
            item,
            "must be an object for an array of list-type map",
        ));
        return;
    }
    // The key of each item: its key fields that are set, in Go's sorted
    // map order (an item without them has the empty key).
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let item_keys: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut key = Map::new();
            for k in &sorted {
                if let Some(v) = item.get(k.as_str()) {
                    key.insert((*k).clone(), v.clone());
                }
            }
            Value::Object(key)
        })
        .collect();
    for i in second_occurrences(&item_keys.iter().collect::<Vec<_>>()) {
        causes.push(Cause::duplicate(format!("{path}[{i}]"), &item_keys[i]));
    }
}

// ---------------------------------------------------------------------------
// x-kubernetes-validations

/// Where ratcheting stands for a CEL rule: the node's own correlation, or
/// (where correlation stopped) the nearest correlated ancestor's.
#[derive(Clone, Copy, Default)]
struct Ratchet<'a> {
    current: Option<Correlation<'a>>,
    parent: Option<Correlation<'a>>,
}

impl<'a> Ratchet<'a> {
    fn key(self, key: &str) -> Self {
        match self.current {
            None => self,
            Some(c) => Ratchet {
                current: c.key(key),
                parent: Some(c),
            },
        }
    }

    fn index(self, index: usize) -> Self {
        match self.current {
            None => self,
            Some(c) => Ratchet {
                current: c.index(index),
                parent: Some(c),
            },
        }
    }

    fn unchanged(self) -> bool {
        self.current
            .or(self.parent)
            .is_some_and(Correlation::unchanged)
    }
}

/// The walk over the rules of an object: one cost budget for all of them,
/// as kube-apiserver has per request.
#[derive(Default)]
struct Cel {
    causes: Vec<Cause>,
    budget: Budget,
    /// A rule ran out of cost: kube runs no further rules.
    stopped: bool,
}

impl Cel {
    fn node(
        &mut self,
        s: &Schema,
        value: &Value,
        old: Option<&Value>,
        path: &str,
        ratchet: Ratchet,
    ) {
        if self.stopped || value.is_null() || !has_rules(s) {
            return;
        }
        self.rules(s, value, old, path, ratchet);
        match value {
            Value::Array(items) => {
                let Some(item_schema) = &s.items else {
                    return;
                };
                let keys = match &s.list_type {
                    Some(ListType::Map { keys }) => Some(keys),
                    _ => None,
                };
                let old_items = old.and_then(Value::as_array);
                for (i, item) in items.iter().enumerate() {
                    let old_item = keys
                        .zip(old_items)
                        .and_then(|(keys, old_items)| find_by_keys(old_items, keys, item));
                    self.node(
                        item_schema,
                        item,
                        old_item,
                        &format!("{path}[{i}]"),
                        ratchet.index(i),
                    );
                }
            }
            Value::Object(map) => {
                let old_field = |k: &str| old.and_then(|o| o.get(k)).filter(|v| !v.is_null());
                if let Some(additional) = &s.additional_properties {
                    for (k, v) in map {
                        self.node(
                            additional,
                            v,
                            old_field(k),
                            &format!("{path}[{k}]"),
                            ratchet.key(k),
                        );
                    }
                }
                for (k, v) in map {
                    if let Some(field) = s.properties.get(k) {
                        self.node(field, v, old_field(k), &child_path(path, k), ratchet.key(k));
                    }
                }
            }
            _ => {}
        }
    }

    fn rules(
        &mut self,
        s: &Schema,
        value: &Value,
        old: Option<&Value>,
        path: &str,
        ratchet: Ratchet,
    ) {
        let type_name = Value::from(s.type_.map_or("", SchemaType::name));
        // Typed once for all the node's rules.
        let input = Input::new(value, Some(s));
        let old_input = old.map(|old| Input::new(old, Some(s)));
        for rule in &s.validations {
            let compiled = &rule.compiled;
            if compiled.is_transition() && old.is_none() && !rule.optional_old_self {
                continue;
            }
            let shown_rule = rule
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .unwrap_or(rule.rule.trim());
            let at = field_or_nil(path);
            match compiled.evaluate(&input, old_input.as_ref(), &mut self.budget) {
                Ok(true) => {}
                Err(Failure::Error(e)) if e.starts_with("no such overload") => self.causes.push(Cause::invalid(
                    at,
                    &type_name,
                    format!("'{e}': call arguments did not match a supported operator, function or macro signature for rule: {shown_rule}"),
                )),
                Err(Failure::Error(e)) => self.causes.push(Cause::invalid(at, &type_name, format!("{e} evaluating rule: {shown_rule}"))),
                Err(Failure::Stop(stop)) => {
                    let detail = match stop {
                        Stop::CallLimit => format!("'{}': no further validation rules will be run due to call cost exceeds limit for rule: {shown_rule}", stop.message()),
                        Stop::Budget => stop.message().to_owned(),
                    };
                    self.causes.push(Cause::invalid(at, &type_name, detail));
                    self.stopped = true;
                    return;
                }
                Ok(false) => {
                    if !compiled.is_transition() && ratchet.unchanged() {
                        continue;
                    }
                    let field = match rule.field_path.as_deref().map(|fp| resolve_field_path(fp, s)) {
                        Some(Ok(relative)) if !relative.is_empty() => child_path(path, &relative),
                        _ => at.to_owned(),
                    };
                    let message = match compiled.message(&input, old_input.as_ref(), &mut self.budget) {
                        Ok(message) => message,
                        Err(stop) => {
                            let detail = match stop {
                                Stop::CallLimit => format!("messageExpression evaluation failed due to: {}", stop.message()),
                                Stop::Budget => "messageExpression evaluation failed due to running out of cost budget, no further validation rules will be run".to_owned(),
                            };
                            self.causes.push(Cause::invalid(at, &type_name, detail));
                            self.stopped = true;
                            return;
                        }
                    };
                    let detail = message.unwrap_or_else(|| match &rule.message {
                        Some(m) if !m.trim().is_empty() => m.trim().to_owned(),
                        _ => format!("failed rule: {}", rule.rule.trim()),
                    });
                    // Shown by its schema type's name, as kube-apiserver 1.33
                    // reports a failed rule whatever the value.
                    let shown = type_name.clone();
                    self.causes.push(match rule.reason.as_deref() {
                        Some("FieldValueForbidden") => Cause::forbidden(field, detail),
                        Some("FieldValueRequired") => Cause::required_because(field, detail),
                        Some("FieldValueDuplicate") => Cause::duplicate(field, &shown),
                        _ => invalid(field, &shown, detail),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::tests::crontab;

    fn schema(raw: Value) -> Schema {
        Schema::parse(&raw, "s").unwrap_or_else(|causes| panic!("refused: {causes:#?}"))
    }

    fn field(s: Value) -> Schema {
        schema(
            json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {"f": s}}}}),
        )
    }

    /// The causes for `spec.f: value` under `field(s)`.
    fn errors_for(s: Value, value: Value) -> Vec<String> {
        rendered(validate(&field(s), &json!({"spec": {"f": value}}), None))
    }

    fn rendered(causes: Vec<Cause>) -> Vec<String> {
        causes.iter().map(Cause::render).collect()
    }

    fn crontab_object() -> Value {
        json!({
            "apiVersion": "stable.example.com/v1",
            "kind": "CronTab",
            "metadata": {"name": "my-cron"},
            "spec": {
                "cronSpec": "*/5 * * * *",
                "image": "my-cron-image",
                "replicas": 3,
                "color": "red",
                "maxSurge": "25%",
                "startAt": "2024-02-29T10:00:00Z",
                "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 80, "protocol": "UDP"}],
                "tags": ["a", "b"],
                "labels": {"app": "web"},
                "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}},
                "extra": {"anything": [1, 2]}
            }
        })
    }

    #[test]
    fn a_valid_crontab_passes() {
        assert_eq!(
            validate(&schema(crontab()), &crontab_object(), None),
            vec![]
        );
    }

    #[test]
    fn crontab_errors_carry_kube_messages() {
        let mut obj = crontab_object();
        let spec = &mut obj["spec"];
        spec["replicas"] = json!("string");
        spec["color"] = json!("pink");
        spec["image"] = json!("x".repeat(65));
        spec.as_object_mut().unwrap().remove("cronSpec");
        spec["ports"][1]["protocol"] = json!("TCP");
        spec["tags"] = json!(["a", "b", "a", "a"]);
        spec["template"] = json!({"kind": "pod_", "metadata": {"name": "a/b"}});
        spec["maxSurge"] = json!(true);
        let errors = rendered(validate(&schema(crontab()), &obj, None));
        assert_eq!(
            errors,
            vec![
                // Fields in name order; per value: type, junctors, the rest.
                r#"spec.color: Unsupported value: "pink": supported values: "red", "green""#,
                "spec.image: Too long: may not be more than 64 bytes",
                r#"spec.maxSurge: Invalid value: "boolean": spec.maxSurge in body must be of type integer,string: "boolean""#,
                r#"<nil>: Invalid value: "": "spec.maxSurge" must validate at least one schema (anyOf)"#,
                r#"spec.maxSurge: Invalid value: "boolean": spec.maxSurge in body must be of type integer: "boolean""#,
                r#"spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string""#,
                "spec.cronSpec: Required value",
                "spec.template.apiVersion: Required value",
                r#"spec.template.kind: Invalid value: "pod_": may have mixed case, but should otherwise match: a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"#,
                "spec.template.metadata.name: Invalid value: \"a/b\": may not contain '/'",
                r#"spec.ports[1]: Duplicate value: {"containerPort":80,"protocol":"TCP"}"#,
                r#"spec.tags[2]: Duplicate value: "a""#,
            ]
        );
    }

    #[test]
    fn types_and_nulls() {
        assert_eq!(
            errors_for(json!({"type": "integer"}), json!(1.5)),
            vec![
                r#"spec.f: Invalid value: "number": spec.f in body must be of type integer: "number""#,
                r#"<nil>: Invalid value: "": Checked value must be of type integer (default format) in spec.f"#,
            ]
        );
        assert_eq!(
            errors_for(json!({"type": "integer"}), json!(2.0)),
            Vec::<String>::new()
        );
        assert_eq!(
            errors_for(json!({"type": "number"}), json!(2)),
            Vec::<String>::new()
        );
        assert_eq!(
            errors_for(json!({"type": "object"}), json!([])),
            vec![
                r#"spec.f: Invalid value: "array": spec.f in body must be of type object: "array""#
            ]
        );
        assert_eq!(
            errors_for(json!({"type": "string"}), json!(null)),
            vec![r#"spec.f: Invalid value: "null": spec.f in body must be of type string: "null""#]
        );
        assert_eq!(
            errors_for(json!({"type": "string", "nullable": true}), json!(null)),
            Vec::<String>::new()
        );
        // An enum refuses null even when nullable, as kube-openapi does.
        assert_eq!(
            errors_for(
                json!({"type": "string", "nullable": true, "enum": ["a"]}),
                json!(null)
            ),
            vec![r#"spec.f: Unsupported value: null: supported values: "a""#]
        );
        assert_eq!(
            errors_for(json!({"x-kubernetes-int-or-string": true}), json!({"a": 1})),
            vec![
                r#"spec.f: Invalid value: "object": spec.f in body must be of type integer,string: "object""#
            ]
        );
        assert_eq!(
            errors_for(json!({"x-kubernetes-int-or-string": true}), json!("10%")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn string_lengths_and_patterns() {
        let s = json!({"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"});
        assert_eq!(errors_for(s.clone(), json!("abc")), Vec::<String>::new());
        assert_eq!(
            errors_for(s.clone(), json!("abcde")),
            vec!["spec.f: Too long: may not be more than 4 bytes"]
        );
        assert_eq!(
            errors_for(s.clone(), json!("a")),
            vec![r#"spec.f: Invalid value: "a": spec.f in body should be at least 2 chars long"#]
        );
        assert_eq!(
            errors_for(s, json!("ABC")),
            vec![r#"spec.f: Invalid value: "ABC": spec.f in body should match '^[a-z]+$'"#]
        );
        // Lengths count characters; the message still says bytes, and "byte" for one.
        assert_eq!(
            errors_for(json!({"type": "string", "maxLength": 1}), json!("é")),
            Vec::<String>::new()
        );
        assert_eq!(
            errors_for(json!({"type": "string", "maxLength": 1}), json!("ab")),
            vec!["spec.f: Too long: may not be more than 1 byte"]
        );
    }

    #[test]
    fn numeric_bounds() {
        let s = json!({"type": "integer", "minimum": 1, "maximum": 10});
        assert_eq!(
            errors_for(s.clone(), json!(20)),
            vec!["spec.f: Invalid value: 20: spec.f in body should be less than or equal to 10"]
        );
        assert_eq!(
            errors_for(s, json!(0)),
            vec!["spec.f: Invalid value: 0: spec.f in body should be greater than or equal to 1"]
        );
        let s = json!({"type": "number", "exclusiveMinimum": true, "minimum": 0.5, "exclusiveMaximum": true, "maximum": 1500000});
        assert_eq!(
            errors_for(s.clone(), json!(0.5)),
            vec!["spec.f: Invalid value: 0.5: spec.f in body should be greater than 0.5"]
        );
        assert_eq!(
            errors_for(s, json!(2e6)),
            vec!["spec.f: Invalid value: 2e+06: spec.f in body should be less than 1.5e+06"]
        );
    }

    #[test]
    fn multiples() {
        assert_eq!(
            errors_for(json!({"type": "integer", "multipleOf": 3}), json!(7)),
            vec!["spec.f: Invalid value: 7: spec.f in body should be a multiple of 3"]
        );
        assert_eq!(
            errors_for(json!({"type": "number", "multipleOf": 0.1}), json!(0.3)),
            Vec::<String>::new()
        );
        assert_eq!(
            errors_for(json!({"type": "number", "multipleOf": 0.25}), json!(0.3)),
            vec!["spec.f: Invalid value: 0.3: spec.f in body should be a multiple of 0.25"]
        );
    }

    #[test]
    fn integer_formats_have_ranges() {
        assert_eq!(
            errors_for(
                json!({"type": "integer", "format": "int32"}),
                json!(2_147_483_648_i64)
            ),
            vec![
                r#"<nil>: Invalid value: "": Checked value must be of type integer with format int32 in spec.f"#
            ]
        );
        assert_eq!(
            errors_for(
                json!({"type": "integer", "format": "int64"}),
                json!(2_147_483_648_i64)
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            errors_for(json!({"type": "number", "format": "float"}), json!(1e39)),
            vec![
                r#"<nil>: Invalid value: "": Checked value must be of type number with format float in spec.f"#
            ]
        );
    }

    #[test]
    fn string_formats() {
        let cases = [
            ("date", "2024-02-29", "2023-02-29"),
            (
                "date-time",
                "2024-02-29T23:59:59.5+01:00",
                "2024-02-29 23:59:59",
            ),
            ("byte", "aGVsbG8=", "hello!"),
            ("uuid", "123E4567-e89b-12d3-a456-426614174000", "123e4567"),
            (
                "uuid4",
                "123e4567-e89b-42d3-a456-426614174000",
                "123e4567-e89b-12d3-a456-426614174000",
            ),
            ("hostname", "my-host.example.com", "-host"),
            ("ipv4", "010.0.0.1", "1.2.3"),
            ("ipv6", "fe80::1", "1.2.3.4"),
            ("cidr", "10.0.0.0/8", "10.0.0.0/33"),
            ("mac", "01:23:45:67:89:ab", "01:23:45:67:89"),
            ("email", "Jane <jane@example.com>", "jane.example.com"),
            ("uri", "https://example.com/a%20b?x=1", "example.com/a"),
            ("duration", "1h30m", "soon"),
            ("duration", "3 days", "1.5"),
            ("bsonobjectid", "507f1f77bcf86cd799439011", "507f1f77"),
            ("hexcolor", "#fff", "#ffff"),
            ("rgbcolor", "rgb(255, 0, 10)", "rgb(256,0,0)"),
            ("isbn13", "978-0321751041", "978-0321751042"),
            ("creditcard", "4111 1111 1111 1111", "4111 1111 1111 1112"),
            ("ssn", "123-45-6789", "123456789"),
            ("k8s-short-name", "web-1", "Web"),
            ("k8s-long-name", "a.b-c", "a..b"),
        ];
        for (format, good, bad) in cases {
            let s = json!({"type": "string", "format": format});
            assert_eq!(
                errors_for(s.clone(), json!(good)),
                Vec::<String>::new(),
                "{format} {good}"
            );
            assert_eq!(
                errors_for(s, json!(bad)),
                vec![format!("spec.f: Invalid value: {bad:?}: spec.f in body must be of type {format}: {bad:?}")],
                "{format} {bad}"
            );
        }
        // Formats kube does not know are not errors.
        assert_eq!(
            errors_for(json!({"type": "string", "format": "color"}), json!("x")),
            Vec::<String>::new()
        );
        assert_eq!(
            errors_for(json!({"type": "integer", "format": "date"}), json!(3)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn objects_and_arrays() {
        let s = json!({"type": "object", "required": ["a"], "minProperties": 2, "maxProperties": 3,
            "properties": {"a": {"type": "string"}}, "additionalProperties": false});
        let s = json!({"type": "object", "properties": {"o": s, "l": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer"}}}});
        // additionalProperties: false is refused; use a map instead.
        assert!(Schema::parse(&s, "s").is_err());
        let schema = schema(json!({"type": "object", "properties": {
            "o": {"type": "object", "required": ["a"], "minProperties": 2, "maxProperties": 1, "additionalProperties": {"type": "integer"}},
            "l": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer"}}
        }}));
        assert_eq!(
            rendered(validate(
                &schema,
                &json!({"o": {"b": "x"}, "l": [1, "2", 3, 4]}),
                None
            )),
            vec![
                r#"l[1]: Invalid value: "string": l[1] in body must be of type integer: "string""#,
                "l: Too many: 4: must have at most 3 items",
                "o: Invalid value: 1: o in body should have at least 2 properties",
                r#"o.b: Invalid value: "string": o.b in body must be of type integer: "string""#,
                "o.a: Required value",
            ]
        );
        assert_eq!(
            rendered(validate(
                &schema,
                &json!({"o": {"a": 1, "b": 2}, "l": [1]}),
                None
            )),
            vec![
                "l: Invalid value: 1: l in body should have at least 2 items",
                "o: Too many: 2: must have at most 1 item",
            ]
        );
    }

    #[test]
    fn junctors() {
        let s = json!({"type": "string", "oneOf": [{"pattern": "^a"}, {"pattern": "b$"}], "not": {"enum": ["ab"]}});
        assert_eq!(errors_for(s.clone(), json!("ax")), Vec::<String>::new());
        assert_eq!(
            errors_for(s.clone(), json!("ab")),
            vec![
                r#"<nil>: Invalid value: "": "spec.f" must validate one and only one schema (oneOf). Found 2 valid alternatives"#,
                r#"<nil>: Invalid value: "": "spec.f" must not validate the schema (not)"#,
            ]
        );
        assert_eq!(
            errors_for(s, json!("x")),
            vec![
                r#"<nil>: Invalid value: "": "spec.f" must validate one and only one schema (oneOf). Found none valid"#,
                r#"spec.f: Invalid value: "x": spec.f in body should match '^a'"#,
            ]
        );
        let s = json!({"type": "integer", "allOf": [{"minimum": 5}, {"maximum": 3}]});
        assert_eq!(
            errors_for(s, json!(4)),
            vec![
                "spec.f: Invalid value: 4: spec.f in body should be greater than or equal to 5",
                "spec.f: Invalid value: 4: spec.f in body should be less than or equal to 3",
                r#"<nil>: Invalid value: "": "spec.f" must validate all the schemas (allOf). None validated"#,
            ]
        );
    }

    #[test]
    fn embedded_resource_metadata() {
        let s = schema(json!({"type": "object", "properties": {"r": {
            "type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true}}}));
        let obj = json!({"r": {"apiVersion": "a/b/c", "kind": "", "metadata": {
            "namespace": "Ns", "labels": {"a/b/c": "x y"}, "generateName": "x%", "finalizers": ["orphan", "foregroundDeletion"]}}});
        assert_eq!(
            rendered(validate(&s, &obj, None)),
            vec![
                r#"r.apiVersion: Invalid value: "a/b/c": unexpected GroupVersion string: a/b/c"#,
                r#"r.kind: Invalid value: "": must not be empty"#,
                r#"r.metadata.generateName: Invalid value: "x%": may not contain '%'"#,
                r#"r.metadata.namespace: Invalid value: "Ns": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"#,
                r#"r.metadata.labels: Invalid value: "a/b/c": a valid label key must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"#,
                r#"r.metadata.labels: Invalid value: "x y": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"#,
                r#"r.metadata.finalizers: Invalid value: ["orphan","foregroundDeletion"]: finalizer orphan and foregroundDeletion cannot be both set"#,
            ]
        );
        assert_eq!(
            rendered(validate(
                &s,
                &json!({"r": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": 5}}}),
                None
            )),
            vec![
                r#"r.metadata: Invalid value: {"name":5}: json: cannot unmarshal number into Go struct field ObjectMeta.name of type string"#
            ]
        );
    }

    #[test]
    fn map_lists_with_one_key() {
        let s = schema(
            json!({"type": "object", "properties": {"l": {"type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"], "items": {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "v": {"type": "integer"}}}}}}),
        );
        assert_eq!(
            rendered(validate(
                &s,
                &json!({"l": [{"name": "a"}, {"name": "b"}, {"name": "a", "v": 1}, 3]}),
                None
            )),
            vec![
                r#"l[3]: Invalid value: "integer": l[3] in body must be of type object: "integer""#,
                "l[3]: Invalid value: 3: must be an object for an array of list-type map",
            ]
        );
        assert_eq!(
            rendered(validate(
                &s,
                &json!({"l": [{"name": "a"}, {"name": "b"}, {"name": "a", "v": 1}]}),
                None
            )),
            vec![r#"l[2]: Duplicate value: {"name":"a"}"#]
        );
    }

    #[test]
    fn updates_ratchet_unchanged_values() {
        let s = schema(crontab());
        let mut old = crontab_object();
        old["spec"]["image"] = json!("x".repeat(70));
        old["spec"]["ports"][0]["containerPort"] = json!("eighty");
        old["spec"]["tags"] = json!(["a", "a"]);
        // Unchanged invalid parts pass; a changed field elsewhere is checked.
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(4);
        new["spec"]["ports"] = json!([{"containerPort": 80, "protocol": "UDP"}, {"containerPort": "eighty", "protocol": "TCP"}]);
        assert_eq!(validate(&s, &new, Some(&old)), vec![]);
        // A changed invalid value is refused.
        new["spec"]["image"] = json!("y".repeat(70));
        new["spec"]["replicas"] = json!(11);
        assert_eq!(
            rendered(validate(&s, &new, Some(&old))),
            vec![
                "spec.image: Too long: may not be more than 64 bytes",
                "spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10",
            ]
        );
        // Without the old object everything is checked.
        assert_eq!(validate(&s, &new, None).len(), 4);
    }

    #[test]
    fn values_render_as_go_renders_them() {
        assert_eq!(go_float(1e6), "1e+06");
        assert_eq!(go_float(123456.0), "123456");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(-2.5e21), "-2.5e+21");
        assert_eq!(go_quote("a\"b\n\u{1}é"), r#""a\"b\n\x01é""#);
    }

    #[test]
    fn deep_objects_do_not_overflow() {
        let s = schema(
            json!({"type": "object", "properties": {"x": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}),
        );
        let deep = crate::schema::tests::nested(20_000, |inner| {
            let mut map = Map::new();
            map.insert("a".into(), inner);
            Value::Object(map)
        });
        let mut obj = Map::new();
        obj.insert("x".into(), deep);
        let obj = Value::Object(obj);
        assert_eq!(validate(&s, &obj, Some(&json!({}))), vec![]);
        crate::schema::tests::dismantle(obj);
    }

    #[test]
    fn cel_rules() {
        let s = schema(json!({"type": "object", "properties": {"spec": {
            "type": "object",
            "properties": {
                "min": {"type": "integer"},
                "max": {"type": "integer"},
                "name": {"type": "string", "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": "name is immutable"}
                ]}
            },
            "x-kubernetes-validations": [
                {"rule": "self.min <= self.max", "fieldPath": ".min", "reason": "FieldValueForbidden", "message": "min above max"},
                {"rule": "self.max < 100"}
            ]
        }}}));
        let obj = json!({"spec": {"min": 5, "max": 200, "name": "a"}});
        assert_eq!(
            rendered(validate(&s, &obj, None)),
            vec![r#"spec: Invalid value: "object": failed rule: self.max < 100"#,]
        );
        let new = json!({"spec": {"min": 50, "max": 10, "name": "b"}});
        assert_eq!(
            rendered(validate(
                &s,
                &new,
                Some(&json!({"spec": {"min": 5, "max": 10, "name": "a"}}))
            )),
            vec![
                "spec.min: Forbidden: min above max",
                r#"spec.name: Invalid value: "string": name is immutable"#,
            ]
        );
        // An unchanged value's failing (non-transition) rule is ratcheted.
        assert_eq!(validate(&s, &obj, Some(&obj)), vec![]);
        // Blocking errors stop the rules.
        assert_eq!(
            rendered(validate(&s, &json!({"spec": {"min": "x", "max": 1}}), None)),
            vec![
                r#"spec.min: Invalid value: "string": spec.min in body must be of type integer: "string""#,
                "<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
            ]
        );
    }

    #[test]
    fn cel_rule_failures_are_worded_as_kube_words_them() {
        let s = schema(json!({"type": "object", "properties": {"spec": {
            "type": "object",
            "properties": {"port": {"x-kubernetes-int-or-string": true}, "n": {"type": "integer"}},
            "x-kubernetes-validations": [
                {"rule": "self.port > 0", "message": "port must be positive"},
                {"rule": "self.n / 0 > 1"},
                {"rule": "self.n < 10", "messageExpression": "'n is ' + string(self.n)"},
                {"rule": "self.n < 10", "messageExpression": "'n is ' + self.n"},
            ]
        }}}));
        assert_eq!(
            rendered(validate(
                &s,
                &json!({"spec": {"port": "http", "n": 12}}),
                None
            )),
            vec![
                r#"spec: Invalid value: "object": 'no such overload: string compared with int': call arguments did not match a supported operator, function or macro signature for rule: port must be positive"#,
                r#"spec: Invalid value: "object": division by zero evaluating rule: self.n / 0 > 1"#,
                r#"spec: Invalid value: "object": n is 12"#,
                r#"spec: Invalid value: "object": failed rule: self.n < 10"#,
            ]
        );
    }

    #[test]
    fn optional_old_self_rules_run_on_create_too() {
        let s = schema(json!({"type": "object", "properties": {"n": {
            "type": "integer",
            "x-kubernetes-validations": [
                {"rule": "oldSelf.hasValue() || self < 10", "optionalOldSelf": true, "message": "n starts below 10"},
                {"rule": "self >= oldSelf.orValue(0)", "optionalOldSelf": true, "message": "n may not shrink"},
            ]
        }}}));
        assert_eq!(validate(&s, &json!({"n": 1}), None), vec![]);
        assert_eq!(
            rendered(validate(&s, &json!({"n": 12}), None)),
            vec![r#"n: Invalid value: "integer": n starts below 10"#]
        );
        assert_eq!(
            validate(&s, &json!({"n": 12}), Some(&json!({"n": 11}))),
            vec![]
        );
        assert_eq!(
            rendered(validate(&s, &json!({"n": 1}), Some(&json!({"n": 2})))),
            vec![r#"n: Invalid value: "integer": n may not shrink"#]
        );
    }

    /// One request has one cost budget, whatever the number of rules and
    /// items; a rule over its own limit stops the rules too.
    #[test]
    fn cel_rules_share_one_cost_budget() {
        let s = schema(json!({"type": "object", "properties": {
            "items": {"type": "array", "items": {
                "type": "array", "items": {"type": "integer"},
                "x-kubernetes-validations": [
                    {"rule": "self.all(x, self.exists(y, y == x))"},
                    {"rule": "self.all(x, x >= 0)"},
                ]
            }},
            "big": {"type": "array", "items": {"type": "integer"},
                "x-kubernetes-validations": [{"rule": "self.all(x, self.exists_one(y, y == x))"}]},
            "last": {"type": "integer", "x-kubernetes-validations": [{"rule": "self < 0"}]},
        }}));
        let stopped = |causes: Vec<Cause>, path: &str, detail: &str| {
            let causes = rendered(causes);
            assert_eq!(causes.len(), 1, "{causes:#?}");
            assert!(causes[0].starts_with(path), "{causes:#?}");
            assert!(causes[0].ends_with(detail), "{causes:#?}");
        };

        let items = vec![(0..50).collect::<Vec<i64>>(); 2000];
        stopped(
            validate(&s, &json!({"items": items, "last": 1}), None),
            "items[",
            r#": Invalid value: "array": validation failed due to running out of cost budget, no further validation rules will be run"#,
        );
        // Fewer items pass, and the last rule runs.
        let items = vec![(0..50).collect::<Vec<i64>>(); 100];
        assert_eq!(
            rendered(validate(&s, &json!({"items": items, "last": 1}), None)),
            vec![r#"last: Invalid value: "integer": failed rule: self < 0"#]
        );
        stopped(
            validate(
                &s,
                &json!({"big": (0..3000).collect::<Vec<_>>(), "last": 1}),
                None,
            ),
            "big: ",
            r#"Invalid value: "array": 'operation cancelled: actual cost limit exceeded': no further validation rules will be run due to call cost exceeds limit for rule: self.all(x, self.exists_one(y, y == x))"#,
        );
    }
}
