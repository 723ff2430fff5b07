//! Randomised inputs (a fixed-seed generator, so runs are reproducible):
//! no patch or apply may panic, and strategic merge never leaves a
//! directive in its result.

use std::borrow::Cow;

use serde_json::{json, Map, Value};
use tapestry_apimachinery::{
    apply, json_merge_patch, json_patch, record_update, strategic_merge_patch, FieldKind,
    FieldSchema, ListType, PatchSchema, PatchStrategy,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const KEYS: &[&str] = &[
    "metadata",
    "spec",
    "template",
    "containers",
    "name",
    "image",
    "ports",
    "containerPort",
    "finalizers",
    "labels",
    "items",
    "a",
    "b",
    "$patch",
    "$retainKeys",
    "$setElementOrder/containers",
    "$deleteFromPrimitiveList/finalizers",
    "$setElementOrder/items",
];
const STRINGS: &[&str] = &["web", "a", "b", "delete", "replace", "merge", "TCP", ""];

fn value(r: &mut Rng, depth: u32) -> Value {
    let leaf = depth == 0 || r.below(3) == 0;
    match if leaf { r.below(4) } else { 4 + r.below(2) } {
        0 => Value::Null,
        1 => json!(r.below(3)),
        2 => json!(r.pick(STRINGS)),
        3 => json!(r.below(2) == 0),
        4 => {
            let mut m = Map::new();
            for _ in 0..r.below(4) {
                m.insert(r.pick(KEYS).to_string(), value(r, depth - 1));
            }
            Value::Object(m)
        }
        _ => Value::Array((0..r.below(4)).map(|_| value(r, depth - 1)).collect()),
    }
}

/// Everything is a Thing: recursive, with every kind of list.
struct Schema;

impl PatchSchema for Schema {
    fn field(&self, _type_name: &str, field: &str) -> Option<Cow<'_, FieldSchema>> {
        let thing = || FieldKind::Object {
            type_name: "Thing".into(),
        };
        let (kind, strategies, key) = match field {
            "containers" | "items" => (
                FieldKind::List {
                    item: Box::new(thing()),
                    list_type: ListType::Map {
                        keys: vec!["name".into()],
                    },
                },
                vec![PatchStrategy::Merge],
                Some("name".to_string()),
            ),
            "ports" => (
                FieldKind::List {
                    item: Box::new(thing()),
                    list_type: ListType::Map {
                        keys: vec!["containerPort".into(), "b".into()],
                    },
                },
                vec![PatchStrategy::Merge],
                Some("containerPort".to_string()),
            ),
            "finalizers" => (
                FieldKind::List {
                    item: Box::new(FieldKind::Scalar),
                    list_type: ListType::Set,
                },
                vec![PatchStrategy::Merge],
                None,
            ),
            "labels" => (
                FieldKind::Map {
                    value: Box::new(FieldKind::Scalar),
                },
                vec![],
                None,
            ),
            "name" | "image" | "containerPort" => (FieldKind::Scalar, vec![], None),
            "a" => (
                FieldKind::List {
                    item: Box::new(thing()),
                    list_type: ListType::Atomic,
                },
                vec![],
                None,
            ),
            _ => (thing(), vec![PatchStrategy::RetainKeys], None),
        };
        Some(Cow::Owned(FieldSchema {
            kind,
            patch_strategies: strategies,
            patch_merge_key: key,
            // One atomic map field, so the walks meet that case too.
            atomic: field == "labels",
        }))
    }

    fn field_default(&self, _type_name: &str, field: &str) -> Option<Value> {
        (field == "b").then(|| json!("TCP"))
    }

    fn atomic_type(&self, type_name: &str) -> bool {
        type_name == "Atomic"
    }
}

fn has_directive(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            k == "$patch"
                || k == "$retainKeys"
                || k.starts_with("$setElementOrder/")
                || k.starts_with("$deleteFromPrimitiveList/")
                || has_directive(v)
        }),
        Value::Array(a) => a.iter().any(has_directive),
        _ => false,
    }
}

#[test]
fn random_patches_and_applies_never_panic() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut smp_ok, mut apply_ok) = (0, 0);
    for _ in 0..4000 {
        let original = value(&mut r, 5);
        let patch = value(&mut r, 5);
        for t in ["Thing", "Unknown"] {
            if let Ok(v) = strategic_merge_patch(&original, &patch, &Schema, t) {
                smp_ok += 1;
                // Directives only come from the patch; the original may hold
                // keys that look like them, which are data.
                if !has_directive(&original) {
                    assert!(!has_directive(&v), "{original} + {patch} -> {v}");
                }
            }
            let _ = json_merge_patch(&original, &patch);
            let _ = json_patch(&original, &patch);
            let mut new = patch.clone();
            record_update(
                Some(&original),
                &mut new,
                "m",
                &Schema,
                t,
                "2026-01-01T00:00:00Z",
            );
            for force in [false, true] {
                if let Ok(v) = apply(Some(&original), &patch, "m", force, &Schema, t, "t") {
                    apply_ok += 1;
                    let _ = apply(Some(&v), &original, "n", force, &Schema, t, "t");
                    let _ = apply(Some(&v), &json!({}), "m", force, &Schema, t, "t");
                }
            }
        }
    }
    // The generator must reach the interesting paths, not only errors.
    assert!(
        smp_ok > 1000 && apply_ok > 1000,
        "smp {smp_ok}, apply {apply_ok}"
    );
}

#[test]
fn random_json_patch_operations_never_panic() {
    let mut r = Rng(42);
    let ops = ["add", "remove", "replace", "move", "copy", "test"];
    let paths = [
        "",
        "/",
        "/a",
        "/a/0",
        "/a/-",
        "/spec/a/1",
        "/b/~1x",
        "/a/99",
        "/-",
        "/a/b/c",
    ];
    for _ in 0..5000 {
        let doc = value(&mut r, 4);
        let patch: Vec<Value> = (0..r.below(4))
            .map(|_| {
                json!({"op": r.pick(&ops), "path": r.pick(&paths), "from": r.pick(&paths),
                       "value": value(&mut r, 2)})
            })
            .collect();
        let _ = json_patch(&doc, &Value::Array(patch));
    }
}
