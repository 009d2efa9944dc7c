//! Helpers of the end-to-end suite: the cluster client, namespaces, TaskRuns
//! whose steps state their simulated outcome, the observer process and a
//! CloudEvents receiver.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use cloudevents::{AttributesReader, Event};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long a TaskRun of a few 100 ms steps may take end to end on a busy
/// 2-core machine: pod creation, scheduling, the node agent, the observer.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(90);

/// Poll interval of every wait: short enough to be quick, long enough not to
/// load the API server.
const POLL: Duration = Duration::from_millis(200);

/// The API client, from KUBECONFIG (set by `hack/cluster exec`).
pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG must point at the local cluster (run via hack/e2e)")
}

/// Waits until `check` returns Some, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match try_wait_for(deadline, check).await {
        Some(value) => value,
        None => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// Like [`wait_for`], but gives up with `None` at the deadline instead of
/// panicking, so the caller can record and report what it saw.
pub async fn try_wait_for<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > until {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A namespace of one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        // Tekton pods run as the namespace's default ServiceAccount, which
        // the controller-manager creates a moment later.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        wait_for(
            "the default ServiceAccount",
            Duration::from_secs(30),
            || async { sa.get_opt("default").await.ok().flatten().map(|_| ()) },
        )
        .await;
        TestNamespace {
            name,
            client: client.clone(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        // Best effort: the cluster is torn down after the suite anyway.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            });
        }
    }
}

/// The TaskRun API at `version` ("v1" or "v1beta1").
pub fn taskrun_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("tekton.dev", version, "TaskRun"),
        "taskruns",
    )
}

/// One simulated step.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub log: String,
    pub continue_on_error: bool,
}

/// A step that succeeds after 100 ms, logging `<name> ok`.
pub fn ok(name: &str) -> Step {
    Step {
        name: name.to_owned(),
        exit_code: 0,
        duration_ms: 100,
        log: format!("{name} ok\n"),
        continue_on_error: false,
    }
}

/// A step that exits `code`.
pub fn fails(name: &str, code: i32) -> Step {
    Step {
        exit_code: code,
        log: format!("{name} failed with {code}\n"),
        ..ok(name)
    }
}

impl Step {
    pub fn lasting(mut self, ms: u64) -> Self {
        self.duration_ms = ms;
        self
    }
    pub fn continue_on_error(mut self) -> Self {
        self.continue_on_error = true;
        self
    }
}

/// A TaskRun manifest whose steps run the SIMULATED_* stand-in. Every
/// step sets `script`, so Tekton never looks an image up in a registry.
pub fn taskrun_manifest(version: &str, name: &str, steps: &[Step], timeout: Option<&str>) -> Value {
    let steps: Vec<Value> = steps
        .iter()
        .map(|s| {
            let mut step = json!({
                "name": s.name,
                "image": "busybox",
                "script": format!("#!/bin/sh\nexit {}\n", s.exit_code),
                "env": [
                    {"name": "SIMULATED_EXIT_CODE", "value": s.exit_code.to_string()},
                    {"name": "SIMULATED_DURATION_MS", "value": s.duration_ms.to_string()},
                    {"name": "SIMULATED_LOG", "value": s.log},
                ],
            });
            if s.continue_on_error {
                step["onError"] = json!("continue");
            }
            step
        })
        .collect();
    let mut manifest = json!({
        "apiVersion": format!("tekton.dev/{version}"),
        "kind": "TaskRun",
        "metadata": {"name": name},
        "spec": {"taskSpec": {"steps": steps}},
    });
    if let Some(timeout) = timeout {
        manifest["spec"]["timeout"] = json!(timeout);
    }
    manifest
}

/// Creates a TaskRun; returns its uid.
pub async fn create_taskrun(client: &Client, namespace: &str, manifest: Value) -> String {
    let version = manifest["apiVersion"]
        .as_str()
        .and_then(|v| v.strip_prefix("tekton.dev/"))
        .unwrap_or("v1")
        .to_owned();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &taskrun_resource(&version));
    let object: DynamicObject = serde_json::from_value(manifest).unwrap();
    let created = api
        .create(&PostParams::default(), &object)
        .await
        .expect("create TaskRun");
    created.metadata.uid.expect("uid")
}

/// Reads a TaskRun as JSON (v1).
pub async fn get_taskrun(client: &Client, namespace: &str, name: &str) -> Value {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &taskrun_resource("v1"));
    serde_json::to_value(api.get(name).await.expect("get TaskRun")).unwrap()
}

/// Reads a TaskRun as JSON (v1), if it exists.
pub async fn get_taskrun_opt(client: &Client, namespace: &str, name: &str) -> Option<Value> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &taskrun_resource("v1"));
    let found = api.get_opt(name).await.expect("get TaskRun")?;
    Some(serde_json::to_value(found).unwrap())
}

/// Merge-patches a TaskRun's spec (e.g. to cancel it).
pub async fn patch_taskrun(client: &Client, namespace: &str, name: &str, patch: Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &taskrun_resource("v1"));
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch TaskRun");
}

/// Waits until the TaskRun's Succeeded condition is True or False; returns the TaskRun.
pub async fn wait_finished(client: &Client, namespace: &str, name: &str) -> Value {
    wait_for(
        &format!("TaskRun {namespace}/{name} to finish"),
        EVENT_DEADLINE,
        || async {
            let tr = get_taskrun(client, namespace, name).await;
            let done = tr["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Succeeded" && c["status"] != "Unknown");
            done.then_some(tr)
        },
    )
    .await
}

/// The ledger annotation, parsed.
pub fn ledger_of(taskrun: &Value) -> Option<Value> {
    taskrun["metadata"]["annotations"]["tekton.plugin.step-observer/result"]
        .as_str()
        .map(|text| serde_json::from_str(text).expect("ledger is JSON"))
}

/// What the receiver got, in arrival order.
#[derive(Clone, Default)]
pub struct Received {
    events: Arc<Mutex<Vec<Event>>>,
    /// When each of `events` arrived (same index).
    arrived_at: Arc<Mutex<Vec<Instant>>>,
    /// When non-zero, answer every event with this status (and drop it).
    pub fail_with: Arc<AtomicU16>,
    /// When non-zero, take this many milliseconds before answering: a slow
    /// sink, so a round of sending lasts long enough to interrupt.
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When set, checks each request's headers and raw body before its
    /// event is taken; `Err(status)` answers that instead.
    pub gate: Arc<Mutex<Option<Gate>>>,
    /// Requests the gate refused.
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
    /// TLS handshakes that failed (a TLS receiver only), with the error.
    pub handshake_failures: Arc<Mutex<Vec<String>>>,
}

/// A receiver's check of a request (see [`Received::gate`]).
pub type Gate = Arc<dyn Fn(&axum::http::HeaderMap, &[u8]) -> Result<(), StatusCode> + Send + Sync>;

impl Received {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// How many events were acknowledged so far (cheaper than `events()`).
    pub fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Every event with the moment it arrived, in arrival order.
    pub fn arrivals(&self) -> Vec<(Instant, Event)> {
        let events = self.events.lock().unwrap();
        let times = self.arrived_at.lock().unwrap();
        times.iter().copied().zip(events.iter().cloned()).collect()
    }

    /// Events about one TaskRun, in arrival order.
    pub fn for_taskrun(&self, uid: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| {
                e.extension("taskrunuid")
                    .is_some_and(|v| v.to_string() == uid)
            })
            .collect()
    }

    /// Waits until `count` events about the TaskRun arrived.
    pub async fn wait_for_count(&self, uid: &str, count: usize) -> Vec<Event> {
        wait_for(
            &format!("{count} events for TaskRun {uid}"),
            EVENT_DEADLINE,
            || async {
                let events = self.for_taskrun(uid);
                (events.len() >= count).then_some(events)
            },
        )
        .await
    }
}

async fn receive(State(received): State<Received>, event: Event) -> StatusCode {
    let delay = received.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = received.fail_with.load(Ordering::SeqCst);
    if fail != 0 {
        return StatusCode::from_u16(fail).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let mut events = received.events.lock().unwrap();
    events.push(event);
    received.arrived_at.lock().unwrap().push(Instant::now());
    StatusCode::ACCEPTED
}

/// Runs the gate, if any, on the request's headers and raw body.
async fn check_gate(
    State(received): State<Received>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let gate = received.gate.lock().unwrap().clone();
    let Some(gate) = gate else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if let Err(status) = gate(&parts.headers, &bytes) {
        received.refused.fetch_add(1, Ordering::SeqCst);
        return status.into_response();
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

fn receiver_app(received: &Received) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::post(receive))
        .layer(axum::middleware::from_fn_with_state(
            received.clone(),
            check_gate,
        ))
        .with_state(received.clone())
}

/// Accepts TCP connections and completes their TLS handshake; a failed
/// handshake is recorded and the next connection accepted.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    failures: Arc<Mutex<Vec<String>>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(stream).await {
                Ok(tls) => return (tls, addr),
                Err(error) => self.failures.lock().unwrap().push(error.to_string()),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The receiver of [`start_receiver`] behind TLS with this configuration.
pub async fn start_tls_receiver(config: Arc<rustls::ServerConfig>) -> (SocketAddr, Received) {
    let received = Received::default();
    let app = receiver_app(&received);
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(config),
        failures: received.handshake_failures.clone(),
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, received)
}

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        Self { issuer }
    }

    /// The CA's own certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1.
    pub fn server(&self) -> Issued {
        self.issue("127.0.0.1", rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    pub fn client(&self, name: &str) -> Issued {
        self.issue(name, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, name: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A TLS server configuration with `server`'s certificate; with
/// `client_ca`, clients must present a certificate that CA issued.
pub fn tls_server_config(server: &Issued, client_ca: Option<&TestCa>) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(builder.with_single_cert(chain, key).unwrap())
}

/// A folder of the test's own under the target directory.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("e2e")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a file the way the kubelet updates a mounted Secret: the new
/// content appears at once, whole (written aside, then renamed over).
pub fn replace_file(path: &std::path::Path, content: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, content).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A CloudEvents receiver on loopback, built on the cloudevents-sdk.
pub async fn start_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let app = receiver_app(&received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, received)
}

/// A free loopback port (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The observer under test, a real process; killed when dropped.
pub struct Observer {
    child: Child,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    /// What it was started with, for [`Observer::restart`].
    args: Vec<String>,
    kubeconfig: Option<String>,
    /// Extra environment, for [`Observer::restart`] too.
    env: Vec<(String, String)>,
}

impl Observer {
    /// Starts `tekton-step-observer run` with `args` (plus a metrics port)
    /// and waits until /healthz answers.
    pub async fn start(test: &str, args: &[&str], kubeconfig: Option<&str>) -> Self {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_at(test, args, kubeconfig, metrics).await
    }

    /// As [`Observer::start`], with extra environment variables.
    pub async fn start_with_env(test: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Self::launch(test, args, None, metrics, env).await
    }

    /// As [`Observer::start`], serving metrics on `metrics`.
    pub async fn start_at(
        test: &str,
        args: &[&str],
        kubeconfig: Option<&str>,
        metrics: SocketAddr,
    ) -> Self {
        Self::launch(test, args, kubeconfig, metrics, Vec::new()).await
    }

    async fn launch(
        test: &str,
        args: &[&str],
        kubeconfig: Option<&str>,
        metrics: SocketAddr,
        env: Vec<(String, String)>,
    ) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{test}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let kubeconfig = kubeconfig.map(str::to_owned);
        let child = Self::spawn(metrics, &args, kubeconfig.as_deref(), &env, file);
        let observer = Observer {
            child,
            metrics,
            log,
            args,
            kubeconfig,
            env,
        };
        observer.wait_healthy().await;
        observer
    }

    fn spawn(
        metrics: SocketAddr,
        args: &[String],
        kubeconfig: Option<&str>,
        env: &[(String, String)],
        file: std::fs::File,
    ) -> Child {
        // E2E_OBSERVER_BIN runs another build (say, an older revision's) for
        // a measurement side by side; the tests' own build otherwise.
        let binary = std::env::var("E2E_OBSERVER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tekton-step-observer").to_owned());
        let mut command = Command::new(binary);
        command
            .arg("run")
            .args([
                "--metrics-addr",
                &metrics.to_string(),
                "--retry-max-delay",
                "2s",
            ])
            .args(args)
            .env("RUST_LOG", "info,tekton_step_observer=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if let Some(kubeconfig) = kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        command.spawn().expect("start the observer")
    }

    async fn wait_healthy(&self) {
        let url = format!("http://{}/healthz", self.metrics);
        wait_for(
            "the observer's /healthz",
            Duration::from_secs(30),
            || async {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the process (no shutdown, no lease release) and reaps it.
    pub fn kill(&mut self) {
        // An error means it already exited; wait() reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again with the same arguments and metrics port
    /// (after [`Observer::kill`]), appending to the same log, and waits
    /// until /healthz answers.
    pub async fn restart(&mut self) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(file, "---- restarted by the test ----").unwrap();
        self.child = Self::spawn(
            self.metrics,
            &self.args,
            self.kubeconfig.as_deref(),
            &self.env,
            file,
        );
        self.wait_healthy().await;
    }

    /// The observer's /metrics text.
    /// `/readyz`: its status code and body.
    pub async fn readyz(&self) -> (u16, String) {
        let response = reqwest::get(format!("http://{}/readyz", self.metrics))
            .await
            .expect("readyz");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Its log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs (has neither exited nor crashed).
    /// Sends SIGTERM, as a kubelet stopping the pod does, and waits up to
    /// `deadline` for the process to exit; returns whether it did.
    pub async fn terminate(&mut self, deadline: Duration) -> bool {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|status| status.success());
        assert!(sent, "kill -TERM {pid}");
        let until = Instant::now() + deadline;
        loop {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(step, kind)` of each event, kind being the type's second-to-last segment.
pub fn summary(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let kind = e.ty().rsplit('.').nth(1).unwrap_or_default().to_owned();
            (e.subject().unwrap_or_default().to_owned(), kind)
        })
        .collect()
}

/// The event's JSON data.
pub fn data(event: &Event) -> Value {
    match event.data() {
        Some(cloudevents::Data::Json(v)) => v.clone(),
        Some(cloudevents::Data::Binary(b)) => serde_json::from_slice(b).expect("json data"),
        Some(cloudevents::Data::String(s)) => serde_json::from_str(s).expect("json data"),
        None => Value::Null,
    }
}

/// Shorthand for expected summaries.
pub fn expect(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(s, k)| (s.to_string(), k.to_string()))
        .collect()
}

/// With `E2E_CAPTURE_FIXTURES=DIR`, saves a finished TaskRun as a fixture for
/// the unit tests (`tests/fixtures/<tekton version>/`), without managedFields,
/// stamped with the Tekton version it ran on.
pub async fn capture_fixture(client: &Client, namespace: &str, name: &str, fixture: &str) {
    let Some(dir) = std::env::var("E2E_CAPTURE_FIXTURES")
        .ok()
        .filter(|dir| !dir.is_empty())
    else {
        return;
    };
    let mut taskrun = wait_finished(client, namespace, name).await;
    if let Some(meta) = taskrun["metadata"].as_object_mut() {
        meta.remove("managedFields");
    }
    // Which Tekton wrote it (hack/cluster exec exports the running one).
    let version = std::env::var("TEKTON_VERSION").unwrap_or_else(|_| "unknown".to_owned());
    taskrun["metadata"]["annotations"]["tekton-step-observer.dev/captured-with-tekton"] =
        json!(version);
    std::fs::create_dir_all(&dir).unwrap();
    let path = PathBuf::from(dir).join(format!("{fixture}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&taskrun).unwrap() + "\n",
    )
    .unwrap();
}

/// Saves one fault case's figures as `<case>.json` under `RELIABILITY_DIR`
/// (default: `target/reliability`), for `make reliability` to render.
pub fn record_figures(case: &str, mut figures: Value) {
    // The suite is the test crate that recorded the case.
    if let Some(object) = figures.as_object_mut() {
        object
            .entry("suite")
            .or_insert_with(|| Value::from(env!("CARGO_CRATE_NAME")));
    }
    let dir = std::env::var("RELIABILITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/reliability"));
    std::fs::create_dir_all(&dir).unwrap();
    let text = serde_json::to_string_pretty(&figures).unwrap() + "\n";
    std::fs::write(dir.join(format!("{case}.json")), text).unwrap();
}

/// The value of one metric series (its whole label set, as written on
/// `/metrics`), if present.
pub fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)
            .and_then(|rest| rest.trim().parse().ok())
    })
}
