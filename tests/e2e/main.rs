//! End-to-end tests: the real observer binary against the local cluster
//! (real kube-apiserver, real Tekton controller and webhook, kwok node, and
//! Tekton's real entrypoint in every pod, run by the node agent). Run by `make test` through `hack/e2e`, inside the cluster's
//! loopback-only network namespace.

// Shared with the fault suites (tests/faults_*.rs); each test crate uses a part.
#[allow(dead_code, reason = "shared by several test crates")]
mod support;
#[allow(dead_code, reason = "shared by several test crates")]
mod workload;

mod backfill;
mod real_entrypoint;
mod shutdown;
mod sink_policy;
mod sink_security;
mod step_spans;

use std::collections::HashSet;

use cloudevents::AttributesReader;
use serde_json::json;
use support::*;

const PREFIX: &str = "dev.tekton.event.plugin.step";

/// One test's namespace, receiver and observer (watching that namespace,
/// sending to that receiver, plus `extra` flags).
struct Harness {
    /// The test's name: its namespace's prefix and its fixture's name.
    test: String,
    client: kube::Client,
    ns: TestNamespace,
    received: Received,
    observer: Observer,
}

impl Harness {
    async fn start(test: &str, extra: &[&str]) -> Self {
        let client = client().await;
        let ns = TestNamespace::create(&client, test).await;
        let (addr, received) = start_receiver().await;
        let sink = format!("http://{addr}/");
        let mut args = vec!["--namespace", &ns.name, "--sink", &sink];
        args.extend_from_slice(extra);
        let observer = Observer::start(test, &args, None).await;
        Harness {
            test: test.to_owned(),
            client,
            ns,
            received,
            observer,
        }
    }
}

/// Runs one TaskRun against a fresh observer and receiver; returns the
/// events it got (after waiting for `expected.len()` of them and for the
/// ledger to record them all) and the finished TaskRun.
async fn run_case(
    test: &str,
    steps: &[Step],
    expected: &[(&str, &str)],
) -> (Vec<cloudevents::Event>, serde_json::Value, Observer) {
    let Harness {
        client,
        ns,
        received,
        observer,
        ..
    } = Harness::start(test, &[]).await;
    let uid = create_taskrun(&client, &ns.name, taskrun_manifest("v1", "tr", steps, None)).await;
    let events = received.wait_for_count(&uid, expected.len()).await;
    let taskrun = wait_for_ledger(&client, &ns.name, "tr", expected.len()).await;
    assert_eq!(
        summary(&events),
        expect(expected),
        "events in order; observer log:\n{}",
        observer.log_text()
    );
    assert_events_well_formed(&events, &uid, &ns.name, "tr");
    capture_fixture(&client, &ns.name, "tr", test).await;
    assert_eq!(
        received.for_taskrun(&uid).len(),
        expected.len(),
        "no event arrives twice"
    );
    (events, taskrun, observer)
}

/// Waits until the ledger annotation records `count` events.
async fn wait_for_ledger(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    count: usize,
) -> serde_json::Value {
    wait_for(
        "the ledger to record every event",
        EVENT_DEADLINE,
        || async {
            let taskrun = get_taskrun(client, namespace, name).await;
            let recorded: usize = ledger_of(&taskrun)?["statuses"]
                .as_array()?
                .iter()
                .map(|s| s["emitted"].as_array().map_or(0, Vec::len))
                .sum();
            (recorded == count).then_some(taskrun)
        },
    )
    .await
}

/// Checks what every event must carry: deterministic ids, the TaskRun's
/// identity, sequence order, the data's shape and its published schema.
fn assert_events_well_formed(events: &[cloudevents::Event], uid: &str, ns: &str, name: &str) {
    let mut last_sequence = 0;
    let mut ids = HashSet::new();
    for event in events {
        let step = event.subject().expect("subject is the step");
        assert_eq!(event.id(), format!("{uid}-{step}-{}", event.ty()));
        assert!(
            ids.insert(event.id().to_owned()),
            "duplicate id {}",
            event.id()
        );
        assert_eq!(
            event.source().as_str(),
            format!("/apis/tekton.dev/v1/namespaces/{ns}/taskruns/{name}")
        );
        assert_eq!(
            event.extension("taskrun").map(|v| v.to_string()),
            Some(name.into())
        );
        assert_eq!(
            event.extension("namespace").map(|v| v.to_string()),
            Some(ns.into())
        );
        let sequence: u64 = event
            .extension("sequence")
            .unwrap()
            .to_string()
            .parse()
            .unwrap();
        assert!(sequence > last_sequence, "sequence increases");
        last_sequence = sequence;
        assert!(event.time().is_some(), "time of the transition");
        let data = data(event);
        assert_eq!(data["podRef"]["kind"], "Pod");
        assert_eq!(data["stepState"]["name"], step);
        assert_eq!(data["step"]["name"], step);
        let kind = event.ty().rsplit('.').nth(1).unwrap();
        let schema_path = format!("{}/schema/step.{kind}.v1.json", env!("CARGO_MANIFEST_DIR"));
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&data)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{} data breaks its schema: {errors:?}",
            event.ty()
        );
    }
}

/// For a TaskRun `tr` ended by its run (timeout, cancel): the expected
/// events arrived in order, well formed, the ledger records them all, and
/// the run ended for `reason`.
async fn assert_run_ended(
    client: &kube::Client,
    ns: &TestNamespace,
    uid: &str,
    received: &Received,
    observer: &Observer,
    expected: &[(&str, &str)],
    reason: &str,
) {
    let arrived = try_wait_for(EVENT_DEADLINE, || async {
        let events = received.for_taskrun(uid);
        (events.len() >= expected.len()).then_some(events)
    })
    .await;
    let Some(events) = arrived else {
        panic!(
            "timed out after {EVENT_DEADLINE:?} waiting for {} events for TaskRun {uid}; got {:?}\nTaskRun: {}\nobserver log:\n{}",
            expected.len(),
            summary(&received.for_taskrun(uid)),
            get_taskrun(client, &ns.name, "tr").await,
            observer.log_text()
        );
    };
    assert_eq!(
        summary(&events),
        expect(expected),
        "{}",
        observer.log_text()
    );
    let taskrun = wait_for_ledger(client, &ns.name, "tr", expected.len()).await;
    let succeeded = taskrun["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Succeeded")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (succeeded["status"].as_str(), succeeded["reason"].as_str()),
        (Some("False"), Some(reason)),
        "{taskrun}"
    );
    assert_events_well_formed(&events, uid, &ns.name, "tr");
}

fn log_of(event: &cloudevents::Event) -> Option<String> {
    data(event)["log"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn success_emits_started_then_succeeded_with_its_log() {
    let (events, taskrun, observer) = run_case(
        "success",
        &[ok("build")],
        &[("build", "started"), ("build", "succeeded")],
    )
    .await;
    assert_eq!(log_of(&events[1]).as_deref(), Some("build ok\n"));
    assert_eq!(data(&events[1])["logTruncated"], false);
    assert!(data(&events[0]).get("log").is_none());
    assert_eq!(
        ledger_of(&taskrun).unwrap(),
        json!({"statuses":[{"name":"build","emitted":[
            format!("{PREFIX}.started.v1"), format!("{PREFIX}.succeeded.v1")]}]})
    );
    let metrics = observer.metrics_text().await;
    for kind in ["started", "succeeded"] {
        let line =
            format!("tekton_step_observer_events_total{{type=\"{kind}\",outcome=\"delivered\"}} 1");
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }
    assert!(
        metrics.contains("tekton_step_observer_sink_configured 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn success_success_in_step_order() {
    run_case(
        "success-success",
        &[ok("one"), ok("two")],
        &[
            ("one", "started"),
            ("one", "succeeded"),
            ("two", "started"),
            ("two", "succeeded"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn success_fail_reports_the_exit_code_and_log() {
    let (events, _, _) = run_case(
        "success-fail",
        &[ok("one"), fails("two", 3)],
        &[
            ("one", "started"),
            ("one", "succeeded"),
            ("two", "started"),
            ("two", "failed"),
        ],
    )
    .await;
    let failed = data(&events[3]);
    assert_eq!(failed["stepState"]["terminated"]["exitCode"], 3);
    assert_eq!(failed["log"], "two failed with 3\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn success_fail_skip_skip() {
    let (events, _, _) = run_case(
        "success-fail-skip",
        &[ok("a"), fails("b", 1), ok("c"), ok("d")],
        &[
            ("a", "started"),
            ("a", "succeeded"),
            ("b", "started"),
            ("b", "failed"),
            ("c", "skipped"),
            ("d", "skipped"),
        ],
    )
    .await;
    assert_eq!(
        data(&events[4])["stepState"]["terminationReason"],
        "Skipped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_five_steps_arrive_in_order() {
    let steps: Vec<Step> = (0..25)
        .map(|i| ok(&format!("s{i:02}")).lasting(20))
        .collect();
    let names: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
    let expected: Vec<(&str, &str)> = names
        .iter()
        .flat_map(|n| [(n.as_str(), "started"), (n.as_str(), "succeeded")])
        .collect();
    let (_, _, observer) = run_case("twenty-five", &steps, &expected).await;
    // Once settled, a TaskRun leaves nothing queued, and the observer holds
    // one small record for it (what it settled; no cached object).
    wait_for(
        "the observer to settle and hold one record",
        EVENT_DEADLINE,
        || async {
            let metrics = observer.metrics_text().await;
            (metrics.contains("tekton_step_observer_tracked_taskruns 1\n")
                && metrics.contains("tekton_step_observer_queue_depth 0\n"))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_error_continue_fails_the_step_and_runs_the_next() {
    let (events, _, _) = run_case(
        "continue",
        &[fails("lint", 2).continue_on_error(), ok("test")],
        &[
            ("lint", "started"),
            ("lint", "failed"),
            ("test", "started"),
            ("test", "succeeded"),
        ],
    )
    .await;
    let lint = data(&events[1]);
    assert_eq!(lint["stepState"]["terminationReason"], "Continued");
    assert_eq!(lint["stepState"]["terminated"]["exitCode"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_mid_step_fails_the_running_step_and_skips_the_rest() {
    let Harness {
        client,
        ns,
        received,
        observer,
        ..
    } = Harness::start("timeout", &[]).await;
    let steps = [ok("quick"), ok("slow").lasting(120_000), ok("never")];
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &steps, Some("5s")),
    )
    .await;
    let expected = [
        ("quick", "started"),
        ("quick", "succeeded"),
        ("slow", "started"),
        ("slow", "failed"),
        ("never", "skipped"),
    ];
    assert_run_ended(
        &client,
        &ns,
        &uid,
        &received,
        &observer,
        &expected,
        "TaskRunTimeout",
    )
    .await;
    capture_fixture(&client, &ns.name, "tr", "timeout").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_taskrun_fails_the_running_step_and_skips_the_rest() {
    let Harness {
        client,
        ns,
        received,
        observer,
        ..
    } = Harness::start("cancel", &[]).await;
    let steps = [ok("first"), ok("long").lasting(120_000), ok("after")];
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &steps, None),
    )
    .await;
    // Cancel once the long step is known to run.
    received.wait_for_count(&uid, 3).await;
    patch_taskrun(
        &client,
        &ns.name,
        "tr",
        json!({"spec": {"status": "TaskRunCancelled"}}),
    )
    .await;
    let expected = [
        ("first", "started"),
        ("first", "succeeded"),
        ("long", "started"),
        ("long", "failed"),
        ("after", "skipped"),
    ];
    assert_run_ended(
        &client,
        &ns,
        &uid,
        &received,
        &observer,
        &expected,
        "TaskRunCancelled",
    )
    .await;
    capture_fixture(&client, &ns.name, "tr", "cancel").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn v1beta1_taskruns_are_read_through_v1beta1() {
    let Harness {
        client,
        ns,
        received,
        observer,
        ..
    } = Harness::start("v1beta1", &["--tekton-api-version", "v1beta1"]).await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1beta1", "tr", &[ok("a"), fails("b", 1)], None),
    )
    .await;
    let expected = [
        ("a", "started"),
        ("a", "succeeded"),
        ("b", "started"),
        ("b", "failed"),
    ];
    let events = received.wait_for_count(&uid, expected.len()).await;
    assert_eq!(
        summary(&events),
        expect(&expected),
        "{}",
        observer.log_text()
    );
    assert_eq!(
        events[0].source().as_str(),
        format!(
            "/apis/tekton.dev/v1beta1/namespaces/{}/taskruns/tr",
            ns.name
        )
    );
    wait_for_ledger(&client, &ns.name, "tr", expected.len()).await;
    capture_fixture(&client, &ns.name, "tr", "v1beta1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unwatched_namespace_gets_no_events() {
    let client = client().await;
    let watched = TestNamespace::create(&client, "watched").await;
    let ignored = TestNamespace::create(&client, "ignored").await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let _observer = Observer::start(
        "unwatched",
        &["--namespace", &watched.name, "--sink", &sink],
        None,
    )
    .await;
    let ignored_uid = create_taskrun(
        &client,
        &ignored.name,
        taskrun_manifest("v1", "tr", &[ok("a")], None),
    )
    .await;
    let watched_uid = create_taskrun(
        &client,
        &watched.name,
        taskrun_manifest("v1", "tr", &[ok("a")], None),
    )
    .await;
    // Both finish; only the watched one is reported and annotated.
    received.wait_for_count(&watched_uid, 2).await;
    let ignored_tr = wait_finished(&client, &ignored.name, "tr").await;
    wait_for_ledger(&client, &watched.name, "tr", 2).await;
    assert!(received.for_taskrun(&ignored_uid).is_empty());
    assert!(ledger_of(&ignored_tr).is_none());
}

/// Runs kubectl (on PATH inside `hack/cluster exec`); returns stdout.
fn kubectl(args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the observer's ServiceAccount may do something.
fn observer_can(args: &[&str]) -> bool {
    let out = std::process::Command::new("kubectl")
        .args([
            "auth",
            "can-i",
            "--as=system:serviceaccount:tekton-step-observer:tekton-step-observer",
        ])
        .args(args)
        .output()
        .expect("run kubectl auth can-i");
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

fn set_config_events_sink(sink: &str) {
    let patch = json!({"data": {"sink": sink}}).to_string();
    kubectl(&[
        "-n",
        "tekton-pipelines",
        "patch",
        "configmap",
        "config-events",
        "--type",
        "merge",
        "-p",
        &patch,
    ]);
}

/// The install manifests, applied for real; the observer then runs with a
/// token of their ServiceAccount (TokenRequest API), with leader election,
/// and finds its sink in Tekton's config-events, which changes mid-run.
#[tokio::test(flavor = "multi_thread")]
async fn installed_rbac_suffices_and_sink_follows_config_events() {
    let client = client().await;
    let manifests = format!("{}/config", env!("CARGO_MANIFEST_DIR"));
    kubectl(&["apply", "-k", &manifests]);
    // The Deployment's pods cannot run on the simulated node; only the RBAC
    // and the namespace matter here.
    kubectl(&[
        "-n",
        "tekton-step-observer",
        "scale",
        "deployment/tekton-step-observer",
        "--replicas=0",
    ]);

    // Least privilege: what it needs, and nothing broader.
    for allowed in [
        vec!["watch", "taskruns.tekton.dev", "--all-namespaces"],
        vec!["patch", "taskruns.tekton.dev", "-n", "default"],
        vec!["get", "pods/log", "-n", "default"],
        vec!["create", "events.events.k8s.io", "-n", "default"],
        vec![
            "watch",
            "configmaps/config-events",
            "-n",
            "tekton-pipelines",
        ],
        vec![
            "patch",
            "leases/tekton-step-observer",
            "-n",
            "tekton-step-observer",
        ],
    ] {
        assert!(observer_can(&allowed), "RBAC should allow {allowed:?}");
    }
    for denied in [
        vec!["list", "secrets", "--all-namespaces"],
        vec!["get", "configmaps", "-n", "default"],
        vec![
            "get",
            "configmaps/config-leader-election",
            "-n",
            "tekton-pipelines",
        ],
        vec!["delete", "taskruns.tekton.dev", "-n", "default"],
        vec!["update", "taskruns.tekton.dev/status", "-n", "default"],
        vec!["create", "pods", "-n", "default"],
        vec!["patch", "leases/other", "-n", "tekton-step-observer"],
    ] {
        assert!(!observer_can(&denied), "RBAC should deny {denied:?}");
    }

    // A kubeconfig that authenticates as the ServiceAccount.
    let token = kubectl(&[
        "-n",
        "tekton-step-observer",
        "create",
        "token",
        "tekton-step-observer",
        "--duration=1h",
    ]);
    let mut kubeconfig: serde_json::Value = serde_json::from_str(&kubectl(&[
        "config", "view", "--raw", "--minify", "-o", "json",
    ]))
    .unwrap();
    kubeconfig["users"][0]["user"] = json!({"token": token.trim()});
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("observer-sa.kubeconfig");
    std::fs::write(&path, kubeconfig.to_string()).unwrap();

    let ns = TestNamespace::create(&client, "rbac").await;
    let (first_addr, first) = start_receiver().await;
    let (second_addr, second) = start_receiver().await;
    set_config_events_sink(&format!("http://{first_addr}/"));
    let observer = Observer::start(
        "rbac",
        &[
            "--namespace",
            &ns.name,
            "--leader-elect",
            "--leader-election-namespace",
            "tekton-step-observer",
            "--identity",
            "e2e-rbac",
        ],
        path.to_str(),
    )
    .await;

    let one = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "one", &[ok("a")], None),
    )
    .await;
    first.wait_for_count(&one, 2).await;
    wait_for_ledger(&client, &ns.name, "one", 2).await;

    // The sink moves; the next TaskRun's events follow it without a restart.
    set_config_events_sink(&format!("http://{second_addr}/"));
    let url = format!("http://{}/metrics", observer.metrics);
    wait_for(
        "the observer to see the new sink",
        EVENT_DEADLINE,
        || async {
            // Readiness stays up across the change; the new URL shows in the log.
            let ready = reqwest::get(&url).await.ok()?.status().is_success();
            (ready && observer.log_text().contains(&second_addr.to_string())).then_some(())
        },
    )
    .await;
    let two = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "two", &[ok("a")], None),
    )
    .await;
    let events = second.wait_for_count(&two, 2).await;
    assert_eq!(
        summary(&events),
        expect(&[("a", "started"), ("a", "succeeded")])
    );
    wait_for_ledger(&client, &ns.name, "two", 2).await;
    assert!(
        first.for_taskrun(&two).is_empty(),
        "old sink got nothing after the change"
    );
    assert_eq!(second.for_taskrun(&one).len(), 0);
    set_config_events_sink("");
    assert!(
        !observer.log_text().contains("Forbidden"),
        "the ServiceAccount was refused something:\n{}",
        observer.log_text()
    );
}
