//! Stopping the observer (SIGTERM, as a rolling restart does) repeats
//! nothing: in-flight sends finish and the ledger records everything the
//! sink acknowledged before the process exits.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cloudevents::AttributesReader;

use crate::support::*;
use crate::{Harness, wait_for_ledger};

/// Long enough for in-flight sends and the ledger write, well under the
/// observer's default grace period (20 s).
const EXIT_DEADLINE: Duration = Duration::from_secs(25);

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_round_repeats_nothing() {
    let mut harness = Harness::start("sigterm", &[]).await;
    // A slow sink: its 30 events would take 30 s to send, longer than the
    // TaskRun runs (Tekton's entrypoint starts a step up to 1 s after the
    // one before), so a round of sending is under way when SIGTERM comes.
    harness.received.delay_ms.store(1000, Ordering::SeqCst);
    let steps: Vec<Step> = (0..15)
        .map(|i| ok(&format!("s{i:02}")).lasting(20))
        .collect();
    let uid = create_taskrun(
        &harness.client,
        &harness.ns.name,
        taskrun_manifest("v1", "tr", &steps, None),
    )
    .await;
    // Mid-round: some delivered, more owed.
    harness.received.wait_for_count(&uid, 4).await;
    assert!(
        harness.observer.terminate(EXIT_DEADLINE).await,
        "the observer exits on SIGTERM within its grace period; log:\n{}",
        harness.observer.log_text()
    );
    let before = harness.received.for_taskrun(&uid).len();
    assert!(before < 30, "stopped mid-round ({before} of 30 sent)");
    // Everything acknowledged before the exit is in the ledger.
    wait_for_ledger(&harness.client, &harness.ns.name, "tr", before).await;

    harness.received.delay_ms.store(0, Ordering::SeqCst);
    harness.observer.restart().await;
    let events = harness.received.wait_for_count(&uid, 30).await;
    wait_for_ledger(&harness.client, &harness.ns.name, "tr", 30).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for event in harness.received.for_taskrun(&uid) {
        *seen.entry(event.id().to_owned()).or_default() += 1;
    }
    let repeated: Vec<&String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        repeated.is_empty(),
        "no event sent twice across the restart: {repeated:?}\n{}",
        harness.observer.log_text()
    );
    assert_eq!(events.len(), 30);
}
