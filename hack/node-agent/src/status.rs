//! The pod status a kubelet reports, from the states of the pod's containers. Pure: the
//! pod's task records what its processes did and asks this module for the status to write.
//! The phase follows the kubelet's rules for `restartPolicy: Never` (`getPhase` in
//! pkg/kubelet/kubelet_pods.go): a waiting container keeps the pod Pending, a failed init
//! container fails it, and once everything has exited it is Succeeded only if all exited 0.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The pod's and the node's IP: the fake node is this machine.
const LOOPBACK_IP: &str = "127.0.0.1";
/// The kubelet's termination reason for an exit code of 0.
pub const REASON_COMPLETED: &str = "Completed";
/// The kubelet's termination reason for a non-zero exit code.
pub const REASON_ERROR: &str = "Error";
/// The termination reason of a container the kernel killed for its memory use.
pub const REASON_OOM_KILLED: &str = "OOMKilled";
/// The waiting reason of a container whose configuration is unusable.
pub const REASON_CONFIG_ERROR: &str = "CreateContainerConfigError";
/// The waiting reason of a container whose image pull just failed.
pub const REASON_ERR_IMAGE_PULL: &str = "ErrImagePull";
/// The waiting reason of a container whose image pulls keep failing.
pub const REASON_IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
/// The waiting reason of containers while the init containers run.
pub const REASON_POD_INITIALIZING: &str = "PodInitializing";
/// The waiting reason of a container whose volumes are not mounted yet.
pub const REASON_CONTAINER_CREATING: &str = "ContainerCreating";
/// The termination reason of a container the agent lost track of (it restarted).
pub const REASON_STATUS_UNKNOWN: &str = "ContainerStatusUnknown";
/// The pod-level reason of an evicted pod.
pub const REASON_EVICTED: &str = "Evicted";
/// Container runtime prefix of container IDs, as containerd reports them.
const CONTAINER_ID_SCHEME: &str = "containerd://";
/// Registry the container runtime prefixes to short image names.
const DEFAULT_REGISTRY: &str = "docker.io";

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    /// Exit code.
    pub exit_code: i32,
    /// The kubelet's reason: Completed, Error, OOMKilled, ….
    pub reason: String,
    /// The termination message, if any.
    pub message: Option<String>,
    /// When the container started.
    pub started_at: DateTime<Utc>,
    /// When the container exited.
    pub finished_at: DateTime<Utc>,
}

impl Termination {
    /// An exit as the kubelet words it: Completed for 0, Error otherwise.
    pub fn exited(
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
    /// Not running (yet).
    Waiting {
        /// Why, in the kubelet's words.
        reason: String,
        /// Details, if any.
        message: Option<String>,
    },
    /// Running since the given time.
    Running(DateTime<Utc>),
    /// Exited.
    Terminated(Termination),
}

impl RunState {
    /// A waiting state with a reason and an optional message.
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        Self::Waiting {
            reason: reason.to_owned(),
            message,
        }
    }
}

/// One container of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Container name.
    pub name: String,
    /// The image the container runs (or waits for).
    pub image: String,
    /// Current state.
    pub state: RunState,
    /// How the previous run ended (a sidecar that Tekton stopped by changing its image).
    pub last_termination: Option<Termination>,
    /// How often the container was restarted.
    pub restart_count: i32,
}

impl ContainerRecord {
    /// A container waiting for the init containers.
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            state: RunState::waiting(REASON_POD_INITIALIZING, None),
            last_termination: None,
            restart_count: 0,
        }
    }

    /// Whether the container runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, RunState::Running(_))
    }

    /// How it ended, if it did.
    pub fn termination(&self) -> Option<&Termination> {
        match &self.state {
            RunState::Terminated(termination) => Some(termination),
            _ => None,
        }
    }
}

/// The pod as the kubelet tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    /// The pod's UID (container IDs derive from it).
    pub uid: String,
    /// The pod's generation, reported back as observed.
    pub generation: Option<i64>,
    /// When the kubelet took the pod on.
    pub started_at: DateTime<Utc>,
    /// Init containers, in spec order.
    pub init_containers: Vec<ContainerRecord>,
    /// Steps and sidecars, in spec order.
    pub containers: Vec<ContainerRecord>,
    /// Why the pod was evicted, if it was.
    pub evicted: Option<String>,
}

/// The pod phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Init containers run, or a container waits.
    Pending,
    /// Containers run.
    Running,
    /// Every container exited 0.
    Succeeded,
    /// A container failed, or the pod was evicted.
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Whether nothing will run in the pod any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

impl PodState {
    /// Whether every init container exited 0.
    pub fn initialized(&self) -> bool {
        self.init_containers
            .iter()
            .all(|init| init.termination().is_some_and(|end| end.exit_code == 0))
    }

    /// The pod's phase (restartPolicy Never).
    pub fn phase(&self) -> Phase {
        if self.evicted.is_some() {
            return Phase::Failed;
        }
        if self
            .init_containers
            .iter()
            .any(|init| init.termination().is_some_and(|end| end.exit_code != 0))
        {
            return Phase::Failed;
        }
        if !self.initialized() {
            return Phase::Pending;
        }
        let mut running = false;
        let mut all_succeeded = true;
        for record in &self.containers {
            match &record.state {
                RunState::Waiting { .. } => return Phase::Pending,
                RunState::Running(_) => running = true,
                RunState::Terminated(end) => all_succeeded &= end.exit_code == 0,
            }
        }
        if running {
            Phase::Running
        } else if all_succeeded {
            Phase::Succeeded
        } else {
            Phase::Failed
        }
    }

    /// The pod status a kubelet would report.
    pub fn status(&self) -> PodStatus {
        let phase = self.phase();
        let initialized = self.initialized();
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|record| !record.is_running())
            .map(|record| record.name.as_str())
            .collect();
        let last_exit = self
            .init_containers
            .iter()
            .chain(&self.containers)
            .filter_map(ContainerRecord::termination)
            .map(|end| end.finished_at)
            .max()
            .unwrap_or(self.started_at);
        let (ready_status, ready_reason, ready_message) = if unready.is_empty() {
            ("True", None, None)
        } else if phase.is_final() {
            ("False", Some("PodCompleted"), None)
        } else {
            (
                "False",
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            )
        };
        let (init_status, init_reason, init_message) = if initialized {
            ("True", None, None)
        } else {
            let pending: Vec<&str> = self
                .init_containers
                .iter()
                .filter(|init| init.termination().is_none_or(|end| end.exit_code != 0))
                .map(|init| init.name.as_str())
                .collect();
            (
                "False",
                Some("ContainersNotInitialized"),
                Some(format!(
                    "containers with incomplete status: [{}]",
                    pending.join(" ")
                )),
            )
        };
        let sandbox_ready = if phase.is_final() { "False" } else { "True" };
        let mut conditions = vec![
            condition(
                "PodReadyToStartContainers",
                sandbox_ready,
                None,
                None,
                self.started_at,
            ),
            condition(
                "Initialized",
                init_status,
                init_reason,
                init_message,
                self.started_at,
            ),
            condition(
                "Ready",
                ready_status,
                ready_reason,
                ready_message.clone(),
                last_exit,
            ),
            condition(
                "ContainersReady",
                ready_status,
                ready_reason,
                ready_message,
                last_exit,
            ),
            condition("PodScheduled", "True", None, None, self.started_at),
        ];
        if self.evicted.is_some() {
            conditions.push(condition(
                "DisruptionTarget",
                "True",
                Some("TerminationByKubelet"),
                self.evicted.clone(),
                last_exit,
            ));
        }
        PodStatus {
            phase: Some(phase.as_str().to_owned()),
            reason: self.evicted.as_ref().map(|_| REASON_EVICTED.to_owned()),
            message: self.evicted.clone(),
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
                    .map(|record| container_status(&self.uid, record, true))
                    .collect(),
            ),
            container_statuses: Some(
                self.containers
                    .iter()
                    .map(|record| container_status(&self.uid, record, false))
                    .collect(),
            ),
            ..PodStatus::default()
        }
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

fn container_status(pod_uid: &str, record: &ContainerRecord, init: bool) -> ContainerStatus {
    let container_id = fake_container_id(pod_uid, &record.name, record.restart_count);
    let terminated_state = |end: &Termination, container_id: &str| ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: Some(container_id.to_owned()),
            exit_code: end.exit_code,
            reason: Some(end.reason.clone()),
            message: end.message.clone(),
            started_at: Some(to_kube_time(end.started_at)),
            finished_at: Some(to_kube_time(end.finished_at)),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    };
    let state = match &record.state {
        RunState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..ContainerState::default()
        },
        RunState::Running(since) => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(to_kube_time(*since)),
            }),
            ..ContainerState::default()
        },
        RunState::Terminated(end) => terminated_state(end, &container_id),
    };
    let created = !matches!(record.state, RunState::Waiting { .. });
    let previous_container_id = fake_container_id(pod_uid, &record.name, record.restart_count - 1);
    ContainerStatus {
        name: record.name.clone(),
        image: record.image.clone(),
        image_id: if created {
            fake_image_id(&record.image)
        } else {
            String::new()
        },
        container_id: created.then_some(container_id.clone()),
        ready: if init {
            record.termination().is_some_and(|end| end.exit_code == 0)
        } else {
            record.is_running()
        },
        started: Some(record.is_running()),
        restart_count: record.restart_count,
        state: Some(state),
        last_state: Some(
            record
                .last_termination
                .as_ref()
                .map(|end| terminated_state(end, &previous_container_id))
                .unwrap_or_default(),
        ),
        ..ContainerStatus::default()
    }
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
    use chrono::TimeZone;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, second)
            .single()
            .expect("valid test time")
    }

    fn exited(code: i32) -> RunState {
        RunState::Terminated(Termination::exited(code, None, at(1), at(2)))
    }

    fn pod(init: Vec<RunState>, containers: Vec<RunState>) -> PodState {
        let record = |(index, state): (usize, RunState)| ContainerRecord {
            state,
            ..ContainerRecord::new(&format!("c{index}"), "busybox")
        };
        PodState {
            uid: "uid-1".to_owned(),
            generation: Some(1),
            started_at: at(0),
            init_containers: init.into_iter().enumerate().map(record).collect(),
            containers: containers.into_iter().enumerate().map(record).collect(),
            evicted: None,
        }
    }

    #[test]
    fn phases_follow_the_kubelets_rules() {
        let waiting = || RunState::waiting(REASON_POD_INITIALIZING, None);
        let pull = || RunState::waiting(REASON_IMAGE_PULL_BACK_OFF, None);
        let running = || RunState::Running(at(1));
        let cases = [
            (pod(vec![running()], vec![waiting()]), Phase::Pending),
            (pod(vec![exited(1)], vec![waiting()]), Phase::Failed),
            (
                pod(vec![exited(0)], vec![running(), pull()]),
                Phase::Pending,
            ),
            (
                pod(vec![exited(0)], vec![running(), exited(1)]),
                Phase::Running,
            ),
            (
                pod(vec![exited(0)], vec![exited(0), exited(0)]),
                Phase::Succeeded,
            ),
            (pod(vec![], vec![exited(0), exited(137)]), Phase::Failed),
        ];
        for (state, expected) in cases {
            assert_eq!(state.phase(), expected, "{state:?}");
        }
        let mut evicted = pod(vec![exited(0)], vec![running()]);
        evicted.evicted = Some("The node was low on resource: memory.".to_owned());
        assert_eq!(evicted.phase(), Phase::Failed);
        let status = evicted.status();
        assert_eq!(status.reason.as_deref(), Some(REASON_EVICTED));
    }

    #[test]
    fn status_reports_what_the_kubelet_would() {
        let state = pod(
            vec![exited(0)],
            vec![
                RunState::Running(at(1)),
                RunState::waiting(REASON_ERR_IMAGE_PULL, Some("no registry".to_owned())),
            ],
        );
        let status = state.status();
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let containers = status.container_statuses.expect("container statuses");
        assert!(containers[0].ready);
        assert!(containers[0].container_id.is_some());
        assert!(!containers[1].ready);
        assert_eq!(containers[1].container_id, None);
        assert_eq!(
            containers[1]
                .state
                .as_ref()
                .and_then(|state| state.waiting.as_ref())
                .and_then(|waiting| waiting.reason.as_deref()),
            Some(REASON_ERR_IMAGE_PULL)
        );
        let inits = status.init_container_statuses.expect("init statuses");
        assert!(inits[0].ready);
    }

    #[test]
    fn image_ids_look_like_the_runtimes() {
        assert!(fake_image_id("busybox").starts_with("docker.io/library/busybox@sha256:"));
        assert_eq!(
            fake_image_id("cgr.dev/chainguard/busybox@sha256:abc"),
            "cgr.dev/chainguard/busybox@sha256:abc"
        );
        assert!(
            fake_image_id("tekton.local/entrypoint:v1")
                .starts_with("tekton.local/entrypoint@sha256:")
        );
    }
}
