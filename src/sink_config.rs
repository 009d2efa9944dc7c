//! Where the sink URL comes from: `--sink`, else Tekton's own CloudEvents
//! configuration (ConfigMap `config-events`, key `sink`), else its older
//! place (ConfigMap `config-defaults`, key `default-cloud-events-sink`).
//!
//! [`resolve_sink`] is the pure precedence rule; [`watch_sink`] keeps the
//! answer current by watching the two ConfigMaps, and only them, in Tekton's
//! namespace.

use std::collections::BTreeMap;
use std::fmt;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use url::Url;

/// Tekton's namespace in a default install.
pub const DEFAULT_TEKTON_NAMESPACE: &str = "tekton-pipelines";

/// The ConfigMap where Tekton reads its CloudEvents settings.
pub const CONFIG_EVENTS: &str = "config-events";
/// The key of [`CONFIG_EVENTS`] holding the sink URL.
pub const CONFIG_EVENTS_SINK_KEY: &str = "sink";
/// The key of [`CONFIG_EVENTS`] with PEM CAs to trust for the sink, on top
/// of the system's and `--sink-ca-file`'s. Tekton has no such key; this is
/// the name Knative gives a sink's CAs (`spec.sink.CACerts` of its sources).
pub const CONFIG_EVENTS_CA_KEY: &str = "sink.CACerts";
/// The ConfigMap where older Tekton releases read the sink.
pub const CONFIG_DEFAULTS: &str = "config-defaults";
/// The key of [`CONFIG_DEFAULTS`] holding the sink URL.
pub const CONFIG_DEFAULTS_SINK_KEY: &str = "default-cloud-events-sink";

/// Where a sink value was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SinkSource {
    /// The `--sink` flag.
    Flag,
    /// Key `sink` of ConfigMap `config-events`.
    ConfigEvents,
    /// Key `default-cloud-events-sink` of ConfigMap `config-defaults`.
    ConfigDefaults,
}

impl SinkSource {
    /// A short, bounded label for metrics.
    pub fn metric_label(self) -> &'static str {
        match self {
            SinkSource::Flag => "flag",
            SinkSource::ConfigEvents => "config_events",
            SinkSource::ConfigDefaults => "config_defaults",
        }
    }
}

impl fmt::Display for SinkSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkSource::Flag => f.write_str("flag --sink"),
            SinkSource::ConfigEvents => {
                write!(
                    f,
                    "key {CONFIG_EVENTS_SINK_KEY} of ConfigMap {CONFIG_EVENTS}"
                )
            }
            SinkSource::ConfigDefaults => write!(
                f,
                "key {CONFIG_DEFAULTS_SINK_KEY} of ConfigMap {CONFIG_DEFAULTS}"
            ),
        }
    }
}

/// The sink as currently configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkState {
    /// Send events here.
    Configured(Url, SinkSource),
    /// No sink anywhere: hold events until one is configured.
    Missing,
    /// The winning value is not a usable URL. Lower-precedence places are
    /// not consulted: falling back would send events somewhere the operator
    /// did not ask for.
    Invalid {
        /// The value as configured (trimmed).
        value: String,
        /// Where it was found.
        source: SinkSource,
        /// Why it was refused.
        reason: String,
    },
}

impl SinkState {
    /// The sink URL, when there is a usable one.
    pub fn url(&self) -> Option<&Url> {
        match self {
            SinkState::Configured(url, _) => Some(url),
            SinkState::Missing | SinkState::Invalid { .. } => None,
        }
    }
}

/// Picks the sink by precedence: `flag`, else key `sink` of `config-events`'
/// data, else key `default-cloud-events-sink` of `config-defaults`' data.
/// Empty or whitespace-only values count as unset. The first set value wins
/// even if invalid (see [`SinkState::Invalid`]).
pub fn resolve_sink(
    flag: Option<&str>,
    config_events: Option<&BTreeMap<String, String>>,
    config_defaults: Option<&BTreeMap<String, String>>,
) -> SinkState {
    let candidates = [
        (flag, SinkSource::Flag),
        (
            config_events.and_then(|data| data.get(CONFIG_EVENTS_SINK_KEY).map(String::as_str)),
            SinkSource::ConfigEvents,
        ),
        (
            config_defaults.and_then(|data| data.get(CONFIG_DEFAULTS_SINK_KEY).map(String::as_str)),
            SinkSource::ConfigDefaults,
        ),
    ];
    let Some((value, source)) = candidates.into_iter().find_map(|(value, source)| {
        // ConfigMap values often end in a newline (YAML block scalars).
        let value = value?.trim();
        (!value.is_empty()).then_some((value, source))
    }) else {
        return SinkState::Missing;
    };
    match parse_sink_url(value) {
        Ok(url) => SinkState::Configured(url, source),
        Err(reason) => SinkState::Invalid {
            value: value.to_owned(),
            source,
            reason,
        },
    }
}

/// Accepts an absolute `http` or `https` URL with a host; the error says why
/// not.
pub fn parse_sink_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("not an absolute URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} is not supported, use http or https",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    Ok(url)
}

/// A running sink watch: the current [`SinkState`] and the task keeping it
/// current.
#[derive(Debug)]
pub struct SinkWatch {
    /// The current sink. Until both ConfigMaps have been listed once it
    /// holds [`SinkState::Missing`]; the first listed state is then always
    /// published (marking the receiver changed), later ones only when they
    /// differ. With `--sink` it never changes.
    pub receiver: watch::Receiver<SinkState>,
    /// The CAs of key [`CONFIG_EVENTS_CA_KEY`], when set; always `None`
    /// with `--sink` (no ConfigMap is read then).
    pub ca_certs: watch::Receiver<Option<String>>,
    /// The task; it ends only when every receiver is dropped.
    pub task: JoinHandle<()>,
}

/// Starts watching the sink configuration. Must be called within a Tokio
/// runtime.
///
/// With `flag` set no ConfigMap is watched at all (and the observer needs no
/// ConfigMap permission). Otherwise ConfigMaps `config-events` and
/// `config-defaults` are watched in `tekton_namespace` only, each by a
/// `metadata.name` field selector, so RBAC can grant `get`/`list`/`watch` on
/// exactly those two `resourceNames` in that namespace. Watch errors are
/// logged and retried with kube's default backoff; the last known state
/// stays in force meanwhile.
pub fn watch_sink(
    client: kube::Client,
    tekton_namespace: String,
    flag: Option<String>,
) -> SinkWatch {
    if let Some(flag) = flag {
        let state = resolve_sink(Some(&flag), None, None);
        log_state(&state, &tekton_namespace);
        let (sender, receiver) = watch::channel(state);
        let (ca_sender, ca_certs) = watch::channel(None);
        // Keep the senders alive: a dropped sender makes `changed()` return
        // at once, which would spin a caller's select loop.
        let task = tokio::spawn(async move {
            sender.closed().await;
            drop(ca_sender);
        });
        return SinkWatch {
            receiver,
            ca_certs,
            task,
        };
    }
    let api: Api<ConfigMap> = Api::namespaced(client, &tekton_namespace);
    let events = watch_one(api.clone(), CONFIG_EVENTS);
    let defaults = watch_one(api, CONFIG_DEFAULTS);
    let (sender, receiver) = watch::channel(SinkState::Missing);
    let (ca_sender, ca_certs) = watch::channel(None);
    let task = tokio::spawn(run(events, defaults, sender, ca_sender, tekton_namespace));
    SinkWatch {
        receiver,
        ca_certs,
        task,
    }
}

/// A backed-off watch of one ConfigMap by name.
fn watch_one(
    api: Api<ConfigMap>,
    name: &str,
) -> impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Send + use<> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config).default_backoff()
}

/// Folds the two watch streams into the published state until every
/// receiver is gone. Generic over the streams so tests can feed events.
async fn run<A, B, E>(
    events: A,
    defaults: B,
    sender: watch::Sender<SinkState>,
    ca_sender: watch::Sender<Option<String>>,
    namespace: String,
) where
    A: Stream<Item = Result<watcher::Event<ConfigMap>, E>> + Send,
    B: Stream<Item = Result<watcher::Event<ConfigMap>, E>> + Send,
    E: fmt::Display,
{
    let events = events.map(|item| (CONFIG_EVENTS, item));
    let defaults = defaults.map(|item| (CONFIG_DEFAULTS, item));
    let mut merged = std::pin::pin!(futures::stream::select(events, defaults));
    let mut trackers = (
        ConfigMapTracker::new(CONFIG_EVENTS),
        ConfigMapTracker::new(CONFIG_DEFAULTS),
    );
    let mut published = false;
    loop {
        let next = tokio::select! {
            next = merged.next() => next,
            () = sender.closed() => return,
        };
        let Some((name, item)) = next else {
            // kube's watcher never ends; if it ever does, keep the last state
            // rather than pretend the sink vanished.
            tracing::error!("sink ConfigMap watches ended; keeping the last sink state");
            sender.closed().await;
            return;
        };
        let event = match item {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(
                    %error,
                    configmap = name,
                    namespace = %namespace,
                    "watching the sink ConfigMap failed; retrying with backoff"
                );
                continue;
            }
        };
        let tracker = if name == CONFIG_EVENTS {
            &mut trackers.0
        } else {
            &mut trackers.1
        };
        tracker.apply(event);
        let (Some(events), Some(defaults)) = (trackers.0.synced(), trackers.1.synced()) else {
            continue;
        };
        let ca = events
            .as_ref()
            .and_then(|data| data.get(CONFIG_EVENTS_CA_KEY))
            .map(|pem| pem.trim().to_owned())
            .filter(|pem| !pem.is_empty());
        ca_sender.send_if_modified(|current| {
            let changed = *current != ca;
            if changed {
                *current = ca;
            }
            changed
        });
        let state = resolve_sink(None, events.as_ref(), defaults.as_ref());
        publish(&sender, state, !published, &namespace);
        published = true;
    }
}

/// Publishes `state` when it differs from the current one, or always when
/// `force` (the first synced state, so waiters on `changed()` wake).
fn publish(sender: &watch::Sender<SinkState>, state: SinkState, force: bool, namespace: &str) {
    let changed = sender.send_if_modified(|current| {
        if !force && *current == state {
            return false;
        }
        *current = state.clone();
        true
    });
    if changed {
        log_state(&state, namespace);
    }
}

/// One clear log line per sink change.
fn log_state(state: &SinkState, namespace: &str) {
    match state {
        SinkState::Configured(url, source) => {
            tracing::info!(sink = %url, source = %source, "CloudEvents sink configured");
        }
        SinkState::Missing => tracing::warn!(
            "no CloudEvents sink configured: set --sink, key {CONFIG_EVENTS_SINK_KEY} of \
             ConfigMap {namespace}/{CONFIG_EVENTS}, or key {CONFIG_DEFAULTS_SINK_KEY} of \
             ConfigMap {namespace}/{CONFIG_DEFAULTS}; events are held until then"
        ),
        SinkState::Invalid {
            value,
            source,
            reason,
        } => tracing::error!(
            value = %value,
            source = %source,
            reason = %reason,
            "CloudEvents sink is not valid; events are held until it is fixed"
        ),
    }
}

/// The data of one ConfigMap as seen through its watch, following kube's
/// watcher protocol: a relist (`Init` … `InitDone`) replaces the state only
/// when complete, so the last known state stays in force during it.
#[derive(Debug)]
struct ConfigMapTracker {
    name: &'static str,
    /// `None` while absent (never created, or deleted).
    current: Option<BTreeMap<String, String>>,
    /// The state being relisted, between `Init` and `InitDone`.
    relisting: Option<Option<BTreeMap<String, String>>>,
    /// Whether one full list has completed.
    synced: bool,
}

impl ConfigMapTracker {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            current: None,
            relisting: None,
            synced: false,
        }
    }

    fn apply(&mut self, event: watcher::Event<ConfigMap>) {
        match event {
            watcher::Event::Init => self.relisting = Some(None),
            watcher::Event::InitApply(cm) => {
                if cm.name_any() == self.name {
                    self.relisting = Some(Some(cm.data.unwrap_or_default()));
                }
            }
            watcher::Event::InitDone => {
                self.current = self.relisting.take().flatten();
                self.synced = true;
            }
            watcher::Event::Apply(cm) => {
                if cm.name_any() == self.name {
                    self.current = Some(cm.data.unwrap_or_default());
                }
            }
            watcher::Event::Delete(cm) => {
                if cm.name_any() == self.name {
                    self.current = None;
                }
            }
        }
    }

    /// The data once synced: `Some(None)` for an absent ConfigMap.
    fn synced(&self) -> Option<Option<BTreeMap<String, String>>> {
        self.synced.then(|| self.current.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use kube::api::ObjectMeta;
    use std::time::Duration;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn resolve_sink_table() {
        use SinkSource::*;
        let events = data(&[(CONFIG_EVENTS_SINK_KEY, "http://events.example/")]);
        let defaults = data(&[(CONFIG_DEFAULTS_SINK_KEY, "https://defaults.example/x")]);
        let blank_events = data(&[(CONFIG_EVENTS_SINK_KEY, "  \n")]);
        let other_keys = data(&[("formats", "tektonv1")]);
        let bad_events = data(&[(CONFIG_EVENTS_SINK_KEY, "ftp://events.example/")]);
        let newline = data(&[(CONFIG_EVENTS_SINK_KEY, "http://events.example/\n")]);
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a BTreeMap<String, String>>,
            Option<&'a BTreeMap<String, String>>,
            SinkState,
        );
        let table: Vec<Case> = vec![
            (None, None, None, SinkState::Missing),
            (
                Some("http://flag.example"),
                Some(&events),
                Some(&defaults),
                SinkState::Configured(url("http://flag.example/"), Flag),
            ),
            (
                None,
                Some(&events),
                Some(&defaults),
                SinkState::Configured(url("http://events.example/"), ConfigEvents),
            ),
            (
                None,
                None,
                Some(&defaults),
                SinkState::Configured(url("https://defaults.example/x"), ConfigDefaults),
            ),
            // Blank values count as unset, at every level.
            (
                Some("   "),
                Some(&blank_events),
                Some(&defaults),
                SinkState::Configured(url("https://defaults.example/x"), ConfigDefaults),
            ),
            (Some(""), Some(&other_keys), None, SinkState::Missing),
            (
                None,
                Some(&other_keys),
                Some(&defaults),
                SinkState::Configured(url("https://defaults.example/x"), ConfigDefaults),
            ),
            // Surrounding whitespace is trimmed.
            (
                None,
                Some(&newline),
                None,
                SinkState::Configured(url("http://events.example/"), ConfigEvents),
            ),
            // An invalid winner does not fall back.
            (
                None,
                Some(&bad_events),
                Some(&defaults),
                SinkState::Invalid {
                    value: "ftp://events.example/".into(),
                    source: ConfigEvents,
                    reason: "scheme \"ftp\" is not supported, use http or https".into(),
                },
            ),
        ];
        for (i, (flag, events, defaults, want)) in table.into_iter().enumerate() {
            assert_eq!(resolve_sink(flag, events, defaults), want, "case {i}");
        }
    }

    #[test]
    fn parse_sink_url_table() {
        for ok in [
            "http://sink.default.svc.cluster.local",
            "https://sink.example:8443/path?x=1",
            "http://127.0.0.1:8080/",
            "http://[::1]:8080/",
        ] {
            assert!(parse_sink_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("sink.default.svc", "not an absolute URL"),
            ("/relative/path", "not an absolute URL"),
            ("ftp://sink.example/", "scheme"),
            ("mailto:ops@example.com", "scheme"),
            ("file:///tmp/x", "scheme"),
            ("http://", "not an absolute URL"),
        ] {
            let Err(reason) = parse_sink_url(bad) else {
                panic!("{bad} should be invalid");
            };
            assert!(reason.contains(why), "{bad}: {reason}");
        }
    }

    fn cm(name: &str, pairs: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("tekton-pipelines".to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(data(pairs)),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn tracker_follows_the_watch_protocol() {
        use watcher::Event::*;
        let mut t = ConfigMapTracker::new(CONFIG_EVENTS);
        assert_eq!(t.synced(), None);
        t.apply(Init);
        t.apply(InitApply(cm(CONFIG_EVENTS, &[("sink", "http://a")])));
        assert_eq!(t.synced(), None, "not synced before InitDone");
        t.apply(InitDone);
        assert_eq!(t.synced(), Some(Some(data(&[("sink", "http://a")]))));
        t.apply(Apply(cm(CONFIG_EVENTS, &[("sink", "http://b")])));
        assert_eq!(t.synced(), Some(Some(data(&[("sink", "http://b")]))));
        // Other names are ignored.
        t.apply(Apply(cm("other", &[("sink", "http://c")])));
        assert_eq!(t.synced(), Some(Some(data(&[("sink", "http://b")]))));
        // A relist keeps the old state until it completes.
        t.apply(Init);
        assert_eq!(t.synced(), Some(Some(data(&[("sink", "http://b")]))));
        t.apply(InitDone);
        assert_eq!(
            t.synced(),
            Some(None),
            "relisted without the ConfigMap: absent"
        );
        t.apply(Apply(cm(CONFIG_EVENTS, &[])));
        t.apply(Delete(cm(CONFIG_EVENTS, &[])));
        assert_eq!(t.synced(), Some(None), "deleted counts as absent");
    }

    type Feed = mpsc::UnboundedSender<Result<watcher::Event<ConfigMap>, String>>;

    fn spawn_run() -> (Feed, Feed, watch::Receiver<SinkState>) {
        let (events_tx, events_rx) = mpsc::unbounded();
        let (defaults_tx, defaults_rx) = mpsc::unbounded();
        let (sender, receiver) = watch::channel(SinkState::Missing);
        let (ca_sender, _) = watch::channel(None);
        tokio::spawn(run(
            events_rx,
            defaults_rx,
            sender,
            ca_sender,
            "tekton-pipelines".into(),
        ));
        (events_tx, defaults_tx, receiver)
    }

    fn list(feed: &Feed, items: Vec<ConfigMap>) {
        feed.unbounded_send(Ok(watcher::Event::Init)).unwrap();
        for item in items {
            feed.unbounded_send(Ok(watcher::Event::InitApply(item)))
                .unwrap();
        }
        feed.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
    }

    #[tokio::test]
    async fn run_publishes_after_sync_and_on_change_only() {
        let (events, defaults, mut rx) = spawn_run();
        list(&events, vec![]);
        events.unbounded_send(Err("boom".into())).unwrap();
        // Not synced until both ConfigMaps are listed: still the placeholder.
        list(&defaults, vec![]);
        // The first synced state is published even though it equals the
        // placeholder, so `changed()` tells the caller the state is real.
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*rx.borrow_and_update(), SinkState::Missing);

        defaults
            .unbounded_send(Ok(watcher::Event::Apply(cm(
                CONFIG_DEFAULTS,
                &[(CONFIG_DEFAULTS_SINK_KEY, "http://old.example")],
            ))))
            .unwrap();
        let state = rx
            .wait_for(|s| *s != SinkState::Missing)
            .await
            .unwrap()
            .clone();
        assert_eq!(
            state,
            SinkState::Configured(url("http://old.example/"), SinkSource::ConfigDefaults)
        );
        rx.mark_unchanged();

        // config-events wins over config-defaults.
        let with_sink = cm(
            CONFIG_EVENTS,
            &[(CONFIG_EVENTS_SINK_KEY, "http://new.example")],
        );
        events
            .unbounded_send(Ok(watcher::Event::Apply(with_sink.clone())))
            .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(
            *rx.borrow_and_update(),
            SinkState::Configured(url("http://new.example/"), SinkSource::ConfigEvents)
        );

        // Deleting config-events falls back to config-defaults.
        events
            .unbounded_send(Ok(watcher::Event::Delete(with_sink)))
            .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(
            *rx.borrow_and_update(),
            SinkState::Configured(url("http://old.example/"), SinkSource::ConfigDefaults)
        );
    }

    #[test]
    fn publish_only_when_changed_unless_forced() {
        let (sender, mut rx) = watch::channel(SinkState::Missing);
        publish(&sender, SinkState::Missing, false, "ns");
        assert!(!rx.has_changed().unwrap());
        publish(&sender, SinkState::Missing, true, "ns");
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let configured = SinkState::Configured(url("http://a.example/"), SinkSource::Flag);
        publish(&sender, configured.clone(), false, "ns");
        assert_eq!(*rx.borrow_and_update(), configured);
        publish(&sender, configured, false, "ns");
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn flag_needs_no_watch_and_never_changes() {
        // A client that is never used: with --sink nothing is watched.
        let client = unused_client();
        let mut watch = watch_sink(
            client,
            "tekton-pipelines".into(),
            Some("http://f.example".into()),
        );
        assert_eq!(
            *watch.receiver.borrow_and_update(),
            SinkState::Configured(url("http://f.example/"), SinkSource::Flag)
        );
        // The sender is alive, so `changed()` waits instead of failing.
        let changed =
            tokio::time::timeout(Duration::from_millis(50), watch.receiver.changed()).await;
        assert!(changed.is_err(), "changed() must block");
        drop(watch.receiver);
        tokio::time::timeout(Duration::from_secs(5), watch.task)
            .await
            .unwrap()
            .unwrap();
    }

    /// A kube client pointing at a closed local port; any request fails.
    fn unused_client() -> kube::Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }
}
