//! The four kinds of step event, shared by the decision (`steps`), the
//! ledger and the metrics without those depending on each other.

/// The four step events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepEventKind {
    /// The step began to run.
    Started = 0,
    /// The step exited 0.
    Succeeded = 1,
    /// The step exited non-zero, or was killed by a timeout or cancellation.
    Failed = 2,
    /// The step never ran.
    Skipped = 3,
}

impl StepEventKind {
    /// All kinds, in a fixed order.
    pub const ALL: [StepEventKind; 4] = [
        StepEventKind::Started,
        StepEventKind::Succeeded,
        StepEventKind::Failed,
        StepEventKind::Skipped,
    ];

    /// The kind's word in event types and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StepEventKind::Started => "started",
            StepEventKind::Succeeded => "succeeded",
            StepEventKind::Failed => "failed",
            StepEventKind::Skipped => "skipped",
        }
    }

    /// The full CloudEvents type, e.g. `dev.tekton.event.plugin.step.failed.v1`.
    pub fn event_type(self, prefix: &str) -> String {
        format!("{prefix}.{}.v1", self.as_str())
    }

    /// Whether this event ends the step.
    pub fn is_terminal(self) -> bool {
        self != StepEventKind::Started
    }
}
