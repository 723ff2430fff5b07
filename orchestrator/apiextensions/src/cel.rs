//! `x-kubernetes-validations`: CEL rules compiled once per CRD version and
//! evaluated with `self` (and `oldSelf` for transition rules) by an
//! interpreter of our own.
//!
//! | module | what |
//! |---|---|
//! | `lexer`, `parser` | CEL's grammar, with errors naming line and column, depth bounded |
//! | `ast` | the syntax tree: operators, macros and literals as nodes |
//! | `check` | names, arities and macro variables checked; the tree evaluated |
//! | `value` | CEL values as views of the request's JSON, typed by the schema |
//! | `eval` | evaluation with CEL's semantics |
//! | `functions`, `time` | the functions rules call |
//! | `cost` | the per-call limit and the per-request [`Budget`] |
//!
//! # What a rule can use
//! - Variables `self` and `oldSelf`; a rule that reads `oldSelf` is a
//!   transition rule. With `optionalOldSelf`, `oldSelf` is an optional
//!   (`oldSelf.hasValue()`, `oldSelf.value()`, `oldSelf.orValue(x)`,
//!   `oldSelf.or(o)`; `optional.of`, `optional.none`,
//!   `optional.ofNonZeroValue`), empty on create.
//! - Values typed by the node's schema as Kubernetes types them (numbers
//!   of a `number` field are doubles, `date-time` strings timestamps,
//!   `set` lists compare regardless of order …); properties whose names
//!   are not CEL identifiers are read escaped (`self.x__dash__y`,
//!   `self.__namespace__`, `self.a__dot__b`).
//! - Operators: arithmetic, comparisons (numbers across int, uint and
//!   double), `in`, `&&`, `||`, `!`, `?:`, indexing, list and map literals;
//!   macros `has`, `all`, `exists`, `exists_one` (or `existsOne`), `map`
//!   (with or without a filter) and `filter`, over lists and maps.
//! - Standard functions: `size` (of a string: its code points),
//!   `contains`, `startsWith`, `endsWith`, `matches`; conversions `int`,
//!   `uint`, `double`, `string`, `bytes`, `bool`, `dyn`, `duration`,
//!   `timestamp`, and `type` (compared with `int`, `uint`, `double`,
//!   `bool`, `string`, `bytes`, `list`, `map`, `null_type`, `type`);
//!   timestamp and duration getters `getFullYear` … `getMilliseconds`
//!   (time zone `UTC` or `±HH:MM`).
//! - Kubernetes' extensions: strings `charAt`, `indexOf`, `lastIndexOf`,
//!   `lowerAscii`, `upperAscii`, `replace`, `split`, `substring`, `trim`,
//!   `join`; lists `isSorted`, `sum`, `min`, `max`, `indexOf`,
//!   `lastIndexOf`; regular expressions `find`, `findAll`.
//!
//! Anything else is a [`CompileError`] naming it, never a rule that
//! silently passes: syntax errors, with their place (`ERROR: <input>:1:5:
//! Syntax error: unexpected ')', expected an expression`), other
//! functions (`quantity`, `url`, `ip`, `format`, `sets.*` …), calls in the
//! wrong style or with the wrong number of arguments, other variables,
//! message construction, a rule that cannot evaluate to a bool (or a
//! `messageExpression` to a string), an invalid literal regular
//! expression, an expression over [`MAX_EXPRESSION_BYTES`] or nested
//! deeper than [`MAX_NESTING`].
//!
//! # Evaluation
//! CEL's semantics: missing keys and indexes out of range are errors,
//! integer arithmetic (negation included) is checked, `!`, `&&`, `||` and
//! `?:` take bools only, and errors are absorbed by `&&`, `||`, `all` and
//! `exists` as cel-spec says (`1/0 == 1 || true` is true). Cost is charged
//! as evaluation goes against a per-call limit and a per-request
//! [`Budget`]; a [`Stop`] says which one ran out. Nothing panics and
//! nothing recurses without bound: expressions are bounded by
//! [`MAX_NESTING`], values compared by [`MAX_VALUE_DEPTH`].
//!
//! # Known differences from Kubernetes
//! - There is no type checker: a rule that misuses a type compiles and
//!   fails when evaluated (Kubernetes refuses it when the CRD is written),
//!   objects are maps (`type(self) == map`; any key present can be read),
//!   and cost is only counted at run time (no estimated cost limit when
//!   the CRD is written).
//! - Kubernetes' libraries beyond those above (quantities, URLs, IPs and
//!   CIDRs, `format`, sets, semver, authorizer) and two-variable
//!   comprehensions are refused; optional syntax (`.?f`, `[?k]`, `{?k:
//!   v}`) and quoted field names (`` a.`b-c` ``) do not parse.
//! - Named time zones (`'Europe/Paris'`) are an evaluation error,
//!   `google.protobuf.*` type names are not declared, and `duration`
//!   strings take Go's syntax only (no days).
//! - Error messages are worded here, not copied from cel-go.

mod ast;
mod check;
mod cost;
mod eval;
mod functions;
mod lexer;
mod parser;
mod time;
mod value;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use serde_json::Value as Json;

use self::check::{Checked, Kinds};
use self::cost::{Fault, Meter};
use self::eval::Evaluator;
use self::value::Value;
use crate::schema::Schema;

pub use self::cost::{Budget, Stop, CALL_LIMIT, REQUEST_BUDGET};
pub use self::parser::MAX_NESTING;
pub use self::value::MAX_VALUE_DEPTH;

/// Longest rule or `messageExpression` accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 16 * 1024;

/// Evaluation errors quote values; longer messages are cut.
const MAX_ERROR_CHARS: usize = 512;

/// A rule that does not compile, or that uses something this engine cannot
/// evaluate; the message names what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError(pub String);

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a rule has no result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A CEL error (a missing field, an overflow, a result that is not a
    /// bool): the value is invalid with this message.
    Error(String),
    /// Out of cost: Kubernetes runs no further rules of the request.
    Stop(Stop),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(message) => f.write_str(message),
            Failure::Stop(stop) => f.write_str(stop.message()),
        }
    }
}

/// A node's value as its rules see it: the JSON typed by the node's schema
/// (`None`: by its JSON form). Nothing is converted: every rule of the node
/// reads the same JSON.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    json: &'a Json,
    schema: Option<&'a Schema>,
}

impl<'a> Input<'a> {
    pub fn new(json: &'a Json, schema: Option<&'a Schema>) -> Self {
        Input { json, schema }
    }

    fn value(&self, meter: &mut Meter<'_>) -> Result<Value<'a>, Fault> {
        Value::from_json(self.json, self.schema, meter)
    }
}

/// One compiled rule (and its `messageExpression`, if any).
pub struct CompiledRule {
    rule: Compiled,
    message: Option<Compiled>,
    optional_old_self: bool,
}

// Rules are shared across threads in `Arc`s.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<CompiledRule>();
};

impl std::fmt::Debug for CompiledRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRule")
            .field("rule", &self.rule.source)
            .field(
                "message_expression",
                &self.message.as_ref().map(|message| &message.source),
            )
            .field("transition", &self.is_transition())
            .field("optional_old_self", &self.optional_old_self)
            .finish()
    }
}

impl CompiledRule {
    /// Compile `rule` and its `messageExpression`; with `optional_old_self`
    /// the rule sees `oldSelf` as an optional. Anything the engine cannot
    /// evaluate is an error naming it.
    pub fn compile(
        rule: &str,
        message_expression: Option<&str>,
        optional_old_self: bool,
    ) -> Result<CompiledRule, CompileError> {
        let rule = Compiled::new(rule)
            .map_err(|error| CompileError(format!("compilation failed: {error}")))?;
        if !rule.checked.kinds.may_be(Kinds::BOOL) {
            return Err(CompileError(
                "compilation failed: the rule must evaluate to a bool, and this expression \
                 cannot"
                    .into(),
            ));
        }
        let message = message_expression
            .map(|source| {
                let failed = |error: &str| {
                    CompileError(format!("messageExpression compilation failed: {error}"))
                };
                let message = Compiled::new(source).map_err(|error| failed(&error))?;
                if !message.checked.kinds.may_be(Kinds::STRING) {
                    return Err(failed(
                        "messageExpression must evaluate to a string, and this expression cannot",
                    ));
                }
                if message.checked.reads_old_self && !rule.checked.reads_old_self {
                    return Err(failed(
                        "oldSelf is only available when the rule itself reads oldSelf",
                    ));
                }
                Ok(message)
            })
            .transpose()?;
        Ok(CompiledRule {
            rule,
            message,
            optional_old_self,
        })
    }

    /// Whether the rule reads `oldSelf`: a transition rule, evaluated only on
    /// updates where the old value exists (unless `oldSelf` is optional).
    pub fn is_transition(&self) -> bool {
        self.rule.checked.reads_old_self
    }

    /// `Ok(true)` when the value passes, `Ok(false)` when it fails the
    /// rule; costs are charged to `budget`.
    pub fn evaluate(
        &self,
        self_value: &Input<'_>,
        old_self: Option<&Input<'_>>,
        budget: &mut Budget,
    ) -> Result<bool, Failure> {
        match self.run(&self.rule, self_value, old_self, budget)? {
            Value::Bool(passed) => Ok(passed),
            other => Err(Failure::Error(format!(
                "the rule evaluated to {}, not a bool",
                other.type_name()
            ))),
        }
    }

    /// The `messageExpression`'s message, when there is one and it
    /// evaluates to a string that is neither blank nor multi-line (as
    /// Kubernetes falls back to `message` otherwise). Only running out of
    /// cost is an error.
    pub fn message(
        &self,
        self_value: &Input<'_>,
        old_self: Option<&Input<'_>>,
        budget: &mut Budget,
    ) -> Result<Option<String>, Stop> {
        let Some(message) = &self.message else {
            return Ok(None);
        };
        match self.run(message, self_value, old_self, budget) {
            Ok(Value::String(text)) if !text.trim().is_empty() && !text.contains(['\n', '\r']) => {
                Ok(Some(text.to_string()))
            }
            Err(Failure::Stop(stop)) => Err(stop),
            _ => Ok(None),
        }
    }

    fn run<'a>(
        &self,
        expression: &'a Compiled,
        self_value: &Input<'a>,
        old_self: Option<&Input<'a>>,
        budget: &mut Budget,
    ) -> Result<Value<'a>, Failure> {
        let mut evaluator = Evaluator::new(Meter::new(budget));
        let result = (|| {
            evaluator.self_value = self_value.value(&mut evaluator.meter)?;
            if expression.checked.reads_old_self {
                let old = old_self
                    .map(|old| old.value(&mut evaluator.meter))
                    .transpose()?;
                evaluator.old_self = if self.optional_old_self {
                    Some(Value::Optional(old.map(Arc::new)))
                } else {
                    old
                };
            }
            evaluator.eval(&expression.checked.expr)
        })();
        evaluator.finish();
        result.map_err(|fault| match fault {
            Fault::Error(message) => Failure::Error(truncate(message)),
            Fault::Stop(stop) => Failure::Stop(stop),
        })
    }
}

/// A rule or `messageExpression`, checked and ready to evaluate.
struct Compiled {
    source: String,
    checked: Checked,
}

impl Compiled {
    fn new(source: &str) -> Result<Self, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression is {} bytes long, over the limit of {MAX_EXPRESSION_BYTES}",
                source.len()
            ));
        }
        let checked = check::check(&parser::parse(source)?)?;
        Ok(Compiled {
            source: source.to_owned(),
            checked,
        })
    }
}

fn truncate(mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_CHARS) {
        message.truncate(cut);
        message.push('…');
    }
    message
}
