use super::*;
use crate::ledger::Settlement;
use crate::steps::run_facts;
use crate::testing::{TaskRunBuilder, exited, killed, skipped};

const UID: &str = "50df8d70-8c11-4cd4-8fdf-3aa4cb287408";

#[test]
fn traceparents_parse_and_print_as_w3c_says() {
    let text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let parent = TraceParent::parse(text).unwrap();
    assert!(parent.sampled);
    assert_eq!(parent.header(), text);
    for bad in [
        "",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    ] {
        assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
    }
    let unsampled = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
    assert_eq!(unsampled.map(|p| p.sampled), Some(false));
}

#[test]
fn the_trace_is_tektons_where_it_traces_else_the_uid() {
    let tekton = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let from_status = run_trace(
        UID,
        Some(&BTreeMap::from([(
            "traceparent".to_owned(),
            tekton.to_owned(),
        )])),
        None,
    );
    assert_eq!(
        hex(&from_status.trace_id),
        "0af7651916cd43dd8448eb211c80319c"
    );
    assert_eq!(
        from_status.parent_span_id.map(|s| hex(&s)).as_deref(),
        Some("b7ad6b7169203331")
    );
    let annotation = format!(r#"{{"traceparent":"{tekton}"}}"#);
    assert_eq!(run_trace(UID, None, Some(&annotation)), from_status);
    let own = run_trace(UID, None, Some("not json"));
    assert_eq!(hex(&own.trace_id), "50df8d708c114cd48fdf3aa4cb287408");
    assert_eq!(own.parent_span_id, None);
    assert!(own.sampled);
    // A uid that is not a UUID still gets a stable, valid trace id.
    let odd = run_trace("not-a-uuid", None, None);
    assert_eq!(odd, run_trace("not-a-uuid", None, None));
    assert_ne!(odd.trace_id, [0; 16]);
}

#[test]
fn step_span_ids_are_stable_and_differ_by_step_and_attempt() {
    let a = step_span_id(UID, "build", 0);
    assert_eq!(a, step_span_id(UID, "build", 0));
    assert_ne!(a, step_span_id(UID, "build", 1));
    assert_ne!(a, step_span_id(UID, "test", 0));
    assert_ne!(a, [0; 8]);
}

#[test]
fn spans_are_owed_only_where_the_ledger_says_so_and_for_steps_that_ran() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", exited(3))
        .step("c", skipped())
        .failed("Failed")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let trace = run_trace(UID, None, None);
    let mut ledger = Ledger::default();
    for step in ["a", "b", "c"] {
        ledger.record(step, StepEventKind::Started, Settlement::Delivered);
    }
    // Nothing marked: a TaskRun from before tracing was on owes no spans.
    assert!(owed_spans(&facts, &ledger, &trace, UID).is_empty());
    for step in ["a", "b", "c"] {
        ledger.mark_span_owed(step, 0);
    }
    let spans = owed_spans(&facts, &ledger, &trace, UID);
    let summary: Vec<_> = spans
        .iter()
        .map(|s| {
            (
                s.step_name.as_str(),
                s.outcome,
                s.exit_code,
                s.reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", SpanOutcome::Succeeded, Some(0), None),
            ("b", SpanOutcome::Failed, Some(3), Some("Error")),
        ],
        "a skipped step never ran: no span"
    );
    let status = taskrun.status.as_ref().unwrap();
    let time = |step: usize, field: &str| {
        DateTime::parse_from_rfc3339(status.steps[step]["terminated"][field].as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc)
    };
    assert_eq!(
        (spans[1].start, spans[1].end),
        (time(1, "startedAt"), time(1, "finishedAt"))
    );
    assert_eq!(spans[0].context, step_traceparent(&trace, UID, "a", 0));
    assert_eq!(spans[0].parent_span_id, None);
    ledger.mark_span_exported("a", 0);
    let left: Vec<_> = owed_spans(&facts, &ledger, &trace, UID)
        .into_iter()
        .map(|s| s.step_name)
        .collect();
    assert_eq!(left, vec!["b".to_owned()]);
}

#[test]
fn a_step_killed_while_running_ends_its_span_at_the_runs_end() {
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", killed("TaskRunCancelled"))
        .failed("TaskRunCancelled")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let mut ledger = Ledger::default();
    ledger.mark_span_owed("a", 0);
    let trace = run_trace(UID, None, None);
    let spans = owed_spans(&facts, &ledger, &trace, UID);
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0].outcome, SpanOutcome::Failed);
    assert!(spans[0].end >= spans[0].start);
}

#[test]
fn a_later_step_still_running_at_the_runs_end_starts_when_the_one_before_ended() {
    use crate::testing::running;
    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", running(0))
        .failed("TaskRunTimeout")
        .build();
    let facts = run_facts(taskrun.status.as_ref()).unwrap();
    let mut ledger = Ledger::default();
    ledger.mark_span_owed("b", 0);
    let spans = owed_spans(&facts, &ledger, &run_trace(UID, None, None), UID);
    assert_eq!(spans.len(), 1, "{spans:?}");
    let status = taskrun.status.as_ref().unwrap();
    let a_finished = DateTime::parse_from_rfc3339(
        status.steps[0]["terminated"]["finishedAt"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .with_timezone(&Utc);
    assert_eq!(
        spans[0].start, a_finished,
        "not the container's (the pod's) start"
    );
    assert_eq!(spans[0].outcome, SpanOutcome::Failed);
    assert_eq!(spans[0].reason.as_deref(), Some("TaskRunTimeout"));
    assert_eq!(spans[0].exit_code, None);
}
