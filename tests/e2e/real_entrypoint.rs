//! Tekton behaviours that only Tekton's own entrypoint produces: every case
//! here runs real scripts under the real entrypoint on the node agent
//! (hack/node-agent), and asserts the exact events an independent receiver
//! gets. The step `when`, image-pull and retries cases failed against the
//! observer before issue 9's fixes (the first two with wrong events, retries
//! with nothing for the later attempts).

use cloudevents::AttributesReader;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::support::*;
use crate::{Harness, PREFIX, assert_events_well_formed, assert_run_ended, wait_for_ledger};

/// The annotation that makes the node agent kill a container as the OOM
/// killer would (hack/node-agent/README.md).
const OOM_KILL_ANNOTATION: &str = "node-agent.tekton-step-observer.dev/oom-kill";
/// The annotation that makes the node agent evict the pod.
const EVICT_ANNOTATION: &str = "node-agent.tekton-step-observer.dev/evict";
/// A node selector no node matches: the pod stays Pending, unschedulable.
const NO_SUCH_NODE_LABEL: &str = "tekton-step-observer.dev/no-such-node";

/// A step that runs `script` in the host's shell.
fn step(name: &str, script: &str) -> Value {
    json!({"name": name, "image": "busybox", "script": script})
}

/// A v1 TaskRun named `tr` with an inline Task spec.
fn taskrun(task_spec: Value) -> Value {
    json!({
        "apiVersion": "tekton.dev/v1",
        "kind": "TaskRun",
        "metadata": {"name": "tr"},
        "spec": {"taskSpec": task_spec},
    })
}

/// Creates `manifest` as TaskRun `tr`, waits for `expected` events and for
/// the ledger to record them, and checks them: order, ids, data, schemas,
/// no duplicates. Returns the events and the finished TaskRun.
async fn run_taskrun(
    harness: &Harness,
    manifest: Value,
    expected: &[(&str, &str)],
) -> (Vec<cloudevents::Event>, Value) {
    let Harness {
        client,
        ns,
        received,
        observer,
        test,
    } = harness;
    let uid = create_taskrun(client, &ns.name, manifest).await;
    let events = received.wait_for_count(&uid, expected.len()).await;
    assert_eq!(
        summary(&events),
        expect(expected),
        "events in order; observer log:\n{}",
        observer.log_text()
    );
    let taskrun = wait_for_ledger(client, &ns.name, "tr", expected.len()).await;
    assert_events_well_formed(&events, &uid, &ns.name, "tr");
    let finished = wait_finished(client, &ns.name, "tr").await;
    capture_fixture(client, &ns.name, "tr", test).await;
    assert_eq!(
        received.for_taskrun(&uid).len(),
        expected.len(),
        "no event arrives twice"
    );
    let _ = taskrun;
    (events, finished)
}

/// The reason Tekton gives a TaskRun whose step failed: v1.15 names the
/// failure (`StepFailed`, pkg/pod/status.go getFailureInfo); the v1.9 line
/// says `Failed`.
fn step_failed_reason() -> &'static str {
    match std::env::var("TEKTON_VERSION") {
        Ok(version) if version.starts_with("v1.9.") => "Failed",
        _ => "StepFailed",
    }
}

fn log_of(event: &cloudevents::Event) -> String {
    data(event)["log"].as_str().unwrap_or_default().to_owned()
}

fn succeeded_reason(taskrun: &Value) -> String {
    taskrun["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Succeeded")
        .map(|c| {
            format!(
                "{}/{}",
                c["status"].as_str().unwrap_or_default(),
                c["reason"].as_str().unwrap_or_default()
            )
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_run_for_real_and_their_output_is_the_log() {
    let harness = Harness::start("real-script", &[]).await;
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [
            step("greet", "#!/bin/sh\necho \"hello from $(id -u)\"\necho to-stderr >&2"),
            step("count", "#!/bin/sh\nfor i in 1 2 3; do echo line $i; done\nexit 4"),
        ]})),
        &[
            ("greet", "started"),
            ("greet", "succeeded"),
            ("count", "started"),
            ("count", "failed"),
        ],
    )
    .await;
    // The unprivileged user of the sandbox, not root.
    assert_eq!(log_of(&events[1]), "hello from 65532\nto-stderr\n");
    assert_eq!(log_of(&events[3]), "line 1\nline 2\nline 3\n");
    assert_eq!(data(&events[3])["stepState"]["terminated"]["exitCode"], 4);
    assert_eq!(
        succeeded_reason(&taskrun),
        format!("False/{}", step_failed_reason())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_cannot_reach_beyond_loopback() {
    let harness = Harness::start("no-network", &[]).await;
    // 192.0.2.1 is TEST-NET-1 (RFC 5737): documentation only, never routed.
    // In the cluster's namespace there is no route at all, so the connect
    // fails at once without a packet leaving.
    let (events, _) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [step(
            "dial",
            "#!/bin/bash\nif timeout 5 bash -c 'exec 3<>/dev/tcp/192.0.2.1/80' 2>/dev/null; then echo reached; exit 0; else echo unreachable; exit 1; fi",
        )]})),
        &[("dial", "started"), ("dial", "failed")],
    )
    .await;
    assert_eq!(log_of(&events[1]), "unreachable\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn step_timeout_fails_that_step_and_skips_the_rest() {
    let harness = Harness::start("step-timeout", &[]).await;
    let mut slow = step("slow", "#!/bin/sh\necho begun\nsleep 60");
    slow["timeout"] = json!("2s");
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [slow, step("after", "echo after")]})),
        &[
            ("slow", "started"),
            ("slow", "failed"),
            ("after", "skipped"),
        ],
    )
    .await;
    assert_eq!(
        data(&events[1])["stepState"]["terminationReason"],
        "TimeoutExceeded"
    );
    // The entrypoint logs why it killed the step, after the step's output.
    let log = log_of(&events[1]);
    assert!(
        log.starts_with("begun\n") && log.ends_with(" context deadline exceeded\n"),
        "{log:?}"
    );
    assert_eq!(
        succeeded_reason(&taskrun),
        format!("False/{}", step_failed_reason())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_error_continue_runs_the_next_step_for_real() {
    let harness = Harness::start("real-continue", &[]).await;
    let mut lint = step("lint", "#!/bin/sh\necho lint failed\nexit 3");
    lint["onError"] = json!("continue");
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [lint, step("test", "echo tested")]})),
        &[
            ("lint", "started"),
            ("lint", "failed"),
            ("test", "started"),
            ("test", "succeeded"),
        ],
    )
    .await;
    assert_eq!(
        data(&events[1])["stepState"]["terminationReason"],
        "Continued"
    );
    assert_eq!(data(&events[1])["stepState"]["terminated"]["exitCode"], 3);
    assert_eq!(log_of(&events[3]), "tested\n");
    assert_eq!(succeeded_reason(&taskrun), "True/Succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn results_written_by_a_step_reach_a_later_step() {
    let harness = Harness::start("step-results", &[]).await;
    let mut write = step(
        "write",
        "#!/bin/sh\nprintf hello > $(step.results.word.path)",
    );
    write["results"] = json!([{"name": "word"}]);
    let mut read = step(
        "read",
        "#!/bin/sh\necho \"got $WORD and $(cat $(results.greeting.path))\"\ntest \"$WORD\" = hello",
    );
    read["env"] = json!([{"name": "WORD", "value": "$(steps.write.results.word)"}]);
    let greet = step("greet", "#!/bin/sh\nprintf hi > $(results.greeting.path)");
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({
            "results": [{"name": "greeting"}],
            "steps": [write, greet, read],
        })),
        &[
            ("write", "started"),
            ("write", "succeeded"),
            ("greet", "started"),
            ("greet", "succeeded"),
            ("read", "started"),
            ("read", "succeeded"),
        ],
    )
    .await;
    assert_eq!(log_of(&events[5]), "got hello and hi\n");
    let results = taskrun["status"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        results
            .iter()
            .any(|r| r["name"] == "greeting" && r["value"] == "hi"),
        "the Task result comes from the termination message: {results:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn step_action_runs_as_a_step() {
    let harness = Harness::start("step-action", &[]).await;
    let step_actions = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("tekton.dev", "v1beta1", "StepAction"),
        "stepactions",
    );
    let api: Api<DynamicObject> =
        Api::namespaced_with(harness.client.clone(), &harness.ns.name, &step_actions);
    let action: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tekton.dev/v1beta1",
        "kind": "StepAction",
        "metadata": {"name": "say"},
        "spec": {"image": "busybox", "script": "#!/bin/sh\necho from the step action"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &action)
        .await
        .expect("create StepAction");
    let (events, _) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [
            {"name": "action", "ref": {"name": "say"}},
            step("after", "echo after"),
        ]})),
        &[
            ("action", "started"),
            ("action", "succeeded"),
            ("after", "started"),
            ("after", "succeeded"),
        ],
    )
    .await;
    assert_eq!(log_of(&events[1]), "from the step action\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_runs_beside_the_steps_and_gets_no_events() {
    let harness = Harness::start("sidecar", &[]).await;
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({
            // As PID 1 of its container the shell ignores SIGTERM unless
            // it traps it; without the trap, stopping it takes the whole
            // grace period, as on a real node.
            "sidecars": [{"name": "server", "image": "busybox",
                          "script": "#!/bin/sh\ntrap 'exit 0' TERM\necho serving\nwhile true; do sleep 1; done"}],
            "steps": [step("use", "#!/bin/sh\nsleep 1\necho used")],
        })),
        &[("use", "started"), ("use", "succeeded")],
    )
    .await;
    assert_eq!(log_of(&events[1]), "used\n");
    assert_eq!(succeeded_reason(&taskrun), "True/Succeeded");
    // Tekton stops the sidecar once the steps are done (it swaps in its nop
    // image), and reports it terminated after that.
    wait_for(
        "Tekton to report the sidecar stopped",
        EVENT_DEADLINE,
        || async {
            let taskrun = get_taskrun(&harness.client, &harness.ns.name, "tr").await;
            let sidecars = taskrun["status"]["sidecars"].as_array().cloned()?;
            sidecars
                .iter()
                .any(|s| s["name"] == "server" && s["terminated"].is_object())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_while_the_second_step_runs() {
    let harness = Harness::start("real-cancel", &[]).await;
    let uid = create_taskrun(
        &harness.client,
        &harness.ns.name,
        taskrun(json!({"steps": [
            step("first", "echo first"),
            step("long", "#!/bin/sh\necho waiting\nsleep 120"),
            step("after", "echo after"),
        ]})),
    )
    .await;
    harness.received.wait_for_count(&uid, 3).await;
    patch_taskrun(
        &harness.client,
        &harness.ns.name,
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
        &harness.client,
        &harness.ns,
        &uid,
        &harness.received,
        &harness.observer,
        &expected,
        "TaskRunCancelled",
    )
    .await;
    capture_fixture(&harness.client, &harness.ns.name, "tr", &harness.test).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oom_killed_step_fails_and_the_rest_skip() {
    let harness = Harness::start("oom", &[]).await;
    let mut manifest = taskrun(json!({"steps": [
        step("warm", "echo warm"),
        step("grow", "#!/bin/sh\necho growing\nsleep 60"),
        step("never", "echo never"),
    ]}));
    manifest["metadata"]["annotations"] = json!({OOM_KILL_ANNOTATION: "step-grow"});
    let (events, taskrun) = run_taskrun(
        &harness,
        manifest,
        &[
            ("warm", "started"),
            ("warm", "succeeded"),
            ("grow", "started"),
            ("grow", "failed"),
            ("never", "skipped"),
        ],
    )
    .await;
    let grow = data(&events[3]);
    assert_eq!(grow["stepState"]["terminated"]["reason"], "OOMKilled");
    assert_eq!(grow["stepState"]["terminated"]["exitCode"], 137);
    assert!(
        succeeded_reason(&taskrun).starts_with("False/"),
        "{taskrun}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn evicted_pod_fails_the_running_step_and_skips_the_rest() {
    let harness = Harness::start("evicted", &[]).await;
    let mut manifest = taskrun(json!({"steps": [
        step("work", "#!/bin/sh\necho working\nsleep 60"),
        step("after", "echo after"),
    ]}));
    manifest["metadata"]["annotations"] =
        json!({EVICT_ANNOTATION: "The node was low on resource: memory."});
    let (events, taskrun) = run_taskrun(
        &harness,
        manifest,
        &[
            ("work", "started"),
            ("work", "failed"),
            ("after", "skipped"),
        ],
    )
    .await;
    assert!(
        succeeded_reason(&taskrun).starts_with("False/"),
        "{taskrun}"
    );
    assert!(
        data(&events[1])["reason"].is_string(),
        "{:?}",
        data(&events[1])
    );
}

/// A step-level `when` that is false: Tekton's entrypoint skips that step
/// alone (exit 0, terminationReason Skipped) and the next step runs.
#[tokio::test(flavor = "multi_thread")]
async fn step_when_false_skips_that_step_alone() {
    let harness = Harness::start("step-when", &[]).await;
    let mut gated = step("gated", "echo never");
    gated["when"] = json!([{"input": "a", "operator": "in", "values": ["b"]}]);
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [step("first", "echo first"), gated, step("last", "echo last")]})),
        &[
            ("first", "started"),
            ("first", "succeeded"),
            ("gated", "skipped"),
            ("last", "started"),
            ("last", "succeeded"),
        ],
    )
    .await;
    assert_eq!(log_of(&events[4]), "last\n");
    assert_eq!(succeeded_reason(&taskrun), "True/Succeeded");
}

/// The first step's image cannot be pulled: no step ever started, so each
/// gets one `skipped` and no `started`.
#[tokio::test(flavor = "multi_thread")]
async fn image_pull_failure_on_the_first_step_skips_every_step() {
    let harness = Harness::start("image-pull", &[]).await;
    let mut pull = step("pull", "echo never");
    pull["image"] = json!("registry.invalid/tools:1");
    let (events, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [pull, step("after", "echo after")]})),
        &[("pull", "skipped"), ("after", "skipped")],
    )
    .await;
    assert_eq!(succeeded_reason(&taskrun), "False/TaskRunImagePullFailed");
    assert_eq!(data(&events[0])["reason"], "TaskRunImagePullFailed");
}

/// Cancelled while its pod is still Pending (unschedulable): no step ever
/// started.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_while_the_pod_is_pending_skips_every_step() {
    let harness = Harness::start("cancel-pending", &[]).await;
    let mut manifest = taskrun(json!({"steps": [step("a", "echo a"), step("b", "echo b")]}));
    manifest["spec"]["podTemplate"] = json!({"nodeSelector": {NO_SUCH_NODE_LABEL: "true"}});
    let uid = create_taskrun(&harness.client, &harness.ns.name, manifest).await;
    let pods: Api<Pod> = Api::namespaced(harness.client.clone(), &harness.ns.name);
    wait_for(
        "the TaskRun's pod to exist (Pending)",
        EVENT_DEADLINE,
        || async {
            let list = pods
                .list(&ListParams::default().labels("tekton.dev/taskRun=tr"))
                .await
                .ok()?;
            (!list.items.is_empty()).then_some(())
        },
    )
    .await;
    patch_taskrun(
        &harness.client,
        &harness.ns.name,
        "tr",
        json!({"spec": {"status": "TaskRunCancelled"}}),
    )
    .await;
    let expected = [("a", "skipped"), ("b", "skipped")];
    assert_run_ended(
        &harness.client,
        &harness.ns,
        &uid,
        &harness.received,
        &harness.observer,
        &expected,
        "TaskRunCancelled",
    )
    .await;
    capture_fixture(&harness.client, &harness.ns.name, "tr", &harness.test).await;
}

/// Creates PipelineRun `pr` running the one pipeline task `task`, and
/// waits for Tekton to create its TaskRun (`pr-<task name>`). Returns the
/// PipelineRun's uid and the TaskRun's.
async fn create_pipeline_run(harness: &Harness, task: Value) -> (String, String) {
    let pipeline_runs = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("tekton.dev", "v1", "PipelineRun"),
        "pipelineruns",
    );
    let api: Api<DynamicObject> =
        Api::namespaced_with(harness.client.clone(), &harness.ns.name, &pipeline_runs);
    let taskrun_name = format!(
        "pr-{}",
        task["name"].as_str().expect("a named pipeline task")
    );
    let run: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tekton.dev/v1",
        "kind": "PipelineRun",
        "metadata": {"name": "pr"},
        "spec": {"pipelineSpec": {"tasks": [task]}},
    }))
    .unwrap();
    let created = api
        .create(&PostParams::default(), &run)
        .await
        .expect("create PipelineRun");
    let pipeline_run_uid = created.metadata.uid.expect("a uid");
    let uid = wait_for("the PipelineRun's TaskRun", EVENT_DEADLINE, || async {
        let tr = get_taskrun_opt(&harness.client, &harness.ns.name, &taskrun_name).await?;
        tr["metadata"]["uid"].as_str().map(str::to_owned)
    })
    .await;
    (pipeline_run_uid, uid)
}

/// A PipelineTask with `retries: 2` that fails twice, then succeeds: Tekton
/// retries the TaskRun in place, and every attempt's step gets its events.
#[tokio::test(flavor = "multi_thread")]
async fn retries_give_every_attempt_its_own_events() {
    let harness = Harness::start("retries", &[]).await;
    let (_, uid) = create_pipeline_run(
        &harness,
        json!({
            "name": "build",
            "retries": 2,
            "taskSpec": {"steps": [step(
                "compile",
                "#!/bin/sh\necho attempt $(context.task.retry-count)\ntest $(context.task.retry-count) -ge 2",
            )]},
        }),
    )
    .await;
    let expected = [
        ("compile", "started"),
        ("compile", "failed"),
        ("compile", "started"),
        ("compile", "failed"),
        ("compile", "started"),
        ("compile", "succeeded"),
    ];
    let events = harness.received.wait_for_count(&uid, expected.len()).await;
    assert_eq!(
        summary(&events),
        expect(&expected),
        "{}",
        harness.observer.log_text()
    );
    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let want: Vec<String> = [
        "started",
        "failed",
        "started-attempt-1",
        "failed-attempt-1",
        "started-attempt-2",
        "succeeded-attempt-2",
    ]
    .iter()
    .map(|suffix| {
        let (kind, attempt) = suffix.split_once('-').unwrap_or((suffix, ""));
        let ty = format!("{PREFIX}.{kind}.v1");
        if attempt.is_empty() {
            format!("{uid}-compile-{ty}")
        } else {
            format!("{uid}-compile-{ty}-{attempt}")
        }
    })
    .collect();
    assert_eq!(ids, want);
    let mut pods = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let attempt = index / 2;
        assert_eq!(data(event)["attempt"], attempt, "{index}");
        assert_eq!(
            event.extension("attempt").map(|v| v.to_string()),
            Some(attempt.to_string())
        );
        let sequence: usize = event
            .extension("sequence")
            .map(|v| v.to_string())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        assert_eq!(
            sequence,
            index + 1,
            "sequence keeps increasing across attempts"
        );
        if index % 2 == 1 {
            // Each attempt's terminal event carries that attempt's own pod
            // and log.
            assert_eq!(log_of(event), format!("attempt {attempt}\n"));
            let pod = data(event)["podRef"]["name"].as_str().map(str::to_owned);
            assert!(pod.is_some(), "{index}: {:?}", data(event));
            pods.push(pod);
        }
    }
    pods.dedup();
    assert_eq!(pods.len(), 3, "one pod per attempt: {pods:?}");
    let taskrun = wait_for_ledger(
        &harness.client,
        &harness.ns.name,
        "pr-build",
        expected.len(),
    )
    .await;
    assert_eq!(
        harness.received.for_taskrun(&uid).len(),
        expected.len(),
        "no event arrives twice; ledger: {:?}",
        ledger_of(&taskrun)
    );
    capture_fixture(&harness.client, &harness.ns.name, "pr-build", &harness.test).await;
}

/// `step_transitions_total` counts each settled transition once, and
/// `step_duration_seconds` observes each step that ran to its end, with
/// Tekton's own startedAt to finishedAt, by outcome and (asked for) by the
/// TaskRun's namespace.
#[tokio::test(flavor = "multi_thread")]
async fn step_metrics_count_transitions_and_time_steps_as_tekton_reports_them() {
    let harness = Harness::start("step-metrics", &["--step-metrics-by-namespace"]).await;
    let (_, taskrun) = run_taskrun(
        &harness,
        taskrun(json!({"steps": [
            step("nap", "#!/bin/sh\nsleep 2\necho rested"),
            step("fail", "#!/bin/sh\nexit 5"),
            step("after", "echo never"),
        ]})),
        &[
            ("nap", "started"),
            ("nap", "succeeded"),
            ("fail", "started"),
            ("fail", "failed"),
            ("after", "skipped"),
        ],
    )
    .await;
    let ran = |index: usize| {
        let terminated = &taskrun["status"]["steps"][index]["terminated"];
        let at = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(terminated[field].as_str().expect(field))
                .expect("an RFC 3339 time")
        };
        (at("finishedAt") - at("startedAt")).as_seconds_f64()
    };
    let metrics = harness.observer.metrics_text().await;
    for (kind, count) in [
        ("started", 2.0),
        ("succeeded", 1.0),
        ("failed", 1.0),
        ("skipped", 1.0),
    ] {
        let name = format!(r#"tekton_step_observer_step_transitions_total{{type="{kind}"}}"#);
        assert_eq!(
            series(&metrics, &name),
            Some(count),
            "{name} in:\n{metrics}"
        );
    }
    let ns = &harness.ns.name;
    for (outcome, index) in [("succeeded", 0), ("failed", 1)] {
        let labels = format!(r#"{{outcome="{outcome}",taskrun_namespace="{ns}"}}"#);
        let count = format!("tekton_step_observer_step_duration_seconds_count{labels}");
        let sum = format!("tekton_step_observer_step_duration_seconds_sum{labels}");
        assert_eq!(
            series(&metrics, &count),
            Some(1.0),
            "{count} in:\n{metrics}"
        );
        assert_eq!(
            series(&metrics, &sum),
            Some(ran(index)),
            "{sum} in:\n{metrics}"
        );
    }
    assert!(ran(0) >= 2.0, "the nap step slept 2 s: {}", ran(0));
    // Skipped steps never ran: no duration, and no series without the namespace.
    assert!(
        !metrics.contains(r#"step_duration_seconds_count{outcome="skipped""#),
        "{metrics}"
    );
}

/// The CDEvents type of the event for a step transition of `kind`.
fn cd_type(kind: &str) -> String {
    let predicate = if kind == "started" {
        "started"
    } else {
        "finished"
    };
    format!("dev.cdeventsx.tekton-steprun.{predicate}.0.1.0")
}

/// Each event's type and subject, in arrival order.
fn types_and_subjects(events: &[cloudevents::Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.ty().to_owned(),
                e.subject().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// What `--event-format both` sends for `transitions` of TaskRun `uid`, in
/// order: each transition's native event (subject the step), then its
/// CDEvent (subject the step run).
fn both_formats_expected(uid: &str, transitions: &[(&str, &str)]) -> Vec<(String, String)> {
    transitions
        .iter()
        .flat_map(|(step, kind)| {
            [
                (format!("{PREFIX}.{kind}.v1"), step.to_string()),
                (cd_type(kind), format!("{uid}/{step}")),
            ]
        })
        .collect()
}

/// Where the CDEvents schemas are published (the default `--dataschema-base`).
const SCHEMA_BASE: &str =
    "https://raw.githubusercontent.com/tekton-step-observer/tekton-step-observer/main/schema/";

/// `--event-format both` on a PipelineRun's TaskRun whose steps succeed,
/// fail and get skipped: each transition goes out twice, native then
/// CDEvents, each is recorded in the ledger under its own type, no event
/// arrives twice, and the CDEvents identify the step run, link to the
/// TaskRun and PipelineRun (chainId is the PipelineRun's uid), and pass the
/// CDEvents Go SDK's parser and validator (hack/cdevents-validate) with our
/// schemas.
#[tokio::test(flavor = "multi_thread")]
async fn both_formats_are_owed_delivered_recorded_and_cdevents_validate() {
    let harness = Harness::start("cdevents", &["--event-format", "both"]).await;
    let (pipeline_run_uid, uid) = create_pipeline_run(
        &harness,
        json!({
            "name": "build",
            "taskSpec": {"steps": [
                step("ok", "#!/bin/sh\necho fine"),
                step("fail", "#!/bin/sh\necho broken\nexit 3"),
                step("after", "echo never"),
            ]},
        }),
    )
    .await;
    let transitions = [
        ("ok", "started"),
        ("ok", "succeeded"),
        ("fail", "started"),
        ("fail", "failed"),
        ("after", "skipped"),
    ];
    let events = harness
        .received
        .wait_for_count(&uid, 2 * transitions.len())
        .await;
    assert_eq!(
        types_and_subjects(&events),
        both_formats_expected(&uid, &transitions),
        "observer log:\n{}",
        harness.observer.log_text()
    );
    let (native, cdevents): (Vec<_>, Vec<_>) = events
        .iter()
        .cloned()
        .partition(|e| e.ty().starts_with(PREFIX));
    assert_events_well_formed(&native, &uid, &harness.ns.name, "pr-build");

    let source = format!(
        "/apis/tekton.dev/v1/namespaces/{}/taskruns/pr-build",
        harness.ns.name
    );
    let mut lines = String::new();
    for (event, (step, kind)) in cdevents.iter().zip(transitions) {
        let doc = data(event);
        let context = &doc["context"];
        assert_eq!(
            context["id"],
            event.id(),
            "the CloudEvent id is the CDEvent's"
        );
        assert_eq!(event.id(), format!("{uid}-{step}-{}", cd_type(kind)));
        assert_eq!(context["source"], source);
        assert_eq!(event.source().as_str(), source);
        assert_eq!(context["chainId"], pipeline_run_uid.as_str());
        let links = context["links"].as_array().expect("links");
        let related = |link_kind: &str| {
            links
                .iter()
                .find(|l| l["linkKind"] == link_kind)
                .map(|l| l["target"]["contextId"].clone())
        };
        assert_eq!(related("taskRun"), Some(json!(uid)), "{doc}");
        assert_eq!(
            related("pipelineRun"),
            Some(json!(pipeline_run_uid)),
            "{doc}"
        );
        let content = &doc["subject"]["content"];
        assert_eq!(content["stepName"], step);
        assert_eq!(content["pipelineTask"], "build");
        assert_eq!(
            event.extension("sequence").map(|v| v.to_string()),
            Some(content["sequence"].to_string())
        );
        match (step, kind) {
            (_, "started") => assert!(content.get("outcome").is_none(), "{doc}"),
            ("ok", _) => {
                assert_eq!(content["outcome"], "success");
                assert_eq!(content["exitCode"], 0);
                assert_eq!(content["log"], "fine\n");
            }
            ("fail", _) => {
                assert_eq!(content["outcome"], "failure");
                assert_eq!(content["exitCode"], 3);
                assert_eq!(content["log"], "broken\n");
            }
            _ => {
                assert_eq!(content["outcome"], "cancel");
                assert_eq!(content["skipped"], true);
                assert!(content.get("exitCode").is_none(), "{doc}");
            }
        }
        lines.push_str(&doc.to_string());
        lines.push('\n');
    }

    // The independent check: the CDEvents Go SDK parses and validates each
    // one, with the spec's schema and ours by schemaUri.
    let mut validate = std::process::Command::new("cdevents-validate");
    for predicate in ["started", "finished"] {
        let file = format!("cdevents/tekton-steprun.{predicate}.0.1.0.json");
        validate.arg("-schema").arg(format!(
            "{SCHEMA_BASE}{file}={}/schema/{file}",
            env!("CARGO_MANIFEST_DIR")
        ));
    }
    let mut child = validate
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cdevents-validate (hack/build) is on the PATH of hack/cluster exec");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    let verdict = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&verdict.stdout);
    assert!(verdict.status.success(), "the Go SDK says:\n{report}");
    assert_eq!(
        report.lines().filter(|l| l.starts_with("valid ")).count(),
        5,
        "{report}"
    );

    // Both kinds are in the ledger, each under its own type.
    let taskrun = wait_for_ledger(
        &harness.client,
        &harness.ns.name,
        "pr-build",
        2 * transitions.len(),
    )
    .await;
    let ledger = ledger_of(&taskrun).expect("a ledger");
    for (step, kind) in transitions {
        let entry = ledger["statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == step)
            .unwrap_or_else(|| panic!("{step} in {ledger}"));
        for ty in [format!("{PREFIX}.{kind}.v1"), cd_type(kind)] {
            assert!(
                entry["emitted"]
                    .as_array()
                    .is_some_and(|e| e.contains(&json!(ty))),
                "{ty} of {step} in {ledger}"
            );
        }
    }
    assert_eq!(
        harness.received.for_taskrun(&uid).len(),
        2 * transitions.len(),
        "no event arrives twice"
    );
    capture_fixture(&harness.client, &harness.ns.name, "pr-build", &harness.test).await;
}

/// CDEvents keep the native events' guarantees through a sink outage: with
/// `--event-format both` and the sink answering 503, nothing is lost or
/// recorded; once it answers again every event of both kinds arrives, in
/// order (native first per transition), each once, and the ledger records
/// them all.
#[tokio::test(flavor = "multi_thread")]
async fn both_formats_ride_out_a_sink_outage_in_order_and_once() {
    use std::sync::atomic::Ordering;
    let harness = Harness::start("cdevents-outage", &["--event-format", "both"]).await;
    harness.received.fail_with.store(503, Ordering::SeqCst);
    let uid = create_taskrun(
        &harness.client,
        &harness.ns.name,
        taskrun(json!({"steps": [
            step("first", "#!/bin/sh\necho one"),
            step("second", "#!/bin/sh\nexit 2"),
        ]})),
    )
    .await;
    wait_finished(&harness.client, &harness.ns.name, "tr").await;
    wait_for(
        "retries against the failing sink",
        EVENT_DEADLINE,
        || async {
            let metrics = harness.observer.metrics_text().await;
            series(
                &metrics,
                r#"tekton_step_observer_delivery_retries_total{reason="server_error"}"#,
            )
            .filter(|retries| *retries >= 2.0)
        },
    )
    .await;
    let during = get_taskrun(&harness.client, &harness.ns.name, "tr").await;
    assert!(
        ledger_of(&during).is_none_or(|l| l["statuses"].as_array().is_none_or(|s| s
            .iter()
            .all(|e| e["emitted"].as_array().is_none_or(Vec::is_empty)))),
        "nothing recorded while the sink refuses: {:?}",
        ledger_of(&during)
    );
    harness.received.fail_with.store(0, Ordering::SeqCst);
    let transitions = [
        ("first", "started"),
        ("first", "succeeded"),
        ("second", "started"),
        ("second", "failed"),
    ];
    let events = harness
        .received
        .wait_for_count(&uid, 2 * transitions.len())
        .await;
    assert_eq!(
        types_and_subjects(&events),
        both_formats_expected(&uid, &transitions),
        "observer log:\n{}",
        harness.observer.log_text()
    );
    wait_for_ledger(
        &harness.client,
        &harness.ns.name,
        "tr",
        2 * transitions.len(),
    )
    .await;
    assert_eq!(
        harness.received.for_taskrun(&uid).len(),
        2 * transitions.len(),
        "no event arrives twice"
    );
}
