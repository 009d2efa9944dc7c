//! What the observer does about a sink that is missing or refuses its
//! credentials: it holds the events, tells the operator, and loses nothing.

use std::sync::atomic::Ordering;

use k8s_openapi::api::core::v1::Event as KubeEvent;
use kube::api::{Api, ListParams};

use crate::support::*;
use crate::{Harness, wait_for_ledger};

/// A sink answering 401 (then 403) is misconfigured, not refusing the event:
/// the events are held and retried, `/readyz`, a metric and a Warning Event
/// say so, and once the sink accepts them they all arrive, none rejected.
#[tokio::test(flavor = "multi_thread")]
async fn sink_refusing_credentials_holds_events_until_it_accepts() {
    let harness = Harness::start("sink-401", &["--retry-base-delay", "200ms"]).await;
    harness.received.fail_with.store(401, Ordering::SeqCst);
    let uid = create_taskrun(
        &harness.client,
        &harness.ns.name,
        taskrun_manifest("v1", "tr", &[ok("a"), fails("b", 2)], None),
    )
    .await;
    let unauthorized = "tekton_step_observer_delivery_retries_total{reason=\"unauthorized\"}";
    wait_for(
        "retries counted as unauthorized",
        EVENT_DEADLINE,
        || async {
            let metrics = harness.observer.metrics_text().await;
            (series(&metrics, unauthorized).unwrap_or_default() >= 2.0).then_some(())
        },
    )
    .await;
    harness.received.fail_with.store(403, Ordering::SeqCst);
    let (status, body) = harness.observer.readyz().await;
    assert_eq!(
        status, 200,
        "a refusing sink keeps the observer ready: {body}"
    );
    assert!(body.contains("sink: refuses our credentials"), "{body}");
    let events: Api<KubeEvent> = Api::namespaced(harness.client.clone(), &harness.ns.name);
    wait_for(
        "a SinkUnauthorized Warning Event",
        EVENT_DEADLINE,
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("SinkUnauthorized")
                        && e.type_.as_deref() == Some("Warning")
                })
                .then_some(())
        },
    )
    .await;
    assert!(harness.received.for_taskrun(&uid).is_empty());

    harness.received.fail_with.store(0, Ordering::SeqCst);
    let expected = [
        ("a", "started"),
        ("a", "succeeded"),
        ("b", "started"),
        ("b", "failed"),
    ];
    let arrived = harness.received.wait_for_count(&uid, expected.len()).await;
    assert_eq!(
        summary(&arrived),
        expect(&expected),
        "{}",
        harness.observer.log_text()
    );
    let taskrun = wait_for_ledger(&harness.client, &harness.ns.name, "tr", expected.len()).await;
    let ledger = ledger_of(&taskrun).expect("ledger");
    assert!(
        !ledger.to_string().contains("rejected"),
        "nothing rejected: {ledger}"
    );
    let metrics = harness.observer.metrics_text().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("outcome=\"rejected\"") && !l.trim_end().ends_with(" 0")),
        "{metrics}"
    );
    let (_, body) = harness.observer.readyz().await;
    assert!(
        !body.contains("refuses"),
        "cleared once the sink accepts: {body}"
    );
}

/// A fresh install on a cluster where Tekton has no sink becomes Ready (a
/// rollout must not stall), says "no sink" where a user looks, and holds
/// the events until a sink appears.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_sink_the_observer_is_ready_and_says_so() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "no-sink").await;
    // Its own namespace as Tekton's: no config-events, no config-defaults.
    let observer = Observer::start(
        "no-sink",
        &["--namespace", &ns.name, "--tekton-namespace", &ns.name],
        None,
    )
    .await;
    let (status, body) = wait_for("/readyz to answer 200", EVENT_DEADLINE, || async {
        let answer = observer.readyz().await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert!(body.contains("sink: not configured"), "{body}");
    assert_eq!(status, 200);
    let metrics = observer.metrics_text().await;
    assert!(
        metrics.contains("tekton_step_observer_sink_configured 0"),
        "{metrics}"
    );
    // The line may be written just after the state /readyz reports.
    let logged = try_wait_for(EVENT_DEADLINE, || async {
        observer
            .log_text()
            .contains("no CloudEvents sink")
            .then_some(())
    })
    .await;
    assert!(
        logged.is_some(),
        "a log line names it: {}",
        observer.log_text()
    );
}
