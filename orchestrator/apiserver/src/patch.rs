//! Patches and field ownership for the REST handlers, on top of
//! `tapestry-apimachinery`, typed by the served OpenAPI definitions.

use std::sync::Arc;

use serde_json::Value;
use tapestry_apimachinery::{
    self as machinery, ApplyError, FieldManagerOptions, PatchError, PatchSchema,
};

use crate::error::{ApiError, ApiResult, Cause, Target};
use crate::objects::now_rfc3339;
use crate::registry::ResourceDef;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" => Some(PatchKind::Apply),
            _ => None,
        }
    }
}

fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::InvalidPatch { .. } => ApiError::BadRequest(e.to_string()),
        other => ApiError::Invalid {
            target: Target::default(),
            causes: vec![Cause {
                reason: "FieldValueInvalid",
                message: other.to_string(),
                field: String::new(),
            }],
        },
    }
}

fn apply_error(def: &ResourceDef, name: &str, e: ApplyError) -> ApiError {
    let target = Target {
        group: def.group.clone(),
        resource: def.plural.clone(),
        kind: def.kind.clone(),
        name: name.to_string(),
    };
    match e {
        ApplyError::Conflicts(_) => ApiError::Conflict {
            target,
            message: e.to_string(),
        },
        other => ApiError::Invalid {
            target,
            causes: vec![Cause {
                reason: "FieldValueInvalid",
                message: other.to_string(),
                field: String::new(),
            }],
        },
    }
}

/// Patches on views with no type information (the Scale subresource):
/// strategic merge has merge semantics there, as for untyped content.
pub fn apply_untyped(kind: PatchKind, original: &Value, patch: &Value) -> ApiResult<Value> {
    match kind {
        PatchKind::Json => machinery::json_patch(original, patch).map_err(patch_error),
        PatchKind::Merge | PatchKind::Strategic => Ok(machinery::json_merge_patch(original, patch)),
        PatchKind::Apply => Err(ApiError::BadRequest(
            "apply patches are not supported on this subresource".into(),
        )),
    }
}

/// Apply a client patch (not server-side apply) to an object of `def`.
pub fn apply_patch(
    fields: &FieldManagement,
    def: &ResourceDef,
    kind: PatchKind,
    original: &Value,
    patch: &Value,
) -> ApiResult<Value> {
    match kind {
        PatchKind::Strategic => machinery::strategic_merge_patch(
            original,
            patch,
            fields.schema_for(def),
            &def.definition,
        )
        .map_err(patch_error),
        other => apply_untyped(other, original, patch),
    }
}

/// Managed-fields bookkeeping and server-side apply.
#[derive(Clone)]
pub struct FieldManagement {
    schema: Arc<dyn PatchSchema>,
}

fn options(sub: Option<&str>) -> FieldManagerOptions {
    FieldManagerOptions {
        subresource: sub.map(str::to_string),
    }
}

impl FieldManagement {
    pub fn new(schema: Arc<dyn PatchSchema>) -> Self {
        FieldManagement { schema }
    }

    /// The served OpenAPI definitions, which type every built-in kind.
    pub fn builtin_schema(&self) -> Arc<dyn PatchSchema> {
        self.schema.clone()
    }

    /// The field types of `def`: its own (custom resources), or the served
    /// definitions.
    fn schema_for<'a>(&'a self, def: &'a ResourceDef) -> &'a dyn PatchSchema {
        def.patch_schema.as_deref().unwrap_or(self.schema.as_ref())
    }

    /// Give the fields an ordinary write changed to `manager`.
    pub fn record_update(
        &self,
        def: &ResourceDef,
        old: Option<&Value>,
        new: &mut Value,
        manager: &str,
        sub: Option<&str>,
    ) {
        machinery::record_update_with_options(
            old,
            new,
            manager,
            self.schema_for(def),
            &def.definition,
            &now_rfc3339(),
            &options(sub),
        );
    }

    /// Server-side apply of `applied` onto `live` (None: the object is new).
    pub fn apply(
        &self,
        def: &ResourceDef,
        live: Option<&Value>,
        applied: &Value,
        manager: &str,
        force: bool,
        sub: Option<&str>,
    ) -> ApiResult<Value> {
        let name = applied
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        machinery::apply_with_options(
            live,
            applied,
            manager,
            force,
            self.schema_for(def),
            &def.definition,
            &now_rfc3339(),
            &options(sub),
        )
        .map_err(|e| apply_error(def, name, e))
    }
}
