//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! replicas exactly one sends events and patches ledgers.
//!
//! [`spawn_leader_election`] returns a `watch::Receiver<bool>` that is `true`
//! while this replica holds the lease, and a [`LeaderHandle`] that gives the
//! lease up on shutdown. Without `--leader-elect`, [`leader_election_disabled`]
//! returns a receiver that is always `true`.
//!
//! The lease itself is kept by `kube-lease-manager`. Two things are added
//! around it:
//!
//! - Losing the lease flips the channel to `false` promptly even when the API
//!   server cannot be reached: the lease requests use a client of their own
//!   with short timeouts, and any failed renewal counts as lost leadership
//!   (the library would otherwise keep reporting `true` while it retries).
//!   Afterwards a fresh manager is built, which finds out from the Lease
//!   whether we still hold it.
//! - A standby watches the Lease and tries to take it as soon as it is
//!   released, instead of sleeping until the old holder's lease would have
//!   expired; so a graceful shutdown hands over at once.

use std::time::Duration;

use futures::future::FusedFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{DurationSeconds, LeaseManager, LeaseManagerBuilder};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Name of the Lease, as granted by the Role in `config/base/rbac.yaml` (which
/// restricts the lease rights to this name).
pub const DEFAULT_LEASE_NAME: &str = "tekton-step-observer";

/// The holder must renew within this long, and a standby may take the lease
/// once it passes: a standby thus takes over at most ~11 s after the leader
/// died (this, plus up to 1 s the library waits to avoid collisions), within
/// the 15 s we promise.
const LEASE_DURATION_SECONDS: DurationSeconds = 10;

/// The holder renews this long before its lease runs out, i.e. every 3 s:
/// a renewal that fails is noticed (and leadership given up) within the
/// request timeouts below, at least 4 s before a standby may take over,
/// which leaves room for clock skew between nodes.
const LEASE_GRACE_SECONDS: DurationSeconds = 7;

/// Connecting to the API server gives up after this: in a cluster it takes
/// milliseconds, so a second means the API server is unreachable.
const LEASE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Sending a lease request or waiting for its answer gives up after this,
/// so a renewal that hangs fails (and we stop leading) long before the lease
/// expires: renewal starts 3 s after the last one, fails by 6 s, expiry is
/// at 10 s.
const LEASE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// First pause after a lease error before trying again: short, because most
/// errors are blips.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(500);

/// Longest pause between attempts while the API server stays unreachable:
/// short enough to lead again soon after it is back, long enough not to
/// hammer it.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);

/// Giving the lease up on shutdown takes at most this long (a few requests,
/// each bounded by the timeouts above), well inside the pod's 30 s
/// termination grace period.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The takeover we promise after the leader dies.
const TAKEOVER_PROMISE_SECONDS: DurationSeconds = 15;

// A standby takes over after the lease duration plus the library's random
// collision wait (at most 1 s).
const _: () = assert!(LEASE_DURATION_SECONDS + 1 < TAKEOVER_PROMISE_SECONDS);
// The library requires grace < duration; renewing must leave room for a
// failed request before the lease runs out.
const _: () = assert!(LEASE_GRACE_SECONDS < LEASE_DURATION_SECONDS);
const _: () = assert!(
    (LEASE_DURATION_SECONDS - LEASE_GRACE_SECONDS)
        + LEASE_CONNECT_TIMEOUT.as_secs()
        + LEASE_REQUEST_TIMEOUT.as_secs()
        < LEASE_DURATION_SECONDS
);

/// Which Lease to campaign for, and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Namespace of the Lease (the observer's own, `POD_NAMESPACE`).
    pub namespace: String,
    /// Name of the Lease; the RBAC in `config/` allows [`DEFAULT_LEASE_NAME`].
    pub lease_name: String,
    /// Unique among the replicas (the pod name): two replicas with the same
    /// identity would both believe they lead.
    pub identity: String,
}

impl LeaseSettings {
    /// The default Lease in `namespace`, campaigned for as `identity`.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.into(),
        }
    }
}

/// This replica's identity: `POD_NAME` (set from the downward API in
/// `config/base/deployment.yaml`), else the host name plus the process id, which
/// keeps two local processes apart.
pub fn identity_from_env() -> String {
    if let Some(pod) = std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.is_empty())
    {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "tekton-step-observer".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Keeps leader election running; [`LeaderHandle::shutdown`] ends it.
/// Dropping the handle ends it too (the lease is still given up, in the
/// background).
#[derive(Debug)]
pub struct LeaderHandle {
    inner: HandleInner,
}

#[derive(Debug)]
enum HandleInner {
    /// Holds the sender so that receivers keep seeing an open channel.
    Disabled(watch::Sender<bool>),
    Elected {
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    },
}

impl LeaderHandle {
    /// Stops campaigning: flips the channel to `false`, then gives the lease
    /// up so that a standby takes over at once. Call it after the controller
    /// has stopped sending. The channel closes afterwards.
    pub async fn shutdown(self) {
        match self.inner {
            HandleInner::Disabled(sender) => {
                sender.send_replace(false);
            }
            HandleInner::Elected { stop, task } => {
                // An error means the task already ended; nothing to stop.
                let _ = stop.send(());
                if let Err(error) = task.await {
                    tracing::error!(%error, "leader election task failed");
                }
            }
        }
    }
}

/// Without `--leader-elect`: this replica always leads.
pub fn leader_election_disabled() -> (watch::Receiver<bool>, LeaderHandle) {
    let (sender, receiver) = watch::channel(true);
    (
        receiver,
        LeaderHandle {
            inner: HandleInner::Disabled(sender),
        },
    )
}

/// Campaigns for the Lease in the background. The receiver starts `false`
/// and is `true` exactly while this replica holds the lease.
///
/// Takes a [`kube::Config`] rather than a client: the lease requests need
/// timeouts much shorter than the controller's own requests and watches
/// should have, so two clients of its own are built from it. Must be called
/// inside a Tokio runtime.
pub fn spawn_leader_election(
    config: kube::Config,
    settings: LeaseSettings,
) -> Result<(watch::Receiver<bool>, LeaderHandle)> {
    let lease_client =
        Client::try_from(lease_request_config(config.clone())).map_err(|source| Error::Kube {
            operation: "building the leader election client",
            source,
        })?;
    let watch_client = Client::try_from(config).map_err(|source| Error::Kube {
        operation: "building the lease watch client",
        source,
    })?;
    let (sender, receiver) = watch::channel(false);
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(campaign(
        lease_client,
        watch_client,
        settings,
        sender,
        stopped,
    ));
    Ok((
        receiver,
        LeaderHandle {
            inner: HandleInner::Elected { stop, task },
        },
    ))
}

/// The configuration for lease requests: every request ends quickly, and
/// none is retried behind our back (a retry would outlive the lease).
fn lease_request_config(mut config: kube::Config) -> kube::Config {
    config.connect_timeout = Some(LEASE_CONNECT_TIMEOUT);
    config.read_timeout = Some(LEASE_REQUEST_TIMEOUT);
    config.write_timeout = Some(LEASE_REQUEST_TIMEOUT);
    // Count the read timeout from the request, not from when a pooled
    // connection went idle.
    config.reset_reader_on_write = true;
    config.default_retry = false;
    config
}

/// Why a campaign round ended.
enum RoundEnd {
    /// Shutdown was asked for (or the handle dropped).
    Stop,
    /// A lease request failed: build a fresh manager after a pause.
    Failed,
    /// The lease was released while we wait: build a fresh manager now, as
    /// the current one would sleep until the old lease would have expired.
    LeaseFree,
}

async fn campaign(
    lease_client: Client,
    watch_client: Client,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let leases: Api<Lease> = Api::namespaced(watch_client, &settings.namespace);
    let selector = format!("metadata.name={}", settings.lease_name);
    let mut lease_events = watcher(leases, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed()
        .fuse();

    let builder = || {
        LeaseManagerBuilder::new(lease_client.clone(), settings.lease_name.clone())
            .with_namespace(settings.namespace.clone())
            .with_identity(settings.identity.clone())
            .with_duration(LEASE_DURATION_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
    };
    let mut pause = RETRY_PAUSE_MIN;
    let manager = loop {
        let built = tokio::select! {
            biased;
            _ = &mut stop => break None,
            built = builder().build() => built,
        };
        let end = match built {
            Ok(manager) => {
                let end = round(
                    &manager,
                    &settings,
                    &leading,
                    &mut stop,
                    &mut lease_events,
                    &mut pause,
                )
                .await;
                if let RoundEnd::Stop = end {
                    break Some(manager);
                }
                end
            }
            Err(error) => {
                tracing::warn!(lease = %settings.lease_name, %error, "cannot reach the leader lease");
                RoundEnd::Failed
            }
        };
        match end {
            RoundEnd::LeaseFree => pause = RETRY_PAUSE_MIN,
            RoundEnd::Failed | RoundEnd::Stop => {
                tokio::select! {
                    biased;
                    _ = &mut stop => break None,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RETRY_PAUSE_MAX);
            }
        }
    };

    // Stop acting as leader before the lease is free for someone else.
    set_leading(&leading, false, &settings);
    // Releasing is a no-op unless we hold the lease.
    let release = async {
        let manager = match manager {
            Some(manager) => manager,
            // Stopped between rounds, after a failed request: we may still
            // hold the lease, and a fresh manager finds out.
            None => builder().build().await?,
        };
        manager.release().await
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, release).await {
        Ok(Ok(())) => tracing::info!(lease = %settings.lease_name, "left the leader election"),
        Ok(Err(error)) => {
            tracing::warn!(lease = %settings.lease_name, %error, "releasing the leader lease failed; a standby takes over when it expires");
        }
        Err(_) => {
            tracing::warn!(lease = %settings.lease_name, "releasing the leader lease timed out; a standby takes over when it expires");
        }
    }
}

/// Follows one manager until shutdown, an error, or a released lease that a
/// fresh manager should grab at once. Resets `pause` whenever the lease
/// answered.
async fn round<S>(
    manager: &LeaseManager,
    settings: &LeaseSettings,
    leading: &watch::Sender<bool>,
    stop: &mut oneshot::Receiver<()>,
    lease_events: &mut S,
    pause: &mut Duration,
) -> RoundEnd
where
    S: futures::stream::FusedStream<
            Item = std::result::Result<watcher::Event<Lease>, watcher::Error>,
        > + Unpin,
{
    // One `changed()` future lives across lease events: dropping it there
    // would cancel a renewal half-way (the Lease patched, the state not yet
    // re-read), and the next call would renew again at once; as our own
    // renewals are lease events too, that loops.
    let mut changed = std::pin::pin!(manager.changed().fuse());
    loop {
        if changed.is_terminated() {
            changed.set(manager.changed().fuse());
        }
        tokio::select! {
            biased;
            _ = &mut *stop => return RoundEnd::Stop,
            result = &mut changed => match result {
                Ok(now_leading) => {
                    *pause = RETRY_PAUSE_MIN;
                    set_leading(leading, now_leading, settings);
                }
                Err(error) => {
                    // The renewal (or the check) failed: we can no longer be
                    // sure we hold the lease, so stop leading now, and let a
                    // fresh manager find out from the Lease itself.
                    tracing::warn!(lease = %settings.lease_name, %error, "leader lease request failed");
                    set_leading(leading, false, settings);
                    return RoundEnd::Failed;
                }
            },
            event = lease_events.next(), if !lease_events.is_terminated() => match event {
                Some(Ok(event)) if !*leading.borrow() && lease_is_free(&event) => {
                    tracing::debug!(lease = %settings.lease_name, "leader lease released; trying to take it");
                    return RoundEnd::LeaseFree;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    // The watch only speeds up a takeover; without it the
                    // manager still takes the lease when it expires.
                    tracing::debug!(lease = %settings.lease_name, %error, "watching the leader lease failed");
                }
                None => tracing::warn!(lease = %settings.lease_name, "the leader lease watch ended"),
            },
        }
    }
}

/// Whether `event` shows a Lease that nobody holds (released, or deleted).
fn lease_is_free(event: &watcher::Event<Lease>) -> bool {
    match event {
        watcher::Event::Apply(lease) | watcher::Event::InitApply(lease) => lease
            .spec
            .as_ref()
            .and_then(|spec| spec.holder_identity.as_deref())
            .is_none_or(str::is_empty),
        watcher::Event::Delete(_) => true,
        watcher::Event::Init | watcher::Event::InitDone => false,
    }
}

fn set_leading(leading: &watch::Sender<bool>, now: bool, settings: &LeaseSettings) {
    let changed = leading.send_if_modified(|current| {
        let changed = *current != now;
        *current = now;
        changed
    });
    if changed {
        tracing::info!(lease = %settings.lease_name, identity = %settings.identity, leading = now, "leadership changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn free_lease_is_recognised() {
        assert!(lease_is_free(&watcher::Event::Apply(lease(None))));
        assert!(lease_is_free(&watcher::Event::Apply(lease(Some("")))));
        assert!(lease_is_free(&watcher::Event::InitApply(Lease::default())));
        assert!(lease_is_free(&watcher::Event::Delete(lease(Some("a")))));
        assert!(!lease_is_free(&watcher::Event::Apply(lease(Some("a")))));
        assert!(!lease_is_free(&watcher::Event::<Lease>::Init));
        assert!(!lease_is_free(&watcher::Event::<Lease>::InitDone));
    }

    #[test]
    fn lease_requests_are_bounded_and_not_retried() {
        let config =
            lease_request_config(kube::Config::new("https://127.0.0.1:6443".parse().unwrap()));
        assert_eq!(config.connect_timeout, Some(LEASE_CONNECT_TIMEOUT));
        assert_eq!(config.read_timeout, Some(LEASE_REQUEST_TIMEOUT));
        assert_eq!(config.write_timeout, Some(LEASE_REQUEST_TIMEOUT));
        assert!(!config.default_retry);
    }

    #[tokio::test]
    async fn disabled_election_always_leads() {
        let (receiver, handle) = leader_election_disabled();
        assert!(*receiver.borrow());
        // The channel stays open while the handle lives.
        assert!(receiver.has_changed().is_ok());
        handle.shutdown().await;
        assert!(!*receiver.borrow());
    }

    #[tokio::test]
    async fn settings_default_to_the_granted_lease() {
        let settings = LeaseSettings::new("ns", "pod-a");
        assert_eq!(settings.lease_name, DEFAULT_LEASE_NAME);
        assert_eq!(settings.namespace, "ns");
        assert_eq!(settings.identity, "pod-a");
        assert!(!identity_from_env().is_empty());
    }
}

/// Against the local cluster (`hack/cluster exec -- cargo test --lib
/// --features e2e leader::e2e`): takeover timing, no overlap when the leader
/// is cut off from the API server, and the fast hand-over on release.
#[cfg(all(test, feature = "e2e"))]
mod e2e {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::{Instant, timeout};

    /// A TCP proxy to the API server that can turn into a black hole: open
    /// connections stay open but carry nothing, as in a network partition.
    struct Proxy {
        addr: std::net::SocketAddr,
        cut: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    impl Proxy {
        async fn start(upstream: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (cut, cut_rx) = watch::channel(false);
            let graveyard: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if *cut_rx.borrow() {
                        graveyard.lock().unwrap().push(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let mut cut_rx = cut_rx.clone();
                    let graveyard = graveyard.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut_rx.wait_for(|cut| *cut) => {
                                graveyard.lock().unwrap().push(client);
                            }
                        }
                    });
                }
            });
            Self { addr, cut, task }
        }

        fn cut(&self) {
            self.cut.send_replace(true);
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn wait_for(receiver: &mut watch::Receiver<bool>, value: bool, within: Duration) {
        timeout(within, receiver.wait_for(|v| *v == value))
            .await
            .unwrap_or_else(|_| panic!("not {value} within {within:?}"))
            .unwrap();
    }

    #[tokio::test]
    async fn leadership_moves_safely() {
        let config = kube::Config::infer().await.unwrap();
        let namespace = "default";
        let lease_name = format!("leader-e2e-{}", std::process::id());
        let settings = |identity: &str| LeaseSettings {
            namespace: namespace.to_owned(),
            lease_name: lease_name.clone(),
            identity: identity.to_owned(),
        };

        let upstream = format!(
            "{}:{}",
            config.cluster_url.host().unwrap(),
            config.cluster_url.port_u16().unwrap_or(443)
        );
        let proxy = Proxy::start(upstream).await;
        let mut proxied = config.clone();
        proxied.cluster_url = format!("https://{}", proxy.addr).parse().unwrap();

        // A, through the proxy, takes the free lease.
        let (mut a, a_handle) = spawn_leader_election(proxied, settings("a")).unwrap();
        wait_for(&mut a, true, Duration::from_secs(5)).await;

        // Alone, A renews every LEASE_DURATION - LEASE_GRACE seconds, not in
        // a loop: count the Lease's changes for two renewal periods.
        let renew_period = Duration::from_secs(LEASE_DURATION_SECONDS - LEASE_GRACE_SECONDS);
        let leases: Api<Lease> =
            Api::namespaced(Client::try_from(config.clone()).unwrap(), namespace);
        let selector = format!("metadata.name={lease_name}");
        let changes = watcher(leases.clone(), watcher::Config::default().fields(&selector))
            .applied_objects()
            .take_until(tokio::time::sleep(renew_period * 2))
            .count()
            .await;
        // The initial listing, plus one change per renewal (two, or three at
        // a boundary).
        assert!(
            (2..=4).contains(&changes),
            "{changes} Lease changes in {:?}",
            renew_period * 2
        );

        // B waits.
        let (mut b, b_handle) = spawn_leader_election(config.clone(), settings("b")).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!*b.borrow(), "two leaders");

        // Cut A off. It must give up before B may take over.
        let cut_at = Instant::now();
        proxy.cut();
        wait_for(&mut a, false, Duration::from_secs(7)).await;
        let a_gave_up = cut_at.elapsed();
        assert!(!*b.borrow(), "B led while A still did");
        wait_for(&mut b, true, Duration::from_secs(15)).await;
        let b_took_over = cut_at.elapsed();
        eprintln!("A gave up after {a_gave_up:?}, B took over after {b_took_over:?}");
        assert!(b_took_over > a_gave_up);
        assert!(!*a.borrow());
        drop(a_handle);

        // C waits; B shuts down cleanly, and C takes over at once instead of
        // waiting for B's lease to expire.
        let (mut c, c_handle) = spawn_leader_election(config.clone(), settings("c")).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!*c.borrow(), "two leaders");
        let released_at = Instant::now();
        b_handle.shutdown().await;
        assert!(!*b.borrow());
        wait_for(&mut c, true, Duration::from_secs(4)).await;
        eprintln!("C took over {:?} after B released", released_at.elapsed());

        c_handle.shutdown().await;
        let released = leases.get(&lease_name).await.unwrap();
        assert_eq!(
            released.spec.and_then(|spec| spec.holder_identity),
            None,
            "not released on shutdown"
        );
        leases
            .delete(&lease_name, &Default::default())
            .await
            .unwrap();
    }
}
