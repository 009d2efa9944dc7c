//! The decision table on TaskRuns captured from real runs: the real Tekton
//! controller, and Tekton's real entrypoint in every pod (the local cluster's
//! node agent). One folder per Tekton version, `tests/fixtures/<version>/`,
//! written by `make test-matrix CAPTURE_FIXTURES=1` (the e2e suite once per
//! pinned Tekton version, saving each finished TaskRun).

use serde_json::Value;
use tekton_step_observer::context::annotation_ledger;
use tekton_step_observer::event::{EventInput, StepLog, build_event, cap_log};
use tekton_step_observer::ledger::Ledger;
use tekton_step_observer::steps::{owed_transitions, reached_transitions, run_facts};
use tekton_step_observer::tekton::{
    LEDGER_ANNOTATION, TaskRun, TaskRunRef, TektonVersion, ledger_annotation,
};

/// The Tekton versions fixtures were captured with: the newest pinned one
/// and the LTS line.
const TEKTON_VERSIONS: [&str; 2] = ["v1.15.0", "v1.9.2"];

/// A fixture of the newest Tekton.
fn fixture(name: &str) -> Value {
    fixture_of(TEKTON_VERSIONS[0], name)
}

fn fixture_of(version: &str, name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/{version}/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
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

/// The attempt of every event the TaskRun calls for, in order.
fn attempts(taskrun: &TaskRun) -> Vec<u32> {
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    reached_transitions(&facts)
        .into_iter()
        .map(|t| t.attempt)
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
        (
            "real-script",
            vec![("greet", s), ("greet", ok), ("count", s), ("count", failed)],
        ),
        ("no-network", vec![("dial", s), ("dial", failed)]),
        (
            "step-timeout",
            vec![("slow", s), ("slow", failed), ("after", skipped)],
        ),
        (
            "real-continue",
            vec![("lint", s), ("lint", failed), ("test", s), ("test", ok)],
        ),
        (
            "step-results",
            vec![
                ("write", s),
                ("write", ok),
                ("greet", s),
                ("greet", ok),
                ("read", s),
                ("read", ok),
            ],
        ),
        (
            "step-action",
            vec![("action", s), ("action", ok), ("after", s), ("after", ok)],
        ),
        ("sidecar", vec![("use", s), ("use", ok)]),
        (
            "real-cancel",
            vec![
                ("first", s),
                ("first", ok),
                ("long", s),
                ("long", failed),
                ("after", skipped),
            ],
        ),
        (
            "oom",
            vec![
                ("warm", s),
                ("warm", ok),
                ("grow", s),
                ("grow", failed),
                ("never", skipped),
            ],
        ),
        (
            "evicted",
            vec![("work", s), ("work", failed), ("after", skipped)],
        ),
        (
            "step-when",
            vec![
                ("first", s),
                ("first", ok),
                ("gated", skipped),
                ("last", s),
                ("last", ok),
            ],
        ),
        ("image-pull", vec![("pull", skipped), ("after", skipped)]),
        ("cancel-pending", vec![("a", skipped), ("b", skipped)]),
        (
            "retries",
            vec![
                ("compile", s),
                ("compile", failed),
                ("compile", s),
                ("compile", failed),
                ("compile", s),
                ("compile", ok),
            ],
        ),
    ];
    for version in TEKTON_VERSIONS {
        for (name, expected) in &cases {
            check_fixture(version, name, expected);
        }
    }
}

/// One captured TaskRun calls for exactly `expected`, and the observer that
/// ran against it settled all of it.
fn check_fixture(version: &str, name: &str, expected: &[(&str, &'static str)]) {
    let tr = taskrun(fixture_of(version, name));
    assert_eq!(reached(&tr), pairs(expected), "fixture {version}/{name}");
    if name == "retries" {
        assert_eq!(
            attempts(&tr),
            vec![0, 0, 1, 1, 2, 2],
            "fixture {version}/{name}"
        );
    }
    // The observer that ran against it settled everything: nothing owed.
    let (ledger, error) = annotation_ledger(ledger_annotation(&tr.metadata));
    assert!(error.is_none(), "fixture {version}/{name}: {error:?}");
    let facts = run_facts(tr.status.as_ref()).unwrap();
    assert!(
        owed_transitions(&facts, &ledger).is_empty(),
        "fixture {version}/{name} owes events"
    );
    // Without a ledger, all of them are owed.
    assert_eq!(
        owed_transitions(&facts, &Ledger::default()).len(),
        expected.len(),
        "fixture {version}/{name}"
    );
}

#[test]
fn fixtures_carry_their_tekton_version() {
    // The capture stamps each fixture with the Tekton it ran on; the folder
    // must say the same.
    for version in TEKTON_VERSIONS {
        let value = fixture_of(version, "success");
        assert_eq!(
            value["metadata"]["annotations"]["tekton-step-observer.dev/captured-with-tekton"],
            version
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
