#!/usr/bin/env python3
"""Generate orchestrator/kubeproto/src/messages.txt from the prost sources of
the k8s-pb crate: every message's field numbers and wire kinds, plus the
apiVersion -> proto package table. The output is committed; building the
crate never runs this script.

Usage: scripts/gen-kubeproto.py [--go MODULE=DIR ...] [path/to/k8s-pb-X.Y.Z]

  e.g. --go api=~/src/k8s.io/api --go apimachinery=~/src/k8s.io/apimachinery
       --go apiextensions_apiserver=~/src/k8s.io/apiextensions-apiserver
       --go kube_aggregator=~/src/k8s.io/kube-aggregator

MODULE is the k8s-pb module the checkout's packages map to. The optional Go
sources add
what the protobuf schema cannot say: which singular scalars are Go pointers or
lack `omitempty` (so their zero value is real data, like `replicas: 0`) and
the exact JSON names. Without them those fields are marked unknown and the
decoder falls back to heuristics.
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "orchestrator/kubeproto/src/messages.txt")

FIELD_RE = re.compile(
    r"#\[prost\((?P<attr>[^\]]*)\)\]\s*pub (?:r#)?(?P<name>\w+):\s*(?P<ty>.*?),\s*(?=#\[prost|$)",
    re.S,
)
SCALARS = {"string", "bytes", "int32", "int64", "bool", "double", "float",
           "uint32", "uint64", "sint32", "sint64", "fixed32", "fixed64",
           "sfixed32", "sfixed64"}


GO_FIELDS = {}
GO_FIELD_RE = re.compile(
    r'^\s+(?:(\w+)\s+)?(\*?)[\w.\[\]*]+\s+`[^`]*json:"([^"]*)"[^`]*protobuf:"\w+,(\d+),',
    re.M,
)


def load_go(root, prefix):
    """(module, lowercased struct) -> {tag: (zero_kept, json_name)} from the
    struct tags of Go API types under `root`."""
    for path in glob.glob(os.path.join(root, "**", "*.go"), recursive=True):
        base = os.path.basename(path)
        if base.endswith("_test.go") or base.startswith(("zz_", "generated")):
            continue
        rel = os.path.relpath(os.path.dirname(path), root).split(os.sep)
        module = tuple(prefix + rel)
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"^type (\w+) struct \{(.*?)^\}", text, re.M | re.S):
            # Go type names are the proto message names.
            REAL_NAMES[(module, m.group(1).lower())] = m.group(1)
            fields = GO_FIELDS.setdefault((module, m.group(1).lower()), {})
            for f in GO_FIELD_RE.finditer(m.group(2)):
                _, pointer, json, tag = f.groups()
                name, _, opts = json.partition(",")
                kept = bool(pointer) or "omitempty" not in opts.split(",")
                fields[int(tag)] = (kept, name)


def find_crate():
    args = sys.argv[1:]
    while len(args) >= 2 and args[0] == "--go":
        module, _, root = args[1].partition("=")
        load_go(os.path.expanduser(root), [module])
        args = args[2:]
    if args:
        return args[0]
    home = os.path.expanduser("~/.cargo/registry/src")
    found = sorted(glob.glob(os.path.join(home, "*", "k8s-pb-*")))
    if not found:
        sys.exit("k8s-pb sources not found; pass the crate directory")
    return found[-1]


# prost renames messages to Rust CamelCase (AWSElasticBlockStoreVolumeSource
# becomes AwsElasticBlockStoreVolumeSource); the real names, which OpenAPI
# definitions and envelope kinds use, are recovered from k8s-openapi's types.
REAL_NAMES = {}
# (module, lowercased name) -> JSON-ish field names of k8s-openapi's struct,
# lowercased without underscores. A prost message field missing there is a Go
# embedded struct (`json:",inline"`, like Volume.VolumeSource), whose fields
# the JSON form flattens into the parent.
REAL_FIELDS = {}


def load_real_names(registry):
    for crate in sorted(glob.glob(os.path.join(registry, "k8s-openapi-*"))):
        src = os.path.join(crate, "src")
        for path in glob.glob(os.path.join(src, "v*", "**", "*.rs"), recursive=True):
            rel = os.path.relpath(os.path.dirname(path), src).split(os.sep)[1:]
            text = open(path, encoding="utf-8").read()
            # Types with a custom JSON form are tuple structs or enums there.
            for m in re.finditer(r"^pub (?:struct|enum) (\w+)", text, re.M):
                REAL_NAMES[(tuple(rel), m.group(1).lower())] = m.group(1)
            for m in re.finditer(r"^pub struct (\w+) \{(.*?)^\}", text, re.M | re.S):
                key = (tuple(rel), m.group(1).lower())
                REAL_NAMES[key] = m.group(1)
                fields = REAL_FIELDS.setdefault(key, set())
                for f in re.finditer(r"^    pub (?:r#)?(\w+):", m.group(2), re.M):
                    fields.add(f.group(1).replace("_", "").lower())


def full_name(mod, name):
    name = REAL_NAMES.get((tuple(mod), name.lower()), name)
    return "k8s.io." + ".".join(list(mod) + [name])


def resolve(module, ty):
    """Full proto name of a Rust type path written inside `module`."""
    parts = ty.split("::")
    mod = list(module)
    while parts and parts[0] == "super":
        parts.pop(0)
        mod.pop()
    return full_name(mod + parts[:-1], parts[-1])


def inner_type(ty):
    ty = re.sub(r"\s+", "", ty)
    for wrapper in ("::core::option::Option<", "::prost::alloc::vec::Vec<",
                    "::prost::alloc::boxed::Box<"):
        while ty.startswith(wrapper):
            # rustfmt leaves a trailing comma in wrapped generic arguments.
            ty = ty[len(wrapper):-1].rstrip(",")
    return ty


def json_name(go, tag):
    name = go.get(tag, (None, ""))[1]
    return f" @{name}" if name else ""


def parse_file(path, module, out_msgs, out_groups):
    text = open(path, encoding="utf-8").read()
    # Doc comments may contain anything; drop them before matching.
    text = "\n".join(l for l in text.splitlines() if not l.strip().startswith("//"))
    # `pub struct Empty {}` closes on its own line.
    for m in re.finditer(r"^pub struct (\w+) \{(\}|.*?^\})", text, re.S | re.M):
        name, body = m.group(1), m.group(2).rstrip("}")
        fields = []
        go = GO_FIELDS.get((tuple(module), name.lower()), {})
        for f in FIELD_RE.finditer(body.strip()):
            # Split on commas outside quotes: `btree_map = "string, message"`.
            attr = [a.strip() for a in re.findall(r'(?:[^,"]|"[^"]*")+', f.group("attr"))]
            tag = next(a for a in attr if a.startswith("tag"))
            tag = int(tag.split('"')[1])
            snake = f.group("name")
            kind = attr[0]
            repeated = "repeated" in attr
            if kind.startswith("btree_map") or kind.startswith("map"):
                k, v = [s.strip() for s in kind.split('"')[1].split(",")]
                if v == "message":
                    ty = re.sub(r"\s+", "", f.group("ty"))
                    val = ty[ty.index(",") + 1:ty.rindex(">")].rstrip(",")
                    v = "." + resolve(module, val)
                fields.append(f"{tag} {snake} map {k} {v}{json_name(go, tag)}")
                continue
            if kind.startswith("bytes"):
                kind = "bytes"
            shape = "rep" if repeated else "one"
            if not repeated and tag in go:
                shape = "keep" if go[tag][0] else "omit"
            if kind == "message":
                kind = "." + resolve(module, inner_type(f.group("ty")))
                real = REAL_FIELDS.get((tuple(module), name.lower()))
                if not repeated and real and snake.replace("_", "") not in real:
                    shape = "inl"
            elif kind not in SCALARS:
                sys.exit(f"{path}: {name}.{snake}: unsupported prost kind {kind}")
            fields.append(f"{tag} {snake} {shape} {kind}{json_name(go, tag)}")
        out_msgs[full_name(module, name)] = fields
    for m in re.finditer(r'const API_VERSION: &\'static str = "([^"]+)";', text):
        out_groups[m.group(1)] = "k8s.io." + ".".join(module)


def main():
    crate = find_crate()
    load_real_names(os.path.dirname(crate))
    if not REAL_NAMES:
        sys.exit("k8s-openapi sources not found next to k8s-pb")
    src = os.path.join(crate, "src")
    msgs, groups = {}, {}
    for path in sorted(glob.glob(os.path.join(src, "**", "mod.rs"), recursive=True)):
        rel = os.path.relpath(os.path.dirname(path), src)
        parse_file(path, rel.split(os.sep), msgs, groups)
    with open(OUT, "w", encoding="utf-8") as out:
        out.write(f"# Generated by scripts/gen-kubeproto.py from {os.path.basename(crate)}; do not edit.\n")
        go = sorted({m[0][0] for m in GO_FIELDS})
        out.write(f"# Go types: {', '.join(go) if go else 'none'}\n")
        out.write("# G apiVersion package | M message | tag snake_name (one|keep|omit|rep|inl) kind [@json] | tag snake_name map key value\n")
        for api_version, package in sorted(groups.items()):
            out.write(f"G {api_version} {package}\n")
        for name in sorted(msgs):
            out.write(f"M {name}\n")
            for f in msgs[name]:
                out.write(f"{f}\n")
    print(f"{len(msgs)} messages, {len(groups)} api versions -> {OUT}")


if __name__ == "__main__":
    main()
