//! What the agent runs for one pod, read from the pod's spec alone: each container's
//! command line, environment, working directory and mounts, as a kubelet would hand them
//! to a container runtime. Pure: nothing here touches the API or the file system.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, VolumeMount};

use node_agent::simulated::{SimulatedError, SimulatedStep};

/// Where a container's termination message goes when its spec names no path (Kubernetes'
/// default for `terminationMessagePath`).
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The policy that makes the kubelet use the log's tail when a failed container wrote no
/// termination message.
const FALLBACK_TO_LOGS_ON_ERROR: &str = "FallbackToLogsOnError";
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(30);
/// Tekton's entrypoint flag naming the step's own command.
const ENTRYPOINT_COMMAND_FLAG: &str = "entrypoint";
/// Where the stand-in of the `SIMULATED_*` contract is mounted inside a step's sandbox.
pub const STAND_IN_PATH: &str = "/tekton-step-observer/bin/simulated-step";

/// One container, as the runtime starts it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerPlan {
    /// Container name.
    pub name: String,
    /// Image as the spec names it.
    pub image: String,
    /// `command` followed by `args`, before `$(VAR)` expansion; empty: the image's default.
    pub command: Vec<String>,
    /// The spec's environment, resolved when the container starts.
    pub env: Vec<EnvVar>,
    /// Working directory; `None`: the image's default.
    pub working_dir: Option<String>,
    /// Volume mounts.
    pub mounts: Vec<VolumeMount>,
    /// Where the container writes its termination message.
    pub termination_message_path: String,
    /// Whether a failed container without a termination message gets its log's tail.
    pub fallback_to_logs_on_error: bool,
    /// The container runs Tekton's entrypoint (a step), which holds the step's own
    /// command back until the step's turn.
    pub runs_tekton_entrypoint: bool,
    /// The file Tekton's entrypoint waits for before it runs the step's command
    /// (`-wait_file`), and whether it must have content (`-wait_file_content`).
    pub wait_file: Option<(String, bool)>,
    /// The container is a Tekton step that runs the `SIMULATED_*` stand-in; `Err` when its
    /// values are unusable (the container then waits with a configuration error).
    pub simulated: Option<Result<SimulatedStep, SimulatedError>>,
}

/// Everything the agent runs for one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodPlan {
    /// Init containers, run one after the other.
    pub init_containers: Vec<ContainerPlan>,
    /// Steps and sidecars, started at once.
    pub containers: Vec<ContainerPlan>,
    /// How long stopping containers get between SIGTERM and SIGKILL.
    pub termination_grace: Duration,
}

impl PodPlan {
    /// Reads the plan from a pod's spec.
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let termination_grace = spec
            .termination_grace_period_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map_or(DEFAULT_TERMINATION_GRACE, Duration::from_secs);
        Self {
            init_containers: spec
                .init_containers
                .iter()
                .flatten()
                .map(container_plan)
                .collect(),
            containers: spec.containers.iter().map(container_plan).collect(),
            termination_grace,
        }
    }
}

fn container_plan(container: &Container) -> ContainerPlan {
    let command: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .cloned()
        .collect();
    let env = container.env.clone().unwrap_or_default();
    let literal: HashMap<&str, &str> = env
        .iter()
        .filter_map(|var| var.value.as_deref().map(|value| (var.name.as_str(), value)))
        .collect();
    let runs_tekton_entrypoint = entrypoint_command_index(&command).is_some();
    let wait_file = runs_tekton_entrypoint
        .then(|| entrypoint_flag(&command, "wait_file"))
        .flatten()
        .map(|file| {
            (
                file,
                entrypoint_flag(&command, "wait_file_content").is_some(),
            )
        });
    let simulated = if runs_tekton_entrypoint {
        SimulatedStep::from_env(|name| literal.get(name).map(|value| (*value).to_owned()))
            .transpose()
    } else {
        None
    };
    ContainerPlan {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        command,
        env,
        working_dir: container.working_dir.clone().filter(|dir| !dir.is_empty()),
        mounts: container.volume_mounts.clone().unwrap_or_default(),
        termination_message_path: container
            .termination_message_path
            .clone()
            .filter(|path| !path.is_empty())
            .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.to_owned()),
        fallback_to_logs_on_error: container.termination_message_policy.as_deref()
            == Some(FALLBACK_TO_LOGS_ON_ERROR),
        runs_tekton_entrypoint,
        wait_file,
        simulated,
    }
}

/// The value of one of Tekton's entrypoint flags (before `--`); a flag given
/// without a value (the boolean `-wait_file_content`) reads as `"true"`.
fn entrypoint_flag(command: &[String], name: &str) -> Option<String> {
    let flags = entrypoint_flag_tokens(command);
    let at = flags.iter().position(|token| {
        token.trim_start_matches('-').split('=').next() == Some(name) && token.starts_with('-')
    })?;
    let token = &flags[at];
    if let Some((_, value)) = token.split_once('=') {
        return Some(value.to_owned());
    }
    match flags.get(at + 1) {
        Some(value) if !value.starts_with('-') => Some(value.clone()),
        _ => Some("true".to_owned()),
    }
}

/// Index of the value of Tekton's `-entrypoint` flag in a step's command line: the step's
/// own command, which the entrypoint runs once the step's turn comes.
fn entrypoint_command_index(command: &[String]) -> Option<usize> {
    let flags = entrypoint_flag_tokens(command);
    flags
        .iter()
        .position(|token| token.trim_start_matches('-') == ENTRYPOINT_COMMAND_FLAG)
        .map(|flag| flag + 1)
        .filter(|value| *value < flags.len())
}

/// The part of a step's command line that holds Tekton's entrypoint flags:
/// everything before the `--` that starts the step's own arguments.
fn entrypoint_flag_tokens(command: &[String]) -> &[String] {
    let flags_end = command
        .iter()
        .position(|token| token == "--")
        .unwrap_or(command.len());
    &command[..flags_end]
}

/// A step's command line with the stand-in in place of the step's own command: the
/// `-entrypoint` value becomes [`STAND_IN_PATH`] and the command's arguments (after `--`)
/// go. Everything else stays Tekton's. `None` when the command is not Tekton's entrypoint.
pub fn with_stand_in(command: &[String]) -> Option<Vec<String>> {
    let index = entrypoint_command_index(command)?;
    let mut rewritten: Vec<String> = command.to_vec();
    rewritten[index] = STAND_IN_PATH.to_owned();
    if let Some(separator) = rewritten.iter().position(|token| token == "--") {
        rewritten.truncate(separator + 1);
    }
    Some(rewritten)
}

/// Expands `$(NAME)` references as the kubelet does in `command`, `args` and env values:
/// a defined name is replaced, `$$` escapes a `$`, anything else stays as written.
pub fn expand(text: &str, defined: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            out.push('$');
            rest = escaped;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(close) = reference.find(')')
            && let Some(value) = defined.get(&reference[..close])
        {
            out.push_str(value);
            rest = &reference[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    #[test]
    fn stand_in_replaces_only_the_steps_own_command() {
        let cases: [(&[&str], Option<&[&str]>); 4] = [
            (
                &[
                    "/tekton/bin/entrypoint",
                    "-wait_file",
                    "/tekton/downward/ready",
                    "-post_file",
                    "/tekton/run/0/out",
                    "-entrypoint",
                    "/tekton/scripts/script-0-abcde",
                    "--",
                ],
                Some(&[
                    "/tekton/bin/entrypoint",
                    "-wait_file",
                    "/tekton/downward/ready",
                    "-post_file",
                    "/tekton/run/0/out",
                    "-entrypoint",
                    STAND_IN_PATH,
                    "--",
                ]),
            ),
            (
                &[
                    "/tekton/bin/entrypoint",
                    "-entrypoint",
                    "echo",
                    "--",
                    "-entrypoint",
                    "x",
                ],
                Some(&["/tekton/bin/entrypoint", "-entrypoint", STAND_IN_PATH, "--"]),
            ),
            (&["sh", "-c", "echo hi"], None),
            (&["/tekton/bin/entrypoint", "-entrypoint"], None),
        ];
        for (command, expected) in cases {
            assert_eq!(
                with_stand_in(&strings(command)),
                expected.map(strings),
                "{command:?}"
            );
        }
    }

    #[test]
    fn entrypoint_flags_are_read_before_the_separator() {
        let command = strings(&[
            "/tekton/bin/entrypoint",
            "-wait_file",
            "/tekton/downward/ready",
            "-wait_file_content",
            "-post_file",
            "/tekton/run/0/out",
            "-entrypoint",
            "/tekton/scripts/s",
            "--",
            "-wait_file",
            "x",
        ]);
        assert_eq!(
            entrypoint_flag(&command, "wait_file").as_deref(),
            Some("/tekton/downward/ready")
        );
        assert_eq!(
            entrypoint_flag(&command, "wait_file_content").as_deref(),
            Some("true")
        );
        assert_eq!(entrypoint_flag(&command, "timeout"), None);
    }

    #[test]
    fn kubelet_expansion() {
        let defined: HashMap<String, String> = [("A", "1"), ("HOME", "/tekton/home")]
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        let cases = [
            ("$(A)", "1"),
            ("x$(A)y$(HOME)", "x1y/tekton/home"),
            ("$$(A)", "$(A)"),
            ("$(UNDEFINED)", "$(UNDEFINED)"),
            ("$(A", "$(A"),
            ("cost $5", "cost $5"),
            ("$", "$"),
        ];
        for (text, expected) in cases {
            assert_eq!(expand(text, &defined), expected, "{text}");
        }
    }

    #[test]
    fn plan_reads_the_contract_only_for_tekton_steps() {
        let env = |value: &str| {
            Some(vec![EnvVar {
                name: "SIMULATED_EXIT_CODE".to_owned(),
                value: Some(value.to_owned()),
                ..EnvVar::default()
            }])
        };
        let step = Container {
            name: "step-a".to_owned(),
            command: Some(strings(&["/tekton/bin/entrypoint"])),
            args: Some(strings(&["-entrypoint", "/tekton/scripts/s", "--"])),
            env: env("3"),
            ..Container::default()
        };
        let bad_step = Container {
            name: "step-b".to_owned(),
            env: env("x"),
            ..step.clone()
        };
        let sidecar = Container {
            name: "sidecar-c".to_owned(),
            command: Some(strings(&["sh", "-c", "sleep 1"])),
            env: env("3"),
            termination_message_path: None,
            ..Container::default()
        };
        let pod = Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![step, bad_step, sidecar],
                termination_grace_period_seconds: Some(5),
                ..Default::default()
            }),
            ..Pod::default()
        };
        let plan = PodPlan::from_pod(&pod);
        assert_eq!(plan.termination_grace, Duration::from_secs(5));
        assert_eq!(
            plan.containers[0]
                .simulated
                .clone()
                .map(|step| step.map(|step| step.exit_code)),
            Some(Ok(3))
        );
        assert_eq!(
            plan.containers[1].simulated,
            Some(Err(SimulatedError::ExitCode("x".to_owned())))
        );
        assert_eq!(plan.containers[2].simulated, None);
        assert_eq!(
            plan.containers[2].termination_message_path,
            DEFAULT_TERMINATION_MESSAGE_PATH
        );
    }
}
