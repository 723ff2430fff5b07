//! Template history for StatefulSets and DaemonSets, as ControllerRevisions
//! in the form `kubectl rollout history|undo` reads and applies: each
//! revision holds `{"spec": {"template": {…, "$patch": "replace"}}}`, is
//! named `<owner>-<template hash>`, is labelled with the owner's selector
//! labels, and is numbered; the revision in use is always the highest
//! number, so going back to an old template renumbers its revision.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::util::{controlled_by, owner_ref, template_hash};
use crate::Ctx;
use tapestry_runtime::{ignore_not_found, is_status};

/// The label pods carry naming the revision they were made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// An owner's revisions, oldest first.
pub fn revisions_of<K: Resource>(ctx: &Ctx, owner: &K) -> Vec<Arc<ControllerRevision>> {
    let uid = owner.meta().uid.clone().unwrap_or_default();
    let ns = owner.meta().namespace.clone().unwrap_or_default();
    let mut all = ctx
        .controllerrevisions
        .list_in(&ns, |r| controlled_by(r, &uid));
    all.sort_by_key(|r| r.revision);
    all
}

/// What a revision records of a template.
fn data(template: &PodTemplateSpec) -> Value {
    let mut template = serde_json::to_value(template).unwrap_or_default();
    template["$patch"] = json!("replace");
    json!({"spec": {"template": template}})
}

/// The template a revision recorded.
pub fn template_of(revision: &ControllerRevision) -> Option<PodTemplateSpec> {
    let mut template = revision.data.as_ref()?.0.pointer("/spec/template")?.clone();
    template.as_object_mut()?.remove("$patch");
    serde_json::from_value(template).ok()
}

/// The revision for `template` (created, or renumbered to come last), and
/// revisions beyond `history_limit` deleted, keeping those named in `live`
/// (revisions pods still run). Returns the revision's name and the
/// revisions there were before this call, oldest first.
pub async fn record<K>(
    ctx: &Ctx,
    owner: &K,
    template: &PodTemplateSpec,
    selector_labels: &BTreeMap<String, String>,
    history_limit: i32,
    live: &[&str],
) -> anyhow::Result<(String, Vec<Arc<ControllerRevision>>)>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    let ns = owner.meta().namespace.clone().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    let name = format!("{}-{}", owner.name_any(), template_hash(template));
    let history = revisions_of(ctx, owner);
    let highest = history.last().map(|r| r.revision).unwrap_or(0);
    match history.iter().find(|r| r.name_any() == name) {
        Some(r) if r.revision == highest => {}
        Some(_) => {
            // Back to an earlier template: it becomes the newest revision.
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"revision": highest + 1})),
            )
            .await?;
        }
        None => {
            let revision = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(selector_labels.clone()),
                    owner_references: Some(vec![owner_ref(owner)]),
                    ..Default::default()
                },
                data: Some(k8s_openapi::apimachinery::pkg::runtime::RawExtension(data(
                    template,
                ))),
                revision: highest + 1,
            };
            match api.create(&PostParams::default(), &revision).await {
                Ok(_) => {}
                // Written by an earlier pass the informer has not shown yet.
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let old: Vec<_> = history
        .iter()
        .filter(|r| r.name_any() != name && !live.contains(&r.name_any().as_str()))
        .collect();
    let excess = old.len().saturating_sub(history_limit.max(0) as usize);
    for r in old.into_iter().take(excess) {
        ignore_not_found(api.delete(&r.name_any(), &DeleteParams::default()).await)?;
    }
    Ok((name, history))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revision_gives_back_its_template() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
        .unwrap();
        let revision = ControllerRevision {
            data: Some(k8s_openapi::apimachinery::pkg::runtime::RawExtension(data(
                &template,
            ))),
            ..Default::default()
        };
        assert_eq!(
            revision.data.as_ref().unwrap().0["spec"]["template"]["$patch"],
            "replace"
        );
        assert_eq!(template_of(&revision), Some(template));
    }
}
