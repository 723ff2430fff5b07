//! Field errors: one invalid field of an object, as kube-apiserver reports
//! it in `Status.details.causes` (its `field.Error`), worded as it words them.

use serde_json::Value;

/// One invalid field, as in `Status.details.causes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`…
    pub reason: &'static str,
    pub message: String,
    /// Field path such as `spec.template.spec.containers[0].image`.
    pub field: String,
}

impl Cause {
    pub fn invalid(field: impl Into<String>, value: &Value, detail: impl AsRef<str>) -> Self {
        let field = field.into();
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {shown}: {}", detail.as_ref()),
            field,
        }
    }

    pub fn required(field: impl Into<String>) -> Self {
        Cause {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: field.into(),
        }
    }

    pub fn required_because(field: impl Into<String>, detail: impl AsRef<str>) -> Self {
        Cause {
            reason: "FieldValueRequired",
            message: format!("Required value: {}", detail.as_ref()),
            field: field.into(),
        }
    }

    pub fn unsupported(field: impl Into<String>, value: &Value, allowed: &[&str]) -> Self {
        let quoted: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {value}: supported values: {}",
                quoted.join(", ")
            ),
            field: field.into(),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Cause {
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {}", detail.into()),
            field: field.into(),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        Cause {
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: {value}"),
            field: field.into(),
        }
    }

    /// A value of the wrong type (`FieldValueTypeInvalid`), e.g. `spec.replicas
    /// in body must be of type integer: "string"`.
    pub fn type_invalid(field: impl Into<String>, value: &Value, detail: impl AsRef<str>) -> Self {
        Cause {
            reason: "FieldValueTypeInvalid",
            ..Cause::invalid(field, value, detail)
        }
    }

    /// A string longer than allowed (`maxLength`, in bytes as Kubernetes counts).
    pub fn too_long(field: impl Into<String>, max: usize) -> Self {
        Cause {
            reason: "FieldValueTooLong",
            message: format!("Too long: may not be more than {max} bytes"),
            field: field.into(),
        }
    }

    /// A list or map with more entries than allowed.
    pub fn too_many(field: impl Into<String>, actual: usize, max: usize, what: &str) -> Self {
        Cause {
            reason: "FieldValueTooMany",
            message: format!("Too many: {actual}: must have at most {max} {what}"),
            field: field.into(),
        }
    }

    pub fn not_found(field: impl Into<String>, value: &Value) -> Self {
        Cause {
            reason: "FieldValueNotFound",
            message: format!("Not found: {value}"),
            field: field.into(),
        }
    }

    pub fn internal(field: impl Into<String>, detail: impl AsRef<str>) -> Self {
        Cause {
            reason: "InternalError",
            message: format!("Internal error: {}", detail.as_ref()),
            field: field.into(),
        }
    }

    /// `field: message`, as kube-apiserver joins causes into the top message.
    pub fn render(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}
