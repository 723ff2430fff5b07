//! `additionalPrinterColumns` of a CRD version: the columns `kubectl get`
//! shows for its custom resources, computed as kube-apiserver's table
//! convertor computes them.
//!
//! [`PrinterColumns::compile`] checks a version's column list as CRD
//! validation does and compiles every column's JSONPath once;
//! [`PrinterColumns::definitions`] and [`PrinterColumns::cells`] then give a
//! Table's `columnDefinitions` and one row's cells. A version without columns
//! gets kube-apiserver's default, an `Age` column from
//! `.metadata.creationTimestamp`; the `Name` column always comes first.
//!
//! # JSONPath
//!
//! Columns are written in client-go's JSONPath dialect. It is parsed here as
//! client-go parses it and rewritten as an RFC 9535 query that `jsonpath-rust`
//! evaluates; a cell shows the first value the query selects. Supported:
//!
//! - fields: `.spec.replicas`, `\.` for a dot inside a key
//!   (`.metadata.labels.app\.kubernetes\.io/name`), `['key']`, `.*`
//! - indexes and slices: `[0]`, `[-1]`, `[1:3]`, `[::2]`, `[*]`, unions `[0,2]`
//! - recursive descent: `..image`, `..[0]`
//! - filters: `[?(@.type=="Ready")]` with `==`, `!=`, `<`, `>`, `<=`, `>=`
//!   between a single-valued path (fields and indexes) and a string, number
//!   or boolean, and existence filters `[?(@.reason)]`
//!
//! What client-go's parser refuses is refused here with its words. Also
//! refused, though client-go parses them, are forms that can never give a
//! column a value: literals outside filters, `range`/`end`, an unknown filter
//! operator, a slice step below 1, a `}` inside the path, a trailing `..`.
//!
//! client-go blanks the whole column when evaluation fails; here the failing
//! part selects nothing instead. That differs only where a filter compares
//! values of different types (client-go: no value; here: the element does
//! not match), where a slice or union reaches past the end of an array
//! (client-go: no value; here: the elements that exist), and where a filter
//! or `[*]` meets an object (client-go: no value; here: its member values).

use jsonpath_rust::parser::model::{JpQuery, Segment};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::{json, Value};
use tapestry_apimachinery::Cause;

/// ObjectMeta's `name` documentation, the Name column's description.
const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating \
resources, although some resources may allow a client to request the generation of an appropriate \
name automatically. Name is primarily intended for creation idempotence and configuration \
definition. Cannot be updated. More info: \
https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";

/// ObjectMeta's `creationTimestamp` documentation, the default Age column's description.
const CREATION_TIMESTAMP_DESCRIPTION: &str = "CreationTimestamp is a timestamp representing the \
server time when this object was created. It is not guaranteed to be set in happens-before order \
across separate operations. Clients may not set this value. It is represented in RFC3339 form and \
is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: \
https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

/// Column types, sorted as kube-apiserver lists them in its messages.
const TYPES: &str = "boolean,date,integer,number,string";

/// Column formats CRD validation allows, sorted likewise.
const FORMATS: [&str; 8] = [
    "byte",
    "date",
    "date-time",
    "double",
    "float",
    "int32",
    "int64",
    "password",
];

/// The printer columns of one CRD version, their JSONPaths compiled.
#[derive(Clone, Debug)]
pub struct PrinterColumns {
    columns: Vec<Column>,
}

#[derive(Clone, Debug)]
struct Column {
    name: String,
    kind: ColumnType,
    format: String,
    description: String,
    priority: i32,
    path: JpQuery,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColumnType {
    Boolean,
    Date,
    Integer,
    Number,
    String,
}

impl ColumnType {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "boolean" => ColumnType::Boolean,
            "date" => ColumnType::Date,
            "integer" => ColumnType::Integer,
            "number" => ColumnType::Number,
            "string" => ColumnType::String,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ColumnType::Boolean => "boolean",
            ColumnType::Date => "date",
            ColumnType::Integer => "integer",
            ColumnType::Number => "number",
            ColumnType::String => "string",
        }
    }
}

impl PrinterColumns {
    /// From the version's raw `additionalPrinterColumns` JSON (None or empty:
    /// the default columns kube-apiserver uses, i.e. Name and an Age column
    /// from `.metadata.creationTimestamp`). `path` is where the list sits in
    /// the CRD, e.g. `spec.versions[0].additionalPrinterColumns`, for error
    /// field paths. Like kube-apiserver, errors about the path name the
    /// field `JSONPath` (its internal spelling of `jsonPath`).
    pub fn compile(columns: Option<&Value>, path: &str) -> Result<PrinterColumns, Vec<Cause>> {
        let definitions = match columns {
            None | Some(Value::Null) => return Ok(PrinterColumns::default_columns()),
            Some(Value::Array(definitions)) if definitions.is_empty() => {
                return Ok(PrinterColumns::default_columns())
            }
            Some(Value::Array(definitions)) => definitions,
            Some(other) => {
                return Err(vec![Cause::type_invalid(
                    path,
                    other,
                    "must be of type array",
                )])
            }
        };
        let mut causes = Vec::new();
        let columns: Vec<Column> = definitions
            .iter()
            .enumerate()
            .filter_map(|(i, definition)| {
                Column::compile(definition, &format!("{path}[{i}]"), &mut causes)
            })
            .collect();
        if causes.is_empty() {
            Ok(PrinterColumns { columns })
        } else {
            Err(causes)
        }
    }

    /// `serveDefaultColumnsIfEmpty`: Age from the creation timestamp.
    fn default_columns() -> PrinterColumns {
        PrinterColumns {
            columns: vec![Column {
                name: "Age".into(),
                kind: ColumnType::Date,
                format: String::new(),
                description: CREATION_TIMESTAMP_DESCRIPTION.into(),
                priority: 0,
                path: JpQuery::new(vec![
                    Segment::name("metadata"),
                    Segment::name("creationTimestamp"),
                ]),
            }],
        }
    }

    /// `columnDefinitions` of the Table: Name first (type string, format
    /// name), then the columns.
    pub fn definitions(&self) -> Value {
        let name = json!({
            "name": "Name", "type": "string", "format": "name",
            "description": NAME_DESCRIPTION, "priority": 0,
        });
        std::iter::once(name)
            .chain(self.columns.iter().map(|c| {
                json!({
                    "name": c.name, "type": c.kind.name(), "format": c.format,
                    "description": c.description, "priority": c.priority,
                })
            }))
            .collect()
    }

    /// One row's cells for `obj`, in column order. `humanize_date` turns an
    /// RFC 3339 timestamp into the cell kube-apiserver shows for `date`
    /// columns.
    pub fn cells(&self, obj: &Value, humanize_date: &dyn Fn(&str) -> Value) -> Vec<Value> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        std::iter::once(Value::from(name))
            .chain(self.columns.iter().map(|c| c.cell(obj, humanize_date)))
            .collect()
    }
}

impl Column {
    /// One column definition, checked as `ValidateCustomResourceColumnDefinition`
    /// checks it; `at` is its field path. None when it has errors (in `causes`).
    fn compile(definition: &Value, at: &str, causes: &mut Vec<Cause>) -> Option<Column> {
        let Value::Object(fields) = definition else {
            causes.push(Cause::type_invalid(
                at,
                definition,
                "must be of type object",
            ));
            return None;
        };
        let found = causes.len();
        // Each is Some("") when absent, None when of the wrong type (reported).
        let mut text = |key: &str| match fields.get(key) {
            None | Some(Value::Null) => Some(""),
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                let field = format!("{at}.{key}");
                causes.push(Cause::type_invalid(field, other, "must be of type string"));
                None
            }
        };
        let (name, kind, format) = (text("name"), text("type"), text("format"));
        let (description, json_path) = (text("description"), text("jsonPath"));

        let priority = match fields.get("priority") {
            None | Some(Value::Null) => 0,
            Some(value) => match value.as_i64().and_then(|p| i32::try_from(p).ok()) {
                // kube-apiserver takes any int32, negative ones too.
                Some(priority) => priority,
                None => {
                    let field = format!("{at}.priority");
                    causes.push(Cause::type_invalid(
                        field,
                        value,
                        "must be a 32-bit integer",
                    ));
                    0
                }
            },
        };

        if name == Some("") {
            causes.push(Cause::required(format!("{at}.name")));
        }
        let kind = match kind {
            None => None,
            Some("") => {
                let detail = format!("must be one of {TYPES}");
                causes.push(Cause::required_because(format!("{at}.type"), detail));
                None
            }
            Some(kind) => ColumnType::parse(kind).or_else(|| {
                let detail = format!("must be one of {TYPES}");
                causes.push(Cause::invalid(format!("{at}.type"), &json!(kind), detail));
                None
            }),
        };
        if let Some(format) = format.filter(|f| !f.is_empty() && !FORMATS.contains(f)) {
            let detail = format!("must be one of {}", FORMATS.join(","));
            causes.push(Cause::invalid(
                format!("{at}.format"),
                &json!(format),
                detail,
            ));
        }
        let path_field = format!("{at}.JSONPath");
        let path = match json_path {
            None => None,
            Some("") => {
                causes.push(Cause::required(path_field));
                None
            }
            Some(p) if !p.starts_with('.') => {
                let detail = "must be a simple json path starting with .";
                causes.push(Cause::invalid(path_field, &json!(p), detail));
                None
            }
            Some(p) => match translate(p).and_then(|rfc| {
                parse_json_path(&rfc).map_err(|e| PathError::Unsupported(e.to_string()))
            }) {
                Ok(query) => Some(query),
                Err(e) => {
                    causes.push(Cause::invalid(path_field, &json!(p), e.detail()));
                    None
                }
            },
        };

        if causes.len() > found {
            return None;
        }
        let (name, format, json_path) = (name?, format?, json_path?);
        Some(Column {
            name: name.to_owned(),
            kind: kind?,
            format: format.to_owned(),
            description: match description? {
                "" => {
                    format!("Custom resource definition column (in JSONPath format): {json_path}")
                }
                description => description.to_owned(),
            },
            priority,
            path: path?,
        })
    }

    /// The cell for `obj`: the first value the path selects, converted as
    /// the table convertor converts it; null when the path selects nothing.
    fn cell(&self, obj: &Value, humanize_date: &dyn Fn(&str) -> Value) -> Value {
        let first = js_path_process(&self.path, obj)
            .ok()
            .and_then(|found| found.into_iter().next())
            .map(|found| found.val);
        let Some(value) = first else {
            return Value::Null;
        };
        match (self.kind, value) {
            // String columns print whatever they find, as the JSONPath printer does.
            (ColumnType::String, value) => Value::String(go_print(value)),
            (ColumnType::Integer, Value::Number(n)) => match n.as_i64() {
                Some(i) => Value::from(i),
                // Go truncates floats toward zero when it converts them.
                None => Value::from(n.as_f64().map_or(0, |f| f as i64)),
            },
            (ColumnType::Number, Value::Number(n)) => n.as_f64().map_or(Value::Null, json_float),
            (ColumnType::Boolean, Value::Bool(b)) => Value::Bool(*b),
            (ColumnType::Date, Value::String(s)) => date_cell(s, humanize_date),
            _ => Value::Null,
        }
    }
}

/// A float as Go's encoding/json writes it where it matters most: whole
/// numbers without a fraction (`3`, not `3.0`).
fn json_float(f: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if f.fract() == 0.0 && f.abs() < EXACT {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// A date cell: `<unknown>` for an empty or zero timestamp and `<invalid>`
/// for one that is not RFC 3339, as `metav1.Time` and the table convertor
/// treat them.
fn date_cell(timestamp: &str, humanize_date: &dyn Fn(&str) -> Value) -> Value {
    // Go's time.Time zero value, 0001-01-01T00:00:00Z, in Unix seconds.
    const GO_ZERO_TIME: i64 = -62_135_596_800;
    if timestamp.is_empty() || timestamp == "null" {
        return Value::from("<unknown>");
    }
    // Go's RFC 3339 layout wants an upper-case T and Z; chrono also takes lower case.
    let strict = timestamp.as_bytes().get(10) == Some(&b'T') && !timestamp.ends_with('z');
    match chrono::DateTime::parse_from_rfc3339(timestamp) {
        Ok(t) if strict => {
            if t.timestamp() == GO_ZERO_TIME && t.timestamp_subsec_nanos() == 0 {
                Value::from("<unknown>")
            } else {
                humanize_date(timestamp)
            }
        }
        _ => Value::from("<invalid>"),
    }
}

/// `fmt.Fprint` of the unstructured value, as client-go's JSONPath printer
/// writes it: strings bare, maps as `map[k:v ...]` with sorted keys, lists as
/// `[a b]`, a null found by the path as `<no value>`.
fn go_print(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Null => out.push_str("<nil>"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match n.as_i64() {
                Some(i) => out.push_str(&i.to_string()),
                // Beyond int64, Kubernetes' JSON decoding makes a float64.
                None => out.push_str(&go_float(n.as_f64().unwrap_or_default())),
            },
            Value::String(s) => out.push_str(s),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push_str("map[");
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(key);
                    out.push(':');
                    write(item, out);
                }
                out.push(']');
            }
        }
    }
    if value.is_null() {
        return "<no value>".into();
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// A float64 as Go's `%v` prints it: the shortest digits that round-trip, in
/// exponent form (`1e+06`, `1.5e-07`) when the exponent is below -4 or at
/// least 6, plain otherwise.
fn go_float(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits: "1.2345e-7".
    let scientific = format!("{:e}", f.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let mut out = String::from(if f < 0.0 { "-" } else { "" });
    if !(-4..6).contains(&exponent) {
        out.push(digits[0] as char);
        if digits.len() > 1 {
            out.push('.');
            out.extend(digits[1..].iter().map(|&d| d as char));
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        out.push_str(&format!("e{sign}{:02}", exponent.abs()));
    } else {
        // Position of the decimal point relative to the digits.
        let point = exponent + 1;
        let digit = |i: i32| {
            usize::try_from(i)
                .ok()
                .and_then(|i| digits.get(i))
                .map_or('0', |&d| d as char)
        };
        if point <= 0 {
            out.push('0');
        } else {
            out.extend((0..point).map(digit));
        }
        let fraction = digits.len() as i32 - point;
        if fraction > 0 {
            out.push('.');
            out.extend((point..point + fraction).map(digit));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// client-go JSONPath, parsed as client-go parses it and rewritten as RFC 9535.

#[derive(Debug, PartialEq)]
enum PathError {
    /// client-go's parser refuses it (its message).
    Invalid(String),
    /// client-go parses it, but it cannot give a column a value or has no
    /// RFC 9535 form.
    Unsupported(String),
}

impl PathError {
    fn detail(&self) -> String {
        match self {
            PathError::Invalid(why) => format!("invalid JSONPath: {why}"),
            PathError::Unsupported(why) => format!("unsupported JSONPath: {why}"),
        }
    }
}

fn invalid<T>(why: impl Into<String>) -> Result<T, PathError> {
    Err(PathError::Invalid(why.into()))
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, PathError> {
    Err(PathError::Unsupported(why.into()))
}

/// One node of client-go's parse tree.
#[derive(Debug, PartialEq)]
enum Node {
    Field(String),
    Wildcard,
    Index(i64),
    Slice(Option<i64>, Option<i64>, Option<i64>),
    Union(Vec<Vec<Node>>),
    Filter(Box<Filter>),
    Recursive,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Identifier(String),
}

/// `[?(left op right)]`, or `[?(left)]` (exists) when `comparison` is None.
#[derive(Debug, PartialEq)]
struct Filter {
    left: Vec<Node>,
    comparison: Option<(String, Vec<Node>)>,
}

/// A client-go JSONPath (without its `{}`) as an RFC 9535 query.
fn translate(path: &str) -> Result<String, PathError> {
    let nodes = Parser::parse(path)?;
    let mut query = String::from("$");
    render_path(&nodes, &mut query)?;
    Ok(query)
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    /// The nodes of one action, as `jsonpath.Parse("{" + text + "}")` reads it.
    fn parse(text: &str) -> Result<Vec<Node>, PathError> {
        let mut parser = Parser {
            input: text,
            pos: 0,
        };
        let mut nodes = Vec::new();
        loop {
            let rest = parser.rest();
            if rest.starts_with('}') {
                // client-go ends the action here and reads the rest as text.
                return unsupported("'}' ends the path early");
            }
            if rest.starts_with("[?(") {
                parser.pos += 3;
                nodes.push(Node::Filter(Box::new(parser.filter()?)));
                continue;
            }
            if rest.starts_with("..") {
                if nodes.last() == Some(&Node::Recursive) {
                    return invalid("invalid multiple recursive descent");
                }
                parser.pos += 2;
                nodes.push(Node::Recursive);
                if parser.peek().is_some_and(is_alphanumeric) {
                    nodes.push(parser.field());
                }
                continue;
            }
            let Some(c) = parser.bump() else {
                return Ok(nodes);
            };
            match c {
                '\r' | '\n' => return invalid("unclosed action"),
                ' ' | '@' | '$' => {}
                '[' => nodes.extend(parser.array()?),
                '"' | '\'' => nodes.push(Node::Text(parser.quoted(c)?)),
                '.' => nodes.push(parser.field()),
                '+' | '-' | '0'..='9' => {
                    parser.pos -= 1;
                    nodes.push(parser.number()?);
                }
                c if is_alphanumeric(c) => {
                    parser.pos -= c.len_utf8();
                    nodes.push(parser.identifier());
                }
                c => return invalid(format!("unrecognized character in action: {}", go_rune(c))),
            }
        }
    }

    fn rest(&self) -> &str {
        &self.input[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// The character before the one just read.
    fn before_last(&self, last: char) -> Option<char> {
        self.input[..self.pos - last.len_utf8()].chars().next_back()
    }

    /// A field name after `.`: up to an unescaped terminator, backslashes dropped.
    fn field(&mut self) -> Node {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == '\\' {
                self.pos += 1;
                if let Some(escaped) = self.peek() {
                    self.pos += escaped.len_utf8();
                }
            } else if is_terminator(c) {
                break;
            } else {
                self.pos += c.len_utf8();
            }
        }
        match &self.input[start..self.pos] {
            "*" => Node::Wildcard,
            raw => Node::Field(raw.replace('\\', "")),
        }
    }

    fn identifier(&mut self) -> Node {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|&c| !is_terminator(c)) {
            self.pos += c.len_utf8();
        }
        match &self.input[start..self.pos] {
            "true" => Node::Bool(true),
            "false" => Node::Bool(false),
            name => Node::Identifier(name.to_owned()),
        }
    }

    fn number(&mut self) -> Result<Node, PathError> {
        let start = self.pos;
        if matches!(self.peek(), Some('+' | '-')) {
            self.pos += 1;
        }
        while matches!(self.peek(), Some('.' | '0'..='9')) {
            self.pos += 1;
        }
        let text = &self.input[start..self.pos];
        if let Ok(i) = text.parse() {
            return Ok(Node::Int(i));
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Node::Float(f)),
            _ => invalid(format!("cannot parse number {text}")),
        }
    }

    /// A quoted string; the opening quote has been read.
    fn quoted(&mut self, quote: char) -> Result<String, PathError> {
        let start = self.pos - 1;
        loop {
            match self.bump() {
                None | Some('\n') => return invalid("unterminated quoted string"),
                Some(c) if c == quote && self.before_last(c) != Some('\\') => break,
                Some(_) => {}
            }
        }
        let raw = &self.input[start..self.pos];
        unquote(&raw[1..raw.len() - 1], quote)
            .ok_or_else(|| PathError::Invalid(format!("unquote string {raw} error invalid syntax")))
    }

    /// `[...]` after its `[`: an index, slice, union or `'key'`.
    fn array(&mut self) -> Result<Vec<Node>, PathError> {
        let start = self.pos;
        loop {
            match self.bump() {
                None | Some('\n') => return invalid("unterminated array"),
                Some(']') => break,
                Some(_) => {}
            }
        }
        let text = match &self.input[start..self.pos - 1] {
            "*" => ":",
            text => text,
        };
        if text.contains(',') {
            let branches = text
                .split(',')
                .map(|part| Parser::parse(&format!("[{}]", part.trim_matches(' '))))
                .collect::<Result<_, _>>()?;
            return Ok(vec![Node::Union(branches)]);
        }
        if let Some(key) = text
            .strip_prefix('\'')
            .and_then(|t| t.strip_suffix('\''))
            .filter(|key| !key.contains('\''))
        {
            // client-go reads ['a.b'] as .a.b: a key with dots needs `\.`.
            return Parser::parse(&format!(".{key}"));
        }
        let parts: Vec<&str> = text.split(':').collect();
        let is_int = |p: &str| {
            p.strip_prefix('-')
                .unwrap_or(p)
                .bytes()
                .all(|b| b.is_ascii_digit())
        };
        if parts.len() > 3 || !parts.iter().all(|p| is_int(p)) {
            return invalid(format!("invalid array index {text}"));
        }
        let number = |p: &str| -> Result<Option<i64>, PathError> {
            if p.is_empty() {
                return Ok(None);
            }
            p.parse()
                .map(Some)
                .map_err(|_| PathError::Invalid(format!("array index {p} is not a number")))
        };
        let start = number(parts[0])?;
        if parts.len() == 1 {
            return Ok(vec![Node::Index(start.unwrap_or(0))]);
        }
        let end = number(parts[1])?;
        let step = number(parts.get(2).copied().unwrap_or(""))?;
        Ok(vec![Node::Slice(start, end, step)])
    }

    /// `[?(...)]` after its `[?(`.
    fn filter(&mut self) -> Result<Filter, PathError> {
        let start = self.pos;
        // Like client-go: a `)` ends the filter unless a quote is open.
        let (mut opened, mut closed, mut pair) = (false, false, '"');
        loop {
            match self.bump() {
                None | Some('\n') => return invalid("unterminated filter"),
                Some(c @ ('"' | '\'')) => {
                    if !opened {
                        (opened, pair) = (true, c);
                    } else if c == pair && self.before_last(c) != Some('\\') {
                        closed = true;
                    }
                }
                Some(')') if opened == closed => break,
                Some(_) => {}
            }
        }
        let text = &self.input[start..self.pos - 1];
        if self.bump() != Some(']') {
            return invalid("unclosed array expect ]");
        }
        Ok(match split_comparison(text) {
            None => Filter {
                left: Parser::parse(text)?,
                comparison: None,
            },
            Some((left, op, right)) => Filter {
                left: Parser::parse(left)?,
                comparison: Some((op.to_owned(), Parser::parse(right)?)),
            },
        })
    }
}

/// `^([^!<>=]+)([!<>=]+)(.+?)$`, the split client-go makes of a filter.
fn split_comparison(text: &str) -> Option<(&str, &str, &str)> {
    let is_op = |c: char| matches!(c, '!' | '<' | '>' | '=');
    let op_start = text.find(is_op).filter(|&i| i > 0)?;
    let op_len = text[op_start..]
        .find(|c| !is_op(c))
        .unwrap_or(text.len() - op_start);
    let mut op_end = op_start + op_len;
    if op_end == text.len() {
        // The right side needs a character: the operator gives back its last.
        if op_len < 2 {
            return None;
        }
        op_end -= 1;
    }
    Some((&text[..op_start], &text[op_start..op_end], &text[op_end..]))
}

fn is_terminator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t' | '\r' | '\n' | '.' | ',' | '[' | ']' | '$' | '@' | '{' | '}'
    )
}

fn is_alphanumeric(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Go's `%#U`: `U+0023 '#'`.
fn go_rune(c: char) -> String {
    if c.is_control() {
        format!("U+{:04X}", c as u32)
    } else {
        format!("U+{:04X} '{c}'", c as u32)
    }
}

/// The inside of a quoted string, unescaped as Go's `strconv.UnquoteChar`
/// does; None where Go reports a syntax error (or would make invalid UTF-8).
fn unquote(inside: &str, quote: char) -> Option<String> {
    let mut out = String::with_capacity(inside.len());
    let mut chars = inside.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let unescaped = match chars.next()? {
            'a' => '\u{7}',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\u{b}',
            '\\' => '\\',
            c @ ('\'' | '"') if c == quote => c,
            'x' => hex(&mut chars, 2).filter(char::is_ascii)?,
            'u' => hex(&mut chars, 4)?,
            'U' => hex(&mut chars, 8)?,
            first @ '0'..='7' => {
                let rest: String = chars.by_ref().take(2).collect();
                let value = u32::from_str_radix(&format!("{first}{rest}"), 8).ok()?;
                if rest.len() != 2 || value > 0x7f {
                    return None;
                }
                char::from_u32(value)?
            }
            _ => return None,
        };
        out.push(unescaped);
    }
    Some(out)
}

/// The character spelled by the next `n` hex digits.
fn hex(chars: &mut std::str::Chars, n: usize) -> Option<char> {
    let digits: String = chars.take(n).collect();
    if digits.len() != n {
        return None;
    }
    char::from_u32(u32::from_str_radix(&digits, 16).ok()?)
}

/// The largest integer an RFC 9535 query may spell.
const MAX_QUERY_INT: i64 = (1 << 53) - 1;

fn query_int(i: i64) -> Result<String, PathError> {
    if i.unsigned_abs() > MAX_QUERY_INT.unsigned_abs() {
        return unsupported(format!("array index {i} is out of range"));
    }
    Ok(i.to_string())
}

/// Appends the RFC 9535 segments for a node list.
fn render_path(nodes: &[Node], out: &mut String) -> Result<(), PathError> {
    let mut nodes = nodes.iter();
    while let Some(node) = nodes.next() {
        if *node == Node::Recursive {
            let Some(selected) = nodes.next() else {
                return unsupported("'..' must be followed by what it selects");
            };
            out.push_str("..");
            render_selection(selected, out)?;
        } else {
            render_selection(node, out)?;
        }
    }
    Ok(())
}

fn render_selection(node: &Node, out: &mut String) -> Result<(), PathError> {
    out.push('[');
    render_selector(node, out)?;
    out.push(']');
    Ok(())
}

fn render_selector(node: &Node, out: &mut String) -> Result<(), PathError> {
    match node {
        Node::Field(name) => out.push_str(&quote(name)),
        Node::Wildcard => out.push('*'),
        Node::Index(i) => out.push_str(&query_int(*i)?),
        Node::Slice(start, end, step) => {
            if step.is_some_and(|s| s <= 0) {
                return unsupported("step must be > 0");
            }
            let bound = |b: &Option<i64>| b.map_or(Ok(String::new()), query_int);
            out.push_str(&format!("{}:{}", bound(start)?, bound(end)?));
            if step.is_some() {
                out.push_str(&format!(":{}", bound(step)?));
            }
        }
        Node::Union(branches) => {
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match branch.as_slice() {
                    [one @ (Node::Field(_)
                    | Node::Wildcard
                    | Node::Index(_)
                    | Node::Slice(..)
                    | Node::Filter(_))] => render_selector(one, out)?,
                    _ => return unsupported("each part of a union must select one field or index"),
                }
            }
        }
        Node::Filter(filter) => {
            out.push('?');
            render_filter(filter, out)?;
        }
        Node::Text(_) | Node::Int(_) | Node::Float(_) | Node::Bool(_) => {
            return unsupported("a literal can only be compared in a filter")
        }
        Node::Identifier(name) => return unsupported(format!("unrecognized identifier {name}")),
        Node::Recursive => return unsupported("'..' cannot be part of a union"),
    }
    Ok(())
}

/// One side of a filter comparison.
enum Operand {
    /// A path from the element, of fields and indexes only (RFC 9535's singular query).
    Path(String),
    Literal(String),
}

fn render_filter(filter: &Filter, out: &mut String) -> Result<(), PathError> {
    let Some((op, right)) = &filter.comparison else {
        if filter.left.iter().any(is_literal) {
            return unsupported("a filter without a comparison must be a path");
        }
        out.push('@');
        return render_path(&filter.left, out);
    };
    if !matches!(op.as_str(), "==" | "!=" | "<" | ">" | "<=" | ">=") {
        return unsupported(format!("unrecognized filter operator {op}"));
    }
    let (left, right) = (operand(&filter.left)?, operand(right)?);
    // client-go skips elements where either path is missing; RFC 9535 would
    // compare "nothing" (equal to nothing, unequal to everything else).
    for side in [&left, &right] {
        if let Operand::Path(path) = side {
            if path != "@" {
                out.push_str(&format!("{path} && "));
            }
        }
    }
    let text = |o: Operand| match o {
        Operand::Path(s) | Operand::Literal(s) => s,
    };
    out.push_str(&format!("{} {op} {}", text(left), text(right)));
    Ok(())
}

fn is_literal(node: &Node) -> bool {
    matches!(
        node,
        Node::Text(_) | Node::Int(_) | Node::Float(_) | Node::Bool(_) | Node::Identifier(_)
    )
}

fn operand(nodes: &[Node]) -> Result<Operand, PathError> {
    match nodes {
        [Node::Text(s)] => Ok(Operand::Literal(quote(s))),
        [Node::Int(i)] if i.unsigned_abs() <= MAX_QUERY_INT.unsigned_abs() => {
            Ok(Operand::Literal(i.to_string()))
        }
        // `{:e}` is always valid RFC 9535 number syntax.
        [Node::Int(i)] => Ok(Operand::Literal(format!("{:e}", *i as f64))),
        [Node::Float(f)] => Ok(Operand::Literal(format!("{f:e}"))),
        [Node::Bool(b)] => Ok(Operand::Literal(b.to_string())),
        path if path
            .iter()
            .all(|n| matches!(n, Node::Field(_) | Node::Index(_))) =>
        {
            let mut query = String::from("@");
            render_path(path, &mut query)?;
            Ok(Operand::Path(query))
        }
        _ => unsupported(
            "each side of a filter comparison must be a string, number, boolean, \
             or a path of fields and indexes",
        ),
    }
}

/// An RFC 9535 single-quoted string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: &str = "spec.versions[0].additionalPrinterColumns";

    /// Stands in for the API server's age formatter.
    fn age(timestamp: &str) -> Value {
        Value::from(format!("age of {timestamp}"))
    }

    fn compile(columns: Value) -> PrinterColumns {
        PrinterColumns::compile(Some(&columns), AT).expect("columns compile")
    }

    fn errors(columns: Value) -> Vec<Cause> {
        PrinterColumns::compile(Some(&columns), AT).expect_err("columns are refused")
    }

    /// The cells after Name, for one column of `kind` at `path`.
    fn cell(kind: &str, path: &str, obj: Value) -> Value {
        let columns = compile(json!([{ "name": "C", "type": kind, "jsonPath": path }]));
        let mut cells = columns.cells(&obj, &age);
        assert_eq!(cells.len(), 2);
        cells.remove(1)
    }

    fn widget() -> Value {
        json!({
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {
                "name": "w1",
                "creationTimestamp": "2024-05-01T10:00:00Z",
                "labels": { "app": "shop", "app.kubernetes.io/name": "shop-api" },
            },
            "spec": {
                "replicas": 3,
                "ratio": 0.75,
                "paused": false,
                "owner": "team-a",
                "selector": { "tier": "web", "app": "shop" },
                "ports": [80, 443],
                "containers": [
                    { "name": "api", "image": "shop/api:1.2", "port": 8080 },
                    { "name": "sidecar", "image": "proxy:3", "port": 15001 },
                ],
            },
            "status": {
                "conditions": [
                    { "type": "Progressing", "status": "True", "reason": "NewRS" },
                    { "status": "Unknown" },
                    { "type": "Ready", "status": "False" },
                ],
                "lastSync": "2024-05-01T10:05:00+02:00",
            },
        })
    }

    #[test]
    fn printer_columns_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PrinterColumns>();
    }

    #[test]
    fn no_columns_give_name_and_age() {
        for columns in [None, Some(Value::Null), Some(json!([]))] {
            let printer = PrinterColumns::compile(columns.as_ref(), AT).unwrap();
            assert_eq!(
                printer.definitions(),
                json!([
                    { "name": "Name", "type": "string", "format": "name",
                      "description": NAME_DESCRIPTION, "priority": 0 },
                    { "name": "Age", "type": "date", "format": "",
                      "description": CREATION_TIMESTAMP_DESCRIPTION, "priority": 0 },
                ])
            );
            assert_eq!(
                printer.cells(&widget(), &age),
                vec![json!("w1"), json!("age of 2024-05-01T10:00:00Z")]
            );
        }
    }

    #[test]
    fn definitions_follow_the_name_column() {
        let printer = compile(json!([
            { "name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas" },
            { "name": "Owner", "type": "string", "format": "password", "priority": 1,
              "description": "Who owns it", "jsonPath": ".spec.owner" },
            { "name": "Behind", "type": "integer", "priority": -1, "jsonPath": ".spec.lag" },
        ]));
        let definitions = printer.definitions();
        assert_eq!(definitions[0]["name"], "Name");
        assert_eq!(
            definitions[1],
            json!({ "name": "Replicas", "type": "integer", "format": "", "priority": 0,
                    "description": "Custom resource definition column (in JSONPath format): .spec.replicas" })
        );
        assert_eq!(
            definitions[2],
            json!({ "name": "Owner", "type": "string", "format": "password", "priority": 1,
                    "description": "Who owns it" })
        );
        // kube-apiserver does not reject a negative priority, so neither do we.
        assert_eq!(definitions[3]["priority"], -1);
        assert_eq!(
            printer.cells(&widget(), &age),
            vec![json!("w1"), json!(3), json!("team-a"), Value::Null]
        );
    }

    #[test]
    fn the_name_cell_is_always_a_string() {
        let printer =
            compile(json!([{ "name": "R", "type": "integer", "jsonPath": ".spec.replicas" }]));
        assert_eq!(
            printer.cells(&json!({ "spec": { "replicas": 1 } }), &age),
            vec![json!(""), json!(1)]
        );
        assert_eq!(
            printer.cells(&json!({ "metadata": { "name": 7 } }), &age)[0],
            json!("")
        );
    }

    #[test]
    fn string_columns_print_what_they_find() {
        let obj = widget();
        let string = |path: &str| cell("string", path, obj.clone());
        assert_eq!(string(".spec.owner"), json!("team-a"));
        assert_eq!(string(".spec.replicas"), json!("3"));
        assert_eq!(string(".spec.ratio"), json!("0.75"));
        assert_eq!(string(".spec.paused"), json!("false"));
        assert_eq!(string(".spec.ports"), json!("[80 443]"));
        // Maps print with sorted keys, as Go's fmt prints them.
        assert_eq!(string(".spec.selector"), json!("map[app:shop tier:web]"));
        assert_eq!(
            string(".spec.containers[1]"),
            json!("map[image:proxy:3 name:sidecar port:15001]")
        );
    }

    #[test]
    fn string_columns_print_numbers_and_nulls_as_go_does() {
        let string = |value: Value| cell("string", ".v", json!({ "v": value }));
        assert_eq!(string(json!(1000000.0)), json!("1e+06"));
        assert_eq!(string(json!(123456.0)), json!("123456"));
        assert_eq!(string(json!(0.0001)), json!("0.0001"));
        assert_eq!(string(json!(0.00001)), json!("1e-05"));
        assert_eq!(string(json!(-2.5e-7)), json!("-2.5e-07"));
        assert_eq!(string(json!(1.0)), json!("1"));
        assert_eq!(
            string(json!(18446744073709551615u64)),
            json!("1.8446744073709552e+19")
        );
        assert_eq!(string(json!(-42)), json!("-42"));
        // A null the path finds prints as the printer's "<no value>"; inside a value, "<nil>".
        assert_eq!(string(Value::Null), json!("<no value>"));
        assert_eq!(
            string(json!({ "a": null, "b": [] })),
            json!("map[a:<nil> b:[]]")
        );
    }

    #[test]
    fn integer_columns() {
        let integer = |value: Value| cell("integer", ".v", json!({ "v": value }));
        assert_eq!(integer(json!(5)), json!(5));
        assert_eq!(integer(json!(-5)), json!(-5));
        // Floats are truncated toward zero, as Go converts them.
        assert_eq!(integer(json!(2.9)), json!(2));
        assert_eq!(integer(json!(-2.9)), json!(-2));
        assert_eq!(integer(json!("5")), Value::Null);
        assert_eq!(integer(json!(true)), Value::Null);
        assert_eq!(integer(Value::Null), Value::Null);
    }

    #[test]
    fn number_columns() {
        let number = |value: Value| cell("number", ".v", json!({ "v": value }));
        assert_eq!(number(json!(0.75)), json!(0.75));
        assert_eq!(number(json!(3)), json!(3));
        assert_eq!(number(json!(1e300)), json!(1e300));
        assert_eq!(number(json!("0.75")), Value::Null);
        assert_eq!(number(json!([1])), Value::Null);
    }

    #[test]
    fn boolean_columns() {
        let boolean = |value: Value| cell("boolean", ".v", json!({ "v": value }));
        assert_eq!(boolean(json!(true)), json!(true));
        assert_eq!(boolean(json!(false)), json!(false));
        assert_eq!(boolean(json!("true")), Value::Null);
        assert_eq!(boolean(json!(1)), Value::Null);
    }

    #[test]
    fn date_columns() {
        let date = |value: Value| cell("date", ".v", json!({ "v": value }));
        assert_eq!(
            date(json!("2024-05-01T10:05:00+02:00")),
            json!("age of 2024-05-01T10:05:00+02:00")
        );
        assert_eq!(
            date(json!("2024-05-01T10:05:00.123Z")),
            json!("age of 2024-05-01T10:05:00.123Z")
        );
        assert_eq!(date(json!("yesterday")), json!("<invalid>"));
        assert_eq!(date(json!("2024-05-01 10:05:00Z")), json!("<invalid>"));
        assert_eq!(date(json!("2024-05-01t10:05:00z")), json!("<invalid>"));
        assert_eq!(date(json!("")), json!("<unknown>"));
        assert_eq!(date(json!("0001-01-01T00:00:00Z")), json!("<unknown>"));
        assert_eq!(date(json!(1714557900)), Value::Null);
    }

    #[test]
    fn missing_values_are_null() {
        for kind in ["string", "integer", "number", "boolean", "date"] {
            assert_eq!(cell(kind, ".spec.nothing", widget()), Value::Null, "{kind}");
            assert_eq!(
                cell(kind, ".nothing.at.all", widget()),
                Value::Null,
                "{kind}"
            );
            assert_eq!(cell(kind, ".spec.owner", json!({})), Value::Null, "{kind}");
        }
        // Through a null on the way.
        assert_eq!(
            cell("string", ".spec.x.y", json!({ "spec": { "x": null } })),
            Value::Null
        );
    }

    #[test]
    fn filters_on_conditions() {
        let obj = widget();
        let string = |path: &str| cell("string", path, obj.clone());
        assert_eq!(
            string(r#".status.conditions[?(@.type=="Ready")].status"#),
            json!("False")
        );
        assert_eq!(
            string(".status.conditions[?(@.type=='Progressing')].reason"),
            json!("NewRS")
        );
        assert_eq!(
            string(r#".status.conditions[?(@.type == "Ready")].status"#),
            json!("False")
        );
        // No such condition, or the condition lacks the field.
        assert_eq!(
            string(r#".status.conditions[?(@.type=="Available")].status"#),
            Value::Null
        );
        assert_eq!(
            string(r#".status.conditions[?(@.type=="Ready")].reason"#),
            Value::Null
        );
        // Elements without the compared field never match, `!=` included.
        assert_eq!(
            string(r#".status.conditions[?(@.type!="Progressing")].status"#),
            json!("False")
        );
        // Existence filters.
        assert_eq!(
            string(".status.conditions[?(@.reason)].type"),
            json!("Progressing")
        );
        // Numbers, and a literal on the left.
        assert_eq!(
            string(".spec.containers[?(@.port>9000)].name"),
            json!("sidecar")
        );
        assert_eq!(
            string(".spec.containers[?(8080==@.port)].name"),
            json!("api")
        );
        assert_eq!(
            string(".spec.containers[?(@.port<=8080.5)].name"),
            json!("api")
        );
        // Elements compared as a whole.
        assert_eq!(string(".spec.ports[?(@>100)]"), json!("443"));
        // A quote and a parenthesis inside the literal.
        let odd = json!({ "items": [{ "k": "a)'b", "v": 1 }] });
        assert_eq!(
            cell("integer", r#".items[?(@.k=="a)'b")].v"#, odd),
            json!(1)
        );
        // Booleans.
        let flags = json!({ "items": [{ "on": false, "n": 1 }, { "on": true, "n": 2 }] });
        assert_eq!(cell("integer", ".items[?(@.on==true)].n", flags), json!(2));
    }

    #[test]
    fn array_indexes_slices_and_unions() {
        let obj = widget();
        let string = |path: &str| cell("string", path, obj.clone());
        assert_eq!(string(".spec.containers[0].image"), json!("shop/api:1.2"));
        assert_eq!(string(".spec.containers[1].name"), json!("sidecar"));
        assert_eq!(string(".spec.containers[-1].name"), json!("sidecar"));
        assert_eq!(string(".spec.containers[2].name"), Value::Null);
        assert_eq!(string(".spec.containers[-3].name"), Value::Null);
        assert_eq!(string(".spec.containers[1:].name"), json!("sidecar"));
        assert_eq!(string(".spec.ports[::2]"), json!("80"));
        // Several values: the cell shows the first.
        assert_eq!(string(".spec.containers[*].name"), json!("api"));
        assert_eq!(string(".spec.containers[1,0].name"), json!("sidecar"));
        assert_eq!(string(".spec.containers[0]['name']"), json!("api"));
        assert_eq!(string("..image"), json!("shop/api:1.2"));
    }

    #[test]
    fn keys_with_dots_and_odd_characters() {
        let obj = widget();
        let string = |path: &str| cell("string", path, obj.clone());
        assert_eq!(string(".metadata.labels.app"), json!("shop"));
        assert_eq!(
            string(r".metadata.labels.app\.kubernetes\.io/name"),
            json!("shop-api")
        );
        assert_eq!(
            string(r".metadata.labels['app\.kubernetes\.io/name']"),
            json!("shop-api")
        );
        // Unescaped, the dots separate fields.
        assert_eq!(
            string(".metadata.labels.app.kubernetes.io/name"),
            Value::Null
        );
        assert_eq!(
            string(".metadata.labels['app.kubernetes.io/name']"),
            Value::Null
        );
        let odd = json!({ "m": { "it's": 1, "q\"": 3 } });
        assert_eq!(cell("integer", ".m.it's", odd.clone()), json!(1));
        assert_eq!(cell("integer", r#".m.q\""#, odd), json!(3));
    }

    #[test]
    fn wrongly_typed_values_give_no_value() {
        let string = |path: &str, obj: Value| cell("string", path, obj);
        assert_eq!(string(".spec.replicas.count", widget()), Value::Null);
        assert_eq!(string(".spec.selector[0]", widget()), Value::Null);
        assert_eq!(string(".spec.ports.first", widget()), Value::Null);
        assert_eq!(string(r#".spec.owner[?(@=="x")]"#, widget()), Value::Null);
        assert_eq!(
            string(r#".status.conditions[?(@.type==1)].status"#, widget()),
            Value::Null
        );
        for odd in [json!(null), json!("text"), json!([1, 2]), json!(5)] {
            let printer = compile(json!([
                { "name": "A", "type": "string", "jsonPath": ".spec.a[0]" },
                { "name": "B", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
            ]));
            assert_eq!(
                printer.cells(&odd, &age),
                vec![json!(""), Value::Null, Value::Null]
            );
        }
    }

    #[test]
    fn column_fields_are_required() {
        assert_eq!(
            errors(json!([{}])),
            vec![
                Cause::required(format!("{AT}[0].name")),
                Cause::required_because(
                    format!("{AT}[0].type"),
                    "must be one of boolean,date,integer,number,string"
                ),
                Cause::required(format!("{AT}[0].JSONPath")),
            ]
        );
        let empty = errors(json!([{ "name": "", "type": "string", "jsonPath": "" }]));
        assert_eq!(
            empty,
            vec![
                Cause::required(format!("{AT}[0].name")),
                Cause::required(format!("{AT}[0].JSONPath")),
            ]
        );
    }

    #[test]
    fn unknown_type_and_format() {
        let causes = errors(json!([
            { "name": "A", "type": "float", "format": "uuid", "jsonPath": ".a" },
        ]));
        assert_eq!(
            causes,
            vec![
                Cause::invalid(
                    format!("{AT}[0].type"),
                    &json!("float"),
                    "must be one of boolean,date,integer,number,string"
                ),
                Cause::invalid(
                    format!("{AT}[0].format"),
                    &json!("uuid"),
                    "must be one of byte,date,date-time,double,float,int32,int64,password"
                ),
            ]
        );
        assert_eq!(
            causes[0].render(),
            format!(
                "{AT}[0].type: Invalid value: \"float\": must be one of \
                 boolean,date,integer,number,string"
            )
        );
    }

    #[test]
    fn json_paths_start_with_a_dot() {
        let causes = errors(json!([{ "name": "A", "type": "string", "jsonPath": "spec.a" }]));
        assert_eq!(
            causes,
            vec![Cause::invalid(
                format!("{AT}[0].JSONPath"),
                &json!("spec.a"),
                "must be a simple json path starting with ."
            )]
        );
    }

    /// The detail of the one cause a column with this JSONPath gets.
    fn path_error(path: &str) -> String {
        let causes = errors(json!([{ "name": "A", "type": "string", "jsonPath": path }]));
        assert_eq!(causes.len(), 1, "{path}: {causes:?}");
        assert_eq!(causes[0].field, format!("{AT}[0].JSONPath"));
        assert_eq!(causes[0].reason, "FieldValueInvalid");
        let prefix = format!("Invalid value: {path:?}: ");
        causes[0]
            .message
            .strip_prefix(&prefix)
            .expect("message names the path")
            .to_owned()
    }

    #[test]
    fn paths_client_go_cannot_parse() {
        let cases = [
            (".spec[", "invalid JSONPath: unterminated array"),
            (
                ".spec.items[0]]",
                "invalid JSONPath: unrecognized character in action: U+005D ']'",
            ),
            (
                ".spec\t.a",
                "invalid JSONPath: unrecognized character in action: U+0009",
            ),
            (".spec\n", "invalid JSONPath: unclosed action"),
            (
                r#".spec.items["name"]"#,
                r#"invalid JSONPath: invalid array index "name""#,
            ),
            (".spec.items[a]", "invalid JSONPath: invalid array index a"),
            (
                ".spec.items[1:2:3:4]",
                "invalid JSONPath: invalid array index 1:2:3:4",
            ),
            (
                ".spec.items[-]",
                "invalid JSONPath: array index - is not a number",
            ),
            (
                ".spec.items[99999999999999999999]",
                "invalid JSONPath: array index 99999999999999999999 is not a number",
            ),
            (".a[?(@.b==\"x\"]", "invalid JSONPath: unterminated filter"),
            (".a[?(@.b)x", "invalid JSONPath: unclosed array expect ]"),
            (
                ".a....b",
                "invalid JSONPath: invalid multiple recursive descent",
            ),
            (".a[?(@.b==\"x)]", "invalid JSONPath: unterminated filter"),
            (
                ".a[?(@.b=='x\\q')]",
                "invalid JSONPath: unquote string 'x\\q' error invalid syntax",
            ),
            (
                ".a[?(@.b==1.2.3)]",
                "invalid JSONPath: cannot parse number 1.2.3",
            ),
            (
                ".a[?(@.b==1#)]",
                "invalid JSONPath: unrecognized character in action: U+0023 '#'",
            ),
            (
                ".a[?(@.b==)]",
                "invalid JSONPath: unrecognized character in action: U+003D '='",
            ),
        ];
        for (path, detail) in cases {
            assert_eq!(path_error(path), detail, "{path}");
        }
    }

    #[test]
    fn paths_that_cannot_give_a_value() {
        let cases = [
            (".spec}", "'}' ends the path early"),
            (".spec..", "'..' must be followed by what it selects"),
            (".spec 'x'", "a literal can only be compared in a filter"),
            (".spec 5", "a literal can only be compared in a filter"),
            (".spec range", "unrecognized identifier range"),
            (".a[?(@.b<>1)]", "unrecognized filter operator <>"),
            (".a[?(@.b=1)]", "unrecognized filter operator ="),
            (
                ".a[?(@.b==nil)]",
                "each side of a filter comparison must be a string, number, \
              boolean, or a path of fields and indexes",
            ),
            (
                ".a[?(@.b[*]==1)]",
                "each side of a filter comparison must be a string, number, \
              boolean, or a path of fields and indexes",
            ),
            (".a[?('x')]", "a filter without a comparison must be a path"),
            (".a[::0]", "step must be > 0"),
            (".a[0:2:-1]", "step must be > 0"),
            (
                ".a[9007199254740992]",
                "array index 9007199254740992 is out of range",
            ),
            (
                ".a['x.y','z']",
                "each part of a union must select one field or index",
            ),
        ];
        for (path, why) in cases {
            assert_eq!(
                path_error(path),
                format!("unsupported JSONPath: {why}"),
                "{path}"
            );
        }
    }

    #[test]
    fn wrongly_typed_definitions() {
        assert_eq!(
            errors(json!({ "name": "A" })),
            vec![Cause::type_invalid(
                AT,
                &json!({ "name": "A" }),
                "must be of type array"
            )]
        );
        assert_eq!(
            errors(json!(["A"])),
            vec![Cause::type_invalid(
                format!("{AT}[0]"),
                &json!("A"),
                "must be of type object"
            )]
        );
        let causes = errors(json!([{
            "name": 5, "type": "string", "jsonPath": [".a"], "description": false, "priority": "1",
        }]));
        assert_eq!(
            causes,
            vec![
                Cause::type_invalid(format!("{AT}[0].name"), &json!(5), "must be of type string"),
                Cause::type_invalid(
                    format!("{AT}[0].description"),
                    &json!(false),
                    "must be of type string"
                ),
                Cause::type_invalid(
                    format!("{AT}[0].jsonPath"),
                    &json!([".a"]),
                    "must be of type string"
                ),
                Cause::type_invalid(
                    format!("{AT}[0].priority"),
                    &json!("1"),
                    "must be a 32-bit integer"
                ),
            ]
        );
        for priority in [json!(1.5), json!(2147483648i64)] {
            let column =
                json!([{ "name": "A", "type": "string", "jsonPath": ".a", "priority": priority }]);
            assert_eq!(errors(column)[0].field, format!("{AT}[0].priority"));
        }
    }

    #[test]
    fn every_column_is_checked() {
        let causes = errors(json!([
            { "name": "Fine", "type": "string", "jsonPath": ".a" },
            { "name": "B", "type": "text", "jsonPath": ".b" },
            { "type": "string", "jsonPath": ".c[" },
        ]));
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                format!("{AT}[1].type"),
                format!("{AT}[2].name"),
                format!("{AT}[2].JSONPath"),
            ]
        );
    }

    #[test]
    fn translation_to_rfc_9535() {
        let cases = [
            (".spec.replicas", "$['spec']['replicas']"),
            (".", "$['']"),
            (".a.*", "$['a'][*]"),
            (".a[*]", "$['a'][:]"),
            (".a[]", "$['a'][0]"),
            (".a[-1]", "$['a'][-1]"),
            (".a[1:3]", "$['a'][1:3]"),
            (".a[:2:1]", "$['a'][:2:1]"),
            (".a[0, 'b']", "$['a'][0,'b']"),
            (".a..b", "$['a']..['b']"),
            (".a..[0]", "$['a']..[0]"),
            ("@.a $.b", "$['a']['b']"),
            (r".a\.b\\c", "$['a.bc']"),
            (".it's", r"$['it\'s']"),
            (
                r#".a[?(@.b.c[0]=="x")]"#,
                "$['a'][?@['b']['c'][0] && @['b']['c'][0] == 'x']",
            ),
            (".a[?(@==1.5)]", "$['a'][?@ == 1.5e0]"),
            (".a[?(@.b)]", "$['a'][?@['b']]"),
            (".a[?(@.b[*])]", "$['a'][?@['b'][:]]"),
            (".a[?(@.b!=false)]", "$['a'][?@['b'] && @['b'] != false]"),
            (
                ".a[?(@.b==@.c)]",
                "$['a'][?@['b'] && @['c'] && @['b'] == @['c']]",
            ),
            (
                r#".a[?(@.b=="x\ty")]"#,
                r"$['a'][?@['b'] && @['b'] == 'x\ty']",
            ),
        ];
        for (kube, rfc) in cases {
            assert_eq!(translate(kube), Ok(rfc.to_owned()), "{kube}");
            assert!(parse_json_path(rfc).is_ok(), "{rfc}");
        }
    }

    #[test]
    fn go_float_formatting() {
        let cases = [
            (0.1, "0.1"),
            (1.5, "1.5"),
            (100.0, "100"),
            (999999.0, "999999"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (1e21, "1e+21"),
            (1e100, "1e+100"),
            (0.0001, "0.0001"),
            (0.000123, "0.000123"),
            (0.00001, "1e-05"),
            (-0.0, "-0"),
            (-12.25, "-12.25"),
        ];
        for (f, go) in cases {
            assert_eq!(go_float(f), go, "{f}");
        }
    }

    #[test]
    fn odd_paths_and_objects_never_panic() {
        let paths = [
            ".",
            "..a",
            ".a..",
            ".[",
            ".]",
            ".a[?(",
            ".a[?()]",
            ".a[?(@)]",
            ".a[?(@.b==)]",
            ".a['",
            ".a[''']",
            ".a[,]",
            ".a[0,]",
            ".a[:]",
            ".a[-9007199254740991]",
            ".\\",
            ".a\\",
            ".a[?(@.b=='\\u12')]",
            ".a[?(@.b=='\\377')]",
            ".a[?(\"x\"==\"x\")]",
            ".é.ü",
            ".a[?(@.b>=-1)]",
            ".a[?(@.b==+)]",
            ".a[1:-1]",
        ];
        let objects = [
            widget(),
            json!({ "a": [[], {}, null, "s", 1, [1, [2, [3]]]] }),
            json!({ "a": { "b": [{ "b": 1 }] } }),
            json!([]),
            json!(null),
        ];
        for path in paths {
            let column = json!([{ "name": "A", "type": "string", "jsonPath": path }]);
            if let Ok(printer) = PrinterColumns::compile(Some(&column), AT) {
                for obj in &objects {
                    assert_eq!(printer.cells(obj, &age).len(), 2, "{path}");
                }
            }
        }
    }
}
