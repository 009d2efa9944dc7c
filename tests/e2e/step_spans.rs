//! Step spans end to end: the observer exports them with OTLP to a real
//! Jaeger (v2, built by hack/build, on loopback ports of its own), and the
//! test reads them back from Jaeger's query API: their parents, their times
//! against the steps' `startedAt` / `finishedAt`, their attributes, the
//! `traceparent` of the events, and that a restart exports nothing again.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloudevents::AttributesReader;
use serde_json::{Value, json};

use crate::support::*;
use crate::{Harness, PREFIX, wait_for_ledger};

/// A Jaeger all-in-one with in-memory storage; killed when dropped.
struct Jaeger {
    child: Child,
    otlp: SocketAddr,
    query: SocketAddr,
}

impl Jaeger {
    async fn start(test: &str) -> Self {
        Self::start_at(test, loopback_port()).await
    }

    /// As [`Jaeger::start`], receiving OTLP at `otlp`.
    async fn start_at(test: &str, otlp: SocketAddr) -> Self {
        let (query, grpc) = (loopback_port(), loopback_port());
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join(format!("{test}-jaeger.yaml"));
        std::fs::write(
            &config,
            format!(
                r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {query}
    grpc:
      endpoint: {grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: {otlp}
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{test}-jaeger.log"))).unwrap();
        let child = Command::new("jaeger")
            .arg("--config")
            .arg(format!("file:{}", config.display()))
            // Jaeger's own traces would go to the default OTLP port.
            .env("OTEL_TRACES_EXPORTER", "none")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("jaeger (hack/build) is on the PATH of hack/cluster exec");
        let jaeger = Jaeger { child, otlp, query };
        wait_for("Jaeger's query API", Duration::from_secs(60), || async {
            reqwest::get(format!("http://{}/api/services", jaeger.query))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await;
        jaeger
    }

    /// The trace's spans, by operation name, once it holds `count`.
    async fn wait_for_spans(&self, trace_id: &str, count: usize) -> Vec<Value> {
        wait_for(
            &format!("{count} spans in trace {trace_id}"),
            EVENT_DEADLINE,
            || async { Some(self.spans(trace_id).await).filter(|s| s.len() >= count) },
        )
        .await
    }

    /// The trace's spans as Jaeger's query API gives them (none if absent).
    async fn spans(&self, trace_id: &str) -> Vec<Value> {
        let Ok(response) =
            reqwest::get(format!("http://{}/api/traces/{trace_id}", self.query)).await
        else {
            return Vec::new();
        };
        let body: Value = response.json().await.unwrap_or_default();
        let mut spans: Vec<Value> = body["data"][0]["spans"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        spans.sort_by_key(|s| s["startTime"].as_i64());
        for span in &mut spans {
            let process = &body["data"][0]["processes"][span["processID"].as_str().unwrap_or("")];
            span["serviceName"] = process["serviceName"].clone();
        }
        spans
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loopback_port() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// A span's tag value.
fn tag(span: &Value, key: &str) -> Value {
    span["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["key"] == key)
        .map(|t| t["value"].clone())
        .unwrap_or(Value::Null)
}

/// Microseconds since the epoch of an RFC 3339 time.
fn micros(text: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text.as_str().expect("a time"))
        .expect("RFC 3339")
        .timestamp_micros()
}

fn step(name: &str, script: &str) -> Value {
    json!({"name": name, "image": "busybox", "script": script})
}

/// A TaskRun of steps that succeed, fail and get skipped gets one span per
/// step that ran, at Tekton's times, in a trace of its own (the TaskRun's
/// uid); one whose parent Tekton knows (`tekton.dev/taskrunSpanContext`,
/// copied to `status.spanContext`) gets them under that parent. Each event
/// carries its step's span as `traceparent`, the ledger records the spans
/// exported, and a restarted observer exports none of them again.
#[tokio::test(flavor = "multi_thread")]
async fn step_spans_reach_jaeger_at_tektons_times_under_the_right_parent_once() {
    let test = "tracing";
    let jaeger = Jaeger::start(test).await;
    let client = client().await;
    let ns = TestNamespace::create(&client, test).await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let endpoint = format!("http://{}", jaeger.otlp);
    let observer = Observer::start_with_env(
        test,
        &["--namespace", &ns.name, "--sink", &sink],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    )
    .await;
    let mut harness = Harness {
        test: test.to_owned(),
        client,
        ns,
        received,
        observer,
    };
    let steps = json!([
        step("nap", "#!/bin/sh\nsleep 1\necho rested"),
        step("fail", "#!/bin/sh\nexit 4"),
        step("after", "echo never"),
    ]);
    let tekton_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let manifest = |name: &str, annotations: Value| {
        json!({
            "apiVersion": "tekton.dev/v1",
            "kind": "TaskRun",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"taskSpec": {"steps": steps}},
        })
    };
    let own_uid = create_taskrun(
        &harness.client,
        &harness.ns.name,
        manifest("own", json!({})),
    )
    .await;
    let child_uid = create_taskrun(
        &harness.client,
        &harness.ns.name,
        manifest(
            "child",
            json!({"tekton.dev/taskrunSpanContext": json!({"traceparent": tekton_parent}).to_string()}),
        ),
    )
    .await;

    let own_trace: String = own_uid.chars().filter(|c| *c != '-').collect();
    for (name, uid, trace_id, parent) in [
        ("own", &own_uid, own_trace.as_str(), None),
        (
            "child",
            &child_uid,
            "4bf92f3577b34da6a3ce929d0e0e4736",
            Some("00f067aa0ba902b7"),
        ),
    ] {
        let events = harness.received.wait_for_count(uid, 5).await;
        let taskrun = wait_finished(&harness.client, &harness.ns.name, name).await;
        if parent.is_some() {
            assert_eq!(
                taskrun["status"]["spanContext"]["traceparent"], tekton_parent,
                "Tekton keeps the parent on the status"
            );
        }
        let spans = jaeger.wait_for_spans(trace_id, 2).await;
        // Kept beside the logs: what Jaeger holds, for a look at the trace.
        let dump = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("e2e-logs")
            .join(format!("{test}-{name}-trace.json"));
        std::fs::write(dump, serde_json::to_string_pretty(&spans).unwrap()).unwrap();
        let names: Vec<&str> = spans
            .iter()
            .filter_map(|s| s["operationName"].as_str())
            .collect();
        assert_eq!(
            names,
            ["step nap", "step fail"],
            "no span for the skipped step: {spans:#?}"
        );
        for (index, span) in spans.iter().enumerate() {
            let state = &taskrun["status"]["steps"][index]["terminated"];
            assert_eq!(
                span["startTime"].as_i64(),
                Some(micros(&state["startedAt"])),
                "{name} {index}"
            );
            assert_eq!(
                span["duration"].as_i64(),
                Some(micros(&state["finishedAt"]) - micros(&state["startedAt"])),
                "{name} {index}"
            );
            assert_eq!(span["serviceName"], "tekton-step-observer");
            assert_eq!(tag(span, "tekton.taskrun.attempt"), json!(0));
            assert_eq!(tag(span, "tekton.taskrun.uid"), json!(uid));
            assert_eq!(tag(span, "tekton.step.exit_code"), state["exitCode"]);
            let references = span["references"].as_array().cloned().unwrap_or_default();
            match parent {
                None => assert!(references.is_empty(), "a root span: {span}"),
                Some(parent) => {
                    assert_eq!(references.len(), 1, "{span}");
                    assert_eq!(references[0]["refType"], "CHILD_OF");
                    assert_eq!(references[0]["spanID"], parent);
                }
            }
            // Both of the step's events point at its span.
            let step_name = if index == 0 { "nap" } else { "fail" };
            let want = format!("00-{trace_id}-{}-01", span["spanID"].as_str().unwrap());
            for event in events.iter().filter(|e| e.subject() == Some(step_name)) {
                assert_eq!(
                    event.extension("traceparent").map(ToString::to_string),
                    Some(want.clone()),
                    "{}",
                    event.ty()
                );
            }
        }
        assert_eq!(tag(&spans[0], "tekton.step.outcome"), json!("succeeded"));
        assert!(
            spans[0]["duration"].as_i64() >= Some(1_000_000),
            "nap slept 1 s"
        );
        assert_eq!(tag(&spans[1], "tekton.step.outcome"), json!("failed"));
        assert_eq!(tag(&spans[1], "otel.status_code"), json!("ERROR"));
        assert_eq!(
            tag(&spans[1], "tekton.step.termination_reason"),
            json!("Error")
        );
        assert!(
            events.iter().all(|e| e.ty().starts_with(PREFIX)),
            "native events only"
        );
    }

    // The ledger records each span exported, once per step that ran.
    for name in ["own", "child"] {
        let taskrun = wait_for_ledger(&harness.client, &harness.ns.name, name, 5).await;
        let ledger = wait_for("the spans in the ledger", EVENT_DEADLINE, || async {
            let taskrun = get_taskrun(&harness.client, &harness.ns.name, name).await;
            let ledger = ledger_of(&taskrun)?;
            let exported = ledger["statuses"]
                .as_array()?
                .iter()
                .filter(|s| s["span"] == "exported")
                .count();
            (exported == 2).then_some(ledger)
        })
        .await;
        let after = ledger["statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "after")
            .cloned()
            .unwrap_or_default();
        assert!(after.get("span").is_none(), "{name}: {ledger} ({taskrun})");
    }
    let metrics = harness.observer.metrics_text().await;
    assert_eq!(
        series(&metrics, "tekton_step_observer_step_spans_exported_total"),
        Some(4.0),
        "{metrics}"
    );

    // A restart finds every span recorded and exports none again.
    harness.observer.kill();
    harness.observer.restart().await;
    wait_for("the restarted observer's sync", EVENT_DEADLINE, || async {
        (harness.observer.readyz().await.0 == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = harness.observer.metrics_text().await;
    assert_eq!(
        series(&metrics, "tekton_step_observer_step_spans_exported_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(jaeger.spans(&own_trace).await.len(), 2, "no span twice");
    assert_eq!(
        harness.received.for_taskrun(&own_uid).len(),
        5,
        "no event twice"
    );
}

/// An OTLP endpoint that is down when the steps end: the export fails, is
/// counted and retried, and once the endpoint is up the spans arrive, each
/// once, while the events went out on time regardless.
#[tokio::test(flavor = "multi_thread")]
async fn spans_wait_for_an_otlp_endpoint_that_is_down_and_arrive_once() {
    let test = "tracing-down";
    let otlp = loopback_port();
    let endpoint = format!("http://{otlp}");
    let client = client().await;
    let ns = TestNamespace::create(&client, test).await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let observer = Observer::start_with_env(
        test,
        &["--namespace", &ns.name, "--sink", &sink],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    )
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        json!({
            "apiVersion": "tekton.dev/v1",
            "kind": "TaskRun",
            "metadata": {"name": "tr"},
            "spec": {"taskSpec": {"steps": [step("only", "echo done")]}},
        }),
    )
    .await;
    received.wait_for_count(&uid, 2).await;
    wait_for("a failed span export", EVENT_DEADLINE, || async {
        let metrics = observer.metrics_text().await;
        series(
            &metrics,
            "tekton_step_observer_step_span_export_errors_total",
        )
        .filter(|errors| *errors > 0.0)
    })
    .await;
    let taskrun = get_taskrun(&client, &ns.name, "tr").await;
    let ledger = ledger_of(&taskrun).expect("a ledger");
    assert_eq!(ledger["statuses"][0]["span"], "owed", "{ledger}");

    let jaeger = Jaeger::start_at(test, otlp).await;
    let trace_id: String = uid.chars().filter(|c| *c != '-').collect();
    let spans = jaeger.wait_for_spans(&trace_id, 1).await;
    assert_eq!(spans[0]["operationName"], "step only");
    wait_for("the span recorded exported", EVENT_DEADLINE, || async {
        let taskrun = get_taskrun(&client, &ns.name, "tr").await;
        (ledger_of(&taskrun)?["statuses"][0]["span"] == "exported").then_some(())
    })
    .await;
    // Retried until taken, then never again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(jaeger.spans(&trace_id).await.len(), 1, "the span once");
    let metrics = observer.metrics_text().await;
    assert_eq!(
        series(&metrics, "tekton_step_observer_step_spans_exported_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(received.for_taskrun(&uid).len(), 2, "no event twice");
}
