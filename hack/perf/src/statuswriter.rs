//! TaskRun statuses written as Tekton's controller writes them, for the
//! scenarios that need more TaskRuns than the real controller and entrypoint
//! can run on two cores (throughput, memory). Tekton's controller is stopped
//! meanwhile, so these writes are the only ones; the shape follows the
//! controller's (captured in tests/fixtures/): podName, startTime, steps
//! with container, imageID and running/terminated states, the Succeeded
//! condition, completionTime and the resolved taskSpec.
//! Each TaskRun gets a real pod object on `perf-node`, a node kwok serves
//! (heartbeat, pods/log from a file) and the node agent leaves alone, so a
//! log read goes the whole way: API server → kwok → file.

use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::k8s::{self, RUN_LABEL};

pub const PERF_NODE: &str = "perf-node";
pub const STEPS: usize = 4;
const IMAGE_ID: &str = "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn step_names() -> Vec<String> {
    (0..STEPS).map(|i| format!("s{i}")).collect()
}

fn task_spec() -> Value {
    let steps: Vec<Value> = step_names()
        .iter()
        .map(|name| json!({"name": name, "image": "busybox", "script": "#!/bin/sh\nexit 0\n", "computeResources": {}}))
        .collect();
    json!({"steps": steps})
}

/// Adds the node (kwok initialises it and keeps its lease) if missing.
pub async fn ensure_perf_node(client: &Client) -> Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    if nodes.get_opt(PERF_NODE).await?.is_some() {
        return Ok(());
    }
    let node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": PERF_NODE,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": PERF_NODE, "kubernetes.io/os": "linux", "type": "kwok"},
        },
        // Nothing is scheduled here: pods are bound to it by name.
        "spec": {"taints": [{"key": "perf.tekton-step-observer/no-schedule", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"cpu": "1000", "memory": "1Ti", "pods": "100000"},
            "capacity": {"cpu": "1000", "memory": "1Ti", "pods": "100000"},
        },
    }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .context("creating perf-node")?;
    // kwok marks it Ready and gives it an address for pods/log.
    for _ in 0..300 {
        let node = nodes.get(PERF_NODE).await?;
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("kwok did not make {PERF_NODE} Ready in 60 s")
}

/// One ClusterLogs object: every step container of every pod in `namespace`
/// logs the same file.
pub async fn serve_logs(client: &Client, namespace: &str, log_file: &Path) -> Result<()> {
    std::fs::write(log_file, "cloning...\nbuilding...\ntests passed\n")?;
    let resource = ApiResource {
        group: "kwok.x-k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "kwok.x-k8s.io/v1alpha1".into(),
        kind: "ClusterLogs".into(),
        plural: "clusterlogs".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let containers: Vec<String> = step_names().iter().map(|s| format!("step-{s}")).collect();
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "ClusterLogs",
        "metadata": {"name": namespace},
        "spec": {
            "selector": {"matchNamespaces": [namespace]},
            "logs": [{"containers": containers, "logsFile": std::fs::canonicalize(log_file)?}],
        },
    }))?;
    api.create(&PostParams::default(), &object)
        .await
        .context("creating ClusterLogs")?;
    Ok(())
}

pub fn taskrun(name: &str, run: &str, annotations: Option<Value>) -> Value {
    let mut manifest = json!({
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun",
        "metadata": {"name": name, "labels": {RUN_LABEL: run}},
        "spec": {"taskSpec": task_spec(), "serviceAccountName": "default", "timeout": "1h0m0s"},
    });
    if let Some(a) = annotations {
        manifest["metadata"]["annotations"] = a;
    }
    manifest
}

pub fn pod_name(taskrun: &str) -> String {
    format!("{taskrun}-pod")
}

pub async fn create_pod(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    taskrun: &DynamicObject,
) -> Result<()> {
    let name = taskrun.name_any();
    let containers: Vec<Value> = step_names()
        .iter()
        .map(|s| json!({"name": format!("step-{s}"), "image": "busybox", "command": ["/tekton/bin/entrypoint"]}))
        .collect();
    let pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name(&name),
            "labels": {"tekton.dev/taskRun": name},
            "ownerReferences": [{"apiVersion": "tekton.dev/v1", "kind": "TaskRun", "name": name, "uid": taskrun.uid().unwrap_or_default(), "controller": true}],
        },
        "spec": {"nodeName": PERF_NODE, "containers": containers, "restartPolicy": "Never",
                 "tolerations": [{"key": "perf.tekton-step-observer/no-schedule", "operator": "Exists"}]},
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod of {name}"))?;
    Ok(())
}

fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Every step running, the TaskRun Running.
pub fn running_status(taskrun: &str, started: DateTime<Utc>) -> Value {
    let steps: Vec<Value> = step_names()
        .iter()
        .map(|s| json!({"name": s, "container": format!("step-{s}"), "imageID": IMAGE_ID, "running": {"startedAt": ts(started)}}))
        .collect();
    json!({"status": {
        "podName": pod_name(taskrun),
        "startTime": ts(started),
        "conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": "Not all Steps in the Task have finished executing", "lastTransitionTime": ts(started)}],
        "steps": steps,
        "taskSpec": task_spec(),
        "provenance": {"featureFlags": {"runningInEnvWithInjectedSidecars": true, "enableAPIFields": "beta"}},
    }})
}

/// Every step terminated with exit code 0, the TaskRun Succeeded.
pub fn finished_status(taskrun: &str, started: DateTime<Utc>, finished: DateTime<Utc>) -> Value {
    let steps: Vec<Value> = step_names()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"name": s, "container": format!("step-{s}"), "imageID": IMAGE_ID,
                   "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": ts(started), "finishedAt": ts(finished),
                                  "containerID": format!("containerd://{taskrun}-{i}")},
                   "terminationReason": "Completed"})
        })
        .collect();
    json!({"status": {
        "podName": pod_name(taskrun),
        "startTime": ts(started),
        "completionTime": ts(finished),
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "All Steps have completed executing", "lastTransitionTime": ts(finished)}],
        "steps": steps,
        "taskSpec": task_spec(),
        "provenance": {"featureFlags": {"runningInEnvWithInjectedSidecars": true, "enableAPIFields": "beta"}},
    }})
}

pub async fn write_status(api: &Api<DynamicObject>, name: &str, status: Value) -> Result<()> {
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("writing the status of {name}"))?;
    Ok(())
}

/// A ledger annotation saying every event of every step was delivered, as
/// the observer leaves it once done with a TaskRun.
pub fn complete_ledger() -> Value {
    use tekton_step_observer::ledger::{Ledger, Settlement};
    use tekton_step_observer::step_event::StepEventKind;
    let mut ledger = Ledger::default();
    for s in step_names() {
        ledger.record(&s, StepEventKind::Started, Settlement::Delivered);
        ledger.record(&s, StepEventKind::Succeeded, Settlement::Delivered);
    }
    json!({tekton_step_observer::tekton::LEDGER_ANNOTATION: ledger.to_annotation("dev.tekton.event.plugin.step")})
}

/// Stops Tekton's controllers (SIGSTOP) while these writes are the only
/// ones; SIGCONT when dropped, whatever happened.
pub struct TektonPaused {
    pids: Vec<u32>,
}

impl TektonPaused {
    pub fn pause(cluster_dir: &Path) -> Self {
        let pids: Vec<u32> = ["tekton-controller", "tekton-events"]
            .iter()
            .filter_map(|c| crate::procs::component_pid(cluster_dir, c))
            .collect();
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status();
        }
        Self { pids }
    }
}

impl TektonPaused {
    /// Resumes Tekton's controllers, e.g. after an earlier run was killed
    /// before its guard could.
    pub fn resume_any(cluster_dir: &Path) {
        drop(Self::pause_nothing(cluster_dir));
    }

    fn pause_nothing(cluster_dir: &Path) -> Self {
        let pids = ["tekton-controller", "tekton-events"]
            .iter()
            .filter_map(|c| crate::procs::component_pid(cluster_dir, c))
            .collect();
        Self { pids }
    }
}

impl Drop for TektonPaused {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

pub fn api_for(
    client: &Client,
    ns: &str,
) -> (Api<DynamicObject>, Api<k8s_openapi::api::core::v1::Pod>) {
    (
        k8s::taskruns(client, ns),
        Api::namespaced(client.clone(), ns),
    )
}
