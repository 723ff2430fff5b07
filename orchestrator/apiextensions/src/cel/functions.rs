//! The functions a rule can call: CEL's standard ones and Kubernetes'
//! extensions (strings, lists, regular expressions, optionals). Each takes
//! its receiver (or first argument) and arguments as one slice, and pays
//! for the bytes it reads and builds before it does the work.

use std::cmp::Ordering;
use std::ops::Range;
use std::sync::Arc;

use regex::Regex;

use super::check::Kinds;
use super::cost::{error, Fault, Meter};
use super::time::{self, Part};
use super::value::{compare, equal, Bytes, List, Str, Value};
use Style::{Both, Global, Member, Optional};

/// How a function is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Style {
    /// `f(x, …)`
    Global,
    /// `x.f(…)`
    Member,
    Both,
    /// `optional.f(…)`
    Optional,
}

/// A function's implementation: it gets the values it is called with (as
/// many as its arity allows, a method's receiver first) and its pattern
/// when that is a literal, compiled.
pub(super) type Impl = for<'a> fn(&mut Meter<'_>, &[Value<'a>], Compiled) -> Out<'a>;

type Out<'a> = Result<Value<'a>, Fault>;
type Compiled<'r> = Option<&'r Arc<Regex>>;

pub(super) struct Function {
    pub(super) name: &'static str,
    pub(super) style: Style,
    /// How many values it takes, a member's receiver included.
    pub(super) arity: Range<usize>,
    /// Its second value is a regular expression.
    pub(super) pattern: bool,
    pub(super) result: Kinds,
    pub(super) eval: Impl,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

const fn function(
    name: &'static str,
    style: Style,
    arity: Range<usize>,
    result: Kinds,
    eval: Impl,
) -> Function {
    Function {
        name,
        style,
        arity,
        pattern: false,
        result,
        eval,
    }
}

const fn pattern(
    name: &'static str,
    style: Style,
    arity: Range<usize>,
    result: Kinds,
    eval: Impl,
) -> Function {
    Function {
        pattern: true,
        ..function(name, style, arity, result, eval)
    }
}

static FUNCTIONS: &[Function] = &[
    // Standard CEL.
    function("size", Both, 1..2, Kinds::INT, size),
    function("contains", Member, 2..3, Kinds::BOOL, contains),
    function("startsWith", Member, 2..3, Kinds::BOOL, starts_with),
    function("endsWith", Member, 2..3, Kinds::BOOL, ends_with),
    pattern("matches", Both, 2..3, Kinds::BOOL, matches),
    function("int", Global, 1..2, Kinds::INT, to_int),
    function("uint", Global, 1..2, Kinds::UINT, to_uint),
    function("double", Global, 1..2, Kinds::DOUBLE, to_double),
    function("string", Global, 1..2, Kinds::STRING, to_string),
    function("bytes", Global, 1..2, Kinds::BYTES, to_bytes),
    function("bool", Global, 1..2, Kinds::BOOL, to_bool),
    function("dyn", Global, 1..2, Kinds::ANY, dyn_value),
    function("type", Global, 1..2, Kinds::TYPE, type_of),
    function("duration", Global, 1..2, Kinds::DURATION, to_duration),
    function("timestamp", Global, 1..2, Kinds::TIMESTAMP, to_timestamp),
    function("getFullYear", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::FullYear, a)
    }),
    function("getMonth", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::Month, a)
    }),
    function("getDayOfYear", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::DayOfYear, a)
    }),
    function("getDayOfMonth", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::DayOfMonth, a)
    }),
    function("getDate", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::Date, a)
    }),
    function("getDayOfWeek", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::DayOfWeek, a)
    }),
    function("getHours", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::Hours, a)
    }),
    function("getMinutes", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::Minutes, a)
    }),
    function("getSeconds", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::Seconds, a)
    }),
    function("getMilliseconds", Member, 1..3, Kinds::INT, |_, a, _| {
        time::get(Part::Milliseconds, a)
    }),
    // Kubernetes' strings (cel-go's ext.Strings, version 2).
    function("charAt", Member, 2..3, Kinds::STRING, char_at),
    function("indexOf", Member, 2..4, Kinds::INT, index_of),
    function("lastIndexOf", Member, 2..4, Kinds::INT, last_index_of),
    function("lowerAscii", Member, 1..2, Kinds::STRING, lower_ascii),
    function("upperAscii", Member, 1..2, Kinds::STRING, upper_ascii),
    function("replace", Member, 3..5, Kinds::STRING, replace),
    function("split", Member, 2..4, Kinds::LIST, split),
    function("substring", Member, 2..4, Kinds::STRING, substring),
    function("trim", Member, 1..2, Kinds::STRING, trim),
    function("join", Member, 1..3, Kinds::STRING, join),
    // Kubernetes' lists.
    function("isSorted", Member, 1..2, Kinds::BOOL, is_sorted),
    function("sum", Member, 1..2, Kinds::NUMBER.or(Kinds::DURATION), sum),
    function("min", Member, 1..2, Kinds::ANY, |m, a, _| {
        extreme(m, a, Ordering::Less)
    }),
    function("max", Member, 1..2, Kinds::ANY, |m, a, _| {
        extreme(m, a, Ordering::Greater)
    }),
    // Kubernetes' regular expressions.
    pattern("find", Member, 2..3, Kinds::STRING, find),
    pattern("findAll", Member, 2..4, Kinds::LIST, find_all),
    // Optionals (cel-go's OptionalTypes), for optionalOldSelf.
    function("of", Optional, 1..2, Kinds::OPTIONAL, |_, a, _| {
        Ok(some(&a[0]))
    }),
    function("none", Optional, 0..1, Kinds::OPTIONAL, |_, _, _| {
        Ok(Value::Optional(None))
    }),
    function(
        "ofNonZeroValue",
        Optional,
        1..2,
        Kinds::OPTIONAL,
        of_non_zero_value,
    ),
    function("hasValue", Member, 1..2, Kinds::BOOL, has_value),
    function("value", Member, 1..2, Kinds::ANY, optional_value),
    function("orValue", Member, 2..3, Kinds::ANY, or_value),
    function("or", Member, 2..3, Kinds::OPTIONAL, or_optional),
];

/// The functions named `name`, each with its own style.
pub(super) fn named(name: &str) -> impl Iterator<Item = &'static Function> + '_ {
    FUNCTIONS.iter().filter(move |f| f.name == name)
}

fn no_overload<T>(function: &str, args: &[Value<'_>]) -> Result<T, Fault> {
    let types: Vec<&str> = args.iter().map(Value::type_name).collect();
    error(format!(
        "no such overload: {function}({})",
        types.join(", ")
    ))
}

fn some<'a>(value: &Value<'a>) -> Value<'a> {
    Value::Optional(Some(Arc::new(value.clone())))
}

/// A string sub-slice, borrowed when the string is.
fn slice<'a>(s: &Str<'a>, range: Range<usize>, meter: &mut Meter<'_>) -> Out<'a> {
    Ok(match s {
        Str::Borrowed(s) => {
            let s: &'a str = s;
            Value::String(Str::Borrowed(&s[range]))
        }
        Str::Shared(s) => {
            meter.build(range.len())?;
            Value::string(&s[range])
        }
    })
}

fn size<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    Ok(Value::count(match &args[0] {
        Value::String(s) => {
            meter.scan(s.len())?;
            // Code points, as CEL counts.
            s.chars().count()
        }
        Value::Bytes(b) => b.len(),
        Value::List(items) => items.len(),
        Value::Map(map) => map.len(),
        _ => return no_overload("size", args),
    }))
}

/// The receiver and first argument, both strings, scanned.
fn two_strings<'v, 'a>(
    name: &str,
    meter: &mut Meter<'_>,
    args: &'v [Value<'a>],
) -> Result<(&'v Str<'a>, &'v Str<'a>), Fault> {
    match args {
        [Value::String(a), Value::String(b), ..] => {
            meter.scan(a.len() + b.len())?;
            Ok((a, b))
        }
        _ => no_overload(name, args),
    }
}

fn contains<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let (s, needle) = two_strings("contains", meter, args)?;
    Ok(Value::Bool(s.contains(&**needle)))
}

fn starts_with<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let (s, prefix) = two_strings("startsWith", meter, args)?;
    Ok(Value::Bool(s.starts_with(&**prefix)))
}

fn ends_with<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let (s, suffix) = two_strings("endsWith", meter, args)?;
    Ok(Value::Bool(s.ends_with(&**suffix)))
}

/// The receiver and the compiled pattern of a regular expression function.
fn regex_args<'v, 'a>(
    name: &str,
    meter: &mut Meter<'_>,
    args: &'v [Value<'a>],
    compiled: Compiled,
) -> Result<(&'v Str<'a>, Arc<Regex>), Fault> {
    let [Value::String(s), Value::String(pattern), ..] = args else {
        return no_overload(name, args);
    };
    let regex = match compiled {
        Some(regex) => Arc::clone(regex),
        None => meter.pattern(pattern)?,
    };
    // A search may step through the input a byte at a time.
    meter.build(s.len())?;
    Ok((s, regex))
}

fn matches<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], compiled: Compiled) -> Out<'a> {
    let (s, regex) = regex_args("matches", meter, args, compiled)?;
    Ok(Value::Bool(regex.is_match(s)))
}

fn find<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], compiled: Compiled) -> Out<'a> {
    let (s, regex) = regex_args("find", meter, args, compiled)?;
    match regex.find(s) {
        Some(found) => slice(s, found.range(), meter),
        None => Ok(Value::String(Str::Borrowed(""))),
    }
}

fn find_all<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], compiled: Compiled) -> Out<'a> {
    let (s, regex) = regex_args("findAll", meter, args, compiled)?;
    // Negative: no limit.
    let limit = match args.get(2) {
        None => usize::MAX,
        Some(Value::Int(n)) => usize::try_from(*n).unwrap_or(usize::MAX),
        Some(_) => return no_overload("findAll", args),
    };
    let mut found = Vec::new();
    for m in regex.find_iter(s).take(limit) {
        meter.charge(1)?;
        found.push(slice(s, m.range(), meter)?);
    }
    Ok(Value::list(found))
}

// Conversions.

fn to_int<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;
    let overflow = || Fault::Error("integer overflow".into());
    Ok(Value::Int(match &args[0] {
        Value::Int(i) => *i,
        Value::Uint(u) => i64::try_from(*u).map_err(|_| overflow())?,
        Value::Double(f) if (-TWO_TO_63..TWO_TO_63).contains(f) => f.trunc() as i64,
        Value::Double(_) => return Err(overflow()),
        Value::String(s) => {
            meter.scan(s.len())?;
            s.parse()
                .map_err(|_| Fault::Error(format!("cannot convert {:?} to int", truncated(s))))?
        }
        Value::Timestamp(t) => t.timestamp(),
        Value::Duration(nanos) => *nanos,
        _ => return no_overload("int", args),
    }))
}

fn to_uint<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    const TWO_TO_64: f64 = 18_446_744_073_709_551_616.0;
    let overflow = || Fault::Error("unsigned integer overflow".into());
    Ok(Value::Uint(match &args[0] {
        Value::Int(i) => u64::try_from(*i).map_err(|_| overflow())?,
        Value::Uint(u) => *u,
        Value::Double(f) if (0.0..TWO_TO_64).contains(f) => f.trunc() as u64,
        Value::Double(_) => return Err(overflow()),
        Value::String(s) => {
            meter.scan(s.len())?;
            s.parse()
                .map_err(|_| Fault::Error(format!("cannot convert {:?} to uint", truncated(s))))?
        }
        _ => return no_overload("uint", args),
    }))
}

fn to_double<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    Ok(Value::Double(match &args[0] {
        Value::Int(i) => *i as f64,
        Value::Uint(u) => *u as f64,
        Value::Double(f) => *f,
        Value::String(s) => {
            meter.scan(s.len())?;
            s.parse()
                .map_err(|_| Fault::Error(format!("cannot convert {:?} to double", truncated(s))))?
        }
        _ => return no_overload("double", args),
    }))
}

fn to_string<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let text = match &args[0] {
        Value::String(s) => return Ok(Value::String(s.clone())),
        Value::Int(i) => i.to_string(),
        Value::Uint(u) => u.to_string(),
        Value::Double(f) => format_double(*f),
        Value::Bool(b) => b.to_string(),
        Value::Bytes(b) => {
            meter.build(b.len())?;
            String::from_utf8(b.to_vec())
                .map_err(|_| Fault::Error("bytes are not valid UTF-8".into()))?
        }
        Value::Timestamp(t) => time::format_timestamp(t),
        Value::Duration(nanos) => time::format_duration(*nanos),
        _ => return no_overload("string", args),
    };
    Ok(Value::string(text))
}

/// Go's `%g`, which CEL's `string(double)` uses: the shortest digits that
/// read back the same, in exponent form below 1e-4 and from 1e6 up.
fn format_double(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or_default();
    if (-4..6).contains(&exponent) {
        format!("{value}")
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.unsigned_abs())
    }
}

fn to_bytes<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::String(Str::Borrowed(s)) => Ok(Value::Bytes(Bytes::Borrowed(s.as_bytes()))),
        Value::String(s) => {
            meter.build(s.len())?;
            Ok(Value::Bytes(Bytes::Shared(s.as_bytes().into())))
        }
        Value::Bytes(b) => Ok(Value::Bytes(b.clone())),
        _ => no_overload("bytes", args),
    }
}

fn to_bool<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::Bool(b) => Ok(Value::Bool(*b)),
        Value::String(s) => match &**s {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Value::Bool(true)),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Value::Bool(false)),
            _ => error(format!("cannot convert {:?} to bool", truncated(s))),
        },
        _ => no_overload("bool", args),
    }
}

fn dyn_value<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    Ok(args[0].clone())
}

fn type_of<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    Ok(Value::Type(args[0].type_of()))
}

fn to_duration<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::String(s) => {
            meter.scan(s.len())?;
            time::parse_duration(s)
                .map(Value::Duration)
                .map_err(|reason| {
                    Fault::Error(format!("invalid duration {:?}: {reason}", truncated(s)))
                })
        }
        Value::Duration(nanos) => Ok(Value::Duration(*nanos)),
        _ => no_overload("duration", args),
    }
}

fn to_timestamp<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::String(s) => {
            meter.scan(s.len())?;
            time::parse_timestamp(s)
        }
        Value::Int(seconds) => time::from_unix_seconds(*seconds),
        Value::Timestamp(t) => Ok(Value::Timestamp(*t)),
        _ => no_overload("timestamp", args),
    }
}

/// The start of a message quoting `s`.
pub(super) fn truncated(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(at, _)| &s[..at])
}

// Strings. Indices count code points.

/// Byte offset of code point `n` (the end when `n` is the length).
fn byte_offset(s: &str, n: usize) -> Option<usize> {
    s.char_indices()
        .map(|(at, _)| at)
        .chain(std::iter::once(s.len()))
        .nth(n)
}

fn code_points<'a>(s: &str, bytes: usize) -> Value<'a> {
    Value::count(s[..bytes].chars().count())
}

/// A non-negative index argument, or the error CEL gives for it.
fn position(index: i64) -> Result<usize, Fault> {
    usize::try_from(index).map_err(|_| Fault::Error(format!("index out of range: {index}")))
}

/// An optional int argument.
fn int_arg(name: &str, args: &[Value<'_>], at: usize) -> Result<Option<i64>, Fault> {
    match args.get(at) {
        None => Ok(None),
        Some(Value::Int(i)) => Ok(Some(*i)),
        Some(_) => no_overload(name, args),
    }
}

fn char_at<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let [Value::String(s), Value::Int(index)] = args else {
        return no_overload("charAt", args);
    };
    meter.scan(s.len())?;
    let at = position(*index)?;
    match byte_offset(s, at) {
        Some(start) => {
            let end = s[start..]
                .chars()
                .next()
                .map_or(start, |c| start + c.len_utf8());
            slice(s, start..end, meter)
        }
        None => error(format!("index out of range: {index}")),
    }
}

fn index_of<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    if let [Value::List(items), needle] = args {
        return list_position(meter, items, needle, false);
    }
    let (s, needle) = two_strings("indexOf", meter, args)?;
    let offset = position(int_arg("indexOf", args, 2)?.unwrap_or(0))?;
    let len = s.chars().count();
    if needle.is_empty() {
        return Ok(Value::count(offset.min(len)));
    }
    if offset >= len {
        return Ok(Value::Int(-1));
    }
    let start = byte_offset(s, offset).unwrap_or(s.len());
    Ok(match s[start..].find(&**needle) {
        Some(found) => code_points(s, start + found),
        None => Value::Int(-1),
    })
}

fn last_index_of<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    if let [Value::List(items), needle] = args {
        return list_position(meter, items, needle, true);
    }
    let (s, needle) = two_strings("lastIndexOf", meter, args)?;
    let len = s.chars().count();
    let end = match int_arg("lastIndexOf", args, 2)? {
        None => s.len(),
        Some(offset) => {
            let offset = position(offset)?;
            if needle.is_empty() {
                return Ok(Value::count(offset.min(len)));
            }
            if offset >= len {
                return Ok(Value::Int(-1));
            }
            // A match may start at `offset` at the latest.
            let last_end = offset.saturating_add(needle.chars().count()).min(len);
            byte_offset(s, last_end).unwrap_or(s.len())
        }
    };
    Ok(match s[..end].rfind(&**needle) {
        Some(found) => code_points(s, found),
        None => Value::Int(-1),
    })
}

fn list_position<'a>(
    meter: &mut Meter<'_>,
    items: &List<'_>,
    needle: &Value<'_>,
    last: bool,
) -> Out<'a> {
    let len = items.len();
    for step in 0..len {
        let i = if last { len - 1 - step } else { step };
        if let Some(item) = items.get(i, meter)? {
            if equal(&item, needle, meter, 0)? {
                return Ok(Value::count(i));
            }
        }
    }
    Ok(Value::Int(-1))
}

fn lower_ascii<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let [Value::String(s)] = args else {
        return no_overload("lowerAscii", args);
    };
    meter.build(s.len())?;
    Ok(Value::string(s.to_ascii_lowercase()))
}

fn upper_ascii<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let [Value::String(s)] = args else {
        return no_overload("upperAscii", args);
    };
    meter.build(s.len())?;
    Ok(Value::string(s.to_ascii_uppercase()))
}

fn trim<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let [Value::String(s)] = args else {
        return no_overload("trim", args);
    };
    meter.scan(s.len())?;
    let start = s.len() - s.trim_start().len();
    let end = s.trim_end().len().max(start);
    slice(s, start..end, meter)
}

fn replace<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let [Value::String(s), Value::String(old), Value::String(new), ..] = args else {
        return no_overload("replace", args);
    };
    // Negative: replace all.
    let limit = int_arg("replace", args, 3)?.and_then(|n| usize::try_from(n).ok());
    let limit = limit.unwrap_or(usize::MAX);
    // Pay for the result before building it: what it keeps of `s` first
    // when replacing grows it, then each replacement as it is found.
    meter.scan(s.len())?;
    let growth = new.len().saturating_sub(old.len());
    if growth > 0 {
        meter.build(s.len())?;
    }
    let replaced = if old.is_empty() {
        let replaced = (s.chars().count() + 1).min(limit);
        meter.charge((replaced as u64).saturating_mul(growth as u64))?;
        replaced
    } else {
        let mut replaced = 0;
        for _ in s.matches(&**old).take(limit) {
            replaced += 1;
            meter.charge(growth as u64 + 1)?;
        }
        replaced
    };
    if growth == 0 {
        meter.build(s.len() - replaced * (old.len() - new.len()))?;
    }
    Ok(Value::string(s.replacen(&**old, new, limit)))
}

fn split<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let (s, separator) = two_strings("split", meter, args)?;
    // Negative: no limit.
    let limit = usize::try_from(int_arg("split", args, 2)?.unwrap_or(-1)).unwrap_or(usize::MAX);
    let mut pieces = Vec::new();
    if limit == 0 {
        return Ok(Value::list(pieces));
    }
    let mut ranges = Vec::new();
    if separator.is_empty() {
        // One piece per code point, the last taking the rest (Go's explode).
        let count = s.chars().count().min(limit);
        let mut starts = s.char_indices().map(|(at, _)| at).take(count).peekable();
        while let Some(start) = starts.next() {
            meter.charge(1)?;
            ranges.push(start..starts.peek().copied().unwrap_or(s.len()));
        }
    } else {
        let mut start = 0;
        for (at, _) in s.match_indices(&**separator) {
            if ranges.len() + 1 >= limit {
                break;
            }
            meter.charge(1)?;
            ranges.push(start..at);
            start = at + separator.len();
        }
        ranges.push(start..s.len());
    }
    for range in ranges {
        meter.charge(1)?;
        pieces.push(slice(s, range, meter)?);
    }
    Ok(Value::list(pieces))
}

fn substring<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let [Value::String(s), Value::Int(start), ..] = args else {
        return no_overload("substring", args);
    };
    meter.scan(s.len())?;
    let end = int_arg("substring", args, 2)?;
    let len = s.chars().count();
    let out_of_range = || {
        let end = end.map_or_else(String::new, |end| format!(", {end}"));
        Fault::Error(format!(
            "index out of range: substring({start}{end}) of a string of length {len}"
        ))
    };
    let from = position(*start).map_err(|_| out_of_range())?;
    let to = match end {
        Some(end) => position(end).map_err(|_| out_of_range())?,
        None => len,
    };
    if from > to || to > len {
        return Err(out_of_range());
    }
    let from = byte_offset(s, from).unwrap_or(s.len());
    let to = byte_offset(s, to).unwrap_or(s.len());
    slice(s, from..to, meter)
}

fn join<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let (items, separator) = match args {
        [Value::List(items)] => (items, ""),
        [Value::List(items), Value::String(separator)] => (items, &**separator),
        _ => return no_overload("join", args),
    };
    let mut strings = Vec::with_capacity(items.len());
    let mut size = separator
        .len()
        .saturating_mul(items.len().saturating_sub(1));
    for i in 0..items.len() {
        meter.charge(1)?;
        match items.get(i, meter)? {
            Some(Value::String(s)) => {
                size = size.saturating_add(s.len());
                strings.push(s);
            }
            Some(other) => {
                return error(format!(
                    "no such overload: join of a list of {}",
                    other.type_name()
                ))
            }
            None => {}
        }
    }
    meter.build(size)?;
    let mut joined = String::with_capacity(size);
    for (at, s) in strings.iter().enumerate() {
        if at > 0 {
            joined.push_str(separator);
        }
        joined.push_str(s);
    }
    Ok(Value::string(joined))
}

// Lists.

/// The elements of a list receiver.
fn elements<'a>(
    name: &str,
    meter: &mut Meter<'_>,
    args: &[Value<'a>],
) -> Result<Vec<Value<'a>>, Fault> {
    let [Value::List(items)] = args else {
        return no_overload(name, args);
    };
    let mut all = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        meter.charge(1)?;
        all.extend(items.get(i, meter)?);
    }
    Ok(all)
}

fn ordered(a: &Value<'_>, b: &Value<'_>, meter: &mut Meter<'_>) -> Result<Ordering, Fault> {
    compare(a, b, meter)?.ok_or_else(|| Fault::Error("NaN values cannot be ordered".into()))
}

fn is_sorted<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let items = elements("isSorted", meter, args)?;
    for pair in items.windows(2) {
        if ordered(&pair[0], &pair[1], meter)? == Ordering::Greater {
            return Ok(Value::Bool(false));
        }
    }
    Ok(Value::Bool(true))
}

fn sum<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let items = elements("sum", meter, args)?;
    let overflow = |unsigned: bool| {
        Fault::Error(
            if unsigned {
                "unsigned integer overflow"
            } else {
                "integer overflow"
            }
            .into(),
        )
    };
    let mut total = match items.first() {
        None => return Ok(Value::Int(0)),
        Some(first @ (Value::Int(_) | Value::Uint(_) | Value::Double(_) | Value::Duration(_))) => {
            first.clone()
        }
        Some(other) => return error(format!("no such overload: sum over {}", other.type_name())),
    };
    for item in &items[1..] {
        total = match (&total, item) {
            (Value::Int(a), Value::Int(b)) => {
                Value::Int(a.checked_add(*b).ok_or_else(|| overflow(false))?)
            }
            (Value::Uint(a), Value::Uint(b)) => {
                Value::Uint(a.checked_add(*b).ok_or_else(|| overflow(true))?)
            }
            (Value::Double(a), Value::Double(b)) => Value::Double(a + b),
            (Value::Duration(a), Value::Duration(b)) => {
                Value::Duration(a.checked_add(*b).ok_or_else(|| overflow(false))?)
            }
            _ => return error(format!("no such overload: sum over {}", item.type_name())),
        };
    }
    Ok(total)
}

/// The element `keep` prefers over every other one.
fn extreme<'a>(meter: &mut Meter<'_>, args: &[Value<'a>], keep: Ordering) -> Out<'a> {
    let name = if keep == Ordering::Less { "min" } else { "max" };
    let items = elements(name, meter, args)?;
    let Some(mut best) = items.first() else {
        return error(format!("{name}() called on an empty list"));
    };
    // A single element is still checked for an order.
    ordered(best, best, meter)?;
    for item in &items[1..] {
        if ordered(item, best, meter)? == keep {
            best = item;
        }
    }
    Ok(best.clone())
}

// Optionals.

fn of_non_zero_value<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    let zero = match &args[0] {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Int(i) => *i == 0,
        Value::Uint(u) => *u == 0,
        Value::Double(d) => *d == 0.0,
        Value::String(s) => s.is_empty(),
        Value::Bytes(b) => b.is_empty(),
        Value::List(l) => l.len() == 0,
        Value::Map(m) => m.len() == 0,
        Value::Duration(d) => *d == 0,
        Value::Timestamp(t) => t.timestamp() == 0 && t.timestamp_subsec_nanos() == 0,
        Value::Type(_) => false,
        Value::Optional(o) => o.is_none(),
    };
    Ok(if zero {
        Value::Optional(None)
    } else {
        some(&args[0])
    })
}

fn has_value<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::Optional(o) => Ok(Value::Bool(o.is_some())),
        _ => no_overload("hasValue", args),
    }
}

fn optional_value<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::Optional(Some(value)) => Ok((**value).clone()),
        Value::Optional(None) => error("optional.none() dereference"),
        _ => no_overload("value", args),
    }
}

fn or_value<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match &args[0] {
        Value::Optional(Some(value)) => Ok((**value).clone()),
        Value::Optional(None) => Ok(args[1].clone()),
        _ => no_overload("orValue", args),
    }
}

fn or_optional<'a>(_: &mut Meter<'_>, args: &[Value<'a>], _: Compiled) -> Out<'a> {
    match args {
        [Value::Optional(Some(_)), Value::Optional(_)] => Ok(args[0].clone()),
        [Value::Optional(None), Value::Optional(_)] => Ok(args[1].clone()),
        _ => no_overload("or", args),
    }
}
