//! What the watch tracker and the delivery workers share: the settings, the
//! context every worker reads (clients, sink, leadership, metrics, the
//! in-memory record of what this process settled), the snapshot a worker
//! gets of its TaskRun, and the one function that works out what a TaskRun
//! still owes. `controller` starts `delivery` workers; `delivery` needs nothing
//! of `controller`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::{Semaphore, watch};

use crate::error::{Error, Result};
use crate::event::EventSettings;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::otel::SpanExport;
use crate::server::Readiness;
use crate::sink::{RetryPolicy, SinkClient, SinkSettings};
use crate::sink_config::SinkState;
use crate::step_event::{EventFormats, EventTypes};
use crate::step_span::{RunTrace, StepSpan, owed_spans};
use crate::steps::{RunPhase, Transition, owed_in_formats, run_facts};
use crate::tekton::{TaskRun, TaskRunRef, TaskRunStatus, TektonVersion};

/// The name the controller reports Kubernetes Events under.
pub const REPORTER: &str = "tekton-step-observer";

/// Settings of the controller, validated from the CLI.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Label selector on TaskRuns.
    pub label_selector: Option<String>,
    /// How the TaskRun watch lists: page size, or a streaming list.
    pub list: ListMode,
    /// The kinds of step event owed (`--event-types`).
    pub event_types: EventTypes,
    /// The formats events are owed in (`--event-format`).
    pub event_formats: EventFormats,
    /// When to give up on an event (`--retry-limit`, `--retry-timeout`).
    pub retry_policy: RetryPolicy,
    /// Where events go that the sink did not take (`--dead-letter-sink`).
    pub dead_letter_sink: Option<url::Url>,
    /// How events are named.
    pub events: EventSettings,
    /// How events are sent.
    pub sink: SinkSettings,
    /// Cap on a carried log.
    pub log_limit_bytes: usize,
    /// Whether `step_duration_seconds` carries the namespace.
    pub step_metrics_by_namespace: bool,
    /// TaskRuns that finished before this, with no ledger, are left alone
    /// ([`crate::watermark::backfill_cutoff`]).
    pub backfill_cutoff: DateTime<Utc>,
    /// Bound on TaskRuns delivering at once.
    pub max_concurrent_deliveries: usize,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// This replica's name, for Events.
    pub identity: String,
    /// On SIGTERM, how long workers may finish and write the ledger.
    pub shutdown_grace: Duration,
}

/// What tells the workers how the world around them changes.
pub struct Channels {
    /// Current sink.
    pub sink: watch::Receiver<SinkState>,
    /// Whether this replica leads.
    pub leader: watch::Receiver<bool>,
    /// Whether the process is stopping.
    pub stopping: watch::Receiver<bool>,
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
    /// True once the process is stopping (SIGTERM): workers take no new
    /// work, finish the send in flight and write the ledger.
    pub stopping: watch::Receiver<bool>,
    /// Metrics.
    pub metrics: Metrics,
    /// What `/readyz` reports (the sink refusing credentials).
    pub readiness: Readiness,
    /// Publishes Kubernetes Events on TaskRuns.
    pub recorder: Recorder,
    /// What this process settled, by TaskRun uid, until the TaskRun is
    /// deleted. Guards against a cache that lags behind our own patch, and
    /// against the annotation losing entries after we wrote it (see
    /// [`Context::ledger_regressed`]): what is remembered is never sent again.
    /// On taking over from another leader, what a fresh read of the TaskRun
    /// showed recorded is added too (`delivery::adopt_current_ledger`).
    memory: Mutex<HashMap<String, Remembered>>,
    /// Bounds concurrent deliveries.
    pub delivery_slots: Semaphore,
    /// Exports step spans, when the environment asks for them.
    pub spans: Option<SpanExport>,
}

impl Context {
    /// Builds the shared context.
    pub fn new(
        client: Client,
        version: TektonVersion,
        settings: ControllerSettings,
        channels: Channels,
        metrics: Metrics,
        readiness: Readiness,
    ) -> Result<Self> {
        let Channels {
            sink,
            leader,
            stopping,
        } = channels;
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
            stopping,
            metrics,
            readiness,
            recorder,
            memory: Mutex::new(HashMap::new()),
            delivery_slots: Semaphore::new(slots),
            spans: None,
        })
    }

    /// Exports step spans with `spans` (see [`crate::otel`]).
    pub fn with_spans(mut self, spans: Option<SpanExport>) -> Self {
        self.spans = spans;
        self
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
    pub fn remember(&self, taskrun: &TaskRunRef, settled: &Ledger) {
        self.memory()
            .entry(taskrun.uid.clone())
            .or_insert_with(|| Remembered {
                namespace: taskrun.namespace.clone(),
                ..Remembered::default()
            })
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

    /// Drops what was remembered of a TaskRun (it is gone).
    pub fn forget(&self, uid: &str) {
        self.memory().remove(uid);
    }

    /// Drops what was remembered of every TaskRun in a namespace `in_scope`
    /// accepts whose uid `exists` denies: a relist of that scope no longer
    /// shows them, so they were deleted while the watch was away.
    pub fn forget_missing(&self, in_scope: impl Fn(&str) -> bool, exists: impl Fn(&str) -> bool) {
        self.memory()
            .retain(|uid, remembered| !in_scope(&remembered.namespace) || exists(uid));
    }

    /// How many TaskRuns are remembered.
    pub fn remembered(&self) -> usize {
        self.memory().len()
    }
}

/// Whether an object seen at resourceVersion `seen` is not older than the
/// version `written` one of our writes produced. Versions that are not
/// integers cannot be ordered and count as not older.
pub fn not_older_than(seen: Option<&str>, written: &str) -> bool {
    match (seen.map(str::parse::<u64>), written.parse::<u64>()) {
        (Some(Ok(seen)), Ok(written)) => seen >= written,
        _ => true,
    }
}

/// What this process settled for one TaskRun.
#[derive(Default)]
struct Remembered {
    /// The TaskRun's namespace, to tell which watch scope it belongs to.
    namespace: String,
    /// Events settled at the sink.
    ledger: Ledger,
    /// The resourceVersion our last ledger patch produced.
    written: Option<String>,
}

/// What the worker knows of its TaskRun at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Identity.
    pub taskrun: TaskRunRef,
    /// For the conditional patch.
    pub resource_version: Option<String>,
    /// The status, stripped.
    pub status: Option<TaskRunStatus>,
    /// The ledger annotation's raw value.
    pub annotation: Option<String>,
    /// Whether `metadata.annotations` exists (the ledger patch must then
    /// add to it rather than create it).
    pub annotations_present: bool,
    /// The TaskRun is gone.
    pub deleted: bool,
    /// It opted out of step events (`tekton.plugin.step-observer/skip`).
    pub opted_out: bool,
    /// When the watch delivered it.
    pub seen_at: Instant,
    /// The trace its step spans go in.
    pub trace: RunTrace,
}

/// Whether a TaskRun is left alone by the backfill rule: it finished before
/// `cutoff` and nobody ever recorded a ledger for it.
pub fn left_alone_by_backfill(phase: &RunPhase, has_ledger: bool, cutoff: DateTime<Utc>) -> bool {
    !has_ledger && matches!(phase, RunPhase::Finished { at: Some(at), .. } if *at < cutoff)
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

/// What a TaskRun still owes at one snapshot.
pub struct Owed {
    /// The events, in order.
    pub transitions: Vec<Transition>,
    /// The step spans still to export (only while spans are exported).
    pub spans: Vec<StepSpan>,
    /// Why the ledger annotation was unreadable (it then counts as empty).
    pub malformed_ledger: Option<Error>,
}

/// What a snapshot owes, as far as it can be told.
pub enum Owing {
    /// Nothing can be owed yet: the status cannot be decided.
    Undecided,
    /// The backfill rule leaves the TaskRun alone.
    LeftAlone,
    /// What it owes (maybe nothing).
    Events(Owed),
}

/// Works out what a snapshot still owes, given the annotation and what this
/// process settled: the one place that decides it, for the watch tracker
/// (whether to run a worker) and the delivery worker (what to send) alike.
pub fn owing(ctx: &Context, snapshot: &Snapshot) -> Owing {
    if snapshot.opted_out {
        return Owing::Events(Owed {
            transitions: Vec::new(),
            spans: Vec::new(),
            malformed_ledger: None,
        });
    }
    let Ok(facts) = run_facts(snapshot.status.as_ref()) else {
        return Owing::Undecided;
    };
    let (mut ledger, malformed_ledger) = annotation_ledger(snapshot.annotation.as_deref());
    let remembered = ctx.memory_ledger(&snapshot.taskrun.uid);
    if left_alone_by_backfill(
        &facts.phase,
        snapshot.annotation.is_some() || !remembered.is_empty(),
        ctx.settings.backfill_cutoff,
    ) {
        return Owing::LeftAlone;
    }
    ledger.merge(&remembered);
    let mut transitions = owed_in_formats(&facts, &ledger, ctx.settings.event_formats);
    transitions.retain(|t| ctx.settings.event_types.contains(t.kind));
    let spans = if ctx.spans.is_some() {
        owed_spans(&facts, &ledger, &snapshot.trace, &snapshot.taskrun.uid)
    } else {
        Vec::new()
    };
    Owing::Events(Owed {
        transitions,
        spans,
        malformed_ledger,
    })
}

/// [`owing`], for the delivery worker: `None` when nothing can be owed (the
/// status cannot be decided yet, or the backfill rule leaves it alone).
pub fn owed_events(ctx: &Context, snapshot: &Snapshot) -> Option<Owed> {
    match owing(ctx, snapshot) {
        Owing::Events(owed) => Some(owed),
        Owing::Undecided | Owing::LeftAlone => None,
    }
}

/// The number of events a snapshot still owes.
pub fn owed_count(ctx: &Context, snapshot: &Snapshot) -> usize {
    owed_events(ctx, snapshot).map_or(0, |owed| owed.transitions.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_at(text: &str) -> RunPhase {
        RunPhase::Finished {
            reason: Some("Succeeded".to_owned()),
            at: Some(
                DateTime::parse_from_rfc3339(text)
                    .unwrap()
                    .with_timezone(&Utc),
            ),
        }
    }

    #[test]
    fn only_what_finished_before_the_cutoff_without_a_ledger_is_left_alone() {
        let cutoff = DateTime::parse_from_rfc3339("2026-12-02T11:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let before = finished_at("2026-12-02T10:59:59Z");
        let after = finished_at("2026-12-02T11:00:01Z");
        assert!(left_alone_by_backfill(&before, false, cutoff));
        assert!(!left_alone_by_backfill(&before, true, cutoff));
        assert!(!left_alone_by_backfill(&after, false, cutoff));
        assert!(!left_alone_by_backfill(&RunPhase::Running, false, cutoff));
        // No completion time: it cannot be placed before the cutoff.
        let unknown = RunPhase::Finished {
            reason: None,
            at: None,
        };
        assert!(!left_alone_by_backfill(&unknown, false, cutoff));
    }

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

/// How a watch fills itself at start and after a gap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListMode {
    /// Paged LISTs of this many objects.
    Paged(u32),
    /// One streaming list (WatchList): objects one at a time.
    Streaming,
}
