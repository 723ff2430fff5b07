//! The REST operations of the served resources, as a neutral model that is
//! rendered into both Swagger 2.0 and OpenAPI 3.0.

use std::borrow::Cow;

use serde_json::{json, Map, Value};

use crate::{Error, ResourceInfo};

pub(crate) const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Gvk {
    pub group: String,
    pub version: String,
    pub kind: String,
}

impl Gvk {
    pub fn new(group: &str, version: &str, kind: &str) -> Self {
        Gvk {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"group": self.group, "kind": self.kind, "version": self.version})
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum In {
    Path,
    Query,
}

#[derive(Clone, Debug)]
pub(crate) struct Param {
    pub name: &'static str,
    pub location: In,
    /// `string`, `boolean` or `integer`
    pub ty: &'static str,
    pub description: Cow<'static, str>,
    pub required: bool,
}

const fn query(name: &'static str, ty: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: In::Query,
        ty,
        description: Cow::Borrowed(description),
        required: false,
    }
}

const PRETTY: Param = query("pretty", "string", "If 'true', the output is indented.");
const DRY_RUN: Param = query(
    "dryRun",
    "string",
    "If present, the request is validated and processed but nothing is persisted. The only accepted value is 'All'.",
);
const FIELD_MANAGER: Param = query(
    "fieldManager",
    "string",
    "Name of the actor making the change, recorded in the object's managed fields. Required for apply patches; at most 128 printable characters.",
);
const FIELD_VALIDATION: Param = query(
    "fieldValidation",
    "string",
    "What to do with unknown or duplicate fields in the request body: 'Ignore' drops them silently, 'Warn' drops them and returns a warning for each, 'Strict' fails the request.",
);
const FORCE: Param = query(
    "force",
    "boolean",
    "Apply patches only: take ownership of fields that other managers own instead of failing with a conflict. Must be unset for other patch types.",
);
const ALLOW_WATCH_BOOKMARKS: Param = query(
    "allowWatchBookmarks",
    "boolean",
    "Ask for BOOKMARK events during a watch. The server may ignore the request.",
);
const CONTINUE: Param = query(
    "continue",
    "string",
    "The token of a previous paginated list response, to fetch the next page.",
);
const FIELD_SELECTOR: Param = query(
    "fieldSelector",
    "string",
    "Only objects whose fields match this selector are returned.",
);
const LABEL_SELECTOR: Param = query(
    "labelSelector",
    "string",
    "Only objects whose labels match this selector are returned.",
);
const LIMIT: Param = query(
    "limit",
    "integer",
    "Maximum number of objects to return. If there are more, the list metadata carries a continue token.",
);
const RESOURCE_VERSION: Param = query(
    "resourceVersion",
    "string",
    "The resource version the read must be consistent with; see resourceVersionMatch. For a watch, events after this version are sent.",
);
const RESOURCE_VERSION_MATCH: Param = query(
    "resourceVersionMatch",
    "string",
    "How resourceVersion applies to a list: 'Exact' or 'NotOlderThan'.",
);
const SEND_INITIAL_EVENTS: Param = query(
    "sendInitialEvents",
    "boolean",
    "With watch=true, begin with ADDED events for the current objects, followed by a bookmark.",
);
const TIMEOUT_SECONDS: Param = query(
    "timeoutSeconds",
    "integer",
    "Time limit of the list or watch call, in seconds.",
);
const WATCH: Param = query(
    "watch",
    "boolean",
    "Stream the changes to the selected objects as watch events instead of listing them.",
);
const GRACE_PERIOD: Param = query(
    "gracePeriodSeconds",
    "integer",
    "Seconds to wait before the object is deleted; zero deletes at once.",
);
const ORPHAN_DEPENDENTS: Param = query(
    "orphanDependents",
    "boolean",
    "Deprecated in favour of propagationPolicy: whether dependents are orphaned.",
);
const PROPAGATION_POLICY: Param = query(
    "propagationPolicy",
    "string",
    "What happens to dependent objects: 'Orphan', 'Background' or 'Foreground'.",
);

const LIST_PARAMS: &[Param] = &[
    ALLOW_WATCH_BOOKMARKS,
    CONTINUE,
    FIELD_SELECTOR,
    LABEL_SELECTOR,
    LIMIT,
    RESOURCE_VERSION,
    RESOURCE_VERSION_MATCH,
    SEND_INITIAL_EVENTS,
    TIMEOUT_SECONDS,
    WATCH,
];
const WRITE_PARAMS: &[Param] = &[DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION];
const PATCH_PARAMS: &[Param] = &[DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION, FORCE];
const DELETE_PARAMS: &[Param] = &[DRY_RUN, GRACE_PERIOD, ORPHAN_DEPENDENTS, PROPAGATION_POLICY];
const DELETE_COLLECTION_PARAMS: &[Param] = &[
    CONTINUE,
    DRY_RUN,
    FIELD_SELECTOR,
    GRACE_PERIOD,
    LABEL_SELECTOR,
    LIMIT,
    ORPHAN_DEPENDENTS,
    PROPAGATION_POLICY,
    RESOURCE_VERSION,
    RESOURCE_VERSION_MATCH,
    SEND_INITIAL_EVENTS,
    TIMEOUT_SECONDS,
];
const LOG_PARAMS: &[Param] = &[
    query(
        "container",
        "string",
        "The container to read logs of; may be omitted if the pod has one container.",
    ),
    query("follow", "boolean", "Keep streaming new log lines."),
    query(
        "insecureSkipTLSVerifyBackend",
        "boolean",
        "Do not verify the serving certificate of the node that holds the logs.",
    ),
    query("limitBytes", "integer", "Stop after this many bytes."),
    query(
        "previous",
        "boolean",
        "Return the logs of the previous, terminated instance of the container.",
    ),
    query(
        "sinceSeconds",
        "integer",
        "Only lines newer than this many seconds.",
    ),
    query(
        "sinceTime",
        "string",
        "Only lines newer than this RFC 3339 time.",
    ),
    query("tailLines", "integer", "Only the last this many lines."),
    query(
        "timestamps",
        "boolean",
        "Prefix every line with its RFC 3339 timestamp.",
    ),
];
const EXEC_PARAMS: &[Param] = &[
    query(
        "command",
        "string",
        "The command to run; repeat the parameter for each argument.",
    ),
    query(
        "container",
        "string",
        "The container to run the command in.",
    ),
    query("stderr", "boolean", "Stream the standard error."),
    query("stdin", "boolean", "Stream the standard input."),
    query("stdout", "boolean", "Stream the standard output."),
    query("tty", "boolean", "Allocate a terminal."),
];
const ATTACH_PARAMS: &[Param] = &[
    query("container", "string", "The container to attach to."),
    query("stderr", "boolean", "Stream the standard error."),
    query("stdin", "boolean", "Stream the standard input."),
    query("stdout", "boolean", "Stream the standard output."),
    query("tty", "boolean", "The attached process has a terminal."),
];
const PORTFORWARD_PARAMS: &[Param] = &[query("ports", "integer", "The pod ports to forward.")];
const PROXY_PARAMS: &[Param] = &[query("path", "string", "The path of the proxied request.")];

/// Content types of requests and responses.
pub(crate) const JSON: &[&str] = &["application/json"];
pub(crate) const LIST_PRODUCES: &[&str] = &["application/json", "application/json;stream=watch"];
pub(crate) const ANY: &[&str] = &["*/*"];
pub(crate) const PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];
/// What custom resources take: no strategic merge patches.
pub(crate) const PATCH_TYPES_WITHOUT_STRATEGIC: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
];
pub(crate) const TEXT: &[&str] = &["text/plain", "application/json"];

/// A request or response payload.
#[derive(Clone, Debug)]
pub(crate) enum Payload {
    /// An object of the named definition.
    Def(String),
    /// Free text (logs, streams).
    Text,
}

#[derive(Clone, Debug)]
pub(crate) struct Operation {
    /// `get`, `put`, `post`, `patch`, `delete`, ...
    pub method: &'static str,
    pub id: String,
    pub description: String,
    pub tag: String,
    /// `x-kubernetes-action`
    pub action: &'static str,
    pub gvk: Option<Gvk>,
    pub params: Vec<Param>,
    pub body: Option<(Payload, bool, &'static [&'static str])>,
    pub responses: Vec<(u16, Payload)>,
    pub produces: &'static [&'static str],
}

#[derive(Clone, Debug)]
pub(crate) struct PathItem {
    pub path: String,
    /// The OpenAPI v3 document it belongs to, e.g. `apis/apps/v1`.
    pub group_version: String,
    pub params: Vec<Param>,
    pub ops: Vec<Operation>,
}

/// `apps` -> `Apps`, `coordination.k8s.io` -> `Coordination`,
/// `rbac.authorization.k8s.io` -> `RbacAuthorization`, `` -> `Core`.
fn group_camel(group: &str) -> String {
    if group.is_empty() {
        return "Core".into();
    }
    let group = group.strip_suffix(".k8s.io").unwrap_or(group);
    group.split(['.', '-']).map(upper_first).collect()
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The v3 document key of a group version.
pub(crate) fn group_version_key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// What a subresource looks like: its payload type, kind and operations.
enum Sub {
    /// Read/replace/patch of an object (the parent's type unless given).
    Object {
        def: Option<(&'static str, Gvk)>,
        verbs: &'static [&'static str],
    },
    /// Create of another object type (binding, eviction, token).
    Create { def: &'static str, gvk: Gvk },
    /// Streaming text read (log).
    Log,
    /// Connections (exec, attach, port-forward, proxy).
    Connect {
        methods: &'static [&'static str],
        params: &'static [Param],
        with_path: bool,
    },
}

fn subresource(name: &str) -> Option<Sub> {
    Some(match name {
        "status" | "approval" | "ephemeralcontainers" | "resize" => Sub::Object {
            def: None,
            verbs: &["get", "update", "patch"],
        },
        "finalize" => Sub::Object {
            def: None,
            verbs: &["update"],
        },
        "scale" => Sub::Object {
            def: Some((
                "io.k8s.api.autoscaling.v1.Scale",
                Gvk::new("autoscaling", "v1", "Scale"),
            )),
            verbs: &["get", "update", "patch"],
        },
        "binding" => Sub::Create {
            def: "io.k8s.api.core.v1.Binding",
            gvk: Gvk::new("", "v1", "Binding"),
        },
        "eviction" => Sub::Create {
            def: "io.k8s.api.policy.v1.Eviction",
            gvk: Gvk::new("policy", "v1", "Eviction"),
        },
        "token" => Sub::Create {
            def: "io.k8s.api.authentication.v1.TokenRequest",
            gvk: Gvk::new("authentication.k8s.io", "v1", "TokenRequest"),
        },
        "log" => Sub::Log,
        "exec" => Sub::Connect {
            methods: &["get", "post"],
            params: EXEC_PARAMS,
            with_path: false,
        },
        "attach" => Sub::Connect {
            methods: &["get", "post"],
            params: ATTACH_PARAMS,
            with_path: false,
        },
        "portforward" => Sub::Connect {
            methods: &["get", "post"],
            params: PORTFORWARD_PARAMS,
            with_path: false,
        },
        "proxy" => Sub::Connect {
            methods: &["get", "put", "post", "patch", "delete", "options", "head"],
            params: PROXY_PARAMS,
            with_path: true,
        },
        _ => return None,
    })
}

/// Definitions the subresources of `resources` need besides the resources'
/// own (they must be generated too).
pub(crate) fn subresource_definitions(resources: &[ResourceInfo]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for r in resources {
        for s in &r.subresources {
            match subresource(s) {
                Some(Sub::Object {
                    def: Some((d, _)), ..
                })
                | Some(Sub::Create { def: d, .. }) => out.push(d),
                _ => {}
            }
        }
    }
    out
}

/// The GVKs the subresources of `r` attach to other definitions.
pub(crate) fn subresource_gvks(r: &ResourceInfo) -> Vec<(&'static str, Gvk)> {
    r.subresources
        .iter()
        .filter_map(|s| match subresource(s)? {
            Sub::Object {
                def: Some((d, gvk)),
                ..
            } => Some((d, gvk)),
            Sub::Create { def, gvk } => Some((def, gvk)),
            _ => None,
        })
        .collect()
}

fn def_ref(name: &str) -> Payload {
    Payload::Def(name.into())
}

/// Builds the path items of one resource.
pub(crate) fn resource_paths(r: &ResourceInfo) -> Result<Vec<PathItem>, Error> {
    let has = |verb: &str| r.verbs.iter().any(|v| v == verb);
    let gv = group_version_key(&r.group, &r.version);
    let prefix = format!("/{gv}");
    let tag = format!("{}_{}", lower_first(&group_camel(&r.group)), r.version);
    let gvk = Gvk::new(&r.group, &r.version, &r.kind);
    let ns = if r.namespaced { "Namespaced" } else { "" };
    let id = |verb: &str, suffix: &str| {
        format!(
            "{verb}{}{}{ns}{}{suffix}",
            group_camel(&r.group),
            upper_first(&r.version),
            r.kind
        )
    };
    let kind = &r.kind;
    let def = r.definition.as_str();
    let status = format!("{META}Status");
    let delete_options = format!("{META}DeleteOptions");
    let op = |method, id: String, description: String, action, gvk: Option<Gvk>| Operation {
        method,
        id,
        description,
        tag: tag.clone(),
        action,
        gvk,
        params: Vec::new(),
        body: None,
        responses: Vec::new(),
        produces: JSON,
    };

    let collection = if r.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("{prefix}/{}", r.plural)
    };
    let item = format!("{collection}/{{name}}");
    let namespace = Param {
        name: "namespace",
        location: In::Path,
        ty: "string",
        description: "The object's namespace.".into(),
        required: true,
    };
    let name = Param {
        name: "name",
        location: In::Path,
        ty: "string",
        description: format!("Name of the {kind}.").into(),
        required: true,
    };
    let scope = |with_name: bool| {
        let mut p = Vec::new();
        if with_name {
            p.push(name.clone());
        }
        if r.namespaced {
            p.push(namespace.clone());
        }
        p.push(PRETTY);
        p
    };
    let item_path = |path: String, ops: Vec<Operation>| PathItem {
        path,
        group_version: gv.clone(),
        params: scope(true),
        ops,
    };

    let mut items = Vec::new();

    // The collection: list (and watch), create, delete collection.
    let mut ops = Vec::new();
    if has("list") {
        let mut o = op(
            "get",
            id("list", ""),
            format!("List or watch {kind} objects."),
            "list",
            Some(gvk.clone()),
        );
        o.params = LIST_PARAMS.to_vec();
        o.responses = vec![(200, def_ref(&format!("{def}List")))];
        o.produces = LIST_PRODUCES;
        ops.push(o);
    }
    if has("create") {
        let mut o = op(
            "post",
            id("create", ""),
            format!("Create a {kind}."),
            "post",
            Some(gvk.clone()),
        );
        o.params = WRITE_PARAMS.to_vec();
        o.body = Some((def_ref(def), true, ANY));
        o.responses = vec![
            (200, def_ref(def)),
            (201, def_ref(def)),
            (202, def_ref(def)),
        ];
        ops.push(o);
    }
    if has("deletecollection") {
        let mut o = op(
            "delete",
            id("deleteCollection", ""),
            format!("Delete a collection of {kind} objects."),
            "deletecollection",
            Some(gvk.clone()),
        );
        o.params = DELETE_COLLECTION_PARAMS.to_vec();
        o.body = Some((def_ref(&delete_options), false, ANY));
        o.responses = vec![(200, def_ref(&status))];
        ops.push(o);
    }
    if !ops.is_empty() {
        items.push(PathItem {
            path: collection.clone(),
            group_version: gv.clone(),
            params: scope(false),
            ops,
        });
    }

    // Across all namespaces.
    if r.namespaced && has("list") {
        let mut o = op(
            "get",
            format!(
                "list{}{}{}ForAllNamespaces",
                group_camel(&r.group),
                upper_first(&r.version),
                r.kind
            ),
            format!("List or watch {kind} objects in all namespaces."),
            "list",
            Some(gvk.clone()),
        );
        o.params = LIST_PARAMS.to_vec();
        o.responses = vec![(200, def_ref(&format!("{def}List")))];
        o.produces = LIST_PRODUCES;
        items.push(PathItem {
            path: format!("{prefix}/{}", r.plural),
            group_version: gv.clone(),
            params: vec![PRETTY],
            ops: vec![o],
        });
    }

    // One object.
    let object_ops = |def: &str, gvk: &Gvk, verbs: &[&str], suffix: &str, what: &str| {
        let mut ops = Vec::new();
        let of = if what.is_empty() {
            format!("the named {kind}")
        } else {
            format!("{what} of the named {kind}")
        };
        let allowed = |v: &str| verbs.contains(&v) && has(v);
        if allowed("get") {
            let mut o = op(
                "get",
                id("read", suffix),
                format!("Read {of}."),
                "get",
                Some(gvk.clone()),
            );
            o.responses = vec![(200, def_ref(def))];
            ops.push(o);
        }
        if allowed("update") {
            let mut o = op(
                "put",
                id("replace", suffix),
                format!("Replace {of}."),
                "put",
                Some(gvk.clone()),
            );
            o.params = WRITE_PARAMS.to_vec();
            o.body = Some((def_ref(def), true, ANY));
            o.responses = vec![(200, def_ref(def)), (201, def_ref(def))];
            ops.push(o);
        }
        if allowed("patch") {
            let mut o = op(
                "patch",
                id("patch", suffix),
                format!("Partially update {of}."),
                "patch",
                Some(gvk.clone()),
            );
            o.params = PATCH_PARAMS.to_vec();
            let patch_types = if r.strategic_merge {
                PATCH_TYPES
            } else {
                PATCH_TYPES_WITHOUT_STRATEGIC
            };
            o.body = Some((def_ref(&format!("{META}Patch")), true, patch_types));
            o.responses = vec![(200, def_ref(def)), (201, def_ref(def))];
            ops.push(o);
        }
        ops
    };
    let mut ops = object_ops(def, &gvk, &["get", "update", "patch"], "", "");
    if has("delete") {
        let mut o = op(
            "delete",
            id("delete", ""),
            format!("Delete the named {kind}."),
            "delete",
            Some(gvk.clone()),
        );
        o.params = DELETE_PARAMS.to_vec();
        o.body = Some((def_ref(&delete_options), false, ANY));
        o.responses = vec![(200, def_ref(&status)), (202, def_ref(&status))];
        ops.push(o);
    }
    if !ops.is_empty() {
        items.push(item_path(item.clone(), ops));
    }

    // Subresources.
    for s in &r.subresources {
        let sub =
            subresource(s).ok_or_else(|| Error::UnknownSubresource(format!("{}/{s}", r.plural)))?;
        let suffix = upper_first(s);
        let path = format!("{item}/{s}");
        match sub {
            Sub::Object {
                def: sub_def,
                verbs,
            } => {
                let (d, g) = match &sub_def {
                    Some((d, g)) => (*d, g),
                    None => (def, &gvk),
                };
                // A subresource is served where its parent supports the verb
                // (e.g. no status updates for a read-only resource).
                let ops = object_ops(d, g, verbs, &suffix, s);
                if !ops.is_empty() {
                    items.push(item_path(path, ops));
                }
            }
            Sub::Create { def: d, gvk: g } => {
                let mut o = op(
                    "post",
                    id("create", &suffix),
                    format!("Create the {s} of the named {kind}."),
                    "post",
                    Some(g),
                );
                o.params = WRITE_PARAMS.to_vec();
                o.body = Some((def_ref(d), true, ANY));
                o.responses = vec![(200, def_ref(d)), (201, def_ref(d)), (202, def_ref(d))];
                items.push(item_path(path, vec![o]));
            }
            Sub::Log => {
                let mut o = op(
                    "get",
                    id("read", &suffix),
                    format!("Read the log of the named {kind}."),
                    "get",
                    None,
                );
                o.params = LOG_PARAMS.to_vec();
                o.responses = vec![(200, Payload::Text)];
                o.produces = TEXT;
                items.push(item_path(path, vec![o]));
            }
            Sub::Connect {
                methods,
                params,
                with_path,
            } => {
                let connect_ops = |suffix: &str| {
                    methods
                        .iter()
                        .map(|m| {
                            let mut o = op(
                                m,
                                id(&format!("connect{}", upper_first(m)), suffix),
                                format!(
                                    "Connect {} requests to the {s} of the named {kind}.",
                                    m.to_uppercase()
                                ),
                                "connect",
                                None,
                            );
                            o.params = params.to_vec();
                            o.responses = vec![(200, Payload::Text)];
                            o.produces = ANY;
                            o
                        })
                        .collect::<Vec<_>>()
                };
                items.push(item_path(path.clone(), connect_ops(&suffix)));
                if with_path {
                    let mut item = item_path(
                        format!("{path}/{{path}}"),
                        connect_ops(&format!("{suffix}WithPath")),
                    );
                    item.params.insert(
                        0,
                        Param {
                            name: "path",
                            location: In::Path,
                            ty: "string",
                            description: "The path of the proxied request.".into(),
                            required: true,
                        },
                    );
                    items.push(item);
                }
            }
        }
    }
    Ok(items)
}

/// `GET /api/v1/`, `GET /apis/apps/v1/`: the group version's resource list.
pub(crate) fn discovery_path(group: &str, version: &str) -> PathItem {
    let gv = group_version_key(group, version);
    PathItem {
        path: format!("/{gv}/"),
        group_version: gv,
        params: Vec::new(),
        ops: vec![Operation {
            method: "get",
            id: format!(
                "get{}{}APIResources",
                group_camel(group),
                upper_first(version)
            ),
            description: "List the resources of this group version.".into(),
            tag: format!("{}_{}", lower_first(&group_camel(group)), version),
            action: "get",
            gvk: None,
            params: Vec::new(),
            body: None,
            responses: vec![(200, def_ref(&format!("{META}APIResourceList")))],
            produces: JSON,
        }],
    }
}

/// Which OpenAPI version to render.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    V2,
    V3,
}

impl Flavor {
    pub fn ref_prefix(self) -> &'static str {
        match self {
            Flavor::V2 => "#/definitions/",
            Flavor::V3 => "#/components/schemas/",
        }
    }
}

fn render_param(p: &Param, flavor: Flavor) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), p.name.into());
    m.insert(
        "in".into(),
        if p.location == In::Path {
            "path"
        } else {
            "query"
        }
        .into(),
    );
    m.insert("description".into(), p.description.as_ref().into());
    if p.required {
        m.insert("required".into(), true.into());
    }
    match flavor {
        Flavor::V2 => {
            m.insert("type".into(), p.ty.into());
        }
        Flavor::V3 => {
            m.insert("schema".into(), json!({"type": p.ty}));
        }
    }
    Value::Object(m)
}

fn payload_schema(p: &Payload, flavor: Flavor) -> Value {
    match p {
        Payload::Def(d) => json!({"$ref": format!("{}{d}", flavor.ref_prefix())}),
        Payload::Text => json!({"type": "string"}),
    }
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        _ => "Unauthorized",
    }
}

fn render_op(o: &Operation, flavor: Flavor) -> Value {
    let mut m = Map::new();
    m.insert("description".into(), o.description.clone().into());
    m.insert("operationId".into(), o.id.clone().into());
    m.insert("tags".into(), json!([o.tag]));
    let mut params: Vec<Value> = o.params.iter().map(|p| render_param(p, flavor)).collect();
    let mut responses = Map::new();
    for (code, payload) in &o.responses {
        let schema = payload_schema(payload, flavor);
        let body = match flavor {
            Flavor::V2 => json!({"description": status_text(*code), "schema": schema}),
            Flavor::V3 => {
                let content: Map<String, Value> = o
                    .produces
                    .iter()
                    .map(|ct| (ct.to_string(), json!({"schema": schema})))
                    .collect();
                json!({"description": status_text(*code), "content": content})
            }
        };
        responses.insert(code.to_string(), body);
    }
    responses.insert("401".into(), json!({"description": status_text(401)}));
    match flavor {
        Flavor::V2 => {
            if let Some((payload, required, consumes)) = &o.body {
                m.insert("consumes".into(), json!(consumes));
                let mut body = json!({"name": "body", "in": "body", "schema": payload_schema(payload, flavor)});
                if *required {
                    body["required"] = true.into();
                }
                params.insert(0, body);
            }
            m.insert("produces".into(), json!(o.produces));
            m.insert("schemes".into(), json!(["https"]));
        }
        Flavor::V3 => {
            if let Some((payload, required, consumes)) = &o.body {
                let schema = payload_schema(payload, flavor);
                let content: Map<String, Value> = consumes
                    .iter()
                    .map(|ct| (ct.to_string(), json!({"schema": schema})))
                    .collect();
                let mut body = json!({"content": content});
                if *required {
                    body["required"] = true.into();
                }
                m.insert("requestBody".into(), body);
            }
        }
    }
    if !params.is_empty() {
        m.insert("parameters".into(), Value::Array(params));
    }
    m.insert("responses".into(), Value::Object(responses));
    m.insert("x-kubernetes-action".into(), o.action.into());
    if let Some(gvk) = &o.gvk {
        m.insert("x-kubernetes-group-version-kind".into(), gvk.to_json());
    }
    Value::Object(m)
}

/// Renders a path item.
pub(crate) fn render_path(item: &PathItem, flavor: Flavor) -> Value {
    let mut m = Map::new();
    for o in &item.ops {
        m.insert(o.method.into(), render_op(o, flavor));
    }
    if !item.params.is_empty() {
        let params = item
            .params
            .iter()
            .map(|p| render_param(p, flavor))
            .collect();
        m.insert("parameters".into(), Value::Array(params));
    }
    Value::Object(m)
}
