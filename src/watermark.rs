//! The backfill watermark: the last moment an observer of this install was
//! known to be running, kept as an annotation on the leader-election Lease.
//!
//! `--backfill-window` means "on first install, leave alone what finished
//! long before". Measured from now, it would also leave alone what finished
//! while the observer was down for longer than the window, losing those
//! events silently. Measured from the watermark it does not: at start the
//! observer leaves alone only TaskRuns without a ledger that finished before
//! `watermark − window` (`now − window` on first install, when there is no
//! watermark). The leader moves the watermark on while it runs.
//!
//! The Lease is used whether or not leader election is on: it is the one
//! object the observer may already write (`config/base/rbac.yaml`), and it lives
//! as long as the install. Its holder fields belong to leader election; the
//! watermark is an annotation beside them, written with a merge patch that
//! touches nothing else.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// The annotation on the Lease holding the watermark (RFC 3339, UTC).
pub const WATERMARK_ANNOTATION: &str = "tekton.plugin.step-observer/running-at";

/// How often the leader moves the watermark on. The watermark read at a
/// start is at most this much older than the truth, so at most this much
/// more of the past is backfilled: never less, so nothing is lost.
pub const WATERMARK_INTERVAL: Duration = Duration::from_secs(30);

/// How far the watermark may move on, as the controller knows it. NB: it
/// must not move past what would leave a TaskRun that still owes events
/// outside the window at the next start: a process that crashes in a loop
/// would otherwise move it on at every start while delivering nothing, and
/// what finished early in that time would be left alone for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatermarkLimit {
    /// The first list has not ended: what happened while the observer was
    /// down has not been looked at yet, so the watermark stays.
    NotSynced,
    /// Nothing that finished still owes events: up to now.
    Now,
    /// The earliest completion time among the TaskRuns that finished and
    /// still owe events.
    OldestOwed(DateTime<Utc>),
}

/// The watermark to write under `limit`, or `None` to leave it as it is:
/// at most `oldest owed + window`, so that the next start's cutoff
/// (`watermark − window`) is not after that TaskRun's end.
pub fn watermark_to_write(
    limit: WatermarkLimit,
    now: DateTime<Utc>,
    window: Duration,
) -> Option<DateTime<Utc>> {
    match limit {
        WatermarkLimit::NotSynced => None,
        WatermarkLimit::Now => Some(now),
        WatermarkLimit::OldestOwed(finished) => {
            let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            Some(
                finished
                    .checked_add_signed(window)
                    .map_or(now, |bound| bound.min(now)),
            )
        }
    }
}

/// Field manager of the watermark patch.
const FIELD_MANAGER: &str = "tekton-step-observer-watermark";

/// The moment before which finished TaskRuns without a ledger are left
/// alone: the watermark (never later than now) minus the window.
pub fn backfill_cutoff(
    watermark: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    window: Duration,
) -> DateTime<Utc> {
    let since = watermark.map_or(now, |mark| mark.min(now));
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    since
        .checked_sub_signed(window)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The watermark a Lease carries: `Ok(None)` when it has none, `Err` with
/// the bad text when it cannot be read.
pub fn lease_watermark(lease: &Lease) -> std::result::Result<Option<DateTime<Utc>>, String> {
    let Some(text) = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(WATERMARK_ANNOTATION))
    else {
        return Ok(None);
    };
    DateTime::parse_from_rfc3339(text)
        .map(|mark| Some(mark.with_timezone(&Utc)))
        .map_err(|_| text.clone())
}

/// Where the watermark is kept: the Lease `name` in the Lease's namespace.
#[derive(Clone)]
pub struct WatermarkStore {
    api: Api<Lease>,
    name: String,
    window: Duration,
}

impl WatermarkStore {
    /// The store on Lease `name` of `api`'s namespace, for `--backfill-window`.
    pub fn new(api: Api<Lease>, name: impl Into<String>, window: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            window,
        }
    }

    /// Moves the watermark on as far as `limit` lets it (see
    /// [`watermark_to_write`]); `Ok(false)` when it may not move yet.
    pub async fn advance(&self, limit: WatermarkLimit) -> Result<bool> {
        match watermark_to_write(limit, Utc::now(), self.window) {
            Some(at) => self.write(at).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Reads the watermark. A missing Lease is a first install; an
    /// unreadable Lease or annotation is logged and counts as none (the
    /// first-install rule: nothing older than the window is replayed).
    pub async fn read(&self) -> Option<DateTime<Utc>> {
        match self.api.get_opt(&self.name).await {
            Ok(None) => {
                info!(lease = %self.name, "no backfill watermark yet (first install)");
                None
            }
            Ok(Some(lease)) => match lease_watermark(&lease) {
                Ok(mark) => mark,
                Err(text) => {
                    warn!(lease = %self.name, annotation = WATERMARK_ANNOTATION, %text, "backfill watermark is not an RFC 3339 time; ignoring it");
                    None
                }
            },
            Err(error) => {
                warn!(lease = %self.name, %error, "cannot read the backfill watermark; only the window counts");
                None
            }
        }
    }

    /// Sets the watermark to `at`, creating the Lease if there is none yet
    /// (without leader election nobody else creates it).
    pub async fn write(&self, at: DateTime<Utc>) -> Result<()> {
        let text = at.to_rfc3339_opts(SecondsFormat::Secs, true);
        let patch = json!({"metadata": {"annotations": {WATERMARK_ANNOTATION: text}}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let error = |source| Error::Kube {
            operation: "write the backfill watermark",
            source,
        };
        match self
            .api
            .patch(&self.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        annotations: Some([(WATERMARK_ANNOTATION.to_owned(), text)].into()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(()),
                    // Created meanwhile (by leader election): next time.
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                    Err(source) => Err(error(source)),
                }
            }
            Err(source) => Err(error(source)),
        }
    }

    /// Moves the watermark on every [`WATERMARK_INTERVAL`] while this
    /// replica leads, as far as `limit` (from the controller) lets it, until
    /// `stopping`. Failures are logged and retried at the next tick: a stale
    /// watermark only means more is backfilled.
    pub async fn keep(
        self,
        mut leader: watch::Receiver<bool>,
        mut stopping: watch::Receiver<bool>,
        limit: watch::Receiver<WatermarkLimit>,
    ) {
        let mut ticks = tokio::time::interval(WATERMARK_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Warn once per run of failures, not every tick.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                // Write at once on becoming leader, not up to a tick later.
                changed = leader.changed() => if changed.is_err() { return },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            if !*leader.borrow_and_update() {
                continue;
            }
            let limit = *limit.borrow();
            match self.advance(limit).await {
                Ok(false) => {
                    debug!(lease = %self.name, "backfill watermark held until the first list ends")
                }
                Ok(true) if failing => {
                    failing = false;
                    info!(lease = %self.name, "backfill watermark moved on again");
                }
                Ok(true) => debug!(lease = %self.name, ?limit, "backfill watermark moved on"),
                Err(error) if failing => {
                    debug!(%error, "still cannot move the backfill watermark on")
                }
                Err(error) => {
                    failing = true;
                    warn!(%error, "cannot move the backfill watermark on (a restart then counts --backfill-window back from the last watermark written, or from its own start if none ever was); retrying every {WATERMARK_INTERVAL:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn first_install_counts_the_window_back_from_now() {
        let now = at("2026-12-02T12:00:00Z");
        assert_eq!(backfill_cutoff(None, now, HOUR), at("2026-12-02T11:00:00Z"));
    }

    #[test]
    fn after_downtime_the_window_counts_back_from_the_watermark() {
        // Down for two hours: what finished meanwhile is not left alone.
        let now = at("2026-12-02T12:00:00Z");
        let mark = at("2026-12-02T10:00:00Z");
        assert_eq!(
            backfill_cutoff(Some(mark), now, HOUR),
            at("2026-12-02T09:00:00Z")
        );
    }

    #[test]
    fn a_watermark_from_the_future_counts_as_now() {
        // Clock skew between nodes must not leave more alone than the window.
        let now = at("2026-12-02T12:00:00Z");
        let mark = at("2026-12-02T13:00:00Z");
        assert_eq!(
            backfill_cutoff(Some(mark), now, HOUR),
            at("2026-12-02T11:00:00Z")
        );
    }

    #[test]
    fn an_endless_window_leaves_nothing_alone() {
        let now = at("2026-12-02T12:00:00Z");
        assert_eq!(
            backfill_cutoff(None, now, Duration::MAX),
            DateTime::<Utc>::MIN_UTC
        );
    }

    #[test]
    fn the_watermark_waits_for_the_first_list_and_for_what_is_owed() {
        let now = at("2026-12-02T12:00:00Z");
        assert_eq!(
            watermark_to_write(WatermarkLimit::NotSynced, now, HOUR),
            None
        );
        assert_eq!(
            watermark_to_write(WatermarkLimit::Now, now, HOUR),
            Some(now)
        );
        // Owed since 09:00: the next start's cutoff must not pass 09:00.
        let owed = WatermarkLimit::OldestOwed(at("2026-12-02T09:00:00Z"));
        let mark = watermark_to_write(owed, now, HOUR).unwrap();
        assert_eq!(mark, at("2026-12-02T10:00:00Z"));
        assert_eq!(
            backfill_cutoff(Some(mark), now, HOUR),
            at("2026-12-02T09:00:00Z")
        );
        // Owed since a moment within the window: now.
        let recent = WatermarkLimit::OldestOwed(at("2026-12-02T11:30:00Z"));
        assert_eq!(watermark_to_write(recent, now, HOUR), Some(now));
    }

    #[test]
    fn the_watermark_is_read_from_its_annotation() {
        let mut lease = Lease::default();
        assert_eq!(lease_watermark(&lease), Ok(None));
        lease.metadata.annotations = Some(
            [(
                WATERMARK_ANNOTATION.to_owned(),
                "2026-12-02T10:00:00Z".to_owned(),
            )]
            .into(),
        );
        assert_eq!(
            lease_watermark(&lease),
            Ok(Some(at("2026-12-02T10:00:00Z")))
        );
        lease.metadata.annotations =
            Some([(WATERMARK_ANNOTATION.to_owned(), "yesterday".to_owned())].into());
        assert_eq!(lease_watermark(&lease), Err("yesterday".to_owned()));
    }
}
