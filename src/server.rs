//! The HTTP endpoints for Prometheus and the kubelet: `/metrics`,
//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! Readiness means "this replica could send events now": the TaskRun watch
//! has listed everything once and a valid sink is configured. It does not
//! depend on holding the leader lease, so that a standby counts as available
//! and rolling updates go on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The media type Prometheus asks for first; [`Metrics::encode`] writes it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Media type of the probes' human-readable bodies.
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Where a sink URL can come from, in the order the observer looks.
const SINK_HINT: &str =
    "set --sink, config-events 'sink' or config-defaults 'default-cloud-events-sink'";

/// What the controller currently knows about the sink.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SinkState {
    /// No source names a sink.
    #[default]
    NotConfigured,
    /// A sink is named, but its URL was refused.
    Invalid {
        /// Why (e.g. "not an absolute http(s) URL").
        reason: String,
    },
    /// A valid sink URL is configured.
    Configured,
}

#[derive(Debug)]
struct ReadinessInner {
    live: AtomicBool,
    watch_synced: AtomicBool,
    sink: RwLock<SinkState>,
    /// Why the sink refuses our credentials (401/403), while it does.
    sink_refusal: RwLock<Option<String>>,
    /// The TLS error of the handshake with the sink, while it fails.
    sink_tls_failure: RwLock<Option<String>>,
    /// Why the sink credentials as they are now cannot be used.
    credentials_problem: RwLock<Option<String>>,
}

/// State behind `/healthz` and `/readyz`, shared between the controller (which
/// updates it) and the server. Cloning is cheap (one `Arc`).
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Live, but not ready: the watch has not synced and no sink is known.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ReadinessInner {
                live: AtomicBool::new(true),
                watch_synced: AtomicBool::new(false),
                sink: RwLock::new(SinkState::NotConfigured),
                sink_refusal: RwLock::new(None),
                sink_tls_failure: RwLock::new(None),
                credentials_problem: RwLock::new(None),
            }),
        }
    }

    /// Whether the TaskRun watch has listed all TaskRuns once (set it back to
    /// false when the watch has to start over).
    pub fn set_watch_synced(&self, synced: bool) {
        self.inner.watch_synced.store(synced, Ordering::Release);
    }

    /// What is known about the sink now.
    pub fn set_sink(&self, state: SinkState) {
        // A panic while holding the lock cannot leave a half-written enum
        // behind that matters here, so a poisoned lock is used as is.
        *self
            .inner
            .sink
            .write()
            .unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// The sink refuses our credentials (401/403), or accepts them again
    /// (`None`): events are held meanwhile, and `/readyz` says so.
    pub fn set_sink_refusal(&self, refusal: Option<String>) {
        replace_if_changed(&self.inner.sink_refusal, refusal);
    }

    /// The TLS handshake with the sink fails with this error, or works again
    /// (`None`): events are held meanwhile, and `/readyz` says so.
    pub fn set_sink_tls_failure(&self, failure: Option<String>) {
        replace_if_changed(&self.inner.sink_tls_failure, failure);
    }

    /// The sink credentials as they are now cannot be used (the previous
    /// ones stay in use), or can again (`None`).
    pub fn set_credentials_problem(&self, problem: Option<String>) {
        replace_if_changed(&self.inner.credentials_problem, problem);
    }

    /// Set to false when one of the process's main loops has ended for good,
    /// so that the kubelet restarts the container.
    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, Ordering::Release);
    }

    /// Whether the main loops still run.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// `Ok` with notes when ready (things a user should know that do not
    /// keep the observer from doing its job), else one line per missing
    /// condition, notes included.
    ///
    /// NB: no sink at all is a note, not a failure: a fresh install on a
    /// cluster where Tekton has no sink yet must not stall its rollout; the
    /// events wait for a sink to appear.
    pub fn check(&self) -> std::result::Result<Vec<String>, Vec<String>> {
        let mut missing = Vec::new();
        let mut notes = Vec::new();
        if !self.inner.watch_synced.load(Ordering::Acquire) {
            missing.push("taskrun watch: not synced yet".to_owned());
        }
        match &*self
            .inner
            .sink
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            SinkState::Configured => {}
            SinkState::NotConfigured => {
                notes.push(format!(
                    "sink: not configured; events are held until one is ({SINK_HINT})"
                ));
            }
            SinkState::Invalid { reason } => {
                missing.push(format!("sink: invalid: {reason} ({SINK_HINT})"));
            }
        }
        if let Some(refusal) = &*self
            .inner
            .sink_refusal
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            notes.push(format!(
                "sink: refuses our credentials ({refusal}); events are held and retried"
            ));
        }
        if let Some(failure) = &*self
            .inner
            .sink_tls_failure
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            notes.push(format!(
                "sink: TLS handshake fails ({failure}); events are held and retried (trust its CA with --sink-ca-file or key sink.CACerts of config-events)"
            ));
        }
        if let Some(problem) = &*self
            .inner
            .credentials_problem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            notes.push(format!(
                "sink credentials: {problem}; the previous ones stay in use"
            ));
        }
        if missing.is_empty() {
            Ok(notes)
        } else {
            missing.extend(notes);
            Err(missing)
        }
    }
}

/// Called for every delivered event: take the write lock only when
/// something changes.
fn replace_if_changed(slot: &RwLock<Option<String>>, value: Option<String>) {
    let unchanged = *slot.read().unwrap_or_else(PoisonError::into_inner) == value;
    if !unchanged {
        *slot.write().unwrap_or_else(PoisonError::into_inner) = value;
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The routes, without a listener (tests drive it directly).
pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(AppState { metrics, readiness })
}

/// Serves [`router`] on `addr` until `shutdown` completes, then finishes the
/// requests in flight and returns.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let serve_error = |source| Error::Serve {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(serve_error)?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(serve_error)
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(error) => {
            tracing::error!(%error, "encoding metrics failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n".to_owned(),
            )
        }
    }
}

async fn healthz_handler(State(state): State<AppState>) -> Response {
    if state.readiness.is_live() {
        text(StatusCode::OK, "ok\n".to_owned())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "a main loop has stopped\n".to_owned(),
        )
    }
}

async fn readyz_handler(State(state): State<AppState>) -> Response {
    match state.readiness.check() {
        Ok(notes) => {
            let mut body = String::from("ok\n");
            for note in notes {
                body.push_str(&note);
                body.push('\n');
            }
            text(StatusCode::OK, body)
        }
        Err(missing) => {
            let mut body = missing.join("\n");
            body.push('\n');
            text(StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step_event::StepEventKind;
    use axum::body::Body;
    use axum::http::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    /// Large enough for any body these endpoints write.
    const BODY_LIMIT: usize = 1 << 20;

    async fn get(router: Router, path: &str) -> (StatusCode, String, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), BODY_LIMIT)
            .await
            .unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn metrics_are_openmetrics() {
        let metrics = Metrics::new();
        metrics.record_delivered(StepEventKind::Succeeded, Duration::from_millis(40));
        let (status, content_type, body) = get(router(metrics, Readiness::new()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.contains(
            r#"tekton_step_observer_events_total{type="succeeded",outcome="delivered"} 1"#
        ));
        assert!(body.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn healthz_follows_liveness() {
        let readiness = Readiness::new();
        let app = router(Metrics::new(), readiness.clone());
        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
        readiness.set_live(false);
        assert_eq!(
            get(app, "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn readyz_names_what_is_missing() {
        let readiness = Readiness::new();
        let app = router(Metrics::new(), readiness.clone());

        let (status, content_type, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type, TEXT_CONTENT_TYPE);
        assert!(body.contains("taskrun watch: not synced yet"), "{body}");
        let no_sink = "sink: not configured; events are held until one is (set --sink, \
                       config-events 'sink' or config-defaults 'default-cloud-events-sink')";
        assert!(body.contains(no_sink), "{body}");

        // No sink does not keep a fresh install from becoming ready.
        readiness.set_watch_synced(true);
        let (status, _, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("ok\n") && body.contains(no_sink), "{body}");
        readiness.set_sink(SinkState::Invalid {
            reason: "not an absolute http(s) URL".to_owned(),
        });
        let (status, _, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!body.contains("taskrun watch"), "{body}");
        assert!(
            body.contains("sink: invalid: not an absolute http(s) URL"),
            "{body}"
        );

        readiness.set_sink(SinkState::Configured);
        assert_eq!(
            get(app.clone(), "/readyz").await,
            (
                StatusCode::OK,
                TEXT_CONTENT_TYPE.to_owned(),
                "ok\n".to_owned()
            )
        );

        readiness.set_sink_refusal(Some("HTTP 401".to_owned()));
        let (status, _, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("sink: refuses our credentials (HTTP 401); events are held and retried"),
            "{body}"
        );
        readiness.set_sink_refusal(None);

        readiness.set_watch_synced(false);
        assert_eq!(get(app, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn unknown_path_is_not_found() {
        let app = router(Metrics::new(), Readiness::new());
        assert_eq!(get(app, "/nope").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn serve_reports_a_taken_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let result = serve(addr, Metrics::new(), Readiness::new(), async {}).await;
        assert!(matches!(result, Err(Error::Serve { .. })), "{result:?}");
    }

    #[tokio::test]
    async fn serve_answers_and_stops_on_shutdown() {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(addr, Metrics::new(), Readiness::new(), async {
            let _ = stopped.await;
        }));
        // The server binds asynchronously; poll briefly until it answers.
        let mut answered = false;
        for _ in 0..50 {
            if let Ok(response) = reqwest::get(format!("http://{addr}/healthz")).await {
                assert_eq!(response.status().as_u16(), 200);
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "server never answered on {addr}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
