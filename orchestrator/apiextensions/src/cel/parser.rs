//! CEL's grammar (cel-spec `langdef.md`), by recursive descent, with the
//! binary operators ordered on a stack of their own:
//!
//! ```text
//! Expr     = Or ["?" Or ":" Expr]                   right to left
//! Or       = Or "||" And | And                       left to right, and so on
//! And      = And "&&" Relation | Relation
//! Relation = Relation ("<"|"<="|">="|">"|"=="|"!="|"in") Addition | Addition
//! Addition = Addition ("+"|"-") Product | Product
//! Product  = Product ("*"|"/"|"%") Unary | Unary
//! Unary    = Member | "!" {"!"} Member | "-" {"-"} Member
//! Member   = Primary | Member "." IDENT ["(" [Exprs] ")"] | Member "[" Expr "]"
//! Primary  = ["."] IDENT ["(" [Exprs] ")"] | "(" Expr ")"
//!          | "[" [Exprs [","]] "]" | "{" [Entries [","]] "}"
//!          | ["."] IDENT {"." IDENT} "{" [Fields [","]] "}" | ["-"] LITERAL
//! ```
//!
//! A run of `!` or `-` keeps its parity (`!!x` is `x`, `--x` is `x`); a
//! single `-` before an int or double literal is its sign, so
//! `-9223372036854775808` is an int. A run of `&&` (or `||`) becomes a
//! balanced tree, as cel-go builds it, so long runs stay shallow. Macros
//! are recognised by name, style and number of arguments (`has(e.f)`;
//! `e.all(x, p)`, `exists`, `exists_one` or `existsOne`, `filter`;
//! `e.map(x, t)` and `e.map(x, p, t)`) and become explicit nodes; the same
//! names with other arguments stay calls, for the checker to name.
//! Message construction (`T{f: e}`) parses, for the checker to refuse;
//! optional syntax (`.?f`, `[?k]`, `?` entries) is refused here.
//!
//! Errors name the place and what was expected, in cel-go's frame:
//! `ERROR: <input>:1:5: Syntax error: unexpected ')', expected an
//! expression`. Nothing panics, and nothing recurses without bound: the
//! parse is at most [`MAX_PARSE_DEPTH`] groups deep and the tree at most
//! [`MAX_NESTING`] levels, both refused as soon as they are exceeded.

use super::ast::{Expr, Literal, Macro, MacroKind, Op};
use super::lexer::{Kind, Lexer, SyntaxError, Token};

/// Deepest nesting of operators, calls and macros an expression may have
/// (the height of its tree; parentheses do not count). cel-go's parser
/// allows 250; rules people write stay far below 100. Checking and
/// evaluation recurse once per level, measured at up to 3.6 KiB and 2 KiB
/// of stack per level in a debug build (so at most 360 KiB).
pub const MAX_NESTING: usize = 100;

/// Deepest nesting of sub-expressions while parsing: brackets,
/// parentheses, arguments and conditionals each open one. Parentheses
/// group without nesting the tree, so this bound is wider than
/// [`MAX_NESTING`]; it is cel-go's default. A level takes at most 3.5 KiB
/// of stack in a debug build and 1.8 KiB in a release build (measured by
/// the tests), so the deepest parse takes under 900 KiB of a tokio
/// worker's 2 MiB.
pub(super) const MAX_PARSE_DEPTH: usize = 250;

/// CEL's reserved words that are not already tokens (`true`, `false`,
/// `null`, `in`): they may not name variables or functions.
const RESERVED: &[&str] = &[
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

/// Parse `source` into a tree at most [`MAX_NESTING`] levels deep; the
/// error is cel-go's `ERROR: <input>:line:column: message`.
pub(super) fn parse(source: &str) -> Result<Expr, String> {
    let mut parser = Parser {
        source,
        lexer: Lexer::new(source),
        next: Token {
            kind: Kind::End,
            start: 0,
            end: 0,
        },
        depth: 0,
        error: None,
    };
    let parsed = parser
        .advance()
        .and_then(|_| parser.expr())
        .and_then(|tree| {
            if parser.next.kind == Kind::End {
                Ok(tree)
            } else {
                Err(parser.unexpected("an operator or the end of the expression"))
            }
        });
    match (parsed, parser.error) {
        (Ok(tree), _) => Ok(*tree.expr),
        (Err(Failed), Some(error)) => Err(error.render(source)),
        (Err(Failed), None) => Err("ERROR: <input>:1:1: Syntax error".into()),
    }
}

/// Parsing failed; the parser holds the error. Sized zero, so that the
/// results passed up every level of recursion stay small.
struct Failed;

type Parsed<T> = Result<T, Failed>;

/// A parsed sub-expression and the height of its tree.
struct Node {
    expr: Box<Expr>,
    height: usize,
}

impl Node {
    fn leaf(expr: Expr) -> Node {
        Node {
            expr: Box::new(expr),
            height: 1,
        }
    }
}

/// The height of the tallest of `nodes`.
fn tallest<'n>(nodes: impl IntoIterator<Item = &'n Node>) -> usize {
    nodes.into_iter().map(|n| n.height).max().unwrap_or(0)
}

fn exprs(nodes: Vec<Node>) -> Vec<Expr> {
    nodes.into_iter().map(|n| *n.expr).collect()
}

/// A parsed `Member`, and whether it is a plain qualified name (which
/// may name a message type).
struct Member {
    node: Node,
    name: bool,
}

impl From<Node> for Member {
    fn from(node: Node) -> Member {
        Member { node, name: false }
    }
}

/// The binary operators, by precedence (higher binds tighter).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Infix {
    Or,
    And,
    Op(Op),
}

/// An operator waiting for the operand on its right (see
/// [`Parser::binary`]).
struct Waiting {
    precedence: u8,
    operator: Infix,
    /// Where the operator is.
    at: usize,
    /// The operands on its left, each with the operator before it: one,
    /// or the run of a logical operator.
    operands: Vec<(usize, Node)>,
}

impl Waiting {
    /// Whether the operand on its right is complete when `next` follows.
    fn completed_by(&self, next: Option<(u8, Infix)>) -> bool {
        match next {
            None => true,
            Some((precedence, operator)) => {
                precedence < self.precedence
                    || precedence == self.precedence && !matches!(operator, Infix::And | Infix::Or)
            }
        }
    }
}

fn infix(kind: &Kind<'_>) -> Option<(u8, Infix)> {
    Some(match kind {
        Kind::Or => (1, Infix::Or),
        Kind::And => (2, Infix::And),
        Kind::Eq => (3, Infix::Op(Op::Eq)),
        Kind::Ne => (3, Infix::Op(Op::Ne)),
        Kind::Lt => (3, Infix::Op(Op::Lt)),
        Kind::Le => (3, Infix::Op(Op::Le)),
        Kind::Gt => (3, Infix::Op(Op::Gt)),
        Kind::Ge => (3, Infix::Op(Op::Ge)),
        Kind::In => (3, Infix::Op(Op::In)),
        Kind::Plus => (4, Infix::Op(Op::Add)),
        Kind::Minus => (4, Infix::Op(Op::Sub)),
        Kind::Star => (5, Infix::Op(Op::Mul)),
        Kind::Slash => (5, Infix::Op(Op::Div)),
        Kind::Percent => (5, Infix::Op(Op::Rem)),
        _ => return None,
    })
}

struct Parser<'s> {
    source: &'s str,
    lexer: Lexer<'s>,
    /// The token read ahead.
    next: Token<'s>,
    /// Sub-expressions being parsed, innermost included.
    depth: usize,
    /// Why parsing failed.
    error: Option<SyntaxError>,
}

impl<'s> Parser<'s> {
    /// Record `error` (the first one stands) and fail.
    fn fail(&mut self, error: SyntaxError) -> Failed {
        self.error.get_or_insert(error);
        Failed
    }

    fn error_at(&mut self, at: usize, message: impl Into<String>) -> Failed {
        self.fail(SyntaxError::new(at, message))
    }

    /// Fail on the token read ahead, which is not the `expected` one.
    fn unexpected(&mut self, expected: &str) -> Failed {
        let message = format!(
            "Syntax error: unexpected {}, expected {expected}",
            self.next.describe(self.source)
        );
        self.error_at(self.next.start, message)
    }

    /// Take the token read ahead and read the one after it.
    fn bump(&mut self) -> Parsed<Token<'s>> {
        match self.lexer.next_token() {
            Ok(next) => Ok(std::mem::replace(&mut self.next, next)),
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Skip the token read ahead; where it starts.
    fn advance(&mut self) -> Parsed<usize> {
        self.bump().map(|token| token.start)
    }

    fn eat(&mut self, kind: &Kind<'_>) -> Parsed<bool> {
        if self.next.kind != *kind {
            return Ok(false);
        }
        self.advance()?;
        Ok(true)
    }

    fn expect(&mut self, kind: &Kind<'_>, expected: &str) -> Parsed<()> {
        if self.next.kind != *kind {
            return Err(self.unexpected(expected));
        }
        self.advance().map(drop)
    }

    /// A node over children at most `below` high, built by the operator at
    /// `at`; refused when it makes the tree too deep.
    fn grow(&mut self, at: usize, below: usize, expr: Expr) -> Parsed<Node> {
        let height = below + 1;
        if height > MAX_NESTING {
            return Err(self.error_at(
                at,
                format!("the expression nests too deeply (over {MAX_NESTING} levels)"),
            ));
        }
        Ok(Node {
            expr: Box::new(expr),
            height,
        })
    }

    // `expr`, `binary`, `unary`, `member` and `primary` are on the stack
    // once per level of nesting, so they only dispatch: the work of each
    // form is in a function of its own, on the stack only while that form
    // is parsed (a debug build gives every temporary of a function a slot
    // of its own).

    /// `Expr`: every nested sub-expression is parsed from here, which is
    /// where the depth of the parse is bounded.
    fn expr(&mut self) -> Parsed<Node> {
        if self.depth >= MAX_PARSE_DEPTH {
            return Err(self.too_deep());
        }
        self.depth += 1;
        #[cfg(test)]
        tests::mark_stack();
        let parsed = match self.binary() {
            Ok(condition) if self.next.kind == Kind::Question => self.branches(condition),
            parsed => parsed,
        };
        self.depth -= 1;
        parsed
    }

    #[cold]
    fn too_deep(&mut self) -> Failed {
        let message = format!(
            "the expression nests too deeply (over {MAX_PARSE_DEPTH} levels of brackets and \
             parentheses)"
        );
        self.error_at(self.next.start, message)
    }

    /// `? a : b` after `condition`.
    fn branches(&mut self, condition: Node) -> Parsed<Node> {
        let at = self.advance()?;
        let then = self.binary()?;
        self.expect(&Kind::Colon, "':'")?;
        let otherwise = self.expr()?;
        let below = tallest([&condition, &then, &otherwise]);
        let expr = Expr::Cond(condition.expr, then.expr, otherwise.expr);
        self.grow(at, below, expr)
    }

    /// The binary operators of a condition, by precedence and then left to
    /// right. An operator waits, with its left operand, until the operand
    /// on its right is complete: until an operator that binds no tighter
    /// follows. Those waiting bind ever tighter, so at most one of each
    /// precedence waits, and nothing recurses. A run of `&&` (or of `||`)
    /// waits whole and becomes a balanced tree, as in cel-go: the
    /// operators are associative, and long runs stay shallow.
    fn binary(&mut self) -> Parsed<Node> {
        let mut waiting: Vec<Waiting> = Vec::new();
        let mut right = self.unary()?;
        loop {
            let next = infix(&self.next.kind);
            while let Some(top) = waiting.pop_if(|top| top.completed_by(next)) {
                right = self.reduce(top, right)?;
            }
            let Some((precedence, operator)) = next else {
                return Ok(right);
            };
            let at = self.advance()?;
            match waiting.last_mut() {
                // The next operand of a run of `&&` or `||`.
                Some(top) if top.operator == operator => {
                    top.operands.push((top.at, right));
                    top.at = at;
                }
                _ => waiting.push(Waiting {
                    precedence,
                    operator,
                    at,
                    operands: vec![(at, right)],
                }),
            }
            right = self.unary()?;
        }
    }

    /// `top` applied to its operands and `right`.
    fn reduce(&mut self, mut top: Waiting, right: Node) -> Parsed<Node> {
        top.operands.push((top.at, right));
        let mut operands = top.operands;
        // Neighbours joined in pairs, left to right, until one is left.
        while operands.len() > 1 {
            let mut joined = Vec::with_capacity(operands.len().div_ceil(2));
            let mut pairs = operands.into_iter();
            while let Some((at, left)) = pairs.next() {
                match pairs.next() {
                    Some((between, right)) => {
                        joined.push((at, self.operation(between, top.operator, left, right)?));
                    }
                    None => joined.push((at, left)),
                }
            }
            operands = joined;
        }
        match operands.pop() {
            Some((_, node)) => Ok(node),
            None => Err(self.error_at(top.at, "Syntax error: missing operand")),
        }
    }

    fn operation(&mut self, at: usize, operator: Infix, left: Node, right: Node) -> Parsed<Node> {
        let below = tallest([&left, &right]);
        let (l, r) = (left.expr, right.expr);
        let expr = match operator {
            Infix::Or => Expr::Or(l, r),
            Infix::And => Expr::And(l, r),
            Infix::Op(op) => Expr::Binary(op, l, r),
        };
        self.grow(at, below, expr)
    }

    fn unary(&mut self) -> Parsed<Node> {
        match self.next.kind {
            Kind::Not | Kind::Minus => self.prefixed(),
            _ => self.member(false),
        }
    }

    /// A run of `!` or of `-`, then a member.
    fn prefixed(&mut self) -> Parsed<Node> {
        let at = self.next.start;
        let operator = self.next.kind.clone();
        let mut run = 0usize;
        while self.eat(&operator)? {
            run += 1;
        }
        let not = operator == Kind::Not;
        if !not && run == 1 && matches!(self.next.kind, Kind::Int(_) | Kind::Double(_)) {
            return self.member(true);
        }
        let operand = self.member(false)?;
        if run.is_multiple_of(2) {
            return Ok(operand);
        }
        let expr = if not {
            Expr::Not(operand.expr)
        } else {
            Expr::Neg(operand.expr)
        };
        self.grow(at, operand.height, expr)
    }

    /// `Member`; `negative`: the primary is a literal with a `-` sign.
    fn member(&mut self, negative: bool) -> Parsed<Node> {
        let mut member = self.primary(negative)?;
        loop {
            member = match self.next.kind {
                Kind::Dot => self.dot(member.node)?,
                Kind::LBracket => self.index(member.node)?,
                Kind::LBrace if member.name => self.message(member.node)?,
                _ => return Ok(member.node),
            };
        }
    }

    /// `.f` or `.f(args)` after `operand`.
    fn dot(&mut self, operand: Node) -> Parsed<Member> {
        let at = self.advance()?;
        if self.next.kind == Kind::Question {
            return Err(self.error_at(at, "unsupported syntax '.?' (optional field selection)"));
        }
        let Kind::Ident(field) = self.next.kind else {
            return Err(self.unexpected("a field name"));
        };
        self.advance()?;
        if self.next.kind == Kind::LParen {
            let args = self.arguments()?;
            return self.method(at, operand, field, args).map(Member::from);
        }
        let expr = Expr::Select(operand.expr, field.into());
        let node = self.grow(at, operand.height, expr)?;
        Ok(Member { node, name: true })
    }

    /// `[index]` after `operand`.
    fn index(&mut self, operand: Node) -> Parsed<Member> {
        let at = self.advance()?;
        if self.next.kind == Kind::Question {
            return Err(self.error_at(at, "unsupported syntax '[?' (optional indexing)"));
        }
        let index = self.expr()?;
        self.expect(&Kind::RBracket, "']'")?;
        let below = tallest([&operand, &index]);
        let expr = Expr::Index(operand.expr, index.expr);
        self.grow(at, below, expr).map(Member::from)
    }

    /// `Primary`.
    fn primary(&mut self, negative: bool) -> Parsed<Member> {
        match self.next.kind {
            Kind::Ident(name) => self.named(self.next.start, name, false),
            Kind::Dot => self.root_name(),
            Kind::LParen => self.group().map(Member::from),
            Kind::LBracket => self.list().map(Member::from),
            Kind::LBrace => self.map().map(Member::from),
            _ => self.literal(negative).map(Member::from),
        }
    }

    fn group(&mut self) -> Parsed<Node> {
        self.advance()?;
        let inner = self.expr()?;
        self.expect(&Kind::RParen, "')'")?;
        Ok(inner)
    }

    fn list(&mut self) -> Parsed<Node> {
        let at = self.advance()?;
        let elements = self.sequence(&Kind::RBracket, "']'", |p| {
            p.refuse_optional("optional list elements")?;
            p.expr()
        })?;
        let below = tallest(&elements);
        self.grow(at, below, Expr::List(exprs(elements)))
    }

    fn map(&mut self) -> Parsed<Node> {
        let at = self.advance()?;
        let entries = self.sequence(&Kind::RBrace, "'}'", Self::entry)?;
        let below = tallest(entries.iter().flat_map(|(k, v)| [k, v]));
        let entries = entries.into_iter().map(|(k, v)| (*k.expr, *v.expr));
        self.grow(at, below, Expr::Map(entries.collect()))
    }

    fn entry(&mut self) -> Parsed<(Node, Node)> {
        self.refuse_optional("optional map entries")?;
        let key = self.expr()?;
        self.expect(&Kind::Colon, "':'")?;
        Ok((key, self.expr()?))
    }

    /// A literal, the token read ahead.
    fn literal(&mut self, negative: bool) -> Parsed<Node> {
        let literal = match &mut self.next.kind {
            Kind::Int(magnitude) => {
                let magnitude = *magnitude;
                Literal::Int(self.int(magnitude, negative)?)
            }
            Kind::Uint(u) => Literal::Uint(*u),
            Kind::Double(d) => Literal::Double(if negative { -*d } else { *d }),
            Kind::String(s) => Literal::String(std::mem::take(s)),
            Kind::Bytes(b) => Literal::Bytes(std::mem::take(b)),
            Kind::True => Literal::Bool(true),
            Kind::False => Literal::Bool(false),
            Kind::Null => Literal::Null,
            _ => return Err(self.unexpected("an expression")),
        };
        self.advance()?;
        Ok(Node::leaf(Expr::Literal(literal)))
    }

    /// The value of an int literal with magnitude `magnitude`, the token
    /// read ahead.
    fn int(&mut self, magnitude: u64, negative: bool) -> Parsed<i64> {
        let value = if negative {
            0i64.checked_sub_unsigned(magnitude)
        } else {
            i64::try_from(magnitude).ok()
        };
        value.ok_or_else(|| {
            let sign = if negative { "-" } else { "" };
            let text = &self.source[self.next.start..self.next.end];
            let message = format!("int literal out of range: {sign}{text}");
            self.error_at(self.next.start, message)
        })
    }

    fn refuse_optional(&mut self, what: &str) -> Parsed<()> {
        if self.next.kind == Kind::Question {
            let message = format!("unsupported syntax '?' ({what})");
            return Err(self.error_at(self.next.start, message));
        }
        Ok(())
    }

    /// `.name`: a name resolved from the root scope.
    fn root_name(&mut self) -> Parsed<Member> {
        let at = self.advance()?;
        let Kind::Ident(name) = self.next.kind else {
            return Err(self.unexpected("a name after the leading '.'"));
        };
        self.named(at, name, true)
    }

    /// A name, the token read ahead (its leading dot at `at`, if any), and
    /// a global call when `(` follows.
    fn named(&mut self, at: usize, name: &str, leading_dot: bool) -> Parsed<Member> {
        if RESERVED.contains(&name) {
            return Err(self.reserved(at, name));
        }
        self.advance()?;
        let written: Box<str> = if leading_dot {
            format!(".{name}").into()
        } else {
            name.into()
        };
        if self.next.kind == Kind::LParen {
            let has = !leading_dot && name == "has";
            return self.call(at, written, has).map(Member::from);
        }
        let node = Node::leaf(Expr::Ident(written));
        Ok(Member { node, name: true })
    }

    #[cold]
    fn reserved(&mut self, at: usize, name: &str) -> Failed {
        self.error_at(at, format!("reserved identifier: {name}"))
    }

    /// A global call of `function` at `at`, or the `has` macro when `has`
    /// and it takes one argument.
    fn call(&mut self, at: usize, function: Box<str>, has: bool) -> Parsed<Node> {
        let args = self.arguments()?;
        if has && args.len() == 1 {
            return self.has(at, args);
        }
        let below = tallest(&args);
        let expr = Expr::Call {
            target: None,
            function,
            args: exprs(args),
        };
        self.grow(at, below, expr)
    }

    /// `has(e.f)`, called at `at`.
    fn has(&mut self, at: usize, mut args: Vec<Node>) -> Parsed<Node> {
        if let Some(Node { expr, height }) = args.pop() {
            if let Expr::Select(operand, field) = *expr {
                return Ok(Node {
                    expr: Box::new(Expr::Has(operand, field)),
                    height,
                });
            }
        }
        Err(self.error_at(
            at,
            "invalid argument to has() macro: it takes a field selection, as in has(self.x)",
        ))
    }

    /// `target.name(args)`, the `.` at `at`: a macro or a method call.
    fn method(&mut self, at: usize, target: Node, name: &str, args: Vec<Node>) -> Parsed<Node> {
        let below = tallest(args.iter().chain([&target]));
        let Some(kind) = MacroKind::of_method(name, args.len()) else {
            let expr = Expr::Call {
                target: Some(target.expr),
                function: name.into(),
                args: exprs(args),
            };
            return self.grow(at, below, expr);
        };
        let mut args = args.into_iter().map(|n| *n.expr);
        let variable = match args.next() {
            Some(Expr::Ident(variable)) if !variable.starts_with('.') => variable,
            _ => {
                let message = format!(
                    "the first argument of {name}() must be a variable name, as in {name}(x, ...)"
                );
                return Err(self.error_at(at, message));
            }
        };
        let (filter, body) = match (args.next(), args.next()) {
            (Some(filter), Some(body)) => (Some(filter), body),
            (Some(body), None) => (None, body),
            // `of_method` counted the arguments.
            _ => return Err(self.error_at(at, format!("malformed {name}() macro"))),
        };
        let m = Macro {
            kind,
            range: *target.expr,
            variable,
            body,
            filter,
        };
        self.grow(at, below, Expr::Macro(Box::new(m)))
    }

    /// `T{f: e, ...}` after the qualified name `name`.
    fn message(&mut self, name: Node) -> Parsed<Member> {
        let at = self.next.start;
        let Some(type_name) = qualified_name(&name.expr) else {
            return Err(self.unexpected("an operator or the end of the expression"));
        };
        self.advance()?;
        let fields = self.sequence(&Kind::RBrace, "'}'", Self::field)?;
        let below = tallest(fields.iter().map(|(_, value)| value));
        let fields = fields.into_iter().map(|(f, value)| (f, *value.expr));
        let expr = Expr::Message {
            type_name: type_name.into(),
            fields: fields.collect(),
        };
        self.grow(at, below, expr).map(Member::from)
    }

    /// `f: e` in a message.
    fn field(&mut self) -> Parsed<(Box<str>, Node)> {
        self.refuse_optional("optional fields")?;
        let Kind::Ident(field) = self.next.kind else {
            return Err(self.unexpected("a field name"));
        };
        self.advance()?;
        self.expect(&Kind::Colon, "':'")?;
        Ok((field.into(), self.expr()?))
    }

    /// `(` [Expr {`,` Expr}] `)`; no trailing comma.
    fn arguments(&mut self) -> Parsed<Vec<Node>> {
        self.expect(&Kind::LParen, "'('")?;
        let mut args = Vec::new();
        if self.eat(&Kind::RParen)? {
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            if !self.eat(&Kind::Comma)? {
                self.expect(&Kind::RParen, "',' or ')'")?;
                return Ok(args);
            }
        }
    }

    /// Items up to `close`, separated by commas, a trailing comma allowed;
    /// the opening bracket was read.
    fn sequence<T>(
        &mut self,
        close: &Kind<'_>,
        closing: &str,
        mut item: impl FnMut(&mut Self) -> Parsed<T>,
    ) -> Parsed<Vec<T>> {
        let mut items = Vec::new();
        loop {
            if self.eat(close)? {
                return Ok(items);
            }
            items.push(item(self)?);
            if !self.eat(&Kind::Comma)? {
                self.expect(close, &format!("',' or {closing}"))?;
                return Ok(items);
            }
        }
    }
}

/// `a.b.c` as written, for a chain of selections on a name.
fn qualified_name(mut expr: &Expr) -> Option<String> {
    let mut parts = Vec::new();
    loop {
        match expr {
            Expr::Select(operand, field) => {
                parts.push(&**field);
                expr = operand;
            }
            Expr::Ident(name) => {
                parts.push(&**name);
                parts.reverse();
                return Some(parts.join("."));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests;
