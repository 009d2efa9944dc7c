//! Watches the Tekton TaskRun pods bound to the simulated node and gives each one its own
//! task ([`crate::pod_task`]), fed with every new version of the pod.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::pod_task::{self, Shared};

/// Tekton labels every TaskRun pod with the TaskRun's name under this key.
const TASKRUN_LABEL: &str = "tekton.dev/taskRun";

/// Runs until the watch stream ends (it does not, short of the process ending).
pub async fn run(shared: Arc<Shared>, node: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let config = watcher::Config::default()
        .labels(TASKRUN_LABEL)
        .fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    let mut tasks: HashMap<String, watch::Sender<Arc<Pod>>> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    let mut listed_names: Vec<(String, String)> = Vec::new();
    info!(%node, "watching Tekton TaskRun pods");
    while let Some(event) = events.next().await {
        match event {
            Err(error) => warn!(%error, "pod watch failed; retrying"),
            Ok(Event::Init) => {
                listed.clear();
                listed_names.clear();
            }
            Ok(Event::InitApply(pod)) => {
                listed.insert(pod.uid().unwrap_or_default());
                listed_names.push((pod.namespace().unwrap_or_default(), pod.name_any()));
                dispatch(&shared, &mut tasks, pod);
            }
            Ok(Event::Apply(pod)) => dispatch(&shared, &mut tasks, pod),
            Ok(Event::Delete(pod)) => {
                debug!(namespace = ?pod.namespace(), name = %pod.name_any(), "pod deleted");
                // Dropping the sender tells the pod's task that the pod is gone.
                tasks.remove(&pod.uid().unwrap_or_default());
            }
            Ok(Event::InitDone) => {
                tasks.retain(|uid, _| listed.contains(uid));
                if let Err(error) = shared.files.remove_all_but(&listed_names).await {
                    warn!(%error, "cannot clean up the logs of pods that are gone");
                }
                info!(pods = tasks.len(), "pod list synced");
            }
        }
    }
    Ok(())
}

/// Hands a pod's new version to its task, starting the task for a pod seen the first time.
fn dispatch(shared: &Arc<Shared>, tasks: &mut HashMap<String, watch::Sender<Arc<Pod>>>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    let pod = Arc::new(pod);
    if let Some(sender) = tasks.get(&uid).filter(|sender| !sender.is_closed()) {
        sender.send_replace(pod);
        return;
    }
    let (sender, receiver) = watch::channel(pod);
    tokio::spawn(pod_task::run(shared.clone(), receiver));
    tasks.insert(uid, sender);
}
