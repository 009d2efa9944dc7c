//! `tekton-step-observer inspect ns/name`: what a TaskRun needs, what its
//! ledger says, and what is still owed, without sending anything.

use serde_json::json;

use crate::app::{client_and_version, kube_config};
use crate::cli::InspectArgs;
use crate::context::annotation_ledger;
use crate::error::{Error, Result};
use crate::steps::{owed_transitions, reached_transitions, run_facts};
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
    print!("{}", report(&taskrun, &args.type_prefix, args.json));
    Ok(())
}

/// The report for one TaskRun: pure, so it is tested without a cluster.
pub fn report(taskrun: &TaskRun, type_prefix: &str, as_json: bool) -> String {
    let annotation = ledger_annotation(&taskrun.metadata);
    let (ledger, malformed) = annotation_ledger(annotation);
    let facts = run_facts(taskrun.status.as_ref());
    let (needed, owed) = match &facts {
        Ok(facts) => (reached_transitions(facts), owed_transitions(facts, &ledger)),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let settled = |name: &str, kind| {
        if ledger.step(name).is_some_and(|r| r.delivered(kind)) {
            "delivered"
        } else if ledger.settled(name, kind) {
            "rejected"
        } else {
            "owed"
        }
    };
    if as_json {
        let events: Vec<_> = needed
            .iter()
            .map(|t| {
                json!({
                    "step": t.step_name,
                    "type": t.kind.event_type(type_prefix),
                    "sequence": t.sequence(),
                    "time": t.time,
                    "state": settled(&t.step_name, t.kind),
                })
            })
            .collect();
        let value = json!({
            "ready": facts.as_ref().err().map(ToString::to_string).unwrap_or_else(|| "yes".into()),
            "ledger": annotation,
            "ledgerError": malformed.map(|e| e.to_string()),
            "events": events,
            "owed": owed.iter().map(|t| t.kind.event_type(type_prefix)).collect::<Vec<_>>(),
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
    out.push_str(&format!(
        "  {:<4} {:<24} {:<10} {:<10} {}\n",
        "SEQ", "STEP", "EVENT", "STATE", "TIME"
    ));
    for t in &needed {
        out.push_str(&format!(
            "  {:<4} {:<24} {:<10} {:<10} {}\n",
            t.sequence(),
            t.step_name,
            t.kind.as_str(),
            settled(&t.step_name, t.kind),
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
        let text = report(&taskrun, crate::event::DEFAULT_TYPE_PREFIX, false);
        assert!(
            text.contains("1    a                        started    delivered"),
            "{text}"
        );
        assert!(
            text.contains("2    a                        failed     owed"),
            "{text}"
        );
        assert!(
            text.contains("4    b                        skipped    owed"),
            "{text}"
        );
        assert!(text.contains("owed: 2 event(s)"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&report(&taskrun, crate::event::DEFAULT_TYPE_PREFIX, true))
                .unwrap();
        assert_eq!(json["owed"].as_array().map(Vec::len), Some(2));
    }
}
