//! What a Tekton TaskRun pod asks the simulator to do, read from the pod's spec alone.
//!
//! Each step container states its outcome in its environment (see the crate's README):
//! `SIMULATED_EXIT_CODE`, `SIMULATED_DURATION_MS`, `SIMULATED_LOG` and `SIMULATED_LOG_BYTES`. The rest comes from
//! the arguments Tekton gives its entrypoint binary (`-on_error`, `-timeout`, `-wait_file`)
//! and from the pod's downward-API volume.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};

/// Environment variable holding the exit code the step's command exits with.
pub const EXIT_CODE_ENV: &str = "SIMULATED_EXIT_CODE";
/// Environment variable holding how long the step's command runs, in milliseconds.
pub const DURATION_ENV: &str = "SIMULATED_DURATION_MS";
/// Environment variable holding the text the step's command prints to stdout.
pub const LOG_ENV: &str = "SIMULATED_LOG";
/// Environment variable holding how many bytes of filler lines the step's command prints
/// before `SIMULATED_LOG`: large logs that could never pass through a pod's environment.
pub const LOG_BYTES_ENV: &str = "SIMULATED_LOG_BYTES";
/// The most filler a step may ask for (1 GiB): far beyond any test's need, and a typo can
/// not fill the disk.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// A step that states no duration runs this long: short, yet visibly running.
const DEFAULT_STEP_DURATION: Duration = Duration::from_millis(100);
/// Tekton names every step container with this prefix; every other container is a sidecar.
const STEP_CONTAINER_PREFIX: &str = "step-";
/// The file the first step's entrypoint waits for when Tekton waits for sidecars to be ready.
const READY_WAIT_FILE: &str = "/tekton/downward/ready";
/// The annotation whose downward-API file tells entrypoints to cancel (keep-pod-on-cancel).
const CANCEL_ANNOTATION: &str = "tekton.dev/cancel";
/// The entrypoint's boolean flags: they take no value argument (see cmd/entrypoint).
const ENTRYPOINT_BOOLEAN_FLAGS: [&str; 3] = [
    "wait_file_content",
    "breakpoint_on_failure",
    "debug_before_step",
];
/// The largest exit code a process can report to its parent.
const MAX_EXIT_CODE: i32 = 255;

/// What the entrypoint does when the step's command exits non-zero (`-on_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Fail the step and skip all later steps (Tekton's default, `stopAndFail`).
    StopAndFail,
    /// Record the exit code, report success and go on (`continue`).
    Continue,
}

/// One step container and the outcome it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Index of the container in the pod spec's `containers`.
    pub container_index: usize,
    /// Exit code of the step's command.
    pub exit_code: i32,
    /// How long the step's command runs.
    pub duration: Duration,
    /// What the step's command prints to stdout.
    pub log: String,
    /// Bytes of filler lines the command prints before `log` (see [`crate::logs::filler`]).
    pub filler_log_bytes: u64,
    /// The step's `onError`.
    pub on_error: OnError,
    /// The step's own `timeout`, if it has one.
    pub timeout: Option<Duration>,
}

/// A container of the pod, as the kubelet starts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPlan {
    /// Container name.
    pub name: String,
    /// Container image as the spec names it.
    pub image: String,
}

/// Everything the simulator needs to know about one TaskRun pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    /// The pod's init containers, in spec order.
    pub init_containers: Vec<ContainerPlan>,
    /// The pod's containers (steps and sidecars), in spec order.
    pub containers: Vec<ContainerPlan>,
    /// The steps in the order the entrypoints run them.
    pub steps: Vec<StepPlan>,
    /// Indices into `containers` of the non-step containers.
    pub sidecars: Vec<usize>,
    /// The first step waits for the `tekton.dev/ready` annotation before it runs.
    pub first_step_waits_for_ready: bool,
    /// Entrypoints see the `tekton.dev/cancel` annotation (the keep-pod-on-cancel feature).
    pub cancel_via_annotation: bool,
}

/// Why a pod's spec cannot be simulated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The pod has no container named `step-*`.
    #[error("the pod has no step container")]
    NoSteps,
    /// `SIMULATED_EXIT_CODE` is not an integer in 0..=255.
    #[error("{container}: {EXIT_CODE_ENV}={value:?} is not an exit code (0..=255)")]
    InvalidExitCode {
        /// Container the value is in.
        container: String,
        /// The value as written.
        value: String,
    },
    /// `SIMULATED_DURATION_MS` is not a non-negative integer.
    #[error("{container}: {DURATION_ENV}={value:?} is not a number of milliseconds")]
    InvalidDuration {
        /// Container the value is in.
        container: String,
        /// The value as written.
        value: String,
    },
    /// `SIMULATED_LOG_BYTES` is not an integer in 0..=[`MAX_LOG_BYTES`].
    #[error(
        "{container}: {LOG_BYTES_ENV}={value:?} is not a number of bytes (0..={MAX_LOG_BYTES})"
    )]
    InvalidLogBytes {
        /// Container the value is in.
        container: String,
        /// The value as written.
        value: String,
    },
    /// The entrypoint's `-timeout` is not a Go duration.
    #[error("{container}: entrypoint -timeout {value:?} is not a duration")]
    InvalidTimeout {
        /// Container the value is in.
        container: String,
        /// The value as written.
        value: String,
    },
}

impl PodPlan {
    /// Reads the plan from a pod's spec.
    pub fn from_pod(pod: &Pod) -> Result<Self, PlanError> {
        let Some(spec) = pod.spec.as_ref() else {
            return Err(PlanError::NoSteps);
        };
        let init_containers = spec
            .init_containers
            .iter()
            .flatten()
            .map(container_plan)
            .collect();
        let containers = container_plans(pod);
        let mut steps = Vec::new();
        let mut sidecars = Vec::new();
        for (index, container) in spec.containers.iter().enumerate() {
            if container.name.starts_with(STEP_CONTAINER_PREFIX) {
                steps.push(step_plan(index, container)?);
            } else {
                sidecars.push(index);
            }
        }
        let Some(first_step) = steps.first() else {
            return Err(PlanError::NoSteps);
        };
        let first_step_flags = entrypoint_flags(
            &spec.containers[first_step.container_index]
                .args
                .clone()
                .unwrap_or_default(),
        );
        let first_step_waits_for_ready =
            first_step_flags.get("wait_file").map(String::as_str) == Some(READY_WAIT_FILE);
        let cancel_via_annotation = spec.volumes.iter().flatten().any(|volume| {
            volume
                .downward_api
                .iter()
                .flat_map(|downward| downward.items.iter().flatten())
                .any(|item| {
                    item.field_ref
                        .as_ref()
                        .is_some_and(|field| field.field_path.contains(CANCEL_ANNOTATION))
                })
        });
        Ok(Self {
            init_containers,
            containers,
            steps,
            sidecars,
            first_step_waits_for_ready,
            cancel_via_annotation,
        })
    }
}

/// The pod's containers (not the init containers), in spec order.
pub fn container_plans(pod: &Pod) -> Vec<ContainerPlan> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .map(container_plan)
        .collect()
}

fn container_plan(container: &Container) -> ContainerPlan {
    ContainerPlan {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
    }
}

fn step_plan(container_index: usize, container: &Container) -> Result<StepPlan, PlanError> {
    let env: HashMap<&str, &str> = container
        .env
        .iter()
        .flatten()
        .filter_map(|var| var.value.as_deref().map(|value| (var.name.as_str(), value)))
        .collect();
    let exit_code = match env.get(EXIT_CODE_ENV) {
        None => 0,
        Some(value) => value
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|code| (0..=MAX_EXIT_CODE).contains(code))
            .ok_or_else(|| PlanError::InvalidExitCode {
                container: container.name.clone(),
                value: (*value).to_owned(),
            })?,
    };
    let duration = match env.get(DURATION_ENV) {
        None => DEFAULT_STEP_DURATION,
        Some(value) => value
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| PlanError::InvalidDuration {
                container: container.name.clone(),
                value: (*value).to_owned(),
            })?,
    };
    let log = env
        .get(LOG_ENV)
        .map(|log| (*log).to_owned())
        .unwrap_or_default();
    let filler_log_bytes = match env.get(LOG_BYTES_ENV) {
        None => 0,
        Some(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|bytes| *bytes <= MAX_LOG_BYTES)
            .ok_or_else(|| PlanError::InvalidLogBytes {
                container: container.name.clone(),
                value: (*value).to_owned(),
            })?,
    };
    let flags = entrypoint_flags(&container.args.clone().unwrap_or_default());
    let on_error = match flags.get("on_error").map(String::as_str) {
        Some("continue") => OnError::Continue,
        _ => OnError::StopAndFail,
    };
    let timeout = match flags.get("timeout") {
        None => None,
        Some(value) => {
            let timeout = parse_go_duration(value).ok_or_else(|| PlanError::InvalidTimeout {
                container: container.name.clone(),
                value: value.clone(),
            })?;
            // The entrypoint only enforces a positive timeout.
            (!timeout.is_zero()).then_some(timeout)
        }
    };
    Ok(StepPlan {
        container_index,
        exit_code,
        duration,
        log,
        filler_log_bytes,
        on_error,
        timeout,
    })
}

/// Parses the flags Tekton passes to its entrypoint (Go `flag` syntax) up to the `--` that
/// starts the step's own command. Later occurrences win, as in Go.
pub fn entrypoint_flags(args: &[String]) -> HashMap<String, String> {
    let mut flags = HashMap::new();
    let mut tokens = args.iter();
    while let Some(token) = tokens.next() {
        if token == "--" || !token.starts_with('-') || token == "-" {
            break;
        }
        let name = token.trim_start_matches('-');
        if let Some((name, value)) = name.split_once('=') {
            flags.insert(name.to_owned(), value.to_owned());
        } else if ENTRYPOINT_BOOLEAN_FLAGS.contains(&name) {
            flags.insert(name.to_owned(), "true".to_owned());
        } else if let Some(value) = tokens.next() {
            flags.insert(name.to_owned(), value.clone());
        }
    }
    flags
}

/// Parses a non-negative Go duration as `time.Duration.String()` writes it (`1m30s`, `500ms`).
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_nanos += number * nanos_per_unit;
    }
    // Truncation to whole nanoseconds is what Go does too.
    Some(Duration::from_nanos(total_nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, PodSpec};

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    fn step(name: &str, env: &[(&str, &str)], args: &[&str]) -> Container {
        Container {
            name: name.to_owned(),
            image: Some("busybox".to_owned()),
            args: Some(strings(args)),
            env: Some(
                env.iter()
                    .map(|(name, value)| EnvVar {
                        name: (*name).to_owned(),
                        value: Some((*value).to_owned()),
                        ..EnvVar::default()
                    })
                    .collect(),
            ),
            ..Container::default()
        }
    }

    fn pod(containers: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn go_durations() {
        let cases: [(&str, Option<Duration>); 9] = [
            ("0", Some(Duration::ZERO)),
            ("0s", Some(Duration::ZERO)),
            ("1s", Some(Duration::from_secs(1))),
            ("500ms", Some(Duration::from_millis(500))),
            ("1m30s", Some(Duration::from_secs(90))),
            ("1h0m0s", Some(Duration::from_secs(3600))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("3", None),
            ("-1s", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_go_duration(text), expected, "{text}");
        }
    }

    #[test]
    fn entrypoint_flag_parsing() {
        /// Entrypoint arguments and the flags expected from them.
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
        let cases: [Case; 4] = [
            (
                &[
                    "-wait_file",
                    "/tekton/downward/ready",
                    "-wait_file_content",
                    "-post_file",
                    "/tekton/run/0/out",
                    "-on_error",
                    "continue",
                    "--",
                    "-timeout",
                    "1s",
                ],
                &[
                    ("wait_file", "/tekton/downward/ready"),
                    ("wait_file_content", "true"),
                    ("post_file", "/tekton/run/0/out"),
                    ("on_error", "continue"),
                ],
            ),
            (
                &["-timeout=2s", "--on_error=stopAndFail"],
                &[("timeout", "2s"), ("on_error", "stopAndFail")],
            ),
            (
                &["--when_expressions", "[]", "-entrypoint", "sh"],
                &[("when_expressions", "[]"), ("entrypoint", "sh")],
            ),
            (&[], &[]),
        ];
        for (args, expected) in cases {
            let expected: HashMap<String, String> = expected
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect();
            assert_eq!(entrypoint_flags(&strings(args)), expected, "{args:?}");
        }
    }

    #[test]
    fn steps_read_their_outcome_from_env_and_entrypoint_args() {
        let plan = PodPlan::from_pod(&pod(vec![
            step(
                "step-first",
                &[],
                &[
                    "-wait_file",
                    "/tekton/downward/ready",
                    "-wait_file_content",
                    "--",
                ],
            ),
            step(
                "step-second",
                &[
                    (EXIT_CODE_ENV, "3"),
                    (DURATION_ENV, "2500"),
                    (LOG_ENV, "hello\n"),
                    (LOG_BYTES_ENV, "104857600"),
                ],
                &["-on_error", "continue", "-timeout", "1m0s", "--"],
            ),
            step("sidecar-db", &[], &[]),
        ]));
        let expected = PodPlan {
            init_containers: vec![],
            containers: ["step-first", "step-second", "sidecar-db"]
                .iter()
                .map(|name| ContainerPlan {
                    name: (*name).to_owned(),
                    image: "busybox".to_owned(),
                })
                .collect(),
            steps: vec![
                StepPlan {
                    container_index: 0,
                    exit_code: 0,
                    duration: DEFAULT_STEP_DURATION,
                    log: String::new(),
                    filler_log_bytes: 0,
                    on_error: OnError::StopAndFail,
                    timeout: None,
                },
                StepPlan {
                    container_index: 1,
                    exit_code: 3,
                    duration: Duration::from_millis(2500),
                    log: "hello\n".to_owned(),
                    filler_log_bytes: 100 << 20,
                    on_error: OnError::Continue,
                    timeout: Some(Duration::from_secs(60)),
                },
            ],
            sidecars: vec![2],
            first_step_waits_for_ready: true,
            cancel_via_annotation: false,
        };
        assert_eq!(plan, Ok(expected));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let cases = [
            (
                pod(vec![step("sidecar-only", &[], &[])]),
                PlanError::NoSteps,
            ),
            (
                pod(vec![step("step-a", &[(EXIT_CODE_ENV, "256")], &[])]),
                PlanError::InvalidExitCode {
                    container: "step-a".to_owned(),
                    value: "256".to_owned(),
                },
            ),
            (
                pod(vec![step("step-a", &[(DURATION_ENV, "1s")], &[])]),
                PlanError::InvalidDuration {
                    container: "step-a".to_owned(),
                    value: "1s".to_owned(),
                },
            ),
            (
                pod(vec![step("step-a", &[(LOG_BYTES_ENV, "-1")], &[])]),
                PlanError::InvalidLogBytes {
                    container: "step-a".to_owned(),
                    value: "-1".to_owned(),
                },
            ),
            (
                pod(vec![step("step-a", &[(LOG_BYTES_ENV, "1073741825")], &[])]),
                PlanError::InvalidLogBytes {
                    container: "step-a".to_owned(),
                    value: "1073741825".to_owned(),
                },
            ),
            (
                pod(vec![step("step-a", &[], &["-timeout", "soon"])]),
                PlanError::InvalidTimeout {
                    container: "step-a".to_owned(),
                    value: "soon".to_owned(),
                },
            ),
        ];
        for (pod, expected) in cases {
            assert_eq!(PodPlan::from_pod(&pod), Err(expected));
        }
    }
}
