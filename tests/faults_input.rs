#[allow(dead_code, reason = "shared by several test crates")]
#[path = "e2e/support.rs"]
mod support;

// Fault tests, bad input: hostile ledger annotations, unusable sinks, sinks
// that refuse or garble, a 100 MB step log, 200 steps (more than Tekton
// can put in one pod) and 150 (about the most it can), a pod deleted before
// its logs were read. Each fault must be answered by a clear log line, a
// Warning Event on the TaskRun or a metric, and never by a crash: the
// observer stays alive, /healthz answers 200, and other TaskRuns keep
// delivering. Run through `hack/e2e` (real cluster, real observer binary).
//
// Not here: a TaskRun whose `status.steps` disagree with its spec. Tekton's
// controller owns the status and never writes such a one for long enough
// to observe, so an end-to-end test would have to forge the status; the
// decision is covered by `mismatched_status_waits` and `renamed_step_waits`
// in src/steps_tests.rs instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use cloudevents::{AttributesReader, Event};
use futures::AsyncReadExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PREFIX: &str = "dev.tekton.event.plugin.step";
const LEDGER_KEY: &str = "tekton.plugin.step-observer/result";
/// The API server's cap on all annotations of one object, keys included
/// (apimachinery's `TotalAnnotationSizeLimitB`).
const ANNOTATIONS_LIMIT: usize = 256 * 1024;
/// The observer's default `--log-limit-bytes`.
const LOG_LIMIT: usize = 64 * 1024;

// ---- small helpers -----------------------------------------------------------

fn event_type(kind: &str) -> String {
    format!("{PREFIX}.{kind}.v1")
}

/// `manifest` with the ledger annotation set at creation time.
fn with_ledger(mut manifest: Value, annotation: &str) -> Value {
    manifest["metadata"]["annotations"] = json!({ LEDGER_KEY: annotation });
    manifest
}

/// The TaskRun's ledger, when the annotation is there and is a well-formed
/// ledger: step → (emitted types, rejected types), sorted.
type LedgerMap = BTreeMap<String, (Vec<String>, Vec<String>)>;

fn valid_ledger(taskrun: &Value) -> Option<LedgerMap> {
    let text = taskrun["metadata"]["annotations"][LEDGER_KEY].as_str()?;
    let json: Value = serde_json::from_str(text).ok()?;
    let mut map = LedgerMap::new();
    for step in json.as_object()?.get("statuses")?.as_array()? {
        let list = |key: &str| -> Option<Vec<String>> {
            let mut types: Vec<String> = match step.get(key) {
                None => Vec::new(),
                Some(v) => v
                    .as_array()?
                    .iter()
                    .map(|t| t.as_str().map(str::to_owned))
                    .collect::<Option<_>>()?,
            };
            types.sort();
            Some(types)
        };
        let name = step.get("name")?.as_str()?.to_owned();
        if map
            .insert(name, (list("emitted")?, list("rejected")?))
            .is_some()
        {
            return None; // a step twice is not a ledger the observer writes
        }
    }
    Some(map)
}

/// The ledger expected: `(step, emitted kinds, rejected kinds)`.
fn ledger(entries: &[(&str, &[&str], &[&str])]) -> LedgerMap {
    entries
        .iter()
        .map(|(step, emitted, rejected)| {
            let types = |kinds: &[&str]| {
                let mut t: Vec<String> = kinds.iter().map(|k| event_type(k)).collect();
                t.sort();
                t
            };
            ((*step).to_owned(), (types(emitted), types(rejected)))
        })
        .collect()
}

/// Waits until the TaskRun's annotation is a well-formed ledger equal to
/// `want`; returns the TaskRun.
async fn wait_for_exact_ledger(
    client: &Client,
    ns: &str,
    name: &str,
    want: &LedgerMap,
    deadline: Duration,
    observer: &Observer,
) -> Value {
    let last = Mutex::new(None);
    let found = try_wait_for(deadline, || {
        let last = &last;
        async move {
            let taskrun = get_taskrun(client, ns, name).await;
            let annotation = taskrun["metadata"]["annotations"][LEDGER_KEY]
                .as_str()
                .map(|s| s.chars().take(300).collect::<String>());
            *last.lock().unwrap() = Some(annotation);
            (valid_ledger(&taskrun).as_ref() == Some(want)).then_some(taskrun)
        }
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "TaskRun {ns}/{name}: the ledger never became {want:?}; last annotation (start): {:?}\nobserver log (end):\n{}",
            last.lock().unwrap(),
            tail(&observer.log_text(), 6000)
        )
    })
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Every event carries its deterministic id `<uid>-<step>-<type>`.
fn assert_deterministic_ids(events: &[Event], uid: &str) {
    for event in events {
        let step = event.subject().expect("subject is the step");
        assert_eq!(
            event.id(),
            format!("{uid}-{step}-{}", event.ty()),
            "deterministic id"
        );
    }
}

/// A sample's value in the observer's /metrics text (`series` with labels as
/// rendered, e.g. `tekton_step_observer_events_total{type="started",outcome="rejected"}`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

async fn metric_now(observer: &Observer, series: &str) -> f64 {
    let text = observer.metrics_text().await;
    metric(&text, series).unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

/// The observer still runs and answers /healthz with 200.
async fn assert_alive(observer: &mut Observer) {
    assert!(
        observer.is_running(),
        "the observer exited; log:\n{}",
        tail(&observer.log_text(), 6000)
    );
    let status = reqwest::get(format!("http://{}/healthz", observer.metrics))
        .await
        .expect("healthz")
        .status();
    assert_eq!(status, 200, "/healthz");
}

/// Waits until the observer's log contains `needle`; returns the line.
async fn wait_for_log_line(observer: &Observer, needle: &str) -> String {
    let found = try_wait_for(EVENT_DEADLINE, || async {
        observer
            .log_text()
            .lines()
            .find(|line| line.contains(needle))
            .map(str::to_owned)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "no log line with {needle:?}; log:\n{}",
            tail(&observer.log_text(), 6000)
        )
    })
}

/// Warning Events (events.k8s.io/v1) about the object `uid` with `reason`.
async fn warnings(
    client: &Client,
    ns: &str,
    uid: &str,
    reason: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events.k8s.io")
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid)
        })
        .collect()
}

/// Waits for at least `count` such Warning Events; returns their notes.
async fn wait_for_warnings(
    client: &Client,
    ns: &str,
    uid: &str,
    reason: &str,
    count: usize,
) -> Vec<String> {
    wait_for(
        &format!("{count} Warning Event(s) {reason} on {uid}"),
        EVENT_DEADLINE,
        || async {
            let found = warnings(client, ns, uid, reason).await;
            (found.len() >= count).then(|| found.into_iter().filter_map(|e| e.note).collect())
        },
    )
    .await
}

/// A control TaskRun of one step in `ns`: other TaskRuns keep delivering.
async fn control_delivers(client: &Client, ns: &str, name: &str, received: &Received) {
    let uid = create_taskrun(
        client,
        ns,
        taskrun_manifest("v1", name, &[ok("only")], None),
    )
    .await;
    let events = received.wait_for_count(&uid, 2).await;
    assert_eq!(
        summary(&events),
        expect(&[("only", "started"), ("only", "succeeded")])
    );
}

/// The VmHWM (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("faults-input")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- a sink whose answers the test scripts -------------------------------------

/// Decides the answer to one request: `(event, earlier attempts with its id)`
/// → `(status, body)`.
type Policy = dyn Fn(&Event, usize) -> (u16, String) + Send + Sync;

/// A CloudEvents receiver that records every attempt and answers as its
/// policy says.
#[derive(Clone)]
struct ScriptedSink {
    attempts: Arc<Mutex<Vec<(Event, u16)>>>,
    policy: Arc<Policy>,
}

async fn scripted(State(sink): State<ScriptedSink>, event: Event) -> (StatusCode, String) {
    let mut attempts = sink.attempts.lock().unwrap();
    let earlier = attempts
        .iter()
        .filter(|(e, _)| e.id() == event.id())
        .count();
    let (status, body) = (sink.policy)(&event, earlier);
    attempts.push((event, status));
    (StatusCode::from_u16(status).unwrap(), body)
}

impl ScriptedSink {
    async fn start(
        policy: impl Fn(&Event, usize) -> (u16, String) + Send + Sync + 'static,
    ) -> (SocketAddr, Self) {
        let sink = ScriptedSink {
            attempts: Arc::default(),
            policy: Arc::new(policy),
        };
        let app = axum::Router::new()
            .route("/", axum::routing::post(scripted))
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, sink)
    }

    /// `(event, status answered)` of every attempt about one TaskRun.
    fn attempts_for(&self, uid: &str) -> Vec<(Event, u16)> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| {
                e.extension("taskrunuid")
                    .is_some_and(|v| v.to_string() == uid)
            })
            .cloned()
            .collect()
    }

    /// Statuses answered per event id, in order of first attempt.
    fn answers_by_id(&self, uid: &str) -> Vec<(String, Vec<u16>)> {
        let mut by_id: Vec<(String, Vec<u16>)> = Vec::new();
        for (event, status) in self.attempts_for(uid) {
            match by_id.iter_mut().find(|(id, _)| id == event.id()) {
                Some((_, statuses)) => statuses.push(status),
                None => by_id.push((event.id().to_owned(), vec![status])),
            }
        }
        by_id
    }

    /// Events about one TaskRun the sink took (2xx), in arrival order.
    fn accepted_for(&self, uid: &str) -> Vec<Event> {
        self.attempts_for(uid)
            .into_iter()
            .filter(|(_, status)| (200..300).contains(status))
            .map(|(e, _)| e)
            .collect()
    }

    async fn wait_accepted(&self, uid: &str, count: usize) -> Vec<Event> {
        wait_for(
            &format!("{count} accepted events for {uid}"),
            EVENT_DEADLINE,
            || async {
                let events = self.accepted_for(uid);
                (events.len() >= count).then_some(events)
            },
        )
        .await
    }
}

fn taskrun_of(event: &Event) -> String {
    event
        .extension("taskrun")
        .map(|v| v.to_string())
        .unwrap_or_default()
}

// ---- malformed and hostile ledgers ---------------------------------------------

/// Invalid ledgers, pre-set at creation: each is reported (Warning Event
/// `LedgerMalformed`, `ledger_malformed_total`, a log line), treated as empty
/// (its events go out again, with their deterministic ids) and rewritten to
/// a valid ledger.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_ledger_is_reported_and_rewritten() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-malformed").await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-malformed-ledger",
        &["--namespace", &ns.name, "--sink", &sink],
        None,
    )
    .await;
    let truncated = format!(r#"{{"statuses":[{{"name":"a","emitted":["{PREFIX}.started.v1""#);
    let cases: [(&str, &str); 4] = [
        ("truncated", &truncated),
        ("array", "[1,2,3]"),
        ("wrong-type", r#"{"statuses":"all of them"}"#),
        ("not-json", "<definitely not json>"),
    ];
    let mut uids = Vec::new();
    for (name, annotation) in cases {
        let manifest = taskrun_manifest("v1", name, &[ok("a"), ok("b")], None);
        uids.push(create_taskrun(&client, &ns.name, with_ledger(manifest, annotation)).await);
    }
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "succeeded"], &[]),
    ]);
    for ((name, _), uid) in cases.iter().zip(&uids) {
        let events = received.wait_for_count(uid, 4).await;
        assert_eq!(
            summary(&events),
            expect(&[
                ("a", "started"),
                ("a", "succeeded"),
                ("b", "started"),
                ("b", "succeeded"),
            ]),
            "{name}: all events, in order, although the bad ledger claims a.started"
        );
        assert_deterministic_ids(&events, uid);
        wait_for_exact_ledger(&client, &ns.name, name, &want, EVENT_DEADLINE, &observer).await;
        let notes = wait_for_warnings(&client, &ns.name, uid, "LedgerMalformed", 1).await;
        assert!(
            notes
                .iter()
                .any(|n| n.contains(LEDGER_KEY) && n.contains("malformed")),
            "{name}: the Event names the annotation: {notes:?}"
        );
        assert_eq!(
            received.for_taskrun(uid).len(),
            4,
            "{name}: nothing sent twice"
        );
    }
    let malformed = metric_now(&observer, "tekton_step_observer_ledger_malformed_total").await;
    assert!(
        malformed >= cases.len() as f64,
        "ledger_malformed_total {malformed} counts each bad ledger"
    );
    wait_for_log_line(&observer, "ledger annotation is malformed").await;
    control_delivers(&client, &ns.name, "control", &received).await;
    assert_alive(&mut observer).await;
    record_figures(
        "faults_input_malformed_ledger",
        json!({"ledgers": cases.len(), "ledger_malformed_total": malformed}),
    );
}

/// A valid ledger of exactly `len` bytes that names only steps the TaskRun
/// does not have, as many as fit: the most entries a hostile writer can pack
/// into the annotation.
fn ghost_ledger(len: usize) -> String {
    let end = "]}";
    let mut text = String::from(r#"{"statuses":["#);
    for i in 0.. {
        let entry = format!(r#"{}{{"name":"g{i}"}}"#, if i == 0 { "" } else { "," });
        if text.len() + entry.len() + end.len() > len {
            break;
        }
        text.push_str(&entry);
    }
    text.extend(std::iter::repeat_n(' ', len - end.len() - text.len()));
    text.push_str(end);
    assert_eq!(text.len(), len);
    text
}

/// Invalid JSON of exactly `len` bytes (a ledger cut short).
fn truncated_ledger(len: usize) -> String {
    let mut text = format!(r#"{{"statuses":[{{"name":"a","emitted":["{PREFIX}."#);
    text.extend(std::iter::repeat_n('x', len - text.len()));
    text
}

/// The largest annotations the API server accepts. At the very limit
/// (256 KiB for all annotations, keys included) Tekton cannot create the
/// pod, since it copies the TaskRun's annotations onto the pod and adds its
/// own: the TaskRun fails at once and its step is owed `skipped`. A little
/// below, the pod runs. Either way, and whether the huge value is valid (a
/// ledger of thousands of steps the TaskRun does not have) or not, the
/// observer sends what the TaskRun calls for and rewrites the annotation to
/// a valid ledger.
#[tokio::test(flavor = "multi_thread")]
async fn largest_accepted_ledger_annotations_are_survived_and_rewritten() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-huge").await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-huge-ledger",
        &["--namespace", &ns.name, "--sink", &sink],
        None,
    )
    .await;

    // What Tekton adds to a step pod's annotations, from a real one.
    control_delivers(&client, &ns.name, "control", &received).await;
    let control = wait_finished(&client, &ns.name, "control").await;
    let pod_name = control["status"]["podName"].as_str().expect("podName");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = pods.get(pod_name).await.expect("control pod");
    let tekton_pod_annotations: usize = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum();

    let at_limit = ANNOTATIONS_LIMIT - LEDGER_KEY.len();
    let runnable = at_limit - tekton_pod_annotations;

    // One byte more is refused: `at_limit` is the largest accepted.
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &taskrun_resource("v1"));
    let too_big = with_ledger(
        taskrun_manifest("v1", "too-big", &[ok("a")], None),
        &ghost_ledger(at_limit + 1),
    );
    match api
        .create(
            &PostParams::default(),
            &serde_json::from_value(too_big).unwrap(),
        )
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("Too long"), "{}", status.message);
        }
        other => panic!(
            "a ledger of {} bytes should be refused: {other:?}",
            at_limit + 1
        ),
    }

    let cases = [
        ("limit-ghosts", ghost_ledger(at_limit)),
        ("runnable-ghosts", ghost_ledger(runnable)),
        ("runnable-truncated", truncated_ledger(runnable)),
    ];
    let started = Instant::now();
    let mut uids = Vec::new();
    for (name, annotation) in &cases {
        let manifest = taskrun_manifest("v1", name, &[ok("a"), ok("b")], None);
        uids.push(create_taskrun(&client, &ns.name, with_ledger(manifest, annotation)).await);
    }

    // At the limit: Tekton cannot create the pod; both steps are skipped.
    let limit = wait_finished(&client, &ns.name, "limit-ghosts").await;
    assert_eq!(
        limit["status"]["conditions"][0]["reason"], "PodCreationFailed",
        "Tekton cannot copy a full-size annotation onto the pod"
    );
    let events = received.wait_for_count(&uids[0], 2).await;
    assert_eq!(
        summary(&events),
        expect(&[("a", "skipped"), ("b", "skipped")])
    );
    assert_deterministic_ids(&events, &uids[0]);
    let want = ledger(&[("a", &["skipped"], &[]), ("b", &["skipped"], &[])]);
    wait_for_exact_ledger(
        &client,
        &ns.name,
        "limit-ghosts",
        &want,
        EVENT_DEADLINE,
        &observer,
    )
    .await;

    // Just below: the pod runs, both steps succeed.
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "succeeded"], &[]),
    ]);
    for ((name, _), uid) in cases.iter().zip(&uids).skip(1) {
        let events = received.wait_for_count(uid, 4).await;
        assert_eq!(
            summary(&events),
            expect(&[
                ("a", "started"),
                ("a", "succeeded"),
                ("b", "started"),
                ("b", "succeeded"),
            ]),
            "{name}"
        );
        assert_deterministic_ids(&events, uid);
        wait_for_exact_ledger(&client, &ns.name, name, &want, EVENT_DEADLINE, &observer).await;
    }
    let settled_in = started.elapsed();
    for (uid, (name, _)) in uids.iter().zip(&cases) {
        let repeats = received.for_taskrun(uid).len();
        let expected = if *name == "limit-ghosts" { 2 } else { 4 };
        assert_eq!(repeats, expected, "{name}: nothing sent twice");
    }
    // Only the invalid one is malformed; the ghost ledgers are valid JSON.
    let notes = wait_for_warnings(&client, &ns.name, &uids[2], "LedgerMalformed", 1).await;
    assert!(notes.iter().all(|n| n.len() <= 1024), "{notes:?}");
    for uid in &uids[..2] {
        assert!(
            warnings(&client, &ns.name, uid, "LedgerMalformed")
                .await
                .is_empty()
        );
    }
    assert!(metric_now(&observer, "tekton_step_observer_ledger_malformed_total").await >= 1.0);
    control_delivers(&client, &ns.name, "control-after", &received).await;
    assert_alive(&mut observer).await;
    let peak_kib = peak_rss_kib(observer.pid());
    record_figures(
        "faults_input_huge_ledger",
        json!({
            "largest_accepted_value_bytes": at_limit,
            "tekton_pod_annotation_bytes": tekton_pod_annotations,
            "largest_runnable_value_bytes": runnable,
            "ghost_entries_at_limit": ghost_ledger(at_limit).matches("\"name\"").count(),
            "settled_seconds": settled_in.as_secs_f64(),
            "observer_peak_rss_kib": peak_kib,
        }),
    );
}

/// A valid ledger that names steps the TaskRun does not have and types the
/// observer does not know: those entries count for nothing (not malformed),
/// every real event is sent, and the rewritten ledger holds the real steps.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_step_names_in_the_ledger_count_for_nothing() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-unknown").await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-unknown-steps",
        &["--namespace", &ns.name, "--sink", &sink],
        None,
    )
    .await;
    let annotation = json!({"statuses": [
        {"name": "ghost", "emitted": [event_type("started"), event_type("succeeded")]},
        {"name": "Build", "emitted": [event_type("started")]},
        {"name": "build ", "emitted": [event_type("started")]},
        {"name": "unnamed-0", "emitted": [event_type("started")]},
        {"name": "build", "emitted": ["com.example.exploded.v1", "started", ""],
         "rejected": [format!("{PREFIX}.started.v2")]},
        {"name": "", "emitted": [event_type("failed")]},
    ]})
    .to_string();
    let manifest = taskrun_manifest("v1", "tr", &[ok("build"), fails("test", 2)], None);
    let uid = create_taskrun(&client, &ns.name, with_ledger(manifest, &annotation)).await;
    let events = received.wait_for_count(&uid, 4).await;
    assert_eq!(
        summary(&events),
        expect(&[
            ("build", "started"),
            ("build", "succeeded"),
            ("test", "started"),
            ("test", "failed"),
        ])
    );
    assert_deterministic_ids(&events, &uid);
    let want = ledger(&[
        ("build", &["started", "succeeded"], &[]),
        ("test", &["started", "failed"], &[]),
    ]);
    wait_for_exact_ledger(&client, &ns.name, "tr", &want, EVENT_DEADLINE, &observer).await;
    assert!(
        warnings(&client, &ns.name, &uid, "LedgerMalformed")
            .await
            .is_empty()
    );
    assert_eq!(
        metric_now(&observer, "tekton_step_observer_ledger_malformed_total").await,
        0.0
    );
    assert_eq!(received.for_taskrun(&uid).len(), 4, "nothing sent twice");
    control_delivers(&client, &ns.name, "control", &received).await;
    assert_alive(&mut observer).await;
}

// ---- sinks that cannot be used ----------------------------------------------------

/// The steps of the sink tests, and what they call for.
fn two_steps() -> [Step; 2] {
    [ok("a"), fails("b", 1)]
}
const TWO_STEPS_EVENTS: [(&str, &str); 4] = [
    ("a", "started"),
    ("a", "succeeded"),
    ("b", "started"),
    ("b", "failed"),
];

/// After a first observer held the events of `tr` (and is gone): nothing
/// was recorded, and an observer with a good sink delivers every one, in
/// order, with its log.
async fn held_events_arrive_at_a_good_sink(test: &str, client: &Client, ns: &str, uid: &str) {
    let taskrun = get_taskrun(client, ns, "tr").await;
    assert!(
        taskrun["metadata"]["annotations"][LEDGER_KEY].is_null(),
        "nothing may be recorded while the sink is unusable: {}",
        taskrun["metadata"]["annotations"]
    );
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        &format!("{test}-good-sink"),
        &["--namespace", ns, "--sink", &sink],
        None,
    )
    .await;
    let events = received.wait_for_count(uid, 4).await;
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    assert_deterministic_ids(&events, uid);
    assert_eq!(data(&events[3])["log"], "b failed with 1\n");
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    wait_for_exact_ledger(client, ns, "tr", &want, EVENT_DEADLINE, &observer).await;
    assert_alive(&mut observer).await;
}

/// `--sink not-a-url`: a log line, /readyz 503 naming it,
/// `sink_configured 0`; events are held, and delivered once an observer
/// has a good sink.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_sink_url_is_reported_and_events_are_held() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-badurl").await;
    let mut observer = Observer::start(
        "faults-input-invalid-sink",
        &["--namespace", &ns.name, "--sink", "not-a-url"],
        None,
    )
    .await;
    let line = wait_for_log_line(&observer, "CloudEvents sink is not valid").await;
    assert!(line.contains("not-a-url"), "{line}");
    let (status, body) = observer.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("sink") && body.contains("invalid") && body.contains("not-a-url"),
        "/readyz names the problem: {body}"
    );
    assert_eq!(
        metric_now(&observer, "tekton_step_observer_sink_configured").await,
        0.0
    );
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    wait_finished(&client, &ns.name, "tr").await;
    // Owed, not sent: the worker waits at its gate.
    wait_for("the observer to owe the events", EVENT_DEADLINE, || async {
        let depth = metric_now(&observer, "tekton_step_observer_queue_depth").await;
        (depth >= 1.0).then_some(())
    })
    .await;
    let (status, _) = observer.readyz().await;
    assert_eq!(status, 503);
    assert_alive(&mut observer).await;
    drop(observer);
    held_events_arrive_at_a_good_sink("faults-input-invalid-sink", &client, &ns.name, &uid).await;
}

/// Runs `tr` against an observer whose sink never answers over HTTP, waits
/// until it retried twice for `reason` and logged `detail`, checks it is
/// alive and held everything, then lets a good sink have the events.
async fn unusable_sink_holds_events(test: &str, sink: &str, detail: &str) -> String {
    let client = client().await;
    let ns = TestNamespace::create(&client, test).await;
    let mut observer =
        Observer::start(test, &["--namespace", &ns.name, "--sink", sink], None).await;
    // A well-formed URL is a configured sink: ready once the watch synced.
    wait_for("/readyz 200", EVENT_DEADLINE, || async {
        (observer.readyz().await.0 == 200).then_some(())
    })
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    wait_finished(&client, &ns.name, "tr").await;
    let retries = r#"tekton_step_observer_delivery_retries_total{reason="connect"}"#;
    wait_for("two retries of the connection", EVENT_DEADLINE, || async {
        (metric_now(&observer, retries).await >= 2.0).then_some(())
    })
    .await;
    let line = wait_for_log_line(&observer, "sink did not take the event; will retry").await;
    assert!(
        line.contains(detail),
        "the log line says why ({detail}): {line}"
    );
    for outcome in ["delivered", "rejected"] {
        let series =
            format!(r#"tekton_step_observer_events_total{{type="started",outcome="{outcome}"}}"#);
        assert_eq!(metric_now(&observer, &series).await, 0.0, "{series}");
    }
    assert_alive(&mut observer).await;
    drop(observer);
    held_events_arrive_at_a_good_sink(test, &client, &ns.name, &uid).await;
    line
}

/// `http://sink.invalid/`: name resolution fails inside the namespace; the
/// event is retried (a connection error), held, never dropped.
#[tokio::test(flavor = "multi_thread")]
async fn unresolvable_sink_is_retried_and_events_are_held() {
    let line = unusable_sink_holds_events("fi-dns", "http://sink.invalid/", "dns error").await;
    record_figures("faults_input_unresolvable_sink", json!({"log_line": line}));
}

/// An https sink with a self-signed certificate (openssl s_server on
/// loopback): rustls refuses it, and the events are retried and held, then
/// delivered to a good sink.
#[tokio::test(flavor = "multi_thread")]
async fn sink_with_a_bad_certificate_is_refused_and_events_are_held() {
    let dir = scratch_dir("bad-certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl req");
    assert!(made.success(), "openssl req failed");
    let port = free_port();
    let server_log = dir.join("s_server.log");
    let server = Killed(
        Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-www"])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&server_log).unwrap())
            .stderr(std::fs::File::create(dir.join("s_server.err")).unwrap())
            .spawn()
            .expect("start openssl s_server"),
    );
    wait_for(
        "openssl s_server to listen",
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let line = unusable_sink_holds_events(
        "fi-tls",
        &format!("https://127.0.0.1:{port}/"),
        "certificate",
    )
    .await;
    // The server saw the client abort the handshake with a TLS alert.
    let server_said = wait_for("s_server to report the alert", EVENT_DEADLINE, || async {
        let said = std::fs::read_to_string(&server_log).unwrap_or_default()
            + &std::fs::read_to_string(dir.join("s_server.err")).unwrap_or_default();
        said.contains("alert").then_some(said)
    })
    .await;
    drop(server);
    record_figures(
        "faults_input_bad_certificate",
        json!({"log_line": line, "server_output": tail(&server_said, 2000)}),
    );
}

// ---- sinks that refuse, fail, or answer garbage -----------------------------------

/// 400 and 413 are final: recorded as `rejected`, a Warning Event
/// `EventRejected`, `events_total{outcome="rejected"}`, never retried. 500
/// is retried until the sink recovers.
#[tokio::test(flavor = "multi_thread")]
async fn sink_answers_400_413_and_500() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-status").await;
    // flaky500's sink is down for its first three requests, then recovers.
    let flaky_failures = AtomicUsize::new(0);
    let (addr, sink) = ScriptedSink::start(move |event, _| match taskrun_of(event).as_str() {
        "rej400" => (400, format!("bad event {}", event.id())),
        "rej413" => (413, "payload too large".to_owned()),
        "flaky500" if flaky_failures.fetch_add(1, Ordering::SeqCst) < 3 => {
            (500, "internal error".to_owned())
        }
        _ => (202, String::new()),
    })
    .await;
    let url = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-sink-status",
        &["--namespace", &ns.name, "--sink", &url],
        None,
    )
    .await;

    let mut rejected = Vec::new();
    for (name, status) in [("rej400", 400), ("rej413", 413)] {
        let uid = create_taskrun(
            &client,
            &ns.name,
            taskrun_manifest("v1", name, &[ok("a"), fails("b", 1)], None),
        )
        .await;
        rejected.push((name, status, uid));
    }
    let want = ledger(&[
        ("a", &[], &["started", "succeeded"]),
        ("b", &[], &["started", "failed"]),
    ]);
    for (name, status, uid) in &rejected {
        wait_for_exact_ledger(&client, &ns.name, name, &want, EVENT_DEADLINE, &observer).await;
        // kube's Recorder folds Events of one reason about one object into
        // a series (keyed without the note), so count occurrences.
        let found = wait_for(
            &format!("4 EventRejected occurrences on {name}"),
            EVENT_DEADLINE,
            || async {
                let found = warnings(&client, &ns.name, uid, "EventRejected").await;
                let occurrences: i32 = found
                    .iter()
                    .map(|e| e.series.as_ref().map_or(1, |s| s.count))
                    .sum();
                (occurrences >= 4).then_some(found)
            },
        )
        .await;
        let occurrences: i32 = found
            .iter()
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        assert_eq!(occurrences, 4, "{name}: one per refused event");
        for event in &found {
            let note = event.note.as_deref().unwrap_or_default();
            assert!(
                note.contains("The sink refused the")
                    && note.contains(&format!("with HTTP {status}")),
                "{name}: the Event says who refused what: {note:?}"
            );
        }
    }

    // A sink failing with 500 three times, meanwhile: retried, then delivered.
    let flaky = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "flaky500", &two_steps(), None),
    )
    .await;
    let events = sink.wait_accepted(&flaky, 4).await;
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    let want_flaky = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    wait_for_exact_ledger(
        &client,
        &ns.name,
        "flaky500",
        &want_flaky,
        EVENT_DEADLINE,
        &observer,
    )
    .await;
    let answers = sink.answers_by_id(&flaky);
    assert_eq!(answers[0].1, [500, 500, 500, 202], "{answers:?}");
    assert!(answers[1..].iter().all(|(_, s)| s == &[202]), "{answers:?}");
    let control = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "control", &[ok("only")], None),
    )
    .await;
    sink.wait_accepted(&control, 2).await;

    // Seconds of backoff later (flaky500 waited through three): the refused
    // events were each sent exactly once.
    for (name, _, uid) in &rejected {
        let answers = sink.answers_by_id(uid);
        assert_eq!(answers.len(), 4, "{name}: {answers:?}");
        assert!(
            answers.iter().all(|(_, statuses)| statuses.len() == 1),
            "{name}: a refused event is never sent again: {answers:?}"
        );
    }
    let metrics = observer.metrics_text().await;
    let value = |series: &str| metric(&metrics, series).unwrap_or(-1.0);
    for (kind, count) in [("started", 4.0), ("succeeded", 2.0), ("failed", 2.0)] {
        let series =
            format!(r#"tekton_step_observer_events_total{{type="{kind}",outcome="rejected"}}"#);
        assert_eq!(value(&series), count, "{series}\n{metrics}");
    }
    assert_eq!(
        value(r#"tekton_step_observer_delivery_retries_total{reason="server_error"}"#),
        3.0,
        "{metrics}"
    );
    wait_for_log_line(&observer, "sink rejected the event for good").await;
    assert_alive(&mut observer).await;
}

/// A TCP sink that answers garbage (not HTTP) while `garbage` is set, and
/// otherwise passes connections through to `backend`.
struct GarbageSink {
    garbage: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
}

const GARBAGE: &[u8] = b"SSH-2.0-OpenSSH_9.6\r\nthis is no HTTP response \x00\xff\xfe\r\n\r\n";

async fn start_garbage_sink(backend: SocketAddr) -> (SocketAddr, GarbageSink) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let garbage = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicUsize::new(0));
    let (g, a) = (garbage.clone(), answered.clone());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (garbage, answered) = (g.clone(), a.clone());
            tokio::spawn(async move {
                if garbage.load(Ordering::SeqCst) {
                    // Read the whole request first, so closing sends no RST.
                    if read_request(&mut socket).await.is_some() {
                        let _ = socket.write_all(GARBAGE).await;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = socket.shutdown().await;
                    let mut rest = Vec::new();
                    let _ = socket.read_to_end(&mut rest).await;
                } else if let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
                }
            });
        }
    });
    (addr, GarbageSink { garbage, answered })
}

/// Reads one HTTP/1 request (head and Content-Length body).
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 8192];
    loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + length {
            return Some(());
        }
    }
}

/// A sink answering garbage on the socket: a transport error, retried until
/// it speaks HTTP again; nothing rejected, nothing lost, order kept.
#[tokio::test(flavor = "multi_thread")]
async fn sink_answering_garbage_is_retried_until_it_recovers() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-garbage").await;
    let (backend, received) = start_receiver().await;
    let (addr, garbage) = start_garbage_sink(backend).await;
    let url = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-garbage",
        &["--namespace", &ns.name, "--sink", &url],
        None,
    )
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    wait_for("three garbage answers", EVENT_DEADLINE, || async {
        (garbage.answered.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    let line = wait_for_log_line(&observer, "sink did not take the event; will retry").await;
    let metrics = observer.metrics_text().await;
    let retries: Vec<(String, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("tekton_step_observer_delivery_retries_total{"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let total: f64 = retries.iter().map(|(_, v)| v).sum();
    assert!(total >= 2.0, "retried: {retries:?}");
    for kind in ["started", "succeeded", "failed"] {
        let series =
            format!(r#"tekton_step_observer_events_total{{type="{kind}",outcome="rejected"}}"#);
        assert_eq!(
            metric(&metrics, &series),
            Some(0.0),
            "garbage is not a refusal"
        );
    }
    assert!(
        get_taskrun(&client, &ns.name, "tr").await["metadata"]["annotations"][LEDGER_KEY].is_null()
    );
    assert_alive(&mut observer).await;

    garbage.garbage.store(false, Ordering::SeqCst);
    let events = received.wait_for_count(&uid, 4).await;
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    assert_deterministic_ids(&events, &uid);
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    wait_for_exact_ledger(&client, &ns.name, "tr", &want, EVENT_DEADLINE, &observer).await;
    assert_eq!(received.for_taskrun(&uid).len(), 4);
    control_delivers(&client, &ns.name, "control", &received).await;
    assert_alive(&mut observer).await;
    record_figures(
        "faults_input_garbage_sink",
        json!({
            "garbage_answers": garbage.answered.load(Ordering::SeqCst),
            "retries": retries.iter().map(|(s, v)| json!({"series": s, "value": v})).collect::<Vec<_>>(),
            "log_line": line,
        }),
    );
}

// ---- big logs, many steps, vanished pods -------------------------------------------

/// Reads a container's whole log through the API, keeping only the last
/// `keep` bytes; returns (total bytes, tail).
async fn log_tail(
    client: &Client,
    ns: &str,
    pod: &str,
    container: &str,
    keep: usize,
) -> (usize, Vec<u8>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let params = LogParams {
        container: Some(container.to_owned()),
        ..LogParams::default()
    };
    let mut stream = pods.log_stream(pod, &params).await.expect("log stream");
    let mut tail = Vec::with_capacity(4 * keep);
    let mut total = 0;
    let mut chunk = vec![0_u8; 1 << 16];
    loop {
        let n = stream.read(&mut chunk).await.expect("read log");
        if n == 0 {
            break;
        }
        total += n;
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > 3 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
    let cut = tail.len().saturating_sub(keep);
    (total, tail.split_off(cut))
}

/// A step logging 100 MiB (SIMULATED_LOG_BYTES): the event carries the last
/// 64 KiB, `logTruncated: true`, ending with the step's last line, and the
/// observer's peak memory stays far below the log's size.
#[tokio::test(flavor = "multi_thread")]
async fn hundred_megabyte_log_is_tailed_in_bounded_memory() {
    const LOG_BYTES: usize = 100 << 20;
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-biglog").await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-big-log",
        &["--namespace", &ns.name, "--sink", &sink],
        None,
    )
    .await;
    let baseline_kib = peak_rss_kib(observer.pid());
    let last_line = format!("LAST LINE of {LOG_BYTES} bytes of filler {}\n", ns.name);
    let mut step = ok("big");
    step.log = last_line.clone();
    let mut manifest = taskrun_manifest("v1", "tr", &[step], None);
    manifest["spec"]["taskSpec"]["steps"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "SIMULATED_LOG_BYTES", "value": LOG_BYTES.to_string()}));
    let started = Instant::now();
    let uid = create_taskrun(&client, &ns.name, manifest).await;
    let events = received.wait_for_count(&uid, 2).await;
    let delivered_in = started.elapsed();
    assert_eq!(
        summary(&events),
        expect(&[("big", "started"), ("big", "succeeded")])
    );
    let data = data(&events[1]);
    let log = data["log"]
        .as_str()
        .unwrap_or_else(|| panic!("a log: {data}"));
    assert!(
        log.ends_with(&last_line),
        "the tail ends with the last line (is the cluster's node agent older than \
         SIMULATED_LOG_BYTES? then `cargo build -p node-agent --bins && hack/cluster restart node-agent`); log ends with {:?}",
        tail(log, 200)
    );
    assert_eq!(
        log.len(),
        LOG_LIMIT,
        "the tail is exactly --log-limit-bytes"
    );
    assert_eq!(data["logTruncated"], true);
    let peak_kib = peak_rss_kib(observer.pid());

    // The same tail as the API serves it, read independently.
    let taskrun = get_taskrun(&client, &ns.name, "tr").await;
    let pod = taskrun["status"]["podName"].as_str().expect("podName");
    let (total, api_tail) = log_tail(&client, &ns.name, pod, "step-big", LOG_LIMIT).await;
    assert_eq!(
        total,
        LOG_BYTES + last_line.len(),
        "the whole log as the API serves it"
    );
    assert_eq!(
        log.as_bytes(),
        &api_tail[..],
        "exactly the log's last 64 KiB"
    );

    wait_for_exact_ledger(
        &client,
        &ns.name,
        "tr",
        &ledger(&[("big", &["started", "succeeded"], &[])]),
        EVENT_DEADLINE,
        &observer,
    )
    .await;
    control_delivers(&client, &ns.name, "control", &received).await;
    assert_alive(&mut observer).await;
    record_figures(
        "faults_input_big_log",
        json!({
            "log_bytes": LOG_BYTES,
            "observer_peak_rss_kib_before": baseline_kib,
            "observer_peak_rss_kib_after": peak_kib,
            "create_to_delivered_seconds": delivered_in.as_secs_f64(),
        }),
    );
    eprintln!(
        "100 MiB log: observer VmHWM {baseline_kib} KiB at start, {peak_kib} KiB after delivery; delivered {delivered_in:?} after creation"
    );
    assert!(
        peak_kib < 60 * 1024,
        "the observer's peak RSS ({peak_kib} KiB) stays far below the 100 MiB log"
    );
}

/// A TaskRun of `count` steps of 20 ms each. When Tekton can run it, every
/// step is owed started and succeeded; when its pod is too large to store
/// (Tekton mounts every step's run volume into every step container, so the
/// pod grows with the square of the steps), the TaskRun fails at once and
/// every step is owed skipped. Either way: all events, in order, none twice,
/// one ledger. Returns nothing; records the figures as `case`.
async fn many_steps(case: &str, count: usize, tekton_runs_it: bool) {
    let deadline = Duration::from_secs(600);
    let client = client().await;
    let ns = TestNamespace::create(&client, &format!("fi-{count}")).await;
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        &format!("faults-input-{count}-steps"),
        &["--namespace", &ns.name, "--sink", &sink],
        None,
    )
    .await;
    let steps: Vec<Step> = (0..count)
        .map(|i| ok(&format!("s{i:03}")).lasting(20))
        .collect();
    let kinds: &[&str] = if tekton_runs_it {
        &["started", "succeeded"]
    } else {
        &["skipped"]
    };
    let expected: Vec<(String, String)> = steps
        .iter()
        .flat_map(|s| kinds.iter().map(|k| (s.name.clone(), (*k).to_owned())))
        .collect();
    let started = Instant::now();
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &steps, None),
    )
    .await;
    let events = wait_for(&format!("{} events", expected.len()), deadline, || async {
        let events = received.for_taskrun(&uid);
        (events.len() >= expected.len()).then_some(events)
    })
    .await;
    let all_events_in = started.elapsed();
    let all_events_at = chrono::Utc::now();
    assert_eq!(summary(&events), expected, "in step order");
    assert_deterministic_ids(&events, &uid);
    let want: LedgerMap = steps
        .iter()
        .map(|s| {
            let mut types: Vec<String> = kinds.iter().map(|k| event_type(k)).collect();
            types.sort();
            (s.name.clone(), (types, Vec::new()))
        })
        .collect();
    let taskrun = wait_for_exact_ledger(&client, &ns.name, "tr", &want, deadline, &observer).await;
    let ledger_in = started.elapsed();
    assert_eq!(
        received.for_taskrun(&uid).len(),
        expected.len(),
        "none twice"
    );
    let condition = &taskrun["status"]["conditions"][0];
    if tekton_runs_it {
        assert_eq!(condition["reason"], "Succeeded", "{condition}");
    } else {
        assert_eq!(condition["reason"], "PodCreationFailed", "{condition}");
        assert!(
            condition["message"]
                .as_str()
                .is_some_and(|m| m.contains("large")),
            "the pod is too large to store: {condition}"
        );
    }
    // From the last transition (1 s resolution) to the last event's arrival.
    let lag_ms = events
        .last()
        .and_then(|e| e.time().copied())
        .map(|t| (all_events_at - t).num_milliseconds());
    let first_to_last_ms = events
        .first()
        .and_then(|e| e.time().copied())
        .zip(events.last().and_then(|e| e.time().copied()))
        .map(|(f, l)| (l - f).num_milliseconds());
    let metrics = observer.metrics_text().await;
    let last_kind = kinds[kinds.len() - 1];
    assert_eq!(
        metric(
            &metrics,
            &format!(
                r#"tekton_step_observer_events_total{{type="{last_kind}",outcome="delivered"}}"#
            )
        ),
        Some(count as f64)
    );
    assert_alive(&mut observer).await;
    let annotation_bytes = taskrun["metadata"]["annotations"][LEDGER_KEY]
        .as_str()
        .map_or(0, str::len);
    eprintln!(
        "{count} steps: {} events {all_events_in:?} after creation, ledger complete after \
         {ledger_in:?}; first to last transition {first_to_last_ms:?} ms; last event \
         {lag_ms:?} ms after its transition; ledger {annotation_bytes} bytes",
        expected.len()
    );
    record_figures(
        case,
        json!({
            "steps": count,
            "events": expected.len(),
            "tekton_ran_it": tekton_runs_it,
            "create_to_all_events_seconds": all_events_in.as_secs_f64(),
            "create_to_ledger_seconds": ledger_in.as_secs_f64(),
            "first_to_last_transition_ms": first_to_last_ms,
            "last_transition_to_last_event_ms": lag_ms,
            "ledger_bytes": annotation_bytes,
        }),
    );
}

/// 200 steps are more than Tekton v1.9.2 can run: its pod (over 2 MiB) is
/// refused by the API server's store, and the TaskRun fails with
/// PodCreationFailed. The observer reports all 200 steps skipped, in order,
/// in one ledger.
#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_steps_all_reported_though_tekton_cannot_run_them() {
    many_steps("faults_input_200_steps", 200, false).await;
}

/// 150 steps, about the most whose pod Tekton can store (etcd takes 1.5 MiB
/// per request; 170 steps are refused): all 300 events, in order, one ledger.
#[tokio::test(flavor = "multi_thread")]
async fn hundred_fifty_steps_arrive_in_order() {
    many_steps("faults_input_150_steps", 150, true).await;
}

/// The sink is down while the TaskRun finishes, then the pod is force-deleted
/// (after the TaskRun finished, so Tekton does not recreate it), then the
/// sink recovers: terminal events carry `log: null` and a `logError` saying
/// the pod is gone, counted by `log_read_errors_total`.
#[tokio::test(flavor = "multi_thread")]
async fn pod_deleted_before_its_logs_were_read() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-podgone").await;
    let (addr, received) = start_receiver().await;
    received.fail_with.store(503, Ordering::SeqCst);
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        "faults-input-pod-deleted",
        &["--namespace", &ns.name, "--sink", &sink],
        None,
    )
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    let taskrun = wait_finished(&client, &ns.name, "tr").await;
    let retries = r#"tekton_step_observer_delivery_retries_total{reason="server_error"}"#;
    wait_for("the sink to refuse with 503", EVENT_DEADLINE, || async {
        (metric_now(&observer, retries).await >= 1.0).then_some(())
    })
    .await;
    let pod = taskrun["status"]["podName"]
        .as_str()
        .expect("podName")
        .to_owned();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.delete(&pod, &DeleteParams::default().grace_period(0))
        .await
        .expect("force-delete the pod");
    wait_for("the pod to be gone", EVENT_DEADLINE, || async {
        pods.get_opt(&pod)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        received.for_taskrun(&uid).is_empty(),
        "nothing delivered yet"
    );
    received.fail_with.store(0, Ordering::SeqCst);

    let events = received.wait_for_count(&uid, 4).await;
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    assert_deterministic_ids(&events, &uid);
    for terminal in [&events[1], &events[3]] {
        let data = data(terminal);
        assert_eq!(data["log"], Value::Null, "{data}");
        let why = data["logError"].as_str().unwrap_or_default();
        assert!(
            why.contains(&pod) && why.contains("not found") && why.contains("deleted"),
            "logError says the pod is gone: {why:?}"
        );
        assert_eq!(
            data["stepState"]["terminated"]["exitCode"],
            if terminal.subject() == Some("a") {
                0
            } else {
                1
            }
        );
    }
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    wait_for_exact_ledger(&client, &ns.name, "tr", &want, EVENT_DEADLINE, &observer).await;
    assert_eq!(
        metric_now(&observer, "tekton_step_observer_log_read_errors_total").await,
        2.0
    );
    control_delivers(&client, &ns.name, "control", &received).await;
    assert_alive(&mut observer).await;
}
