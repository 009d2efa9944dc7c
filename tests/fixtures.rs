//! The decision table on TaskRuns captured from the real Tekton controller
//! (`tests/fixtures/`, written by `E2E_CAPTURE_FIXTURES=tests/fixtures make e2e`).

use serde_json::Value;
use tekton_step_observer::controller::annotation_ledger;
use tekton_step_observer::event::{EventInput, StepLog, build_event, cap_log};
use tekton_step_observer::ledger::Ledger;
use tekton_step_observer::steps::{owed_transitions, reached_transitions, run_facts};
use tekton_step_observer::tekton::{
    LEDGER_ANNOTATION, TaskRun, TaskRunRef, TektonVersion, ledger_annotation,
};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn taskrun(value: Value) -> TaskRun {
    serde_json::from_value(value).unwrap()
}

/// `(step, kind)` of every event the TaskRun calls for, in order.
fn reached(taskrun: &TaskRun) -> Vec<(String, &'static str)> {
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    reached_transitions(&facts)
        .into_iter()
        .map(|t| (t.step_name, t.kind.as_str()))
        .collect()
}

fn pairs(expected: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
    expected.iter().map(|(s, k)| (s.to_string(), *k)).collect()
}

#[test]
fn real_taskruns_call_for_the_expected_events() {
    let s = "started";
    let ok = "succeeded";
    let failed = "failed";
    let skipped = "skipped";
    let mut twenty_five = Vec::new();
    let names: Vec<String> = (0..25).map(|i| format!("s{i:02}")).collect();
    for name in &names {
        twenty_five.push((name.as_str(), s));
        twenty_five.push((name.as_str(), ok));
    }
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("success", vec![("build", s), ("build", ok)]),
        (
            "success-success",
            vec![("one", s), ("one", ok), ("two", s), ("two", ok)],
        ),
        (
            "success-fail",
            vec![("one", s), ("one", ok), ("two", s), ("two", failed)],
        ),
        (
            "success-fail-skip",
            vec![
                ("a", s),
                ("a", ok),
                ("b", s),
                ("b", failed),
                ("c", skipped),
                ("d", skipped),
            ],
        ),
        ("twenty-five", twenty_five),
        (
            "continue",
            vec![("lint", s), ("lint", failed), ("test", s), ("test", ok)],
        ),
        (
            "timeout",
            vec![
                ("quick", s),
                ("quick", ok),
                ("slow", s),
                ("slow", failed),
                ("never", skipped),
            ],
        ),
        (
            "cancel",
            vec![
                ("first", s),
                ("first", ok),
                ("long", s),
                ("long", failed),
                ("after", skipped),
            ],
        ),
        (
            "v1beta1",
            vec![("a", s), ("a", ok), ("b", s), ("b", failed)],
        ),
    ];
    for (name, expected) in cases {
        let tr = taskrun(fixture(name));
        assert_eq!(reached(&tr), pairs(&expected), "fixture {name}");
        // The observer that ran against it settled everything: nothing owed.
        let (ledger, error) = annotation_ledger(ledger_annotation(&tr.metadata));
        assert!(error.is_none(), "fixture {name}: {error:?}");
        let facts = run_facts(tr.status.as_ref()).unwrap();
        assert!(
            owed_transitions(&facts, &ledger).is_empty(),
            "fixture {name} owes events"
        );
        // Without a ledger, all of them are owed.
        assert_eq!(
            owed_transitions(&facts, &Ledger::default()).len(),
            expected.len()
        );
    }
}

#[test]
fn pod_deleted_under_a_running_step_fails_it_and_skips_the_rest() {
    // Shaped like the real cancel fixture, but as Tekton leaves a TaskRun
    // whose pod vanished: the run failed, the steps still show `running`.
    let mut value = fixture("cancel");
    let running = serde_json::json!({"startedAt": "2026-11-25T09:25:05Z"});
    for index in [1, 2] {
        let step = &mut value["status"]["steps"][index];
        step.as_object_mut().unwrap().remove("terminated");
        step.as_object_mut().unwrap().remove("terminationReason");
        step["running"] = running.clone();
    }
    value["status"]["conditions"][0]["reason"] = "TaskRunPodNotFound".into();
    let tr = taskrun(value);
    assert_eq!(
        reached(&tr),
        pairs(&[
            ("first", "started"),
            ("first", "succeeded"),
            ("long", "started"),
            ("long", "failed"),
            ("after", "skipped"),
        ])
    );
    let facts = run_facts(tr.status.as_ref()).unwrap();
    let failed = &reached_transitions(&facts)[3];
    assert_eq!(failed.reason.as_deref(), Some("TaskRunPodNotFound"));
}

#[test]
fn malformed_ledger_counts_as_empty_so_everything_is_owed_again() {
    let mut value = fixture("success-fail-skip");
    value["metadata"]["annotations"][LEDGER_ANNOTATION] = "{not json".into();
    let tr = taskrun(value);
    let (ledger, error) = annotation_ledger(ledger_annotation(&tr.metadata));
    assert!(error.is_some());
    let facts = run_facts(tr.status.as_ref()).unwrap();
    assert_eq!(owed_transitions(&facts, &ledger).len(), 6);
}

#[test]
fn log_over_the_cap_keeps_its_tail_in_the_event() {
    let tr = taskrun(fixture("success-fail"));
    let status = tr.status.as_ref().unwrap();
    let facts = run_facts(Some(status)).unwrap();
    let failed = reached_transitions(&facts).pop().unwrap();
    let long_log: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
    let log = cap_log(long_log.as_bytes(), 1024);
    let reference = TaskRunRef::from_meta(&tr.metadata, TektonVersion::V1).unwrap();
    let event = build_event(
        &Default::default(),
        EventInput {
            taskrun: &reference,
            transition: &failed,
            step_spec: status.task_spec.as_ref().and_then(|s| s.steps.get(1)),
            step_state: status.steps.get(1),
            pod_name: status.pod_name.as_deref(),
            log: &log,
        },
    )
    .unwrap();
    let Some(cloudevents::Data::Json(data)) = event.data() else {
        panic!("json data");
    };
    let text = data["log"].as_str().unwrap();
    assert!(text.len() <= 1024);
    assert!(text.ends_with("line 9999\n"));
    assert_eq!(data["logTruncated"], true);
    assert_eq!(data["stepState"]["terminated"]["exitCode"], 3);
    assert!(matches!(
        log,
        StepLog::Read {
            truncated: true,
            ..
        }
    ));
}
