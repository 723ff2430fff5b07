//! Keeps what the server serves in step with the stored CRDs, as
//! kube-apiserver's apiextensions controllers do (naming, establishing,
//! finalizing):
//!
//! - a CRD whose names conflict with nothing in its group is served (its
//!   definitions in the registry, its schemas in `/openapi/v3`), then
//!   marked `NamesAccepted` and `Established`;
//! - one whose names are taken gets `NamesAccepted=False` with the reason;
//! - one being deleted stops taking creates, deletes all its objects
//!   (waiting for their finalizers), then drops its cleanup finalizer;
//! - once gone, it is no longer served.
//!
//! Every server on a store runs this from its own watch of the CRDs, so
//! each serves the same custom resources; the status writes are
//! idempotent compare-and-swaps.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tapestry_store::{ListOptions, StoreError};
use tokio_util::sync::CancellationToken;

use super::custom::served_versions;
use super::customresourcedefinition::CLEANUP_FINALIZER;
use crate::error::{ApiError, ApiResult};
use crate::objects::{decode, finalizers, is_terminating, meta_str, now_rfc3339};
use crate::openapi::CustomKind;
use crate::registry::{ResourceDef, Subresource};
use crate::rest::{Api, Request};

const GROUP: &str = "apiextensions.k8s.io";
const VERSION: &str = "v1";
const PLURAL: &str = "customresourcedefinitions";

/// How often CRDs being deleted are looked at again while objects with
/// finalizers hold them.
const CLEANUP_RETRY: Duration = Duration::from_millis(500);

fn crd_def(api: &Api) -> ApiResult<Arc<ResourceDef>> {
    api.registry
        .get(GROUP, VERSION, PLURAL)
        .ok_or_else(|| ApiError::Internal("CustomResourceDefinitions are not served".into()))
}

/// Serve every stored CRD that can be served; returns the store revision
/// the CRDs were read at (the watch continues from there).
pub async fn initial_sync(api: &Api) -> ApiResult<i64> {
    let def = crd_def(api)?;
    let list = api
        .store
        .list(&def.key_prefix(None), ListOptions::default())
        .await
        .map_err(ApiError::internal)?;
    for kv in &list.items {
        let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
        if let Err(e) = reconcile(api, &name).await {
            tracing::warn!(crd = %name, error = %e, "custom resource definition not served");
        }
    }
    Ok(list.revision)
}

/// Follow CRD changes until shutdown.
pub async fn run(api: Arc<Api>, mut from: i64, shutdown: CancellationToken) {
    // `from` moves only on a new list: the watch itself never needs to
    // resume, it is replaced by a fresh list and watch when it breaks.
    let mut terminating: BTreeSet<String> = BTreeSet::new();
    loop {
        let def = match crd_def(&api) {
            Ok(def) => def,
            Err(e) => {
                tracing::error!(error = %e, "custom resource definitions cannot be followed");
                return;
            }
        };
        let prefix = def.key_prefix(None);
        let mut events = match api.store.watch(&prefix, from).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "watching custom resource definitions; listing again");
                match resync(&api, &shutdown).await {
                    Some(rev) => from = rev,
                    None => return,
                }
                continue;
            }
        };
        let mut retry = tokio::time::interval(CLEANUP_RETRY);
        loop {
            let name = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = retry.tick(), if !terminating.is_empty() => {
                    for name in terminating.clone() {
                        match reconcile(&api, &name).await {
                            Ok(Outcome::Terminating) => {}
                            Ok(_) => { terminating.remove(&name); }
                            Err(e) => tracing::warn!(crd = %name, error = %e, "cleaning up custom resources"),
                        }
                    }
                    continue;
                }
                next = events.next() => match next {
                    Some(Ok(event)) => event.kv.key.rsplit('/').next().unwrap_or_default().to_string(),
                    Some(Err(StoreError::Compacted { .. })) | Some(Err(StoreError::WatchOverflow)) | None => {
                        match resync(&api, &shutdown).await {
                            Some(rev) => from = rev,
                            None => return,
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "custom resource definition watch failed");
                        match resync(&api, &shutdown).await {
                            Some(rev) => from = rev,
                            None => return,
                        }
                        break;
                    }
                },
            };
            match reconcile(&api, &name).await {
                Ok(Outcome::Terminating) => {
                    terminating.insert(name);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(crd = %name, error = %e, "custom resource definition"),
            }
        }
    }
}

/// List again after a broken watch, retrying until it works or the server
/// stops.
async fn resync(api: &Api, shutdown: &CancellationToken) -> Option<i64> {
    loop {
        match initial_sync(api).await {
            Ok(rev) => return Some(rev),
            Err(e) => tracing::warn!(error = %e, "listing custom resource definitions"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Served,
    NotAccepted,
    /// Being deleted and still holding objects.
    Terminating,
    Gone,
}

/// Bring one CRD's serving and status up to date with its stored object.
async fn reconcile(api: &Api, name: &str) -> ApiResult<Outcome> {
    let def = crd_def(api)?;
    let Some(kv) = api
        .store
        .get(&def.key(None, name))
        .await
        .map_err(ApiError::internal)?
    else {
        stop_serving(api, name);
        return Ok(Outcome::Gone);
    };
    let crd = decode(&def, &kv)?;
    if is_terminating(&crd) {
        return clean_up(api, &def, name, &crd).await;
    }
    if let Some((reason, message)) = names_conflict(api, &crd) {
        set_status(api, &def, name, |status| {
            set_condition(status, "NamesAccepted", "False", reason, &message);
            if !has_condition(status, "Established", "True") {
                set_condition(
                    status,
                    "Established",
                    "False",
                    "NotAccepted",
                    "not all names are accepted",
                );
            }
        })
        .await?;
        return Ok(Outcome::NotAccepted);
    }
    let mut accepted = crd.clone();
    accepted["status"]["acceptedNames"] = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    serve(api, name, &accepted, false)?;
    let names = accepted["status"]["acceptedNames"].clone();
    set_status(api, &def, name, move |status| {
        status["acceptedNames"] = names.clone();
        set_condition(
            status,
            "NamesAccepted",
            "True",
            "NoConflicts",
            "no conflicts found",
        );
        set_condition(
            status,
            "Established",
            "True",
            "InitialNamesAccepted",
            "the initial names have been accepted",
        );
    })
    .await?;
    Ok(Outcome::Served)
}

/// Serve a CRD's versions in the registry and the OpenAPI documents.
fn serve(api: &Api, name: &str, crd: &Value, terminating: bool) -> ApiResult<()> {
    let versions = served_versions(crd, &api.fields.builtin_schema(), terminating)
        .map_err(|e| ApiError::Internal(format!("custom resource definition {name}: {e}")))?;
    let kinds: Vec<CustomKind> = versions
        .iter()
        .map(|v| CustomKind {
            info: crate::openapi::resource_info(&v.def),
            schema: v.schema_json.clone(),
        })
        .collect();
    let mut defs: Vec<Arc<ResourceDef>> = versions.into_iter().map(|v| Arc::new(v.def)).collect();
    defs.sort_by(|a, b| crate::discovery::version_priority(&a.version, &b.version));
    api.registry.set_custom(name, defs);
    api.openapi
        .set_custom(name, kinds)
        .map_err(ApiError::internal)?;
    Ok(())
}

fn stop_serving(api: &Api, name: &str) {
    api.registry.set_custom(name, Vec::new());
    if let Err(e) = api.openapi.set_custom(name, Vec::new()) {
        tracing::warn!(crd = %name, error = %e, "OpenAPI documents");
    }
}

/// The first of the CRD's names already used in its group by a built-in
/// resource or another served CRD: (condition reason, message).
fn names_conflict(api: &Api, crd: &Value) -> Option<(&'static str, String)> {
    let text = |p: &str| {
        crd.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let group = text("/spec/group");
    let plural = text("/spec/names/plural");
    let singular = text("/spec/names/singular");
    let kind = text("/spec/names/kind");
    let list_kind = text("/spec/names/listKind");
    let short_names: Vec<String> = crd
        .pointer("/spec/names/shortNames")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let served = api.registry.served();
    let others = served
        .all()
        .iter()
        .filter(|d| d.group == group && d.plural != plural);
    for other in others {
        let taken = |name: &str| {
            !name.is_empty()
                && (other.plural == name
                    || other.singular == name
                    || other.short_names.iter().any(|s| s == name))
        };
        if taken(&singular) {
            return Some((
                "SingularConflict",
                format!("{singular:?} is already in use"),
            ));
        }
        if let Some(s) = short_names.iter().find(|s| taken(s)) {
            return Some(("ShortNamesConflict", format!("{s:?} is already in use")));
        }
        if other.kind == kind {
            return Some(("KindConflict", format!("{kind:?} is already in use")));
        }
        if other.list_kind == list_kind {
            return Some((
                "ListKindConflict",
                format!("{list_kind:?} is already in use"),
            ));
        }
    }
    // A built-in resource of the same group and plural.
    if served
        .all()
        .iter()
        .any(|d| d.group == group && d.plural == plural && d.patch_schema.is_none())
    {
        return Some(("PluralConflict", format!("{plural:?} is already in use")));
    }
    None
}

/// A CRD being deleted: stop creates, delete its objects, and let it go
/// once none is left.
async fn clean_up(
    api: &Api,
    def: &Arc<ResourceDef>,
    name: &str,
    crd: &Value,
) -> ApiResult<Outcome> {
    if !finalizers(crd).iter().any(|f| f == CLEANUP_FINALIZER) {
        return Ok(Outcome::Gone);
    }
    // Keep serving reads and deletes of what is left, but no creates.
    let served = crd
        .pointer("/status/acceptedNames/plural")
        .and_then(Value::as_str)
        .is_some_and(|p| !p.is_empty());
    if served {
        serve(api, name, crd, true)?;
    }
    set_status(api, def, name, |status| {
        set_condition(
            status,
            "Terminating",
            "True",
            "InstanceDeletionInProgress",
            "CustomResource deletion is in progress",
        );
    })
    .await?;
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or("");
    let plural = crd
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or("");
    let prefix = format!("/registry/{group}/{plural}/");
    let remaining = api
        .store
        .list(&prefix, ListOptions::default())
        .await
        .map_err(ApiError::internal)?;
    let instance_def = api.registry.custom(name).into_iter().next();
    let mut left = 0usize;
    for kv in &remaining.items {
        let deleted = match &instance_def {
            // Through the API, so the objects' own finalizers are honoured.
            Some(idef) => {
                let obj = decode(idef, kv)?;
                let ns = meta_str(&obj, "namespace");
                let obj_name = meta_str(&obj, "name").to_string();
                let req =
                    Request::internal(idef.clone(), idef.namespaced.then_some(ns), Some(&obj_name));
                match api.delete_one(&req, obj_name.clone(), &json!({})).await {
                    Ok(obj) => !is_terminating(&obj) || finalizers(&obj).is_empty(),
                    Err(ApiError::NotFound(_)) => true,
                    Err(e) => return Err(e),
                }
            }
            // Never served: nothing can hold these objects.
            None => match api.store.delete(&kv.key, None).await {
                Ok(_) | Err(StoreError::NotFound(_)) => true,
                Err(e) => return Err(ApiError::internal(e)),
            },
        };
        if !deleted {
            left += 1;
        }
    }
    if left > 0 {
        return Ok(Outcome::Terminating);
    }
    // Check nothing was created meanwhile, then release the CRD.
    let after = api
        .store
        .list(
            &prefix,
            ListOptions {
                limit: Some(1),
                ..Default::default()
            },
        )
        .await
        .map_err(ApiError::internal)?;
    if !after.items.is_empty() {
        return Ok(Outcome::Terminating);
    }
    set_status(api, def, name, |status| {
        set_condition(
            status,
            "Terminating",
            "False",
            "InstanceDeletionCompleted",
            "removed all instances",
        );
    })
    .await?;
    let req = Request::internal(def.clone(), None, Some(name));
    let released = api
        .update_object(&req, |old| {
            let mut fins = finalizers(old);
            if !fins.iter().any(|f| f == CLEANUP_FINALIZER) {
                return Ok(None);
            }
            fins.retain(|f| f != CLEANUP_FINALIZER);
            let mut new = old.clone();
            new["metadata"]["finalizers"] = json!(fins);
            if let Some(m) = new["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            Ok(Some(new))
        })
        .await;
    match released {
        Ok(_) | Err(ApiError::NotFound(_)) => Ok(Outcome::Gone),
        Err(e) => Err(e),
    }
}

/// Apply `change` to the CRD's status through the status subresource;
/// nothing is written when it changes nothing.
async fn set_status(
    api: &Api,
    def: &Arc<ResourceDef>,
    name: &str,
    change: impl Fn(&mut Value),
) -> ApiResult<()> {
    let mut req = Request::internal(def.clone(), None, Some(name));
    req.sub = Some(Subresource::Status);
    let result = api
        .update_object(&req, |old| {
            let mut new = old.clone();
            if !new.get("status").is_some_and(Value::is_object) {
                new["status"] = json!({});
            }
            change(&mut new["status"]);
            if new == *old {
                return Ok(None);
            }
            if let Some(m) = new["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            Ok(Some(new))
        })
        .await;
    match result {
        Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn has_condition(status: &Value, kind: &str, value: &str) -> bool {
    status["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == kind && c["status"] == value))
}

/// Set a condition; its transition time moves only when its status does.
fn set_condition(status: &mut Value, kind: &str, value: &str, reason: &str, message: &str) {
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let conditions = status["conditions"]
        .as_array_mut()
        .expect("made an array above");
    let wanted = |time: Value| {
        json!({"type": kind, "status": value, "reason": reason, "message": message,
               "lastTransitionTime": time})
    };
    match conditions.iter_mut().find(|c| c["type"] == kind) {
        Some(c) if c["status"] == value => {
            if c["reason"] != reason || c["message"] != message {
                *c = wanted(c["lastTransitionTime"].clone());
            }
        }
        Some(c) => *c = wanted(json!(now_rfc3339())),
        None => conditions.push(wanted(json!(now_rfc3339()))),
    }
}
