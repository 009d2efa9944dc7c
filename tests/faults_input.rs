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

use std::collections::{BTreeMap, HashSet};
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
/// `want`; returns the TaskRun, or at the deadline what went wrong (the
/// case records its figures before it fails on that).
async fn exact_ledger(
    client: &Client,
    ns: &str,
    name: &str,
    want: &LedgerMap,
    deadline: Duration,
    observer: &Observer,
) -> Result<Value, String> {
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
    found.ok_or_else(|| {
        format!(
            "TaskRun {ns}/{name}: the ledger never became {want:?}; last annotation (start): {:?}\nobserver log (end):\n{}",
            last.lock().unwrap(),
            tail(&observer.log_text(), 6000)
        )
    })
}

/// Fails the case with what [`exact_ledger`] saw, if the ledger never came.
fn assert_ledger(ledger: &Result<Value, String>) {
    if let Err(why) = ledger {
        panic!("{why}");
    }
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Whether every event carries its deterministic id `<uid>-<step>-<type>`
/// (what [`assert_deterministic_ids`] asserts, as a figure).
fn ids_deterministic(events: &[Event], uid: &str) -> bool {
    events.iter().all(|event| {
        event
            .subject()
            .is_some_and(|step| event.id() == format!("{uid}-{step}-{}", event.ty()))
    })
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

/// Whether the observer still ran and what its /healthz answered, taken
/// once: the case records it as a check, then asserts it.
struct Liveness {
    running: bool,
    healthz: Result<u16, String>,
    /// The end of its log, when it had exited (for the failure message).
    log: String,
}

impl Liveness {
    /// It still runs and answers /healthz with 200.
    fn ok(&self) -> bool {
        self.running && self.healthz == Ok(200)
    }

    fn assert(&self) {
        assert!(self.running, "the observer exited; log:\n{}", self.log);
        let status = self.healthz.as_ref().expect("healthz");
        assert_eq!(*status, 200, "/healthz");
    }
}

async fn liveness(observer: &mut Observer) -> Liveness {
    let running = observer.is_running();
    let healthz = reqwest::get(format!("http://{}/healthz", observer.metrics))
        .await
        .map(|response| response.status().as_u16())
        .map_err(|e| e.to_string());
    let log = if running {
        String::new()
    } else {
        tail(&observer.log_text(), 6000).to_owned()
    };
    Liveness {
        running,
        healthz,
        log,
    }
}

/// Waits until the observer's log contains `needle`; returns the line, or
/// at the deadline the failure message (the case records its figures first).
async fn find_log_line(observer: &Observer, needle: &str) -> Result<String, String> {
    let found = try_wait_for(EVENT_DEADLINE, || async {
        observer
            .log_text()
            .lines()
            .find(|line| line.contains(needle))
            .map(str::to_owned)
    })
    .await;
    found.ok_or_else(|| {
        format!(
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

/// Waits for at least `count` such Warning Events; returns the notes of
/// those found by the deadline, maybe fewer (the case asserts the count
/// after recording its figures).
async fn warning_notes(
    client: &Client,
    ns: &str,
    uid: &str,
    reason: &str,
    count: usize,
) -> Vec<String> {
    let enough = try_wait_for(EVENT_DEADLINE, || async {
        let found = warnings(client, ns, uid, reason).await;
        (found.len() >= count).then_some(found)
    })
    .await;
    let found = match enough {
        Some(found) => found,
        None => warnings(client, ns, uid, reason).await,
    };
    found.into_iter().filter_map(|e| e.note).collect()
}

/// Waits until `count` events about the TaskRun arrived; at the deadline,
/// returns what did arrive, so the case records the short count before its
/// assertions fail on it.
async fn arrived(received: &Received, uid: &str, count: usize, deadline: Duration) -> Vec<Event> {
    let enough = try_wait_for(deadline, || async {
        let events = received.for_taskrun(uid);
        (events.len() >= count).then_some(events)
    })
    .await;
    enough.unwrap_or_else(|| received.for_taskrun(uid))
}

/// What a control TaskRun of one step calls for.
const CONTROL_EVENTS: [(&str, &str); 2] = [("only", "started"), ("only", "succeeded")];

/// A control TaskRun of one step in `ns` (other TaskRuns keep delivering);
/// returns what the sink got of it, for [`control_delivered`].
async fn run_control(client: &Client, ns: &str, name: &str, received: &Received) -> Vec<Event> {
    let uid = create_taskrun(
        client,
        ns,
        taskrun_manifest("v1", name, &[ok("only")], None),
    )
    .await;
    arrived(received, &uid, CONTROL_EVENTS.len(), EVENT_DEADLINE).await
}

/// The control TaskRun's events arrived, in order.
fn control_delivered(events: &[Event]) -> bool {
    summary(events) == expect(&CONTROL_EVENTS)
}

fn assert_control(events: &[Event]) {
    assert_eq!(summary(events), expect(&CONTROL_EVENTS));
}

/// What a case's TaskRuns call for against what the sink acknowledged, as
/// hack/reliability-report counts it: `delivered` = distinct expected
/// events acknowledged, `missing` = never acknowledged, `repeats` =
/// acknowledgements of an id already acknowledged.
#[derive(Default)]
struct Tally {
    expected: usize,
    delivered: usize,
    missing: Vec<String>,
    repeats: usize,
}

impl Tally {
    /// Adds one TaskRun, `label` naming it in `missing`: `want` is what it
    /// calls for, `acked` every event about it the sink acknowledged.
    fn add(&mut self, label: &str, want: &[(String, String)], acked: &[Event]) {
        let got: HashSet<(String, String)> = summary(acked).into_iter().collect();
        self.expected += want.len();
        for (step, kind) in want {
            if got.contains(&(step.clone(), kind.clone())) {
                self.delivered += 1;
            } else {
                self.missing.push(format!("{label}/{step}.{kind}"));
            }
        }
        let ids: HashSet<&str> = acked.iter().map(|e| e.id()).collect();
        self.repeats += acked.len() - ids.len();
    }
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

    /// Waits until the sink took `count` events about one TaskRun; at the
    /// deadline, returns those it did take (the case asserts the count after
    /// recording its figures).
    async fn wait_accepted(&self, uid: &str, count: usize) -> Vec<Event> {
        let enough = try_wait_for(EVENT_DEADLINE, || async {
            let events = self.accepted_for(uid);
            (events.len() >= count).then_some(events)
        })
        .await;
        enough.unwrap_or_else(|| self.accepted_for(uid))
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
    let want_events = expect(&[
        ("a", "started"),
        ("a", "succeeded"),
        ("b", "started"),
        ("b", "succeeded"),
    ]);
    /// What one TaskRun with a bad ledger got; asserted after the figures
    /// are recorded.
    struct Seen {
        events: Vec<Event>,
        ledger: Result<Value, String>,
        notes: Vec<String>,
        /// Every event about it, once its ledger was rewritten.
        sent: Vec<Event>,
    }
    let names_annotation = |notes: &[String]| {
        notes
            .iter()
            .any(|n| n.contains(LEDGER_KEY) && n.contains("malformed"))
    };
    let mut seen = Vec::new();
    let mut tally = Tally::default();
    for ((name, _), uid) in cases.iter().zip(&uids) {
        let events = arrived(&received, uid, want_events.len(), EVENT_DEADLINE).await;
        let ledger = exact_ledger(&client, &ns.name, name, &want, EVENT_DEADLINE, &observer).await;
        let notes = warning_notes(&client, &ns.name, uid, "LedgerMalformed", 1).await;
        let sent = received.for_taskrun(uid);
        tally.add(name, &want_events, &sent);
        seen.push(Seen {
            events,
            ledger,
            notes,
            sent,
        });
    }
    let malformed = metric_now(&observer, "tekton_step_observer_ledger_malformed_total").await;
    let logged = find_log_line(&observer, "ledger annotation is malformed").await;
    let control = run_control(&client, &ns.name, "control", &received).await;
    tally.add("control", &expect(&CONTROL_EVENTS), &control);
    let live = liveness(&mut observer).await;

    let in_order = seen
        .iter()
        .filter(|s| summary(&s.events) == want_events)
        .count();
    let rewritten = seen.iter().filter(|s| s.ledger.is_ok()).count();
    let warned = seen.iter().filter(|s| names_annotation(&s.notes)).count();
    let names: Vec<&str> = cases.iter().map(|(name, _)| *name).collect();
    let n = cases.len();
    record_figures(
        "faults_input_malformed_ledger",
        json!({
            "ledgers": cases.len(),
            "ledger_malformed_total": malformed,
            "injected": format!(
                "a malformed ledger annotation ({}) set at creation on {} TaskRuns of 2 steps",
                names.join(", "),
                cases.len()
            ),
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            // A bad annotation is there from the start; no fault ends.
            "recovery_seconds": null,
            "checks": {
                "all_events_in_order": in_order == seen.len(),
                "deterministic_ids": seen
                    .iter()
                    .zip(&uids)
                    .all(|(s, uid)| ids_deterministic(&s.events, uid)),
                "ledgers_rewritten": rewritten == seen.len(),
                "warning_event_names_the_annotation": warned == seen.len(),
                "nothing_sent_twice": seen.iter().all(|s| s.sent.len() == want_events.len()),
                "malformed_counted": malformed >= cases.len() as f64,
                "logged": logged.is_ok(),
                "control_delivered": control_delivered(&control),
                "observer_alive": live.ok(),
            },
            "headline": format!(
                "{n} malformed ledgers: {in_order} of {n} TaskRuns got all their events \
                 in order ({}/{} events delivered with the control's, {} repeated), \
                 {rewritten} ledgers rewritten, {warned} Warning Events naming the \
                 annotation, ledger_malformed_total {malformed}",
                tally.delivered,
                tally.expected,
                tally.repeats
            ),
        }),
    );

    for ((s, uid), (name, _)) in seen.iter().zip(&uids).zip(&cases) {
        assert_eq!(
            summary(&s.events),
            want_events,
            "{name}: all events, in order, although the bad ledger claims a.started"
        );
        assert_deterministic_ids(&s.events, uid);
        assert_ledger(&s.ledger);
        assert!(
            names_annotation(&s.notes),
            "{name}: the Event names the annotation: {:?}",
            s.notes
        );
        assert_eq!(s.sent.len(), 4, "{name}: nothing sent twice");
    }
    assert!(
        malformed >= cases.len() as f64,
        "ledger_malformed_total {malformed} counts each bad ledger"
    );
    logged.unwrap_or_else(|why| panic!("{why}"));
    assert_control(&control);
    live.assert();
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
    let first_control = run_control(&client, &ns.name, "control", &received).await;
    assert_control(&first_control);
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
    let over_limit = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(too_big).unwrap(),
        )
        .await;
    let over_limit_refused = matches!(
        &over_limit,
        Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains("Too long")
    );

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
    let limit_reason = limit["status"]["conditions"][0]["reason"].clone();
    let want_limit = expect(&[("a", "skipped"), ("b", "skipped")]);
    let limit_events = arrived(&received, &uids[0], want_limit.len(), EVENT_DEADLINE).await;
    let want = ledger(&[("a", &["skipped"], &[]), ("b", &["skipped"], &[])]);
    let limit_ledger = exact_ledger(
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
    let want_runnable = expect(&[
        ("a", "started"),
        ("a", "succeeded"),
        ("b", "started"),
        ("b", "succeeded"),
    ]);
    let mut runnable_seen = Vec::new();
    for ((name, _), uid) in cases.iter().zip(&uids).skip(1) {
        let events = arrived(&received, uid, want_runnable.len(), EVENT_DEADLINE).await;
        let ledger = exact_ledger(&client, &ns.name, name, &want, EVENT_DEADLINE, &observer).await;
        runnable_seen.push((events, ledger));
    }
    let settled_in = started.elapsed();
    let mut tally = Tally::default();
    tally.add("control", &expect(&CONTROL_EVENTS), &first_control);
    let mut sent_once = Vec::new();
    for (uid, (name, _)) in uids.iter().zip(&cases) {
        let sent = received.for_taskrun(uid);
        let want_events = if *name == "limit-ghosts" {
            &want_limit
        } else {
            &want_runnable
        };
        tally.add(name, want_events, &sent);
        sent_once.push((sent.len(), want_events.len()));
    }
    // Only the invalid one is malformed; the ghost ledgers are valid JSON.
    let notes = warning_notes(&client, &ns.name, &uids[2], "LedgerMalformed", 1).await;
    let mut ghost_warnings = Vec::new();
    for uid in &uids[..2] {
        ghost_warnings.push(
            warnings(&client, &ns.name, uid, "LedgerMalformed")
                .await
                .len(),
        );
    }
    let malformed = metric_now(&observer, "tekton_step_observer_ledger_malformed_total").await;
    let control = run_control(&client, &ns.name, "control-after", &received).await;
    tally.add("control-after", &expect(&CONTROL_EVENTS), &control);
    let live = liveness(&mut observer).await;
    let peak_kib = peak_rss_kib(observer.pid());

    let rewritten = std::iter::once(&limit_ledger)
        .chain(runnable_seen.iter().map(|(_, ledger)| ledger))
        .filter(|ledger| ledger.is_ok())
        .count();
    record_figures(
        "faults_input_huge_ledger",
        json!({
            "largest_accepted_value_bytes": at_limit,
            "tekton_pod_annotation_bytes": tekton_pod_annotations,
            "largest_runnable_value_bytes": runnable,
            "ghost_entries_at_limit": ghost_ledger(at_limit).matches("\"name\"").count(),
            "settled_seconds": settled_in.as_secs_f64(),
            "observer_peak_rss_kib": peak_kib,
            "injected": format!(
                "ledger annotations of the largest size the API server accepts ({at_limit} \
                 bytes, too big for Tekton to create the pod) and of {runnable} bytes (the \
                 largest whose pod still runs): valid ledgers of thousands of steps the \
                 TaskRun does not have, and truncated JSON"
            ),
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            // A huge annotation is there from the start; no fault ends.
            "recovery_seconds": null,
            "checks": {
                "one_byte_more_refused": over_limit_refused,
                "pod_creation_failed_at_limit": limit_reason == "PodCreationFailed",
                "all_events_in_order": summary(&limit_events) == want_limit
                    && runnable_seen
                        .iter()
                        .all(|(events, _)| summary(events) == want_runnable),
                "deterministic_ids": ids_deterministic(&limit_events, &uids[0])
                    && runnable_seen
                        .iter()
                        .zip(&uids[1..])
                        .all(|((events, _), uid)| ids_deterministic(events, uid)),
                "ledgers_rewritten": rewritten == cases.len(),
                "nothing_sent_twice": sent_once.iter().all(|(sent, want)| sent == want),
                "truncated_ledger_warned": !notes.is_empty(),
                "warning_notes_bounded": notes.iter().all(|n| n.len() <= 1024),
                "ghost_ledgers_not_malformed": ghost_warnings.iter().all(|n| *n == 0),
                "malformed_counted": malformed >= 1.0,
                "control_delivered": control_delivered(&control),
                "observer_alive": live.ok(),
            },
            "headline": format!(
                "annotation values up to {at_limit} bytes accepted ({runnable} still \
                 runnable): {}/{} events delivered, {rewritten} of {} ledgers rewritten \
                 within {:.1} s of creation; observer peak RSS {peak_kib} KiB",
                tally.delivered,
                tally.expected,
                cases.len(),
                settled_in.as_secs_f64()
            ),
        }),
    );

    match over_limit {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("Too long"), "{}", status.message);
        }
        other => panic!(
            "a ledger of {} bytes should be refused: {other:?}",
            at_limit + 1
        ),
    }
    assert_eq!(
        limit_reason, "PodCreationFailed",
        "Tekton cannot copy a full-size annotation onto the pod"
    );
    assert_eq!(summary(&limit_events), want_limit);
    assert_deterministic_ids(&limit_events, &uids[0]);
    assert_ledger(&limit_ledger);
    for ((events, ledger), ((name, _), uid)) in
        runnable_seen.iter().zip(cases.iter().zip(&uids).skip(1))
    {
        assert_eq!(summary(events), want_runnable, "{name}");
        assert_deterministic_ids(events, uid);
        assert_ledger(ledger);
    }
    for ((sent, expected), (name, _)) in sent_once.iter().zip(&cases) {
        assert_eq!(sent, expected, "{name}: nothing sent twice");
    }
    assert!(
        !notes.is_empty(),
        "timed out after {EVENT_DEADLINE:?} waiting for 1 Warning Event(s) LedgerMalformed on {}",
        uids[2]
    );
    assert!(notes.iter().all(|n| n.len() <= 1024), "{notes:?}");
    for found in &ghost_warnings {
        assert_eq!(*found, 0);
    }
    assert!(malformed >= 1.0);
    assert_control(&control);
    live.assert();
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
    let statuses = json!([
        {"name": "ghost", "emitted": [event_type("started"), event_type("succeeded")]},
        {"name": "Build", "emitted": [event_type("started")]},
        {"name": "build ", "emitted": [event_type("started")]},
        {"name": "unnamed-0", "emitted": [event_type("started")]},
        {"name": "build", "emitted": ["com.example.exploded.v1", "started", ""],
         "rejected": [format!("{PREFIX}.started.v2")]},
        {"name": "", "emitted": [event_type("failed")]},
    ]);
    let entries = statuses.as_array().map_or(0, Vec::len);
    let annotation = json!({ "statuses": statuses }).to_string();
    let manifest = taskrun_manifest("v1", "tr", &[ok("build"), fails("test", 2)], None);
    let uid = create_taskrun(&client, &ns.name, with_ledger(manifest, &annotation)).await;
    let want_events = expect(&[
        ("build", "started"),
        ("build", "succeeded"),
        ("test", "started"),
        ("test", "failed"),
    ]);
    let events = arrived(&received, &uid, want_events.len(), EVENT_DEADLINE).await;
    let want = ledger(&[
        ("build", &["started", "succeeded"], &[]),
        ("test", &["started", "failed"], &[]),
    ]);
    let rewritten = exact_ledger(&client, &ns.name, "tr", &want, EVENT_DEADLINE, &observer).await;
    let warned = warnings(&client, &ns.name, &uid, "LedgerMalformed")
        .await
        .len();
    let malformed = metric_now(&observer, "tekton_step_observer_ledger_malformed_total").await;
    let sent = received.for_taskrun(&uid);
    let control = run_control(&client, &ns.name, "control", &received).await;
    let live = liveness(&mut observer).await;
    let mut tally = Tally::default();
    tally.add("tr", &want_events, &sent);
    tally.add("control", &expect(&CONTROL_EVENTS), &control);
    record_figures(
        "faults_input_unknown_ledger_entries",
        json!({
            "injected": format!(
                "a valid ledger annotation of {entries} entries naming steps the TaskRun \
                 does not have (other case, a trailing space, empty) and event types the \
                 observer does not know"
            ),
            "ledger_entries": entries,
            "ledger_malformed_total": malformed,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            // The annotation is there from the start; no fault ends.
            "recovery_seconds": null,
            "checks": {
                "all_events_in_order": summary(&events) == want_events,
                "deterministic_ids": ids_deterministic(&events, &uid),
                "ledger_rewritten_to_the_real_steps": rewritten.is_ok(),
                "no_malformed_warning": warned == 0,
                "malformed_not_counted": malformed == 0.0,
                "nothing_sent_twice": sent.len() == want_events.len(),
                "control_delivered": control_delivered(&control),
                "observer_alive": live.ok(),
            },
            "headline": format!(
                "{entries} ledger entries of unknown steps or types counted for nothing: \
                 {}/{} events delivered, {} repeated, ledger_malformed_total {malformed}",
                tally.delivered, tally.expected, tally.repeats
            ),
        }),
    );

    assert_eq!(summary(&events), want_events);
    assert_deterministic_ids(&events, &uid);
    assert_ledger(&rewritten);
    assert_eq!(warned, 0);
    assert_eq!(malformed, 0.0);
    assert_eq!(sent.len(), 4, "nothing sent twice");
    assert_control(&control);
    live.assert();
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

/// What a good sink got of the events a first observer held: see
/// [`held_events_arrive_at_a_good_sink`].
struct Held {
    uid: String,
    /// The annotations of `tr` once the first observer was gone.
    annotations: Value,
    events: Vec<Event>,
    ledger: Result<Value, String>,
    live: Liveness,
}

/// The log the failing step `b` of [`two_steps`] writes.
const B_LOG: &str = "b failed with 1\n";

impl Held {
    fn nothing_recorded(&self) -> bool {
        self.annotations[LEDGER_KEY].is_null()
    }

    /// The fourth event (b's failure) carries b's log.
    fn log_delivered(&self) -> bool {
        self.events.get(3).is_some_and(|e| data(e)["log"] == B_LOG)
    }

    fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        tally.add("tr", &expect(&TWO_STEPS_EVENTS), &self.events);
        tally
    }

    /// The checks of [`Held::assert`], as figures.
    fn checks(&self) -> Value {
        json!({
            "nothing_recorded_while_unusable": self.nothing_recorded(),
            "held_events_delivered_in_order": summary(&self.events) == expect(&TWO_STEPS_EVENTS),
            "deterministic_ids": ids_deterministic(&self.events, &self.uid),
            "log_delivered": self.log_delivered(),
            "ledger_complete": self.ledger.is_ok(),
            "good_sink_observer_alive": self.live.ok(),
        })
    }

    fn assert(&self) {
        assert!(
            self.nothing_recorded(),
            "nothing may be recorded while the sink is unusable: {}",
            self.annotations
        );
        assert_eq!(summary(&self.events), expect(&TWO_STEPS_EVENTS));
        assert_deterministic_ids(&self.events, &self.uid);
        assert_eq!(data(&self.events[3])["log"], B_LOG);
        assert_ledger(&self.ledger);
        self.live.assert();
    }
}

/// After a first observer held the events of `tr` (and is gone): nothing
/// was recorded, and an observer with a good sink delivers every one, in
/// order, with its log. Measures only; the caller records, then calls
/// [`Held::assert`].
async fn held_events_arrive_at_a_good_sink(
    test: &str,
    client: &Client,
    ns: &str,
    uid: &str,
) -> Held {
    let taskrun = get_taskrun(client, ns, "tr").await;
    let annotations = taskrun["metadata"]["annotations"].clone();
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let mut observer = Observer::start(
        &format!("{test}-good-sink"),
        &["--namespace", ns, "--sink", &sink],
        None,
    )
    .await;
    let events = arrived(&received, uid, TWO_STEPS_EVENTS.len(), EVENT_DEADLINE).await;
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    let ledger = exact_ledger(client, ns, "tr", &want, EVENT_DEADLINE, &observer).await;
    let live = liveness(&mut observer).await;
    Held {
        uid: uid.to_owned(),
        annotations,
        events,
        ledger,
        live,
    }
}

/// `checks` with the checks of `more` added (both JSON objects).
fn merge_checks(mut checks: Value, more: Value) -> Value {
    if let (Some(checks), Value::Object(more)) = (checks.as_object_mut(), more) {
        checks.extend(more);
    }
    checks
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
    let line = find_log_line(&observer, "CloudEvents sink is not valid").await;
    let (status, body) = observer.readyz().await;
    let names_problem =
        body.contains("sink") && body.contains("invalid") && body.contains("not-a-url");
    let configured = metric_now(&observer, "tekton_step_observer_sink_configured").await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    wait_finished(&client, &ns.name, "tr").await;
    // Owed, not sent: the worker waits at its gate.
    let owed = try_wait_for(EVENT_DEADLINE, || async {
        let depth = metric_now(&observer, "tekton_step_observer_queue_depth").await;
        (depth >= 1.0).then_some(depth)
    })
    .await;
    let (status_later, _) = observer.readyz().await;
    let live = liveness(&mut observer).await;
    drop(observer);
    let held =
        held_events_arrive_at_a_good_sink("faults-input-invalid-sink", &client, &ns.name, &uid)
            .await;
    let tally = held.tally();
    let checks = json!({
        "logged_naming_the_url": line.as_ref().is_ok_and(|l| l.contains("not-a-url")),
        "readyz_503": status == 503 && status_later == 503,
        "readyz_names_the_problem": names_problem,
        "sink_configured_0": configured == 0.0,
        "events_owed": owed.is_some(),
        "observer_alive": live.ok(),
    });
    record_figures(
        "faults_input_invalid_sink_url",
        json!({
            "injected": "--sink not-a-url while a TaskRun of 2 steps finishes; then an \
                         observer with a good sink",
            "log_line": line.as_ref().ok(),
            "readyz_status": status,
            "readyz_body": body,
            "queue_depth_while_held": owed,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "checks": merge_checks(checks, held.checks()),
            "headline": format!(
                "/readyz {status} naming the bad sink, sink_configured {configured}, {} \
                 event(s) owed; an observer with a good sink then delivered {}/{}",
                owed.unwrap_or(0.0),
                tally.delivered,
                tally.expected
            ),
        }),
    );

    let line = line.unwrap_or_else(|why| panic!("{why}"));
    assert!(line.contains("not-a-url"), "{line}");
    assert_eq!(status, 503, "{body}");
    assert!(names_problem, "/readyz names the problem: {body}");
    assert_eq!(configured, 0.0);
    assert!(
        owed.is_some(),
        "timed out after {EVENT_DEADLINE:?} waiting for the observer to owe the events"
    );
    assert_eq!(status_later, 503);
    live.assert();
    held.assert();
}

/// What [`unusable_sink_holds_events`] saw, for the case to record before
/// it calls [`Unusable::assert`].
struct Unusable {
    detail: &'static str,
    /// The connection retries once they reached two (None: they never did).
    retries: Option<f64>,
    line: Result<String, String>,
    /// `events_total` of `started` events by outcome, while the sink was
    /// unusable.
    outcomes: Vec<(String, f64)>,
    live: Liveness,
    held: Held,
}

impl Unusable {
    fn checks(&self) -> Value {
        merge_checks(
            json!({
                "retried_twice": self.retries.is_some(),
                "log_line_says_why": self.line.as_ref().is_ok_and(|l| l.contains(self.detail)),
                "nothing_delivered_or_rejected": self.outcomes.iter().all(|(_, v)| *v == 0.0),
                "observer_alive": self.live.ok(),
            }),
            self.held.checks(),
        )
    }

    fn assert(&self) {
        assert!(
            self.retries.is_some(),
            "timed out after {EVENT_DEADLINE:?} waiting for two retries of the connection"
        );
        let line = self.line.as_ref().unwrap_or_else(|why| panic!("{why}"));
        assert!(
            line.contains(self.detail),
            "the log line says why ({}): {line}",
            self.detail
        );
        for (series, value) in &self.outcomes {
            assert_eq!(*value, 0.0, "{series}");
        }
        self.live.assert();
        self.held.assert();
    }
}

/// Runs `tr` against an observer whose sink never answers over HTTP, waits
/// until it retried twice and logged why, takes whether it is alive and held
/// everything, then lets a good sink have the events. Measures only: the
/// case records its figures, then calls [`Unusable::assert`].
async fn unusable_sink_holds_events(test: &str, sink: &str, detail: &'static str) -> Unusable {
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
    let retries = try_wait_for(EVENT_DEADLINE, || async {
        let value = metric_now(&observer, retries).await;
        (value >= 2.0).then_some(value)
    })
    .await;
    let line = find_log_line(&observer, "sink did not take the event; will retry").await;
    let mut outcomes = Vec::new();
    for outcome in ["delivered", "rejected"] {
        let series =
            format!(r#"tekton_step_observer_events_total{{type="started",outcome="{outcome}"}}"#);
        let value = metric_now(&observer, &series).await;
        outcomes.push((series, value));
    }
    let live = liveness(&mut observer).await;
    drop(observer);
    let held = held_events_arrive_at_a_good_sink(test, &client, &ns.name, &uid).await;
    Unusable {
        detail,
        retries,
        line,
        outcomes,
        live,
        held,
    }
}

/// `http://sink.invalid/`: name resolution fails inside the namespace; the
/// event is retried (a connection error), held, never dropped.
#[tokio::test(flavor = "multi_thread")]
async fn unresolvable_sink_is_retried_and_events_are_held() {
    const SINK: &str = "http://sink.invalid/";
    let unusable = unusable_sink_holds_events("fi-dns", SINK, "dns error").await;
    let tally = unusable.held.tally();
    record_figures(
        "faults_input_unresolvable_sink",
        json!({
            "log_line": unusable.line.as_ref().ok(),
            "injected": format!(
                "--sink {SINK}, a name that does not resolve, while a TaskRun of 2 steps \
                 finishes; then an observer with a good sink"
            ),
            "connect_retries": unusable.retries,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "checks": unusable.checks(),
            "headline": format!(
                "unresolvable sink: {} connection retries, nothing delivered, rejected or \
                 recorded; an observer with a good sink then delivered {}/{}",
                unusable.retries.unwrap_or(0.0),
                tally.delivered,
                tally.expected
            ),
        }),
    );
    unusable.assert();
}

/// A self-signed certificate for 127.0.0.1 (not a CA), made by openssl, as
/// an operator would make one for a test sink: (cert.pem, key.pem) in `dir`.
fn self_signed_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
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
    (cert, key)
}

/// An https sink with a self-signed certificate (openssl s_server on
/// loopback): rustls refuses it, and the events are retried and held, then
/// delivered to a good sink.
#[tokio::test(flavor = "multi_thread")]
async fn sink_with_a_bad_certificate_is_refused_and_events_are_held() {
    let dir = scratch_dir("bad-certificate");
    let (cert, key) = self_signed_certificate(&dir);
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
    let unusable = unusable_sink_holds_events(
        "fi-tls",
        &format!("https://127.0.0.1:{port}/"),
        "certificate",
    )
    .await;
    // The server saw the client abort the handshake with a TLS alert.
    let server_output = || {
        std::fs::read_to_string(&server_log).unwrap_or_default()
            + &std::fs::read_to_string(dir.join("s_server.err")).unwrap_or_default()
    };
    let alerted = try_wait_for(EVENT_DEADLINE, || async {
        let said = server_output();
        said.contains("alert").then_some(said)
    })
    .await;
    let server_said = alerted.clone().unwrap_or_else(server_output);
    drop(server);
    let tally = unusable.held.tally();
    let mut checks = unusable.checks();
    checks["server_saw_a_tls_alert"] = json!(alerted.is_some());
    record_figures(
        "faults_input_bad_certificate",
        json!({
            "log_line": unusable.line.as_ref().ok(),
            "server_output": tail(&server_said, 2000),
            "injected": "an https sink (openssl s_server on loopback) with a self-signed \
                         certificate while a TaskRun of 2 steps finishes; then an observer \
                         with a good sink",
            "connect_retries": unusable.retries,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "checks": checks,
            "headline": format!(
                "self-signed certificate refused: {} connection retries, {}; an observer \
                 with a good sink then delivered {}/{}",
                unusable.retries.unwrap_or(0.0),
                if alerted.is_some() {
                    "the server saw the TLS alert"
                } else {
                    "no TLS alert seen by the server"
                },
                tally.delivered,
                tally.expected
            ),
        }),
    );
    unusable.assert();
    assert!(
        alerted.is_some(),
        "timed out after {EVENT_DEADLINE:?} waiting for s_server to report the alert"
    );
}

/// The sibling of the case above: the same kind of sink (openssl's
/// self-signed certificate, here served by a rustls receiver, since
/// s_server does not answer POSTs), with that certificate trusted through
/// `--sink-ca-file`: every event arrives, once, in order, and the ledger
/// records them all.
#[tokio::test(flavor = "multi_thread")]
async fn sink_with_its_certificate_trusted_delivers_everything() {
    let dir = scratch_dir("trusted-certificate");
    let (cert, key) = self_signed_certificate(&dir);
    let issued = Issued {
        cert_pem: std::fs::read_to_string(&cert).unwrap(),
        key_pem: std::fs::read_to_string(&key).unwrap(),
    };
    let (addr, received) = start_tls_receiver(tls_server_config(&issued, None)).await;
    let client = client().await;
    let ns = TestNamespace::create(&client, "fi-tls-trusted").await;
    let sink = format!("https://127.0.0.1:{}/", addr.port());
    let observer = Observer::start(
        "fi-tls-trusted",
        &[
            "--namespace",
            &ns.name,
            "--sink",
            &sink,
            "--sink-ca-file",
            cert.to_str().unwrap(),
        ],
        None,
    )
    .await;
    let created = Instant::now();
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    let arrived = try_wait_for(EVENT_DEADLINE, || async {
        let events = received.for_taskrun(&uid);
        (events.len() >= TWO_STEPS_EVENTS.len()).then_some(events)
    })
    .await;
    let delivered_after = created.elapsed();
    let ledger_complete = try_wait_for(EVENT_DEADLINE, || async {
        let taskrun = get_taskrun(&client, &ns.name, "tr").await;
        let recorded: usize = ledger_of(&taskrun)?["statuses"]
            .as_array()?
            .iter()
            .map(|s| s["emitted"].as_array().map_or(0, Vec::len))
            .sum();
        (recorded == TWO_STEPS_EVENTS.len()).then_some(())
    })
    .await
    .is_some();
    let events = received.for_taskrun(&uid);
    let mut tally = Tally::default();
    tally.add("tr", &expect(&TWO_STEPS_EVENTS), &events);
    let handshake_failures = received.handshake_failures.lock().unwrap().len();
    let in_order = summary(&events) == expect(&TWO_STEPS_EVENTS);
    record_figures(
        "faults_input_bad_certificate_ca_configured",
        json!({
            "injected": "the same kind of https sink (a self-signed certificate made by openssl) \
                         with that certificate given to the observer as --sink-ca-file, while a \
                         TaskRun of 2 steps finishes",
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "handshake_failures": handshake_failures,
            "delivered_after_ms": delivered_after.as_millis(),
            "checks": {
                "all_delivered_in_order": in_order,
                "no_handshake_failed": handshake_failures == 0,
                "ledger_complete": ledger_complete,
            },
            "headline": format!(
                "self-signed certificate trusted with --sink-ca-file: {}/{} delivered in order, \
                 {} repeated, {} failed handshakes",
                tally.delivered, tally.expected, tally.repeats, handshake_failures
            ),
        }),
    );
    assert!(
        arrived.is_some(),
        "not every event arrived; log:\n{}",
        observer.log_text()
    );
    assert!(in_order, "{:?}", summary(&events));
    assert_eq!(tally.repeats, 0, "no event twice");
    assert_eq!(handshake_failures, 0);
    assert!(ledger_complete, "the ledger records every event");
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
    // The events each refused TaskRun calls for, each refused once: as many
    // EventRejected occurrences.
    const REFUSED_EACH: usize = 4;
    /// What one refused TaskRun left; asserted after the figures are recorded.
    struct Refused {
        ledger: Result<Value, String>,
        occurrences: i32,
        notes: Vec<String>,
    }
    // kube's Recorder folds Events of one reason about one object into a
    // series (keyed without the note), so count occurrences.
    let occurrences_of = |found: &[k8s_openapi::api::events::v1::Event]| -> i32 {
        found
            .iter()
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum()
    };
    let says_who_refused = |note: &str, status: u16| {
        note.contains("The sink refused the") && note.contains(&format!("with HTTP {status}"))
    };
    let mut refused = Vec::new();
    for (name, _, uid) in &rejected {
        let ledger = exact_ledger(&client, &ns.name, name, &want, EVENT_DEADLINE, &observer).await;
        let enough = try_wait_for(EVENT_DEADLINE, || async {
            let found = warnings(&client, &ns.name, uid, "EventRejected").await;
            (occurrences_of(&found) >= REFUSED_EACH as i32).then_some(found)
        })
        .await;
        let found = match enough {
            Some(found) => found,
            None => warnings(&client, &ns.name, uid, "EventRejected").await,
        };
        refused.push(Refused {
            ledger,
            occurrences: occurrences_of(&found),
            notes: found
                .iter()
                .map(|e| e.note.clone().unwrap_or_default())
                .collect(),
        });
    }

    // A sink failing with 500 three times, meanwhile: retried, then delivered.
    let flaky = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "flaky500", &two_steps(), None),
    )
    .await;
    let events = sink.wait_accepted(&flaky, TWO_STEPS_EVENTS.len()).await;
    let want_flaky = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    let flaky_ledger = exact_ledger(
        &client,
        &ns.name,
        "flaky500",
        &want_flaky,
        EVENT_DEADLINE,
        &observer,
    )
    .await;
    let answers = sink.answers_by_id(&flaky);
    let first_answers = answers.first().map(|(_, statuses)| statuses.as_slice());
    let control = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "control", &[ok("only")], None),
    )
    .await;
    let control_events = sink.wait_accepted(&control, CONTROL_EVENTS.len()).await;

    // Seconds of backoff later (flaky500 waited through three): the refused
    // events were each sent exactly once.
    let refused_answers: Vec<Vec<(String, Vec<u16>)>> = rejected
        .iter()
        .map(|(_, _, uid)| sink.answers_by_id(uid))
        .collect();
    let metrics = observer.metrics_text().await;
    let value = |series: &str| metric(&metrics, series).unwrap_or(-1.0);
    let rejected_counts: Vec<(String, f64, f64)> =
        [("started", 4.0), ("succeeded", 2.0), ("failed", 2.0)]
            .into_iter()
            .map(|(kind, count)| {
                let series = format!(
                    r#"tekton_step_observer_events_total{{type="{kind}",outcome="rejected"}}"#
                );
                let found = value(&series);
                (series, found, count)
            })
            .collect();
    let server_error_retries =
        value(r#"tekton_step_observer_delivery_retries_total{reason="server_error"}"#);
    let logged = find_log_line(&observer, "sink rejected the event for good").await;
    let live = liveness(&mut observer).await;

    let mut tally = Tally::default();
    tally.add("flaky500", &expect(&TWO_STEPS_EVENTS), &events);
    tally.add("control", &expect(&CONTROL_EVENTS), &control_events);
    let refused_sent: usize = refused_answers
        .iter()
        .flatten()
        .map(|(_, statuses)| statuses.len())
        .sum();
    let refused_once = refused_answers.iter().all(|answers| {
        answers.len() == REFUSED_EACH && answers.iter().all(|(_, statuses)| statuses.len() == 1)
    });
    let warning_occurrences: i32 = refused.iter().map(|r| r.occurrences).sum();
    record_figures(
        "faults_input_sink_status_codes",
        json!({
            "injected": "a sink answering 400 to every event of one TaskRun, 413 to every \
                         event of another, and 500 to its first three requests about a third",
            "refused_attempts": refused_sent,
            "event_rejected_occurrences": warning_occurrences,
            "server_error_retries": server_error_retries,
            "flaky_answers_of_first_event": first_answers,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "checks": {
                "refusals_recorded_in_ledger": refused.iter().all(|r| r.ledger.is_ok()),
                "one_warning_per_refused_event": refused
                    .iter()
                    .all(|r| r.occurrences == REFUSED_EACH as i32),
                "warning_says_who_refused_what": refused.iter().zip(&rejected).all(
                    |(r, (_, status, _))| r.notes.iter().all(|n| says_who_refused(n, *status))
                ),
                "retried_events_in_order": summary(&events) == expect(&TWO_STEPS_EVENTS),
                "retried_ledger_complete": flaky_ledger.is_ok(),
                "first_event_retried_through_three_500s":
                    first_answers == Some(&[500, 500, 500, 202][..]),
                "other_events_sent_once": answers.iter().skip(1).all(|(_, s)| s == &[202]),
                "control_delivered": control_events.len() >= CONTROL_EVENTS.len(),
                "refused_events_sent_once": refused_once,
                "rejections_counted": rejected_counts.iter().all(|(_, found, want)| found == want),
                "server_errors_retried_3_times": server_error_retries == 3.0,
                "logged": logged.is_ok(),
                "observer_alive": live.ok(),
            },
            "headline": format!(
                "400 and 413: {refused_sent} attempts for {} refused events, \
                 {warning_occurrences} EventRejected occurrences; 500 three times: \
                 {server_error_retries} retries, then {}/{} events delivered",
                REFUSED_EACH * rejected.len(),
                tally.delivered,
                tally.expected
            ),
        }),
    );

    for (r, (name, status, _)) in refused.iter().zip(&rejected) {
        assert_ledger(&r.ledger);
        assert_eq!(r.occurrences, 4, "{name}: one per refused event");
        for note in &r.notes {
            assert!(
                says_who_refused(note, *status),
                "{name}: the Event says who refused what: {note:?}"
            );
        }
    }
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    assert_ledger(&flaky_ledger);
    assert_eq!(
        first_answers,
        Some(&[500, 500, 500, 202][..]),
        "{answers:?}"
    );
    assert!(answers[1..].iter().all(|(_, s)| s == &[202]), "{answers:?}");
    assert!(
        control_events.len() >= CONTROL_EVENTS.len(),
        "timed out after {EVENT_DEADLINE:?} waiting for {} accepted events for {control}",
        CONTROL_EVENTS.len()
    );
    for (answers, (name, _, _)) in refused_answers.iter().zip(&rejected) {
        assert_eq!(answers.len(), 4, "{name}: {answers:?}");
        assert!(
            answers.iter().all(|(_, statuses)| statuses.len() == 1),
            "{name}: a refused event is never sent again: {answers:?}"
        );
    }
    for (series, found, count) in &rejected_counts {
        assert_eq!(found, count, "{series}\n{metrics}");
    }
    assert_eq!(server_error_retries, 3.0, "{metrics}");
    logged.unwrap_or_else(|why| panic!("{why}"));
    live.assert();
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
    // The first attempt and two retries: as many as `retried` below asks for.
    const GARBAGE_ANSWERS: usize = 3;
    let answered_garbage = try_wait_for(EVENT_DEADLINE, || async {
        (garbage.answered.load(Ordering::SeqCst) >= GARBAGE_ANSWERS).then_some(())
    })
    .await
    .is_some();
    let line = find_log_line(&observer, "sink did not take the event; will retry").await;
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
    let rejected: Vec<(String, Option<f64>)> = ["started", "succeeded", "failed"]
        .into_iter()
        .map(|kind| {
            let series =
                format!(r#"tekton_step_observer_events_total{{type="{kind}",outcome="rejected"}}"#);
            let found = metric(&metrics, &series);
            (series, found)
        })
        .collect();
    let recorded_during =
        get_taskrun(&client, &ns.name, "tr").await["metadata"]["annotations"][LEDGER_KEY].clone();
    let live_during = liveness(&mut observer).await;

    garbage.garbage.store(false, Ordering::SeqCst);
    let events = arrived(&received, &uid, TWO_STEPS_EVENTS.len(), EVENT_DEADLINE).await;
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    let ledger = exact_ledger(&client, &ns.name, "tr", &want, EVENT_DEADLINE, &observer).await;
    let sent = received.for_taskrun(&uid);
    let control = run_control(&client, &ns.name, "control", &received).await;
    let live = liveness(&mut observer).await;
    let mut tally = Tally::default();
    tally.add("tr", &expect(&TWO_STEPS_EVENTS), &sent);
    tally.add("control", &expect(&CONTROL_EVENTS), &control);
    let garbage_answers = garbage.answered.load(Ordering::SeqCst);
    record_figures(
        "faults_input_garbage_sink",
        json!({
            "garbage_answers": garbage_answers,
            "retries": retries.iter().map(|(s, v)| json!({"series": s, "value": v})).collect::<Vec<_>>(),
            "log_line": line.as_ref().ok(),
            "injected": "a sink answering garbage (not HTTP) on the socket while a TaskRun \
                         of 2 steps runs, until the test lets it speak HTTP again",
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "checks": {
                "garbage_answered": answered_garbage,
                "logged": line.is_ok(),
                "retried": total >= 2.0,
                "garbage_is_not_a_refusal": rejected.iter().all(|(_, v)| *v == Some(0.0)),
                "nothing_recorded_during_garbage": recorded_during.is_null(),
                "observer_alive_during_garbage": live_during.ok(),
                "all_events_in_order": summary(&events) == expect(&TWO_STEPS_EVENTS),
                "deterministic_ids": ids_deterministic(&events, &uid),
                "ledger_complete": ledger.is_ok(),
                "nothing_sent_twice": sent.len() == TWO_STEPS_EVENTS.len(),
                "control_delivered": control_delivered(&control),
                "observer_alive": live.ok(),
            },
            "headline": format!(
                "{garbage_answers} garbage answers, {total} retries, nothing rejected; once \
                 the sink spoke HTTP again {}/{} events delivered, {} repeated",
                tally.delivered, tally.expected, tally.repeats
            ),
        }),
    );

    assert!(
        answered_garbage,
        "timed out after {EVENT_DEADLINE:?} waiting for three garbage answers"
    );
    line.unwrap_or_else(|why| panic!("{why}"));
    assert!(total >= 2.0, "retried: {retries:?}");
    for (_, found) in &rejected {
        assert_eq!(*found, Some(0.0), "garbage is not a refusal");
    }
    assert!(recorded_during.is_null());
    live_during.assert();
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    assert_deterministic_ids(&events, &uid);
    assert_ledger(&ledger);
    assert_eq!(sent.len(), 4);
    assert_control(&control);
    live.assert();
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
    /// The observer's peak RSS stays below this: far below the log it tails.
    const PEAK_LIMIT_KIB: u64 = 60 * 1024;
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
    let want_events = expect(&[("big", "started"), ("big", "succeeded")]);
    let events = arrived(&received, &uid, want_events.len(), EVENT_DEADLINE).await;
    let delivered_in = started.elapsed();
    let data = events.get(1).map(data).unwrap_or_default();
    let log = data["log"].as_str();
    let peak_kib = peak_rss_kib(observer.pid());

    // The same tail as the API serves it, read independently.
    let taskrun = get_taskrun(&client, &ns.name, "tr").await;
    let pod = taskrun["status"]["podName"].as_str().expect("podName");
    let (total, api_tail) = log_tail(&client, &ns.name, pod, "step-big", LOG_LIMIT).await;

    let ledger = exact_ledger(
        &client,
        &ns.name,
        "tr",
        &ledger(&[("big", &["started", "succeeded"], &[])]),
        EVENT_DEADLINE,
        &observer,
    )
    .await;
    let control = run_control(&client, &ns.name, "control", &received).await;
    let live = liveness(&mut observer).await;
    let mut tally = Tally::default();
    tally.add("tr", &want_events, &events);
    tally.add("control", &expect(&CONTROL_EVENTS), &control);
    let tail_bytes = log.map_or(0, str::len);
    record_figures(
        "faults_input_big_log",
        json!({
            "log_bytes": LOG_BYTES,
            "observer_peak_rss_kib_before": baseline_kib,
            "observer_peak_rss_kib_after": peak_kib,
            "create_to_delivered_seconds": delivered_in.as_secs_f64(),
            "injected": format!(
                "a step logging {} MiB ({LOG_BYTES} bytes) before its last line",
                LOG_BYTES >> 20
            ),
            "tail_bytes": tail_bytes,
            "api_log_bytes": total,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            // The log is what the step writes; no fault ends.
            "recovery_seconds": null,
            "checks": {
                "events_in_order": summary(&events) == want_events,
                "tail_ends_with_the_last_line": log.is_some_and(|l| l.ends_with(&last_line)),
                "tail_is_log_limit_bytes": tail_bytes == LOG_LIMIT,
                "log_truncated_flag": data["logTruncated"] == true,
                "api_serves_the_whole_log": total == LOG_BYTES + last_line.len(),
                "tail_is_the_logs_last_bytes": log.is_some_and(|l| l.as_bytes() == &api_tail[..]),
                "ledger_complete": ledger.is_ok(),
                "control_delivered": control_delivered(&control),
                "observer_alive": live.ok(),
                "peak_rss_far_below_the_log": peak_kib < PEAK_LIMIT_KIB,
            },
            "headline": format!(
                "{} MiB step log: the event carried its last {tail_bytes} bytes, delivered \
                 {:.1} s after creation; observer peak RSS {baseline_kib} KiB at start, \
                 {peak_kib} KiB after",
                LOG_BYTES >> 20,
                delivered_in.as_secs_f64()
            ),
        }),
    );
    eprintln!(
        "100 MiB log: observer VmHWM {baseline_kib} KiB at start, {peak_kib} KiB after delivery; delivered {delivered_in:?} after creation"
    );

    assert_eq!(summary(&events), want_events);
    let log = log.unwrap_or_else(|| panic!("a log: {data}"));
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
    assert_ledger(&ledger);
    assert_control(&control);
    live.assert();
    assert!(
        peak_kib < PEAK_LIMIT_KIB,
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
    let events = arrived(&received, &uid, expected.len(), deadline).await;
    let all_events_in = started.elapsed();
    let all_events_at = chrono::Utc::now();
    let want: LedgerMap = steps
        .iter()
        .map(|s| {
            let mut types: Vec<String> = kinds.iter().map(|k| event_type(k)).collect();
            types.sort();
            (s.name.clone(), (types, Vec::new()))
        })
        .collect();
    let ledger = exact_ledger(&client, &ns.name, "tr", &want, deadline, &observer).await;
    let ledger_in = started.elapsed();
    let sent = received.for_taskrun(&uid);
    let no_taskrun = Value::Null;
    let taskrun = ledger.as_ref().unwrap_or(&no_taskrun);
    let condition = &taskrun["status"]["conditions"][0];
    let too_large = condition["message"]
        .as_str()
        .is_some_and(|m| m.contains("large"));
    let (condition_check, condition_as_expected) = if tekton_runs_it {
        ("taskrun_succeeded", condition["reason"] == "Succeeded")
    } else {
        (
            "pod_refused_as_too_large",
            condition["reason"] == "PodCreationFailed" && too_large,
        )
    };
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
    let delivered_metric = metric(
        &metrics,
        &format!(r#"tekton_step_observer_events_total{{type="{last_kind}",outcome="delivered"}}"#),
    );
    let live = liveness(&mut observer).await;
    let annotation_bytes = taskrun["metadata"]["annotations"][LEDGER_KEY]
        .as_str()
        .map_or(0, str::len);
    eprintln!(
        "{count} steps: {} events {all_events_in:?} after creation, ledger complete after \
         {ledger_in:?}; first to last transition {first_to_last_ms:?} ms; last event \
         {lag_ms:?} ms after its transition; ledger {annotation_bytes} bytes",
        expected.len()
    );
    let mut tally = Tally::default();
    tally.add("tr", &expected, &sent);
    let mut checks = json!({
        "all_events_in_step_order": summary(&events) == expected,
        "deterministic_ids": ids_deterministic(&events, &uid),
        "one_ledger_of_every_step": ledger.is_ok(),
        "none_twice": sent.len() == expected.len(),
        "delivered_metric_counts_every_step": delivered_metric == Some(count as f64),
        "observer_alive": live.ok(),
    });
    checks[condition_check] = json!(condition_as_expected);
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
            "injected": format!(
                "a TaskRun of {count} steps of 20 ms each ({})",
                if tekton_runs_it {
                    "about the most Tekton can put in one pod"
                } else {
                    "more than Tekton can put in one pod"
                }
            ),
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            // The TaskRun's size is the fault; it does not end.
            "recovery_seconds": null,
            "checks": checks,
            "headline": format!(
                "{count} steps, {}: {}/{} events in step order {:.1} s after creation, \
                 ledger of {annotation_bytes} bytes complete after {:.1} s",
                condition["reason"].as_str().unwrap_or("no condition"),
                tally.delivered,
                tally.expected,
                all_events_in.as_secs_f64(),
                ledger_in.as_secs_f64()
            ),
        }),
    );

    assert!(
        events.len() >= expected.len(),
        "timed out after {deadline:?} waiting for {} events",
        expected.len()
    );
    assert_eq!(summary(&events), expected, "in step order");
    assert_deterministic_ids(&events, &uid);
    assert_ledger(&ledger);
    assert_eq!(sent.len(), expected.len(), "none twice");
    if tekton_runs_it {
        assert_eq!(condition["reason"], "Succeeded", "{condition}");
    } else {
        assert_eq!(condition["reason"], "PodCreationFailed", "{condition}");
        assert!(too_large, "the pod is too large to store: {condition}");
    }
    assert_eq!(delivered_metric, Some(count as f64));
    live.assert();
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
    let early = received.for_taskrun(&uid).len();
    received.fail_with.store(0, Ordering::SeqCst);

    let events = arrived(&received, &uid, TWO_STEPS_EVENTS.len(), EVENT_DEADLINE).await;
    // The terminal events of `a` and `b`, which carry (here: lack) the logs.
    let terminals: Vec<&Event> = [1, 3].into_iter().filter_map(|i| events.get(i)).collect();
    let says_pod_gone =
        |why: &str| why.contains(&pod) && why.contains("not found") && why.contains("deleted");
    let exit_code = |terminal: &Event| {
        if terminal.subject() == Some("a") {
            0
        } else {
            1
        }
    };
    let want = ledger(&[
        ("a", &["started", "succeeded"], &[]),
        ("b", &["started", "failed"], &[]),
    ]);
    let ledger = exact_ledger(&client, &ns.name, "tr", &want, EVENT_DEADLINE, &observer).await;
    let read_errors = metric_now(&observer, "tekton_step_observer_log_read_errors_total").await;
    let control = run_control(&client, &ns.name, "control", &received).await;
    let live = liveness(&mut observer).await;
    let mut tally = Tally::default();
    tally.add("tr", &expect(&TWO_STEPS_EVENTS), &events);
    tally.add("control", &expect(&CONTROL_EVENTS), &control);
    let without_log = terminals
        .iter()
        .filter(|t| {
            let data = data(t);
            data["log"].is_null() && says_pod_gone(data["logError"].as_str().unwrap_or_default())
        })
        .count();
    record_figures(
        "faults_input_pod_deleted",
        json!({
            "injected": "the sink answers 503 while a TaskRun of 2 steps finishes, its pod \
                         is force-deleted before the logs were read, then the sink recovers",
            "log_read_errors_total": read_errors,
            "delivered_before_recovery": early,
            "expected": tally.expected,
            "delivered": tally.delivered,
            "missing": tally.missing,
            "repeats": tally.repeats,
            "checks": {
                "nothing_delivered_during_outage": early == 0,
                "all_events_in_order": summary(&events) == expect(&TWO_STEPS_EVENTS),
                "deterministic_ids": ids_deterministic(&events, &uid),
                "terminal_log_null": terminals.len() == 2
                    && terminals.iter().all(|t| data(t)["log"].is_null()),
                "log_error_says_the_pod_is_gone": terminals.len() == 2
                    && terminals.iter().all(|t| {
                        says_pod_gone(data(t)["logError"].as_str().unwrap_or_default())
                    }),
                "exit_codes_kept": terminals.len() == 2
                    && terminals.iter().all(|t| {
                        data(t)["stepState"]["terminated"]["exitCode"] == exit_code(t)
                    }),
                "ledger_complete": ledger.is_ok(),
                "log_read_errors_counted": read_errors == 2.0,
                "control_delivered": control_delivered(&control),
                "observer_alive": live.ok(),
            },
            "headline": format!(
                "pod deleted before its logs were read: {}/{} events delivered once the sink \
                 recovered, {without_log} terminal events with log null and a logError \
                 naming the pod, log_read_errors_total {read_errors}",
                tally.delivered, tally.expected
            ),
        }),
    );

    assert_eq!(early, 0, "nothing delivered yet");
    assert_eq!(summary(&events), expect(&TWO_STEPS_EVENTS));
    assert_deterministic_ids(&events, &uid);
    for terminal in [&events[1], &events[3]] {
        let data = data(terminal);
        assert_eq!(data["log"], Value::Null, "{data}");
        let why = data["logError"].as_str().unwrap_or_default();
        assert!(says_pod_gone(why), "logError says the pod is gone: {why:?}");
        assert_eq!(
            data["stepState"]["terminated"]["exitCode"],
            exit_code(terminal)
        );
    }
    assert_ledger(&ledger);
    assert_eq!(read_errors, 2.0);
    assert_control(&control);
    live.assert();
}
