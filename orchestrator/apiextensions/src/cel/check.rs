//! Checking a parsed expression and lowering it to the tree that
//! [`super::eval`] runs. Everything an expression names must be something
//! this engine evaluates: variables resolve to `self`, `oldSelf`, macro
//! variables or type names, calls to a function of [`super::functions`]
//! called in its style with its number of arguments; macros are recognised
//! from the parser's expansions; literal regular expressions are compiled
//! here; and nesting is bounded, which bounds every recursion over the tree.

use std::collections::HashSet;
use std::sync::Arc;

use cel_parser::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr as Syntax, IdedExpr};
use cel_parser::reference::Val;
use regex::Regex;

use super::cost::{compile_pattern, describe_pattern_error, PATTERN_SIZE_LIMIT};
use super::functions::{self, Function, Style};
use super::value::{unescape, CelType};

/// Deepest nesting of operators, calls and macros an expression may have.
/// cel-go's parser allows 250; rules people write stay far below 100.
/// Evaluation recurses once per level, measured at up to 2 KiB of stack per
/// level in a debug build (so at most 200 KiB).
pub const MAX_NESTING: usize = 100;

#[derive(Debug)]
pub(super) enum Expr {
    Literal(Literal),
    SelfValue,
    OldSelf,
    /// A macro variable: its index on the evaluator's stack of variables.
    Local(usize),
    Type(CelType),
    Select(Box<Expr>, Field),
    /// `has(e.f)`
    Has(Box<Expr>, Field),
    Index(Box<Expr>, Box<Expr>),
    List(Vec<Expr>),
    Map(Vec<(Expr, Expr)>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Call(Box<Call>),
    Macro(Box<Macro>),
}

#[derive(Debug)]
pub(super) enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(Box<str>),
    Bytes(Box<[u8]>),
}

/// A selected field: its name as written, and the property it stands for
/// in an object (`None`: the name is not a valid escape).
#[derive(Debug)]
pub(super) struct Field {
    pub(super) name: Box<str>,
    pub(super) unescaped: Option<Box<str>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

impl Op {
    fn named(function: &str) -> Option<Op> {
        Some(match function {
            "_+_" => Op::Add,
            "_-_" => Op::Sub,
            "_*_" => Op::Mul,
            "_/_" => Op::Div,
            "_%_" => Op::Rem,
            "_==_" => Op::Eq,
            "_!=_" => Op::Ne,
            "_<_" => Op::Lt,
            "_<=_" => Op::Le,
            "_>_" => Op::Gt,
            "_>=_" => Op::Ge,
            "@in" => Op::In,
            _ => return None,
        })
    }

    pub(super) fn symbol(self) -> &'static str {
        match self {
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "*",
            Op::Div => "/",
            Op::Rem => "%",
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::In => "in",
        }
    }
}

#[derive(Debug)]
pub(super) struct Call {
    pub(super) function: &'static Function,
    /// The receiver first, for a method.
    pub(super) args: Vec<Expr>,
    /// The pattern, when it is a literal.
    pub(super) pattern: Option<Arc<Regex>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MacroKind {
    All,
    Exists,
    ExistsOne,
    /// `map`, and `filter` (a `map` of the variable with a filter).
    Map,
}

#[derive(Debug)]
pub(super) struct Macro {
    pub(super) kind: MacroKind,
    pub(super) range: Expr,
    /// The predicate, or `map`'s transform.
    pub(super) body: Expr,
    /// `map`'s filter.
    pub(super) filter: Option<Expr>,
}

/// A checked expression.
#[derive(Debug)]
pub(super) struct Checked {
    pub(super) expr: Expr,
    pub(super) reads_old_self: bool,
    /// What it may evaluate to.
    pub(super) kinds: Kinds,
}

/// Check `tree`; the `!_` and `-_` calls with ids in `dropped` stand for
/// an even run of operators (see [`super::syntax`]) and are left out.
pub(super) fn check(tree: &IdedExpr, dropped: &HashSet<u64>) -> Result<Checked, String> {
    let mut checker = Checker {
        dropped,
        variables: Vec::new(),
        reads_old_self: false,
        depth: 0,
    };
    let expr = checker.expr(tree)?;
    Ok(Checked {
        kinds: kinds(&expr),
        reads_old_self: checker.reads_old_self,
        expr,
    })
}

struct Checker<'t> {
    dropped: &'t HashSet<u64>,
    /// Macro variables in scope, innermost last.
    variables: Vec<&'t str>,
    reads_old_self: bool,
    depth: usize,
}

impl<'t> Checker<'t> {
    fn expr(&mut self, e: &'t IdedExpr) -> Result<Expr, String> {
        if self.depth >= MAX_NESTING {
            return Err(format!(
                "the expression nests too deeply (over {MAX_NESTING} levels)"
            ));
        }
        self.depth += 1;
        let lowered = self.lower(e);
        self.depth -= 1;
        lowered
    }

    fn boxed(&mut self, e: &'t IdedExpr) -> Result<Box<Expr>, String> {
        self.expr(e).map(Box::new)
    }

    fn lower(&mut self, e: &'t IdedExpr) -> Result<Expr, String> {
        Ok(match &e.expr {
            Syntax::Literal(value) => Expr::Literal(match value {
                Val::Null => Literal::Null,
                Val::Boolean(b) => Literal::Bool(*b),
                Val::Int(i) => Literal::Int(*i),
                Val::UInt(u) => Literal::Uint(*u),
                Val::Double(d) => Literal::Double(*d),
                Val::String(s) => Literal::String(s.as_str().into()),
                Val::Bytes(b) => Literal::Bytes(b.as_slice().into()),
            }),
            Syntax::Ident(name) => self.ident(name)?,
            Syntax::Select(select) => {
                let operand = self.boxed(&select.operand)?;
                let field = Field {
                    name: select.field.as_str().into(),
                    unescaped: unescape(&select.field).map(Into::into),
                };
                if select.test {
                    Expr::Has(operand, field)
                } else {
                    Expr::Select(operand, field)
                }
            }
            Syntax::Call(call) => self.call(e.id, call)?,
            Syntax::List(list) => Expr::List(
                list.elements
                    .iter()
                    .map(|element| self.expr(element))
                    .collect::<Result<_, _>>()?,
            ),
            Syntax::Map(map) => {
                let mut entries = Vec::with_capacity(map.entries.len());
                for entry in &map.entries {
                    let EntryExpr::MapEntry(entry) = &entry.expr else {
                        return Err("a map literal holds a struct field".into());
                    };
                    entries.push((self.expr(&entry.key)?, self.expr(&entry.value)?));
                }
                Expr::Map(entries)
            }
            Syntax::Struct(s) => {
                return Err(format!(
                    "message construction ({}{{...}}) is not supported",
                    s.type_name
                ))
            }
            Syntax::Comprehension(c) => self.comprehension(c)?,
            Syntax::Unspecified => return Err("incomplete expression".into()),
        })
    }

    fn ident(&mut self, name: &str) -> Result<Expr, String> {
        if let Some(index) = self.variables.iter().rposition(|v| *v == name) {
            return Ok(Expr::Local(index));
        }
        match name {
            "self" => Ok(Expr::SelfValue),
            "oldSelf" => {
                self.reads_old_self = true;
                Ok(Expr::OldSelf)
            }
            _ => CelType::named(name).map(Expr::Type).ok_or_else(|| {
                format!(
                    "undeclared reference to '{name}' (only self, oldSelf, macro variables and \
                     type names are declared)"
                )
            }),
        }
    }

    fn call(&mut self, id: u64, call: &'t CallExpr) -> Result<Expr, String> {
        let name = call.func_name.as_str();
        let unary = |checker: &mut Self, operand: &'t IdedExpr, build: fn(Box<Expr>) -> Expr| {
            let operand = checker.boxed(operand)?;
            Ok(if checker.dropped.contains(&id) {
                *operand
            } else {
                build(operand)
            })
        };
        match (name, &call.target, call.args.as_slice()) {
            ("!_", None, [x]) => unary(self, x, Expr::Not),
            ("-_", None, [x]) => unary(self, x, Expr::Neg),
            ("_&&_", None, [a, b]) => Ok(Expr::And(self.boxed(a)?, self.boxed(b)?)),
            ("_||_", None, [a, b]) => Ok(Expr::Or(self.boxed(a)?, self.boxed(b)?)),
            ("_?_:_", None, [c, a, b]) => {
                Ok(Expr::Cond(self.boxed(c)?, self.boxed(a)?, self.boxed(b)?))
            }
            ("_[_]", None, [a, b]) => Ok(Expr::Index(self.boxed(a)?, self.boxed(b)?)),
            (_, None, [a, b]) => match Op::named(name) {
                Some(op) => Ok(Expr::Binary(op, self.boxed(a)?, self.boxed(b)?)),
                None => self.function(call),
            },
            _ => self.function(call),
        }
    }

    fn function(&mut self, call: &'t CallExpr) -> Result<Expr, String> {
        let name = call.func_name.as_str();
        // `optional.of(x)`: a function of the namespace, not a method.
        let namespace = matches!(
            call.target.as_deref(),
            Some(IdedExpr { expr: Syntax::Ident(target), .. })
                if target == "optional" && !self.variables.contains(&"optional")
        );
        let method = call.target.is_some() && !namespace;
        let shown = if namespace {
            format!("optional.{name}")
        } else {
            name.to_owned()
        };
        let mut named = functions::named(name).peekable();
        if named.peek().is_none() || name.starts_with(['_', '@']) {
            return Err(match name {
                "has" => "macro has() takes one field selection, as in has(self.x)".into(),
                "all" | "exists" | "exists_one" | "existsOne" | "map" | "filter" => format!(
                    "macro {name}() takes a variable name and an expression, as in \
                     {name}(x, x > 0)"
                ),
                _ => format!("function {shown:?} is not supported"),
            });
        }
        let function = named
            .find(|f| match f.style {
                Style::Optional => namespace,
                Style::Both => !namespace,
                Style::Member => method,
                Style::Global => !method && !namespace,
            })
            .ok_or_else(|| {
                if namespace {
                    format!("function {shown:?} is not supported")
                } else if method {
                    format!("function {name:?} is not a method: call it as {name}(x)")
                } else {
                    format!("function {name:?} is a method: call it as x.{name}(...)")
                }
            })?;
        let mut args = Vec::with_capacity(call.args.len() + 1);
        if method {
            if let Some(target) = &call.target {
                args.push(self.expr(target)?);
            }
        }
        for arg in &call.args {
            args.push(self.expr(arg)?);
        }
        if !function.arity.contains(&args.len()) {
            let (min, max) = (function.arity.start, function.arity.end - 1);
            if !method && args.is_empty() {
                return Err(format!("function {shown:?} needs an argument"));
            }
            let receiver = usize::from(method);
            let expected = if min == max {
                format!("{}", min - receiver)
            } else {
                format!("{} to {}", min - receiver, max - receiver)
            };
            let form = if method { "as in x." } else { "as in " };
            return Err(format!(
                "function {shown:?} takes {expected} argument(s) {form}{name}(...), got {}",
                args.len() - receiver
            ));
        }
        let pattern = match args.get(1) {
            Some(Expr::Literal(Literal::String(pattern))) if function.pattern => Some(Arc::new(
                compile_pattern(pattern, PATTERN_SIZE_LIMIT)
                    .map_err(|e| describe_pattern_error(pattern, &e))?,
            )),
            _ => None,
        };
        Ok(Expr::Call(Box::new(Call {
            function,
            args,
            pattern,
        })))
    }

    /// A macro, from the comprehension the parser expanded it to.
    fn comprehension(&mut self, c: &'t ComprehensionExpr) -> Result<Expr, String> {
        if c.iter_var2.is_some() {
            return Err("two-variable comprehensions are not supported".into());
        }
        let variable = c.iter_var.as_str();
        if matches!(variable, "self" | "oldSelf") {
            return Err(format!("a macro variable may not be named {variable}"));
        }
        let accumulator =
            |e: &IdedExpr| matches!(&e.expr, Syntax::Ident(name) if *name == c.accu_var);
        let call = |e: &'t IdedExpr, name: &str| match &e.expr {
            Syntax::Call(call) if call.func_name == name && call.target.is_none() => {
                Some(call.args.as_slice())
            }
            _ => None,
        };
        // `accumulator + [f]`
        let append = |e: &'t IdedExpr| match call(e, "_+_") {
            Some(
                [accu, IdedExpr {
                    expr: Syntax::List(list),
                    ..
                }],
            ) if accumulator(accu) => match list.elements.as_slice() {
                [f] => Some(f),
                _ => None,
            },
            _ => None,
        };
        let step = &c.loop_step;
        let (kind, body, filter) = match &c.accu_init.expr {
            Syntax::Literal(Val::Boolean(true)) => match call(step, "_&&_") {
                Some([accu, predicate]) if accumulator(accu) => (MacroKind::All, predicate, None),
                _ => return Err(unsupported_comprehension()),
            },
            Syntax::Literal(Val::Boolean(false)) => match call(step, "_||_") {
                Some([accu, predicate]) if accumulator(accu) => {
                    (MacroKind::Exists, predicate, None)
                }
                _ => return Err(unsupported_comprehension()),
            },
            Syntax::Literal(Val::Int(0)) => match call(step, "_?_:_") {
                Some([predicate, _, accu]) if accumulator(accu) => {
                    (MacroKind::ExistsOne, predicate, None)
                }
                _ => return Err(unsupported_comprehension()),
            },
            Syntax::List(list) if list.elements.is_empty() => {
                match (append(step), call(step, "_?_:_")) {
                    (Some(transform), _) => (MacroKind::Map, transform, None),
                    (None, Some([filter, then, accu])) if accumulator(accu) => match append(then) {
                        Some(transform) => (MacroKind::Map, transform, Some(filter)),
                        None => return Err(unsupported_comprehension()),
                    },
                    _ => return Err(unsupported_comprehension()),
                }
            }
            _ => return Err(unsupported_comprehension()),
        };
        let range = self.expr(&c.iter_range)?;
        self.variables.push(variable);
        let body = self.expr(body);
        let filter = filter.map(|filter| self.expr(filter)).transpose();
        self.variables.pop();
        Ok(Expr::Macro(Box::new(Macro {
            kind,
            range,
            body: body?,
            filter: filter?,
        })))
    }
}

fn unsupported_comprehension() -> String {
    "unsupported comprehension".into()
}

/// The kinds of value an expression may have, as a set; enough to refuse
/// a rule that cannot be a bool or a message that cannot be a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kinds(u16);

impl Kinds {
    pub(super) const NULL: Kinds = Kinds(1);
    pub(super) const BOOL: Kinds = Kinds(1 << 1);
    pub(super) const INT: Kinds = Kinds(1 << 2);
    pub(super) const UINT: Kinds = Kinds(1 << 3);
    pub(super) const DOUBLE: Kinds = Kinds(1 << 4);
    pub(super) const STRING: Kinds = Kinds(1 << 5);
    pub(super) const BYTES: Kinds = Kinds(1 << 6);
    pub(super) const LIST: Kinds = Kinds(1 << 7);
    pub(super) const MAP: Kinds = Kinds(1 << 8);
    pub(super) const TIMESTAMP: Kinds = Kinds(1 << 9);
    pub(super) const DURATION: Kinds = Kinds(1 << 10);
    pub(super) const TYPE: Kinds = Kinds(1 << 11);
    pub(super) const OPTIONAL: Kinds = Kinds(1 << 12);
    pub(super) const NUMBER: Kinds = Kinds::INT.or(Kinds::UINT).or(Kinds::DOUBLE);
    pub(super) const ANY: Kinds = Kinds(u16::MAX);

    pub(super) const fn or(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
    }

    pub(super) fn may_be(self, other: Kinds) -> bool {
        self.0 & other.0 != 0
    }
}

fn kinds(e: &Expr) -> Kinds {
    match e {
        Expr::Literal(literal) => match literal {
            Literal::Null => Kinds::NULL,
            Literal::Bool(_) => Kinds::BOOL,
            Literal::Int(_) => Kinds::INT,
            Literal::Uint(_) => Kinds::UINT,
            Literal::Double(_) => Kinds::DOUBLE,
            Literal::String(_) => Kinds::STRING,
            Literal::Bytes(_) => Kinds::BYTES,
        },
        Expr::SelfValue | Expr::OldSelf | Expr::Local(_) | Expr::Select(..) | Expr::Index(..) => {
            Kinds::ANY
        }
        Expr::Type(_) => Kinds::TYPE,
        Expr::List(_) => Kinds::LIST,
        Expr::Map(_) => Kinds::MAP,
        Expr::Has(..) | Expr::Not(_) | Expr::And(..) | Expr::Or(..) => Kinds::BOOL,
        Expr::Neg(_) => Kinds::INT.or(Kinds::DOUBLE),
        Expr::Cond(_, a, b) => kinds(a).or(kinds(b)),
        Expr::Binary(op, ..) => match op {
            Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge | Op::In => Kinds::BOOL,
            Op::Add => Kinds::NUMBER
                .or(Kinds::STRING)
                .or(Kinds::BYTES)
                .or(Kinds::LIST)
                .or(Kinds::TIMESTAMP)
                .or(Kinds::DURATION),
            Op::Sub => Kinds::NUMBER.or(Kinds::TIMESTAMP).or(Kinds::DURATION),
            Op::Mul | Op::Div | Op::Rem => Kinds::NUMBER,
        },
        Expr::Call(call) => call.function.result,
        Expr::Macro(m) => match m.kind {
            MacroKind::All | MacroKind::Exists | MacroKind::ExistsOne => Kinds::BOOL,
            MacroKind::Map => Kinds::LIST,
        },
    }
}
