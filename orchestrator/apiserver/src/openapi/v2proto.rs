//! The Swagger 2.0 document as protobuf: gnostic's `openapi.v2.Document`
//! message, which client-go asks `/openapi/v2` for
//! (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`) and
//! kube-apiserver serves.
//!
//! kubectl needs it whenever server-side field validation cannot vouch for
//! an object: for a kind the server does not serve (or a `List`) it falls
//! back to client-side validation with this document, and without it stops
//! with "failed to download openapi" before it ever tells the user that the
//! kind does not exist.
//!
//! The JSON document is re-encoded field by field, as gnostic's compiler
//! maps Swagger 2.0 onto its messages: `x-` keys become vendor extensions
//! and every free-form value (`default`, `enum`, `example`, extensions) an
//! `Any` holding its YAML. Field numbers are those of gnostic's
//! `openapiv2/OpenAPIv2.proto`. Keys the messages have no field for are
//! left out, as the message cannot hold them.

use prost::encoding;
use serde_json::Value;

/// A protobuf message being written.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn bytes(&mut self, field: u32, bytes: &[u8]) {
        encoding::encode_key(field, encoding::WireType::LengthDelimited, &mut self.0);
        encoding::encode_varint(bytes.len() as u64, &mut self.0);
        self.0.extend_from_slice(bytes);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn message(&mut self, field: u32, m: Message) {
        self.bytes(field, &m.0);
    }

    fn bool(&mut self, field: u32, b: bool) {
        encoding::bool::encode(field, &b, &mut self.0);
    }

    fn int64(&mut self, field: u32, i: i64) {
        encoding::int64::encode(field, &i, &mut self.0);
    }

    fn double(&mut self, field: u32, d: f64) {
        encoding::double::encode(field, &d, &mut self.0);
    }

    /// One JSON value as the field `field` of kind `kind`; values of
    /// another shape are left out.
    fn field(&mut self, field: u32, kind: Kind, value: &Value) {
        match kind {
            Kind::Str => {
                if let Some(s) = value.as_str() {
                    self.string(field, s);
                }
            }
            Kind::Bool => {
                if let Some(b) = value.as_bool() {
                    self.bool(field, b);
                }
            }
            Kind::Double => {
                if let Some(d) = value.as_f64() {
                    self.double(field, d);
                }
            }
            Kind::Int => {
                if let Some(i) = value.as_i64() {
                    self.int64(field, i);
                }
            }
            Kind::Strs => {
                for s in value
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    self.string(field, s);
                }
            }
            Kind::Any => self.message(field, any(value)),
            Kind::Anys => {
                for v in value.as_array().into_iter().flatten() {
                    self.message(field, any(v));
                }
            }
            Kind::One(to_message) => {
                if let Some(m) = to_message(value) {
                    self.message(field, m);
                }
            }
            Kind::Many(to_message) => {
                for m in value
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(to_message)
                {
                    self.message(field, m);
                }
            }
        }
    }
}

/// How a JSON value is written.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Double,
    Int,
    /// An array of strings, as a repeated string.
    Strs,
    /// Any value, as an `Any` with its YAML.
    Any,
    Anys,
    /// A message; `None` leaves it out.
    One(fn(&Value) -> Option<Message>),
    /// An array, as a repeated message.
    Many(fn(&Value) -> Option<Message>),
}

use Kind::*;

type Fields = &'static [(&'static str, u32, Kind)];

/// The validation keywords that parameters, headers and primitive items
/// share, in this order and numbered consecutively in each message.
const PRIMITIVE: Fields = &[
    ("type", 0, Str),
    ("format", 1, Str),
    ("items", 2, One(primitives_items)),
    ("collectionFormat", 3, Str),
    ("default", 4, Any),
    ("maximum", 5, Double),
    ("exclusiveMaximum", 6, Bool),
    ("minimum", 7, Double),
    ("exclusiveMinimum", 8, Bool),
    ("maxLength", 9, Int),
    ("minLength", 10, Int),
    ("pattern", 11, Str),
    ("maxItems", 12, Int),
    ("minItems", 13, Int),
    ("uniqueItems", 14, Bool),
    ("enum", 15, Anys),
    ("multipleOf", 16, Double),
];

/// A message's fields: `fields`, then (from field number `primitive`) the
/// shared validation keywords, and `x-` keys as vendor extensions at
/// `extensions`.
struct Shape {
    fields: Fields,
    primitive: Option<u32>,
    extensions: Option<u32>,
}

const fn shape(fields: Fields, extensions: Option<u32>) -> Shape {
    Shape {
        fields,
        primitive: None,
        extensions,
    }
}

fn encode(value: &Value, shape: &Shape) -> Option<Message> {
    let object = value.as_object()?;
    let mut m = Message::default();
    for (key, value) in object {
        if key.starts_with("x-") {
            if let Some(field) = shape.extensions {
                m.message(field, named(key, any(value)));
            }
            continue;
        }
        let known = |fields: Fields| fields.iter().find(|(k, ..)| *k == key.as_str());
        if let Some((_, field, kind)) = known(shape.fields) {
            m.field(*field, *kind, value);
        } else if let Some(base) = shape.primitive {
            if let Some((_, offset, kind)) = known(PRIMITIVE) {
                m.field(base + offset, *kind, value);
            }
        }
    }
    Some(m)
}

/// A `Named*` entry: the key at 1, the value at 2.
fn named(name: &str, value: Message) -> Message {
    let mut m = Message::default();
    m.string(1, name);
    m.message(2, value);
    m
}

/// A JSON object as a map message: each entry a `Named*` at `field`, `x-`
/// keys vendor extensions at `extensions` where the message has them.
fn map(
    value: &Value,
    field: u32,
    extensions: Option<u32>,
    each: fn(&Value) -> Option<Message>,
) -> Option<Message> {
    let object = value.as_object()?;
    let mut m = Message::default();
    for (key, value) in object {
        match extensions {
            Some(ext) if key.starts_with("x-") => m.message(ext, named(key, any(value))),
            _ => {
                if let Some(v) = each(value) {
                    m.message(field, named(key, v));
                }
            }
        }
    }
    Some(m)
}

/// `Any`: the value as YAML (field 2), as gnostic keeps free-form values.
fn any(value: &Value) -> Message {
    let yaml = serde_yaml::to_string(value).unwrap_or_else(|_| value.to_string());
    let mut m = Message::default();
    m.string(2, &yaml);
    m
}

fn any_message(value: &Value) -> Option<Message> {
    Some(any(value))
}

/// The whole document.
pub fn document(doc: &Value) -> Vec<u8> {
    const DOCUMENT: Shape = shape(
        &[
            ("swagger", 1, Str),
            ("info", 2, One(info)),
            ("host", 3, Str),
            ("basePath", 4, Str),
            ("schemes", 5, Strs),
            ("consumes", 6, Strs),
            ("produces", 7, Strs),
            ("paths", 8, One(paths)),
            ("definitions", 9, One(properties)),
            ("parameters", 10, One(parameter_definitions)),
            ("responses", 11, One(response_definitions)),
            ("security", 12, Many(security_requirement)),
            ("securityDefinitions", 13, One(security_definitions)),
            ("tags", 14, Many(tag)),
            ("externalDocs", 15, One(external_docs)),
        ],
        Some(16),
    );
    encode(doc, &DOCUMENT).unwrap_or_default().0
}

fn info(v: &Value) -> Option<Message> {
    const INFO: Shape = shape(
        &[
            ("title", 1, Str),
            ("version", 2, Str),
            ("description", 3, Str),
            ("termsOfService", 4, Str),
            ("contact", 5, One(contact)),
            ("license", 6, One(license)),
        ],
        Some(7),
    );
    encode(v, &INFO)
}

fn contact(v: &Value) -> Option<Message> {
    const CONTACT: Shape = shape(
        &[("name", 1, Str), ("url", 2, Str), ("email", 3, Str)],
        Some(4),
    );
    encode(v, &CONTACT)
}

fn license(v: &Value) -> Option<Message> {
    const LICENSE: Shape = shape(&[("name", 1, Str), ("url", 2, Str)], Some(3));
    encode(v, &LICENSE)
}

fn external_docs(v: &Value) -> Option<Message> {
    const EXTERNAL_DOCS: Shape = shape(&[("description", 1, Str), ("url", 2, Str)], Some(3));
    encode(v, &EXTERNAL_DOCS)
}

fn tag(v: &Value) -> Option<Message> {
    const TAG: Shape = shape(
        &[
            ("name", 1, Str),
            ("description", 2, Str),
            ("externalDocs", 3, One(external_docs)),
        ],
        Some(4),
    );
    encode(v, &TAG)
}

fn json_reference(v: &Value) -> Option<Message> {
    const JSON_REFERENCE: Shape = shape(&[("$ref", 1, Str), ("description", 2, Str)], None);
    encode(v, &JSON_REFERENCE)
}

/// `Paths`: vendor extensions at 1, the paths at 2.
fn paths(v: &Value) -> Option<Message> {
    map(v, 2, Some(1), path_item)
}

fn path_item(v: &Value) -> Option<Message> {
    const PATH_ITEM: Shape = shape(
        &[
            ("$ref", 1, Str),
            ("get", 2, One(operation)),
            ("put", 3, One(operation)),
            ("post", 4, One(operation)),
            ("delete", 5, One(operation)),
            ("options", 6, One(operation)),
            ("head", 7, One(operation)),
            ("patch", 8, One(operation)),
            ("parameters", 9, Many(parameters_item)),
        ],
        Some(10),
    );
    encode(v, &PATH_ITEM)
}

fn operation(v: &Value) -> Option<Message> {
    const OPERATION: Shape = shape(
        &[
            ("tags", 1, Strs),
            ("summary", 2, Str),
            ("description", 3, Str),
            ("externalDocs", 4, One(external_docs)),
            ("operationId", 5, Str),
            ("produces", 6, Strs),
            ("consumes", 7, Strs),
            ("parameters", 8, Many(parameters_item)),
            ("responses", 9, One(responses)),
            ("schemes", 10, Strs),
            ("deprecated", 11, Bool),
            ("security", 12, Many(security_requirement)),
        ],
        Some(13),
    );
    encode(v, &OPERATION)
}

/// `ParametersItem`: a parameter (1) or a reference to one (2).
fn parameters_item(v: &Value) -> Option<Message> {
    let mut m = Message::default();
    if v.get("$ref").is_some() {
        m.message(2, json_reference(v)?);
    } else {
        m.message(1, parameter(v)?);
    }
    Some(m)
}

/// `Parameter`: a body parameter (1) or, by where it goes, one of the
/// others (2).
fn parameter(v: &Value) -> Option<Message> {
    const BODY: Shape = shape(
        &[
            ("description", 1, Str),
            ("name", 2, Str),
            ("in", 3, Str),
            ("required", 4, Bool),
            ("schema", 5, One(schema)),
        ],
        Some(6),
    );
    // Header and path parameters number their fields alike, and so do
    // query and form parameters, which add allowEmptyValue.
    const HEADER_OR_PATH: Shape = Shape {
        fields: &[
            ("required", 1, Bool),
            ("in", 2, Str),
            ("description", 3, Str),
            ("name", 4, Str),
        ],
        primitive: Some(5),
        extensions: Some(22),
    };
    const QUERY_OR_FORM: Shape = Shape {
        fields: &[
            ("required", 1, Bool),
            ("in", 2, Str),
            ("description", 3, Str),
            ("name", 4, Str),
            ("allowEmptyValue", 5, Bool),
        ],
        primitive: Some(6),
        extensions: Some(23),
    };
    let mut m = Message::default();
    let (field, shape) = match v.get("in").and_then(Value::as_str)? {
        "body" => {
            m.message(1, encode(v, &BODY)?);
            return Some(m);
        }
        "header" => (1, &HEADER_OR_PATH),
        "formData" => (2, &QUERY_OR_FORM),
        "query" => (3, &QUERY_OR_FORM),
        "path" => (4, &HEADER_OR_PATH),
        _ => return None,
    };
    let mut non_body = Message::default();
    non_body.message(field, encode(v, shape)?);
    m.message(2, non_body);
    Some(m)
}

fn primitives_items(v: &Value) -> Option<Message> {
    const PRIMITIVES_ITEMS: Shape = Shape {
        fields: &[],
        primitive: Some(1),
        extensions: Some(18),
    };
    encode(v, &PRIMITIVES_ITEMS)
}

/// `Responses`: the responses by code at 1, vendor extensions at 2.
fn responses(v: &Value) -> Option<Message> {
    map(v, 1, Some(2), response_value)
}

/// `ResponseValue`: a response (1) or a reference to one (2).
fn response_value(v: &Value) -> Option<Message> {
    let mut m = Message::default();
    if v.get("$ref").is_some() {
        m.message(2, json_reference(v)?);
    } else {
        m.message(1, response(v)?);
    }
    Some(m)
}

fn response(v: &Value) -> Option<Message> {
    const RESPONSE: Shape = shape(
        &[
            ("description", 1, Str),
            ("schema", 2, One(schema_item)),
            ("headers", 3, One(headers)),
            ("examples", 4, One(examples)),
        ],
        Some(5),
    );
    encode(v, &RESPONSE)
}

/// `SchemaItem`: a schema (1), or a file (2).
fn schema_item(v: &Value) -> Option<Message> {
    const FILE_SCHEMA: Shape = shape(
        &[
            ("format", 1, Str),
            ("title", 2, Str),
            ("description", 3, Str),
            ("default", 4, Any),
            ("required", 5, Strs),
            ("type", 6, Str),
            ("readOnly", 7, Bool),
            ("externalDocs", 8, One(external_docs)),
            ("example", 9, Any),
        ],
        Some(10),
    );
    let mut m = Message::default();
    if v.get("type").and_then(Value::as_str) == Some("file") {
        m.message(2, encode(v, &FILE_SCHEMA)?);
    } else {
        m.message(1, schema(v)?);
    }
    Some(m)
}

fn headers(v: &Value) -> Option<Message> {
    map(v, 1, None, header)
}

fn header(v: &Value) -> Option<Message> {
    const HEADER: Shape = Shape {
        fields: &[("description", 18, Str)],
        primitive: Some(1),
        extensions: Some(19),
    };
    encode(v, &HEADER)
}

fn examples(v: &Value) -> Option<Message> {
    map(v, 1, None, any_message)
}

fn parameter_definitions(v: &Value) -> Option<Message> {
    map(v, 1, None, parameter)
}

fn response_definitions(v: &Value) -> Option<Message> {
    map(v, 1, None, response)
}

fn schema(v: &Value) -> Option<Message> {
    const SCHEMA: Shape = shape(
        &[
            ("$ref", 1, Str),
            ("format", 2, Str),
            ("title", 3, Str),
            ("description", 4, Str),
            ("default", 5, Any),
            ("multipleOf", 6, Double),
            ("maximum", 7, Double),
            ("exclusiveMaximum", 8, Bool),
            ("minimum", 9, Double),
            ("exclusiveMinimum", 10, Bool),
            ("maxLength", 11, Int),
            ("minLength", 12, Int),
            ("pattern", 13, Str),
            ("maxItems", 14, Int),
            ("minItems", 15, Int),
            ("uniqueItems", 16, Bool),
            ("maxProperties", 17, Int),
            ("minProperties", 18, Int),
            ("required", 19, Strs),
            ("enum", 20, Anys),
            ("additionalProperties", 21, One(additional_properties)),
            ("type", 22, One(type_item)),
            ("items", 23, One(items_item)),
            ("allOf", 24, Many(schema)),
            ("properties", 25, One(properties)),
            ("discriminator", 26, Str),
            ("readOnly", 27, Bool),
            ("xml", 28, One(xml)),
            ("externalDocs", 29, One(external_docs)),
            ("example", 30, Any),
        ],
        Some(31),
    );
    encode(v, &SCHEMA)
}

/// `Properties` and `Definitions`: named schemas at 1.
fn properties(v: &Value) -> Option<Message> {
    map(v, 1, None, schema)
}

/// `AdditionalPropertiesItem`: a schema (1) or a boolean (2).
fn additional_properties(v: &Value) -> Option<Message> {
    let mut m = Message::default();
    match v {
        Value::Bool(b) => m.bool(2, *b),
        _ => m.message(1, schema(v)?),
    }
    Some(m)
}

/// `TypeItem`: one type or several, repeated at 1.
fn type_item(v: &Value) -> Option<Message> {
    let mut m = Message::default();
    match v {
        Value::String(t) => m.string(1, t),
        _ => m.field(1, Strs, v),
    }
    Some(m)
}

/// `ItemsItem`: one schema or several, repeated at 1.
fn items_item(v: &Value) -> Option<Message> {
    let mut m = Message::default();
    match v {
        Value::Array(_) => m.field(1, Many(schema), v),
        _ => m.message(1, schema(v)?),
    }
    Some(m)
}

fn xml(v: &Value) -> Option<Message> {
    const XML: Shape = shape(
        &[
            ("name", 1, Str),
            ("namespace", 2, Str),
            ("prefix", 3, Str),
            ("attribute", 4, Bool),
            ("wrapped", 5, Bool),
        ],
        Some(6),
    );
    encode(v, &XML)
}

/// `SecurityRequirement`: scheme name → scopes, as named string arrays.
fn security_requirement(v: &Value) -> Option<Message> {
    map(v, 1, None, |scopes| {
        let mut m = Message::default();
        m.field(1, Strs, scopes);
        Some(m)
    })
}

fn security_definitions(v: &Value) -> Option<Message> {
    map(v, 1, None, security_definitions_item)
}

/// `SecurityDefinitionsItem`: one message per kind of scheme, by its type
/// and, for OAuth2, its flow.
fn security_definitions_item(v: &Value) -> Option<Message> {
    const BASIC: Shape = shape(&[("type", 1, Str), ("description", 2, Str)], Some(3));
    const API_KEY: Shape = shape(
        &[
            ("type", 1, Str),
            ("name", 2, Str),
            ("in", 3, Str),
            ("description", 4, Str),
        ],
        Some(5),
    );
    const OAUTH2_IMPLICIT: Shape = shape(
        &[
            ("type", 1, Str),
            ("flow", 2, Str),
            ("scopes", 3, One(oauth2_scopes)),
            ("authorizationUrl", 4, Str),
            ("description", 5, Str),
        ],
        Some(6),
    );
    // The password and application flows number their fields alike.
    const OAUTH2_TOKEN: Shape = shape(
        &[
            ("type", 1, Str),
            ("flow", 2, Str),
            ("scopes", 3, One(oauth2_scopes)),
            ("tokenUrl", 4, Str),
            ("description", 5, Str),
        ],
        Some(6),
    );
    const OAUTH2_ACCESS_CODE: Shape = shape(
        &[
            ("type", 1, Str),
            ("flow", 2, Str),
            ("scopes", 3, One(oauth2_scopes)),
            ("authorizationUrl", 4, Str),
            ("tokenUrl", 5, Str),
            ("description", 6, Str),
        ],
        Some(7),
    );
    let (field, shape) = match (
        v.get("type").and_then(Value::as_str)?,
        v.get("flow").and_then(Value::as_str),
    ) {
        ("basic", _) => (1, &BASIC),
        ("apiKey", _) => (2, &API_KEY),
        ("oauth2", Some("implicit")) => (3, &OAUTH2_IMPLICIT),
        ("oauth2", Some("password")) => (4, &OAUTH2_TOKEN),
        ("oauth2", Some("application")) => (5, &OAUTH2_TOKEN),
        ("oauth2", Some("accessCode")) => (6, &OAUTH2_ACCESS_CODE),
        _ => return None,
    };
    let mut m = Message::default();
    m.message(field, encode(v, shape)?);
    Some(m)
}

/// `Oauth2Scopes`: scope → description, as named strings.
fn oauth2_scopes(v: &Value) -> Option<Message> {
    let object = v.as_object()?;
    let mut m = Message::default();
    for (scope, description) in object {
        let mut entry = Message::default();
        entry.string(1, scope);
        entry.string(2, description.as_str().unwrap_or_default());
        m.message(1, entry);
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The fields of one message: (number, wire type, payload); varints
    /// and fixed64s as their little-endian bytes.
    fn fields(mut bytes: &[u8]) -> Vec<(u32, u8, Vec<u8>)> {
        fn varint(bytes: &mut &[u8]) -> u64 {
            prost::encoding::decode_varint(bytes).expect("a varint")
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let key = varint(&mut bytes);
            let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
            let payload = match wire {
                0 => varint(&mut bytes).to_le_bytes().to_vec(),
                1 => {
                    let (v, rest) = bytes.split_at(8);
                    bytes = rest;
                    v.to_vec()
                }
                2 => {
                    let len = varint(&mut bytes) as usize;
                    let (v, rest) = bytes.split_at(len);
                    bytes = rest;
                    v.to_vec()
                }
                other => panic!("unexpected wire type {other}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn get(bytes: &[u8], field: u32) -> Vec<Vec<u8>> {
        fields(bytes)
            .into_iter()
            .filter(|(f, ..)| *f == field)
            .map(|(.., p)| p)
            .collect()
    }

    fn one(bytes: &[u8], field: u32) -> Vec<u8> {
        let mut all = get(bytes, field);
        assert_eq!(all.len(), 1, "field {field} of {bytes:?}");
        all.remove(0)
    }

    fn text(bytes: &[u8], field: u32) -> String {
        String::from_utf8(one(bytes, field)).expect("UTF-8")
    }

    #[test]
    fn encodes_definitions_paths_and_extensions_as_gnostic_does() {
        let doc = json!({
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": "v1.33.0"},
            "paths": {
                "/api/v1/namespaces/{namespace}/pods/{name}": {
                    "parameters": [
                        {"name": "name", "in": "path", "required": true, "type": "string", "uniqueItems": true},
                        {"name": "pretty", "in": "query", "type": "string"},
                    ],
                    "patch": {
                        "operationId": "patchCoreV1NamespacedPod",
                        "consumes": ["application/apply-patch+yaml"],
                        "parameters": [
                            {"name": "body", "in": "body", "required": true,
                             "schema": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}},
                            {"name": "fieldValidation", "in": "query", "type": "string", "uniqueItems": true},
                        ],
                        "responses": {"200": {"description": "OK",
                            "schema": {"$ref": "#/definitions/io.k8s.api.core.v1.Pod"}}},
                        "x-kubernetes-action": "patch",
                        "x-kubernetes-group-version-kind": {"group": "", "kind": "Pod", "version": "v1"},
                    },
                },
            },
            "definitions": {
                "io.k8s.api.core.v1.Pod": {
                    "description": "Pod is a collection of containers.",
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "spec": {"$ref": "#/definitions/io.k8s.api.core.v1.PodSpec"},
                        "replicas": {"type": "integer", "format": "int32", "minimum": -1},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "ports": {"type": "array", "items": {"type": "integer"}},
                    },
                    "x-kubernetes-group-version-kind": [{"group": "", "kind": "Pod", "version": "v1"}],
                },
            },
            "securityDefinitions": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header"}},
            "security": [{"BearerToken": []}],
        });
        let bytes = document(&doc);
        assert_eq!(text(&bytes, 1), "2.0");
        assert_eq!(text(&one(&bytes, 2), 2), "v1.33.0");

        // definitions → NamedSchema{name, Schema}
        let named = one(&one(&bytes, 9), 1);
        assert_eq!(text(&named, 1), "io.k8s.api.core.v1.Pod");
        let pod = one(&named, 2);
        assert_eq!(text(&one(&pod, 22), 1), "object");
        assert_eq!(text(&pod, 19), "spec");
        let ext = one(&pod, 31);
        assert_eq!(text(&ext, 1), "x-kubernetes-group-version-kind");
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&text(&one(&ext, 2), 2)).expect("extension YAML");
        assert_eq!(yaml[0]["kind"].as_str(), Some("Pod"));
        let props = get(&one(&pod, 25), 1);
        assert_eq!(props.len(), 4);
        let prop = |name: &str| {
            let p = props.iter().find(|p| text(p, 1) == name).expect("property");
            one(p, 2)
        };
        assert_eq!(
            text(&prop("spec"), 1),
            "#/definitions/io.k8s.api.core.v1.PodSpec"
        );
        assert_eq!(one(&prop("replicas"), 9), (-1f64).to_le_bytes());
        let values = one(&one(&prop("labels"), 21), 1);
        assert_eq!(text(&one(&values, 22), 1), "string");
        let items = one(&prop("ports"), 23);
        assert_eq!(text(&one(&one(&items, 1), 22), 1), "integer");

        // paths → NamedPathItem{name, PathItem}
        let path = one(&one(&bytes, 8), 2);
        assert_eq!(text(&path, 1), "/api/v1/namespaces/{namespace}/pods/{name}");
        let item = one(&path, 2);
        let common = get(&item, 9);
        // path parameter: ParametersItem.parameter.non_body.path
        let path_param = one(&one(&one(&common[0], 1), 2), 4);
        assert_eq!(text(&path_param, 4), "name");
        assert_eq!(one(&path_param, 1)[0], 1, "required");
        assert_eq!(text(&path_param, 5), "string");
        assert_eq!(one(&path_param, 19)[0], 1, "uniqueItems");
        let query_param = one(&one(&one(&common[1], 1), 2), 3);
        assert_eq!(text(&query_param, 6), "string");
        let patch = one(&item, 8);
        assert_eq!(text(&patch, 5), "patchCoreV1NamespacedPod");
        assert_eq!(text(&patch, 7), "application/apply-patch+yaml");
        let params = get(&patch, 8);
        let body = one(&one(&params[0], 1), 1);
        assert_eq!(text(&body, 3), "body");
        assert_eq!(
            text(&one(&body, 5), 1),
            "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"
        );
        assert_eq!(
            text(&one(&one(&one(&params[1], 1), 2), 3), 4),
            "fieldValidation"
        );
        let ok = one(&one(&patch, 9), 1);
        assert_eq!(text(&ok, 1), "200");
        let response = one(&one(&ok, 2), 1);
        assert_eq!(text(&response, 1), "OK");
        assert_eq!(
            text(&one(&one(&response, 2), 1), 1),
            "#/definitions/io.k8s.api.core.v1.Pod"
        );
        let exts = get(&patch, 13);
        assert_eq!(exts.len(), 2);
        assert_eq!(text(&exts[0], 1), "x-kubernetes-action");

        // securityDefinitions → ApiKeySecurity; security → NamedStringArray
        let scheme = one(&one(&bytes, 13), 1);
        assert_eq!(text(&scheme, 1), "BearerToken");
        assert_eq!(text(&one(&one(&scheme, 2), 2), 2), "authorization");
        assert_eq!(text(&one(&one(&bytes, 12), 1), 1), "BearerToken");
    }
}
