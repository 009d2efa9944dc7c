//! Table tests of the step state machine, on TaskRun statuses shaped like the
//! ones the Tekton controller writes.

use super::*;
use crate::ledger::Settlement;
use crate::testing::{TaskRunBuilder, exited, killed, running, skipped, waiting};

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
    assert!(!is_complete(&facts, &ledger));
    ledger.record("a", Started, Settlement::Delivered);
    ledger.record("a", Succeeded, Settlement::Delivered);
    assert!(is_complete(&facts, &ledger));
}
