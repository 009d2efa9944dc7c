//! The steady workload of the fault suite: many TaskRuns of 3 to 10 steps
//! with mixed outcomes, created over a period, and the check that every
//! event they call for arrived, in order, without unexplained repeats.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cloudevents::{AttributesReader, Event};
use kube::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::{Step, create_taskrun, fails, ok, taskrun_manifest};

/// One planned TaskRun and the events it must produce, in order.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub steps: Vec<Step>,
    /// `(step, kind)` in emission order.
    pub expected: Vec<(String, String)>,
}

/// Plans `count` TaskRuns from `seed` (printed on failure, so a run can be
/// repeated): 3..=10 steps, most succeed, some fail, some fail and continue.
pub fn plan(seed: u64, count: usize) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let steps: Vec<Step> = (0..rng.random_range(3..=10))
                .map(|s| {
                    let name = format!("s{s}");
                    let roll: f64 = rng.random();
                    let step = if roll < 0.08 {
                        fails(&name, rng.random_range(1..=3))
                    } else if roll < 0.12 {
                        fails(&name, 2).continue_on_error()
                    } else {
                        ok(&name)
                    };
                    step.lasting(rng.random_range(20..=200))
                })
                .collect();
            Planned {
                name: format!("w{i:03}"),
                expected: expected_events(&steps),
                steps,
            }
        })
        .collect()
}

/// The events a run of `steps` calls for.
pub fn expected_events(steps: &[Step]) -> Vec<(String, String)> {
    let mut expected = Vec::new();
    let mut stopped = false;
    for step in steps {
        let name = step.name.clone();
        if stopped {
            expected.push((name, "skipped".to_owned()));
            continue;
        }
        expected.push((name.clone(), "started".to_owned()));
        if step.exit_code == 0 {
            expected.push((name, "succeeded".to_owned()));
        } else {
            expected.push((name, "failed".to_owned()));
            stopped = !step.continue_on_error;
        }
    }
    expected
}

/// Total events the workload calls for.
pub fn total_expected(plan: &[Planned]) -> usize {
    plan.iter().map(|p| p.expected.len()).sum()
}

/// Creates the planned TaskRuns spread evenly over `over`; returns name → uid.
pub async fn create_spread(
    client: &Client,
    namespace: &str,
    plan: &[Planned],
    over: Duration,
) -> HashMap<String, String> {
    let gap = over / plan.len().max(1) as u32;
    let mut uids = HashMap::new();
    for planned in plan {
        let manifest = taskrun_manifest("v1", &planned.name, &planned.steps, None);
        let uid = create_taskrun(client, namespace, manifest).await;
        uids.insert(planned.name.clone(), uid);
        tokio::time::sleep(gap).await;
    }
    uids
}

/// What the sink got, measured against the plan.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Events the workload calls for.
    pub expected: usize,
    /// Distinct expected events that arrived.
    pub delivered: usize,
    /// Expected events that never arrived: `taskrun/step/kind`.
    pub missing: Vec<String>,
    /// Arrivals of an id that had already arrived.
    pub repeats: usize,
    /// Repeats whose attributes or data differ from the first arrival.
    pub changed_repeats: usize,
    /// Events that arrived but no TaskRun calls for.
    pub unexpected: Vec<String>,
    /// TaskRuns whose first arrivals were out of order.
    pub out_of_order: Vec<String>,
}

impl Verdict {
    /// Figures for RELIABILITY.md.
    pub fn figures(&self) -> serde_json::Value {
        json!({
            "expected": self.expected,
            "delivered": self.delivered,
            "missing": self.missing.len(),
            "repeats": self.repeats,
            "changed_repeats": self.changed_repeats,
            "unexpected": self.unexpected.len(),
            "out_of_order": self.out_of_order.len(),
        })
    }

    /// Nothing lost, nothing unexpected, order kept, repeats identical.
    pub fn assert_no_loss(&self) {
        assert!(self.missing.is_empty(), "lost events: {:?}", self.missing);
        assert!(
            self.unexpected.is_empty(),
            "unexpected events: {:?}",
            self.unexpected
        );
        assert!(
            self.out_of_order.is_empty(),
            "order broken for {:?}",
            self.out_of_order
        );
        assert_eq!(
            self.changed_repeats, 0,
            "a repeated id carried different content"
        );
    }
}

/// Compares what arrived (in arrival order) with the plan.
pub fn judge(plan: &[Planned], uids: &HashMap<String, String>, arrived: &[Event]) -> Verdict {
    let mut verdict = Verdict {
        expected: total_expected(plan),
        ..Verdict::default()
    };
    let mut first_seen: HashMap<String, &Event> = HashMap::new();
    // Per TaskRun uid: (step, kind) in first-arrival order.
    let mut order: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for event in arrived {
        match first_seen.get(event.id()) {
            Some(first) => {
                verdict.repeats += 1;
                if !same_content(first, event) {
                    verdict.changed_repeats += 1;
                }
            }
            None => {
                first_seen.insert(event.id().to_owned(), event);
                let uid = event
                    .extension("taskrunuid")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let kind = event.ty().rsplit('.').nth(1).unwrap_or_default().to_owned();
                let step = event.subject().unwrap_or_default().to_owned();
                order.entry(uid).or_default().push((step, kind));
            }
        }
    }
    for planned in plan {
        let uid = uids.get(&planned.name).cloned().unwrap_or_default();
        let got = order.remove(&uid).unwrap_or_default();
        for (step, kind) in &planned.expected {
            if got.iter().any(|(s, k)| s == step && k == kind) {
                verdict.delivered += 1;
            } else {
                verdict
                    .missing
                    .push(format!("{}/{step}/{kind}", planned.name));
            }
        }
        for (step, kind) in &got {
            if !planned.expected.iter().any(|(s, k)| s == step && k == kind) {
                verdict
                    .unexpected
                    .push(format!("{}/{step}/{kind}", planned.name));
            }
        }
        let expected_order: Vec<&(String, String)> = planned
            .expected
            .iter()
            .filter(|e| got.contains(e))
            .collect();
        let got_order: Vec<&(String, String)> = got.iter().collect();
        if expected_order != got_order && verdict.unexpected.is_empty() {
            verdict.out_of_order.push(planned.name.clone());
        }
    }
    for (uid, events) in order {
        for (step, kind) in events {
            verdict.unexpected.push(format!("uid {uid}/{step}/{kind}"));
        }
    }
    verdict
}

fn same_content(a: &Event, b: &Event) -> bool {
    a.ty() == b.ty()
        && a.source() == b.source()
        && a.subject() == b.subject()
        && a.time() == b.time()
        && a.data() == b.data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_events_follow_the_entrypoint() {
        let steps = [
            ok("a"),
            fails("b", 1).continue_on_error(),
            fails("c", 2),
            ok("d"),
        ];
        let want: Vec<(String, String)> = [
            ("a", "started"),
            ("a", "succeeded"),
            ("b", "started"),
            ("b", "failed"),
            ("c", "started"),
            ("c", "failed"),
            ("d", "skipped"),
        ]
        .iter()
        .map(|(s, k)| (s.to_string(), k.to_string()))
        .collect();
        assert_eq!(expected_events(&steps), want);
    }

    #[test]
    fn plans_are_reproducible_and_mixed() {
        let a = plan(7, 60);
        let b = plan(7, 60);
        assert_eq!(total_expected(&a), total_expected(&b));
        assert!(a.iter().all(|p| (3..=10).contains(&p.steps.len())));
        assert!(
            a.iter()
                .any(|p| p.expected.iter().any(|(_, k)| k == "skipped"))
        );
        assert!(
            a.iter()
                .any(|p| p.steps.iter().any(|s| s.continue_on_error))
        );
    }
}
