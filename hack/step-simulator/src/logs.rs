//! Container logs: files in the CRI log format that kwok serves for `pods/log`, and the
//! kwok `Logs` object (kwok.x-k8s.io/v1alpha1, one per pod, named like the pod) that tells
//! kwok which file belongs to which container.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;

/// API group of kwok's `Logs` resource.
const KWOK_GROUP: &str = "kwok.x-k8s.io";
/// API version of kwok's `Logs` resource (kwok v0.8.0).
const KWOK_VERSION: &str = "v1alpha1";
/// Kind of kwok's per-pod log configuration.
const LOGS_KIND: &str = "Logs";
/// Plural resource name of kwok's `Logs` (its CRD says `plural: logs`).
const LOGS_PLURAL: &str = "logs";
/// Label that marks the `Logs` objects this program owns.
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
const MANAGED_BY_VALUE: &str = "step-simulator";
/// Suffix of every container log file.
const LOG_FILE_SUFFIX: &str = ".log";
/// HTTP status of a create that finds the object already there.
const HTTP_CONFLICT: u16 = 409;
/// HTTP status of a request for an object that does not exist.
const HTTP_NOT_FOUND: u16 = 404;

/// Which output stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Formats lines as a container runtime writes them (CRI log format), which kwok parses:
/// `<RFC 3339 nano time> <stream> F <text>`.
pub fn cri_log(at: DateTime<Utc>, stream: Stream, text: &str) -> String {
    let time = at.to_rfc3339_opts(SecondsFormat::Nanos, true);
    let stream = match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    };
    let mut log = String::new();
    if text.is_empty() {
        return log;
    }
    let text = text.strip_suffix('\n').unwrap_or(text);
    for line in text.split('\n') {
        log.push_str(&format!("{time} {stream} F {line}\n"));
    }
    log
}

/// The container log files of all simulated pods, under one directory.
#[derive(Clone, Debug)]
pub struct LogFiles {
    root: PathBuf,
}

impl LogFiles {
    /// Uses `root` (created if missing) as the logs directory; paths given to kwok are absolute.
    pub async fn new(root: &Path) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(root).await?;
        let root = tokio::fs::canonicalize(root).await?;
        Ok(Self { root })
    }

    fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.root.join(namespace).join(pod)
    }

    /// The log file of one container.
    pub fn path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.pod_dir(namespace, pod)
            .join(format!("{container}{LOG_FILE_SUFFIX}"))
    }

    /// Creates the empty log files of a pod's containers; existing ones keep their content.
    pub async fn prepare(
        &self,
        namespace: &str,
        pod: &str,
        containers: &[String],
    ) -> std::io::Result<()> {
        tokio::fs::create_dir_all(self.pod_dir(namespace, pod)).await?;
        for container in containers {
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(namespace, pod, container))
                .await?;
        }
        Ok(())
    }

    /// Replaces a container's log.
    pub async fn write(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        log: &str,
    ) -> std::io::Result<()> {
        tokio::fs::write(self.path(namespace, pod, container), log).await
    }

    /// Removes a pod's log files.
    pub async fn remove(&self, namespace: &str, pod: &str) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(self.pod_dir(namespace, pod)).await {
            Err(error) if error.kind() != ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Removes the log directories of pods that are not in `live` (namespace, name).
    pub async fn remove_all_but(&self, live: &[(String, String)]) -> std::io::Result<()> {
        let mut namespaces = tokio::fs::read_dir(&self.root).await?;
        while let Some(namespace) = namespaces.next_entry().await? {
            if !namespace.file_type().await?.is_dir() {
                continue;
            }
            let namespace_name = namespace.file_name().to_string_lossy().into_owned();
            let mut pods = tokio::fs::read_dir(namespace.path()).await?;
            while let Some(pod) = pods.next_entry().await? {
                let pod_name = pod.file_name().to_string_lossy().into_owned();
                let is_live = live
                    .iter()
                    .any(|(namespace, name)| *namespace == namespace_name && *name == pod_name);
                if !is_live {
                    tracing::info!(namespace = %namespace_name, pod = %pod_name, "removing logs of a pod that is gone");
                    self.remove(&namespace_name, &pod_name).await?;
                }
            }
        }
        Ok(())
    }
}

/// kwok's `Logs` objects.
#[derive(Clone)]
pub struct KwokLogs {
    client: Client,
    resource: ApiResource,
}

impl KwokLogs {
    /// Addresses kwok's `Logs` resource.
    pub fn new(client: Client) -> Self {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(KWOK_GROUP, KWOK_VERSION, LOGS_KIND),
            LOGS_PLURAL,
        );
        Self { client, resource }
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.resource)
    }

    /// Creates the pod's `Logs` object (owned by the pod, so it goes when the pod goes),
    /// pointing each container at its log file. An existing object is left as it is.
    pub async fn ensure(
        &self,
        pod: &Pod,
        files: &LogFiles,
        containers: &[String],
    ) -> kube::Result<()> {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let logs: Vec<serde_json::Value> = containers
            .iter()
            .map(|container| {
                json!({
                    "containers": [container],
                    "logsFile": files.path(&namespace, &name, container),
                })
            })
            .collect();
        let mut object = DynamicObject::new(&name, &self.resource)
            .within(&namespace)
            .data(json!({ "spec": { "logs": logs } }));
        object
            .metadata
            .labels
            .get_or_insert_default()
            .insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
        object.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Pod".to_owned(),
                name: name.clone(),
                uid: pod.uid().unwrap_or_default(),
                ..Default::default()
            },
        ]);
        match self
            .api(&namespace)
            .create(&PostParams::default(), &object)
            .await
        {
            Err(kube::Error::Api(status)) if status.code == HTTP_CONFLICT => Ok(()),
            result => result.map(|_| ()),
        }
    }

    /// Deletes the pod's `Logs` object, if it is still there.
    pub async fn delete(&self, namespace: &str, pod: &str) -> kube::Result<()> {
        match self
            .api(namespace)
            .delete(pod, &DeleteParams::default())
            .await
        {
            Err(kube::Error::Api(status)) if status.code == HTTP_NOT_FOUND => Ok(()),
            result => result.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cri_log_lines() {
        let at = Utc
            .with_ymd_and_hms(2025, 1, 2, 3, 4, 5)
            .single()
            .expect("valid test time");
        let cases = [
            ("", Stream::Stdout, ""),
            (
                "\n",
                Stream::Stdout,
                "2025-01-02T03:04:05.000000000Z stdout F \n",
            ),
            (
                "hello\nworld\n",
                Stream::Stdout,
                "2025-01-02T03:04:05.000000000Z stdout F hello\n2025-01-02T03:04:05.000000000Z stdout F world\n",
            ),
            (
                "no newline",
                Stream::Stderr,
                "2025-01-02T03:04:05.000000000Z stderr F no newline\n",
            ),
        ];
        for (text, stream, expected) in cases {
            assert_eq!(cri_log(at, stream, text), expected, "{text:?}");
        }
    }
}
