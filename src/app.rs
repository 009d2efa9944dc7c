//! Wiring of `run`: builds the client, the sink watch, leader election, the
//! HTTP server and the controller from the CLI flags, and runs them until a
//! signal arrives.

use std::sync::Arc;

use chrono::Utc;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cli::{ApiVersionChoice, DisplayArgs, DisplayOutput, RunArgs};
use crate::context::{Channels, Context, ControllerSettings, ListMode};
use crate::controller;
use crate::display::{DisplayFormat, DisplaySettings};
use crate::error::{Error, Result};
use crate::event::EventSettings;
use crate::leader::{self, LeaseSettings};
use crate::metrics::Metrics;
use crate::otel::SpanExport;
use crate::server::{self, Readiness};
use crate::sink::{RetryPolicy, SinkClient, SinkSettings};
use crate::sink_config::{self, SinkState};
use crate::sink_credentials::{CREDENTIAL_RELOAD_INTERVAL, CredentialFiles};
use crate::tekton::TektonVersion;
use crate::watermark::{self, WatermarkLimit, WatermarkStore};

/// Namespace of the leader Lease when neither the flag nor POD_NAMESPACE says.
const DEFAULT_LEASE_NAMESPACE: &str = "tekton-step-observer";

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, only SIGTERM stops us.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Client config from the environment (in-cluster, or KUBECONFIG).
pub async fn kube_config() -> Result<kube::Config> {
    kube::Config::infer().await.map_err(|e| Error::Kube {
        operation: "load the Kubernetes client configuration",
        source: kube::Error::InferConfig(e),
    })
}

/// The client, and the TaskRun version to read.
pub async fn client_and_version(
    config: kube::Config,
    choice: ApiVersionChoice,
) -> Result<(Client, TektonVersion)> {
    let client = Client::try_from(config).map_err(|source| Error::Kube {
        operation: "build the Kubernetes client",
        source,
    })?;
    let version = match choice {
        ApiVersionChoice::Auto => controller::detect_version(&client).await?,
        ApiVersionChoice::V1 => TektonVersion::V1,
        ApiVersionChoice::V1beta1 => TektonVersion::V1Beta1,
    };
    Ok((client, version))
}

/// Settings of `display` from its flags.
pub fn display_settings(args: &DisplayArgs) -> DisplaySettings {
    DisplaySettings {
        listen: args.listen,
        format: match args.output {
            DisplayOutput::Pretty => DisplayFormat::Pretty,
            DisplayOutput::Json => DisplayFormat::Json,
        },
        max_body_bytes: args.max_body_bytes,
        respond_status: args.respond_status,
        retry_after_secs: args.retry_after_secs,
    }
}

fn readiness_sink(state: &SinkState) -> server::SinkState {
    match state {
        SinkState::Configured(..) => server::SinkState::Configured,
        SinkState::Missing => server::SinkState::NotConfigured,
        SinkState::Invalid {
            value,
            source,
            reason,
        } => server::SinkState::Invalid {
            reason: format!("{value:?} from {source}: {reason}"),
        },
    }
}

/// `tekton-step-observer run`.
pub async fn run(args: RunArgs) -> Result<()> {
    let config = kube_config().await?;
    let (client, version) = client_and_version(config.clone(), args.tekton_api_version).await?;
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(leader::identity_from_env);

    let sink_watch = sink_config::watch_sink(
        client.clone(),
        args.tekton_namespace.clone(),
        args.sink.clone(),
    );
    let sink = sink_watch.receiver.clone();
    tokio::spawn(mirror(sink.clone(), {
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        move |state: &SinkState| {
            metrics.set_sink_configured(state.url().is_some());
            readiness.set_sink(readiness_sink(state));
        }
    }));

    let lease_namespace = args
        .leader_election_namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_LEASE_NAMESPACE.to_owned());
    let watermark = WatermarkStore::new(
        Api::namespaced(client.clone(), &lease_namespace),
        args.leader_election_id.clone(),
        args.backfill_window,
    );
    let last_running = watermark.read().await;
    let backfill_cutoff =
        watermark::backfill_cutoff(last_running, Utc::now(), args.backfill_window);
    info!(
        watermark = ?last_running,
        %backfill_cutoff,
        "TaskRuns without a ledger that finished before the backfill cutoff are left alone"
    );

    let (leader, leader_handle) = if args.leader_elect {
        let mut lease = LeaseSettings::new(lease_namespace, identity.clone());
        lease.lease_name = args.leader_election_id.clone();
        leader::spawn_leader_election(config, lease)?
    } else {
        leader::leader_election_disabled()
    };
    tokio::spawn(mirror(leader.clone(), {
        let metrics = metrics.clone();
        move |leading: &bool| metrics.set_leader(*leading)
    }));

    let settings = ControllerSettings {
        namespaces: args.namespaces.clone(),
        label_selector: args.label_selector.clone(),
        event_types: args.event_types,
        event_formats: args.event_format,
        retry_policy: RetryPolicy {
            limit: args.retry_limit,
            timeout: args.retry_timeout,
        },
        dead_letter_sink: args.dead_letter_sink.clone(),
        list: if args.streaming_list {
            ListMode::Streaming
        } else {
            ListMode::Paged(args.list_page_size)
        },
        events: EventSettings {
            type_prefix: args.type_prefix.clone(),
            source: args.source.clone(),
            dataschema_base: args.dataschema_base.clone(),
        },
        sink: SinkSettings {
            timeout: args.sink_timeout,
            content_mode: args.format,
            credentials: CredentialFiles {
                ca_file: args.sink_ca_file.clone(),
                client_cert: args.sink_client_cert.clone(),
                client_key: args.sink_client_key.clone(),
                token_file: args.sink_token_file.clone(),
                signing_secret_file: args.sink_signing_secret_file.clone(),
            },
            ..SinkSettings::default()
        },
        log_limit_bytes: args.log_limit_bytes,
        step_metrics_by_namespace: args.step_metrics_by_namespace,
        backfill_cutoff,
        max_concurrent_deliveries: args.max_concurrent_deliveries,
        retry_base: args.retry_base_delay,
        retry_cap: args.retry_max_delay,
        identity,
        shutdown_grace: args.shutdown_grace,
    };
    let spans = SpanExport::from_env()?;
    if let Some(spans) = &spans {
        info!(
            ?spans,
            "exporting a span per step run (OTEL_EXPORTER_OTLP_*)"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(
        Context::new(
            client,
            version,
            settings,
            Channels {
                sink,
                leader: leader.clone(),
                stopping: stop_rx.clone(),
            },
            metrics.clone(),
            readiness.clone(),
        )?
        .with_spans(spans),
    );

    tokio::spawn(reload_sink_credentials(
        ctx.sink_client.clone(),
        sink_watch.ca_certs.clone(),
        metrics.clone(),
        readiness.clone(),
    ));

    let (limit_tx, limit_rx) = watch::channel(WatermarkLimit::NotSynced);
    let keep_watermark = watermark
        .clone()
        .keep(leader.clone(), stop_rx.clone(), limit_rx.clone());
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            // An error means the sender is gone, which also means stop.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let server = tokio::spawn(server::serve(
        args.metrics_addr,
        metrics,
        readiness.clone(),
        stopped(),
    ));
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        stop_tx.send_replace(true);
    });
    tokio::spawn(keep_watermark);
    let result = controller::run(ctx, readiness, limit_tx, stopped()).await;
    // The last moment known to be running (as far as what is still owed
    // lets it go), while still leader: a restart then backfills everything
    // that finished while it was down.
    let leading = *leader.borrow();
    let limit = *limit_rx.borrow();
    if leading && let Err(error) = watermark.advance(limit).await {
        warn!(%error, "cannot record the backfill watermark on the way out");
    }
    leader_handle.shutdown().await;
    server.abort();
    result
}

/// Keeps the sink client's credentials current: the files every
/// [`CREDENTIAL_RELOAD_INTERVAL`], `config-events`' CAs as they change. A
/// reading that cannot be used leaves the client as it was, and says so in
/// the log, a metric and `/readyz`.
async fn reload_sink_credentials(
    client: SinkClient,
    mut config_ca: watch::Receiver<Option<String>>,
    metrics: Metrics,
    readiness: Readiness,
) {
    let mut tick = tokio::time::interval(CREDENTIAL_RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut config_ca_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = config_ca.changed(), if config_ca_open => {
                config_ca_open = changed.is_ok();
            }
        }
        let ca = config_ca.borrow_and_update().clone();
        match client.reload(ca.as_deref()) {
            Ok(false) => readiness.set_credentials_problem(None),
            Ok(true) => {
                info!("sink credentials changed; new requests use them");
                metrics.record_credentials_reload(true);
                readiness.set_credentials_problem(None);
            }
            Err(error) => {
                warn!(%error, "cannot use the sink credentials as they are now; still using the previous ones");
                metrics.record_credentials_reload(false);
                readiness.set_credentials_problem(Some(error.to_string()));
            }
        }
    }
}

/// Calls `apply` with the channel's value now and on every change.
async fn mirror<T>(mut rx: watch::Receiver<T>, apply: impl Fn(&T)) {
    loop {
        apply(&rx.borrow_and_update());
        if rx.changed().await.is_err() {
            return;
        }
    }
}
