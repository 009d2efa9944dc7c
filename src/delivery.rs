//! The delivery worker of one TaskRun: send what it owes, in order, retry
//! what the sink could not take yet, and record what was settled in the
//! ledger annotation, only after the sink acknowledged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudevents::Event;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use rand::Rng;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::context::{Context, Snapshot, annotation_ledger, not_older_than, owed_events};
use crate::error::{Error, Result};
use crate::event::{EventInput, StepLog, build_event, state_as_started};
use crate::ledger::{Ledger, Settlement, compare_and_swap_patch, patch_did_not_apply};
use crate::logs::{LogLocation, read_step_log};
use crate::metrics::LostReason;
use crate::sink::{DeliveryOutcome, RetryPolicy, RetryReason, dead_letter_event, retry_delay};
use crate::step_event::StepEventKind;
use crate::step_span::step_traceparent;
use crate::steps::{EventFormat, Transition, run_facts, step_run_time};
use crate::tekton::{LEDGER_ANNOTATION, TaskRunRef};

/// Field manager of the ledger patch, so `kubectl get -o yaml --show-managed-fields`
/// shows who wrote the annotation.
pub const FIELD_MANAGER: &str = "tekton-step-observer";

/// Conflicting writes of one TaskRun's ledger (another writer changed the
/// annotation) are retried this many times, each on a fresh read, before
/// the patch waits for the next round.
const MAX_PATCH_ATTEMPTS: usize = 5;

/// One event of a TaskRun: its attempt, step, kind and format.
type EventKey = (u32, usize, StepEventKind, EventFormat);

fn event_key(transition: &Transition) -> EventKey {
    (
        transition.attempt,
        transition.step_index,
        transition.kind,
        transition.format,
    )
}

/// How a round of sending ended.
enum RoundEnd {
    /// Everything owed at the round's start was settled.
    Settled,
    /// Enough was settled that the ledger is written before going on.
    Checkpoint,
    /// The sink could not take an event yet; wait this long.
    RetryAfter(Duration),
    /// Leadership was lost mid-round.
    NotLeader,
    /// The process is stopping: nothing more is sent.
    Stopping,
}

/// An event the sink did not take, and what it said.
struct NotTaken<'a> {
    /// Its last HTTP status, if it answered.
    status: Option<u16>,
    /// Its answer, or the connection error.
    said: &'a str,
    /// Since the transition was seen.
    latency: Duration,
    /// How it is settled without a dead-letter sink.
    otherwise: Settlement,
}

/// What a worker remembers of failed sends, for its retry policy.
#[derive(Default)]
struct Retries {
    /// Per event: failed attempts so far and when the first failed.
    failures: HashMap<EventKey, (u32, Instant)>,
    /// Events given up on, owed to the dead-letter sink, as they go there.
    dead_letters: HashMap<EventKey, Event>,
}

/// What a Warning Event says about a held event, by retry policy.
fn held_note(ctx: &Context) -> &'static str {
    match (
        ctx.settings.retry_policy == RetryPolicy::default(),
        ctx.settings.dead_letter_sink.is_some(),
    ) {
        (true, _) => "The event is held and retried; nothing is dropped.",
        (false, true) => {
            "The event is retried until the retry policy gives up, then goes to the dead-letter sink."
        }
        (false, false) => {
            "The event is retried until the retry policy gives up, then dropped (no dead-letter sink)."
        }
    }
}

/// A round stops to write the ledger after this many settled events, or
/// after [`LEDGER_CHECKPOINT_INTERVAL`], whichever comes first, and then goes
/// on: a crash mid-round repeats at most these, plus the one in flight.
const LEDGER_CHECKPOINT_EVENTS: usize = 16;

/// See [`LEDGER_CHECKPOINT_EVENTS`]: long enough that a burst of events costs
/// few patches, short enough that little is repeated after a crash.
const LEDGER_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a terminal event waits for its step's log while reading it fails
/// in a way that may pass: longer than an API server or kubelet restart
/// takes, short enough that a node gone for good holds its TaskRuns' events
/// only briefly. Then the event goes out without its log (`logError`).
const LOG_WAIT: Duration = Duration::from_secs(120);

/// An event built, or why not yet.
enum Built {
    /// Ready to send.
    Event(Event),
    /// Its step's log could not be read for now.
    LogNotYet(Error),
}

/// What stops a worker from sending right now.
enum Gate {
    Open(url::Url),
    /// This replica just became leader while the worker waited.
    TookOver,
    NewSnapshot,
    Closed,
}

/// Delivers everything a TaskRun owes, then returns. The tracker restarts it
/// when the TaskRun owes more.
pub async fn run_worker(ctx: Arc<Context>, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    let worker_started = Instant::now();
    let mut attempt: u32 = 0;
    let mut first_seen: HashMap<EventKey, Instant> = HashMap::new();
    let mut pending: Option<(EventKey, Event)> = None;
    let mut log_waits = HashMap::new();
    let mut retries = Retries::default();
    let mut reported_malformed = false;
    let mut patch_owed = false;
    let mut own_write: Option<OwnWrite> = None;
    let mut first_pass = true;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let Some(owed) = owed_events(&ctx, &snapshot) else {
            return;
        };
        if let Some(problem) = owed.malformed_ledger.filter(|_| !reported_malformed) {
            reported_malformed = true;
            report_malformed_ledger(&ctx, &snapshot.taskrun, &problem).await;
        }
        let spans_owed = !owed.spans.is_empty();
        let owed = owed.transitions;
        if snapshot.deleted {
            if !owed.is_empty() && *ctx.leader.borrow() {
                report_lost(&ctx, &snapshot, owed.len());
            }
            return;
        }
        if owed.is_empty() && !spans_owed && !patch_owed && !ctx.ledger_regressed(&snapshot) {
            return;
        }
        let now = Instant::now();
        for transition in &owed {
            first_seen
                .entry(event_key(transition))
                .or_insert(snapshot.seen_at.min(now));
        }
        // Our own time on an event's path starts when its watch event
        // arrived, or, if this worker was still busy with earlier events
        // then, when it became free: that wait is the sink's, not ours.
        let dispatch_origin = if first_pass {
            snapshot.seen_at
        } else {
            snapshot.seen_at.max(now)
        };
        let loop_at = Instant::now();
        let first = first_pass;
        first_pass = false;

        let sink = match gate(&ctx, &mut snapshots).await {
            Gate::Open(sink) => sink,
            Gate::TookOver => {
                adopt_current_ledger(&ctx, &snapshot).await;
                continue;
            }
            Gate::NewSnapshot => continue,
            Gate::Closed => {
                write_ledger_before_exit(&ctx, &snapshot, &mut own_write).await;
                return;
            }
        };
        let end = match ctx.delivery_slots.acquire().await {
            Ok(_permit) => {
                ctx.metrics.record_delivery_round();
                let slot_at = Instant::now();
                // Where the time before the round went: the worker's start
                // (a first pass), the gate, the wait for a slot.
                debug!(
                    taskrun = %snapshot.taskrun.key(),
                    first,
                    to_worker_us = worker_started.saturating_duration_since(dispatch_origin).as_micros(),
                    to_loop_us = loop_at.saturating_duration_since(dispatch_origin).as_micros(),
                    loop_to_slot_us = slot_at.saturating_duration_since(loop_at).as_micros(),
                    "round start breakdown"
                );
                let round = Round {
                    ctx: &ctx,
                    snapshot: &snapshot,
                    sink: &sink,
                    first_seen: &first_seen,
                    pods: tokio::sync::Mutex::new(HashMap::new()),
                    logs: std::sync::Mutex::new(HashMap::new()),
                    dispatch_origin,
                    slot_at,
                    waited: IoWait::default(),
                };
                round
                    .send_all(&owed, &mut pending, &mut log_waits, &mut retries)
                    .await
            }
            // Closed only when the process is going down.
            Err(_) => return,
        };
        // The events' ledger first: a span export that hangs must not hold
        // back the record of what the sink took.
        patch_owed = !write_settled(&ctx, &snapshot, &mut own_write).await;
        // Spans go out even while the sink refuses events: they do not
        // depend on it. What was exported is recorded at once.
        let end = match end {
            RoundEnd::NotLeader | RoundEnd::Stopping => end,
            _ if export_owed_spans(&ctx, &snapshot).await => {
                patch_owed = !write_settled(&ctx, &snapshot, &mut own_write).await;
                end
            }
            RoundEnd::Settled | RoundEnd::Checkpoint => RoundEnd::RetryAfter(Duration::ZERO),
            end => end,
        };
        let wait = match end {
            RoundEnd::Settled | RoundEnd::Checkpoint if !patch_owed => {
                attempt = 0;
                continue;
            }
            RoundEnd::Settled | RoundEnd::Checkpoint => {
                attempt = attempt.saturating_add(1);
                backoff(&ctx, attempt, None)
            }
            RoundEnd::RetryAfter(hint) => {
                attempt = attempt.saturating_add(1);
                backoff(&ctx, attempt, Some(hint))
            }
            RoundEnd::NotLeader => continue,
            RoundEnd::Stopping => {
                write_ledger_before_exit(&ctx, &snapshot, &mut own_write).await;
                return;
            }
        };
        debug!(taskrun = %snapshot.taskrun.key(), ?wait, attempt, "waiting before the next attempt");
        let mut stopping = ctx.stopping.clone();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // Stopping ends the wait: the gate then closes and the ledger is written.
            _ = stopping.wait_for(|stop| *stop) => {}
        }
    }
}

/// Writes what this process settled for the TaskRun into its ledger, if
/// the annotation lacks any of it. Whether the ledger holds it all now; a
/// failed write is counted, logged and retried by the caller.
async fn write_settled(
    ctx: &Context,
    snapshot: &Snapshot,
    own_write: &mut Option<OwnWrite>,
) -> bool {
    let settled = ctx.memory_ledger(&snapshot.taskrun.uid);
    if ledger_covers_memory(snapshot, &settled) {
        return true;
    }
    match patch_ledger(ctx, snapshot, &settled, own_write).await {
        Ok(()) => true,
        Err(error) => {
            ctx.metrics.record_reconcile_error(error.metric_label());
            warn!(taskrun = %snapshot.taskrun.key(), %error, "could not record the ledger; will retry");
            false
        }
    }
}

/// Exports the step spans the TaskRun owes (its ledger, with what this
/// round settled, marks them) and records them exported. Whether nothing is
/// left owed; a failed export is logged, counted and retried with backoff.
async fn export_owed_spans(ctx: &Context, snapshot: &Snapshot) -> bool {
    let Some(export) = &ctx.spans else {
        return true;
    };
    let Some(owed) = owed_events(ctx, snapshot) else {
        return true;
    };
    if owed.spans.is_empty() {
        return true;
    }
    let taskrun = &snapshot.taskrun;
    // Each attempt ran in a pod of its own.
    let pod_of = |attempt| {
        snapshot
            .status
            .as_ref()
            .map(|s| s.of_attempt(attempt))
            .and_then(|s| s.pod_name.as_deref())
            .filter(|p| !p.is_empty())
    };
    match export.export(taskrun, pod_of, &owed.spans).await {
        Ok(()) => {
            let mut exported = Ledger::default();
            for span in &owed.spans {
                exported.mark_span_exported(&span.step_name, span.attempt);
            }
            ctx.remember(taskrun, &exported);
            ctx.metrics.record_spans_exported(owed.spans.len());
            debug!(taskrun = %taskrun.key(), spans = owed.spans.len(), "step spans exported");
            true
        }
        Err(error) => {
            ctx.metrics.record_span_export_error();
            warn!(taskrun = %taskrun.key(), spans = owed.spans.len(), %error, "could not export step spans; will retry");
            false
        }
    }
}

fn backoff(ctx: &Context, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let jitter: f64 = rand::rng().random();
    retry_delay(
        attempt,
        ctx.settings.retry_base,
        ctx.settings.retry_cap,
        retry_after.filter(|d| !d.is_zero()),
        jitter,
    )
}

/// Before a worker ends for good (the process is stopping, or the sink or
/// leadership channels closed): writes the ledger for everything the sink
/// acknowledged, so the next leader does not send it again.
async fn write_ledger_before_exit(
    ctx: &Context,
    snapshot: &Snapshot,
    own_write: &mut Option<OwnWrite>,
) {
    let settled = ctx.memory_ledger(&snapshot.taskrun.uid);
    if settled.is_empty() || ledger_covers_memory(snapshot, &settled) {
        return;
    }
    match patch_ledger(ctx, snapshot, &settled, own_write).await {
        Ok(()) => {
            info!(taskrun = %snapshot.taskrun.key(), events = settled.len(), "ledger written before stopping")
        }
        Err(error) => {
            warn!(taskrun = %snapshot.taskrun.key(), %error, "could not write the ledger before stopping; the next leader resends what it lacks")
        }
    }
}

/// On taking over from another leader: reads the TaskRun afresh and takes
/// its ledger as settled. NB: the watch may not yet show the last ledger
/// write the leader before made (it wrote it just before it released the
/// Lease, and the two watches are not ordered), and sending from the older
/// copy would repeat what it recorded. One GET per TaskRun still owing
/// events, at a takeover only. On error the snapshot's ledger stands.
async fn adopt_current_ledger(ctx: &Context, snapshot: &Snapshot) {
    let taskrun = &snapshot.taskrun;
    match ctx
        .taskruns(&taskrun.namespace)
        .get_opt(&taskrun.name)
        .await
    {
        Ok(Some(current)) if current.metadata.uid.as_deref() == Some(taskrun.uid.as_str()) => {
            let (ledger, _) =
                annotation_ledger(crate::tekton::ledger_annotation(&current.metadata));
            if !ledger.is_empty() {
                ctx.remember(taskrun, &ledger);
            }
        }
        // Gone: the watch brings the deletion.
        Ok(_) => {}
        Err(error) => {
            debug!(taskrun = %taskrun.key(), %error, "cannot read the TaskRun on taking over; going by the watch");
        }
    }
}

/// Whether the annotation in this snapshot already holds all we settled.
fn ledger_covers_memory(snapshot: &Snapshot, settled: &Ledger) -> bool {
    let (annotation, _) = annotation_ledger(snapshot.annotation.as_deref());
    annotation.covers(settled)
}

/// Waits until this replica leads and a valid sink is configured. A newer
/// snapshot interrupts the wait, so a deleted TaskRun is noticed.
async fn gate(ctx: &Context, snapshots: &mut watch::Receiver<Arc<Snapshot>>) -> Gate {
    let mut leader = ctx.leader.clone();
    let mut sink = ctx.sink.clone();
    let mut stopping = ctx.stopping.clone();
    let mut waited_for_leadership = false;
    loop {
        if *stopping.borrow_and_update() {
            return Gate::Closed;
        }
        let is_leader = *leader.borrow_and_update();
        let url = sink.borrow_and_update().url().cloned();
        match (is_leader, url) {
            (true, _) if waited_for_leadership => return Gate::TookOver,
            (true, Some(url)) => return Gate::Open(url),
            (false, _) => waited_for_leadership = true,
            (true, None) => {}
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { return Gate::Closed },
            changed = sink.changed() => if changed.is_err() { return Gate::Closed },
            changed = stopping.changed() => if changed.is_err() { return Gate::Closed },
            changed = snapshots.changed() => {
                return if changed.is_err() { Gate::Closed } else { Gate::NewSnapshot };
            }
        }
    }
}

/// One pass over the owed events of a TaskRun.
struct Round<'a> {
    ctx: &'a Context,
    snapshot: &'a Snapshot,
    sink: &'a url::Url,
    first_seen: &'a HashMap<EventKey, Instant>,
    /// The pods of the TaskRun's attempts as JSON (None if one cannot be
    /// read), each read at most once per round, when a `started` event is
    /// built after its step ended.
    pods: tokio::sync::Mutex<HashMap<String, Option<Value>>>,
    /// The logs read this round, by attempt and step index, so a step whose
    /// terminal event goes out in two formats has its log read once.
    logs: std::sync::Mutex<HashMap<(u32, usize), StepLog>>,
    /// Where this round's dispatch time is counted from (see `run_worker`).
    dispatch_origin: Instant,
    /// When the round got its delivery slot (for the dispatch breakdown).
    slot_at: Instant,
    /// Time this round spent waiting on the API server and the sink.
    waited: IoWait,
}

/// Time spent waiting on I/O, summed across a round's awaits.
#[derive(Default)]
struct IoWait(std::sync::Mutex<Duration>);

impl IoWait {
    async fn around<T>(&self, io: impl std::future::Future<Output = T>) -> T {
        let start = Instant::now();
        let out = io.await;
        let spent = start.elapsed();
        if let Ok(mut total) = self.0.lock() {
            *total += spent;
        }
        out
    }

    fn total(&self) -> Duration {
        self.0.lock().map(|total| *total).unwrap_or_default()
    }
}

impl Round<'_> {
    async fn send_all(
        &self,
        owed: &[Transition],
        pending: &mut Option<(EventKey, Event)>,
        log_waits: &mut HashMap<EventKey, Instant>,
        retries: &mut Retries,
    ) -> RoundEnd {
        let ctx = self.ctx;
        let taskrun = &self.snapshot.taskrun;
        let started = Instant::now();
        let mut settled = 0;
        for (index, transition) in owed.iter().enumerate() {
            if !*ctx.leader.borrow() {
                return RoundEnd::NotLeader;
            }
            // Stopping lets the send in flight finish, then starts no other.
            if *ctx.stopping.borrow() {
                return RoundEnd::Stopping;
            }
            // What is settled so far is written before the rest is sent.
            if index > 0
                && (settled >= LEDGER_CHECKPOINT_EVENTS
                    || started.elapsed() >= LEDGER_CHECKPOINT_INTERVAL)
            {
                return RoundEnd::Checkpoint;
            }
            let key = event_key(transition);
            // Given up on earlier and still owed to the dead-letter sink.
            if let Some(dead) = retries.dead_letters.remove(&key)
                && let Some(dead_letter_sink) = &ctx.settings.dead_letter_sink
            {
                let latency = self
                    .first_seen
                    .get(&key)
                    .map(Instant::elapsed)
                    .unwrap_or_default();
                match self
                    .send_dead_letter(transition, dead_letter_sink, dead, latency, retries)
                    .await
                {
                    Some(end) => return end,
                    None => {
                        settled += 1;
                        continue;
                    }
                }
            }
            // Dispatch time is taken for events first owed in this round's
            // update: a retried or carried-over one has waited on purpose.
            let mut fresh = self.first_seen.get(&key) == Some(&self.snapshot.seen_at);
            // A retried event is sent exactly as before: same id, same log.
            let build_started = Instant::now();
            let waited_before_build = self.waited.total();
            let event = match pending.take() {
                Some((pending_key, event)) if pending_key == key => {
                    fresh = false;
                    event
                }
                _ => match self.build(transition, log_waits.get(&key)).await {
                    Ok(Built::Event(event)) => {
                        log_waits.remove(&key);
                        event
                    }
                    Ok(Built::LogNotYet(error)) => {
                        warn!(taskrun = %taskrun.key(), step = %transition.step_name, %error, "the step's log cannot be read yet; will retry");
                        log_waits.entry(key).or_insert_with(Instant::now);
                        return RoundEnd::RetryAfter(Duration::ZERO);
                    }
                    Err(error) => {
                        error!(taskrun = %taskrun.key(), step = %transition.step_name, %error, "cannot build the event; recording it as rejected");
                        self.settle(transition, Settlement::Rejected);
                        settled += 1;
                        continue;
                    }
                },
            };
            if fresh {
                let waited = self.waited.total();
                let own = self.dispatch_origin.elapsed().saturating_sub(waited);
                ctx.metrics.observe_dispatch(transition.kind, own);
                // Where our own time went, for finding a slow dispatch.
                let build = build_started
                    .elapsed()
                    .saturating_sub(waited.saturating_sub(waited_before_build));
                debug!(
                    taskrun = %taskrun.key(),
                    step = %transition.step_name,
                    event = transition.kind.as_str(),
                    index,
                    own_us = own.as_micros(),
                    to_slot_us = self.slot_at.saturating_duration_since(self.dispatch_origin).as_micros(),
                    build_us = build.as_micros(),
                    waited_us = waited.as_micros(),
                    "dispatch breakdown"
                );
            }
            let outcome = self
                .waited
                .around(ctx.sink_client.send(self.sink, &event))
                .await;
            let latency = self
                .first_seen
                .get(&key)
                .map(Instant::elapsed)
                .unwrap_or_default();
            let kind = transition.kind;
            let tls_failure = outcome.tls_failure().map(str::to_owned);
            match outcome {
                DeliveryOutcome::Delivered { status } => {
                    ctx.readiness.set_sink_refusal(None);
                    ctx.readiness.set_sink_tls_failure(None);
                    retries.failures.remove(&key);
                    self.settle(transition, Settlement::Delivered);
                    settled += 1;
                    ctx.metrics.record_delivered(kind, latency);
                    info!(taskrun = %taskrun.key(), step = %transition.step_name, event = transition.kind.as_str(), status, "event delivered");
                }
                DeliveryOutcome::Rejected { status, body } => {
                    retries.failures.remove(&key);
                    let note = format!(
                        "The sink refused the {} event of step {} with HTTP {status}: {body}",
                        transition.kind.as_str(),
                        transition.step_name
                    );
                    warn!(taskrun = %taskrun.key(), step = %transition.step_name, status, %body, "sink rejected the event for good");
                    publish_warning(ctx, taskrun, "EventRejected", note).await;
                    let not_taken = NotTaken {
                        status: Some(status),
                        said: &body,
                        latency,
                        otherwise: Settlement::Rejected,
                    };
                    match self
                        .settle_not_taken(transition, &event, not_taken, retries)
                        .await
                    {
                        Some(end) => return end,
                        None => settled += 1,
                    }
                }
                DeliveryOutcome::Unencodable { reason } => {
                    self.settle(transition, Settlement::Rejected);
                    settled += 1;
                    ctx.metrics.record_rejected(kind, latency);
                    warn!(taskrun = %taskrun.key(), step = %transition.step_name, %reason, "event cannot be encoded; recorded as rejected");
                    publish_warning(ctx, taskrun, "EventRejected", reason).await;
                }
                DeliveryOutcome::Retry {
                    reason,
                    detail,
                    retry_after,
                    status,
                } => {
                    let held = held_note(ctx);
                    if let Some(tls) = &tls_failure {
                        ctx.readiness.set_sink_tls_failure(Some(tls.to_owned()));
                        let note = format!(
                            "The TLS handshake with the sink failed while sending the {} event of step {}: {tls}. {held} If the sink's certificate comes from a private CA, trust it with --sink-ca-file or key sink.CACerts of ConfigMap config-events.",
                            transition.kind.as_str(),
                            transition.step_name
                        );
                        publish_warning(ctx, taskrun, "SinkTLSFailed", note).await;
                    }
                    ctx.metrics.record_retry(reason);
                    warn!(taskrun = %taskrun.key(), step = %transition.step_name, reason = reason.as_str(), %detail, "sink did not take the event; will retry");
                    if reason == RetryReason::Unauthorized {
                        ctx.readiness.set_sink_refusal(Some(detail.clone()));
                        let note = format!(
                            "The sink refused the {} event of step {} ({detail}): its credentials or configuration are wrong. {held}",
                            transition.kind.as_str(),
                            transition.step_name
                        );
                        publish_warning(ctx, taskrun, "SinkUnauthorized", note).await;
                    }
                    let failures = retries
                        .failures
                        .entry(key)
                        .or_insert_with(|| (0, Instant::now()));
                    failures.0 = failures.0.saturating_add(1);
                    let (failed, since) = (failures.0, failures.1.elapsed());
                    if !ctx.settings.retry_policy.gives_up(failed, since) {
                        *pending = Some((key, event));
                        return RoundEnd::RetryAfter(retry_after.unwrap_or_default());
                    }
                    retries.failures.remove(&key);
                    let why = format!(
                        "gave up after {failed} failed attempt{} over {} ({detail})",
                        if failed == 1 { "" } else { "s" },
                        humantime::format_duration(Duration::from_secs(since.as_secs()))
                    );
                    if ctx.settings.dead_letter_sink.is_some() {
                        warn!(taskrun = %taskrun.key(), step = %transition.step_name, %why, "sending the event to the dead-letter sink");
                    } else {
                        let note = format!(
                            "The {} event of step {} was dropped: the retry policy {why}, and no --dead-letter-sink is configured.",
                            transition.kind.as_str(),
                            transition.step_name
                        );
                        warn!(taskrun = %taskrun.key(), step = %transition.step_name, %why, "dropped the event");
                        publish_warning(ctx, taskrun, "EventDropped", note).await;
                    }
                    let not_taken = NotTaken {
                        status,
                        said: &detail,
                        latency,
                        otherwise: Settlement::Dropped,
                    };
                    match self
                        .settle_not_taken(transition, &event, not_taken, retries)
                        .await
                    {
                        Some(end) => return end,
                        None => settled += 1,
                    }
                }
            }
        }
        RoundEnd::Settled
    }

    /// Settles an event the sink did not take: it goes to the dead-letter
    /// sink if there is one, else it is settled as `otherwise` (rejected,
    /// dropped). `None` when settled; otherwise how the round ends.
    async fn settle_not_taken(
        &self,
        transition: &Transition,
        event: &Event,
        not_taken: NotTaken<'_>,
        retries: &mut Retries,
    ) -> Option<RoundEnd> {
        let ctx = self.ctx;
        if let Some(dead_letter_sink) = &ctx.settings.dead_letter_sink {
            let dead = dead_letter_event(event, self.sink, not_taken.status, not_taken.said);
            return self
                .send_dead_letter(
                    transition,
                    dead_letter_sink,
                    dead,
                    not_taken.latency,
                    retries,
                )
                .await;
        }
        self.settle(transition, not_taken.otherwise);
        match not_taken.otherwise {
            Settlement::Dropped => ctx
                .metrics
                .record_dropped(transition.kind, not_taken.latency),
            _ => ctx
                .metrics
                .record_rejected(transition.kind, not_taken.latency),
        }
        None
    }

    /// Sends an event the sink did not take to the dead-letter sink. `None`
    /// when that settled it; otherwise how the round ends (the dead-letter
    /// sink is retried like the sink, forever: it is the last resort).
    async fn send_dead_letter(
        &self,
        transition: &Transition,
        dead_letter_sink: &url::Url,
        dead: Event,
        latency: Duration,
        retries: &mut Retries,
    ) -> Option<RoundEnd> {
        let ctx = self.ctx;
        let taskrun = &self.snapshot.taskrun;
        let outcome = self
            .waited
            .around(ctx.sink_client.send(dead_letter_sink, &dead))
            .await;
        match outcome {
            DeliveryOutcome::Delivered { status } => {
                self.settle(transition, Settlement::DeadLettered);
                ctx.metrics.record_dead_lettered(transition.kind, latency);
                info!(taskrun = %taskrun.key(), step = %transition.step_name, event = transition.kind.as_str(), status, "event delivered to the dead-letter sink");
                let note = format!(
                    "The {} event of step {} went to the dead-letter sink {dead_letter_sink}: the sink did not take it.",
                    transition.kind.as_str(),
                    transition.step_name
                );
                publish_warning(ctx, taskrun, "EventDeadLettered", note).await;
                None
            }
            DeliveryOutcome::Retry {
                reason,
                detail,
                retry_after,
                ..
            } => {
                ctx.metrics.record_retry(reason);
                warn!(taskrun = %taskrun.key(), step = %transition.step_name, reason = reason.as_str(), %detail, "the dead-letter sink did not take the event; will retry");
                retries.dead_letters.insert(event_key(transition), dead);
                Some(RoundEnd::RetryAfter(retry_after.unwrap_or_default()))
            }
            DeliveryOutcome::Rejected { status, body } => {
                self.settle(transition, Settlement::Dropped);
                ctx.metrics.record_dropped(transition.kind, latency);
                let note = format!(
                    "The {} event of step {} was dropped: the dead-letter sink refused it too, with HTTP {status}: {body}",
                    transition.kind.as_str(),
                    transition.step_name
                );
                warn!(taskrun = %taskrun.key(), step = %transition.step_name, status, %body, "the dead-letter sink rejected the event; dropped");
                publish_warning(ctx, taskrun, "EventDropped", note).await;
                None
            }
            DeliveryOutcome::Unencodable { reason } => {
                self.settle(transition, Settlement::Dropped);
                ctx.metrics.record_dropped(transition.kind, latency);
                publish_warning(ctx, taskrun, "EventDropped", reason).await;
                None
            }
        }
    }

    fn settle(&self, transition: &Transition, how: Settlement) {
        let mut settled = Ledger::default();
        settled.record_attempt(
            &transition.step_name,
            transition.attempt,
            transition.format,
            transition.kind,
            how,
        );
        if self.ctx.spans.is_some()
            && matches!(
                transition.kind,
                StepEventKind::Succeeded | StepEventKind::Failed
            )
        {
            // Recorded with the event, so the span is owed across restarts.
            settled.mark_span_owed(&transition.step_name, transition.attempt);
        }
        self.ctx.remember(&self.snapshot.taskrun, &settled);
        // A transition sent in two formats is one step transition.
        if self.ctx.settings.event_formats.iter().next() == Some(transition.format) {
            self.record_step_metrics(transition);
        }
    }

    /// Counts a settled transition and, for a step that ran to its end, how
    /// long it ran. Settling happens once per event in this process (what
    /// was settled is never owed again), so each step is observed once.
    fn record_step_metrics(&self, transition: &Transition) {
        let metrics = &self.ctx.metrics;
        metrics.record_step_transition(transition.kind);
        if !matches!(
            transition.kind,
            StepEventKind::Succeeded | StepEventKind::Failed
        ) {
            return;
        }
        let ran = self
            .snapshot
            .status
            .as_ref()
            .map(|s| s.of_attempt(transition.attempt))
            .and_then(|s| s.steps.get(transition.step_index))
            .and_then(step_run_time);
        if let Some(ran) = ran {
            let namespace = self
                .ctx
                .settings
                .step_metrics_by_namespace
                .then_some(self.snapshot.taskrun.namespace.as_str());
            metrics.observe_step_duration(transition.kind, namespace, ran);
        }
    }

    /// Builds the event of a transition; a terminal event waits for its
    /// log while reading it fails in a way that may pass, for up to
    /// [`LOG_WAIT`] since `log_failing_since`.
    async fn build(
        &self,
        transition: &Transition,
        log_failing_since: Option<&Instant>,
    ) -> Result<Built> {
        let current = self.snapshot.status.as_ref();
        // An attempt's event is built from that attempt's own status (its
        // pod, its step states), archived in retriesStatus once retried.
        let status = current.map(|s| s.of_attempt(transition.attempt));
        let index = transition.step_index;
        let mut step_state = status.and_then(|s| s.steps.get(index));
        let step_spec = status
            .and_then(|s| s.task_spec.as_ref())
            .or_else(|| current.and_then(|s| s.task_spec.as_ref()))
            .and_then(|spec| spec.steps.get(index));
        let pod_name = status
            .and_then(|s| s.pod_name.as_deref())
            .filter(|name| !name.is_empty());
        let container = step_state
            .and_then(|s| s.get("container"))
            .and_then(|c| c.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("step-{}", transition.step_name));
        let mut transition = Cow::Borrowed(transition);
        let started_state;
        let log = match transition.kind {
            StepEventKind::Started => {
                // The step ended since it started: describe it as it
                // started, so that this event, whether first sent now or
                // sent again after a restart, is the one sent while the
                // step ran. Step 0 starts when its container does.
                if let Some(state) = step_state.filter(|s| s.get("terminated").is_some()) {
                    let container_start = self
                        .waited
                        .around(self.container_started_at(pod_name, &container))
                        .await;
                    let at = container_start
                        .as_deref()
                        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok());
                    if let Some(at) = at.filter(|_| index == 0) {
                        transition.to_mut().time = Some(at.with_timezone(&chrono::Utc));
                    }
                    started_state = state_as_started(state, container_start.as_deref());
                    step_state = Some(&started_state);
                }
                StepLog::NotCarried
            }
            StepEventKind::Skipped => StepLog::Unavailable("the step did not run".to_owned()),
            StepEventKind::Succeeded | StepEventKind::Failed => {
                let key = (transition.attempt, index);
                let cached = self
                    .logs
                    .lock()
                    .ok()
                    .and_then(|logs| logs.get(&key).cloned());
                if let Some(log) = cached {
                    return self.finish_build(&transition, step_spec, step_state, pod_name, &log);
                }
                let read = read_step_log(
                    &self.ctx.client,
                    LogLocation {
                        namespace: &self.snapshot.taskrun.namespace,
                        pod: pod_name,
                        container: &container,
                    },
                    self.ctx.settings.log_limit_bytes,
                );
                let log = match self.waited.around(read).await {
                    Ok(log) => log,
                    Err(error) if log_failing_since.is_none_or(|s| s.elapsed() < LOG_WAIT) => {
                        return Ok(Built::LogNotYet(error));
                    }
                    Err(error) => StepLog::Unavailable(error.to_string()),
                };
                if let StepLog::Unavailable(why) = &log {
                    self.ctx.metrics.record_log_read_error();
                    debug!(taskrun = %self.snapshot.taskrun.key(), step = %transition.step_name, %why, "log not available");
                }
                if let Ok(mut logs) = self.logs.lock() {
                    logs.insert(key, log.clone());
                }
                log
            }
        };
        self.finish_build(&transition, step_spec, step_state, pod_name, &log)
    }

    fn finish_build(
        &self,
        transition: &Transition,
        step_spec: Option<&Value>,
        step_state: Option<&Value>,
        pod_name: Option<&str>,
        log: &StepLog,
    ) -> Result<Built> {
        let mut event = build_event(
            &self.ctx.settings.events,
            EventInput {
                taskrun: &self.snapshot.taskrun,
                transition,
                step_spec,
                step_state,
                pod_name,
                log,
            },
        )?;
        if self.ctx.spans.is_some() {
            // The CloudEvents distributed-tracing extension: the step's span.
            let parent = step_traceparent(
                &self.snapshot.trace,
                &self.snapshot.taskrun.uid,
                &transition.step_name,
                transition.attempt,
            );
            event.set_extension("traceparent", parent.header());
        }
        Ok(Built::Event(event))
    }
}

impl Round<'_> {
    /// When a step's container started, as its pod records it (the kubelet
    /// keeps it in `terminated.startedAt`); None when the pod cannot be read.
    async fn container_started_at(&self, pod: Option<&str>, container: &str) -> Option<String> {
        let pod = pod?;
        let mut pods = self.pods.lock().await;
        if !pods.contains_key(pod) {
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.ctx.client.clone(),
                &self.snapshot.taskrun.namespace,
                &ApiResource::erase::<Pod>(&()),
            );
            let read = match api.get(pod).await {
                Ok(object) => serde_json::to_value(object).ok(),
                Err(error) => {
                    debug!(taskrun = %self.snapshot.taskrun.key(), %error, "cannot read the pod for a container's start");
                    None
                }
            };
            pods.insert(pod.to_owned(), read);
        }
        let pod = pods.get(pod)?.as_ref()?;
        let status = pod["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == container)?;
        let state = &status["state"];
        state["terminated"]["startedAt"]
            .as_str()
            .or_else(|| state["running"]["startedAt"].as_str())
            .map(str::to_owned)
    }
}

/// The ledger annotation as this worker last wrote it, and the
/// resourceVersion that write produced.
struct OwnWrite {
    resource_version: String,
    annotation: String,
}

/// Writes the union of the annotation and what this process settled, as a
/// compare-and-swap on the annotation alone
/// ([`compare_and_swap_patch`]): a writer whose copy of the annotation is
/// stale (a deposed leader, or a race with another writer) is refused
/// instead of overwriting, while Tekton's own status writes do not get in
/// the way. When refused, re-read and merge again; the ledger only grows,
/// so nothing is ever taken back.
async fn patch_ledger(
    ctx: &Context,
    snapshot: &Snapshot,
    settled: &Ledger,
    own_write: &mut Option<OwnWrite>,
) -> Result<()> {
    let taskrun = &snapshot.taskrun;
    let api = ctx.taskruns(&taskrun.namespace);
    // A snapshot older than our own last write holds an annotation that is
    // no longer there: testing it would only fail.
    let (mut previous, mut annotations_present) = match own_write {
        Some(own)
            if !not_older_than(snapshot.resource_version.as_deref(), &own.resource_version) =>
        {
            (Some(own.annotation.clone()), true)
        }
        _ => (snapshot.annotation.clone(), snapshot.annotations_present),
    };
    let mut current = annotation_ledger(previous.as_deref()).0;
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let patch_error = |source| Error::PatchLedger {
        object: taskrun.key(),
        source,
    };
    // Entries of steps this TaskRun does not have can never count; dropping
    // them keeps a foreign or hostile annotation (say, 256 KiB of made-up
    // steps) from pushing the ledger past the API server's size limit.
    let steps: Option<std::collections::HashSet<String>> = run_facts(snapshot.status.as_ref())
        .ok()
        .map(|facts| facts.steps.into_iter().map(|step| step.name).collect());
    let mut last_error = None;
    // NB: not gated on leadership: the patch is conditional and the ledger
    // only grows, so a write by a replica that just lost the Lease (or is
    // stopping) can add what it acknowledged but never take anything back.
    // Set when a compare-and-swap was refused although the annotation had
    // not changed: the resourceVersion to make the next write conditional on.
    let mut merge_at: Option<String> = None;
    for _ in 0..MAX_PATCH_ATTEMPTS {
        if current.covers(settled) {
            return Ok(());
        }
        let mut merged = current.clone();
        merged.merge(settled);
        if let Some(steps) = &steps {
            merged.retain_steps(|name| steps.contains(name));
        }
        let value = merged.to_annotation(&ctx.settings.events.type_prefix);
        let patch: Patch<Value> = match &merge_at {
            Some(resource_version) => Patch::Merge(serde_json::json!({
                "metadata": {
                    "resourceVersion": resource_version,
                    "annotations": { LEDGER_ANNOTATION: &value },
                }
            })),
            None => Patch::Json(
                compare_and_swap_patch(
                    &taskrun.uid,
                    previous.as_deref(),
                    annotations_present,
                    &value,
                )
                .map_err(|source| patch_error(kube::Error::SerdeError(source)))?,
            ),
        };
        match api.patch(&taskrun.name, &params, &patch).await {
            Ok(patched) => {
                *own_write = patched
                    .metadata
                    .resource_version
                    .clone()
                    .map(|resource_version| OwnWrite {
                        resource_version,
                        annotation: value,
                    });
                ctx.wrote_ledger(&taskrun.uid, patched.metadata.resource_version);
                debug!(taskrun = %taskrun.key(), events = merged.len(), "ledger recorded");
                return Ok(());
            }
            Err(kube::Error::Api(status))
                if status.code == 409 || patch_did_not_apply(status.code, &status.message) =>
            {
                let fresh = api.get(&taskrun.name).await.map_err(patch_error)?;
                if fresh.metadata.uid.as_deref() != Some(taskrun.uid.as_str()) {
                    // A new TaskRun with the same name: ours is gone.
                    return Ok(());
                }
                let now = crate::tekton::ledger_annotation(&fresh.metadata).map(str::to_owned);
                // NB: refused though unchanged: the API server's JSON Patch
                // compares a `test` string by its JSON encoding, and Go
                // encodes `<`, `>` and `&` as `\u003c`..., so a foreign
                // annotation holding them never matches. The merge patch
                // conditional on the resourceVersion just read is the
                // compare-and-swap for that case.
                merge_at = (now == previous
                    && annotations_present == fresh.metadata.annotations.is_some())
                .then(|| fresh.metadata.resource_version.clone())
                .flatten();
                if merge_at.is_none() {
                    ctx.metrics.record_ledger_patch_conflict();
                }
                previous = now;
                annotations_present = fresh.metadata.annotations.is_some();
                current = annotation_ledger(previous.as_deref()).0;
                last_error = Some(status.message);
            }
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(source) => return Err(patch_error(source)),
        }
    }
    Err(patch_error(kube::Error::Service(
        format!(
            "still conflicting after {MAX_PATCH_ATTEMPTS} attempts: {}",
            last_error.unwrap_or_default()
        )
        .into(),
    )))
}

/// Counts and logs the events a deleted TaskRun still owed.
pub fn report_lost(ctx: &Context, snapshot: &Snapshot, owed: usize) {
    ctx.metrics
        .record_lost(LostReason::TaskRunDeleted, owed as u64);
    warn!(
        taskrun = %snapshot.taskrun.key(),
        owed,
        "TaskRun deleted before all its step events were delivered; they are lost"
    );
}

async fn report_malformed_ledger(ctx: &Context, taskrun: &TaskRunRef, problem: &Error) {
    ctx.metrics.record_malformed_ledger();
    warn!(taskrun = %taskrun.key(), error = %problem, "ledger annotation is malformed; treating it as empty");
    let note = format!(
        "Annotation {LEDGER_ANNOTATION} is malformed ({problem}); treating it as empty, so events may be sent again."
    );
    publish_warning(ctx, taskrun, "LedgerMalformed", note).await;
}

/// Kubernetes Event notes are capped by the API at 1 KiB.
const MAX_EVENT_NOTE_BYTES: usize = 1024;

async fn publish_warning(ctx: &Context, taskrun: &TaskRunRef, reason: &str, mut note: String) {
    if note.len() > MAX_EVENT_NOTE_BYTES {
        let mut cut = MAX_EVENT_NOTE_BYTES;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let reference = ObjectReference {
        api_version: Some(taskrun.version.api_version().to_owned()),
        kind: Some(crate::tekton::KIND.to_owned()),
        name: Some(taskrun.name.clone()),
        namespace: Some(taskrun.namespace.clone()),
        uid: Some(taskrun.uid.clone()),
        ..ObjectReference::default()
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Deliver".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &reference).await {
        warn!(%error, taskrun = %taskrun.key(), "could not record a Kubernetes Event");
    }
}
