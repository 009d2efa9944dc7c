use super::*;
use crate::event::{EventInput, EventSettings, StepLog, build_event, cap_log};
use crate::ledger::Ledger;
use crate::step_event::{EventFormat, EventFormats};
use crate::steps::{owed_in_formats, run_facts};
use crate::tekton::TaskRunRef;
use crate::testing::{TaskRunBuilder, event_input, exited, killed, skipped, taskrun_ref};
use cloudevents::AttributesReader;

fn transition(kind: StepEventKind, reason: Option<&str>) -> Transition {
    Transition {
        attempt: 0,
        sequence_base: 0,
        step_index: 1,
        step_name: "compile".into(),
        kind,
        format: EventFormat::CdEvents,
        time: Some(crate::testing::created()),
        reason: reason.map(str::to_owned),
    }
}

fn input<'a>(
    taskrun: &'a TaskRunRef,
    transition: &'a Transition,
    log: &'a StepLog,
) -> EventInput<'a> {
    EventInput {
        taskrun,
        transition,
        step_spec: None,
        step_state: None,
        pod_name: Some("build-42-pod"),
        log,
    }
}

#[test]
fn outcomes_follow_why_the_step_ended() {
    use StepEventKind::*;
    let table = [
        (Succeeded, None, "success"),
        (Failed, Some("Error"), "failure"),
        (Failed, Some("ExitCode3"), "failure"),
        (Failed, Some("TimeoutExceeded"), "failure"),
        (Failed, Some("OOMKilled"), "failure"),
        (Failed, Some("TaskRunCancelled"), "cancel"),
        (Failed, Some("Cancelled"), "cancel"),
        (Failed, Some("TaskRunTimeout"), "error"),
        (Failed, Some("TaskRunImagePullFailed"), "error"),
        (Failed, Some("TaskRunFinished"), "error"),
        (Failed, None, "error"),
        (Skipped, Some("WhenExpressionsFalse"), "cancel"),
        (Skipped, Some("PreviousStepFailed"), "cancel"),
    ];
    for (kind, reason, want) in table {
        assert_eq!(
            outcome(&transition(kind, reason)),
            want,
            "{kind:?} {reason:?}"
        );
    }
}

#[test]
fn context_and_subject_identify_the_step_run_and_link_its_runs() {
    let tr = taskrun_ref();
    let finished = transition(StepEventKind::Failed, Some("Error"));
    let log = cap_log(b"boom\n", 1024);
    let doc = cdevent_document(&EventSettings::default(), input(&tr, &finished, &log));
    let context = &doc["context"];
    assert_eq!(context["specversion"], "0.5.0");
    assert_eq!(
        context["type"],
        "dev.cdeventsx.tekton-steprun.finished.0.1.0"
    );
    assert_eq!(
        context["id"],
        "50df8d70-8c11-4cd4-8fdf-3aa4cb287408-compile-dev.cdeventsx.tekton-steprun.finished.0.1.0"
    );
    assert_eq!(
        context["source"],
        "/apis/tekton.dev/v1/namespaces/ci/taskruns/build-42"
    );
    assert_eq!(context["chainId"], "0f3c8a42-2f7e-4c0b-9b55-8d8a0c4f1e21");
    assert!(
        context["schemaUri"]
            .as_str()
            .is_some_and(|s| s.ends_with("schema/cdevents/tekton-steprun.finished.0.1.0.json"))
    );
    let links = context["links"].as_array().unwrap();
    assert_eq!(links[0]["linkKind"], "taskRun");
    assert_eq!(links[0]["target"]["contextId"], tr.uid);
    assert_eq!(links[0]["tags"]["name"], "build-42");
    assert_eq!(links[1]["linkKind"], "pipelineRun");
    assert_eq!(links[1]["tags"]["name"], "release");
    assert!(
        links.iter().all(|l| l["tags"].is_object()),
        "every link has tags: the Go SDK turns absent ones into null"
    );
    assert_eq!(links[2]["linkType"], "PATH");
    assert_eq!(
        links[2]["from"]["contextId"],
        "50df8d70-8c11-4cd4-8fdf-3aa4cb287408-compile-dev.cdeventsx.tekton-steprun.started.0.1.0"
    );
    assert_eq!(
        doc["subject"]["id"],
        "50df8d70-8c11-4cd4-8fdf-3aa4cb287408/compile"
    );
    assert_eq!(
        doc["subject"]["source"],
        "/apis/tekton.dev/v1/namespaces/ci/taskruns/build-42/steps/compile"
    );
    let content = &doc["subject"]["content"];
    assert_eq!(content["outcome"], "failure");
    assert_eq!(content["skipped"], false);
    assert_eq!(content["reason"], "Error");
    assert_eq!(content["log"], "boom\n");
    assert_eq!(content["sequence"], 4);
    assert_eq!(content["pipelineTask"], "build");

    // A TaskRun of its own: the chain is the TaskRun, no PipelineRun link;
    // a retry's step run is another subject.
    let alone = TaskRunRef {
        pipeline_run: None,
        pipeline_task: None,
        pipeline_run_uid: None,
        ..taskrun_ref()
    };
    let retried = Transition {
        attempt: 2,
        kind: StepEventKind::Started,
        ..finished.clone()
    };
    let doc = cdevent_document(
        &EventSettings::default(),
        input(&alone, &retried, &StepLog::NotCarried),
    );
    assert_eq!(doc["context"]["chainId"], alone.uid);
    assert_eq!(doc["context"]["links"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        doc["subject"]["id"],
        "50df8d70-8c11-4cd4-8fdf-3aa4cb287408/compile/attempt-2"
    );
    assert!(doc["subject"]["content"].get("outcome").is_none());
}

#[test]
fn the_cloudevent_is_the_cdevents_binding_with_our_extensions() {
    let tr = taskrun_ref();
    let started = Transition {
        format: EventFormat::CdEvents,
        ..transition(StepEventKind::Started, None)
    };
    let event = build_event(
        &EventSettings::default(),
        input(&tr, &started, &StepLog::NotCarried),
    )
    .unwrap();
    assert_eq!(event.ty(), "dev.cdeventsx.tekton-steprun.started.0.1.0");
    assert_eq!(
        event.id(),
        "50df8d70-8c11-4cd4-8fdf-3aa4cb287408-compile-dev.cdeventsx.tekton-steprun.started.0.1.0"
    );
    assert_eq!(
        event.subject(),
        Some("50df8d70-8c11-4cd4-8fdf-3aa4cb287408/compile")
    );
    assert_eq!(event.time(), started.time.as_ref());
    for (name, want) in [
        ("taskrun", "build-42"),
        ("namespace", "ci"),
        ("sequence", "3"),
        ("attempt", "0"),
        ("pipelinerun", "release"),
        ("pipelinetask", "build"),
    ] {
        assert_eq!(
            event.extension(name).map(ToString::to_string).as_deref(),
            Some(want),
            "{name}"
        );
    }
    // The data is the CDEvent itself, and the SDK reads it back.
    let Some(cloudevents::Data::Json(data)) = event.data() else {
        panic!("no JSON data")
    };
    let back: cdevents_sdk::CDEvent = serde_json::from_value(data.clone()).unwrap();
    assert_eq!(back.ty(), "dev.cdeventsx.tekton-steprun.started.0.1.0");
    assert_eq!(data["subject"]["content"]["stepName"], "compile");
}

#[test]
fn a_source_that_is_not_a_uri_reference_is_an_error_not_a_bad_event() {
    let tr = taskrun_ref();
    let started = transition(StepEventKind::Started, None);
    let settings = EventSettings {
        source: Some("not a uri reference".into()),
        ..EventSettings::default()
    };
    let built = build_cdevent(&settings, input(&tr, &started, &StepLog::NotCarried));
    assert!(matches!(built, Err(Error::BuildEvent(_))), "{built:?}");
}

/// The CDEvents spec's schemas, as the Go SDK pinned in
/// `hack/cdevents-validate` embeds them (Go raw strings in
/// `pkg/api/schemas.go`), read from the Go module cache: the custom-event
/// schema and the link schemas it refers to.
fn spec_schemas() -> Vec<(String, Value)> {
    let pinned = concat!(env!("CARGO_MANIFEST_DIR"), "/hack/cdevents-validate");
    let download = std::process::Command::new("go")
        .args(["mod", "download", "-json", "github.com/cdevents/sdk-go"])
        .current_dir(pinned)
        .output()
        .expect("go runs (the CDEvents schemas come from the Go module cache)");
    assert!(
        download.status.success(),
        "go mod download: {}",
        String::from_utf8_lossy(&download.stdout)
    );
    let module: Value = serde_json::from_slice(&download.stdout).unwrap();
    let source = std::fs::read_to_string(format!(
        "{}/pkg/api/schemas.go",
        module["Dir"].as_str().unwrap()
    ))
    .unwrap();
    let base = format!("https://cdevents.dev/{SPEC_VERSION}/schema/");
    let names = [
        "custom",
        "links/embeddedlinksarray",
        "links/embeddedlinkend",
        "links/embeddedlinkpath",
        "links/embeddedlinkrelation",
    ];
    names
        .into_iter()
        .map(|name| {
            let id = format!("{base}{name}");
            let start = source
                .find(&format!("\"{id}\": `"))
                .unwrap_or_else(|| panic!("{id} is not in the SDK's schemas.go"));
            let text = &source[start..];
            let body = &text[text.find('`').unwrap() + 1..];
            let body = &body[..body.find('`').unwrap()];
            (id, serde_json::from_str(body).unwrap())
        })
        .collect()
}

fn our_schema(kind: StepEventKind) -> Value {
    let path = format!(
        "{}/schema/{}",
        env!("CARGO_MANIFEST_DIR"),
        schema_file(kind)
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn every_event_validates_against_the_spec_custom_schema_and_ours() {
    let spec = spec_schemas();
    let mut registry = jsonschema::Registry::new();
    for (id, schema) in &spec {
        registry = registry.add(id.as_str(), schema).unwrap();
    }
    let registry = registry.prepare().unwrap();
    let custom = jsonschema::options()
        .with_registry(&registry)
        .should_validate_formats(true)
        .build(&spec[0].1)
        .unwrap();
    let ours = |kind| {
        jsonschema::options()
            .should_validate_formats(true)
            .build(&our_schema(kind))
            .unwrap()
    };

    let taskrun = TaskRunBuilder::new("tr")
        .step("a", exited(0))
        .step("b", exited(1))
        .step("c", skipped())
        .failed("Failed")
        .build();
    let cancelled = TaskRunBuilder::new("tr")
        .step("a", killed("TaskRunCancelled"))
        .failed("TaskRunCancelled")
        .build();
    let tr = taskrun_ref();
    let logs = [
        cap_log(b"all good", 1024),
        StepLog::Unavailable("pod gone".into()),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for run in [&taskrun, &cancelled] {
        let status = run.status.as_ref().unwrap();
        let facts = run_facts(Some(status)).unwrap();
        let formats = EventFormats::parse("cdevents").unwrap();
        for transition in owed_in_formats(&facts, &Ledger::default(), formats) {
            for log in &logs {
                let doc = cdevent_document(
                    &EventSettings::default(),
                    event_input(&tr, status, &transition, log),
                );
                for (which, validator) in
                    [("spec custom", &custom), ("ours", &ours(transition.kind))]
                {
                    let errors: Vec<String> =
                        validator.iter_errors(&doc).map(|e| e.to_string()).collect();
                    assert!(
                        errors.is_empty(),
                        "{which}: {:?}: {errors:?}\n{doc}",
                        transition.kind
                    );
                }
                seen.insert(
                    doc["subject"]["content"]["outcome"]
                        .as_str()
                        .map(str::to_owned),
                );
            }
        }
    }
    // started (no outcome), success, failure, cancel (skipped and cancelled).
    assert_eq!(seen.len(), 4, "{seen:?}");

    // Neither schema is vacuous.
    let mut bad = cdevent_document(
        &EventSettings::default(),
        input(
            &tr,
            &transition(StepEventKind::Failed, Some("Error")),
            &StepLog::NotCarried,
        ),
    );
    assert!(
        !ours(StepEventKind::Failed).is_valid(&bad),
        "a finished event without its log"
    );
    bad["context"]["type"] = json!("dev.cdevents.steprun.finished.0.1.0");
    assert!(
        !custom.is_valid(&bad),
        "a type outside the custom convention"
    );
}
