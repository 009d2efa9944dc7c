//! Watch + dispatch: the imperative shell around the pure step machine.
//!
//! One watch (cluster-wide, or one per `--namespace`) feeds a single tracker
//! task. The tracker keeps nothing for TaskRuns that owe nothing; for each
//! TaskRun that owes events it runs one delivery worker
//! ([`crate::delivery`]) and hands it every newer snapshot of the object.
//! Workers of different TaskRuns run concurrently (bounded by a semaphore),
//! while each worker sends its own TaskRun's events in order.
//!
//! ```text
//! watch(TaskRun) ──► tracker ──snapshot──► worker(uid) ──► sink
//!                      ▲                      │
//!                      └──── done(uid) ◄──────┘   (patch ledger annotation)
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::delivery::{self, Snapshot};
use crate::error::{Error, Result};
use crate::event::EventSettings;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::server::Readiness;
use crate::sink::{SinkClient, SinkSettings};
use crate::sink_config::SinkState;
use crate::steps::{RunPhase, owed_transitions, run_facts};
use crate::tekton::{TaskRun, TaskRunRef, TektonVersion, ledger_annotation, strip_for_cache};

/// The name the controller reports Kubernetes Events under.
pub const REPORTER: &str = "tekton-step-observer";

/// Settings of the controller, validated from the CLI.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Label selector on TaskRuns.
    pub label_selector: Option<String>,
    /// How events are named.
    pub events: EventSettings,
    /// How events are sent.
    pub sink: SinkSettings,
    /// Cap on a carried log.
    pub log_limit_bytes: usize,
    /// TaskRuns finished longer ago than this, with no ledger, are left alone.
    pub backfill_window: Duration,
    /// Bound on TaskRuns delivering at once.
    pub max_concurrent_deliveries: usize,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// This replica's name, for Events.
    pub identity: String,
}

/// What every worker shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// The TaskRun API version read.
    pub version: TektonVersion,
    /// Settings.
    pub settings: ControllerSettings,
    /// HTTP client for the sink.
    pub sink_client: SinkClient,
    /// Current sink.
    pub sink: watch::Receiver<SinkState>,
    /// Whether this replica may send and patch.
    pub leader: watch::Receiver<bool>,
    /// Metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes Events on TaskRuns.
    pub recorder: Recorder,
    /// What this process settled, by TaskRun uid, until the TaskRun is
    /// deleted. Guards against a cache that lags behind our own patch, and
    /// against the annotation losing entries after we wrote it (see
    /// [`Context::ledger_regressed`]): what is remembered is never sent again.
    memory: Mutex<HashMap<String, Remembered>>,
    /// Bounds concurrent deliveries.
    pub delivery_slots: Semaphore,
}

impl Context {
    /// Builds the shared context.
    pub fn new(
        client: Client,
        version: TektonVersion,
        settings: ControllerSettings,
        sink: watch::Receiver<SinkState>,
        leader: watch::Receiver<bool>,
        metrics: Metrics,
    ) -> Result<Self> {
        let sink_client = SinkClient::new(&settings.sink)?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.to_owned(),
                instance: Some(settings.identity.clone()),
            },
        );
        let slots = settings.max_concurrent_deliveries;
        Ok(Context {
            client,
            version,
            settings,
            sink_client,
            sink,
            leader,
            metrics,
            recorder,
            memory: Mutex::new(HashMap::new()),
            delivery_slots: Semaphore::new(slots),
        })
    }

    /// The TaskRun API at our version in `namespace`.
    pub fn taskruns(&self, namespace: &str) -> Api<TaskRun> {
        Api::namespaced_with(self.client.clone(), namespace, &self.version.api_resource())
    }

    fn memory(&self) -> MutexGuard<'_, HashMap<String, Remembered>> {
        // A panic while holding the lock cannot leave a ledger half-merged
        // (merges are bit-ors), so a poisoned lock is safe to keep using.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The in-memory ledger of a TaskRun (empty if none).
    pub fn memory_ledger(&self, uid: &str) -> Ledger {
        self.memory()
            .get(uid)
            .map(|r| r.ledger.clone())
            .unwrap_or_default()
    }

    /// Adds settled events to the in-memory ledger.
    pub fn remember(&self, uid: &str, settled: &Ledger) {
        self.memory()
            .entry(uid.to_owned())
            .or_default()
            .ledger
            .merge(settled);
    }

    /// Notes the resourceVersion our ledger patch of a TaskRun produced.
    pub fn wrote_ledger(&self, uid: &str, resource_version: Option<String>) {
        if let Some(remembered) = self.memory().get_mut(uid) {
            remembered.written = resource_version;
        }
    }

    /// Whether the snapshot's annotation lacks events this process settled
    /// and recorded, although the snapshot is not older than our last write
    /// of it: the ledger lost entries, and must be written again. Tekton's
    /// controller does that: its `updateLabelsAndAnnotations` writes the
    /// annotations of the copy it began reconciling with over the current
    /// ones, so a ledger patch landing during a reconcile is undone.
    /// resourceVersions of etcd-backed objects are integers that grow with
    /// every write; one that is not is taken as newer, which costs at most a
    /// conditional patch answered with 409.
    pub fn ledger_regressed(&self, snapshot: &Snapshot) -> bool {
        let memory = self.memory();
        let Some(remembered) = memory.get(&snapshot.taskrun.uid) else {
            return false;
        };
        let Some(written) = remembered.written.as_deref() else {
            return false;
        };
        let (annotation, _) = annotation_ledger(snapshot.annotation.as_deref());
        if annotation.covers(&remembered.ledger) {
            return false;
        }
        not_older_than(snapshot.resource_version.as_deref(), written)
    }

    fn forget(&self, uid: &str) {
        self.memory().remove(uid);
    }

    fn remembered(&self) -> usize {
        self.memory().len()
    }
}

/// Whether an object seen at resourceVersion `seen` is not older than the
/// version `written` one of our writes produced. Versions that are not
/// integers cannot be ordered and count as not older.
fn not_older_than(seen: Option<&str>, written: &str) -> bool {
    match (seen.map(str::parse::<u64>), written.parse::<u64>()) {
        (Some(Ok(seen)), Ok(written)) => seen >= written,
        _ => true,
    }
}

/// What this process settled for one TaskRun.
#[derive(Default)]
struct Remembered {
    /// Events settled at the sink.
    ledger: Ledger,
    /// The resourceVersion our last ledger patch produced.
    written: Option<String>,
}

/// Finds which TaskRun API version the cluster serves.
pub async fn detect_version(client: &Client) -> Result<TektonVersion> {
    for version in [TektonVersion::V1, TektonVersion::V1Beta1] {
        match client.list_api_group_resources(version.api_version()).await {
            Ok(list)
                if list
                    .resources
                    .iter()
                    .any(|r| r.name == crate::tekton::PLURAL) =>
            {
                return Ok(version);
            }
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    operation: "discover tekton.dev versions",
                    source,
                });
            }
        }
    }
    Err(Error::Kube {
        operation: "discover tekton.dev versions",
        source: kube::Error::Discovery(kube::error::DiscoveryError::MissingResource(
            "tekton.dev taskruns (is Tekton Pipelines installed?)".to_owned(),
        )),
    })
}

/// Whether a TaskRun is left alone by the backfill rule: it finished longer
/// than `window` ago and nobody ever recorded a ledger for it.
pub fn left_alone_by_backfill(
    phase: &RunPhase,
    has_ledger: bool,
    now: DateTime<Utc>,
    window: Duration,
) -> bool {
    if has_ledger {
        return false;
    }
    match phase {
        RunPhase::Finished { at: Some(at), .. } => {
            let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            now.signed_duration_since(*at) > window
        }
        _ => false,
    }
}

/// Parses a TaskRun's ledger annotation; a malformed one counts as empty
/// (the worker reports it).
pub fn annotation_ledger(annotation: Option<&str>) -> (Ledger, Option<Error>) {
    match annotation.map(Ledger::parse) {
        None => (Ledger::default(), None),
        Some(Ok(ledger)) => (ledger, None),
        Some(Err(error)) => (Ledger::default(), Some(error)),
    }
}

/// The number of events a snapshot still owes, given the in-memory ledger.
pub fn owed_count(ctx: &Context, snapshot: &Snapshot) -> usize {
    let Ok(facts) = run_facts(snapshot.status.as_ref()) else {
        return 0;
    };
    let (mut ledger, _) = annotation_ledger(snapshot.annotation.as_deref());
    if left_alone_by_backfill(
        &facts.phase,
        snapshot.annotation.is_some() || !ctx.memory_ledger(&snapshot.taskrun.uid).is_empty(),
        Utc::now(),
        ctx.settings.backfill_window,
    ) {
        return 0;
    }
    ledger.merge(&ctx.memory_ledger(&snapshot.taskrun.uid));
    owed_transitions(&facts, &ledger).len()
}

struct Worker {
    snapshots: watch::Sender<Arc<Snapshot>>,
}

/// The tracker: owns the set of running workers.
struct Tracker {
    ctx: Arc<Context>,
    workers: HashMap<String, Worker>,
    done_tx: mpsc::UnboundedSender<String>,
}

impl Tracker {
    fn snapshot(&self, mut taskrun: TaskRun, deleted: bool) -> Option<Arc<Snapshot>> {
        strip_for_cache(&mut taskrun);
        let reference = match TaskRunRef::from_meta(&taskrun.metadata, self.ctx.version) {
            Ok(reference) => reference,
            Err(error) => {
                warn!(%error, "ignoring a TaskRun without identity");
                self.ctx
                    .metrics
                    .record_reconcile_error(error.metric_label());
                return None;
            }
        };
        Some(Arc::new(Snapshot {
            annotation: ledger_annotation(&taskrun.metadata).map(str::to_owned),
            resource_version: taskrun.metadata.resource_version.clone(),
            taskrun: reference,
            status: taskrun.status,
            deleted,
            seen_at: Instant::now(),
        }))
    }

    fn on_apply(&mut self, taskrun: TaskRun) {
        let started = Instant::now();
        let Some(snapshot) = self.snapshot(taskrun, false) else {
            return;
        };
        let uid = snapshot.taskrun.uid.clone();
        if let Some(worker) = self.workers.get(&uid) {
            worker.snapshots.send_replace(snapshot);
        } else {
            self.evaluate(snapshot);
        }
        self.ctx.metrics.observe_reconcile(started.elapsed());
        self.report_sizes();
    }

    /// Starts a worker if the snapshot owes events, or its ledger lost
    /// entries we wrote.
    fn evaluate(&mut self, snapshot: Arc<Snapshot>) {
        let uid = snapshot.taskrun.uid.clone();
        let owed = owed_count(&self.ctx, &snapshot);
        let regressed = owed == 0 && self.ctx.ledger_regressed(&snapshot);
        if regressed {
            info!(taskrun = %snapshot.taskrun.key(), "the ledger annotation lost entries we recorded (an older copy was written over it); recording them again");
        }
        if owed > 0 || regressed {
            debug!(taskrun = %snapshot.taskrun.key(), owed, "starting delivery");
            let (snapshots, rx) = watch::channel(snapshot);
            let ctx = self.ctx.clone();
            let done = self.done_tx.clone();
            let worker_uid = uid.clone();
            tokio::spawn(async move {
                delivery::run_worker(ctx, rx).await;
                // The tracker outlives every worker; a closed channel only
                // means we are shutting down.
                let _ = done.send(worker_uid);
            });
            self.workers.insert(uid, Worker { snapshots });
        }
    }

    fn on_delete(&mut self, taskrun: TaskRun) {
        let Some(snapshot) = self.snapshot(taskrun, true) else {
            return;
        };
        let uid = snapshot.taskrun.uid.clone();
        match self.workers.get(&uid) {
            // The worker counts what is lost and ends.
            Some(worker) => {
                worker.snapshots.send_replace(snapshot);
            }
            None => {
                let owed = owed_count(&self.ctx, &snapshot);
                if owed > 0 && *self.ctx.leader.borrow() {
                    delivery::report_lost(&self.ctx, &snapshot, owed);
                }
                self.ctx.forget(&uid);
            }
        }
        self.report_sizes();
    }

    fn on_worker_done(&mut self, uid: String) {
        if let Some(worker) = self.workers.remove(&uid) {
            let latest = worker.snapshots.borrow().clone();
            if latest.deleted {
                self.ctx.forget(&uid);
            } else {
                // A snapshot may have arrived while the worker was ending.
                self.evaluate(latest);
            }
        }
        self.report_sizes();
    }

    fn report_sizes(&self) {
        self.ctx.metrics.set_queue_depth(self.workers.len());
        self.ctx
            .metrics
            .set_tracked_taskruns(self.workers.len().max(self.ctx.remembered()));
    }
}

/// One watch stream over all watched namespaces.
fn taskrun_events(
    ctx: &Context,
) -> impl futures::Stream<Item = Result<watcher::Event<TaskRun>, watcher::Error>> + Send + use<> {
    let mut config = watcher::Config::default();
    if let Some(selector) = &ctx.settings.label_selector {
        config = config.labels(selector);
    }
    let resource = ctx.version.api_resource();
    let apis: Vec<Api<TaskRun>> = if ctx.settings.namespaces.is_empty() {
        vec![Api::all_with(ctx.client.clone(), &resource)]
    } else {
        ctx.settings
            .namespaces
            .iter()
            .map(|ns| Api::namespaced_with(ctx.client.clone(), ns, &resource))
            .collect()
    };
    stream::select_all(
        apis.into_iter()
            .map(|api| watcher(api, config.clone()).default_backoff().boxed()),
    )
}

/// Runs the controller until `shutdown` resolves or the watch ends.
pub async fn run(
    ctx: Arc<Context>,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut tracker = Tracker {
        ctx: ctx.clone(),
        workers: HashMap::new(),
        done_tx,
    };
    let mut events = taskrun_events(&ctx);
    // Each watched namespace lists once before the cache counts as synced.
    let mut lists_pending = ctx.settings.namespaces.len().max(1);
    info!(
        version = ctx.version.api_version(),
        namespaces = ?ctx.settings.namespaces,
        "watching TaskRuns"
    );
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(uid) = done_rx.recv() => tracker.on_worker_done(uid),
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(taskrun) | watcher::Event::InitApply(taskrun))) => {
                    tracker.on_apply(taskrun);
                }
                Some(Ok(watcher::Event::Delete(taskrun))) => tracker.on_delete(taskrun),
                Some(Ok(watcher::Event::Init)) => {}
                Some(Ok(watcher::Event::InitDone)) => {
                    lists_pending = lists_pending.saturating_sub(1);
                    if lists_pending == 0 {
                        readiness.set_watch_synced(true);
                    }
                }
                Some(Err(error)) => {
                    ctx.metrics.record_watch_error();
                    warn!(%error, "TaskRun watch failed; retrying with backoff");
                }
                None => {
                    warn!("TaskRun watch ended");
                    break;
                }
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_before_our_write_is_older() {
        assert!(!not_older_than(Some("41"), "42"));
        assert!(not_older_than(Some("42"), "42"));
        assert!(not_older_than(Some("100"), "42"));
        // Unordered versions count as newer: at worst a conditional patch
        // that answers 409.
        assert!(not_older_than(Some("abc"), "42"));
        assert!(not_older_than(None, "42"));
        assert!(not_older_than(Some("41"), "x"));
    }
}
