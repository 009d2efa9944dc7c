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

/// The kinds of step event a user wants (`--event-types`); the others are
/// never owed, never sent and never in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTypes {
    wanted: [bool; 4],
}

impl Default for EventTypes {
    /// All four.
    fn default() -> Self {
        Self { wanted: [true; 4] }
    }
}

impl EventTypes {
    /// Parses a comma-separated list of kinds (`failed,skipped`); the error
    /// names the value that is not a kind and the ones that are.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut wanted = [false; 4];
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let kind = StepEventKind::ALL
                .into_iter()
                .find(|k| k.as_str().eq_ignore_ascii_case(word))
                .ok_or_else(|| {
                    format!("{word:?} is not a step event type; use started, succeeded, failed or skipped")
                })?;
            wanted[kind as usize] = true;
        }
        if wanted.iter().all(|w| !w) {
            return Err(
                "no event type given; use started, succeeded, failed or skipped".to_owned(),
            );
        }
        Ok(Self { wanted })
    }

    /// Whether events of `kind` are wanted.
    pub fn contains(self, kind: StepEventKind) -> bool {
        self.wanted[kind as usize]
    }
}

impl std::fmt::Display for EventTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let words: Vec<&str> = StepEventKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .map(StepEventKind::as_str)
            .collect();
        f.write_str(&words.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_parse_lists_and_refuse_unknown_words() {
        let failed = EventTypes::parse("failed").unwrap();
        assert!(failed.contains(StepEventKind::Failed));
        assert!(!failed.contains(StepEventKind::Started));
        let two = EventTypes::parse(" Failed , skipped,").unwrap();
        assert_eq!(two.to_string(), "failed,skipped");
        assert_eq!(
            EventTypes::default().to_string(),
            "started,succeeded,failed,skipped"
        );
        let error = EventTypes::parse("failed,finished").unwrap_err();
        assert!(error.contains("\"finished\""), "{error}");
        assert!(EventTypes::parse(" , ").is_err());
    }
}
