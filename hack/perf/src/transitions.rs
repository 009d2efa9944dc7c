//! The harness's own watch of TaskRuns (and pods): the moment each step
//! transition first showed in a status, on this machine's wall clock, with
//! the TaskRun's resourceVersion and managedFields time next to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

/// What changed in a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The step's state showed `running` (or `terminated` at once).
    Started,
    /// The step's state showed `terminated`.
    Terminal,
    /// The TaskRun's Succeeded condition turned True or False.
    Finished,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub at: DateTime<Utc>,
    pub resource_version: String,
    pub managed_fields_time: String,
}

/// (TaskRun uid, step name or "" for Finished, kind).
pub type TransitionKey = (String, String, Kind);

/// Transition → first seen.
#[derive(Clone, Default)]
pub struct Transitions {
    pub seen: Arc<Mutex<HashMap<TransitionKey, Seen>>>,
    /// TaskRun uid → name.
    pub names: Arc<Mutex<HashMap<String, String>>>,
}

impl Transitions {
    pub fn snapshot(&self) -> HashMap<TransitionKey, Seen> {
        self.seen.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn finished_count(&self) -> usize {
        self.seen
            .lock()
            .map(|m| m.keys().filter(|k| k.2 == Kind::Finished).count())
            .unwrap_or_default()
    }

    fn record(&self, object: &DynamicObject) {
        let at = Utc::now();
        let uid = object.uid().unwrap_or_default();
        let status = &object.data["status"];
        let managed_fields_time = object
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.subresource.as_deref() == Some("status"))
            .filter_map(|m| m.time.as_ref().map(|t| t.0.to_string()))
            .max()
            .unwrap_or_default();
        let seen = Seen {
            at,
            resource_version: object.resource_version().unwrap_or_default(),
            managed_fields_time,
        };
        let Ok(mut map) = self.seen.lock() else {
            return;
        };
        if let Ok(mut names) = self.names.lock() {
            names
                .entry(uid.clone())
                .or_insert_with(|| object.name_any());
        }
        // Tekton starts every step container with the pod, but a step's
        // entrypoint waits for the one before it to end: a step has started
        // once it runs and the step before it has terminated.
        let mut previous_ended = true;
        for step in status["steps"].as_array().into_iter().flatten() {
            let name = step["name"].as_str().unwrap_or_default().to_owned();
            let running = step.get("running").is_some();
            let terminated = step.get("terminated").is_some();
            let started = (running || terminated) && previous_ended;
            previous_ended = terminated;
            if started {
                map.entry((uid.clone(), name.clone(), Kind::Started))
                    .or_insert_with(|| seen.clone());
            }
            if terminated {
                map.entry((uid.clone(), name, Kind::Terminal))
                    .or_insert_with(|| seen.clone());
            }
        }
        let finished = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Succeeded" && (c["status"] == "True" || c["status"] == "False"));
        if finished {
            map.entry((uid, String::new(), Kind::Finished))
                .or_insert(seen);
        }
    }
}

/// Watches the TaskRuns of one namespace until the task is dropped.
pub fn watch_taskruns(
    client: &Client,
    namespace: &str,
) -> (Transitions, tokio::task::JoinHandle<()>) {
    let transitions = Transitions::default();
    let api = crate::k8s::taskruns(client, namespace);
    let recorder = transitions.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event {
                recorder.record(&o);
            }
        }
    });
    (transitions, task)
}

/// Pod resourceVersion → when the harness's pod watch delivered it.
#[derive(Clone, Default)]
pub struct PodVersions(pub Arc<Mutex<HashMap<String, DateTime<Utc>>>>);

pub fn watch_pods(client: &Client, namespace: &str) -> (PodVersions, tokio::task::JoinHandle<()>) {
    let versions = PodVersions::default();
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let recorder = versions.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            if let Ok(watcher::Event::Apply(pod)) = event {
                let at = Utc::now();
                if let (Some(rv), Ok(mut map)) = (pod.resource_version(), recorder.0.lock()) {
                    map.entry(rv).or_insert(at);
                }
            }
        }
    });
    (versions, task)
}

/// One pod-status write the node agent logged.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub pod: String,
    pub resource_version: String,
    pub sent_at_unix_us: i64,
}

/// Parses the node agent's "pod status written" lines (key=value fields).
pub fn status_writes(log: &str) -> Vec<StatusWrite> {
    log.lines()
        .filter(|l| l.contains("pod status written"))
        .filter_map(|line| {
            let field = |key: &str| -> Option<String> {
                let start = line.find(&format!("{key}="))? + key.len() + 1;
                let value: String = line[start..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                Some(value.trim_matches('"').to_owned())
            };
            Some(StatusWrite {
                pod: field("pod")?,
                resource_version: field("resource_version")?,
                sent_at_unix_us: field("sent_at_unix_us")?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_write_lines() {
        let log = "2026-12-02T21:00:00.000001Z  INFO pod{name=x}: node_agent::pod_task: pod status written pod=perf/x-pod resource_version=1234 sent_at_unix_us=1764709200000001 answered_at_unix_us=1764709200000900\nother line\n";
        let writes = status_writes(log);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].pod, "perf/x-pod");
        assert_eq!(writes[0].resource_version, "1234");
        assert_eq!(writes[0].sent_at_unix_us, 1_764_709_200_000_001);
    }
}
