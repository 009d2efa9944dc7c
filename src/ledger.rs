//! The ledger: what the observer has already handed to the sink, per step.
//!
//! It lives on the TaskRun in the annotation
//! [`LEDGER_ANNOTATION`](crate::tekton::LEDGER_ANNOTATION), in the original
//! step plugin's shape, so tools written for that plugin keep working:
//!
//! ```json
//! {"statuses":[{"name":"build","emitted":["dev.tekton.event.plugin.step.started.v1"]}]}
//! ```
//!
//! We add optional lists for events settled without the sink taking them:
//! `rejected` (the sink refused it for good, a 4xx), `deadLettered` (sent to
//! the dead-letter sink instead) and `dropped` (the retry policy gave up and
//! there is no dead-letter sink). They are settled too, and never sent again. A retried
//! TaskRun's later attempts get entries of their own with an `attempt`
//! number (`{"name":"build","attempt":1,"emitted":[…]}`); attempt 0 keeps the
//! plugin's shape, with no `attempt`, so a ledger of the original plugin
//! reads as attempt 0. Entries only ever grow, so merging two ledgers is a
//! union and a stale copy can never take an event back.
//!
//! CDEvents (`--event-format cdevents|both`) are recorded in the same lists
//! under their own types, `dev.cdeventsx.tekton-steprun.started.0.1.0` and
//! `…finished.0.1.0`: a step run has one finished event whatever its
//! outcome. Readers that know only the plugin's types skip them.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::step_event::{EventFormat, StepEventKind, cdevents_type};
use crate::tekton::LEDGER_ANNOTATION;

/// How an event was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The sink answered 2xx.
    Delivered,
    /// The sink refused it permanently (4xx other than the retried ones).
    Rejected,
    /// It went to the dead-letter sink (the retry policy gave up, or the
    /// sink refused it for good).
    DeadLettered,
    /// The retry policy gave up and no dead-letter sink is configured.
    Dropped,
}

/// What was settled for one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepRecord {
    /// Step name, as in `status.steps[].name`.
    pub name: String,
    /// The TaskRun attempt (0 for the first run, n for the n-th retry).
    pub attempt: u32,
    delivered: EventSet,
    rejected: EventSet,
    dead_lettered: EventSet,
    dropped: EventSet,
    span: SpanState,
}

/// Where a step run's OpenTelemetry span stands. Ordered: merging keeps the
/// further one, so an exported span is never owed again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum SpanState {
    /// No span: tracing was off when the step's terminal event settled, or
    /// it has not settled yet.
    #[default]
    None,
    /// The step ended while tracing was on; its span is still to export.
    Owed,
    /// The span was exported; it is never exported again.
    Exported,
}

impl StepRecord {
    /// Whether this step run's span is owed and not yet exported.
    pub fn span_owed(&self) -> bool {
        self.span == SpanState::Owed
    }

    /// Whether this step run's span was exported.
    pub fn span_exported(&self) -> bool {
        self.span == SpanState::Exported
    }

    /// Whether the native event of this kind was settled, in any way.
    pub fn settled(&self, kind: StepEventKind) -> bool {
        self.settled_in(EventFormat::Native, kind)
    }

    /// Whether the event of this kind in `format` was settled, in any way.
    /// In CDEvents every terminal kind is the one `finished` event.
    pub fn settled_in(&self, format: EventFormat, kind: StepEventKind) -> bool {
        self.all().contains(format, kind)
    }

    /// Every settled event.
    fn all(&self) -> EventSet {
        EventSet(self.delivered.0 | self.rejected.0 | self.dead_lettered.0 | self.dropped.0)
    }

    /// How the native event of this kind was settled, if it was.
    pub fn settlement(&self, kind: StepEventKind) -> Option<Settlement> {
        self.settlement_in(EventFormat::Native, kind)
    }

    /// How the event of this kind in `format` was settled, if it was.
    pub fn settlement_in(&self, format: EventFormat, kind: StepEventKind) -> Option<Settlement> {
        [
            (self.delivered, Settlement::Delivered),
            (self.rejected, Settlement::Rejected),
            (self.dead_lettered, Settlement::DeadLettered),
            (self.dropped, Settlement::Dropped),
        ]
        .into_iter()
        .find_map(|(set, how)| set.contains(format, kind).then_some(how))
    }

    /// Whether the native event of this kind reached the sink.
    pub fn delivered(&self, kind: StepEventKind) -> bool {
        self.delivered.contains(EventFormat::Native, kind)
    }
}

/// A tiny set of events: bits 0 to 3 the native kinds, bit 4 the CDEvents
/// `started` event and bit 5 its `finished` one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct EventSet(u8);

/// Bits of [`EventSet`] in use.
const EVENT_BITS: u8 = 6;

impl EventSet {
    fn bit(format: EventFormat, kind: StepEventKind) -> u8 {
        match (format, kind) {
            (EventFormat::Native, kind) => 1 << (kind as u8),
            (EventFormat::CdEvents, StepEventKind::Started) => 1 << 4,
            (EventFormat::CdEvents, _) => 1 << 5,
        }
    }
    fn contains(self, format: EventFormat, kind: StepEventKind) -> bool {
        self.0 & Self::bit(format, kind) != 0
    }
    fn insert(&mut self, format: EventFormat, kind: StepEventKind) {
        self.0 |= Self::bit(format, kind);
    }
    /// The full event types in the set, native ones under `type_prefix`.
    fn types(self, type_prefix: &str) -> Vec<String> {
        (0..EVENT_BITS)
            .filter(|bit| self.0 & (1 << bit) != 0)
            .filter_map(|bit| match bit {
                0..=3 => StepEventKind::ALL
                    .get(usize::from(bit))
                    .map(|k| k.event_type(type_prefix)),
                4 => Some(cdevents_type(StepEventKind::Started).to_owned()),
                _ => Some(cdevents_type(StepEventKind::Succeeded).to_owned()),
            })
            .collect()
    }
    /// Adds the event a full type names; types we do not know are ignored.
    fn insert_type(&mut self, event_type: &str) {
        if let Some((format, kind)) = event_of_type(event_type) {
            self.insert(format, kind);
        }
    }
}

/// The whole ledger of one TaskRun, in the order steps were first recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    steps: Vec<StepRecord>,
}

/// The annotation's JSON shape.
#[derive(Deserialize, Serialize)]
struct LedgerJson {
    #[serde(default)]
    statuses: Vec<StepJson>,
}

#[derive(Deserialize, Serialize)]
struct StepJson {
    name: String,
    #[serde(default, skip_serializing_if = "is_first_attempt")]
    attempt: u32,
    #[serde(default)]
    emitted: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rejected: Vec<String>,
    #[serde(
        default,
        rename = "deadLettered",
        skip_serializing_if = "Vec::is_empty"
    )]
    dead_lettered: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    dropped: Vec<String>,
    /// The step run's span: `owed` or `exported` (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    span: Option<String>,
}

fn is_first_attempt(attempt: &u32) -> bool {
    *attempt == 0
}

impl Ledger {
    /// Parses the annotation. Event types are recognised by their last two
    /// segments (`step.started.v1` → started), so a ledger written under
    /// another `--type-prefix` still counts; types we do not know are
    /// ignored rather than failing the whole ledger.
    pub fn parse(annotation: &str) -> Result<Self> {
        // serde would also read a struct from a JSON array; the shape is an object.
        if !annotation.trim_start().starts_with('{') {
            return Err(Error::MalformedLedger(serde::de::Error::custom(
                "expected a JSON object with a \"statuses\" list",
            )));
        }
        let json: LedgerJson = serde_json::from_str(annotation).map_err(Error::MalformedLedger)?;
        let mut ledger = Ledger::default();
        // An index by name keeps parsing linear: a hostile annotation can
        // name some 15 000 steps in 256 KiB, and a scan per entry made that
        // a fifth of a second on every watch event.
        let mut index: std::collections::HashMap<(String, u32), usize> =
            std::collections::HashMap::with_capacity(json.statuses.len());
        for step in json.statuses {
            let at =
                *index
                    .entry((step.name, step.attempt))
                    .or_insert_with_key(|(name, attempt)| {
                        ledger.steps.push(StepRecord {
                            name: name.clone(),
                            attempt: *attempt,
                            ..StepRecord::default()
                        });
                        ledger.steps.len() - 1
                    });
            let record = &mut ledger.steps[at];
            let span = match step.span.as_deref() {
                Some("exported") => SpanState::Exported,
                Some("owed") => SpanState::Owed,
                // Unknown words are ignored, as unknown types are.
                _ => SpanState::None,
            };
            record.span = record.span.max(span);
            for (set, types) in [
                (&mut record.delivered, &step.emitted),
                (&mut record.rejected, &step.rejected),
                (&mut record.dead_lettered, &step.dead_lettered),
                (&mut record.dropped, &step.dropped),
            ] {
                for event_type in types {
                    set.insert_type(event_type);
                }
            }
        }
        Ok(ledger)
    }

    /// Serializes to the annotation's JSON, writing full event types under
    /// `type_prefix`.
    pub fn to_annotation(&self, type_prefix: &str) -> String {
        let to_types = |set: EventSet| set.types(type_prefix);
        let json = LedgerJson {
            statuses: self
                .steps
                .iter()
                .map(|s| StepJson {
                    name: s.name.clone(),
                    attempt: s.attempt,
                    emitted: to_types(s.delivered),
                    rejected: to_types(s.rejected),
                    dead_lettered: to_types(s.dead_lettered),
                    dropped: to_types(s.dropped),
                    span: match s.span {
                        SpanState::None => None,
                        SpanState::Owed => Some("owed".to_owned()),
                        SpanState::Exported => Some("exported".to_owned()),
                    },
                })
                .collect(),
        };
        // Serializing plain strings and vectors cannot fail; fall back to an
        // empty ledger rather than panic if serde ever says otherwise.
        serde_json::to_string(&json).unwrap_or_else(|_| String::from(r#"{"statuses":[]}"#))
    }

    /// The record of one step's first attempt, if any.
    pub fn step(&self, name: &str) -> Option<&StepRecord> {
        self.step_attempt(name, 0)
    }

    /// The record of one step in one attempt, if any.
    pub fn step_attempt(&self, name: &str, attempt: u32) -> Option<&StepRecord> {
        self.steps
            .iter()
            .find(|s| s.name == name && s.attempt == attempt)
    }

    /// Whether the event of `kind` for step `name` (first attempt) is settled.
    pub fn settled(&self, name: &str, kind: StepEventKind) -> bool {
        self.settled_attempt(name, 0, kind)
    }

    /// Whether the native event of `kind` for step `name` in `attempt` is settled.
    pub fn settled_attempt(&self, name: &str, attempt: u32, kind: StepEventKind) -> bool {
        self.step_attempt(name, attempt)
            .is_some_and(|s| s.settled(kind))
    }

    /// Records a native event of the first attempt as settled. Returns whether it was new.
    pub fn record(&mut self, name: &str, kind: StepEventKind, how: Settlement) -> bool {
        self.record_attempt(name, 0, EventFormat::Native, kind, how)
    }

    /// Records an event of `attempt` in `format` as settled. Returns whether it was new.
    pub fn record_attempt(
        &mut self,
        name: &str,
        attempt: u32,
        format: EventFormat,
        kind: StepEventKind,
        how: Settlement,
    ) -> bool {
        if self
            .step_attempt(name, attempt)
            .is_some_and(|s| s.settled_in(format, kind))
        {
            return false;
        }
        let record = self.record_mut(name, attempt);
        let set = match how {
            Settlement::Delivered => &mut record.delivered,
            Settlement::Rejected => &mut record.rejected,
            Settlement::DeadLettered => &mut record.dead_lettered,
            Settlement::Dropped => &mut record.dropped,
        };
        set.insert(format, kind);
        true
    }

    /// Marks the span of a step run owed (its terminal event settled while
    /// tracing is on), unless it was exported. Returns whether it changed.
    pub fn mark_span_owed(&mut self, name: &str, attempt: u32) -> bool {
        self.raise_span(name, attempt, SpanState::Owed)
    }

    /// Marks the span of a step run exported. Returns whether it changed.
    pub fn mark_span_exported(&mut self, name: &str, attempt: u32) -> bool {
        self.raise_span(name, attempt, SpanState::Exported)
    }

    fn raise_span(&mut self, name: &str, attempt: u32, to: SpanState) -> bool {
        if self
            .step_attempt(name, attempt)
            .is_some_and(|s| s.span >= to)
        {
            return false;
        }
        self.record_mut(name, attempt).span = to;
        true
    }

    /// Adds everything `other` settled.
    pub fn merge(&mut self, other: &Ledger) {
        for step in &other.steps {
            let record = self.record_mut(&step.name, step.attempt);
            record.span = record.span.max(step.span);
            record.delivered.0 |= step.delivered.0;
            record.rejected.0 |= step.rejected.0;
            record.dead_lettered.0 |= step.dead_lettered.0;
            record.dropped.0 |= step.dropped.0;
        }
    }

    /// Drops the records of steps `keep` refuses (steps the TaskRun does not
    /// have, whose entries can never count).
    pub fn retain_steps(&mut self, keep: impl Fn(&str) -> bool) {
        self.steps.retain(|step| keep(&step.name));
    }

    /// Whether every event `other` settled is settled here too.
    pub fn covers(&self, other: &Ledger) -> bool {
        other.steps.iter().all(|theirs| {
            let ours = self
                .step_attempt(&theirs.name, theirs.attempt)
                .cloned()
                .unwrap_or_default();
            theirs.all().0 & !ours.all().0 == 0 && ours.span >= theirs.span
        })
    }

    /// Number of settled events.
    pub fn len(&self) -> usize {
        self.steps
            .iter()
            .map(|s| s.all().0.count_ones() as usize)
            .sum()
    }

    /// Whether nothing is settled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The per-step records.
    pub fn steps(&self) -> &[StepRecord] {
        &self.steps
    }

    fn record_mut(&mut self, name: &str, attempt: u32) -> &mut StepRecord {
        let index = match self
            .steps
            .iter()
            .position(|s| s.name == name && s.attempt == attempt)
        {
            Some(index) => index,
            None => {
                self.steps.push(StepRecord {
                    name: name.to_owned(),
                    attempt,
                    ..StepRecord::default()
                });
                self.steps.len() - 1
            }
        };
        &mut self.steps[index]
    }
}

/// The JSON Patch (RFC 6902) that writes `new_value` as the ledger
/// annotation of the TaskRun with `uid`, but only if the annotation still
/// reads `previous` (`None`: absent). A compare-and-swap on the annotation
/// alone: Tekton's status writes, which change the resourceVersion many
/// times a second while steps run, no longer make the write fail, and a
/// TaskRun recreated under the same name (another uid) is never written.
///
/// `annotations_present` says whether `metadata.annotations` exists at all:
/// `add` needs the parent object, so without it the whole map is added.
///
/// NB: absence is tested with `"value": null`. The kube-apiserver applies
/// JSON Patches with evanphx/json-patch (v4 in `k8s.io/apiserver`
/// `handlers/patch.go`), whose `test` of `null` passes on a missing member
/// and fails on any string; RFC 6902 has no other way to test absence.
pub fn compare_and_swap_patch(
    uid: &str,
    previous: Option<&str>,
    annotations_present: bool,
    new_value: &str,
) -> std::result::Result<json_patch::Patch, serde_json::Error> {
    let member = annotation_pointer();
    let mut ops = vec![serde_json::json!({"op": "test", "path": "/metadata/uid", "value": uid})];
    match (previous, annotations_present) {
        (Some(previous), _) => ops.extend([
            serde_json::json!({"op": "test", "path": member, "value": previous}),
            serde_json::json!({"op": "replace", "path": member, "value": new_value}),
        ]),
        (None, true) => ops.extend([
            serde_json::json!({"op": "test", "path": member, "value": null}),
            serde_json::json!({"op": "add", "path": member, "value": new_value}),
        ]),
        (None, false) => ops.extend([
            serde_json::json!({"op": "test", "path": ANNOTATIONS_POINTER, "value": null}),
            serde_json::json!({
                "op": "add",
                "path": ANNOTATIONS_POINTER,
                "value": { LEDGER_ANNOTATION: new_value },
            }),
        ]),
    }
    serde_json::from_value(serde_json::Value::Array(ops))
}

/// Whether an API error answering [`compare_and_swap_patch`] means that the
/// patch did not apply to the TaskRun as it is now: a `test` failed (the
/// annotation or the uid changed under us), or a path it adds to is gone.
///
/// NB: the kube-apiserver answers any JSON Patch that does not apply with a
/// 422 whose message is the generic one below: `handlers/patch.go` passes
/// the library's error ("testing value … failed: test failed") to
/// `NewGenericServerResponse`, which drops it for 422. A 422 from
/// validation (a webhook, an annotation over the size limit) says what is
/// invalid instead.
pub fn patch_did_not_apply(code: u16, message: &str) -> bool {
    code == 422 && (message == PATCH_DID_NOT_APPLY || message.contains("test failed"))
}

/// The kube-apiserver's message for a 422 built by `NewGenericServerResponse`.
const PATCH_DID_NOT_APPLY: &str = "the server rejected our request due to an error in our request";

/// JSON Pointer of the annotations map.
const ANNOTATIONS_POINTER: &str = "/metadata/annotations";

/// JSON Pointer (RFC 6901) of the ledger annotation: `~` and `/` in the key
/// are escaped as `~0` and `~1`.
fn annotation_pointer() -> String {
    let key = LEDGER_ANNOTATION.replace('~', "~0").replace('/', "~1");
    format!("{ANNOTATIONS_POINTER}/{key}")
}

/// Maps a full event type to its event: a native one by its `<kind>.v1`
/// ending, a CDEvents one by `tekton-steprun.<predicate>.` before any
/// version (a CDEvents finished event stands for every terminal kind).
fn event_of_type(event_type: &str) -> Option<(EventFormat, StepEventKind)> {
    if let Some((_, rest)) = event_type.split_once(".cdeventsx.tekton-steprun.") {
        return match rest.split('.').next()? {
            "started" => Some((EventFormat::CdEvents, StepEventKind::Started)),
            "finished" => Some((EventFormat::CdEvents, StepEventKind::Succeeded)),
            _ => None,
        };
    }
    let mut parts = event_type.rsplit('.');
    let version = parts.next()?;
    let kind = parts.next()?;
    if version != "v1" {
        return None;
    }
    StepEventKind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind)
        .map(|kind| (EventFormat::Native, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "dev.tekton.event.plugin.step";

    #[test]
    fn parses_the_original_plugins_shape() {
        let ledger = Ledger::parse(
            r#"{"statuses":[{"name":"build","emitted":["dev.tekton.event.plugin.step.started.v1","dev.tekton.event.plugin.step.succeeded.v1"]},{"name":"push","emitted":["tom24d.event.plugin.step.skipped.v1"]}]}"#,
        )
        .unwrap();
        assert!(ledger.settled("build", StepEventKind::Started));
        assert!(ledger.settled("build", StepEventKind::Succeeded));
        assert!(!ledger.settled("build", StepEventKind::Failed));
        assert!(ledger.settled("push", StepEventKind::Skipped));
        assert_eq!(ledger.len(), 3);
    }

    #[test]
    fn round_trips_with_rejections() {
        let mut ledger = Ledger::default();
        assert!(ledger.record("a", StepEventKind::Started, Settlement::Delivered));
        assert!(ledger.record("a", StepEventKind::Failed, Settlement::Rejected));
        assert!(!ledger.record("a", StepEventKind::Failed, Settlement::Delivered));
        let text = ledger.to_annotation(PREFIX);
        assert_eq!(
            text,
            r#"{"statuses":[{"name":"a","emitted":["dev.tekton.event.plugin.step.started.v1"],"rejected":["dev.tekton.event.plugin.step.failed.v1"]}]}"#
        );
        assert_eq!(Ledger::parse(&text).unwrap(), ledger);
    }

    #[test]
    fn cdevents_are_recorded_beside_native_events_and_read_back() {
        let mut ledger = Ledger::default();
        let cd = EventFormat::CdEvents;
        assert!(ledger.record("a", StepEventKind::Started, Settlement::Delivered));
        assert!(ledger.record_attempt("a", 0, cd, StepEventKind::Started, Settlement::Delivered));
        assert!(ledger.record_attempt("a", 1, cd, StepEventKind::Failed, Settlement::Dropped));
        // One finished event per step run, whatever its outcome.
        assert!(!ledger.record_attempt("a", 1, cd, StepEventKind::Skipped, Settlement::Delivered));
        let text = ledger.to_annotation(PREFIX);
        assert_eq!(
            text,
            r#"{"statuses":[{"name":"a","emitted":["dev.tekton.event.plugin.step.started.v1","dev.cdeventsx.tekton-steprun.started.0.1.0"]},{"name":"a","attempt":1,"emitted":[],"dropped":["dev.cdeventsx.tekton-steprun.finished.0.1.0"]}]}"#
        );
        let back = Ledger::parse(&text).unwrap();
        assert_eq!(back, ledger);
        let first = back.step_attempt("a", 0).unwrap();
        assert!(first.settled_in(cd, StepEventKind::Started));
        assert!(!first.settled_in(cd, StepEventKind::Succeeded));
        let retry = back.step_attempt("a", 1).unwrap();
        assert!(!retry.settled_in(EventFormat::Native, StepEventKind::Failed));
        assert_eq!(
            retry.settlement_in(cd, StepEventKind::Succeeded),
            Some(Settlement::Dropped)
        );
        // A later CDEvents version is still the same step run's event.
        let newer = Ledger::parse(
            r#"{"statuses":[{"name":"a","emitted":["dev.cdeventsx.tekton-steprun.finished.0.2.0"]}]}"#,
        )
        .unwrap();
        assert!(
            newer
                .step("a")
                .unwrap()
                .settled_in(cd, StepEventKind::Failed)
        );
    }

    #[test]
    fn span_states_round_trip_merge_upwards_and_count_in_covers() {
        let mut ledger = Ledger::default();
        assert!(ledger.record("a", StepEventKind::Succeeded, Settlement::Delivered));
        assert!(ledger.mark_span_owed("a", 0));
        assert!(!ledger.mark_span_owed("a", 0));
        let owed = ledger.clone();
        let text = ledger.to_annotation(PREFIX);
        assert_eq!(
            text,
            r#"{"statuses":[{"name":"a","emitted":["dev.tekton.event.plugin.step.succeeded.v1"],"span":"owed"}]}"#
        );
        assert_eq!(Ledger::parse(&text).unwrap(), ledger);
        assert!(ledger.step("a").unwrap().span_owed());
        assert!(ledger.mark_span_exported("a", 0));
        // Exported is final: owing it again is a no-op, and a stale copy
        // that says owed cannot take it back.
        assert!(!ledger.mark_span_owed("a", 0));
        let mut merged = owed.clone();
        merged.merge(&ledger);
        assert!(merged.step("a").unwrap().span_exported());
        assert!(
            !owed.covers(&ledger),
            "an export not yet written is not covered"
        );
        assert!(ledger.covers(&owed));
        assert!(
            Ledger::parse(r#"{"statuses":[{"name":"a","emitted":[],"span":"weird"}]}"#).is_ok()
        );
    }

    #[test]
    fn dead_lettered_and_dropped_round_trip_and_count_as_settled() {
        let mut ledger = Ledger::default();
        ledger.record("a", StepEventKind::Started, Settlement::DeadLettered);
        ledger.record("a", StepEventKind::Failed, Settlement::Dropped);
        assert!(!ledger.record("a", StepEventKind::Failed, Settlement::Delivered));
        let text = ledger.to_annotation(PREFIX);
        assert_eq!(
            text,
            format!(
                r#"{{"statuses":[{{"name":"a","emitted":[],"deadLettered":["{PREFIX}.started.v1"],"dropped":["{PREFIX}.failed.v1"]}}]}}"#
            )
        );
        let parsed = Ledger::parse(&text).unwrap();
        assert_eq!(parsed, ledger);
        assert_eq!(parsed.len(), 2);
        let step = parsed.step("a").unwrap();
        assert_eq!(
            step.settlement(StepEventKind::Started),
            Some(Settlement::DeadLettered)
        );
        assert_eq!(
            step.settlement(StepEventKind::Failed),
            Some(Settlement::Dropped)
        );
        assert_eq!(step.settlement(StepEventKind::Succeeded), None);
        let mut delivered_only = Ledger::default();
        delivered_only.record("a", StepEventKind::Started, Settlement::Delivered);
        assert!(parsed.covers(&delivered_only));
        assert!(!delivered_only.covers(&parsed));
    }

    #[test]
    fn later_attempts_get_entries_of_their_own() {
        let mut ledger = Ledger::default();
        ledger.record("a", StepEventKind::Started, Settlement::Delivered);
        ledger.record("a", StepEventKind::Failed, Settlement::Delivered);
        ledger.record_attempt(
            "a",
            1,
            EventFormat::Native,
            StepEventKind::Started,
            Settlement::Delivered,
        );
        let text = ledger.to_annotation(PREFIX);
        assert_eq!(
            text,
            format!(
                r#"{{"statuses":[{{"name":"a","emitted":["{PREFIX}.started.v1","{PREFIX}.failed.v1"]}},{{"name":"a","attempt":1,"emitted":["{PREFIX}.started.v1"]}}]}}"#
            )
        );
        let parsed = Ledger::parse(&text).unwrap();
        assert_eq!(parsed, ledger);
        assert!(parsed.settled("a", StepEventKind::Failed));
        assert!(!parsed.settled_attempt("a", 1, StepEventKind::Failed));
        assert!(parsed.settled_attempt("a", 1, StepEventKind::Started));
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn malformed_annotations_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"statuses":"x"}"#,
            r#"{"statuses":[{"emitted":[]}]}"#,
        ] {
            assert!(Ledger::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn unknown_types_and_steps_are_kept_harmless() {
        let ledger = Ledger::parse(
            r#"{"statuses":[{"name":"ghost","emitted":["x.y.exploded.v1","nonsense",""]}],"extra":1}"#,
        )
        .unwrap();
        assert!(ledger.is_empty());
    }

    #[test]
    fn a_full_size_hostile_annotation_parses_and_merges_repeats() {
        // 256 KiB of distinct made-up steps, the most a writer can pack in.
        let mut text = String::from(r#"{"statuses":[{"name":"g0"}"#);
        let mut i = 1;
        while text.len() < 256 * 1024 - 40 {
            text.push_str(&format!(r#",{{"name":"g{i}"}}"#));
            i += 1;
        }
        text.push_str(r#",{"name":"g0","emitted":["x.failed.v1"]}]}"#);
        // Its cost (linear since parsing indexes names) is a benchmark
        // matter, not asserted here.
        let ledger = Ledger::parse(&text).unwrap();
        assert_eq!(ledger.steps().len(), i);
        assert!(
            ledger.settled("g0", StepEventKind::Failed),
            "a repeated name merges"
        );
    }

    #[test]
    fn retain_steps_drops_foreign_entries_only() {
        let mut ghosts = String::from(r#"{"statuses":["#);
        for i in 0..5000 {
            ghosts.push_str(&format!(
                r#"{{"name":"g{i}","emitted":["{PREFIX}.started.v1"]}},"#
            ));
        }
        ghosts.push_str(r#"{"name":"a","emitted":["x.started.v1"]}]}"#);
        let mut ledger = Ledger::parse(&ghosts).unwrap();
        assert_eq!(ledger.len(), 5001);
        let mut settled = Ledger::default();
        settled.record("b", StepEventKind::Started, Settlement::Delivered);
        ledger.merge(&settled);
        ledger.retain_steps(|name| ["a", "b"].contains(&name));
        assert_eq!(
            ledger.to_annotation(PREFIX),
            format!(
                r#"{{"statuses":[{{"name":"a","emitted":["{PREFIX}.started.v1"]}},{{"name":"b","emitted":["{PREFIX}.started.v1"]}}]}}"#
            )
        );
    }

    #[test]
    fn merge_is_a_union_and_covers_tells_containment() {
        let mut a = Ledger::default();
        a.record("s", StepEventKind::Started, Settlement::Delivered);
        let mut b = Ledger::default();
        b.record("s", StepEventKind::Succeeded, Settlement::Delivered);
        b.record("t", StepEventKind::Skipped, Settlement::Rejected);
        assert!(!a.covers(&b));
        a.merge(&b);
        assert!(a.covers(&b));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn ledger_patch_replaces_only_the_value_it_read() {
        let doc = |value: &str| {
            serde_json::json!({"metadata": {"uid": "u1", "annotations": {
                LEDGER_ANNOTATION: value, "other": "kept"}}})
        };
        let patch = compare_and_swap_patch("u1", Some("old"), true, "new").unwrap();
        let mut current = doc("old");
        json_patch::patch(&mut current, &patch).unwrap();
        assert_eq!(current, doc("new"));
        // Someone else wrote the annotation since it was read: nothing changes.
        let mut moved_on = doc("theirs");
        assert!(json_patch::patch(&mut moved_on, &patch).is_err());
        assert_eq!(moved_on, doc("theirs"));
        // Another TaskRun under the same name: nothing changes.
        let mut recreated = doc("old");
        recreated["metadata"]["uid"] = serde_json::json!("u2");
        assert!(json_patch::patch(&mut recreated, &patch).is_err());
    }

    #[test]
    fn ledger_patch_tests_absence_with_null_and_escapes_the_key() {
        let ops = |patch: json_patch::Patch| serde_json::to_value(patch).unwrap();
        let key = "/metadata/annotations/tekton.plugin.step-observer~1result";
        assert_eq!(
            ops(compare_and_swap_patch("u1", None, true, "new").unwrap()),
            serde_json::json!([
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "test", "path": key, "value": null},
                {"op": "add", "path": key, "value": "new"},
            ])
        );
        assert_eq!(
            ops(compare_and_swap_patch("u1", None, false, "new").unwrap()),
            serde_json::json!([
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "test", "path": "/metadata/annotations", "value": null},
                {"op": "add", "path": "/metadata/annotations",
                 "value": {LEDGER_ANNOTATION: "new"}},
            ])
        );
    }

    #[test]
    fn only_a_failed_test_counts_as_a_conflict() {
        assert!(patch_did_not_apply(
            422,
            "testing value /metadata/uid failed: test failed"
        ));
        assert!(!patch_did_not_apply(
            422,
            "add operation does not apply: doc is missing path"
        ));
        assert!(patch_did_not_apply(422, PATCH_DID_NOT_APPLY));
        assert!(!patch_did_not_apply(
            422,
            "TaskRun.tekton.dev \"tr\" is invalid: metadata.annotations: Too long"
        ));
        assert!(!patch_did_not_apply(500, "test failed"));
    }
}
