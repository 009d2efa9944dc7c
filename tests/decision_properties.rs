//! Property tests of the step decision as the controller drives it: for any
//! timeline of statuses a real TaskRun goes through, seen by an observer that
//! misses updates, fails part-way through sending and restarts with a ledger
//! annotation that lags, every step's events come out well formed
//! (`started` then `succeeded`/`failed`, or `skipped` alone), in order, once
//! (bar the in-flight resends a restart allows), never before the status
//! shows them, and all of them once the run has finished.
//!
//! The timelines are built with `tekton_step_observer::testing`, so the
//! statuses have the shapes the Tekton controller writes. What each status
//! *means* (which steps ran, how they ended) is computed here from the plan,
//! independently of `steps.rs`, and the events are checked against that.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRng, TestRunner};
use tekton_step_observer::ledger::{Ledger, Settlement};
use tekton_step_observer::steps::{
    EventFormats, RunFacts, RunPhase, StepEventKind, StepPhase, Transition, is_complete,
    owed_transitions, reached_transitions, run_facts,
};
use tekton_step_observer::tekton::TaskRun;
use tekton_step_observer::testing::{self, StepState, TaskRunBuilder};

use StepEventKind::{Failed, Skipped, Started, Succeeded};

const TYPE_PREFIX: &str = "dev.tekton.event.plugin.step";

/// Statuses in the longest timeline: no pod, all waiting, staggered starts
/// (at most 11), all running, one per step (at most 12), the end.
const MAX_TIMELINE: usize = 27;

/// Rounds on the last status before giving up on the observer settling.
/// Once the scripted rounds run out every round sends everything, so a
/// correct decision settles within a couple of rounds after that.
const MAX_DRAIN_ROUNDS: usize = 200;

// ---------------------------------------------------------------------------
// The plan: what the Task does and how the run ends.

#[derive(Clone, Copy, Debug)]
struct StepPlan {
    exit_code: i64,
    continue_on_error: bool,
}

#[derive(Clone, Copy, Debug)]
enum Ending {
    /// Every step ends by itself and Tekton sets the condition.
    Completes,
    /// Timeout or cancellation right after status `after` (modulo their
    /// number) of the normal timeline: Tekton kills the pod and marks every
    /// step not yet terminated as terminated with `reason`.
    Interrupted { reason: &'static str, after: usize },
    /// The pod vanished right after status `after` (modulo their number):
    /// the run fails with `reason` and the step states stay as they were
    /// (running, waiting).
    PodDeleted { reason: &'static str, after: usize },
    /// The run ended before its pod ever ran: no `status.steps` at all.
    BeforePod { reason: &'static str },
}

#[derive(Clone, Debug)]
struct Plan {
    steps: Vec<StepPlan>,
    ending: Ending,
    /// The kubelet starts step containers one by one, so statuses with the
    /// first few running and the rest waiting appear.
    staggered_start: bool,
    /// Tekton from before `terminationReason`, so skips and `onError:
    /// continue` failures have to be inferred.
    legacy_tekton: bool,
    /// Steps without names (Tekton reports them as `unnamed-<i>`).
    unnamed_steps: bool,
}

impl Plan {
    fn spec_name(&self, index: usize) -> String {
        if self.unnamed_steps {
            String::new()
        } else {
            format!("step-{index}")
        }
    }

    fn status_name(&self, index: usize) -> String {
        if self.unnamed_steps {
            format!("unnamed-{index}")
        } else {
            format!("step-{index}")
        }
    }
}

// ---------------------------------------------------------------------------
// The timeline: the statuses Tekton writes, in order.

/// A step container's state in one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Container {
    Waiting,
    Running,
    Exited(i64),
    /// The entrypoint skipped the step after an earlier failure.
    SkippedByEntrypoint,
    /// Terminated by Tekton when it ended the run (timeout, cancel).
    Killed {
        reason: &'static str,
        had_started: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunCondition {
    Running,
    Succeeded,
    Failed(&'static str),
}

#[derive(Clone, Debug)]
struct Snapshot {
    /// `None`: no pod yet, so Tekton wrote no `status.steps`.
    steps: Option<Vec<Container>>,
    run: RunCondition,
}

impl Snapshot {
    fn finished(&self) -> bool {
        self.run != RunCondition::Running
    }
}

fn timeline(plan: &Plan) -> Vec<Snapshot> {
    let no_pod = Snapshot {
        steps: None,
        run: RunCondition::Running,
    };
    if let Ending::BeforePod { reason } = plan.ending {
        let ended = Snapshot {
            steps: None,
            run: RunCondition::Failed(reason),
        };
        return vec![no_pod, ended];
    }
    let count = plan.steps.len();
    let mut states = vec![no_pod];
    let mut containers = vec![Container::Waiting; count];
    let mut push = |containers: &[Container]| {
        states.push(Snapshot {
            steps: Some(containers.to_vec()),
            run: RunCondition::Running,
        });
    };
    push(&containers);
    if plan.staggered_start {
        for running in 1..count {
            containers[..running].fill(Container::Running);
            push(&containers);
        }
    }
    containers.fill(Container::Running);
    push(&containers);
    let mut failed_without_continue = false;
    for (index, step) in plan.steps.iter().enumerate() {
        if failed_without_continue {
            containers[index] = Container::SkippedByEntrypoint;
        } else {
            containers[index] = Container::Exited(step.exit_code);
            failed_without_continue = step.exit_code != 0 && !step.continue_on_error;
        }
        push(&containers);
    }

    match plan.ending {
        Ending::Completes => {
            let run = if failed_without_continue {
                RunCondition::Failed("Failed")
            } else {
                RunCondition::Succeeded
            };
            let last = states.last().cloned().unwrap();
            states.push(Snapshot { run, ..last });
        }
        Ending::Interrupted { reason, after } => {
            states.truncate(after % states.len() + 1);
            let last = states.last().cloned().unwrap();
            let killed = last.steps.map(|containers| {
                containers
                    .into_iter()
                    .map(|container| match container {
                        Container::Waiting => Container::Killed {
                            reason,
                            had_started: false,
                        },
                        Container::Running => Container::Killed {
                            reason,
                            had_started: true,
                        },
                        ended => ended,
                    })
                    .collect()
            });
            states.push(Snapshot {
                steps: killed,
                run: RunCondition::Failed(reason),
            });
        }
        Ending::PodDeleted { reason, after } => {
            states.truncate(after % states.len() + 1);
            let last = states.last().cloned().unwrap();
            states.push(Snapshot {
                run: RunCondition::Failed(reason),
                ..last
            });
        }
        Ending::BeforePod { .. } => unreachable!("handled above"),
    }
    states
}

/// The TaskRun Tekton would show for `snapshot`.
fn render(plan: &Plan, snapshot: &Snapshot) -> TaskRun {
    let mut builder = TaskRunBuilder::new("tr");
    for (index, step) in plan.steps.iter().enumerate() {
        let name = plan.spec_name(index);
        builder = match &snapshot.steps {
            // Every step is skipped then, so onError does not matter.
            None => builder.spec_only_step(&name),
            Some(containers) => {
                let state = step_state(plan, step, containers[index]);
                if step.continue_on_error {
                    builder.step_continue_on_error(&name, state)
                } else {
                    builder.step(&name, state)
                }
            }
        };
    }
    match snapshot.run {
        RunCondition::Running => builder,
        RunCondition::Succeeded => builder.succeeded(),
        RunCondition::Failed(reason) => builder.failed(reason),
    }
    .build()
}

/// NB: the model's states are written from Tekton's source, not captured
/// from runs (the real-entrypoint fixtures in tests/fixtures/ are):
/// - `Killed` mirrors `terminateStepsInPod` (pkg/reconciler/taskrun/taskrun.go,
///   v1.15.0 lines 1034-1065, v1.9.2 around line 931): exit 1, the run's
///   reason, and for a container that was still waiting `startedAt` = the
///   TaskRun's creation time and no image ID;
/// - `SkippedByEntrypoint` mirrors `Entrypointer.Go` (pkg/entrypoint/
///   entrypointer.go: `ErrSkipPreviousStepFailed` adds Reason=Skipped, and the
///   entrypoint exits 1);
/// - `legacy_tekton` mirrors Tekton before `terminationReason` existed.
fn step_state(plan: &Plan, step: &StepPlan, container: Container) -> StepState {
    let state = match container {
        Container::Waiting => testing::waiting(),
        Container::Running => testing::running(0),
        Container::Exited(code) if code != 0 && step.continue_on_error => {
            testing::exited(code).continued()
        }
        Container::Exited(code) => testing::exited(code),
        Container::SkippedByEntrypoint => testing::skipped(),
        Container::Killed {
            reason,
            had_started: true,
        } => testing::killed(reason),
        Container::Killed {
            reason,
            had_started: false,
        } => testing::killed(reason).never_started(),
    };
    if plan.legacy_tekton {
        state.without_termination_reason()
    } else {
        state
    }
}

// ---------------------------------------------------------------------------
// What a status means, worked out from the plan alone.

/// What one step has reached in one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StepTruth {
    /// The step has begun: step 0 once its container runs, step i>0 once
    /// step i-1 ended in a way that lets it go on (the observer's chosen
    /// start, since the entrypoint releases it then).
    ran: bool,
    /// How it ended, once that is known.
    end: Option<StepEventKind>,
}

fn truth(plan: &Plan, snapshot: &Snapshot) -> Vec<StepTruth> {
    let mut truths = Vec::with_capacity(plan.steps.len());
    let mut predecessor_lets_run = true;
    for (index, step) in plan.steps.iter().enumerate() {
        let container = snapshot
            .steps
            .as_ref()
            .map_or(Container::Waiting, |containers| containers[index]);
        let ran = if index == 0 {
            matches!(
                container,
                Container::Running
                    | Container::Exited(_)
                    | Container::Killed {
                        had_started: true,
                        ..
                    }
            )
        } else {
            predecessor_lets_run
        };
        let end = match (ran, container) {
            (true, Container::Exited(0)) => Some(Succeeded),
            (true, Container::Exited(_) | Container::Killed { .. }) => Some(Failed),
            (true, Container::Waiting | Container::Running) => {
                snapshot.finished().then_some(Failed)
            }
            (false, Container::Waiting | Container::Running) => {
                snapshot.finished().then_some(Skipped)
            }
            (false, Container::SkippedByEntrypoint | Container::Killed { .. }) => Some(Skipped),
            (true, Container::SkippedByEntrypoint) | (false, Container::Exited(_)) => {
                unreachable!("the timeline runs a step only after its predecessor let it")
            }
        };
        predecessor_lets_run = ran
            && matches!(container, Container::Exited(code)
                if code == 0 || step.continue_on_error);
        truths.push(StepTruth { ran, end });
    }
    truths
}

// ---------------------------------------------------------------------------
// The observer: misses statuses, fails part-way, restarts.

/// What happens in one reconcile.
#[derive(Clone, Copy, Debug)]
struct Round {
    /// The observer restarts first: its in-memory ledger is gone and it
    /// starts again from the annotation.
    restart_first: bool,
    /// A delivery fails after this many sends; `None`: all owed are sent.
    stop_after: Option<usize>,
    /// The ledger annotation patch at the end of the round goes through.
    persist: bool,
}

/// Once the scripted rounds are used up the observer runs undisturbed.
const UNDISTURBED: Round = Round {
    restart_first: false,
    stop_after: None,
    persist: true,
};

#[derive(Clone, Debug)]
struct Schedule {
    /// Which statuses of the timeline the observer sees (the last always).
    observed: Vec<bool>,
    rounds: Vec<Round>,
}

/// The decision under test: the events owed given the facts and the ledger.
type Decide = fn(&RunFacts, &Ledger) -> Vec<Transition>;

struct Observer<'a> {
    plan: &'a Plan,
    decide: Decide,
    rounds: std::slice::Iter<'a, Round>,
    /// The ledger the running observer keeps.
    memory: Ledger,
    /// The ledger annotation on the TaskRun, as text.
    annotation: String,
    restarts: usize,
    /// Per step, the distinct kinds sent, in the order first sent.
    sent: Vec<Vec<StepEventKind>>,
    /// Per event, the restart count when it was last sent.
    last_sent_at_restart: BTreeMap<(usize, StepEventKind), usize>,
    /// Position (step, whether terminal) of the latest first-time send.
    latest_position: Option<(usize, bool)>,
    /// Resends of in-flight events lost by a restart.
    repeats: usize,
}

impl<'a> Observer<'a> {
    fn new(plan: &'a Plan, schedule: &'a Schedule, decide: Decide) -> Self {
        Observer {
            plan,
            decide,
            rounds: schedule.rounds.iter(),
            memory: Ledger::default(),
            annotation: Ledger::default().to_annotation(TYPE_PREFIX),
            restarts: 0,
            sent: vec![Vec::new(); plan.steps.len()],
            last_sent_at_restart: BTreeMap::new(),
            latest_position: None,
            repeats: 0,
        }
    }

    fn annotation_ledger(&self) -> Result<Ledger, TestCaseError> {
        Ledger::parse(&self.annotation)
            .map_err(|e| TestCaseError::fail(format!("annotation does not parse: {e}")))
    }

    /// One reconcile of `snapshot`; returns how many events were owed.
    fn reconcile(&mut self, snapshot: &Snapshot) -> Result<usize, TestCaseError> {
        let round = self.rounds.next().copied().unwrap_or(UNDISTURBED);
        if round.restart_first {
            self.memory = self.annotation_ledger()?;
            self.restarts += 1;
        }
        let taskrun = render(self.plan, snapshot);
        let facts = match run_facts(taskrun.status.as_ref()) {
            Ok(facts) => facts,
            Err(not_ready) => {
                // Only the status from before the pod may be undecidable.
                prop_assert!(
                    snapshot.steps.is_none() && !snapshot.finished(),
                    "not ready ({not_ready}) on {snapshot:?}"
                );
                return Ok(0);
            }
        };
        let truths = truth(self.plan, snapshot);
        let owed = (self.decide)(&facts, &self.memory);
        let owed_count = owed.len();
        for transition in owed
            .into_iter()
            .take(round.stop_after.unwrap_or(usize::MAX))
        {
            self.send(&transition, &truths, snapshot)?;
            self.memory.record(
                &transition.step_name,
                transition.kind,
                Settlement::Delivered,
            );
        }
        if round.persist {
            let mut persisted = self.annotation_ledger()?;
            persisted.merge(&self.memory);
            self.annotation = persisted.to_annotation(TYPE_PREFIX);
        }
        if snapshot.finished() && owed_count > 0 && round.stop_after.is_none() {
            prop_assert!(
                is_complete(&facts, &self.memory, EventFormats::NATIVE),
                "all sent, still owed"
            );
        }
        Ok(owed_count)
    }

    fn send(
        &mut self,
        transition: &Transition,
        truths: &[StepTruth],
        snapshot: &Snapshot,
    ) -> Result<(), TestCaseError> {
        let step = transition.step_index;
        let kind = transition.kind;
        prop_assert!(step < self.plan.steps.len(), "no step {step}");
        prop_assert_eq!(&transition.step_name, &self.plan.status_name(step));
        let key = (step, kind);
        if let Some(&restart) = self.last_sent_at_restart.get(&key) {
            // Only an in-flight delivery may go again: sent, then the
            // observer restarted before the annotation recorded it.
            prop_assert!(
                restart < self.restarts,
                "{key:?} sent twice without a restart between"
            );
            prop_assert!(
                !self
                    .annotation_ledger()?
                    .settled(&transition.step_name, kind),
                "{key:?} resent although the annotation records it"
            );
            self.repeats += 1;
            self.last_sent_at_restart.insert(key, self.restarts);
            return Ok(());
        }
        self.last_sent_at_restart.insert(key, self.restarts);

        let position = (step, kind != Started);
        prop_assert!(
            self.latest_position.is_none_or(|latest| latest < position),
            "{key:?} sent after {:?}",
            self.latest_position
        );
        self.latest_position = Some(position);

        let reached = truths[step];
        match kind {
            Started => prop_assert!(
                reached.ran,
                "started({step}) before the step could run, on {snapshot:?}"
            ),
            terminal => prop_assert_eq!(
                reached.end,
                Some(terminal),
                "{:?}({}) not reached on {:?}",
                terminal,
                step,
                snapshot
            ),
        }

        let kinds = &mut self.sent[step];
        kinds.push(kind);
        prop_assert!(
            matches!(
                kinds.as_slice(),
                [Started] | [Started, Succeeded] | [Started, Failed] | [Skipped]
            ),
            "step {step} sent {kinds:?}"
        );
        Ok(())
    }
}

/// How eventful one observed run was, to show the schedules exercise what
/// they should.
#[derive(Clone, Copy, Debug, Default)]
struct Disturbances {
    restarts: usize,
    repeats: usize,
}

/// Drives the observer over the timeline and checks the events as they go
/// out and once the run has settled.
fn check(plan: &Plan, schedule: &Schedule, decide: Decide) -> Result<Disturbances, TestCaseError> {
    let states = timeline(plan);
    let (last, earlier) = states.split_last().unwrap();
    let mut observer = Observer::new(plan, schedule, decide);
    for (snapshot, &seen) in earlier.iter().zip(&schedule.observed) {
        if seen {
            observer.reconcile(snapshot)?;
        }
    }
    let mut settled = false;
    for _ in 0..MAX_DRAIN_ROUNDS {
        if observer.reconcile(last)? == 0 {
            settled = true;
            break;
        }
    }
    prop_assert!(settled, "still owing after {MAX_DRAIN_ROUNDS} rounds");

    for (index, reached) in truth(plan, last).into_iter().enumerate() {
        let expected: &[StepEventKind] = match (reached.ran, reached.end) {
            (true, Some(end)) => &[Started, end],
            (false, Some(Skipped)) => &[Skipped],
            other => unreachable!("a finished run leaves step {index} at {other:?}"),
        };
        prop_assert_eq!(
            observer.sent[index].as_slice(),
            expected,
            "step {} at the end",
            index
        );
    }
    Ok(Disturbances {
        restarts: observer.restarts,
        repeats: observer.repeats,
    })
}

// ---------------------------------------------------------------------------
// Strategies.

fn step_plan() -> impl Strategy<Value = StepPlan> {
    (
        prop_oneof![6 => Just(0_i64), 1 => 1_i64..=3],
        prop::bool::weighted(0.2),
    )
        .prop_map(|(exit_code, continue_on_error)| StepPlan {
            exit_code,
            continue_on_error,
        })
}

fn run_kill_reason() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("TaskRunTimeout"), Just("TaskRunCancelled")]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        5 => Just(Ending::Completes),
        3 => (run_kill_reason(), 0..MAX_TIMELINE)
            .prop_map(|(reason, after)| Ending::Interrupted { reason, after }),
        2 => (
            prop_oneof![Just("Failed"), Just("TaskRunImagePullFailed")],
            0..MAX_TIMELINE,
        )
            .prop_map(|(reason, after)| Ending::PodDeleted { reason, after }),
        1 => run_kill_reason().prop_map(|reason| Ending::BeforePod { reason }),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec(step_plan(), 1..=12),
        ending(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(steps, ending, staggered_start, legacy_tekton, unnamed_steps)| Plan {
                steps,
                ending,
                staggered_start,
                legacy_tekton,
                unnamed_steps,
            },
        )
}

fn round() -> impl Strategy<Value = Round> {
    (
        prop::bool::weighted(0.15),
        prop_oneof![3 => Just(None), 1 => (0_usize..3).prop_map(Some)],
        prop::bool::weighted(0.7),
    )
        .prop_map(|(restart_first, stop_after, persist)| Round {
            restart_first,
            stop_after,
            persist,
        })
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        prop::collection::vec(prop::bool::weighted(0.6), MAX_TIMELINE),
        prop::collection::vec(round(), 0..64),
    )
        .prop_map(|(observed, rounds)| Schedule { observed, rounds })
}

proptest! {
    #[test]
    fn every_step_gets_well_formed_events_once_in_order(
        plan in plan(),
        schedule in schedule(),
    ) {
        check(&plan, &schedule, owed_transitions)?;
    }
}

/// The model itself: each ending produces the timeline it claims to, so the
/// property above is not vacuously true.
#[test]
fn timelines_end_as_planned() {
    let steps = vec![
        StepPlan {
            exit_code: 0,
            continue_on_error: false,
        },
        StepPlan {
            exit_code: 2,
            continue_on_error: true,
        },
        StepPlan {
            exit_code: 1,
            continue_on_error: false,
        },
        StepPlan {
            exit_code: 0,
            continue_on_error: false,
        },
    ];
    let plan = |ending| Plan {
        steps: steps.clone(),
        ending,
        staggered_start: false,
        legacy_tekton: false,
        unnamed_steps: false,
    };
    let ends = |plan: &Plan| {
        let states = timeline(plan);
        truth(plan, states.last().unwrap())
            .into_iter()
            .map(|t| t.end)
            .collect::<Vec<_>>()
    };

    assert_eq!(
        ends(&plan(Ending::Completes)),
        [Some(Succeeded), Some(Failed), Some(Failed), Some(Skipped)]
    );
    // Status 2 of the timeline has every container running: step 0 runs.
    assert_eq!(
        ends(&plan(Ending::Interrupted {
            reason: "TaskRunTimeout",
            after: 2,
        })),
        [Some(Failed), Some(Skipped), Some(Skipped), Some(Skipped)]
    );
    // Status 3: step 0 has exited 0, the others' containers still run.
    assert_eq!(
        ends(&plan(Ending::PodDeleted {
            reason: "Failed",
            after: 3,
        })),
        [Some(Succeeded), Some(Failed), Some(Skipped), Some(Skipped)]
    );
    assert_eq!(
        ends(&plan(Ending::BeforePod {
            reason: "TaskRunCancelled"
        })),
        [Some(Skipped); 4]
    );
}

/// The property has teeth: decisions with plausible bugs fail it.
#[test]
fn broken_decisions_are_caught() {
    fn resends_everything(facts: &RunFacts, _: &Ledger) -> Vec<Transition> {
        reached_transitions(facts)
    }
    fn terminal_before_started(facts: &RunFacts, ledger: &Ledger) -> Vec<Transition> {
        let mut owed = owed_transitions(facts, ledger);
        owed.sort_by_key(|t| (t.step_index, t.kind == Started));
        owed
    }
    fn ignores_the_run_end(facts: &RunFacts, ledger: &Ledger) -> Vec<Transition> {
        let facts = RunFacts {
            phase: RunPhase::Running,
            ..facts.clone()
        };
        owed_transitions(&facts, ledger)
    }
    fn ignores_on_error_continue(facts: &RunFacts, ledger: &Ledger) -> Vec<Transition> {
        let mut facts = facts.clone();
        for step in &mut facts.steps {
            step.continue_on_error = false;
        }
        owed_transitions(&facts, ledger)
    }
    fn takes_kills_for_exits(facts: &RunFacts, ledger: &Ledger) -> Vec<Transition> {
        let mut facts = facts.clone();
        for step in &mut facts.steps {
            if let StepPhase::Terminated { reason, .. } = &mut step.phase {
                *reason = None;
            }
        }
        owed_transitions(&facts, ledger)
    }

    let mutants: [(&str, Decide); 5] = [
        ("resends_everything", resends_everything),
        ("terminal_before_started", terminal_before_started),
        ("ignores_the_run_end", ignores_the_run_end),
        ("ignores_on_error_continue", ignores_on_error_continue),
        ("takes_kills_for_exits", takes_kills_for_exits),
    ];
    for (name, decide) in mutants {
        let mut runner = deterministic_runner();
        let outcome = runner.run(&(plan(), schedule()), |(plan, schedule)| {
            check(&plan, &schedule, decide).map(drop)
        });
        assert!(outcome.is_err(), "mutant {name} passed the property");
    }
}

/// The schedules do restart the observer, and some restarts lose in-flight
/// deliveries that then go again; otherwise the dedup checks above would
/// pass without ever being tried.
#[test]
fn schedules_restart_and_resend() {
    let totals = std::cell::Cell::new(Disturbances::default());
    let outcome = deterministic_runner().run(&(plan(), schedule()), |(plan, schedule)| {
        let seen = check(&plan, &schedule, owed_transitions)?;
        let sum = totals.get();
        totals.set(Disturbances {
            restarts: sum.restarts + seen.restarts,
            repeats: sum.repeats + seen.repeats,
        });
        Ok(())
    });
    assert!(outcome.is_ok(), "{outcome:?}");
    let totals = totals.get();
    assert!(totals.restarts > 0 && totals.repeats > 0, "{totals:?}");
}

/// A runner that draws the same cases every time and does not shrink: for
/// the checks on the property itself only whether it holds matters.
fn deterministic_runner() -> TestRunner {
    let config = Config {
        cases: 256,
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}
