//! Scenario 3 (memory): the observer's resident memory idle, with finished
//! TaskRuns in the cluster, and while TaskRuns run. Each case is a fresh
//! observer process that has listed and settled everything in scope.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chrono::Utc;
use kube::ResourceExt;
use perf::results::{Memory, MemoryCase, MemoryVariant};
use tokio::sync::Semaphore;
use tracing::info;

use crate::env::Env;
use crate::k8s::{self, Observer};
use crate::procs;
use crate::receiver;
use crate::statuswriter as sw;

const WRITER_CONCURRENCY: usize = 64;
const SETTLE_DEADLINE: Duration = Duration::from_secs(600);
/// After the observer has everything in memory, let its allocator and
/// watch buffers settle before reading RSS.
const QUIET: Duration = Duration::from_secs(5);

/// Creates `count` TaskRuns that finished an hour ago, with the complete
/// ledger the observer leaves behind (it delivered their events earlier).
async fn create_finished(env: &Env, ns: &str, from: usize, count: usize) -> Result<()> {
    let api = k8s::taskruns(&env.client, ns);
    let limit = Arc::new(Semaphore::new(WRITER_CONCURRENCY));
    let began = Utc::now() - chrono::TimeDelta::hours(1);
    let ended = began + chrono::TimeDelta::seconds(40);
    let mut tasks = Vec::new();
    for i in from..from + count {
        let (api, limit, run) = (api.clone(), limit.clone(), env.run_id.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let name = format!("done-{i:06}");
            k8s::create(&api, sw::taskrun(&name, &run, Some(sw::complete_ledger()))).await?;
            sw::write_status(&api, &name, sw::finished_status(&name, began, ended)).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Waits until the observer tracks `taskruns` and owes nothing, then reads
/// its memory.
async fn settle_and_measure(
    observer: &Observer,
    name: &str,
    in_cluster: usize,
    taskruns: usize,
    owe_nothing: bool,
) -> Result<MemoryCase> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let tracked = observer
            .metric("tekton_step_observer_tracked_taskruns")
            .await? as usize;
        let queue = observer.metric("tekton_step_observer_queue_depth").await? as usize;
        // A finished TaskRun whose ledger has everything is decided at the
        // list and kept nowhere but in the watch: it owes nothing and is not
        // tracked. So: the list is in (the observer is ready) and nothing is owed.
        if (tracked >= taskruns || owe_nothing) && queue == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "memory {name}: the observer tracks {tracked} of {taskruns} TaskRuns with {queue} owing after {SETTLE_DEADLINE:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(QUIET).await;
    let tracked = observer
        .metric("tekton_step_observer_tracked_taskruns")
        .await? as usize;
    let (rss, peak) = procs::memory(observer.pid())?;
    info!(name, tracked, rss, peak, "memory: measured");
    Ok(MemoryCase {
        name: name.to_owned(),
        taskruns_in_cluster: in_cluster,
        tracked_taskruns: tracked,
        rss_bytes: rss,
        peak_rss_bytes: peak,
    })
}

pub async fn run(env: &Env, finished: &[usize], running: usize) -> Result<Memory> {
    let _paused = sw::TektonPaused::pause(&env.cluster_dir);
    let (addr, received) = receiver::start().await?;
    let sink = format!("http://{addr}/");
    let observer_args = |ns: &str| {
        vec![
            "--namespace".to_owned(),
            ns.to_owned(),
            "--sink".to_owned(),
            sink.clone(),
        ]
    };
    let mut cases = Vec::new();

    // Idle: nothing in scope.
    let idle_ns = env.namespace("memory-idle");
    k8s::create_namespace(&env.client, &idle_ns, &env.run_id).await?;
    let observer = Observer::start(
        &env.observer_bin,
        &env.observer_kubeconfig,
        env.observer_log("memory-idle"),
        &observer_args(&idle_ns),
    )
    .await?;
    cases.push(settle_and_measure(&observer, "idle", 0, 0, true).await?);
    observer.stop()?;

    // Finished TaskRuns, the namespace grown to each size in turn.
    let ns = env.namespace("memory");
    k8s::create_namespace(&env.client, &ns, &env.run_id).await?;
    let mut have = 0;
    for &size in finished {
        info!(size, "memory: creating finished TaskRuns");
        create_finished(env, &ns, have, size.saturating_sub(have)).await?;
        have = have.max(size);
        let observer = Observer::start(
            &env.observer_bin,
            &env.observer_kubeconfig,
            env.observer_log(&format!("memory-{size}")),
            &observer_args(&ns),
        )
        .await?;
        cases.push(
            settle_and_measure(&observer, &format!("{size} finished"), have, have, true).await?,
        );
        observer.stop()?;
    }

    // Variants, each measured idle and on the largest finished case. One
    // that cannot run here (say, a list mode the API server lacks) is
    // recorded as such and the scenario goes on.
    let mut variants = Vec::new();
    for variant in env.memory_variants() {
        let measured = async {
            let mut rss = Vec::new();
            for (case_ns, in_cluster, label) in [(&idle_ns, 0, "idle"), (&ns, have, "finished")] {
                let mut args = observer_args(case_ns);
                args.extend(variant.args.iter().cloned());
                let vars: Vec<(&str, &str)> = variant
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let observer = Observer::start_with_env(
                    &variant.binary,
                    &env.observer_kubeconfig,
                    env.observer_log(&format!("memory-variant-{}-{label}", variant.slug())),
                    &args,
                    &vars,
                )
                .await?;
                let name = format!("{} ({label})", variant.name);
                let case = settle_and_measure(&observer, &name, in_cluster, in_cluster, true).await;
                observer.stop()?;
                rss.push(case?);
            }
            anyhow::Ok((rss[0].rss_bytes, rss[1].rss_bytes, rss[1].peak_rss_bytes))
        }
        .await;
        variants.push(match measured {
            Ok((idle, rss, peak)) => MemoryVariant {
                name: variant.name.clone(),
                taskruns_in_cluster: have,
                rss_bytes: rss,
                peak_rss_bytes: peak,
                idle_rss_bytes: Some(idle),
                error: None,
            },
            Err(error) => {
                tracing::warn!(variant = %variant.name, %error, "memory: variant failed");
                MemoryVariant {
                    name: variant.name.clone(),
                    taskruns_in_cluster: have,
                    error: Some(format!("{error:#}")),
                    ..MemoryVariant::default()
                }
            }
        });
    }

    // Running: TaskRuns with every step running, the observer sending their
    // started events.
    let run_ns = env.namespace("memory-running");
    k8s::create_namespace(&env.client, &run_ns, &env.run_id).await?;
    sw::ensure_perf_node(&env.client).await?;
    sw::serve_logs(&env.client, &run_ns, &env.work_dir.join("step-running.log")).await?;
    let observer = Observer::start(
        &env.observer_bin,
        &env.observer_kubeconfig,
        env.observer_log("memory-running"),
        &observer_args(&run_ns),
    )
    .await?;
    let (taskruns, pods) = sw::api_for(&env.client, &run_ns);
    let limit = Arc::new(Semaphore::new(WRITER_CONCURRENCY));
    let began = Utc::now();
    let mut tasks = Vec::new();
    for i in 0..running {
        let (taskruns, pods, limit, run) = (
            taskruns.clone(),
            pods.clone(),
            limit.clone(),
            env.run_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let name = format!("run-{i:06}");
            let created = k8s::create(&taskruns, sw::taskrun(&name, &run, None)).await?;
            sw::create_pod(&pods, &created).await?;
            sw::write_status(&taskruns, &name, sw::running_status(&name, began)).await?;
            anyhow::Ok(created.name_any())
        }));
    }
    let mut names = Vec::new();
    for t in tasks {
        names.push(t.await??);
    }
    let deadline = Instant::now() + SETTLE_DEADLINE;
    // Only the first step has started: the others wait for it (Tekton's
    // entrypoint), though their containers run.
    while received.len() < running && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cases.push(
        settle_and_measure(
            &observer,
            &format!("{running} running"),
            running,
            running,
            false,
        )
        .await?,
    );
    // Finish them, so nothing is left running for Tekton's controller.
    for name in &names {
        sw::write_status(
            &taskruns,
            name,
            sw::finished_status(name, began, Utc::now()),
        )
        .await?;
    }
    observer.stop()?;

    let idle = cases.first().map(|c| c.rss_bytes).unwrap_or(0);
    let biggest = cases
        .iter()
        .filter(|c| c.name.ends_with("finished"))
        .max_by_key(|c| c.tracked_taskruns);
    let bytes_per = biggest
        .map(|c| (c.rss_bytes.saturating_sub(idle)) as f64 / c.taskruns_in_cluster.max(1) as f64)
        .unwrap_or(0.0);
    Ok(Memory {
        cases,
        bytes_per_tracked_taskrun: bytes_per,
        variants,
        default_build: env.observer_name.clone(),
    })
}
