//! Sets of field paths in Kubernetes' `FieldsV1` format.
//!
//! A path is a sequence of elements, each kept as its canonical `FieldsV1`
//! key: `f:<field>` (object field or map key), `k:<json>` (item of a map
//! list, by its key fields, sorted by name), `v:<json>` (item of a set),
//! `i:<index>` (item by position). Canonical strings make paths from stored
//! `managedFields` and from our own walks compare equal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// One path element in canonical `FieldsV1` form.
pub type PathElement = String;

/// `f:<name>`.
pub fn field_element(name: &str) -> PathElement {
    format!("f:{name}")
}

/// `k:{"name":"web"}` for a map-list item with these key fields.
pub fn key_element(keys: &[(String, Value)]) -> PathElement {
    let mut sorted: Vec<&(String, Value)> = keys.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut m = Map::new();
    for (k, v) in sorted {
        m.insert(k.clone(), canonical(v));
    }
    format!("k:{}", Value::Object(m))
}

/// `v:"value"` for a set item.
pub fn value_element(v: &Value) -> PathElement {
    format!("v:{}", canonical(v))
}

/// `i:<n>`.
pub fn index_element(i: usize) -> PathElement {
    format!("i:{i}")
}

/// `v` with object keys sorted at every level, so its JSON text is canonical.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Canonicalises one `FieldsV1` key; errors on unknown prefixes or bad JSON.
fn canonical_element(key: &str) -> Result<PathElement, String> {
    let bad = |what: &str| format!("invalid field path element {key:?}: {what}");
    let (prefix, rest) = key.split_at(key.find(':').ok_or_else(|| bad("missing prefix"))?);
    let rest = &rest[1..];
    match prefix {
        "f" => Ok(key.to_string()),
        "i" => rest
            .parse::<usize>()
            .map(index_element)
            .map_err(|_| bad("not an index")),
        "v" => serde_json::from_str::<Value>(rest)
            .map(|v| value_element(&v))
            .map_err(|_| bad("invalid JSON value")),
        "k" => match serde_json::from_str::<Value>(rest) {
            Ok(Value::Object(m)) => Ok(key_element(
                &m.into_iter().collect::<Vec<(String, Value)>>(),
            )),
            _ => Err(bad("expected a JSON object of key fields")),
        },
        _ => Err(bad("unknown prefix")),
    }
}

/// Human form of a path, as Kubernetes prints it in conflicts:
/// `.spec.containers[name="web"].image`, `.metadata.finalizers[="x"]`.
pub fn path_string(path: &[PathElement]) -> String {
    let mut s = String::new();
    for e in path {
        if let Some(f) = e.strip_prefix("f:") {
            let _ = write!(s, ".{f}");
        } else if let Some(k) = e.strip_prefix("k:") {
            match serde_json::from_str::<Value>(k) {
                Ok(Value::Object(m)) => {
                    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let _ = write!(s, "[{}]", parts.join(","));
                }
                _ => {
                    let _ = write!(s, "[{k}]");
                }
            }
        } else if let Some(v) = e.strip_prefix("v:") {
            let _ = write!(s, "[={v}]");
        } else if let Some(i) = e.strip_prefix("i:") {
            let _ = write!(s, "[{i}]");
        } else {
            let _ = write!(s, ".{e}");
        }
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// A set of field paths, as a trie. A node is a member when the path to it
/// is in the set; a node with children need not be a member itself
/// (owning `.spec.replicas` does not mean owning `.spec`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<PathElement, FieldSet>,
}

impl FieldSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Adds `path` (the empty path is not representable and is ignored).
    pub fn insert(&mut self, path: &[PathElement]) {
        if path.is_empty() {
            return;
        }
        let mut node = self;
        for e in path {
            node = node.child_mut(e);
        }
        node.member = true;
    }

    /// The child at `e`, created if missing; the key is copied only then
    /// (walks insert every prefix of a path, mostly present already).
    fn child_mut(&mut self, e: &str) -> &mut FieldSet {
        if !self.children.contains_key(e) {
            self.children.insert(e.to_string(), FieldSet::default());
        }
        self.children.get_mut(e).expect("inserted above")
    }

    pub fn contains(&self, path: &[PathElement]) -> bool {
        !path.is_empty() && self.node(path).is_some_and(|n| n.member)
    }

    /// Whether `path` or anything below it is in the set.
    pub fn contains_prefix(&self, path: &[PathElement]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }

    fn node(&self, path: &[PathElement]) -> Option<&FieldSet> {
        let mut node = self;
        for e in path {
            node = node.children.get(e)?;
        }
        Some(node)
    }

    /// Removes `path` and everything below it.
    pub fn remove_subtree(&mut self, path: &[PathElement]) {
        self.remove_subtrees([path]);
    }

    /// Removes each path and everything below it, pruning once at the end
    /// (pruning walks the whole set).
    pub fn remove_subtrees<'p>(&mut self, paths: impl IntoIterator<Item = &'p [PathElement]>) {
        let mut removed = false;
        for path in paths {
            let Some((last, parents)) = path.split_last() else {
                continue;
            };
            if let Some(parent) = self.node_mut(parents) {
                removed |= parent.children.remove(last).is_some();
            }
        }
        if removed {
            self.prune();
        }
    }

    /// Keeps only the paths below the top-level `element` (and it).
    pub fn retain_subtree(&mut self, element: &PathElement) {
        let kept = self.children.remove(element);
        *self = FieldSet::new();
        if let Some(kept) = kept.filter(|k| !k.is_empty()) {
            self.children.insert(element.clone(), kept);
        }
    }

    /// Removes only `path` itself, keeping members below it.
    pub fn remove(&mut self, path: &[PathElement]) {
        if path.is_empty() {
            return;
        }
        if let Some(n) = self.node_mut(path).filter(|n| n.member) {
            n.member = false;
            self.prune();
        }
    }

    fn node_mut(&mut self, path: &[PathElement]) -> Option<&mut FieldSet> {
        let mut node = self;
        for e in path {
            node = node.children.get_mut(e)?;
        }
        Some(node)
    }

    /// Drops nodes that are neither members nor lead to members.
    fn prune(&mut self) {
        self.children.retain(|_, c| {
            c.prune();
            !c.is_empty()
        });
    }

    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.union_in(other);
        out
    }

    pub fn union_in(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (k, c) in &other.children {
            self.child_mut(k).union_in(c);
        }
    }

    /// Removes the members of `other`, touching only the paths they share
    /// (no copy of the rest, unlike [`difference`](Self::difference)).
    /// Like every operation here it keeps sets pruned (no empty non-member
    /// node, which fieldsV1 would read back as an owned leaf), and on
    /// pruned sets it leaves exactly what `difference` returns.
    pub fn remove_all(&mut self, other: &FieldSet) {
        self.member &= !other.member;
        if self.children.is_empty() {
            return;
        }
        for (k, o) in &other.children {
            if let Some(c) = self.children.get_mut(k) {
                c.remove_all(o);
                if c.is_empty() {
                    self.children.remove(k);
                }
            }
        }
    }

    /// Members of `self` that are not members of `other`.
    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && !other.member,
            children: BTreeMap::new(),
        };
        for (k, c) in &self.children {
            let d = match other.children.get(k) {
                Some(o) => c.difference(o),
                None => c.clone(),
            };
            if !d.is_empty() {
                out.children.insert(k.clone(), d);
            }
        }
        out
    }

    /// Members of both sets.
    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && other.member,
            children: BTreeMap::new(),
        };
        for (k, c) in &self.children {
            if let Some(o) = other.children.get(k) {
                let i = c.intersection(o);
                if !i.is_empty() {
                    out.children.insert(k.clone(), i);
                }
            }
        }
        out
    }

    /// All member paths, parents before children.
    pub fn paths(&self) -> Vec<Vec<PathElement>> {
        let mut out = Vec::new();
        let mut prefix = Vec::new();
        self.collect(&mut prefix, &mut out);
        out
    }

    fn collect(&self, prefix: &mut Vec<PathElement>, out: &mut Vec<Vec<PathElement>>) {
        if self.member && !prefix.is_empty() {
            out.push(prefix.clone());
        }
        for (k, c) in &self.children {
            prefix.push(k.clone());
            c.collect(prefix, out);
            prefix.pop();
        }
    }

    /// Parses a `fieldsV1` object. Keys are canonicalised.
    pub fn from_fields_v1(v: &Value) -> Result<FieldSet, String> {
        let mut set = FieldSet::default();
        set.read(v, "")?;
        set.member = false;
        set.prune();
        Ok(set)
    }

    fn read(&mut self, v: &Value, at: &str) -> Result<(), String> {
        let Value::Object(m) = v else {
            return Err(format!("fieldsV1 at {at:?}: expected an object"));
        };
        for (k, c) in m {
            if k == "." {
                self.member = true;
                continue;
            }
            let e = canonical_element(k)?;
            let child = self.children.entry(e).or_default();
            // A leaf `{}` means the path itself is owned.
            if c.as_object().is_some_and(|o| o.is_empty()) {
                child.member = true;
            } else {
                child.read(c, k)?;
            }
        }
        Ok(())
    }

    /// Serialises to a `fieldsV1` object.
    pub fn to_fields_v1(&self) -> Value {
        Value::Object(self.fields_v1_children())
    }

    fn fields_v1_children(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (k, c) in &self.children {
            let mut inner = c.fields_v1_children();
            if c.member && !inner.is_empty() {
                // "." first, the way Kubernetes writes it.
                inner.shift_insert(0, ".".to_string(), Value::Object(Map::new()));
            }
            m.insert(k.clone(), Value::Object(inner));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(elems: &[&str]) -> Vec<PathElement> {
        elems.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn retain_subtree_keeps_one_top_level_member_and_what_is_below_it() {
        let mut set = FieldSet::new();
        for path in [
            p(&["f:status"]),
            p(&["f:status", "f:phase"]),
            p(&["f:spec", "f:nodeName"]),
            p(&["f:statusx"]),
        ] {
            set.insert(&path);
        }
        set.retain_subtree(&"f:status".to_string());
        let paths = set.paths();
        assert_eq!(paths, vec![p(&["f:status"]), p(&["f:status", "f:phase"])]);
        set.retain_subtree(&"f:spec".to_string());
        assert!(set.is_empty());
    }

    #[test]
    fn remove_all_leaves_what_difference_returns() {
        let set = |paths: &[&[&str]]| {
            let mut s = FieldSet::new();
            paths.iter().for_each(|path| s.insert(&p(path)));
            s
        };
        let owned = set(&[
            &["f:spec"],
            &["f:spec", "f:replicas"],
            &["f:spec", "f:template", "f:spec", "f:nodeName"],
            &["f:status", "f:phase"],
        ]);
        for other in [
            set(&[]),
            set(&[&["f:spec"]]),
            set(&[&["f:spec", "f:template", "f:spec", "f:nodeName"]]),
            set(&[&["f:status", "f:phase"], &["f:status", "f:podIP"]]),
            owned.clone(),
        ] {
            let mut in_place = owned.clone();
            in_place.remove_all(&other);
            assert_eq!(in_place.paths(), owned.difference(&other).paths());
        }
    }

    #[test]
    fn fields_v1_round_trip_and_canonical_keys() {
        let v = json!({
            "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}},
                                        "k:{\"protocol\":\"TCP\", \"containerPort\": 80}": {".": {}}},
                       "f:finalizers": {"v:\"a\"": {}}}
        });
        let set = FieldSet::from_fields_v1(&v).unwrap();
        assert!(set.contains(&p(&["f:metadata", "f:labels"])));
        assert!(set.contains(&p(&["f:metadata", "f:labels", "f:app"])));
        assert!(!set.contains(&p(&["f:metadata"])));
        assert!(set.contains(&p(&[
            "f:spec",
            "f:containers",
            "k:{\"containerPort\":80,\"protocol\":\"TCP\"}"
        ])));
        let out = set.to_fields_v1();
        assert_eq!(
            out["f:metadata"],
            json!({"f:labels": {".": {}, "f:app": {}}})
        );
        assert_eq!(FieldSet::from_fields_v1(&out).unwrap(), set);
        assert_eq!(
            path_string(&p(&[
                "f:spec",
                "f:containers",
                "k:{\"name\":\"web\"}",
                "f:image"
            ])),
            ".spec.containers[name=\"web\"].image"
        );
        assert_eq!(
            path_string(&p(&["f:metadata", "f:finalizers", "v:\"x\""])),
            ".metadata.finalizers[=\"x\"]"
        );
    }

    #[test]
    fn fields_v1_errors() {
        for bad in [
            json!([]),
            json!({"x:y": {}}),
            json!({"k:notjson": {}}),
            json!({"f:a": 1}),
            json!({"i:-1": {}}),
        ] {
            assert!(FieldSet::from_fields_v1(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn set_algebra() {
        let mut a = FieldSet::new();
        a.insert(&p(&["f:spec", "f:replicas"]));
        a.insert(&p(&["f:spec", "f:paused"]));
        let mut b = FieldSet::new();
        b.insert(&p(&["f:spec", "f:replicas"]));
        b.insert(&p(&["f:spec"]));
        assert_eq!(
            a.intersection(&b).paths(),
            vec![p(&["f:spec", "f:replicas"])]
        );
        assert_eq!(a.difference(&b).paths(), vec![p(&["f:spec", "f:paused"])]);
        assert_eq!(a.union(&b).paths().len(), 3);
        assert!(b.contains_prefix(&p(&["f:spec"])));
        let mut c = a.union(&b);
        c.remove(&p(&["f:spec"]));
        assert_eq!(c, a);
        c.remove_subtree(&p(&["f:spec"]));
        assert!(c.is_empty());
    }
}
