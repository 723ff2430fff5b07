//! `x-kubernetes-validations`: CEL rules compiled once per CRD version and
//! evaluated with `self` (and `oldSelf` for transition rules).
//!
//! (Interface only; the engine is being written.)

use serde_json::Value;

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
#[derive(Debug)]
pub struct CompiledRule {
    _private: (),
}

impl CompiledRule {
    /// Compile `rule` and its `messageExpression`. Anything the engine cannot
    /// evaluate (a syntax error, a function or macro it does not know, an
    /// optional `oldSelf` when it has no optionals) is an error naming it.
    pub fn compile(
        rule: &str,
        message_expression: Option<&str>,
        optional_old_self: bool,
    ) -> Result<CompiledRule, CompileError> {
        let _ = (rule, message_expression, optional_old_self);
        Err(CompileError("CEL rules are not evaluated yet".into()))
    }

    /// Whether the rule reads `oldSelf`: a transition rule, evaluated only on
    /// updates where the old value exists (unless `optionalOldSelf`).
    pub fn is_transition(&self) -> bool {
        false
    }

    /// `Ok(true)` when the value passes; `Err` when evaluation fails (a
    /// runtime error such as a missing field, which Kubernetes reports as
    /// an invalid value with the error).
    pub fn evaluate(&self, self_value: &Value, old_self: Option<&Value>) -> Result<bool, String> {
        let _ = (self_value, old_self);
        Err("CEL rules are not evaluated yet".into())
    }

    /// The `messageExpression`'s message, when there is one and it
    /// evaluates to a non-empty string.
    pub fn message(&self, self_value: &Value, old_self: Option<&Value>) -> Option<String> {
        let _ = (self_value, old_self);
        None
    }
}
