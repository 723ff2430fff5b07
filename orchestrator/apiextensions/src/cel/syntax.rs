//! Parsing, with `cel-parser`'s syntax tree. Three things about that parser
//! shape this module:
//!
//! - It recurses deeply (about 11 KiB of stack per bracket level, 0.5 KiB
//!   per chained operator, measured): it runs on a thread of its own whose
//!   stack is sized from the source, so no expression can overflow it, and
//!   the tree it returns is checked there too (see [`super::check`]), which
//!   bounds the depth of everything evaluated later.
//! - It panics on much malformed input (a stray `)`, a lone `+`): the
//!   thread's panic is reported as a syntax error.
//! - It reads a run of an even number of `!` (or prefix `-`) as one
//!   operator: `!!x` parses as `!x`. [`prefix_runs`] finds the runs in the
//!   source of an expression that parsed, and the matching operators are
//!   dropped from the tree.

use std::collections::HashSet;

use cel_parser::ast::{EntryExpr, Expr, IdedExpr};

/// Stack for the parser beyond what the source needs.
const BASE_STACK: usize = 1 << 20;
/// Stack per bracket (an upper bound on nesting) and per other byte.
const STACK_PER_BRACKET: usize = 16 << 10;
const STACK_PER_BYTE: usize = 1 << 10;

/// Parse `source` and hand the tree to `check` (with the ids of the unary
/// operators to drop), all on the parser's thread.
pub(super) fn parse<T: Send>(
    source: &str,
    check: impl FnOnce(&IdedExpr, &HashSet<u64>) -> Result<T, String> + Send,
) -> Result<T, String> {
    let brackets = source.bytes().filter(|b| b"([{".contains(b)).count();
    let stack = BASE_STACK + brackets * STACK_PER_BRACKET + source.len() * STACK_PER_BYTE;
    std::thread::scope(|scope| {
        let parser = std::thread::Builder::new()
            .name("cel-parser".into())
            .stack_size(stack)
            .spawn_scoped(scope, || {
                let tree = cel_parser::Parser::new()
                    .parse(source)
                    .map_err(|errors| errors.to_string())?;
                let dropped = even_unary_runs(source, &tree)?;
                check(&tree, &dropped)
            })
            .map_err(|e| format!("cannot start the parser: {e}"))?;
        parser.join().unwrap_or_else(|_| {
            Err("ERROR: <input>: Syntax error: incomplete or malformed expression".into())
        })
    })
}

/// The ids of the `!_` and `-_` calls that stand for an even run of
/// operators, which the parser collapsed into one.
fn even_unary_runs(source: &str, tree: &IdedExpr) -> Result<HashSet<u64>, String> {
    let runs = prefix_runs(source);
    let mut nots = Vec::new();
    let mut negations = Vec::new();
    unary_calls(tree, &mut nots, &mut negations);
    if nots.len() != runs.nots.len() || negations.len() != runs.negations.len() {
        return Err("internal error: the expression's unary operators could not be matched".into());
    }
    // Ids follow the source order of the operators.
    nots.sort_unstable();
    negations.sort_unstable();
    let even = |ids: Vec<u64>, lengths: Vec<usize>| {
        ids.into_iter()
            .zip(lengths)
            .filter(|(_, len)| len % 2 == 0)
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    };
    let mut dropped: HashSet<u64> = even(nots, runs.nots).into_iter().collect();
    dropped.extend(even(negations, runs.negations));
    Ok(dropped)
}

/// Ids of the `!_` and `-_` calls written in the source (the `exists`
/// macro's expansion adds a `!_` of its own, on `@result`).
fn unary_calls(expr: &IdedExpr, nots: &mut Vec<u64>, negations: &mut Vec<u64>) {
    let mut children: Vec<&IdedExpr> = Vec::new();
    match &expr.expr {
        Expr::Call(call) => {
            let generated = matches!(
                call.args.as_slice(),
                [IdedExpr { expr: Expr::Ident(name), .. }] if name.starts_with('@')
            );
            match call.func_name.as_str() {
                "!_" if !generated => nots.push(expr.id),
                "-_" => negations.push(expr.id),
                _ => {}
            }
            children.extend(call.target.as_deref());
            children.extend(&call.args);
        }
        Expr::Comprehension(c) => {
            children.extend([
                &*c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]);
        }
        Expr::List(list) => children.extend(&list.elements),
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    children.extend([&e.key, &e.value]);
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    children.push(&f.value);
                }
            }
        }
        Expr::Select(select) => children.push(&select.operand),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
    for child in children {
        unary_calls(child, nots, negations);
    }
}

/// Lengths of the runs of prefix `!` and `-` operators, in source order.
#[derive(Debug, Default, PartialEq, Eq)]
struct Runs {
    nots: Vec<usize>,
    negations: Vec<usize>,
}

/// The prefix operator runs of `source`, which parsed: its tokens are valid
/// CEL, so only literals, comments and what ends an operand matter here.
fn prefix_runs(source: &str) -> Runs {
    let bytes = source.as_bytes();
    let mut runs = Runs::default();
    // Whether the last token ends an operand, making a `-` binary.
    let mut after_operand = false;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if let Some(end) = literal_end(bytes, at) {
            at = end;
            after_operand = true;
        } else if byte.is_ascii_alphanumeric()
            || byte == b'_'
            || (byte == b'.' && bytes.get(at + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = at;
            let number = byte.is_ascii_digit() || byte == b'.';
            let hex = number && matches!(bytes.get(at + 1), Some(b'x' | b'X'));
            at += 1;
            while let Some(&b) = bytes.get(at) {
                if b.is_ascii_alphanumeric() || b == b'_' || (number && b == b'.') {
                    at += 1;
                    // An exponent's sign belongs to its number (`1e-5`).
                    let exponent = number && !hex && matches!(b, b'e' | b'E');
                    if exponent && matches!(bytes.get(at), Some(b'+' | b'-')) {
                        at += 1;
                    }
                } else {
                    break;
                }
            }
            after_operand = &source[start..at] != "in";
        } else if byte == b'!' && bytes.get(at + 1) != Some(&b'=') || byte == b'-' {
            let (len, end) = run(bytes, at, byte);
            at = end;
            let mut prefix = if byte == b'-' && after_operand {
                len - 1
            } else {
                len
            };
            // A lone `-` before an int or double literal is its sign.
            if byte == b'-' && prefix == 1 && signed_number(bytes, at) {
                prefix = 0;
            }
            if prefix > 0 {
                if byte == b'!' {
                    runs.nots.push(prefix);
                } else {
                    runs.negations.push(prefix);
                }
            }
            after_operand = false;
        } else if byte == b'/' && bytes.get(at + 1) == Some(&b'/') {
            at = skip_comment(bytes, at);
        } else {
            if !byte.is_ascii_whitespace() {
                after_operand = matches!(byte, b')' | b']' | b'}');
            }
            at += 1;
        }
    }
    runs
}

/// Whether an int or double literal (which the grammar lets take a sign;
/// uints do not) starts at `at`.
fn signed_number(bytes: &[u8], at: usize) -> bool {
    let rest = &bytes[at.min(bytes.len())..];
    let number = match rest {
        [b, ..] if b.is_ascii_digit() => true,
        [b'.', b, ..] => b.is_ascii_digit(),
        _ => false,
    };
    let len = rest
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'.')
        .count();
    number && !matches!(rest[..len].last(), Some(b'u' | b'U'))
}

/// Length and end of the run of `op` at `at`; white space and comments may
/// separate its operators.
fn run(bytes: &[u8], mut at: usize, op: u8) -> (usize, usize) {
    let mut len = 0;
    loop {
        at = skip_space(bytes, at);
        let repeated =
            bytes.get(at) == Some(&op) && (op != b'!' || bytes.get(at + 1) != Some(&b'='));
        if !repeated {
            return (len, at);
        }
        len += 1;
        at += 1;
    }
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    loop {
        match bytes.get(at) {
            Some(b) if b.is_ascii_whitespace() => at += 1,
            Some(b'/') if bytes.get(at + 1) == Some(&b'/') => at = skip_comment(bytes, at),
            _ => return at,
        }
    }
}

fn skip_comment(bytes: &[u8], at: usize) -> usize {
    bytes[at..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(bytes.len(), |end| at + end + 1)
}

/// The end of the string or bytes literal starting at `at`, if one does:
/// a prefix of `b` and `r` letters, then `'`, `"`, `'''` or `"""`.
fn literal_end(bytes: &[u8], at: usize) -> Option<usize> {
    let prefix = bytes[at..]
        .iter()
        .take_while(|b| matches!(b, b'b' | b'B' | b'r' | b'R'))
        .count();
    if prefix > 2 || (at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_')) {
        return None;
    }
    let raw = bytes[at..at + prefix]
        .iter()
        .any(|b| matches!(b, b'r' | b'R'));
    let open = at + prefix;
    let quote = *bytes.get(open).filter(|q| matches!(q, b'\'' | b'"'))?;
    let triple = bytes[open..].starts_with(&[quote; 3]);
    let mut at = open + if triple { 3 } else { 1 };
    while at < bytes.len() {
        match bytes[at] {
            b'\\' if !raw => at += 2,
            b if b == quote && (!triple || bytes[at..].starts_with(&[quote; 3])) => {
                return Some(at + if triple { 3 } else { 1 });
            }
            _ => at += 1,
        }
    }
    Some(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_runs_are_found_outside_literals_and_comments() {
        let runs = |source: &str| {
            let r = prefix_runs(source);
            (r.nots, r.negations)
        };
        assert_eq!(runs("!!a && !b != !!!c"), (vec![2, 1, 3], vec![]));
        assert_eq!(runs("a - -b - - -c"), (vec![], vec![1, 2]));
        assert_eq!(
            runs("--1 + (- 1) - x[0]-1 + -1u + -.5 + -x"),
            (vec![], vec![2, 1, 1])
        );
        assert_eq!(
            runs("'!!' + \"--\" + r'\\' + '''a'!'b''' // !!\n + -x"),
            (vec![], vec![1])
        );
        assert_eq!(runs("1e-5 - 0x1e - -2 - - -2"), (vec![], vec![2]));
        assert_eq!(
            runs("x in -y && b'-' == rb\"-\" && !\n// c\n!z"),
            (vec![2], vec![1])
        );
        assert_eq!(runs("a.b(-1)[-2] ? -c : {-d: -e}"), (vec![], vec![1, 1, 1]));
    }
}
