//! The parts of a Tekton `TaskRun` the observer reads, for `tekton.dev/v1` and
//! `tekton.dev/v1beta1` alike (both carry `status.steps` and
//! `status.taskSpec.steps` in the same shape).
//!
//! Deserializing into these types instead of a full object keeps the cache
//! small: serde skips every field not named here (managedFields, params,
//! results, provenance, ...).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::{ApiResource, DynamicResourceScope, GroupVersionKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Tekton's API group.
pub const GROUP: &str = "tekton.dev";
/// The TaskRun kind.
pub const KIND: &str = "TaskRun";
/// The TaskRun resource's plural name.
pub const PLURAL: &str = "taskruns";
/// Label Tekton puts on TaskRuns that belong to a PipelineRun.
pub const PIPELINE_RUN_LABEL: &str = "tekton.dev/pipelineRun";
/// Label Tekton puts on TaskRuns naming their pipeline task.
pub const PIPELINE_TASK_LABEL: &str = "tekton.dev/pipelineTask";
/// The annotation in which the observer records what it delivered.
pub const LEDGER_ANNOTATION: &str = "tekton.plugin.step-observer/result";

/// A label or annotation that, set to `"true"`, tells the observer to leave
/// the TaskRun alone: no step event for it is owed, sent or recorded.
pub const OPT_OUT_KEY: &str = "tekton.plugin.step-observer/skip";

/// Whether the TaskRun opted out ([`OPT_OUT_KEY`] is `"true"` as a label or
/// an annotation). Any other value does not opt out.
pub fn opted_out(meta: &ObjectMeta) -> bool {
    let says_true = |map: &Option<std::collections::BTreeMap<String, String>>| {
        map.as_ref()
            .and_then(|m| m.get(OPT_OUT_KEY))
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    };
    says_true(&meta.labels) || says_true(&meta.annotations)
}

/// The TaskRun API versions the observer reads, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TektonVersion {
    /// `tekton.dev/v1`
    V1,
    /// `tekton.dev/v1beta1`, for clusters that do not serve v1.
    V1Beta1,
}

impl TektonVersion {
    /// The version part of the apiVersion.
    pub fn version(self) -> &'static str {
        match self {
            TektonVersion::V1 => "v1",
            TektonVersion::V1Beta1 => "v1beta1",
        }
    }

    /// The full apiVersion, e.g. `tekton.dev/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            TektonVersion::V1 => "tekton.dev/v1",
            TektonVersion::V1Beta1 => "tekton.dev/v1beta1",
        }
    }

    /// The kube dynamic type describing TaskRuns at this version.
    pub fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(GROUP, self.version(), KIND),
            PLURAL,
        )
    }
}

/// A TaskRun, reduced to what the observer needs.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct TaskRun {
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The observed state; absent until Tekton first reconciles it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TaskRunStatus>,
}

impl kube::Resource for TaskRun {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The fields of `TaskRun.status` the observer reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRunStatus {
    /// Knative-style conditions; the `Succeeded` one tells whether the run ended.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The pod running the steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the run finished (RFC 3339; kept as text because the event
    /// library and k8s-openapi use different time crates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// One entry per step, in step order, kept verbatim for the event's data.
    #[serde(default)]
    pub steps: Vec<Value>,
    /// The resolved Task spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_spec: Option<TaskSpec>,
    /// The statuses of earlier attempts of a retried TaskRun, oldest first
    /// (Tekton's `retryTaskRun` archives the whole status here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries_status: Vec<TaskRunStatus>,
    /// The TaskRun's trace context where Tekton traces it (`traceparent`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub span_context: BTreeMap<String, String>,
}

impl TaskRunStatus {
    /// The number of the attempt this status describes: 0 for the first run.
    pub fn attempt(&self) -> u32 {
        u32::try_from(self.retries_status.len()).unwrap_or(u32::MAX)
    }

    /// The status of one attempt: an archived one, or this one for the current.
    pub fn of_attempt(&self, attempt: u32) -> &TaskRunStatus {
        usize::try_from(attempt)
            .ok()
            .and_then(|index| self.retries_status.get(index))
            .unwrap_or(self)
    }
}

/// The part of the resolved Task spec the observer reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct TaskSpec {
    /// The step specs, verbatim.
    #[serde(default)]
    pub steps: Vec<Value>,
}

/// A Knative condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Condition {
    /// e.g. `Succeeded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// e.g. `Failed`, `TaskRunCancelled`, `TaskRunTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Identity and labels of a TaskRun, as events and logs need them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRunRef {
    /// apiVersion the object was read at.
    pub version: TektonVersion,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, the stable part of every event id.
    pub uid: String,
    /// The PipelineRun it belongs to, if any.
    pub pipeline_run: Option<String>,
    /// The pipeline task it runs, if any.
    pub pipeline_task: Option<String>,
    /// The uid of the PipelineRun that owns it, from its owner reference.
    pub pipeline_run_uid: Option<String>,
}

impl TaskRunRef {
    /// Reads identity from metadata; a TaskRun from the API server always has
    /// these, so their absence is reported, not assumed away.
    pub fn from_meta(meta: &ObjectMeta, version: TektonVersion) -> Result<Self> {
        let object = || {
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or("?"),
                meta.name.as_deref().unwrap_or("?")
            )
        };
        let field = |value: &Option<String>, field| {
            value.clone().ok_or_else(|| Error::MissingField {
                object: object(),
                field,
            })
        };
        let label = |key: &str| meta.labels.as_ref().and_then(|l| l.get(key)).cloned();
        Ok(TaskRunRef {
            version,
            namespace: field(&meta.namespace, "metadata.namespace")?,
            name: field(&meta.name, "metadata.name")?,
            uid: field(&meta.uid, "metadata.uid")?,
            pipeline_run: label(PIPELINE_RUN_LABEL),
            pipeline_task: label(PIPELINE_TASK_LABEL),
            pipeline_run_uid: meta
                .owner_references
                .iter()
                .flatten()
                .find(|owner| is_pipeline_run(owner))
                .map(|owner| owner.uid.clone()),
        })
    }

    /// The TaskRun's API path, the default CloudEvents `source`.
    pub fn api_path(&self) -> String {
        format!(
            "/apis/{}/namespaces/{}/taskruns/{}",
            self.version.api_version(),
            self.namespace,
            self.name
        )
    }

    /// `namespace/name`, for logs and messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Whether an owner reference is to the PipelineRun that runs this TaskRun.
fn is_pipeline_run(owner: &OwnerReference) -> bool {
    owner.kind == "PipelineRun" && owner.api_version.starts_with("tekton.dev/")
}

/// Drops everything from a watched TaskRun that no decision reads, so the
/// cache stays small: managedFields, owner references but the PipelineRun's
/// (CDEvents link to it by uid), foreign labels and annotations.
pub fn strip_for_cache(taskrun: &mut TaskRun) {
    let meta = &mut taskrun.metadata;
    meta.managed_fields = None;
    if let Some(owners) = meta.owner_references.as_mut() {
        owners.retain(is_pipeline_run);
        if owners.is_empty() {
            meta.owner_references = None;
        }
    }
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == PIPELINE_RUN_LABEL || k == PIPELINE_TASK_LABEL);
    }
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k == LEDGER_ANNOTATION);
    }
}

/// Returns the ledger annotation's raw value, if the TaskRun carries one.
pub fn ledger_annotation(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a: &BTreeMap<String, String>| a.get(LEDGER_ANNOTATION))
        .map(String::as_str)
}
