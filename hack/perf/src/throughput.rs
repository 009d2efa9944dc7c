//! Scenario 2 (throughput): step transitions written at rising rates by the
//! status writer, until the observer falls behind. Also the ledger patch
//! path against the real API server, and the delivery engine alone (read
//! from criterion's output of benches/delivery.rs).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use perf::results::{
    DeliveryEngine, Distribution, EngineCase, LedgerPatch, ProcessCpu, Throughput, ThroughputPoint,
    ThroughputStage,
};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::env::Env;
use crate::k8s::{self, AuditLog, Observer};
use crate::procs::{self, CpuSnapshot};
use crate::receiver;
use crate::statuswriter::{self as sw, STEPS};

/// How long a step "runs" between the two status writes of a TaskRun.
const RUN_TIME: Duration = Duration::from_secs(1);
/// Requests of the writer in flight at once.
const WRITER_CONCURRENCY: usize = 128;
const DRAIN_DEADLINE: Duration = Duration::from_secs(180);
const LEDGER_PATCHES: usize = 400;
const LEDGER_IN_FLIGHT: usize = 16;

/// Events owed once a status write was answered: (uid, step, started?) → when.
#[derive(Clone, Default)]
struct Owed(Arc<Mutex<HashMap<OwedKey, DateTime<Utc>>>>);

/// (TaskRun uid, step, whether it is the `started` event).
type OwedKey = (String, String, bool);

impl Owed {
    /// After the first write only the first step has started (the others
    /// wait for it, as Tekton's entrypoint does); the second write ends
    /// every step, which starts the rest.
    fn add(&self, uid: &str, first_write: bool, at: DateTime<Utc>) {
        if let Ok(mut m) = self.0.lock() {
            if first_write {
                m.insert((uid.to_owned(), "s0".to_owned(), true), at);
                return;
            }
            for i in 0..STEPS {
                m.insert((uid.to_owned(), format!("s{i}"), true), at);
                m.insert((uid.to_owned(), format!("s{i}"), false), at);
            }
        }
    }
    fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or_default()
    }
    fn snapshot(&self) -> HashMap<OwedKey, DateTime<Utc>> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn unique_received(received: &receiver::Received) -> (usize, usize) {
    let all = received.snapshot();
    let ids: HashSet<&str> = all.iter().map(|a| a.id.as_str()).collect();
    (ids.len(), all.len() - ids.len())
}

pub async fn run(
    env: &Env,
    stages: &[f64],
    stage_seconds: f64,
) -> Result<(Throughput, LedgerPatch)> {
    let _paused = sw::TektonPaused::pause(&env.cluster_dir);
    let ns = env.namespace("throughput");
    k8s::create_namespace_outside_admission(&env.client, &ns, &env.run_id).await?;
    sw::ensure_perf_node(&env.client).await?;
    sw::serve_logs(&env.client, &ns, &env.work_dir.join("step.log")).await?;
    let (addr, received) = receiver::start().await?;
    let observer = Observer::start(
        &env.observer_bin,
        &env.observer_kubeconfig,
        env.observer_log("throughput"),
        &[
            "--namespace".into(),
            ns.clone(),
            "--sink".into(),
            format!("http://{addr}/"),
        ],
    )
    .await?;
    let audit = AuditLog::new(&env.cluster_dir)?;
    let mut processes = procs::cluster_processes(&env.cluster_dir);
    processes.push(("observer".to_owned(), observer.pid()));
    processes.push(("perf harness".to_owned(), std::process::id()));

    let (taskruns, pods) = sw::api_for(&env.client, &ns);
    let owed = Owed::default();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let limit = Arc::new(Semaphore::new(WRITER_CONCURRENCY));
    let start_wall = Utc::now();
    let start = Instant::now();
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (owed, received, timeline) = (owed.clone(), received.clone(), timeline.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let offered = owed.len();
                let (delivered, _) = unique_received(&received);
                if let Ok(mut t) = timeline.lock() {
                    t.push(ThroughputPoint {
                        at_s: start.elapsed().as_secs_f64(),
                        offered_total: offered,
                        delivered_total: delivered,
                        backlog: offered.saturating_sub(delivered),
                    });
                }
            }
        })
    };

    let mut results = Vec::new();
    let mut counter = 0usize;
    let mut failures_in_a_row = 0;
    for &offered in stages {
        let stage_events_start = owed.len();
        let backlog_start = owed.len().saturating_sub(unique_received(&received).0);
        let written_start = written.load(std::sync::atomic::Ordering::Relaxed);
        let cpu_start = CpuSnapshot::take(&processes);
        let stage_wall_start = Utc::now();
        let audit_offset = audit.offset()?;
        let stage_start = Instant::now();
        // Each TaskRun owes 2 × STEPS events: one write for the starts, one for the ends.
        let per_second = offered / (2 * STEPS) as f64;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lifecycles = Vec::new();
        while stage_start.elapsed().as_secs_f64() < stage_seconds {
            tick.tick().await;
            let name = format!("tp-{counter:06}");
            counter += 1;
            let (taskruns, pods, owed, written, limit, run) = (
                taskruns.clone(),
                pods.clone(),
                owed.clone(),
                written.clone(),
                limit.clone(),
                env.run_id.clone(),
            );
            lifecycles.push(tokio::spawn(async move {
                let result = async {
                    let permit = limit.clone().acquire_owned().await?;
                    let created = k8s::create(&taskruns, sw::taskrun(&name, &run, None)).await?;
                    sw::create_pod(&pods, &created).await?;
                    let uid = created.uid().unwrap_or_default();
                    let began = Utc::now();
                    sw::write_status(&taskruns, &name, sw::running_status(&name, began)).await?;
                    owed.add(&uid, true, Utc::now());
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(permit);
                    tokio::time::sleep(RUN_TIME).await;
                    let _permit = limit.acquire_owned().await?;
                    sw::write_status(
                        &taskruns,
                        &name,
                        sw::finished_status(&name, began, Utc::now()),
                    )
                    .await?;
                    owed.add(&uid, false, Utc::now());
                    written.fetch_add(2 * STEPS - 1, std::sync::atomic::Ordering::Relaxed);
                    anyhow::Ok(())
                }
                .await;
                if let Err(error) = &result {
                    warn!(%error, "status writer: a TaskRun's lifecycle failed");
                }
                result.is_ok()
            }));
        }
        let elapsed = stage_start.elapsed().as_secs_f64();
        let cpu_end = CpuSnapshot::take(&processes);
        let stage_wall_end = Utc::now();
        let written_now = written.load(std::sync::atomic::Ordering::Relaxed);
        let (received_now, _) = unique_received(&received);
        let backlog_end = owed.len().saturating_sub(received_now);
        let delivered_in_stage = {
            let all = received.snapshot();
            let mut ids = HashSet::new();
            all.iter()
                .filter(|a| a.at >= stage_wall_start && a.at < stage_wall_end)
                .filter(|a| ids.insert(a.id.clone()))
                .count()
        };
        let used = cpu_start.used_until(&cpu_end);
        let wall = cpu_start.wall_seconds_until(&cpu_end);
        let mut cpu_cores: Vec<ProcessCpu> = used
            .iter()
            .map(|(p, s)| ProcessCpu {
                process: p.clone(),
                cores: s / wall.max(1e-9),
            })
            .collect();
        cpu_cores.sort_by(|a, b| b.cores.total_cmp(&a.cores));
        let observer_requests = audit
            .read_from(audit_offset)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| {
                        e.user == env.observer_user
                            && e.at >= stage_wall_start
                            && e.at < stage_wall_end
                    })
                    .count()
            })
            .unwrap_or(0);
        let written_rate = (written_now - written_start) as f64 / elapsed;
        let delivered_rate = delivered_in_stage as f64 / elapsed;
        let stage_events = owed.len() - stage_events_start;
        let kept_up = delivered_rate >= 0.95 * written_rate
            && backlog_end <= backlog_start + stage_events / 20 + (written_rate * 2.0) as usize;
        info!(
            offered,
            written_rate,
            delivered_rate,
            backlog_start,
            backlog_end,
            kept_up,
            "throughput: stage done"
        );
        results.push(ThroughputStage {
            offered_events_per_second: offered,
            written_events_per_second: written_rate,
            delivered_events_per_second: delivered_rate,
            duration_seconds: elapsed,
            backlog_start,
            backlog_end,
            lag: Distribution::default(),
            cpu_cores,
            observer_requests_per_second: observer_requests as f64 / elapsed,
            kept_up,
        });
        // Lifecycles still running finish in the next stage; they count there.
        tokio::spawn(async move {
            for l in lifecycles {
                let _ = l.await;
            }
        });
        if !kept_up {
            failures_in_a_row += 1;
            if failures_in_a_row >= 2 {
                break;
            }
        }
    }
    // Drain: everything written must arrive.
    let deadline = Instant::now() + DRAIN_DEADLINE;
    tokio::time::sleep(RUN_TIME * 2).await;
    while unique_received(&received).0 < owed.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.abort();
    let (got, duplicates) = unique_received(&received);
    // Lag per stage: status write answered → event received.
    let owed_at = owed.snapshot();
    let arrivals = received.snapshot();
    let mut first: HashMap<String, DateTime<Utc>> = HashMap::new();
    let mut lags_by_key = Vec::new();
    for a in &arrivals {
        if first.contains_key(&a.id) {
            continue;
        }
        first.insert(a.id.clone(), a.at);
        let started = a.r#type.ends_with(".started.v1");
        if let Some(at) = owed_at.get(&(a.taskrun_uid.clone(), a.step.clone(), started)) {
            lags_by_key.push((
                *at,
                (a.at - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            ));
        }
    }
    let mut stage_start_wall = start_wall;
    for stage in &mut results {
        let end = stage_start_wall
            + chrono::TimeDelta::milliseconds((stage.duration_seconds * 1000.0) as i64);
        let lags: Vec<f64> = lags_by_key
            .iter()
            .filter(|(at, _)| *at >= stage_start_wall && *at < end)
            .map(|l| l.1)
            .collect();
        stage.lag = Distribution::of(&lags);
        stage_start_wall = end;
    }
    let sustained = results
        .iter()
        .take_while(|s| s.kept_up)
        .map(|s| s.written_events_per_second)
        .fold(0.0, f64::max);
    let knee_stage = results.iter().find(|s| !s.kept_up);
    let knee = knee_stage
        .map(|s| s.offered_events_per_second)
        .unwrap_or(0.0);
    let limit = describe_limit(knee_stage.or(results.last()));

    observer.stop()?;
    // The observer's ledger writes do go through Tekton's webhooks in a
    // real cluster: measure that path as it is.
    k8s::admit_namespace(&env.client, &ns).await?;
    let ledger = ledger_patch_path(env, &ns).await?;
    let timeline = timeline.lock().map(|t| t.clone()).unwrap_or_default();
    Ok((
        Throughput {
            method: format!(
                "status writer (Tekton's controllers stopped; the namespace labelled {}=true, so these writes, and the observer's ledger patches, skip Tekton's admission webhooks): per TaskRun one create, one pod on {}, one status write with its {STEPS} steps running, {} s later one with all {STEPS} terminated; {WRITER_CONCURRENCY} writes in flight at most",
                k8s::OUTSIDE_ADMISSION_LABEL,
                sw::PERF_NODE,
                RUN_TIME.as_secs()
            ),
            stages: results,
            sustained_events_per_second: sustained,
            knee_events_per_second: knee,
            limit,
            owed: owed.len(),
            received: got,
            duplicates,
            timeline,
        },
        ledger,
    ))
}

/// Which process used the CPU when the observer fell behind.
fn describe_limit(stage: Option<&ThroughputStage>) -> String {
    let Some(stage) = stage else {
        return "no stage ran".to_owned();
    };
    let total: f64 = stage.cpu_cores.iter().map(|p| p.cores).sum();
    let cores = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1) as f64;
    let top: Vec<String> = stage
        .cpu_cores
        .iter()
        .take(4)
        .map(|p| format!("{} {:.2}", p.process, p.cores))
        .collect();
    let observer = stage
        .cpu_cores
        .iter()
        .find(|p| p.process == "observer")
        .map(|p| p.cores)
        .unwrap_or(0.0);
    let verdict = if total >= 0.85 * cores {
        "the machine's CPU: the processes measured used"
    } else if observer >= 0.9 {
        "the observer's CPU (one core busy): the processes used"
    } else {
        "not CPU alone (waits on the API server or the sink): the processes used"
    };
    // What the observer itself would carry on a core of its own, from its
    // CPU per delivered event in this stage.
    let own = if observer > 0.0 && stage.delivered_events_per_second > 0.0 {
        let cpu_per_event = observer / stage.delivered_events_per_second;
        format!(
            "; the observer itself used {observer:.2} cores for {:.0} delivered events/s, {:.0} µs of CPU per event, so a core of its own would carry about {:.0} events/s",
            stage.delivered_events_per_second,
            cpu_per_event * 1e6,
            1.0 / cpu_per_event
        )
    } else {
        String::new()
    };
    format!(
        "{verdict} {total:.2} of {cores:.0} cores at {:.0} offered events/s (cores: {}){own}",
        stage.offered_events_per_second,
        top.join(", ")
    )
}

/// The observer's ledger write, as it sends it (a JSON Patch compare-and-
/// swap on the annotation), against the real API server, `LEDGER_IN_FLIGHT`
/// at once, on the throughput scenario's TaskRuns.
async fn ledger_patch_path(env: &Env, ns: &str) -> Result<LedgerPatch> {
    let api = k8s::taskruns(&env.client, ns);
    let list = api.list(&Default::default()).await?;
    let items: Vec<_> = list.items.into_iter().take(LEDGER_PATCHES).collect();
    let limit = Arc::new(Semaphore::new(LEDGER_IN_FLIGHT));
    let conflicts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for tr in items {
        let (api, limit, conflicts) = (api.clone(), limit.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.ok()?;
            let annotations = tr.metadata.annotations.clone().unwrap_or_default();
            let previous = annotations
                .get(tekton_step_observer::tekton::LEDGER_ANNOTATION)
                .cloned();
            let new_value = sw::complete_ledger()[tekton_step_observer::tekton::LEDGER_ANNOTATION]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            // The observer writes a ledger only when it changes.
            let new_value = if previous.as_deref() == Some(new_value.as_str()) {
                new_value.replace("\"statuses\"", "\"statuses\" ")
            } else {
                new_value
            };
            let patch = tekton_step_observer::ledger::compare_and_swap_patch(
                &tr.uid().unwrap_or_default(),
                previous.as_deref(),
                tr.metadata.annotations.is_some(),
                &new_value,
            )
            .ok()?;
            let t = Instant::now();
            match api
                .patch(
                    &tr.name_any(),
                    &PatchParams::default(),
                    &Patch::<()>::Json(patch),
                )
                .await
            {
                Ok(_) => Some(t.elapsed().as_secs_f64() * 1000.0),
                Err(_) => {
                    conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    None
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        if let Some(ms) = t.await? {
            latencies.push(ms);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(LedgerPatch {
        patches: latencies.len(),
        in_flight: LEDGER_IN_FLIGHT,
        seconds,
        patches_per_second: latencies.len() as f64 / seconds,
        latency: Distribution::of(&latencies),
        conflicts: conflicts.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// criterion's estimates for benches/delivery.rs: every case under
/// `<criterion>/<group>/<case>/new/` with an Elements throughput.
pub fn delivery_engine(criterion: &Path) -> Option<DeliveryEngine> {
    let mut cases = Vec::new();
    let groups = std::fs::read_dir(criterion).ok()?;
    for group in groups.flatten() {
        let Ok(case_dirs) = std::fs::read_dir(group.path()) else {
            continue;
        };
        for case in case_dirs.flatten() {
            let new = case.path().join("new");
            let (Ok(bench), Ok(est)) = (
                std::fs::read_to_string(new.join("benchmark.json")),
                std::fs::read_to_string(new.join("estimates.json")),
            ) else {
                continue;
            };
            let (Ok(bench), Ok(est)) = (
                serde_json::from_str::<serde_json::Value>(&bench),
                serde_json::from_str::<serde_json::Value>(&est),
            ) else {
                continue;
            };
            let Some(elements) = bench["throughput"]["Elements"].as_f64() else {
                continue;
            };
            let per_second = |ns: Option<f64>| ns.map(|ns| elements / (ns / 1e9)).unwrap_or(0.0);
            let median = &est["median"];
            cases.push(EngineCase {
                name: bench["full_id"].as_str().unwrap_or_default().to_owned(),
                events_per_second: per_second(median["point_estimate"].as_f64()),
                // A longer time per iteration is a lower rate.
                low: per_second(median["confidence_interval"]["upper_bound"].as_f64()),
                high: per_second(median["confidence_interval"]["lower_bound"].as_f64()),
            });
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    (!cases.is_empty()).then_some(DeliveryEngine { cases })
}
