//! Checking a parsed expression and lowering it to the tree that
//! [`super::eval`] runs. Everything an expression names must be something
//! this engine evaluates: variables resolve to `self`, `oldSelf`, macro
//! variables or type names, calls to a function of [`super::functions`]
//! called in its style with its number of arguments; literal regular
//! expressions are compiled here. The parser bounds the tree's depth, and
//! the checker bounds it again, which bounds every recursion over the tree.

use std::sync::Arc;

use regex::Regex;

use super::ast::{self, Expr as Syntax};
pub(super) use super::ast::{Literal, Op};
use super::cost::{compile_pattern, describe_pattern_error, PATTERN_SIZE_LIMIT};
use super::functions::{self, Function, Style};
use super::parser::MAX_NESTING;
use super::value::{unescape, CelType};

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

/// A selected field: its name as written, and the property it stands for
/// in an object (`None`: the name is not a valid escape).
#[derive(Debug)]
pub(super) struct Field {
    pub(super) name: Box<str>,
    pub(super) unescaped: Option<Box<str>>,
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

/// Check `tree`.
pub(super) fn check(tree: &Syntax) -> Result<Checked, String> {
    let mut checker = Checker {
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
    /// Macro variables in scope, innermost last.
    variables: Vec<&'t str>,
    reads_old_self: bool,
    depth: usize,
}

impl<'t> Checker<'t> {
    fn expr(&mut self, e: &'t Syntax) -> Result<Expr, String> {
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

    fn boxed(&mut self, e: &'t Syntax) -> Result<Box<Expr>, String> {
        self.expr(e).map(Box::new)
    }

    // `expr`, `lower` and the function of the node's form are on the stack
    // once per level of the tree: each form has a function of its own, so
    // that `lower` stays small (a debug build gives every temporary of a
    // function a slot of its own).
    fn lower(&mut self, e: &'t Syntax) -> Result<Expr, String> {
        match e {
            Syntax::Literal(literal) => Ok(Expr::Literal(literal.clone())),
            Syntax::Ident(name) => self.ident(name),
            Syntax::Select(operand, field) => self.select(operand, field, Expr::Select),
            Syntax::Has(operand, field) => self.select(operand, field, Expr::Has),
            Syntax::Index(a, b) => self.pair(a, b, Expr::Index),
            Syntax::Call {
                target,
                function,
                args,
            } => self.function(target.as_deref(), function, args),
            Syntax::List(items) => self.list(items),
            Syntax::Map(entries) => self.map(entries),
            Syntax::Message { type_name, .. } => Err(format!(
                "message construction ({type_name}{{...}}) is not supported"
            )),
            Syntax::Not(operand) => self.unary(operand, Expr::Not),
            Syntax::Neg(operand) => self.unary(operand, Expr::Neg),
            Syntax::And(a, b) => self.pair(a, b, Expr::And),
            Syntax::Or(a, b) => self.pair(a, b, Expr::Or),
            Syntax::Cond(c, a, b) => self.cond(c, a, b),
            Syntax::Binary(op, a, b) => self.binary(*op, a, b),
            Syntax::Macro(m) => self.comprehension(m),
        }
    }

    fn select(
        &mut self,
        operand: &'t Syntax,
        field: &str,
        build: fn(Box<Expr>, Field) -> Expr,
    ) -> Result<Expr, String> {
        let field = Field {
            name: field.into(),
            unescaped: unescape(field).map(Into::into),
        };
        Ok(build(self.boxed(operand)?, field))
    }

    fn unary(&mut self, operand: &'t Syntax, build: fn(Box<Expr>) -> Expr) -> Result<Expr, String> {
        Ok(build(self.boxed(operand)?))
    }

    fn pair(
        &mut self,
        a: &'t Syntax,
        b: &'t Syntax,
        build: fn(Box<Expr>, Box<Expr>) -> Expr,
    ) -> Result<Expr, String> {
        Ok(build(self.boxed(a)?, self.boxed(b)?))
    }

    fn binary(&mut self, op: Op, a: &'t Syntax, b: &'t Syntax) -> Result<Expr, String> {
        Ok(Expr::Binary(op, self.boxed(a)?, self.boxed(b)?))
    }

    fn cond(&mut self, c: &'t Syntax, a: &'t Syntax, b: &'t Syntax) -> Result<Expr, String> {
        Ok(Expr::Cond(self.boxed(c)?, self.boxed(a)?, self.boxed(b)?))
    }

    fn list(&mut self, items: &'t [Syntax]) -> Result<Expr, String> {
        let mut lowered = Vec::with_capacity(items.len());
        for item in items {
            lowered.push(self.expr(item)?);
        }
        Ok(Expr::List(lowered))
    }

    fn map(&mut self, entries: &'t [(Syntax, Syntax)]) -> Result<Expr, String> {
        let mut lowered = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            lowered.push((self.expr(key)?, self.expr(value)?));
        }
        Ok(Expr::Map(lowered))
    }

    fn ident(&mut self, written: &str) -> Result<Expr, String> {
        // `.x` is resolved from the root scope, past macro variables.
        let name = match written.strip_prefix('.') {
            Some(name) => name,
            None => {
                if let Some(index) = self.variables.iter().rposition(|v| *v == written) {
                    return Ok(Expr::Local(index));
                }
                written
            }
        };
        match name {
            "self" => Ok(Expr::SelfValue),
            "oldSelf" => {
                self.reads_old_self = true;
                Ok(Expr::OldSelf)
            }
            _ => CelType::named(name).map(Expr::Type).ok_or_else(|| {
                format!(
                    "undeclared reference to '{written}' (only self, oldSelf, macro variables \
                     and type names are declared)"
                )
            }),
        }
    }

    fn function(
        &mut self,
        target: Option<&'t Syntax>,
        written: &str,
        call_args: &'t [Syntax],
    ) -> Result<Expr, String> {
        // A global function written `.f(x)` is `f(x)`: there is no other
        // scope to resolve it from.
        let name = written.strip_prefix('.').unwrap_or(written);
        // `optional.of(x)`: a function of the namespace, not a method.
        let namespace = matches!(
            target,
            Some(Syntax::Ident(target))
                if &**target == "optional" && !self.variables.contains(&"optional")
        );
        let style = match (target, namespace) {
            (_, true) => Style::Optional,
            (Some(_), false) => Style::Member,
            (None, false) => Style::Global,
        };
        // The arguments are lowered here, recursively; the rest is done in
        // functions of their own, off the stack while arguments nest.
        let function = resolve(name, style)?;
        let mut args = Vec::with_capacity(call_args.len() + 1);
        if style == Style::Member {
            if let Some(target) = target {
                args.push(self.expr(target)?);
            }
        }
        for arg in call_args {
            args.push(self.expr(arg)?);
        }
        call(function, style, name, args)
    }

    /// A macro: its range is read outside the variable's scope, its body
    /// and filter inside.
    fn comprehension(&mut self, m: &'t ast::Macro) -> Result<Expr, String> {
        let variable = &*m.variable;
        if matches!(variable, "self" | "oldSelf") {
            return Err(format!("a macro variable may not be named {variable}"));
        }
        let kind = match m.kind {
            ast::MacroKind::All => MacroKind::All,
            ast::MacroKind::Exists => MacroKind::Exists,
            ast::MacroKind::ExistsOne => MacroKind::ExistsOne,
            ast::MacroKind::Map | ast::MacroKind::Filter => MacroKind::Map,
        };
        let range = self.expr(&m.range)?;
        self.variables.push(variable);
        let scoped = self.scoped(m);
        self.variables.pop();
        let (body, filter) = scoped?;
        Ok(Expr::Macro(Box::new(Macro {
            kind,
            range,
            body,
            filter,
        })))
    }

    /// A macro's body and filter, with its variable in scope.
    fn scoped(&mut self, m: &'t ast::Macro) -> Result<(Expr, Option<Expr>), String> {
        if m.kind == ast::MacroKind::Filter {
            // `filter(x, p)` is `map(x, p, x)`.
            let body = Expr::Local(self.variables.len() - 1);
            return Ok((body, Some(self.expr(&m.body)?)));
        }
        let body = self.expr(&m.body)?;
        let filter = match &m.filter {
            Some(filter) => Some(self.expr(filter)?),
            None => None,
        };
        Ok((body, filter))
    }
}

/// The function `name` called in `style` (`Optional`: as `optional.name`).
fn resolve(name: &str, style: Style) -> Result<&'static Function, String> {
    let shown = || match style {
        Style::Optional => format!("optional.{name}"),
        _ => name.to_owned(),
    };
    let mut named = functions::named(name).peekable();
    if named.peek().is_none() {
        return Err(match name {
            "has" => "macro has() takes one field selection, as in has(self.x)".into(),
            "all" | "exists" | "exists_one" | "existsOne" | "map" | "filter" => format!(
                "macro {name}() takes a variable name and an expression, as in {name}(x, x > 0)"
            ),
            _ => format!("function {:?} is not supported", shown()),
        });
    }
    named
        .find(|f| match f.style {
            Style::Optional => style == Style::Optional,
            Style::Both => style != Style::Optional,
            Style::Member | Style::Global => f.style == style,
        })
        .ok_or_else(|| match style {
            Style::Member => format!("function {name:?} is not a method: call it as {name}(x)"),
            Style::Global => format!("function {name:?} is a method: call it as x.{name}(...)"),
            _ => format!("function {:?} is not supported", shown()),
        })
}

/// A call of `function` with `args` (the receiver first, for a method),
/// once they are counted and a literal pattern compiled.
fn call(
    function: &'static Function,
    style: Style,
    name: &str,
    args: Vec<Expr>,
) -> Result<Expr, String> {
    if !function.arity.contains(&args.len()) {
        let shown = match style {
            Style::Optional => format!("optional.{name}"),
            _ => name.to_owned(),
        };
        let method = style == Style::Member;
        if !method && args.is_empty() {
            return Err(format!("function {shown:?} needs an argument"));
        }
        let (min, max) = (function.arity.start, function.arity.end - 1);
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
