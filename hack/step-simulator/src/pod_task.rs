//! The task that plays kubelet and entrypoints for one pod, from its binding to the node
//! until it is gone. It gets every new version of the pod through a watch channel, whose
//! sender the supervisor drops when the pod is deleted.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::entrypoint::{StepVerdict, go_log_line};
use crate::logs::{KwokLogs, LogFiles, Stream, cri_log};
use crate::plan::{PodPlan, container_plans};
use crate::simulation::{REASON_CONFIG_ERROR, Simulation, config_error_status};

/// Tekton sets this annotation once sidecars are ready; the first step waits for it.
const READY_ANNOTATION: &str = "tekton.dev/ready";
/// Value of [`READY_ANNOTATION`] once set.
const READY_ANNOTATION_VALUE: &str = "READY";
/// Tekton sets this annotation to cancel a pod it keeps (keep-pod-on-cancel).
const CANCEL_ANNOTATION: &str = "tekton.dev/cancel";
/// Value of [`CANCEL_ANNOTATION`] once set.
const CANCEL_ANNOTATION_VALUE: &str = "CANCEL";
/// Field manager of the simulator's writes, as the kubelet has its own.
const FIELD_MANAGER: &str = "step-simulator";
/// Tries of one API write before the pod's task gives up on it.
const API_WRITE_ATTEMPTS: u32 = 6;
/// Wait after the first failed API write; doubled after each further failure.
const API_RETRY_FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// HTTP status of a request for an object that does not exist.
const HTTP_NOT_FOUND: u16 = 404;
/// HTTP status of a delete whose UID precondition no longer holds.
const HTTP_CONFLICT: u16 = 409;
/// HTTP status of a throttled request.
const HTTP_TOO_MANY_REQUESTS: u16 = 429;
/// HTTP statuses from here on are the server's fault and worth a retry.
const HTTP_SERVER_ERRORS: u16 = 500;

/// What the tasks of all pods share.
pub struct Shared {
    /// Kubernetes client.
    pub client: Client,
    /// Container log files.
    pub files: LogFiles,
    /// kwok's `Logs` objects.
    pub kwok_logs: KwokLogs,
    /// How often a waiting entrypoint looks for its predecessor's end (zero: it notices at once).
    pub entrypoint_poll: Duration,
}

/// Why a pod's task stopped early.
#[derive(Debug, thiserror::Error)]
enum TaskError {
    /// The pod no longer exists.
    #[error("the pod is gone")]
    PodGone,
    /// The API server refused a request.
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
    /// A log file could not be written.
    #[error("log file: {0}")]
    Io(#[from] std::io::Error),
}

/// How the wait for a pod's end ended.
enum PodEnd {
    /// The pod has a deletion timestamp: the kubelet must stop it and finish the deletion.
    DeletionRequested,
    /// The pod is gone (deleted at once, or the supervisor stopped tracking it).
    Gone,
}

/// Runs the simulation of one pod until the pod is gone.
pub async fn run(shared: Arc<Shared>, updates: watch::Receiver<Arc<Pod>>) {
    let pod = updates.borrow().clone();
    let task = PodTask {
        pods: Api::namespaced(shared.client.clone(), &pod.namespace().unwrap_or_default()),
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        shared,
    };
    let span = info_span!("pod", namespace = %task.namespace, name = %task.name);
    async move {
        let mut until_gone = updates.clone();
        match task.run(updates).await {
            Ok(()) | Err(TaskError::PodGone) => debug!("pod task done"),
            Err(error) => warn!(%error, "pod task failed"),
        }
        // Outlive the pod's last updates, so that they do not start a second task for it.
        while until_gone.changed().await.is_ok() {}
    }
    .instrument(span)
    .await;
}

struct PodTask {
    shared: Arc<Shared>,
    pods: Api<Pod>,
    namespace: String,
    name: String,
    uid: String,
}

impl PodTask {
    async fn run(&self, updates: watch::Receiver<Arc<Pod>>) -> Result<(), TaskError> {
        let pod = updates.borrow().clone();
        let plan = match PodPlan::from_pod(&pod) {
            Ok(plan) => plan,
            Err(error) => {
                warn!(%error, "cannot simulate the pod; reporting a container config error");
                if pod.metadata.deletion_timestamp.is_none() && !reports_config_error(&pod) {
                    let plan_containers = container_plans(&pod);
                    let message = format!("step-simulator: {error}");
                    self.write_status(&config_error_status(
                        &plan_containers,
                        &pod,
                        &message,
                        Utc::now(),
                    ))
                    .await?;
                }
                return self.finish(None, wait_for_end(updates).await).await;
            }
        };

        if pod.metadata.deletion_timestamp.is_none() {
            self.prepare_logs(&pod, &plan).await;
        }
        let resumed = Simulation::resume(plan.clone(), &pod)
            .map(|simulation| simulation.with_entrypoint_poll(self.shared.entrypoint_poll));
        let mut simulation = match resumed {
            Some(simulation) => {
                info!(
                    finished = simulation.is_finished(),
                    "picked up a pod in progress"
                );
                simulation
            }
            None if pod.metadata.deletion_timestamp.is_some() => {
                return self.finish(None, PodEnd::DeletionRequested).await;
            }
            None => {
                let simulation = Simulation::start(plan, &pod, Utc::now())
                    .with_entrypoint_poll(self.shared.entrypoint_poll);
                info!(
                    steps = simulation.plan().steps.len(),
                    "starting the pod's containers"
                );
                self.write_status(&simulation.status()).await?;
                simulation
            }
        };

        let end = if simulation.is_finished() || pod.metadata.deletion_timestamp.is_some() {
            wait_for_end(updates).await
        } else {
            tokio::select! {
                driven = self.drive(&mut simulation, updates.clone()) => match driven {
                    Ok(()) => {
                        info!(phase = simulation.phase(), "pod finished");
                        wait_for_end(updates).await
                    }
                    Err(TaskError::PodGone) => PodEnd::Gone,
                    Err(error) => {
                        warn!(%error, "simulation stopped; waiting for the pod's deletion");
                        wait_for_end(updates).await
                    }
                },
                end = wait_for_end(updates.clone()) => end,
            }
        };
        self.finish(Some(&mut simulation), end).await
    }

    /// Creates the empty log files and kwok's `Logs` object; logs are not worth failing for.
    async fn prepare_logs(&self, pod: &Pod, plan: &PodPlan) {
        let containers: Vec<String> = plan
            .init_containers
            .iter()
            .chain(&plan.containers)
            .map(|container| container.name.clone())
            .collect();
        if let Err(error) = self
            .shared
            .files
            .prepare(&self.namespace, &self.name, &containers)
            .await
        {
            warn!(%error, "cannot create the pod's log files");
        }
        if let Err(error) = self
            .shared
            .kwok_logs
            .ensure(pod, &self.shared.files, &containers)
            .await
        {
            warn!(%error, "cannot create the pod's kwok Logs object");
        }
    }

    /// Runs the steps, then waits for Tekton to stop the sidecars.
    async fn drive(
        &self,
        simulation: &mut Simulation,
        mut updates: watch::Receiver<Arc<Pod>>,
    ) -> Result<(), TaskError> {
        if simulation.awaits_ready_annotation() {
            debug!("first step waits for the {READY_ANNOTATION} annotation");
            wait_for_annotation(&mut updates, READY_ANNOTATION, READY_ANNOTATION_VALUE).await?;
            simulation.release_first_step(Utc::now());
        }
        while let Some(next) = simulation.next_step() {
            let step = simulation.plan().steps[next.step_index].clone();
            let container = simulation.step_container(&step).to_owned();
            debug!(%container, verdict = ?next.verdict, "step runs");
            let verdict = if simulation.plan().cancel_via_annotation
                && next.verdict != StepVerdict::Skipped
            {
                let mut cancel_updates = updates.clone();
                tokio::select! {
                    () = sleep_until(next.ends_at) => next.verdict,
                    cancelled = wait_for_annotation(&mut cancel_updates, CANCEL_ANNOTATION, CANCEL_ANNOTATION_VALUE) => {
                        cancelled?;
                        StepVerdict::Cancelled
                    }
                }
            } else {
                sleep_until(next.ends_at).await;
                next.verdict
            };
            let now = Utc::now();
            let mut log = String::new();
            if verdict.command_ran() {
                log.push_str(&cri_log(now, Stream::Stdout, &step.log));
            }
            for message in verdict.entrypoint_messages() {
                log.push_str(&cri_log(now, Stream::Stderr, &go_log_line(now, message)));
            }
            if verdict.command_ran() && step.filler_log_bytes > 0 {
                self.shared
                    .files
                    .write_with_filler(
                        &self.namespace,
                        &self.name,
                        &container,
                        now,
                        step.filler_log_bytes,
                        log,
                    )
                    .await?;
            } else if !log.is_empty() {
                self.shared
                    .files
                    .write(&self.namespace, &self.name, &container, &log)
                    .await?;
            }
            simulation.finish_step(next.step_index, verdict, next.started_at, now);
            info!(%container, ?verdict, exit_code = verdict.container_exit_code(), "step ended");
            self.write_status(&simulation.status()).await?;
        }
        while simulation.sidecars_running() {
            let pod = updates.borrow_and_update().clone();
            if simulation.stop_replaced_sidecars(&pod, Utc::now()) {
                info!("sidecars stopped by Tekton's nop image");
                self.write_status(&simulation.status()).await?;
                continue;
            }
            updates.changed().await.map_err(|_| TaskError::PodGone)?;
        }
        Ok(())
    }

    /// Ends the pod as the kubelet does: stop what runs, force-delete it, drop its logs.
    async fn finish(
        &self,
        simulation: Option<&mut Simulation>,
        end: PodEnd,
    ) -> Result<(), TaskError> {
        if let PodEnd::DeletionRequested = end {
            if let Some(simulation) = simulation.filter(|simulation| !simulation.is_finished()) {
                simulation.kill_running_containers(Utc::now());
                match self.write_status(&simulation.status()).await {
                    Ok(()) | Err(TaskError::PodGone) => {}
                    Err(error) => warn!(%error, "cannot report the stopped containers"),
                }
            }
            info!("deleting the pod for good");
            let delete = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let (pods, name, delete) = (&self.pods, &self.name, &delete);
            self.retry(|| async move { pods.delete(name, delete).await.map(|_| ()) })
                .await
                .or_else(|error| match error {
                    TaskError::PodGone => Ok(()),
                    TaskError::Api(kube::Error::Api(status)) if status.code == HTTP_CONFLICT => {
                        Ok(())
                    }
                    error => Err(error),
                })?;
        }
        if let Err(error) = self
            .shared
            .kwok_logs
            .delete(&self.namespace, &self.name)
            .await
        {
            warn!(%error, "cannot delete the pod's kwok Logs object");
        }
        self.shared
            .files
            .remove(&self.namespace, &self.name)
            .await?;
        Ok(())
    }

    /// Writes the pod's status through the status subresource. A merge patch replaces the
    /// lists (conditions, container statuses) whole and needs no resourceVersion, so the
    /// write cannot conflict with writes by others.
    async fn write_status(&self, status: &PodStatus) -> Result<(), TaskError> {
        let patch = json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let (pods, name, params, patch) = (&self.pods, &self.name, &params, &patch);
        self.retry(|| async move {
            pods.patch_status(name, params, &Patch::Merge(patch))
                .await
                .map(|_| ())
        })
        .await
    }

    /// Retries an API request with exponential backoff; a missing pod ends it at once.
    async fn retry<F, Fut>(&self, request: F) -> Result<(), TaskError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = kube::Result<()>>,
    {
        let mut backoff = API_RETRY_FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match request().await {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(status)) if status.code == HTTP_NOT_FOUND => {
                    return Err(TaskError::PodGone);
                }
                Err(error) if attempt < API_WRITE_ATTEMPTS && is_transient(&error) => {
                    debug!(%error, attempt, "API request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Whether the pod's status already reports a container config error (written by an
/// earlier run of the simulator).
fn reports_config_error(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|status| status.container_statuses.iter().flatten())
        .filter_map(|status| status.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
        .any(|reason| reason == REASON_CONFIG_ERROR)
}

/// Whether a failed request may succeed when repeated: connection trouble, throttling,
/// conflicts and server errors; not a request the API server rejects as invalid.
fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.code == HTTP_CONFLICT
                || status.code == HTTP_TOO_MANY_REQUESTS
                || status.code >= HTTP_SERVER_ERRORS
        }
        _ => true,
    }
}

/// Waits until the pod has a deletion timestamp or is gone.
async fn wait_for_end(mut updates: watch::Receiver<Arc<Pod>>) -> PodEnd {
    match updates
        .wait_for(|pod| pod.metadata.deletion_timestamp.is_some())
        .await
        .map(|_| ())
    {
        Ok(()) => PodEnd::DeletionRequested,
        Err(_) => PodEnd::Gone,
    }
}

/// Waits until the pod carries an annotation with the given value.
async fn wait_for_annotation(
    updates: &mut watch::Receiver<Arc<Pod>>,
    annotation: &str,
    value: &str,
) -> Result<(), TaskError> {
    updates
        .wait_for(|pod| pod.annotations().get(annotation).map(String::as_str) == Some(value))
        .await
        .map(|_| ())
        .map_err(|_| TaskError::PodGone)
}

async fn sleep_until(deadline: DateTime<Utc>) {
    let remaining = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::sleep(remaining).await;
}
