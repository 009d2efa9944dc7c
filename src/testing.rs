//! Builders of TaskRuns shaped like the ones the Tekton controller writes,
//! for unit tests and benchmarks. Real captured TaskRuns live in
//! `tests/fixtures/<tekton version>/`.

use chrono::{DateTime, Duration, TimeZone, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::event::{EventInput, StepLog};
use crate::steps::Transition;
use crate::tekton::{Condition, TaskRun, TaskRunRef, TaskRunStatus, TaskSpec, TektonVersion};

/// TaskRun `ci/build-42` of PipelineRun `release` (task `build`), as events
/// name it.
pub fn taskrun_ref() -> TaskRunRef {
    TaskRunRef {
        version: TektonVersion::V1,
        namespace: "ci".into(),
        name: "build-42".into(),
        uid: "50df8d70-8c11-4cd4-8fdf-3aa4cb287408".into(),
        pipeline_run: Some("release".into()),
        pipeline_task: Some("build".into()),
        pipeline_run_uid: Some("0f3c8a42-2f7e-4c0b-9b55-8d8a0c4f1e21".into()),
    }
}

/// The event input of `transition` as the delivery worker builds it from
/// `status`: the step's spec, its state and the pod, with `log` where the
/// event carries one (terminal events) and none otherwise.
pub fn event_input<'a>(
    taskrun: &'a TaskRunRef,
    status: &'a TaskRunStatus,
    transition: &'a Transition,
    log: &'a StepLog,
) -> EventInput<'a> {
    const NOT_CARRIED: &StepLog = &StepLog::NotCarried;
    EventInput {
        taskrun,
        transition,
        step_spec: status
            .task_spec
            .as_ref()
            .and_then(|s| s.steps.get(transition.step_index)),
        step_state: status.steps.get(transition.step_index),
        pod_name: status.pod_name.as_deref(),
        log: if transition.kind.is_terminal() {
            log
        } else {
            NOT_CARRIED
        },
    }
}

/// A simulated step state, relative to the step's position.
#[derive(Clone, Debug)]
pub struct StepState {
    kind: StateKind,
    termination_reason: Option<&'static str>,
    never_started: bool,
}

#[derive(Clone, Debug)]
enum StateKind {
    Waiting,
    Running,
    Exited(i64),
    Skipped,
    Killed(&'static str),
}

/// A step whose container waits (pod initialising).
pub fn waiting() -> StepState {
    StepState::new(StateKind::Waiting, None)
}

/// A step whose container runs; `_n` is unused and reads as "running since".
pub fn running(_n: u32) -> StepState {
    StepState::new(StateKind::Running, None)
}

/// A step that exited with `code`.
pub fn exited(code: i64) -> StepState {
    let reason = if code == 0 { "Completed" } else { "Error" };
    StepState::new(StateKind::Exited(code), Some(reason))
}

/// A step the entrypoint skipped after an earlier failure.
pub fn skipped() -> StepState {
    StepState::new(StateKind::Skipped, Some("Skipped"))
}

/// A step whose `when` was false: the entrypoint skips it with exit 0 and
/// lets the next step run (`allowExec` in pkg/entrypoint/entrypointer.go).
pub fn when_skipped() -> StepState {
    StepState::new(StateKind::Exited(0), Some("Skipped"))
}

/// A step ended by the TaskRun's end (`TaskRunTimeout`, `TaskRunCancelled`).
pub fn killed(reason: &'static str) -> StepState {
    StepState::new(StateKind::Killed(reason), None)
}

impl StepState {
    fn new(kind: StateKind, termination_reason: Option<&'static str>) -> Self {
        StepState {
            kind,
            termination_reason,
            never_started: false,
        }
    }

    /// As Tekton reports an `onError: continue` failure.
    pub fn continued(mut self) -> Self {
        self.termination_reason = Some("Continued");
        self
    }

    /// As older Tekton versions report it, with no `terminationReason`.
    pub fn without_termination_reason(mut self) -> Self {
        self.termination_reason = None;
        self
    }

    /// Ended by the run while its container still waited: Tekton stamps
    /// `startedAt` with the TaskRun's creation time (terminateStepsInPod,
    /// pkg/reconciler/taskrun/taskrun.go, v1.9.2 line 931, v1.15.0 line 1054).
    pub fn never_started(mut self) -> Self {
        self.never_started = true;
        self
    }
}

/// Builds a TaskRun step by step.
#[derive(Clone, Debug)]
pub struct TaskRunBuilder {
    name: String,
    spec_steps: Vec<Value>,
    step_states: Vec<Value>,
    condition: Option<(String, String)>,
    annotations: Vec<(String, String)>,
}

/// When the simulated TaskRun was created: before its first reconcile.
pub fn created() -> DateTime<Utc> {
    epoch() - Duration::seconds(3)
}

/// When the simulated pod started.
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
        .single()
        .unwrap_or_default()
}

fn stamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Step i runs from second 10i+1 to 10i+5 after [`epoch`].
fn step_start(index: usize) -> DateTime<Utc> {
    epoch() + Duration::seconds(10 * index as i64 + 1)
}

fn step_end(index: usize) -> DateTime<Utc> {
    epoch() + Duration::seconds(10 * index as i64 + 5)
}

impl TaskRunBuilder {
    /// A TaskRun named `name` in namespace `default`.
    pub fn new(name: &str) -> Self {
        TaskRunBuilder {
            name: name.to_owned(),
            spec_steps: Vec::new(),
            step_states: Vec::new(),
            condition: None,
            annotations: Vec::new(),
        }
    }

    fn push_spec(&mut self, name: &str, continue_on_error: bool) {
        let mut spec = json!({
            "name": name,
            "image": "docker.io/library/alpine:3.20",
            "script": format!("#!/bin/sh\necho {name}\n"),
            "computeResources": {},
        });
        if continue_on_error {
            spec["onError"] = json!("continue");
        }
        self.spec_steps.push(spec);
    }

    /// Adds a step with its state.
    pub fn step(mut self, name: &str, state: StepState) -> Self {
        self.push_spec(name, false);
        self.push_state(name, state);
        self
    }

    /// Adds an `onError: continue` step with its state.
    pub fn step_continue_on_error(mut self, name: &str, state: StepState) -> Self {
        self.push_spec(name, true);
        self.push_state(name, state);
        self
    }

    /// Adds a step with `when` expressions and its state.
    pub fn step_with_when(mut self, name: &str, state: StepState) -> Self {
        self.push_spec(name, false);
        if let Some(spec) = self.spec_steps.last_mut() {
            spec["when"] = json!([{"input": "a", "operator": "in", "values": ["b"]}]);
        }
        self.push_state(name, state);
        self
    }

    /// Adds a step to the spec only (the run ended before the pod ran).
    pub fn spec_only_step(mut self, name: &str) -> Self {
        self.push_spec(name, false);
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Marks the run succeeded.
    pub fn succeeded(mut self) -> Self {
        self.condition = Some(("True".to_owned(), "Succeeded".to_owned()));
        self
    }

    /// Marks the run failed with `reason`.
    pub fn failed(mut self, reason: &str) -> Self {
        self.condition = Some(("False".to_owned(), reason.to_owned()));
        self
    }

    fn push_state(&mut self, name: &str, state: StepState) {
        let index = self.step_states.len();
        let name = if name.is_empty() {
            format!("unnamed-{index}")
        } else {
            name.to_owned()
        };
        let container = format!("step-{name}");
        let mut value = json!({
            "name": name,
            "container": container,
            "imageID": "docker.io/library/alpine@sha256:1e42bbe2508154c9126d48c2b8a75420c3544343bf86fd041fb7527e017a4b4a",
        });
        let container_id = format!("containerd://{:064x}", index + 1);
        match state.kind {
            StateKind::Waiting => value["waiting"] = json!({"reason": "PodInitializing"}),
            StateKind::Running => value["running"] = json!({"startedAt": stamp(epoch())}),
            StateKind::Exited(code) => {
                let reason = if code == 0 { "Completed" } else { "Error" };
                value["terminated"] = json!({
                    "exitCode": code,
                    "reason": reason,
                    "startedAt": stamp(step_start(index)),
                    "finishedAt": stamp(step_end(index)),
                    "containerID": container_id,
                });
            }
            StateKind::Skipped => {
                value["terminated"] = json!({
                    "exitCode": 1,
                    "reason": "Error",
                    "startedAt": stamp(step_start(index)),
                    "finishedAt": stamp(step_start(index)),
                    "containerID": container_id,
                });
            }
            StateKind::Killed(reason) => {
                let mut terminated = json!({
                    "exitCode": 1,
                    "reason": reason,
                    "finishedAt": stamp(step_end(index)),
                });
                terminated["startedAt"] = if state.never_started {
                    json!(stamp(created()))
                } else {
                    json!(stamp(epoch()))
                };
                value["terminated"] = terminated;
            }
        }
        if let Some(reason) = state.termination_reason {
            value["terminationReason"] = json!(reason);
        }
        // A container never created has no image ID (the kubelet reports it
        // once the container exists; Tekton omits it when empty).
        if (state.never_started || matches!(state.kind, StateKind::Waiting))
            && let Some(fields) = value.as_object_mut()
        {
            fields.remove("imageID");
        }
        self.step_states.push(value);
    }

    /// The TaskRun.
    pub fn build(self) -> TaskRun {
        let step_count = self.spec_steps.len().max(1);
        let mut conditions = Vec::new();
        let mut completion_time = None;
        match self.condition {
            Some((status, reason)) => {
                completion_time = Some(stamp(step_end(step_count)));
                conditions.push(Condition {
                    type_: "Succeeded".to_owned(),
                    status,
                    reason: Some(reason),
                });
            }
            None => conditions.push(Condition {
                type_: "Succeeded".to_owned(),
                status: "Unknown".to_owned(),
                reason: Some("Running".to_owned()),
            }),
        }
        TaskRun {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some("default".to_owned()),
                uid: Some("50df8d70-8c11-4cd4-8fdf-3aa4cb287408".to_owned()),
                creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(created().timestamp())
                        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                )),
                resource_version: Some("1234".to_owned()),
                annotations: (!self.annotations.is_empty())
                    .then(|| self.annotations.into_iter().collect()),
                ..ObjectMeta::default()
            },
            status: Some(TaskRunStatus {
                conditions,
                pod_name: Some(format!("{}-pod", self.name)),
                completion_time,
                steps: self.step_states,
                task_spec: Some(TaskSpec {
                    steps: self.spec_steps,
                }),
                ..TaskRunStatus::default()
            }),
        }
    }
}
