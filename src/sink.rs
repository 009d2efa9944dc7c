//! Delivery of one CloudEvent to the sink: one HTTP attempt, classified into
//! delivered / retry / rejected, plus the pure policy the controller's retry
//! loop needs (status classification, `Retry-After` parsing, backoff).
//!
//! The retry loop itself lives in the controller: this module never sleeps
//! and never retries, so each attempt is observable (metrics, logs) where the
//! loop is.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudevents::binding::reqwest::RequestBuilderExt;
use cloudevents::{AttributesReader, Event};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

use crate::error::Error;
use crate::signature::{self, Signer};
use crate::sink_credentials::{CredentialFiles, Material};

/// Default for `--sink-timeout`: a healthy sink answers in milliseconds; ten
/// seconds covers a slow broker without holding a worker on a dead one.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to open a TCP (and TLS) connection: far above a same-cluster
/// round trip, short enough that an unroutable sink fails fast.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle pooled connections are closed after this long: below the 60 s idle
/// timeout common to load balancers and HTTP servers, so we close first
/// instead of racing the server's close with a new request.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// TCP keep-alive probes on pooled connections, so a peer that vanished
/// (node gone, NAT entry dropped) is noticed before we write to it.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// How much of a rejecting sink's answer is kept for messages: enough for a
/// typical error sentence, bounded so logs and errors stay small.
pub const MAX_BODY_EXCERPT_BYTES: usize = 512;

/// Response bodies up to this size are read to the end so the connection can
/// go back to the pool; a sink answering more than this to an event is odd,
/// and closing that connection is cheaper than reading on.
pub const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// Upper bound on any `Retry-After` we obey: a sink asking for hours would
/// otherwise park events that long; five minutes keeps delivery moving and
/// still respects any reasonable throttling.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

/// Default first backoff step (`--sink-retry-base`): short enough that a blip
/// costs under a second, long enough not to hammer a restarting sink.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(500);

/// Default backoff ceiling (`--sink-retry-cap`): bounds how stale an event
/// gets behind a sink that has recovered.
pub const DEFAULT_RETRY_CAP: Duration = Duration::from_secs(30);

/// The largest shift a `u128` factor allows; the product saturates and the
/// cap applies long before this many doublings.
const MAX_DOUBLINGS: u32 = 127;

/// Content type of a structured-mode CloudEvent in JSON.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How an event is put on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ContentMode {
    /// Attributes as `ce-*` headers, data as the body: the HTTP binding's
    /// default, what Tekton itself sends.
    #[default]
    Binary,
    /// The whole event as one `application/cloudevents+json` document.
    Structured,
}

impl ContentMode {
    /// The flag value for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentMode::Binary => "binary",
            ContentMode::Structured => "structured",
        }
    }
}

impl fmt::Display for ContentMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the sink client behaves; the CLI fills it from flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkSettings {
    /// Whole-request timeout (`--sink-timeout`), connect to last body byte.
    /// Default [`DEFAULT_SINK_TIMEOUT`].
    pub timeout: Duration,
    /// Time allowed to connect. Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Binary or structured content mode. Default [`ContentMode::Binary`].
    pub content_mode: ContentMode,
    /// Extra CAs, client certificate, token and signing secrets. Default
    /// none: the system's trust store, no credential, no signature.
    pub credentials: CredentialFiles,
}

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_SINK_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            content_mode: ContentMode::default(),
            credentials: CredentialFiles::default(),
        }
    }
}

/// Why an attempt should be retried: the bounded metric label set, owned by
/// the metrics module so the two cannot drift apart.
pub use crate::metrics::RetryReason;

/// What a status code means for delivery; see [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusClass {
    /// The sink took the event.
    Delivered,
    /// Sending again later may work.
    Retry(RetryReason),
    /// Sending the same event again cannot work.
    Rejected,
}

/// The result of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The sink answered 2xx.
    Delivered {
        /// The status it answered.
        status: u16,
    },
    /// Try again after a backoff (see [`retry_delay`]).
    Retry {
        /// Bounded reason, for metrics.
        reason: RetryReason,
        /// What happened, for logs (the status, or the transport error).
        detail: String,
        /// How long the sink asked us to wait (429/503 `Retry-After`),
        /// already capped at [`MAX_RETRY_AFTER`].
        retry_after: Option<Duration>,
        /// The status it answered, if it answered at all.
        status: Option<u16>,
    },
    /// The sink refused the event for good.
    Rejected {
        /// The status it answered.
        status: u16,
        /// The start of its answer, at most [`MAX_BODY_EXCERPT_BYTES`].
        body: String,
    },
    /// The event could not be encoded as an HTTP request (e.g. an extension
    /// value that is not a valid header value); nothing was sent, and
    /// sending again cannot help.
    Unencodable {
        /// Why.
        reason: String,
    },
}

impl DeliveryOutcome {
    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered { .. } => "delivered",
            DeliveryOutcome::Retry { .. } => "retry",
            DeliveryOutcome::Rejected { .. } => "rejected",
            DeliveryOutcome::Unencodable { .. } => "unencodable",
        }
    }

    /// The outcome as the crate's result: the status on delivery, otherwise
    /// [`Error::SendEvent`] (transient), [`Error::RejectEvent`] or
    /// [`Error::BuildEvent`] (permanent).
    pub fn into_result(self, event_id: &str) -> Result<u16, Error> {
        match self {
            DeliveryOutcome::Delivered { status } => Ok(status),
            DeliveryOutcome::Retry {
                reason,
                detail,
                retry_after,
                ..
            } => Err(Error::SendEvent {
                event_id: event_id.to_owned(),
                reason: format!("{}: {detail}", reason.as_str()),
                retry_after,
            }),
            DeliveryOutcome::Rejected { status, body } => Err(Error::RejectEvent {
                event_id: event_id.to_owned(),
                status,
                body,
            }),
            DeliveryOutcome::Unencodable { reason } => Err(Error::BuildEvent(format!(
                "event {event_id} cannot be encoded for HTTP: {reason}"
            ))),
        }
    }
}

/// Sends events to a sink over one pooled HTTP client. Cheap to clone: clones
/// share the connection pool and the credentials, and see a reload at once.
#[derive(Clone, Debug)]
pub struct SinkClient {
    settings: Arc<SinkSettings>,
    current: Arc<RwLock<Loaded>>,
}

/// The client built from one reading of the credentials.
#[derive(Debug)]
struct Loaded {
    material: Material,
    transport: Arc<Transport>,
}

/// What one request needs: the HTTP client (trust, client certificate) and
/// what goes into the headers.
#[derive(Debug)]
struct Transport {
    http: reqwest::Client,
    authorization: Option<HeaderValue>,
    signer: Option<Signer>,
}

impl SinkClient {
    /// Builds the client once, reading the credential files; connections are
    /// kept alive and reused across sends.
    pub fn new(settings: &SinkSettings) -> Result<Self, Error> {
        let material = settings.credentials.read(None)?;
        let transport = Arc::new(build_transport(settings, &material)?);
        Ok(Self {
            settings: Arc::new(settings.clone()),
            current: Arc::new(RwLock::new(Loaded {
                material,
                transport,
            })),
        })
    }

    /// Reads the credential files again, with `config_ca` from Tekton's
    /// ConfigMap, and rebuilds the client if anything changed. `Ok(true)`
    /// when it did; on an error the client in use stays as it was.
    pub fn reload(&self, config_ca: Option<&str>) -> Result<bool, Error> {
        let material = self.settings.credentials.read(config_ca)?;
        if self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .material
            == material
        {
            return Ok(false);
        }
        let transport = Arc::new(build_transport(&self.settings, &material)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Loaded {
            material,
            transport,
        };
        Ok(true)
    }

    /// The content mode events are sent in.
    pub fn content_mode(&self) -> ContentMode {
        self.settings.content_mode
    }

    fn transport(&self) -> Arc<Transport> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .transport
            .clone()
    }

    /// One delivery attempt of `event` to `sink`. Never retries and never
    /// sleeps: the caller decides what to do with the outcome.
    pub async fn send(&self, sink: &url::Url, event: &Event) -> DeliveryOutcome {
        let transport = self.transport();
        let request = match self.encode(&transport, sink, event, SystemTime::now()) {
            Ok(request) => request,
            Err(reason) => return DeliveryOutcome::Unencodable { reason },
        };
        let response = match transport.http.execute(request).await {
            Ok(response) => response,
            Err(error) => return transport_failure(&error),
        };
        let status = response.status().as_u16();
        match classify(status) {
            StatusClass::Delivered => {
                drain(response).await;
                DeliveryOutcome::Delivered { status }
            }
            StatusClass::Retry(reason) => {
                let retry_after = if status == 429 || status == 503 {
                    retry_after_header(response.headers(), SystemTime::now())
                } else {
                    None
                };
                drain(response).await;
                DeliveryOutcome::Retry {
                    reason,
                    detail: format!("sink answered HTTP {status}"),
                    retry_after,
                    status: Some(status),
                }
            }
            StatusClass::Rejected if (300..400).contains(&status) => {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .map(|l| format!(" to {l}"))
                    .unwrap_or_default();
                drain(response).await;
                DeliveryOutcome::Rejected {
                    status,
                    body: format!(
                        "the sink redirects{location}; redirects are never followed (the CloudEvents webhook spec forbids it), so set the sink to the final URL"
                    ),
                }
            }
            StatusClass::Rejected => DeliveryOutcome::Rejected {
                status,
                body: body_excerpt(response).await,
            },
        }
    }

    /// Builds the request in the configured content mode, with its token and
    /// signature. Errors (invalid header values) surface here rather than as
    /// a transport failure, so they are never retried.
    fn encode(
        &self,
        transport: &Transport,
        sink: &url::Url,
        event: &Event,
        now: SystemTime,
    ) -> Result<reqwest::Request, String> {
        let builder = transport.http.post(sink.clone());
        let builder = match self.settings.content_mode {
            ContentMode::Binary => builder.event(event.clone()).map_err(|e| e.to_string())?,
            ContentMode::Structured => {
                let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
                builder
                    .header(CONTENT_TYPE, STRUCTURED_CONTENT_TYPE)
                    .body(body)
            }
        };
        let mut request = builder.build().map_err(|e| error_chain(&e))?;
        if let Some(authorization) = &transport.authorization {
            request
                .headers_mut()
                .insert(AUTHORIZATION, authorization.clone());
        }
        if let Some(signer) = &transport.signer {
            sign(signer, &mut request, event.id(), now)?;
        }
        Ok(request)
    }
}

/// Adds the Standard Webhooks headers, the message id being the event's id
/// (so a receiver's replay protection and our retries agree).
fn sign(
    signer: &Signer,
    request: &mut reqwest::Request,
    id: &str,
    now: SystemTime,
) -> Result<(), String> {
    let timestamp = now
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let body = request
        .body()
        .and_then(reqwest::Body::as_bytes)
        .unwrap_or_default();
    let signature = signer.signature(id, timestamp, body);
    let headers = request.headers_mut();
    for (name, value) in [
        (signature::WEBHOOK_ID, id.to_owned()),
        (signature::WEBHOOK_TIMESTAMP, timestamp.to_string()),
        (signature::WEBHOOK_SIGNATURE, signature),
    ] {
        let value = HeaderValue::from_str(&value).map_err(|e| format!("{name}: {e}"))?;
        headers.insert(name, value);
    }
    Ok(())
}

/// The HTTP client and headers for one reading of the credentials.
fn build_transport(settings: &SinkSettings, material: &Material) -> Result<Transport, Error> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(settings.timeout)
        .connect_timeout(settings.connect_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_keepalive(TCP_KEEPALIVE)
        // A redirected POST either loses its body (301/302/303 become
        // GET) or silently moves events elsewhere; see `classify`.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!(
            env!("CARGO_PKG_NAME"),
            "/",
            env!("CARGO_PKG_VERSION")
        ));
    let files = &settings.credentials;
    let bundles = [
        (
            material.ca_file.as_deref(),
            describe(files.ca_file.as_deref(), "--sink-ca-file"),
        ),
        (
            material.config_ca.as_deref().map(str::as_bytes),
            format!(
                "key {} of ConfigMap config-events",
                crate::sink_config::CONFIG_EVENTS_CA_KEY
            ),
        ),
    ];
    for (pem, what) in bundles {
        let Some(pem) = pem else { continue };
        let certificates =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| Error::SinkCredentials {
                what: what.clone(),
                reason: error_chain(&e),
            })?;
        if certificates.is_empty() {
            return Err(Error::SinkCredentials {
                what,
                reason: "no PEM certificate in it".to_owned(),
            });
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    if let Some((cert, key)) = &material.client_identity {
        let mut pem = cert.clone();
        pem.push(b'\n');
        pem.extend_from_slice(key);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| Error::SinkCredentials {
            what: describe(files.client_cert.as_deref(), "--sink-client-cert"),
            reason: error_chain(&e),
        })?;
        builder = builder.identity(identity);
    }
    let authorization = material
        .token
        .as_deref()
        .map(|token| {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                Error::SinkCredentials {
                    what: describe(files.token_file.as_deref(), "--sink-token-file"),
                    reason: "the token has characters a header cannot carry".to_owned(),
                }
            })?;
            value.set_sensitive(true);
            Ok::<_, Error>(value)
        })
        .transpose()?;
    let signer = material
        .signing_secrets
        .as_deref()
        .map(|text| {
            Signer::parse(text).map_err(|reason| Error::SinkCredentials {
                what: describe(
                    files.signing_secret_file.as_deref(),
                    "--sink-signing-secret-file",
                ),
                reason,
            })
        })
        .transpose()?;
    Ok(Transport {
        http: builder.build().map_err(Error::HttpClient)?,
        authorization,
        signer,
    })
}

fn describe(path: Option<&std::path::Path>, flag: &str) -> String {
    match path {
        Some(path) => format!("{flag} {}", path.display()),
        None => flag.to_owned(),
    }
}

/// What an HTTP status means for delivery.
///
/// - 2xx: delivered.
/// - 404 (a Knative broker or route not ready yet), 408, 409, 429 and every
///   5xx: retry.
/// - 401 and 403: retry too. The sink's credentials or configuration are
///   wrong, which an operator fixes; until then the events are held.
/// - 3xx: rejected. Redirects are not followed for POST: 301/302/303 would
///   turn into a body-less GET, and following 307/308 would move events to a
///   place the operator did not configure; the sink URL should be fixed
///   instead.
/// - 1xx (never final; hyper consumes interim answers), 400, 410, 413, 415,
///   every other 4xx and codes outside 100..=599: rejected, since the same
///   request will get the same answer.
pub fn classify(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Delivered,
        404 => StatusClass::Retry(RetryReason::NotFound),
        408 => StatusClass::Retry(RetryReason::Timeout),
        409 => StatusClass::Retry(RetryReason::Conflict),
        401 | 403 => StatusClass::Retry(RetryReason::Unauthorized),
        429 => StatusClass::Retry(RetryReason::Throttled),
        500..=599 => StatusClass::Retry(RetryReason::ServerError),
        _ => StatusClass::Rejected,
    }
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (IMF-fixdate,
/// RFC 850 or asctime). A date in the past means "now" (zero). The result is
/// capped at [`MAX_RETRY_AFTER`]; an unparsable value gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too large for u64: certainly above the cap.
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// When to stop retrying an event. The default, no limit and no timeout,
/// never gives up: an event is held until the sink takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (`--retry-limit`).
    pub limit: Option<u32>,
    /// Time since the first failed attempt (`--retry-timeout`).
    pub timeout: Option<Duration>,
}

impl RetryPolicy {
    /// Whether to give up after `failed_attempts` failed attempts, the first
    /// of them `since_first_failure` ago.
    pub fn gives_up(&self, failed_attempts: u32, since_first_failure: Duration) -> bool {
        self.limit.is_some_and(|limit| failed_attempts > limit)
            || self
                .timeout
                .is_some_and(|timeout| since_first_failure >= timeout)
    }
}

/// Knative's extension naming where a dead-lettered event was meant to go.
pub const KNATIVE_ERROR_DEST: &str = "knativeerrordest";
/// Knative's extension with the sink's last HTTP status, if it answered.
pub const KNATIVE_ERROR_CODE: &str = "knativeerrorcode";
/// Knative's extension with the sink's last answer (or the transport
/// error), base64, at most [`KNATIVE_ERROR_DATA_MAX_BYTES`] of it.
pub const KNATIVE_ERROR_DATA: &str = "knativeerrordata";
/// Knative cuts the error data at 1024 bytes; so do we.
pub const KNATIVE_ERROR_DATA_MAX_BYTES: usize = 1024;

/// The event as it goes to the dead-letter sink: the same event (same id),
/// with Knative's error extensions saying where it was meant to go and
/// what the sink last said.
pub fn dead_letter_event(
    event: &Event,
    sink: &url::Url,
    status: Option<u16>,
    error: &str,
) -> Event {
    use base64::Engine as _;
    let mut dead = event.clone();
    dead.set_extension(KNATIVE_ERROR_DEST, sink.as_str());
    if let Some(status) = status {
        dead.set_extension(KNATIVE_ERROR_CODE, status.to_string());
    }
    let mut end = error.len().min(KNATIVE_ERROR_DATA_MAX_BYTES);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    // An empty answer leaves the extension out (an empty header is easily
    // lost on the way).
    if end > 0 {
        dead.set_extension(
            KNATIVE_ERROR_DATA,
            base64::engine::general_purpose::STANDARD.encode(&error.as_bytes()[..end]),
        );
    }
    dead
}

/// The delay before the next attempt, after `attempt` failed attempts (1
/// after the first failure; 0 is treated as 1).
///
/// Exponential backoff `base * 2^(attempt-1)`, capped at `cap`, with equal
/// jitter: the delay is uniformly in `[d/2, d]`. Equal rather than full
/// jitter so that a retry never comes right back (full jitter can draw ~0).
/// `jitter` is the caller's random draw in `0..=1` (out-of-range values are
/// clamped, NaN counts as 0). The result is never shorter than
/// `retry_after`, which itself is capped at [`MAX_RETRY_AFTER`] and may
/// exceed `cap`: the sink's explicit wish wins over our ceiling.
pub fn retry_delay(
    attempt: u32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let doublings = attempt.saturating_sub(1).min(MAX_DOUBLINGS);
    let factor = 1u128 << doublings;
    let exponential =
        duration_from_nanos(base.as_nanos().saturating_mul(factor).min(cap.as_nanos()));
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let low = exponential / 2;
    let spread = exponential.saturating_sub(low);
    let extra = Duration::try_from_secs_f64(spread.as_secs_f64() * jitter)
        .unwrap_or(spread)
        .min(spread);
    let delay = low.saturating_add(extra);
    let floor = retry_after.map_or(Duration::ZERO, |r| r.min(MAX_RETRY_AFTER));
    delay.max(floor)
}

/// A `Duration` from nanoseconds that came from another `Duration`, so the
/// seconds always fit; saturates rather than panics regardless.
fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
}

/// The `Retry-After` of a response, if present and parsable.
fn retry_after_header(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now)
}

/// Maps a reqwest failure (no HTTP status) to a retry.
fn transport_failure(error: &reqwest::Error) -> DeliveryOutcome {
    // Connect first: a connect timeout is both, and "cannot reach the sink"
    // is the more useful diagnosis.
    let reason = if error.is_connect() {
        RetryReason::Connect
    } else if error.is_timeout() {
        RetryReason::Timeout
    } else {
        RetryReason::Other
    };
    let detail = match tls_error(error) {
        Some(tls) => format!("{TLS_FAILURE_PREFIX}{tls}"),
        None => error_chain(error),
    };
    DeliveryOutcome::Retry {
        reason,
        detail,
        retry_after: None,
        status: None,
    }
}

/// How a retry's detail starts when the TLS handshake failed, so the
/// controller can tell the operator (a Warning Event, `/readyz`).
pub const TLS_FAILURE_PREFIX: &str = "TLS handshake with the sink failed: ";

impl DeliveryOutcome {
    /// The exact TLS error, when this is a retry after a failed handshake
    /// (say, `invalid peer certificate: UnknownIssuer`).
    pub fn tls_failure(&self) -> Option<&str> {
        match self {
            DeliveryOutcome::Retry { detail, .. } => detail.strip_prefix(TLS_FAILURE_PREFIX),
            _ => None,
        }
    }
}

/// The rustls error somewhere in the chain, as text.
fn tls_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(rustls_inside)
        {
            return Some(tls.to_string());
        }
        source = cause.source();
    }
    None
}

/// The rustls error an `io::Error` wraps, through any number of `io::Error`
/// layers (reqwest's connector wraps tokio-rustls' `InvalidData` in an
/// `Other`); `io::Error::source` skips the wrapped error itself.
fn rustls_inside(io: &std::io::Error) -> Option<&rustls::Error> {
    let inner = io.get_ref()?;
    if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    rustls_inside(inner.downcast_ref::<std::io::Error>()?)
}

/// An error with its sources, since reqwest's own message ("error sending
/// request") hides the cause ("connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Reads a small response body to its end so the connection returns to the
/// pool. Errors don't matter: the status is already known.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        read = read.saturating_add(chunk.len());
        if read > MAX_DRAIN_BYTES {
            break;
        }
    }
}

/// The first [`MAX_BODY_EXCERPT_BYTES`] of a response body as text, cut at a
/// character boundary, with `…` when cut.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    let mut truncated = false;
    while let Ok(Some(chunk)) = response.chunk().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_BODY_EXCERPT_BYTES {
            truncated = true;
            break;
        }
    }
    truncate_text(&bytes, MAX_BODY_EXCERPT_BYTES, truncated)
}

/// `bytes` as lossy UTF-8, at most `max` bytes of it, on a char boundary.
fn truncate_text(bytes: &[u8], max: usize, already_truncated: bool) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    let mut truncated = already_truncated;
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        truncated = true;
    }
    if truncated {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::body::Bytes;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode};
    use axum::routing::post;
    use axum::serve::ListenerExt;
    use cloudevents::{EventBuilder, EventBuilderV10};
    use tokio::sync::mpsc;

    /// Short request timeout so the hanging-server test is quick.
    const TEST_TIMEOUT: Duration = Duration::from_millis(300);

    fn event() -> Event {
        EventBuilderV10::new()
            .id("run-1/step-build/started")
            .ty("dev.tekton.step.started")
            .source("/apis/tekton.dev/v1/namespaces/ns/taskruns/run-1")
            .subject("step-build")
            .extension("taskrun", "run-1")
            .data("application/json", serde_json::json!({"step": "build"}))
            .build()
            .unwrap()
    }

    fn client(mode: ContentMode) -> SinkClient {
        SinkClient::new(&SinkSettings {
            timeout: TEST_TIMEOUT,
            connect_timeout: TEST_TIMEOUT,
            content_mode: mode,
            ..SinkSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn the_default_retry_policy_never_gives_up() {
        let policy = RetryPolicy::default();
        assert!(!policy.gives_up(u32::MAX, Duration::from_secs(86_400 * 365)));
    }

    #[test]
    fn retry_policy_gives_up_past_its_limit_or_its_timeout() {
        let limit = RetryPolicy {
            limit: Some(3),
            timeout: None,
        };
        // The first attempt and three retries: four failures before giving up.
        assert!(!limit.gives_up(3, Duration::from_secs(3600)));
        assert!(limit.gives_up(4, Duration::ZERO));
        let timeout = RetryPolicy {
            limit: None,
            timeout: Some(Duration::from_secs(30)),
        };
        assert!(!timeout.gives_up(1000, Duration::from_secs(29)));
        assert!(timeout.gives_up(1, Duration::from_secs(30)));
        let zero = RetryPolicy {
            limit: Some(0),
            timeout: None,
        };
        assert!(zero.gives_up(1, Duration::ZERO), "limit 0: no retry at all");
    }

    #[test]
    fn dead_letter_event_carries_knatives_error_extensions() {
        use base64::Engine as _;
        let sink: url::Url = "https://sink.example/".parse().unwrap();
        let long = "é".repeat(KNATIVE_ERROR_DATA_MAX_BYTES);
        let dead = dead_letter_event(&event(), &sink, Some(503), &long);
        assert_eq!(dead.id(), event().id(), "the same event, the same id");
        assert_eq!(
            dead.extension(KNATIVE_ERROR_DEST).unwrap().to_string(),
            "https://sink.example/"
        );
        assert_eq!(
            dead.extension(KNATIVE_ERROR_CODE).unwrap().to_string(),
            "503"
        );
        let data = base64::engine::general_purpose::STANDARD
            .decode(dead.extension(KNATIVE_ERROR_DATA).unwrap().to_string())
            .unwrap();
        assert!(data.len() <= KNATIVE_ERROR_DATA_MAX_BYTES);
        assert!(
            String::from_utf8(data).is_ok(),
            "cut on a character boundary"
        );
        let unanswered = dead_letter_event(&event(), &sink, None, "connection refused");
        assert!(unanswered.extension(KNATIVE_ERROR_CODE).is_none());
        let silent = dead_letter_event(&event(), &sink, Some(400), "");
        assert!(silent.extension(KNATIVE_ERROR_DATA).is_none());
    }

    /// Serves `app` on 127.0.0.1:0; returns its URL and a counter of
    /// accepted TCP connections.
    async fn spawn(app: Router) -> (url::Url, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/").parse().unwrap(), accepted)
    }

    /// A sink recording headers and body of each request, answering 202.
    async fn recording_sink() -> (
        url::Url,
        Arc<AtomicUsize>,
        mpsc::UnboundedReceiver<(AxumHeaders, Bytes)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Router::new().route(
            "/",
            post(move |headers: AxumHeaders, body: Bytes| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((headers, body));
                    StatusCode::ACCEPTED
                }
            }),
        );
        let (url, accepted) = spawn(app).await;
        (url, accepted, rx)
    }

    #[test]
    fn classify_table() {
        use RetryReason::*;
        use StatusClass::*;
        let table = [
            (200, Delivered),
            (202, Delivered),
            (204, Delivered),
            (299, Delivered),
            (100, Rejected),
            (301, Rejected),
            (307, Rejected),
            (308, Rejected),
            (400, Rejected),
            (401, Retry(Unauthorized)),
            (403, Retry(Unauthorized)),
            (404, Retry(NotFound)),
            (408, Retry(Timeout)),
            (409, Retry(Conflict)),
            (410, Rejected),
            (413, Rejected),
            (415, Rejected),
            (422, Rejected),
            (429, Retry(Throttled)),
            (500, Retry(ServerError)),
            (502, Retry(ServerError)),
            (503, Retry(ServerError)),
            (504, Retry(ServerError)),
            (599, Retry(ServerError)),
            (0, Rejected),
            (600, Rejected),
        ];
        for (status, want) in table {
            assert_eq!(classify(status), want, "status {status}");
        }
    }

    #[test]
    fn parse_retry_after_table() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let s = Duration::from_secs;
        let table: [(&str, Option<Duration>); 12] = [
            ("0", Some(s(0))),
            ("7", Some(s(7))),
            (" 120 ", Some(s(120))),
            ("300", Some(s(300))),
            ("301", Some(MAX_RETRY_AFTER)),
            ("99999999999999999999999", Some(MAX_RETRY_AFTER)),
            ("Sun, 06 Nov 1994 08:50:07 GMT", Some(s(30))),
            ("Sunday, 06-Nov-94 08:50:37 GMT", Some(s(60))),
            ("Sun Nov  6 08:49:47 1994", Some(s(10))),
            ("Sun, 06 Nov 1994 08:00:00 GMT", Some(s(0))),
            ("Mon, 07 Nov 1994 08:49:37 GMT", Some(MAX_RETRY_AFTER)),
            ("-5", None),
        ];
        for (value, want) in table {
            assert_eq!(parse_retry_after(value, now), want, "{value:?}");
        }
        for junk in ["", "soon", "1.5", "0x10"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn retry_delay_table() {
        let ms = Duration::from_millis;
        let base = ms(500);
        let cap = Duration::from_secs(30);
        let table: [(u32, Option<Duration>, f64, Duration); 16] = [
            // Attempt 0 counts as 1.
            (0, None, 1.0, ms(500)),
            (1, None, 1.0, ms(500)),
            (1, None, 0.0, ms(250)),
            (1, None, 0.5, ms(375)),
            (2, None, 1.0, ms(1000)),
            (3, None, 1.0, ms(2000)),
            (7, None, 1.0, ms(30_000)),
            (7, None, 0.0, ms(15_000)),
            // Overflow: huge attempts saturate at the cap.
            (64, None, 1.0, cap),
            (200, None, 0.0, ms(15_000)),
            (u32::MAX, None, 1.0, cap),
            // Jitter out of range is clamped; NaN counts as 0.
            (2, None, 7.0, ms(1000)),
            (2, None, -1.0, ms(500)),
            (2, None, f64::NAN, ms(500)),
            // Retry-After is a floor, above the cap, itself capped.
            (
                1,
                Some(Duration::from_secs(60)),
                1.0,
                Duration::from_secs(60),
            ),
            (1, Some(Duration::from_secs(3600)), 1.0, MAX_RETRY_AFTER),
        ];
        for (attempt, retry_after, jitter, want) in table {
            assert_eq!(
                retry_delay(attempt, base, cap, retry_after, jitter),
                want,
                "attempt {attempt} retry_after {retry_after:?} jitter {jitter}"
            );
        }
        // A Retry-After below the backoff does not shorten it.
        assert_eq!(retry_delay(3, base, cap, Some(ms(1)), 1.0), ms(2000));
        // Extreme inputs never panic.
        assert_eq!(
            retry_delay(u32::MAX, Duration::MAX, Duration::MAX, None, 1.0),
            Duration::MAX
        );
    }

    #[test]
    fn truncate_text_cuts_on_char_boundary() {
        assert_eq!(truncate_text(b"short", 10, false), "short");
        assert_eq!(truncate_text("ééé".as_bytes(), 3, false), "é…");
        assert_eq!(truncate_text(b"abc", 10, true), "abc…");
    }

    #[test]
    fn outcome_into_result() {
        let retry = DeliveryOutcome::Retry {
            reason: RetryReason::Throttled,
            detail: "sink answered HTTP 429".into(),
            retry_after: Some(Duration::from_secs(3)),
            status: Some(429),
        };
        let error = retry.into_result("id-1").unwrap_err();
        assert!(error.is_transient());
        assert!(matches!(
            error,
            Error::SendEvent { retry_after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        let rejected = DeliveryOutcome::Rejected {
            status: 400,
            body: "bad".into(),
        };
        let error = rejected.into_result("id-1").unwrap_err();
        assert!(!error.is_transient());
        assert_eq!(error.metric_label(), "reject_event");
        assert_eq!(
            DeliveryOutcome::Delivered { status: 202 }
                .into_result("id-1")
                .unwrap(),
            202
        );
    }

    #[tokio::test]
    async fn binary_mode_sends_ce_headers_and_reuses_the_connection() {
        let (url, accepted, mut requests) = recording_sink().await;
        let client = client(ContentMode::Binary);
        for _ in 0..3 {
            assert_eq!(
                client.send(&url, &event()).await,
                DeliveryOutcome::Delivered { status: 202 }
            );
        }
        let (headers, body) = requests.recv().await.unwrap();
        let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
        assert_eq!(header("ce-id"), "run-1/step-build/started");
        assert_eq!(header("ce-type"), "dev.tekton.step.started");
        assert_eq!(
            header("ce-source"),
            "/apis/tekton.dev/v1/namespaces/ns/taskruns/run-1"
        );
        assert_eq!(header("ce-specversion"), "1.0");
        assert_eq!(header("ce-subject"), "step-build");
        assert_eq!(header("ce-taskrun"), "run-1");
        assert_eq!(header("content-type"), "application/json");
        let data: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(data, serde_json::json!({"step": "build"}));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one TCP connection for 3 sends"
        );
    }

    #[tokio::test]
    async fn structured_mode_sends_the_event_as_json() {
        let (url, _, mut requests) = recording_sink().await;
        let outcome = client(ContentMode::Structured).send(&url, &event()).await;
        assert_eq!(outcome, DeliveryOutcome::Delivered { status: 202 });
        let (headers, body) = requests.recv().await.unwrap();
        assert_eq!(
            headers.get("content-type").unwrap(),
            STRUCTURED_CONTENT_TYPE
        );
        assert!(headers.get("ce-id").is_none());
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["id"], "run-1/step-build/started");
        assert_eq!(json["type"], "dev.tekton.step.started");
        assert_eq!(json["taskrun"], "run-1");
        assert_eq!(json["data"], serde_json::json!({"step": "build"}));
        let parsed: Event = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed, event());
    }

    #[tokio::test]
    async fn unavailable_with_retry_after_is_retried_after_that_delay() {
        let app = Router::new().route(
            "/",
            post(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "7")],
                    "busy",
                )
            }),
        );
        let (url, _) = spawn(app).await;
        let outcome = client(ContentMode::Binary).send(&url, &event()).await;
        assert_eq!(
            outcome,
            DeliveryOutcome::Retry {
                reason: RetryReason::ServerError,
                detail: "sink answered HTTP 503".into(),
                retry_after: Some(Duration::from_secs(7)),
                status: Some(503),
            }
        );
    }

    #[tokio::test]
    async fn retry_after_is_ignored_outside_429_and_503() {
        let app = Router::new().route(
            "/",
            post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, [("retry-after", "7")]) }),
        );
        let (url, _) = spawn(app).await;
        let outcome = client(ContentMode::Binary).send(&url, &event()).await;
        assert!(matches!(
            outcome,
            DeliveryOutcome::Retry {
                reason: RetryReason::ServerError,
                retry_after: None,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn bad_request_is_rejected_with_a_truncated_body() {
        let long = "x".repeat(10 * MAX_BODY_EXCERPT_BYTES);
        let app = Router::new().route(
            "/",
            post(move || {
                let long = long.clone();
                async move { (StatusCode::BAD_REQUEST, format!("missing ce-type {long}")) }
            }),
        );
        let (url, _) = spawn(app).await;
        let outcome = client(ContentMode::Binary).send(&url, &event()).await;
        let DeliveryOutcome::Rejected { status, body } = outcome else {
            panic!("want Rejected, got {outcome:?}");
        };
        assert_eq!(status, 400);
        assert!(body.starts_with("missing ce-type xxx"), "{body}");
        assert!(body.ends_with('…'));
        assert!(body.len() <= MAX_BODY_EXCERPT_BYTES + '…'.len_utf8());
    }

    #[tokio::test]
    async fn hanging_sink_times_out() {
        let app = Router::new().route("/", post(std::future::pending::<()>));
        let (url, _) = spawn(app).await;
        let started = std::time::Instant::now();
        let outcome = client(ContentMode::Binary).send(&url, &event()).await;
        assert!(
            matches!(
                outcome,
                DeliveryOutcome::Retry {
                    reason: RetryReason::Timeout,
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert!(started.elapsed() < 10 * TEST_TIMEOUT);
    }

    #[tokio::test]
    async fn refused_connection_is_retried_as_connect() {
        // Bind then drop, so nothing listens on the port.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url: url::Url = format!("http://{addr}/").parse().unwrap();
        let outcome = client(ContentMode::Binary).send(&url, &event()).await;
        let DeliveryOutcome::Retry {
            reason,
            detail,
            retry_after,
            status,
        } = outcome
        else {
            panic!("want Retry, got {outcome:?}");
        };
        assert_eq!(status, None, "no answer, no status");
        assert_eq!(reason, RetryReason::Connect);
        assert!(detail.to_lowercase().contains("refused"), "{detail}");
        assert_eq!(retry_after, None);
    }

    #[tokio::test]
    async fn invalid_header_value_is_unencodable() {
        let mut bad = event();
        bad.set_extension("note", "line\nbreak");
        let (url, _, _) = recording_sink().await;
        let outcome = client(ContentMode::Binary).send(&url, &bad).await;
        assert!(
            matches!(outcome, DeliveryOutcome::Unencodable { .. }),
            "{outcome:?}"
        );
        // Structured mode carries the same value in JSON without trouble.
        let outcome = client(ContentMode::Structured).send(&url, &bad).await;
        assert_eq!(outcome, DeliveryOutcome::Delivered { status: 202 });
    }
}
