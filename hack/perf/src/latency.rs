//! Scenario 1 (latency), with scenarios 4 (API load) and 5 (CPU) measured in
//! the same run: TaskRuns at a steady rate through the real Tekton
//! controller and entrypoint, our events and Tekton's to one receiver.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use perf::results::{
    ApiLoad, ClientLoad, Cpu, Distribution, HistogramBounds, Latency, LatencySample, RequestCount,
    TransitionRecord,
};
use serde_json::json;
use tracing::info;

use crate::env::Env;
use crate::k8s::{self, AuditLog, ConfigEventsSink, Observer};
use crate::procs::{self, CpuSnapshot};
use crate::receiver::{self, Arrival};
use crate::transitions::{self, Kind};

pub const STEPS: usize = 4;
const STEP_MS: u64 = 200;
/// How long to wait for the last TaskRun and its events after the last create.
const SETTLE_DEADLINE: Duration = Duration::from_secs(300);
const TEKTON_CONTROLLER_USER: &str =
    "system:serviceaccount:tekton-pipelines:tekton-pipelines-controller";
const TEKTON_EVENTS_USER: &str = "system:serviceaccount:tekton-pipelines:tekton-events-controller";
const OUR_PREFIX: &str = "dev.tekton.event.plugin.step.";
const TEKTON_TASKRUN_PREFIX: &str = "dev.tekton.event.taskrun.";

pub struct Output {
    pub latency: Latency,
    pub api_load: ApiLoad,
    pub cpu: Cpu,
}

/// Which process sends Tekton's TaskRun CloudEvents in this version: the
/// events controller where it has a TaskRun notifier (read from Tekton's
/// own source in the module cache), the main controller before that.
fn tekton_sender(version: &str) -> &'static str {
    let modcache = std::process::Command::new("go")
        .args(["env", "GOMODCACHE"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let notifier = std::path::Path::new(&modcache)
        .join(format!("github.com/tektoncd/pipeline@{version}"))
        .join("pkg/reconciler/notifications/taskrun");
    if notifier.is_dir() {
        "tekton-events"
    } else {
        "tekton-controller"
    }
}

fn bounds(text: &str, label: &str) -> HistogramBounds {
    let name = "tekton_step_observer_dispatch_seconds";
    let buckets = k8s::buckets(text, name, label);
    let count = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let quantile = |q: f64| -> f64 {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * count && count > 0.0)
            .map(|(le, _)| le * 1000.0)
            .unwrap_or(0.0)
    };
    let sum = k8s::sample(text, &format!("{name}_sum{{{label}}}")).unwrap_or(0.0);
    HistogramBounds {
        count: count as u64,
        p50_le_ms: quantile(0.5),
        p90_le_ms: quantile(0.9),
        p99_le_ms: quantile(0.99),
        mean_ms: if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        },
    }
}

/// Adds two histograms' bounds by taking the larger bound (both are upper bounds).
fn terminal_bounds(text: &str) -> HistogramBounds {
    let kinds = ["succeeded", "failed", "skipped"];
    let all: Vec<HistogramBounds> = kinds
        .iter()
        .map(|k| bounds(text, &format!("type=\"{k}\"")))
        .collect();
    let count: u64 = all.iter().map(|b| b.count).sum();
    let pick = |f: fn(&HistogramBounds) -> f64| {
        all.iter()
            .filter(|b| b.count > 0)
            .map(f)
            .fold(0.0, f64::max)
    };
    HistogramBounds {
        count,
        p50_le_ms: pick(|b| b.p50_le_ms),
        p90_le_ms: pick(|b| b.p90_le_ms),
        p99_le_ms: pick(|b| b.p99_le_ms),
        mean_ms: if count > 0 {
            all.iter().map(|b| b.mean_ms * b.count as f64).sum::<f64>() / count as f64
        } else {
            0.0
        },
    }
}

fn first_arrivals(arrivals: &[Arrival]) -> (HashMap<String, Arrival>, usize) {
    let mut first = HashMap::new();
    let mut duplicates = 0;
    for a in arrivals {
        if first.contains_key(&a.id) {
            duplicates += 1;
        } else {
            first.insert(a.id.clone(), a.clone());
        }
    }
    (first, duplicates)
}

/// `nice`: run the observer at this scheduling priority (the dispatch check).
pub async fn run(env: &Env, rate: f64, seconds: f64, nice: Option<i32>) -> Result<Output> {
    let ns = match nice {
        None => env.namespace("latency"),
        Some(_) => env.namespace("latency-niced"),
    };
    k8s::create_namespace(&env.client, &ns, &env.run_id).await?;
    let (addr, received) = receiver::start().await?;
    let sink = ConfigEventsSink::set(&env.client, &format!("http://{addr}/")).await?;
    let outcome = measure(env, &ns, rate, seconds, &received, nice).await;
    sink.restore().await?;
    outcome
}

async fn measure(
    env: &Env,
    ns: &str,
    rate: f64,
    seconds: f64,
    received: &receiver::Received,
    nice: Option<i32>,
) -> Result<Output> {
    let audit = AuditLog::new(&env.cluster_dir)?;
    let observer = Observer::start_niced(
        &env.observer_bin,
        &env.observer_kubeconfig,
        env.observer_log(if nice.is_some() {
            "latency-niced"
        } else {
            "latency"
        }),
        &["--namespace".to_owned(), ns.to_owned()],
        &env.observer_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        nice,
    )
    .await?;
    let (transitions, taskrun_watch) = transitions::watch_taskruns(&env.client, ns);
    let (pod_versions, pod_watch) = transitions::watch_pods(&env.client, ns);
    let sender = tekton_sender(&env.tekton_version);
    let mut processes = procs::cluster_processes(&env.cluster_dir);
    processes.push(("observer".to_owned(), observer.pid()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let audit_start = audit.offset()?;
    let cpu_start = CpuSnapshot::take(&processes);
    let started = Instant::now();
    let start_wall = Utc::now();
    let api = k8s::taskruns(&env.client, ns);
    let total = (rate * seconds).round() as usize;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut creates = Vec::new();
    info!(total, rate, "latency: creating TaskRuns");
    for i in 0..total {
        ticker.tick().await;
        let api = api.clone();
        let manifest = k8s::taskrun_manifest(&format!("lat-{i:04}"), &env.run_id, STEPS, STEP_MS);
        creates.push(tokio::spawn(
            async move { k8s::create(&api, manifest).await },
        ));
    }
    let mut uids = Vec::new();
    for c in creates {
        uids.push(c.await??.uid().unwrap_or_default());
    }
    // Every TaskRun finished, and every event of ours and Tekton's in.
    let expected_ours = total * STEPS * 2;
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let arrivals = received.snapshot();
        let ours: HashSet<&str> = arrivals
            .iter()
            .filter(|a| a.r#type.starts_with(OUR_PREFIX))
            .map(|a| a.id.as_str())
            .collect();
        let tekton_done = arrivals
            .iter()
            .filter(|a| is_tekton_final(&a.r#type))
            .map(|a| a.taskrun_uid.as_str())
            .collect::<HashSet<_>>()
            .len();
        if transitions.finished_count() >= total
            && ours.len() >= expected_ours
            && tekton_done >= total
        {
            break;
        }
        if Instant::now() > deadline {
            info!(
                ours = ours.len(),
                expected_ours,
                tekton_done,
                finished = transitions.finished_count(),
                "latency: settle deadline passed; reporting what arrived"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Our last ledger patches follow the last sends: wait until every
    // TaskRun's ledger records all its events before the "owes nothing" touch.
    let ledger_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < ledger_deadline && !ledgers_complete(&api, total).await? {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Tekton's events path may still send its last `running`/`successful`
    // events; give stragglers a moment before the CPU snapshot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_end = CpuSnapshot::take(&processes);
    let metrics_text = observer.metrics_text().await?;
    let rounds = k8s::sample(&metrics_text, "tekton_step_observer_delivery_rounds_total")
        .unwrap_or(0.0) as u64;
    let main_end_wall = Utc::now();

    // A write of ours to a settled TaskRun would show here: touch each one.
    for uid_name in transitions
        .names
        .lock()
        .map(|m| m.values().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        api.patch(
            &uid_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"perf.tekton-step-observer/touched": "1"}}}),
            ),
        )
        .await
        .with_context(|| format!("labelling {uid_name}"))?;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Entries by the time the API server received them: the log is written
    // in batches, so its order is not exactly the requests' order.
    let entries = audit.read_from(audit_start)?;
    let (main_entries, touch_entries): (Vec<_>, Vec<_>) =
        entries.into_iter().partition(|e| e.at < main_end_wall);
    let main_entries: Vec<_> = main_entries
        .into_iter()
        .filter(|e| e.at >= start_wall)
        .collect();
    let writes_owing_nothing = touch_entries
        .iter()
        .filter(|e| e.user == env.observer_user && e.namespace == ns && k8s::is_write(&e.verb))
        .count();
    observer.stop()?;
    taskrun_watch.abort();
    pod_watch.abort();

    // Latencies.
    let arrivals = received.snapshot();
    let seen = transitions.snapshot();
    let ours: Vec<Arrival> = arrivals
        .iter()
        .filter(|a| a.r#type.starts_with(OUR_PREFIX))
        .cloned()
        .collect();
    let tekton: Vec<Arrival> = arrivals
        .iter()
        .filter(|a| is_tekton_final(&a.r#type))
        .cloned()
        .collect();
    let (ours_first, observer_duplicates) = first_arrivals(&ours);
    let (tekton_first, tekton_duplicates) = first_arrivals(&tekton);
    let mut started_ms = Vec::new();
    let mut first_step_ms = Vec::new();
    let mut terminal_ms = Vec::new();
    let mut tekton_ms = Vec::new();
    let mut samples = Vec::new();
    let mut examples = Vec::new();
    let since =
        |at: chrono::DateTime<Utc>| (at - start_wall).num_microseconds().unwrap_or(0) as f64 / 1e6;
    let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    for a in ours_first.values() {
        let kind = if a.r#type.ends_with(".started.v1") {
            Kind::Started
        } else {
            Kind::Terminal
        };
        let Some(s) = seen.get(&(a.taskrun_uid.clone(), a.step.clone(), kind)) else {
            continue;
        };
        let latency = ms(a.at - s.at);
        let series = if kind == Kind::Started {
            "started"
        } else {
            "terminal"
        };
        if kind == Kind::Started {
            started_ms.push(latency);
            if a.step == "s0" {
                first_step_ms.push(latency);
            }
        } else {
            terminal_ms.push(latency);
        }
        samples.push(LatencySample {
            series: series.to_owned(),
            at_s: since(s.at),
            latency_ms: latency,
        });
        if examples.len() < 2 && (examples.is_empty() || kind == Kind::Terminal) {
            examples.push(TransitionRecord {
                taskrun: transitions
                    .names
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&a.taskrun_uid).cloned())
                    .unwrap_or_default(),
                step: a.step.clone(),
                transition: a.r#type.clone(),
                seen_at: s.at.to_rfc3339(),
                resource_version: s.resource_version.clone(),
                managed_fields_time: s.managed_fields_time.clone(),
                received_at: a.at.to_rfc3339(),
            });
        }
    }
    for a in tekton_first.values() {
        let Some(s) = seen.get(&(a.taskrun_uid.clone(), String::new(), Kind::Finished)) else {
            continue;
        };
        let latency = ms(a.at - s.at);
        tekton_ms.push(latency);
        samples.push(LatencySample {
            series: "tekton".to_owned(),
            at_s: since(s.at),
            latency_ms: latency,
        });
    }
    // The floor: node agent's pod-status write → our pod watch.
    let agent_log =
        std::fs::read_to_string(procs::logs_dir(&env.cluster_dir).join("node-agent.log"))
            .unwrap_or_default();
    let versions = pod_versions.0.lock().map(|m| m.clone()).unwrap_or_default();
    let mut floor_ms = Vec::new();
    for w in transitions::status_writes(&agent_log)
        .into_iter()
        .filter(|w| w.pod.starts_with(&format!("{ns}/")))
    {
        if let Some(at) = versions.get(&w.resource_version) {
            let latency = (at.timestamp_micros() - w.sent_at_unix_us) as f64 / 1000.0;
            floor_ms.push(latency);
            let sent =
                chrono::DateTime::from_timestamp_micros(w.sent_at_unix_us).unwrap_or(start_wall);
            samples.push(LatencySample {
                series: "floor".to_owned(),
                at_s: since(sent),
                latency_ms: latency,
            });
        }
    }
    let observer_missing = expected_ours.saturating_sub(ours_first.len());
    let tekton_missing = total.saturating_sub(
        tekton_first
            .values()
            .map(|a| &a.taskrun_uid)
            .collect::<HashSet<_>>()
            .len(),
    );
    info!(
        observer_missing,
        tekton_missing,
        started = started_ms.len(),
        terminal = terminal_ms.len(),
        tekton = tekton_ms.len(),
        floor = floor_ms.len(),
        "latency: measured"
    );
    let latency = Latency {
        taskruns_per_second: rate,
        duration_seconds: seconds,
        steps_per_taskrun: STEPS,
        taskruns: total,
        observer_started: Distribution::of(&started_ms),
        observer_started_first_step: Distribution::of(&first_step_ms),
        observer_terminal: Distribution::of(&terminal_ms),
        tekton_taskrun: Distribution::of(&tekton_ms),
        tekton_sender: sender.to_owned(),
        watch_floor: Distribution::of(&floor_ms),
        dispatch_started: bounds(&metrics_text, "type=\"started\""),
        dispatch_terminal: terminal_bounds(&metrics_text),
        observer_missing,
        tekton_missing,
        observer_duplicates,
        tekton_duplicates,
        samples,
        examples,
    };

    // API load, from the audit log of the main window.
    let clients = [
        ("observer", env.observer_user.as_str()),
        ("tekton controller", TEKTON_CONTROLLER_USER),
        ("tekton events controller", TEKTON_EVENTS_USER),
    ];
    let mut loads = Vec::new();
    for (client, user) in clients {
        let mine: Vec<_> = main_entries.iter().filter(|e| e.user == user).collect();
        let counts: BTreeMap<String, usize> = k8s::count_by_request(mine.iter().copied());
        loads.push(ClientLoad {
            client: client.to_owned(),
            username: user.to_owned(),
            total: mine.len(),
            conflicts: mine.iter().filter(|e| e.code == 409).count(),
            requests: counts
                .into_iter()
                .map(|(request, count)| RequestCount {
                    request,
                    count,
                    per_taskrun: count as f64 / total.max(1) as f64,
                })
                .collect(),
        });
    }
    let ledger_patches = main_entries
        .iter()
        .filter(|e| e.user == env.observer_user && e.verb == "patch" && e.resource == "taskruns")
        .count();
    let api_load = ApiLoad {
        taskruns: total,
        clients: loads,
        writes_for_taskruns_owing_nothing: writes_owing_nothing,
        taskruns_owing_nothing: uids.len(),
        ledger_patches,
        delivery_rounds: rounds,
    };

    // CPU per 1 000 events.
    let used = cpu_start.used_until(&cpu_end);
    let observer_cpu = used.get("observer").copied().unwrap_or(0.0);
    let tekton_cpu = used.get(sender).copied().unwrap_or(0.0);
    let tekton_events = arrivals
        .iter()
        .filter(|a| a.r#type.starts_with(TEKTON_TASKRUN_PREFIX))
        .count();
    let per_thousand = |cpu: f64, events: usize| {
        if events > 0 {
            cpu / events as f64 * 1000.0
        } else {
            0.0
        }
    };
    let cpu = Cpu {
        observer_events: ours.len(),
        observer_cpu_seconds: observer_cpu,
        observer_per_thousand: per_thousand(observer_cpu, ours.len()),
        tekton_events,
        tekton_process: sender.to_owned(),
        tekton_cpu_seconds: tekton_cpu,
        tekton_per_thousand: per_thousand(tekton_cpu, tekton_events),
    };
    info!(elapsed = ?started.elapsed(), "latency: done");
    Ok(Output {
        latency,
        api_load,
        cpu,
    })
}

/// Whether `total` TaskRuns carry a ledger with every step's `started` and
/// `succeeded` settled.
async fn ledgers_complete(api: &kube::Api<kube::api::DynamicObject>, total: usize) -> Result<bool> {
    use tekton_step_observer::ledger::Ledger;
    use tekton_step_observer::step_event::StepEventKind;
    let list = api.list(&Default::default()).await?;
    let complete = list
        .items
        .iter()
        .filter(|tr| {
            tr.annotations()
                .get(tekton_step_observer::tekton::LEDGER_ANNOTATION)
                .and_then(|a| Ledger::parse(a).ok())
                .is_some_and(|ledger| {
                    (0..STEPS).all(|i| {
                        let step = format!("s{i}");
                        ledger.settled(&step, StepEventKind::Started)
                            && ledger.settled(&step, StepEventKind::Succeeded)
                    })
                })
        })
        .count();
    Ok(complete >= total)
}

fn is_tekton_final(r#type: &str) -> bool {
    r#type == "dev.tekton.event.taskrun.successful.v1"
        || r#type == "dev.tekton.event.taskrun.failed.v1"
}
