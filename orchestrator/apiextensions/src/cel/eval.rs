//! Evaluation with CEL's semantics: missing keys and indexes out of range
//! are errors, integer arithmetic is checked, `!`, `&&`, `||` and `?:` take
//! bools only, and `&&`, `||` and the macros `all` and `exists` absorb
//! errors as cel-spec says (`false && error` and `error && false` are
//! false; an error stays only when no operand decides). Every node costs a
//! unit and every element a macro visits another, charged to the [`Meter`]
//! as evaluation goes.

use super::check::{Call, Expr, Field, Literal, Macro, MacroKind, Op};
use super::cost::{error, Fault, Meter, Stop};
use super::time;
use super::value::{compare, equal, Bytes, Keys, List, Map, Str, Value};

pub(super) struct Evaluator<'a, 'b> {
    pub(super) self_value: Value<'a>,
    /// `None` when the rule is evaluated without an old value.
    pub(super) old_self: Option<Value<'a>>,
    /// Macro variables, innermost last.
    locals: Vec<Value<'a>>,
    pub(super) meter: Meter<'b>,
}

/// A value, or why it is not a bool: the outcome of an operand that `&&`,
/// `||` or a macro may absorb.
type Truth = Result<bool, String>;

impl<'a, 'b> Evaluator<'a, 'b> {
    pub(super) fn new(meter: Meter<'b>) -> Self {
        Evaluator {
            self_value: Value::Null,
            old_self: None,
            locals: Vec::new(),
            meter,
        }
    }

    /// Take what evaluation spent from the budget.
    pub(super) fn finish(self) {
        self.meter.finish();
    }

    pub(super) fn eval(&mut self, e: &'a Expr) -> Result<Value<'a>, Fault> {
        self.meter.charge(1)?;
        // Arms stay small: this function recurses once per level of the
        // expression, and a debug build gives every arm's locals a slot.
        match e {
            Expr::Literal(literal) => Ok(literal_value(literal)),
            Expr::SelfValue => Ok(self.self_value.clone()),
            Expr::OldSelf => self.old_self.clone().ok_or_else(|| {
                Fault::Error("oldSelf is not available: transition rules need the old value".into())
            }),
            Expr::Local(index) => {
                self.locals.get(*index).cloned().ok_or_else(|| {
                    Fault::Error("a macro variable is read outside its macro".into())
                })
            }
            Expr::Type(t) => Ok(Value::Type(*t)),
            Expr::Select(operand, field) => self.select(operand, field, false),
            Expr::Has(operand, field) => self.select(operand, field, true),
            Expr::Index(container, key) => self.index(container, key),
            Expr::List(items) => self.list(items),
            Expr::Map(entries) => self.map(entries),
            Expr::Not(operand) => self.not(operand),
            Expr::Neg(operand) => self.neg(operand),
            Expr::And(a, b) => self.logic(a, b, false),
            Expr::Or(a, b) => self.logic(a, b, true),
            Expr::Cond(condition, then, otherwise) => self.cond(condition, then, otherwise),
            Expr::Binary(op, a, b) => self.binary(*op, a, b),
            Expr::Call(call) => self.call(call),
            Expr::Macro(m) => self.comprehension(m),
        }
    }

    /// An operand of a logical operator: a CEL error (or a value that is
    /// not a bool) is kept to be absorbed; a stop is not.
    fn truth(&mut self, e: &'a Expr) -> Result<Truth, Stop> {
        match self.eval(e) {
            Ok(Value::Bool(b)) => Ok(Ok(b)),
            Ok(other) => Ok(Err(not_a_bool(&other))),
            Err(Fault::Error(message)) => Ok(Err(message)),
            Err(Fault::Stop(stop)) => Err(stop),
        }
    }

    /// `a && b` (`decisive` false) or `a || b` (`decisive` true): either
    /// operand being the decisive value decides, whatever the other is.
    fn logic(&mut self, a: &'a Expr, b: &'a Expr, decisive: bool) -> Result<Value<'a>, Fault> {
        let left = self.truth(a)?;
        if left == Ok(decisive) {
            return Ok(Value::Bool(decisive));
        }
        match (left, self.truth(b)?) {
            (_, Ok(right)) if right == decisive => Ok(Value::Bool(decisive)),
            (Ok(_), Ok(_)) => Ok(Value::Bool(!decisive)),
            (Err(e), _) | (_, Err(e)) => Err(Fault::Error(e)),
        }
    }

    fn not(&mut self, operand: &'a Expr) -> Result<Value<'a>, Fault> {
        match self.eval(operand)? {
            Value::Bool(b) => Ok(Value::Bool(!b)),
            other => Err(Fault::Error(not_a_bool(&other))),
        }
    }

    fn neg(&mut self, operand: &'a Expr) -> Result<Value<'a>, Fault> {
        match self.eval(operand)? {
            Value::Int(i) => i
                .checked_neg()
                .map(Value::Int)
                .ok_or_else(|| Fault::Error("integer overflow".into())),
            Value::Double(d) => Ok(Value::Double(-d)),
            other => error(format!("no such overload: -{}", other.type_name())),
        }
    }

    fn cond(
        &mut self,
        condition: &'a Expr,
        then: &'a Expr,
        otherwise: &'a Expr,
    ) -> Result<Value<'a>, Fault> {
        match self.eval(condition)? {
            Value::Bool(true) => self.eval(then),
            Value::Bool(false) => self.eval(otherwise),
            other => Err(Fault::Error(not_a_bool(&other))),
        }
    }

    /// `e.f`, or `has(e.f)` when `test`.
    fn select(
        &mut self,
        operand: &'a Expr,
        field: &'a Field,
        test: bool,
    ) -> Result<Value<'a>, Fault> {
        let map = match self.eval(operand)? {
            Value::Map(map) => map,
            other => {
                return error(format!(
                    "no such overload: field selection .{} on {}",
                    field.name,
                    other.type_name()
                ))
            }
        };
        let unescaped = Some(field.unescaped.as_deref());
        if test {
            return map
                .has_field(&field.name, unescaped, &mut self.meter)
                .map(Value::Bool);
        }
        match map.field(&field.name, unescaped, &mut self.meter)? {
            Some(value) => Ok(value),
            None => error(format!("no such key: {}", field.name)),
        }
    }

    fn index(&mut self, container: &'a Expr, key: &'a Expr) -> Result<Value<'a>, Fault> {
        let container = self.eval(container)?;
        let key = self.eval(key)?;
        let found = match (&container, &key) {
            (Value::List(items), Value::Int(_) | Value::Uint(_) | Value::Double(_)) => {
                match list_index(&key) {
                    Some(i) => items.get(i, &mut self.meter)?,
                    None => None,
                }
            }
            (
                Value::Map(map),
                Value::String(_) | Value::Int(_) | Value::Uint(_) | Value::Bool(_),
            ) => map.get(&key, &mut self.meter)?,
            _ => {
                return error(format!(
                    "no such overload: {}[{}]",
                    container.type_name(),
                    key.type_name()
                ))
            }
        };
        found.ok_or_else(|| {
            Fault::Error(match container {
                Value::List(_) => format!("index out of range: {}", key_text(&key)),
                _ => format!("no such key: {}", key_text(&key)),
            })
        })
    }

    fn list(&mut self, items: &'a [Expr]) -> Result<Value<'a>, Fault> {
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            values.push(self.eval(item)?);
        }
        Ok(Value::list(values))
    }

    fn map(&mut self, entries: &'a [(Expr, Expr)]) -> Result<Value<'a>, Fault> {
        let mut map: Vec<(Value<'a>, Value<'a>)> = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let key = self.eval(key)?;
            if !matches!(
                key,
                Value::String(_) | Value::Int(_) | Value::Uint(_) | Value::Bool(_)
            ) {
                return error(format!("unsupported key type: {}", key.type_name()));
            }
            for (existing, _) in &map {
                self.meter.charge(1)?;
                if equal(existing, &key, &mut self.meter, 0)? {
                    return error(format!("Failed with repeated key: {}", key_text(&key)));
                }
            }
            let value = self.eval(value)?;
            map.push((key, value));
        }
        Ok(Value::Map(Map::Built(map.into())))
    }

    fn binary(&mut self, op: Op, a: &'a Expr, b: &'a Expr) -> Result<Value<'a>, Fault> {
        let a = self.eval(a)?;
        let b = self.eval(b)?;
        let meter = &mut self.meter;
        let ordered = |meter: &mut Meter<'_>, test: fn(std::cmp::Ordering) -> bool| {
            // NaN is in no order: every comparison with it is false.
            Ok(Value::Bool(compare(&a, &b, meter)?.is_some_and(test)))
        };
        match op {
            Op::Eq => Ok(Value::Bool(equal(&a, &b, meter, 0)?)),
            Op::Ne => Ok(Value::Bool(!equal(&a, &b, meter, 0)?)),
            Op::Lt => ordered(meter, std::cmp::Ordering::is_lt),
            Op::Le => ordered(meter, std::cmp::Ordering::is_le),
            Op::Gt => ordered(meter, std::cmp::Ordering::is_gt),
            Op::Ge => ordered(meter, std::cmp::Ordering::is_ge),
            Op::In => member(&a, &b, meter),
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Rem => arithmetic(op, a, b, meter),
        }
    }

    fn call(&mut self, call: &'a Call) -> Result<Value<'a>, Fault> {
        let mut args = Vec::with_capacity(call.args.len());
        for arg in &call.args {
            args.push(self.eval(arg)?);
        }
        let function = call.function;
        if !function.arity.contains(&args.len()) {
            return error(format!(
                "no such overload: {} with {} arguments",
                function.name,
                args.len()
            ));
        }
        (function.eval)(&mut self.meter, &args, call.pattern.as_ref())
    }

    fn comprehension(&mut self, m: &'a Macro) -> Result<Value<'a>, Fault> {
        let range = self.eval(&m.range)?;
        let mut items = match &range {
            Value::List(list) => Items::List(list.clone(), 0),
            Value::Map(map) => Items::Keys(Keys::of(map)),
            other => {
                return error(format!(
                    "no such overload: cannot iterate over {}",
                    other.type_name()
                ))
            }
        };
        let mut state = Accumulator {
            error: None,
            count: 0,
            mapped: Vec::new(),
        };
        while let Some(item) = items.next(&mut self.meter)? {
            self.locals.push(item);
            let step = self.step(m, &mut state);
            self.locals.pop();
            if let Some(decided) = step? {
                return Ok(Value::Bool(decided));
            }
        }
        match m.kind {
            MacroKind::All | MacroKind::Exists => match state.error {
                Some(e) => Err(Fault::Error(e)),
                None => Ok(Value::Bool(m.kind == MacroKind::All)),
            },
            MacroKind::ExistsOne => Ok(Value::Bool(state.count == 1)),
            MacroKind::Map => Ok(Value::list(state.mapped)),
        }
    }

    /// One element of a macro; `Some` when it decides the result.
    fn step(&mut self, m: &'a Macro, state: &mut Accumulator<'a>) -> Result<Option<bool>, Fault> {
        match m.kind {
            MacroKind::All | MacroKind::Exists => {
                let decisive = m.kind == MacroKind::Exists;
                match self.truth(&m.body)? {
                    Ok(b) if b == decisive => return Ok(Some(decisive)),
                    Ok(_) => {}
                    Err(e) => {
                        state.error.get_or_insert(e);
                    }
                }
            }
            MacroKind::ExistsOne => {
                if self.strict_bool(&m.body)? {
                    state.count += 1;
                }
            }
            MacroKind::Map => {
                let keep = match &m.filter {
                    Some(filter) => self.strict_bool(filter)?,
                    None => true,
                };
                if keep {
                    let value = self.eval(&m.body)?;
                    self.meter.charge(1)?;
                    state.mapped.push(value);
                }
            }
        }
        Ok(None)
    }

    fn strict_bool(&mut self, e: &'a Expr) -> Result<bool, Fault> {
        match self.eval(e)? {
            Value::Bool(b) => Ok(b),
            other => Err(Fault::Error(not_a_bool(&other))),
        }
    }
}

struct Accumulator<'a> {
    /// The first error `all` or `exists` met, which a decisive element
    /// still overrides.
    error: Option<String>,
    count: usize,
    mapped: Vec<Value<'a>>,
}

/// What a macro iterates: a list's elements or a map's keys.
enum Items<'a> {
    List(List<'a>, usize),
    Keys(Keys<'a>),
}

impl<'a> Items<'a> {
    fn next(&mut self, meter: &mut Meter<'_>) -> Result<Option<Value<'a>>, Fault> {
        meter.charge(1)?;
        match self {
            Items::List(list, at) => {
                let item = list.get(*at, meter)?;
                *at += 1;
                Ok(item)
            }
            Items::Keys(keys) => keys.next().transpose(),
        }
    }
}

fn literal_value(literal: &Literal) -> Value<'_> {
    match literal {
        Literal::Null => Value::Null,
        Literal::Bool(b) => Value::Bool(*b),
        Literal::Int(i) => Value::Int(*i),
        Literal::Uint(u) => Value::Uint(*u),
        Literal::Double(d) => Value::Double(*d),
        Literal::String(s) => Value::String(Str::Borrowed(s)),
        Literal::Bytes(b) => Value::Bytes(Bytes::Borrowed(b)),
    }
}

fn not_a_bool(value: &Value<'_>) -> String {
    format!("no such overload: {} is not a bool", value.type_name())
}

/// A list index: an int, uint or integral double that is not negative.
fn list_index(key: &Value<'_>) -> Option<usize> {
    match key {
        Value::Int(i) => usize::try_from(*i).ok(),
        Value::Uint(u) => usize::try_from(*u).ok(),
        Value::Double(d) if d.fract() == 0.0 && *d >= 0.0 && *d < usize::MAX as f64 => {
            Some(*d as usize)
        }
        _ => None,
    }
}

/// A key as error messages show it.
fn key_text(key: &Value<'_>) -> String {
    match key {
        Value::String(s) => super::functions::truncated(s).to_owned(),
        Value::Int(i) => i.to_string(),
        Value::Uint(u) => u.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.type_name().into(),
    }
}

/// `a in b`.
fn member<'a>(a: &Value<'_>, b: &Value<'_>, meter: &mut Meter<'_>) -> Result<Value<'a>, Fault> {
    match b {
        Value::List(items) => {
            for i in 0..items.len() {
                if let Some(item) = items.get(i, meter)? {
                    if equal(a, &item, meter, 0)? {
                        return Ok(Value::Bool(true));
                    }
                }
            }
            Ok(Value::Bool(false))
        }
        Value::Map(map) => map.contains(a, meter).map(Value::Bool),
        _ => error(format!(
            "no such overload: {} in {}",
            a.type_name(),
            b.type_name()
        )),
    }
}

fn arithmetic<'a>(
    op: Op,
    a: Value<'a>,
    b: Value<'a>,
    meter: &mut Meter<'_>,
) -> Result<Value<'a>, Fault> {
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
    let duration_overflow = || Fault::Error("duration out of range".into());
    match (op, &a, &b) {
        (_, Value::Int(x), Value::Int(y)) => {
            let (x, y) = (*x, *y);
            match op {
                Op::Div if y == 0 => error("division by zero"),
                Op::Rem if y == 0 => error("modulus by zero"),
                _ => match op {
                    Op::Add => x.checked_add(y),
                    Op::Sub => x.checked_sub(y),
                    Op::Mul => x.checked_mul(y),
                    Op::Div => x.checked_div(y),
                    _ => x.checked_rem(y),
                }
                .map(Value::Int)
                .ok_or_else(|| overflow(false)),
            }
        }
        (_, Value::Uint(x), Value::Uint(y)) => {
            let (x, y) = (*x, *y);
            match op {
                Op::Div if y == 0 => error("division by zero"),
                Op::Rem if y == 0 => error("modulus by zero"),
                _ => match op {
                    Op::Add => x.checked_add(y),
                    Op::Sub => x.checked_sub(y),
                    Op::Mul => x.checked_mul(y),
                    Op::Div => x.checked_div(y),
                    _ => x.checked_rem(y),
                }
                .map(Value::Uint)
                .ok_or_else(|| overflow(true)),
            }
        }
        (Op::Add, Value::Double(x), Value::Double(y)) => Ok(Value::Double(x + y)),
        (Op::Sub, Value::Double(x), Value::Double(y)) => Ok(Value::Double(x - y)),
        (Op::Mul, Value::Double(x), Value::Double(y)) => Ok(Value::Double(x * y)),
        (Op::Div, Value::Double(x), Value::Double(y)) => Ok(Value::Double(x / y)),
        (Op::Add, Value::String(x), Value::String(y)) => {
            meter.build(x.len() + y.len())?;
            Ok(Value::string([&**x, &**y].concat()))
        }
        (Op::Add, Value::Bytes(x), Value::Bytes(y)) => {
            meter.build(x.len() + y.len())?;
            Ok(Value::Bytes(Bytes::Shared([&**x, &**y].concat().into())))
        }
        (Op::Add, Value::List(x), Value::List(y)) => {
            meter.charge((x.len() + y.len()) as u64)?;
            let mut items = Vec::with_capacity(x.len() + y.len());
            for list in [x, y] {
                for i in 0..list.len() {
                    items.extend(list.get(i, meter)?);
                }
            }
            Ok(Value::list(items))
        }
        (Op::Add, Value::Timestamp(t), Value::Duration(d))
        | (Op::Add, Value::Duration(d), Value::Timestamp(t)) => time::add(t, *d),
        (Op::Sub, Value::Timestamp(t), Value::Duration(d)) => {
            time::add(t, d.checked_neg().ok_or_else(duration_overflow)?)
        }
        (Op::Sub, Value::Timestamp(x), Value::Timestamp(y)) => time::between(x, y),
        (Op::Add, Value::Duration(x), Value::Duration(y)) => x
            .checked_add(*y)
            .map(Value::Duration)
            .ok_or_else(duration_overflow),
        (Op::Sub, Value::Duration(x), Value::Duration(y)) => x
            .checked_sub(*y)
            .map(Value::Duration)
            .ok_or_else(duration_overflow),
        _ => error(format!(
            "no such overload: {} {} {}",
            a.type_name(),
            op.symbol(),
            b.type_name()
        )),
    }
}
