//! The syntax tree [`super::parser`] builds and [`super::check`] lowers.
//!
//! Operators are nodes of their own rather than calls of `_+_`-style
//! functions, a run of prefix operators is already folded to its parity
//! (`!!x` is `x`), and macros are explicit: `has(e.f)` is [`Expr::Has`],
//! `e.all(x, p)` and its kin are [`Expr::Macro`]. Every tree the parser
//! returns is at most [`super::parser::MAX_NESTING`] levels deep, so
//! recursion over it (checking, dropping) stays shallow.

/// A literal value.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(Box<str>),
    Bytes(Box<[u8]>),
}

/// A binary operator other than `&&` and `||` (which absorb errors and
/// are nodes of their own).
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

#[derive(Debug, PartialEq)]
pub(super) enum Expr {
    Literal(Literal),
    /// A name; one written with a leading dot (`.x`, resolved from the
    /// root scope) keeps its dot.
    Ident(Box<str>),
    /// `e.f`
    Select(Box<Expr>, Box<str>),
    /// `e[k]`
    Index(Box<Expr>, Box<Expr>),
    /// `f(args)`, or `target.f(args)`; a global function written with a
    /// leading dot keeps its dot.
    Call {
        target: Option<Box<Expr>>,
        function: Box<str>,
        args: Vec<Expr>,
    },
    List(Vec<Expr>),
    Map(Vec<(Expr, Expr)>),
    /// `T{f: e, ...}`, message construction (which nothing here supports;
    /// it parses so that the refusal can name it).
    Message {
        type_name: Box<str>,
        fields: Vec<(Box<str>, Expr)>,
    },
    Not(Box<Expr>),
    Neg(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    /// `c ? a : b`
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    /// `has(e.f)`
    Has(Box<Expr>, Box<str>),
    Macro(Box<Macro>),
}

/// The comprehension macros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MacroKind {
    All,
    Exists,
    /// `exists_one`, also spelled `existsOne`.
    ExistsOne,
    /// `map(x, t)`, or `map(x, p, t)` with a filter.
    Map,
    Filter,
}

impl MacroKind {
    /// The macro a method call of `name` with `args` arguments stands for.
    pub(super) fn of_method(name: &str, args: usize) -> Option<MacroKind> {
        Some(match (name, args) {
            ("all", 2) => MacroKind::All,
            ("exists", 2) => MacroKind::Exists,
            ("exists_one" | "existsOne", 2) => MacroKind::ExistsOne,
            ("map", 2 | 3) => MacroKind::Map,
            ("filter", 2) => MacroKind::Filter,
            _ => return None,
        })
    }
}

/// `range.kind(variable, body)`; `map`'s three-argument form is
/// `range.map(variable, filter, body)`.
#[derive(Debug, PartialEq)]
pub(super) struct Macro {
    pub(super) kind: MacroKind,
    pub(super) range: Expr,
    pub(super) variable: Box<str>,
    /// The predicate, or `map`'s transform.
    pub(super) body: Expr,
    pub(super) filter: Option<Expr>,
}
