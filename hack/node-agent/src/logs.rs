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
const MANAGED_BY_VALUE: &str = "node-agent";
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

/// The longest line a runtime writes as one CRI record; longer lines are split into
/// partial (`P`) records, as containerd does at 16 KiB.
pub const MAX_CRI_LINE_BYTES: usize = 16 * 1024;
/// Read buffer of a container's output pipe.
const PIPE_READ_BUFFER_BYTES: usize = 64 * 1024;
/// Write buffer of a container's log file: few system calls for a 100 MB log.
const LOG_WRITE_BUFFER_BYTES: usize = 1 << 20;
/// How far from its end the log's tail is looked for (FallbackToLogsOnError).
const TAIL_SCAN_BYTES: u64 = 256 * 1024;

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One CRI log record: `<RFC 3339 nano time> <stream> <F|P> <text>\n`.
pub fn cri_record(at: DateTime<Utc>, stream: Stream, partial: bool, text: &[u8]) -> Vec<u8> {
    let mut record = format!(
        "{} {} {} ",
        at.to_rfc3339_opts(SecondsFormat::Nanos, true),
        stream.as_str(),
        if partial { "P" } else { "F" }
    )
    .into_bytes();
    record.extend_from_slice(text);
    record.push(b'\n');
    record
}

/// Splits a stream's bytes into CRI records as they arrive: whole lines, and partial
/// records for lines longer than [`MAX_CRI_LINE_BYTES`]. Pure; the caller stamps times.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Takes more bytes; returns the records now complete as (partial?, text).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(bool, Vec<u8>)> {
        let mut records = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                records.push((false, std::mem::take(&mut self.pending)));
            } else {
                self.pending.push(byte);
                if self.pending.len() == MAX_CRI_LINE_BYTES {
                    records.push((true, std::mem::take(&mut self.pending)));
                }
            }
        }
        records
    }

    /// The stream ended: a last line without its newline is still a whole record.
    pub fn finish(self) -> Option<(bool, Vec<u8>)> {
        (!self.pending.is_empty()).then_some((false, self.pending))
    }
}

/// A container's log file, written by the pumps of its stdout and stderr.
pub struct ContainerLog {
    file: tokio::sync::Mutex<tokio::io::BufWriter<tokio::fs::File>>,
}

impl ContainerLog {
    /// Opens the log for appending (a restarted container adds to it).
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(Self {
            file: tokio::sync::Mutex::new(tokio::io::BufWriter::with_capacity(
                LOG_WRITE_BUFFER_BYTES,
                file,
            )),
        })
    }

    /// Copies one output stream into the log until it ends, then flushes.
    pub async fn pump(
        &self,
        stream: Stream,
        mut output: impl tokio::io::AsyncRead + Unpin,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut splitter = LineSplitter::default();
        let mut buffer = vec![0; PIPE_READ_BUFFER_BYTES];
        loop {
            let read = output.read(&mut buffer).await?;
            let records = if read == 0 {
                std::mem::take(&mut splitter).finish().into_iter().collect()
            } else {
                splitter.push(&buffer[..read])
            };
            if !records.is_empty() {
                let now = Utc::now();
                let mut file = self.file.lock().await;
                for (partial, text) in records {
                    file.write_all(&cri_record(now, stream, partial, &text))
                        .await?;
                }
            }
            if read == 0 {
                return self.file.lock().await.flush().await;
            }
        }
    }
}

/// The last `max_lines` lines of a CRI log file, at most `max_bytes` of them, as text:
/// what the kubelet uses as the termination message of a failed container that wrote
/// none, under `FallbackToLogsOnError`.
pub fn log_tail(path: &Path, max_lines: usize, max_bytes: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let start = length.saturating_sub(TAIL_SCAN_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let mut messages: Vec<String> = Vec::new();
    let mut continues_last = false;
    for line in lines {
        let mut fields = line.splitn(4, ' ');
        let (_time, _stream) = (fields.next(), fields.next());
        let partial = fields.next() == Some("P");
        let message = fields.next().unwrap_or_default();
        match messages.last_mut() {
            Some(last) if continues_last => last.push_str(message),
            _ => messages.push(message.to_owned()),
        }
        continues_last = partial;
    }
    let start_line = messages.len().saturating_sub(max_lines);
    let mut tail = messages[start_line..].join("\n");
    if tail.len() > max_bytes {
        let mut cut = tail.len() - max_bytes;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = tail[cut..].to_owned();
    }
    Ok(tail)
}

/// The container log files of all pods on the node, under one directory.
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
    fn cri_records() {
        let at = Utc
            .with_ymd_and_hms(2025, 1, 2, 3, 4, 5)
            .single()
            .expect("valid test time");
        assert_eq!(
            cri_record(at, Stream::Stderr, false, b"hello"),
            b"2025-01-02T03:04:05.000000000Z stderr F hello\n"
        );
        assert_eq!(
            cri_record(at, Stream::Stdout, true, b""),
            b"2025-01-02T03:04:05.000000000Z stdout P \n"
        );
    }

    #[test]
    fn lines_split_as_a_runtime_splits_them() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"hel"), vec![]);
        assert_eq!(
            splitter.push(b"lo\n\nwor"),
            vec![(false, b"hello".to_vec()), (false, Vec::new())]
        );
        assert_eq!(splitter.finish(), Some((false, b"wor".to_vec())));

        let mut splitter = LineSplitter::default();
        let long = vec![b'x'; MAX_CRI_LINE_BYTES + 3];
        let mut records = splitter.push(&long);
        records.extend(splitter.push(b"\n"));
        assert_eq!(
            records,
            vec![
                (true, vec![b'x'; MAX_CRI_LINE_BYTES]),
                (false, b"xxx".to_vec())
            ]
        );
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn tail_joins_partials_and_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("node-agent-tail-{}", std::process::id()));
        let at = Utc::now();
        let mut file = Vec::new();
        for line in ["one", "two", "three"] {
            file.extend(cri_record(at, Stream::Stdout, false, line.as_bytes()));
        }
        file.extend(cri_record(at, Stream::Stderr, true, b"fo"));
        file.extend(cri_record(at, Stream::Stderr, false, b"ur"));
        std::fs::write(&path, file).expect("temp file");
        let tail = log_tail(&path, 2, 2048);
        let short = log_tail(&path, 80, 6);
        let _ = std::fs::remove_file(&path);
        assert_eq!(tail.expect("tail"), "three\nfour");
        assert_eq!(short.expect("tail"), "e\nfour");
    }
}
