//! The command line: `run`, `display` and `inspect`. Every flag has a long
//! name and an environment variable (`TSO_...`), so the Deployment can set
//! either.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::event::{DEFAULT_DATASCHEMA_BASE, DEFAULT_LOG_LIMIT_BYTES, DEFAULT_TYPE_PREFIX};
use crate::sink::ContentMode;
use crate::step_event::{EventFormats, EventTypes};

/// Emits a CloudEvent for every step transition of every Tekton TaskRun.
#[derive(Debug, Parser)]
#[command(name = "tekton-step-observer", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Receive CloudEvents over HTTP and print them (like Knative's event_display).
    Display(DisplayArgs),
    /// Show, without sending, which events a TaskRun needs and what is still owed.
    Inspect(InspectArgs),
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Which TaskRun API version to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ApiVersionChoice {
    /// `tekton.dev/v1` where served, else `tekton.dev/v1beta1`.
    #[default]
    Auto,
    /// `tekton.dev/v1`.
    V1,
    /// `tekton.dev/v1beta1`.
    V1beta1,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (use e.g. 30s, 5m, 1h)"))
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn at_least_one_u32(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_sink_flag(text: &str) -> Result<url::Url, String> {
    crate::sink_config::parse_sink_url(text.trim())
}

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Watch TaskRuns only in this namespace (repeatable; default: all namespaces).
    #[arg(long = "namespace", env = "TSO_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Watch only TaskRuns matching this label selector (e.g. `team=ci`).
    #[arg(long, env = "TSO_LABEL_SELECTOR")]
    pub label_selector: Option<String>,

    /// TaskRuns per page of the watch's initial list (and of each relist).
    /// A page is decoded whole, so smaller pages leave less behind in the
    /// allocator; each costs one more LIST request (BENCHMARKS.md, memory:
    /// 100 rather than kube's 500).
    #[arg(long, env = "TSO_LIST_PAGE_SIZE", default_value_t = 100, value_parser = at_least_one_u32)]
    pub list_page_size: u32,

    /// Only these step event types are owed, sent and recorded, comma-
    /// separated: started, succeeded, failed, skipped (default all).
    #[arg(long, env = "TSO_EVENT_TYPES", value_parser = EventTypes::parse, default_value = "started,succeeded,failed,skipped")]
    pub event_types: EventTypes,

    /// The vocabulary of the events: native (our CloudEvents), cdevents
    /// (CDEvents custom events `dev.cdeventsx.tekton-steprun.*`) or both,
    /// each owed and recorded on its own. `tektonv1`, the value of the
    /// `formats` key of Tekton's config-events, means native.
    #[arg(long, env = "TSO_EVENT_FORMAT", value_parser = EventFormats::parse, default_value = "native")]
    pub event_format: EventFormats,

    /// Fill the watch with a streaming list (Kubernetes' WatchList, on by
    /// default from 1.34) instead of paged LISTs: objects arrive one by one,
    /// so no page is held in memory at once.
    #[arg(long, env = "TSO_STREAMING_LIST")]
    pub streaming_list: bool,

    /// Send events here instead of the sink Tekton is configured with.
    #[arg(long, env = "TSO_SINK")]
    pub sink: Option<String>,

    /// Namespace of Tekton's ConfigMaps `config-events` and `config-defaults`.
    #[arg(long, env = "TSO_TEKTON_NAMESPACE", default_value = "tekton-pipelines")]
    pub tekton_namespace: String,

    /// TaskRun API version to read.
    #[arg(long, env = "TSO_TEKTON_API_VERSION", value_enum, default_value_t)]
    pub tekton_api_version: ApiVersionChoice,

    /// Prefix of event types; `.started.v1` etc. is appended.
    #[arg(long, env = "TSO_TYPE_PREFIX", default_value = DEFAULT_TYPE_PREFIX)]
    pub type_prefix: String,

    /// A fixed CloudEvents `source` (default: the TaskRun's API path).
    #[arg(long, env = "TSO_SOURCE")]
    pub source: Option<String>,

    /// Base URL of the JSON Schemas named in `dataschema`.
    #[arg(long, env = "TSO_DATASCHEMA_BASE", default_value = DEFAULT_DATASCHEMA_BASE)]
    pub dataschema_base: String,

    /// CloudEvents content mode.
    #[arg(long, env = "TSO_FORMAT", value_enum, default_value_t)]
    pub format: ContentMode,

    /// Largest log carried in an event; longer logs keep their tail.
    #[arg(long, env = "TSO_LOG_LIMIT_BYTES", default_value_t = DEFAULT_LOG_LIMIT_BYTES)]
    pub log_limit_bytes: usize,

    /// Label `step_duration_seconds` by namespace too: one set of series
    /// per namespace, so leave it off where namespaces come and go.
    #[arg(long, env = "TSO_STEP_METRICS_BY_NAMESPACE")]
    pub step_metrics_by_namespace: bool,

    /// TaskRuns without a ledger that finished this long before the observer
    /// last ran (the watermark on its Lease; now, on first install) are left
    /// alone, so installing on a busy cluster replays nothing.
    #[arg(long, env = "TSO_BACKFILL_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub backfill_window: Duration,

    /// How many TaskRuns may be delivering at once.
    #[arg(long, env = "TSO_MAX_CONCURRENT_DELIVERIES", default_value = "16", value_parser = parse_positive)]
    pub max_concurrent_deliveries: usize,

    /// First retry delay after a failed delivery; doubles each attempt.
    #[arg(long, env = "TSO_RETRY_BASE_DELAY", default_value = "500ms", value_parser = parse_duration)]
    pub retry_base_delay: Duration,

    /// Longest delay between delivery attempts.
    #[arg(long, env = "TSO_RETRY_MAX_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub retry_max_delay: Duration,

    /// On SIGTERM: how long in-flight sends may finish and the ledger be
    /// written for everything acknowledged, before the Lease is released.
    /// Keep it under the Deployment's terminationGracePeriodSeconds (30 s).
    #[arg(long, env = "TSO_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Send events the sink did not take here, with Knative's error
    /// extensions: those the sink refused for good, and those the retry
    /// policy gave up on. Reached with the sink's TLS settings and
    /// credentials. Tekton's config-events has no place for it.
    #[arg(long, env = "TSO_DEAD_LETTER_SINK", value_parser = parse_sink_flag)]
    pub dead_letter_sink: Option<url::Url>,

    /// Give up on an event after this many retries (the first attempt not
    /// counted). Unset: never give up.
    #[arg(long, env = "TSO_RETRY_LIMIT")]
    pub retry_limit: Option<u32>,

    /// Give up on an event this long after its first failed attempt.
    /// Unset: never give up.
    #[arg(long, env = "TSO_RETRY_TIMEOUT", value_parser = parse_duration)]
    pub retry_timeout: Option<Duration>,

    /// PEM bundle of CAs to trust for an https sink, on top of the system's
    /// trust store (and of key `sink.CACerts` of `config-events`). Read
    /// again when it changes.
    #[arg(long, env = "TSO_SINK_CA_FILE")]
    pub sink_ca_file: Option<PathBuf>,

    /// PEM client certificate (chain) for a sink that asks for one (mTLS).
    /// Read again when it changes, like a mounted Secret.
    #[arg(long, env = "TSO_SINK_CLIENT_CERT", requires = "sink_client_key")]
    pub sink_client_cert: Option<PathBuf>,

    /// PEM private key of `--sink-client-cert`.
    #[arg(long, env = "TSO_SINK_CLIENT_KEY", requires = "sink_client_cert")]
    pub sink_client_key: Option<PathBuf>,

    /// File with a bearer token for the sink (`Authorization: Bearer`), for
    /// example a projected ServiceAccount token with the sink's audience.
    /// Read again when it changes.
    #[arg(long, env = "TSO_SINK_TOKEN_FILE")]
    pub sink_token_file: Option<PathBuf>,

    /// File with Standard Webhooks signing secrets (`whsec_...`), separated
    /// by whitespace: every event is signed with each (two during a
    /// rotation). Read again when it changes.
    #[arg(long, env = "TSO_SINK_SIGNING_SECRET_FILE")]
    pub sink_signing_secret_file: Option<PathBuf>,

    /// Time allowed for one request to the sink.
    #[arg(long, env = "TSO_SINK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub sink_timeout: Duration,

    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "TSO_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "TSO_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,

    /// Run several replicas; only the holder of a Lease sends and patches.
    #[arg(long, env = "TSO_LEADER_ELECT")]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease (default: POD_NAMESPACE, else
    /// `tekton-step-observer`).
    #[arg(long, env = "TSO_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "TSO_LEADER_ELECTION_ID",
        default_value = "tekton-step-observer"
    )]
    pub leader_election_id: String,

    /// This replica's identity in the Lease (default: POD_NAME, else the host name).
    #[arg(long, env = "TSO_IDENTITY")]
    pub identity: Option<String>,
}

/// Output of `display`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DisplayOutput {
    /// A readable block per event.
    #[default]
    Pretty,
    /// One JSON object per line, for machines.
    Json,
}

/// Flags of `display`.
#[derive(Debug, Args)]
pub struct DisplayArgs {
    /// Address to listen on.
    #[arg(long, env = "TSO_DISPLAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// How to print events.
    #[arg(long, env = "TSO_DISPLAY_OUTPUT", value_enum, default_value_t)]
    pub output: DisplayOutput,

    /// Largest request body accepted.
    #[arg(long, env = "TSO_DISPLAY_MAX_BODY_BYTES", default_value_t = crate::display::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Answer every event with this HTTP status instead of 2xx (for testing
    /// how a sender copes with a failing sink).
    #[arg(long, env = "TSO_DISPLAY_RESPOND_STATUS")]
    pub respond_status: Option<u16>,

    /// With --respond-status, send `Retry-After: N` seconds.
    #[arg(long, env = "TSO_DISPLAY_RETRY_AFTER")]
    pub retry_after_secs: Option<u64>,
}

/// Flags of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The TaskRun, as `namespace/name`.
    pub taskrun: String,

    /// TaskRun API version to read.
    #[arg(long, env = "TSO_TEKTON_API_VERSION", value_enum, default_value_t)]
    pub tekton_api_version: ApiVersionChoice,

    /// Prefix of event types.
    #[arg(long, env = "TSO_TYPE_PREFIX", default_value = DEFAULT_TYPE_PREFIX)]
    pub type_prefix: String,

    /// The formats the observer sends (as its `--event-format`): what is
    /// owed is shown for these.
    #[arg(long, env = "TSO_EVENT_FORMAT", value_parser = EventFormats::parse, default_value = "native")]
    pub event_format: EventFormats,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{DEFAULT_RETRY_BASE, DEFAULT_RETRY_CAP, DEFAULT_SINK_TIMEOUT};
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["tekton-step-observer", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.backfill_window, Duration::from_secs(3600));
        assert_eq!(args.shutdown_grace, Duration::from_secs(20));
        assert_eq!(args.retry_max_delay, DEFAULT_RETRY_CAP);
        assert_eq!(args.retry_base_delay, DEFAULT_RETRY_BASE);
        assert_eq!(args.sink_timeout, DEFAULT_SINK_TIMEOUT);
        assert_eq!(args.log_limit_bytes, 64 * 1024);
        assert!(!args.step_metrics_by_namespace);
        assert_eq!(args.tekton_namespace, "tekton-pipelines");
        assert!(args.namespaces.is_empty());
        assert_eq!(args.format, ContentMode::Binary);
        assert_eq!(args.event_types, EventTypes::default());
        assert_eq!(args.event_format, EventFormats::NATIVE);
        assert_eq!(
            (args.retry_limit, args.retry_timeout),
            (None, None),
            "never give up"
        );
        assert!(args.dead_letter_sink.is_none());
        assert_eq!(args.list_page_size, 100);
        assert!(!args.streaming_list);
        assert!(args.sink_ca_file.is_none() && args.sink_token_file.is_none());
    }

    #[test]
    fn namespaces_repeat_and_bad_values_are_refused() {
        let cli = Cli::try_parse_from([
            "tekton-step-observer",
            "run",
            "--namespace",
            "a",
            "--namespace",
            "b",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.namespaces, vec!["a", "b"]);
        for bad in [
            ["--backfill-window", "soon"],
            ["--max-concurrent-deliveries", "0"],
            ["--format", "xml"],
            ["--event-types", "finished"],
            ["--dead-letter-sink", "ftp://example.com/"],
            ["--list-page-size", "0"],
            ["--retry-timeout", "soon"],
            ["--sink-client-cert", "/only/the/cert.pem"],
        ] {
            let argv = ["tekton-step-observer", "run", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
    }
}
