//! Prometheus metrics of the observer, served in OpenMetrics text by
//! [`crate::server`].
//!
//! Every label has a small, fixed set of values (enums here, or `&'static str`
//! from [`crate::error::Error::metric_label`]): TaskRun names, step names or
//! sink URLs never become labels, so the number of series stays bounded
//! however many TaskRuns the cluster runs. The one exception a user opts
//! into is `taskrun_namespace` on `step_duration_seconds`
//! (`--step-metrics-by-namespace`): one series set per namespace.
//!
//! Final names (prefix `tekton_step_observer_`; counters get `_total` on the
//! wire):
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `events_total` | counter | `type`, `outcome` |
//! | `delivery_latency_seconds` | histogram | `type` |
//! | `dispatch_seconds` | histogram | `type` |
//! | `delivery_rounds_total` | counter | |
//! | `sink_credential_reloads_total` | counter | |
//! | `sink_credential_reload_errors_total` | counter | |
//! | `delivery_retries_total` | counter | `reason` |
//! | `reconcile_duration_seconds` | histogram | |
//! | `reconcile_errors_total` | counter | `kind` |
//! | `queue_depth` | gauge | |
//! | `sink_configured` | gauge | |
//! | `leader` | gauge | |
//! | `ledger_malformed_total` | counter | |
//! | `ledger_patch_conflicts_total` | counter | |
//! | `backfill_left_alone_total` | counter | |
//! | `events_lost_total` | counter | `reason` |
//! | `log_read_errors_total` | counter | |
//! | `step_spans_exported_total` | counter | |
//! | `step_span_export_errors_total` | counter | |
//! | `watch_errors_total` | counter | |
//! | `tracked_taskruns` | gauge | |
//! | `step_transitions_total` | counter | `type` |
//! | `step_duration_seconds` | histogram | `outcome` (and `taskrun_namespace` with `--step-metrics-by-namespace`) |

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::step_event::StepEventKind;

/// Prefix of every metric name, so that they group together in Prometheus.
pub const METRIC_PREFIX: &str = "tekton_step_observer";

/// Each histogram bucket is twice the one before: a few buckets then span
/// several orders of magnitude at a bounded number of series.
const BUCKET_FACTOR: f64 = 2.0;

/// 5 ms: the fastest a sink in the same cluster answers, so the first bucket
/// still separates "immediate" from "slow".
const LATENCY_FIRST_BUCKET_SECONDS: f64 = 0.005;

/// 17 doublings from 5 ms end at ~328 s, past the ~5 min that a delivery can
/// take while it retries a failing sink.
const LATENCY_BUCKET_COUNT: u16 = 17;

/// 100 ms: a step shorter than that (an `echo`) is "instant" to anyone
/// looking at step durations.
const STEP_DURATION_FIRST_BUCKET_SECONDS: f64 = 0.1;

/// 17 doublings from 100 ms end at ~109 min, past Tekton's default TaskRun
/// timeout of 60 min.
const STEP_DURATION_BUCKET_COUNT: u16 = 17;

/// 1/64 ms (15.6 µs): building and handing over one event takes tens of
/// microseconds, and the goal for it is 1 ms, so the buckets resolve below
/// that and one of them ends at exactly 1 ms (the seventh).
const DISPATCH_FIRST_BUCKET_SECONDS: f64 = 0.001 / 64.0;

/// 18 doublings from 15.6 µs end at ~2 s: past any wait for a delivery slot.
const DISPATCH_BUCKET_COUNT: u16 = 18;

/// 1 ms: a reconcile that finds nothing to send finishes about this fast.
const RECONCILE_FIRST_BUCKET_SECONDS: f64 = 0.001;

/// 16 doublings from 1 ms end at ~33 s, past an API call that runs into its
/// timeout during a reconcile.
const RECONCILE_BUCKET_COUNT: u16 = 16;

/// Metric label of a step event kind: the kind's own word.
impl EncodeLabelValue for StepEventKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// What finally became of an event.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Outcome {
    /// The sink accepted it (2xx).
    Delivered,
    /// The sink refused it for good (a 4xx that retrying cannot fix).
    Rejected,
    /// It went to the dead-letter sink.
    DeadLettered,
    /// The retry policy gave up on it, with no dead-letter sink.
    Dropped,
}

impl Outcome {
    /// Every variant, to create all series up front.
    const ALL: [Outcome; 4] = [
        Outcome::Delivered,
        Outcome::Rejected,
        Outcome::DeadLettered,
        Outcome::Dropped,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Dropped => "dropped",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Why a delivery attempt is tried again.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RetryReason {
    /// The TCP/TLS connection to the sink could not be made.
    Connect,
    /// The sink did not answer in time.
    Timeout,
    /// The sink answered 5xx.
    ServerError,
    /// The sink answered 429.
    Throttled,
    /// The sink answered 404 (e.g. a Knative broker that is not ready yet).
    NotFound,
    /// The sink answered 409.
    Conflict,
    /// The sink answered 401 or 403: its credentials or configuration are
    /// wrong, which an operator fixes; events are held meanwhile.
    Unauthorized,
    /// Anything else.
    Other,
}

impl RetryReason {
    /// Every variant, to create all series up front.
    pub const ALL: [RetryReason; 8] = [
        RetryReason::Connect,
        RetryReason::Timeout,
        RetryReason::ServerError,
        RetryReason::Throttled,
        RetryReason::NotFound,
        RetryReason::Conflict,
        RetryReason::Unauthorized,
        RetryReason::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
            RetryReason::ServerError => "server_error",
            RetryReason::Throttled => "throttled",
            RetryReason::NotFound => "not_found",
            RetryReason::Conflict => "conflict",
            RetryReason::Unauthorized => "unauthorized",
            RetryReason::Other => "other",
        }
    }
}

impl EncodeLabelValue for RetryReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Why events that were owed will never be sent.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LostReason {
    /// The TaskRun was deleted before its events were delivered.
    TaskRunDeleted,
}

impl LostReason {
    /// Every variant, to create all series up front.
    pub const ALL: [LostReason; 1] = [LostReason::TaskRunDeleted];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::TaskRunDeleted => "taskrun_deleted",
        }
    }
}

impl EncodeLabelValue for LostReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    r#type: StepEventKind,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: StepEventKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    reason: RetryReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    reason: LostReason,
}

/// A histogram family whose histograms all share one bucket layout.
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        LATENCY_FIRST_BUCKET_SECONDS,
        BUCKET_FACTOR,
        LATENCY_BUCKET_COUNT,
    ))
}

fn dispatch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        DISPATCH_FIRST_BUCKET_SECONDS,
        BUCKET_FACTOR,
        DISPATCH_BUCKET_COUNT,
    ))
}

fn step_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        STEP_DURATION_FIRST_BUCKET_SECONDS,
        BUCKET_FACTOR,
        STEP_DURATION_BUCKET_COUNT,
    ))
}

/// `outcome`, and `taskrun_namespace` only when asked for: a label pair list rather
/// than a struct, so that the namespace is absent, not empty, when off.
type StepDurationLabels = Vec<(&'static str, String)>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        RECONCILE_FIRST_BUCKET_SECONDS,
        BUCKET_FACTOR,
        RECONCILE_BUCKET_COUNT,
    ))
}

struct Inner {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    delivery_latency: HistogramFamily<TypeLabels>,
    dispatch: HistogramFamily<TypeLabels>,
    delivery_rounds: Counter,
    credential_reloads: Counter,
    credential_reload_errors: Counter,
    delivery_retries: Family<RetryLabels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    queue_depth: Gauge,
    sink_configured: Gauge,
    leader: Gauge,
    ledger_malformed: Counter,
    ledger_patch_conflicts: Counter,
    backfill_left_alone: Counter,
    events_lost: Family<LostLabels, Counter>,
    log_read_errors: Counter,
    spans_exported: Counter,
    span_export_errors: Counter,
    watch_errors: Counter,
    tracked_taskruns: Gauge,
    step_transitions: Family<TypeLabels, Counter>,
    step_duration: HistogramFamily<StepDurationLabels>,
}

/// All metrics of the process. Cloning is cheap (one `Arc`); every clone
/// records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates a family's series for every step event type, at zero (see
/// [`Metrics::new`]).
fn one_series_per_type<M, C: MetricConstructor<M>>(family: &Family<TypeLabels, M, C>) {
    for r#type in StepEventKind::ALL {
        drop(family.get_or_create(&TypeLabels { r#type }));
    }
}

impl Metrics {
    /// Registers every metric, with every label combination known up front
    /// already at zero: `rate()` and `increase()` then see the first event
    /// instead of a series that appears out of nowhere.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(METRIC_PREFIX);

        // Creating a series returns a read guard on the family; dropping it
        // right away leaves the series at zero.
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Step events by type and final outcome at the sink",
            events.clone(),
        );
        for r#type in StepEventKind::ALL {
            for outcome in Outcome::ALL {
                drop(events.get_or_create(&EventLabels { r#type, outcome }));
            }
        }

        let delivery_latency: HistogramFamily<TypeLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "delivery_latency",
            "Time from observing a step transition to the sink's final answer, retries included",
            Unit::Seconds,
            delivery_latency.clone(),
        );
        one_series_per_type(&delivery_latency);

        let dispatch: HistogramFamily<TypeLabels> =
            Family::new_with_constructor(dispatch_histogram);
        registry.register_with_unit(
            "dispatch",
            "Our own time on an event's path: the watch event reaching the observer (or the TaskRun's worker becoming free, if it was sending earlier events) to the event's POST going out, minus waits on the API server (log, pod) and on the sink for earlier events",
            Unit::Seconds,
            dispatch.clone(),
        );
        one_series_per_type(&dispatch);

        let credential_reloads = Counter::default();
        registry.register(
            "sink_credential_reloads",
            "Times the sink credentials (CA, client certificate, token, signing secrets) changed and were put in use",
            credential_reloads.clone(),
        );
        let credential_reload_errors = Counter::default();
        registry.register(
            "sink_credential_reload_errors",
            "Times the sink credentials changed but could not be used; the previous ones stay in use",
            credential_reload_errors.clone(),
        );

        let delivery_rounds = Counter::default();
        registry.register(
            "delivery_rounds",
            "Delivery rounds: one TaskRun's owed events sent in order, followed by at most one ledger patch",
            delivery_rounds.clone(),
        );

        let delivery_retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "delivery_retries",
            "Delivery attempts that failed and are tried again, by reason",
            delivery_retries.clone(),
        );
        for reason in RetryReason::ALL {
            drop(delivery_retries.get_or_create(&RetryLabels { reason }));
        }

        let reconcile_duration = reconcile_histogram();
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile of a TaskRun takes",
            Unit::Seconds,
            reconcile_duration.clone(),
        );

        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that ended in an error, by kind of error",
            reconcile_errors.clone(),
        );

        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "TaskRuns with events owed but not yet delivered",
            queue_depth.clone(),
        );

        let sink_configured = Gauge::default();
        registry.register(
            "sink_configured",
            "1 when a valid sink URL is configured, else 0",
            sink_configured.clone(),
        );

        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and sends events, else 0",
            leader.clone(),
        );

        let ledger_malformed = Counter::default();
        registry.register(
            "ledger_malformed",
            "TaskRuns whose ledger annotation could not be read",
            ledger_malformed.clone(),
        );

        let ledger_patch_conflicts = Counter::default();
        registry.register(
            "ledger_patch_conflicts",
            "Ledger patches refused because the annotation (or the TaskRun) changed since it was read; each is re-read and merged again",
            ledger_patch_conflicts.clone(),
        );

        let backfill_left_alone = Counter::default();
        registry.register(
            "backfill_left_alone",
            "TaskRuns left alone because they finished before the backfill window (before the observer last ran, minus --backfill-window)",
            backfill_left_alone.clone(),
        );

        let events_lost = Family::<LostLabels, Counter>::default();
        registry.register(
            "events_lost",
            "Events that were owed but will never be sent, by reason",
            events_lost.clone(),
        );
        for reason in LostReason::ALL {
            drop(events_lost.get_or_create(&LostLabels { reason }));
        }

        let log_read_errors = Counter::default();
        registry.register(
            "log_read_errors",
            "Failed reads of a step container's log",
            log_read_errors.clone(),
        );

        let spans_exported = Counter::default();
        registry.register(
            "step_spans_exported",
            "Step spans the OTLP endpoint took (each step run once)",
            spans_exported.clone(),
        );

        let span_export_errors = Counter::default();
        registry.register(
            "step_span_export_errors",
            "Exports of step spans that failed (retried with backoff)",
            span_export_errors.clone(),
        );

        let watch_errors = Counter::default();
        registry.register(
            "watch_errors",
            "Errors of the Kubernetes watches (TaskRuns, sink ConfigMaps)",
            watch_errors.clone(),
        );

        let tracked_taskruns = Gauge::default();
        registry.register(
            "tracked_taskruns",
            "TaskRuns currently known to the controller",
            tracked_taskruns.clone(),
        );

        let step_transitions = Family::<TypeLabels, Counter>::default();
        registry.register(
            "step_transitions",
            "Step transitions settled (sent, or settled otherwise: rejected, dead-lettered, dropped), by type; types filtered out by --event-types are not counted",
            step_transitions.clone(),
        );
        one_series_per_type(&step_transitions);

        let step_duration: HistogramFamily<StepDurationLabels> =
            Family::new_with_constructor(step_duration_histogram);
        registry.register_with_unit(
            "step_duration",
            "How long steps ran, from the step's startedAt to its finishedAt as Tekton reports them, by outcome (succeeded, failed); observed once per step when its terminal event is settled",
            Unit::Seconds,
            step_duration.clone(),
        );
        for kind in [StepEventKind::Succeeded, StepEventKind::Failed] {
            drop(step_duration.get_or_create(&vec![("outcome", kind.as_str().to_owned())]));
        }

        Self {
            inner: Arc::new(Inner {
                registry,
                events,
                delivery_latency,
                dispatch,
                delivery_rounds,
                credential_reloads,
                credential_reload_errors,
                delivery_retries,
                reconcile_duration,
                reconcile_errors,
                queue_depth,
                sink_configured,
                leader,
                ledger_malformed,
                ledger_patch_conflicts,
                backfill_left_alone,
                events_lost,
                log_read_errors,
                spans_exported,
                span_export_errors,
                watch_errors,
                tracked_taskruns,
                step_transitions,
                step_duration,
            }),
        }
    }

    /// The sink accepted an event; `latency` runs from when the transition
    /// was observed to the sink's answer.
    pub fn record_delivered(&self, event_type: StepEventKind, latency: Duration) {
        self.record_final(event_type, Outcome::Delivered, latency);
    }

    /// The sink refused an event for good; `latency` as for
    /// [`Metrics::record_delivered`].
    pub fn record_rejected(&self, event_type: StepEventKind, latency: Duration) {
        self.record_final(event_type, Outcome::Rejected, latency);
    }

    /// An event went to the dead-letter sink; `latency` as for
    /// [`Metrics::record_delivered`].
    pub fn record_dead_lettered(&self, event_type: StepEventKind, latency: Duration) {
        self.record_final(event_type, Outcome::DeadLettered, latency);
    }

    /// The retry policy gave up on an event and there is no dead-letter
    /// sink; `latency` as for [`Metrics::record_delivered`].
    pub fn record_dropped(&self, event_type: StepEventKind, latency: Duration) {
        self.record_final(event_type, Outcome::Dropped, latency);
    }

    fn record_final(&self, event_type: StepEventKind, outcome: Outcome, latency: Duration) {
        self.inner
            .events
            .get_or_create(&EventLabels {
                r#type: event_type,
                outcome,
            })
            .inc();
        self.inner
            .delivery_latency
            .get_or_create(&TypeLabels { r#type: event_type })
            .observe(latency.as_secs_f64());
    }

    /// A step transition was settled.
    pub fn record_step_transition(&self, kind: StepEventKind) {
        self.inner
            .step_transitions
            .get_or_create(&TypeLabels { r#type: kind })
            .inc();
    }

    /// A step ended as `outcome` after running for `ran`; `namespace` is
    /// its TaskRun's, given only when the namespace label is wanted.
    pub fn observe_step_duration(
        &self,
        outcome: StepEventKind,
        namespace: Option<&str>,
        ran: Duration,
    ) {
        let mut labels: StepDurationLabels = vec![("outcome", outcome.as_str().to_owned())];
        if let Some(namespace) = namespace {
            labels.push(("taskrun_namespace", namespace.to_owned()));
        }
        self.inner
            .step_duration
            .get_or_create(&labels)
            .observe(ran.as_secs_f64());
    }

    /// Our own time on one event's path before its POST (see the metric's help).
    pub fn observe_dispatch(&self, event_type: StepEventKind, duration: Duration) {
        self.inner
            .dispatch
            .get_or_create(&TypeLabels { r#type: event_type })
            .observe(duration.as_secs_f64());
    }

    /// A delivery round started.
    pub fn record_delivery_round(&self) {
        self.inner.delivery_rounds.inc();
    }

    /// The sink credentials changed: put in use (`applied`) or not usable.
    pub fn record_credentials_reload(&self, applied: bool) {
        if applied {
            self.inner.credential_reloads.inc();
        } else {
            self.inner.credential_reload_errors.inc();
        }
    }

    /// A delivery attempt failed and will be tried again.
    pub fn record_retry(&self, reason: RetryReason) {
        self.inner
            .delivery_retries
            .get_or_create(&RetryLabels { reason })
            .inc();
    }

    /// One reconcile took `duration`, whatever its result.
    pub fn observe_reconcile(&self, duration: Duration) {
        self.inner
            .reconcile_duration
            .observe(duration.as_secs_f64());
    }

    /// A reconcile ended in an error of `kind` (use
    /// [`crate::error::Error::metric_label`], which is bounded).
    pub fn record_reconcile_error(&self, kind: &'static str) {
        self.inner
            .reconcile_errors
            .get_or_create(&ErrorLabels { kind })
            .inc();
    }

    /// How many TaskRuns owe events that are not delivered yet.
    pub fn set_queue_depth(&self, taskruns: usize) {
        self.inner.queue_depth.set(saturating_i64(taskruns));
    }

    /// Whether a valid sink is configured.
    pub fn set_sink_configured(&self, configured: bool) {
        self.inner.sink_configured.set(i64::from(configured));
    }

    /// Whether this replica holds the leader lease.
    pub fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    /// A TaskRun's ledger annotation could not be parsed.
    pub fn record_malformed_ledger(&self) {
        self.inner.ledger_malformed.inc();
    }

    /// A conditional ledger patch found the annotation changed under it.
    pub fn record_ledger_patch_conflict(&self) {
        self.inner.ledger_patch_conflicts.inc();
    }

    /// A TaskRun was left alone by the backfill rule.
    pub fn record_backfill_left_alone(&self) {
        self.inner.backfill_left_alone.inc();
    }

    /// `events` owed events will never be sent, because of `reason`.
    pub fn record_lost(&self, reason: LostReason, events: u64) {
        self.inner
            .events_lost
            .get_or_create(&LostLabels { reason })
            .inc_by(events);
    }

    /// Reading a step container's log failed.
    pub fn record_log_read_error(&self) {
        self.inner.log_read_errors.inc();
    }

    /// The OTLP endpoint took `count` step spans.
    pub fn record_spans_exported(&self, count: usize) {
        self.inner.spans_exported.inc_by(count as u64);
    }

    /// An export of step spans failed.
    pub fn record_span_export_error(&self) {
        self.inner.span_export_errors.inc();
    }

    /// A Kubernetes watch reported an error (it restarts by itself).
    pub fn record_watch_error(&self) {
        self.inner.watch_errors.inc();
    }

    /// How many TaskRuns the controller currently tracks.
    pub fn set_tracked_taskruns(&self, taskruns: usize) {
        self.inner.tracked_taskruns.set(saturating_i64(taskruns));
    }

    /// Every metric in the OpenMetrics text format, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)?;
        Ok(out)
    }
}

/// Gauges hold `i64`; a count never gets near its limit, but saturate rather
/// than wrap if it somehow did.
fn saturating_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_names_every_metric_after_recording() {
        let metrics = Metrics::new();
        metrics.record_delivered(StepEventKind::Started, Duration::from_millis(12));
        metrics.record_rejected(StepEventKind::Failed, Duration::from_secs(2));
        metrics.record_retry(RetryReason::Throttled);
        metrics.observe_reconcile(Duration::from_millis(3));
        metrics.record_reconcile_error("patch_ledger");
        metrics.set_queue_depth(3);
        metrics.set_sink_configured(true);
        metrics.set_leader(true);
        metrics.record_malformed_ledger();
        metrics.record_ledger_patch_conflict();
        metrics.record_backfill_left_alone();
        metrics.record_lost(LostReason::TaskRunDeleted, 2);
        metrics.record_log_read_error();
        metrics.record_watch_error();
        metrics.set_tracked_taskruns(7);
        metrics.record_step_transition(StepEventKind::Skipped);
        metrics.observe_step_duration(StepEventKind::Failed, None, Duration::from_secs(3));
        metrics.observe_step_duration(
            StepEventKind::Succeeded,
            Some("ci"),
            Duration::from_millis(150),
        );

        let text = metrics.encode().unwrap();
        for expected in [
            r#"tekton_step_observer_events_total{type="started",outcome="delivered"} 1"#,
            r#"tekton_step_observer_events_total{type="failed",outcome="rejected"} 1"#,
            r#"tekton_step_observer_events_total{type="skipped",outcome="delivered"} 0"#,
            "# TYPE tekton_step_observer_delivery_latency_seconds histogram",
            "# UNIT tekton_step_observer_delivery_latency_seconds seconds",
            r#"tekton_step_observer_delivery_latency_seconds_count{type="started"} 1"#,
            r#"tekton_step_observer_delivery_latency_seconds_bucket{le="0.02",type="started"} 1"#,
            r#"tekton_step_observer_delivery_retries_total{reason="throttled"} 1"#,
            r#"tekton_step_observer_delivery_retries_total{reason="server_error"} 0"#,
            "tekton_step_observer_reconcile_duration_seconds_count 1",
            r#"tekton_step_observer_reconcile_errors_total{kind="patch_ledger"} 1"#,
            "tekton_step_observer_queue_depth 3",
            "tekton_step_observer_sink_configured 1",
            "tekton_step_observer_leader 1",
            "tekton_step_observer_ledger_malformed_total 1",
            "tekton_step_observer_ledger_patch_conflicts_total 1",
            "tekton_step_observer_backfill_left_alone_total 1",
            r#"tekton_step_observer_events_lost_total{reason="taskrun_deleted"} 2"#,
            "tekton_step_observer_log_read_errors_total 1",
            "tekton_step_observer_watch_errors_total 1",
            "tekton_step_observer_tracked_taskruns 7",
            r#"tekton_step_observer_step_transitions_total{type="skipped"} 1"#,
            r#"tekton_step_observer_step_transitions_total{type="started"} 0"#,
            "# UNIT tekton_step_observer_step_duration_seconds seconds",
            r#"tekton_step_observer_step_duration_seconds_count{outcome="failed"} 1"#,
            r#"tekton_step_observer_step_duration_seconds_bucket{le="3.2",outcome="failed"} 1"#,
            r#"tekton_step_observer_step_duration_seconds_bucket{le="1.6",outcome="failed"} 0"#,
            r#"tekton_step_observer_step_duration_seconds_count{outcome="succeeded"} 0"#,
            r#"tekton_step_observer_step_duration_seconds_count{outcome="succeeded",taskrun_namespace="ci"} 1"#,
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics:\n{text}");
    }

    /// Every metric the Grafana dashboard queries exists under that name.
    #[test]
    fn dashboard_queries_only_existing_metrics() {
        let dashboard = include_str!("../config/monitoring/grafana-dashboard.json");
        let metrics = Metrics::new();
        metrics.record_reconcile_error("kube");
        let text = metrics.encode().unwrap();
        let mut names: Vec<&str> = dashboard
            .match_indices("tekton_step_observer_")
            .map(|(start, _)| {
                let rest = &dashboard[start..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 10, "{names:?}");
        for name in names {
            assert!(
                text.lines().any(
                    |line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' '])
                ),
                "the dashboard queries {name}, which is not exported:\n{text}"
            );
        }
    }

    #[test]
    fn latency_buckets_span_five_ms_to_five_minutes() {
        let bounds: Vec<f64> = exponential_buckets(
            LATENCY_FIRST_BUCKET_SECONDS,
            BUCKET_FACTOR,
            LATENCY_BUCKET_COUNT,
        )
        .collect();
        assert_eq!(bounds.first().copied(), Some(0.005));
        assert!(bounds.last().copied().unwrap_or_default() >= 300.0);
    }
}
