//! `tekton-step-observer inspect ns/name`: what a TaskRun needs, what its
//! ledger says, and what is still owed, without sending anything.

use serde_json::json;

use crate::app::{client_and_version, kube_config};
use crate::cli::InspectArgs;
use crate::context::annotation_ledger;
use crate::error::{Error, Result};
use crate::ledger::Settlement;
use crate::step_event::{EventFormat, EventFormats, cdevents_type};
use crate::steps::{Transition, owed_in_formats, reached_transitions, run_facts};
use crate::tekton::{TaskRun, ledger_annotation};

/// Prints the report to stdout.
pub async fn run(args: InspectArgs) -> Result<()> {
    let Some((namespace, name)) = args.taskrun.split_once('/') else {
        return Err(Error::InvalidArgument(format!(
            "{:?} is not namespace/name",
            args.taskrun
        )));
    };
    let (client, version) =
        client_and_version(kube_config().await?, args.tekton_api_version).await?;
    let api: kube::Api<TaskRun> =
        kube::Api::namespaced_with(client, namespace, &version.api_resource());
    let taskrun = api.get(name).await.map_err(|source| Error::Kube {
        operation: "get the TaskRun",
        source,
    })?;
    print!(
        "{}",
        report(&taskrun, &args.type_prefix, args.event_format, args.json)
    );
    Ok(())
}

/// How an event stands in the ledger, as the report words it.
fn state_word(how: Option<Settlement>) -> &'static str {
    match how {
        Some(Settlement::Delivered) => "delivered",
        Some(Settlement::Rejected) => "rejected",
        Some(Settlement::DeadLettered) => "deadLettered",
        Some(Settlement::Dropped) => "dropped",
        None => "owed",
    }
}

/// The report for one TaskRun: pure, so it is tested without a cluster.
/// One row per step event of every attempt, with its state in each format
/// `formats` names (and in any other the ledger holds), and the step run's
/// span where the ledger records one.
pub fn report(
    taskrun: &TaskRun,
    type_prefix: &str,
    formats: EventFormats,
    as_json: bool,
) -> String {
    let annotation = ledger_annotation(&taskrun.metadata);
    let (ledger, malformed) = annotation_ledger(annotation);
    let facts = run_facts(taskrun.status.as_ref());
    let (needed, owed) = match &facts {
        Ok(facts) => (
            reached_transitions(facts),
            owed_in_formats(facts, &ledger, formats),
        ),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let record = |t: &Transition| ledger.step_attempt(&t.step_name, t.attempt);
    let shown: Vec<EventFormat> = [EventFormat::Native, EventFormat::CdEvents]
        .into_iter()
        .filter(|f| {
            formats.contains(*f)
                || needed
                    .iter()
                    .any(|t| record(t).is_some_and(|r| r.settled_in(*f, t.kind)))
        })
        .collect();
    let state = |t: &Transition, format| {
        state_word(record(t).and_then(|r| r.settlement_in(format, t.kind)))
    };
    let span = |t: &Transition| match record(t) {
        Some(r) if t.kind.is_terminal() && r.span_exported() => "exported",
        Some(r) if t.kind.is_terminal() && r.span_owed() => "owed",
        _ => "-",
    };
    let type_of = |t: &Transition| match t.format {
        EventFormat::Native => t.kind.event_type(type_prefix),
        EventFormat::CdEvents => cdevents_type(t.kind).to_owned(),
    };
    if as_json {
        let events: Vec<_> = needed
            .iter()
            .map(|t| {
                let states: serde_json::Map<String, serde_json::Value> = shown
                    .iter()
                    .map(|f| (f.as_str().to_owned(), json!(state(t, *f))))
                    .collect();
                json!({
                    "step": t.step_name,
                    "attempt": t.attempt,
                    "kind": t.kind.as_str(),
                    "type": t.kind.event_type(type_prefix),
                    "sequence": t.sequence(),
                    "time": t.time,
                    "state": state(t, EventFormat::Native),
                    "states": states,
                    "span": span(t),
                })
            })
            .collect();
        let value = json!({
            "ready": facts.as_ref().err().map(ToString::to_string).unwrap_or_else(|| "yes".into()),
            "ledger": annotation,
            "ledgerError": malformed.map(|e| e.to_string()),
            "events": events,
            "owed": owed.iter().map(type_of).collect::<Vec<_>>(),
        });
        return format!("{value:#}\n");
    }
    let mut out = String::new();
    let name = taskrun.metadata.name.as_deref().unwrap_or("?");
    out.push_str(&format!("TaskRun {name}\n"));
    if let Err(not_ready) = &facts {
        out.push_str(&format!("  not decidable yet: {not_ready}\n"));
    }
    out.push_str(&format!("  ledger: {}\n", annotation.unwrap_or("(none)")));
    if let Some(error) = malformed {
        out.push_str(&format!(
            "  ledger is malformed and counts as empty: {error}\n"
        ));
    }
    let format_columns: String = shown
        .iter()
        .map(|f| format!(" {:<12}", f.as_str().to_uppercase()))
        .collect();
    out.push_str(&format!(
        "  {:<4} {:<24} {:<7} {:<10}{format_columns} {:<8} {}\n",
        "SEQ", "STEP", "ATTEMPT", "EVENT", "SPAN", "TIME"
    ));
    for t in &needed {
        let states: String = shown
            .iter()
            .map(|f| format!(" {:<12}", state(t, *f)))
            .collect();
        out.push_str(&format!(
            "  {:<4} {:<24} {:<7} {:<10}{states} {:<8} {}\n",
            t.sequence(),
            t.step_name,
            t.attempt,
            t.kind.as_str(),
            span(t),
            t.time.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
        ));
    }
    out.push_str(&format!("  owed: {} event(s)\n", owed.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TaskRunBuilder, exited, skipped};

    #[test]
    fn report_shows_delivered_and_owed_events() {
        let taskrun = TaskRunBuilder::new("tr")
            .step("a", exited(1))
            .step("b", skipped())
            .failed("Failed")
            .annotation(
                crate::tekton::LEDGER_ANNOTATION,
                r#"{"statuses":[{"name":"a","emitted":["dev.tekton.event.plugin.step.started.v1"]}]}"#,
            )
            .build();
        let native = EventFormats::NATIVE;
        let text = report(&taskrun, crate::event::DEFAULT_TYPE_PREFIX, native, false);
        let row = |seq: &str, step: &str, kind: &str, native: &str| {
            format!("  {seq:<4} {step:<24} {:<7} {kind:<10} {native:<12} -", 0)
        };
        assert!(
            text.contains(&row("1", "a", "started", "delivered")),
            "{text}"
        );
        assert!(text.contains(&row("2", "a", "failed", "owed")), "{text}");
        assert!(text.contains(&row("4", "b", "skipped", "owed")), "{text}");
        assert!(!text.contains("CDEVENTS"), "{text}");
        assert!(text.contains("owed: 2 event(s)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report(
            &taskrun,
            crate::event::DEFAULT_TYPE_PREFIX,
            native,
            true,
        ))
        .unwrap();
        assert_eq!(json["owed"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn report_shows_cdevents_attempts_and_spans_the_ledger_holds() {
        let taskrun = TaskRunBuilder::new("tr")
            .step("a", exited(0))
            .succeeded()
            .annotation(
                crate::tekton::LEDGER_ANNOTATION,
                r#"{"statuses":[{"name":"a","emitted":["dev.tekton.event.plugin.step.started.v1","dev.tekton.event.plugin.step.succeeded.v1","dev.cdeventsx.tekton-steprun.started.0.1.0"],"rejected":["dev.cdeventsx.tekton-steprun.finished.0.1.0"],"span":"exported"}]}"#,
            )
            .build();
        // Shown although only native events are asked for: the ledger has them.
        let text = report(
            &taskrun,
            crate::event::DEFAULT_TYPE_PREFIX,
            EventFormats::NATIVE,
            false,
        );
        assert!(text.contains("NATIVE       CDEVENTS"), "{text}");
        assert!(
            text.contains(&format!(
                "  {:<4} {:<24} {:<7} {:<10} {:<12} {:<12} {:<8}",
                "2", "a", 0, "succeeded", "delivered", "rejected", "exported"
            )),
            "{text}"
        );
        assert!(text.contains("owed: 0 event(s)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report(
            &taskrun,
            crate::event::DEFAULT_TYPE_PREFIX,
            EventFormats::parse("both").unwrap(),
            true,
        ))
        .unwrap();
        assert_eq!(json["events"][1]["states"]["cdevents"], "rejected");
        assert_eq!(json["events"][1]["span"], "exported");
        assert_eq!(json["events"][0]["span"], "-");
    }
}
