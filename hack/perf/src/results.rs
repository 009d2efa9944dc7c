//! What one `make perf` run measured: written by `perf run` as JSON, read by
//! `perf report`, which renders BENCHMARKS.md and the plots from it alone.
//! Every duration is in milliseconds, every clock is named where it is taken.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub latency: Option<Latency>,
    pub throughput: Option<Throughput>,
    pub memory: Option<Memory>,
    pub api_load: Option<ApiLoad>,
    pub cpu: Option<Cpu>,
    pub delivery_engine: Option<DeliveryEngine>,
    pub ledger_patch: Option<LedgerPatch>,
    #[serde(default)]
    pub dispatch_check: Option<DispatchCheck>,
}

/// The latency workload again, the observer at a higher scheduling
/// priority: its dispatch histogram only.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DispatchCheck {
    /// The observer's `nice` level (the cluster's processes run at 0).
    pub nice: i32,
    pub duration_seconds: f64,
    pub dispatch_started: HistogramBounds,
    pub dispatch_terminal: HistogramBounds,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    /// `git rev-parse --short HEAD`, with `-dirty` when the tree had changes.
    pub revision: String,
    /// When the run started, RFC 3339, UTC.
    pub date: String,
    /// How long the whole run took, seconds.
    pub duration_seconds: f64,
    pub machine: Machine,
    pub tekton_version: String,
    pub kubernetes_version: String,
    /// The exact command line that produced the results.
    pub command: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

/// Order statistics of a set of samples, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Distribution {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Distribution {
    /// Nearest-rank percentiles; an empty set gives zeros and count 0.
    pub fn of(samples: &[f64]) -> Self {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Self {
            count: sorted.len(),
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: sorted.last().copied().unwrap_or(0.0),
        }
    }
}

/// Upper bounds of quantiles read from a Prometheus histogram's buckets:
/// the true quantile is at most the bound given.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramBounds {
    pub count: u64,
    pub p50_le_ms: f64,
    pub p90_le_ms: f64,
    pub p99_le_ms: f64,
    pub mean_ms: f64,
}

/// Scenario 1: TaskRuns at a steady rate through the real Tekton controller
/// and entrypoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub taskruns_per_second: f64,
    pub duration_seconds: f64,
    pub steps_per_taskrun: usize,
    pub taskruns: usize,
    /// Harness watch saw the step's `running` state → the sink received
    /// the step's `started` event (both on this machine's wall clock).
    pub observer_started: Distribution,
    /// The same for the first step only: no earlier event of its TaskRun
    /// goes before it (later steps' `started` follow the previous step's
    /// terminal event, log read included, as events go out in order).
    #[serde(default)]
    pub observer_started_first_step: Distribution,
    /// Harness watch saw the step's `terminated` state (or the TaskRun's
    /// end, for a skipped step) → the sink received the terminal event.
    pub observer_terminal: Distribution,
    /// Harness watch saw the Succeeded condition turn True/False → the sink
    /// received Tekton's `dev.tekton.event.taskrun.successful.v1`/`failed.v1`.
    pub tekton_taskrun: Distribution,
    /// Which Tekton process sent Tekton's events in this version.
    pub tekton_sender: String,
    /// The node agent issued a pod-status write → the harness's pod watch
    /// delivered that resourceVersion.
    pub watch_floor: Distribution,
    /// From the observer's `dispatch_seconds` histogram: the watch event
    /// reaching the observer → the event's POST going out, minus the time
    /// spent waiting on the API server (log, pod) and on earlier POSTs.
    pub dispatch_started: HistogramBounds,
    pub dispatch_terminal: HistogramBounds,
    /// Events the harness expected and the sink never received, by source.
    pub observer_missing: usize,
    pub tekton_missing: usize,
    /// Events received more than once (same id), by source.
    pub observer_duplicates: usize,
    pub tekton_duplicates: usize,
    /// One point per event, for the plot.
    pub samples: Vec<LatencySample>,
    /// Two examples of what the harness recorded next to the moment it saw a
    /// transition: the TaskRun's resourceVersion and managedFields time.
    pub examples: Vec<TransitionRecord>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencySample {
    /// `started`, `terminal`, `tekton` or `floor`.
    pub series: String,
    /// Seconds since the scenario started, when the transition was seen.
    pub at_s: f64,
    pub latency_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub taskrun: String,
    pub step: String,
    pub transition: String,
    pub seen_at: String,
    pub resource_version: String,
    pub managed_fields_time: String,
    pub received_at: String,
}

/// Scenario 2: step transitions written at rising rates until the observer
/// falls behind.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// How the transitions were produced (the status writer, Tekton stopped).
    pub method: String,
    pub stages: Vec<ThroughputStage>,
    /// The highest offered rate the observer kept up with: delivered within
    /// 5% of offered and the backlog at the end of the stage not growing.
    pub sustained_events_per_second: f64,
    /// The first offered rate it did not keep up with (0 if none).
    pub knee_events_per_second: f64,
    /// The resource that saturated at the knee, from the stage's CPU figures.
    pub limit: String,
    /// Events the sink received vs. events owed by all written transitions,
    /// after the drain at the end.
    pub owed: usize,
    pub received: usize,
    pub duplicates: usize,
    pub timeline: Vec<ThroughputPoint>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ThroughputStage {
    pub offered_events_per_second: f64,
    /// Transitions actually written per second (the writer can fall short).
    pub written_events_per_second: f64,
    pub delivered_events_per_second: f64,
    pub duration_seconds: f64,
    /// Events owed and not yet at the sink, at the stage's start and end.
    pub backlog_start: usize,
    pub backlog_end: usize,
    /// Status write answered → event received, for the stage's events.
    pub lag: Distribution,
    /// CPU cores used during the stage, by process (1.0 = one core busy).
    pub cpu_cores: Vec<ProcessCpu>,
    /// API requests per second the observer made during the stage, by verb.
    pub observer_requests_per_second: f64,
    pub kept_up: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub process: String,
    pub cores: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ThroughputPoint {
    pub at_s: f64,
    pub offered_total: usize,
    pub delivered_total: usize,
    pub backlog: usize,
}

/// Scenario 3: resident memory of the observer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    pub cases: Vec<MemoryCase>,
    /// (RSS with the most finished TaskRuns − RSS idle) / those TaskRuns.
    /// Finished TaskRuns that owe nothing are not tracked (the gauge shows
    /// 0): what they cost is the watch's share, hence per TaskRun in scope.
    pub bytes_per_tracked_taskrun: f64,
    /// What was tried (allocator, watcher settings) and what each gave.
    pub variants: Vec<MemoryVariant>,
    /// The measured default build, in words (its allocator).
    #[serde(default)]
    pub default_build: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryCase {
    /// `idle`, `1000 finished`, `10000 finished`, `1000 running`.
    pub name: String,
    pub taskruns_in_cluster: usize,
    /// The observer's own `tracked_taskruns` gauge.
    pub tracked_taskruns: usize,
    /// VmRSS from /proc once the observer settled.
    pub rss_bytes: u64,
    /// VmHWM: the highest RSS since the observer started.
    pub peak_rss_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryVariant {
    pub name: String,
    pub taskruns_in_cluster: usize,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// The same build and settings with nothing in scope (absent in results
    /// from before it was measured).
    #[serde(default)]
    pub idle_rss_bytes: Option<u64>,
    /// Why it could not be measured, if it could not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Scenario 4: requests the API server's audit log attributes to each client
/// during the latency scenario.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApiLoad {
    pub taskruns: usize,
    pub clients: Vec<ClientLoad>,
    /// Write requests by the observer for TaskRuns that owed nothing
    /// (created, finished and observed while settled): goal 0.
    pub writes_for_taskruns_owing_nothing: usize,
    pub taskruns_owing_nothing: usize,
    /// Ledger PATCHes per delivery round (goal ≤ 1), from the observer's
    /// PATCH count and its own `delivery_rounds_total`.
    pub ledger_patches: usize,
    pub delivery_rounds: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientLoad {
    /// `observer`, `tekton controller`, `tekton events controller`, ...
    pub client: String,
    /// The audit log's user.username.
    pub username: String,
    pub requests: Vec<RequestCount>,
    pub total: usize,
    pub conflicts: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RequestCount {
    /// e.g. `get pods/log`, `patch taskruns`, `watch taskruns`.
    pub request: String,
    pub count: usize,
    pub per_taskrun: f64,
}

/// Scenario 5: CPU seconds per 1 000 events, same run as the latency scenario.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cpu {
    pub observer_events: usize,
    pub observer_cpu_seconds: f64,
    pub observer_per_thousand: f64,
    pub tekton_events: usize,
    /// The process that sends Tekton's events; on versions where that is the
    /// main controller, its CPU includes all its reconciling.
    pub tekton_process: String,
    pub tekton_cpu_seconds: f64,
    pub tekton_per_thousand: f64,
}

/// The delivery engine alone (criterion, `benches/delivery.rs`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeliveryEngine {
    pub cases: Vec<EngineCase>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EngineCase {
    pub name: String,
    pub events_per_second: f64,
    pub low: f64,
    pub high: f64,
}

/// The ledger patch path against the real API server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LedgerPatch {
    pub patches: usize,
    pub in_flight: usize,
    pub seconds: f64,
    pub patches_per_second: f64,
    pub latency: Distribution,
    pub conflicts: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = Distribution::of(&samples);
        assert_eq!(
            d,
            Distribution {
                count: 100,
                p50_ms: 50.0,
                p90_ms: 90.0,
                p99_ms: 99.0,
                max_ms: 100.0
            }
        );
        assert_eq!(Distribution::of(&[]).count, 0);
        assert_eq!(Distribution::of(&[7.0]).p99_ms, 7.0);
    }
}
