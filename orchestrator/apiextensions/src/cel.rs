//! `x-kubernetes-validations`: CEL rules compiled once per CRD version and
//! evaluated with `self` (and `oldSelf` for transition rules), on the
//! `cel-interpreter` crate with Kubernetes' extension functions added here.
//!
//! # What a rule can use
//! - Variables `self` and `oldSelf`; a rule that reads `oldSelf` is a
//!   transition rule. JSON becomes CEL as: objects → maps (`self.f`,
//!   `has(self.f)`, `self['f']`), arrays → lists, integers → `int` (above
//!   `int64`: `uint`; beyond that: `double`), other numbers → `double`,
//!   strings, bools, `null`.
//! - Operators: arithmetic, comparisons, `in`, `&&`, `||`, `!`, `?:`,
//!   indexing; macros `has`, `all`, `exists`, `exists_one`, `map` (with or
//!   without a filter) and `filter`.
//! - Standard functions: `size`, `contains`, `startsWith`, `endsWith`,
//!   `matches`; conversions `int`, `uint`, `double`, `string`, `bytes`,
//!   `bool`, `dyn`, `duration`, `timestamp`, and `type` (compared with
//!   `int`, `uint`, `double`, `bool`, `string`, `bytes`, `list`, `map`,
//!   `null_type`; objects are maps); timestamp and duration getters
//!   `getFullYear` … `getMilliseconds` (time zone `UTC` or `±HH:MM`).
//! - Kubernetes' extensions: strings `charAt`, `indexOf`, `lastIndexOf`,
//!   `lowerAscii`, `upperAscii`, `replace`, `split`, `substring`, `trim`,
//!   `join`; lists `isSorted`, `sum`, `min`, `max`, `indexOf`,
//!   `lastIndexOf`; regular expressions `find`, `findAll`.
//!
//! # What fails to compile
//! A rule this engine cannot evaluate as Kubernetes does is a
//! [`CompileError`], never a rule that silently passes:
//! - syntax errors (with the parser's message);
//! - a function or macro outside the lists above (`quantity`, `url`, `ip`,
//!   `format`, `sets.*`, optionals, two-variable comprehensions …),
//!   or one called with the wrong number of arguments;
//! - a variable other than `self`, `oldSelf`, macro variables and the type
//!   names above;
//! - `optionalOldSelf`: there are no optional values (`optional.none()`,
//!   `.orValue()`, `.?f`);
//! - message construction (`Foo{f: 1}`) and Kubernetes' escaped property
//!   names (`x__dash__y`, `__namespace__`): properties are plain map keys
//!   here, read as `self['x-y']` or `self.namespace`;
//! - a rule that obviously does not evaluate to a bool, or a
//!   `messageExpression` that obviously does not evaluate to a string;
//! - an invalid regular expression given as a literal;
//! - an expression over [`MAX_EXPRESSION_BYTES`], or nested deeper than
//!   parsing and evaluating can do on a thread's stack.
//!
//! # Faithful and bounded evaluation
//! The interpreter is lenient where CEL is strict, so the token stream is
//! rewritten before it is parsed for evaluation: `x[k]` becomes a strict
//! index (the interpreter yields `null` for a missing key or an index out
//! of range, which `!=` would let pass); calls go to internal names, so a
//! missing field named like a function (`self.max`) is an error rather than
//! a function value; macros first check that their target is a list or a
//! map; runs of `!` or unary `-` keep their parity (the parser drops the
//! second of `!!`). Every evaluation error, panics included, is an `Err`.
//!
//! Kubernetes bounds a rule's cost with the schema's `maxItems` and
//! `maxLength`; without a schema here, each evaluation first estimates its
//! cost from the input: (widest list or map, or longest string when the
//! rule splits strings) to the power of the macro nesting depth, times the
//! rule's size, plus the copying `map` and `filter` do. An input over
//! [`COST_LIMIT`] fails the rule instead of running it. Strings that
//! `replace` and `join` build are capped at [`MAX_BUILT_STRING_BYTES`].
//!
//! # Known differences from Kubernetes
//! - No schema: numbers are typed by their JSON form, so an integral value
//!   in a `number` field is an `int` (comparisons mix int, uint and double;
//!   arithmetic does not), and `date-time` or `duration` strings stay
//!   strings (`timestamp(self.t)` converts them).
//! - Errors are not absorbed by `&&`, `||` or the macros: `self.missing > 1
//!   || true` is an error where Kubernetes yields true. An error never lets
//!   a value pass; it may reject one Kubernetes accepts.
//! - Operands of `!`, `&&`, `||` and ternary conditions are read by
//!   truthiness rather than refused when they are not bools.
//! - Named time zones (`'Europe/Paris'`) are an evaluation error, and so
//!   is a macro variable read outside its macro.
//! - Error messages are worded here, not copied from cel-go.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cel_interpreter::objects::Key;
use cel_interpreter::{Context, ExecutionError, FunctionContext, Program, ResolveResult};
use chrono::{DateTime, Datelike, FixedOffset, Offset, Timelike, Utc};
use regex::Regex;
use serde_json::Value;

/// A CEL value (the JSON [`Value`] is the other one in this module).
type Cel = cel_interpreter::Value;

/// Longest rule or `messageExpression` accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 16 * 1024;

/// Bound on an expression's syntactic depth (see [`check_syntax_depth`]):
/// parsing and evaluation recurse along it, and a stack overflow aborts the
/// process. Measured in a debug build on a 2 MiB stack: 100 nested lists
/// parse (200 do not), chains of 1500 operators parse and evaluate.
const MAX_SYNTAX_DEPTH: usize = 400;

/// Weight of one level of brackets in the syntactic depth: the parser
/// descends its whole precedence ladder for each.
const BRACKET_DEPTH_WEIGHT: usize = 10;

/// Deepest JSON accepted as `self` or `oldSelf` (conversion, equality and
/// dropping recurse along it).
pub const MAX_VALUE_DEPTH: usize = 256;

/// Estimated cost, in expression nodes evaluated, above which an
/// evaluation is refused (Kubernetes' per-request runtime budget is 10⁷
/// cost units).
pub const COST_LIMIT: u128 = 10_000_000;

/// `map` and `filter` copy their accumulated list on each step; copying an
/// element costs about this fraction of evaluating an expression node.
const ACCUMULATION_COST_DIVISOR: u128 = 8;

/// Largest string `replace` or `join` may build.
pub const MAX_BUILT_STRING_BYTES: usize = 4 << 20;

/// Evaluation errors quote values; longer messages are cut.
const MAX_ERROR_CHARS: usize = 512;

/// Prefix of the names calls are registered under (see the module doc).
const INTERNAL_PREFIX: &str = "__builtin_";
/// `x[k]`, rewritten as `x.__builtin_index(k)`.
const INDEX_FUNCTION: &str = "__builtin_index";
/// Inserted before each macro: `x.all(…)` becomes `x.__builtin_range().all(…)`.
const RANGE_FUNCTION: &str = "__builtin_range";

/// Calls the parser produces for operators and macro expansions, all of
/// which the interpreter evaluates inline. Indexing (`_[_]`) is not among
/// them: it is rewritten to [`INDEX_FUNCTION`].
const OPERATORS: &[&str] = &[
    "_?_:_",
    "_&&_",
    "_||_",
    "!_",
    "-_",
    "_+_",
    "_-_",
    "_*_",
    "_/_",
    "_%_",
    "_==_",
    "_!=_",
    "_<_",
    "_<=_",
    "_>_",
    "_>=_",
    "@in",
    "@not_strictly_false",
];

/// Macros that iterate; the parser expands them into comprehensions.
const LOOP_MACROS: &[&str] = &["all", "exists", "exists_one", "existsOne", "map", "filter"];

/// Types a rule can name, as in `type(self) == string`, each a variable
/// holding its [`type_value`].
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

/// CEL's reserved words, which Kubernetes escapes as `__word__` in
/// property names.
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

/// A rule that does not compile, or that uses something this engine cannot
/// evaluate; the message names what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError(pub String);

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One compiled rule (and its `messageExpression`, if any).
pub struct CompiledRule {
    rule: CompiledExpression,
    message: Option<CompiledExpression>,
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
            .finish()
    }
}

impl CompiledRule {
    /// Compile `rule` and its `messageExpression`. Anything the engine cannot
    /// evaluate (a syntax error, a function or macro it does not know, an
    /// optional `oldSelf`) is an error naming it.
    pub fn compile(
        rule: &str,
        message_expression: Option<&str>,
        optional_old_self: bool,
    ) -> Result<CompiledRule, CompileError> {
        let rule = CompiledExpression::compile(rule)
            .map_err(|error| CompileError(format!("compilation failed: {error}")))?;
        if !rule.result.may_be_bool {
            return Err(CompileError(
                "compilation failed: the rule must evaluate to a bool, and this expression \
                 cannot"
                    .into(),
            ));
        }
        if optional_old_self {
            return Err(CompileError(
                "compilation failed: optionalOldSelf is not supported: this engine has no \
                 optional values (oldSelf.hasValue(), oldSelf.orValue(...))"
                    .into(),
            ));
        }
        let message = message_expression
            .map(|source| {
                let message = CompiledExpression::compile(source).map_err(|error| {
                    CompileError(format!("messageExpression compilation failed: {error}"))
                })?;
                if !message.result.may_be_string {
                    return Err(CompileError(
                        "messageExpression compilation failed: messageExpression must \
                         evaluate to a string, and this expression cannot"
                            .into(),
                    ));
                }
                if message.reads_old_self && !rule.reads_old_self {
                    return Err(CompileError(
                        "messageExpression compilation failed: oldSelf is only available when \
                         the rule itself reads oldSelf"
                            .into(),
                    ));
                }
                Ok(message)
            })
            .transpose()?;
        Ok(CompiledRule { rule, message })
    }

    /// Whether the rule reads `oldSelf`: a transition rule, evaluated only on
    /// updates where the old value exists.
    pub fn is_transition(&self) -> bool {
        self.rule.reads_old_self
    }

    /// `Ok(true)` when the value passes; `Err` when evaluation fails (a
    /// runtime error such as a missing field, a result that is not a bool,
    /// or an input over the cost limit), which Kubernetes reports as an
    /// invalid value with the error.
    pub fn evaluate(&self, self_value: &Value, old_self: Option<&Value>) -> Result<bool, String> {
        match self.rule.evaluate(self_value, old_self)? {
            Cel::Bool(passed) => Ok(passed),
            other => Err(format!(
                "the rule evaluated to {}, not a bool",
                type_name(&other)
            )),
        }
    }

    /// The `messageExpression`'s message, when there is one and it
    /// evaluates to a string that is neither blank nor multi-line (as
    /// Kubernetes falls back to `message` otherwise).
    pub fn message(&self, self_value: &Value, old_self: Option<&Value>) -> Option<String> {
        match self.message.as_ref()?.evaluate(self_value, old_self) {
            Ok(Cel::String(text)) if !text.trim().is_empty() && !text.contains(['\n', '\r']) => {
                Some(text.as_ref().clone())
            }
            _ => None,
        }
    }
}

/// A rule or `messageExpression`, checked and ready to evaluate.
struct CompiledExpression {
    source: String,
    /// Parsed from the rewritten source.
    program: Program,
    /// The functions, registered once; each evaluation adds its variables
    /// in a child scope.
    functions: Context<'static>,
    reads_old_self: bool,
    result: ResultKind,
    cost: CostModel,
}

/// What [`CompiledExpression::check_cost`] needs to know of the source.
struct CostModel {
    tokens: usize,
    /// How deeply iterating macros nest.
    loop_depth: u32,
    /// Whether `map` or `filter` (which copy as they go) occur.
    accumulates: bool,
    /// Whether strings become lists (`split`, `findAll`), so that the
    /// longest string bounds iteration too.
    lists_from_strings: bool,
}

impl CompiledExpression {
    fn compile(source: &str) -> Result<Self, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression is {} bytes long, over the limit of {MAX_EXPRESSION_BYTES}",
                source.len()
            ));
        }
        let tokens = tokenize(source)?;
        // Before parsing: the parser panics on missing operands, and its
        // recursion is what could overflow.
        check_structure(source, &tokens)?;
        check_syntax_depth(&tokens)?;
        let original = parse(source)?;
        let facts = analyze(source, &tokens)?;
        check_references(&original, &tokens, &facts)?;
        let program = parse(&facts.rewritten)
            .map_err(|error| format!("internal error: the rewritten expression fails: {error}"))?;
        check_rewritten_references(&program, &facts)?;
        let patterns = compile_pattern_literals(&facts.pattern_literals)?;
        Ok(CompiledExpression {
            source: source.to_owned(),
            reads_old_self: original.references().has_variable("oldSelf"),
            result: result_kind(&tokens),
            cost: CostModel {
                tokens: tokens.len(),
                loop_depth: facts.loop_depth,
                accumulates: facts.accumulates,
                lists_from_strings: facts.lists_from_strings,
            },
            program,
            functions: function_environment(Arc::new(patterns)),
        })
    }

    fn evaluate(&self, self_value: &Value, old_self: Option<&Value>) -> Result<Cel, String> {
        let mut shape = InputShape::default();
        let self_value = json_to_cel(self_value, 0, &mut shape)?;
        let old_self = match (self.reads_old_self, old_self) {
            (true, Some(old)) => Some(json_to_cel(old, 0, &mut shape)?),
            (true, None) => {
                return Err("oldSelf is not available: transition rules need the old value".into())
            }
            (false, _) => None,
        };
        self.check_cost(&shape)?;
        let mut scope = self.functions.new_inner_scope();
        scope.add_variable_from_value("self", self_value);
        if let Some(old_self) = old_self {
            scope.add_variable_from_value("oldSelf", old_self);
        }
        // The interpreter has `todo!()`s and unchecked arithmetic; whatever
        // the rewriting missed must still end as an error.
        match catch_unwind(AssertUnwindSafe(|| self.program.execute(&scope))) {
            Ok(result) => result.map_err(describe_error),
            Err(panic) => Err(truncate(format!(
                "evaluation failed: {}",
                panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("internal error")
            ))),
        }
    }

    /// Refuse an input on which the expression could run too long; see the
    /// module doc.
    fn check_cost(&self, shape: &InputShape) -> Result<(), String> {
        let cost = &self.cost;
        if cost.loop_depth == 0 {
            // Linear in the input and the expression: nothing to bound.
            return Ok(());
        }
        let mut width = shape.widest_collection.max(cost.tokens);
        if cost.lists_from_strings {
            width = width.max(shape.longest_string);
        }
        let width = width as u128;
        let per_iteration = cost.tokens as u128
            + if cost.accumulates {
                width / ACCUMULATION_COST_DIVISOR
            } else {
                0
            };
        let estimate = width
            .saturating_pow(cost.loop_depth)
            .saturating_mul(per_iteration);
        if estimate > COST_LIMIT {
            return Err(format!(
                "evaluation cost limit exceeded: macros nested {} deep over collections of up \
                 to {width} elements cost an estimated {estimate}, over the limit of \
                 {COST_LIMIT}",
                cost.loop_depth
            ));
        }
        Ok(())
    }
}

/// What [`json_to_cel`] learns of an input for [`CompiledExpression::check_cost`].
#[derive(Default)]
struct InputShape {
    widest_collection: usize,
    longest_string: usize,
}

fn json_to_cel(value: &Value, depth: usize, shape: &mut InputShape) -> Result<Cel, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!(
            "the value is nested deeper than {MAX_VALUE_DEPTH} levels"
        ));
    }
    Ok(match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => {
            if let Some(int) = n.as_i64() {
                Cel::Int(int)
            } else if let Some(uint) = n.as_u64() {
                Cel::UInt(uint)
            } else {
                Cel::Float(
                    n.as_f64()
                        .ok_or_else(|| format!("number {n} is out of range"))?,
                )
            }
        }
        Value::String(s) => {
            shape.longest_string = shape.longest_string.max(s.len());
            Cel::String(Arc::new(s.clone()))
        }
        Value::Array(items) => {
            shape.widest_collection = shape.widest_collection.max(items.len());
            let items = items
                .iter()
                .map(|item| json_to_cel(item, depth + 1, shape))
                .collect::<Result<Vec<_>, _>>()?;
            Cel::List(Arc::new(items))
        }
        Value::Object(fields) => {
            shape.widest_collection = shape.widest_collection.max(fields.len());
            let mut map = HashMap::with_capacity(fields.len());
            for (name, field) in fields {
                map.insert(
                    Key::String(Arc::new(name.clone())),
                    json_to_cel(field, depth + 1, shape)?,
                );
            }
            Cel::Map(map.into())
        }
    })
}

/// Parse, turning the parser's panics (it has some on malformed input)
/// into errors.
fn parse(source: &str) -> Result<Program, String> {
    match catch_unwind(|| Program::compile(source)) {
        Ok(Ok(program)) => Ok(program),
        Ok(Err(errors)) => Err(errors.to_string()),
        Err(_) => Err("ERROR: <input>: Syntax error: incomplete or malformed expression".into()),
    }
}

/// Every function and variable the source names must be one this engine
/// evaluates; reported in source order.
fn check_references(
    program: &Program,
    tokens: &[Token<'_>],
    facts: &SourceFacts,
) -> Result<(), String> {
    let references = program.references();
    let function_refused =
        |name: &str| !OPERATORS.contains(&name) && name != "_[_]" && function_named(name).is_none();
    let variable_refused = |name: &str| !facts.declares(name);
    let mut functions = references.functions();
    let mut variables = references.variables();
    functions.sort_unstable();
    variables.sort_unstable();
    // Source order first, then whatever names no token spells (`.f()`).
    let named_in_source = tokens.iter().filter_map(Token::identifier);
    for name in named_in_source.chain(functions.iter().chain(&variables).copied()) {
        if functions.contains(&name) && function_refused(name) {
            return Err(if name == "has" {
                "macro has() takes one field selection, as in has(self.x)".into()
            } else if LOOP_MACROS.contains(&name) {
                format!(
                    "macro {name}() takes a variable name and an expression, as in \
                     {name}(x, x > 0)"
                )
            } else {
                format!("function {name:?} is not supported")
            });
        }
        if variables.contains(&name) && variable_refused(name) {
            return Err(if name == "optional" {
                "optional values (optional.of(), optional.none()) are not supported".into()
            } else {
                format!(
                    "undeclared reference to '{name}' (only self, oldSelf and type names are \
                     declared)"
                )
            });
        }
    }
    for shadowing in ["self", "oldSelf"] {
        if facts.macro_variables.contains(shadowing) {
            return Err(format!("a macro variable may not be named {shadowing}"));
        }
    }
    Ok(())
}

/// The rewritten program may call only what the environment registers,
/// and nothing the interpreter would resolve leniently.
fn check_rewritten_references(program: &Program, facts: &SourceFacts) -> Result<(), String> {
    let references = program.references();
    for name in references.functions() {
        let registered = OPERATORS.contains(&name)
            || name == INDEX_FUNCTION
            || name == RANGE_FUNCTION
            || name
                .strip_prefix(INTERNAL_PREFIX)
                .is_some_and(|name| function_named(name).is_some());
        if !registered {
            return Err(format!(
                "internal error: the rewritten expression calls {name:?}"
            ));
        }
    }
    for name in references.variables() {
        if !facts.declares(name) {
            return Err(format!(
                "internal error: the rewritten expression reads {name:?}"
            ));
        }
    }
    Ok(())
}

/// Regular expressions given as literals, compiled once; an invalid one
/// fails the compilation as in Kubernetes.
fn compile_pattern_literals(literals: &[&str]) -> Result<Patterns, String> {
    let mut patterns = HashMap::new();
    for literal in literals {
        // The literal's value, escapes resolved by CEL itself.
        let value = parse(literal).map(|program| program.execute(&Context::empty()));
        if let Ok(Ok(Cel::String(pattern))) = value {
            let regex = compile_pattern(&pattern)?;
            patterns.insert(pattern.as_ref().clone(), regex);
        }
    }
    Ok(patterns)
}

fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|error| {
            // The syntax error's last line says what is wrong; the others
            // draw the pattern.
            let error = error.to_string();
            let reason = error.lines().last().unwrap_or_default().trim();
            truncate(format!("invalid regular expression {pattern:?}: {reason}"))
        })
}

fn describe_error(error: ExecutionError) -> String {
    let operator = |name: &str| match name {
        "add" => "+",
        "sub" => "-",
        "mul" => "*",
        "div" => "/",
        "rem" => "%",
        "minus" => "-",
        _ => "?",
    };
    truncate(match error {
        ExecutionError::NoSuchKey(key) => format!("no such key: {key}"),
        ExecutionError::UndeclaredReference(name) => format!("undeclared reference to '{name}'"),
        ExecutionError::UnsupportedBinaryOperator(name, left, right) => format!(
            "no such overload: {} {} {}",
            type_name(&left),
            operator(name),
            type_name(&right)
        ),
        ExecutionError::UnsupportedUnaryOperator(name, value) => {
            format!("no such overload: {}{}", operator(name), type_name(&value))
        }
        ExecutionError::ValuesNotComparable(left, right) => format!(
            "no such overload: {} compared with {}",
            type_name(&left),
            type_name(&right)
        ),
        ExecutionError::DivisionByZero(_) => "division by zero".into(),
        ExecutionError::RemainderByZero(_) => "modulus by zero".into(),
        ExecutionError::Overflow(name, ..) => {
            format!("integer overflow in {}", operator(name))
        }
        ExecutionError::UnsupportedKeyType(key) => {
            format!("unsupported map key type: {}", type_name(&key))
        }
        ExecutionError::FunctionError { function, message } => format!("{function}: {message}"),
        other => other.to_string(),
    })
}

fn truncate(mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_CHARS) {
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// The CEL type of a value, as `type()` gives it and errors name it.
fn type_name(value: &Cel) -> &'static str {
    match value {
        Cel::List(_) => "list",
        Cel::Map(_) => "map",
        // The only function values here are type values (see `TYPE_NAMES`).
        Cel::Function(..) => "type",
        Cel::Int(_) => "int",
        Cel::UInt(_) => "uint",
        Cel::Float(_) => "double",
        Cel::String(_) => "string",
        Cel::Bytes(_) => "bytes",
        Cel::Bool(_) => "bool",
        Cel::Duration(_) => "google.protobuf.Duration",
        Cel::Timestamp(_) => "google.protobuf.Timestamp",
        Cel::Null => "null_type",
    }
}

/// A type as a value: a function value, which JSON never becomes, so a
/// type equals only the same type.
fn type_value(name: &str) -> Cel {
    Cel::Function(Arc::new(name.to_owned()), None)
}

// ---- Source analysis -------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenKind {
    Identifier,
    Number,
    /// A string or bytes literal, quotes and prefix included.
    Literal,
    Punctuation,
}

#[derive(Clone, Copy, Debug)]
struct Token<'s> {
    kind: TokenKind,
    text: &'s str,
    start: usize,
}

impl<'s> Token<'s> {
    fn end(&self) -> usize {
        self.start + self.text.len()
    }

    fn is(&self, punctuation: &str) -> bool {
        self.kind == TokenKind::Punctuation && self.text == punctuation
    }

    fn identifier(&self) -> Option<&'s str> {
        (self.kind == TokenKind::Identifier).then_some(self.text)
    }

    /// Whether an operand can end here, so that a following `[` indexes
    /// and a following `-` subtracts (rather than opening a list and
    /// negating).
    fn ends_operand(&self) -> bool {
        match self.kind {
            TokenKind::Identifier => self.text != "in",
            TokenKind::Number | TokenKind::Literal => true,
            TokenKind::Punctuation => matches!(self.text, ")" | "]" | "}"),
        }
    }
}

/// Split CEL source into tokens (comments and white space dropped).
fn tokenize(source: &str) -> Result<Vec<Token<'_>>, String> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &source[at..];
        let byte = bytes[at];
        let (kind, len) = if byte.is_ascii_whitespace() {
            at += 1;
            continue;
        } else if rest.starts_with("//") {
            at += rest.find('\n').unwrap_or(rest.len());
            continue;
        } else if let Some(len) =
            literal_len(rest).map_err(|reason| syntax_error(source, at, reason))?
        {
            (TokenKind::Literal, len)
        } else if byte.is_ascii_alphabetic() || byte == b'_' {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            (TokenKind::Identifier, len)
        } else if byte.is_ascii_digit()
            || (byte == b'.' && bytes.get(at + 1).is_some_and(u8::is_ascii_digit))
        {
            (TokenKind::Number, number_len(rest.as_bytes()))
        } else if ["==", "!=", "<=", ">=", "&&", "||"]
            .iter()
            .any(|operator| rest.starts_with(operator))
        {
            (TokenKind::Punctuation, 2)
        } else if b"<>!+-*/%?:.,()[]{}=".contains(&byte) {
            (TokenKind::Punctuation, 1)
        } else {
            let found = rest.chars().next().unwrap_or_default();
            return Err(syntax_error(
                source,
                at,
                &format!("unexpected character {found:?}"),
            ));
        };
        tokens.push(Token {
            kind,
            text: &rest[..len],
            start: at,
        });
        at += len;
    }
    Ok(tokens)
}

/// An error in the parser's format, for what the tokenizer finds first.
fn syntax_error(source: &str, at: usize, reason: &str) -> String {
    let line = source[..at].matches('\n').count() + 1;
    let column = source[..at]
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    format!("ERROR: <input>:{line}:{column}: Syntax error: {reason}")
}

/// Length of the string or bytes literal `rest` starts with, if it starts
/// with one: `[bB]?[rR]?` then `'`, `"`, `'''` or `"""`.
fn literal_len(rest: &str) -> Result<Option<usize>, &'static str> {
    let bytes = rest.as_bytes();
    let mut at = usize::from(matches!(bytes.first(), Some(b'b' | b'B')));
    let raw = matches!(bytes.get(at), Some(b'r' | b'R'));
    at += usize::from(raw);
    let quote = match bytes.get(at) {
        Some(&quote @ (b'\'' | b'"')) => quote,
        _ => return Ok(None),
    };
    let triple = bytes[at..].starts_with(&[quote; 3]);
    at += if triple { 3 } else { 1 };
    loop {
        match bytes.get(at) {
            None => return Err("unterminated string literal"),
            Some(b'\\') if !raw => at += 1 + escape_len(&bytes[at + 1..])?,
            Some(&byte) if byte == quote => {
                if !triple {
                    return Ok(Some(at + 1));
                }
                if bytes[at..].starts_with(&[quote; 3]) {
                    return Ok(Some(at + 3));
                }
                at += 1;
            }
            Some(b'\n' | b'\r') if !triple => return Err("line break in a string literal"),
            Some(_) => at += 1,
        }
    }
}

/// Length of the escape sequence after a backslash (the parser panics on
/// some invalid ones).
fn escape_len(escape: &[u8]) -> Result<usize, &'static str> {
    let digits = |len: usize, radix: u32| {
        let valid = escape.len() > len
            && escape[1..=len]
                .iter()
                .all(|b| char::from(*b).is_digit(radix));
        valid.then_some(len + 1)
    };
    let len = match escape.first() {
        Some(
            b'a' | b'b' | b'f' | b'n' | b'r' | b't' | b'v' | b'\\' | b'\'' | b'"' | b'`' | b'?',
        ) => Some(1),
        Some(b'x' | b'X') => digits(2, 16),
        Some(b'u') => digits(4, 16),
        Some(b'U') => digits(8, 16),
        Some(b'0'..=b'3') => digits(2, 8),
        _ => None,
    };
    len.ok_or("invalid escape sequence in a string literal")
}

/// Length of the number `bytes` starts with: decimal or hexadecimal
/// integers with an optional `u`, or doubles.
fn number_len(bytes: &[u8]) -> usize {
    let digits_from = |at: usize| {
        at + bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    if bytes.starts_with(b"0x") || bytes.starts_with(b"0X") {
        let end = 2 + bytes[2..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        return end + usize::from(matches!(bytes.get(end), Some(b'u' | b'U')));
    }
    let mut end = digits_from(0);
    let mut double = false;
    if bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
        end = digits_from(end + 1);
        double = true;
    }
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(bytes.get(end + 1), Some(b'+' | b'-')));
        if bytes.get(end + 1 + sign).is_some_and(u8::is_ascii_digit) {
            end = digits_from(end + 1 + sign);
            double = true;
        }
    }
    if !double && matches!(bytes.get(end), Some(b'u' | b'U')) {
        end += 1;
    }
    end
}

/// Report missing operands (`1 +`, `f(1,`, `{'a': }`) and closing brackets
/// that close nothing as syntax errors: the parser panics on those.
fn check_structure(source: &str, tokens: &[Token<'_>]) -> Result<(), String> {
    let starts_operand = |token: &Token<'_>| match token.kind {
        TokenKind::Identifier => token.text != "in",
        TokenKind::Number | TokenKind::Literal => true,
        TokenKind::Punctuation => matches!(token.text, "(" | "[" | "{" | "!" | "-" | "."),
    };
    if tokens.is_empty() {
        return Err(syntax_error(source, source.len(), "empty expression"));
    }
    let mut open = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        if token.kind == TokenKind::Punctuation {
            match token.text {
                "(" => open.push(")"),
                "[" => open.push("]"),
                "{" => open.push("}"),
                ")" | "]" | "}" if open.pop() != Some(token.text) => {
                    return Err(syntax_error(
                        source,
                        token.start,
                        &format!("unbalanced {:?}", token.text),
                    ))
                }
                _ => {}
            }
        }
        let previous = at.checked_sub(1).map(|i| tokens[i]);
        let next = tokens.get(at + 1);
        let operand_missing = match (token.kind, token.text) {
            (TokenKind::Identifier, "in") => !next.is_some_and(starts_operand),
            (TokenKind::Identifier | TokenKind::Number | TokenKind::Literal, _) => false,
            (_, ")" | "]" | "}") => false,
            // Calls, lists and maps may be empty; lists and maps allow a
            // trailing comma, calls do not.
            (_, "(") => {
                let call = previous.is_some_and(|t| t.identifier().is_some_and(|n| n != "in"));
                next.is_none_or(|t| t.is(")") && !call)
            }
            (_, "[") => {
                let index = previous.is_some_and(|t| t.ends_operand());
                next.is_none_or(|t| t.is("]") && index)
            }
            (_, "{" | ".") => next.is_none(),
            (_, ",") => !next.is_some_and(|t| starts_operand(t) || t.is("]") || t.is("}")),
            _ => !next.is_some_and(starts_operand),
        };
        if operand_missing {
            let (at, found) = match next {
                Some(next) => (next.start, format!("{:?}", next.text)),
                None => (source.len(), "the end".into()),
            };
            return Err(syntax_error(
                source,
                at,
                &format!("expected an operand after {:?}, found {found}", token.text),
            ));
        }
    }
    Ok(())
}

/// Refuse expressions whose syntax tree could be too deep for the stack.
/// The estimate adds [`BRACKET_DEPTH_WEIGHT`] per open bracket and one per
/// chaining operator (`.`, arithmetic, comparison, `?`, unary) since the
/// last sibling boundary (`,`, `&&`, `||`, whose chains the parser
/// balances) at each open level.
fn check_syntax_depth(tokens: &[Token<'_>]) -> Result<(), String> {
    // Chaining operators at each open bracket level, outermost first.
    let mut chains = vec![0usize];
    let mut chained = 0;
    for token in tokens.iter().filter(|t| t.kind == TokenKind::Punctuation) {
        match token.text {
            "(" | "[" | "{" => chains.push(0),
            ")" | "]" | "}" => {
                if chains.len() > 1 {
                    chained -= chains.pop().unwrap_or_default();
                }
            }
            "," | "&&" | "||" => {
                if let Some(level) = chains.last_mut() {
                    chained -= *level;
                    *level = 0;
                }
            }
            _ => {
                if let Some(level) = chains.last_mut() {
                    *level += 1;
                    chained += 1;
                }
            }
        }
        let depth = BRACKET_DEPTH_WEIGHT * (chains.len() - 1) + chained;
        if depth > MAX_SYNTAX_DEPTH {
            return Err(format!(
                "the expression nests too deeply (depth estimate over {MAX_SYNTAX_DEPTH})"
            ));
        }
    }
    Ok(())
}

/// What the tokens tell about an expression that parses.
#[derive(Default)]
struct SourceFacts<'s> {
    /// The source rewritten for evaluation (see the module doc).
    rewritten: String,
    /// Names bound by macros (`x` in `self.all(x, x > 0)`).
    macro_variables: BTreeSet<&'s str>,
    loop_depth: u32,
    accumulates: bool,
    lists_from_strings: bool,
    /// String literals passed as the pattern of `matches`, `find` or
    /// `findAll`, as written.
    pattern_literals: Vec<&'s str>,
}

impl SourceFacts<'_> {
    /// Whether `name` is a variable the expression may read.
    fn declares(&self, name: &str) -> bool {
        matches!(name, "self" | "oldSelf")
            || TYPE_NAMES.contains(&name)
            || self.macro_variables.contains(name)
    }
}

/// An open bracket while [`analyze`] walks the tokens.
struct OpenBracket {
    /// `[` of an index, rewritten to a call.
    index: bool,
    /// `(` of an iterating macro.
    loop_body: bool,
    call: Option<CallSite>,
}

/// `(` of a call of a registered function.
struct CallSite {
    function: &'static FunctionSpec,
    /// `x.f(…)` rather than `f(x, …)`.
    method: bool,
    commas: usize,
}

/// Check what the parser accepts but the engine must refuse, gather the
/// facts compilation needs, and rewrite the source for evaluation.
fn analyze<'s>(source: &'s str, tokens: &[Token<'s>]) -> Result<SourceFacts<'s>, String> {
    let mut facts = SourceFacts::default();
    let mut out = String::with_capacity(source.len() + 64);
    let mut open: Vec<OpenBracket> = Vec::new();
    let mut pending_call: Option<CallSite> = None;
    let mut pending_loop = false;
    let mut loops_open = 0;
    // Source up to here is in `out` (gaps keep white space and comments).
    let mut copied = 0;
    let mut at = 0;
    while at < tokens.len() {
        let token = tokens[at];
        out.push_str(&source[copied..token.start]);
        copied = token.end();
        let previous = at.checked_sub(1).map(|i| tokens[i]);
        let after_operand = previous.is_some_and(|t| t.ends_operand());
        let after_dot = previous.is_some_and(|t| t.is("."));
        let next = tokens.get(at + 1);
        match token.kind {
            TokenKind::Identifier => {
                let name = token.text;
                if name.starts_with(INTERNAL_PREFIX) {
                    return Err(format!(
                        "{name}: names starting with {INTERNAL_PREFIX} are reserved"
                    ));
                }
                if next.is_some_and(|t| t.is("{")) && !RESERVED_WORDS.contains(&name) {
                    return Err(format!(
                        "message construction ({name}{{...}}) is not supported"
                    ));
                }
                if after_dot && is_escaped_property(name) {
                    return Err(format!(
                        "escaped property name {name:?}: properties are map keys here, read \
                         them unescaped (self['x-y'], self.namespace)"
                    ));
                }
                let called = next.is_some_and(|t| t.is("("));
                if let Some(function) = function_named(name).filter(|_| called) {
                    out.push_str(INTERNAL_PREFIX);
                    let method = after_dot && at >= 2 && tokens[at - 2].ends_operand();
                    pending_call = Some(CallSite {
                        function,
                        method,
                        commas: 0,
                    });
                    facts.lists_from_strings |= matches!(name, "split" | "findAll");
                }
                out.push_str(name);
            }
            TokenKind::Punctuation => match token.text {
                "." => {
                    let loop_macro = next
                        .and_then(Token::identifier)
                        .filter(|name| LOOP_MACROS.contains(name));
                    if let (Some(name), true) = (
                        loop_macro,
                        after_operand && tokens.get(at + 2).is_some_and(|t| t.is("(")),
                    ) {
                        out.push('.');
                        out.push_str(RANGE_FUNCTION);
                        out.push_str("()");
                        pending_loop = true;
                        facts.accumulates |= matches!(name, "map" | "filter");
                        if let (Some(variable), Some(comma)) =
                            (tokens.get(at + 3), tokens.get(at + 4))
                        {
                            if let (Some(variable), true) = (variable.identifier(), comma.is(",")) {
                                facts.macro_variables.insert(variable);
                            }
                        }
                    }
                    out.push('.');
                }
                "[" if after_operand => {
                    out.push('.');
                    out.push_str(INDEX_FUNCTION);
                    out.push('(');
                    open.push(OpenBracket {
                        index: true,
                        loop_body: false,
                        call: None,
                    });
                }
                "(" | "[" | "{" => {
                    let parenthesis = token.is("(");
                    let loop_body = parenthesis && std::mem::take(&mut pending_loop);
                    if loop_body {
                        loops_open += 1;
                        facts.loop_depth = facts.loop_depth.max(loops_open);
                    }
                    open.push(OpenBracket {
                        index: false,
                        loop_body,
                        call: if parenthesis {
                            pending_call.take()
                        } else {
                            None
                        },
                    });
                    out.push_str(token.text);
                }
                ")" | "]" | "}" => {
                    let bracket = open
                        .pop()
                        .ok_or_else(|| syntax_error(source, token.start, "unbalanced brackets"))?;
                    if bracket.loop_body {
                        loops_open -= 1;
                    }
                    if let Some(call) = bracket.call {
                        let written = if previous.is_some_and(|t| t.is("(")) {
                            0
                        } else {
                            call.commas + 1
                        };
                        check_arity(&call, written)?;
                    }
                    out.push_str(if bracket.index { ")" } else { token.text });
                }
                "," => {
                    if let Some(call) = open.last_mut().and_then(|b| b.call.as_mut()) {
                        call.commas += 1;
                    }
                    out.push(',');
                }
                "!" | "-" if token.is("!") || !after_operand => {
                    // The parser reads `!!x` as `!x`: keep the run's parity.
                    let run = tokens[at..].iter().take_while(|t| t.is(token.text)).count();
                    if run % 2 == 1 {
                        out.push_str(token.text);
                    }
                    copied = tokens[at + run - 1].end();
                    at += run;
                    continue;
                }
                other => out.push_str(other),
            },
            TokenKind::Literal => {
                if is_pattern_literal(tokens, at, open.last()) {
                    facts.pattern_literals.push(token.text);
                }
                out.push_str(token.text);
            }
            TokenKind::Number => out.push_str(token.text),
        }
        at += 1;
    }
    out.push_str(&source[copied..]);
    if !open.is_empty() {
        return Err(syntax_error(source, source.len(), "unbalanced brackets"));
    }
    facts.rewritten = out;
    Ok(facts)
}

fn check_arity(call: &CallSite, written: usize) -> Result<(), String> {
    let function = call.function;
    // The receiver of `f(x, …)` is its first argument.
    let args = if call.method {
        written
    } else {
        written
            .checked_sub(1)
            .ok_or_else(|| format!("function {:?} needs an argument", function.name))?
    };
    if (function.min_args..=function.max_args).contains(&args) {
        return Ok(());
    }
    let expected = if function.min_args == function.max_args {
        format!("{}", function.min_args)
    } else {
        format!("{} to {}", function.min_args, function.max_args)
    };
    let form = if call.method { "x." } else { "" };
    Err(format!(
        "function {:?} takes {expected} argument(s) as in {form}{}(...), got {args}",
        function.name, function.name
    ))
}

/// Whether the literal at `at` is a regular expression: the first
/// argument of `x.matches(…)`, `x.find(…)`, `x.findAll(…)`, or the second
/// of `matches(x, …)`.
fn is_pattern_literal(tokens: &[Token<'_>], at: usize, innermost: Option<&OpenBracket>) -> bool {
    let Some(call) = innermost.and_then(|b| b.call.as_ref()) else {
        return false;
    };
    let previous = at.checked_sub(1).map(|i| tokens[i]);
    let next = tokens.get(at + 1);
    let bytes = tokens[at].text.starts_with(['b', 'B']);
    let whole_argument = next.is_some_and(|t| t.is(")") || t.is(","));
    call.function.takes_pattern
        && !bytes
        && whole_argument
        && if call.method {
            call.commas == 0 && previous.is_some_and(|t| t.is("("))
        } else {
            call.commas == 1 && previous.is_some_and(|t| t.is(","))
        }
}

/// Kubernetes' escaping of property names that are not CEL identifiers.
fn is_escaped_property(name: &str) -> bool {
    ["__dash__", "__dot__", "__slash__", "__underscores__"]
        .iter()
        .any(|escape| name.contains(escape))
        || name
            .strip_prefix("__")
            .and_then(|name| name.strip_suffix("__"))
            .is_some_and(|word| RESERVED_WORDS.contains(&word))
}

/// What an expression can evaluate to, as far as its tokens show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ResultKind {
    may_be_bool: bool,
    may_be_string: bool,
}

const ANY: ResultKind = ResultKind {
    may_be_bool: true,
    may_be_string: true,
};
const BOOL: ResultKind = ResultKind {
    may_be_bool: true,
    may_be_string: false,
};
const STRING: ResultKind = ResultKind {
    may_be_bool: false,
    may_be_string: true,
};
const OTHER: ResultKind = ResultKind {
    may_be_bool: false,
    may_be_string: false,
};

/// The result kind of a parsed expression's tokens, from its outermost
/// operator, literal or call.
fn result_kind(tokens: &[Token<'_>]) -> ResultKind {
    let (Some(first), Some(last)) = (tokens.first(), tokens.last()) else {
        return ANY;
    };
    let mut depth = 0usize;
    let (mut ternary, mut boolean, mut plus, mut arithmetic) = (false, false, false, false);
    for (at, token) in tokens.iter().enumerate() {
        match token.text {
            "(" | "[" | "{" if token.kind == TokenKind::Punctuation => depth += 1,
            ")" | "]" | "}" if token.kind == TokenKind::Punctuation => {
                depth = depth.saturating_sub(1)
            }
            _ if depth > 0 => {}
            "?" => ternary = true,
            "&&" | "||" | "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" => boolean = true,
            "+" => plus = true,
            "*" | "/" | "%" => arithmetic = true,
            "-" if at > 0 && tokens[at - 1].ends_operand() => arithmetic = true,
            _ => {}
        }
    }
    if ternary {
        return ANY;
    }
    if boolean {
        return BOOL;
    }
    if plus {
        // Numbers, lists or strings.
        return STRING;
    }
    if arithmetic || first.is("-") {
        return OTHER;
    }
    if first.is("!") {
        return BOOL;
    }
    let opening = |close: usize| matching_open(tokens, close);
    match last.kind {
        TokenKind::Punctuation if last.is(")") => match opening(tokens.len() - 1) {
            Some(0) => result_kind(&tokens[1..tokens.len() - 1]),
            Some(open) => match tokens[open - 1].identifier() {
                Some("all" | "exists" | "exists_one" | "existsOne" | "has") => BOOL,
                Some("map" | "filter") => OTHER,
                Some(name) => function_named(name).map_or(ANY, |f| f.result),
                None => ANY,
            },
            None => ANY,
        },
        // A list or map literal; `x[k]` may be anything.
        TokenKind::Punctuation if opening(tokens.len() - 1) == Some(0) => OTHER,
        TokenKind::Punctuation => ANY,
        TokenKind::Identifier if tokens.len() == 1 => match last.text {
            "true" | "false" => BOOL,
            "null" => OTHER,
            _ => ANY,
        },
        TokenKind::Identifier => ANY,
        TokenKind::Number => OTHER,
        TokenKind::Literal if last.text.starts_with(['b', 'B']) => OTHER,
        TokenKind::Literal => STRING,
    }
}

/// Index of the bracket that the one at `close` closes.
fn matching_open(tokens: &[Token<'_>], close: usize) -> Option<usize> {
    let mut depth = 0usize;
    for at in (0..=close).rev() {
        let token = &tokens[at];
        if token.kind != TokenKind::Punctuation {
            continue;
        }
        match token.text {
            ")" | "]" | "}" => depth += 1,
            "(" | "[" | "{" => {
                depth -= 1;
                if depth == 0 {
                    return Some(at);
                }
            }
            _ => {}
        }
    }
    None
}

// ---- Functions ---------------------------------------------------------------

/// Regular expressions compiled from literals, by pattern.
type Patterns = HashMap<String, Regex>;

/// A registered function. Calls are `x.f(args…)` or `f(x, args…)`; `x` is
/// the receiver either way.
struct FunctionSpec {
    name: &'static str,
    /// Arguments besides the receiver.
    min_args: usize,
    max_args: usize,
    result: ResultKind,
    /// The first argument is a regular expression.
    takes_pattern: bool,
    eval: fn(&Call<'_>) -> Result<Cel, String>,
}

/// A call's evaluated receiver and arguments.
struct Call<'a> {
    receiver: Cel,
    args: Vec<Cel>,
    patterns: &'a Patterns,
}

const fn function(
    name: &'static str,
    args: (usize, usize),
    result: ResultKind,
    eval: fn(&Call<'_>) -> Result<Cel, String>,
) -> FunctionSpec {
    FunctionSpec {
        name,
        min_args: args.0,
        max_args: args.1,
        result,
        takes_pattern: false,
        eval,
    }
}

const fn pattern_function(
    name: &'static str,
    args: (usize, usize),
    result: ResultKind,
    eval: fn(&Call<'_>) -> Result<Cel, String>,
) -> FunctionSpec {
    FunctionSpec {
        takes_pattern: true,
        ..function(name, args, result, eval)
    }
}

static FUNCTIONS: &[FunctionSpec] = &[
    // Standard CEL.
    function("size", (0, 0), OTHER, size),
    function("contains", (1, 1), BOOL, contains),
    function("startsWith", (1, 1), BOOL, starts_with),
    function("endsWith", (1, 1), BOOL, ends_with),
    pattern_function("matches", (1, 1), BOOL, matches),
    function("int", (0, 0), OTHER, to_int),
    function("uint", (0, 0), OTHER, to_uint),
    function("double", (0, 0), OTHER, to_double),
    function("string", (0, 0), STRING, to_string),
    function("bytes", (0, 0), OTHER, to_bytes),
    function("bool", (0, 0), BOOL, to_bool),
    function("dyn", (0, 0), ANY, dyn_value),
    function("type", (0, 0), OTHER, type_of),
    function("duration", (0, 0), OTHER, to_duration),
    function("timestamp", (0, 0), OTHER, to_timestamp),
    function("getFullYear", (0, 1), OTHER, get_full_year),
    function("getMonth", (0, 1), OTHER, get_month),
    function("getDayOfYear", (0, 1), OTHER, get_day_of_year),
    function("getDayOfMonth", (0, 1), OTHER, get_day_of_month),
    function("getDate", (0, 1), OTHER, get_date),
    function("getDayOfWeek", (0, 1), OTHER, get_day_of_week),
    function("getHours", (0, 1), OTHER, get_hours),
    function("getMinutes", (0, 1), OTHER, get_minutes),
    function("getSeconds", (0, 1), OTHER, get_seconds),
    function("getMilliseconds", (0, 1), OTHER, get_milliseconds),
    // Kubernetes' strings (cel-go's ext.Strings).
    function("charAt", (1, 1), STRING, char_at),
    function("indexOf", (1, 2), OTHER, index_of),
    function("lastIndexOf", (1, 2), OTHER, last_index_of),
    function("lowerAscii", (0, 0), STRING, lower_ascii),
    function("upperAscii", (0, 0), STRING, upper_ascii),
    function("replace", (2, 3), STRING, replace),
    function("split", (1, 2), OTHER, split),
    function("substring", (1, 2), STRING, substring),
    function("trim", (0, 0), STRING, trim),
    function("join", (0, 1), STRING, join),
    // Kubernetes' lists.
    function("isSorted", (0, 0), BOOL, is_sorted),
    function("sum", (0, 0), OTHER, sum),
    function("min", (0, 0), ANY, min),
    function("max", (0, 0), ANY, max),
    // Kubernetes' regex.
    pattern_function("find", (1, 1), STRING, find),
    pattern_function("findAll", (1, 2), OTHER, find_all),
];

fn function_named(name: &str) -> Option<&'static FunctionSpec> {
    FUNCTIONS.iter().find(|function| function.name == name)
}

/// The interpreter's root context: every function under its internal name.
fn function_environment(patterns: Arc<Patterns>) -> Context<'static> {
    let mut environment = Context::empty();
    for spec in FUNCTIONS {
        let patterns = Arc::clone(&patterns);
        environment.add_function(
            &format!("{INTERNAL_PREFIX}{}", spec.name),
            move |ftx: &FunctionContext| invoke(ftx, spec, &patterns),
        );
    }
    environment.add_function(INDEX_FUNCTION, index);
    environment.add_function(RANGE_FUNCTION, range);
    for name in TYPE_NAMES {
        environment.add_variable_from_value(*name, type_value(name));
    }
    environment
}

fn invoke(ftx: &FunctionContext, spec: &FunctionSpec, patterns: &Patterns) -> ResolveResult {
    let fail = |message: String| ExecutionError::function_error(spec.name, message);
    let mut values = Vec::with_capacity(ftx.args.len() + 1);
    values.extend(ftx.this.clone());
    for arg in &ftx.args {
        values.push(ftx.ptx.resolve(arg)?);
    }
    let mut values = values.into_iter();
    let receiver = values
        .next()
        .ok_or_else(|| fail("needs an argument".into()))?;
    let args: Vec<Cel> = values.collect();
    // Checked when compiling too; the interpreter would ignore extras.
    if !(spec.min_args..=spec.max_args).contains(&args.len()) {
        return Err(fail(format!("wrong number of arguments: {}", args.len())));
    }
    (spec.eval)(&Call {
        receiver,
        args,
        patterns,
    })
    .map_err(fail)
}

/// `x[k]`: a list element or a map entry, an error when there is none.
fn index(ftx: &FunctionContext) -> ResolveResult {
    let fail = |message: String| ExecutionError::function_error("index", message);
    let (Some(container), [key]) = (&ftx.this, ftx.args.as_slice()) else {
        return Err(fail("takes one index".into()));
    };
    let key = ftx.ptx.resolve(key)?;
    let element = match (container, &key) {
        (Cel::List(items), &Cel::Int(_) | &Cel::UInt(_)) => {
            let position = match key {
                Cel::Int(i) => i128::from(i),
                Cel::UInt(u) => i128::from(u),
                _ => -1,
            };
            usize::try_from(position)
                .ok()
                .and_then(|i| items.get(i))
                .ok_or_else(|| fail(format!("index out of range: {position}")))?
        }
        (Cel::Map(map), Cel::String(_) | Cel::Int(_) | Cel::UInt(_) | Cel::Bool(_)) => {
            let key: Key = key
                .clone()
                .try_into()
                .map_err(|_| fail("unsupported map key".into()))?;
            map.get(&key)
                .ok_or_else(|| ExecutionError::NoSuchKey(Arc::new(key.to_string())))?
        }
        (container, key) => {
            return Err(fail(format!(
                "no such overload: {}[{}]",
                type_name(container),
                type_name(key)
            )))
        }
    };
    Ok(element.clone())
}

/// The target of a macro, which the interpreter can iterate only when it
/// is a list or a map (it panics otherwise).
fn range(ftx: &FunctionContext) -> ResolveResult {
    match &ftx.this {
        Some(target @ (Cel::List(_) | Cel::Map(_))) => Ok(target.clone()),
        Some(other) => Err(ExecutionError::function_error(
            "macro",
            format!("cannot iterate over {}", type_name(other)),
        )),
        None => Err(ExecutionError::function_error("macro", "no target")),
    }
}

impl Call<'_> {
    fn string(&self) -> Result<&str, String> {
        match &self.receiver {
            Cel::String(s) => Ok(s),
            other => Err(no_overload(other)),
        }
    }

    fn list(&self) -> Result<&[Cel], String> {
        match &self.receiver {
            Cel::List(items) => Ok(items),
            other => Err(no_overload(other)),
        }
    }

    fn arg(&self, at: usize) -> Result<&Cel, String> {
        self.args
            .get(at)
            .ok_or_else(|| format!("missing argument {}", at + 1))
    }

    fn string_arg(&self, at: usize) -> Result<&str, String> {
        match self.arg(at)? {
            Cel::String(s) => Ok(s),
            other => Err(format!(
                "no such overload: argument {} is {}",
                at + 1,
                type_name(other)
            )),
        }
    }

    fn int_arg(&self, at: usize) -> Result<i64, String> {
        match self.arg(at)? {
            Cel::Int(i) => Ok(*i),
            other => Err(format!(
                "no such overload: argument {} is {}",
                at + 1,
                type_name(other)
            )),
        }
    }

    fn optional_int_arg(&self, at: usize) -> Result<Option<i64>, String> {
        if at < self.args.len() {
            self.int_arg(at).map(Some)
        } else {
            Ok(None)
        }
    }

    fn pattern(&self, at: usize) -> Result<Cow<'_, Regex>, String> {
        let pattern = self.string_arg(at)?;
        match self.patterns.get(pattern) {
            Some(regex) => Ok(Cow::Borrowed(regex)),
            None => compile_pattern(pattern).map(Cow::Owned),
        }
    }
}

fn no_overload(receiver: &Cel) -> String {
    format!("no such overload for {}", type_name(receiver))
}

fn int(n: usize) -> Cel {
    Cel::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn string(s: impl Into<String>) -> Cel {
    Cel::String(Arc::new(s.into()))
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Cel {
    Cel::List(Arc::new(items.into_iter().map(string).collect()))
}

fn size(call: &Call<'_>) -> Result<Cel, String> {
    Ok(int(match &call.receiver {
        // Code points, as CEL counts.
        Cel::String(s) => s.chars().count(),
        Cel::Bytes(b) => b.len(),
        Cel::List(items) => items.len(),
        Cel::Map(map) => map.map.len(),
        other => return Err(no_overload(other)),
    }))
}

fn contains(call: &Call<'_>) -> Result<Cel, String> {
    Ok(Cel::Bool(call.string()?.contains(call.string_arg(0)?)))
}

fn starts_with(call: &Call<'_>) -> Result<Cel, String> {
    Ok(Cel::Bool(call.string()?.starts_with(call.string_arg(0)?)))
}

fn ends_with(call: &Call<'_>) -> Result<Cel, String> {
    Ok(Cel::Bool(call.string()?.ends_with(call.string_arg(0)?)))
}

fn matches(call: &Call<'_>) -> Result<Cel, String> {
    Ok(Cel::Bool(call.pattern(0)?.is_match(call.string()?)))
}

fn find(call: &Call<'_>) -> Result<Cel, String> {
    let found = call.pattern(0)?.find(call.string()?).map(|m| m.as_str());
    Ok(string(found.unwrap_or_default()))
}

fn find_all(call: &Call<'_>) -> Result<Cel, String> {
    let limit = call.optional_int_arg(1)?.unwrap_or(-1);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let regex = call.pattern(0)?;
    Ok(strings(
        regex
            .find_iter(call.string()?)
            .take(limit)
            .map(|m| m.as_str()),
    ))
}

// Conversions.

fn to_int(call: &Call<'_>) -> Result<Cel, String> {
    const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;
    let overflow = || "integer overflow".to_string();
    match &call.receiver {
        Cel::Int(i) => Ok(Cel::Int(*i)),
        Cel::UInt(u) => i64::try_from(*u).map(Cel::Int).map_err(|_| overflow()),
        Cel::Float(f) if (-TWO_TO_63..TWO_TO_63).contains(f) => Ok(Cel::Int(f.trunc() as i64)),
        Cel::Float(_) => Err(overflow()),
        Cel::String(s) => s
            .parse()
            .map(Cel::Int)
            .map_err(|_| format!("cannot convert {s:?} to int")),
        Cel::Timestamp(t) => Ok(Cel::Int(t.timestamp())),
        Cel::Duration(d) => d.num_nanoseconds().map(Cel::Int).ok_or_else(overflow),
        other => Err(no_overload(other)),
    }
}

fn to_uint(call: &Call<'_>) -> Result<Cel, String> {
    const TWO_TO_64: f64 = 18_446_744_073_709_551_616.0;
    let overflow = || "unsigned integer overflow".to_string();
    match &call.receiver {
        Cel::Int(i) => u64::try_from(*i).map(Cel::UInt).map_err(|_| overflow()),
        Cel::UInt(u) => Ok(Cel::UInt(*u)),
        Cel::Float(f) if (0.0..TWO_TO_64).contains(f) => Ok(Cel::UInt(f.trunc() as u64)),
        Cel::Float(_) => Err(overflow()),
        Cel::String(s) => s
            .parse()
            .map(Cel::UInt)
            .map_err(|_| format!("cannot convert {s:?} to uint")),
        other => Err(no_overload(other)),
    }
}

fn to_double(call: &Call<'_>) -> Result<Cel, String> {
    match &call.receiver {
        Cel::Int(i) => Ok(Cel::Float(*i as f64)),
        Cel::UInt(u) => Ok(Cel::Float(*u as f64)),
        Cel::Float(f) => Ok(Cel::Float(*f)),
        Cel::String(s) => s
            .parse()
            .map(Cel::Float)
            .map_err(|_| format!("cannot convert {s:?} to double")),
        other => Err(no_overload(other)),
    }
}

fn to_string(call: &Call<'_>) -> Result<Cel, String> {
    Ok(string(match &call.receiver {
        Cel::String(s) => return Ok(Cel::String(Arc::clone(s))),
        Cel::Int(i) => i.to_string(),
        Cel::UInt(u) => u.to_string(),
        Cel::Float(f) => format_double(*f),
        Cel::Bool(b) => b.to_string(),
        Cel::Bytes(b) => {
            String::from_utf8(b.to_vec()).map_err(|_| "bytes are not valid UTF-8".to_string())?
        }
        Cel::Timestamp(t) => format_timestamp(t),
        Cel::Duration(d) => format_duration(d),
        other => return Err(no_overload(other)),
    }))
}

fn to_bytes(call: &Call<'_>) -> Result<Cel, String> {
    match &call.receiver {
        Cel::String(s) => Ok(Cel::Bytes(Arc::new(s.as_bytes().to_vec()))),
        Cel::Bytes(b) => Ok(Cel::Bytes(Arc::clone(b))),
        other => Err(no_overload(other)),
    }
}

fn to_bool(call: &Call<'_>) -> Result<Cel, String> {
    match &call.receiver {
        Cel::Bool(b) => Ok(Cel::Bool(*b)),
        Cel::String(s) => match s.as_str() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Cel::Bool(true)),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Cel::Bool(false)),
            _ => Err(format!("cannot convert {s:?} to bool")),
        },
        other => Err(no_overload(other)),
    }
}

fn dyn_value(call: &Call<'_>) -> Result<Cel, String> {
    Ok(call.receiver.clone())
}

fn type_of(call: &Call<'_>) -> Result<Cel, String> {
    Ok(type_value(type_name(&call.receiver)))
}

fn to_duration(call: &Call<'_>) -> Result<Cel, String> {
    match &call.receiver {
        Cel::String(s) => parse_duration(s)
            .map(|nanos| Cel::Duration(chrono::Duration::nanoseconds(nanos)))
            .map_err(|reason| format!("invalid duration {s:?}: {reason}")),
        Cel::Duration(d) => Ok(Cel::Duration(*d)),
        other => Err(no_overload(other)),
    }
}

fn to_timestamp(call: &Call<'_>) -> Result<Cel, String> {
    let time = match &call.receiver {
        Cel::String(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|error| format!("invalid timestamp {s:?}: {error}"))?,
        Cel::Int(seconds) => DateTime::from_timestamp(*seconds, 0)
            .ok_or_else(|| "timestamp out of range".to_string())?
            .fixed_offset(),
        Cel::Timestamp(t) => *t,
        other => return Err(no_overload(other)),
    };
    // CEL's range: years 1 to 9999.
    if !(1..=9999).contains(&time.with_timezone(&Utc).year()) {
        return Err("timestamp out of range".into());
    }
    Ok(Cel::Timestamp(time.with_timezone(&Utc.fix())))
}

/// Go's `time.ParseDuration`, as CEL's `duration()` reads: an optional
/// sign, then numbers (with optional fractions) each followed by a unit
/// among `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`; `0` alone. The result is
/// in nanoseconds and must fit in 64 bits.
fn parse_duration(text: &str) -> Result<i64, &'static str> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err("empty");
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(whole_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => {
                let len = after.bytes().take_while(u8::is_ascii_digit).count();
                after.split_at(len)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err("expected a number");
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("missing unit"),
            _ => return Err("unknown unit"),
        };
        // Digits beyond 2^63 ns are out of range anyway.
        if whole.len() > 20 {
            return Err("out of range");
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "out of range")?
        };
        // Nanoseconds need at most 18 fraction digits; more are dropped.
        let fraction = &fraction[..fraction.len().min(18)];
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| "out of range")?
        };
        total += whole * unit + fraction * unit / scale;
        if total > 1 << 63 {
            return Err("out of range");
        }
        rest = after;
    }
    let total = total as i128;
    i64::try_from(if negative { -total } else { total }).map_err(|_| "out of range")
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

/// RFC 3339 in UTC with the fraction's trailing zeros dropped, as Go's
/// `time.RFC3339Nano`.
fn format_timestamp(time: &DateTime<FixedOffset>) -> String {
    let time = time.with_timezone(&Utc);
    let mut text = time.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = time.nanosecond() % 1_000_000_000;
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Seconds with a fraction as needed and an `s`, as CEL's
/// `string(duration)`: `5400s`, `1.5s`.
fn format_duration(duration: &chrono::Duration) -> String {
    let nanos = duration.num_nanoseconds().map_or_else(
        || i128::from(duration.num_seconds()) * 1_000_000_000,
        i128::from,
    );
    let sign = if nanos < 0 { "-" } else { "" };
    let nanos = nanos.unsigned_abs();
    let (seconds, fraction) = (nanos / 1_000_000_000, nanos % 1_000_000_000);
    if fraction == 0 {
        format!("{sign}{seconds}s")
    } else {
        let fraction = format!("{fraction:09}");
        format!("{sign}{seconds}.{}s", fraction.trim_end_matches('0'))
    }
}

// Timestamp and duration getters.

/// A timestamp getter: the receiver in the time zone given as an optional
/// argument (UTC otherwise), or a duration getter when `from_duration` is
/// given and the receiver is a duration.
fn time_part(
    call: &Call<'_>,
    from_timestamp: fn(&DateTime<FixedOffset>) -> i64,
    from_duration: Option<fn(&chrono::Duration) -> i64>,
) -> Result<Cel, String> {
    match (&call.receiver, from_duration) {
        (Cel::Timestamp(time), _) => {
            let zone = match call.args.first() {
                None => Utc.fix(),
                Some(Cel::String(zone)) => time_zone(zone)?,
                Some(other) => return Err(no_overload(other)),
            };
            Ok(Cel::Int(from_timestamp(&time.with_timezone(&zone))))
        }
        (Cel::Duration(duration), Some(from_duration)) if call.args.is_empty() => {
            Ok(Cel::Int(from_duration(duration)))
        }
        (other, _) => Err(no_overload(other)),
    }
}

/// `UTC` or a `±HH:MM` offset; named zones need a time zone database this
/// engine does not carry.
fn time_zone(zone: &str) -> Result<FixedOffset, String> {
    if zone.is_empty() || zone == "UTC" {
        return Ok(Utc.fix());
    }
    let unsupported =
        || format!("time zone {zone:?} is not supported: use UTC or an offset such as '+01:00'");
    let (hours, minutes) = zone.split_once(':').ok_or_else(unsupported)?;
    let hours: i32 = hours.parse().map_err(|_| unsupported())?;
    let minutes: i32 = minutes.parse().map_err(|_| unsupported())?;
    if !(0..=59).contains(&minutes) || !(-23..=23).contains(&hours) {
        return Err(unsupported());
    }
    let offset = if zone.starts_with('-') {
        hours * 60 - minutes
    } else {
        hours * 60 + minutes
    };
    FixedOffset::east_opt(offset * 60).ok_or_else(unsupported)
}

fn get_full_year(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.year().into(), None)
}

fn get_month(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.month0().into(), None)
}

fn get_day_of_year(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.ordinal0().into(), None)
}

fn get_day_of_month(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.day0().into(), None)
}

fn get_date(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.day().into(), None)
}

fn get_day_of_week(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.weekday().num_days_from_sunday().into(), None)
}

fn get_hours(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.hour().into(), Some(|d| d.num_hours()))
}

fn get_minutes(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.minute().into(), Some(|d| d.num_minutes()))
}

fn get_seconds(call: &Call<'_>) -> Result<Cel, String> {
    time_part(call, |t| t.second().into(), Some(|d| d.num_seconds()))
}

fn get_milliseconds(call: &Call<'_>) -> Result<Cel, String> {
    time_part(
        call,
        // A leap second's nanoseconds run past 10^9.
        |t| (t.nanosecond() % 1_000_000_000 / 1_000_000).into(),
        Some(|d| d.num_milliseconds()),
    )
}

// Strings. Indices count code points.

/// Byte offset of code point `n` (the end when `n` is the length).
fn byte_offset(s: &str, n: usize) -> Option<usize> {
    s.char_indices()
        .map(|(at, _)| at)
        .chain(std::iter::once(s.len()))
        .nth(n)
}

fn code_points(s: &str, bytes: usize) -> Cel {
    int(s[..bytes].chars().count())
}

/// A non-negative index argument, or the error CEL gives for it.
fn position(index: i64) -> Result<usize, String> {
    usize::try_from(index).map_err(|_| format!("index out of range: {index}"))
}

fn char_at(call: &Call<'_>) -> Result<Cel, String> {
    let s = call.string()?;
    let index = call.int_arg(0)?;
    let at = position(index)?;
    match s.chars().nth(at) {
        Some(c) => Ok(string(c.to_string())),
        None if at == s.chars().count() => Ok(string("")),
        None => Err(format!("index out of range: {index}")),
    }
}

fn index_of(call: &Call<'_>) -> Result<Cel, String> {
    if let Cel::List(items) = &call.receiver {
        let needle = call.arg(0)?;
        if call.args.len() > 1 {
            return Err("lists take no offset".into());
        }
        return Ok(items
            .iter()
            .position(|item| item == needle)
            .map_or(Cel::Int(-1), int));
    }
    let s = call.string()?;
    let needle = call.string_arg(0)?;
    let offset = position(call.optional_int_arg(1)?.unwrap_or(0))?;
    let len = s.chars().count();
    if needle.is_empty() {
        return Ok(int(offset.min(len)));
    }
    if offset >= len {
        return Ok(Cel::Int(-1));
    }
    let start = byte_offset(s, offset).unwrap_or(s.len());
    Ok(match s[start..].find(needle) {
        Some(found) => code_points(s, start + found),
        None => Cel::Int(-1),
    })
}

fn last_index_of(call: &Call<'_>) -> Result<Cel, String> {
    if let Cel::List(items) = &call.receiver {
        let needle = call.arg(0)?;
        if call.args.len() > 1 {
            return Err("lists take no offset".into());
        }
        return Ok(items
            .iter()
            .rposition(|item| item == needle)
            .map_or(Cel::Int(-1), int));
    }
    let s = call.string()?;
    let needle = call.string_arg(0)?;
    let len = s.chars().count();
    let end = match call.optional_int_arg(1)? {
        None => s.len(),
        Some(offset) => {
            let offset = position(offset)?;
            if needle.is_empty() {
                return Ok(int(offset.min(len)));
            }
            if offset >= len {
                return Ok(Cel::Int(-1));
            }
            // A match may start at `offset` at the latest.
            let last_end = offset.saturating_add(needle.chars().count()).min(len);
            byte_offset(s, last_end).unwrap_or(s.len())
        }
    };
    Ok(match s[..end].rfind(needle) {
        Some(found) => code_points(s, found),
        None => Cel::Int(-1),
    })
}

fn lower_ascii(call: &Call<'_>) -> Result<Cel, String> {
    Ok(string(call.string()?.to_ascii_lowercase()))
}

fn upper_ascii(call: &Call<'_>) -> Result<Cel, String> {
    Ok(string(call.string()?.to_ascii_uppercase()))
}

fn trim(call: &Call<'_>) -> Result<Cel, String> {
    Ok(string(call.string()?.trim()))
}

fn replace(call: &Call<'_>) -> Result<Cel, String> {
    let s = call.string()?;
    let (old, new) = (call.string_arg(0)?, call.string_arg(1)?);
    // Negative: replace all.
    let limit = call
        .optional_int_arg(2)?
        .and_then(|limit| usize::try_from(limit).ok());
    // Refuse an oversized result before building it.
    let occurrences = s.matches(old).count();
    let replaced = limit.map_or(occurrences, |limit| limit.min(occurrences));
    let size = (s.len() - replaced * old.len()).saturating_add(replaced.saturating_mul(new.len()));
    if size > MAX_BUILT_STRING_BYTES {
        return Err(format!(
            "the result would be {size} bytes, over the limit of {MAX_BUILT_STRING_BYTES}"
        ));
    }
    Ok(string(match limit {
        None => s.replace(old, new),
        Some(limit) => s.replacen(old, new, limit),
    }))
}

fn split(call: &Call<'_>) -> Result<Cel, String> {
    let s = call.string()?;
    let separator = call.string_arg(0)?;
    // Negative: no limit.
    let limit = usize::try_from(call.optional_int_arg(1)?.unwrap_or(-1)).unwrap_or(usize::MAX);
    if limit == 0 {
        return Ok(strings([]));
    }
    if separator.is_empty() {
        // One piece per code point, the last taking the rest (Go's explode).
        let count = s.chars().count().min(limit);
        let mut pieces = Vec::with_capacity(count);
        let mut rest = s;
        while pieces.len() + 1 < count {
            let len = rest.chars().next().map_or(0, char::len_utf8);
            let (piece, after) = rest.split_at(len);
            pieces.push(piece);
            rest = after;
        }
        if count > 0 {
            pieces.push(rest);
        }
        return Ok(strings(pieces));
    }
    Ok(strings(s.splitn(limit, separator)))
}

fn substring(call: &Call<'_>) -> Result<Cel, String> {
    let s = call.string()?;
    let len = s.chars().count();
    let start = call.int_arg(0)?;
    let end = call.optional_int_arg(1)?;
    let out_of_range = || {
        let end = end.map_or_else(String::new, |end| format!(", {end}"));
        format!("index out of range: substring({start}{end}) of a string of length {len}")
    };
    let from = position(start).map_err(|_| out_of_range())?;
    let to = match end {
        Some(end) => position(end).map_err(|_| out_of_range())?,
        None => len,
    };
    if from > to || to > len {
        return Err(out_of_range());
    }
    let (from, to) = (
        byte_offset(s, from).unwrap_or(s.len()),
        byte_offset(s, to).unwrap_or(s.len()),
    );
    Ok(string(&s[from..to]))
}

fn join(call: &Call<'_>) -> Result<Cel, String> {
    let items = call.list()?;
    let separator = if call.args.is_empty() {
        ""
    } else {
        call.string_arg(0)?
    };
    let mut joined = String::new();
    for (at, item) in items.iter().enumerate() {
        let Cel::String(item) = item else {
            return Err(format!("no such overload: list of {}", type_name(item)));
        };
        if at > 0 {
            joined.push_str(separator);
        }
        joined.push_str(item);
        if joined.len() > MAX_BUILT_STRING_BYTES {
            return Err(format!(
                "the result would be over the limit of {MAX_BUILT_STRING_BYTES} bytes"
            ));
        }
    }
    Ok(string(joined))
}

// Lists.

fn compare(a: &Cel, b: &Cel) -> Result<Ordering, String> {
    a.partial_cmp(b).ok_or_else(|| {
        format!(
            "no such overload: {} compared with {}",
            type_name(a),
            type_name(b)
        )
    })
}

fn is_sorted(call: &Call<'_>) -> Result<Cel, String> {
    for pair in call.list()?.windows(2) {
        if compare(&pair[0], &pair[1])? == Ordering::Greater {
            return Ok(Cel::Bool(false));
        }
    }
    Ok(Cel::Bool(true))
}

fn sum(call: &Call<'_>) -> Result<Cel, String> {
    let items = call.list()?;
    let mixed = |item: &Cel| format!("no such overload: sum over {}", type_name(item));
    let overflow = || "integer overflow".to_string();
    let Some(first) = items.first() else {
        return Ok(Cel::Int(0));
    };
    let mut total = first.clone();
    for item in &items[1..] {
        total = match (&total, item) {
            (Cel::Int(a), Cel::Int(b)) => Cel::Int(a.checked_add(*b).ok_or_else(overflow)?),
            (Cel::UInt(a), Cel::UInt(b)) => Cel::UInt(a.checked_add(*b).ok_or_else(overflow)?),
            (Cel::Float(a), Cel::Float(b)) => Cel::Float(a + b),
            (Cel::Duration(a), Cel::Duration(b)) => {
                Cel::Duration(a.checked_add(b).ok_or_else(overflow)?)
            }
            _ => return Err(mixed(item)),
        };
    }
    match total {
        Cel::Int(_) | Cel::UInt(_) | Cel::Float(_) | Cel::Duration(_) => Ok(total),
        other => Err(mixed(&other)),
    }
}

/// The element `keep` prefers over every other one.
fn extreme(call: &Call<'_>, keep: Ordering) -> Result<Cel, String> {
    let items = call.list()?;
    let mut best = items
        .first()
        .ok_or_else(|| "called on an empty list".to_string())?;
    for item in &items[1..] {
        if compare(item, best)? == keep {
            best = item;
        }
    }
    // A single element is still checked for comparability.
    compare(best, best)?;
    Ok(best.clone())
}

fn min(call: &Call<'_>) -> Result<Cel, String> {
    extreme(call, Ordering::Less)
}

fn max(call: &Call<'_>) -> Result<Cel, String> {
    extreme(call, Ordering::Greater)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(source: &str) -> CompiledRule {
        CompiledRule::compile(source, None, false)
            .unwrap_or_else(|error| panic!("{source}: {error}"))
    }

    fn evaluate(source: &str, value: &Value) -> Result<bool, String> {
        compile(source).evaluate(value, None)
    }

    /// Each rule evaluates to true on `value`.
    fn assert_hold(value: &Value, rules: &[&str]) {
        for source in rules {
            assert_eq!(evaluate(source, value), Ok(true), "{source}");
        }
    }

    /// Each rule compiles and fails to evaluate, with an error containing
    /// `expected`.
    fn assert_errors(value: &Value, cases: &[(&str, &str)]) {
        for (source, expected) in cases {
            match evaluate(source, value) {
                Err(error) => assert!(error.contains(expected), "{source}: {error}"),
                other => panic!("{source}: {other:?}, expected an error with {expected:?}"),
            }
        }
    }

    fn refusal(source: &str) -> String {
        match CompiledRule::compile(source, None, false) {
            Err(CompileError(message)) => message,
            Ok(_) => panic!("{source} compiled"),
        }
    }

    fn assert_refused(cases: &[(&str, &str)]) {
        for (source, expected) in cases {
            let message = refusal(source);
            assert!(message.starts_with("compilation failed: "), "{message}");
            assert!(message.contains(expected), "{source}: {message}");
        }
    }

    #[test]
    fn rules_pass_and_fail() {
        let rule = compile("self.replicas <= self.maxReplicas");
        assert!(!rule.is_transition());
        let object = |replicas: i64| json!({"replicas": replicas, "maxReplicas": 5});
        assert_eq!(rule.evaluate(&object(3), None), Ok(true));
        assert_eq!(rule.evaluate(&object(5), None), Ok(true));
        assert_eq!(rule.evaluate(&object(6), None), Ok(false));

        let rule =
            compile("self.minReplicas <= self.replicas && self.replicas <= self.maxReplicas");
        let object = json!({"minReplicas": 2, "replicas": 1, "maxReplicas": 5});
        assert_eq!(rule.evaluate(&object, None), Ok(false));

        let rule = compile("self.startsWith('ok')");
        assert_eq!(rule.evaluate(&json!("ok: fine"), None), Ok(true));
        assert_eq!(rule.evaluate(&json!("broken"), None), Ok(false));
    }

    #[test]
    fn operators_and_standard_functions() {
        let object = json!({
            "name": "web-1", "replicas": 3, "ratio": 0.5, "enabled": true, "nothing": null,
            "labels": {"app": "web", "tier": "front"}, "ports": [80, 443],
        });
        assert_hold(
            &object,
            &[
                "self.replicas * 2 + 1 == 7 && self.replicas % 2 == 1 && self.replicas / 2 == 1",
                "self.replicas - 5 == -2 && -self.replicas == -3",
                "self.ratio * 4.0 == 2.0 && self.ratio < 1 && self.replicas > 2.5",
                "self.name + '!' == 'web-1!' && self.ports + [8080] == [80, 443, 8080]",
                "self.enabled && !(!self.enabled) && self.nothing == null",
                "'app' in self.labels && 443 in self.ports && !('db' in self.labels)",
                "self.labels['app'] == 'web' && self.labels.tier == 'front' && self.ports[1] == 443",
                "self.replicas > 2 ? self.name == 'web-1' : false",
                "size(self.name) == 5 && self.ports.size() == 2 && size(self.labels) == 2",
                "size('héllo') == 5 && size(b'h\\xc3\\xa9') == 3",
                "has(self.labels) && !has(self.missing) && has(self.labels.app)",
                "!has(self.missing) || self.missing > 0",
                "self.name.contains('b-') && self.name.startsWith('we') && self.name.endsWith('-1')",
                "self.name.matches('^[a-z]+-[0-9]+$') && matches(self.name, 'b-1$')",
                "!self.name.matches('^[0-9]')",
                "self.labels == {'tier': 'front', 'app': 'web'} && self.ports != [443, 80]",
                "1u < 2 && 2.0 == 2 && uint(3) == 3",
                "self.name == 'web-1' // a comment",
                "self.replicas == 3 &&\n  self.name == 'web-1'",
                // Rewriting leaves literals alone.
                "'a[0]'.size() == 4 && 'x.all(y, z) !!' == 'x.all(y, z) ' + '!!'",
                "\"it's\" == 'it\\'s' && r'\\d' == '\\\\d' && '''a\"b''' == 'a\"b'",
            ],
        );
        assert_eq!(evaluate("self.replicas > 5", &object), Ok(false));
        assert_eq!(evaluate("self.labels['app'] == 'db'", &object), Ok(false));
    }

    #[test]
    fn transition_rules() {
        let immutable = compile("self == oldSelf");
        assert!(immutable.is_transition());
        let spec = json!({"image": "nginx", "ports": [80], "env": {"A": "1"}});
        let changed = json!({"image": "nginx", "ports": [80], "env": {"A": "2"}});
        assert_eq!(immutable.evaluate(&spec, Some(&spec.clone())), Ok(true));
        assert_eq!(immutable.evaluate(&changed, Some(&spec)), Ok(false));

        let growing = compile("self >= oldSelf");
        assert_eq!(growing.evaluate(&json!(5), Some(&json!(3))), Ok(true));
        assert_eq!(growing.evaluate(&json!(2), Some(&json!(3))), Ok(false));
        let error = growing.evaluate(&json!(5), None).unwrap_err();
        assert!(error.contains("oldSelf"), "{error}");

        let fields = compile("!has(oldSelf.id) || self.id == oldSelf.id");
        assert_eq!(
            fields.evaluate(&json!({"id": "a"}), Some(&json!({}))),
            Ok(true)
        );
        assert_eq!(
            fields.evaluate(&json!({"id": "b"}), Some(&json!({"id": "a"}))),
            Ok(false)
        );
        // oldSelf is not converted for a rule that does not read it.
        assert_eq!(evaluate("self == 1", &json!(1)), Ok(true));
        assert_eq!(
            compile("self == 1").evaluate(&json!(1), Some(&json!(2))),
            Ok(true)
        );
    }

    #[test]
    fn string_extensions() {
        let value = json!({"s": "hello mellow", "u": "héllo"});
        assert_hold(
            &value,
            &[
                "'TacoCat'.lowerAscii() == 'tacocat' && 'TacoCÆt'.lowerAscii() == 'tacocÆt'",
                "'TacoCat'.upperAscii() == 'TACOCAT' && 'TacoCÆt'.upperAscii() == 'TACOCÆT'",
                "'  \\ttrim\\n  '.trim() == 'trim' && '\\u00a0x\\u2003'.trim() == 'x'",
                "'a b c'.split(' ') == ['a', 'b', 'c'] && 'a b c'.split(' ', 0) == []",
                "'a b c'.split(' ', 1) == ['a b c'] && 'a b c'.split(' ', 2) == ['a', 'b c']",
                "'a b c'.split(' ', -1) == ['a', 'b', 'c'] && ''.split(',') == ['']",
                "'héy'.split('') == ['h', 'é', 'y'] && 'abc'.split('', 2) == ['a', 'bc']",
                "''.split('') == []",
                "['hello', 'mellow'].join() == 'hellomellow' && ['a', 'b'].join(', ') == 'a, b'",
                "[].join('/') == ''",
                "'hello hello'.replace('he', 'we') == 'wello wello'",
                "'hello hello'.replace('he', 'we', 1) == 'wello hello'",
                "'hello hello'.replace('he', 'we', 0) == 'hello hello'",
                "'hello hello'.replace('he', 'we', -1) == 'wello wello'",
                "'hello'.replace('', '_') == '_h_e_l_l_o_' && 'hello'.replace('l', '') == 'heo'",
                "'tacocat'.substring(4) == 'cat' && 'tacocat'.substring(0, 4) == 'taco'",
                "self.u.substring(1, 3) == 'él' && 'abc'.substring(3) == ''",
                "self.s.indexOf('') == 0 && self.s.indexOf('ello') == 1",
                "self.s.indexOf('jello') == -1 && self.s.indexOf('', 2) == 2",
                "self.s.indexOf('ello', 2) == 7 && self.s.indexOf('ello', 20) == -1",
                "self.u.indexOf('l') == 2 && self.u.indexOf('l', 3) == 3",
                "self.s.lastIndexOf('') == 12 && self.s.lastIndexOf('ello') == 7",
                "self.s.lastIndexOf('jello') == -1 && self.s.lastIndexOf('ello', 6) == 1",
                "self.s.lastIndexOf('ello', 7) == 7 && self.s.lastIndexOf('ello', 20) == -1",
                "self.u.lastIndexOf('l') == 3 && self.u.lastIndexOf('l', 2) == 2",
                "'hello'.charAt(4) == 'o' && 'hello'.charAt(5) == '' && self.u.charAt(1) == 'é'",
                "'abc 123 45'.find('[0-9]+') == '123' && 'abc'.find('[0-9]') == ''",
                "'a1b2c3'.findAll('[0-9]') == ['1', '2', '3']",
                "'a1b2c3'.findAll('[0-9]', 2) == ['1', '2'] && 'a1'.findAll('[0-9]', 0) == []",
                "self.s.matches('m.llow$') && self.s.find(self.s.substring(6)) == 'mellow'",
            ],
        );
        assert_errors(
            &value,
            &[
                ("'hello'.charAt(-1) == ''", "index out of range: -1"),
                ("'hello'.charAt(6) == ''", "index out of range: 6"),
                ("'tacocat'.substring(-1) == ''", "index out of range"),
                ("'tacocat'.substring(2, 1) == ''", "index out of range"),
                ("'tacocat'.substring(0, 8) == ''", "index out of range"),
                ("self.s.indexOf('ello', -1) == 0", "index out of range: -1"),
                (
                    "self.s.lastIndexOf('ello', -1) == 0",
                    "index out of range: -1",
                ),
                ("[1, 2].join() == ''", "no such overload"),
                (
                    "self.s.matches(self.s + '(') ",
                    "invalid regular expression",
                ),
                ("self.s.startsWith(1)", "no such overload"),
            ],
        );
    }

    #[test]
    fn list_extensions() {
        let value = json!({"ints": [1, 2, 3], "words": ["b", "a", "c", "a"]});
        assert_hold(
            &value,
            &[
                "self.ints.isSorted() && !self.words.isSorted() && [].isSorted()",
                "['a', 'b', 'b', 'c'].isSorted() && ![2.0, 1.0].isSorted()",
                "self.ints.sum() == 6 && [1.5, 2.5].sum() == 4.0 && [].sum() == 0",
                "[1u, 2u].sum() == 3u && [duration('1m'), duration('1s')].sum() == duration('61s')",
                "self.ints.min() == 1 && self.ints.max() == 3 && self.words.max() == 'c'",
                "[7].min() == 7 && ([0] + []).max() == 0",
                "self.words.indexOf('a') == 1 && self.words.lastIndexOf('a') == 3",
                "self.words.indexOf('z') == -1 && self.ints.indexOf(2) == 1",
                "self.ints.map(x, x * x).sum() == 14",
            ],
        );
        assert_errors(
            &value,
            &[
                ("[].min() == 0", "empty list"),
                ("[].max() == 0", "empty list"),
                ("[1, 'a'].isSorted()", "compared with"),
                ("[1, 2.0].sum() == 3", "no such overload"),
                ("['a'].sum() == 'a'", "no such overload"),
                ("[9223372036854775807, 1].sum() > 0", "integer overflow"),
            ],
        );
    }

    #[test]
    fn macros_over_lists_and_maps() {
        let value = json!({
            "items": [{"name": "a", "n": 1}, {"name": "b", "n": 2}, {"name": "c", "n": 3}],
            "labels": {"app": "web", "env": "prod"},
        });
        assert_hold(
            &value,
            &[
                "self.items.all(i, i.n > 0) && !self.items.all(i, i.n > 1)",
                "self.items.exists(i, i.name == 'b') && !self.items.exists(i, i.name == 'z')",
                "self.items.exists_one(i, i.n > 2) && !self.items.exists_one(i, i.n > 1)",
                "self.items.existsOne(i, i.name == 'a')",
                "self.items.map(i, i.name) == ['a', 'b', 'c']",
                "self.items.map(i, i.n > 1, i.name) == ['b', 'c']",
                "self.items.filter(i, i.n % 2 == 1).map(i, i.n) == [1, 3]",
                "self.labels.all(k, k.size() == 3) && self.labels.exists(k, self.labels[k] == 'prod')",
                "self.labels.map(k, k).size() == 2 && self.labels.filter(k, k.startsWith('e')) == ['env']",
                "self.items.all(a, self.items.exists_one(b, b.name == a.name))",
                "[].all(x, false) && ![].exists(x, true) && [1, 2, 3].exists(x, x == 2)",
            ],
        );
        assert_eq!(
            evaluate("self.items.all(i, i.name.size() > 1)", &value),
            Ok(false)
        );
    }

    #[test]
    fn conversions_durations_and_timestamps() {
        let value = json!({"created": "2024-02-29T12:30:15.250Z", "ttl": "90m"});
        assert_hold(
            &value,
            &[
                "int('42') == 42 && int(3.9) == 3 && int(-3.9) == -3 && int(7u) == 7",
                "uint(5) == 5u && uint('7') == 7u && double(1) == 1.0 && double('2.5') == 2.5",
                "string(42) == '42' && string(1.5) == '1.5' && string(1e6) == '1e+06'",
                "string(123456.0) == '123456' && string(0.00001) == '1e-05' && string(true) == 'true'",
                "string(b'abc') == 'abc' && bytes('abc') == b'abc' && bool('true') && !bool('0')",
                "dyn(1) == 1 && string(7u) == '7'",
                "type(1) == int && type('a') == string && type([]) == list && type({}) == map",
                "type(1u) == uint && type(1.0) == double && type(true) == bool && type(b'') == bytes",
                "type(null) == null_type && type(type(1)) == type && type(self) == map",
                "type(1) != string && type(self.created) != int && int != uint",
                "duration('1.5s') == duration('1500ms') && duration('1h30m') > duration('89m')",
                "duration('-1m') < duration('0') && string(duration('1h30m')) == '5400s'",
                "string(duration('1.5s')) == '1.5s' && int(duration('1s')) == 1000000000",
                "duration('1h').getMinutes() == 60 && duration('90s').getHours() == 0",
                "duration('2s').getMilliseconds() == 2000 && duration('2m').getSeconds() == 120",
                "timestamp(self.created).getFullYear() == 2024 && timestamp(self.created).getMonth() == 1",
                "timestamp(self.created).getDate() == 29 && timestamp(self.created).getDayOfMonth() == 28",
                "timestamp(self.created).getDayOfYear() == 59 && timestamp(self.created).getDayOfWeek() == 4",
                "timestamp(self.created).getHours() == 12 && timestamp(self.created).getMinutes() == 30",
                "timestamp(self.created).getSeconds() == 15 && timestamp(self.created).getMilliseconds() == 250",
                "timestamp(self.created).getHours('+02:00') == 14 && timestamp(self.created).getHours('-08:30') == 4",
                "timestamp(self.created).getHours('UTC') == 12",
                "timestamp(self.created) + duration(self.ttl) == timestamp('2024-02-29T14:00:15.25Z')",
                "timestamp('2024-03-01T00:00:00Z') - timestamp(self.created) < duration('12h')",
                "string(timestamp('2024-01-01T00:00:00.500+01:00')) == '2023-12-31T23:00:00.5Z'",
                "int(timestamp('1970-01-01T00:01:00Z')) == 60 && timestamp(60) == timestamp('1970-01-01T00:01:00Z')",
            ],
        );
        assert_errors(
            &value,
            &[
                ("int('x') == 0", "cannot convert"),
                ("int(1e19) == 0", "integer overflow"),
                ("uint(-1) == 0u", "unsigned integer overflow"),
                ("duration('1x') > duration('0')", "unknown unit"),
                ("duration('1h2') > duration('0')", "missing unit"),
                ("duration('9999999999999h') > duration('0')", "out of range"),
                ("timestamp('yesterday') > timestamp(0)", "invalid timestamp"),
                (
                    "timestamp(self.created).getHours('Europe/Paris') == 13",
                    "not supported",
                ),
                ("bool('yes')", "cannot convert"),
            ],
        );
    }

    #[test]
    fn message_expressions() {
        let rule = CompiledRule::compile(
            "self.replicas <= self.maxReplicas",
            Some("'replicas ' + string(self.replicas) + ' exceed ' + string(self.maxReplicas)"),
            false,
        )
        .unwrap();
        let object = json!({"replicas": 7, "maxReplicas": 5});
        assert_eq!(rule.evaluate(&object, None), Ok(false));
        assert_eq!(
            rule.message(&object, None).as_deref(),
            Some("replicas 7 exceed 5")
        );

        let message = |expression: &str, value: &Value| {
            CompiledRule::compile("true", Some(expression), false)
                .unwrap()
                .message(value, None)
        };
        // Blank, multi-line, not a string, or an error: Kubernetes uses `message`.
        assert_eq!(message("'  '", &json!({})), None);
        assert_eq!(message("'a\\nb'", &json!({})), None);
        assert_eq!(message("self.n", &json!({"n": 1})), None);
        assert_eq!(message("self.missing", &json!({})), None);
        assert_eq!(
            message("self.name", &json!({"name": "x"})).as_deref(),
            Some("x")
        );
        assert_eq!(compile("true").message(&json!({}), None), None);

        let transition = CompiledRule::compile(
            "self >= oldSelf",
            Some("'cannot shrink from ' + string(oldSelf) + ' to ' + string(self)"),
            false,
        )
        .unwrap();
        assert_eq!(
            transition.message(&json!(2), Some(&json!(3))).as_deref(),
            Some("cannot shrink from 3 to 2")
        );

        let refused = |expression: &str| {
            CompiledRule::compile("true", Some(expression), false)
                .unwrap_err()
                .0
        };
        for (expression, expected) in [
            ("size(self)", "must evaluate to a string"),
            ("2 * 3", "must evaluate to a string"),
            ("quantity('1')", "function \"quantity\" is not supported"),
            ("'x' + ", "Syntax error"),
            ("string(oldSelf)", "oldSelf is only available"),
        ] {
            let message = refused(expression);
            assert!(
                message.starts_with("messageExpression compilation failed: "),
                "{message}"
            );
            assert!(message.contains(expected), "{expression}: {message}");
        }
    }

    #[test]
    fn refusals_at_compile_time() {
        assert_refused(&[
            (
                "quantity(self.memory) < quantity('1Gi')",
                "function \"quantity\" is not supported",
            ),
            ("self.url.isURL()", "function \"isURL\" is not supported"),
            (
                "'%s'.format([self])",
                "function \"format\" is not supported",
            ),
            (
                "type(self) == google.protobuf.Timestamp",
                "undeclared reference to 'google'",
            ),
            (
                "self.x.reverse() == 'a'",
                "function \"reverse\" is not supported",
            ),
            ("self.all(k, v, v > 0)", "macro all() takes a variable name"),
            ("self.exists(x)", "macro exists() takes a variable name"),
            ("foo > 1", "undeclared reference to 'foo'"),
            ("self.a == other.a", "undeclared reference to 'other'"),
            ("self.replicas >", "Syntax error"),
            ("self.replicas == ", "Syntax error"),
            ("has(self)", "invalid argument to has() macro"),
            ("self.replicas = 1", "Syntax error"),
            ("'unterminated", "unterminated string literal"),
            ("self.a # 1", "unexpected character '#'"),
            (
                "optional.none() == oldSelf",
                "optional values (optional.of(), optional.none()) are not supported",
            ),
            (
                "oldSelf.orValue(1) > 0",
                "function \"orValue\" is not supported",
            ),
            ("self.?x == 1", "unsupported syntax '.?'"),
            ("Foo{a: 1} == self", "message construction"),
            ("self.x__dash__y == 1", "escaped property name"),
            ("has(self.__namespace__)", "escaped property name"),
            ("'a'.charAt()", "function \"charAt\" takes 1 argument(s)"),
            (
                "'a'.startsWith('a', 'b')",
                "function \"startsWith\" takes 1 argument(s)",
            ),
            ("'a'.replace('a')", "takes 2 to 3 argument(s)"),
            ("size() == 0", "function \"size\" needs an argument"),
            ("int(1, 2) == 1", "function \"int\" takes 0 argument(s)"),
            (
                "self.s.lowerAscii(1) == ''",
                "function \"lowerAscii\" takes 0 argument(s)",
            ),
            ("self.matches('(')", "invalid regular expression \"(\""),
            ("matches(self, 'a[')", "invalid regular expression \"a[\""),
            ("self.all(self, self > 0)", "may not be named self"),
            ("self.__builtin_size == 1", "are reserved"),
            // Obviously not a bool.
            ("self.replicas + 1", "must evaluate to a bool"),
            ("size(self)", "must evaluate to a bool"),
            ("self.name.lowerAscii()", "must evaluate to a bool"),
            ("'true'", "must evaluate to a bool"),
            ("[true]", "must evaluate to a bool"),
            ("(1)", "must evaluate to a bool"),
            ("self.items.map(x, x > 0)", "must evaluate to a bool"),
            ("-self.n", "must evaluate to a bool"),
        ]);
        // Undeclared macro variables outside their macro fail when evaluated.
        let error = CompiledRule::compile("self.all(x, x > 0) && x > 1", None, false)
            .map(|rule| rule.evaluate(&json!([1]), None));
        assert!(matches!(error, Ok(Err(_))), "{error:?}");

        let optional = CompiledRule::compile("self == oldSelf", None, true).unwrap_err();
        assert!(
            optional.0.contains("optionalOldSelf is not supported"),
            "{optional}"
        );

        let long = format!("self.name == '{}'", "x".repeat(MAX_EXPRESSION_BYTES));
        assert!(refusal(&long).contains("over the limit"));
        let nested = format!("{}self{} == 1", "(".repeat(60), ")".repeat(60));
        assert!(refusal(&nested).contains("nests too deeply"));
        let lists = format!("size({}1{}) == 1", "[".repeat(60), "]".repeat(60));
        assert!(refusal(&lists).contains("nests too deeply"));
        let chain = format!("self{} == 1", ".a".repeat(500));
        assert!(refusal(&chain).contains("nests too deeply"));
        // Long rules are fine while shallow.
        let long_and = vec!["self.a == 1"; 300].join(" && ");
        assert_eq!(evaluate(&long_and, &json!({"a": 1})), Ok(true));
        let nested = format!("{}self{} == 1", "(".repeat(30), ")".repeat(30));
        assert_eq!(evaluate(&nested, &json!(1)), Ok(true));
    }

    #[test]
    fn malformed_input_never_panics() {
        for source in [
            "",
            " ",
            "(",
            ")",
            "[",
            "]]",
            "{",
            "1 +",
            "a.",
            ".",
            "!",
            "-",
            "?",
            "a ? b",
            "a ? b :",
            "self[",
            "self[0",
            "self.(",
            "has(",
            "has()",
            "self.all(",
            "self.all(x,",
            "'",
            "\"",
            "'''",
            "b'",
            "r'",
            "0x",
            "1e",
            "1.",
            ".5",
            "1u2",
            "self..a",
            "self.a.()",
            "[1,]",
            "{1:}",
            "{:1}",
            "a b",
            "self in",
            "in self",
            "self.map(x, )",
            "\\",
            "`",
            "self;",
            "self.a[?0]",
            "[?1]",
            "{?'a': 1}",
            "-9223372036854775809",
            "18446744073709551616u",
            "1e999",
            "'\\u12'",
            "'\\xZZ'",
            "b'\\u1234'",
            ".a()",
            ".a.b()",
            "self.replicas >",
            "1 + (",
            "f(1,",
            "a && ",
            "a ||",
            "a ? : b",
            "a.b(",
            "[1, 2",
            "{'a': }",
            "self.x +* 1",
            "self.map(x, )",
            "{1:}",
            "self in",
            "a ? b :",
            "self.all(x,",
            "1 2",
            "-",
            "!",
            ".",
            "'\\400'",
            "'\\u00e9' == 'é'",
            "'''a\\''''",
            "(((",
            "a.b.c.d(e.f(g[",
            "self.all(x, x > 0) && x > 1",
            "(]",
            "x in ()",
            "x in []",
            "()",
            "[]",
            "{}",
            "a()",
            "f(,)",
            "(,)",
            "[,]",
            "{,}",
            "a[]",
            "a.b[]",
            "a ? b : c ? d",
            "[1][]",
            "{'a' 1}",
            "a.b.c[0](1)",
            "1.a",
            "1..2",
            "!!",
            "--",
            "a!b",
            "a-!b",
            "size(,",
            "'a' 'b'",
            "[1, 2)",
            "{'a': 1]",
            "f(1))",
        ] {
            let compiled = CompiledRule::compile(source, None, false);
            if let Ok(rule) = compiled {
                let _ = rule.evaluate(&json!({"a": [1]}), Some(&json!({})));
            }
        }
    }

    #[test]
    fn runtime_errors_are_errors() {
        let value = json!({
            "name": "web", "n": 9223372036854775807i64, "items": [1, 2],
            "labels": {"app": "web"}, "spec": {"size": 1},
        });
        assert_errors(
            &value,
            &[
                ("self.missing == 1", "no such key: missing"),
                ("self.missing != 1", "no such key: missing"),
                ("self.spec.max != 3", "no such key: max"),
                (
                    "self.spec.size == 1 && self.name.size != 1",
                    "no such key: size",
                ),
                ("self.items[5] != 0", "index out of range: 5"),
                ("self.items[-1] != 0", "index out of range: -1"),
                ("self.labels['env'] != 'prod'", "no such key: env"),
                ("self.name[0] == 'w'", "no such overload: string[int]"),
                ("self.items['a'] == 1", "no such overload: list[string]"),
                ("self.name.all(c, c != 'x')", "cannot iterate over string"),
                ("self.n.exists(c, true)", "cannot iterate over int"),
                ("self.n + 1 > 0", "integer overflow"),
                ("self.items.size() / 0 == 1", "division by zero"),
                ("self.items.size() % 0 == 1", "modulus by zero"),
                ("self.name + 1 == 'x'", "no such overload: string + int"),
                (
                    "self.name < 1",
                    "no such overload: string compared with int",
                ),
                ("self.name", "evaluated to string, not a bool"),
                ("self.items[0]", "evaluated to int, not a bool"),
                ("self.labels.app", "evaluated to string, not a bool"),
                ("self.items.map(x, x > 0)[0] ? self.name : 1", "not a bool"),
            ],
        );
    }

    #[test]
    fn json_values_become_cel_values() {
        let value = json!({
            "big": 18446744073709551615u64, "small": -9223372036854775808i64,
            "huge": 1e300, "ratio": 0.25, "nothing": null, "list": [[1], {"a": [true]}],
        });
        assert_hold(
            &value,
            &[
                "self.big == 18446744073709551615u && self.big > 9223372036854775807",
                "self.small == -9223372036854775807 - 1 && self.small < 0",
                "self.huge > 1e299 && self.ratio == 0.25 && self.nothing == null",
                "self.list[1].a[0] && size(self.list[0]) == 1",
            ],
        );
        let mut deep = json!(1);
        for _ in 0..MAX_VALUE_DEPTH + 1 {
            deep = json!([deep]);
        }
        let error = evaluate("size(self) == 1", &deep).unwrap_err();
        assert!(error.contains("nested deeper"), "{error}");
        let mut deep = json!(1);
        for _ in 0..MAX_VALUE_DEPTH - 1 {
            deep = json!({ "a": deep });
        }
        assert_eq!(evaluate("self == self && has(self.a)", &deep), Ok(true));
    }

    #[test]
    fn unary_runs_keep_their_parity() {
        let value = json!({"on": true, "n": 5});
        assert_hold(
            &value,
            &[
                "!!self.on && !!!self.on == false && !!!!self.on",
                "--self.n == 5 && ---self.n == -5 && - -5 == 5 && 1 - -1 == 2 && 1 - - -1 == 0",
                "self.n != 4 && !(self.n != 5)",
            ],
        );
    }

    #[test]
    fn evaluation_cost_is_bounded() {
        let list = |n: usize| json!((0..n).collect::<Vec<_>>());
        let unique = compile("self.all(a, self.exists_one(b, b == a))");
        assert_eq!(unique.evaluate(&list(100), None), Ok(true));
        let error = unique.evaluate(&list(5000), None).unwrap_err();
        assert!(error.contains("cost limit exceeded"), "{error}");

        // One level of iteration is linear: large inputs run.
        let positive = compile("self.all(x, x >= 0)");
        assert_eq!(positive.evaluate(&list(100_000), None), Ok(true));
        // `map` copies as it goes: quadratic.
        let mapped = compile("self.map(x, x).size() > 0");
        assert_eq!(mapped.evaluate(&list(2000), None), Ok(true));
        assert!(mapped.evaluate(&list(100_000), None).is_err());
        // Split strings count as lists.
        let words = compile("self.split(',').all(w, w.size() < 3)");
        assert_eq!(words.evaluate(&json!("a,b,c"), None), Ok(true));
        let long = "a,".repeat(1 << 20);
        let nested = compile("self.split(',').all(w, self.split(',').exists(v, v == w))");
        assert!(nested.evaluate(&json!(long), None).is_err());

        // Strings built by functions are capped.
        let text = json!("x".repeat(4096));
        let error = evaluate("self.replace('', self) != ''", &text).unwrap_err();
        assert!(error.contains("over the limit"), "{error}");
        let text = json!("x".repeat(3 << 20));
        let error = evaluate("[self, self].join() != ''", &text).unwrap_err();
        assert!(error.contains("over the limit"), "{error}");
    }

    /// Rules as Kubernetes' documentation and common CRDs write them.
    #[test]
    fn documented_rules() {
        let object = json!({
            "minReplicas": 1, "replicas": 2, "maxReplicas": 3,
            "stateCounts": {"Available": 1}, "list1": [], "list2": ["x"],
            "map1": {"MY_FIELD": "abc"},
            "envars": [{"name": "MY_ENV", "value": "abc"}, {"name": "OTHER", "value": "1"}],
            "created": "2024-01-01T00:00:00Z", "ttl": "24h", "expired": "2024-01-03T00:00:00Z",
            "health": "ok", "widgets": [{"key": "x", "foo": 3}],
            "metadata": {"name": "singleton", "labels": {"app.kubernetes.io/name": "web"}},
            "set1": ["a"], "set2": ["b"], "names": ["a", "b"],
            "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}],
            "path": {"type": "PathPrefix", "value": "/api"},
        });
        assert_hold(
            &object,
            &[
                "self.minReplicas <= self.replicas && self.replicas <= self.maxReplicas",
                "'Available' in self.stateCounts",
                "(self.list1.size() == 0) != (self.list2.size() == 0)",
                "!('MY_FIELD' in self.map1) || self.map1['MY_FIELD'].matches('^[a-zA-Z]*$')",
                "self.envars.filter(e, e.name == 'MY_ENV').all(e, e.value.matches('^[a-zA-Z]*$'))",
                "has(self.expired) && timestamp(self.created) + duration(self.ttl) < \
                 timestamp(self.expired)",
                "self.health.startsWith('ok')",
                "self.widgets.exists(w, w.key == 'x' && w.foo < 10)",
                "self.metadata.name == 'singleton'",
                "self.metadata.labels['app.kubernetes.io/name'] == 'web'",
                "self.set1.all(e, !(e in self.set2))",
                "self.names.size() == 2 && self.names.isSorted()",
                "self.filters.all(f, f.type != 'RequestHeaderModifier' || \
                 has(f.requestHeaderModifier))",
                "self.filters.filter(f, f.type == 'RequestRedirect').size() <= 1",
                "!(has(self.path) && self.path.type == 'PathPrefix') || \
                 self.path.value.startsWith('/')",
                "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            ],
        );
    }

    #[test]
    fn int_or_string_rules_dispatch_on_type() {
        let rule = compile("type(self) == string ? self == '99%' : self == 42");
        assert_eq!(rule.evaluate(&json!("99%"), None), Ok(true));
        assert_eq!(rule.evaluate(&json!(42), None), Ok(true));
        assert_eq!(rule.evaluate(&json!("50%"), None), Ok(false));
        assert_eq!(rule.evaluate(&json!(41), None), Ok(false));
        // A string naming a type is not that type.
        assert_eq!(evaluate("type(self) == 'string'", &json!("x")), Ok(false));
        assert_eq!(evaluate("int == 'int'", &json!("x")), Ok(false));
    }

    #[test]
    fn rules_are_shared_across_threads() {
        let rule = Arc::new(compile("self.n % 2 == 0"));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let rule = Arc::clone(&rule);
                std::thread::spawn(move || {
                    (0..100)
                        .all(|n| rule.evaluate(&json!({"n": n * 4 + i}), None) == Ok(i % 2 == 0))
                })
            })
            .collect();
        for handle in handles {
            assert!(handle.join().unwrap());
        }
        let debug = format!("{rule:?}");
        assert!(debug.contains("self.n % 2 == 0"), "{debug}");
    }

    /// Evaluation runs on every write of a custom resource: report its cost.
    #[test]
    fn evaluation_is_cheap() {
        let rule = compile("self.replicas <= self.maxReplicas");
        let object = json!({
            "replicas": 3, "maxReplicas": 5, "image": "nginx:1.25",
            "labels": {"app": "web", "tier": "frontend"}, "ports": [80, 443],
        });
        let rounds = 20_000;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            assert_eq!(rule.evaluate(&object, None), Ok(true));
        }
        let each = started.elapsed() / rounds;
        println!("{each:?} per evaluation of self.replicas <= self.maxReplicas");
        assert!(each < std::time::Duration::from_millis(1), "{each:?}");
    }
}
