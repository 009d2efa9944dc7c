#[allow(dead_code, reason = "shared by several test crates")]
#[path = "e2e/support.rs"]
mod support;
#[allow(dead_code, reason = "shared by several test crates")]
#[path = "e2e/workload.rs"]
mod workload;

// Fault suite on the local cluster (`hack/cluster`): a steady workload of
// TaskRuns runs while the observer is SIGKILLed, its leader dies, or the
// API server or etcd restart under it. Each case checks that every event the
// workload calls for reached the sink, in order per TaskRun, that a repeat
// is only ever an event a killed process had delivered but not yet recorded
// (or recorded, and then saw taken out of the ledger by another writer only
// after it died), with the same id and content, that terminal events carry
// their log, and that every ledger ends up complete. The figures go to
// `support::record_figures` for RELIABILITY.md.
//
// `FAULTS_SEED=N` repeats a run's plan and fault moments (the seed is
// printed at the start of every case).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::time::Instant;

use support::{
    Observer, Received, TestNamespace, client, get_taskrun_opt, ledger_of, record_figures,
    start_receiver, taskrun_manifest, taskrun_resource, wait_for,
};
use workload::{Planned, Verdict, judge, plan, total_expected};

/// TaskRuns per case (3..=10 steps each, mixed outcomes).
const TASKRUNS: usize = 55;

/// The TaskRuns are created evenly over this long.
const SPREAD: Duration = Duration::from_secs(45);

/// `--max-concurrent-deliveries` of every observer here (the default, set
/// explicitly so the figures can quote it).
const MAX_CONCURRENT_DELIVERIES: usize = 16;

/// After the last TaskRun is created, everything must have arrived within
/// this long: generous for a loaded 2-core machine, and it includes a
/// restarted API server's watch backoff.
const DRAIN_DEADLINE: Duration = Duration::from_secs(150);

/// Then every ledger must be complete within this long.
const LEDGER_DEADLINE: Duration = Duration::from_secs(60);

/// How long an API call of the test itself is retried through an outage.
const API_RETRY_DEADLINE: Duration = Duration::from_secs(120);

/// A killed process's last request may still be in the receiver's hands;
/// the sink counts as settled when nothing arrived for this long.
const SINK_QUIET: Duration = Duration::from_millis(500);

/// Kills aimed right after a sink acknowledgement are tried up to this many
/// times until one lands before the ledger write that records it (the
/// write follows within milliseconds when a round ends, so a kill can miss).
const AIMED_KILL_TRIES: usize = 10;

/// The takeover we promise after the leader dies.
const TAKEOVER_PROMISE: Duration = Duration::from_secs(15);

const POLL: Duration = Duration::from_millis(100);

fn seed() -> u64 {
    let seed = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("FAULTS_SEED={seed}");
    seed
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Calls `call` until it succeeds, through transient API errors (an API
/// server restarting under the test), for at most `deadline`.
async fn retrying<T, F, Fut>(what: &str, deadline: Duration, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let until = Instant::now() + deadline;
    loop {
        match call().await {
            Ok(value) => return value,
            Err(error) if Instant::now() < until => {
                eprintln!("{what}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("{what}: still failing after {deadline:?}: {error}"),
        }
    }
}

fn taskruns(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &taskrun_resource("v1"))
}

/// Creates a TaskRun, retrying through an outage; a create that went
/// through although its answer was lost shows up as AlreadyExists, and the
/// TaskRun is then read back. Returns its uid.
async fn create_tolerant(client: &Client, namespace: &str, manifest: Value) -> String {
    let api = taskruns(client, namespace);
    let object: DynamicObject = serde_json::from_value(manifest).unwrap();
    let name = object.metadata.name.clone().expect("a name");
    retrying(
        &format!("create TaskRun {namespace}/{name}"),
        API_RETRY_DEADLINE,
        || async {
            match api.create(&PostParams::default(), &object).await {
                Ok(created) => Ok(created.metadata.uid.expect("uid")),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    api.get(&name).await.map(|o| o.metadata.uid.expect("uid"))
                }
                Err(error) => Err(error),
            }
        },
    )
    .await
}

/// The workload's TaskRuns as created: name → uid, and when each was created.
#[derive(Default)]
struct Created {
    uids: HashMap<String, String>,
    at: HashMap<String, Instant>,
}

/// Creates the planned TaskRuns on an even schedule over `over` (a create
/// held up by an outage does not push the later ones back).
async fn create_spread_tolerant(
    client: &Client,
    namespace: &str,
    plan: &[Planned],
    over: Duration,
) -> Created {
    let gap = over / u32::try_from(plan.len().max(1)).unwrap();
    let start = Instant::now();
    let mut created = Created::default();
    for (i, planned) in plan.iter().enumerate() {
        tokio::time::sleep_until(start + gap * u32::try_from(i).unwrap()).await;
        let manifest = taskrun_manifest("v1", &planned.name, &planned.steps, None);
        let uid = create_tolerant(client, namespace, manifest).await;
        created.uids.insert(planned.name.clone(), uid);
        created.at.insert(planned.name.clone(), Instant::now());
    }
    created
}

/// `(step, kind)` of an event, kind being the type's `<kind>.v1` part.
fn step_kind(event: &Event) -> (String, String) {
    let kind = event.ty().rsplit('.').nth(1).unwrap_or_default().to_owned();
    (event.subject().unwrap_or_default().to_owned(), kind)
}

fn taskrun_uid(event: &Event) -> String {
    event
        .extension("taskrunuid")
        .map(|v| v.to_string())
        .unwrap_or_default()
}

/// What one TaskRun's ledger records.
#[derive(Default)]
struct LedgerView {
    name: String,
    emitted: HashSet<(String, String)>,
    rejected: usize,
}

/// Every TaskRun's ledger in `namespace`, by uid (retried through outages).
async fn ledgers(client: &Client, namespace: &str) -> HashMap<String, LedgerView> {
    let api = taskruns(client, namespace);
    let list = retrying(
        &format!("list TaskRuns in {namespace}"),
        API_RETRY_DEADLINE,
        || async { api.list(&ListParams::default()).await },
    )
    .await;
    list.items.iter().map(ledger_view).collect()
}

/// A TaskRun's uid and what its ledger records.
fn ledger_view(object: &DynamicObject) -> (String, LedgerView) {
    let uid = object.metadata.uid.clone().unwrap_or_default();
    let name = object.metadata.name.clone().unwrap_or_default();
    let taskrun = serde_json::to_value(object).unwrap();
    let mut view = LedgerView {
        name,
        ..LedgerView::default()
    };
    if let Some(ledger) = ledger_of(&taskrun) {
        for status in ledger["statuses"].as_array().into_iter().flatten() {
            let step = status["name"].as_str().unwrap_or_default();
            for ty in status["emitted"].as_array().into_iter().flatten() {
                let kind = ty.as_str().unwrap_or_default().rsplit('.').nth(1);
                view.emitted
                    .insert((step.to_owned(), kind.unwrap_or_default().to_owned()));
            }
            view.rejected += status["rejected"].as_array().map_or(0, Vec::len);
        }
    }
    (uid, view)
}

/// The type prefix of every event here (the observer's default).
const PREFIX: &str = "dev.tekton.event.plugin.step";

/// One ledger entry: (TaskRun uid, step, kind).
type Entry = (String, String, String);

/// The id of the event a ledger entry stands for.
fn entry_event_id((uid, step, kind): &Entry) -> String {
    format!("{uid}-{step}-{PREFIX}.{kind}.v1")
}

/// What the ledgers of a namespace went through.
#[derive(Default)]
struct LedgerHistory {
    /// Each TaskRun's entries as last seen, by uid.
    current: HashMap<String, HashSet<(String, String)>>,
    /// When each entry was first seen.
    first_seen: HashMap<Entry, Instant>,
    /// Entries seen to vanish from a ledger, and when.
    vanished: Vec<(Entry, Instant)>,
}

/// Follows the ledgers of a namespace through a watch. An entry vanishes
/// when another writer puts an older annotation back over the observer's
/// (Tekton's controller does, see `Context::ledger_regressed`); an observer
/// that recorded the entry remembers it, but a process started after that
/// knows only what the annotation says, and sends the event again.
struct LedgerMonitor {
    history: Arc<Mutex<LedgerHistory>>,
    task: tokio::task::JoinHandle<()>,
}

impl LedgerMonitor {
    fn start(client: &Client, namespace: &str) -> Self {
        let api = taskruns(client, namespace);
        let history = Arc::new(Mutex::new(LedgerHistory::default()));
        let writer = history.clone();
        let task = tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let (Ok(watcher::Event::Apply(object)) | Ok(watcher::Event::InitApply(object))) =
                    event
                else {
                    continue;
                };
                let (uid, view) = ledger_view(&object);
                let now = Instant::now();
                let mut history = writer.lock().unwrap();
                for (step, kind) in &view.emitted {
                    history
                        .first_seen
                        .entry((uid.clone(), step.clone(), kind.clone()))
                        .or_insert(now);
                }
                let before = history
                    .current
                    .insert(uid.clone(), view.emitted.clone())
                    .unwrap_or_default();
                for (step, kind) in before.difference(&view.emitted) {
                    history
                        .vanished
                        .push(((uid.clone(), step.clone(), kind.clone()), now));
                }
            }
        });
        LedgerMonitor { history, task }
    }

    /// Ids of events whose entry was recorded before `recorded_before` and
    /// vanished after `vanished_after`.
    fn vanished(&self, recorded_before: Instant, vanished_after: Instant) -> HashSet<String> {
        let history = self.history.lock().unwrap();
        history
            .vanished
            .iter()
            .filter(|(entry, at)| {
                *at >= vanished_after
                    && history
                        .first_seen
                        .get(entry)
                        .is_some_and(|seen| *seen < recorded_before)
            })
            .map(|(entry, _)| entry_event_id(entry))
            .collect()
    }

    /// How many times an entry vanished.
    fn vanished_count(&self) -> usize {
        self.history.lock().unwrap().vanished.len()
    }
}

impl Drop for LedgerMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until nothing new has reached the sink for [`SINK_QUIET`]: the
/// requests a killed process had fully sent are then all in.
async fn sink_quiet(received: &Received) {
    let until = Instant::now() + Duration::from_secs(10);
    let mut count = received.events().len();
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = received.events().len();
        if now != count {
            count = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= SINK_QUIET {
            return;
        }
        assert!(
            Instant::now() < until,
            "the sink kept receiving events although no observer may send"
        );
    }
}

/// With no observer sending: the ids of events the sink acknowledged that no
/// ledger records. Exactly these may be sent again by whoever resumes.
async fn delivered_not_recorded(
    client: &Client,
    namespace: &str,
    received: &Received,
) -> HashSet<String> {
    sink_quiet(received).await;
    let arrived = received.events();
    let ledgers = ledgers(client, namespace).await;
    arrived
        .iter()
        .filter(|event| {
            ledgers
                .get(&taskrun_uid(event))
                .is_none_or(|ledger| !ledger.emitted.contains(&step_kind(event)))
        })
        .map(|event| event.id().to_owned())
        .collect()
}

/// Repeated ids that no fault explains: an id may arrive once more for every
/// fault at which it was delivered but not yet recorded.
fn unexplained_repeats(arrived: &[Event], allowances: &[HashSet<String>]) -> Vec<String> {
    let mut arrivals: HashMap<&str, usize> = HashMap::new();
    for event in arrived {
        *arrivals.entry(event.id()).or_default() += 1;
    }
    let mut unexplained: Vec<String> = arrivals
        .into_iter()
        .filter_map(|(id, count)| {
            let allowed = allowances.iter().filter(|set| set.contains(id)).count();
            (count > 1 + allowed)
                .then(|| format!("{id} arrived {count} times, allowed {}", 1 + allowed))
        })
        .collect();
    unexplained.sort();
    unexplained
}

/// For every repeat whose content differs from the first arrival: the id and
/// both versions of what differs (time, data fields).
fn changed_repeats(arrived: &[Event]) -> Vec<String> {
    let mut first: HashMap<&str, &Event> = HashMap::new();
    let mut changed = Vec::new();
    for event in arrived {
        let Some(earlier) = first.get(event.id()) else {
            first.insert(event.id(), event);
            continue;
        };
        let mut diff = Vec::new();
        if earlier.time() != event.time() {
            diff.push(format!("time {:?} then {:?}", earlier.time(), event.time()));
        }
        let (a, b) = (support::data(earlier), support::data(event));
        let keys: std::collections::BTreeSet<&String> = a
            .as_object()
            .into_iter()
            .chain(b.as_object())
            .flat_map(|o| o.keys())
            .collect();
        for key in keys {
            if a.get(key) != b.get(key) {
                diff.push(format!("data.{key}: {} then {}", a[key], b[key]));
            }
        }
        if earlier.ty() != event.ty() || earlier.source() != event.source() {
            diff.push("type or source".to_owned());
        }
        if !diff.is_empty() {
            changed.push(format!("{}: {}", event.id(), diff.join("; ")));
        }
    }
    changed
}

/// Terminal events of steps that ran but carry no log (`logError` instead).
fn logs_missing(arrived: &[Event]) -> Vec<String> {
    arrived
        .iter()
        .filter(|event| {
            let (_, kind) = step_kind(event);
            (kind == "succeeded" || kind == "failed") && support::data(event)["log"].is_null()
        })
        .map(|event| {
            format!(
                "{}: {}",
                event.id(),
                support::data(event)["logError"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// From `after`, how long until the next event arrived.
fn first_arrival_after(received: &Received, after: Instant) -> Option<Duration> {
    received
        .arrivals()
        .into_iter()
        .map(|(at, _)| at)
        .find(|at| *at >= after)
        .map(|at| at - after)
}

/// Waits (deadline) until every planned event arrived; returns the verdict
/// at that moment.
async fn await_all_arrived(plan: &[Planned], created: &Created, received: &Received) -> Verdict {
    let until = Instant::now() + DRAIN_DEADLINE;
    loop {
        let verdict = judge(plan, &created.uids, &received.events());
        if verdict.missing.is_empty() || Instant::now() > until {
            return verdict;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits (deadline) until every TaskRun's ledger records exactly the events
/// its plan calls for; returns the TaskRuns whose ledger is not there.
async fn await_ledgers(
    client: &Client,
    namespace: &str,
    plan: &[Planned],
    created: &Created,
) -> Vec<String> {
    let until = Instant::now() + LEDGER_DEADLINE;
    loop {
        let ledgers = ledgers(client, namespace).await;
        let incomplete: Vec<String> = plan
            .iter()
            .filter(|planned| {
                let uid = &created.uids[&planned.name];
                let want: HashSet<(String, String)> = planned.expected.iter().cloned().collect();
                ledgers
                    .get(uid)
                    .is_none_or(|ledger| ledger.emitted != want || ledger.rejected != 0)
            })
            .map(|planned| {
                let uid = &created.uids[&planned.name];
                let got = ledgers.get(uid).map_or(0, |l| l.emitted.len());
                let name = ledgers.get(uid).map_or("?", |l| l.name.as_str());
                format!("{name}: {got}/{} recorded", planned.expected.len())
            })
            .collect();
        if incomplete.is_empty() || Instant::now() > until {
            return incomplete;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The last lines of the observers' logs, for failure messages.
fn log_tails(observers: &[&Observer]) -> String {
    observers
        .iter()
        .map(|o| {
            let text = o.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("---- {} (last 40 lines) ----\n{tail}", o.log.display())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A process killed mid-run.
struct Kill {
    /// When.
    at: Instant,
    /// When a successor could send again (restart, or takeover): what the
    /// ledgers show before then was recorded by the killed process.
    resumed: Instant,
    /// Ids it had delivered but not recorded (see [`delivered_not_recorded`]).
    in_flight: HashSet<String>,
}

/// The plan, corrected by what Tekton did. NB: Tekton fails a TaskRun for
/// good when it cannot create its pod (`PodCreationFailed`), even on a
/// transient API error: turning the TaskSpec into a pod reads the
/// ServiceAccount, so an API server restart can fail a TaskRun created just
/// before it. Its steps never run, and what it calls for is every step
/// skipped; that comes from Tekton's own status, never from the observer.
/// Returns the corrected plan and the TaskRuns so corrected.
async fn plan_as_tekton_ran_it(
    client: &Client,
    namespace: &str,
    plan: &[Planned],
) -> (Vec<Planned>, Vec<String>) {
    let mut corrected = Vec::new();
    let mut plan = plan.to_vec();
    for planned in &mut plan {
        let Some(taskrun) = get_taskrun_opt(client, namespace, &planned.name).await else {
            continue;
        };
        let pod_never_created = taskrun["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "Succeeded"
                    && c["status"] == "False"
                    && c["reason"] == "PodCreationFailed"
            });
        if pod_never_created {
            planned.expected = planned
                .steps
                .iter()
                .map(|step| (step.name.clone(), "skipped".to_owned()))
                .collect();
            corrected.push(planned.name.clone());
        }
    }
    (plan, corrected)
}

/// Settles a case: waits for every event and every ledger, judges, records
/// the figures (also when the case then fails) and asserts.
#[allow(
    clippy::too_many_arguments,
    reason = "one call per case; a struct would only rename them"
)]
async fn settle_and_judge(
    case: &str,
    client: &Client,
    namespace: &str,
    plan: &[Planned],
    created: &Created,
    received: &Received,
    kills: &[Kill],
    monitor: &LedgerMonitor,
    observers: &[&Observer],
    mut figures: Value,
) {
    let (plan, failed_before_their_pod) = plan_as_tekton_ran_it(client, namespace, plan).await;
    let plan = plan.as_slice();
    figures["taskruns_tekton_failed_before_their_pod"] = json!(failed_before_their_pod);
    let arrived_in = await_all_arrived(plan, created, received).await;
    let incomplete = await_ledgers(client, namespace, plan, created).await;
    // The ledgers are complete, so nothing is owed and nothing more is sent:
    // this verdict sees every repeat there will be.
    let arrived = received.events();
    // What each killed process may have left to be sent again: what it had
    // delivered but not recorded, and what it had recorded but saw vanish
    // from the ledger only after it died (or never saw vanish).
    let vanished: Vec<HashSet<String>> = kills
        .iter()
        .map(|kill| {
            monitor
                .vanished(kill.resumed, kill.at)
                .difference(&kill.in_flight)
                .cloned()
                .collect()
        })
        .collect();
    let allowances: Vec<HashSet<String>> = kills
        .iter()
        .zip(&vanished)
        .map(|(kill, vanished)| kill.in_flight.union(vanished).cloned().collect())
        .collect();
    let allowances = allowances.as_slice();
    let verdict = judge(plan, &created.uids, &arrived);
    let unexplained = unexplained_repeats(&arrived, allowances);
    let missing_logs = logs_missing(&arrived);
    let allowed: usize = allowances.iter().map(HashSet::len).sum();
    figures["taskruns"] = json!(plan.len());
    figures["events"] = verdict.figures();
    figures["repeats"] = json!(verdict.repeats);
    figures["repeats_allowed"] = json!(allowed);
    figures["repeats_allowed_recorded_then_vanished"] =
        json!(vanished.iter().map(HashSet::len).sum::<usize>());
    figures["ledger_entries_vanished"] = json!(monitor.vanished_count());
    figures["repeats_unexplained"] = json!(unexplained.len());
    figures["terminal_events_without_log"] = json!(missing_logs.len());
    figures["ledgers_incomplete"] = json!(incomplete.len());
    figures["max_concurrent_deliveries"] = json!(MAX_CONCURRENT_DELIVERIES);
    let changed = changed_repeats(&arrived);
    // What the assertions below check, for the report.
    figures["checks"] = json!({
        "nothing_lost": arrived_in.missing.is_empty() && verdict.missing.is_empty(),
        "repeats_unchanged": changed.is_empty(),
        "repeats_explained_by_kills": unexplained.is_empty() && verdict.repeats <= allowed,
        "terminal_events_carry_logs": missing_logs.is_empty(),
        "ledgers_complete": incomplete.is_empty(),
        "all_delivered": verdict.delivered == total_expected(plan),
    });
    if figures.get("headline").is_none() {
        figures["headline"] = json!(format!(
            "{} TaskRuns, {} events; {} repeats ({} allowed by kills)",
            plan.len(),
            verdict.delivered,
            verdict.repeats,
            allowed
        ));
    }
    eprintln!(
        "{case}: {}",
        serde_json::to_string_pretty(&figures).unwrap()
    );
    record_figures(case, figures);

    assert!(
        arrived_in.missing.is_empty() && verdict.missing.is_empty(),
        "lost events (still missing {DRAIN_DEADLINE:?} after the workload): {:?}\n{}",
        verdict.missing,
        log_tails(observers)
    );
    assert!(
        changed.is_empty(),
        "repeats whose content changed: {changed:#?}"
    );
    verdict.assert_no_loss();
    assert!(
        unexplained.is_empty(),
        "repeats not explained by an event a killed process left unrecorded: {unexplained:?}\n{}",
        log_tails(observers)
    );
    assert!(
        verdict.repeats <= allowed,
        "{} repeats, but killed processes left only {allowed} events unrecorded",
        verdict.repeats
    );
    assert!(
        missing_logs.is_empty(),
        "terminal events went out without their log: {missing_logs:?}"
    );
    assert!(
        incomplete.is_empty(),
        "ledgers incomplete {LEDGER_DEADLINE:?} after the last event: {incomplete:?}\n{}",
        log_tails(observers)
    );
    assert_eq!(verdict.delivered, total_expected(plan));
}

/// Deletes a passed case's namespaces and waits for the API to accept it
/// (TestNamespace's own clean-up may not run before the test ends). A failed
/// case keeps them, to be looked at.
async fn delete_namespaces(client: &Client, namespaces: &[&TestNamespace]) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for ns in namespaces {
        retrying(
            &format!("delete namespace {}", ns.name),
            API_RETRY_DEADLINE,
            || async {
                match api.delete(&ns.name, &Default::default()).await {
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    other => other.map(|_| ()),
                }
            },
        )
        .await;
    }
}

/// An observer's `tekton_step_observer_leader` value; None while it does not answer.
async fn leads(observer: &Observer) -> Option<bool> {
    let text = reqwest::get(format!("http://{}/metrics", observer.metrics))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("tekton_step_observer_leader "))
        .map(|value| value.trim() == "1")
}

/// A metric's value (summed over its label sets), from an observer's /metrics.
async fn metric_sum(observer: &Observer, name: &str) -> f64 {
    let text = observer.metrics_text().await;
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn observer_args<'a>(namespace: &'a str, sink: &'a str, max: &'a str) -> Vec<&'a str> {
    vec![
        "--namespace",
        namespace,
        "--sink",
        sink,
        "--max-concurrent-deliveries",
        max,
    ]
}

/// One replica's arguments, with leader election on a Lease in `lease_namespace`.
fn replica_args<'a>(
    namespace: &'a str,
    sink: &'a str,
    max: &'a str,
    lease_namespace: &'a str,
    identity: &'a str,
) -> Vec<&'a str> {
    let mut args = observer_args(namespace, sink, max);
    args.extend([
        "--leader-elect",
        "--leader-election-namespace",
        lease_namespace,
        "--identity",
        identity,
    ]);
    args
}

fn sink_url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// Five SIGKILLs at random moments of the workload, each followed at once
/// by a restart with the same arguments. The first is aimed right after a
/// sink acknowledgement, and tried again until one lands before the ledger
/// write that records it: the repeats such a kill causes (the same ids, sent
/// again by the restarted process) are what a crash costs.
#[tokio::test(flavor = "multi_thread")]
async fn observer_sigkill_five_times_loses_nothing() {
    const CASE: &str = "observer_sigkill_five_times_loses_nothing";
    const KILLS: usize = 5;
    let started = Instant::now();
    let seed = seed();
    let plan = plan(seed, TASKRUNS);
    let client = client().await;
    let ns = TestNamespace::create(&client, "faults-sigkill").await;
    let (addr, received) = start_receiver().await;
    let sink = sink_url(addr);
    let max = MAX_CONCURRENT_DELIVERIES.to_string();
    let mut observer = Observer::start(
        "faults-sigkill",
        &observer_args(&ns.name, &sink, &max),
        None,
    )
    .await;

    // One kill in each fifth of the workload, at a random point of it.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5151);
    let slot = (SPREAD - Duration::from_secs(3)) / u32::try_from(KILLS).unwrap();
    let moments: Vec<Duration> = (0..KILLS)
        .map(|i| {
            Duration::from_secs(2)
                + slot * u32::try_from(i).unwrap()
                + slot.mul_f64(rng.random_range(0.0..1.0))
        })
        .collect();

    let monitor = LedgerMonitor::start(&client, &ns.name);
    let workload_start = Instant::now();
    let create = create_spread_tolerant(&client, &ns.name, &plan, SPREAD);
    let faults = async {
        let mut kills = Vec::new();
        // Kills aimed between a sink acknowledgement and the ledger write
        // that records it, until one lands there.
        let mut aimed_tries = 0;
        for (index, moment) in moments.iter().enumerate() {
            tokio::time::sleep_until(workload_start + *moment).await;
            loop {
                let aimed = index == 0;
                if aimed {
                    aimed_tries += 1;
                    let acknowledged = received.len();
                    wait_for("an acknowledgement to aim at", DRAIN_DEADLINE, || async {
                        (received.len() > acknowledged).then_some(())
                    })
                    .await;
                }
                let killed_at = Instant::now();
                let pid = observer.pid();
                observer.kill();
                let in_flight = delivered_not_recorded(&client, &ns.name, &received).await;
                let restart_at = Instant::now();
                observer.restart().await;
                eprintln!(
                    "killed observer pid {pid} at {:?}{}: {} events delivered but not recorded",
                    killed_at - workload_start,
                    if aimed {
                        " (right after an acknowledgement)"
                    } else {
                        ""
                    },
                    in_flight.len()
                );
                let landed = !in_flight.is_empty();
                kills.push(Kill {
                    at: killed_at,
                    resumed: restart_at,
                    in_flight,
                });
                if !aimed || landed || aimed_tries >= AIMED_KILL_TRIES {
                    break;
                }
            }
        }
        (kills, aimed_tries)
    };
    let (created, (kills, aimed_tries)) = tokio::join!(create, faults);

    // Recovery figures need the arrivals after each restart, so they are
    // read once everything has arrived.
    let verdict = await_all_arrived(&plan, &created, &received).await;
    let kill_figures: Vec<Value> = kills
        .iter()
        .map(|kill| {
            json!({
                "at_s": (kill.at - workload_start).as_secs_f64(),
                "down_ms": ms(kill.resumed - kill.at),
                "in_flight_unrecorded": kill.in_flight.len(),
                "first_delivery_after_restart_ms": first_arrival_after(&received, kill.resumed).map(ms),
                "first_delivery_after_kill_ms": first_arrival_after(&received, kill.at).map(ms),
            })
        })
        .collect();
    let recovery_max = kills
        .iter()
        .filter_map(|kill| first_arrival_after(&received, kill.resumed))
        .max()
        .map(ms);
    let figures = json!({
        "case": CASE,
        "seed": seed,
        "fault": format!("observer SIGKILLed {} times (the first aimed right after a sink acknowledgement: {aimed_tries} aimed kill(s) until one landed before the ledger write), restarted at once with the same arguments", kills.len()),
        "kills": kill_figures,
        "aimed_kill_tries": aimed_tries,
        "kills_between_ack_and_ledger_write": kills.iter().filter(|kill| !kill.in_flight.is_empty()).count(),
        "events_unrecorded_at_kills": kills.iter().map(|kill| kill.in_flight.len()).sum::<usize>(),
        "recovery_ms_max": recovery_max,
        "repeat_bound_kills_x_max_concurrent": KILLS * MAX_CONCURRENT_DELIVERIES,
        "missing_at_drain": verdict.missing.len(),
    });
    settle_and_judge(
        CASE,
        &client,
        &ns.name,
        &plan,
        &created,
        &received,
        &kills,
        &monitor,
        &[&observer],
        figures,
    )
    .await;
    assert!(
        kills.iter().any(|kill| !kill.in_flight.is_empty()),
        "no kill landed between a sink acknowledgement and its ledger write in {aimed_tries} aimed tries"
    );
    eprintln!("{CASE} took {:?}", started.elapsed());
    drop(observer);
    delete_namespaces(&client, &[&ns]).await;
}

/// Two replicas with leader election; the leader is SIGKILLed mid-run and
/// the standby must lead within 15 s and deliver everything.
#[tokio::test(flavor = "multi_thread")]
async fn leader_failover_within_fifteen_seconds() {
    const CASE: &str = "leader_failover_within_fifteen_seconds";
    let started = Instant::now();
    let seed = seed();
    let plan = plan(seed, TASKRUNS);
    let client = client().await;
    let ns = TestNamespace::create(&client, "faults-leader").await;
    let lease_ns = TestNamespace::create(&client, "faults-lease").await;
    let (addr, received) = start_receiver().await;
    let sink = sink_url(addr);
    let max = MAX_CONCURRENT_DELIVERIES.to_string();
    let replica =
        |identity: &'static str| replica_args(&ns.name, &sink, &max, &lease_ns.name, identity);
    let mut a = Observer::start("faults-leader-a", &replica("a"), None).await;
    wait_for("replica a to lead", Duration::from_secs(30), || async {
        leads(&a).await.filter(|l| *l)
    })
    .await;
    let mut b = Observer::start("faults-leader-b", &replica("b"), None).await;
    wait_for(
        "replica b to report standby",
        Duration::from_secs(30),
        || async { leads(&b).await.filter(|l| !*l).map(|_| ()) },
    )
    .await;

    let monitor = LedgerMonitor::start(&client, &ns.name);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1ead);
    let kill_after =
        Duration::from_secs(10) + Duration::from_secs(15).mul_f64(rng.random_range(0.0..1.0));
    let workload_start = Instant::now();
    let create = create_spread_tolerant(&client, &ns.name, &plan, SPREAD);
    let fault = async {
        tokio::time::sleep_until(workload_start + kill_after).await;
        // Whoever leads now (a, unless the lease moved) is killed.
        let (leader, standby, leader_id) = if leads(&a).await == Some(true) {
            (&mut a, &b, "a")
        } else {
            (&mut b, &a, "b")
        };
        assert_eq!(
            leads(standby).await,
            Some(false),
            "two leaders before the kill"
        );
        let killed_at = Instant::now();
        leader.kill();
        let in_flight = delivered_not_recorded(&client, &ns.name, &received).await;
        let counted_at = Instant::now();
        // The allowance above is only sound if the standby had not taken
        // over (and resent) yet; the lease makes it wait ~10 s.
        assert_eq!(
            leads(standby).await,
            Some(false),
            "the standby led before the in-flight events were counted"
        );
        let took_over = wait_for(
            "the standby to take the lease",
            TAKEOVER_PROMISE * 2,
            || async { leads(standby).await.filter(|l| *l).map(|_| Instant::now()) },
        )
        .await;
        let takeover = took_over - killed_at;
        eprintln!(
            "killed leader {leader_id} at {:?}; {} events delivered but not recorded; standby led after {takeover:?}",
            killed_at - workload_start,
            in_flight.len()
        );
        (leader_id, killed_at, counted_at, took_over, in_flight)
    };
    let (created, (leader_id, killed_at, counted_at, took_over, in_flight)) =
        tokio::join!(create, fault);
    let takeover = took_over - killed_at;
    let verdict = await_all_arrived(&plan, &created, &received).await;
    let survivor = if leader_id == "a" { &b } else { &a };
    let figures = json!({
        "case": CASE,
        "seed": seed,
        "fault": format!("leader replica {leader_id} of two SIGKILLed {:.1} s into the workload", (killed_at - workload_start).as_secs_f64()),
        "takeover_ms": ms(takeover),
        "takeover_promise_ms": ms(TAKEOVER_PROMISE),
        "in_flight_unrecorded": in_flight.len(),
        "first_delivery_after_takeover_ms": first_arrival_after(&received, took_over).map(ms),
        "first_delivery_after_kill_ms": first_arrival_after(&received, killed_at).map(ms),
        "missing_at_drain": verdict.missing.len(),
    });
    // The new leader records nothing before it delivers something (and the
    // killed one's last requests were all in when the count was taken).
    let resumed = first_arrival_after(&received, counted_at)
        .map_or(took_over, |after| (counted_at + after).min(took_over));
    let kills = [Kill {
        at: killed_at,
        resumed,
        in_flight,
    }];
    settle_and_judge(
        CASE,
        &client,
        &ns.name,
        &plan,
        &created,
        &received,
        &kills,
        &monitor,
        &[&a, &b],
        figures,
    )
    .await;
    assert!(
        takeover <= TAKEOVER_PROMISE,
        "the standby took {takeover:?} to lead after the leader died (promise: {TAKEOVER_PROMISE:?})"
    );
    assert_eq!(leads(survivor).await, Some(true));
    eprintln!("{CASE} took {:?}", started.elapsed());
    drop((a, b));
    delete_namespaces(&client, &[&ns, &lease_ns]).await;
}

/// The API server's count of PATCH requests on TaskRuns, by answer code
/// (`apiserver_request_total`): only the observer patches TaskRuns (Tekton
/// writes them with update), so these are its ledger writes.
async fn taskrun_patches_by_code(client: &Client) -> HashMap<String, f64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client
        .request_text(request)
        .await
        .expect("the API server's /metrics");
    let mut counts = HashMap::new();
    for line in text.lines().filter(|line| {
        line.starts_with("apiserver_request_total{")
            && line.contains(r#"resource="taskruns""#)
            && line.contains(r#"verb="PATCH""#)
    }) {
        let code = line
            .split(r#"code=""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?")
            .to_owned();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *counts.entry(code).or_default() += value;
    }
    counts
}

/// How often the ledger patch is refused because the TaskRun changed under
/// it, per 100 TaskRuns of the usual workload, from the API server's own
/// counts. A refused patch is a 409 (a write conditional on the
/// resourceVersion, which Tekton's status writes move on many times a
/// second) or a 422 (a JSON Patch whose `test` failed: the annotation
/// changed). `E2E_OBSERVER_BIN` measures another build the same way
/// (`E2E_OBSERVER_LABEL` then names the figures).
#[tokio::test(flavor = "multi_thread")]
async fn ledger_patch_conflicts_per_hundred_taskruns() {
    const TASKRUN_COUNT: usize = 100;
    let label = std::env::var("E2E_OBSERVER_LABEL").unwrap_or_default();
    let case = if label.is_empty() {
        "ledger_patch_conflicts_per_hundred_taskruns".to_owned()
    } else {
        format!("ledger_patch_conflicts_per_hundred_taskruns_{label}")
    };
    let started = Instant::now();
    let seed = seed();
    let plan = plan(seed, TASKRUN_COUNT);
    let client = client().await;
    let ns = TestNamespace::create(&client, "faults-conflicts").await;
    let (addr, received) = start_receiver().await;
    let sink = sink_url(addr);
    let max = MAX_CONCURRENT_DELIVERIES.to_string();
    let observer = Observer::start(&case, &observer_args(&ns.name, &sink, &max), None).await;
    let monitor = LedgerMonitor::start(&client, &ns.name);
    let before = taskrun_patches_by_code(&client).await;
    let created = create_spread_tolerant(&client, &ns.name, &plan, SPREAD).await;
    await_all_arrived(&plan, &created, &received).await;
    await_ledgers(&client, &ns.name, &plan, &created).await;
    let after = taskrun_patches_by_code(&client).await;
    let delta = |code: &str| after.get(code).unwrap_or(&0.0) - before.get(code).unwrap_or(&0.0);
    let patches: f64 = after.values().sum::<f64>() - before.values().sum::<f64>();
    let refused = delta("409") + delta("422");
    let per_hundred = |n: f64| n * 100.0 / TASKRUN_COUNT as f64;
    let observer_counted = metric_sum(
        &observer,
        "tekton_step_observer_ledger_patch_conflicts_total",
    )
    .await;
    let figures = json!({
        "case": case,
        "seed": seed,
        "observer_build": if label.is_empty() { "this revision".to_owned() } else { label.clone() },
        "injected": format!("no fault: the usual workload ({TASKRUN_COUNT} TaskRuns of 3 to 10 steps), counting the ledger patches the API server refused"),
        "ledger_patches": patches,
        "refused_409": delta("409"),
        "refused_422_failed_test": delta("422"),
        "conflicts_per_100_taskruns": per_hundred(refused),
        "patches_per_100_taskruns": per_hundred(patches),
        "observer_metric_ledger_patch_conflicts_total": observer_counted,
        "headline": format!("{:.1} refused ledger patches per 100 TaskRuns ({} of {} patches: {} answered 409, {} answered 422)", per_hundred(refused), refused, patches, delta("409"), delta("422")),
    });
    settle_and_judge(
        &case,
        &client,
        &ns.name,
        &plan,
        &created,
        &received,
        &[],
        &monitor,
        &[&observer],
        figures,
    )
    .await;
    eprintln!("{case} took {:?}", started.elapsed());
    drop(observer);
    delete_namespaces(&client, &[&ns]).await;
}

/// A rolling restart of a Deployment of two replicas, as Kubernetes does
/// it: a new replica starts, then an old one gets SIGTERM, twice over. The
/// one that leads at its SIGTERM finishes its sends, writes its ledgers and
/// hands the Lease over; nothing may be sent twice.
#[tokio::test(flavor = "multi_thread")]
async fn rolling_restart_repeats_nothing() {
    const CASE: &str = "rolling_restart_repeats_nothing";
    /// SIGTERM to exit: the observer's grace period (20 s) plus margin.
    const EXIT_DEADLINE: Duration = Duration::from_secs(25);
    /// Between the two steps of the roll, so that both fall in the workload.
    const ROLL_PAUSE: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let seed = seed();
    let plan = plan(seed, TASKRUNS);
    let client = client().await;
    let ns = TestNamespace::create(&client, "faults-rolling").await;
    let lease_ns = TestNamespace::create(&client, "faults-rolling-lease").await;
    let (addr, received) = start_receiver().await;
    let sink = sink_url(addr);
    let max = MAX_CONCURRENT_DELIVERIES.to_string();
    let replica =
        |identity: &'static str| replica_args(&ns.name, &sink, &max, &lease_ns.name, identity);
    let old_a = Observer::start("faults-rolling-a", &replica("a"), None).await;
    wait_for("replica a to lead", Duration::from_secs(30), || async {
        leads(&old_a).await.filter(|l| *l)
    })
    .await;
    let old_b = Observer::start("faults-rolling-b", &replica("b"), None).await;

    let mut rng = StdRng::seed_from_u64(seed ^ 0x2011);
    let first_at =
        Duration::from_secs(8) + Duration::from_secs(10).mul_f64(rng.random_range(0.0..1.0));
    let monitor = LedgerMonitor::start(&client, &ns.name);
    let workload_start = Instant::now();
    let create = create_spread_tolerant(&client, &ns.name, &plan, SPREAD);
    let roll = async {
        tokio::time::sleep_until(workload_start + first_at).await;
        let mut steps = Vec::new();
        let mut replaced = Vec::new();
        for (mut old, identity) in [(old_a, "c"), (old_b, "d")] {
            // maxSurge 1: the new replica is up before the old one stops.
            let new = Observer::start(
                &format!("faults-rolling-{identity}"),
                &replica(identity),
                None,
            )
            .await;
            let led = leads(&old).await == Some(true);
            let stopped_at = Instant::now();
            assert!(
                old.terminate(EXIT_DEADLINE).await,
                "a replica exits on SIGTERM within its grace period:\n{}",
                old.log_text()
            );
            steps.push(json!({
                "at_s": (stopped_at - workload_start).as_secs_f64(),
                "stopped_leader": led,
                "exit_ms": ms(stopped_at.elapsed()),
            }));
            replaced.push((old, new));
            // Like a Deployment's minReadySeconds: the next step waits a while.
            tokio::time::sleep(ROLL_PAUSE).await;
        }
        (steps, replaced)
    };
    let (created, (steps, replaced)) = tokio::join!(create, roll);
    let verdict = await_all_arrived(&plan, &created, &received).await;
    let figures = json!({
        "case": CASE,
        "seed": seed,
        "fault": format!("rolling restart of two replicas with leader election: a new replica started, then an old one SIGTERMed, twice, from {:.1} s into the workload", first_at.as_secs_f64()),
        "steps": steps,
        "missing_at_drain": verdict.missing.len(),
    });
    let observers: Vec<&Observer> = replaced.iter().flat_map(|(old, new)| [old, new]).collect();
    // No kills: no repeat is allowed.
    settle_and_judge(
        CASE,
        &client,
        &ns.name,
        &plan,
        &created,
        &received,
        &[],
        &monitor,
        &observers,
        figures,
    )
    .await;
    eprintln!("{CASE} took {:?}", started.elapsed());
    drop(replaced);
    delete_namespaces(&client, &[&ns, &lease_ns]).await;
}

/// The cluster directory of the cluster the test runs against (KUBECONFIG
/// is `<dir>/kubeconfig`, set by `hack/cluster exec`).
fn cluster_dir() -> PathBuf {
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG (run via hack/cluster exec)");
    PathBuf::from(kubeconfig)
        .parent()
        .expect("KUBECONFIG is <cluster dir>/kubeconfig")
        .to_path_buf()
}

/// What `hack/cluster restart` reported.
struct Restart {
    began: Instant,
    ready: Instant,
    report: String,
}

/// Restarts a cluster component with `hack/cluster restart` (stop, start
/// with the same arguments, wait for the API server's /readyz).
async fn restart_component(component: &'static str) -> Restart {
    let began = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/cluster"))
            .args(["restart", component])
            .env("TSO_CLUSTER_DIR", cluster_dir())
            .output()
            .expect("run hack/cluster restart")
    })
    .await
    .unwrap();
    let ready = Instant::now();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "hack/cluster restart {component} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Restart {
        began,
        ready,
        report: stdout,
    }
}

/// How many status writes the cluster's node agent has had to retry so far
/// (`cannot write the pod's status` in its log). It retries until the write
/// lands, as a kubelet does, so an outage delays pod statuses but loses none.
fn node_agent_status_retries() -> usize {
    std::fs::read_to_string(cluster_dir().join("logs/node-agent.log"))
        .unwrap_or_default()
        .matches("cannot write the pod's status")
        .count()
}

/// Probes the API server's /readyz every 100 ms until stopped; returns
/// (when it was first not ready, when it was ready again) after `from`.
async fn probe_outage(
    client: Client,
    from: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Option<(Instant, Instant)> {
    let mut down_since: Option<Instant> = None;
    let mut outage = None;
    while !*stop.borrow() {
        let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(1), client.request_text(request))
            .await
            .is_ok_and(|r| r.is_ok_and(|text| text.trim() == "ok"));
        let now = Instant::now();
        match (ready, down_since) {
            (false, None) if now >= from => down_since = Some(now),
            (true, Some(since)) if outage.is_none() => outage = Some((since, now)),
            _ => {}
        }
        tokio::time::sleep(POLL).await;
    }
    outage
}

/// Restarts `component` once mid-workload; everything must still arrive.
async fn component_restart_case(case: &str, component: &'static str) {
    let started = Instant::now();
    let seed = seed();
    let plan = plan(seed, TASKRUNS);
    let client = client().await;
    let ns = TestNamespace::create(&client, &format!("faults-{component}")).await;
    let (addr, received) = start_receiver().await;
    let sink = sink_url(addr);
    let max = MAX_CONCURRENT_DELIVERIES.to_string();
    let observer = Observer::start(
        &format!("faults-{component}"),
        &observer_args(&ns.name, &sink, &max),
        None,
    )
    .await;
    let monitor = LedgerMonitor::start(&client, &ns.name);
    let watch_errors_before =
        metric_sum(&observer, "tekton_step_observer_watch_errors_total").await;

    let mut rng = StdRng::seed_from_u64(seed ^ 0xa9e);
    let restart_after =
        Duration::from_secs(10) + Duration::from_secs(12).mul_f64(rng.random_range(0.0..1.0));
    let workload_start = Instant::now();
    let (stop_probe, stop_rx) = tokio::sync::watch::channel(false);
    let probe = tokio::spawn(probe_outage(
        client.clone(),
        workload_start + restart_after,
        stop_rx,
    ));
    let create = create_spread_tolerant(&client, &ns.name, &plan, SPREAD);
    let fault = async {
        tokio::time::sleep_until(workload_start + restart_after).await;
        let retries_before = node_agent_status_retries();
        let restart = restart_component(component).await;
        eprintln!(
            "restarted {component} at {:?}: {} (ready after {:?})",
            restart.began - workload_start,
            restart.report,
            restart.ready - restart.began
        );
        (restart, retries_before)
    };
    let (created, (restart, retries_before)) = tokio::join!(create, fault);
    stop_probe.send_replace(true);
    let outage = probe.await.unwrap();
    let verdict = await_all_arrived(&plan, &created, &received).await;

    // The watch is back once a TaskRun created after the restart is
    // reported: from its creation to its first event.
    let first_new = plan
        .iter()
        .filter(|p| created.at[&p.name] >= restart.ready)
        .filter_map(|p| {
            let uid = &created.uids[&p.name];
            let first = received
                .arrivals()
                .into_iter()
                .find(|(_, e)| taskrun_uid(e) == *uid)?;
            Some(first.0.saturating_duration_since(created.at[&p.name]))
        })
        .next();
    let watch_errors = metric_sum(&observer, "tekton_step_observer_watch_errors_total").await
        - watch_errors_before;
    let figures = json!({
        "case": case,
        "seed": seed,
        "fault": format!("{component} restarted (hack/cluster restart) {:.1} s into the workload", (restart.began - workload_start).as_secs_f64()),
        "restart_report": restart.report,
        "restart_to_ready_ms": ms(restart.ready - restart.began),
        "api_outage_ms": outage.map(|(down, up)| ms(up - down)),
        "first_delivery_after_restart_began_ms": first_arrival_after(&received, restart.began).map(ms),
        "first_delivery_after_ready_ms": first_arrival_after(&received, restart.ready).map(ms),
        "first_new_taskrun_event_after_ready_ms": first_new.map(ms),
        "watch_errors": watch_errors,
        "node_agent_status_write_retries": node_agent_status_retries() - retries_before,
        "missing_at_drain": verdict.missing.len(),
    });
    settle_and_judge(
        case,
        &client,
        &ns.name,
        &plan,
        &created,
        &received,
        &[],
        &monitor,
        &[&observer],
        figures,
    )
    .await;
    eprintln!("{case} took {:?}", started.elapsed());
    drop(observer);
    delete_namespaces(&client, &[&ns]).await;
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(pid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .is_ok_and(|status| status.success());
    assert!(sent, "kill -{signal} {pid}");
}

/// A TaskRun deleted while the observer's watch was away is absent from the
/// relist that follows, and no Delete event ever comes for it. The observer
/// is frozen (SIGSTOP) while its TaskRun still owes events (the sink answers
/// 503), the API server restarts and the TaskRun is deleted: the new API
/// server's watch cache starts after the observer's resourceVersion, so the
/// resumed watch is refused with 410 Gone and the observer lists again. Nothing more may
/// be sent for the deleted TaskRun, and what it owed is counted as lost.
async fn watch_gap_case() {
    const CASE: &str = "taskrun_deleted_during_a_watch_gap_sends_nothing_and_counts_the_loss";
    let started = Instant::now();
    let client = client().await;
    let ns = TestNamespace::create(&client, "faults-watch-gap").await;
    let (addr, received) = start_receiver().await;
    received
        .fail_with
        .store(503, std::sync::atomic::Ordering::SeqCst);
    let sink = sink_url(addr);
    let max = MAX_CONCURRENT_DELIVERIES.to_string();
    let observer = Observer::start(CASE, &observer_args(&ns.name, &sink, &max), None).await;
    let resource = taskrun_resource("v1");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
    let steps = [support::ok("a"), support::ok("b")];
    let gone = support::create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "gone", &steps, None),
    )
    .await;
    support::wait_finished(&client, &ns.name, "gone").await;
    // The observer has tried (and the sink refused) at least once.
    wait_for("a refused delivery", Duration::from_secs(60), || async {
        (metric_sum(&observer, "tekton_step_observer_delivery_retries_total").await > 0.0)
            .then_some(())
    })
    .await;

    // NB: the restart comes before the deletion. A deletion while the old
    // API server still ran would sit, as a Delete event, in the frozen
    // observer's socket, and be read on waking: no gap at all.
    signal(observer.pid(), "STOP");
    let restart = restart_component("kube-apiserver").await;
    retrying("delete the TaskRun", API_RETRY_DEADLINE, || async {
        match api.delete("gone", &Default::default()).await {
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            other => other.map(|_| ()),
        }
    })
    .await;
    wait_for(
        "the TaskRun to be gone",
        Duration::from_secs(60),
        || async { matches!(api.get_opt("gone").await, Ok(None)).then_some(()) },
    )
    .await;
    signal(observer.pid(), "CONT");
    // The sink stays down until the observer relisted (or long past when it
    // should have): it cannot know of the deletion before, and a sink that
    // recovered first would take what a worker had in flight.
    let relisted = support::try_wait_for(Duration::from_secs(90), || async {
        observer
            .log_text()
            .contains("absent from the relist")
            .then_some(())
    })
    .await
    .is_some();
    received
        .fail_with
        .store(0, std::sync::atomic::Ordering::SeqCst);

    // The observer works on: a TaskRun created now gets all its events.
    let after = create_tolerant(
        &client,
        &ns.name,
        taskrun_manifest("v1", "after", &steps, None),
    )
    .await;
    received.wait_for_count(&after, 4).await;
    let lost = wait_for(
        "the loss to be counted",
        Duration::from_secs(60),
        || async {
            let lost = metric_sum(&observer, "tekton_step_observer_events_lost_total").await;
            (lost > 0.0).then_some(lost)
        },
    )
    .await;
    sink_quiet(&received).await;
    let log = observer.log_text();
    let sent_for_gone = received.for_taskrun(&gone).len();
    let tracked = metric_sum(&observer, "tekton_step_observer_tracked_taskruns").await;
    record_figures(
        CASE,
        json!({
            "case": CASE,
            "injected": "observer frozen (SIGSTOP) while a finished TaskRun owed 4 events to a sink answering 503; kube-apiserver restarted; the TaskRun deleted; observer resumed (its watch expired: 410) and, once it relisted, the sink recovered",
            "expected": 4,
            "delivered": received.for_taskrun(&after).len(),
            "missing": 0,
            "repeats": 0,
            "recovery_seconds": null,
            "events_sent_for_the_deleted_taskrun": sent_for_gone,
            "events_lost_total": lost,
            "tracked_taskruns_after": tracked,
            "restart_report": restart.report,
            "checks": {
                "relist_noticed_the_deletion": relisted,
                "nothing_sent_for_the_deleted_taskrun": sent_for_gone == 0,
                "loss_counted": lost == 4.0,
            },
            "headline": format!("deleted during the gap: {sent_for_gone} events sent for it, events_lost_total = {lost}; the TaskRun created after the gap got its 4 events"),
        }),
    );
    assert!(
        relisted,
        "the watch relisted and noticed the deletion; log:\n{log}"
    );
    assert_eq!(
        sent_for_gone, 0,
        "nothing sent for a deleted TaskRun; log:\n{log}"
    );
    assert_eq!(
        lost, 4.0,
        "the 4 owed events are counted as lost; log:\n{log}"
    );
    assert_eq!(
        tracked, 1.0,
        "only the TaskRun that still exists is tracked; log:\n{log}"
    );
    eprintln!("{CASE} took {:?}", started.elapsed());
    drop(observer);
    delete_namespaces(&client, &[&ns]).await;
}

/// Restart the API server or etcd under the running workload. They run
/// alone, after everything else (`hack/e2e` and `make reliability` run
/// `disruptive::` in a run of its own, after the other cases), as they take
/// the whole cluster's API away for a while.
mod disruptive {
    use super::{component_restart_case, watch_gap_case};

    #[tokio::test(flavor = "multi_thread")]
    async fn taskrun_deleted_during_a_watch_gap_sends_nothing_and_counts_the_loss() {
        watch_gap_case().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn apiserver_restart_mid_run_loses_nothing() {
        component_restart_case("apiserver_restart_mid_run_loses_nothing", "kube-apiserver").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn etcd_restart_mid_run_loses_nothing() {
        component_restart_case("etcd_restart_mid_run_loses_nothing", "etcd").await;
    }
}
