//! The delivery engine alone, no API server: events per second from the
//! observer's own `SinkClient::send` to an in-process loopback CloudEvents
//! receiver over kept-alive connections (goal: ≥ 10 000 events/s).
//! `make bench` runs it; `make perf` reads its criterion output into
//! BENCHMARKS.md.
//!
//! Cases (one criterion iteration = one event, so criterion reports events/s):
//! - `sequential`: one TaskRun's worker, which sends its events in order;
//! - `8-in-flight`, `32-in-flight`: as many workers (tasks) sharing one
//!   `SinkClient`, each sending in order.
//!
//! Every case checks that every send was Delivered, that the receiver counted
//! every request, and that connections were reused (no more accepted than
//! sends in flight): a figure measured on failures or on fresh connections
//! would say nothing about the engine.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::serve::ListenerExt;
use bytes::Bytes;
use cloudevents::Event;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use tekton_step_observer::event::{EventInput, EventSettings, StepLog, build_event, cap_log};
use tekton_step_observer::ledger::Ledger;
use tekton_step_observer::sink::{DeliveryOutcome, SinkClient, SinkSettings};
use tekton_step_observer::steps::{StepEventKind, owed_transitions, run_facts};
use tekton_step_observer::tekton::{TaskRun, TaskRunRef, TektonVersion};
use tekton_step_observer::testing::{TaskRunBuilder, exited};
use tokio::runtime::Runtime;

const STEPS: usize = 10;

/// What the receiver saw.
#[derive(Default)]
struct Counts {
    /// CloudEvents answered 202.
    requests: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
}

/// A loopback CloudEvents receiver on a runtime (and thread) of its own, so
/// its work is not counted as the client's; it answers 202 at once.
struct Receiver {
    url: url::Url,
    counts: Arc<Counts>,
    // Dropping the runtime stops the server.
    _runtime: Runtime,
}

impl Receiver {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("receiver")
            .enable_all()
            .build()
            .expect("receiver runtime");
        let counts = Arc::new(Counts::default());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind 127.0.0.1:0");
        let addr: SocketAddr = listener.local_addr().expect("receiver address");
        let accepted = Arc::clone(&counts);
        let listener = listener.tap_io(move |tcp| {
            accepted.connections.fetch_add(1, Ordering::SeqCst);
            // An answer is one small write; don't let Nagle hold it back.
            let _ = tcp.set_nodelay(true);
        });
        let app = Router::new()
            .route("/", post(receive))
            .with_state(Arc::clone(&counts));
        runtime.spawn(async move {
            axum::serve(listener, app).await.expect("receiver");
        });
        Self {
            url: url::Url::parse(&format!("http://{addr}/")).expect("receiver url"),
            counts,
            _runtime: runtime,
        }
    }
}

/// Takes the whole request (so the body really crossed the wire) and counts
/// it if it is a binary-mode CloudEvent; anything else is refused, which the
/// bench then sees as not Delivered.
async fn receive(State(counts): State<Arc<Counts>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if headers.contains_key("ce-id") && headers.contains_key("ce-specversion") && !body.is_empty() {
        counts.requests.fetch_add(1, Ordering::SeqCst);
        StatusCode::ACCEPTED
    } else {
        StatusCode::BAD_REQUEST
    }
}

fn ten_step_taskrun() -> TaskRun {
    let mut builder = TaskRunBuilder::new("bench");
    for i in 0..STEPS {
        builder = builder.step(&format!("step-{i}"), exited(0));
    }
    builder.succeeded().build()
}

/// The events of a finished 10-step TaskRun, built as the controller builds
/// them (as benches/decide.rs does): for each step a `started` event and a
/// terminal one carrying a small log.
fn events() -> Vec<Event> {
    let taskrun = ten_step_taskrun();
    let status = taskrun.status.as_ref().expect("fixture has a status");
    let reference =
        TaskRunRef::from_meta(&taskrun.metadata, TektonVersion::V1).expect("fixture reference");
    let facts = run_facts(Some(status)).expect("fixture facts");
    let settings = EventSettings::default();
    let log = cap_log(
        "Cloning into 'src'...\nresolving deltas: 100% (1234/1234), done.\n\
         Compiling app v0.1.0\n    Finished `release` profile in 41.2s\nstep output\n"
            .as_bytes(),
        64 * 1024,
    );
    let transitions = owed_transitions(&facts, &Ledger::default());
    let started = transitions
        .iter()
        .filter(|t| t.kind == StepEventKind::Started)
        .count();
    assert_eq!(
        (started, transitions.len()),
        (STEPS, 2 * STEPS),
        "a started and a terminal event per step"
    );
    let events: Vec<Event> = transitions
        .iter()
        .map(|transition| {
            let log = if transition.kind.is_terminal() {
                &log
            } else {
                &StepLog::NotCarried
            };
            build_event(
                &settings,
                EventInput {
                    taskrun: &reference,
                    transition,
                    step_spec: status
                        .task_spec
                        .as_ref()
                        .and_then(|s| s.steps.get(transition.step_index)),
                    step_state: status.steps.get(transition.step_index),
                    pod_name: status.pod_name.as_deref(),
                    log,
                },
            )
            .expect("fixture event builds")
        })
        .collect();
    events
}

/// Sends `count` events in order, as one worker does, starting at `first` in
/// the cycle of `events`; returns how many were not Delivered.
async fn send_in_order(
    client: &SinkClient,
    sink: &url::Url,
    events: &[Event],
    first: u64,
    count: u64,
) -> u64 {
    let mut failed = 0;
    for i in first..first + count {
        let event = &events[(i % events.len() as u64) as usize];
        if !matches!(
            client.send(sink, event).await,
            DeliveryOutcome::Delivered { .. }
        ) {
            failed += 1;
        }
    }
    failed
}

/// One case: `iters` events from `in_flight` workers sharing one client, to a
/// fresh receiver, so the connection count is this case's alone.
fn case(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    in_flight: u64,
    events: &Arc<Vec<Event>>,
) {
    let receiver = Receiver::start();
    // The observer's own runtime is multi-threaded; one worker here so the
    // client and the receiver each have one of the machine's cores.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("client")
        .enable_all()
        .build()
        .expect("client runtime");
    let client = SinkClient::new(&SinkSettings::default()).expect("sink client");
    let mut sent = 0u64;
    let mut run = |iters: u64| {
        let before = receiver.counts.requests.load(Ordering::SeqCst);
        let (elapsed, failed) = runtime.block_on(async {
            let start = Instant::now();
            // Each worker a task of its own, as the observer's TaskRun
            // workers are; the events are split evenly between them.
            let workers: Vec<_> = (0..in_flight)
                .map(|w| {
                    let share = iters / in_flight + u64::from(w < iters % in_flight);
                    let (client, sink, events) =
                        (client.clone(), receiver.url.clone(), Arc::clone(events));
                    tokio::spawn(
                        async move { send_in_order(&client, &sink, &events, w, share).await },
                    )
                })
                .collect();
            let mut failed = 0;
            for worker in workers {
                failed += worker.await.expect("worker panicked");
            }
            (start.elapsed(), failed)
        });
        assert_eq!(failed, 0, "{name}: {failed} of {iters} sends not Delivered");
        let counted = receiver.counts.requests.load(Ordering::SeqCst) - before;
        assert_eq!(
            counted, iters,
            "{name}: receiver counted {counted} of {iters}"
        );
        sent += iters;
        elapsed
    };
    // A few rounds of every worker first: `cargo test --benches` runs the
    // routine with a single event, which alone would check neither the
    // concurrency nor the connection reuse.
    run(4 * in_flight.max(STEPS as u64));
    group.bench_function(name, |b| b.iter_custom(&mut run));
    let connections = receiver.counts.connections.load(Ordering::SeqCst);
    eprintln!("{name}: {sent} events delivered over {connections} connection(s)");
    assert!(
        connections <= in_flight * 1000,
        "{name}: {connections} connections accepted for {in_flight} in flight ({sent} events): \
         connections are not reused"
    );
}

fn bench(c: &mut Criterion) {
    let events = Arc::new(events());
    let mut group = c.benchmark_group("delivery");
    group.throughput(Throughput::Elements(1));
    // Loopback round trips are tens of microseconds; the default 5 s gives
    // ~100 000 events per case, plenty against this machine's noise.
    group.measurement_time(Duration::from_secs(5));
    case(&mut group, "sequential", 1, &events);
    case(&mut group, "8-in-flight", 8, &events);
    case(&mut group, "32-in-flight", 32, &events);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
