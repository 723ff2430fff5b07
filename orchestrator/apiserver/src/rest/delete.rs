//! Deletes: one object or a collection, honouring preconditions,
//! finalizers, propagation policy and graceful deletion.

use axum::response::Response;
use chrono::Utc;
use http::StatusCode;
use serde_json::{json, Value};
use tapestry_store::{ListOptions, StoreError};

use super::render::json_response;
use super::{Api, Request, MAX_CAS_ATTEMPTS};
use crate::error::{ApiError, ApiResult, OBJECT_MODIFIED};
use crate::objects::{decode, encode, finalizers, is_terminating, meta_mut, meta_str, now_rfc3339};

impl Api {
    pub async fn delete(&self, req: &Request) -> ApiResult<Response> {
        let options = req.delete_options(self)?;
        let obj = self
            .delete_one(req, req.name.clone().unwrap_or_default(), &options)
            .await?;
        Ok(json_response(StatusCode::OK, &obj, &[]))
    }

    /// Delete one object honouring preconditions, finalizers, propagation
    /// policy and the resource's graceful deletion.
    pub async fn delete_one(
        &self,
        req: &Request,
        name: String,
        options: &Value,
    ) -> ApiResult<Value> {
        let dry_run = delete_is_dry_run(req, options)?;
        let propagation = options
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or_else(|| req.param("propagationPolicy"))
            .map(str::to_string);
        let orphan = options.get("orphanDependents").and_then(Value::as_bool);
        let grace: Option<i64> = options
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| req.param("gracePeriodSeconds").and_then(|g| g.parse().ok()));
        let behaviour = &req.def.behaviour;
        let mut target = req.target();
        target.name = name.clone();
        let key = self.key(req, &name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let kv = self
                .store
                .get(&key)
                .await
                .map_err(|e| ApiError::from_store(e, &target))?
                .ok_or_else(|| ApiError::NotFound(target.clone()))?;
            let obj = decode(&req.def, &kv)?;
            super::noderestriction::check(req, &obj)?;
            if let Some(uid) = options
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
            {
                if uid != meta_str(&obj, "uid") {
                    return Err(ApiError::Conflict {
                        target: target.clone(),
                        message: format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&obj, "uid")),
                    });
                }
            }
            if let Some(rv) = options
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
            {
                if rv != kv.mod_revision.to_string() {
                    return Err(ApiError::Conflict {
                        target: target.clone(),
                        message: format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", kv.mod_revision),
                    });
                }
            }
            let mut updated = obj.clone();
            let mut fins = finalizers(&obj);
            let wanted_finalizer = match (propagation.as_deref(), orphan) {
                (Some("Foreground"), _) => Some("foregroundDeletion"),
                (Some("Orphan"), _) | (None, Some(true)) => Some("orphan"),
                _ => None,
            };
            if let Some(f) = wanted_finalizer {
                if !fins.iter().any(|x| x == f) {
                    fins.push(f.to_string());
                }
                fins.retain(|x| x == f || (x != "orphan" && x != "foregroundDeletion"));
            }
            if !is_terminating(&obj) {
                for f in behaviour.deletion_finalizers() {
                    if !fins.iter().any(|x| x == f) {
                        fins.push(f.to_string());
                    }
                }
            }
            let graceful = behaviour.deletion_grace_period(&obj, grace);
            let immediate = fins.is_empty() && graceful.is_none() && !behaviour.deletion_held(&obj);
            if immediate {
                if dry_run {
                    return Ok(obj);
                }
                match self.store.delete(&key, Some(kv.mod_revision)).await {
                    Ok(_) => {
                        if let Some(hook) = &req.def.hook {
                            hook.release(&obj, None).await;
                        }
                        return Ok(obj);
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(StoreError::NotFound(_)) => return Err(ApiError::NotFound(target)),
                    Err(e) => return Err(ApiError::from_store(e, &target)),
                }
            }
            // Mark for deletion: finalizers, controllers or the kubelet
            // finish the job.
            let now = now_rfc3339();
            let m = meta_mut(&mut updated);
            if fins.is_empty() {
                m.remove("finalizers");
            } else {
                m.insert("finalizers".into(), json!(fins));
            }
            if m.get("deletionTimestamp").is_none() {
                let grace_secs = graceful.unwrap_or(0);
                let when = (Utc::now() + chrono::Duration::seconds(grace_secs))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                m.insert(
                    "deletionTimestamp".into(),
                    json!(if grace_secs > 0 { when } else { now }),
                );
                m.insert("deletionGracePeriodSeconds".into(), json!(grace_secs));
            } else if let Some(g) = graceful {
                // A shorter grace period may replace a longer one.
                let current = m
                    .get("deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if g < current {
                    m.insert("deletionGracePeriodSeconds".into(), json!(g));
                }
            }
            behaviour.begin_deletion(&mut updated);
            if updated == obj {
                return Ok(obj);
            }
            if dry_run {
                return Ok(updated);
            }
            match self
                .store
                .update(&key, encode(&req.def, &updated)?, kv.mod_revision)
                .await
            {
                Ok(stored) => {
                    meta_mut(&mut updated).insert(
                        "resourceVersion".into(),
                        json!(stored.mod_revision.to_string()),
                    );
                    return Ok(updated);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ApiError::from_store(e, &target)),
            }
        }
        Err(ApiError::Conflict {
            target,
            message: OBJECT_MODIFIED.into(),
        })
    }

    pub async fn delete_collection(&self, req: &Request) -> ApiResult<Response> {
        let options = req.delete_options(self)?;
        let (labels, fields) = self.selectors(req)?;
        let prefix = self.scan_prefix(req, &fields);
        let page = self
            .store
            .list(&prefix, ListOptions::default())
            .await
            .map_err(|e| ApiError::from_store(e, &req.target()))?;
        let mut deleted = Vec::new();
        for kv in &page.items {
            let obj = decode(&req.def, kv)?;
            if !Self::matches(&req.def, &labels, &fields, &obj) {
                continue;
            }
            let name = meta_str(&obj, "name").to_string();
            let ns = meta_str(&obj, "namespace").to_string();
            let item_req = req.derived(req.def.namespaced.then_some(ns), Some(name.clone()), None);
            match self.delete_one(&item_req, name, &options).await {
                Ok(o) => deleted.push(o),
                Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let body = json!({
            "kind": req.def.list_kind,
            "apiVersion": req.def.api_version(),
            "metadata": {"resourceVersion": page.revision.to_string()},
            "items": deleted,
        });
        Ok(json_response(StatusCode::OK, &body, &[]))
    }
}

/// Whether a delete with these options only pretends: `?dryRun=All`, or
/// `dryRun: ["All"]` in its DeleteOptions.
pub(crate) fn delete_is_dry_run(req: &Request, options: &Value) -> ApiResult<bool> {
    Ok(req.dry_run()?
        || options
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All")))
}
