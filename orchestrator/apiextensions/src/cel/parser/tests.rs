//! The parser's tests: precedence, literals, macros, errors and their
//! places, the bounds on depth and stack, and fuzzing (twenty thousand
//! inputs here; `fuzz_at_length`, ignored, runs a million: `cargo test
//! --release -p tapestry-apiextensions -- --ignored fuzz_at_length`).

use std::cell::Cell;
use std::fmt::Write;

use super::*;
use crate::cel::CompiledRule;

thread_local! {
    /// The lowest stack address [`Parser::expr`] reached on this thread.
    static STACK_LOW: Cell<usize> = const { Cell::new(usize::MAX) };
}

pub(super) fn mark_stack() {
    let mark = 0u8;
    let at = std::hint::black_box(&mark) as *const u8 as usize;
    STACK_LOW.with(|low| low.set(low.get().min(at)));
}

/// The stack `parse` takes below its caller's frame, up to the deepest
/// `expr`.
fn stack_used(source: &str) -> usize {
    let mark = 0u8;
    let top = std::hint::black_box(&mark) as *const u8 as usize;
    STACK_LOW.with(|low| low.set(usize::MAX));
    let _ = parse(source);
    top.saturating_sub(STACK_LOW.with(Cell::get))
}

/// `e` written back with every operation in parentheses, so that the
/// tree's shape shows; parsing the text gives `e` again.
fn show(e: &Expr) -> String {
    let list = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(", ");
    match e {
        Expr::Literal(literal) => match literal {
            Literal::Null => "null".into(),
            Literal::Bool(b) => b.to_string(),
            Literal::Int(i) if *i < 0 => format!("({i})"),
            Literal::Int(i) => i.to_string(),
            Literal::Uint(u) => format!("{u}u"),
            Literal::Double(d) if d.is_sign_negative() => format!("({d:?})"),
            Literal::Double(d) => format!("{d:?}"),
            Literal::String(s) => {
                let mut out = String::from("\"");
                for c in s.chars() {
                    if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                        out.push(c);
                    } else {
                        let _ = write!(out, "\\U{:08x}", u32::from(c));
                    }
                }
                out + "\""
            }
            Literal::Bytes(b) => {
                let mut out = String::from("b\"");
                for byte in b.iter() {
                    let _ = write!(out, "\\x{byte:02x}");
                }
                out + "\""
            }
        },
        Expr::Ident(name) => name.to_string(),
        Expr::Select(operand, field) => format!("{}.{field}", show(operand)),
        Expr::Index(operand, index) => format!("{}[{}]", show(operand), show(index)),
        Expr::Call {
            target,
            function,
            args,
        } => {
            let target = target.as_ref().map(|t| show(t) + ".").unwrap_or_default();
            format!("{target}{function}({})", list(&mut args.iter().map(show)))
        }
        Expr::List(items) => format!("[{}]", list(&mut items.iter().map(show))),
        Expr::Map(entries) => format!(
            "{{{}}}",
            list(
                &mut entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", show(k), show(v)))
            )
        ),
        Expr::Message { type_name, fields } => format!(
            "{type_name}{{{}}}",
            list(&mut fields.iter().map(|(f, v)| format!("{f}: {}", show(v))))
        ),
        Expr::Not(operand) => format!("(!{})", show(operand)),
        // `-(x)`: `-1` would be a literal, and so would `-1.f()`'s `-1`.
        Expr::Neg(operand) => format!("(-({}))", show(operand)),
        Expr::And(a, b) => format!("({} && {})", show(a), show(b)),
        Expr::Or(a, b) => format!("({} || {})", show(a), show(b)),
        Expr::Cond(c, a, b) => format!("({} ? {} : {})", show(c), show(a), show(b)),
        Expr::Binary(op, a, b) => format!("({} {} {})", show(a), op.symbol(), show(b)),
        Expr::Has(operand, field) => format!("has({}.{field})", show(operand)),
        Expr::Macro(m) => {
            let name = match m.kind {
                MacroKind::All => "all",
                MacroKind::Exists => "exists",
                MacroKind::ExistsOne => "exists_one",
                MacroKind::Map => "map",
                MacroKind::Filter => "filter",
            };
            let filter = m
                .filter
                .as_ref()
                .map(|f| show(f) + ", ")
                .unwrap_or_default();
            format!(
                "{}.{name}({}, {filter}{})",
                show(&m.range),
                m.variable,
                show(&m.body)
            )
        }
    }
}

fn shown(source: &str) -> String {
    match parse(source) {
        Ok(tree) => show(&tree),
        Err(error) => panic!("{source}: {error}"),
    }
}

fn literal(source: &str) -> Literal {
    match parse(source) {
        Ok(Expr::Literal(literal)) => literal,
        other => panic!("{source}: {other:?}"),
    }
}

fn error(source: &str) -> String {
    match parse(source) {
        Err(error) => error,
        Ok(tree) => panic!("{source} parsed as {}", show(&tree)),
    }
}

fn assert_shown(cases: &[(&str, &str)]) {
    for (source, expected) in cases {
        assert_eq!(shown(source), *expected, "{source}");
    }
}

#[test]
fn precedence_and_associativity() {
    assert_shown(&[
        // `?:` < `||` < `&&` < relations < `+ -` < `* / %` < unary < member.
        ("a ? b : c", "(a ? b : c)"),
        ("a || b ? c : d", "((a || b) ? c : d)"),
        ("a ? b || c : d || e", "(a ? (b || c) : (d || e))"),
        ("a || b && c", "(a || (b && c))"),
        ("a && b || c", "((a && b) || c)"),
        ("a && b == c", "(a && (b == c))"),
        ("a == b && c != d", "((a == b) && (c != d))"),
        ("a < b + c", "(a < (b + c))"),
        ("a + b < c * d", "((a + b) < (c * d))"),
        ("a in b && c", "((a in b) && c)"),
        ("a + b in c", "((a + b) in c)"),
        ("a + b * c - d", "((a + (b * c)) - d)"),
        ("a * b + c", "((a * b) + c)"),
        ("a + b % c", "(a + (b % c))"),
        ("-a * b", "((-(a)) * b)"),
        ("!a && b", "((!a) && b)"),
        ("-a.b", "(-(a.b))"),
        ("!a.b(c)[d]", "(!a.b(c)[d])"),
        ("(a + b) * c", "((a + b) * c)"),
        ("a * (b + c)", "(a * (b + c))"),
        // Left to right within a precedence...
        ("a - b - c", "((a - b) - c)"),
        ("a - b + c", "((a - b) + c)"),
        ("a / b * c % d", "(((a / b) * c) % d)"),
        ("a < b == c", "((a < b) == c)"),
        ("a == b != c in d", "(((a == b) != c) in d)"),
        ("a < b <= c > d >= e", "((((a < b) <= c) > d) >= e)"),
        // ...but for `?:`, right to left.
        ("a ? b : c ? d : e", "(a ? b : (c ? d : e))"),
        ("a ? (b ? c : d) : e", "(a ? (b ? c : d) : e)"),
        // Runs of `&&` and `||` are balanced.
        ("a && b && c", "((a && b) && c)"),
        ("a && b && c && d", "((a && b) && (c && d))"),
        ("a || b || c || d || e", "(((a || b) || (c || d)) || e)"),
        ("a || b || c && d && e", "((a || b) || ((c && d) && e))"),
        ("a && b || c && d || e", "(((a && b) || (c && d)) || e)"),
        // Members, calls and literals.
        ("a.b.c", "a.b.c"),
        ("a.b(c).d[e]", "a.b(c).d[e]"),
        ("a[b][c].d()", "a[b][c].d()"),
        ("f()", "f()"),
        ("f(a, b + c)", "f(a, (b + c))"),
        (".a", ".a"),
        (".a.b", ".a.b"),
        (".f(x)", ".f(x)"),
        ("[]", "[]"),
        ("[a, b,]", "[a, b]"),
        ("{}", "{}"),
        ("{a: b, 'c': d,}", "{a: b, \"c\": d}"),
        ("{a: {b: [c]}}", "{a: {b: [c]}}"),
        ("A{}", "A{}"),
        ("a.b.C{x: 1, y: c,}", "a.b.C{x: 1, y: c}"),
        (".A{x: 1}.x", ".A{x: 1}.x"),
        (
            "x in [1, 2] ? {'a': 1} : {}",
            "((x in [1, 2]) ? {\"a\": 1} : {})",
        ),
        ("a // comment\n + b", "(a + b)"),
        ("\ta\r\n+\x0cb ", "(a + b)"),
        // Reserved words may name fields, not variables.
        ("a.if.namespace", "a.if.namespace"),
    ]);
}

#[test]
fn unary_runs_keep_their_parity() {
    assert_shown(&[
        ("!x", "(!x)"),
        ("!!x", "x"),
        ("!!!x", "(!x)"),
        ("! ! !\n!x", "x"),
        ("-x", "(-(x))"),
        ("--x", "x"),
        ("---x", "(-(x))"),
        ("- - x", "x"),
        ("!(!x)", "(!(!x))"),
        ("-(-x)", "(-((-(x))))"),
        ("!!x && !y", "(x && (!y))"),
        ("a - -b", "(a - (-(b)))"),
        ("a--b", "(a - (-(b)))"),
        ("a---b", "(a - b)"),
        ("a - - -b", "(a - b)"),
        // A single `-` before an int or double literal is its sign...
        ("-1", "(-1)"),
        ("- 1", "(-1)"),
        ("-2.5", "(-2.5)"),
        ("-9223372036854775808", "(-9223372036854775808)"),
        ("-1.size()", "(-1).size()"),
        ("1 -1", "(1 - 1)"),
        ("1 - -1", "(1 - (-1))"),
        ("x[-1]", "x[(-1)]"),
        // ...not a uint's, and not in a longer run.
        ("-1u", "(-(1u))"),
        ("--1", "1"),
        ("---1", "(-(1))"),
        ("-(1)", "(-(1))"),
        ("-x.y", "(-(x.y))"),
    ]);
    assert_eq!(literal("-0.0"), Literal::Double(-0.0));
    assert!(error("!-x").contains("unexpected '-', expected an expression"));
    assert!(error("-!x").contains("unexpected '!', expected an expression"));
    assert!(error("--9223372036854775808").contains("int literal out of range"));
}

#[test]
fn numbers() {
    for (source, expected) in [
        ("0", Literal::Int(0)),
        ("123", Literal::Int(123)),
        ("007", Literal::Int(7)),
        ("0x1F", Literal::Int(31)),
        ("0xff", Literal::Int(255)),
        ("9223372036854775807", Literal::Int(i64::MAX)),
        ("-9223372036854775808", Literal::Int(i64::MIN)),
        ("-0x10", Literal::Int(-16)),
        ("0u", Literal::Uint(0)),
        ("42U", Literal::Uint(42)),
        ("0x1Fu", Literal::Uint(31)),
        ("18446744073709551615u", Literal::Uint(u64::MAX)),
        ("0xffffffffffffffffu", Literal::Uint(u64::MAX)),
        ("1.5", Literal::Double(1.5)),
        ("0.0", Literal::Double(0.0)),
        (".5", Literal::Double(0.5)),
        ("-.5", Literal::Double(-0.5)),
        ("1e3", Literal::Double(1000.0)),
        ("1E-3", Literal::Double(0.001)),
        ("2.5e+2", Literal::Double(250.0)),
        ("1.7976931348623157e308", Literal::Double(f64::MAX)),
        ("1e-400", Literal::Double(0.0)),
    ] {
        assert_eq!(literal(source), expected, "{source}");
    }
    for (source, expected) in [
        (
            "9223372036854775808",
            "1:1: int literal out of range: 9223372036854775808",
        ),
        (
            "-9223372036854775809",
            "1:2: int literal out of range: -9223372036854775809",
        ),
        ("0x8000000000000000", "int literal out of range"),
        ("18446744073709551616u", "uint literal out of range"),
        ("1e309", "double literal out of range: 1e309"),
        ("-1e999", "double literal out of range"),
        // Not numbers as CEL writes them: the lexer reads a number and a
        // name, or a number and a dot.
        ("1u2", "unexpected '2', expected an operator"),
        ("0x", "unexpected 'x', expected an operator"),
        ("0X1", "unexpected 'X1', expected an operator"),
        ("1e", "unexpected 'e', expected an operator"),
        ("1.", "unexpected end of input, expected a field name"),
        ("1..2", "unexpected '.2', expected a field name"),
    ] {
        let message = error(source);
        assert!(message.contains(expected), "{source}: {message}");
    }
    // `1.e5` is the field `e5` of `1`, as the grammar reads it.
    assert_eq!(shown("1.e5"), "1.e5");
    let long = "9".repeat(5000);
    assert!(error(&long).contains("int literal out of range: 99999999999999999999999999999999…"));
    assert_eq!(
        literal(&format!("0.{}1", "0".repeat(5000))),
        Literal::Double(0.0)
    );
    assert!(error(&format!("1e{long}")).contains("double literal out of range"));
}

#[test]
fn strings_and_bytes() {
    let string = |s: &str| Literal::String(s.into());
    let bytes = |b: &[u8]| Literal::Bytes(b.into());
    for (source, expected) in [
        ("''", string("")),
        ("\"\"", string("")),
        ("'a\"b'", string("a\"b")),
        ("\"a'b\"", string("a'b")),
        ("'''x''x'''", string("x''x")),
        ("\"\"\"a\nb\"\"\"", string("a\nb")),
        ("'''a\r\nb'''", string("a\r\nb")),
        ("'''\\''''", string("'")),
        ("'héllo 😀'", string("héllo 😀")),
        // Every escape.
        (
            r#"'\a\b\f\n\r\t\v\\\'\"\?\`'"#,
            string("\x07\x08\x0c\n\r\t\x0b\\'\"?`"),
        ),
        (r"'\x41\X42\u00e9\U0001F600'", string("ABé😀")),
        (r"'\101\060\377\000'", string("A0ÿ\0")),
        (r"'\303\277'", string("Ã¿")),
        (r"'\ud83d\ude00'", string("😀")),
        // Raw strings keep their backslashes.
        (r"r'\n'", string("\\n")),
        (r#"R"\x""#, string("\\x")),
        (r"r'''a\'''", string("a\\")),
        (r#"r"""a"b""""#, string("a\"b")),
        ("r'\\'", string("\\")),
        // Bytes: escapes are octets.
        ("b'abc'", bytes(b"abc")),
        ("B\"\"", bytes(b"")),
        ("b'ÿ'", bytes(&[195, 191])),
        (r"b'\303\277'", bytes(&[195, 191])),
        (r"b'\377\xff\xFF\X00'", bytes(&[255, 255, 255, 0])),
        (r"b'\n\\'", bytes(b"\n\\")),
        (r"br'\xff'", bytes(b"\\xff")),
        (r"bR'''\'''", bytes(b"\\")),
        ("b'''a\nb'''", bytes(b"a\nb")),
        // Booleans and null.
        ("true", Literal::Bool(true)),
        ("false", Literal::Bool(false)),
        ("null", Literal::Null),
    ] {
        assert_eq!(literal(source), expected, "{source}");
    }
    for (source, expected) in [
        ("'abc", "1:1: Syntax error: unterminated string literal"),
        (
            "x + \"abc",
            "1:5: Syntax error: unterminated string literal",
        ),
        ("'''abc''", "unterminated string literal"),
        (
            "'a\nb'",
            "1:1: Syntax error: unterminated string literal (a quoted string",
        ),
        ("r'a\rb'", "unterminated string literal"),
        ("'\\", "unterminated string literal"),
        ("b'", "unterminated string literal"),
        (r"'\q'", r"1:2: Syntax error: invalid escape sequence '\q'"),
        (r"'é\é'", r"1:3: Syntax error: invalid escape sequence '\é'"),
        (r"'\8'", r"invalid escape sequence '\8'"),
        (
            "'\\\n'",
            "1:2: Syntax error: invalid escape sequence: a backslash before '\\n'",
        ),
        (r"'\400'", r"invalid escape sequence '\4'"),
        (r"'\12'", "octal escapes take three digits"),
        (r"'\x4'", r"invalid escape sequence '\x'"),
        (r"'\u12'", r"invalid escape sequence '\u'"),
        (r"'\uZZZZ'", r"invalid escape sequence '\u'"),
        (r"'\U00110000'", "not a Unicode scalar value"),
        (r"'\ud800'", "not a Unicode scalar value"),
        (r"'\udc00'", "not a Unicode scalar value"),
        (r"'\ud83d\u0041'", "an unpaired surrogate"),
        (
            r"b'\u00e9'",
            r"invalid escape sequence '\u' (\u and \U are for strings, not bytes)",
        ),
        (r"b'\U00000041'", "not bytes"),
        // Prefixes are `r`, `b` and `b` then `r`.
        ("rb'a'", "unexpected ''a'', expected an operator"),
        ("x'a'", "unexpected ''a'', expected an operator"),
    ] {
        let message = error(source);
        assert!(message.contains(expected), "{source}: {message}");
    }
    let long = format!("'{}'", "é".repeat(5000));
    assert_eq!(literal(&long), string(&"é".repeat(5000)));
    let escapes = format!("'{}'", r"\u00e9".repeat(2000));
    assert_eq!(literal(&escapes), string(&"é".repeat(2000)));
    let shown_error = error(&format!("'{}", "x".repeat(100)));
    assert!(
        shown_error.ends_with("unterminated string literal"),
        "{shown_error}"
    );
}

#[test]
fn macros() {
    assert_shown(&[
        ("has(a.b)", "has(a.b)"),
        ("has(a.b.c)", "has(a.b.c)"),
        ("has(a[0].b)", "has(a[0].b)"),
        ("l.all(x, x > 0)", "l.all(x, (x > 0))"),
        ("l.exists(x, x)", "l.exists(x, x)"),
        ("l.exists_one(x, x)", "l.exists_one(x, x)"),
        ("l.existsOne(x, x)", "l.exists_one(x, x)"),
        ("l.map(x, x * 2)", "l.map(x, (x * 2))"),
        ("l.map(x, x > 0, x * 2)", "l.map(x, (x > 0), (x * 2))"),
        ("l.filter(x, x > 0)", "l.filter(x, (x > 0))"),
        ("a.b.all(x, x.all(y, y))", "a.b.all(x, x.all(y, y))"),
        (
            "[1].map(x, x).filter(y, y > 0).size()",
            "[1].map(x, x).filter(y, (y > 0)).size()",
        ),
        // Other shapes are calls, for the checker to refuse.
        ("has(a.b, c)", "has(a.b, c)"),
        ("has()", "has()"),
        (".has(a.b)", ".has(a.b)"),
        ("a.has(b.c)", "a.has(b.c)"),
        ("l.all(x)", "l.all(x)"),
        ("l.all(x, y, z)", "l.all(x, y, z)"),
        ("l.map(x, a, b, c)", "l.map(x, a, b, c)"),
        ("all(l, x, y)", "all(l, x, y)"),
        ("l.filter(x, a, b)", "l.filter(x, a, b)"),
    ]);
    let tree = parse("self.items.filter(i, i.ok)").unwrap();
    let Expr::Macro(m) = tree else {
        panic!("{tree:?}")
    };
    assert_eq!((m.kind, &*m.variable), (MacroKind::Filter, "i"));
    assert!(m.filter.is_none());
    for (source, expected) in [
        ("has(a)", "1:1: invalid argument to has() macro"),
        ("x + has(a[0])", "1:5: invalid argument to has() macro"),
        ("has(a.b())", "invalid argument to has() macro"),
        (
            "l.all(1, x)",
            "1:2: the first argument of all() must be a variable name",
        ),
        (
            "l.map(x.y, x)",
            "the first argument of map() must be a variable name",
        ),
        ("l.exists(.x, x)", "the first argument of exists()"),
    ] {
        let message = error(source);
        assert!(message.contains(expected), "{source}: {message}");
    }
}

#[test]
fn errors_name_the_place_and_what_was_expected() {
    for (source, expected) in [
        (
            "",
            "ERROR: <input>:1:1: Syntax error: unexpected end of input, expected an expression",
        ),
        (
            " ",
            "ERROR: <input>:1:2: Syntax error: unexpected end of input, expected an expression",
        ),
        (
            ")",
            "ERROR: <input>:1:1: Syntax error: unexpected ')', expected an expression",
        ),
        (
            "a + )",
            "ERROR: <input>:1:5: Syntax error: unexpected ')', expected an expression",
        ),
        (
            "a +\n  )",
            "ERROR: <input>:2:3: Syntax error: unexpected ')', expected an expression",
        ),
        (
            "+",
            "ERROR: <input>:1:1: Syntax error: unexpected '+', expected an expression",
        ),
        (
            "!",
            "ERROR: <input>:1:2: Syntax error: unexpected end of input, expected an expression",
        ),
        (
            "a b",
            "ERROR: <input>:1:3: Syntax error: unexpected 'b', expected an operator or the end \
             of the expression",
        ),
        (
            "(a",
            "1:3: Syntax error: unexpected end of input, expected ')'",
        ),
        ("(a]", "1:3: Syntax error: unexpected ']', expected ')'"),
        (
            "f(1,)",
            "1:5: Syntax error: unexpected ')', expected an expression",
        ),
        (
            "f(1 2)",
            "1:5: Syntax error: unexpected '2', expected ',' or ')'",
        ),
        (
            "[1, 2",
            "1:6: Syntax error: unexpected end of input, expected ',' or ']'",
        ),
        (
            "[,]",
            "1:2: Syntax error: unexpected ',', expected an expression",
        ),
        ("{'a' 1}", "1:6: Syntax error: unexpected '1', expected ':'"),
        (
            "{'a': 1]",
            "1:8: Syntax error: unexpected ']', expected ',' or '}'",
        ),
        (
            "{,}",
            "1:2: Syntax error: unexpected ',', expected an expression",
        ),
        (
            "A{1: 2}",
            "1:3: Syntax error: unexpected '1', expected a field name",
        ),
        (
            "a ? b",
            "1:6: Syntax error: unexpected end of input, expected ':'",
        ),
        (
            "a ? b ? c : d : e",
            "1:7: Syntax error: unexpected '?', expected ':'",
        ),
        (
            "a.",
            "1:3: Syntax error: unexpected end of input, expected a field name",
        ),
        (
            "a.1",
            "1:2: Syntax error: unexpected '.1', expected an operator",
        ),
        (
            "a.true",
            "1:3: Syntax error: unexpected 'true', expected a field name",
        ),
        (
            "a.(b)",
            "1:3: Syntax error: unexpected '(', expected a field name",
        ),
        (
            "a[]",
            "1:3: Syntax error: unexpected ']', expected an expression",
        ),
        (
            "a[0](1)",
            "1:5: Syntax error: unexpected '(', expected an operator",
        ),
        (
            "(a)(1)",
            "1:4: Syntax error: unexpected '(', expected an operator",
        ),
        (
            "(a){}",
            "1:4: Syntax error: unexpected '{', expected an operator",
        ),
        (
            "a.b(){}",
            "1:6: Syntax error: unexpected '{', expected an operator",
        ),
        (
            ".(a)",
            "1:2: Syntax error: unexpected '(', expected a name after the leading '.'",
        ),
        ("a # 1", "1:3: Syntax error: unexpected character '#'"),
        (
            "a = 1",
            "1:3: Syntax error: unexpected character '=' (comparison is '==')",
        ),
        ("a & b", "(logical and is '&&')"),
        ("a | b", "(logical or is '||')"),
        (
            "a.`b-c`",
            "1:3: Syntax error: unexpected character '`' (quoted identifiers",
        ),
        ("é", "1:1: Syntax error: unexpected character 'é'"),
        ("'é' é", "1:5: Syntax error: unexpected character 'é'"),
        ("a\u{0}", "1:2: Syntax error: unexpected character '\\0'"),
        ("a\u{b}", "unexpected character '\\u{b}'"),
        ("if", "1:1: reserved identifier: if"),
        ("a + namespace(1)", "1:5: reserved identifier: namespace"),
        (".while", "1:1: reserved identifier: while"),
        (
            "a.?b",
            "1:2: unsupported syntax '.?' (optional field selection)",
        ),
        ("a[?0]", "1:2: unsupported syntax '[?' (optional indexing)"),
        (
            "[?a]",
            "1:2: unsupported syntax '?' (optional list elements)",
        ),
        (
            "[a, ?b]",
            "1:5: unsupported syntax '?' (optional list elements)",
        ),
        (
            "{?a: 1}",
            "1:2: unsupported syntax '?' (optional map entries)",
        ),
        ("A{?a: 1}", "1:3: unsupported syntax '?' (optional fields)"),
        (
            "a &&\n\n  b ||",
            "ERROR: <input>:3:7: Syntax error: unexpected end of input, expected an expression",
        ),
        (
            "'''\n\n''' + ]",
            "ERROR: <input>:3:7: Syntax error: unexpected ']', expected an expression",
        ),
        (
            &format!("'{}' )", "x".repeat(40)),
            "1:44: Syntax error: unexpected ')'",
        ),
        (
            &format!("1 {}", "'long string literal here, cut short'"),
            "unexpected ''long string literal her…', expected",
        ),
    ] {
        let message = error(source);
        assert!(message.contains(expected), "{source:?}: {message}");
        assert!(message.starts_with("ERROR: <input>:"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}

#[test]
fn the_tree_and_the_parse_are_bounded() {
    let nest =
        |open: &str, close: &str, n: usize| format!("{}x{}", open.repeat(n), close.repeat(n));
    // The tree's height: lists, calls, members, operators; parentheses
    // do not count.
    assert!(parse(&nest("[", "]", MAX_NESTING - 1)).is_ok());
    let message = error(&nest("[", "]", MAX_NESTING));
    assert!(
        message.contains("nests too deeply (over 100 levels)"),
        "{message}"
    );
    assert!(parse(&format!("x{}", ".a".repeat(MAX_NESTING - 1))).is_ok());
    assert!(error(&format!("x{}", ".a".repeat(MAX_NESTING)))
        .contains("1:200: the expression nests too deeply"));
    assert!(error(&format!("x{}", " + 1".repeat(MAX_NESTING))).contains("nests too deeply"));
    assert!(error(&nest("f(", ")", MAX_NESTING)).contains("nests too deeply"));
    assert!(error(&format!("{}x", "a ? b : ".repeat(MAX_NESTING))).contains("nests too deeply"));
    // The parse's depth: parentheses count.
    assert!(parse(&nest("(", ")", MAX_PARSE_DEPTH - 1)).is_ok());
    let message = error(&nest("(", ")", MAX_PARSE_DEPTH));
    assert!(
        message.contains("1:251: the expression nests too deeply (over 250 levels"),
        "{message}"
    );
    assert!(parse(&nest("[(", ")]", MAX_NESTING - 1)).is_ok());
    // Runs that do not nest: prefix operators, `&&` and `||`.
    assert_eq!(shown(&format!("{}x", "!".repeat(10_001))), "(!x)");
    assert_eq!(shown(&format!("{}x", "- ".repeat(10_000))), "x");
    let run = vec!["x"; 4000].join(" && ");
    assert!(parse(&run).is_ok());
    let run = vec!["x || y && z"; 2000].join(" || ");
    assert!(parse(&run).is_ok());
    // Whatever the source, what is refused is refused early.
    for (open, close) in [
        ("(", ")"),
        ("[", "]"),
        ("{", ":1}"),
        ("{1:", "}"),
        ("f(", ")"),
        ("a.b(", ")"),
        ("x[", "]"),
        ("A{a:", "}"),
        ("!(", ")"),
        ("-[", "]"),
        ("a ? b : ", ""),
        ("l.all(x, ", ")"),
    ] {
        let deep = nest(open, close, 20_000);
        assert!(error(&deep).contains("nests too deeply"), "{open}");
        assert!(
            error(&nest(open, "", 20_000)).contains("nests too deeply"),
            "{open}"
        );
    }
}

/// Shapes of one level of nesting, the costliest for the stack first.
const SHAPES: &[(&str, &str)] = &[
    ("-A{a: ", "}"),
    ("-{1: ", "}"),
    ("!f(", ")"),
    ("A{a: ", "}"),
    ("{1: ", "}"),
    ("f(", ")"),
    ("a.b(", ")"),
    ("a.all(x, ", ")"),
    ("[", "]"),
    ("x[", "]"),
    ("(", ")"),
    ("1 || 1 && 1 == 1 + 1 * (", ")"),
    ("a ? b : ", ""),
];

#[test]
fn stack_per_level_is_small() {
    let mut worst = 0;
    for (open, close) in SHAPES {
        let deep = |n: usize| format!("{}1{}", open.repeat(n), close.repeat(n));
        let per_level = (stack_used(&deep(60)) - stack_used(&deep(20))) / 40;
        println!("{per_level:>5} bytes of stack per level: {open}");
        worst = worst.max(per_level);
    }
    // A debug build's figure (3.5 KiB, measured); a release build's is
    // about half.
    assert!(worst <= 4096, "{worst} bytes per level");
    println!("deepest parse: {} KiB", worst * MAX_PARSE_DEPTH / 1024);
}

#[test]
fn the_deepest_inputs_fit_a_small_stack() {
    // Half a tokio worker's stack, for the deepest parse of each shape
    // and for checking the deepest tree.
    let stack = 1 << 20;
    let outcome = std::thread::Builder::new()
        .stack_size(stack)
        .spawn(|| {
            for (open, close) in SHAPES {
                let deep = format!("{}1{}", open.repeat(400), close.repeat(400));
                assert!(parse(&deep).is_err());
            }
            let deepest = format!("{}1{}", "[(".repeat(97), ")]".repeat(97));
            let rule = CompiledRule::compile(&format!("{deepest} != []"), None, false);
            assert!(rule.is_ok(), "{rule:?}");
        })
        .unwrap()
        .join();
    assert!(outcome.is_ok());
}

/// A small fast generator (xorshift), seeded per test.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Parse `source`: an error is well formed and placed within the source;
/// a tree prints to a source that parses to the same tree. Then compile
/// the source as a rule, and evaluate what compiles: nothing may panic.
fn exercise(source: &str) -> bool {
    let outcome = std::panic::catch_unwind(|| {
        let parsed = match parse(source) {
            Ok(tree) => {
                let text = show(&tree);
                match parse(&text) {
                    Ok(again) => assert!(again == tree, "{source:?} → {text:?} → {again:?}"),
                    Err(error) => panic!("{source:?} → {text:?}: {error}"),
                }
                true
            }
            Err(error) => {
                assert_well_formed(source, &error);
                false
            }
        };
        if let Ok(rule) = CompiledRule::compile(source, None, false) {
            let value = serde_json::json!({"a": [1, "x"], "b": {"c": 2.5}});
            let mut budget = crate::cel::Budget::with_units(10_000);
            let _ = rule.evaluate(&crate::cel::Input::new(&value, None), None, &mut budget);
        }
        parsed
    });
    match outcome {
        Ok(parsed) => parsed,
        Err(_) => panic!("panicked on {source:?}"),
    }
}

fn assert_well_formed(source: &str, error: &str) {
    let place = error
        .strip_prefix("ERROR: <input>:")
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(place, _)| place.split_once(':'))
        .and_then(|(line, column)| {
            Some((line.parse::<usize>().ok()?, column.parse::<usize>().ok()?))
        });
    let Some((line, column)) = place else {
        panic!("{source:?}: malformed error {error:?}");
    };
    let lines: Vec<&str> = source.split('\n').collect();
    assert!((1..=lines.len()).contains(&line), "{source:?}: {error}");
    assert!(
        (1..=lines[line - 1].chars().count() + 1).contains(&column),
        "{source:?}: {error}"
    );
    assert!(!error.contains('\n'), "{source:?}: {error}");
}

const CHARACTERS: &[&str] = &[
    "a", "b", "x", "_", "1", "0", "9", "e", "u", "r", "b", "x", "f", " ", " ", "\n", "\t", "\r",
    "\x0c", ".", ",", ":", "?", "!", "-", "+", "*", "/", "%", "=", "<", ">", "&", "|", "(", ")",
    "[", "]", "{", "}", "'", "\"", "\\", "`", "#", "$", "@", "~", "^", ";", "é", "😀", "\u{0}",
    "\u{2028}", "\u{feff}",
];

const TOKENS: &[&str] = &[
    "self",
    "oldSelf",
    "x",
    "a",
    "_b",
    "in",
    "true",
    "false",
    "null",
    "if",
    "namespace",
    "has",
    "all",
    "exists",
    "exists_one",
    "existsOne",
    "map",
    "filter",
    "size",
    "int",
    "optional",
    "0",
    "1",
    "42",
    "-1",
    "0x1F",
    "0x",
    "1u",
    "1U",
    "1.5",
    ".5",
    "1e10",
    "1e",
    "1.",
    "2.5e-3",
    "9223372036854775808",
    "18446744073709551616u",
    "1e999",
    "''",
    "'a'",
    "\"b\"",
    "'''c'''",
    "r'\\d'",
    "b'\\xff'",
    "br'x'",
    "'\\u00e9'",
    "'\\U0001F600'",
    "'\\377'",
    "'\\400'",
    "'\\q'",
    "'",
    "\"",
    "'''",
    "b'",
    "r\"",
    "'\\",
    "'\\u12'",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ".",
    ",",
    ":",
    "?",
    "!",
    "-",
    "+",
    "*",
    "/",
    "%",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    "=",
    "&",
    "|",
    ".?",
    "[?",
    "`",
    "#",
    "// c\n",
    "\n",
    " ",
];

/// Random characters.
fn random_text(rng: &mut Rng) -> String {
    let len = rng.below(40);
    (0..len).map(|_| rng.pick(CHARACTERS)).collect()
}

/// Random tokens, mostly spaced.
fn token_soup(rng: &mut Rng) -> String {
    let len = rng.below(24);
    let mut out = String::new();
    for _ in 0..len {
        out.push_str(rng.pick(TOKENS));
        if rng.below(3) > 0 {
            out.push(' ');
        }
    }
    out
}

/// Rules as people write them, cut, doubled and spliced.
fn mutated_rule(rng: &mut Rng) -> String {
    const RULES: &[&str] = &[
        "self.replicas <= self.maxReplicas && self.minReplicas >= 0",
        "self.all(x, x.startsWith('a') || x.size() < 10u)",
        "has(self.spec.x) ? self.spec.x.matches('^[a-z]+$') : true",
        "self.items.map(i, i.n * 2, i.n > 0).filter(j, j % 3 == 0).size() >= -1",
        "oldSelf.exists_one(k, k in {'a': 1, \"b\": [2.5, -3e2, b'\\x00']}) == !!false",
        "type(self) == map && self.__namespace__ != r'\\d' && self.x__dash__y[0] < 1.0",
        "'''multi\nline''' + \"\\u00e9\\U0001F600\" == string(self.a) ? [1, 2,][1] : null",
        "-self.n * (2 + 3) / 4 % 5 - --6 < 7 && !(self.b || x.y.z(1, 2)) || A{f: 1}.f",
    ];
    let mut source = rng.pick(RULES).to_string();
    for _ in 0..1 + rng.below(3) {
        let mut at = rng.below(source.len() + 1);
        while !source.is_char_boundary(at) {
            at -= 1;
        }
        match rng.below(4) {
            0 => {
                let mut end = (at + 1 + rng.below(8)).min(source.len());
                while !source.is_char_boundary(end) {
                    end += 1;
                }
                source.replace_range(at..end, "");
            }
            1 => source.insert_str(at, rng.pick(TOKENS)),
            2 => source.insert_str(at, rng.pick(CHARACTERS)),
            _ => {
                let prefix = source[..at].to_owned();
                source.insert_str(at, &prefix);
            }
        }
    }
    source
}

/// Brackets and operators opened and closed at random, deep.
fn deep_nesting(rng: &mut Rng) -> String {
    const OPEN: &[&str] = &[
        "(", "[", "{1: ", "f(", "a.b(", "x[", "!", "-", "a ? b : ", "A{a: ",
    ];
    let levels = rng.below(400);
    let mut source = String::new();
    for _ in 0..levels {
        source.push_str(rng.pick(OPEN));
    }
    source.push('x');
    for _ in 0..rng.below(levels + 2) {
        source.push_str(rng.pick(&[")", "]", "}", " + 1", ".y", ", 2"]));
    }
    source
}

/// An expression the grammar allows, spaced at random: the round trip
/// through [`show`] checks its shape.
fn random_expression(rng: &mut Rng, depth: usize) -> String {
    const LEAVES: &[&str] = &[
        "x",
        "self",
        ".y",
        "1",
        "0u",
        "2.5",
        "1e-3",
        "'s'",
        r"r'\d'",
        r"b'\x00'",
        "true",
        "null",
        "[]",
        "{}",
        "-1",
        "-0.5",
        "9223372036854775807",
        "'''a\nb'''",
    ];
    const BINARY: &[&str] = &[
        "||", "&&", "==", "!=", "<", "<=", ">", ">=", "in", "+", "-", "*", "/", "%",
    ];
    const MACROS: &[&str] = &["all", "exists", "exists_one", "existsOne", "map", "filter"];
    if depth == 0 || rng.below(5) == 0 {
        return rng.pick(LEAVES).to_owned();
    }
    let a = random_expression(rng, depth - 1);
    let b = random_expression(rng, depth - 1);
    let c = random_expression(rng, depth - 1);
    let space = if rng.below(2) == 0 { " " } else { "" };
    match rng.below(14) {
        0 => format!("{}{a}", rng.pick(&["!", "!!", "-", "--", "- -", "!!!"])),
        1 => format!("({a})"),
        2 => format!("({a}) ?{space}({b}) :{space}{c}"),
        3 => format!("({a}).f{space}"),
        4 => format!("({a})[{b}]"),
        5 => format!("f({a},{space}{b})"),
        6 => format!("({a}).g({b})"),
        7 => format!("[{a}, {b}{}]", if rng.below(2) == 0 { "," } else { "" }),
        8 => format!("{{{a}: {b},{space}{c}: {a}}}"),
        9 => format!("has(({a}).f)"),
        10 => format!("({a}).{}(v, {b})", rng.pick(MACROS)),
        11 => format!("({a}).map(v, {b}, {c})"),
        12 => format!("a.B{{f: {a}, g: {b}}}"),
        _ => format!("{a}{space}{}{space}{b}", rng.pick(BINARY)),
    }
}

fn fuzz(rounds: usize, seed: u64) -> (usize, usize) {
    let mut rng = Rng(seed);
    let mut parsed = 0;
    for round in 0..rounds {
        let source = match round % 5 {
            0 => random_text(&mut rng),
            1 => token_soup(&mut rng),
            2 => mutated_rule(&mut rng),
            3 => deep_nesting(&mut rng),
            _ => random_expression(&mut rng, 1 + round % 6),
        };
        parsed += usize::from(exercise(&source));
    }
    (rounds, parsed)
}

#[test]
fn fuzz_never_panics() {
    let (inputs, parsed) = fuzz(20_000, 0x2545_f491_4f6c_dd1d);
    println!("{inputs} inputs, {parsed} parsed");
    assert!(parsed > inputs / 20, "{parsed} of {inputs} parsed");
}

/// The fuzzing at length: a million inputs, about ten seconds in a
/// release build.
#[test]
#[ignore = "long: run in a release build"]
fn fuzz_at_length() {
    let (inputs, parsed) = fuzz(1_000_000, 0x9e37_79b9_7f4a_7c15);
    println!("{inputs} inputs, {parsed} parsed");
}

#[test]
fn huge_inputs() {
    for source in [
        "9".repeat(16_000),
        format!("'{}'", "a".repeat(16_000)),
        format!("'{}", "\\u00e9".repeat(2_000)),
        format!("b'{}'", "\\377".repeat(4_000)),
        format!("1.{}e-99999999999999999999", "5".repeat(8_000)),
        format!("[{}]", "1, ".repeat(5_000)),
        format!("{{{}}}", "1: 2, ".repeat(2_000)),
        "x.y".repeat(5_000),
        format!("f({})", vec!["x"; 5_000].join(", ")),
        "'".repeat(16_000),
        "\\".repeat(16_000),
        "// comment ".repeat(1_500),
    ] {
        exercise(&source);
    }
}
