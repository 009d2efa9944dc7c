//! The one error type of the library. Each variant names the operation that
//! failed, and knows whether trying again can help.

use std::time::Duration;

/// Everything that can go wrong inside the observer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TaskRun lacks a field the observer cannot do without.
    #[error("TaskRun {object} is missing {field}")]
    MissingField {
        /// `namespace/name` of the object.
        object: String,
        /// The missing field's path.
        field: &'static str,
    },

    /// Reading or writing the ledger annotation's JSON failed.
    #[error("ledger annotation is not valid: {0}")]
    MalformedLedger(#[source] serde_json::Error),

    /// Building a CloudEvent from a transition failed.
    #[error("building the CloudEvent failed: {0}")]
    BuildEvent(String),

    /// The OTLP endpoint did not take a batch of step spans.
    #[error("exporting step spans failed: {0}")]
    SpanExport(String),

    /// The sink URL is missing or not an absolute http(s) URL.
    #[error("sink URL {url:?} is not valid: {reason}")]
    InvalidSink {
        /// What was configured.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// A setting (flag) has a value the program cannot work with.
    #[error("setting {setting} is not valid: {reason}")]
    InvalidSetting {
        /// The setting's flag name.
        setting: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A sink credential (CA, client certificate, token, signing secret)
    /// cannot be read or used.
    #[error("sink credential {what} is not usable: {reason}")]
    SinkCredentials {
        /// Which one: its flag and path, or its ConfigMap key.
        what: String,
        /// Why.
        reason: String,
    },

    /// The HTTP client could not be built.
    #[error("building the HTTP client failed: {0}")]
    HttpClient(#[source] reqwest::Error),

    /// Sending an event failed in a way that may pass (connection refused,
    /// timeout, 5xx, 429, ...).
    #[error("sending event {event_id} failed, will retry: {reason}")]
    SendEvent {
        /// The event's id.
        event_id: String,
        /// What happened.
        reason: String,
        /// How long the sink asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },

    /// The sink refused an event for good (a 4xx other than 404/408/409/429,
    /// or a 3xx): sending the same bytes again cannot succeed.
    #[error("sink rejected event {event_id} with HTTP {status}: {body}")]
    RejectEvent {
        /// The event's id.
        event_id: String,
        /// The HTTP status the sink answered.
        status: u16,
        /// The start of the sink's answer, for the operator.
        body: String,
    },

    /// Patching the ledger annotation onto the TaskRun failed.
    #[error("patching the ledger of TaskRun {object} failed: {source}")]
    PatchLedger {
        /// `namespace/name` of the TaskRun.
        object: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Reading a step container's log failed.
    #[error("reading the log of {pod}/{container} failed: {source}")]
    ReadLog {
        /// Pod name.
        pod: String,
        /// Container name.
        container: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Any other Kubernetes API call failed.
    #[error("Kubernetes API call {operation} failed: {source}")]
    Kube {
        /// What was being done.
        operation: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// A command-line argument is not usable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Serving HTTP (metrics, probes, the display receiver) failed.
    #[error("serving HTTP on {addr} failed: {source}")]
    Serve {
        /// The listen address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the same operation may succeed later without anyone changing
    /// anything. The controller requeues transient errors with backoff and
    /// reports permanent ones.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::SendEvent { .. } | Error::ReadLog { .. } | Error::SpanExport(_) => true,
            Error::PatchLedger { source, .. } | Error::Kube { source, .. } => {
                kube_error_is_transient(source)
            }
            Error::MissingField { .. }
            | Error::MalformedLedger(_)
            | Error::BuildEvent(_)
            | Error::InvalidSink { .. }
            | Error::RejectEvent { .. }
            | Error::InvalidSetting { .. }
            | Error::HttpClient(_)
            | Error::SinkCredentials { .. }
            | Error::InvalidArgument(_)
            | Error::Serve { .. } => false,
        }
    }

    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::MissingField { .. } => "missing_field",
            Error::MalformedLedger(_) => "malformed_ledger",
            Error::BuildEvent(_) => "build_event",
            Error::SpanExport(_) => "span_export",
            Error::InvalidSink { .. } => "invalid_sink",
            Error::InvalidSetting { .. } => "invalid_setting",
            Error::HttpClient(_) => "http_client",
            Error::SinkCredentials { .. } => "sink_credentials",
            Error::SendEvent { .. } => "send_event",
            Error::RejectEvent { .. } => "reject_event",
            Error::PatchLedger { .. } => "patch_ledger",
            Error::ReadLog { .. } => "read_log",
            Error::Kube { .. } => "kube",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Serve { .. } => "serve",
        }
    }
}

/// API errors worth retrying: conflicts, throttling, server-side failures and
/// transport errors. 4xx other than these mean the request itself is wrong.
fn kube_error_is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => matches!(status.code, 409 | 429) || status.code >= 500,
        _ => true,
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
