#[allow(dead_code, reason = "shared by several test crates")]
#[path = "e2e/support.rs"]
mod support;
#[allow(dead_code, reason = "shared by several test crates")]
#[path = "e2e/workload.rs"]
mod workload;

// Fault suite, sink side: a steady workload of TaskRuns runs against the
// real observer process while the sink misbehaves (an outage that first
// answers 503 with `Retry-After` and then refuses connections, a sink that
// takes 5 s per answer, TaskRuns deleted while the sink is down). Each case
// judges what the sink acknowledged against the plan, checks the ledgers
// and records its figures for `make reliability` (RELIABILITY.md).
//
// The sink is in this process, so it can count every attempt and time it:
// [`FaultSink`] answers each request as told, and `close` really closes
// its listening socket and cuts every established connection (the port
// then refuses connections), `reopen` listens on the same port again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use cloudevents::{AttributesReader, Event};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use support::{
    Observer, TestNamespace, client, ledger_of, record_figures, taskrun_resource, try_wait_for,
    wait_finished, wait_for,
};
use workload::{Planned, Verdict, create_spread, judge, plan, total_expected};

/// The name of this suite in the figures.
const SUITE: &str = "faults_sink";

/// How long everything owed may take to arrive once the fault is over, on
/// a busy 2-core machine shared with other tests.
const SETTLE_DEADLINE: Duration = Duration::from_secs(300);

/// How often the ledgers are sampled while a fault lasts.
const LEDGER_SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// The seed of a case's workload: fixed, so figures compare across runs;
/// `FAULTS_SEED` replays another.
fn seed(default: u64) -> u64 {
    std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// The sink under the test's control.

/// How the sink answers events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// 202, and the event counts as acknowledged.
    Accept,
    /// 503, with `Retry-After: <secs>` when set; the event is not taken.
    Unavailable { retry_after_secs: Option<u64> },
}

/// One request the sink answered.
#[derive(Clone, Debug)]
struct Attempt {
    id: String,
    taskrun_uid: String,
    /// When the request was read.
    arrived: Instant,
    /// When the answer was decided, just before it was written.
    answered: Instant,
    status: u16,
    /// The `Retry-After` sent with the answer.
    retry_after: Option<Duration>,
}

/// One acknowledged event.
#[derive(Clone, Debug)]
struct Ack {
    at: Instant,
    event: Event,
}

/// Everything the sink saw.
#[derive(Default)]
struct Book {
    attempts: Vec<Attempt>,
    acks: Vec<Ack>,
    in_flight: usize,
    peak_in_flight: usize,
    in_flight_by_taskrun: HashMap<String, usize>,
    peak_in_flight_of_one_taskrun: usize,
}

struct Shared {
    answer: Mutex<Answer>,
    /// How long every answer takes.
    delay: Duration,
    book: Mutex<Book>,
}

impl Shared {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap()
    }
}

/// Counts a request as in flight until dropped, also when the client goes
/// away mid-answer and the handler is dropped.
struct InFlight {
    shared: Arc<Shared>,
    taskrun_uid: String,
}

impl InFlight {
    fn enter(shared: &Arc<Shared>, taskrun_uid: &str) -> Self {
        let mut book = shared.book();
        book.in_flight += 1;
        book.peak_in_flight = book.peak_in_flight.max(book.in_flight);
        let mine = book
            .in_flight_by_taskrun
            .entry(taskrun_uid.to_owned())
            .or_default();
        *mine += 1;
        let mine = *mine;
        book.peak_in_flight_of_one_taskrun = book.peak_in_flight_of_one_taskrun.max(mine);
        InFlight {
            shared: shared.clone(),
            taskrun_uid: taskrun_uid.to_owned(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut book = self.shared.book();
        book.in_flight -= 1;
        if let Some(mine) = book.in_flight_by_taskrun.get_mut(&self.taskrun_uid) {
            *mine -= 1;
        }
    }
}

fn taskrun_uid(event: &Event) -> String {
    event
        .extension("taskrunuid")
        .map(|v| v.to_string())
        .unwrap_or_default()
}

async fn receive(State(shared): State<Arc<Shared>>, event: Event) -> Response {
    let arrived = Instant::now();
    let uid = taskrun_uid(&event);
    let in_flight = InFlight::enter(&shared, &uid);
    if !shared.delay.is_zero() {
        tokio::time::sleep(shared.delay).await;
    }
    let answer = *shared.answer.lock().unwrap();
    // No longer in flight once the answer is decided: the sender only
    // sends its next request after reading this answer.
    drop(in_flight);
    let mut book = shared.book();
    let answered = Instant::now();
    let mut attempt = Attempt {
        id: event.id().to_owned(),
        taskrun_uid: uid,
        arrived,
        answered,
        status: 202,
        retry_after: None,
    };
    match answer {
        Answer::Accept => {
            book.attempts.push(attempt);
            book.acks.push(Ack {
                at: answered,
                event,
            });
            StatusCode::ACCEPTED.into_response()
        }
        Answer::Unavailable { retry_after_secs } => {
            attempt.status = 503;
            attempt.retry_after = retry_after_secs.map(Duration::from_secs);
            book.attempts.push(attempt);
            let mut response =
                (StatusCode::SERVICE_UNAVAILABLE, "injected outage\n").into_response();
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
    }
}

/// A CloudEvents sink on loopback whose answers, speed and very existence
/// the test controls.
struct FaultSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    /// A second handle on every accepted connection, so `close` can cut it.
    connections: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl FaultSink {
    /// Starts accepting every event; each answer takes `delay`.
    async fn start(delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sink = FaultSink {
            addr: listener.local_addr().unwrap(),
            shared: Arc::new(Shared {
                answer: Mutex::new(Answer::Accept),
                delay,
                book: Mutex::new(Book::default()),
            }),
            server: None,
            connections: Arc::default(),
        };
        sink.serve(listener);
        sink
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let connections = self.connections.clone();
        let listener = listener.tap_io(move |stream: &mut tokio::net::TcpStream| {
            let fd = stream
                .as_fd()
                .try_clone_to_owned()
                .expect("duplicate an accepted socket");
            connections
                .lock()
                .unwrap()
                .push(std::net::TcpStream::from(fd));
        });
        let app = axum::Router::new()
            .route("/", axum::routing::post(receive))
            .with_state(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn set_answer(&self, answer: Answer) {
        *self.shared.answer.lock().unwrap() = answer;
    }

    /// Closes the listening socket and cuts every established connection
    /// (keep-alive ones included); then checks the port refuses connections.
    async fn close(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            // Already closed by the peer is fine.
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
        let refused = tokio::net::TcpStream::connect(self.addr).await;
        assert!(
            matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "the closed sink's port must refuse connections, got {refused:?}"
        );
    }

    /// Listens on the same port again.
    async fn reopen(&mut self) {
        let addr = self.addr;
        let listener = wait_for(
            "the sink's port to be bound again",
            Duration::from_secs(10),
            || async move { tokio::net::TcpListener::bind(addr).await.ok() },
        )
        .await;
        self.serve(listener);
    }

    fn acks(&self) -> Vec<Ack> {
        self.shared.book().acks.clone()
    }

    fn acked_events(&self) -> Vec<Event> {
        self.shared
            .book()
            .acks
            .iter()
            .map(|a| a.event.clone())
            .collect()
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.shared.book().attempts.clone()
    }

    /// (most requests in flight at once, most of one TaskRun at once)
    fn peaks(&self) -> (usize, usize) {
        let book = self.shared.book();
        (book.peak_in_flight, book.peak_in_flight_of_one_taskrun)
    }
}

// ---------------------------------------------------------------------------
// Ledgers.

/// Entries of one TaskRun's ledger: event ids it says were emitted, and
/// how many it says were rejected.
struct LedgerView {
    uid: String,
    name: String,
    /// `(step, kind)` recorded as emitted.
    emitted: Vec<(String, String)>,
    /// Ids of the emitted entries, as the observer names events.
    emitted_ids: Vec<String>,
    rejected: usize,
}

fn kind_of(event_type: &str) -> String {
    event_type.rsplit('.').nth(1).unwrap_or_default().to_owned()
}

async fn list_ledgers(client: &Client, namespace: &str) -> Option<Vec<LedgerView>> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &taskrun_resource("v1"));
    let list = api.list(&ListParams::default()).await.ok()?;
    let mut views = Vec::new();
    for object in list.items {
        let value = serde_json::to_value(&object).unwrap();
        let uid = value["metadata"]["uid"].as_str().unwrap_or_default();
        let name = value["metadata"]["name"].as_str().unwrap_or_default();
        let mut view = LedgerView {
            uid: uid.to_owned(),
            name: name.to_owned(),
            emitted: Vec::new(),
            emitted_ids: Vec::new(),
            rejected: 0,
        };
        if let Some(ledger) = ledger_of(&value) {
            for status in ledger["statuses"].as_array().into_iter().flatten() {
                let step = status["name"].as_str().unwrap_or_default();
                for ty in status["emitted"].as_array().into_iter().flatten() {
                    let ty = ty.as_str().unwrap_or_default();
                    view.emitted.push((step.to_owned(), kind_of(ty)));
                    view.emitted_ids.push(format!("{uid}-{step}-{ty}"));
                }
                view.rejected += status["rejected"].as_array().map_or(0, Vec::len);
            }
        }
        views.push(view);
    }
    Some(views)
}

/// One look at every ledger of the namespace, compared with what the sink
/// had acknowledged by then.
struct LedgerSample {
    at: Instant,
    entries: usize,
    acknowledged: usize,
    /// Ledger entries the sink had not acknowledged.
    beyond_acknowledged: Vec<String>,
    rejected: usize,
}

/// Samples the ledgers every [`LEDGER_SAMPLE_PERIOD`] until `stop`.
fn sample_ledgers(
    client: Client,
    namespace: String,
    sink: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<LedgerSample>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if let Some(views) = list_ledgers(&client, &namespace).await {
                // Read after the list: an entry in the ledger was written
                // after the sink's answer, so it must be in this set.
                let acked: HashSet<String> = sink
                    .book()
                    .acks
                    .iter()
                    .map(|a| a.event.id().to_owned())
                    .collect();
                let ids: Vec<&String> = views.iter().flat_map(|v| &v.emitted_ids).collect();
                samples.push(LedgerSample {
                    at: Instant::now(),
                    entries: ids.len(),
                    acknowledged: acked.len(),
                    beyond_acknowledged: ids
                        .iter()
                        .filter(|id| !acked.contains(id.as_str()))
                        .map(|id| (*id).clone())
                        .collect(),
                    rejected: views.iter().map(|v| v.rejected).sum(),
                });
            }
            tokio::time::sleep(LEDGER_SAMPLE_PERIOD).await;
        }
        samples
    })
}

/// Waits until the ledger of every planned TaskRun records exactly its
/// expected events as emitted and nothing as rejected; returns the number
/// of entries, or what is still wrong at the deadline.
async fn wait_for_complete_ledgers(
    client: &Client,
    namespace: &str,
    plan: &[Planned],
    uids: &HashMap<String, String>,
) -> Result<usize, Vec<String>> {
    let last_problems = Mutex::new(Vec::new());
    let complete = try_wait_for(SETTLE_DEADLINE, || async {
        let views = list_ledgers(client, namespace).await?;
        let by_uid: HashMap<&str, &LedgerView> =
            views.iter().map(|v| (v.uid.as_str(), v)).collect();
        let mut problems = Vec::new();
        let mut entries = 0;
        for planned in plan {
            let uid = uids.get(&planned.name).map(String::as_str).unwrap_or("");
            let Some(view) = by_uid.get(uid) else {
                problems.push(format!("{}: TaskRun not found", planned.name));
                continue;
            };
            let mut want = planned.expected.clone();
            let mut got = view.emitted.clone();
            want.sort();
            got.sort();
            if want != got {
                problems.push(format!(
                    "{} ({}): ledger emitted {got:?}, expected {want:?}",
                    planned.name, view.name
                ));
            }
            if view.rejected > 0 {
                problems.push(format!("{}: {} rejected", planned.name, view.rejected));
            }
            entries += view.emitted.len();
        }
        let complete = problems.is_empty();
        *last_problems.lock().unwrap() = problems;
        complete.then_some(entries)
    })
    .await;
    complete.ok_or_else(|| last_problems.into_inner().unwrap())
}

// ---------------------------------------------------------------------------
// Measuring.

/// Waits until the sink acknowledged every event `plan` calls for; returns
/// the verdict either way (the caller asserts).
async fn wait_for_everything(
    sink: &FaultSink,
    plan: &[Planned],
    uids: &HashMap<String, String>,
    deadline: Duration,
) -> Verdict {
    let done = try_wait_for(deadline, || async {
        let verdict = judge(plan, uids, &sink.acked_events());
        verdict.missing.is_empty().then_some(verdict)
    })
    .await;
    done.unwrap_or_else(|| judge(plan, uids, &sink.acked_events()))
}

/// An event as `(TaskRun uid, step, kind)`.
type EventKey = (String, String, String);

fn key_of(event: &Event) -> EventKey {
    (
        taskrun_uid(event),
        event.subject().unwrap_or_default().to_owned(),
        kind_of(event.ty()),
    )
}

/// The planned events the TaskRuns' statuses, as the API shows them now,
/// already call for: a step's `started` once it runs or ended (step 0) or
/// its predecessor ended; its terminal event once it ended or the TaskRun
/// finished. What the observer owes at this moment, whatever the sink did.
async fn due_now(client: &Client, namespace: &str, plan: &[Planned]) -> HashSet<EventKey> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &taskrun_resource("v1"));
    let list = wait_for(
        "a list of the TaskRuns",
        Duration::from_secs(30),
        || async { api.list(&ListParams::default()).await.ok() },
    )
    .await;
    let by_name: HashMap<String, Value> = list
        .items
        .iter()
        .map(|o| {
            let value = serde_json::to_value(o).unwrap();
            (
                value["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                value,
            )
        })
        .collect();
    let mut due = HashSet::new();
    for planned in plan {
        let Some(taskrun) = by_name.get(&planned.name) else {
            continue;
        };
        let uid = taskrun["metadata"]["uid"].as_str().unwrap_or_default();
        let steps = taskrun["status"]["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let state = |name: &str| steps.iter().find(|s| s["name"] == name).cloned();
        let ended = |name: &str| state(name).is_some_and(|s| s.get("terminated").is_some());
        let began = |name: &str| {
            state(name).is_some_and(|s| s.get("running").is_some() || s.get("terminated").is_some())
        };
        let finished = taskrun["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Succeeded" && c["status"] != "Unknown");
        for (i, step) in planned.steps.iter().enumerate() {
            for (name, kind) in planned.expected.iter().filter(|(s, _)| *s == step.name) {
                let is_due = if kind == "started" {
                    match i {
                        0 => began(name),
                        _ => ended(&planned.steps[i - 1].name),
                    }
                } else {
                    ended(name) || finished
                };
                if is_due {
                    due.insert((uid.to_owned(), name.clone(), kind.clone()));
                }
            }
        }
    }
    due
}

/// Recovery after a fault that ended at `returned`, `due` being what the
/// TaskRuns called for at that moment: how long until every one of those
/// events not acknowledged before the return was acknowledged (`None` if
/// one never was). Returns (recovery, events owed at the return, time until
/// the last acknowledgement of the run).
fn recovery(
    acks: &[Ack],
    returned: Instant,
    due: &HashSet<EventKey>,
) -> (Option<Duration>, usize, Duration) {
    let mut first: HashMap<EventKey, Instant> = HashMap::new();
    for ack in acks {
        first.entry(key_of(&ack.event)).or_insert(ack.at);
    }
    let last = first
        .values()
        .map(|at| at.saturating_duration_since(returned))
        .max()
        .unwrap_or_default();
    let owed: Vec<&EventKey> = due
        .iter()
        .filter(|key| first.get(*key).is_none_or(|at| *at >= returned))
        .collect();
    let recovered = owed.iter().try_fold(Duration::ZERO, |longest, key| {
        let at = first.get(*key)?;
        Some(longest.max(at.saturating_duration_since(returned)))
    });
    (recovered, owed.len(), last)
}

/// How the observer spaced its retries after the sink's 503 + Retry-After.
#[derive(Debug, Default)]
struct RetryAfterCheck {
    answers_with_retry_after: usize,
    /// Pairs (503 with Retry-After, next request) checked, per id.
    pairs_same_id: usize,
    /// The same, per TaskRun (the next request of the TaskRun, any id).
    pairs_same_taskrun: usize,
    /// Ids that got at least two 503s (retried within the outage).
    ids_retried_during_503: usize,
    min_gap_same_id: Option<Duration>,
    min_gap_same_taskrun: Option<Duration>,
    /// Requests that came sooner than the Retry-After before them.
    too_soon: Vec<String>,
}

fn check_retry_after(attempts: &[Attempt]) -> RetryAfterCheck {
    let mut check = RetryAfterCheck {
        answers_with_retry_after: attempts.iter().filter(|a| a.retry_after.is_some()).count(),
        ..RetryAfterCheck::default()
    };
    let mut by_id: BTreeMap<&str, Vec<&Attempt>> = BTreeMap::new();
    let mut by_taskrun: BTreeMap<&str, Vec<&Attempt>> = BTreeMap::new();
    for attempt in attempts {
        by_id.entry(&attempt.id).or_default().push(attempt);
        by_taskrun
            .entry(&attempt.taskrun_uid)
            .or_default()
            .push(attempt);
    }
    for (grouping, groups) in [("id", &mut by_id), ("taskrun", &mut by_taskrun)] {
        for (key, group) in groups.iter_mut() {
            group.sort_by_key(|a| a.arrived);
            if grouping == "id" && group.iter().filter(|a| a.status == 503).count() >= 2 {
                check.ids_retried_during_503 += 1;
            }
            for pair in group.windows(2) {
                let (before, next) = (pair[0], pair[1]);
                let Some(wanted) = before.retry_after else {
                    continue;
                };
                let gap = next.arrived.saturating_duration_since(before.answered);
                let (pairs, min) = if grouping == "id" {
                    (&mut check.pairs_same_id, &mut check.min_gap_same_id)
                } else {
                    (
                        &mut check.pairs_same_taskrun,
                        &mut check.min_gap_same_taskrun,
                    )
                };
                *pairs += 1;
                *min = Some(min.map_or(gap, |m| m.min(gap)));
                if gap < wanted {
                    check.too_soon.push(format!(
                        "{grouping} {key}: next request {gap:?} after a 503 with Retry-After {wanted:?}"
                    ));
                }
            }
        }
    }
    check
}

/// The value of one series in the observer's /metrics text (0 if absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// `tekton_step_observer_delivery_retries_total` by reason.
fn retries_by_reason(text: &str) -> BTreeMap<String, f64> {
    [
        "connect",
        "timeout",
        "server_error",
        "throttled",
        "not_found",
        "conflict",
        "other",
    ]
    .into_iter()
    .map(|reason| {
        let series = format!("tekton_step_observer_delivery_retries_total{{reason=\"{reason}\"}}");
        (reason.to_owned(), metric(text, &series))
    })
    .collect()
}

const LOST_SERIES: &str = "tekton_step_observer_events_lost_total{reason=\"taskrun_deleted\"}";

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn opt_seconds(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(seconds(d)))
}

/// Deletes the test's namespace and waits for the API to accept it (the
/// TestNamespace guard's own delete may not run before the runtime ends).
async fn delete_namespace(client: &Client, namespace: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(namespace, &DeleteParams::default()).await;
}

/// Events acknowledged more than once, as `taskrun/step/kind (n times)`.
fn repeated(acks: &[Ack], uids: &HashMap<String, String>) -> Vec<String> {
    let names: HashMap<&str, &str> = uids
        .iter()
        .map(|(name, uid)| (uid.as_str(), name.as_str()))
        .collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for ack in acks {
        let (uid, step, kind) = key_of(&ack.event);
        let name = names.get(uid.as_str()).copied().unwrap_or(uid.as_str());
        *counts.entry(format!("{name}/{step}/{kind}")).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(event, n)| format!("{event} ({n} times)"))
        .collect()
}

fn merge(into: &mut HashMap<String, String>, more: HashMap<String, String>) {
    into.extend(more);
}

// ---------------------------------------------------------------------------
// The cases.

/// Mid-run, the sink answers 503 with `Retry-After` for 30 s, then refuses
/// connections for 30 s, then comes back on the same port.
#[tokio::test(flavor = "multi_thread")]
async fn sink_outage_loses_nothing_and_honours_retry_after() {
    const CASE: &str = "sink_outage_loses_nothing_and_honours_retry_after";
    const TASKRUNS: usize = 60;
    const CREATE_OVER: Duration = Duration::from_secs(90);
    const HEALTHY_FIRST: Duration = Duration::from_secs(20);
    const PHASE_503: Duration = Duration::from_secs(30);
    const PHASE_REFUSED: Duration = Duration::from_secs(30);
    // Longer than the observer's --retry-max-delay (2 s, set by
    // support::Observer), so only honouring the header explains the gaps.
    const RETRY_AFTER_SECS: u64 = 5;

    let began = Instant::now();
    let seed = seed(0x5eed_0001);
    let plan = plan(seed, TASKRUNS);
    eprintln!("{CASE}: seed {seed}, {} events", total_expected(&plan));
    let client = client().await;
    let ns = TestNamespace::create(&client, "fault-outage").await;
    let mut sink = FaultSink::start(Duration::ZERO).await;
    let sink_url = sink.url();
    let observer =
        Observer::start(CASE, &["--namespace", &ns.name, "--sink", &sink_url], None).await;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_ledgers(
        client.clone(),
        ns.name.clone(),
        sink.shared.clone(),
        stop_sampling.clone(),
    );

    // The workload runs throughout; the fault comes and goes mid-run.
    let fault = async {
        tokio::time::sleep(HEALTHY_FIRST).await;
        let outage_began = Instant::now();
        sink.set_answer(Answer::Unavailable {
            retry_after_secs: Some(RETRY_AFTER_SECS),
        });
        eprintln!("{CASE}: sink answers 503 + Retry-After");
        tokio::time::sleep(PHASE_503).await;
        sink.close().await;
        let refused_began = Instant::now();
        eprintln!("{CASE}: sink closed, connections refused");
        tokio::time::sleep(PHASE_REFUSED).await;
        sink.set_answer(Answer::Accept);
        sink.reopen().await;
        let returned = Instant::now();
        let due = due_now(&client, &ns.name, &plan).await;
        eprintln!("{CASE}: sink is back");
        (outage_began, refused_began, returned, due)
    };
    let (uids, (outage_began, refused_began, returned, due_at_return)) =
        tokio::join!(create_spread(&client, &ns.name, &plan, CREATE_OVER), fault);

    let verdict = wait_for_everything(&sink, &plan, &uids, SETTLE_DEADLINE).await;
    let ledgers = wait_for_complete_ledgers(&client, &ns.name, &plan, &uids).await;
    stop_sampling.store(true, Ordering::SeqCst);
    let samples = sampler.await.unwrap();

    let acks = sink.acks();
    let attempts = sink.attempts();
    let (recovered, owed_at_return, last_ack) = recovery(&acks, returned, &due_at_return);
    let repeats_after_return = {
        let mut seen = HashSet::new();
        let mut repeats = 0;
        for ack in &acks {
            if !seen.insert(ack.event.id().to_owned()) && ack.at >= returned {
                repeats += 1;
            }
        }
        repeats
    };
    let retry_after = check_retry_after(&attempts);
    let during_outage: Vec<&LedgerSample> = samples
        .iter()
        .filter(|s| s.at >= outage_began && s.at <= returned)
        .collect();
    let beyond: Vec<&String> = samples
        .iter()
        .flat_map(|s| &s.beyond_acknowledged)
        .collect();
    let acked_at_outage_start = acks.iter().filter(|a| a.at < outage_began).count();
    let acked_during_outage = acks
        .iter()
        .filter(|a| a.at >= outage_began && a.at < returned)
        .count();
    let metrics = observer.metrics_text().await;
    let retries = retries_by_reason(&metrics);
    let answers_503 = attempts.iter().filter(|a| a.status == 503).count();
    let ledger_entries = ledgers.as_ref().copied().unwrap_or(0);

    let repeated_events = repeated(&acks, &uids);
    let headline = format!(
        "Retry-After {RETRY_AFTER_SECS} s honoured: shortest gap after a 503 {} s over {} retries; no ledger ahead of the sink in {} samples during the outage; {owed_at_return} events owed at the return",
        opt_seconds(retry_after.min_gap_same_id),
        retry_after.pairs_same_id,
        during_outage.len(),
    );
    let mut figures = json!({
        "case": CASE,
        "suite": SUITE,
        "headline": headline,
        "repeated_events": repeated_events,
        "injected": format!(
            "mid-run sink outage of {} s: {} s answering 503 with Retry-After: {RETRY_AFTER_SECS} s, then {} s with its port closed and every connection cut (connection refused); then back on the same port",
            (PHASE_503 + PHASE_REFUSED).as_secs(),
            PHASE_503.as_secs(),
            PHASE_REFUSED.as_secs()
        ),
        "workload": {
            "taskruns": TASKRUNS,
            "created_over_seconds": CREATE_OVER.as_secs(),
            "seed": seed,
            "outage_began_after_seconds": seconds(outage_began - began),
        },
        "observer": {"retry_max_delay_seconds": 2, "max_concurrent_deliveries": 16},
        "recovery_seconds": opt_seconds(recovered),
        "recovery_definition": "from the sink's return until every event the TaskRuns' statuses called for at that moment (and not acknowledged before) was acknowledged",
        "owed_at_return": owed_at_return,
        "last_ack_after_return_seconds": seconds(last_ack),
        "repeats_after_return": repeats_after_return,
        "retry_after": {
            "seconds": RETRY_AFTER_SECS,
            "answers_503": answers_503,
            "answers_with_retry_after": retry_after.answers_with_retry_after,
            "ids_retried_during_503": retry_after.ids_retried_during_503,
            "pairs_checked_same_id": retry_after.pairs_same_id,
            "pairs_checked_same_taskrun": retry_after.pairs_same_taskrun,
            "min_gap_same_id_seconds": opt_seconds(retry_after.min_gap_same_id),
            "min_gap_same_taskrun_seconds": opt_seconds(retry_after.min_gap_same_taskrun),
            "too_soon": retry_after.too_soon.len(),
        },
        "observer_retries": retries,
        "ledger": {
            "samples": samples.len(),
            "samples_during_outage": during_outage.len(),
            "entries_beyond_acknowledged": beyond.len(),
            "rejected_entries": samples.iter().map(|s| s.rejected).max().unwrap_or(0),
            "max_entries_during_outage": during_outage.iter().map(|s| s.entries).max().unwrap_or(0),
            "max_acknowledged_during_outage": during_outage.iter().map(|s| s.acknowledged).max().unwrap_or(0),
            "acknowledged_before_outage": acked_at_outage_start,
            "acknowledged_during_outage": acked_during_outage,
            "final_entries": ledger_entries,
            "complete": ledgers.is_ok(),
        },
        "refused_phase_began_after_seconds": seconds(refused_began - began),
        "duration_seconds": seconds(began.elapsed()),
    });
    figures
        .as_object_mut()
        .unwrap()
        .extend(verdict.figures().as_object().unwrap().clone());
    let checks = json!({
        "zero_loss": verdict.missing.is_empty() && verdict.unexpected.is_empty(),
        "order_per_taskrun": verdict.out_of_order.is_empty(),
        "no_duplicates": verdict.repeats == 0,
        "retry_after_honoured": retry_after.too_soon.is_empty() && retry_after.pairs_same_id > 0,
        "ledger_only_acknowledged": beyond.is_empty() && !during_outage.is_empty(),
        "ledgers_complete": ledgers.is_ok(),
        "refusal_seen_by_observer": retries["connect"] > 0.0,
    });
    figures["checks"] = checks;
    record_figures(CASE, figures.clone());
    eprintln!(
        "{CASE}: {}",
        serde_json::to_string_pretty(&figures).unwrap()
    );

    let log = observer.log_text();
    let tail = &log[log.len().saturating_sub(4000)..];
    verdict.assert_no_loss();
    assert_eq!(
        verdict.repeats, 0,
        "events acknowledged more than once: {repeated_events:?}"
    );
    assert!(
        retry_after.pairs_same_id > 0 && retry_after.ids_retried_during_503 > 0,
        "no event was retried during the 503 phase, the Retry-After check saw nothing: {retry_after:?}"
    );
    assert!(
        retry_after.too_soon.is_empty(),
        "retries came sooner than Retry-After: {:?}",
        retry_after.too_soon
    );
    assert!(
        during_outage.len() >= 10,
        "too few ledger samples during the outage: {}",
        during_outage.len()
    );
    assert!(
        beyond.is_empty(),
        "ledger entries the sink never acknowledged: {beyond:?}"
    );
    assert_eq!(
        acked_during_outage, 0,
        "the sink acknowledged nothing while down"
    );
    assert!(
        retries["connect"] > 0.0,
        "the observer never met a refused connection: {retries:?}\n{tail}"
    );
    if let Err(problems) = &ledgers {
        panic!("ledgers incomplete: {problems:#?}");
    }
    delete_namespace(&client, &ns.name).await;
}

/// Every answer of the sink takes 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn slow_sink_does_not_block_other_taskruns() {
    const CASE: &str = "slow_sink_does_not_block_other_taskruns";
    const TASKRUNS: usize = 50;
    const CREATE_OVER: Duration = Duration::from_secs(15);
    const ANSWER_DELAY: Duration = Duration::from_secs(5);
    // ~600 events x 5 s / 40 = 75 s of sink time, below the 100 s the
    // longest TaskRun (20 events, one at a time) needs on its own; and
    // fewer slots than TaskRuns, so the bound is put to the test.
    const MAX_CONCURRENT: usize = 40;

    let began = Instant::now();
    let seed = seed(0x5eed_0002);
    let plan = plan(seed, TASKRUNS);
    let expected = total_expected(&plan);
    eprintln!("{CASE}: seed {seed}, {expected} events");
    let client = client().await;
    let ns = TestNamespace::create(&client, "fault-slow").await;
    let sink = FaultSink::start(ANSWER_DELAY).await;
    let sink_url = sink.url();
    let bound = MAX_CONCURRENT.to_string();
    let observer = Observer::start(
        CASE,
        &[
            "--namespace",
            &ns.name,
            "--sink",
            &sink_url,
            "--max-concurrent-deliveries",
            &bound,
        ],
        None,
    )
    .await;
    let created = Instant::now();
    let uids = create_spread(&client, &ns.name, &plan, CREATE_OVER).await;
    let verdict = wait_for_everything(&sink, &plan, &uids, SETTLE_DEADLINE).await;
    let all_acked = Instant::now();
    let ledgers = wait_for_complete_ledgers(&client, &ns.name, &plan, &uids).await;

    let (peak, peak_one_taskrun) = sink.peaks();
    let attempts = sink.attempts();
    let first_attempt = attempts.iter().map(|a| a.arrived).min();
    let last_ack = sink.acks().iter().map(|a| a.at).max();
    let busy = match (first_attempt, last_ack) {
        (Some(first), Some(last)) => last.saturating_duration_since(first),
        _ => Duration::ZERO,
    };
    let serial = ANSWER_DELAY * u32::try_from(attempts.len()).unwrap_or(u32::MAX);
    let metrics = observer.metrics_text().await;
    let retries = retries_by_reason(&metrics);

    let repeated_events = repeated(&sink.acks(), &uids);
    let headline = format!(
        "peak {peak} requests in flight (bound {MAX_CONCURRENT}), at most {peak_one_taskrun} per TaskRun; every event acknowledged {} s after the first creation (one at a time: {} s)",
        seconds(all_acked - created),
        seconds(serial),
    );
    let mut figures = json!({
        "case": CASE,
        "suite": SUITE,
        "headline": headline,
        "repeated_events": repeated_events,
        "injected": format!("every sink answer takes {} s (the observer's sink timeout is 10 s)", ANSWER_DELAY.as_secs()),
        "workload": {"taskruns": TASKRUNS, "created_over_seconds": CREATE_OVER.as_secs(), "seed": seed},
        "observer": {"max_concurrent_deliveries": MAX_CONCURRENT},
        "recovery_seconds": Value::Null,
        "peak_concurrent_requests": peak,
        "peak_concurrent_requests_of_one_taskrun": peak_one_taskrun,
        "requests": attempts.len(),
        "sink_busy_seconds": seconds(busy),
        "serial_seconds_would_be": seconds(serial),
        "completion_seconds": seconds(all_acked - created),
        "completion_definition": "from the first TaskRun's creation until the sink acknowledged every event",
        "observer_retries": retries,
        "ledger": {"final_entries": ledgers.as_ref().copied().unwrap_or(0), "complete": ledgers.is_ok()},
        "duration_seconds": seconds(began.elapsed()),
    });
    figures
        .as_object_mut()
        .unwrap()
        .extend(verdict.figures().as_object().unwrap().clone());
    figures["checks"] = json!({
        "zero_loss": verdict.missing.is_empty() && verdict.unexpected.is_empty(),
        "order_per_taskrun": verdict.out_of_order.is_empty(),
        "no_duplicates": verdict.repeats == 0,
        "concurrency_above_one": peak > 1,
        "concurrency_within_bound": peak <= MAX_CONCURRENT,
        "one_request_per_taskrun_at_a_time": peak_one_taskrun == 1,
        "ledgers_complete": ledgers.is_ok(),
    });
    record_figures(CASE, figures.clone());
    eprintln!(
        "{CASE}: {}",
        serde_json::to_string_pretty(&figures).unwrap()
    );

    verdict.assert_no_loss();
    assert_eq!(
        verdict.repeats, 0,
        "events acknowledged more than once: {repeated_events:?}"
    );
    assert!(
        peak > 1,
        "deliveries of different TaskRuns never overlapped"
    );
    assert!(
        peak <= MAX_CONCURRENT,
        "{peak} requests in flight, above --max-concurrent-deliveries {MAX_CONCURRENT}"
    );
    assert_eq!(
        peak_one_taskrun, 1,
        "a TaskRun had two requests in flight at once"
    );
    if let Err(problems) = &ledgers {
        panic!("ledgers incomplete: {problems:#?}");
    }
    delete_namespace(&client, &ns.name).await;
}

/// While the sink answers 503, a few finished TaskRuns are deleted: what
/// they still owed is lost, counted exactly, and never sent afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn deleted_taskrun_loss_is_counted() {
    const CASE: &str = "deleted_taskrun_loss_is_counted";
    const BEFORE: usize = 20;
    const DOOMED: usize = 5;
    const AFTER: usize = 30;

    let began = Instant::now();
    let seed = seed(0x5eed_0003);
    let plan = plan(seed, BEFORE + DOOMED + AFTER);
    let (before, rest) = plan.split_at(BEFORE);
    let (doomed, after) = rest.split_at(DOOMED);
    let survivors: Vec<Planned> = before.iter().chain(after).cloned().collect();
    eprintln!("{CASE}: seed {seed}");
    let client = client().await;
    let ns = TestNamespace::create(&client, "fault-deleted").await;
    let sink = FaultSink::start(Duration::ZERO).await;
    let sink_url = sink.url();
    let observer =
        Observer::start(CASE, &["--namespace", &ns.name, "--sink", &sink_url], None).await;

    let mut uids = create_spread(&client, &ns.name, before, Duration::from_secs(20)).await;
    sink.set_answer(Answer::Unavailable {
        retry_after_secs: None,
    });
    let outage_began = Instant::now();
    let doomed_uids = create_spread(&client, &ns.name, doomed, Duration::from_secs(3)).await;
    let doomed_set: HashSet<String> = doomed_uids.values().cloned().collect();

    let delete_doomed = async {
        for planned in doomed {
            wait_finished(&client, &ns.name, &planned.name).await;
        }
        // What each still owes: what it calls for, less what the sink took.
        let acked_of_doomed = sink
            .acks()
            .iter()
            .filter(|a| doomed_set.contains(&taskrun_uid(&a.event)))
            .count();
        let owed = doomed
            .iter()
            .map(|p| p.expected.len())
            .sum::<usize>()
            .saturating_sub(acked_of_doomed);
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns.name, &taskrun_resource("v1"));
        for planned in doomed {
            api.delete(&planned.name, &DeleteParams::default())
                .await
                .expect("delete a TaskRun");
        }
        let deleted = Instant::now();
        for planned in doomed {
            wait_for(
                &format!("TaskRun {} to be gone", planned.name),
                Duration::from_secs(60),
                || async {
                    api.get_opt(&planned.name)
                        .await
                        .ok()?
                        .is_none()
                        .then_some(())
                },
            )
            .await;
        }
        let counted = try_wait_for(Duration::from_secs(60), || async {
            let value = metric(&observer.metrics_text().await, LOST_SERIES);
            (value >= owed as f64).then_some(value)
        })
        .await;
        // Only now, with the loss counted, may the sink come back.
        sink.set_answer(Answer::Accept);
        let returned = Instant::now();
        let due = due_now(&client, &ns.name, &survivors).await;
        (owed, acked_of_doomed, deleted, counted, returned, due)
    };
    let (after_uids, (owed, acked_of_doomed, deleted, counted, returned, due_at_return)) = tokio::join!(
        create_spread(&client, &ns.name, after, Duration::from_secs(30)),
        delete_doomed
    );
    merge(&mut uids, after_uids);
    let verdict = wait_for_everything(&sink, &survivors, &uids, SETTLE_DEADLINE).await;
    let ledgers = wait_for_complete_ledgers(&client, &ns.name, &survivors, &uids).await;

    let lost_metric = metric(&observer.metrics_text().await, LOST_SERIES);
    let acks = sink.acks();
    let attempts = sink.attempts();
    let doomed_acks_after_delete = acks
        .iter()
        .filter(|a| doomed_set.contains(&taskrun_uid(&a.event)) && a.at >= deleted)
        .count();
    let doomed_attempts_after_return = attempts
        .iter()
        .filter(|a| doomed_set.contains(&a.taskrun_uid) && a.arrived >= returned)
        .count();
    let doomed_503s = attempts
        .iter()
        .filter(|a| doomed_set.contains(&a.taskrun_uid) && a.status == 503)
        .count();
    let survivors_acks: Vec<Ack> = acks
        .iter()
        .filter(|a| !doomed_set.contains(&taskrun_uid(&a.event)))
        .cloned()
        .collect();
    let (recovered, owed_at_return, last_ack) = recovery(&survivors_acks, returned, &due_at_return);
    let log = observer.log_text();
    let lost_logged = log
        .lines()
        .filter(|l| l.contains("TaskRun deleted before all its step events were delivered"))
        .count();

    let repeated_events = repeated(&acks, &uids);
    let headline = format!(
        "{DOOMED} deleted TaskRuns owed {owed} events: events_lost_total{{reason=\"taskrun_deleted\"}} = {lost_metric}, {lost_logged} warnings logged, {doomed_attempts_after_return} of their events sent after the sink's return"
    );
    let mut figures = json!({
        "case": CASE,
        "suite": SUITE,
        "headline": headline,
        "repeated_events": repeated_events,
        "injected": format!(
            "sink answers 503 (no Retry-After); {DOOMED} TaskRuns finish and are deleted before their events could be delivered; then the sink recovers"
        ),
        "workload": {
            "taskruns": plan.len(),
            "deleted_taskruns": DOOMED,
            "seed": seed,
            "outage_began_after_seconds": seconds(outage_began - began),
        },
        "observer": {"retry_max_delay_seconds": 2, "max_concurrent_deliveries": 16},
        "deleted_owed": owed,
        "deleted_acknowledged_before_delete": acked_of_doomed,
        "events_lost_total_taskrun_deleted": lost_metric,
        "loss_counted_within_seconds_of_delete": counted.map(|_| seconds(returned - deleted)),
        "lost_logged_taskruns": lost_logged,
        "deleted_attempts_during_outage": doomed_503s,
        "deleted_attempts_after_return": doomed_attempts_after_return,
        "deleted_acks_after_delete": doomed_acks_after_delete,
        "recovery_seconds": opt_seconds(recovered),
        "recovery_definition": "from the sink's return until every event the remaining TaskRuns' statuses called for at that moment (and not acknowledged before) was acknowledged",
        "owed_at_return": owed_at_return,
        "last_ack_after_return_seconds": seconds(last_ack),
        "ledger": {"final_entries": ledgers.as_ref().copied().unwrap_or(0), "complete": ledgers.is_ok()},
        "duration_seconds": seconds(began.elapsed()),
    });
    figures
        .as_object_mut()
        .unwrap()
        .extend(verdict.figures().as_object().unwrap().clone());
    figures["checks"] = json!({
        "lost_counted_exactly": lost_metric == owed as f64,
        "deleted_never_sent_after": doomed_attempts_after_return == 0 && doomed_acks_after_delete == 0,
        "others_zero_loss": verdict.missing.is_empty() && verdict.unexpected.is_empty(),
        "order_per_taskrun": verdict.out_of_order.is_empty(),
        "no_duplicates": verdict.repeats == 0,
        "ledgers_complete": ledgers.is_ok(),
    });
    record_figures(CASE, figures.clone());
    eprintln!(
        "{CASE}: {}",
        serde_json::to_string_pretty(&figures).unwrap()
    );

    assert!(
        owed > 0,
        "the deleted TaskRuns owed nothing: the case tested nothing"
    );
    assert_eq!(
        lost_metric, owed as f64,
        "{LOST_SERIES} must count exactly the {owed} events the deleted TaskRuns owed"
    );
    assert_eq!(
        lost_logged, DOOMED,
        "each deleted TaskRun's loss is logged once"
    );
    assert_eq!(
        doomed_attempts_after_return, 0,
        "the sink got events of deleted TaskRuns after it recovered"
    );
    assert_eq!(doomed_acks_after_delete, 0);
    verdict.assert_no_loss();
    assert_eq!(
        verdict.repeats, 0,
        "events acknowledged more than once: {repeated_events:?}"
    );
    if let Err(problems) = &ledgers {
        panic!("ledgers incomplete: {problems:#?}");
    }
    delete_namespace(&client, &ns.name).await;
}
