//! The task that plays the kubelet for one pod, from its binding to the node until it is
//! gone: it mounts the pod's volumes, runs the init containers one after the other and
//! then the steps and sidecars at once as sandboxed processes, reports their states in
//! the pod's status, stops them when the pod is deleted (SIGTERM, SIGKILL after the grace
//! period) or when Tekton swaps a sidecar's image for its nop image, and force-deletes the
//! pod at the end. Nothing here decides how a step ends: its process does.
//!
//! Two faults are triggered on purpose, by pod annotations (which a TaskRun's annotations
//! become): [`OOM_KILL_ANNOTATION`] names a container that is killed as the kernel's OOM
//! killer would once its step's command runs, and [`EVICT_ANNOTATION`] evicts the pod, with
//! its value as the message, once a step's command runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::images::{Image, Images, KO_APP_DIR};
use crate::logs::{KwokLogs, LogFiles, log_tail};
use crate::process::{Exit, Process};
use crate::sandbox::{Bind, DEFAULT_PATH, HostEntry, Sandbox};
use crate::spec::{ContainerPlan, PodPlan, STAND_IN_PATH, expand, with_stand_in};
use crate::status::{
    ContainerRecord, PodState, REASON_CONFIG_ERROR, REASON_CONTAINER_CREATING,
    REASON_ERR_IMAGE_PULL, REASON_IMAGE_PULL_BACK_OFF, REASON_OOM_KILLED, REASON_STATUS_UNKNOWN,
    RunState, Termination, from_kube_time,
};
use crate::volumes::{PodFiles, resolve_env};

/// Names the container to kill as the OOM killer would, once its step's command runs.
pub const OOM_KILL_ANNOTATION: &str = "node-agent.tekton-step-observer.dev/oom-kill";
/// Evicts the pod, with the annotation's value as the eviction message, once a step's
/// command runs.
pub const EVICT_ANNOTATION: &str = "node-agent.tekton-step-observer.dev/evict";
/// Field manager of the agent's writes, as the kubelet has its own.
const FIELD_MANAGER: &str = "node-agent";
/// How long an unpullable image shows `ErrImagePull` before `ImagePullBackOff`, as the
/// kubelet's first pull back-off.
const IMAGE_PULL_BACK_OFF_AFTER: Duration = Duration::from_secs(1);
/// How often a pending fault (OOM kill, eviction) looks whether its step's command runs.
const FAULT_POLL: Duration = Duration::from_millis(50);
/// How often volumes that cannot be set up yet (a missing ConfigMap) are tried again.
const VOLUME_RETRY: Duration = Duration::from_secs(2);
/// Wait before retrying a failed status write; the kubelet never gives up either.
const STATUS_RETRY: Duration = Duration::from_millis(500);
/// Lines and bytes of the log's tail that become the message of a failed container that
/// wrote none (`FallbackToLogsOnError`), as the kubelet takes them.
const FALLBACK_LOG_LINES: usize = 80;
/// See [`FALLBACK_LOG_LINES`].
const FALLBACK_LOG_BYTES: usize = 2048;
/// HTTP status of a request for an object that does not exist.
const HTTP_NOT_FOUND: u16 = 404;
/// HTTP status of a delete whose UID precondition no longer holds.
const HTTP_CONFLICT: u16 = 409;
/// Exit code reported for a container the agent lost (its earlier run ended), as the
/// kubelet reports one that vanished: 128 + SIGKILL.
const LOST_CONTAINER_EXIT_CODE: i32 = 137;

/// What the tasks of all pods share.
pub struct Shared {
    /// Kubernetes client.
    pub client: Client,
    /// Container log files.
    pub files: LogFiles,
    /// kwok's `Logs` objects.
    pub kwok_logs: KwokLogs,
    /// Where each pod's volumes and termination files live.
    pub pods_dir: PathBuf,
    /// What image names stand for.
    pub images: Images,
    /// The host's image folders.
    pub host_image: Vec<HostEntry>,
    /// The `SIMULATED_*` stand-in binary on the host.
    pub stand_in: PathBuf,
    /// The unprivileged user and group containers run as.
    pub user: (u32, u32),
}

/// Which container of the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    /// An init container, by index.
    Init(usize),
    /// A step or sidecar, by index.
    Main(usize),
}

/// Runs one pod until it is gone.
pub async fn run(shared: Arc<Shared>, updates: watch::Receiver<Arc<Pod>>) {
    let pod = updates.borrow().clone();
    let namespace = pod.namespace().unwrap_or_default();
    let uid = pod.uid().unwrap_or_default();
    let span = info_span!("pod", %namespace, name = %pod.name_any());
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let mut task = PodTask {
        pods: Api::namespaced(shared.client.clone(), &namespace),
        files: PodFiles::new(&shared.pods_dir, &uid),
        name: pod.name_any(),
        namespace,
        uid,
        plan: PodPlan::from_pod(&pod),
        state: None,
        processes: HashMap::new(),
        exits_tx,
        exits,
        pull_back_off_at: Vec::new(),
        stopping: HashMap::new(),
        oom_killed: Vec::new(),
        deleting: false,
        kill_deadline: None,
        dirty: false,
        logs_registered: false,
        shared,
    };
    async move {
        let mut until_gone = updates.clone();
        task.run(updates).await;
        // Outlive the pod's last updates, so that they do not start a second task for it.
        while until_gone.changed().await.is_ok() {}
    }
    .instrument(span)
    .await;
}

/// Why a container cannot be started.
enum StartError {
    /// The container waits with this reason and message.
    Waiting(&'static str, String),
}

struct PodTask {
    shared: Arc<Shared>,
    pods: Api<Pod>,
    files: PodFiles,
    namespace: String,
    name: String,
    uid: String,
    plan: PodPlan,
    /// The pod's containers, once the agent has taken the pod on.
    state: Option<PodState>,
    processes: HashMap<Slot, Process>,
    exits_tx: mpsc::UnboundedSender<Exit<Slot>>,
    exits: mpsc::UnboundedReceiver<Exit<Slot>>,
    /// Containers showing ErrImagePull, and when they move on to ImagePullBackOff.
    pull_back_off_at: Vec<(Slot, Instant)>,
    /// Containers being stopped for an image change, with the image they restart with.
    stopping: HashMap<Slot, String>,
    /// Containers killed as the OOM killer would.
    oom_killed: Vec<Slot>,
    /// The pod is being deleted: nothing starts any more.
    deleting: bool,
    /// When containers still running after the deletion's SIGTERM get SIGKILL (until
    /// they got it).
    kill_deadline: Option<Instant>,
    /// The status changed since it was last written.
    dirty: bool,
    /// kwok's `Logs` object for the pod exists (without it `pods/log` finds no
    /// logs); creating it is retried, like a status write, until it does.
    logs_registered: bool,
}

impl PodTask {
    async fn run(&mut self, mut updates: watch::Receiver<Arc<Pod>>) {
        let pod = updates.borrow_and_update().clone();
        if let Some(status) = pod
            .status
            .as_ref()
            .filter(|status| status.start_time.is_some())
        {
            // Taken on by an earlier run of the agent, whose processes died with it.
            self.state = Some(lost_state(&self.uid, &pod, status));
            self.dirty = true;
            info!("picked up a pod an earlier agent ran; its running containers are lost");
        } else if pod.metadata.deletion_timestamp.is_none() {
            self.prepare_logs(&pod).await;
            if let Err(message) = self.set_up_volumes(&mut updates).await {
                debug!(%message, "pod went before its volumes were set up");
                return self.finish(true).await;
            }
            self.state = Some(self.new_state(&pod));
            self.start_next_init_container(&pod).await;
        }
        loop {
            let pod = updates.borrow_and_update().clone();
            if !self.logs_registered && !self.deleting && self.state.is_some() {
                self.prepare_logs(&pod).await;
            }
            self.on_pod_update(&pod).await;
            if self.dirty {
                self.write_status().await;
            }
            if self.deleting && self.processes.is_empty() {
                info!("containers stopped; deleting the pod for good");
                return self.finish(true).await;
            }
            let wake_at = self.next_timer();
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        debug!("pod deleted; stopping what still runs");
                        self.kill_all();
                        return self.finish(false).await;
                    }
                }
                Some(exit) = self.exits.recv() => self.on_exit(exit, &pod).await,
                () = sleep_until(wake_at) => self.on_timer(&pod).await,
            }
        }
    }

    fn new_state(&self, pod: &Pod) -> PodState {
        let record =
            |container: &ContainerPlan| ContainerRecord::new(&container.name, &container.image);
        PodState {
            uid: self.uid.clone(),
            generation: pod.metadata.generation,
            started_at: Utc::now(),
            init_containers: self.plan.init_containers.iter().map(record).collect(),
            containers: self.plan.containers.iter().map(record).collect(),
            evicted: None,
        }
    }

    /// Mounts the volumes, retrying while a source is missing; `Err` if the pod went first.
    async fn set_up_volumes(
        &mut self,
        updates: &mut watch::Receiver<Arc<Pod>>,
    ) -> Result<(), String> {
        loop {
            let pod = updates.borrow_and_update().clone();
            if pod.metadata.deletion_timestamp.is_some() {
                return Err("deletion requested".to_owned());
            }
            match self.files.set_up(&self.shared.client, &pod).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    warn!(%error, "cannot mount the pod's volumes yet");
                    if pod
                        .status
                        .as_ref()
                        .is_none_or(|status| status.start_time.is_none())
                    {
                        let mut state = self.new_state(&pod);
                        for record in state
                            .init_containers
                            .iter_mut()
                            .chain(&mut state.containers)
                        {
                            record.state = RunState::waiting(
                                REASON_CONTAINER_CREATING,
                                Some(error.to_string()),
                            );
                        }
                        self.state = Some(state);
                        self.dirty = true;
                        self.write_status().await;
                        self.state = None;
                    }
                    tokio::select! {
                        changed = updates.changed() => changed.map_err(|_| "pod gone".to_owned())?,
                        () = tokio::time::sleep(VOLUME_RETRY) => {}
                    }
                }
            }
        }
    }

    /// Creates the empty log files and kwok's `Logs` object.
    async fn prepare_logs(&mut self, pod: &Pod) {
        let containers: Vec<String> = self
            .plan
            .init_containers
            .iter()
            .chain(&self.plan.containers)
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
        match self
            .shared
            .kwok_logs
            .ensure(pod, &self.shared.files, &containers)
            .await
        {
            Ok(()) => self.logs_registered = true,
            Err(error) => warn!(%error, "cannot create the pod's kwok Logs object; retrying"),
        }
    }

    fn record_mut(&mut self, slot: Slot) -> Option<&mut ContainerRecord> {
        let state = self.state.as_mut()?;
        match slot {
            Slot::Init(index) => state.init_containers.get_mut(index),
            Slot::Main(index) => state.containers.get_mut(index),
        }
    }

    fn set_state(&mut self, slot: Slot, run_state: RunState) {
        if let Some(record) = self.record_mut(slot) {
            record.state = run_state;
            self.dirty = true;
        }
    }

    fn container_plan(&self, slot: Slot) -> Option<&ContainerPlan> {
        match slot {
            Slot::Init(index) => self.plan.init_containers.get(index),
            Slot::Main(index) => self.plan.containers.get(index),
        }
    }

    /// Starts the first init container that has not run, or the pod's containers once all
    /// init containers succeeded.
    async fn start_next_init_container(&mut self, pod: &Pod) {
        let Some(state) = &self.state else { return };
        let next = state
            .init_containers
            .iter()
            .position(|init| init.termination().is_none());
        match next {
            Some(index) => {
                let slot = Slot::Init(index);
                if matches!(self.record_state(slot), Some(RunState::Waiting { .. })) {
                    self.start(slot, pod, None).await;
                }
            }
            None if state.initialized() => {
                for index in 0..self.plan.containers.len() {
                    self.start(Slot::Main(index), pod, None).await;
                }
            }
            None => {}
        }
    }

    fn record_state(&self, slot: Slot) -> Option<&RunState> {
        let state = self.state.as_ref()?;
        let record = match slot {
            Slot::Init(index) => state.init_containers.get(index),
            Slot::Main(index) => state.containers.get(index),
        }?;
        Some(&record.state)
    }

    /// Starts a container, or leaves it waiting with the kubelet's reason.
    async fn start(&mut self, slot: Slot, pod: &Pod, image_override: Option<String>) {
        let Some(plan) = self.container_plan(slot).cloned() else {
            return;
        };
        let image_name = image_override.unwrap_or_else(|| plan.image.clone());
        if let Some(record) = self.record_mut(slot) {
            record.image = image_name.clone();
        }
        let image = self.shared.images.resolve(&image_name);
        if image == Image::Unpullable {
            let message = format!(
                "failed to pull and unpack image \"{image_name}\": failed to resolve reference \"{image_name}\": no registry serves it on this node"
            );
            info!(container = %plan.name, image = %image_name, "image cannot be pulled");
            self.set_state(
                slot,
                RunState::waiting(REASON_ERR_IMAGE_PULL, Some(message)),
            );
            self.pull_back_off_at
                .push((slot, Instant::now() + IMAGE_PULL_BACK_OFF_AFTER));
            return;
        }
        let replaced = self.restarted_before(slot);
        match self.sandbox(pod, &plan, &image, replaced).await {
            Err(StartError::Waiting(reason, message)) => {
                warn!(container = %plan.name, %reason, %message, "container cannot start");
                self.set_state(slot, RunState::waiting(reason, Some(message)));
            }
            Ok(sandbox) => {
                let log_path = self
                    .shared
                    .files
                    .path(&self.namespace, &self.name, &plan.name);
                match Process::start(&sandbox, &log_path, slot, self.exits_tx.clone()).await {
                    Ok(process) => {
                        debug!(container = %plan.name, "container started");
                        self.processes.insert(slot, process);
                        self.set_state(slot, RunState::Running(Utc::now()));
                    }
                    Err(error) => {
                        warn!(container = %plan.name, %error, "cannot start the container's sandbox");
                        self.set_state(
                            slot,
                            RunState::waiting("RunContainerError", Some(error.to_string())),
                        );
                    }
                }
            }
        }
    }

    /// Whether the container ran before: it restarts because Tekton replaced its image
    /// (sidecar stop).
    fn restarted_before(&self, slot: Slot) -> bool {
        let Slot::Main(index) = slot else {
            return false;
        };
        self.state
            .as_ref()
            .and_then(|state| state.containers.get(index))
            .is_some_and(|record| record.restart_count > 0)
    }

    /// The sandbox that runs a container: its image, volumes, environment and command.
    async fn sandbox(
        &self,
        pod: &Pod,
        plan: &ContainerPlan,
        image: &Image,
        restarted_in_new_image: bool,
    ) -> Result<Sandbox, StartError> {
        let config_error = |message: String| StartError::Waiting(REASON_CONFIG_ERROR, message);
        let env = resolve_env(&self.shared.client, pod, &plan.env)
            .await
            .map_err(|error| config_error(error.to_string()))?;
        let mut binds = Vec::new();
        let mut mounts = plan.mounts.clone();
        // Parents before children, so a nested mount lands inside its parent's.
        mounts.sort_by_key(|mount| mount.mount_path.matches('/').count());
        let volumes: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|spec| spec.volumes.iter().flatten())
            .map(|volume| volume.name.clone())
            .collect();
        for mount in &mounts {
            if !volumes.contains(&mount.name) {
                return Err(config_error(format!("volume {:?} not found", mount.name)));
            }
            let mut source = self.files.volume(&mount.name);
            if let Some(sub_path) = mount.sub_path.as_deref().filter(|path| !path.is_empty()) {
                source = source.join(sub_path);
                std::fs::create_dir_all(&source)
                    .map_err(|error| config_error(error.to_string()))?;
            }
            binds.push(Bind {
                source,
                target: mount.mount_path.clone(),
                read_only: mount.read_only == Some(true),
            });
        }
        let mut command = plan.command.clone();
        if let Image::Binary { name, path } = image {
            let target = format!("{KO_APP_DIR}/{name}");
            binds.push(Bind {
                source: path.clone(),
                target: target.clone(),
                read_only: true,
            });
            // A container restarted in Tekton's nop image runs that image's binary: the
            // sidecar's own command is not in it.
            if command.is_empty() || restarted_in_new_image {
                command = vec![target];
            }
        }
        match &plan.simulated {
            Some(Err(error)) => return Err(config_error(error.to_string())),
            Some(Ok(_)) => {
                binds.push(Bind {
                    source: self.shared.stand_in.clone(),
                    target: STAND_IN_PATH.to_owned(),
                    read_only: true,
                });
                command = with_stand_in(&command).unwrap_or(command);
            }
            None => {}
        }
        if command.is_empty() {
            return Err(config_error(format!(
                "container {}: no command specified, and the image {} has no entrypoint here",
                plan.name, plan.image
            )));
        }
        let termination = self
            .files
            .termination_file(&plan.name)
            .map_err(|error| config_error(error.to_string()))?;
        binds.push(Bind {
            source: termination,
            target: plan.termination_message_path.clone(),
            read_only: false,
        });
        let mut full_env: Vec<(String, String)> = Vec::new();
        if !env.iter().any(|(name, _)| name == "PATH") {
            full_env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
        }
        full_env.push(("HOSTNAME".to_owned(), self.name.clone()));
        if !env.iter().any(|(name, _)| name == "HOME") {
            full_env.push(("HOME".to_owned(), "/".to_owned()));
        }
        full_env.extend(env);
        let defined: HashMap<String, String> = full_env.iter().cloned().collect();
        let command = command
            .iter()
            .map(|token| expand(token, &defined))
            .collect();
        Ok(Sandbox {
            user: self.shared.user,
            hostname: self.name.clone(),
            image: self.shared.host_image.clone(),
            binds,
            working_dir: plan.working_dir.clone().unwrap_or_else(|| "/".to_owned()),
            env: full_env,
            command,
        })
    }

    /// A container's process exited.
    async fn on_exit(&mut self, exit: Exit<Slot>, pod: &Pod) {
        let slot = exit.key;
        self.processes.remove(&slot);
        let Some(plan) = self.container_plan(slot).cloned() else {
            return;
        };
        let started_at = match self.record_state(slot) {
            Some(RunState::Running(since)) => *since,
            _ => Utc::now(),
        };
        let mut message = self.files.termination_message(&plan.name);
        if message.is_none() && exit.exit_code != 0 && plan.fallback_to_logs_on_error {
            let path = self
                .shared
                .files
                .path(&self.namespace, &self.name, &plan.name);
            message = log_tail(&path, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
                .ok()
                .filter(|tail| !tail.is_empty());
        }
        let mut termination = Termination::exited(exit.exit_code, message, started_at, Utc::now());
        if self.oom_killed.contains(&slot) {
            termination.reason = REASON_OOM_KILLED.to_owned();
        }
        info!(container = %plan.name, exit_code = exit.exit_code, reason = %termination.reason, "container exited");
        if let Some(new_image) = self.stopping.remove(&slot) {
            // Tekton replaced the image: the kubelet restarts the container in the new one.
            if let Some(record) = self.record_mut(slot) {
                record.last_termination = Some(termination);
                record.restart_count += 1;
            }
            self.dirty = true;
            if !self.deleting {
                self.start(slot, pod, Some(new_image)).await;
            }
            return;
        }
        self.set_state(slot, RunState::Terminated(termination));
        if matches!(slot, Slot::Init(_)) && exit.exit_code == 0 && !self.deleting {
            self.start_next_init_container(pod).await;
        }
    }

    /// The pod changed: downward-API files, deletion, image swaps, fault annotations.
    async fn on_pod_update(&mut self, pod: &Pod) {
        if self.state.is_none() {
            self.deleting |= pod.metadata.deletion_timestamp.is_some();
            return;
        }
        if let Err(error) = self.files.refresh_downward_api(pod) {
            warn!(%error, "cannot update the downward-API files");
        }
        if pod.metadata.deletion_timestamp.is_some() && !self.deleting {
            self.deleting = true;
            info!(
                running = self.processes.len(),
                "pod deletion requested; stopping its containers"
            );
            self.kill_deadline = Some(Instant::now() + self.plan.termination_grace);
            for process in self.processes.values() {
                process.signal(Signal::SIGTERM);
            }
            // What never started never will.
            self.pull_back_off_at.clear();
            return;
        }
        if self.deleting {
            return;
        }
        let spec_images: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|spec| spec.containers.iter())
            .map(|container| container.image.clone().unwrap_or_default())
            .collect();
        for (index, image) in spec_images.into_iter().enumerate() {
            let slot = Slot::Main(index);
            let Some(record) = self
                .state
                .as_ref()
                .and_then(|state| state.containers.get(index))
            else {
                continue;
            };
            if record.image == image || self.stopping.contains_key(&slot) || !record.is_running() {
                continue;
            }
            info!(container = %record.name, %image, "image replaced; restarting the container in it");
            self.stopping.insert(slot, image);
            if let Some(process) = self.processes.get(&slot) {
                process.signal(Signal::SIGTERM);
            }
        }
        self.check_faults(pod);
    }

    /// Whether a container's own command runs: for a step, once its entrypoint let the
    /// step go (the file it waits for is there, and it started the step's command);
    /// for any other container, as soon as it runs.
    fn runs_its_command(&self, slot: Slot) -> bool {
        let Some(process) = self.processes.get(&slot) else {
            return false;
        };
        let Some(plan) = self
            .container_plan(slot)
            .filter(|plan| plan.runs_tekton_entrypoint)
        else {
            return true;
        };
        self.step_released(plan) && process.runs_a_command()
    }

    /// Whether the file a step's entrypoint waits for exists (with content, if it
    /// must have some): the step's turn has come.
    fn step_released(&self, plan: &ContainerPlan) -> bool {
        let Some((file, needs_content)) = &plan.wait_file else {
            return true;
        };
        let Some(host) = self.host_path(plan, file) else {
            return false;
        };
        std::fs::metadata(host).is_ok_and(|meta| !needs_content || meta.len() > 0)
    }

    /// Where a path inside a container lives on the host, through the container's
    /// volume mounts (the deepest mount that holds it).
    fn host_path(&self, plan: &ContainerPlan, path: &str) -> Option<PathBuf> {
        plan.mounts
            .iter()
            .filter_map(|mount| {
                let inside = path.strip_prefix(mount.mount_path.trim_end_matches('/'))?;
                let relative = inside.strip_prefix('/').filter(|_| !inside.is_empty())?;
                let mut host = self.files.volume(&mount.name);
                if let Some(sub_path) = mount.sub_path.as_deref().filter(|p| !p.is_empty()) {
                    host = host.join(sub_path);
                }
                Some((mount.mount_path.len(), host.join(relative)))
            })
            .max_by_key(|(depth, _)| *depth)
            .map(|(_, host)| host)
    }

    /// Carries out the fault annotations whose moment has come.
    fn check_faults(&mut self, pod: &Pod) {
        let annotations = pod.annotations();
        if let Some(container) = annotations.get(OOM_KILL_ANNOTATION) {
            let target = self
                .plan
                .containers
                .iter()
                .position(|plan| plan.name == *container)
                .map(Slot::Main);
            if let Some(slot) = target.filter(|slot| !self.oom_killed.contains(slot))
                && self.runs_its_command(slot)
                && let Some(process) = self.processes.get(&slot)
            {
                info!(%container, "killing the container as the OOM killer would");
                process.signal(Signal::SIGKILL);
                self.oom_killed.push(slot);
            }
        }
        let a_step_runs = (0..self.plan.containers.len()).any(|index| {
            self.plan.containers[index].runs_tekton_entrypoint
                && self.runs_its_command(Slot::Main(index))
        });
        if let Some(message) = annotations.get(EVICT_ANNOTATION)
            && self
                .state
                .as_ref()
                .is_some_and(|state| state.evicted.is_none())
            && a_step_runs
        {
            info!(%message, "evicting the pod");
            if let Some(state) = self.state.as_mut() {
                state.evicted = Some(message.clone());
            }
            self.dirty = true;
            self.kill_all();
            self.pull_back_off_at.clear();
        }
    }

    fn kill_all(&self) {
        for process in self.processes.values() {
            process.signal(Signal::SIGKILL);
        }
    }

    /// Whether a fault annotation waits for its moment.
    fn fault_pending(&self) -> bool {
        !self.deleting && !self.processes.is_empty()
    }

    fn next_timer(&self) -> Option<Instant> {
        let mut next: Option<Instant> = self.pull_back_off_at.iter().map(|(_, at)| *at).min();
        let mut consider = |at: Instant| next = Some(next.map_or(at, |current| current.min(at)));
        if let Some(deadline) = self.kill_deadline.filter(|_| !self.processes.is_empty()) {
            consider(deadline);
        }
        if self.fault_pending() {
            consider(Instant::now() + FAULT_POLL);
        }
        if self.dirty || (!self.logs_registered && !self.deleting) {
            consider(Instant::now() + STATUS_RETRY);
        }
        next
    }

    async fn on_timer(&mut self, pod: &Pod) {
        let now = Instant::now();
        let due: Vec<Slot> = self
            .pull_back_off_at
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(slot, _)| *slot)
            .collect();
        self.pull_back_off_at.retain(|(_, at)| *at > now);
        for slot in due {
            let image = self
                .record_mut(slot)
                .map(|record| record.image.clone())
                .unwrap_or_default();
            self.set_state(
                slot,
                RunState::waiting(
                    REASON_IMAGE_PULL_BACK_OFF,
                    Some(format!("Back-off pulling image \"{image}\"")),
                ),
            );
        }
        if self.kill_deadline.is_some_and(|deadline| deadline <= now) {
            self.kill_deadline = None;
            if !self.processes.is_empty() {
                info!("grace period over; killing what still runs");
                self.kill_all();
            }
        }
        if !self.deleting {
            self.check_faults(pod);
        }
    }

    /// Writes the pod's status through the status subresource. A merge patch replaces the
    /// lists (conditions, container statuses) whole and needs no resourceVersion, so the
    /// write cannot conflict with writes by others. A failure leaves the status dirty for
    /// the next try.
    async fn write_status(&mut self) {
        let Some(state) = &self.state else { return };
        let status: PodStatus = state.status();
        let patch = json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        // Wall-clock times around the request: hack/perf compares them with
        // when a watcher saw this resourceVersion.
        let sent_at = Utc::now();
        let written = self
            .pods
            .patch_status(&self.name, &params, &Patch::Merge(&patch))
            .await;
        let answered_at = Utc::now();
        match written {
            Ok(written) => {
                self.dirty = false;
                info!(
                    pod = %format!("{}/{}", self.namespace, self.name),
                    resource_version = %written.metadata.resource_version.as_deref().unwrap_or_default(),
                    sent_at_unix_us = sent_at.timestamp_micros(),
                    answered_at_unix_us = answered_at.timestamp_micros(),
                    "pod status written"
                );
            }
            Err(kube::Error::Api(status)) if status.code == HTTP_NOT_FOUND => self.dirty = false,
            Err(error) => warn!(%error, "cannot write the pod's status; retrying"),
        }
    }

    /// Ends the pod as the kubelet does: force-delete it (when asked to), drop its files.
    async fn finish(&mut self, delete: bool) {
        if delete {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            loop {
                match self.pods.delete(&self.name, &params).await {
                    Ok(_) => break,
                    Err(kube::Error::Api(status))
                        if status.code == HTTP_NOT_FOUND || status.code == HTTP_CONFLICT =>
                    {
                        break;
                    }
                    Err(error) => {
                        warn!(%error, "cannot delete the pod; retrying");
                        tokio::time::sleep(STATUS_RETRY).await;
                    }
                }
            }
        }
        if let Err(error) = self
            .shared
            .kwok_logs
            .delete(&self.namespace, &self.name)
            .await
        {
            warn!(%error, "cannot delete the pod's kwok Logs object");
        }
        if let Err(error) = self.shared.files.remove(&self.namespace, &self.name).await {
            warn!(%error, "cannot remove the pod's log files");
        }
        if let Err(error) = self.files.remove() {
            warn!(%error, "cannot remove the pod's volumes");
        }
    }
}

/// The state of a pod an earlier run of the agent took on: what ended stays as reported;
/// what ran or waited is gone with that run, as a kubelet reports containers that vanished.
fn lost_state(uid: &str, pod: &Pod, status: &PodStatus) -> PodState {
    let now = Utc::now();
    let started_at = status.start_time.as_ref().map_or(now, from_kube_time);
    let records = |statuses: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
        statuses
            .iter()
            .flatten()
            .map(|container| {
                let reported = container.state.clone().unwrap_or_default();
                let state = match (reported.terminated, reported.waiting) {
                    (None, Some(waiting)) => RunState::Waiting {
                        reason: waiting.reason.unwrap_or_default(),
                        message: waiting.message,
                    },
                    (Some(end), _) => RunState::Terminated(Termination {
                        exit_code: end.exit_code,
                        reason: end.reason.clone().unwrap_or_default(),
                        message: end.message.clone(),
                        started_at: end.started_at.as_ref().map_or(started_at, from_kube_time),
                        finished_at: end.finished_at.as_ref().map_or(now, from_kube_time),
                    }),
                    (None, None) => RunState::Terminated(Termination {
                        exit_code: LOST_CONTAINER_EXIT_CODE,
                        reason: REASON_STATUS_UNKNOWN.to_owned(),
                        message: Some(
                            "The container could not be located when the pod was terminated"
                                .to_owned(),
                        ),
                        started_at,
                        finished_at: now,
                    }),
                };
                ContainerRecord {
                    name: container.name.clone(),
                    image: container.image.clone(),
                    state,
                    last_termination: None,
                    restart_count: container.restart_count,
                }
            })
            .collect()
    };
    PodState {
        uid: uid.to_owned(),
        generation: pod.metadata.generation,
        started_at,
        init_containers: records(&status.init_container_statuses),
        containers: records(&status.container_statuses),
        evicted: status
            .reason
            .as_deref()
            .filter(|reason| *reason == crate::status::REASON_EVICTED)
            .map(|_| status.message.clone().unwrap_or_default()),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
