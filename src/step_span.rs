//! PURE: the OpenTelemetry span of a step run, and the W3C trace context
//! every event of the step carries (`traceparent`).
//!
//! Ids are deterministic, so an event sent before its step's span exists
//! already points at it, and a span built again after a restart is the same
//! span:
//! - the trace is the TaskRun's own when Tekton traces it: the
//!   `traceparent` in `status.spanContext` (or, before Tekton copied it
//!   there, in the annotation `tekton.dev/taskrunSpanContext`), and step
//!   spans are children of the TaskRun's span;
//! - otherwise a trace of its own per TaskRun whose id is the TaskRun's uid
//!   (a UUID is 128 bits, as a trace id is), with the step spans at its root;
//! - a step span's id is the first 8 bytes of SHA-256 of
//!   `<taskrun-uid>/<step>/<attempt>`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::ledger::Ledger;
use crate::step_event::StepEventKind;
use crate::steps::{RunFacts, RunPhase, StepPhase, reached_transitions};

/// The annotation older Tekton took a TaskRun's parent span context from.
pub const SPAN_CONTEXT_ANNOTATION: &str = "tekton.dev/taskrunSpanContext";

/// A W3C trace context (`traceparent`, version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; None for anything else,
    /// including the all-zero ids the spec calls invalid.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || flags.len() != 2 {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(trace)?;
        let span_id: [u8; 8] = hex_bytes(span)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `text` as N bytes of lowercase hex (W3C trace context allows no other).
fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if text.len() != 2 * N || !text.bytes().all(lower_hex) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The trace a TaskRun's step spans go in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunTrace {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The TaskRun's span, where Tekton traces it.
    pub parent_span_id: Option<[u8; 8]>,
    /// Whether the trace is sampled: Tekton's decision where it made one.
    pub sampled: bool,
}

/// The trace of a TaskRun: Tekton's where it gave one (`status.spanContext`,
/// else the annotation), else one of its own from the uid.
pub fn run_trace(
    uid: &str,
    span_context: Option<&BTreeMap<String, String>>,
    annotation: Option<&str>,
) -> RunTrace {
    let from_annotation = || {
        let map: BTreeMap<String, String> = serde_json::from_str(annotation?).ok()?;
        TraceParent::parse(map.get("traceparent")?)
    };
    let tekton = span_context
        .and_then(|c| c.get("traceparent"))
        .and_then(|t| TraceParent::parse(t))
        .or_else(from_annotation);
    match tekton {
        Some(parent) => RunTrace {
            trace_id: parent.trace_id,
            parent_span_id: Some(parent.span_id),
            sampled: parent.sampled,
        },
        None => RunTrace {
            trace_id: trace_id_of_uid(uid),
            parent_span_id: None,
            sampled: true,
        },
    }
}

/// The uid's 32 hex digits when it is a UUID (as Kubernetes uids are), else
/// the first 16 bytes of its SHA-256.
fn trace_id_of_uid(uid: &str) -> [u8; 16] {
    let digits: String = uid.chars().filter(|c| *c != '-').collect();
    match hex_bytes::<16>(&digits) {
        Some(id) if id != [0; 16] => id,
        _ => {
            let digest = ring::digest::digest(&ring::digest::SHA256, uid.as_bytes());
            let mut id = [0u8; 16];
            id.copy_from_slice(&digest.as_ref()[..16]);
            id
        }
    }
}

/// The span id of a step run.
pub fn step_span_id(uid: &str, step_name: &str, attempt: u32) -> [u8; 8] {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{uid}/{step_name}/{attempt}").as_bytes(),
    );
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest.as_ref()[..8]);
    if id == [0; 8] {
        // Invalid as a span id; one chance in 2^64.
        id[7] = 1;
    }
    id
}

/// The `traceparent` of a step run's events: its span in the run's trace.
pub fn step_traceparent(trace: &RunTrace, uid: &str, step_name: &str, attempt: u32) -> TraceParent {
    TraceParent {
        trace_id: trace.trace_id,
        span_id: step_span_id(uid, step_name, attempt),
        sampled: trace.sampled,
    }
}

/// How a step run that ran ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanOutcome {
    /// Exit code 0.
    Succeeded,
    /// Anything else.
    Failed,
}

impl SpanOutcome {
    /// The word in attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanOutcome::Succeeded => "succeeded",
            SpanOutcome::Failed => "failed",
        }
    }
}

/// One step run's span, ready to export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepSpan {
    /// Its trace context.
    pub context: TraceParent,
    /// The TaskRun's span, if Tekton traces it.
    pub parent_span_id: Option<[u8; 8]>,
    /// The step's name.
    pub step_name: String,
    /// Its position in the Task.
    pub step_index: usize,
    /// The TaskRun attempt.
    pub attempt: u32,
    /// When the step started, as Tekton records it.
    pub start: DateTime<Utc>,
    /// When it ended.
    pub end: DateTime<Utc>,
    /// How it ended.
    pub outcome: SpanOutcome,
    /// The exit code, where the step terminated by itself.
    pub exit_code: Option<i64>,
    /// Why it ended, for a failed step (`Error`, `TimeoutExceeded`, ...).
    pub reason: Option<String>,
}

/// The spans a TaskRun's ledger marks owed (a step run whose terminal event
/// was settled while tracing was on) and not yet exported, in step order.
/// Only steps that ran to an end with known times have one; a skipped step
/// never ran.
pub fn owed_spans(facts: &RunFacts, ledger: &Ledger, trace: &RunTrace, uid: &str) -> Vec<StepSpan> {
    let mut starts: BTreeMap<(u32, usize), Option<DateTime<Utc>>> = BTreeMap::new();
    let mut spans = Vec::new();
    for transition in reached_transitions(facts) {
        let key = (transition.attempt, transition.step_index);
        let outcome = match transition.kind {
            StepEventKind::Started => {
                starts.insert(key, transition.time);
                continue;
            }
            StepEventKind::Skipped => continue,
            StepEventKind::Succeeded => SpanOutcome::Succeeded,
            StepEventKind::Failed => SpanOutcome::Failed,
        };
        let owed = ledger
            .step_attempt(&transition.step_name, transition.attempt)
            .is_some_and(|r| r.span_owed());
        if !owed {
            continue;
        }
        let attempt_facts = facts
            .earlier_attempts
            .iter()
            .chain([facts])
            .find(|f| f.attempt == transition.attempt);
        let step = attempt_facts.and_then(|f| f.steps.get(transition.step_index));
        let run_end = attempt_facts.and_then(|f| match f.phase {
            RunPhase::Finished { at, .. } => at,
            RunPhase::Running => None,
        });
        let (start, end, exit_code) = match step.map(|s| &s.phase) {
            Some(StepPhase::Terminated {
                exit_code,
                started_at,
                finished_at,
                ..
            }) => (*started_at, *finished_at, Some(*exit_code)),
            // A running container's start is the pod's for every step but
            // the first: the step's own start is when the one before ended.
            Some(StepPhase::Running { .. }) => (None, run_end, None),
            _ => (None, None, None),
        };
        let start = start.or(starts.get(&key).copied().flatten());
        let end = end.or(transition.time);
        let (Some(start), Some(end)) = (start, end) else {
            continue;
        };
        spans.push(StepSpan {
            context: step_traceparent(trace, uid, &transition.step_name, transition.attempt),
            parent_span_id: trace.parent_span_id,
            step_name: transition.step_name.clone(),
            step_index: transition.step_index,
            attempt: transition.attempt,
            start,
            end: end.max(start),
            outcome,
            exit_code,
            reason: transition
                .reason
                .clone()
                .filter(|_| outcome == SpanOutcome::Failed),
        });
    }
    spans
}

#[cfg(test)]
#[path = "step_span_tests.rs"]
mod tests;
