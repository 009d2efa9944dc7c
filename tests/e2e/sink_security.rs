//! Sinks as production runs them: behind a private CA, asking for a client
//! certificate or a bearer token, checking signatures, redirecting; and the
//! filters that decide which events are owed at all. Every receiver here is
//! real (TLS by rustls, signatures checked by the Standard Webhooks
//! project's own library), and each case asserts the exact events and the
//! ledger.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use k8s_openapi::api::core::v1::Event as KubeEvent;
use kube::api::{Api, ListParams};

use crate::support::*;
use crate::{assert_events_well_formed, wait_for_ledger};

/// What a two-step TaskRun, one passing and one failing, owes.
const TWO_STEPS: &[(&str, &str)] = &[
    ("a", "started"),
    ("a", "succeeded"),
    ("b", "started"),
    ("b", "failed"),
];

fn two_steps() -> Vec<Step> {
    vec![ok("a"), fails("b", 2)]
}

/// An observer in a namespace of its own, sending to `sink`.
async fn observer_for(
    test: &str,
    sink: &str,
    extra: &[&str],
) -> (kube::Client, TestNamespace, Observer) {
    let client = client().await;
    let ns = TestNamespace::create(&client, test).await;
    let mut args = vec!["--namespace", &ns.name, "--sink", sink];
    args.extend_from_slice(extra);
    let observer = Observer::start(test, &args, None).await;
    (client, ns, observer)
}

/// Runs the two-step TaskRun and checks that exactly its events arrived, in
/// order, once, and that the ledger records them all.
async fn two_steps_arrive_exactly(
    client: &kube::Client,
    ns: &TestNamespace,
    received: &Received,
    observer: &Observer,
    name: &str,
) {
    let uid = create_taskrun(
        client,
        &ns.name,
        taskrun_manifest("v1", name, &two_steps(), None),
    )
    .await;
    let events = two_steps_arrived(client, ns, received, observer, name, &uid).await;
    assert_events_well_formed(&events, &uid, &ns.name, name);
}

/// Waits for the two-step TaskRun `name`'s events and ledger, and checks
/// that exactly its events arrived, in order, once.
async fn two_steps_arrived(
    client: &kube::Client,
    ns: &TestNamespace,
    received: &Received,
    observer: &Observer,
    name: &str,
    uid: &str,
) -> Vec<cloudevents::Event> {
    let events = received.wait_for_count(uid, TWO_STEPS.len()).await;
    wait_for_ledger(client, &ns.name, name, TWO_STEPS.len()).await;
    assert_eq!(
        summary(&events),
        expect(TWO_STEPS),
        "events in order; observer log:\n{}",
        observer.log_text()
    );
    assert_eq!(
        received.for_taskrun(uid).len(),
        TWO_STEPS.len(),
        "no event twice"
    );
    events
}

/// Waits until the ledger's entry for the TaskRun's first step lists
/// `count` event types under `list` (`rejected`, `deadLettered`, ...).
async fn first_step_recorded_as(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    list: &str,
    count: usize,
) -> serde_json::Value {
    wait_for(
        &format!("{count} events of {name} recorded as {list}"),
        EVENT_DEADLINE,
        || async {
            let taskrun = get_taskrun(client, namespace, name).await;
            let recorded = ledger_of(&taskrun)?["statuses"][0][list].as_array()?.len();
            (recorded == count).then_some(taskrun)
        },
    )
    .await
}

/// Waits for a Warning Event of this reason on the TaskRun whose note
/// contains `says`; returns the note.
async fn warning_saying(client: &kube::Client, ns: &str, reason: &str, says: &str) -> String {
    let events: Api<KubeEvent> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("a {reason} Warning Event saying {says:?}"),
        EVENT_DEADLINE,
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find_map(|e| {
                let note = e.message.unwrap_or_default();
                (e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some("Warning")
                    && note.contains(says))
                .then_some(note)
            })
        },
    )
    .await
}

/// An https sink whose certificate comes from a private CA: with a CA file
/// that does not hold it, the handshake fails and the Warning Event and
/// `/readyz` name rustls' exact error; once the mounted file holds the right
/// CA (replaced under the running process, as a Secret update does), every
/// event arrives, once, and nothing was lost meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn private_ca_sink_delivers_once_its_ca_file_holds_the_ca() {
    let (ca, other_ca) = (TestCa::new("sink CA"), TestCa::new("some other CA"));
    let (addr, received) = start_tls_receiver(tls_server_config(&ca.server(), None)).await;
    let dir = scratch_dir("private-ca");
    let ca_file = dir.join("ca.crt");
    replace_file(&ca_file, &other_ca.pem());
    let sink = format!("https://127.0.0.1:{}/", addr.port());
    let (client, ns, observer) = observer_for(
        "sec-private-ca",
        &sink,
        &[
            "--sink-ca-file",
            ca_file.to_str().unwrap(),
            "--retry-base-delay",
            "200ms",
        ],
    )
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    let note = warning_saying(&client, &ns.name, "SinkTLSFailed", "UnknownIssuer").await;
    assert!(
        note.contains("--sink-ca-file"),
        "the note says what to do: {note}"
    );
    let (status, body) = observer.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("sink: TLS handshake fails (invalid peer certificate: UnknownIssuer)"),
        "{body}"
    );
    assert!(!received.handshake_failures.lock().unwrap().is_empty());
    assert_eq!(received.len(), 0);

    replace_file(&ca_file, &ca.pem());
    two_steps_arrived(&client, &ns, &received, &observer, "tr", &uid).await;
    let metrics = observer.metrics_text().await;
    assert!(
        metrics.contains("tekton_step_observer_sink_credential_reloads_total 1"),
        "{metrics}"
    );
    wait_for("/readyz to drop the TLS note", EVENT_DEADLINE, || async {
        let (_, body) = observer.readyz().await;
        (!body.contains("TLS handshake fails")).then_some(())
    })
    .await;
}

/// The same private CA given the way a Tekton user configures the sink:
/// key `sink.CACerts` of `config-events`, next to its `sink`.
#[tokio::test(flavor = "multi_thread")]
async fn private_ca_in_config_events_is_trusted() {
    let ca = TestCa::new("sink CA via config-events");
    let (addr, received) = start_tls_receiver(tls_server_config(&ca.server(), None)).await;
    let client = client().await;
    let ns = TestNamespace::create(&client, "sec-config-ca").await;
    // A Tekton namespace of the test's own, so other tests' sinks are
    // untouched.
    let tekton_ns = TestNamespace::create(&client, "sec-config-ca-tekton").await;
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &tekton_ns.name);
    let config_events = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "config-events"},
        "data": {
            "sink": format!("https://127.0.0.1:{}/", addr.port()),
            "sink.CACerts": ca.pem(),
        },
    }))
    .unwrap();
    config_maps
        .create(&Default::default(), &config_events)
        .await
        .unwrap();
    let observer = Observer::start(
        "sec-config-ca",
        &[
            "--namespace",
            &ns.name,
            "--tekton-namespace",
            &tekton_ns.name,
        ],
        None,
    )
    .await;
    two_steps_arrive_exactly(&client, &ns, &received, &observer, "tr").await;
}

/// A sink that asks for a client certificate (mTLS): it refuses a client
/// without one, and takes every event from the observer once the observer's
/// mounted certificate is one its CA issued (replaced under the running
/// process: an untrusted certificate first, the right one after).
#[tokio::test(flavor = "multi_thread")]
async fn mtls_sink_takes_events_from_the_client_certificate_it_trusts() {
    let (server_ca, client_ca, stranger_ca) = (
        TestCa::new("server CA"),
        TestCa::new("client CA"),
        TestCa::new("stranger CA"),
    );
    let (addr, received) =
        start_tls_receiver(tls_server_config(&server_ca.server(), Some(&client_ca))).await;
    let sink = format!("https://127.0.0.1:{}/", addr.port());

    // The receiver really asks: a client without a certificate is refused.
    let bare = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(server_ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    assert!(bare.post(&sink).body("{}").send().await.is_err());
    assert_eq!(received.len(), 0);
    let refused_before = received.handshake_failures.lock().unwrap().len();
    assert!(
        refused_before > 0,
        "the receiver saw the bare handshake fail"
    );

    let dir = scratch_dir("mtls");
    let (ca_file, cert_file, key_file) =
        (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
    replace_file(&ca_file, &server_ca.pem());
    let stranger = stranger_ca.client("observer");
    replace_file(&cert_file, &stranger.cert_pem);
    replace_file(&key_file, &stranger.key_pem);
    let (client, ns, observer) = observer_for(
        "sec-mtls",
        &sink,
        &[
            "--sink-ca-file",
            ca_file.to_str().unwrap(),
            "--sink-client-cert",
            cert_file.to_str().unwrap(),
            "--sink-client-key",
            key_file.to_str().unwrap(),
            "--retry-base-delay",
            "200ms",
        ],
    )
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    wait_for(
        "the receiver to refuse the stranger's certificate",
        EVENT_DEADLINE,
        || async {
            (received.handshake_failures.lock().unwrap().len() > refused_before).then_some(())
        },
    )
    .await;
    assert_eq!(received.len(), 0);

    let trusted = client_ca.client("observer");
    // Two files, two writes: a reading in between may pair the new key with
    // the old certificate; its handshakes fail and are retried until the
    // next reading, which has both.
    replace_file(&key_file, &trusted.key_pem);
    replace_file(&cert_file, &trusted.cert_pem);
    two_steps_arrived(&client, &ns, &received, &observer, "tr", &uid).await;
}

/// A sink that checks a bearer token (the CloudEvents webhook spec's
/// `Authorization: Bearer`): the observer reads it from a file, like a
/// projected ServiceAccount token, and re-reads it when it changes. With the
/// old token the sink answers 401 and the events are held; with the new one
/// they all arrive, once.
#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_file_is_sent_and_reread_when_it_changes() {
    let (addr, received) = start_receiver().await;
    *received.gate.lock().unwrap() = Some(Arc::new(|headers, _| {
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            Some("Bearer token-for-the-sink") => Ok(()),
            _ => Err(StatusCode::UNAUTHORIZED),
        }
    }));
    let token_file = scratch_dir("bearer").join("token");
    replace_file(&token_file, "an-expired-token\n");
    let sink = format!("http://{addr}/");
    let (client, ns, observer) = observer_for(
        "sec-bearer",
        &sink,
        &[
            "--sink-token-file",
            token_file.to_str().unwrap(),
            "--retry-base-delay",
            "200ms",
        ],
    )
    .await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    wait_for(
        "the sink to refuse the old token",
        EVENT_DEADLINE,
        || async { (received.refused.load(Ordering::SeqCst) >= 2).then_some(()) },
    )
    .await;
    assert_eq!(received.len(), 0);
    replace_file(&token_file, "token-for-the-sink\n");
    two_steps_arrived(&client, &ns, &received, &observer, "tr", &uid).await;
}

/// Standard Webhooks signatures, checked by the specification's own Rust
/// library (an implementation independent of ours) through a key rotation:
/// key A alone; then A and B at once while the receiver moves from A to B;
/// then B alone. Every event of the three TaskRuns verifies, none is refused.
#[tokio::test(flavor = "multi_thread")]
async fn signatures_verify_at_the_receiver_through_a_key_rotation() {
    use base64::Engine as _;
    let secret = |byte: u8| {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        )
    };
    let (a, b) = (secret(0xa1), secret(0xb2));
    let accepts = |secret: &str| -> Gate {
        let webhook = standardwebhooks::Webhook::new(secret).unwrap();
        Arc::new(move |headers, body| {
            webhook
                .verify(body, headers)
                .map_err(|_| StatusCode::UNAUTHORIZED)?;
            // The message id is the event's id (binary mode: ce-id).
            match (headers.get("webhook-id"), headers.get("ce-id")) {
                (Some(id), Some(ce_id)) if id == ce_id => Ok(()),
                _ => Err(StatusCode::BAD_REQUEST),
            }
        })
    };
    let (addr, received) = start_receiver().await;
    *received.gate.lock().unwrap() = Some(accepts(&a));
    let secrets = scratch_dir("signatures").join("secrets");
    replace_file(&secrets, &format!("{a}\n"));
    let sink = format!("http://{addr}/");
    let (client, ns, observer) = observer_for(
        "sec-hmac",
        &sink,
        &["--sink-signing-secret-file", secrets.to_str().unwrap()],
    )
    .await;
    two_steps_arrive_exactly(&client, &ns, &received, &observer, "with-a").await;

    replace_file(&secrets, &format!("{a}\n{b}\n"));
    wait_for(
        "the observer to take both secrets",
        EVENT_DEADLINE,
        || async {
            observer
                .metrics_text()
                .await
                .contains("tekton_step_observer_sink_credential_reloads_total 1")
                .then_some(())
        },
    )
    .await;
    *received.gate.lock().unwrap() = Some(accepts(&b));
    two_steps_arrive_exactly(&client, &ns, &received, &observer, "with-a-and-b").await;

    replace_file(&secrets, &format!("{b}\n"));
    wait_for(
        "the observer to drop the old secret",
        EVENT_DEADLINE,
        || async {
            observer
                .metrics_text()
                .await
                .contains("tekton_step_observer_sink_credential_reloads_total 2")
                .then_some(())
        },
    )
    .await;
    two_steps_arrive_exactly(&client, &ns, &received, &observer, "with-b").await;
    assert_eq!(
        received.refused.load(Ordering::SeqCst),
        0,
        "no signature failed"
    );
}

/// A sink that redirects is never followed (the webhook spec forbids it):
/// each event is recorded as rejected, with a Warning Event that says why.
#[tokio::test(flavor = "multi_thread")]
async fn redirecting_sink_is_not_followed_and_events_are_rejected() {
    let (addr, received) = start_receiver().await;
    *received.gate.lock().unwrap() = Some(Arc::new(|_, _| Err(StatusCode::TEMPORARY_REDIRECT)));
    let sink = format!("http://{addr}/");
    let (client, ns, observer) = observer_for("sec-3xx", &sink, &[]).await;
    create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &[ok("a")], None),
    )
    .await;
    let taskrun = first_step_recorded_as(&client, &ns.name, "tr", "rejected", 2).await;
    let entry = &ledger_of(&taskrun).unwrap()["statuses"][0];
    assert_eq!(entry["name"], "a");
    assert!(
        entry["emitted"].as_array().is_none_or(Vec::is_empty),
        "{entry}"
    );
    let note = warning_saying(&client, &ns.name, "EventRejected", "HTTP 307").await;
    assert!(note.contains("redirects are never followed"), "{note}");
    assert_eq!(received.len(), 0);
    assert_eq!(
        received.refused.load(Ordering::SeqCst),
        2,
        "each event asked once, not retried or followed; log:\n{}",
        observer.log_text()
    );
}

/// `--event-types failed` owes only failed events: the TaskRun's other
/// events are neither sent nor in the ledger. A TaskRun labelled
/// `tekton.plugin.step-observer/skip: "true"` owes nothing at all and gets
/// no ledger.
#[tokio::test(flavor = "multi_thread")]
async fn event_type_filter_and_opt_out_decide_what_is_owed() {
    let (addr, received) = start_receiver().await;
    let sink = format!("http://{addr}/");
    let (client, ns, observer) =
        observer_for("sec-filter", &sink, &["--event-types", "failed"]).await;
    let mut opted_out = taskrun_manifest("v1", "opted-out", &two_steps(), None);
    opted_out["metadata"]["labels"]["tekton.plugin.step-observer/skip"] = "true".into();
    let skipped_uid = create_taskrun(&client, &ns.name, opted_out).await;
    // Finished before the other one starts: the watch delivers in order, so
    // once the observer has sent the other one's event it has seen every
    // state of this one.
    wait_finished(&client, &ns.name, "opted-out").await;
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &two_steps(), None),
    )
    .await;
    let events = received.wait_for_count(&uid, 1).await;
    let taskrun = wait_for_ledger(&client, &ns.name, "tr", 1).await;
    let opted_out = get_taskrun(&client, &ns.name, "opted-out").await;
    assert_eq!(
        summary(&events),
        expect(&[("b", "failed")]),
        "{}",
        observer.log_text()
    );
    let ledger = ledger_of(&taskrun).unwrap();
    let statuses = ledger["statuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 1, "only step b has an entry: {ledger}");
    assert_eq!(statuses[0]["name"], "b");
    assert_eq!(
        statuses[0]["emitted"].as_array().unwrap().len(),
        1,
        "{ledger}"
    );
    assert!(
        statuses[0]["emitted"][0]
            .as_str()
            .unwrap()
            .ends_with(".failed.v1")
    );
    assert!(received.for_taskrun(&skipped_uid).is_empty());
    assert!(
        ledger_of(&opted_out).is_none(),
        "no ledger on an opted-out TaskRun"
    );
    assert_eq!(received.for_taskrun(&uid).len(), 1, "nothing else for tr");
}

/// With `--retry-limit 2` and a dead-letter sink, an event the sink keeps
/// answering 503 is tried three times, then goes to the dead-letter sink
/// with Knative's error extensions; one the sink refuses for good (400)
/// goes there at once. The ledger records both as `deadLettered`.
#[tokio::test(flavor = "multi_thread")]
async fn events_the_sink_does_not_take_go_to_the_dead_letter_sink() {
    use base64::Engine as _;
    let (sink_addr, sink) = start_receiver().await;
    let answer = Arc::new(std::sync::atomic::AtomicU16::new(503));
    let gate_answer = answer.clone();
    *sink.gate.lock().unwrap() = Some(Arc::new(move |_, _| {
        Err(StatusCode::from_u16(gate_answer.load(Ordering::SeqCst)).unwrap())
    }));
    let (dead_addr, dead) = start_receiver().await;
    let sink_url = format!("http://{sink_addr}/");
    let dead_url = format!("http://{dead_addr}/");
    let (client, ns, observer) = observer_for(
        "sec-dls",
        &sink_url,
        &[
            "--dead-letter-sink",
            &dead_url,
            "--retry-limit",
            "2",
            "--retry-base-delay",
            "100ms",
        ],
    )
    .await;
    let check = |events: &[cloudevents::Event], code: &str, data: Option<&str>| {
        for event in events {
            assert_eq!(
                event
                    .extension("knativeerrordest")
                    .map(|v| v.to_string())
                    .as_deref(),
                Some(sink_url.as_str())
            );
            assert_eq!(
                event
                    .extension("knativeerrorcode")
                    .map(|v| v.to_string())
                    .as_deref(),
                Some(code)
            );
            let said = event.extension("knativeerrordata").map(|v| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.to_string())
                    .unwrap();
                String::from_utf8(bytes).unwrap()
            });
            assert_eq!(said.as_deref(), data, "knativeerrordata");
        }
    };
    let uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "unavailable", &[ok("a")], None),
    )
    .await;
    let events = dead.wait_for_count(&uid, 2).await;
    assert_eq!(
        summary(&events),
        expect(&[("a", "started"), ("a", "succeeded")]),
        "{}",
        observer.log_text()
    );
    check(&events, "503", Some("sink answered HTTP 503"));
    assert_eq!(
        sink.refused.load(Ordering::SeqCst),
        6,
        "three attempts per event"
    );

    answer.store(400, Ordering::SeqCst);
    let refused_uid = create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "refused", &[ok("a")], None),
    )
    .await;
    let refused_events = dead.wait_for_count(&refused_uid, 2).await;
    // The sink answered 400 with no body: no error data.
    check(&refused_events, "400", None);
    assert_eq!(
        sink.refused.load(Ordering::SeqCst),
        8,
        "one attempt per refused event"
    );

    for name in ["unavailable", "refused"] {
        let taskrun = first_step_recorded_as(&client, &ns.name, name, "deadLettered", 2).await;
        let entry = &ledger_of(&taskrun).unwrap()["statuses"][0];
        assert!(
            entry["emitted"].as_array().is_none_or(Vec::is_empty),
            "{entry}"
        );
        assert!(entry.get("rejected").is_none(), "{entry}");
    }
    warning_saying(&client, &ns.name, "EventDeadLettered", &dead_url).await;
    assert_eq!(dead.len(), 4, "nothing else at the dead-letter sink");
    assert_eq!(sink.len(), 0);
}

/// A retry policy without a dead-letter sink drops what it gives up on:
/// recorded as `dropped` (never sent again), counted, and told in a Warning
/// Event.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_policy_without_a_dead_letter_sink_drops_and_says_so() {
    let (addr, sink) = start_receiver().await;
    *sink.gate.lock().unwrap() = Some(Arc::new(|_, _| Err(StatusCode::SERVICE_UNAVAILABLE)));
    let url = format!("http://{addr}/");
    let (client, ns, observer) = observer_for("sec-drop", &url, &["--retry-limit", "0"]).await;
    create_taskrun(
        &client,
        &ns.name,
        taskrun_manifest("v1", "tr", &[ok("a")], None),
    )
    .await;
    let taskrun = first_step_recorded_as(&client, &ns.name, "tr", "dropped", 2).await;
    let entry = &ledger_of(&taskrun).unwrap()["statuses"][0];
    assert!(
        entry["emitted"].as_array().is_none_or(Vec::is_empty),
        "{entry}"
    );
    let note = warning_saying(&client, &ns.name, "EventDropped", "no --dead-letter-sink").await;
    assert!(note.contains("gave up after 1 failed attempt "), "{note}");
    let metrics = observer.metrics_text().await;
    for kind in ["started", "succeeded"] {
        let series =
            format!("tekton_step_observer_events_total{{type=\"{kind}\",outcome=\"dropped\"}} 1");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    assert_eq!(
        sink.refused.load(Ordering::SeqCst),
        2,
        "one attempt each, no retry"
    );
}

/// The overlays for production (`config/overlays/`) build on the install,
/// give the observer what they say (a flag and the volume behind it, or
/// the environment), and the API server accepts what they render (a
/// server-side dry run).
#[tokio::test(flavor = "multi_thread")]
async fn production_overlays_render_and_the_api_server_accepts_them() {
    let config = format!("{}/config", env!("CARGO_MANIFEST_DIR"));
    // Namespaced objects need their namespace to exist for a dry run.
    crate::kubectl(&["apply", "-f", &format!("{config}/base/namespace.yaml")]);
    for (overlay, flag, volume) in [
        (
            "private-ca",
            "--sink-ca-file=/etc/tekton-step-observer/sink/ca.crt",
            "secretName: sink-ca",
        ),
        (
            "oidc-token",
            "--sink-token-file=/var/run/secrets/tekton-step-observer/sink/token",
            "audience: my-sink-audience",
        ),
        (
            "tracing",
            "name: OTEL_EXPORTER_OTLP_ENDPOINT",
            "value: http://otel-collector.observability.svc:4318",
        ),
    ] {
        let dir = format!("{config}/overlays/{overlay}");
        let rendered = crate::kubectl(&["kustomize", &dir]);
        assert!(
            rendered.contains(flag),
            "{overlay}: {flag} missing:\n{rendered}"
        );
        assert!(
            rendered.contains(volume),
            "{overlay}: {volume} missing:\n{rendered}"
        );
        assert!(
            rendered.contains("kind: ClusterRole"),
            "{overlay} keeps the install"
        );
        crate::kubectl(&["apply", "--dry-run=server", "-k", &dir]);
    }
}
