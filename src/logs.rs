//! Reading a step container's log through the `pods/log` API, keeping only
//! its tail so a 100 MB log costs a bounded amount of memory.

use std::time::Duration;

use futures::AsyncReadExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};

use crate::error::Error;
use crate::event::{StepLog, cap_log};

/// How long reading one log may take: a 100 MB log streams in a few seconds
/// on loopback; a kubelet that stalls must not hold a delivery forever.
pub const LOG_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Size of one read from the log stream.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Where a step's log is.
#[derive(Clone, Copy, Debug)]
pub struct LogLocation<'a> {
    /// Namespace of the pod.
    pub namespace: &'a str,
    /// The pod, if the TaskRun has one.
    pub pod: Option<&'a str>,
    /// The step's container (`step-<name>`).
    pub container: &'a str,
}

/// Reads the last `limit` bytes of a step's log. A log that cannot be had
/// (no pod, pod deleted, refused, too slow) is [`StepLog::Unavailable`], so
/// the event still goes out; a failure that may pass (the API server or the
/// kubelet not answering, 429, 5xx) is an [`Error::ReadLog`], for the caller
/// to try again.
pub async fn read_step_log(
    client: &kube::Client,
    at: LogLocation<'_>,
    limit: usize,
) -> Result<StepLog, Error> {
    let Some(pod) = at.pod else {
        return Ok(StepLog::Unavailable("the TaskRun has no pod".to_owned()));
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), at.namespace);
    let params = LogParams {
        container: Some(at.container.to_owned()),
        ..LogParams::default()
    };
    let read = async {
        let mut stream = api.log_stream(pod, &params).await?;
        let mut tail = TailBuffer::new(limit);
        let mut chunk = vec![0_u8; READ_CHUNK_BYTES];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(kube::Error::ReadEvents)?;
            if n == 0 {
                break;
            }
            tail.push(&chunk[..n]);
        }
        Ok::<_, kube::Error>(tail.into_log())
    };
    Ok(match tokio::time::timeout(LOG_READ_TIMEOUT, read).await {
        Ok(Ok(log)) => log,
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => StepLog::Unavailable(format!(
            "pod {pod} not found: it was deleted before its log was read"
        )),
        Ok(Err(kube::Error::Api(status))) if status.code != 429 && status.code < 500 => {
            StepLog::Unavailable(format!(
                "the API server refused the log of {pod}/{}: {}",
                at.container, status.message
            ))
        }
        Ok(Err(source)) => {
            return Err(Error::ReadLog {
                pod: pod.to_owned(),
                container: at.container.to_owned(),
                source,
            });
        }
        Err(_) => StepLog::Unavailable(format!(
            "reading the log of {pod}/{} took longer than {}s",
            at.container,
            LOG_READ_TIMEOUT.as_secs()
        )),
    })
}

/// Keeps the last `limit` bytes seen (plus one, to know a cut happened),
/// compacting at most every `limit` bytes so pushing stays linear.
struct TailBuffer {
    limit: usize,
    bytes: Vec<u8>,
    total: usize,
}

impl TailBuffer {
    fn new(limit: usize) -> Self {
        TailBuffer {
            limit,
            bytes: Vec::new(),
            total: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len();
        self.bytes.extend_from_slice(chunk);
        let keep = self.limit + 1;
        if self.bytes.len() > 2 * keep {
            let cut = self.bytes.len() - keep;
            self.bytes.drain(..cut);
        }
    }

    fn into_log(self) -> StepLog {
        let keep = self.limit + 1;
        let start = self.bytes.len().saturating_sub(keep);
        match cap_log(&self.bytes[start..], self.limit) {
            StepLog::Read { text, truncated } => StepLog::Read {
                text,
                truncated: truncated || self.total > self.limit,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_the_end_of_a_long_stream() {
        let mut tail = TailBuffer::new(10);
        for i in 0..1000 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        assert!(tail.bytes.len() <= 2 * 11);
        assert_eq!(
            tail.into_log(),
            StepLog::Read {
                text: "\nline 999\n".into(),
                truncated: true
            }
        );
    }

    #[test]
    fn tail_buffer_leaves_short_logs_whole() {
        let mut tail = TailBuffer::new(10);
        tail.push(b"hi\n");
        tail.push(b"there");
        assert_eq!(
            tail.into_log(),
            StepLog::Read {
                text: "hi\nthere".into(),
                truncated: false
            }
        );
    }
}
