//! The k8s-openapi types whose schemas can be served, looked up by definition
//! name. Only the ones a document needs are generated (schemas of everything
//! they reference come along), which keeps start-up cheap; adding a type here
//! is all it takes to serve it.

use k8s_openapi::api;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::schemars::{JsonSchema, SchemaGenerator};

type Entry = (
    fn() -> std::borrow::Cow<'static, str>,
    fn(&mut SchemaGenerator),
);

fn generate<T: JsonSchema>(generator: &mut SchemaGenerator) {
    generator.subschema_for::<T>();
}

macro_rules! entries {
    ($($t:ty),* $(,)?) => { &[$((<$t as JsonSchema>::schema_name, generate::<$t>)),*] };
}

static BUILTIN: &[Entry] = entries![
    api::core::v1::Binding,
    api::core::v1::ConfigMap,
    api::core::v1::Endpoints,
    api::core::v1::Event,
    api::core::v1::LimitRange,
    api::core::v1::Namespace,
    api::core::v1::Node,
    api::core::v1::PersistentVolume,
    api::core::v1::PersistentVolumeClaim,
    api::core::v1::Pod,
    api::core::v1::PodTemplate,
    api::core::v1::ReplicationController,
    api::core::v1::ResourceQuota,
    api::core::v1::Secret,
    api::core::v1::Service,
    api::core::v1::ServiceAccount,
    api::apps::v1::ControllerRevision,
    api::apps::v1::DaemonSet,
    api::apps::v1::Deployment,
    api::apps::v1::ReplicaSet,
    api::apps::v1::StatefulSet,
    api::authentication::v1::TokenRequest,
    api::authentication::v1::SelfSubjectReview,
    api::authentication::v1::TokenReview,
    api::authorization::v1::LocalSubjectAccessReview,
    api::authorization::v1::SelfSubjectAccessReview,
    api::authorization::v1::SelfSubjectRulesReview,
    api::authorization::v1::SubjectAccessReview,
    api::autoscaling::v1::HorizontalPodAutoscaler,
    api::autoscaling::v1::Scale,
    api::autoscaling::v2::HorizontalPodAutoscaler,
    api::batch::v1::CronJob,
    api::batch::v1::Job,
    api::certificates::v1::CertificateSigningRequest,
    api::coordination::v1::Lease,
    api::discovery::v1::EndpointSlice,
    api::events::v1::Event,
    api::networking::v1::Ingress,
    api::networking::v1::IngressClass,
    api::networking::v1::NetworkPolicy,
    api::node::v1::RuntimeClass,
    api::policy::v1::Eviction,
    api::policy::v1::PodDisruptionBudget,
    api::rbac::v1::ClusterRole,
    api::rbac::v1::ClusterRoleBinding,
    api::rbac::v1::Role,
    api::rbac::v1::RoleBinding,
    api::scheduling::v1::PriorityClass,
    api::storage::v1::CSIDriver,
    api::storage::v1::CSINode,
    api::storage::v1::StorageClass,
    api::storage::v1::VolumeAttachment,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    meta::APIGroup,
    meta::APIGroupList,
    meta::APIResourceList,
    meta::APIVersions,
    meta::DeleteOptions,
    meta::ListMeta,
    meta::Patch,
    meta::Status,
    // The payload type does not change WatchEvent's schema.
    meta::WatchEvent<()>,
];

/// Generates the schema of the named built-in type (and everything it
/// references) into `generator`; false if the name is not a known type.
pub(crate) fn generate_builtin(generator: &mut SchemaGenerator, name: &str) -> bool {
    match BUILTIN
        .iter()
        .find(|(schema_name, _)| schema_name() == name)
    {
        Some((_, generate)) => {
            generate(generator);
            true
        }
        None => false,
    }
}

/// Every built-in type's name.
#[cfg(test)]
pub(crate) fn builtin_names() -> impl Iterator<Item = String> {
    BUILTIN.iter().map(|(name, _)| name().into_owned())
}
