//! Managed fields (`metadata.managedFields`) and server-side apply.
//!
//! Every write records which manager owns which fields. Ordinary writes
//! (create/update/patch) give the fields they changed to their manager with
//! operation `Update`, taking them from others. An apply owns exactly the
//! fields of its configuration; it conflicts when it would change a field
//! another manager owns, and fields it stops applying are removed unless
//! someone else still owns them.

use std::borrow::Cow;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use crate::error::{ApplyError, Conflict, Operation};
use crate::fieldpath::{field_element, path_string, FieldSet, PathElement};
use crate::schema::{FieldKind, PatchSchema};
use crate::typed::{remove_nulls, Comparison, Shape, Typed};

/// One entry of `metadata.managedFields`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedFieldsEntry {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    /// RFC 3339 time of the entry's last change.
    pub time: Option<String>,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl ManagedFieldsEntry {
    /// Entries are identified by manager, operation and subresource, and for
    /// `Update` also by API version (as Kubernetes does).
    fn is(
        &self,
        manager: &str,
        op: Operation,
        api_version: &str,
        subresource: Option<&str>,
    ) -> bool {
        self.manager == manager
            && self.operation == op
            && self.subresource.as_deref() == subresource
            && (op == Operation::Apply || self.api_version == api_version)
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation.as_str()));
        m.insert("apiVersion".into(), json!(self.api_version));
        if let Some(t) = &self.time {
            m.insert("time".into(), json!(t));
        }
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), self.fields.to_fields_v1());
        if let Some(s) = &self.subresource {
            m.insert("subresource".into(), json!(s));
        }
        Value::Object(m)
    }

    pub fn from_json(v: &Value) -> Result<Self, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let manager = s("manager").unwrap_or_default().to_string();
        let operation = match s("operation") {
            Some("Apply") => Operation::Apply,
            Some("Update") => Operation::Update,
            other => return Err(format!("operation must be Apply or Update, got {other:?}")),
        };
        match s("fieldsType") {
            Some("FieldsV1") | None => {}
            Some(other) => return Err(format!("fieldsType must be FieldsV1, got {other:?}")),
        }
        let fields = match v.get("fieldsV1") {
            None | Some(Value::Null) => FieldSet::new(),
            Some(f) => FieldSet::from_fields_v1(f)?,
        };
        Ok(Self {
            manager,
            operation,
            api_version: s("apiVersion").unwrap_or_default().to_string(),
            time: s("time").map(str::to_string),
            subresource: s("subresource")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            fields,
        })
    }
}

/// Reads `metadata.managedFields` of an object (absent means none).
pub fn decode_managed_fields(obj: &Value) -> Result<Vec<ManagedFieldsEntry>, String> {
    match obj.get("metadata").and_then(|m| m.get("managedFields")) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(entries)) => entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                ManagedFieldsEntry::from_json(e).map_err(|m| format!("managedFields[{i}]: {m}"))
            })
            .collect(),
        Some(_) => Err("managedFields must be a list".to_string()),
    }
}

/// Writes entries in Kubernetes' order (operation, time, manager, ...),
/// dropping empty ones; `None` when nothing is left.
pub fn encode_managed_fields(entries: &[ManagedFieldsEntry]) -> Option<Value> {
    let mut kept: Vec<&ManagedFieldsEntry> =
        entries.iter().filter(|e| !e.fields.is_empty()).collect();
    kept.sort_by(|a, b| {
        (
            a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    (!kept.is_empty())
        .then(|| Value::Array(kept.into_iter().map(ManagedFieldsEntry::to_json).collect()))
}

/// Which part of an object a write covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldManagerOptions {
    /// `None` for the main resource (its `status` is not tracked: the status
    /// subresource owns it); `Some("status")` tracks only `status`. Entries
    /// are recorded with this subresource.
    pub subresource: Option<String>,
}

/// `metadata` fields the server sets; never owned by anyone.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
    "clusterName",
];

impl FieldManagerOptions {
    fn status_only(&self) -> bool {
        self.subresource.as_deref() == Some("status")
    }

    /// Removes untracked paths from a set. [`compare_tracked`] skips the
    /// same top-level fields; the two change together.
    fn strip(&self, set: &mut FieldSet) {
        static UNTRACKED: OnceLock<Vec<Vec<PathElement>>> = OnceLock::new();
        let f = field_element;
        let untracked = UNTRACKED.get_or_init(|| {
            let top = ["apiVersion", "kind"].map(|t| vec![f(t)]);
            let metadata = SERVER_METADATA.iter().map(|m| vec![f("metadata"), f(m)]);
            top.into_iter().chain(metadata).collect()
        });
        if self.status_only() {
            // Every untracked path is outside status.
            set.retain_subtree(&f("status"));
            return;
        }
        let status = [f("status")];
        let dropped = untracked.iter().map(Vec::as_slice).chain([&status[..]]);
        set.remove_subtrees(dropped);
        set.remove(&[f("metadata")]);
    }

    /// The part of an applied configuration this write may change.
    fn scope_applied(&self, applied: &Value) -> Value {
        let Value::Object(m) = applied else {
            return applied.clone();
        };
        let mut out = m.clone();
        if self.status_only() {
            out.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
            if let Some(Value::Object(meta)) = out.get_mut("metadata") {
                meta.retain(|k, _| k == "name" || k == "namespace");
            }
        } else {
            out.shift_remove("status");
        }
        Value::Object(out)
    }
}

fn root_kind(type_name: &str) -> FieldKind {
    FieldKind::Object {
        type_name: type_name.to_string(),
    }
}

fn set_managed_fields(obj: &mut Value, entries: &[ManagedFieldsEntry]) {
    let Value::Object(root) = obj else {
        return;
    };
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(meta) = meta else {
        return;
    };
    match encode_managed_fields(entries) {
        Some(v) => {
            meta.insert("managedFields".into(), v);
        }
        None => {
            meta.shift_remove("managedFields");
        }
    }
}

/// Server-side apply of `applied` (an `application/apply-patch+yaml` body,
/// already converted to JSON) by `manager` onto `live` (None: create).
/// Returns the new object with updated `metadata.managedFields`.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    schema: &dyn PatchSchema,
    type_name: &str,
    now_rfc3339: &str,
) -> Result<Value, ApplyError> {
    apply_with_options(
        live,
        applied,
        manager,
        force,
        schema,
        type_name,
        now_rfc3339,
        &FieldManagerOptions::default(),
    )
}

/// [`apply`] for a subresource (see [`FieldManagerOptions`]).
#[allow(clippy::too_many_arguments)]
pub fn apply_with_options(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    schema: &dyn PatchSchema,
    type_name: &str,
    now_rfc3339: &str,
    options: &FieldManagerOptions,
) -> Result<Value, ApplyError> {
    let invalid = |path: &str, message: String| ApplyError::Invalid {
        path: path.to_string(),
        message,
    };
    if !applied.is_object() {
        return Err(invalid(
            ".",
            format!(
                "expected an object, got {}",
                crate::json::type_name(applied)
            ),
        ));
    }
    if manager.is_empty() {
        return Err(invalid(
            ".",
            "a field manager is required for apply".to_string(),
        ));
    }
    match applied.get("metadata").and_then(|m| m.get("managedFields")) {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(invalid(
                ".metadata.managedFields",
                "must be nil".to_string(),
            ))
        }
    }
    let typed = Typed { schema };
    let kind = root_kind(type_name);
    let subresource = options.subresource.as_deref();

    let config = options.scope_applied(&remove_nulls(applied));
    typed
        .validate(&config, Some(&kind), &mut Vec::new())
        .map_err(|(p, m)| invalid(&p, m))?;
    let mut applied_set = FieldSet::new();
    typed.leaf_set(&config, Some(&kind), &mut Vec::new(), &mut applied_set);
    options.strip(&mut applied_set);

    let live = match live {
        Some(v @ Value::Object(_)) => v.clone(),
        _ => Value::Object(Map::new()),
    };
    let mut entries = decode_managed_fields(&live).unwrap_or_default();
    if entries.is_empty() && live.as_object().is_some_and(|m| !m.is_empty()) {
        // An object nobody tracked yet: its fields belong to a placeholder
        // manager, so the first apply cannot silently overwrite them.
        let mut seeded = live.clone();
        record_update_with_options(
            None,
            &mut seeded,
            BEFORE_FIRST_APPLY,
            schema,
            type_name,
            now_rfc3339,
            options,
        );
        entries = decode_managed_fields(&seeded).unwrap_or_default();
    }
    let mut merged = typed.merge(&live, &config, Some(&kind));

    let mut cmp = Comparison::default();
    typed.compare(
        Some(&live),
        Some(&merged),
        Some(&kind),
        &mut Vec::new(),
        &mut cmp,
    );
    let (changed, removed) = write_changes(cmp, options);

    let mine = |e: &ManagedFieldsEntry| e.is(manager, Operation::Apply, "", subresource);
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| !mine(e)) {
        for p in e.fields.intersection(&changed).paths() {
            conflicts.push(Conflict {
                manager: e.manager.clone(),
                operation: e.operation,
                api_version: e.api_version.clone(),
                subresource: e.subresource.clone(),
                path: path_string(&p),
            });
        }
    }
    if !conflicts.is_empty() && !force && manager == KUBECTL {
        // `kubectl apply --server-side` after client-side apply: fields the
        // last-applied annotation still describes were the user's, so they
        // may be taken over without conflict.
        let allowed = last_applied_fields(&typed, &live, &config, &kind);
        conflicts.retain(|c| !allowed.contains(&c.path));
    }
    if !conflicts.is_empty() && !force {
        return Err(ApplyError::Conflicts(conflicts));
    }

    // Forced (or conflict-free): the applier takes the changed fields.
    hand_over(&mut entries, mine, &changed, &removed);
    let api_version = config
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let prior = entries.iter().position(mine).map(|i| entries.remove(i));
    // A no-op apply keeps the entry's time, so the object stays unchanged
    // (no new resourceVersion for re-applying the same configuration).
    let time = match &prior {
        Some(p)
            if p.fields == applied_set
                && p.api_version == api_version
                && changed.is_empty()
                && removed.is_empty() =>
        {
            p.time.clone()
        }
        _ => Some(now_rfc3339.to_string()),
    };
    let previous = prior.map(|p| p.fields).unwrap_or_default();
    entries.push(ManagedFieldsEntry {
        manager: manager.to_string(),
        operation: Operation::Apply,
        api_version,
        time,
        subresource: options.subresource.clone(),
        fields: applied_set,
    });

    // Fields this manager applied before and no longer does go away,
    // unless some manager still owns them or something below them.
    let owned = entries
        .iter()
        .fold(FieldSet::new(), |acc, e| acc.union(&e.fields));
    let dropped = previous.difference(&owned);
    for p in dropped.paths() {
        if !owned.contains_prefix(&p) && !is_key_field(&p) {
            typed.remove_path(&mut merged, &p, Some(&kind));
        }
    }

    if manager == KUBECTL && has_last_applied(&merged) {
        sync_last_applied(&mut merged, applied);
    }
    set_managed_fields(&mut merged, &entries);
    Ok(merged)
}

/// The field manager name `kubectl apply --server-side` uses by default.
const KUBECTL: &str = "kubectl";
/// Owner of the fields of an object that had no managed fields at its
/// first apply.
const BEFORE_FIRST_APPLY: &str = "before-first-apply";
/// Client-side apply's record of the last applied configuration.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Kubernetes' limit on the total size of an object's annotations.
const ANNOTATIONS_SIZE_LIMIT: usize = 256 * 1024;

fn last_applied(obj: &Value) -> Option<&str> {
    obj.get("metadata")?
        .get("annotations")?
        .get(LAST_APPLIED_ANNOTATION)?
        .as_str()
        .filter(|s| !s.is_empty())
}

fn has_last_applied(obj: &Value) -> bool {
    last_applied(obj).is_some()
}

/// Human paths of the fields in `live`'s last-applied annotation whose
/// values the live object still has (empty when there is no usable
/// annotation, or it was written for another API version).
fn last_applied_fields(
    typed: &Typed,
    live: &Value,
    config: &Value,
    kind: &FieldKind,
) -> std::collections::HashSet<String> {
    let Some(text) = last_applied(live) else {
        return Default::default();
    };
    let Ok(la @ Value::Object(_)) = serde_json::from_str::<Value>(text) else {
        return Default::default();
    };
    if la.get("apiVersion") != config.get("apiVersion") {
        return Default::default();
    }
    let la = remove_nulls(&la);
    let mut set = FieldSet::new();
    typed.leaf_set(&la, Some(kind), &mut Vec::new(), &mut set);
    let mut cmp = Comparison::default();
    typed.compare(Some(&la), Some(live), Some(kind), &mut Vec::new(), &mut cmp);
    let differing = cmp.modified.union(&cmp.added).union(&cmp.removed);
    set.difference(&differing)
        .paths()
        .iter()
        .map(|p| path_string(p))
        .collect()
}

/// Keeps the last-applied annotation in step with server-side applies by
/// `kubectl`, so going back to client-side apply computes the right patch.
fn sync_last_applied(obj: &mut Value, applied: &Value) {
    let mut config = crate::fieldpath::canonical(applied);
    if let Some(Value::Object(a)) = config
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
    {
        a.shift_remove(LAST_APPLIED_ANNOTATION);
    }
    // Compact JSON with sorted keys and a final newline, as Kubernetes writes it.
    let text = format!("{config}\n");
    let Some(Value::Object(annotations)) = obj
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
    else {
        return;
    };
    annotations.insert(LAST_APPLIED_ANNOTATION.to_string(), Value::String(text));
    let size: usize = annotations
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if size > ANNOTATIONS_SIZE_LIMIT {
        annotations.shift_remove(LAST_APPLIED_ANNOTATION);
    }
}

/// Records an ordinary write (create, update, patch) by `manager`: the
/// fields that differ between `old` (None: create) and `new` become owned by
/// `manager` with operation `Update` and leave other managers' sets. Writes
/// the result into `new`'s `metadata.managedFields`.
///
/// If `new` carries its own non-empty `managedFields` (a client editing
/// them, as `kubectl apply --server-side` does when it migrates
/// client-side-apply ownership), they are the starting point; a single
/// empty entry (`[{}]`) resets them. Otherwise `old`'s are kept, so clients
/// that drop the field do not wipe ownership.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    schema: &dyn PatchSchema,
    type_name: &str,
    now_rfc3339: &str,
) {
    record_update_with_options(
        old,
        new,
        manager,
        schema,
        type_name,
        now_rfc3339,
        &FieldManagerOptions::default(),
    )
}

/// [`record_update`] for a subresource (see [`FieldManagerOptions`]).
pub fn record_update_with_options(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    schema: &dyn PatchSchema,
    type_name: &str,
    now_rfc3339: &str,
    options: &FieldManagerOptions,
) {
    if !new.is_object() {
        return;
    }
    let mut old: Cow<'_, Value> = match old {
        Some(o @ Value::Object(_)) => Cow::Borrowed(o),
        _ => Cow::Owned(Value::Object(Map::new())),
    };
    let mut entries = base_entries(&old, new);
    // Top-level objects (metadata, spec, ...) always exist in Kubernetes'
    // typed objects, so creating them is not "adding" them: seed them empty
    // to avoid owning `.spec` itself. An update usually has them all, and
    // then the old object is compared where it is, without a copy.
    if let Value::Object(n) = &*new {
        let missing: Vec<&String> = n
            .iter()
            .filter(|(k, v)| v.is_object() && old.get(k.as_str()).is_none())
            .map(|(k, _)| k)
            .collect();
        if !missing.is_empty() {
            if let Value::Object(o) = old.to_mut() {
                for k in missing {
                    o.insert(k.clone(), Value::Object(Map::new()));
                }
            }
        }
    }
    let old = &*old;

    let typed = Typed { schema };
    let kind = root_kind(type_name);
    let mut cmp = Comparison::default();
    compare_tracked(&typed, old, new, &kind, options, &mut cmp);
    let (changed, removed) = write_changes(cmp, options);

    let api_version = new
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let subresource = options.subresource.as_deref();
    let mine = |e: &ManagedFieldsEntry| e.is(manager, Operation::Update, &api_version, subresource);
    hand_over(&mut entries, mine, &changed, &removed);
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| mine(e)) {
            Some(e) => {
                e.fields.union_in(&changed);
                e.fields.remove_all(&removed);
                e.time = Some(now_rfc3339.to_string());
            }
            None => entries.push(ManagedFieldsEntry {
                manager: manager.to_string(),
                operation: Operation::Update,
                api_version,
                time: Some(now_rfc3339.to_string()),
                subresource: options.subresource.clone(),
                fields: changed,
            }),
        }
    }
    cap_update_managers(&mut entries);
    set_managed_fields(new, &entries);
}

/// Most `Update` entries kept; older ones are folded into one entry.
const MAX_UPDATE_MANAGERS: usize = 10;
/// The manager that holds the folded entries, as in Kubernetes.
const ANCIENT_CHANGES: &str = "ancient-changes";

/// The comparison of `old` and `new` as far as [`write_changes`] keeps it:
/// a status write only compares `status`, any other write all but it.
/// (Walking the untracked part was a third of the comparison of a status
/// update, whose spec and metadata are those of the stored object.)
fn compare_tracked(
    typed: &Typed<'_>,
    old: &Value,
    new: &Value,
    kind: &FieldKind,
    options: &FieldManagerOptions,
    out: &mut Comparison,
) {
    // Two objects of the same kind have the same shape.
    match (old, new) {
        (Value::Object(o), Value::Object(n))
            if matches!(typed.shape(Some(kind), old), Shape::Struct) =>
        {
            let status_only = options.status_only();
            let tracked = |k: &str| (k == "status") == status_only;
            typed.compare_fields(o, n, Some(kind), tracked, &mut Vec::new(), out);
        }
        _ => typed.compare(Some(old), Some(new), Some(kind), &mut Vec::new(), out),
    }
}

/// The fields a write set (modified or added) and those it removed, less
/// the untracked ones and those outside the write's subresource.
fn write_changes(mut cmp: Comparison, options: &FieldManagerOptions) -> (FieldSet, FieldSet) {
    let mut changed = std::mem::take(&mut cmp.modified);
    changed.union_in(&cmp.added);
    options.strip(&mut changed);
    options.strip(&mut cmp.removed);
    (changed, cmp.removed)
}

/// Every other manager loses the fields the writer changed; nobody keeps
/// a removed one.
fn hand_over(
    entries: &mut [ManagedFieldsEntry],
    is_writer: impl Fn(&ManagedFieldsEntry) -> bool,
    changed: &FieldSet,
    removed: &FieldSet,
) {
    for e in entries.iter_mut() {
        if !is_writer(e) {
            e.fields.remove_all(changed);
        }
        e.fields.remove_all(removed);
    }
}

/// Keeps objects from growing without bound when many distinct managers
/// write them: beyond [`MAX_UPDATE_MANAGERS`] `Update` entries, the oldest
/// are merged into a single `ancient-changes` entry.
fn cap_update_managers(entries: &mut Vec<ManagedFieldsEntry>) {
    let updates = entries
        .iter()
        .filter(|e| e.operation == Operation::Update && !e.fields.is_empty())
        .count();
    if updates <= MAX_UPDATE_MANAGERS {
        return;
    }
    let mut idx: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].operation == Operation::Update && !entries[i].fields.is_empty())
        .collect();
    idx.sort_by(|&a, &b| entries[a].time.cmp(&entries[b].time));
    let fold: Vec<usize> = idx[..updates - MAX_UPDATE_MANAGERS + 1].to_vec();
    let mut ancient = ManagedFieldsEntry {
        manager: ANCIENT_CHANGES.to_string(),
        operation: Operation::Update,
        api_version: String::new(),
        time: None,
        subresource: None,
        fields: FieldSet::new(),
    };
    for &i in &fold {
        let e = &entries[i];
        ancient.fields.union_in(&e.fields);
        // Oldest first, so the newest folded version and time win.
        ancient.api_version = e.api_version.clone();
        ancient.time = e.time.clone();
    }
    let mut i = 0;
    entries.retain(|_| {
        let keep = !fold.contains(&i);
        i += 1;
        keep
    });
    entries.push(ancient);
}

/// Whether `path` ends at a key field of a map-list item (`...k:{"name":"a"}, f:name`):
/// an item that stays must keep its key, whoever owned it.
fn is_key_field(path: &[PathElement]) -> bool {
    let [.., item, field] = path else {
        return false;
    };
    let (Some(keys), Some(name)) = (item.strip_prefix("k:"), field.strip_prefix("f:")) else {
        return false;
    };
    serde_json::from_str::<Map<String, Value>>(keys).is_ok_and(|k| k.contains_key(name))
}

fn base_entries(old: &Value, new: &Value) -> Vec<ManagedFieldsEntry> {
    let given = new.get("metadata").and_then(|m| m.get("managedFields"));
    if let Some(Value::Array(a)) = given {
        if a.len() == 1 && a[0].as_object().is_some_and(|o| o.is_empty()) {
            return Vec::new();
        }
        if !a.is_empty() {
            if let Ok(entries) = decode_managed_fields(new) {
                return entries;
            }
        }
    }
    decode_managed_fields(old).unwrap_or_default()
}

/// The paths a manager owns, in human form (`.spec.replicas`), for
/// diagnostics and tests.
pub fn owned_paths(obj: &Value, manager: &str) -> Vec<String> {
    decode_managed_fields(obj)
        .unwrap_or_default()
        .iter()
        .filter(|e| e.manager == manager)
        .flat_map(|e| e.fields.paths())
        .map(|p: Vec<PathElement>| path_string(&p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testschema::TestSchema;
    use serde_json::json;

    const DEPLOY: &str = "io.k8s.api.apps.v1.Deployment";
    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";
    const T2: &str = "2026-01-01T00:02:00Z";

    fn config(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "web", "image": image}]}}
            }
        })
    }

    fn apply_ok(live: Option<&Value>, cfg: &Value, manager: &str, now: &str) -> Value {
        apply(live, cfg, manager, false, &TestSchema, DEPLOY, now).unwrap()
    }

    fn entry<'a>(obj: &'a Value, manager: &str) -> &'a Value {
        obj["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == manager)
            .unwrap_or_else(|| panic!("no entry for {manager} in {obj}"))
    }

    /// A create through an ordinary write (e.g. client-side `kubectl apply`).
    fn created_by(manager: &str, obj: Value) -> Value {
        let mut obj = obj;
        record_update(None, &mut obj, manager, &TestSchema, DEPLOY, T0);
        obj
    }

    #[test]
    fn apply_create_records_fields_v1() {
        let obj = apply_ok(None, &config(1, "nginx:1"), "kubectl", T0);
        assert_eq!(obj["spec"]["replicas"], 1);
        let e = entry(&obj, "kubectl");
        assert_eq!(e["operation"], "Apply");
        assert_eq!(e["apiVersion"], "apps/v1");
        assert_eq!(e["time"], T0);
        assert_eq!(e["fieldsType"], "FieldsV1");
        assert_eq!(
            e["fieldsV1"],
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}
                    }
                }
            })
        );
        // Re-applying the same configuration changes nothing at all.
        let again = apply_ok(Some(&obj), &config(1, "nginx:1"), "kubectl", T1);
        assert_eq!(again, obj);
        // A changed configuration updates the time.
        let changed = apply_ok(Some(&obj), &config(2, "nginx:1"), "kubectl", T1);
        assert_eq!(entry(&changed, "kubectl")["time"], T1);
    }

    #[test]
    fn conflict_with_update_manager_and_message() {
        let live = created_by("kubectl-client-side-apply", config(1, "nginx:1"));
        let err = apply(
            Some(&live),
            &config(3, "nginx:1"),
            "kubectl",
            false,
            &TestSchema,
            DEPLOY,
            T1,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-client-side-apply\" using apps/v1: .spec.replicas"
        );
        let ApplyError::Conflicts(cs) = err else {
            panic!()
        };
        assert_eq!(cs[0].manager, "kubectl-client-side-apply");
        assert_eq!(cs[0].operation, Operation::Update);
        assert_eq!(cs[0].path, ".spec.replicas");

        let err = apply(
            Some(&live),
            &config(3, "nginx:2"),
            "kubectl",
            false,
            &TestSchema,
            DEPLOY,
            T1,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 2 conflicts: conflicts with \"kubectl-client-side-apply\" using apps/v1:\n\
             - .spec.replicas\n- .spec.template.spec.containers[name=\"web\"].image"
        );
    }

    #[test]
    fn client_side_to_server_side_apply_shares_ownership() {
        let live = created_by("kubectl-client-side-apply", config(1, "nginx:1"));
        let obj = apply_ok(Some(&live), &config(1, "nginx:1"), "kubectl", T1);
        let csa = owned_paths(&obj, "kubectl-client-side-apply");
        let ssa = owned_paths(&obj, "kubectl");
        assert!(csa.contains(&".spec.replicas".to_string()), "{csa:?}");
        assert!(ssa.contains(&".spec.replicas".to_string()), "{ssa:?}");
        // Apply entries sort before Update entries.
        assert_eq!(obj["metadata"]["managedFields"][0]["manager"], "kubectl");
        // Update entries created from a zero object own new maps/items too.
        assert!(csa.contains(&".metadata.labels".to_string()), "{csa:?}");
        assert!(!csa.contains(&".spec".to_string()), "{csa:?}");
        assert!(
            csa.contains(&".spec.template.spec.containers[name=\"web\"]".to_string()),
            "{csa:?}"
        );
        assert!(
            !csa.iter()
                .any(|p| p.contains("managedFields") || p == ".metadata.name"),
            "{csa:?}"
        );
    }

    #[test]
    fn client_side_apply_upgrade_via_managed_fields_patch() {
        // kubectl rewrites managedFields (JSON patch) to hand the
        // client-side-apply fields to its server-side manager.
        let live = created_by("kubectl-client-side-apply", config(1, "nginx:1"));
        let mut patched = live.clone();
        let mut entries = decode_managed_fields(&live).unwrap();
        entries[0].manager = "kubectl".into();
        entries[0].operation = Operation::Apply;
        patched["metadata"]["managedFields"] = encode_managed_fields(&entries).unwrap();
        record_update(
            Some(&live),
            &mut patched,
            "kubectl-patch",
            &TestSchema,
            DEPLOY,
            T1,
        );
        let mf = patched["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(mf.len(), 1);
        assert_eq!(mf[0]["manager"], "kubectl");
        assert_eq!(mf[0]["operation"], "Apply");
        // Now the server-side apply owns and may change everything.
        let obj = apply_ok(Some(&patched), &config(5, "nginx:2"), "kubectl", T2);
        assert_eq!(obj["spec"]["replicas"], 5);
        assert_eq!(
            obj["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn force_moves_ownership() {
        let live = created_by("kubectl-client-side-apply", config(1, "nginx:1"));
        let obj = apply(
            Some(&live),
            &config(3, "nginx:1"),
            "kubectl",
            true,
            &TestSchema,
            DEPLOY,
            T1,
        )
        .unwrap();
        assert_eq!(obj["spec"]["replicas"], 3);
        assert!(
            !owned_paths(&obj, "kubectl-client-side-apply").contains(&".spec.replicas".to_string())
        );
        assert!(owned_paths(&obj, "kubectl").contains(&".spec.replicas".to_string()));
        // The image was equal: still shared.
        let img = ".spec.template.spec.containers[name=\"web\"].image".to_string();
        assert!(owned_paths(&obj, "kubectl-client-side-apply").contains(&img));
        assert!(owned_paths(&obj, "kubectl").contains(&img));
    }

    #[test]
    fn update_takes_ownership_then_apply_conflicts() {
        let obj = apply_ok(None, &config(1, "nginx:1"), "kubectl", T0);
        // A controller scales the deployment with an ordinary update.
        let mut scaled = obj.clone();
        scaled["spec"]["replicas"] = json!(4);
        record_update(Some(&obj), &mut scaled, "hpa", &TestSchema, DEPLOY, T1);
        assert_eq!(owned_paths(&scaled, "hpa"), vec![".spec.replicas"]);
        assert!(!owned_paths(&scaled, "kubectl").contains(&".spec.replicas".to_string()));
        let e = entry(&scaled, "hpa");
        assert_eq!(
            (e["operation"].as_str(), e["time"].as_str()),
            (Some("Update"), Some(T1))
        );
        assert_eq!(entry(&scaled, "kubectl")["time"], T0);

        let err = apply(
            Some(&scaled),
            &config(1, "nginx:1"),
            "kubectl",
            false,
            &TestSchema,
            DEPLOY,
            T2,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"hpa\" using apps/v1: .spec.replicas"
        );
        // Dropping replicas from the config avoids the conflict and keeps the value.
        let mut cfg = config(1, "nginx:1");
        cfg["spec"]
            .as_object_mut()
            .unwrap()
            .shift_remove("replicas");
        let obj = apply_ok(Some(&scaled), &cfg, "kubectl", T2);
        assert_eq!(obj["spec"]["replicas"], 4);
    }

    #[test]
    fn conflicts_between_appliers() {
        let obj = apply_ok(None, &config(1, "nginx:1"), "alice", T0);
        // Same values: shared, no conflict.
        let obj = apply_ok(Some(&obj), &config(1, "nginx:1"), "bob", T1);
        assert!(owned_paths(&obj, "bob").contains(&".spec.replicas".to_string()));
        let err = apply(
            Some(&obj),
            &config(2, "nginx:1"),
            "bob",
            false,
            &TestSchema,
            DEPLOY,
            T2,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"alice\": .spec.replicas"
        );
        // Bob's own previous apply never conflicts with bob.
        let mut cfg = config(1, "nginx:1");
        cfg["metadata"]["labels"]["bob"] = json!("yes");
        let obj = apply_ok(Some(&obj), &cfg, "bob", T2);
        let mut cfg2 = config(1, "nginx:1");
        cfg2["metadata"]["labels"]["bob"] = json!("changed");
        let obj = apply_ok(Some(&obj), &cfg2, "bob", T2);
        assert_eq!(obj["metadata"]["labels"]["bob"], "changed");
    }

    #[test]
    fn fields_no_longer_applied_are_removed_unless_owned() {
        let mut cfg = config(1, "nginx:1");
        cfg["metadata"]["labels"]["extra"] = json!("x");
        cfg["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "sidecar", "image": "envoy", "args": ["a"]}));
        let obj = apply_ok(None, &cfg, "kubectl", T0);
        // The server defaults a field in the sidecar; nobody owns it.
        let mut live = obj.clone();
        live["spec"]["template"]["spec"]["containers"][1]["imagePullPolicy"] = json!("Always");

        let obj = apply_ok(Some(&live), &config(1, "nginx:1"), "kubectl", T1);
        assert_eq!(obj["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(
            obj["spec"]["template"]["spec"]["containers"],
            json!([{"name": "web", "image": "nginx:1"}])
        );
        assert!(!owned_paths(&obj, "kubectl")
            .iter()
            .any(|p| p.contains("sidecar") || p.contains("extra")));

        // A field another manager also owns stays.
        let obj = apply_ok(None, &cfg, "kubectl", T0);
        let mut labelled = obj.clone();
        labelled["metadata"]["labels"]["extra"] = json!("y");
        record_update(
            Some(&obj),
            &mut labelled,
            "labeller",
            &TestSchema,
            DEPLOY,
            T1,
        );
        let obj = apply_ok(Some(&labelled), &config(1, "nginx:1"), "kubectl", T2);
        assert_eq!(
            obj["metadata"]["labels"],
            json!({"app": "web", "extra": "y"})
        );
        // A container stays if another manager owns a field inside it.
        let mut live = apply_ok(None, &cfg, "kubectl", T0);
        let before = live.clone();
        live["spec"]["template"]["spec"]["containers"][1]["image"] = json!("envoy:2");
        record_update(Some(&before), &mut live, "editor", &TestSchema, DEPLOY, T1);
        let obj = apply_ok(Some(&live), &config(1, "nginx:1"), "kubectl", T2);
        let cs = &obj["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            cs[1],
            json!({"name": "sidecar", "image": "envoy:2"}),
            "{cs}"
        );
    }

    #[test]
    fn sets_merge_by_value() {
        let base =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}});
        let mut a = base.clone();
        a["metadata"]["finalizers"] = json!(["a"]);
        let mut b = base.clone();
        b["metadata"]["finalizers"] = json!(["b"]);
        let obj = apply_ok(None, &a, "ma", T0);
        let obj = apply_ok(Some(&obj), &b, "mb", T1);
        assert_eq!(obj["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            owned_paths(&obj, "mb"),
            vec![".metadata.finalizers[=\"b\"]"]
        );
        let obj = apply_ok(Some(&obj), &base, "ma", T2);
        assert_eq!(obj["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(
            entry(&obj, "mb")["fieldsV1"],
            json!({"f:metadata": {"f:finalizers": {"v:\"b\"": {}}}})
        );
    }

    #[test]
    fn map_list_keys_use_schema_defaults() {
        let mut cfg = config(1, "nginx:1");
        cfg["spec"]["template"]["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80}]);
        let obj = apply_ok(None, &cfg, "kubectl", T0);
        // The server defaults the protocol; the next apply matches the item.
        let mut live = obj.clone();
        live["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = json!("TCP");
        let obj = apply_ok(Some(&live), &cfg, "kubectl", T1);
        assert_eq!(
            obj["spec"]["template"]["spec"]["containers"][0]["ports"],
            json!([{"containerPort": 80, "protocol": "TCP"}])
        );
        assert!(owned_paths(&obj, "kubectl").contains(
            &".spec.template.spec.containers[name=\"web\"].ports[containerPort=80,protocol=\"TCP\"]".to_string()
        ));
    }

    #[test]
    fn atomic_values_conflict_as_a_whole() {
        let mut cfg = config(1, "nginx:1");
        cfg["spec"]["template"]["spec"]["tolerations"] =
            json!([{"key": "a", "operator": "Exists"}]);
        let live = created_by("creator", cfg.clone());
        cfg["spec"]["template"]["spec"]["tolerations"] =
            json!([{"key": "b", "operator": "Exists"}]);
        cfg["spec"]["selector"]["matchLabels"]["x"] = json!("y");
        let err = apply(Some(&live), &cfg, "kubectl", false, &TestSchema, DEPLOY, T1).unwrap_err();
        let ApplyError::Conflicts(cs) = err else {
            panic!()
        };
        let paths: Vec<&str> = cs.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, [".spec.selector", ".spec.template.spec.tolerations"]);
    }

    #[test]
    fn atomic_map_fields_are_owned_and_replaced_whole() {
        let mut cfg = config(1, "nginx:1");
        cfg["spec"]["template"]["spec"]["nodeSelector"] = json!({"disk": "ssd"});
        let live = created_by("creator", cfg.clone());
        cfg["spec"]["template"]["spec"]["nodeSelector"] = json!({"zone": "a"});
        // A granular map would just gain a key; an atomic one changes whole.
        let err = apply(Some(&live), &cfg, "kubectl", false, &TestSchema, DEPLOY, T1).unwrap_err();
        let ApplyError::Conflicts(cs) = err else {
            panic!()
        };
        let paths: Vec<&str> = cs.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, [".spec.template.spec.nodeSelector"]);

        let obj = apply(Some(&live), &cfg, "kubectl", true, &TestSchema, DEPLOY, T1).unwrap();
        assert_eq!(
            obj["spec"]["template"]["spec"]["nodeSelector"],
            json!({"zone": "a"})
        );
        assert_eq!(
            entry(&obj, "kubectl")["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:nodeSelector"],
            json!({})
        );
        assert!(!owned_paths(&obj, "creator")
            .iter()
            .any(|p| p.starts_with(".spec.template.spec.nodeSelector")));

        // Strategic merge patch still merges it key by key.
        let patched = crate::strategic_merge_patch(
            &obj,
            &json!({"spec": {"template": {"spec": {"nodeSelector": {"disk": "ssd"}}}}}),
            &TestSchema,
            DEPLOY,
        )
        .unwrap();
        assert_eq!(
            patched["spec"]["template"]["spec"]["nodeSelector"],
            json!({"zone": "a", "disk": "ssd"})
        );
    }

    #[test]
    fn status_is_not_tracked_on_the_main_resource() {
        let mut cfg = config(1, "nginx:1");
        cfg["status"] = json!({"replicas": 9});
        let mut live = apply_ok(None, &config(1, "nginx:1"), "kubectl", T0);
        live["status"] = json!({"replicas": 1});
        let obj = apply_ok(Some(&live), &cfg, "kubectl", T1);
        assert_eq!(obj["status"], json!({"replicas": 1}));
        assert!(!owned_paths(&obj, "kubectl")
            .iter()
            .any(|p| p.starts_with(".status")));

        // Status writes through the status subresource are tracked there.
        let mut new = obj.clone();
        new["status"] =
            json!({"replicas": 2, "conditions": [{"type": "Available", "status": "True"}]});
        new["spec"]["replicas"] = json!(7); // ignored for ownership by the status scope
        let opts = FieldManagerOptions {
            subresource: Some("status".into()),
        };
        record_update_with_options(
            Some(&obj),
            &mut new,
            "controller",
            &TestSchema,
            DEPLOY,
            T2,
            &opts,
        );
        let e = entry(&new, "controller");
        assert_eq!(e["subresource"], "status");
        assert_eq!(
            e["fieldsV1"],
            json!({"f:status": {"f:conditions": {".": {}, "k:{\"type\":\"Available\"}": {".": {}, "f:status": {}, "f:type": {}}}, "f:replicas": {}}})
        );
        // And an ordinary main-resource write of status records nothing.
        let mut new2 = new.clone();
        new2["status"]["replicas"] = json!(3);
        record_update(Some(&new), &mut new2, "someone", &TestSchema, DEPLOY, T2);
        assert!(owned_paths(&new2, "someone").is_empty());
    }

    /// Comparing only the tracked part records exactly what comparing
    /// everything and dropping the untracked part did.
    #[test]
    fn tracked_comparison_equals_the_whole_one_stripped() {
        let typed = Typed {
            schema: &TestSchema,
        };
        let kind = root_kind(DEPLOY);
        let base = config(1, "nginx:1");
        let with_status = |s: Value| {
            let mut o = base.clone();
            o["status"] = s;
            o
        };
        let mut relabelled = with_status(json!({"replicas": 1}));
        relabelled["metadata"]["labels"] = json!({"a": "b"});
        relabelled["spec"]["replicas"] = json!(4);
        let pairs = [
            (base.clone(), with_status(json!({"replicas": 2}))),
            (
                with_status(json!({"replicas": 1})),
                with_status(json!("odd")),
            ),
            (with_status(json!({"replicas": 1})), base.clone()),
            (with_status(json!({"replicas": 1})), relabelled),
            (json!({"kind": "x"}), json!("not an object")),
            (Value::Null, with_status(json!({"replicas": 2}))),
        ];
        for subresource in [None, Some("status".to_string())] {
            let options = FieldManagerOptions { subresource };
            for (old, new) in &pairs {
                let mut whole = Comparison::default();
                typed.compare(
                    Some(old),
                    Some(new),
                    Some(&kind),
                    &mut Vec::new(),
                    &mut whole,
                );
                let mut tracked = Comparison::default();
                compare_tracked(&typed, old, new, &kind, &options, &mut tracked);
                assert_eq!(
                    write_changes(whole, &options),
                    write_changes(tracked, &options),
                    "{options:?}: {old} -> {new}"
                );
            }
        }
    }

    #[test]
    fn record_update_bookkeeping() {
        let obj = created_by("creator", config(1, "nginx:1"));
        // No change: no new entry, times untouched.
        let mut same = obj.clone();
        same["metadata"]["resourceVersion"] = json!("42");
        record_update(Some(&obj), &mut same, "other", &TestSchema, DEPLOY, T1);
        assert_eq!(
            same["metadata"]["managedFields"],
            obj["metadata"]["managedFields"]
        );

        // Removing a field removes it from every owner.
        let mut removed = obj.clone();
        removed["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .shift_remove("app");
        record_update(Some(&obj), &mut removed, "other", &TestSchema, DEPLOY, T1);
        assert!(!owned_paths(&removed, "creator").contains(&".metadata.labels.app".to_string()));
        assert!(owned_paths(&removed, "other").is_empty());

        // A client that drops managedFields does not wipe them.
        let mut dropped = obj.clone();
        dropped["metadata"]
            .as_object_mut()
            .unwrap()
            .shift_remove("managedFields");
        dropped["spec"]["replicas"] = json!(2);
        record_update(Some(&obj), &mut dropped, "other", &TestSchema, DEPLOY, T1);
        assert!(owned_paths(&dropped, "creator").len() > 3);
        assert_eq!(owned_paths(&dropped, "other"), vec![".spec.replicas"]);

        // `[{}]` resets them; only this write's fields remain.
        let mut reset = obj.clone();
        reset["metadata"]["managedFields"] = json!([{}]);
        reset["spec"]["replicas"] = json!(3);
        record_update(Some(&obj), &mut reset, "other", &TestSchema, DEPLOY, T1);
        assert_eq!(
            reset["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );

        // Garbage in the stored managedFields never breaks a write.
        let mut bad = obj.clone();
        bad["metadata"]["managedFields"] = json!([{"operation": "Explode"}]);
        let mut new = bad.clone();
        new["spec"]["replicas"] = json!(2);
        record_update(Some(&bad), &mut new, "x", &TestSchema, DEPLOY, T1);
        assert_eq!(owned_paths(&new, "x"), vec![".spec.replicas"]);
        assert!(apply(
            Some(&bad),
            &config(1, "nginx:1"),
            "k",
            false,
            &TestSchema,
            DEPLOY,
            T1
        )
        .is_ok());
    }

    /// Client-side apply, `kubectl edit`, then server-side apply, the way
    /// the API server chains patches and ownership.
    #[test]
    fn kubectl_flow_patch_then_server_side_apply() {
        use crate::strategic::strategic_merge_patch;
        let csa = "kubectl-client-side-apply";
        let live = created_by(csa, config(1, "nginx:1"));

        // `kubectl apply` after changing the image.
        let patch = json!({"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"web"}],
            "containers":[{"image":"nginx:2","name":"web"}]}}}});
        let mut next = strategic_merge_patch(&live, &patch, &TestSchema, DEPLOY).unwrap();
        record_update(Some(&live), &mut next, csa, &TestSchema, DEPLOY, T1);
        let img = ".spec.template.spec.containers[name=\"web\"].image".to_string();
        assert!(owned_paths(&next, csa).contains(&img));
        assert_eq!(
            next["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );

        // `kubectl edit` changes replicas.
        let live = next;
        let mut next =
            strategic_merge_patch(&live, &json!({"spec":{"replicas":3}}), &TestSchema, DEPLOY)
                .unwrap();
        record_update(
            Some(&live),
            &mut next,
            "kubectl-edit",
            &TestSchema,
            DEPLOY,
            T2,
        );
        assert_eq!(owned_paths(&next, "kubectl-edit"), vec![".spec.replicas"]);

        // Server-side apply of the file (image nginx:2, replicas 1).
        let err = apply(
            Some(&next),
            &config(1, "nginx:2"),
            "kubectl",
            false,
            &TestSchema,
            DEPLOY,
            T2,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using apps/v1: .spec.replicas"
        );
        let obj = apply(
            Some(&next),
            &config(1, "nginx:2"),
            "kubectl",
            true,
            &TestSchema,
            DEPLOY,
            T2,
        )
        .unwrap();
        assert_eq!(obj["spec"]["replicas"], 1);
        // kubectl-edit owned nothing else, so its entry is gone.
        assert!(owned_paths(&obj, "kubectl-edit").is_empty());
        assert!(obj["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["manager"] != "kubectl-edit"));
    }

    #[test]
    fn untyped_objects_are_granular_maps_and_atomic_lists() {
        let cfg = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
                         "spec": {"size": {"w": 1, "h": 2}, "tags": ["a", "b"]}});
        let obj = apply(
            None,
            &cfg,
            "kubectl",
            false,
            &TestSchema,
            "com.example.v1.Widget",
            T0,
        )
        .unwrap();
        assert_eq!(
            entry(&obj, "kubectl")["fieldsV1"],
            json!({"f:spec": {"f:size": {"f:h": {}, "f:w": {}}, "f:tags": {}}})
        );
        let mut other = cfg.clone();
        other["spec"] = json!({"size": {"w": 1, "d": 3}, "tags": ["a"]});
        let err = apply(
            Some(&obj),
            &other,
            "bob",
            false,
            &TestSchema,
            "com.example.v1.Widget",
            T1,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.tags"
        );
    }

    #[test]
    fn kubectl_server_side_takes_over_client_side_applied_fields() {
        // What client-side `kubectl apply` leaves behind: the annotation and
        // fields owned by kubectl-client-side-apply.
        let mut file = config(1, "nginx:1");
        let la = file.to_string();
        file["metadata"]["annotations"] = json!({ LAST_APPLIED_ANNOTATION: la });
        let live = created_by("kubectl-client-side-apply", file);

        // The file changed; `kubectl apply --server-side` succeeds because
        // the conflicting fields are exactly what was last applied.
        let cfg = config(3, "nginx:2");
        let obj = apply_ok(Some(&live), &cfg, "kubectl", T1);
        assert_eq!(obj["spec"]["replicas"], 3);
        assert!(owned_paths(&obj, "kubectl").contains(&".spec.replicas".to_string()));
        assert!(
            !owned_paths(&obj, "kubectl-client-side-apply").contains(&".spec.replicas".to_string())
        );
        // The annotation now records the server-side applied configuration.
        let ann: Value = serde_json::from_str(
            obj["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ann, cfg);

        // A field changed by someone else since is still a conflict.
        let mut edited = live.clone();
        edited["spec"]["replicas"] = json!(5);
        record_update(
            Some(&live),
            &mut edited,
            "kubectl-client-side-apply",
            &TestSchema,
            DEPLOY,
            T1,
        );
        let err = apply(
            Some(&edited),
            &cfg,
            "kubectl",
            false,
            &TestSchema,
            DEPLOY,
            T2,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-client-side-apply\" using apps/v1: .spec.replicas"
        );
        // Other managers do not get this treatment.
        assert!(apply(Some(&live), &cfg, "someone", false, &TestSchema, DEPLOY, T1).is_err());
    }

    #[test]
    fn first_apply_to_untracked_object_conflicts_with_before_first_apply() {
        let live = config(1, "nginx:1");
        let err = apply(
            Some(&live),
            &config(2, "nginx:1"),
            "kubectl",
            false,
            &TestSchema,
            DEPLOY,
            T1,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"before-first-apply\" using apps/v1: .spec.replicas"
        );
        let obj = apply_ok(Some(&live), &config(1, "nginx:1"), "kubectl", T1);
        assert!(owned_paths(&obj, "before-first-apply").contains(&".spec.replicas".to_string()));
    }

    #[test]
    fn update_managers_are_capped() {
        let mut obj = created_by("m0", config(1, "nginx:1"));
        for i in 1..=12 {
            let old = obj.clone();
            obj["metadata"]["labels"][format!("l{i}")] = json!("x");
            let now = format!("2026-01-01T00:{i:02}:00Z");
            record_update(
                Some(&old),
                &mut obj,
                &format!("m{i}"),
                &TestSchema,
                DEPLOY,
                &now,
            );
        }
        let mf = obj["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(mf.len(), MAX_UPDATE_MANAGERS);
        let ancient = entry(&obj, ANCIENT_CHANGES);
        assert_eq!(ancient["time"], "2026-01-01T00:03:00Z");
        let owned = owned_paths(&obj, ANCIENT_CHANGES);
        assert!(owned.contains(&".spec.replicas".to_string()), "{owned:?}");
        assert!(
            owned.contains(&".metadata.labels.l3".to_string()),
            "{owned:?}"
        );
        assert_eq!(owned_paths(&obj, "m12"), vec![".metadata.labels.l12"]);
    }

    #[test]
    fn invalid_apply_configurations() {
        let mut dup = config(1, "nginx:1");
        dup["spec"]["template"]["spec"]["containers"] = json!([{"name": "a"}, {"name": "a"}]);
        let mut nokey = config(1, "nginx:1");
        nokey["spec"]["template"]["spec"]["containers"] = json!([{"image": "x"}]);
        let mut scalars = config(1, "nginx:1");
        scalars["spec"]["template"]["spec"]["containers"] = json!(["web"]);
        let mut with_mf = config(1, "nginx:1");
        with_mf["metadata"]["managedFields"] = json!([{"manager": "x"}]);
        let mut dup_set = config(1, "nginx:1");
        dup_set["metadata"]["finalizers"] = json!(["a", "a"]);
        let cases = [
            (dup, ".spec.template.spec.containers: duplicate entries for key [name=\"a\"]"),
            (nokey, ".spec.template.spec.containers: element 0: associative list with keys has an element that omits key field \"name\" (and doesn't have default value)"),
            (scalars, ".spec.template.spec.containers: element 0: expected an object, got string"),
            (with_mf, ".metadata.managedFields: must be nil"),
            (dup_set, ".metadata.finalizers: duplicate entries for key [=\"a\"]"),
            (json!("x"), ".: expected an object, got string"),
        ];
        for (cfg, msg) in cases {
            let err = apply(None, &cfg, "kubectl", false, &TestSchema, DEPLOY, T0).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid apply configuration at {msg}")
            );
        }
        assert!(apply(None, &config(1, "x"), "", false, &TestSchema, DEPLOY, T0).is_err());
    }

    #[test]
    fn odd_shapes_never_panic() {
        let values = [
            json!({}),
            json!(null),
            json!("s"),
            json!([1, 2]),
            config(1, "x"),
            json!({"metadata": "x", "spec": [1]}),
            json!({"metadata": {"managedFields": "x", "finalizers": [1, {"a": 1}, [2]]}}),
            json!({"metadata": {"managedFields": [{"operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]}, "spec": {"replicas": 2}}),
            json!({"metadata": {"managedFields": [{"operation": "Apply", "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}}, "i:0": {}, "v:1": {}}}}}}}]}}),
            json!({"spec": {"template": {"spec": {"containers": [1, "a", null, {"name": 1}, {"name": {"x": 1}}, {"name": 1}]}}}}),
            json!({"spec": {"template": {"spec": {"containers": {"name": "web"}, "tolerations": {"a": 1}}}}}),
            json!({"spec": {"selector": "x", "template": {"spec": {"containers": [{"name": "web", "ports": [{"containerPort": null}, {}]}]}}}}),
        ];
        for old in &values {
            for new in &values {
                for t in [DEPLOY, "unknown.Type"] {
                    let mut n = new.clone();
                    record_update(Some(old), &mut n, "m", &TestSchema, t, T0);
                    for force in [false, true] {
                        let _ = apply(Some(old), new, "m", force, &TestSchema, t, T0);
                        if let Ok(v) = apply(Some(old), new, "m2", force, &TestSchema, t, T0) {
                            let _ = apply(Some(&v), old, "m2", force, &TestSchema, t, T0);
                        }
                    }
                }
            }
        }
    }
}
