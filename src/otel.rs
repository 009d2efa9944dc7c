//! Exports step spans with OTLP over HTTP (`opentelemetry-otlp`), set up by
//! the standard `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers,
//! timeout, compression) and `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`.
//! Nothing is exported unless an endpoint variable is set.
//!
//! Spans are not recorded through a tracer: a step's span is built from
//! Tekton's own times after the step ended, and exported directly, once,
//! with the export awaited so the ledger can record it (see
//! [`crate::step_span`]).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};

use crate::error::{Error, Result};
use crate::step_span::{SpanOutcome, StepSpan};
use crate::tekton::TaskRunRef;

/// The service name spans carry when `OTEL_SERVICE_NAME` is not set.
pub const SERVICE_NAME: &str = "tekton-step-observer";

/// How long one export may take when `OTEL_EXPORTER_OTLP_*TIMEOUT` is unset
/// (the OpenTelemetry default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the environment asks for spans: an OTLP endpoint is set, the SDK
/// is not disabled and the traces exporter is not `none`.
pub fn tracing_wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let no_exporter =
        var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !disabled
        && !no_exporter
}

/// The export timeout the environment sets (milliseconds, traces first).
fn timeout_from_env(var: impl Fn(&str) -> Option<String>) -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|name| var(name)?.trim().parse::<u64>().ok())
    .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
}

/// Exports step spans; one export at a time, as the SDK's exporters require.
pub struct SpanExport {
    exporter: tokio::sync::Mutex<opentelemetry_otlp::SpanExporter>,
    scope: InstrumentationScope,
    endpoint_hint: String,
}

impl std::fmt::Debug for SpanExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanExport")
            .field("endpoint", &self.endpoint_hint)
            .finish()
    }
}

impl SpanExport {
    /// The exporter the environment configures, or None when it asks for no
    /// spans. A protocol other than `http/protobuf` is an error, not ignored.
    pub fn from_env() -> Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok();
        if !tracing_wanted(var) {
            return Ok(None);
        }
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "http/protobuf".to_owned());
        if protocol.trim() != "http/protobuf" {
            return Err(Error::InvalidArgument(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?} is not supported; spans are exported with http/protobuf"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout_from_env(var))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("OTLP HTTP client: {e}")))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(OtlpHttpClient(client))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("OTLP exporter: {e}")))?;
        let mut resource = Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none_or(|v| v.trim().is_empty()) {
            resource = resource.with_service_name(SERVICE_NAME);
        }
        exporter.set_resource(&resource.build());
        let endpoint_hint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_default();
        Ok(Some(SpanExport {
            exporter: tokio::sync::Mutex::new(exporter),
            scope: InstrumentationScope::builder(SERVICE_NAME)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            endpoint_hint,
        }))
    }

    /// Exports one TaskRun's spans in one request; unsampled ones are left
    /// out (the parent's decision stands) and count as done.
    /// `pod_of` names the pod of an attempt.
    pub async fn export<'a>(
        &self,
        taskrun: &TaskRunRef,
        pod_of: impl Fn(u32) -> Option<&'a str>,
        spans: &[StepSpan],
    ) -> Result<()> {
        let batch: Vec<SpanData> = spans
            .iter()
            .filter(|s| s.context.sampled)
            .map(|s| span_data(taskrun, pod_of(s.attempt), s, &self.scope))
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.exporter
            .lock()
            .await
            .export(batch)
            .await
            .map_err(|e| Error::SpanExport(e.to_string()))
    }
}

/// The OTLP span of a step run: named after the step, from Tekton's start
/// to its end, with the outcome, exit code, termination reason and attempt.
pub fn span_data(
    taskrun: &TaskRunRef,
    pod: Option<&str>,
    span: &StepSpan,
    scope: &InstrumentationScope,
) -> SpanData {
    let mut attributes = vec![
        KeyValue::new("tekton.step.name", span.step_name.clone()),
        KeyValue::new("tekton.step.index", span.step_index as i64),
        KeyValue::new("tekton.step.outcome", span.outcome.as_str()),
        KeyValue::new("tekton.taskrun.attempt", i64::from(span.attempt)),
        KeyValue::new("tekton.taskrun.name", taskrun.name.clone()),
        KeyValue::new("tekton.taskrun.uid", taskrun.uid.clone()),
        KeyValue::new("k8s.namespace.name", taskrun.namespace.clone()),
    ];
    if let Some(code) = span.exit_code {
        attributes.push(KeyValue::new("tekton.step.exit_code", code));
    }
    if let Some(reason) = &span.reason {
        attributes.push(KeyValue::new(
            "tekton.step.termination_reason",
            reason.clone(),
        ));
    }
    if let Some(pod) = pod {
        attributes.push(KeyValue::new("k8s.pod.name", pod.to_owned()));
    }
    if let Some(pipeline_run) = &taskrun.pipeline_run {
        attributes.push(KeyValue::new(
            "tekton.pipelinerun.name",
            pipeline_run.clone(),
        ));
    }
    if let Some(task) = &taskrun.pipeline_task {
        attributes.push(KeyValue::new("tekton.pipelinetask.name", task.clone()));
    }
    let status = match span.outcome {
        SpanOutcome::Succeeded => Status::Ok,
        SpanOutcome::Failed => Status::error(
            span.reason
                .clone()
                .unwrap_or_else(|| "the step failed".to_owned()),
        ),
    };
    let flags = if span.context.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.context.trace_id),
            SpanId::from_bytes(span.context.span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: span
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.parent_span_id.is_some(),
        span_kind: SpanKind::Internal,
        name: format!("step {}", span.step_name).into(),
        start_time: SystemTime::from(span.start),
        end_time: SystemTime::from(span.end),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

/// The OTLP exporter's HTTP client, on the same reqwest (and rustls) as the
/// sink's; opentelemetry-http only ships one for a newer reqwest.
#[derive(Debug)]
struct OtlpHttpClient(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> std::result::Result<http::Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let response = self.0.execute(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let mut out = http::Response::builder().status(status).body(body)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step_span::{TraceParent, step_span_id};
    use opentelemetry::Value;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn spans_are_wanted_only_with_an_endpoint_and_not_disabled() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert!(!tracing_wanted(env(&[])));
        assert!(!tracing_wanted(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        assert!(tracing_wanted(env(&[endpoint])));
        assert!(tracing_wanted(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces"
        )])));
        assert!(!tracing_wanted(env(&[
            endpoint,
            ("OTEL_SDK_DISABLED", "TRUE")
        ])));
        assert!(!tracing_wanted(env(&[
            endpoint,
            ("OTEL_TRACES_EXPORTER", "none")
        ])));
        assert_eq!(timeout_from_env(env(&[])), DEFAULT_TIMEOUT);
        assert_eq!(
            timeout_from_env(env(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "oops")
            ])),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn a_failed_steps_span_carries_why_and_its_parent() {
        let taskrun = crate::testing::taskrun_ref();
        let parent = [7u8; 8];
        let span = StepSpan {
            context: TraceParent {
                trace_id: [1; 16],
                span_id: step_span_id(&taskrun.uid, "compile", 1),
                sampled: true,
            },
            parent_span_id: Some(parent),
            step_name: "compile".into(),
            step_index: 2,
            attempt: 1,
            start: crate::testing::created(),
            end: crate::testing::created() + chrono::TimeDelta::seconds(3),
            outcome: SpanOutcome::Failed,
            exit_code: Some(2),
            reason: Some("Error".into()),
        };
        let data = span_data(
            &taskrun,
            Some("build-42-pod"),
            &span,
            &InstrumentationScope::default(),
        );
        assert_eq!(data.name, "step compile");
        assert_eq!(data.parent_span_id, SpanId::from_bytes(parent));
        assert!(data.parent_span_is_remote);
        assert_eq!(
            data.end_time.duration_since(data.start_time).ok(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(data.status, Status::error("Error"));
        let attribute = |key: &str| {
            data.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(attribute("tekton.step.exit_code"), Some(Value::I64(2)));
        assert_eq!(attribute("tekton.taskrun.attempt"), Some(Value::I64(1)));
        assert_eq!(
            attribute("tekton.step.termination_reason"),
            Some("Error".into())
        );
        assert_eq!(attribute("tekton.step.outcome"), Some("failed".into()));
        assert_eq!(attribute("k8s.pod.name"), Some("build-42-pod".into()));
    }
}
