//! What deciding and building the events for one TaskRun update costs.
//! Results are recorded in BENCHMARKS.md (`make bench`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tekton_step_observer::event::{EventInput, EventSettings, StepLog, build_event, cap_log};
use tekton_step_observer::ledger::{Ledger, Settlement};
use tekton_step_observer::steps::{owed_transitions, run_facts};
use tekton_step_observer::tekton::{TaskRun, TaskRunRef, TektonVersion};
use tekton_step_observer::testing::{TaskRunBuilder, exited};

const STEPS: usize = 10;

fn ten_step_taskrun() -> TaskRun {
    let mut builder = TaskRunBuilder::new("bench");
    for i in 0..STEPS {
        builder = builder.step(&format!("step-{i}"), exited(0));
    }
    builder.succeeded().build()
}

/// Decides what is owed and builds every owed event.
fn decide_and_build(
    taskrun: &TaskRun,
    ledger: &Ledger,
    settings: &EventSettings,
    log: &StepLog,
) -> usize {
    let Some(status) = taskrun.status.as_ref() else {
        return 0;
    };
    let Ok(reference) = TaskRunRef::from_meta(&taskrun.metadata, TektonVersion::V1) else {
        return 0;
    };
    let Ok(facts) = run_facts(Some(status)) else {
        return 0;
    };
    let mut built = 0;
    for transition in owed_transitions(&facts, ledger) {
        let log = if transition.kind.is_terminal() {
            log
        } else {
            &StepLog::NotCarried
        };
        let event = build_event(
            settings,
            EventInput {
                taskrun: &reference,
                transition: &transition,
                step_spec: status
                    .task_spec
                    .as_ref()
                    .and_then(|s| s.steps.get(transition.step_index)),
                step_state: status.steps.get(transition.step_index),
                pod_name: status.pod_name.as_deref(),
                log,
            },
        );
        if event.is_ok() {
            built += 1;
        }
    }
    built
}

fn bench(c: &mut Criterion) {
    let taskrun = ten_step_taskrun();
    let settings = EventSettings::default();
    let log = cap_log(b"step output\n", 64 * 1024);

    // The common update: one step just ended, everything before it is settled.
    let mut almost_all = Ledger::default();
    for i in 0..STEPS {
        let name = format!("step-{i}");
        almost_all.record(
            &name,
            tekton_step_observer::steps::StepEventKind::Started,
            Settlement::Delivered,
        );
        if i + 1 < STEPS {
            almost_all.record(
                &name,
                tekton_step_observer::steps::StepEventKind::Succeeded,
                Settlement::Delivered,
            );
        }
    }
    assert_eq!(decide_and_build(&taskrun, &almost_all, &settings, &log), 1);
    c.bench_function("10-step update, 1 event owed", |b| {
        b.iter(|| decide_and_build(black_box(&taskrun), black_box(&almost_all), &settings, &log))
    });

    // Catching up a whole finished run (restart, backfill): 20 events.
    let empty = Ledger::default();
    assert_eq!(
        decide_and_build(&taskrun, &empty, &settings, &log),
        2 * STEPS
    );
    c.bench_function("10-step catch-up, 20 events owed", |b| {
        b.iter(|| decide_and_build(black_box(&taskrun), black_box(&empty), &settings, &log))
    });

    // Nothing owed: the cost every watch event of a settled TaskRun pays.
    let mut all = almost_all.clone();
    all.record(
        &format!("step-{}", STEPS - 1),
        tekton_step_observer::steps::StepEventKind::Succeeded,
        Settlement::Delivered,
    );
    assert_eq!(decide_and_build(&taskrun, &all, &settings, &log), 0);
    c.bench_function("10-step update, nothing owed", |b| {
        b.iter(|| decide_and_build(black_box(&taskrun), black_box(&all), &settings, &log))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
