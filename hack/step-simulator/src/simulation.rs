//! The simulated state of one TaskRun pod's containers and the pod status a kubelet would
//! report for it. Pure: the caller supplies the clock and does the I/O.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::entrypoint::{StepVerdict, termination_message};
use crate::plan::{ContainerPlan, PodPlan, StepPlan};

/// The pod's and the node's IP: the fake node is this machine.
const LOOPBACK_IP: &str = "127.0.0.1";
/// The phase of a pod whose containers run.
const PHASE_RUNNING: &str = "Running";
/// The phase of a pod whose containers all exited 0.
const PHASE_SUCCEEDED: &str = "Succeeded";
/// The phase of a pod with a container that exited non-zero.
const PHASE_FAILED: &str = "Failed";
/// The phase of a pod whose containers could not start.
const PHASE_PENDING: &str = "Pending";
/// The kubelet's termination reason for an exit code of 0.
const REASON_COMPLETED: &str = "Completed";
/// The kubelet's termination reason for a non-zero exit code.
const REASON_ERROR: &str = "Error";
/// The waiting reason the kubelet gives a container whose configuration is unusable.
pub const REASON_CONFIG_ERROR: &str = "CreateContainerConfigError";
/// Container runtime prefix of container IDs, as containerd reports them.
const CONTAINER_ID_SCHEME: &str = "containerd://";
/// Registry the container runtime prefixes to short image names.
const DEFAULT_REGISTRY: &str = "docker.io";
/// Exit code of the step whose command runs when the pod is deleted: the entrypoint forwards
/// SIGTERM to the command, the command dies of it and the entrypoint calls `os.Exit(-1)`.
const EXIT_CODE_RUNNING_STEP_ON_DELETE: i32 = 255;
/// Exit code of a step whose entrypoint is still waiting for its predecessor when the pod is
/// deleted: Go's runtime, as PID 1 that cannot die of SIGTERM, exits with 2.
const EXIT_CODE_WAITING_STEP_ON_DELETE: i32 = 2;
/// Exit code of a sidecar the kubelet stops (pod deleted, or image replaced by Tekton): a
/// shell as PID 1 ignores SIGTERM and is killed by SIGKILL (128 + 9) after the grace period.
const EXIT_CODE_SIDECAR_KILLED: i32 = 137;

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    /// Exit code.
    pub exit_code: i32,
    /// The kubelet's reason: Completed or Error.
    pub reason: String,
    /// The termination message the container wrote, if any.
    pub message: Option<String>,
    /// When the container started.
    pub started_at: DateTime<Utc>,
    /// When the container exited.
    pub finished_at: DateTime<Utc>,
}

impl Termination {
    fn new(
        exit_code: i32,
        message: Option<String>,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
    ) -> Self {
        let reason = if exit_code == 0 {
            REASON_COMPLETED
        } else {
            REASON_ERROR
        };
        Self {
            exit_code,
            reason: reason.to_owned(),
            message,
            started_at,
            finished_at,
        }
    }
}

/// A container's state as the kubelet tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The container runs since the given time.
    Running(DateTime<Utc>),
    /// The container exited.
    Terminated(Termination),
}

/// One container of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Container name.
    pub name: String,
    /// The image the container runs.
    pub image: String,
    /// Current state.
    pub state: RunState,
    /// How the previous run of the container ended (a sidecar replaced by Tekton's nop image).
    pub last_termination: Option<Termination>,
    /// How often the container was restarted.
    pub restart_count: i32,
}

impl ContainerRecord {
    fn running(plan: &ContainerPlan, since: DateTime<Utc>) -> Self {
        Self {
            name: plan.name.clone(),
            image: plan.image.clone(),
            state: RunState::Running(since),
            last_termination: None,
            restart_count: 0,
        }
    }

    /// Whether the container runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, RunState::Running(_))
    }

    fn termination(&self) -> Option<&Termination> {
        match &self.state {
            RunState::Terminated(termination) => Some(termination),
            RunState::Running(_) => None,
        }
    }

    fn started_at(&self) -> DateTime<Utc> {
        match &self.state {
            RunState::Running(since) => *since,
            RunState::Terminated(termination) => termination.started_at,
        }
    }
}

/// The step that runs next and how it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextStep {
    /// Index into the plan's steps.
    pub step_index: usize,
    /// When the step's entrypoint stopped waiting and started the command.
    pub started_at: DateTime<Utc>,
    /// How the step ends unless it is cancelled first.
    pub verdict: StepVerdict,
    /// When the step ends unless it is cancelled first.
    pub ends_at: DateTime<Utc>,
}

/// The simulated pod: its plan and the state of all its containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Simulation {
    plan: PodPlan,
    uid: String,
    generation: Option<i64>,
    started_at: DateTime<Utc>,
    init_containers: Vec<ContainerRecord>,
    containers: Vec<ContainerRecord>,
    first_step_released_at: Option<DateTime<Utc>>,
    entrypoint_poll: Duration,
}

impl Simulation {
    /// Starts the pod now: init containers done, every container running.
    pub fn start(plan: PodPlan, pod: &Pod, now: DateTime<Utc>) -> Self {
        let init_containers = plan
            .init_containers
            .iter()
            .map(|init| ContainerRecord {
                state: RunState::Terminated(Termination::new(0, None, now, now)),
                ..ContainerRecord::running(init, now)
            })
            .collect();
        let containers = plan
            .containers
            .iter()
            .map(|container| ContainerRecord::running(container, now))
            .collect();
        let first_step_released_at = (!plan.first_step_waits_for_ready).then_some(now);
        Self {
            plan,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            generation: pod.metadata.generation,
            started_at: now,
            init_containers,
            containers,
            first_step_released_at,
            entrypoint_poll: Duration::ZERO,
        }
    }

    /// Picks up a pod this simulator (or an earlier run of it) started, from its status.
    /// Returns `None` when the status shows no started containers.
    pub fn resume(plan: PodPlan, pod: &Pod) -> Option<Self> {
        let status = pod.status.as_ref()?;
        let started_at = status
            .start_time
            .as_ref()
            .map(from_kube_time)
            .unwrap_or_else(Utc::now);
        let init_statuses = status
            .init_container_statuses
            .as_deref()
            .unwrap_or_default();
        let statuses = status.container_statuses.as_deref().unwrap_or_default();
        let init_containers = plan
            .init_containers
            .iter()
            .map(|init| record_from_status(init, init_statuses, started_at))
            .collect::<Option<Vec<_>>>()?;
        let containers = plan
            .containers
            .iter()
            .map(|container| record_from_status(container, statuses, started_at))
            .collect::<Option<Vec<_>>>()?;
        let first_step_done = plan
            .steps
            .first()
            .is_some_and(|step| containers[step.container_index].termination().is_some());
        let first_step_released_at =
            (!plan.first_step_waits_for_ready || first_step_done).then_some(started_at);
        Some(Self {
            plan,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            generation: pod.metadata.generation,
            started_at,
            init_containers,
            containers,
            first_step_released_at,
            entrypoint_poll: Duration::ZERO,
        })
    }

    /// Makes waiting entrypoints notice their predecessor's end (or the ready annotation)
    /// only at their next poll, as the real ones do every second. Zero: at once.
    pub fn with_entrypoint_poll(mut self, interval: Duration) -> Self {
        self.entrypoint_poll = interval;
        self
    }

    /// When an entrypoint polling since `polling_since` notices something that happened at
    /// `happened_at`: at its first poll after it.
    fn noticed_at(
        &self,
        polling_since: DateTime<Utc>,
        happened_at: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let Ok(interval) = i64::try_from(self.entrypoint_poll.as_nanos()) else {
            return DateTime::<Utc>::MAX_UTC;
        };
        if interval == 0 {
            return happened_at;
        }
        let waited = (happened_at - polling_since)
            .num_nanoseconds()
            .unwrap_or(i64::MAX)
            .max(0);
        let polls = waited / interval + 1;
        polls
            .checked_mul(interval)
            .and_then(|offset| {
                polling_since.checked_add_signed(chrono::Duration::nanoseconds(offset))
            })
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The plan the simulation follows.
    pub fn plan(&self) -> &PodPlan {
        &self.plan
    }

    /// The name of a step's container.
    pub fn step_container(&self, step: &StepPlan) -> &str {
        &self.containers[step.container_index].name
    }

    /// Whether the first step still waits for Tekton's `tekton.dev/ready` annotation.
    pub fn awaits_ready_annotation(&self) -> bool {
        self.first_step_released_at.is_none()
    }

    /// Tekton set `tekton.dev/ready`: the first step's entrypoint stops waiting.
    pub fn release_first_step(&mut self, now: DateTime<Utc>) {
        self.first_step_released_at.get_or_insert(now);
    }

    fn step_record(&self, step: &StepPlan) -> &ContainerRecord {
        &self.containers[step.container_index]
    }

    /// Whether a step's entrypoint wrote the `.err` post file: exactly the steps whose
    /// container exited non-zero (see [`StepVerdict::container_exit_code`]).
    fn a_step_failed(&self) -> bool {
        self.plan
            .steps
            .iter()
            .filter_map(|step| self.step_record(step).termination())
            .any(|termination| termination.exit_code != 0)
    }

    /// The next step to run, or `None` when all steps ended (or the first one still waits).
    pub fn next_step(&self) -> Option<NextStep> {
        let step_index = self
            .plan
            .steps
            .iter()
            .position(|step| self.step_record(step).is_running())?;
        let step = &self.plan.steps[step_index];
        let polling_since = self.step_record(step).started_at();
        let started_at = if step_index == 0 {
            let released_at = self.first_step_released_at?;
            if self.plan.first_step_waits_for_ready {
                self.noticed_at(polling_since, released_at)
            } else {
                released_at
            }
        } else {
            let previous_end = self
                .step_record(&self.plan.steps[step_index - 1])
                .termination()
                .map_or(self.started_at, |previous| previous.finished_at);
            self.noticed_at(polling_since, previous_end)
        };
        let verdict = StepVerdict::decide(step, self.a_step_failed());
        Some(NextStep {
            step_index,
            started_at,
            verdict,
            ends_at: started_at
                .checked_add_signed(to_chrono(verdict.run_time(step)))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        })
    }

    /// Ends a step's container as its entrypoint would.
    pub fn finish_step(
        &mut self,
        step_index: usize,
        verdict: StepVerdict,
        step_started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        let container_index = self.plan.steps[step_index].container_index;
        let message = termination_message(&verdict.results(step_started_at));
        let record = &mut self.containers[container_index];
        let termination = Termination::new(
            verdict.container_exit_code(),
            Some(message),
            record.started_at(),
            now,
        );
        record.state = RunState::Terminated(termination);
    }

    /// Whether a sidecar still runs.
    pub fn sidecars_running(&self) -> bool {
        self.plan
            .sidecars
            .iter()
            .any(|&index| self.containers[index].is_running())
    }

    /// Sidecars whose image Tekton replaced with its nop image to stop them: the kubelet
    /// kills the old container and starts the nop image, which exits 0 at once.
    /// Returns whether any sidecar stopped.
    pub fn stop_replaced_sidecars(&mut self, pod: &Pod, now: DateTime<Utc>) -> bool {
        let spec_images: Vec<(String, String)> = pod
            .spec
            .iter()
            .flat_map(|spec| spec.containers.iter())
            .map(|container| {
                (
                    container.name.clone(),
                    container.image.clone().unwrap_or_default(),
                )
            })
            .collect();
        let mut stopped = false;
        for &index in &self.plan.sidecars {
            let record = &mut self.containers[index];
            let RunState::Running(since) = record.state else {
                continue;
            };
            let Some((_, new_image)) = spec_images.iter().find(|(name, _)| *name == record.name)
            else {
                continue;
            };
            if *new_image == record.image {
                continue;
            }
            record.last_termination =
                Some(Termination::new(EXIT_CODE_SIDECAR_KILLED, None, since, now));
            record.state = RunState::Terminated(Termination::new(0, None, now, now));
            record.image = new_image.clone();
            record.restart_count += 1;
            stopped = true;
        }
        stopped
    }

    /// The kubelet stops every running container because the pod is being deleted.
    pub fn kill_running_containers(&mut self, now: DateTime<Utc>) {
        let executing = self
            .next_step()
            .filter(|next| next.started_at <= now)
            .map(|next| {
                (
                    self.plan.steps[next.step_index].container_index,
                    next.started_at,
                )
            });
        let step_indices: Vec<usize> = self
            .plan
            .steps
            .iter()
            .map(|step| step.container_index)
            .collect();
        for (index, record) in self.containers.iter_mut().enumerate() {
            let RunState::Running(since) = record.state else {
                continue;
            };
            let termination = match executing {
                Some((executing_index, step_started_at)) if executing_index == index => {
                    let message =
                        termination_message(&StepVerdict::Succeeded.results(step_started_at));
                    Termination::new(EXIT_CODE_RUNNING_STEP_ON_DELETE, Some(message), since, now)
                }
                _ if step_indices.contains(&index) => {
                    Termination::new(EXIT_CODE_WAITING_STEP_ON_DELETE, None, since, now)
                }
                _ => Termination::new(EXIT_CODE_SIDECAR_KILLED, None, since, now),
            };
            record.state = RunState::Terminated(termination);
        }
    }

    /// The pod phase that follows from the containers.
    pub fn phase(&self) -> &'static str {
        let mut terminations = Vec::with_capacity(self.containers.len());
        for record in &self.containers {
            match record.termination() {
                Some(termination) => terminations.push(termination),
                None => return PHASE_RUNNING,
            }
        }
        if terminations
            .iter()
            .all(|termination| termination.exit_code == 0)
        {
            PHASE_SUCCEEDED
        } else {
            PHASE_FAILED
        }
    }

    /// Whether the pod reached Succeeded or Failed.
    pub fn is_finished(&self) -> bool {
        self.phase() != PHASE_RUNNING
    }

    /// The pod status a kubelet would report.
    pub fn status(&self) -> PodStatus {
        let phase = self.phase();
        let finished = phase != PHASE_RUNNING;
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|record| !record.is_running())
            .map(|record| record.name.as_str())
            .collect();
        let first_exit = self
            .containers
            .iter()
            .filter_map(ContainerRecord::termination)
            .map(|termination| termination.finished_at)
            .min();
        let last_exit = self
            .containers
            .iter()
            .filter_map(ContainerRecord::termination)
            .map(|termination| termination.finished_at)
            .max();
        let (ready_status, ready_reason, ready_message, ready_since) = if unready.is_empty() {
            ("True", None, None, self.started_at)
        } else if finished {
            (
                "False",
                Some("PodCompleted"),
                None,
                last_exit.unwrap_or(self.started_at),
            )
        } else {
            (
                "False",
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
                first_exit.unwrap_or(self.started_at),
            )
        };
        let sandbox_ready = if finished { "False" } else { "True" };
        let conditions = vec![
            condition(
                "PodReadyToStartContainers",
                sandbox_ready,
                None,
                None,
                self.started_at,
            ),
            condition("Initialized", "True", None, None, self.started_at),
            condition(
                "Ready",
                ready_status,
                ready_reason,
                ready_message.clone(),
                ready_since,
            ),
            condition(
                "ContainersReady",
                ready_status,
                ready_reason,
                ready_message,
                ready_since,
            ),
            condition("PodScheduled", "True", None, None, self.started_at),
        ];
        PodStatus {
            phase: Some(phase.to_owned()),
            conditions: Some(conditions),
            host_ip: Some(LOOPBACK_IP.to_owned()),
            host_ips: Some(vec![HostIP {
                ip: LOOPBACK_IP.to_owned(),
            }]),
            pod_ip: Some(LOOPBACK_IP.to_owned()),
            pod_ips: Some(vec![PodIP {
                ip: LOOPBACK_IP.to_owned(),
            }]),
            start_time: Some(to_kube_time(self.started_at)),
            observed_generation: self.generation,
            init_container_statuses: Some(
                self.init_containers
                    .iter()
                    .map(|record| container_status(&self.uid, record, ContainerKind::Init))
                    .collect(),
            ),
            container_statuses: Some(
                self.containers
                    .iter()
                    .map(|record| container_status(&self.uid, record, ContainerKind::Regular))
                    .collect(),
            ),
            ..PodStatus::default()
        }
    }
}

/// The status of a pod whose simulated configuration is unusable: the kubelet's answer to a
/// container it cannot create, which makes Tekton fail the TaskRun at once.
pub fn config_error_status(
    plan_containers: &[ContainerPlan],
    pod: &Pod,
    message: &str,
    now: DateTime<Utc>,
) -> PodStatus {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let waiting = |container: &ContainerPlan| ContainerStatus {
        name: container.name.clone(),
        image: container.image.clone(),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(REASON_CONFIG_ERROR.to_owned()),
                message: Some(message.to_owned()),
            }),
            ..ContainerState::default()
        }),
        ..ContainerStatus::default()
    };
    let init_statuses = pod
        .spec
        .iter()
        .flat_map(|spec| spec.init_containers.iter().flatten())
        .map(|init| {
            let record = ContainerRecord {
                name: init.name.clone(),
                image: init.image.clone().unwrap_or_default(),
                state: RunState::Terminated(Termination::new(0, None, now, now)),
                last_termination: None,
                restart_count: 0,
            };
            container_status(&uid, &record, ContainerKind::Init)
        })
        .collect();
    let unready_message = format!(
        "containers with unready status: [{}]",
        plan_containers
            .iter()
            .map(|container| container.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    PodStatus {
        phase: Some(PHASE_PENDING.to_owned()),
        conditions: Some(vec![
            condition("PodReadyToStartContainers", "True", None, None, now),
            condition("Initialized", "True", None, None, now),
            condition(
                "Ready",
                "False",
                Some("ContainersNotReady"),
                Some(unready_message.clone()),
                now,
            ),
            condition(
                "ContainersReady",
                "False",
                Some("ContainersNotReady"),
                Some(unready_message),
                now,
            ),
            condition("PodScheduled", "True", None, None, now),
        ]),
        host_ip: Some(LOOPBACK_IP.to_owned()),
        host_ips: Some(vec![HostIP {
            ip: LOOPBACK_IP.to_owned(),
        }]),
        pod_ip: Some(LOOPBACK_IP.to_owned()),
        pod_ips: Some(vec![PodIP {
            ip: LOOPBACK_IP.to_owned(),
        }]),
        start_time: Some(to_kube_time(now)),
        init_container_statuses: Some(init_statuses),
        container_statuses: Some(plan_containers.iter().map(waiting).collect()),
        ..PodStatus::default()
    }
}

fn condition(
    type_: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<String>,
    since: DateTime<Utc>,
) -> PodCondition {
    PodCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.map(str::to_owned),
        message,
        last_transition_time: Some(to_kube_time(since)),
        ..PodCondition::default()
    }
}

/// Which part of the pod a container belongs to: the kubelet reports readiness differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContainerKind {
    /// An init container: ready once it completed successfully.
    Init,
    /// A regular container: ready while it runs (no readiness probes are simulated).
    Regular,
}

fn container_status(
    pod_uid: &str,
    record: &ContainerRecord,
    kind: ContainerKind,
) -> ContainerStatus {
    let container_id = fake_container_id(pod_uid, &record.name, record.restart_count);
    let terminated_state = |termination: &Termination, container_id: &str| ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: Some(container_id.to_owned()),
            exit_code: termination.exit_code,
            reason: Some(termination.reason.clone()),
            message: termination.message.clone(),
            started_at: Some(to_kube_time(termination.started_at)),
            finished_at: Some(to_kube_time(termination.finished_at)),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    };
    let state = match &record.state {
        RunState::Running(since) => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(to_kube_time(*since)),
            }),
            ..ContainerState::default()
        },
        RunState::Terminated(termination) => terminated_state(termination, &container_id),
    };
    let previous_container_id = fake_container_id(pod_uid, &record.name, record.restart_count - 1);
    ContainerStatus {
        name: record.name.clone(),
        image: record.image.clone(),
        image_id: fake_image_id(&record.image),
        container_id: Some(container_id.clone()),
        ready: match kind {
            ContainerKind::Init => record
                .termination()
                .is_some_and(|termination| termination.exit_code == 0),
            ContainerKind::Regular => record.is_running(),
        },
        started: Some(record.is_running()),
        restart_count: record.restart_count,
        state: Some(state),
        last_state: Some(
            record
                .last_termination
                .as_ref()
                .map(|termination| terminated_state(termination, &previous_container_id))
                .unwrap_or_default(),
        ),
        ..ContainerStatus::default()
    }
}

fn record_from_status(
    plan: &ContainerPlan,
    statuses: &[ContainerStatus],
    pod_started_at: DateTime<Utc>,
) -> Option<ContainerRecord> {
    let status = statuses.iter().find(|status| status.name == plan.name)?;
    let state = status.state.as_ref()?;
    let termination_of = |terminated: &ContainerStateTerminated| Termination {
        exit_code: terminated.exit_code,
        reason: terminated.reason.clone().unwrap_or_default(),
        message: terminated.message.clone(),
        started_at: terminated
            .started_at
            .as_ref()
            .map_or(pod_started_at, from_kube_time),
        finished_at: terminated
            .finished_at
            .as_ref()
            .map_or(pod_started_at, from_kube_time),
    };
    let run_state = if let Some(running) = &state.running {
        RunState::Running(
            running
                .started_at
                .as_ref()
                .map_or(pod_started_at, from_kube_time),
        )
    } else {
        RunState::Terminated(termination_of(state.terminated.as_ref()?))
    };
    Some(ContainerRecord {
        name: plan.name.clone(),
        image: status.image.clone(),
        state: run_state,
        last_termination: status
            .last_state
            .as_ref()
            .and_then(|last| last.terminated.as_ref())
            .map(termination_of),
        restart_count: status.restart_count,
    })
}

/// The kubelet reports times to the second.
pub fn to_kube_time(at: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(at.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Reads a Kubernetes time.
pub fn from_kube_time(time: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(
        time.0.as_second(),
        time.0.subsec_nanosecond().unsigned_abs(),
    )
    .unwrap_or(DateTime::UNIX_EPOCH)
}

/// Converts a run time to a chrono duration (run times are far below chrono's limits).
pub fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// 64 hex digits that stay the same for the same input: IDs look like the real ones.
/// FNV-1a hashes the seed; splitmix64 stretches the hash into four well-mixed words.
fn fake_digest(seed: &str) -> String {
    /// FNV-1a's 64-bit offset basis.
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    /// FNV-1a's 64-bit prime.
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    /// splitmix64's increment (the golden ratio in 64-bit fixed point).
    const SPLITMIX_INCREMENT: u64 = 0x9e37_79b9_7f4a_7c15;
    let seed_hash = seed.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    });
    (1u64..=4)
        .map(|round| {
            let mut word = seed_hash.wrapping_add(round.wrapping_mul(SPLITMIX_INCREMENT));
            word = (word ^ (word >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            word = (word ^ (word >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("{:016x}", word ^ (word >> 31))
        })
        .collect()
}

fn fake_container_id(pod_uid: &str, container: &str, restart_count: i32) -> String {
    format!(
        "{CONTAINER_ID_SCHEME}{}",
        fake_digest(&format!("{pod_uid}/{container}/{restart_count}"))
    )
}

/// The image ID the runtime reports: the image's repository with its digest (the one the
/// spec pins, or a made-up one).
fn fake_image_id(image: &str) -> String {
    let (repository, pinned_digest) = match image.split_once("@sha256:") {
        Some((repository, digest)) => (repository, Some(digest)),
        None => (image, None),
    };
    let last_slash = repository.rfind('/').map_or(0, |slash| slash + 1);
    let repository = match repository[last_slash..].rfind(':') {
        Some(colon) => &repository[..last_slash + colon],
        None => repository,
    };
    let qualified = match repository.split_once('/') {
        None => format!("{DEFAULT_REGISTRY}/library/{repository}"),
        Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            repository.to_owned()
        }
        Some(_) => format!("{DEFAULT_REGISTRY}/{repository}"),
    };
    let digest = pinned_digest.map_or_else(|| fake_digest(image), str::to_owned);
    format!("{qualified}@sha256:{digest}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::OnError;
    use chrono::TimeZone;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, second)
            .single()
            .expect("valid test time")
    }

    fn step(container_index: usize, exit_code: i32, on_error: OnError) -> StepPlan {
        StepPlan {
            container_index,
            exit_code,
            duration: Duration::from_secs(1),
            log: String::new(),
            filler_log_bytes: 0,
            on_error,
            timeout: None,
        }
    }

    fn plan(steps: Vec<StepPlan>, sidecars: usize, waits_for_ready: bool) -> PodPlan {
        let mut containers: Vec<ContainerPlan> = (0..steps.len())
            .map(|index| ContainerPlan {
                name: format!("step-s{index}"),
                image: "busybox".to_owned(),
            })
            .collect();
        let sidecar_indices = (steps.len()..steps.len() + sidecars).collect();
        containers.extend((0..sidecars).map(|index| ContainerPlan {
            name: format!("sidecar-c{index}"),
            image: "redis:7".to_owned(),
        }));
        PodPlan {
            init_containers: vec![ContainerPlan {
                name: "prepare".to_owned(),
                image: "entrypoint".to_owned(),
            }],
            containers,
            steps,
            sidecars: sidecar_indices,
            first_step_waits_for_ready: waits_for_ready,
            cancel_via_annotation: false,
        }
    }

    fn pod_with_status(status: PodStatus) -> Pod {
        Pod {
            status: Some(status),
            ..Pod::default()
        }
    }

    /// Runs every step to its verdict, one second apart, and returns the verdicts.
    fn run_all(simulation: &mut Simulation) -> Vec<StepVerdict> {
        let mut verdicts = Vec::new();
        while let Some(next) = simulation.next_step() {
            simulation.finish_step(next.step_index, next.verdict, next.started_at, next.ends_at);
            verdicts.push(next.verdict);
        }
        verdicts
    }

    fn exit_codes(simulation: &Simulation) -> Vec<Option<i32>> {
        simulation
            .containers
            .iter()
            .map(|record| {
                record
                    .termination()
                    .map(|termination| termination.exit_code)
            })
            .collect()
    }

    #[test]
    fn steps_run_in_order_and_decide_the_phase() {
        use OnError::{Continue, StopAndFail};
        let cases = [
            (
                vec![step(0, 0, StopAndFail), step(1, 0, StopAndFail)],
                vec![StepVerdict::Succeeded, StepVerdict::Succeeded],
                vec![Some(0), Some(0)],
                PHASE_SUCCEEDED,
            ),
            (
                vec![
                    step(0, 0, StopAndFail),
                    step(1, 3, StopAndFail),
                    step(2, 0, StopAndFail),
                    step(3, 0, StopAndFail),
                ],
                vec![
                    StepVerdict::Succeeded,
                    StepVerdict::Failed { exit_code: 3 },
                    StepVerdict::Skipped,
                    StepVerdict::Skipped,
                ],
                vec![Some(0), Some(3), Some(1), Some(1)],
                PHASE_FAILED,
            ),
            (
                vec![step(0, 4, Continue), step(1, 0, StopAndFail)],
                vec![
                    StepVerdict::FailureContinued { exit_code: 4 },
                    StepVerdict::Succeeded,
                ],
                vec![Some(0), Some(0)],
                PHASE_SUCCEEDED,
            ),
        ];
        for (steps, verdicts, codes, phase) in cases {
            let mut simulation = Simulation::start(plan(steps, 0, false), &Pod::default(), at(0));
            assert_eq!(simulation.phase(), PHASE_RUNNING);
            assert_eq!(run_all(&mut simulation), verdicts);
            assert_eq!(exit_codes(&simulation), codes);
            assert_eq!(simulation.phase(), phase);
        }
    }

    #[test]
    fn steps_start_when_their_predecessor_ends() {
        let mut simulation = Simulation::start(
            plan(
                vec![
                    step(0, 0, OnError::StopAndFail),
                    step(1, 0, OnError::StopAndFail),
                ],
                0,
                true,
            ),
            &Pod::default(),
            at(0),
        );
        assert!(simulation.awaits_ready_annotation());
        assert_eq!(simulation.next_step(), None);
        simulation.release_first_step(at(2));
        let first = simulation.next_step().expect("first step");
        assert_eq!(
            (first.step_index, first.started_at, first.ends_at),
            (0, at(2), at(3))
        );
        simulation.finish_step(0, first.verdict, first.started_at, at(4));
        let second = simulation.next_step().expect("second step");
        assert_eq!(
            (second.step_index, second.started_at, second.ends_at),
            (1, at(4), at(5))
        );
    }

    #[test]
    fn entrypoints_notice_at_their_next_poll() {
        let mut simulation = Simulation::start(
            plan(
                vec![
                    step(0, 0, OnError::StopAndFail),
                    step(1, 0, OnError::StopAndFail),
                ],
                0,
                true,
            ),
            &Pod::default(),
            at(0),
        )
        .with_entrypoint_poll(Duration::from_secs(2));
        simulation.release_first_step(at(3));
        let first = simulation.next_step().expect("first step");
        assert_eq!((first.started_at, first.ends_at), (at(4), at(5)));
        simulation.finish_step(0, first.verdict, first.started_at, at(6));
        let second = simulation.next_step().expect("second step");
        assert_eq!((second.started_at, second.ends_at), (at(8), at(9)));
    }

    #[test]
    fn sidecars_run_until_tekton_replaces_their_image() {
        let mut simulation = Simulation::start(
            plan(vec![step(0, 0, OnError::StopAndFail)], 1, false),
            &Pod::default(),
            at(0),
        );
        run_all(&mut simulation);
        assert_eq!(simulation.next_step(), None);
        assert!(simulation.sidecars_running());
        assert_eq!(simulation.phase(), PHASE_RUNNING);
        let pod_with_images = |image: &str| Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "sidecar-c0".to_owned(),
                    image: Some(image.to_owned()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        assert!(!simulation.stop_replaced_sidecars(&pod_with_images("redis:7"), at(5)));
        assert!(simulation.stop_replaced_sidecars(&pod_with_images("nop"), at(5)));
        let sidecar = &simulation.containers[1];
        assert_eq!((sidecar.image.as_str(), sidecar.restart_count), ("nop", 1));
        assert_eq!(sidecar.termination().map(|t| t.exit_code), Some(0));
        assert_eq!(
            sidecar.last_termination.as_ref().map(|t| t.exit_code),
            Some(137)
        );
        assert_eq!(simulation.phase(), PHASE_SUCCEEDED);
    }

    #[test]
    fn deletion_kills_what_still_runs() {
        let mut simulation = Simulation::start(
            plan(
                vec![
                    step(0, 0, OnError::StopAndFail),
                    step(1, 0, OnError::StopAndFail),
                    step(2, 0, OnError::StopAndFail),
                ],
                1,
                false,
            ),
            &Pod::default(),
            at(0),
        );
        let first = simulation.next_step().expect("first step");
        simulation.finish_step(0, first.verdict, first.started_at, at(1));
        simulation.kill_running_containers(at(2));
        assert_eq!(
            exit_codes(&simulation),
            vec![Some(0), Some(255), Some(2), Some(137)]
        );
        assert_eq!(simulation.phase(), PHASE_FAILED);
    }

    #[test]
    fn status_round_trips_through_resume() {
        let plan = plan(
            vec![
                step(0, 2, OnError::StopAndFail),
                step(1, 0, OnError::StopAndFail),
                step(2, 0, OnError::StopAndFail),
            ],
            0,
            true,
        );
        let mut simulation = Simulation::start(plan.clone(), &Pod::default(), at(0));
        simulation.release_first_step(at(0));
        let first = simulation.next_step().expect("first step");
        simulation.finish_step(0, first.verdict, first.started_at, at(1));

        let resumed = Simulation::resume(plan.clone(), &pod_with_status(simulation.status()))
            .expect("resumable");
        assert_eq!(resumed, simulation);
        let next = resumed.next_step().expect("second step");
        assert_eq!(
            (next.step_index, next.started_at, next.verdict),
            (1, at(1), StepVerdict::Skipped)
        );

        assert_eq!(
            Simulation::resume(plan, &pod_with_status(PodStatus::default())),
            None
        );
    }

    #[test]
    fn status_reports_what_the_kubelet_would() {
        let mut simulation = Simulation::start(
            plan(
                vec![
                    step(0, 0, OnError::StopAndFail),
                    step(1, 1, OnError::StopAndFail),
                ],
                0,
                false,
            ),
            &Pod::default(),
            at(0),
        );
        let running = simulation.status();
        assert_eq!(running.phase.as_deref(), Some(PHASE_RUNNING));
        let ready = |status: &PodStatus| {
            status
                .conditions
                .iter()
                .flatten()
                .find(|condition| condition.type_ == "Ready")
                .map(|condition| {
                    (
                        condition.status.clone(),
                        condition.reason.clone(),
                        condition.message.clone(),
                    )
                })
        };
        assert_eq!(ready(&running), Some(("True".to_owned(), None, None)));

        let first = simulation.next_step().expect("first step");
        simulation.finish_step(0, first.verdict, first.started_at, at(1));
        assert_eq!(
            ready(&simulation.status()),
            Some((
                "False".to_owned(),
                Some("ContainersNotReady".to_owned()),
                Some("containers with unready status: [step-s0]".to_owned())
            ))
        );
        let step_status = &simulation
            .status()
            .container_statuses
            .expect("container statuses")[0];
        let terminated = step_status
            .state
            .as_ref()
            .and_then(|state| state.terminated.clone())
            .expect("terminated");
        assert_eq!(terminated.reason.as_deref(), Some(REASON_COMPLETED));
        assert_eq!(
            terminated.message.as_deref(),
            Some(r#"[{"key":"StartedAt","value":"2025-01-02T03:04:00.000Z","type":3}]"#)
        );
        assert!(!step_status.ready);

        let second = simulation.next_step().expect("second step");
        simulation.finish_step(1, second.verdict, second.started_at, at(2));
        let done = simulation.status();
        assert_eq!(done.phase.as_deref(), Some(PHASE_FAILED));
        assert_eq!(
            ready(&done),
            Some(("False".to_owned(), Some("PodCompleted".to_owned()), None))
        );
    }

    #[test]
    fn image_ids_look_like_the_runtimes() {
        let cases = [
            ("busybox", "docker.io/library/busybox@sha256:"),
            ("alpine:3.20", "docker.io/library/alpine@sha256:"),
            ("bitnami/redis:7", "docker.io/bitnami/redis@sha256:"),
            (
                "ghcr.io/tektoncd/nop:v1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ghcr.io/tektoncd/nop@sha256:",
            ),
            ("localhost:5000/app:1", "localhost:5000/app@sha256:"),
        ];
        for (image, prefix) in cases {
            let id = fake_image_id(image);
            assert!(id.starts_with(prefix), "{image} -> {id}");
            assert_eq!(id.len(), prefix.len() + 64, "{id}");
        }
        assert!(fake_image_id("busybox@sha256:0123abc").ends_with("@sha256:0123abc"));
    }
}
