//! `tekton-step-observer display`: a CloudEvents HTTP receiver that prints
//! every event it gets, like Knative's `event_display`.
//!
//! It accepts binary and structured content modes, checks each event
//! against the CloudEvents spec (400 with the reason otherwise) and prints
//! it either as a readable block (`pretty`) or as exactly one JSON line
//! (`json`, for tests and scripts). A fault mode answers every event with a
//! chosen status, so tests can watch the observer retry.
//!
//! With `--format json` stdout carries only event lines: the process's logs
//! must go to stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::SecondsFormat;
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Data, Event};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::Error;

/// Default listen address: loopback, since the receiver is a debugging and
/// test tool; in a cluster pass `--listen 0.0.0.0:8080`.
pub const DEFAULT_LISTEN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

/// Default request body limit: events carry step logs, which can be large;
/// 16 MiB holds any sane log excerpt and still bounds memory per request.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The content type of a structured-mode event.
const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The content type of a batch of events, which this receiver refuses.
const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// How events are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DisplayFormat {
    /// A readable block per event: attributes, extensions, data.
    #[default]
    Pretty,
    /// Exactly one JSON object per line, see [`render_json`].
    Json,
}

/// Settings of the receiver; the CLI fills them from flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisplaySettings {
    /// Where to listen. Default [`DEFAULT_LISTEN_ADDR`].
    pub listen: SocketAddr,
    /// Output format. Default [`DisplayFormat::Pretty`].
    pub format: DisplayFormat,
    /// Larger request bodies get 413. Default [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Fault mode: answer every event with this status (200..=599) instead
    /// of 202, without printing it. Default `None`.
    pub respond_status: Option<u16>,
    /// With `respond_status`, also send `Retry-After: <secs>`. Default
    /// `None`.
    pub retry_after_secs: Option<u64>,
}

impl Default for DisplaySettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN_ADDR,
            format: DisplayFormat::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            respond_status: None,
            retry_after_secs: None,
        }
    }
}

impl DisplaySettings {
    /// Checks values a flag parser cannot: the fault status must be a final
    /// HTTP status.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(status) = self.respond_status {
            fault_status(status)?;
        }
        if self.retry_after_secs.is_some() && self.respond_status.is_none() {
            return Err(Error::InvalidSetting {
                setting: "--retry-after-secs",
                reason: "only meaningful with --respond-status".to_owned(),
            });
        }
        Ok(())
    }
}

/// The fault status as a `StatusCode`, if it is a final status.
fn fault_status(status: u16) -> Result<StatusCode, Error> {
    StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| Error::InvalidSetting {
            setting: "--respond-status",
            reason: format!("{status} is not an HTTP status in 200..=599"),
        })
}

/// Where rendered events go.
#[derive(Clone, Debug)]
pub enum Output {
    /// Standard output, flushed after every event.
    Stdout,
    /// A channel receiving each rendered event (a JSON line or a pretty
    /// block, with its trailing newline): for tests embedding the receiver.
    Channel(mpsc::Sender<String>),
}

impl Output {
    /// Writes one rendered event.
    async fn emit(&self, text: String) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                // One locked write per event so concurrent requests never
                // interleave; flushed so `kubectl logs` and pipes see each
                // event at once.
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()
            }
            Output::Channel(sender) => sender
                .send(text)
                .await
                .map_err(|_| std::io::Error::other("the event channel is closed")),
        }
    }
}

/// Shared handler state.
#[derive(Debug)]
struct AppState {
    format: DisplayFormat,
    /// Fault mode's status, or `None` for normal operation.
    fault: Option<StatusCode>,
    retry_after_secs: Option<u64>,
    output: Output,
}

/// The receiver's routes: `POST /` takes events, `GET /healthz` answers 200.
/// Callers should [`DisplaySettings::validate`] first; an invalid fault
/// status here makes every event get 500.
pub fn router(settings: &DisplaySettings, output: Output) -> Router {
    let fault = settings
        .respond_status
        .map(|status| fault_status(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    let state = Arc::new(AppState {
        format: settings.format,
        fault,
        retry_after_secs: settings.retry_after_secs,
        output,
    });
    Router::new()
        .route("/", post(receive))
        .route("/healthz", get(healthz))
        // The `Bytes` extractor honours this limit and answers 413; the
        // SDK's own axum `Event` extractor reads unbounded bodies, hence
        // `Bytes` + the SDK's HTTP binding in `receive`.
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .with_state(state)
}

/// Serves the receiver, printing to stdout, until `shutdown` completes.
pub async fn serve(
    settings: DisplaySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_with_output(settings, Output::Stdout, shutdown).await
}

/// Like [`serve`], with the output chosen by the caller.
pub async fn serve_with_output(
    settings: DisplaySettings,
    output: Output,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    settings.validate()?;
    let serve_error = |source| Error::Serve {
        addr: settings.listen.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(serve_error)?;
    let addr = listener.local_addr().map_err(serve_error)?;
    tracing::info!(
        %addr,
        format = ?settings.format,
        respond_status = ?settings.respond_status,
        "receiving CloudEvents"
    );
    axum::serve(listener, router(&settings, output))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(serve_error)
}

/// Liveness and readiness.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Takes one event: decode, validate, print (unless faulting), answer.
async fn receive(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let event = match decode(&headers, body) {
        Ok(event) => event,
        Err(message) => {
            tracing::warn!(%message, "refused a request that is not a valid CloudEvent");
            return (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response();
        }
    };
    if let Some(status) = state.fault {
        tracing::info!(id = event.id(), %status, "fault mode: refusing event");
        let mut response = (status, "fault mode\n").into_response();
        if let Some(secs) = state.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }
    let text = match state.format {
        DisplayFormat::Pretty => render_pretty(&event),
        DisplayFormat::Json => render_json(&event),
    };
    if let Err(error) = state.output.emit(text).await {
        tracing::error!(%error, id = event.id(), "writing the event failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "writing the event failed\n",
        )
            .into_response();
    }
    StatusCode::ACCEPTED.into_response()
}

/// Decodes and validates an event in either content mode; the error is a
/// message for the sender.
fn decode(headers: &HeaderMap, body: Bytes) -> Result<Event, String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with(BATCH_CONTENT_TYPE) {
        return Err("batched content mode is not supported: send one event per request".into());
    }
    if !content_type.starts_with(STRUCTURED_CONTENT_TYPE) && !headers.contains_key("ce-specversion")
    {
        return Err(format!(
            "not a CloudEvent: expected a ce-specversion header (binary mode) or content \
             type {STRUCTURED_CONTENT_TYPE} (structured mode)"
        ));
    }
    let event = cloudevents::binding::http::to_event(headers, body.to_vec())
        .map_err(|e| format!("invalid CloudEvent: {e}"))?;
    validate(&event)?;
    Ok(event)
}

/// Checks what the spec requires beyond what the SDK enforces: non-empty
/// `id`, `source` and `type`, and extension names of lowercase letters and
/// digits only.
pub fn validate(event: &Event) -> Result<(), String> {
    for (name, value) in [
        ("id", event.id()),
        ("source", event.source().as_str()),
        ("type", event.ty()),
    ] {
        if value.is_empty() {
            return Err(format!(
                "invalid CloudEvent: attribute {name} must not be empty"
            ));
        }
    }
    for (name, _) in event.iter_extensions() {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            return Err(format!(
                "invalid CloudEvent: extension name {name:?} must be lowercase letters and digits"
            ));
        }
    }
    Ok(())
}

/// An event's data, made printable.
#[derive(Debug, PartialEq)]
enum PrintableData {
    /// No data.
    None,
    /// JSON data, or binary data declared JSON that parses as JSON.
    Json(serde_json::Value),
    /// Text data.
    Text(String),
    /// Binary data that is not UTF-8, base64-encoded.
    Base64(String),
}

/// Whether a content type denotes JSON, the way the SDK decides it, but
/// ignoring parameters (`application/vnd.x+json; charset=utf-8`).
fn is_json_content_type(content_type: &str) -> bool {
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media_type == "application/json" || media_type == "text/json" || media_type.ends_with("+json")
}

fn printable_data(event: &Event) -> PrintableData {
    match event.data() {
        None => PrintableData::None,
        Some(Data::Json(value)) => PrintableData::Json(value.clone()),
        Some(Data::String(text)) => PrintableData::Text(text.clone()),
        Some(Data::Binary(bytes)) => {
            // Binary mode delivers every body as bytes; show JSON as JSON.
            if event.datacontenttype().is_some_and(is_json_content_type)
                && let Ok(value) = serde_json::from_slice(bytes)
            {
                return PrintableData::Json(value);
            }
            match std::str::from_utf8(bytes) {
                Ok(text) => PrintableData::Text(text.to_owned()),
                // The SDK's own structured serialisation carries the base64.
                Err(_) => PrintableData::Base64(
                    serde_json::to_value(event)
                        .ok()
                        .and_then(|v| {
                            v.get("data_base64")
                                .and_then(|b| b.as_str().map(str::to_owned))
                        })
                        .unwrap_or_default(),
                ),
            }
        }
    }
}

/// One JSON line: every attribute (absent ones as `null`), the extensions
/// as an object, and the data as JSON or string (`data_base64` instead for
/// non-UTF-8 binary data).
#[derive(Serialize)]
struct JsonLine<'a> {
    specversion: String,
    id: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    source: &'a str,
    subject: Option<&'a str>,
    time: Option<String>,
    datacontenttype: Option<&'a str>,
    dataschema: Option<&'a str>,
    extensions: BTreeMap<&'a str, &'a ExtensionValue>,
    data: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

/// Renders `event` as exactly one line of JSON, newline included:
/// `{"specversion", "id", "type", "source", "subject", "time",
/// "datacontenttype", "dataschema", "extensions": {...}, "data": ...}`.
pub fn render_json(event: &Event) -> String {
    let (data, data_base64) = match printable_data(event) {
        PrintableData::None => (serde_json::Value::Null, None),
        PrintableData::Json(value) => (value, None),
        PrintableData::Text(text) => (serde_json::Value::String(text), None),
        PrintableData::Base64(encoded) => (serde_json::Value::Null, Some(encoded)),
    };
    let line = JsonLine {
        specversion: event.specversion().to_string(),
        id: event.id(),
        ty: event.ty(),
        source: event.source(),
        subject: event.subject(),
        time: event.time().map(rfc3339),
        datacontenttype: event.datacontenttype(),
        dataschema: event.dataschema().map(url::Url::as_str),
        extensions: event.iter_extensions().collect(),
        data,
        data_base64,
    };
    // Serialising strings, maps and JSON values cannot fail; should it ever,
    // the line still says so instead of vanishing.
    let mut text = serde_json::to_string(&line)
        .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}).to_string());
    text.push('\n');
    text
}

/// Renders `event` as a readable block, in the layout of the Go SDK's
/// `Event.String()` that Knative's `event_display` prints.
pub fn render_pretty(event: &Event) -> String {
    let mut out = String::from("☁️  cloudevents.Event\nContext Attributes,\n");
    let mut line = |name: &str, value: &str| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {name}: {value}");
    };
    line("specversion", event.specversion().as_str());
    line("type", event.ty());
    line("source", event.source());
    line("id", event.id());
    if let Some(subject) = event.subject() {
        line("subject", subject);
    }
    if let Some(time) = event.time() {
        line("time", &rfc3339(time));
    }
    if let Some(schema) = event.dataschema() {
        line("dataschema", schema.as_str());
    }
    if let Some(content_type) = event.datacontenttype() {
        line("datacontenttype", content_type);
    }
    let extensions: BTreeMap<&str, &ExtensionValue> = event.iter_extensions().collect();
    if !extensions.is_empty() {
        out.push_str("Extensions,\n");
        for (name, value) in extensions {
            let _ = writeln!(out, "  {name}: {value}");
        }
    }
    let data = match printable_data(event) {
        PrintableData::None => None,
        PrintableData::Json(value) => {
            Some(serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string()))
        }
        PrintableData::Text(text) => Some(text),
        PrintableData::Base64(encoded) => Some(format!("(base64) {encoded}")),
    };
    if let Some(data) = data {
        out.push_str("Data,\n");
        for data_line in data.lines() {
            let _ = writeln!(out, "  {data_line}");
        }
    }
    out
}

/// RFC 3339 in UTC with `Z`, as CloudEvents writes `time`.
fn rfc3339(time: &chrono::DateTime<chrono::Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use cloudevents::{EventBuilder, EventBuilderV10};
    use tower::ServiceExt;

    /// Room for every event a test sends.
    const TEST_CHANNEL_CAPACITY: usize = 16;

    fn app(settings: DisplaySettings) -> (Router, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(TEST_CHANNEL_CAPACITY);
        (router(&settings, Output::Channel(tx)), rx)
    }

    fn json_settings() -> DisplaySettings {
        DisplaySettings {
            format: DisplayFormat::Json,
            ..DisplaySettings::default()
        }
    }

    async fn body_text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn binary_request() -> axum::http::request::Builder {
        Request::post("/")
            .header("ce-specversion", "1.0")
            .header("ce-id", "run-1/build/started")
            .header("ce-type", "dev.tekton.step.started")
            .header(
                "ce-source",
                "/apis/tekton.dev/v1/namespaces/ns/taskruns/run-1",
            )
            .header("ce-subject", "build")
            .header("ce-time", "2024-05-01T10:00:00Z")
            .header("ce-taskrun", "run-1")
            .header("content-type", "application/json")
    }

    #[tokio::test]
    async fn binary_mode_event_becomes_one_json_line() {
        let (app, mut rx) = app(json_settings());
        let request = binary_request()
            .body(Body::from(r#"{"step":"build","log":"hello"}"#))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let line = rx.recv().await.unwrap();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "exactly one line");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "specversion": "1.0",
                "id": "run-1/build/started",
                "type": "dev.tekton.step.started",
                "source": "/apis/tekton.dev/v1/namespaces/ns/taskruns/run-1",
                "subject": "build",
                "time": "2024-05-01T10:00:00Z",
                "datacontenttype": "application/json",
                "dataschema": null,
                "extensions": {"taskrun": "run-1"},
                "data": {"step": "build", "log": "hello"},
            })
        );
    }

    #[tokio::test]
    async fn structured_mode_event_becomes_one_json_line() {
        let (app, mut rx) = app(json_settings());
        let body = serde_json::json!({
            "specversion": "1.0",
            "id": "e-2",
            "type": "dev.tekton.step.succeeded",
            "source": "urn:test",
            "datacontenttype": "text/plain",
            "dataschema": "https://example.com/schema",
            "attempt": 3,
            "retried": true,
            "data": "plain text",
        });
        let request = Request::post("/")
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let json: serde_json::Value = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "specversion": "1.0",
                "id": "e-2",
                "type": "dev.tekton.step.succeeded",
                "source": "urn:test",
                "subject": null,
                "time": null,
                "datacontenttype": "text/plain",
                "dataschema": "https://example.com/schema",
                "extensions": {"attempt": 3, "retried": true},
                "data": "plain text",
            })
        );
    }

    #[tokio::test]
    async fn missing_type_is_a_bad_request() {
        let (app, mut rx) = app(json_settings());
        let request = Request::post("/")
            .header("ce-specversion", "1.0")
            .header("ce-id", "1")
            .header("ce-source", "urn:test")
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let message = body_text(response).await;
        assert!(message.contains("type"), "{message}");
        assert!(rx.try_recv().is_err(), "nothing printed");
    }

    #[tokio::test]
    async fn invalid_requests_are_bad_requests() {
        let cases: Vec<(Request<Body>, &str)> = vec![
            (
                Request::post("/").body(Body::from("hello")).unwrap(),
                "not a CloudEvent",
            ),
            (
                binary_request()
                    .header("ce-id", "")
                    .body(Body::empty())
                    .unwrap(),
                "id must not be empty",
            ),
            (
                binary_request()
                    .header("ce-bad_name", "x")
                    .body(Body::empty())
                    .unwrap(),
                "extension name",
            ),
            (
                Request::post("/")
                    .header("ce-specversion", "9.9")
                    .header("ce-id", "1")
                    .header("ce-type", "t")
                    .header("ce-source", "s")
                    .body(Body::empty())
                    .unwrap(),
                "invalid CloudEvent",
            ),
            (
                Request::post("/")
                    .header("content-type", "application/cloudevents+json")
                    .body(Body::from(r#"{"specversion":"1.0","id":"1","source":"s"}"#))
                    .unwrap(),
                "invalid CloudEvent",
            ),
            (
                Request::post("/")
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(Body::from("[]"))
                    .unwrap(),
                "batched",
            ),
        ];
        for (request, want) in cases {
            let (app, _rx) = app(json_settings());
            let response = app.oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{want}");
            let message = body_text(response).await;
            assert!(message.contains(want), "want {want:?} in {message:?}");
        }
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let (app, _rx) = app(DisplaySettings {
            max_body_bytes: 1024,
            ..json_settings()
        });
        let request = binary_request().body(Body::from(vec![b'x'; 2048])).unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn fault_mode_answers_the_status_with_retry_after() {
        let (app, mut rx) = app(DisplaySettings {
            respond_status: Some(503),
            retry_after_secs: Some(2),
            ..json_settings()
        });
        let response = app
            .oneshot(binary_request().body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert!(rx.try_recv().is_err(), "a refused event is not printed");
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let (app, _rx) = app(DisplaySettings::default());
        let response = app
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn settings_validation() {
        let ok = DisplaySettings {
            respond_status: Some(503),
            retry_after_secs: Some(1),
            ..DisplaySettings::default()
        };
        assert!(ok.validate().is_ok());
        for status in [0, 99, 101, 600, 1000] {
            let bad = DisplaySettings {
                respond_status: Some(status),
                ..DisplaySettings::default()
            };
            assert!(bad.validate().is_err(), "{status}");
        }
        let orphan = DisplaySettings {
            retry_after_secs: Some(1),
            ..DisplaySettings::default()
        };
        assert!(orphan.validate().is_err());
    }

    #[test]
    fn pretty_block_shows_attributes_extensions_and_data() {
        let event = EventBuilderV10::new()
            .id("e-1")
            .ty("dev.tekton.step.started")
            .source("urn:test")
            .subject("build")
            .extension("taskrun", "run-1")
            .extension("attempt", 2i64)
            .data("application/json", serde_json::json!({"a": [1, 2]}))
            .build()
            .unwrap();
        let text = render_pretty(&event);
        let want = [
            "☁️  cloudevents.Event",
            "Context Attributes,",
            "  specversion: 1.0",
            "  type: dev.tekton.step.started",
            "  source: urn:test",
            "  id: e-1",
            "  subject: build",
            "  datacontenttype: application/json",
            "Extensions,",
            "  attempt: 2",
            "  taskrun: run-1",
            "Data,",
            "  {",
            "    \"a\": [",
            "      1,",
            "      2",
            "    ]",
            "  }",
            "",
        ]
        .join("\n");
        assert_eq!(text, want);
    }

    #[test]
    fn binary_data_that_is_not_utf8_is_base64() {
        let mut event = EventBuilderV10::new()
            .id("e")
            .ty("t")
            .source("s")
            .build()
            .unwrap();
        event.set_data("application/octet-stream", vec![0xff_u8, 0x00, 0x41]);
        let json: serde_json::Value = serde_json::from_str(&render_json(&event)).unwrap();
        assert_eq!(json["data"], serde_json::Value::Null);
        assert_eq!(json["data_base64"], "/wBB");
        assert!(render_pretty(&event).contains("(base64) /wBB"));
    }

    #[test]
    fn json_content_types() {
        for yes in [
            "application/json",
            "application/json; charset=utf-8",
            "text/json",
            "application/vnd.tekton+json; v=1",
            "Application/JSON",
        ] {
            assert!(is_json_content_type(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/jsonl",
            "application/octet-stream",
            "",
        ] {
            assert!(!is_json_content_type(no), "{no}");
        }
    }

    #[tokio::test]
    async fn serve_listens_until_shutdown() {
        // Find a free port, then serve on it.
        let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        let (tx, mut rx) = mpsc::channel(TEST_CHANNEL_CAPACITY);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let settings = DisplaySettings {
            listen,
            ..json_settings()
        };
        let server = tokio::spawn(serve_with_output(settings, Output::Channel(tx), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let url = format!("http://{listen}/");
        let mut response = None;
        // The server binds asynchronously; retry briefly until it does.
        for _ in 0..50 {
            if let Ok(r) = client
                .post(&url)
                .header("ce-specversion", "1.0")
                .header("ce-id", "1")
                .header("ce-type", "t")
                .header("ce-source", "s")
                .send()
                .await
            {
                response = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(response.unwrap().status(), reqwest::StatusCode::ACCEPTED);
        let json: serde_json::Value = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(json["id"], "1");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
