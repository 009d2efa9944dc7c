//! PURE: the CDEvents form of a step transition (`--event-format cdevents`).
//!
//! CDEvents stops at `taskRun`, so a step run is a custom event under the
//! spec's convention `dev.cdeventsx.<tool>-<subject>.<predicate>.<version>`:
//! `dev.cdeventsx.tekton-steprun.started.0.1.0` and `….finished.0.1.0`.
//! A `finished` event's `outcome` is one of the four CDEvents outcomes (see
//! [`outcome`]); a step that never ran is `finished` with outcome `cancel`,
//! `skipped: true` and the reason, since the spec has no skipped outcome and
//! custom content may carry any field.
//!
//! NB: `cdevents-sdk` 0.4 builds events from its own subject contents and
//! has no setter for `schemaUri`, `chainId` or `links`. So the document is
//! written here as JSON and read back with the SDK, whose parser checks the
//! envelope (spec version, id, uri-reference sources, the custom type), and
//! the SDK turns it into the CloudEvent of the CDEvents binding. Our own
//! extensions are added to that CloudEvent afterwards.

use cdevents_sdk::CDEvent;
use chrono::{SecondsFormat, Utc};
use cloudevents::Event;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::event::{EventInput, EventSettings, event_id, pod_ref};
use crate::step_event::{StepEventKind, cdevents_type};
use crate::steps::Transition;
use crate::tekton::TaskRunRef;

/// The CDEvents spec version the events follow.
pub const SPEC_VERSION: &str = "0.5.0";

/// `terminated.reason` / `terminationReason` values that mean the step was
/// stopped by a cancellation.
const CANCEL_REASONS: [&str; 2] = ["TaskRunCancelled", "Cancelled"];

/// Reasons that say the step itself failed: it exited non-zero (`Error`,
/// `ExitCode<n>`), ran out of its own time or memory, or the run failed
/// under it for a step's failure (`Failed`).
const STEP_FAILURE_REASONS: [&str; 4] = ["Error", "TimeoutExceeded", "OOMKilled", "Failed"];

/// The schema file, under `schema/`, of CDEvents of `kind`.
pub fn schema_file(kind: StepEventKind) -> String {
    format!("cdevents/{}.json", type_tail(cdevents_type(kind)))
}

/// `tekton-steprun.started.0.1.0` of `dev.cdeventsx.tekton-steprun.started.0.1.0`.
fn type_tail(ty: &str) -> &str {
    ty.strip_prefix("dev.cdeventsx.").unwrap_or(ty)
}

/// The CDEvents `outcome` of a terminal transition: `success` for a step
/// that exited 0; `cancel` for one stopped by a cancellation or that never
/// ran (skipped); `failure` for one that failed by itself; `error` for one
/// the run ended from outside (TaskRun timeout, pod lost, image not
/// pulled), which says nothing about the step's own work.
pub fn outcome(transition: &Transition) -> &'static str {
    let reason = transition.reason.as_deref().unwrap_or("");
    match transition.kind {
        StepEventKind::Started | StepEventKind::Succeeded => "success",
        StepEventKind::Skipped => "cancel",
        StepEventKind::Failed if CANCEL_REASONS.contains(&reason) => "cancel",
        StepEventKind::Failed
            if STEP_FAILURE_REASONS.contains(&reason) || reason.starts_with("ExitCode") =>
        {
            "failure"
        }
        StepEventKind::Failed => "error",
    }
}

/// `subject.id`: the step run, `<taskrun-uid>/<step>`, with `/attempt-<n>`
/// for the n-th retry, the same in its `started` and `finished` events.
pub fn subject_id(taskrun_uid: &str, transition: &Transition) -> String {
    if transition.attempt == 0 {
        format!("{taskrun_uid}/{}", transition.step_name)
    } else {
        format!(
            "{taskrun_uid}/{}/attempt-{}",
            transition.step_name, transition.attempt
        )
    }
}

/// A RELATION link to a Tekton object. `target.contextId` is the object's
/// uid, which is also the `chainId` of its events; the tags say what it is.
fn relation(link_kind: &str, kind: &str, taskrun: &TaskRunRef, name: &str, uid: &str) -> Value {
    json!({
        "linkType": "RELATION",
        "linkKind": link_kind,
        "target": { "contextId": uid },
        "tags": {
            "apiVersion": taskrun.version.api_version(),
            "kind": kind,
            "namespace": taskrun.namespace,
            "name": name,
        },
    })
}

/// The CDEvent document of a transition (the `data` of its CloudEvent).
pub fn cdevent_document(settings: &EventSettings, input: EventInput<'_>) -> Value {
    let EventInput {
        taskrun,
        transition,
        ..
    } = input;
    let ty = cdevents_type(transition.kind);
    let taskrun_path = taskrun.api_path();
    let mut links = vec![relation(
        "taskRun",
        "TaskRun",
        taskrun,
        &taskrun.name,
        &taskrun.uid,
    )];
    if let (Some(name), Some(uid)) = (&taskrun.pipeline_run, &taskrun.pipeline_run_uid) {
        links.push(relation("pipelineRun", "PipelineRun", taskrun, name, uid));
    }
    if matches!(
        transition.kind,
        StepEventKind::Succeeded | StepEventKind::Failed
    ) {
        // The step's `started` event comes before; its id is deterministic.
        let started = event_id(
            &taskrun.uid,
            &transition.step_name,
            cdevents_type(StepEventKind::Started),
            transition.attempt,
        );
        // NB: with no `tags` the CDEvents Go SDK writes `"tags": null` when
        // it re-serialises the event, which its own schema then refuses.
        links.push(json!({
            "linkType": "PATH",
            "from": { "contextId": started },
            "tags": { "stepName": transition.step_name },
        }));
    }
    let timestamp = transition
        .time
        .unwrap_or_else(Utc::now)
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    json!({
        "context": {
            "specversion": SPEC_VERSION,
            "id": event_id(&taskrun.uid, &transition.step_name, ty, transition.attempt),
            "source": settings.source.clone().unwrap_or_else(|| taskrun_path.clone()),
            "type": ty,
            "timestamp": timestamp,
            "schemaUri": format!("{}{}", settings.dataschema_base, schema_file(transition.kind)),
            "chainId": taskrun.pipeline_run_uid.as_deref().unwrap_or(&taskrun.uid),
            "links": links,
        },
        "subject": {
            "id": subject_id(&taskrun.uid, transition),
            "source": format!("{taskrun_path}/steps/{}", transition.step_name),
            "content": content(input),
        },
    })
}

/// `subject.content`: the step run.
fn content(input: EventInput<'_>) -> Value {
    let EventInput {
        taskrun,
        transition,
        ..
    } = input;
    let pod_ref = input.pod_name.map(|name| pod_ref(&taskrun.namespace, name));
    let mut content = json!({
        "stepName": transition.step_name,
        "stepIndex": transition.step_index,
        "attempt": transition.attempt,
        "sequence": transition.sequence(),
        "taskRun": { "namespace": taskrun.namespace, "name": taskrun.name, "uid": taskrun.uid },
        "podRef": pod_ref,
        "step": input.step_spec.cloned().unwrap_or(Value::Null),
        "stepState": input.step_state.cloned().unwrap_or(Value::Null),
    });
    if let Some(name) = &taskrun.pipeline_run {
        content["pipelineRun"] = json!({
            "namespace": taskrun.namespace,
            "name": name,
            "uid": taskrun.pipeline_run_uid,
        });
    }
    if let Some(task) = &taskrun.pipeline_task {
        content["pipelineTask"] = json!(task);
    }
    if !transition.kind.is_terminal() {
        return content;
    }
    content["outcome"] = json!(outcome(transition));
    content["skipped"] = json!(transition.kind == StepEventKind::Skipped);
    if let Some(reason) = &transition.reason {
        content["reason"] = json!(reason);
    }
    let exit_code = input
        .step_state
        .and_then(|s| s.pointer("/terminated/exitCode"))
        .and_then(Value::as_i64);
    if let Some(code) = exit_code.filter(|_| transition.kind != StepEventKind::Skipped) {
        content["exitCode"] = json!(code);
    }
    input.log.add_to(&mut content);
    content
}

/// Builds the CloudEvent (CDEvents binding) of a transition, with our
/// extensions, as [`crate::event::build_event`] gives native events.
pub fn build_cdevent(settings: &EventSettings, input: EventInput<'_>) -> Result<Event> {
    let document = cdevent_document(settings, input);
    let cdevent: CDEvent = serde_json::from_value(document)
        .map_err(|e| Error::BuildEvent(format!("not a valid CDEvent: {e}")))?;
    let mut event =
        Event::try_from(cdevent).map_err(|e| Error::BuildEvent(format!("CDEvent binding: {e}")))?;
    let EventInput {
        taskrun,
        transition,
        ..
    } = input;
    event.set_extension("taskrun", taskrun.name.clone());
    event.set_extension("taskrunuid", taskrun.uid.clone());
    event.set_extension("namespace", taskrun.namespace.clone());
    event.set_extension("sequence", transition.sequence() as i64);
    event.set_extension("attempt", i64::from(transition.attempt));
    if let Some(pipeline_run) = &taskrun.pipeline_run {
        event.set_extension("pipelinerun", pipeline_run.clone());
    }
    if let Some(pipeline_task) = &taskrun.pipeline_task {
        event.set_extension("pipelinetask", pipeline_task.clone());
    }
    Ok(event)
}

#[cfg(test)]
#[path = "cdevent_tests.rs"]
mod tests;
