//! PURE: the step state machine. Given what a TaskRun's status says now and
//! what the ledger says was settled, which step events are owed, in order?
//!
//! NB: Tekton starts every step container at once; its entrypoint makes each
//! wait for the one before. So a `running` container does not mean its step
//! runs. Step 0 starts when its container runs; step i>0 starts when step
//! i-1 ended in a way that lets it go on (succeeded, or failed with
//! `onError: continue`). Everything here reads the whole `status.steps` list.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::ledger::Ledger;
use crate::tekton::TaskRunStatus;

pub use crate::step_event::{EventFormat, EventFormats, StepEventKind};

/// `terminationReason` values Tekton sets on a step (pkg/pod/status.go).
mod termination_reason {
    pub const SKIPPED: &str = "Skipped";
    pub const CONTINUED: &str = "Continued";
    pub const CANCELLED: &str = "Cancelled";
    pub const TIMEOUT_EXCEEDED: &str = "TimeoutExceeded";
}

/// Reasons Tekton writes into a step's `terminated.reason` when it ends the
/// whole TaskRun (cancel, timeout) rather than the step ending by itself.
/// Any other failure reason of the run counts too when the step carries it
/// (see [`StepFacts`] and `terminateStepsInPod`).
const RUN_KILL_REASONS: [&str; 2] = ["TaskRunCancelled", "TaskRunTimeout"];

/// The reason of a `skipped` event for a step whose `when` was false.
pub const WHEN_FALSE_REASON: &str = "WhenExpressionsFalse";

/// One owed (or reached) step event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The TaskRun attempt: 0 for the first run, n for the n-th retry.
    pub attempt: u32,
    /// Sequence numbers of earlier attempts end here (2 per step each).
    pub sequence_base: u64,
    /// Position of the step in the Task.
    pub step_index: usize,
    /// The step's name as Tekton reports it (`unnamed-0` for unnamed steps).
    pub step_name: String,
    /// What happened.
    pub kind: StepEventKind,
    /// The vocabulary the event is written in.
    pub format: EventFormat,
    /// When it happened, from the step's state (not when we noticed).
    pub time: Option<DateTime<Utc>>,
    /// Why a step failed or was skipped, for humans.
    pub reason: Option<String>,
}

impl Transition {
    /// The event's position within its TaskRun: started(i) is 2i+1 and the
    /// terminal event 2i+2, after every event of earlier attempts, so
    /// consumers can restore order and the number is the same on every resend.
    pub fn sequence(&self) -> u64 {
        let base = self.sequence_base + 2 * self.step_index as u64;
        if self.kind == StepEventKind::Started {
            base + 1
        } else {
            base + 2
        }
    }
}

/// Why no decision can be made yet. Nothing is emitted; the next status
/// update is awaited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// Tekton has not reconciled the TaskRun yet.
    NoStatus,
    /// `status.taskSpec` is missing (still resolving the Task).
    NoTaskSpec,
    /// `status.steps` does not line up with the spec's steps.
    StepsMismatch {
        /// Steps in the spec.
        spec: usize,
        /// Entries in `status.steps`.
        status: usize,
    },
    /// A step name in the status differs from the spec's at the same index.
    StepNameMismatch {
        /// Index of the first disagreement.
        index: usize,
    },
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::NoStatus => write!(f, "no status yet"),
            NotReady::NoTaskSpec => write!(f, "status.taskSpec not resolved yet"),
            NotReady::StepsMismatch { spec, status } => {
                write!(f, "status has {status} steps, spec has {spec}")
            }
            NotReady::StepNameMismatch { index } => {
                write!(f, "step {index} is named differently in status and spec")
            }
        }
    }
}

/// Whether the TaskRun as a whole has ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RunPhase {
    /// Still running (or not started).
    #[default]
    Running,
    /// Ended: the `Succeeded` condition is True or False.
    Finished {
        /// The condition's reason (`Succeeded`, `Failed`, `TaskRunCancelled`, ...).
        reason: Option<String>,
        /// `status.completionTime`.
        at: Option<DateTime<Utc>>,
    },
}

/// The container state of one step, as the decision needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StepPhase {
    /// No state yet, or `waiting`.
    #[default]
    Waiting,
    /// The container runs (which need not mean the step does).
    Running {
        /// Container start.
        started_at: Option<DateTime<Utc>>,
    },
    /// The container ended.
    Terminated {
        /// Exit code as Tekton reports it (the real one for onError continue).
        exit_code: i64,
        /// `terminated.reason`.
        reason: Option<String>,
        /// When the step started (Tekton takes it from the entrypoint).
        started_at: Option<DateTime<Utc>>,
        /// When it ended.
        finished_at: Option<DateTime<Utc>>,
    },
}

/// One step: its spec facts and its state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepFacts {
    /// Name as in `status.steps[].name`.
    pub name: String,
    /// `onError: continue` in the spec.
    pub continue_on_error: bool,
    /// Container state.
    pub phase: StepPhase,
    /// `terminationReason`, where Tekton reports it.
    pub termination_reason: Option<String>,
    /// The step has `when` expressions: its entrypoint may skip it the
    /// moment its turn comes, so that turn coming does not mean it runs.
    pub has_when: bool,
    /// Whether the step's container was ever created: the kubelet reports
    /// an `imageID` once it is, and Tekton copies it into the step state.
    pub container_created: bool,
}

/// Everything the decision reads from one TaskRun status: the current
/// attempt, and the earlier ones of a retried TaskRun.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFacts {
    /// The steps in order.
    pub steps: Vec<StepFacts>,
    /// Whether the run (this attempt) ended.
    pub phase: RunPhase,
    /// Which attempt: 0 for the first run.
    pub attempt: u32,
    /// The earlier attempts, oldest first (empty within an earlier attempt).
    pub earlier_attempts: Vec<RunFacts>,
}

/// Reads the facts out of a TaskRun status, or says why it cannot yet.
pub fn run_facts(status: Option<&TaskRunStatus>) -> Result<RunFacts, NotReady> {
    let status = status.ok_or(NotReady::NoStatus)?;
    let spec_steps = &status.task_spec.as_ref().ok_or(NotReady::NoTaskSpec)?.steps;
    if spec_steps.is_empty() {
        return Err(NotReady::NoTaskSpec);
    }
    let mut earlier_attempts = Vec::with_capacity(status.retries_status.len());
    for (attempt, archived) in (0u32..).zip(&status.retries_status) {
        earlier_attempts.push(attempt_facts(archived, spec_steps, attempt, None)?);
    }
    let previous_steps = status.retries_status.last().map(|s| s.steps.as_slice());
    let mut facts = attempt_facts(status, spec_steps, status.attempt(), previous_steps)?;
    facts.earlier_attempts = earlier_attempts;
    Ok(facts)
}

/// The facts of one attempt. `previous_steps` are the step states of the
/// attempt before: after a retry Tekton keeps them in `status.steps` until
/// the new pod reports, and such a state is the old attempt's, not this one's.
fn attempt_facts(
    status: &TaskRunStatus,
    spec_steps: &[Value],
    attempt: u32,
    previous_steps: Option<&[Value]>,
) -> Result<RunFacts, NotReady> {
    let phase = run_phase(status);
    let spec_names = spec_steps.iter().enumerate().map(|(i, step)| {
        match step.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => format!("unnamed-{i}"),
        }
    });
    let continues = spec_steps
        .iter()
        .map(|step| step.get("onError").and_then(Value::as_str) == Some("continue"));
    let gated: Vec<bool> = spec_steps
        .iter()
        .map(|step| {
            step.get("when")
                .and_then(Value::as_array)
                .is_some_and(|when| !when.is_empty())
        })
        .collect();

    // NB: a run that ended before its pod ran (e.g. timed out while pending)
    // has no step states at all; its steps all count as never started.
    if status.steps.is_empty() && matches!(phase, RunPhase::Finished { .. }) {
        let steps = spec_names
            .zip(continues)
            .zip(&gated)
            .map(|((name, continue_on_error), has_when)| StepFacts {
                name,
                continue_on_error,
                has_when: *has_when,
                ..StepFacts::default()
            })
            .collect();
        return Ok(RunFacts {
            steps,
            phase,
            attempt,
            earlier_attempts: Vec::new(),
        });
    }
    if status.steps.len() != spec_steps.len() {
        return Err(NotReady::StepsMismatch {
            spec: spec_steps.len(),
            status: status.steps.len(),
        });
    }
    let mut steps = Vec::with_capacity(spec_steps.len());
    for (index, ((spec_name, continue_on_error), state)) in
        spec_names.zip(continues).zip(&status.steps).enumerate()
    {
        let name = state
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if name != spec_name {
            return Err(NotReady::StepNameMismatch { index });
        }
        let stale = previous_steps.and_then(|previous| previous.get(index)) == Some(state);
        let container_created = state
            .get("imageID")
            .and_then(Value::as_str)
            .is_some_and(|id| !id.is_empty());
        steps.push(StepFacts {
            name: spec_name,
            continue_on_error,
            phase: if stale {
                StepPhase::Waiting
            } else {
                step_phase(state)
            },
            termination_reason: if stale {
                None
            } else {
                state
                    .get("terminationReason")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            },
            has_when: gated[index],
            container_created: container_created && !stale,
        });
    }
    Ok(RunFacts {
        steps,
        phase,
        attempt,
        earlier_attempts: Vec::new(),
    })
}

fn run_phase(status: &TaskRunStatus) -> RunPhase {
    let succeeded = status.conditions.iter().find(|c| c.type_ == "Succeeded");
    match succeeded {
        Some(c) if c.status == "True" || c.status == "False" => RunPhase::Finished {
            reason: c.reason.clone(),
            at: status.completion_time.as_deref().and_then(parse_time),
        },
        _ => RunPhase::Running,
    }
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn time_at(value: &Value, field: &str) -> Option<DateTime<Utc>> {
    parse_time(value.get(field)?.as_str()?)
}

fn step_phase(state: &Value) -> StepPhase {
    if let Some(terminated) = state.get("terminated").filter(|v| v.is_object()) {
        return StepPhase::Terminated {
            exit_code: terminated
                .get("exitCode")
                .and_then(Value::as_i64)
                .unwrap_or_default(),
            reason: terminated
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
            started_at: time_at(terminated, "startedAt"),
            finished_at: time_at(terminated, "finishedAt"),
        };
    }
    if let Some(running) = state.get("running").filter(|v| v.is_object()) {
        return StepPhase::Running {
            started_at: time_at(running, "startedAt"),
        };
    }
    StepPhase::Waiting
}

/// How long a step ran, from its state (`status.steps[i]`): its
/// `terminated.finishedAt` minus `terminated.startedAt` (Tekton's start of
/// the step itself, not of its container). `None` while it has not ended,
/// when either time is missing, or when they run backwards.
pub fn step_run_time(state: &Value) -> Option<std::time::Duration> {
    match step_phase(state) {
        StepPhase::Terminated {
            started_at: Some(started),
            finished_at: Some(finished),
            ..
        } => (finished - started).to_std().ok(),
        _ => None,
    }
}

/// What one step has reached so far.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StepOutcome {
    started: Option<Option<DateTime<Utc>>>,
    terminal: Option<(StepEventKind, Option<DateTime<Utc>>, Option<String>)>,
    /// Whether the next step may start once this one has ended.
    lets_next_run: bool,
}

/// Every step event the run has reached, in emission order: the earlier
/// attempts' first, then within an attempt started(i), then its terminal
/// event, then step i+1. Stops at the first step whose end is not known yet,
/// because nothing after it can be decided in order.
pub fn reached_transitions(facts: &RunFacts) -> Vec<Transition> {
    let per_attempt = 2 * facts.steps.len() as u64;
    let mut reached = Vec::new();
    for attempt in facts.earlier_attempts.iter().chain([facts]) {
        reached.extend(reached_in_attempt(
            attempt,
            per_attempt.saturating_mul(u64::from(attempt.attempt)),
        ));
    }
    reached
}

fn reached_in_attempt(facts: &RunFacts, sequence_base: u64) -> Vec<Transition> {
    let mut reached = Vec::new();
    // Whether the previous step ended in a way that lets this one run, and
    // when it ended (which is when this one started).
    let mut predecessor_ok = true;
    let mut predecessor_end: Option<DateTime<Utc>> = None;
    for (index, step) in facts.steps.iter().enumerate() {
        let outcome = step_outcome(index, step, predecessor_ok, predecessor_end, facts);
        let transition = |kind, time, reason| Transition {
            attempt: facts.attempt,
            sequence_base,
            step_index: index,
            step_name: step.name.clone(),
            kind,
            format: EventFormat::Native,
            time,
            reason,
        };
        if let Some(time) = outcome.started {
            reached.push(transition(StepEventKind::Started, time, None));
        }
        let Some((kind, time, reason)) = outcome.terminal else {
            break;
        };
        reached.push(transition(kind, time, reason));
        predecessor_ok = outcome.lets_next_run;
        predecessor_end = time;
    }
    reached
}

fn step_outcome(
    index: usize,
    step: &StepFacts,
    predecessor_ok: bool,
    predecessor_end: Option<DateTime<Utc>>,
    facts: &RunFacts,
) -> StepOutcome {
    let never_ran = |time, reason: &str| StepOutcome {
        started: None,
        terminal: Some((StepEventKind::Skipped, time, Some(reason.to_owned()))),
        lets_next_run: false,
    };
    let run_end = match &facts.phase {
        RunPhase::Finished { at, reason } => Some((*at, reason.clone())),
        RunPhase::Running => None,
    };
    let run_reason = run_end.as_ref().and_then(|(_, reason)| reason.clone());
    let reason_is = |want: &str| step.termination_reason.as_deref() == Some(want);

    match &step.phase {
        StepPhase::Terminated {
            exit_code,
            reason,
            started_at,
            finished_at,
        } => {
            // Tekton's failTaskRun ends every step that had not ended with the
            // run's own reason (terminateStepsInPod): cancel, timeout, but also
            // TaskRunImagePullFailed, an evicted pod, and the rest.
            let killed_by_run_end = reason
                .as_deref()
                .is_some_and(|r| RUN_KILL_REASONS.contains(&r) || Some(r) == run_reason.as_deref())
                || reason_is(termination_reason::CANCELLED);
            if reason_is(termination_reason::SKIPPED) {
                // The entrypoint skips a step whose `when` is false with exit
                // 0 and lets the next one run; after a failure it skips with
                // exit 1 and the next ones skip too.
                if *exit_code == 0 && predecessor_ok {
                    return StepOutcome {
                        lets_next_run: true,
                        ..never_ran(*finished_at, WHEN_FALSE_REASON)
                    };
                }
                return never_ran(*finished_at, "Skipped");
            }
            if !predecessor_ok {
                return never_ran(*finished_at, "PreviousStepFailed");
            }
            // NB: a step whose container never started (pod pending, image
            // pull failure) still gets a `startedAt` when the run ends: the
            // TaskRun's creation time (terminateStepsInPod in
            // pkg/reconciler/taskrun/taskrun.go: "startedAt cannot be null
            // due to CRD schema validation"). Times are to the second, and on
            // a fast cluster a container that ran may have started in that
            // same second, so the time cannot tell. The container's image ID
            // can: the kubelet reports it once the container exists, Tekton
            // copies it into the step state, and terminateStepsInPod keeps it.
            // Older Tekton left `startedAt` empty instead.
            let never_started = started_at.is_none() || !step.container_created;
            if killed_by_run_end && never_started {
                let why = reason.clone().unwrap_or_else(|| "NotStarted".to_owned());
                return never_ran(*finished_at, &why);
            }
            let started = if index == 0 {
                *started_at
            } else {
                predecessor_end.or(*started_at)
            };
            let succeeded = *exit_code == 0 && !killed_by_run_end;
            let (kind, why) = if succeeded {
                (StepEventKind::Succeeded, None)
            } else {
                let why = step
                    .termination_reason
                    .clone()
                    .or_else(|| reason.clone())
                    .or_else(|| Some(format!("ExitCode{exit_code}")));
                (StepEventKind::Failed, why)
            };
            let continued = reason_is(termination_reason::CONTINUED)
                || (step.continue_on_error
                    && !killed_by_run_end
                    && !reason_is(termination_reason::TIMEOUT_EXCEEDED));
            StepOutcome {
                started: Some(started),
                terminal: Some((kind, *finished_at, why)),
                lets_next_run: succeeded || continued,
            }
        }
        StepPhase::Running { started_at } => {
            if !predecessor_ok {
                // The entrypoint will mark it skipped, or the run ends.
                return match run_end {
                    Some((at, _)) => never_ran(at, "PreviousStepFailed"),
                    None => StepOutcome {
                        started: None,
                        terminal: None,
                        lets_next_run: false,
                    },
                };
            }
            let started = if index == 0 {
                *started_at
            } else {
                predecessor_end.or(*started_at)
            };
            // NB: a step with `when` may be skipped the moment its turn
            // comes (exit 0, terminationReason Skipped), and Tekton tells
            // which only when the step ends: its `started` waits for that.
            if step.has_when && run_end.is_none() {
                return StepOutcome {
                    started: None,
                    terminal: None,
                    lets_next_run: false,
                };
            }
            StepOutcome {
                started: Some(started),
                // The run ended under a running step: it was killed (pod
                // deleted, cancelled, timed out) without a terminated state.
                terminal: run_end.map(|(at, reason)| {
                    (
                        StepEventKind::Failed,
                        at,
                        Some(reason.unwrap_or_else(|| "TaskRunFinished".to_owned())),
                    )
                }),
                lets_next_run: false,
            }
        }
        StepPhase::Waiting => {
            let started = if index > 0 && predecessor_ok && !(step.has_when && run_end.is_none()) {
                Some(predecessor_end)
            } else {
                None
            };
            match run_end {
                Some((at, reason)) => match started {
                    Some(start) => StepOutcome {
                        started: Some(start),
                        terminal: Some((
                            StepEventKind::Failed,
                            at,
                            Some(reason.unwrap_or_else(|| "TaskRunFinished".to_owned())),
                        )),
                        lets_next_run: false,
                    },
                    None => never_ran(at, "NotStarted"),
                },
                None => StepOutcome {
                    started,
                    terminal: None,
                    lets_next_run: false,
                },
            }
        }
    }
}

/// The native events owed: those reached and not yet settled in `ledger`,
/// in order. See [`owed_in_formats`].
pub fn owed_transitions(facts: &RunFacts, ledger: &Ledger) -> Vec<Transition> {
    owed_in_formats(facts, ledger, EventFormats::NATIVE)
}

/// The events owed in each of `formats`: those reached and not yet settled
/// in `ledger`, in order; for one transition, its native event comes first.
///
/// Two rules keep each step's events well formed whatever the ledger holds:
/// once a step's terminal event is settled in a format nothing more is owed
/// for it in that format, and a step whose started event is settled in any
/// format never ends as skipped (it is reported failed instead, in every
/// format, so the formats never disagree about how a step ended).
pub fn owed_in_formats(
    facts: &RunFacts,
    ledger: &Ledger,
    formats: EventFormats,
) -> Vec<Transition> {
    let mut owed = Vec::new();
    for mut transition in reached_transitions(facts) {
        let record = ledger.step_attempt(&transition.step_name, transition.attempt);
        let settled = |format, kind| record.is_some_and(|r| r.settled_in(format, kind));
        let started_anywhere = [EventFormat::Native, EventFormat::CdEvents]
            .into_iter()
            .any(|format| settled(format, StepEventKind::Started));
        if transition.kind == StepEventKind::Skipped && started_anywhere {
            transition.kind = StepEventKind::Failed;
        }
        for format in formats.iter() {
            let ended = StepEventKind::ALL
                .into_iter()
                .filter(|k| k.is_terminal())
                .any(|k| settled(format, k));
            if !ended && !settled(format, transition.kind) {
                owed.push(Transition {
                    format,
                    ..transition.clone()
                });
            }
        }
    }
    owed
}

/// Whether the run ended and every event it will ever owe in `formats` is settled.
pub fn is_complete(facts: &RunFacts, ledger: &Ledger, formats: EventFormats) -> bool {
    matches!(facts.phase, RunPhase::Finished { .. })
        && owed_in_formats(facts, ledger, formats).is_empty()
}

#[cfg(test)]
#[path = "steps_tests.rs"]
mod tests;
