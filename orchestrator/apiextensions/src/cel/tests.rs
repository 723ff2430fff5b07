//! The engine's tests: the language, CEL's error semantics, cost and the
//! limits that keep evaluation bounded.

use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::*;

fn compile(source: &str) -> CompiledRule {
    CompiledRule::compile(source, None, false).unwrap_or_else(|error| panic!("{source}: {error}"))
}

/// `rule` on `value` (and `old`), untyped, with a fresh budget.
fn run(rule: &CompiledRule, value: &Json, old: Option<&Json>) -> Result<bool, String> {
    let old = old.map(|old| Input::new(old, None));
    rule.evaluate(&Input::new(value, None), old.as_ref(), &mut Budget::new())
        .map_err(|failure| failure.to_string())
}

fn message_of(rule: &CompiledRule, value: &Json, old: Option<&Json>) -> Option<String> {
    let old = old.map(|old| Input::new(old, None));
    rule.message(&Input::new(value, None), old.as_ref(), &mut Budget::new())
        .expect("within budget")
}

fn evaluate(source: &str, value: &Json) -> Result<bool, String> {
    run(&compile(source), value, None)
}

/// Each rule evaluates to true on `value`.
fn assert_hold(value: &Json, rules: &[&str]) {
    for source in rules {
        assert_eq!(evaluate(source, value), Ok(true), "{source}");
    }
}

/// Each rule compiles and fails to evaluate, with an error containing
/// `expected`.
fn assert_errors(value: &Json, cases: &[(&str, &str)]) {
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

/// A schema from its JSON (rules in it compiled too).
fn schema(raw: Json) -> Schema {
    Schema::parse(&raw, "s").unwrap_or_else(|causes| panic!("refused: {causes:#?}"))
}

/// `source` on `value` typed by `schema`.
fn evaluate_typed(source: &str, value: &Json, schema: &Schema) -> Result<bool, String> {
    compile(source)
        .evaluate(&Input::new(value, Some(schema)), None, &mut Budget::new())
        .map_err(|failure| failure.to_string())
}

#[test]
fn rules_pass_and_fail() {
    let rule = compile("self.replicas <= self.maxReplicas");
    assert!(!rule.is_transition());
    let object = |replicas: i64| json!({"replicas": replicas, "maxReplicas": 5});
    assert_eq!(run(&rule, &object(3), None), Ok(true));
    assert_eq!(run(&rule, &object(5), None), Ok(true));
    assert_eq!(run(&rule, &object(6), None), Ok(false));

    let rule = compile("self.minReplicas <= self.replicas && self.replicas <= self.maxReplicas");
    let object = json!({"minReplicas": 2, "replicas": 1, "maxReplicas": 5});
    assert_eq!(run(&rule, &object, None), Ok(false));

    let rule = compile("self.startsWith('ok')");
    assert_eq!(run(&rule, &json!("ok: fine"), None), Ok(true));
    assert_eq!(run(&rule, &json!("broken"), None), Ok(false));
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
    assert_eq!(run(&immutable, &spec, Some(&spec.clone())), Ok(true));
    assert_eq!(run(&immutable, &changed, Some(&spec)), Ok(false));

    let growing = compile("self >= oldSelf");
    assert_eq!(run(&growing, &json!(5), Some(&json!(3))), Ok(true));
    assert_eq!(run(&growing, &json!(2), Some(&json!(3))), Ok(false));
    let error = run(&growing, &json!(5), None).unwrap_err();
    assert!(error.contains("oldSelf"), "{error}");

    let fields = compile("!has(oldSelf.id) || self.id == oldSelf.id");
    assert_eq!(
        run(&fields, &json!({"id": "a"}), Some(&json!({}))),
        Ok(true)
    );
    assert_eq!(
        run(&fields, &json!({"id": "b"}), Some(&json!({"id": "a"}))),
        Ok(false)
    );
    // oldSelf is not converted for a rule that does not read it.
    assert_eq!(evaluate("self == 1", &json!(1)), Ok(true));
    assert_eq!(
        run(&compile("self == 1"), &json!(1), Some(&json!(2))),
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
    assert_eq!(run(&rule, &object, None), Ok(false));
    assert_eq!(
        message_of(&rule, &object, None).as_deref(),
        Some("replicas 7 exceed 5")
    );

    let message = |expression: &str, value: &Json| {
        let rule = CompiledRule::compile("true", Some(expression), false).unwrap();
        message_of(&rule, value, None)
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
    assert_eq!(message_of(&compile("true"), &json!({}), None), None);

    let transition = CompiledRule::compile(
        "self >= oldSelf",
        Some("'cannot shrink from ' + string(oldSelf) + ' to ' + string(self)"),
        false,
    )
    .unwrap();
    assert_eq!(
        message_of(&transition, &json!(2), Some(&json!(3))).as_deref(),
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
        ("'unterminated", "Syntax error"),
        ("self.a # 1", "Syntax error"),
        ("self.?x == 1", "unsupported syntax '.?'"),
        ("self[?0] == 1", "unsupported syntax '[?'"),
        (
            "optional.some(1) == oldSelf",
            "function \"optional.some\" is not supported",
        ),
        ("Foo{a: 1} == self", "message construction"),
        (
            "self.contains()",
            "function \"contains\" takes 1 argument(s)",
        ),
        ("contains(self, 'a')", "function \"contains\" is a method"),
        ("self.int() == 1", "function \"int\" is not a method"),
        ("self.all(x, x > 0) && x > 1", "undeclared reference to 'x'"),
        ("'a'.charAt()", "function \"charAt\" takes 1 argument(s)"),
        (
            "'a'.startsWith('a', 'b')",
            "function \"startsWith\" takes 1 argument(s)",
        ),
        ("'a'.replace('a')", "takes 2 to 3 argument(s)"),
        ("size() == 0", "function \"size\" needs an argument"),
        (
            "int(1, 2) == 1",
            "function \"int\" takes 1 argument(s) as in int(...), got 2",
        ),
        (
            "self.s.lowerAscii(1) == ''",
            "function \"lowerAscii\" takes 0 argument(s)",
        ),
        ("self.matches('(')", "invalid regular expression \"(\""),
        ("matches(self, 'a[')", "invalid regular expression \"a[\""),
        ("self.all(self, self > 0)", "may not be named self"),
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
}

/// Syntax errors in cel-go's frame: the place (line and column) and what
/// was expected there.
#[test]
fn syntax_errors_name_their_place() {
    for (source, expected) in [
        (
            "self.a + )",
            "ERROR: <input>:1:10: Syntax error: unexpected ')', expected an expression",
        ),
        (
            "self.a &&\n  self.b ||",
            "ERROR: <input>:2:12: Syntax error: unexpected end of input, expected an expression",
        ),
        (
            "self.a == 'x",
            "ERROR: <input>:1:11: Syntax error: unterminated string literal",
        ),
        (
            "has(self)",
            "ERROR: <input>:1:1: invalid argument to has() macro: it takes a field selection, \
             as in has(self.x)",
        ),
        (
            "self.all(1, true)",
            "ERROR: <input>:1:5: the first argument of all() must be a variable name, as in \
             all(x, ...)",
        ),
    ] {
        assert_eq!(refusal(source), format!("compilation failed: {expected}"));
    }
    let message = CompiledRule::compile("true", Some("'a' +"), false).unwrap_err();
    assert_eq!(
        message.0,
        "messageExpression compilation failed: ERROR: <input>:1:6: Syntax error: unexpected end \
         of input, expected an expression"
    );
}

#[test]
fn literals_and_root_names() {
    assert_hold(
        &json!({"a": 1}),
        &[
            "0x1F == 31 && 0x1Fu == 31u && 1e3 == 1000.0 && .5 == 0.5 && -9223372036854775808 < 0",
            r"'\U0001F600'.size() == 1 && '\ud83d\ude00' == '\U0001F600' && b'\377'.size() == 1",
            r"'\101\x42\u0043' == 'ABC' && r'\n'.size() == 2 && '''a
b'''.size() == 3",
            r"b'\xc3\xa9' == b'é' && bytes('é') == b'\303\251'",
            ".self.a == 1 && [2].all(a, .self.a == 1 && a == 2)",
            "!!true && --1 == 1 && -(-1) == 1 && 3 - -1 == 4",
        ],
    );
    assert!(refusal("[1].all(x, .x > 0)").contains("undeclared reference to '.x'"));
}

#[test]
fn size_and_nesting_are_bounded() {
    let long = format!("self.name == '{}'", "x".repeat(MAX_EXPRESSION_BYTES));
    assert!(refusal(&long).contains("over the limit"));
    let lists = format!(
        "size({}1{}) == 1",
        "[".repeat(MAX_NESTING),
        "]".repeat(MAX_NESTING)
    );
    assert!(refusal(&lists).contains("nests too deeply"));
    let chain = format!("self{} == 1", ".a".repeat(500));
    assert!(refusal(&chain).contains("nests too deeply"));
    // Parentheses group without nesting; long rules are fine while shallow.
    let parenthesized = format!("{}self{} == 1", "(".repeat(200), ")".repeat(200));
    assert_eq!(evaluate(&parenthesized, &json!(1)), Ok(true));
    let long_and = vec!["self.a == 1"; 300].join(" && ");
    assert_eq!(evaluate(&long_and, &json!({"a": 1})), Ok(true));
    let lists = format!("size({}1{}) == 1", "[".repeat(60), "]".repeat(60));
    assert_eq!(evaluate(&lists, &json!(1)), Ok(true));

    // The deepest inputs that fit the length limit are refused, without
    // overflowing the caller's stack.
    let half = MAX_EXPRESSION_BYTES / 2 - 8;
    for (open, close) in [("(", ")"), ("[", "]"), ("f(", ")"), ("{1:", "}")] {
        let levels = half / (open.len() + close.len()) * 2;
        let deep = format!("{}1{}", open.repeat(levels), close.repeat(levels));
        let deep = &deep[..deep.len().min(MAX_EXPRESSION_BYTES)];
        assert!(CompiledRule::compile(deep, None, false).is_err(), "{open}");
    }
    let chain = format!("1{}", " + 1".repeat(MAX_EXPRESSION_BYTES / 4 - 1));
    assert!(refusal(&chain).contains("nests too deeply"));

    // The deepest expression accepted evaluates on a small stack.
    let deepest = format!(
        "{}1{} != []",
        "[".repeat(MAX_NESTING - 3),
        "]".repeat(MAX_NESTING - 3)
    );
    let rule = compile(&deepest);
    let stack = 256 << 10;
    let outcome = std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || run(&rule, &json!(null), None))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(outcome, Ok(true));
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
            let _ = run(&rule, &json!({"a": [1]}), Some(&json!({})));
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
                "no such overload: field selection .size on string",
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
    // Nothing reads a value whole until it is compared.
    assert_eq!(evaluate("size(self) == 1", &deep), Ok(true));
    let error = evaluate("self == self", &deep).unwrap_err();
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
    assert_eq!(run(&unique, &list(100), None), Ok(true));
    let error = run(&unique, &list(5000), None).unwrap_err();
    assert_eq!(error, "operation cancelled: actual cost limit exceeded");

    // Linear work runs on large inputs.
    let positive = compile("self.all(x, x >= 0)");
    assert_eq!(run(&positive, &list(100_000), None), Ok(true));
    let mapped = compile("self.map(x, x).size() > 0");
    assert_eq!(run(&mapped, &list(100_000), None), Ok(true));
    // Split strings count as lists.
    let words = compile("self.split(',').all(w, w.size() < 3)");
    assert_eq!(run(&words, &json!("a,b,c"), None), Ok(true));
    let long = "a,".repeat(1 << 20);
    let nested = compile("self.split(',').all(w, self.split(',').exists(v, v == w))");
    assert!(run(&nested, &json!(long), None).is_err());

    // Strings are paid for before they are built.
    let text = json!("x".repeat(4096));
    let error = evaluate("self.replace('', self) != ''", &text).unwrap_err();
    assert!(error.contains("cost limit exceeded"), "{error}");
    let text = json!("x".repeat(3 << 20));
    let error = evaluate("[self, self].join() != ''", &text).unwrap_err();
    assert!(error.contains("cost limit exceeded"), "{error}");
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
    assert_eq!(run(&rule, &json!("99%"), None), Ok(true));
    assert_eq!(run(&rule, &json!(42), None), Ok(true));
    assert_eq!(run(&rule, &json!("50%"), None), Ok(false));
    assert_eq!(run(&rule, &json!(41), None), Ok(false));
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
                (0..100).all(|n| run(&rule, &json!({"n": n * 4 + i}), None) == Ok(i % 2 == 0))
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
        assert_eq!(run(&rule, &object, None), Ok(true));
    }
    let each = started.elapsed() / rounds;
    println!("{each:?} per evaluation of self.replicas <= self.maxReplicas");
    assert!(each < std::time::Duration::from_millis(1), "{each:?}");
}

/// The cases of the review of the previous engine.
#[test]
fn errors_are_absorbed_as_cel_absorbs_them() {
    let value = json!({"n": 1, "name": "web", "small": -9223372036854775808i64});
    assert_hold(
        &value,
        &[
            "true || (1/0 == 1)",
            "1/0 == 1 || true",
            "!(false && (1/0 == 1)) && !(1/0 == 1 && false)",
            "self.missing > 1 || true",
            "!has(self.missing) || self.missing > 0",
            // A value that is not a bool is an error, absorbed alike.
            "self.n || true",
            "!(self.n && false)",
            // `all` and `exists` are decided by any decisive element.
            "![0, 1].all(x, 1 / x > 1)",
            "[0, 1].exists(x, 1 / x > 0)",
            "{'a': 0, 'b': 1}.exists(k, 1 / {'a': 0, 'b': 1}[k] > 0)",
        ],
    );
    assert_errors(
        &value,
        &[
            ("false || 1/0 == 1", "division by zero"),
            ("1/0 == 1 && true", "division by zero"),
            ("1/0 == 1 || self.missing", "division by zero"),
            ("[0, 1].all(x, 1 / x < 2)", "division by zero"),
            ("![0, 1].exists(x, 1 / x > 1)", "division by zero"),
            ("[0, 1].exists_one(x, 1 / x > 0)", "division by zero"),
            ("[0, 1].map(x, 1 / x).size() == 2", "division by zero"),
            // No truthiness.
            ("!self.n", "no such overload: int is not a bool"),
            ("!self.name", "no such overload: string is not a bool"),
            ("self.n && true", "no such overload: int is not a bool"),
            (
                "false || self.name",
                "no such overload: string is not a bool",
            ),
            (
                "self.n ? true : false",
                "no such overload: int is not a bool",
            ),
            ("[1].all(x, x)", "no such overload: int is not a bool"),
            (
                "[1].filter(x, x).size() == 1",
                "no such overload: int is not a bool",
            ),
            // Overflow is an error, negation included.
            ("-self.small > 0", "integer overflow"),
            ("-(-9223372036854775807 - 1) > 0", "integer overflow"),
            ("self.small / -1 > 0", "integer overflow"),
            ("self.small % -1 == 0", "integer overflow"),
            ("self.small - 1 < 0", "integer overflow"),
            ("9223372036854775807 * 2 > 0", "integer overflow"),
            ("0u - 1u > 0u", "unsigned integer overflow"),
            (
                "duration('2562047h') + duration('2562047h') > duration('0')",
                "duration out of range",
            ),
            (
                "timestamp('9999-12-31T23:59:59Z') + duration('1s') > timestamp(0)",
                "out of range",
            ),
        ],
    );
    // Stops are not absorbed.
    let rule = compile("true || [1].all(x, x > 0)");
    let mut budget = Budget::with_units(1);
    assert_eq!(
        rule.evaluate(&Input::new(&value, None), None, &mut budget),
        Err(Failure::Stop(Stop::Budget))
    );
    let rule = compile("self.all(x, x >= 0) || true");
    let list = json!((0..1_000_000).collect::<Vec<_>>());
    assert_eq!(
        rule.evaluate(&Input::new(&list, None), None, &mut Budget::new()),
        Err(Failure::Stop(Stop::CallLimit))
    );
}

/// Kubernetes reads properties that are not CEL identifiers by escaped
/// names; keys of maps are read as written.
#[test]
fn escaped_property_names() {
    let s = schema(json!({"type": "object", "properties": {
        "x-y": {"type": "integer"}, "namespace": {"type": "string"}, "a.b": {"type": "string"},
        "a/b": {"type": "string"}, "a__b": {"type": "string"}, "if": {"type": "boolean"},
        "x-y-z.w": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }}));
    let value = json!({
        "x-y": 1, "namespace": "n", "a.b": "dot", "a/b": "slash", "a__b": "under", "if": true,
        "x-y-z.w": "mixed", "labels": {"x__dash__y": "literal", "x-y": "dashed"},
    });
    for rule in [
        "self.x__dash__y == 1",
        "self.__namespace__ == 'n'",
        "has(self.__namespace__) && has(self.a__dot__b) && !has(self.__other__)",
        "self.a__dot__b == 'dot' && self.a__slash__b == 'slash'",
        "self.a__underscores__b == 'under' && self.__if__",
        "self.x__dash__y__dash__z__dot__w == 'mixed'",
        // Maps are not objects: their keys are not escaped.
        "self.labels.x__dash__y == 'literal' && self.labels['x-y'] == 'dashed'",
        "!has(self.labels.__namespace__)",
    ] {
        assert_eq!(evaluate_typed(rule, &value, &s), Ok(true), "{rule}");
    }
    let error = evaluate_typed("self.__unknown__ == 1", &value, &s).unwrap_err();
    assert!(error.contains("no such key: __unknown__"), "{error}");
    // Rules in a schema compile against escaped names too.
    schema(
        json!({"type": "object", "properties": {"x-y": {"type": "integer"}},
        "x-kubernetes-validations": [{"rule": "self.x__dash__y > 0"}]}),
    );
}

#[test]
fn values_are_typed_by_their_schema() {
    let s = schema(json!({"type": "object", "properties": {
        "ratio": {"type": "number"}, "count": {"type": "integer"},
        "created": {"type": "string", "format": "date-time"},
        "day": {"type": "string", "format": "date"},
        "ttl": {"type": "string", "format": "duration"},
        "blob": {"type": "string", "format": "byte"},
        "port": {"x-kubernetes-int-or-string": true},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "order": {"type": "array", "items": {"type": "string"}},
    }}));
    let value = json!({
        "ratio": 2, "count": 3, "created": "2024-02-29T12:30:15Z", "day": "2024-03-01",
        "ttl": "1h30m", "blob": "aGVsbG8=", "port": "http", "tags": ["b", "a"], "order": ["b", "a"],
    });
    for rule in [
        "type(self.ratio) == double && self.ratio == 2 && self.ratio + 0.5 == 2.5",
        "type(self.count) == int",
        "self.created < timestamp('2030-01-01T00:00:00Z') && self.created.getDayOfMonth() == 28",
        "self.day - self.created == duration('11h29m45s')",
        "self.ttl == duration('90m') && self.blob == b'hello'",
        "type(self.port) == string",
        "self.tags == ['a', 'b'] && self.order != ['a', 'b'] && self.order == ['b', 'a']",
    ] {
        assert_eq!(evaluate_typed(rule, &value, &s), Ok(true), "{rule}");
    }
    let broken = json!({"created": "yesterday"});
    let error = evaluate_typed("self.created > timestamp(0)", &broken, &s).unwrap_err();
    assert!(error.contains("invalid date-time"), "{error}");
    assert_eq!(evaluate_typed("has(self.created)", &broken, &s), Ok(true));
}

#[test]
fn optional_old_self() {
    let rule = CompiledRule::compile(
        "!oldSelf.hasValue() || self >= oldSelf.value()",
        Some("'was ' + string(oldSelf.orValue(0))"),
        true,
    )
    .unwrap();
    assert!(rule.is_transition());
    let eval = |value: Json, old: Option<Json>| {
        let old = old.as_ref().map(|old| Input::new(old, None));
        rule.evaluate(&Input::new(&value, None), old.as_ref(), &mut Budget::new())
    };
    assert_eq!(eval(json!(1), None), Ok(true));
    assert_eq!(eval(json!(5), Some(json!(3))), Ok(true));
    assert_eq!(eval(json!(2), Some(json!(3))), Ok(false));
    let old = json!(3);
    let message = rule.message(
        &Input::new(&json!(2), None),
        Some(&Input::new(&old, None)),
        &mut Budget::new(),
    );
    assert_eq!(message, Ok(Some("was 3".into())));
    assert_hold(
        &json!(1),
        &[
            "optional.of(1).value() == 1 && !optional.none().hasValue()",
            "optional.none().orValue(2) == 2 && optional.ofNonZeroValue(0) == optional.none()",
            "optional.none().or(optional.of(3)).value() == 3",
        ],
    );
    assert_errors(
        &json!(1),
        &[(
            "optional.none().value() == 1",
            "optional.none() dereference",
        )],
    );
    // Without optionalOldSelf, oldSelf is the value itself.
    let plain = compile("oldSelf == 3");
    assert_eq!(run(&plain, &json!(1), Some(&json!(3))), Ok(true));
}

/// One budget serves every rule of a request.
#[test]
fn a_budget_spans_evaluations() {
    let rule = compile("self.all(x, x >= 0)");
    let list = json!((0..100).collect::<Vec<_>>());
    let mut budget = Budget::new();
    let mut runs = 0;
    let stop = loop {
        match rule.evaluate(&Input::new(&list, None), None, &mut budget) {
            Ok(true) => runs += 1,
            other => break other,
        }
    };
    assert_eq!(stop, Err(Failure::Stop(Stop::Budget)));
    assert!((10_000..50_000).contains(&runs), "{runs}");
    assert!(budget.remaining() < 1000, "{}", budget.remaining());
}

/// The slow rules of the review: each now stops on cost, at once.
#[test]
fn string_and_pattern_work_is_paid_for() {
    let value = json!({
        "big": "a".repeat(1 << 20), "items": (0..2000).collect::<Vec<_>>(),
        "pattern": "^[a-z]+$", "names": vec!["abc"; 2000],
    });
    for (rule, expected) in [
        (
            "self.items.all(i, self.big.replace('a', 'bb') != '')",
            Err(Failure::Stop(Stop::CallLimit)),
        ),
        (
            "self.items.all(i, self.big.lowerAscii().size() > i)",
            Err(Failure::Stop(Stop::CallLimit)),
        ),
        // A pattern built per item is compiled per item, and paid for.
        (
            "self.items.all(i, !self.big.matches('^b' + string(i)))",
            Err(Failure::Stop(Stop::CallLimit)),
        ),
        // One that is not is compiled once.
        ("self.names.all(n, n.matches(self.pattern))", Ok(true)),
    ] {
        let started = Instant::now();
        let outcome = compile(rule).evaluate(&Input::new(&value, None), None, &mut Budget::new());
        let took = started.elapsed();
        println!("{took:?}: {rule}");
        assert_eq!(outcome, expected, "{rule}");
        assert!(took < Duration::from_millis(100), "{rule}: {took:?}");
    }
}

/// How long a million cost units take, for the cost model's rates: run
/// with `cargo test --release -p tapestry-apiextensions -- --ignored
/// --nocapture cost_calibration`.
#[test]
#[ignore = "a measurement"]
fn cost_calibration() {
    let ints = json!((0..20_000).collect::<Vec<_>>());
    let words = json!((0..20_000).map(|i| format!("word-{i}")).collect::<Vec<_>>());
    let big = json!({"text": "ab1_".repeat(1 << 15), "pattern": "(a|b|c|d){1,300}"});
    for (rule, value) in [
        ("self.all(x, x >= 0 && x < 1000000)", &ints),
        (
            "self.map(x, x * 2).filter(x, x % 3 == 0).size() >= 0",
            &ints,
        ),
        ("self.all(w, w.startsWith('word') && w.size() > 3)", &words),
        ("self.all(w, w.matches('^[a-z]+-[0-9]+$'))", &words),
        (
            "[1, 2].all(i, self.text.replace('a', 'xy').size() > 0)",
            &big,
        ),
        ("[1, 2, 3].all(i, self.text.split('_').size() > 0)", &big),
        (
            "[1, 2].all(i, self.text.matches(self.pattern + string(i)))",
            &big,
        ),
        ("['x', 'y'].all(i, self.text.contains(i))", &big),
    ] {
        let source = rule;
        let rule = compile(source);
        let mut budget = Budget::with_units(u64::MAX);
        let started = Instant::now();
        let mut rounds = 0;
        while started.elapsed() < Duration::from_millis(300) {
            rule.evaluate(&Input::new(value, None), None, &mut budget)
                .unwrap();
            rounds += 1;
        }
        let units = u64::MAX - budget.remaining();
        let per_million = started.elapsed().as_secs_f64() * 1e6 / (units as f64 / 1e6);
        println!("{per_million:>6.0} µs per 10^6 units ({units} in {rounds} runs): {source}");
    }
}

/// Generated expressions over odd values: whatever compiles evaluates to a
/// result, an error or a stop, never a panic.
#[test]
fn random_expressions_never_panic() {
    struct Gen(u64);
    impl Gen {
        fn next(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        fn expr(&mut self, depth: usize) -> String {
            let leaves = [
                "self",
                "oldSelf",
                "x",
                "1",
                "0",
                "-1",
                "1u",
                "2.5",
                "'a'",
                "''",
                "b'x'",
                "true",
                "false",
                "null",
                "[]",
                "{}",
                "self.a",
                "self.b",
                "self.c.d",
                "self.a[0]",
                "self['b']",
                "9223372036854775807",
                "-9223372036854775808",
                "18446744073709551615u",
                "1e308",
                "'1s'",
                "'2024-01-01T00:00:00Z'",
                "'^a+$'",
                "int",
                "string",
                "optional.none()",
                "self.__namespace__",
                "self.x__dash__y",
            ];
            if depth == 0 || self.next(4) == 0 {
                return leaves[self.next(leaves.len())].to_string();
            }
            let a = self.expr(depth - 1);
            let b = self.expr(depth - 1);
            let ops = [
                "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "in",
            ];
            let methods = [
                "size()",
                "contains(B)",
                "startsWith(B)",
                "matches(B)",
                "replace(B, B)",
                "split(B)",
                "substring(B)",
                "substring(B, B)",
                "join()",
                "join(B)",
                "min()",
                "max()",
                "sum()",
                "isSorted()",
                "indexOf(B)",
                "lastIndexOf(B)",
                "charAt(B)",
                "getHours()",
                "getHours(B)",
                "orValue(B)",
                "hasValue()",
                "value()",
                "find(B)",
                "findAll(B)",
                "findAll(B, B)",
                "lowerAscii()",
                "upperAscii()",
                "trim()",
                "all(x, B)",
                "exists(x, B)",
                "exists_one(x, B)",
                "map(x, B)",
                "map(x, B, B)",
                "filter(x, B)",
                "or(B)",
                "getFullYear()",
            ];
            let globals = [
                "size",
                "int",
                "uint",
                "double",
                "string",
                "bytes",
                "bool",
                "dyn",
                "type",
                "duration",
                "timestamp",
                "optional.of",
                "optional.ofNonZeroValue",
                "has",
            ];
            match self.next(10) {
                0 => format!("!{a}"),
                1 => format!("-{a}"),
                2 => format!("({a} ? {b} : {})", self.expr(depth - 1)),
                3 => format!(
                    "({a}).{}",
                    methods[self.next(methods.len())].replace('B', &b)
                ),
                4 => {
                    let f = globals[self.next(globals.len())];
                    if f == "has" {
                        format!("has({a}.f)")
                    } else {
                        format!("{f}({a})")
                    }
                }
                5 => format!("[{a}, {b}]"),
                6 => format!("{{{a}: {b}}}"),
                7 => format!("({a})[{b}]"),
                _ => format!("({a} {} {b})", ops[self.next(ops.len())]),
            }
        }
    }
    let values = [
        json!({"a": [1, 2, {"b": "x"}], "b": "str", "c": {"d": 1.5}, "namespace": "n"}),
        json!([1, "a", null, [true], {"a": -9223372036854775808i64}]),
        json!("aaa"),
        json!(18446744073709551615u64),
        json!(-9223372036854775808i64),
    ];
    let mut gen = Gen(0x9e3779b97f4a7c15);
    let (mut compiled, mut ok, mut errors, mut stops) = (0, 0, 0, 0);
    for round in 0..1500 {
        let source = gen.expr(1 + round % 5);
        for optional in [false, true] {
            let rule = CompiledRule::compile(&source, Some(&source), optional)
                .or_else(|_| CompiledRule::compile(&format!("({source}) != null"), None, optional));
            let Ok(rule) = rule else { continue };
            compiled += 1;
            for (i, value) in values.iter().enumerate() {
                let old = &values[(i + 1) % values.len()];
                let mut budget = Budget::with_units(100_000);
                match rule.evaluate(
                    &Input::new(value, None),
                    Some(&Input::new(old, None)),
                    &mut budget,
                ) {
                    Ok(_) => ok += 1,
                    Err(Failure::Error(_)) => errors += 1,
                    Err(Failure::Stop(_)) => stops += 1,
                }
                let _ = rule.message(
                    &Input::new(value, None),
                    Some(&Input::new(old, None)),
                    &mut budget,
                );
            }
        }
    }
    println!("compiled {compiled}: {ok} results, {errors} errors, {stops} stops");
    assert!(
        compiled > 1000 && ok > 1000 && errors > 1000,
        "{compiled} {ok} {errors}"
    );
}
