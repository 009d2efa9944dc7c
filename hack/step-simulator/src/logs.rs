//! Container logs: files in the CRI log format that kwok serves for `pods/log`, and the
//! kwok `Logs` object (kwok.x-k8s.io/v1alpha1, one per pod, named like the pod) that tells
//! kwok which file belongs to which container.

use std::fmt::Write as _;
use std::io::{ErrorKind, Write as _};
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

/// Length of one full filler line, its newline included: long enough that the CRI prefix
/// adds little to the file, far below the 16 KiB at which container runtimes split lines.
pub const FILLER_LINE_BYTES: u64 = 1024;

/// Write buffer of a filler log: few system calls, bounded memory.
const FILLER_WRITE_BUFFER_BYTES: usize = 1 << 20;

/// The filler lines of `SIMULATED_LOG_BYTES=bytes`, exactly `bytes` bytes of log in all
/// (newlines included): lines of [`FILLER_LINE_BYTES`] reading
/// `filler 0000000001 xxx…`, numbered from 1, then one shorter line of `x`s for the
/// remainder. Calls `line` with each line's text, without its newline, reusing one buffer.
pub fn filler<E>(bytes: u64, mut line: impl FnMut(&str) -> Result<(), E>) -> Result<(), E> {
    let width = FILLER_LINE_BYTES as usize - 1;
    let mut text = String::with_capacity(width);
    for number in 1..=bytes / FILLER_LINE_BYTES {
        text.clear();
        // Writing to a String cannot fail.
        let _ = write!(text, "filler {number:010} ");
        text.extend(std::iter::repeat_n('x', width - text.len()));
        line(&text)?;
    }
    let rest = (bytes % FILLER_LINE_BYTES) as usize;
    if rest > 0 {
        text.clear();
        text.extend(std::iter::repeat_n('x', rest - 1));
        line(&text)?;
    }
    Ok(())
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

    /// Replaces a container's log with `filler_bytes` of [`filler`] lines on stdout, all
    /// stamped `at`, followed by `rest` (already in the CRI format). Streamed through a
    /// bounded buffer on a blocking thread, so a 100 MB log never sits in memory.
    pub async fn write_with_filler(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        at: DateTime<Utc>,
        filler_bytes: u64,
        rest: String,
    ) -> std::io::Result<()> {
        let path = self.path(namespace, pod, container);
        let prefix = format!(
            "{} stdout F ",
            at.to_rfc3339_opts(SecondsFormat::Nanos, true)
        );
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::create(path)?;
            let mut out = std::io::BufWriter::with_capacity(FILLER_WRITE_BUFFER_BYTES, file);
            filler(filler_bytes, |text| {
                out.write_all(prefix.as_bytes())?;
                out.write_all(text.as_bytes())?;
                out.write_all(b"\n")
            })?;
            out.write_all(rest.as_bytes())?;
            out.flush()
        })
        .await
        .map_err(std::io::Error::other)?
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
    fn filler_is_exactly_as_long_as_asked() {
        for bytes in [0, 1, 2, 17, 1023, 1024, 1025, 3 * 1024, 5000] {
            let mut lines = Vec::new();
            filler(bytes, |line| {
                lines.push(line.to_owned());
                Ok::<_, ()>(())
            })
            .expect("collecting cannot fail");
            let total: u64 = lines.iter().map(|line| line.len() as u64 + 1).sum();
            assert_eq!(total, bytes, "{bytes}");
            let full = (bytes / FILLER_LINE_BYTES) as usize;
            for (index, line) in lines.iter().enumerate().take(full) {
                assert_eq!(line.len() as u64, FILLER_LINE_BYTES - 1);
                assert!(
                    line.starts_with(&format!("filler {:010} x", index + 1)),
                    "{line:.30}"
                );
            }
            assert!(
                lines[full..]
                    .iter()
                    .all(|line| line.bytes().all(|b| b == b'x'))
            );
        }
    }

    #[tokio::test]
    async fn filler_log_file_is_cri_lines_then_the_rest() {
        let dir = std::env::temp_dir().join(format!("step-simulator-test-{}", std::process::id()));
        let files = LogFiles::new(&dir).await.expect("temp dir");
        files
            .prepare("ns", "pod", &["step-a".to_owned()])
            .await
            .expect("prepare");
        let at = Utc
            .with_ymd_and_hms(2025, 1, 2, 3, 4, 5)
            .single()
            .expect("valid test time");
        let rest = cri_log(at, Stream::Stdout, "last line\n");
        files
            .write_with_filler("ns", "pod", "step-a", at, 2 * FILLER_LINE_BYTES + 3, rest)
            .await
            .expect("write");
        let text = std::fs::read_to_string(files.path("ns", "pod", "step-a")).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let prefix = "2025-01-02T03:04:05.000000000Z stdout F ";
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with(&format!("{prefix}filler 0000000001 xx")));
        assert!(lines[1].starts_with(&format!("{prefix}filler 0000000002 xx")));
        assert_eq!(lines[2], format!("{prefix}xx"));
        assert_eq!(lines[3], format!("{prefix}last line"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

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
