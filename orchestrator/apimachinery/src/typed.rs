//! Schema-guided walks over values for server-side apply: field sets,
//! comparison, merge, and removal of paths.
//!
//! Granularity follows Kubernetes: objects and maps are owned field by
//! field; map lists item by item (by their key fields); sets value by value;
//! scalars, atomic lists and atomic types as a whole. Untyped content
//! (fields the schema does not know) has granular maps and atomic lists.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::fieldpath::{
    field_element, key_element, path_string, value_element, FieldSet, PathElement,
};
use crate::schema::{FieldKind, ListType, PatchSchema};

/// How a value at some position is owned and merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Shape<'k> {
    Struct,
    MapList(&'k [String]),
    Set,
    Atomic,
}

/// What `compare` found between two values.
#[derive(Default, Debug)]
pub(crate) struct Comparison {
    pub modified: FieldSet,
    pub added: FieldSet,
    pub removed: FieldSet,
}

/// A validation failure: field path and message.
pub(crate) type Invalid = (String, String);

pub(crate) struct Typed<'a> {
    pub schema: &'a dyn PatchSchema,
}

impl Typed<'_> {
    pub fn child_kind<'k>(
        &'k self,
        kind: Option<&'k FieldKind>,
        key: &str,
    ) -> Option<Cow<'k, FieldKind>> {
        match kind? {
            FieldKind::Object { type_name } => {
                let f = self.schema.field(type_name, key)?;
                // Every walk here treats a scalar as one leaf (owned,
                // compared and replaced whole), which is exactly what an
                // atomic field is; its inner structure does not matter to SSA.
                Some(if f.atomic {
                    Cow::Owned(FieldKind::Scalar)
                } else {
                    match f {
                        Cow::Borrowed(schema) => Cow::Borrowed(&schema.kind),
                        Cow::Owned(schema) => Cow::Owned(schema.kind),
                    }
                })
            }
            FieldKind::Map { value } => Some(Cow::Borrowed(value)),
            _ => None,
        }
    }

    fn item_kind(kind: Option<&FieldKind>) -> Option<&FieldKind> {
        match kind? {
            FieldKind::List { item, .. } => Some(item),
            _ => None,
        }
    }

    pub fn shape<'k>(&self, kind: Option<&'k FieldKind>, v: &Value) -> Shape<'k> {
        match (kind, v) {
            (None, Value::Object(_)) => Shape::Struct,
            (Some(FieldKind::Object { type_name }), Value::Object(_)) => {
                if self.schema.atomic_type(type_name) {
                    Shape::Atomic
                } else {
                    Shape::Struct
                }
            }
            (Some(FieldKind::Map { .. }), Value::Object(_)) => Shape::Struct,
            (
                Some(FieldKind::List {
                    list_type: ListType::Map { keys },
                    ..
                }),
                Value::Array(_),
            ) if !keys.is_empty() => Shape::MapList(keys),
            (
                Some(FieldKind::List {
                    list_type: ListType::Set,
                    ..
                }),
                Value::Array(_),
            ) => Shape::Set,
            _ => Shape::Atomic,
        }
    }

    /// `k:{...}` of a map-list item; a missing key field takes the schema
    /// default when there is one.
    fn item_key(
        &self,
        item: &Value,
        keys: &[String],
        item_kind: Option<&FieldKind>,
    ) -> Result<PathElement, String> {
        let Value::Object(m) = item else {
            return Err(format!(
                "expected an object, got {}",
                crate::json::type_name(item)
            ));
        };
        let mut kv = Vec::with_capacity(keys.len());
        for k in keys {
            let v = match m.get(k).filter(|v| !v.is_null()) {
                Some(v) => v.clone(),
                None => match item_kind {
                    Some(FieldKind::Object { type_name }) => self.schema.field_default(type_name, k),
                    _ => None,
                }
                .ok_or_else(|| {
                    format!(
                        "associative list with keys has an element that omits key field {k:?} (and doesn't have default value)"
                    )
                })?,
            };
            kv.push((k.clone(), v));
        }
        Ok(key_element(&kv))
    }

    /// Keys of all items, or None when an item has no key or two share one
    /// (such lists are then handled as atomic).
    fn list_keys(
        &self,
        items: &[Value],
        keys: &[String],
        item_kind: Option<&FieldKind>,
    ) -> Option<Vec<PathElement>> {
        let mut seen = HashSet::new();
        items
            .iter()
            .map(|i| {
                let k = self.item_key(i, keys, item_kind).ok()?;
                seen.insert(k.clone()).then_some(k)
            })
            .collect()
    }

    fn set_keys(items: &[Value]) -> Option<Vec<PathElement>> {
        let mut seen = HashSet::new();
        items
            .iter()
            .map(|i| {
                let k = value_element(i);
                seen.insert(k.clone()).then_some(k)
            })
            .collect()
    }

    /// Checks an applied configuration: map-list items need their keys,
    /// and no two items of a map list or set may be the same.
    pub fn validate(
        &self,
        v: &Value,
        kind: Option<&FieldKind>,
        path: &mut Vec<PathElement>,
    ) -> Result<(), Invalid> {
        match self.shape(kind, v) {
            Shape::Struct => {
                for (k, c) in v.as_object().into_iter().flatten() {
                    path.push(field_element(k));
                    self.validate(c, self.child_kind(kind, k).as_deref(), path)?;
                    path.pop();
                }
            }
            Shape::MapList(keys) => {
                let item_kind = Self::item_kind(kind);
                let mut seen = HashSet::new();
                for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                    let key = self
                        .item_key(item, keys, item_kind)
                        .map_err(|m| (path_string(path), format!("element {i}: {m}")))?;
                    if !seen.insert(key.clone()) {
                        let shown = path_string(std::slice::from_ref(&key));
                        return Err((
                            path_string(path),
                            format!("duplicate entries for key {shown}"),
                        ));
                    }
                    path.push(key);
                    self.validate(item, item_kind, path)?;
                    path.pop();
                }
            }
            Shape::Set => {
                let mut seen = HashSet::new();
                for item in v.as_array().into_iter().flatten() {
                    let key = value_element(item);
                    if !seen.insert(key.clone()) {
                        let shown = path_string(std::slice::from_ref(&key));
                        return Err((
                            path_string(path),
                            format!("duplicate entries for key {shown}"),
                        ));
                    }
                }
            }
            Shape::Atomic => {}
        }
        Ok(())
    }

    /// The fields an applied configuration sets: leaves, empty objects, and
    /// every map-list item itself (so owning an item keeps it alive).
    pub fn leaf_set(
        &self,
        v: &Value,
        kind: Option<&FieldKind>,
        path: &mut Vec<PathElement>,
        out: &mut FieldSet,
    ) {
        match self.shape(kind, v) {
            Shape::Struct => {
                let m = v
                    .as_object()
                    .map(|m| m.iter().filter(|(_, c)| !c.is_null()).collect::<Vec<_>>());
                match m {
                    Some(fields) if !fields.is_empty() => {
                        for (k, c) in fields {
                            path.push(field_element(k));
                            self.leaf_set(c, self.child_kind(kind, k).as_deref(), path, out);
                            path.pop();
                        }
                    }
                    _ => out.insert(path),
                }
            }
            Shape::MapList(keys) => {
                let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
                let item_kind = Self::item_kind(kind);
                match self.list_keys(items, keys, item_kind) {
                    Some(ks) => {
                        for (item, key) in items.iter().zip(ks) {
                            path.push(key);
                            out.insert(path);
                            self.leaf_set(item, item_kind, path, out);
                            path.pop();
                        }
                    }
                    None => out.insert(path),
                }
            }
            Shape::Set => {
                for item in v.as_array().into_iter().flatten() {
                    path.push(value_element(item));
                    out.insert(path);
                    path.pop();
                }
            }
            Shape::Atomic => out.insert(path),
        }
    }

    /// `path` and every path below it in `v` (what appears or disappears
    /// when `v` is added or removed as a whole).
    pub fn all_set(
        &self,
        v: &Value,
        kind: Option<&FieldKind>,
        path: &mut Vec<PathElement>,
        out: &mut FieldSet,
    ) {
        out.insert(path);
        match self.shape(kind, v) {
            Shape::Struct => {
                for (k, c) in v.as_object().into_iter().flatten() {
                    if c.is_null() {
                        continue;
                    }
                    path.push(field_element(k));
                    self.all_set(c, self.child_kind(kind, k).as_deref(), path, out);
                    path.pop();
                }
            }
            Shape::MapList(keys) => {
                let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
                let item_kind = Self::item_kind(kind);
                if let Some(ks) = self.list_keys(items, keys, item_kind) {
                    for (item, key) in items.iter().zip(ks) {
                        path.push(key);
                        self.all_set(item, item_kind, path, out);
                        path.pop();
                    }
                }
            }
            Shape::Set => {
                for item in v.as_array().into_iter().flatten() {
                    path.push(value_element(item));
                    out.insert(path);
                    path.pop();
                }
            }
            Shape::Atomic => {}
        }
    }

    /// Field-level differences between `old` and `new`.
    pub fn compare(
        &self,
        old: Option<&Value>,
        new: Option<&Value>,
        kind: Option<&FieldKind>,
        path: &mut Vec<PathElement>,
        out: &mut Comparison,
    ) {
        let old = old.filter(|v| !v.is_null());
        let new = new.filter(|v| !v.is_null());
        let (o, n) = match (old, new) {
            (None, None) => return,
            (Some(o), None) => return self.all_set(o, kind, path, &mut out.removed),
            (None, Some(n)) => return self.all_set(n, kind, path, &mut out.added),
            // Equal values change no field; comparing them as values is much
            // cheaper than walking them field by field (an update usually
            // touches one corner of the object). Below, `o != n` always
            // holds. (JSON equality takes -0.0 for 0.0, so a set member
            // changing only that sign is not reported: the same number.)
            (Some(o), Some(n)) if o == n => return,
            (Some(o), Some(n)) => (o, n),
        };
        match (self.shape(kind, o), self.shape(kind, n)) {
            (Shape::Struct, Shape::Struct) => {
                let (Some(om), Some(nm)) = (o.as_object(), n.as_object()) else {
                    return;
                };
                self.compare_fields(om, nm, kind, |_| true, path, out);
            }
            (Shape::MapList(keys), Shape::MapList(_)) => {
                let item_kind = Self::item_kind(kind);
                let (oi, ni) = (
                    o.as_array().map(Vec::as_slice).unwrap_or_default(),
                    n.as_array().map(Vec::as_slice).unwrap_or_default(),
                );
                let (Some(ok), Some(nk)) = (
                    self.list_keys(oi, keys, item_kind),
                    self.list_keys(ni, keys, item_kind),
                ) else {
                    out.modified.insert(path);
                    return;
                };
                let new_by_key: HashMap<&PathElement, &Value> = nk.iter().zip(ni).collect();
                let old_keys: HashSet<&PathElement> = ok.iter().collect();
                for (key, item) in ok.iter().zip(oi) {
                    path.push(key.clone());
                    self.compare(
                        Some(item),
                        new_by_key.get(key).copied(),
                        item_kind,
                        path,
                        out,
                    );
                    path.pop();
                }
                for (key, item) in nk.iter().zip(ni) {
                    if !old_keys.contains(key) {
                        path.push(key.clone());
                        self.all_set(item, item_kind, path, &mut out.added);
                        path.pop();
                    }
                }
            }
            (Shape::Set, Shape::Set) => {
                let (oi, ni) = (
                    o.as_array().map(Vec::as_slice).unwrap_or_default(),
                    n.as_array().map(Vec::as_slice).unwrap_or_default(),
                );
                let (Some(ok), Some(nk)) = (Self::set_keys(oi), Self::set_keys(ni)) else {
                    out.modified.insert(path);
                    return;
                };
                let (os, ns): (HashSet<&PathElement>, HashSet<&PathElement>) =
                    (ok.iter().collect(), nk.iter().collect());
                for k in &ok {
                    if !ns.contains(k) {
                        path.push(k.clone());
                        out.removed.insert(path);
                        path.pop();
                    }
                }
                for k in &nk {
                    if !os.contains(k) {
                        path.push(k.clone());
                        out.added.insert(path);
                        path.pop();
                    }
                }
            }
            _ => out.modified.insert(path),
        }
    }

    /// [`Self::compare`] of the fields of two structs that `include` names.
    pub fn compare_fields(
        &self,
        om: &Map<String, Value>,
        nm: &Map<String, Value>,
        kind: Option<&FieldKind>,
        include: impl Fn(&str) -> bool,
        path: &mut Vec<PathElement>,
        out: &mut Comparison,
    ) {
        let keys = om.keys().chain(nm.keys().filter(|k| !om.contains_key(*k)));
        for k in keys.filter(|k| include(k)) {
            path.push(field_element(k));
            self.compare(
                om.get(k),
                nm.get(k),
                self.child_kind(kind, k).as_deref(),
                path,
                out,
            );
            path.pop();
        }
    }

    /// Merges an applied configuration into the live value: objects field
    /// by field, map lists by key, sets by value, everything else replaced.
    pub fn merge(&self, live: &Value, applied: &Value, kind: Option<&FieldKind>) -> Value {
        match (self.shape(kind, live), self.shape(kind, applied)) {
            (Shape::Struct, Shape::Struct) => {
                let (Some(lm), Some(am)) = (live.as_object(), applied.as_object()) else {
                    return applied.clone();
                };
                let mut out = lm.clone();
                for (k, av) in am {
                    if av.is_null() {
                        continue;
                    }
                    let merged = match lm.get(k) {
                        Some(lv) => self.merge(lv, av, self.child_kind(kind, k).as_deref()),
                        None => av.clone(),
                    };
                    out.insert(k.clone(), merged);
                }
                Value::Object(out)
            }
            (Shape::MapList(keys), Shape::MapList(_)) => {
                let item_kind = Self::item_kind(kind);
                let (li, ai) = (
                    live.as_array().map(Vec::as_slice).unwrap_or_default(),
                    applied.as_array().map(Vec::as_slice).unwrap_or_default(),
                );
                match (
                    self.list_keys(li, keys, item_kind),
                    self.list_keys(ai, keys, item_kind),
                ) {
                    (Some(lk), Some(ak)) => {
                        Value::Array(ordered_merge(li, &lk, ai, &ak, |l, a| {
                            self.merge(l, a, item_kind)
                        }))
                    }
                    _ => applied.clone(),
                }
            }
            (Shape::Set, Shape::Set) => {
                let (li, ai) = (
                    live.as_array().map(Vec::as_slice).unwrap_or_default(),
                    applied.as_array().map(Vec::as_slice).unwrap_or_default(),
                );
                match (Self::set_keys(li), Self::set_keys(ai)) {
                    (Some(lk), Some(ak)) => {
                        Value::Array(ordered_merge(li, &lk, ai, &ak, |_, a| a.clone()))
                    }
                    _ => applied.clone(),
                }
            }
            _ => applied.clone(),
        }
    }

    /// Removes the value at `path` (and what is below it), if present.
    pub fn remove_path(&self, v: &mut Value, path: &[PathElement], kind: Option<&FieldKind>) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let shape = self.shape(kind, v);
        match v {
            Value::Object(m) => {
                let Some(name) = first.strip_prefix("f:") else {
                    return;
                };
                if rest.is_empty() {
                    m.shift_remove(name);
                } else if let Some(child) = m.get_mut(name) {
                    self.remove_path(child, rest, self.child_kind(kind, name).as_deref());
                }
            }
            Value::Array(items) => {
                let item_kind = Self::item_kind(kind);
                let idx = if first.starts_with("k:") {
                    match &shape {
                        Shape::MapList(keys) => items.iter().position(|i| {
                            self.item_key(i, keys, item_kind).ok().as_ref() == Some(first)
                        }),
                        _ => None,
                    }
                } else if first.starts_with("v:") {
                    items.iter().position(|i| &value_element(i) == first)
                } else {
                    first
                        .strip_prefix("i:")
                        .and_then(|i| i.parse().ok())
                        .filter(|i| *i < items.len())
                };
                let Some(idx) = idx else {
                    return;
                };
                if rest.is_empty() {
                    items.remove(idx);
                } else if let Some(item) = items.get_mut(idx) {
                    self.remove_path(item, rest, item_kind);
                }
            }
            _ => {}
        }
    }
}

/// Merges two keyed lists: items in both are merged, the applied list's
/// order wins where both lists have the items, and items only the live list
/// has keep their place.
fn ordered_merge(
    live: &[Value],
    lk: &[PathElement],
    applied: &[Value],
    ak: &[PathElement],
    merge: impl Fn(&Value, &Value) -> Value,
) -> Vec<Value> {
    let live_idx: HashMap<&PathElement, usize> =
        lk.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let applied_keys: HashSet<&PathElement> = ak.iter().collect();
    let mut used = vec![false; live.len()];
    let mut out = Vec::with_capacity(live.len() + applied.len());
    let (mut l, mut r) = (0, 0);
    loop {
        while l < live.len() && used[l] {
            l += 1;
        }
        match (l < live.len(), r < applied.len()) {
            (false, false) => break,
            (true, false) => {
                out.push(live[l].clone());
                used[l] = true;
            }
            (true, true) if !applied_keys.contains(&lk[l]) => {
                out.push(live[l].clone());
                used[l] = true;
            }
            (_, true) => {
                match live_idx.get(&ak[r]) {
                    Some(&li) => {
                        out.push(merge(&live[li], &applied[r]));
                        used[li] = true;
                    }
                    None => out.push(applied[r].clone()),
                }
                r += 1;
            }
        }
    }
    out
}

/// Drops `null` members of objects at any depth (an applied `null` means
/// "not specified").
pub(crate) fn remove_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), remove_nulls(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(remove_nulls).collect()),
        other => other.clone(),
    }
}
