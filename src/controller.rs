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
//!
//! NB: a watch that was away too long (its resourceVersion expired: 410
//! Gone) relists, and a TaskRun deleted meanwhile is simply absent from the
//! list: no Delete event ever comes. So at the end of every list the
//! tracker treats what that list's scope no longer shows as deleted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use futures::{StreamExt, stream};
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::context::{Context, ListMode, Owing, Snapshot, owed_count, owing};
use crate::delivery;
use crate::error::{Error, Result};
use crate::server::Readiness;
use crate::step_span::{SPAN_CONTEXT_ANNOTATION, run_trace};
use crate::tekton::{TaskRun, TaskRunRef, TektonVersion, ledger_annotation, strip_for_cache};
use crate::watermark::WatermarkLimit;

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

/// How often the watermark limit is worked out again (it only matters once
/// a TaskRun owes events for about a whole backfill window, so a few
/// seconds late is nothing; a walk over the workers per watch event would
/// be wasted).
const WATERMARK_LIMIT_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`Tracker::evaluate`] made of a snapshot without a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Evaluated {
    /// The backfill rule leaves it alone.
    LeftAlone,
    /// A worker was started if anything is owed.
    Considered,
}

struct Worker {
    snapshots: watch::Sender<Arc<Snapshot>>,
}

/// What one watch stream covers: every namespace, or one.
#[derive(Clone, Debug)]
enum Scope {
    AllNamespaces,
    Namespace(String),
}

impl Scope {
    fn covers(&self, namespace: &str) -> bool {
        match self {
            Scope::AllNamespaces => true,
            Scope::Namespace(own) => own == namespace,
        }
    }
}

/// One watch stream's list, while it runs.
#[derive(Default)]
struct ListState {
    /// The uids the list in progress has shown so far; `None` between lists.
    seen: Option<HashSet<String>>,
    /// Whether this stream finished its first list since the process started.
    synced: bool,
}

/// The tracker: owns the set of running workers.
struct Tracker {
    ctx: Arc<Context>,
    workers: HashMap<String, Worker>,
    done_tx: mpsc::UnboundedSender<String>,
    scopes: Vec<Scope>,
    lists: Vec<ListState>,
    /// TaskRuns the backfill rule left alone in the first lists.
    left_alone_at_start: usize,
    /// How far the backfill watermark may move on.
    watermark_limit: watch::Sender<WatermarkLimit>,
}

impl Tracker {
    fn snapshot(&self, mut taskrun: TaskRun, deleted: bool) -> Option<Arc<Snapshot>> {
        let opted_out = crate::tekton::opted_out(&taskrun.metadata);
        let trace = run_trace(
            taskrun.metadata.uid.as_deref().unwrap_or_default(),
            taskrun.status.as_ref().map(|s| &s.span_context),
            taskrun
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SPAN_CONTEXT_ANNOTATION))
                .map(String::as_str),
        );
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
            annotations_present: taskrun.metadata.annotations.is_some(),
            resource_version: taskrun.metadata.resource_version.clone(),
            taskrun: reference,
            status: taskrun.status,
            deleted,
            opted_out,
            seen_at: Instant::now(),
            trace,
        }))
    }

    fn on_apply(&mut self, scope: usize, taskrun: TaskRun) {
        let started = Instant::now();
        let Some(snapshot) = self.snapshot(taskrun, false) else {
            return;
        };
        let uid = snapshot.taskrun.uid.clone();
        let list = &mut self.lists[scope];
        if let Some(seen) = list.seen.as_mut() {
            seen.insert(uid.clone());
        }
        let first_list = list.seen.is_some() && !list.synced;
        if let Some(worker) = self.workers.get(&uid) {
            worker.snapshots.send_replace(snapshot);
        } else if self.evaluate(snapshot) == Evaluated::LeftAlone && first_list {
            self.left_alone_at_start += 1;
            self.ctx.metrics.record_backfill_left_alone();
        }
        self.ctx.metrics.observe_reconcile(started.elapsed());
        self.report_sizes();
    }

    fn on_list_start(&mut self, scope: usize) {
        self.lists[scope].seen = Some(HashSet::new());
    }

    /// A list of `scope` ended: whatever it did not show is gone. Workers of
    /// such TaskRuns get a deleted snapshot (they count what is lost and
    /// end, sending nothing more), and what was remembered of them is
    /// dropped. Returns whether every stream has now listed once.
    fn on_list_done(&mut self, scope: usize) -> bool {
        let seen = self.lists[scope].seen.take().unwrap_or_default();
        let covered = &self.scopes[scope];
        let mut vanished = 0;
        for worker in self.workers.values() {
            let latest = worker.snapshots.borrow().clone();
            if latest.deleted
                || !covered.covers(&latest.taskrun.namespace)
                || seen.contains(&latest.taskrun.uid)
            {
                continue;
            }
            vanished += 1;
            worker.snapshots.send_replace(Arc::new(Snapshot {
                deleted: true,
                ..(*latest).clone()
            }));
        }
        if vanished > 0 {
            warn!(
                vanished,
                "TaskRuns were deleted while the watch was away (absent from the relist); their delivery stops"
            );
        }
        let workers = &self.workers;
        self.ctx.forget_missing(
            |namespace| covered.covers(namespace),
            |uid| seen.contains(uid) || workers.contains_key(uid),
        );
        let first = !self.lists[scope].synced;
        self.lists[scope].synced = true;
        self.publish_watermark_limit();
        let all_synced = self.lists.iter().all(|list| list.synced);
        if first && all_synced && self.left_alone_at_start > 0 {
            info!(
                taskruns = self.left_alone_at_start,
                cutoff = %self.ctx.settings.backfill_cutoff,
                "left alone TaskRuns without a ledger that finished before the backfill cutoff"
            );
        }
        self.report_sizes();
        all_synced
    }

    /// Starts a worker if the snapshot owes events, or its ledger lost
    /// entries we wrote.
    fn evaluate(&mut self, snapshot: Arc<Snapshot>) -> Evaluated {
        let uid = snapshot.taskrun.uid.clone();
        let owed = match owing(&self.ctx, &snapshot) {
            Owing::LeftAlone => return Evaluated::LeftAlone,
            Owing::Undecided => 0,
            Owing::Events(owed) => owed.transitions.len() + owed.spans.len(),
        };
        let regressed = owed == 0 && self.ctx.ledger_regressed(&snapshot);
        if regressed {
            info!(taskrun = %snapshot.taskrun.key(), "the ledger annotation lost entries we recorded (an older copy was written over it); recording them again");
        }
        if owed > 0 || regressed {
            debug!(taskrun = %snapshot.taskrun.key(), owed, handled_us = snapshot.seen_at.elapsed().as_micros(), "starting delivery");
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
        Evaluated::Considered
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

    /// On the way out: the workers (told by `Context::stopping`) finish their
    /// send in flight and write the ledger; wait for them, up to the grace
    /// period, before the caller releases the Lease.
    async fn drain(&mut self, done_rx: &mut mpsc::UnboundedReceiver<String>) {
        if self.workers.is_empty() {
            return;
        }
        let grace = self.ctx.settings.shutdown_grace;
        info!(
            workers = self.workers.len(),
            ?grace,
            "stopping: finishing in-flight sends and writing the ledger"
        );
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        while !self.workers.is_empty() {
            tokio::select! {
                done = done_rx.recv() => match done {
                    Some(uid) => { self.workers.remove(&uid); }
                    None => break,
                },
                () = &mut deadline => {
                    warn!(workers = self.workers.len(), "grace period over; abandoning what is still in flight (the next leader sends it again)");
                    break;
                }
            }
        }
    }

    /// Tells the watermark keeper how far it may go: not before the first
    /// lists ended, and not past what would put a finished TaskRun that
    /// still owes events outside the window at the next start.
    fn publish_watermark_limit(&self) {
        let limit = if !self.lists.iter().all(|list| list.synced) {
            WatermarkLimit::NotSynced
        } else {
            self.workers
                .values()
                .filter_map(|worker| {
                    let latest = worker.snapshots.borrow();
                    let finished = latest.status.as_ref()?.completion_time.as_deref()?;
                    DateTime::parse_from_rfc3339(finished)
                        .ok()
                        .map(|at| at.with_timezone(&Utc))
                })
                .min()
                .map_or(WatermarkLimit::Now, WatermarkLimit::OldestOwed)
        };
        self.watermark_limit.send_if_modified(|current| {
            let changed = *current != limit;
            *current = limit;
            changed
        });
    }

    fn report_sizes(&self) {
        self.ctx.metrics.set_queue_depth(self.workers.len());
        self.ctx
            .metrics
            .set_tracked_taskruns(self.workers.len().max(self.ctx.remembered()));
    }
}

/// What the watch streams cover: all namespaces, or each `--namespace`.
fn watch_scopes(ctx: &Context) -> Vec<Scope> {
    if ctx.settings.namespaces.is_empty() {
        vec![Scope::AllNamespaces]
    } else {
        ctx.settings
            .namespaces
            .iter()
            .map(|ns| Scope::Namespace(ns.clone()))
            .collect()
    }
}

/// One watch stream per scope, merged; each event carries its scope's index.
fn taskrun_events(
    ctx: &Context,
    scopes: &[Scope],
) -> impl futures::Stream<Item = (usize, Result<watcher::Event<TaskRun>, watcher::Error>)> + Send + use<>
{
    let mut config = match ctx.settings.list {
        ListMode::Paged(size) => watcher::Config::default().page_size(size),
        ListMode::Streaming => watcher::Config::default().streaming_lists(),
    };
    if let Some(selector) = &ctx.settings.label_selector {
        config = config.labels(selector);
    }
    let resource = ctx.version.api_resource();
    stream::select_all(scopes.iter().enumerate().map(|(index, scope)| {
        let api: Api<TaskRun> = match scope {
            Scope::AllNamespaces => Api::all_with(ctx.client.clone(), &resource),
            Scope::Namespace(ns) => Api::namespaced_with(ctx.client.clone(), ns, &resource),
        };
        watcher(api, config.clone())
            .default_backoff()
            .map(move |event| (index, event))
            .boxed()
    }))
}

/// Runs the controller until `shutdown` resolves or the watch ends.
pub async fn run(
    ctx: Arc<Context>,
    readiness: Readiness,
    watermark_limit: watch::Sender<WatermarkLimit>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let scopes = watch_scopes(&ctx);
    let mut events = taskrun_events(&ctx, &scopes);
    let mut tracker = Tracker {
        ctx: ctx.clone(),
        workers: HashMap::new(),
        done_tx,
        lists: scopes.iter().map(|_| ListState::default()).collect(),
        scopes,
        left_alone_at_start: 0,
        watermark_limit,
    };
    let mut limit_refresh = tokio::time::interval(WATERMARK_LIMIT_REFRESH);
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
            _ = limit_refresh.tick() => tracker.publish_watermark_limit(),
            event = events.next() => match event {
                Some((scope, Ok(watcher::Event::Apply(taskrun) | watcher::Event::InitApply(taskrun)))) => {
                    tracker.on_apply(scope, taskrun);
                }
                Some((_, Ok(watcher::Event::Delete(taskrun)))) => tracker.on_delete(taskrun),
                Some((scope, Ok(watcher::Event::Init))) => tracker.on_list_start(scope),
                Some((scope, Ok(watcher::Event::InitDone))) => {
                    // Each watched namespace lists once before the cache counts as synced.
                    if tracker.on_list_done(scope) {
                        readiness.set_watch_synced(true);
                    }
                }
                Some((_, Err(error))) => {
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
    // What the last watermark write may claim, taken while every worker
    // still counts: draining removes them, delivered or not.
    tracker.publish_watermark_limit();
    tracker.drain(&mut done_rx).await;
    Ok(())
}
