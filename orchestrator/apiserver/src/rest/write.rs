//! Writes: create, update and patch of one object, through one
//! read-modify-write loop that retries conflicts with concurrent writers
//! unless the client pinned a resourceVersion.

use axum::response::Response;
use serde_json::{json, Value};
use tapestry_store::StoreError;

use super::render::Written;
use super::{Api, Request, MAX_CAS_ATTEMPTS};
use crate::error::{ApiError, ApiResult, OBJECT_MODIFIED};
use crate::objects::{decode, encode, finalizers, is_terminating, meta_mut, meta_str};
use crate::patch::{self, PatchKind};

impl Api {
    pub async fn create(&self, req: &Request) -> ApiResult<Response> {
        let mut warnings = Vec::new();
        let body = self.parse_body(req)?;
        let obj = self.admit_body(req, body, &mut warnings, None)?;
        let manager = req.field_manager("unknown")?;
        let written = self.create_object(req, obj, Some(&manager)).await?;
        Ok(written.respond(req, &warnings))
    }

    /// Store a new object. `manager` records field ownership for ordinary
    /// creates; applies pass None (their managed fields are already set).
    pub(super) async fn create_object(
        &self,
        req: &Request,
        mut obj: Value,
        manager: Option<&str>,
    ) -> ApiResult<Written> {
        if req.def.terminating {
            return Err(ApiError::MethodNotAllowed {
                target: req.target(),
                message: "create not allowed while custom resource definition is terminating"
                    .into(),
            });
        }
        self.check_namespace(req).await?;
        let dry_run = req.dry_run()?;
        let generated =
            meta_str(&obj, "name").is_empty() && !meta_str(&obj, "generateName").is_empty();
        let attempts = if generated { 3 } else { 1 };
        // Only a generated name is retried, from the object as it came.
        let template = generated.then(|| obj.clone());
        for attempt in 0..attempts {
            if let Some(template) = template.as_ref().filter(|_| attempt > 0) {
                obj = template.clone();
            }
            self.prepare_create(req, &mut obj)?;
            if let Some(m) = manager {
                self.fields.record_update(&req.def, None, &mut obj, m, None);
            }
            let name = meta_str(&obj, "name").to_string();
            let key = req.def.key(req.namespace.as_deref(), &name);
            let mut target = req.target();
            target.name = name.clone();
            // Report an existing object before allocating anything for it.
            let mut exists = self.exists(&key).await?;
            if !exists {
                if let Some(hook) = &req.def.hook {
                    if let Err(e) = hook.on_create(&mut obj, dry_run).await {
                        // Another writer (a second API server bootstrapping
                        // the same objects) may have stored it since the
                        // check above and taken what the hook asked for:
                        // the object existing is the answer, not the clash.
                        exists = self.exists(&key).await?;
                        if !exists {
                            return Err(e);
                        }
                    }
                }
            }
            if exists {
                if attempt + 1 < attempts {
                    continue;
                }
                return Err(ApiError::AlreadyExists(target));
            }
            // Quota is charged last, for the object as admission left it.
            if req.def.namespaced {
                let (group, resource) = (&req.def.group, &req.def.plural);
                let charged = crate::resources::core::resourcequota::admit(
                    &*self.store,
                    group,
                    resource,
                    &obj,
                    dry_run,
                )
                .await;
                if let Err(e) = charged {
                    if let Some(hook) = req.def.hook.as_ref().filter(|_| !dry_run) {
                        hook.release(&obj, None).await;
                    }
                    return Err(e);
                }
            }
            if dry_run {
                return Ok(Written::new(obj, true));
            }
            match self.store.create(&key, encode(&req.def, &obj)?).await {
                Ok(kv) => {
                    meta_mut(&mut obj)
                        .insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
                    return Ok(Written {
                        stored: Some(kv),
                        ..Written::new(obj, true)
                    });
                }
                Err(e) => {
                    if let Some(hook) = &req.def.hook {
                        hook.release(&obj, None).await;
                    }
                    if matches!(e, StoreError::AlreadyExists(_)) && attempt + 1 < attempts {
                        continue;
                    }
                    return Err(ApiError::from_store(e, &target));
                }
            }
        }
        // Every generated name collided (the last attempt returns above).
        Err(ApiError::AlreadyExists(req.target()))
    }

    async fn exists(&self, key: &str) -> ApiResult<bool> {
        let kv = self.store.get(key).await.map_err(ApiError::internal)?;
        Ok(kv.is_some())
    }

    /// Read-modify-write of one object: `mutate` receives the current object
    /// and returns the desired one (None: leave it as it is). A store
    /// conflict means another writer got in between: the loop reads the
    /// object again and mutates that, so only a resourceVersion the client
    /// itself pinned (one the desired object carries and the stored one no
    /// longer has) ends in 409 Conflict, as in kube-apiserver's update loop.
    pub async fn update_object<F>(&self, req: &Request, mut mutate: F) -> ApiResult<Written>
    where
        F: FnMut(&Value) -> ApiResult<Option<Value>>,
    {
        let dry_run = req.dry_run()?;
        let name = req.name.clone().unwrap_or_default();
        for _ in 0..MAX_CAS_ATTEMPTS {
            let kv = self.get_kv(req, &name).await?;
            let old = decode(&req.def, &kv)?;
            let Some(mut new) = mutate(&old)? else {
                return Ok(Written {
                    stored: Some(kv),
                    ..Written::new(old, false)
                });
            };
            let pinned = meta_str(&new, "resourceVersion");
            if !pinned.is_empty() && pinned != kv.mod_revision.to_string() {
                return Err(ApiError::Conflict {
                    target: req.target(),
                    message: OBJECT_MODIFIED.into(),
                });
            }
            self.prepare_update(req, &mut new, &old)?;
            if let Some(hook) = &req.def.hook {
                hook.on_update(&mut new, &old, dry_run).await?;
            }
            // An object being deleted goes once its last finalizer is gone,
            // unless it is in a grace period (a pod until its kubelet
            // confirms) or its resource holds it longer (a namespace).
            let finished = is_terminating(&new)
                && finalizers(&new).is_empty()
                && !in_grace_period(&old)
                && !req.def.behaviour.deletion_held(&new);
            if dry_run {
                return Ok(Written::new(new, false));
            }
            let key = self.key(req, &name);
            let result = if finished {
                self.store.delete(&key, Some(kv.mod_revision)).await
            } else {
                self.store
                    .update(&key, encode(&req.def, &new)?, kv.mod_revision)
                    .await
            };
            match result {
                Ok(stored) => {
                    if let Some(hook) = &req.def.hook {
                        if finished {
                            hook.release(&new, None).await;
                        } else {
                            hook.release(&old, Some(&new)).await;
                        }
                    }
                    meta_mut(&mut new).insert(
                        "resourceVersion".into(),
                        json!(stored.mod_revision.to_string()),
                    );
                    // A finishing delete stored nothing new: `stored` is
                    // the object as it was.
                    return Ok(Written {
                        stored: (!finished).then_some(stored),
                        ..Written::new(new, false)
                    });
                }
                Err(StoreError::Conflict { .. }) => {
                    if let Some(hook) = &req.def.hook {
                        hook.release(&new, Some(&old)).await;
                    }
                }
                Err(e) => return Err(ApiError::from_store(e, &req.target())),
            }
        }
        Err(ApiError::Conflict {
            target: req.target(),
            message: OBJECT_MODIFIED.into(),
        })
    }

    /// PUT of the object or its status.
    pub async fn update(&self, req: &Request) -> ApiResult<Response> {
        let mut warnings = Vec::new();
        let body = self.parse_body(req)?;
        let body_name = meta_str(&body, "name").to_string();
        let url_name = req.name.clone().unwrap_or_default();
        if !body_name.is_empty() && body_name != url_name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
            )));
        }
        let mut obj = self.admit_body(req, body, &mut warnings, None)?;
        meta_mut(&mut obj).insert("name".into(), json!(url_name));
        let manager = req.field_manager("unknown")?;
        let sub = req.sub.map(|s| s.name());
        let written = match self
            .update_object(req, |old| {
                let mut new = obj.clone();
                self.fields
                    .record_update(&req.def, Some(old), &mut new, &manager, sub);
                Ok(Some(new))
            })
            .await
        {
            // PUT creates when the object is absent, as kube-apiserver allows
            // for most resources.
            Err(ApiError::NotFound(_)) if req.sub.is_none() => {
                let mut fresh = obj.clone();
                meta_mut(&mut fresh).remove("resourceVersion");
                self.create_object(req, fresh, Some(&manager)).await?
            }
            other => other?,
        };
        Ok(written.respond(req, &warnings))
    }

    /// PATCH of the object or its status: every patch type, server-side
    /// apply included.
    pub async fn patch(&self, req: &Request) -> ApiResult<Response> {
        let (kind, patch_doc) = req.patch_document()?;
        let mut warnings = Vec::new();
        let force = match req.param("force") {
            None | Some("false") => false,
            Some("true") => {
                if kind != PatchKind::Apply {
                    return Err(ApiError::BadRequest(
                        "force may only be set for apply patches".into(),
                    ));
                }
                true
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "invalid force value {other:?}"
                )))
            }
        };
        let manager = if kind == PatchKind::Apply {
            req.param("fieldManager")
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "PATCH requests with apply content type must include fieldManager".into(),
                    )
                })?
        } else {
            req.field_manager("unknown")?
        };
        let sub = req.sub.map(|s| s.name());
        let result = self
            .update_object(req, |old| {
                let patched = match kind {
                    PatchKind::Apply => {
                        let mut applied = self.admit_body(req, patch_doc.clone(), &mut warnings, None)?;
                        if meta_str(&applied, "name").is_empty() {
                            meta_mut(&mut applied).insert("name".into(), json!(req.name.clone().unwrap_or_default()));
                        }
                        self.fields.apply(&req.def, Some(old), &applied, &manager, force, sub)?
                    }
                    other => {
                        let mut patched = patch::apply_patch(&self.fields, &req.def, other, old, &patch_doc)?;
                        // The patch may not change identity.
                        if meta_str(&patched, "name") != meta_str(old, "name") {
                            return Err(ApiError::BadRequest(
                                "metadata.name: the name of the object cannot be changed by a patch".into(),
                            ));
                        }
                        // A patch pins the version only if it names a different
                        // one; otherwise it is reapplied on conflicts.
                        if meta_str(&patched, "resourceVersion") == meta_str(old, "resourceVersion") {
                            meta_mut(&mut patched).remove("resourceVersion");
                        }
                        let mut new = self.admit_body(req, patched, &mut warnings, Some(old))?;
                        self.fields.record_update(&req.def, Some(old), &mut new, &manager, sub);
                        new
                    }
                };
                Ok(Some(patched))
            })
            .await;
        let written = match result {
            Err(ApiError::NotFound(_)) if kind == PatchKind::Apply && req.sub.is_none() => {
                let mut applied = self.admit_body(req, patch_doc.clone(), &mut warnings, None)?;
                meta_mut(&mut applied)
                    .insert("name".into(), json!(req.name.clone().unwrap_or_default()));
                let obj = self
                    .fields
                    .apply(&req.def, None, &applied, &manager, force, None)?;
                self.create_object(req, obj, None).await?
            }
            other => other?,
        };
        Ok(written.respond(req, &warnings))
    }
}

/// An object deleted with a grace period is removed only once a delete
/// with grace period 0 confirms it, as kube-apiserver's generic store has
/// it (`ShouldDeleteDuringUpdate`).
fn in_grace_period(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|g| g > 0)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    /// A patch naming a resourceVersion applies to that version only, as a
    /// writer working from a cached copy needs: an older one is a 409
    /// Conflict and changes nothing; the current one applies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_patch_pinned_to_an_older_version_conflicts() {
        let server = crate::testing::start().await;
        let pods = "/api/v1/namespaces/default/pods";
        let pod = json!({"metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}});
        let created = server.send("POST", pods, &pod).await;
        let status = format!("{pods}/p/status");
        server
            .send("PATCH", &status, &json!({"status": {"phase": "Succeeded"}}))
            .await;

        let stale = json!({"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
            "status": {"phase": "Running"}});
        let (code, answer) = server.request("PATCH", &status, &stale).await;
        assert_eq!(code, http::StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["reason"], "Conflict", "{answer}");
        let now = server.send("GET", &format!("{pods}/p"), &Value::Null).await;
        assert_eq!(now["status"]["phase"], "Succeeded");

        let current = json!({"metadata": {"resourceVersion": now["metadata"]["resourceVersion"]},
            "status": {"message": "done"}});
        let patched = server.send("PATCH", &status, &current).await;
        assert_eq!(patched["status"]["message"], "done");
        assert_eq!(patched["status"]["phase"], "Succeeded");
    }

    /// An emptied finalizer list is dropped, as Kubernetes omits it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_finalizer_list_is_dropped() {
        let server = crate::testing::start().await;
        let cms = "/api/v1/namespaces/default/configmaps";
        let cm = json!({"metadata": {"name": "c", "finalizers": ["example.com/hold"]}});
        server.send("POST", cms, &cm).await;
        let emptied = server
            .send(
                "PATCH",
                &format!("{cms}/c"),
                &json!({"metadata": {"finalizers": []}}),
            )
            .await;
        assert!(emptied["metadata"].get("finalizers").is_none(), "{emptied}");
        let created = server
            .send(
                "POST",
                cms,
                &json!({"metadata": {"name": "d", "finalizers": []}}),
            )
            .await;
        assert!(created["metadata"].get("finalizers").is_none(), "{created}");
    }
}
