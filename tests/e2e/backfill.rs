//! `--backfill-window`: on first install the observer leaves alone what
//! finished long before; an observer that was down for longer than the
//! window still sends everything that finished while it was down, because
//! the window counts back from the last moment it was known to run (the
//! watermark on its Lease).

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use crate::support::*;

/// Short, so that the test can outwait it.
const WINDOW: Duration = Duration::from_secs(3);

/// Completion times are to the second; waiting this much past the window
/// puts a TaskRun surely outside it.
const MARGIN: Duration = Duration::from_secs(2);

const LEASE: &str = "backfill-watermark";

/// Creates a TaskRun of `steps`, waits until it finished and until the
/// window (plus the margin) has passed since; returns its uid.
async fn finished_longer_than_the_window_ago(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    steps: &[Step],
) -> String {
    let uid = create_taskrun(client, namespace, taskrun_manifest("v1", name, steps, None)).await;
    let taskrun = wait_finished(client, namespace, name).await;
    let text = taskrun["status"]["completionTime"]
        .as_str()
        .expect("a finished TaskRun has a completionTime");
    let until = DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
        + WINDOW
        + MARGIN;
    wait_for(
        "the backfill window to pass",
        Duration::from_secs(30),
        || async { (Utc::now() > until).then_some(()) },
    )
    .await;
    uid
}

/// An observer of `namespace` with the short window and a Lease (so a
/// watermark) of the test's own.
fn observer_args<'a>(namespace: &'a str, sink: &'a str, window: &'a str) -> [&'a str; 10] {
    [
        "--namespace",
        namespace,
        "--sink",
        sink,
        "--backfill-window",
        window,
        "--leader-election-namespace",
        namespace,
        "--leader-election-id",
        LEASE,
    ]
}

async fn left_alone(observer: &Observer) -> Option<f64> {
    observer
        .metrics_text()
        .await
        .lines()
        .find_map(|line| line.strip_prefix("tekton_step_observer_backfill_left_alone_total "))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn observer_down_longer_than_the_backfill_window_loses_nothing() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "backfill").await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");

    // Finished long (longer than the window) before the first install.
    let old = finished_longer_than_the_window_ago(&client, &ns.name, "old", &[ok("a")]).await;

    let window = format!("{}s", WINDOW.as_secs());
    let args = observer_args(&ns.name, &sink, &window);
    let mut observer = Observer::start("backfill", &args, None).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    wait_for("the watermark on the Lease", EVENT_DEADLINE, || async {
        let lease = leases.get_opt(LEASE).await.ok()??;
        lease
            .metadata
            .annotations?
            .contains_key("tekton.plugin.step-observer/running-at")
            .then_some(())
    })
    .await;
    wait_for(
        "old to be counted as left alone",
        EVENT_DEADLINE,
        || async { (left_alone(&observer).await == Some(1.0)).then_some(()) },
    )
    .await;

    // Down for longer than the window, while a TaskRun runs and finishes.
    assert!(
        observer.terminate(Duration::from_secs(25)).await,
        "the observer exits on SIGTERM; log:\n{}",
        observer.log_text()
    );
    let uid =
        finished_longer_than_the_window_ago(&client, &ns.name, "tr", &[ok("build"), ok("push")])
            .await;

    observer.restart().await;
    let events = received.wait_for_count(&uid, 4).await;
    assert_eq!(
        summary(&events),
        expect(&[
            ("build", "started"),
            ("build", "succeeded"),
            ("push", "started"),
            ("push", "succeeded"),
        ]),
        "{}",
        observer.log_text()
    );
    wait_for("old to be left alone again", EVENT_DEADLINE, || async {
        (left_alone(&observer).await == Some(1.0)).then_some(())
    })
    .await;
    assert!(
        received.for_taskrun(&old).is_empty(),
        "what finished before the first install is left alone"
    );
}

/// A TaskRun that finished but still owes events (the sink refuses them)
/// holds the watermark back: the observer stopping long after, and starting
/// again, still sends them, although the TaskRun finished longer than the
/// window before the observer last ran.
#[tokio::test(flavor = "multi_thread")]
async fn events_still_owed_hold_the_watermark_back() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "backfill-owed").await;
    let (addr, received) = start_receiver().await;
    received
        .fail_with
        .store(503, std::sync::atomic::Ordering::SeqCst);
    let sink = format!("http://{addr}/");
    let window = format!("{}s", WINDOW.as_secs());
    let args = observer_args(&ns.name, &sink, &window);
    let mut observer = Observer::start("backfill-owed", &args, None).await;
    // It finishes, its events are refused, and the window passes while the
    // observer runs; then the observer stops (and writes its watermark).
    let uid = finished_longer_than_the_window_ago(&client, &ns.name, "held", &[ok("build")]).await;
    assert!(
        observer.terminate(Duration::from_secs(25)).await,
        "the observer exits on SIGTERM; log:\n{}",
        observer.log_text()
    );
    assert!(
        received.for_taskrun(&uid).is_empty(),
        "the sink took nothing yet"
    );

    received
        .fail_with
        .store(0, std::sync::atomic::Ordering::SeqCst);
    observer.restart().await;
    let events = received.wait_for_count(&uid, 2).await;
    assert_eq!(
        summary(&events),
        expect(&[("build", "started"), ("build", "succeeded")]),
        "{}",
        observer.log_text()
    );
}
