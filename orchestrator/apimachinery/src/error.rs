//! Error types. Messages are meant to be shown to API clients as they are,
//! so they name the path of the offending field where one is known.

use std::fmt::Write as _;

use thiserror::Error;

/// Failure to apply a JSON merge patch, JSON patch or strategic merge patch.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PatchError {
    /// The patch body is not a well-formed patch of its kind.
    #[error("invalid {kind}: {message}")]
    InvalidPatch {
        /// e.g. "JSON patch", "strategic merge patch".
        kind: &'static str,
        message: String,
    },
    /// A JSON patch operation could not be applied to the document.
    #[error("JSON patch operation {index} ({op} {path}) failed: {reason}")]
    OperationFailed {
        /// Zero-based position of the operation in the patch.
        index: usize,
        op: String,
        /// The operation's JSON pointer.
        path: String,
        reason: String,
    },
    /// A JSON patch `test` operation found a different value.
    #[error("JSON patch test operation {index} failed: the value at {path} is not {expected}")]
    TestFailed {
        index: usize,
        path: String,
        /// The expected value as JSON.
        expected: String,
    },
    /// A strategic merge patch that misuses a directive or does not fit the
    /// object's schema (e.g. a list item without its merge key).
    #[error("invalid strategic merge patch at {path}: {message}")]
    Strategic {
        /// Field path such as `.spec.template.spec.containers[1]`.
        path: String,
        message: String,
    },
}

/// `metadata.managedFields` operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// A field that an apply would change although another manager owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager's name, e.g. `kubectl-client-side-apply`.
    pub manager: String,
    pub operation: Operation,
    /// API version the other manager used (shown for `Update` managers).
    pub api_version: String,
    pub subresource: Option<String>,
    /// The field, e.g. `.spec.replicas` or
    /// `.spec.template.spec.containers[name="web"].image`.
    pub path: String,
}

impl Conflict {
    /// How Kubernetes names a manager in conflict messages:
    /// `"kubectl-client-side-apply" using apps/v1` for `Update` managers,
    /// just `"kubectl"` for `Apply` managers.
    pub fn manager_description(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            let _ = write!(s, " with subresource {sub:?}");
        }
        if self.operation == Operation::Update {
            let _ = write!(s, " using {}", self.api_version);
        }
        s
    }

    /// The message of one conflict, as used in a `Status` cause.
    pub fn message(&self) -> String {
        format!("conflict with {}", self.manager_description())
    }
}

/// Failure of a server-side apply.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ApplyError {
    /// Fields owned by other managers would change (HTTP 409). Retry with
    /// `force` to take them over.
    #[error("{}", conflicts_message(.0))]
    Conflicts(Vec<Conflict>),
    /// The applied configuration cannot be applied (HTTP 422/400).
    #[error("invalid apply configuration at {path}: {message}")]
    Invalid { path: String, message: String },
}

/// The message kube-apiserver gives (kubectl shows it verbatim):
/// `Apply failed with 1 conflict: conflict with "m" using apps/v1: .spec.replicas`,
/// or for several, per manager (sorted): `Apply failed with 2 conflicts:
/// conflicts with "m" using apps/v1:\n- .a\n- .b`.
fn conflicts_message(conflicts: &[Conflict]) -> String {
    if let [only] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            only.manager_description(),
            only.path
        );
    }
    let mut sorted: Vec<&Conflict> = conflicts.iter().collect();
    // Stable: paths keep their order within a manager.
    sorted.sort_by(|a, b| {
        (&a.manager, a.operation, &a.api_version, &a.subresource).cmp(&(
            &b.manager,
            b.operation,
            &b.api_version,
            &b.subresource,
        ))
    });
    let mut lines: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for c in sorted {
        let who = c.manager_description();
        if current.as_ref() != Some(&who) {
            lines.push(format!("conflicts with {who}:"));
            current = Some(who);
        }
        lines.push(format!("- {}", c.path));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(manager: &str, op: Operation, path: &str) -> Conflict {
        Conflict {
            manager: manager.into(),
            operation: op,
            api_version: "apps/v1".into(),
            subresource: None,
            path: path.into(),
        }
    }

    #[test]
    fn conflict_messages() {
        let one = ApplyError::Conflicts(vec![c(
            "kubectl-client-side-apply",
            Operation::Update,
            ".spec.replicas",
        )]);
        assert_eq!(
            one.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-client-side-apply\" using apps/v1: .spec.replicas"
        );
        let many = ApplyError::Conflicts(vec![
            c("zed", Operation::Apply, ".a"),
            c("hpa", Operation::Update, ".spec.replicas"),
            c("zed", Operation::Apply, ".b"),
        ]);
        assert_eq!(
            many.to_string(),
            "Apply failed with 3 conflicts: conflicts with \"hpa\" using apps/v1:\n- .spec.replicas\n\
             conflicts with \"zed\":\n- .a\n- .b"
        );
        let mut sub = c("kubelet", Operation::Update, ".status.phase");
        sub.subresource = Some("status".into());
        assert_eq!(
            sub.message(),
            "conflict with \"kubelet\" with subresource \"status\" using apps/v1"
        );
    }
}
