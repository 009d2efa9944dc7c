//! PURE: turning a step transition into the CloudEvent that announces it.

use cloudevents::{Event, EventBuilder, EventBuilderV10};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::step_event::{EventFormat, StepEventKind};
use crate::steps::Transition;
use crate::tekton::TaskRunRef;

/// The default prefix of event types.
pub const DEFAULT_TYPE_PREFIX: &str = "dev.tekton.event.plugin.step";
/// Where the JSON Schemas of event data are published; `schema/` in the repo.
pub const DEFAULT_DATASCHEMA_BASE: &str =
    "https://raw.githubusercontent.com/tekton-step-observer/tekton-step-observer/main/schema/";
/// The default cap on a log carried in an event: large enough for a useful
/// tail, small enough that sinks with a 1 MiB body limit never refuse it.
pub const DEFAULT_LOG_LIMIT_BYTES: usize = 64 * 1024;

/// How events are named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSettings {
    /// Prefix of the event types (`--type-prefix`).
    pub type_prefix: String,
    /// A fixed `source` (`--source`); by default the TaskRun's API path.
    pub source: Option<String>,
    /// Base URL of the data schemas; the schema file name is appended.
    pub dataschema_base: String,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            type_prefix: DEFAULT_TYPE_PREFIX.to_owned(),
            source: None,
            dataschema_base: DEFAULT_DATASCHEMA_BASE.to_owned(),
        }
    }
}

/// The log of a step, as far as it could be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepLog {
    /// Not carried: started events have no log.
    NotCarried,
    /// The log's text (its tail, if `truncated`).
    Read {
        /// UTF-8 text; invalid bytes replaced.
        text: String,
        /// Whether the head was cut to respect the limit.
        truncated: bool,
    },
    /// It could not be read; why.
    Unavailable(String),
}

/// Everything one event is built from.
#[derive(Clone, Copy, Debug)]
pub struct EventInput<'a> {
    /// The TaskRun.
    pub taskrun: &'a TaskRunRef,
    /// The transition.
    pub transition: &'a Transition,
    /// `status.taskSpec.steps[i]`, verbatim.
    pub step_spec: Option<&'a Value>,
    /// `status.steps[i]`, verbatim.
    pub step_state: Option<&'a Value>,
    /// The pod that runs the steps.
    pub pod_name: Option<&'a str>,
    /// The step's log.
    pub log: &'a StepLog,
}

/// The event id: `<taskrun-uid>-<step>-<type>`, with `-attempt-<n>` for the
/// n-th retry of a TaskRun (the first attempt keeps the original plugin's
/// ids). Deterministic, so a resend carries the same id and a sink can drop
/// the repeat.
pub fn event_id(taskrun_uid: &str, step_name: &str, event_type: &str, attempt: u32) -> String {
    if attempt == 0 {
        format!("{taskrun_uid}-{step_name}-{event_type}")
    } else {
        format!("{taskrun_uid}-{step_name}-{event_type}-attempt-{attempt}")
    }
}

/// The schema file that describes the data of events of `kind`.
pub fn schema_file(kind: StepEventKind) -> String {
    format!("step.{}.v1.json", kind.as_str())
}

/// Builds the CloudEvent for one transition, in the transition's format.
pub fn build_event(settings: &EventSettings, input: EventInput<'_>) -> Result<Event> {
    if input.transition.format == EventFormat::CdEvents {
        return crate::cdevent::build_cdevent(settings, input);
    }
    let EventInput {
        taskrun,
        transition,
        ..
    } = input;
    let event_type = transition.kind.event_type(&settings.type_prefix);
    let source = settings
        .source
        .clone()
        .unwrap_or_else(|| taskrun.api_path());
    let mut builder = EventBuilderV10::new()
        .id(event_id(
            &taskrun.uid,
            &transition.step_name,
            &event_type,
            transition.attempt,
        ))
        .ty(event_type)
        .source(source)
        .subject(transition.step_name.clone())
        .extension("taskrun", taskrun.name.clone())
        .extension("taskrunuid", taskrun.uid.clone())
        .extension("namespace", taskrun.namespace.clone())
        .extension("sequence", transition.sequence() as i64)
        .extension("attempt", i64::from(transition.attempt))
        .data_with_schema(
            "application/json",
            format!(
                "{}{}",
                settings.dataschema_base,
                schema_file(transition.kind)
            ),
            event_data(input),
        );
    if let Some(time) = transition.time {
        builder = builder.time(time);
    }
    if let Some(pipeline_run) = &taskrun.pipeline_run {
        builder = builder.extension("pipelinerun", pipeline_run.clone());
    }
    if let Some(pipeline_task) = &taskrun.pipeline_task {
        builder = builder.extension("pipelinetask", pipeline_task.clone());
    }
    builder
        .build()
        .map_err(|e| Error::BuildEvent(e.to_string()))
}

/// The event's `data`.
pub fn event_data(input: EventInput<'_>) -> Value {
    let pod_ref = input
        .pod_name
        .map(|name| pod_ref(&input.taskrun.namespace, name));
    let mut data = json!({
        "step": input.step_spec.cloned().unwrap_or(Value::Null),
        "stepState": input.step_state.cloned().unwrap_or(Value::Null),
        "podRef": pod_ref,
        "attempt": input.transition.attempt,
    });
    if let Some(reason) = &input.transition.reason {
        data["reason"] = json!(reason);
    }
    input.log.add_to(&mut data);
    data
}

/// A reference to the pod that runs the steps.
pub fn pod_ref(namespace: &str, pod_name: &str) -> Value {
    json!({ "kind": "Pod", "apiVersion": "v1", "namespace": namespace, "name": pod_name })
}

impl StepLog {
    /// Adds `log`, `logTruncated` and, when it could not be read,
    /// `logError` to an event's data; a log not carried adds nothing.
    pub fn add_to(&self, data: &mut Value) {
        match self {
            StepLog::NotCarried => {}
            StepLog::Read { text, truncated } => {
                data["log"] = json!(text);
                data["logTruncated"] = json!(truncated);
            }
            StepLog::Unavailable(why) => {
                data["log"] = Value::Null;
                data["logTruncated"] = json!(false);
                data["logError"] = json!(why);
            }
        }
    }
}

/// Fields of a step's state that only exist once the step ended.
const ENDED_STATE_FIELDS: [&str; 6] = [
    "terminated",
    "terminationReason",
    "results",
    "inputs",
    "outputs",
    "waiting",
];

/// The `stepState` a `started` event carries: the step's state as it was
/// while it ran. A state that has ended since (the event is built late, or
/// sent again after a restart) is rolled back to `running` since
/// `container_started_at`, the container's start as its pod records it
/// (Tekton replaces `terminated.startedAt` with the step's own start), or
/// else since `terminated.startedAt`. So a `started` event resent after its
/// step ended carries what it carried the first time. A state that has not
/// ended is returned as it is.
pub fn state_as_started(state: &Value, container_started_at: Option<&str>) -> Value {
    let Some(terminated) = state.get("terminated") else {
        return state.clone();
    };
    let started_at = container_started_at
        .map(Value::from)
        .or_else(|| terminated.get("startedAt").cloned());
    let mut started = state.clone();
    if let Some(fields) = started.as_object_mut() {
        for field in ENDED_STATE_FIELDS {
            fields.remove(field);
        }
        let running = match started_at {
            Some(at) => json!({ "startedAt": at }),
            None => json!({}),
        };
        fields.insert("running".to_owned(), running);
    }
    started
}

/// Keeps the last `limit` bytes of a log, replacing bytes that are not
/// UTF-8. The tail is what explains a failure.
pub fn cap_log(bytes: &[u8], limit: usize) -> StepLog {
    let truncated = bytes.len() > limit;
    let mut tail = &bytes[bytes.len().saturating_sub(limit)..];
    if truncated {
        // Start at a character boundary rather than with a replaced fragment.
        while let Some((first, rest)) = tail.split_first() {
            if first & 0b1100_0000 != 0b1000_0000 {
                break;
            }
            tail = rest;
        }
    }
    StepLog::Read {
        text: String::from_utf8_lossy(tail).into_owned(),
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::{owed_transitions, run_facts};
    use crate::tekton::TaskRunRef;
    use crate::testing::{TaskRunBuilder, event_input, exited};
    use cloudevents::AttributesReader;

    /// Of PipelineRun `release`, with no pipeline task label.
    fn taskrun_ref() -> TaskRunRef {
        TaskRunRef {
            pipeline_task: None,
            pipeline_run_uid: None,
            ..crate::testing::taskrun_ref()
        }
    }

    #[test]
    fn terminal_event_carries_spec_state_pod_and_log() {
        let taskrun = TaskRunBuilder::new("build-42")
            .step("", exited(1))
            .failed("Failed")
            .build();
        let status = taskrun.status.as_ref().unwrap();
        let facts = run_facts(Some(status)).unwrap();
        let owed = owed_transitions(&facts, &crate::ledger::Ledger::default());
        let failed = &owed[1];
        let tr = taskrun_ref();
        let log = cap_log(b"boom\n", 1024);
        let event = build_event(
            &EventSettings::default(),
            event_input(&tr, status, failed, &log),
        )
        .unwrap();
        assert_eq!(
            event.id(),
            "50df8d70-8c11-4cd4-8fdf-3aa4cb287408-unnamed-0-dev.tekton.event.plugin.step.failed.v1"
        );
        assert_eq!(event.ty(), "dev.tekton.event.plugin.step.failed.v1");
        assert_eq!(
            event.source().as_str(),
            "/apis/tekton.dev/v1/namespaces/ci/taskruns/build-42"
        );
        assert_eq!(event.subject(), Some("unnamed-0"));
        assert_eq!(event.time(), failed.time.as_ref());
        assert_eq!(
            event.extension("pipelinerun").map(ToString::to_string),
            Some("release".into())
        );
        assert!(event.extension("pipelinetask").is_none());
        assert_eq!(
            event.extension("sequence").map(ToString::to_string),
            Some("2".into())
        );
        let data: Value = match event.data() {
            Some(cloudevents::Data::Json(v)) => v.clone(),
            other => panic!("unexpected data {other:?}"),
        };
        assert_eq!(data["log"], "boom\n");
        assert_eq!(data["logTruncated"], false);
        assert_eq!(data["stepState"]["terminated"]["exitCode"], 1);
        assert_eq!(data["step"]["image"], "docker.io/library/alpine:3.20");
        assert_eq!(
            data["podRef"],
            json!({"kind":"Pod","apiVersion":"v1","namespace":"ci","name":"build-42-pod"})
        );
        assert!(
            event
                .dataschema()
                .is_some_and(|s| s.as_str().ends_with("schema/step.failed.v1.json"))
        );
    }

    #[test]
    fn fixed_source_and_type_prefix_apply() {
        let tr = taskrun_ref();
        let transition = Transition {
            attempt: 0,
            sequence_base: 0,
            step_index: 0,
            step_name: "a".into(),
            kind: StepEventKind::Started,
            format: crate::step_event::EventFormat::Native,
            time: None,
            reason: None,
        };
        let settings = EventSettings {
            type_prefix: "tom24d.event.plugin.step".into(),
            source: Some("github.com/tom24d/step-observe-controller".into()),
            ..EventSettings::default()
        };
        let event = build_event(
            &settings,
            EventInput {
                taskrun: &tr,
                transition: &transition,
                step_spec: None,
                step_state: None,
                pod_name: None,
                log: &StepLog::NotCarried,
            },
        )
        .unwrap();
        assert_eq!(event.ty(), "tom24d.event.plugin.step.started.v1");
        assert_eq!(
            event.source().as_str(),
            "github.com/tom24d/step-observe-controller"
        );
        let Some(cloudevents::Data::Json(data)) = event.data() else {
            panic!("no json data")
        };
        assert!(data.get("log").is_none(), "started events carry no log");
    }

    #[test]
    fn a_started_state_is_rolled_back_to_running() {
        let running = json!({
            "name": "a", "container": "step-a", "imageID": "img", "provenance": {},
            "running": {"startedAt": "2026-11-25T10:00:01Z"},
        });
        assert_eq!(
            state_as_started(&running, Some("2026-11-25T10:00:09Z")),
            running
        );
        let ended = json!({
            "name": "a", "container": "step-a", "imageID": "img", "provenance": {},
            "terminated": {"exitCode": 0, "reason": "Completed", "containerID": "c",
                "startedAt": "2026-11-25T10:00:02Z", "finishedAt": "2026-11-25T10:00:03Z"},
            "terminationReason": "Completed",
            "results": [{"name": "r", "value": "v"}],
        });
        // With the container's start from the pod: what the running state said.
        assert_eq!(
            state_as_started(&ended, Some("2026-11-25T10:00:01Z")),
            running
        );
        // Without: the step's own start.
        assert_eq!(
            state_as_started(&ended, None)["running"],
            json!({"startedAt": "2026-11-25T10:00:02Z"})
        );
    }

    #[test]
    fn log_over_the_cap_keeps_the_tail() {
        let log = "x".repeat(100) + "the end";
        assert_eq!(
            cap_log(log.as_bytes(), 7),
            StepLog::Read {
                text: "the end".into(),
                truncated: true
            }
        );
        assert_eq!(
            cap_log(b"short", 7),
            StepLog::Read {
                text: "short".into(),
                truncated: false
            }
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let StepLog::Read { text, .. } = cap_log(b"ok \xff\xfe done", 1024) else {
            panic!()
        };
        assert_eq!(text, "ok \u{fffd}\u{fffd} done");
        // A cut inside a multi-byte character starts at the next character.
        let StepLog::Read { text, truncated } = cap_log("ééé".as_bytes(), 5) else {
            panic!()
        };
        assert!(truncated);
        assert_eq!(text, "éé");
    }

    fn schema_for(kind: StepEventKind) -> jsonschema::Validator {
        let path = format!(
            "{}/schema/{}",
            env!("CARGO_MANIFEST_DIR"),
            schema_file(kind)
        );
        let text = std::fs::read_to_string(&path).unwrap();
        jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn every_kind_of_event_matches_its_published_schema() {
        use crate::ledger::Ledger;
        use crate::testing::skipped;
        let taskrun = TaskRunBuilder::new("tr")
            .step("a", exited(0))
            .step("b", exited(1))
            .step("c", skipped())
            .failed("Failed")
            .build();
        let status = taskrun.status.as_ref().unwrap();
        let facts = run_facts(Some(status)).unwrap();
        let tr = taskrun_ref();
        let logs = [
            cap_log(b"all good", 1024),
            StepLog::Unavailable("pod gone".into()),
        ];
        for transition in owed_transitions(&facts, &Ledger::default()) {
            for log in &logs {
                let data = event_data(event_input(&tr, status, &transition, log));
                let validator = schema_for(transition.kind);
                let errors: Vec<String> = validator
                    .iter_errors(&data)
                    .map(|e| e.to_string())
                    .collect();
                assert!(
                    errors.is_empty(),
                    "{:?} {}: {errors:?}",
                    transition.kind,
                    data
                );
            }
        }
        // And the schema is not vacuous: a terminal event without its log fails.
        let bad = json!({"step": null, "stepState": null, "podRef": null});
        assert!(!schema_for(StepEventKind::Failed).is_valid(&bad));
    }
}
