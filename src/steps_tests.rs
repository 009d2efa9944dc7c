//! Table tests of the step state machine, on TaskRun statuses shaped like the
//! ones the Tekton controller writes.

use super::*;
use crate::ledger::Settlement;
use crate::tekton::TaskRunStatus;
use crate::testing::{TaskRunBuilder, exited, killed, running, skipped, waiting, when_skipped};

use StepEventKind::{Failed, Skipped, Started, Succeeded};

fn kinds(transitions: &[Transition]) -> Vec<(String, StepEventKind)> {
    transitions
        .iter()
        .map(|t| (t.step_name.clone(), t.kind))
        .collect()
}

fn owed_for(builder: TaskRunBuilder) -> Vec<(String, StepEventKind)> {
    let taskrun = builder.build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    kinds(&owed_transitions(&facts, &Ledger::default()))
}

fn ev(name: &str, kind: StepEventKind) -> (String, StepEventKind) {
    (name.to_owned(), kind)
}

#[test]
fn decision_table() {
    struct Case {
        name: &'static str,
        taskrun: TaskRunBuilder,
        want: Vec<(String, StepEventKind)>,
    }
    let cases = vec![
        Case {
            name: "pod initialising: nothing yet",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", waiting())
                .step("b", waiting()),
            want: vec![],
        },
        Case {
            name: "first step running: started only",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", running(0))
                .step("b", running(0)),
            want: vec![ev("a", Started)],
        },
        Case {
            name: "success",
            taskrun: TaskRunBuilder::new("tr").step("a", exited(0)).succeeded(),
            want: vec![ev("a", Started), ev("a", Succeeded)],
        },
        Case {
            name: "success-success",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(0))
                .step("b", exited(0))
                .succeeded(),
            want: vec![
                ev("a", Started),
                ev("a", Succeeded),
                ev("b", Started),
                ev("b", Succeeded),
            ],
        },
        Case {
            name: "second step running once the first succeeded",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(0))
                .step("b", running(0))
                .step("c", running(0)),
            want: vec![ev("a", Started), ev("a", Succeeded), ev("b", Started)],
        },
        Case {
            name: "success-fail",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(0))
                .step("b", exited(1))
                .failed("Failed"),
            want: vec![
                ev("a", Started),
                ev("a", Succeeded),
                ev("b", Started),
                ev("b", Failed),
            ],
        },
        Case {
            name: "success-fail-skip-skip",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(0))
                .step("b", exited(1))
                .step("c", skipped())
                .step("d", skipped())
                .failed("Failed"),
            want: vec![
                ev("a", Started),
                ev("a", Succeeded),
                ev("b", Started),
                ev("b", Failed),
                ev("c", Skipped),
                ev("d", Skipped),
            ],
        },
        Case {
            name: "skips inferred where Tekton reports no terminationReason",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(2))
                .step("b", exited(1).without_termination_reason())
                .failed("Failed"),
            want: vec![ev("a", Started), ev("a", Failed), ev("b", Skipped)],
        },
        Case {
            name: "failed step's successor still running: wait for the skip",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(1))
                .step("b", running(0)),
            want: vec![ev("a", Started), ev("a", Failed)],
        },
        Case {
            name: "onError continue: failed, and the next step runs",
            taskrun: TaskRunBuilder::new("tr")
                .step_continue_on_error("a", exited(3).continued())
                .step("b", exited(0))
                .succeeded(),
            want: vec![
                ev("a", Started),
                ev("a", Failed),
                ev("b", Started),
                ev("b", Succeeded),
            ],
        },
        Case {
            name: "timeout mid-step: running step failed, later steps skipped",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(0))
                .step("b", killed("TaskRunTimeout"))
                .step("c", killed("TaskRunTimeout"))
                .failed("TaskRunTimeout"),
            want: vec![
                ev("a", Started),
                ev("a", Succeeded),
                ev("b", Started),
                ev("b", Failed),
                ev("c", Skipped),
            ],
        },
        Case {
            name: "cancel during the first step",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", killed("TaskRunCancelled"))
                .step("b", killed("TaskRunCancelled"))
                .failed("TaskRunCancelled"),
            want: vec![ev("a", Started), ev("a", Failed), ev("b", Skipped)],
        },
        Case {
            name: "cancel before the pod ran: every step skipped",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", killed("TaskRunCancelled").never_started())
                .step("b", killed("TaskRunCancelled").never_started())
                .failed("TaskRunCancelled"),
            want: vec![ev("a", Skipped), ev("b", Skipped)],
        },
        Case {
            name: "pod deleted: the running step failed, the rest skipped",
            taskrun: TaskRunBuilder::new("tr")
                .step("a", exited(0))
                .step("b", running(0))
                .step("c", running(0))
                .failed("TaskRunImagePullFailed"),
            want: vec![
                ev("a", Started),
                ev("a", Succeeded),
                ev("b", Started),
                ev("b", Failed),
                ev("c", Skipped),
            ],
        },
        Case {
            name: "run ended before any step state: all skipped",
            taskrun: TaskRunBuilder::new("tr")
                .spec_only_step("a")
                .spec_only_step("b")
                .failed("TaskRunTimeout"),
            want: vec![ev("a", Skipped), ev("b", Skipped)],
        },
    ];
    for case in cases {
        assert_eq!(owed_for(case.taskrun), case.want, "case: {}", case.name);
    }
}

#[test]
fn twenty_five_steps_emit_fifty_events_in_order() {
    let mut builder = TaskRunBuilder::new("tr");
    for i in 0..25 {
        builder = builder.step(&format!("s{i}"), exited(0));
    }
    let owed = owed_for(builder.succeeded());
    assert_eq!(owed.len(), 50);
    for (i, pair) in owed.chunks(2).enumerate() {
        assert_eq!(
            pair,
            [
                ev(&format!("s{i}"), Started),
                ev(&format!("s{i}"), Succeeded)
            ]
        );
    }
}

#[test]
fn skipped_step_gets_no_started_event() {
    let owed = owed_for(
        TaskRunBuilder::new("tr")
            .step("a", exited(1))
            .step("b", skipped())
            .failed("Failed"),
    );
    assert!(!owed.contains(&ev("b", Started)));
    assert!(owed.contains(&ev("b", Skipped)));
}

#[test]
fn settled_events_are_not_owed_again() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", running(0))
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let mut ledger = Ledger::default();
    ledger.record("a", Started, Settlement::Delivered);
    ledger.record("a", Succeeded, Settlement::Rejected);
    assert_eq!(
        kinds(&owed_transitions(&facts, &ledger)),
        vec![ev("b", Started)]
    );
}

#[test]
fn a_started_step_never_ends_as_skipped() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", skipped())
        .failed("TaskRunCancelled")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let mut ledger = Ledger::default();
    ledger.record("a", Started, Settlement::Delivered);
    assert_eq!(
        kinds(&owed_transitions(&facts, &ledger)),
        vec![ev("a", Failed)]
    );
}

#[test]
fn times_come_from_the_step_states() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", exited(0))
        .succeeded()
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let owed = owed_transitions(&facts, &Ledger::default());
    let a_end = owed[1].time;
    assert!(a_end.is_some());
    assert_eq!(owed[2].time, a_end, "step b starts when step a ends");
    assert!(owed[3].time > a_end);
    let sequences: Vec<u64> = owed.iter().map(Transition::sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4]);
}

#[test]
fn mismatched_status_waits() {
    let mut taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", running(0))
        .build();
    let status = taskrun.status.as_mut().unwrap();
    status.steps.pop();
    assert_eq!(
        run_facts(Some(status)),
        Err(NotReady::StepsMismatch { spec: 2, status: 1 })
    );
    status.task_spec = None;
    assert_eq!(run_facts(Some(status)), Err(NotReady::NoTaskSpec));
    assert_eq!(run_facts(None), Err(NotReady::NoStatus));
}

#[test]
fn renamed_step_waits() {
    let mut taskrun = TaskRunBuilder::new("tr").step("a", running(0)).build();
    let status = taskrun.status.as_mut().unwrap();
    status.steps[0]["name"] = "other".into();
    assert_eq!(
        run_facts(Some(status)),
        Err(NotReady::StepNameMismatch { index: 0 })
    );
}

#[test]
fn unnamed_steps_match_tektons_generated_names() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("", exited(0))
        .succeeded()
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    assert_eq!(facts.steps[0].name, "unnamed-0");
}

#[test]
fn completes_only_when_finished_and_settled() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .succeeded()
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let mut ledger = Ledger::default();
    assert!(!is_complete(&facts, &ledger, EventFormats::NATIVE));
    ledger.record("a", Started, Settlement::Delivered);
    ledger.record("a", Succeeded, Settlement::Delivered);
    assert!(is_complete(&facts, &ledger, EventFormats::NATIVE));
}

#[test]
fn step_when_false_skips_that_step_alone() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step_with_when("gated", when_skipped())
        .step("c", exited(0))
        .succeeded()
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let owed = owed_transitions(&facts, &Ledger::default());
    assert_eq!(
        kinds(&owed),
        vec![
            ev("a", Started),
            ev("a", Succeeded),
            ev("gated", Skipped),
            ev("c", Started),
            ev("c", Succeeded),
        ]
    );
    assert_eq!(owed[2].reason.as_deref(), Some(WHEN_FALSE_REASON));
}

#[test]
fn steps_whose_containers_never_started_are_skipped_with_the_runs_reason() {
    // Image pull failure on the first step: Tekton fails the run and stamps
    // the waiting steps with the TaskRun's creation time.
    let taskrun = TaskRunBuilder::new("tr")
        .step("pull", killed("TaskRunImagePullFailed").never_started())
        .step("after", killed("TaskRunImagePullFailed").never_started())
        .failed("TaskRunImagePullFailed")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let owed = owed_transitions(&facts, &Ledger::default());
    assert_eq!(
        kinds(&owed),
        vec![ev("pull", Skipped), ev("after", Skipped)]
    );
    assert_eq!(owed[0].reason.as_deref(), Some("TaskRunImagePullFailed"));
    // A step that ran when the run failed for any reason still failed.
    let taskrun = TaskRunBuilder::new("tr")
        .step("work", killed("TaskRunImagePullFailed"))
        .step("after", killed("TaskRunImagePullFailed").never_started())
        .failed("TaskRunImagePullFailed")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    assert_eq!(
        owed_for_facts(&facts),
        vec![
            ev("work", Started),
            ev("work", Failed),
            ev("after", Skipped)
        ]
    );
}

fn owed_for_facts(facts: &RunFacts) -> Vec<(String, StepEventKind)> {
    kinds(&owed_transitions(facts, &Ledger::default()))
}

/// A TaskRun retried in place: the earlier attempts' statuses archived in
/// `retriesStatus` (as `retryTaskRun` in pkg/reconciler/taskrun/taskrun.go
/// does), the current one on top.
fn retried(attempts: Vec<TaskRunBuilder>) -> crate::tekton::TaskRun {
    let mut statuses: Vec<TaskRunStatus> = attempts
        .into_iter()
        .map(|attempt| attempt.build().status.unwrap())
        .collect();
    let mut current = TaskRunBuilder::new("tr").build();
    let mut status = statuses.pop().unwrap();
    status.retries_status = statuses;
    current.status = Some(status);
    current
}

#[test]
fn every_attempt_gets_its_own_events_in_sequence() {
    let taskrun = retried(vec![
        TaskRunBuilder::new("tr")
            .step("compile", exited(1))
            .failed("Failed"),
        TaskRunBuilder::new("tr")
            .step("compile", exited(1))
            .failed("Failed"),
        TaskRunBuilder::new("tr")
            .step("compile", exited(0))
            .succeeded(),
    ]);
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let owed = owed_transitions(&facts, &Ledger::default());
    let summary: Vec<(u32, StepEventKind, u64)> = owed
        .iter()
        .map(|t| (t.attempt, t.kind, t.sequence()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, Started, 1),
            (0, Failed, 2),
            (1, Started, 3),
            (1, Failed, 4),
            (2, Started, 5),
            (2, Succeeded, 6),
        ]
    );
    // What attempt 0 settled is not owed again; attempt 1's are.
    let mut ledger = Ledger::default();
    ledger.record("compile", Started, Settlement::Delivered);
    ledger.record("compile", Failed, Settlement::Delivered);
    let attempts: Vec<u32> = owed_transitions(&facts, &ledger)
        .iter()
        .map(|t| t.attempt)
        .collect();
    assert_eq!(attempts, vec![1, 1, 2, 2]);
}

#[test]
fn a_new_attempt_does_not_borrow_the_previous_attempts_states() {
    // Right after a retry Tekton still shows the old attempt's step states
    // (it clears podName, not steps) until the new pod reports.
    let old = TaskRunBuilder::new("tr")
        .step("compile", exited(1))
        .failed("Failed");
    let mut lingering = old.clone().build().status.unwrap();
    lingering.conditions[0].status = "Unknown".to_owned();
    lingering.conditions[0].reason = Some("ToBeRetried".to_owned());
    lingering.pod_name = None;
    lingering.completion_time = None;
    lingering.retries_status = vec![old.build().status.unwrap()];
    let facts = run_facts(Some(&lingering)).unwrap();
    let owed = owed_transitions(&facts, &Ledger::default());
    assert_eq!(
        owed.iter().map(|t| (t.attempt, t.kind)).collect::<Vec<_>>(),
        vec![(0, Started), (0, Failed)],
        "nothing for attempt 1 yet"
    );
}

#[test]
fn a_step_with_when_gets_its_started_event_once_tekton_tells_it_ran() {
    // Its turn came (the step before ended) and its container runs: it may
    // still be skipped at once, so nothing is owed for it yet.
    let waiting_for_verdict = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step_with_when("gated", running(0))
        .step("c", running(0));
    assert_eq!(
        owed_for(waiting_for_verdict),
        vec![ev("a", Started), ev("a", Succeeded)]
    );
    // It ran: started and its end come together.
    let ran = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step_with_when("gated", exited(0))
        .step("c", running(0));
    assert_eq!(
        owed_for(ran),
        vec![
            ev("a", Started),
            ev("a", Succeeded),
            ev("gated", Started),
            ev("gated", Succeeded),
            ev("c", Started),
        ]
    );
}

#[test]
fn step_run_time_spans_started_at_to_finished_at_of_ended_steps_only() {
    use serde_json::json;
    use std::time::Duration;
    let ended = |started: &str, finished: &str| json!({"name": "build", "terminated": {"exitCode": 1, "startedAt": started, "finishedAt": finished}});
    let cases = [
        (
            ended("2026-12-07T10:00:00Z", "2026-12-07T10:01:30Z"),
            Some(Duration::from_secs(90)),
        ),
        (
            ended("2026-12-07T10:00:00Z", "2026-12-07T10:00:00Z"),
            Some(Duration::ZERO),
        ),
        // Clocks that ran backwards give no duration rather than a huge one.
        (ended("2026-12-07T10:00:05Z", "2026-12-07T10:00:00Z"), None),
        (
            json!({"name": "build", "terminated": {"exitCode": 0, "finishedAt": "2026-12-07T10:00:00Z"}}),
            None,
        ),
        (
            json!({"name": "build", "running": {"startedAt": "2026-12-07T10:00:00Z"}}),
            None,
        ),
        (json!({"name": "build"}), None),
    ];
    for (state, expected) in cases {
        assert_eq!(step_run_time(&state), expected, "{state}");
    }
}

#[test]
fn both_formats_owe_each_transition_twice_and_settle_on_their_own() {
    let both = EventFormats::parse("both").unwrap();
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", exited(1))
        .failed("Failed")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let owed = |ledger: &Ledger| -> Vec<(String, StepEventKind, EventFormat)> {
        owed_in_formats(&facts, ledger, both)
            .into_iter()
            .map(|t| (t.step_name, t.kind, t.format))
            .collect()
    };
    let (native, cd) = (EventFormat::Native, EventFormat::CdEvents);
    let mut ledger = Ledger::default();
    assert_eq!(
        owed(&ledger),
        vec![
            ("a".into(), Started, native),
            ("a".into(), Started, cd),
            ("a".into(), Succeeded, native),
            ("a".into(), Succeeded, cd),
            ("b".into(), Started, native),
            ("b".into(), Started, cd),
            ("b".into(), Failed, native),
            ("b".into(), Failed, cd),
        ]
    );
    // Every native event settled: the CDEvents are still owed.
    for (step, kind) in [
        ("a", Started),
        ("a", Succeeded),
        ("b", Started),
        ("b", Failed),
    ] {
        ledger.record(step, kind, Settlement::Delivered);
    }
    assert_eq!(owed(&ledger).len(), 4);
    assert!(owed(&ledger).iter().all(|(_, _, format)| *format == cd));
    assert!(!is_complete(&facts, &ledger, both));
    assert!(is_complete(&facts, &ledger, EventFormats::NATIVE));
    for (step, kind) in [
        ("a", Started),
        ("a", Succeeded),
        ("b", Started),
        ("b", Failed),
    ] {
        ledger.record_attempt(step, 0, cd, kind, Settlement::Delivered);
    }
    assert!(is_complete(&facts, &ledger, both));
}

#[test]
fn a_step_started_in_one_format_never_ends_skipped_in_the_other() {
    let both = EventFormats::parse("both").unwrap();
    // The step's container never started, so the run's end makes it
    // skipped; but its CDEvents `started` already went out.
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", killed("TaskRunCancelled").never_started())
        .failed("TaskRunCancelled")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let mut ledger = Ledger::default();
    ledger.record_attempt(
        "a",
        0,
        EventFormat::CdEvents,
        Started,
        Settlement::Delivered,
    );
    let owed: Vec<_> = owed_in_formats(&facts, &ledger, both)
        .into_iter()
        .map(|t| (t.kind, t.format))
        .collect();
    assert_eq!(
        owed,
        vec![
            (Failed, EventFormat::Native),
            (Failed, EventFormat::CdEvents)
        ]
    );
}
