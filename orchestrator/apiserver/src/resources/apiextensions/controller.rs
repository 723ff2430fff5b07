//! Keeps what the server serves in step with the stored CRDs, as
//! kube-apiserver's apiextensions controllers do (naming, establishing,
//! finalizing):
//!
//! - **naming**: a CRD's requested names are accepted one by one unless
//!   another kind of its group holds them (the other CRDs' *stored*
//!   accepted names, and the built-in kinds); what it already holds stays
//!   its own. `NamesAccepted` says whether all were, and why not;
//! - **establishing**: a CRD whose names are accepted is served (its
//!   definitions in the registry, its schemas in `/openapi/v3`) under its
//!   accepted names, then marked `Established`;
//! - **finalizing**: a CRD being deleted stops taking creates; a task of
//!   its own deletes its objects (waiting for their finalizers), then
//!   drops its cleanup finalizer; once the CRD is gone it is no longer
//!   served, and watches of its kinds end.
//!
//! Every server on a store runs this from its own watch of the CRDs and
//! decides from the stored objects alone, so all serve the same kinds
//! under the same names, restarts included; status writes are
//! compare-and-swaps that change nothing when the status is already right.
//! A failed reconcile is retried with backoff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tapestry_store::{EventKind, ListOptions, StoreError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::custom::{instances_prefix, served_versions};
use super::customresourcedefinition::CLEANUP_FINALIZER;
use crate::error::{ApiError, ApiResult};
use crate::objects::{decode, finalizers, is_terminating, meta_str, now_rfc3339};
use crate::openapi::CustomKind;
use crate::registry::{ResourceDef, Subresource};
use crate::rest::{Api, Request};

const GROUP: &str = "apiextensions.k8s.io";
const VERSION: &str = "v1";
const PLURAL: &str = "customresourcedefinitions";

/// Objects a cleanup pass deletes per page.
const CLEANUP_PAGE: usize = 500;
/// How soon a cleanup held by finalizers looks again, at first and at most.
const CLEANUP_RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));
/// Backoff of a failed reconcile, first and longest.
const RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// The CRD controller of one server.
pub struct CrdController {
    api: Arc<Api>,
    crds: Arc<ResourceDef>,
    shutdown: CancellationToken,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every stored CRD as last seen (the watch keeps it current).
    known: BTreeMap<String, Value>,
    /// CRD → the state it is served from, so status-only changes (this
    /// controller's own condition writes among them) rebuild nothing.
    served_from: HashMap<String, String>,
    /// CRDs whose objects a cleanup task is deleting.
    cleaning: HashSet<String>,
    /// CRDs to reconcile again after a failure: when, and how many times
    /// it failed.
    retry: BTreeMap<String, (Instant, u32)>,
}

impl CrdController {
    pub fn new(api: Arc<Api>, shutdown: CancellationToken) -> ApiResult<Arc<Self>> {
        let crds = api
            .registry
            .get(GROUP, VERSION, PLURAL)
            .ok_or_else(|| ApiError::Internal("CustomResourceDefinitions are not served".into()))?;
        Ok(Arc::new(CrdController {
            api,
            crds,
            shutdown,
            state: Mutex::new(State::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read every stored CRD and serve what can be served; CRDs no longer
    /// stored stop being served. Returns the store revision the CRDs were
    /// read at (the watch continues from there).
    pub async fn sync(self: &Arc<Self>) -> ApiResult<i64> {
        let list = self
            .api
            .store
            .list(&self.crds.key_prefix(None), ListOptions::default())
            .await
            .map_err(ApiError::internal)?;
        let mut known = BTreeMap::new();
        for kv in &list.items {
            let crd = decode(&self.crds, kv)?;
            known.insert(meta_str(&crd, "name").to_string(), crd);
        }
        let gone: Vec<String> = {
            let mut state = self.state();
            state.known = known;
            state
                .served_from
                .keys()
                .filter(|name| !state.known.contains_key(*name))
                .cloned()
                .collect()
        };
        for name in gone {
            self.stop_serving(&name);
        }
        let names: Vec<String> = self.state().known.keys().cloned().collect();
        for name in names {
            self.reconcile_or_retry(&name).await;
        }
        Ok(list.revision)
    }

    /// Follow CRD changes until shutdown.
    pub async fn run(self: Arc<Self>, mut from: i64) {
        loop {
            let mut events = match self
                .api
                .store
                .watch(&self.crds.key_prefix(None), from)
                .await
            {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "watching custom resource definitions; listing again");
                    match self.resync().await {
                        Some(rev) => from = rev,
                        None => return,
                    }
                    continue;
                }
            };
            loop {
                let next_retry = self.state().retry.values().map(|(due, _)| *due).min();
                let event = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = sleep_until(next_retry) => {
                        let due: Vec<String> = {
                            let state = self.state();
                            let now = Instant::now();
                            state.retry.iter().filter(|(_, (at, _))| *at <= now).map(|(n, _)| n.clone()).collect()
                        };
                        for name in due {
                            self.reconcile_or_retry(&name).await;
                        }
                        continue;
                    }
                    next = events.next() => next,
                };
                let event = match event {
                    Some(Ok(event)) => event,
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!(error = %e, "custom resource definition watch ended; listing again");
                        }
                        match self.resync().await {
                            Some(rev) => from = rev,
                            None => return,
                        }
                        break;
                    }
                };
                let name = event
                    .kv
                    .key
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let group = {
                    let mut state = self.state();
                    if event.kind == EventKind::Deleted {
                        state.known.remove(&name)
                    } else {
                        match decode(&self.crds, &event.kv) {
                            Ok(crd) => state.known.insert(name.clone(), crd),
                            Err(e) => {
                                tracing::warn!(crd = %name, error = %e, "unreadable custom resource definition");
                                None
                            }
                        }
                    }
                    .as_ref()
                    .and_then(|c| c.pointer("/spec/group"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
                };
                self.reconcile_or_retry(&name).await;
                // A name this CRD held or now holds may free or take one that
                // another CRD of its group asked for.
                if let Some(group) = group {
                    for other in self.waiting_for_names(&group, &name) {
                        self.reconcile_or_retry(&other).await;
                    }
                }
            }
        }
    }

    /// List again after a broken watch, retrying until it works or the
    /// server stops.
    async fn resync(self: &Arc<Self>) -> Option<i64> {
        loop {
            match self.sync().await {
                Ok(rev) => return Some(rev),
                Err(e) => tracing::warn!(error = %e, "listing custom resource definitions"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(RETRY.1) => {}
            }
        }
    }

    /// Other CRDs of `group` whose names are not all accepted.
    fn waiting_for_names(&self, group: &str, except: &str) -> Vec<String> {
        self.state()
            .known
            .iter()
            .filter(|(name, crd)| {
                name.as_str() != except
                    && text(crd, "/spec/group") == group
                    && !has_condition(&crd["status"], "NamesAccepted", "True")
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    async fn reconcile_or_retry(self: &Arc<Self>, name: &str) {
        match self.reconcile(name).await {
            Ok(()) => {
                self.state().retry.remove(name);
            }
            Err(e) => {
                let mut state = self.state();
                let failures = state.retry.get(name).map_or(0, |(_, n)| *n) + 1;
                let backoff = RETRY.0.saturating_mul(1 << failures.min(10)).min(RETRY.1);
                tracing::warn!(crd = %name, error = %e, retry_in = ?backoff, "custom resource definition");
                state
                    .retry
                    .insert(name.to_string(), (Instant::now() + backoff, failures));
            }
        }
    }

    /// Bring one CRD's names, conditions and serving up to date with its
    /// stored object.
    async fn reconcile(self: &Arc<Self>, name: &str) -> ApiResult<()> {
        let Some(crd) = self.state().known.get(name).cloned() else {
            self.stop_serving(name);
            return Ok(());
        };
        if is_terminating(&crd) {
            if !text(&crd, "/status/acceptedNames/plural").is_empty() {
                self.serve(name, &crd, true)?;
            }
            if finalizers(&crd).iter().any(|f| f == CLEANUP_FINALIZER) {
                self.start_cleanup(name);
            }
            return Ok(());
        }
        let (accepted, conflict) = self.accepted_names(&crd);
        let established_before = has_condition(&crd["status"], "Established", "True");
        let mut updated = crd.clone();
        let status = status_of(&mut updated);
        status["acceptedNames"] = accepted;
        match &conflict {
            Some((reason, message)) => {
                set_condition(status, "NamesAccepted", "False", reason, message);
                if !established_before {
                    set_condition(
                        status,
                        "Established",
                        "False",
                        "NotAccepted",
                        "not all names are accepted",
                    );
                }
            }
            None => {
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
            }
        }
        // Served before it is said to be: a client that sees Established
        // finds the kind here.
        if has_condition(&updated["status"], "Established", "True") {
            self.serve(name, &updated, false)?;
        } else {
            self.stop_serving(name);
        }
        let status = updated["status"].clone();
        if let Some(written) = self
            .write_status(name, move |s| *s = status.clone())
            .await?
        {
            // Later reconciles in this loop see these names as taken.
            self.state().known.insert(name.to_string(), written);
        }
        Ok(())
    }

    /// The names `crd` may hold: each requested name no other kind of its
    /// group holds, else the one it already had; and the first conflict,
    /// as (condition reason, message).
    fn accepted_names(&self, crd: &Value) -> (Value, Option<(&'static str, String)>) {
        let group = text(crd, "/spec/group");
        let name = meta_str(crd, "name");
        let mut resources: HashSet<String> = HashSet::new();
        let mut kinds: HashSet<String> = HashSet::new();
        for other in self
            .state()
            .known
            .iter()
            .filter(|(n, o)| n.as_str() != name && text(o, "/spec/group") == group)
            .map(|(_, o)| o)
        {
            let names = &other["status"]["acceptedNames"];
            resources.extend(names_of(names, &["plural", "singular"], "shortNames"));
            kinds.extend(names_of(names, &["kind", "listKind"], ""));
        }
        for builtin in self
            .api
            .registry
            .builtin()
            .iter()
            .filter(|d| d.group == group)
        {
            resources.extend([builtin.plural.clone(), builtin.singular.clone()]);
            resources.extend(builtin.short_names.iter().cloned());
            kinds.extend([builtin.kind.clone(), builtin.list_kind.clone()]);
        }
        let requested = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
        let mut accepted = crd
            .pointer("/status/acceptedNames")
            .filter(|v| v.is_object())
            .cloned()
            .unwrap_or(json!({"plural": "", "kind": ""}));
        let mut conflict = None;
        let mut take = |field: &str, taken: &HashSet<String>, reason: &'static str| {
            let wanted = requested.get(field).cloned().unwrap_or(Value::Null);
            let clash = match &wanted {
                Value::String(s) => (!s.is_empty() && taken.contains(s)).then(|| s.clone()),
                Value::Array(list) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|s| taken.contains(*s))
                    .map(str::to_string),
                _ => None,
            };
            match clash {
                Some(clash) => {
                    conflict.get_or_insert((reason, format!("{clash:?} is already in use")));
                }
                None if wanted.is_null() => {
                    if let Some(m) = accepted.as_object_mut() {
                        m.remove(field);
                    }
                }
                None => accepted[field] = wanted,
            }
        };
        take("plural", &resources, "PluralConflict");
        take("singular", &resources, "SingularConflict");
        take("shortNames", &resources, "ShortNamesConflict");
        take("kind", &kinds, "KindConflict");
        take("listKind", &kinds, "ListKindConflict");
        take("categories", &HashSet::new(), "");
        (accepted, conflict)
    }

    /// Serve a CRD's versions in the registry and the OpenAPI documents,
    /// unless they are served from the same state already.
    fn serve(&self, name: &str, crd: &Value, terminating: bool) -> ApiResult<()> {
        let from = json!([
            crd.pointer("/metadata/generation"),
            crd.pointer("/status/acceptedNames"),
            crd.pointer("/status/storedVersions"),
            terminating
        ])
        .to_string();
        if self.state().served_from.get(name) == Some(&from) {
            return Ok(());
        }
        let versions = served_versions(crd, &self.api.fields.builtin_schema(), terminating)
            .map_err(|e| ApiError::Internal(format!("custom resource definition {name}: {e}")))?;
        let kinds: Vec<CustomKind> = versions
            .iter()
            .map(|v| CustomKind {
                info: crate::openapi::resource_info(&v.def),
                schema: v.schema_json.clone(),
            })
            .collect();
        let mut defs: Vec<Arc<ResourceDef>> =
            versions.into_iter().map(|v| Arc::new(v.def)).collect();
        defs.sort_by(|a, b| crate::discovery::version_priority(&a.version, &b.version));
        self.api.registry.set_custom(name, defs);
        self.api.openapi.set_custom(name, kinds);
        self.state().served_from.insert(name.to_string(), from);
        Ok(())
    }

    fn stop_serving(&self, name: &str) {
        if self.state().served_from.remove(name).is_none() {
            return;
        }
        self.api.registry.set_custom(name, Vec::new());
        self.api.openapi.set_custom(name, Vec::new());
    }

    /// Apply `change` to a CRD's status through the status subresource;
    /// nothing is written when it changes nothing. Returns the object as
    /// stored when it was written.
    async fn write_status(
        &self,
        name: &str,
        change: impl Fn(&mut Value),
    ) -> ApiResult<Option<Value>> {
        let mut req = Request::internal(self.crds.clone(), None, Some(name));
        req.sub = Some(Subresource::Status);
        let mut wrote = false;
        let result = self
            .api
            .update_object(&req, |old| {
                let mut new = old.clone();
                change(status_of(&mut new));
                if new == *old {
                    return Ok(None);
                }
                wrote = true;
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                Ok(Some(new))
            })
            .await;
        match result {
            Ok(written) => Ok(wrote.then_some(written.obj)),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Delete a terminating CRD's objects in a task of its own (one per
    /// CRD), then release the CRD.
    fn start_cleanup(self: &Arc<Self>, name: &str) {
        if !self.state().cleaning.insert(name.to_string()) {
            return;
        }
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut wait = CLEANUP_RETRY.0;
            loop {
                match me.clean_up(&name).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(crd = %name, error = %e, "deleting custom resources"),
                }
                tokio::select! {
                    _ = me.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(CLEANUP_RETRY.1);
            }
            me.state().cleaning.remove(&name);
        });
    }

    /// One cleanup pass: delete what is left (through the API, so the
    /// objects' own finalizers are honoured); once nothing is, drop the
    /// cleanup finalizer. True when the CRD needs no more cleaning.
    async fn clean_up(&self, name: &str) -> ApiResult<bool> {
        let Some(kv) = self
            .api
            .store
            .get(&self.crds.key(None, name))
            .await
            .map_err(ApiError::internal)?
        else {
            return Ok(true);
        };
        let crd = decode(&self.crds, &kv)?;
        if !is_terminating(&crd) || !finalizers(&crd).iter().any(|f| f == CLEANUP_FINALIZER) {
            return Ok(true);
        }
        self.write_status(name, |status| {
            set_condition(
                status,
                "Terminating",
                "True",
                "InstanceDeletionInProgress",
                "CustomResource deletion is in progress",
            );
        })
        .await?;
        let prefix = instances_prefix(text(&crd, "/spec/group"), text(&crd, "/spec/names/plural"));
        let instance_def = self.api.registry.custom(name).into_iter().next();
        let mut left = 0usize;
        let mut start_after = None;
        loop {
            let page = self
                .api
                .store
                .list(
                    &prefix,
                    ListOptions {
                        limit: Some(CLEANUP_PAGE),
                        start_after: start_after.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(ApiError::internal)?;
            for kv in &page.items {
                let Some(def) = &instance_def else {
                    // Never served: nothing can hold these objects.
                    match self.api.store.delete(&kv.key, None).await {
                        Ok(_) | Err(StoreError::NotFound(_)) => continue,
                        Err(e) => return Err(ApiError::internal(e)),
                    }
                };
                let obj = decode(def, kv)?;
                if is_terminating(&obj) {
                    // Already asked to go; its finalizers decide when.
                    left += 1;
                    continue;
                }
                let ns = meta_str(&obj, "namespace");
                let obj_name = meta_str(&obj, "name").to_string();
                let req =
                    Request::internal(def.clone(), def.namespaced.then_some(ns), Some(&obj_name));
                match self.api.delete_one(&req, obj_name, &json!({})).await {
                    Ok(after) if is_terminating(&after) && !finalizers(&after).is_empty() => {
                        left += 1
                    }
                    Ok(_) | Err(ApiError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            if page.remaining == 0 {
                break;
            }
            start_after = page.items.last().map(|kv| kv.key.clone());
        }
        if left > 0 {
            return Ok(false);
        }
        // Creates are refused now, but one may have been in flight.
        let after = self
            .api
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
            return Ok(false);
        }
        self.write_status(name, |status| {
            set_condition(
                status,
                "Terminating",
                "False",
                "InstanceDeletionCompleted",
                "removed all instances",
            );
        })
        .await?;
        let req = Request::internal(self.crds.clone(), None, Some(name));
        let released = self
            .api
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
            Ok(_) | Err(ApiError::NotFound(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The string fields `singles` and the list field `list` of a names object.
fn names_of(names: &Value, singles: &[&str], list: &str) -> Vec<String> {
    let mut out: Vec<String> = singles
        .iter()
        .filter_map(|f| names.get(*f).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if !list.is_empty() {
        out.extend(
            names
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string),
        );
    }
    out
}

/// The status object of a CRD, made one if it is not.
fn status_of(crd: &mut Value) -> &mut Value {
    if !crd.get("status").is_some_and(Value::is_object) {
        crd["status"] = json!({});
    }
    &mut crd["status"]
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
