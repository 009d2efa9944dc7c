//! The four kinds of step event and the formats they go out in, shared by
//! the decision (`steps`), the ledger and the metrics without those
//! depending on each other.

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

/// The type of the CDEvents event for `kind`: `started`, or `finished` for
/// every terminal kind (its `outcome` tells them apart). The custom-event
/// convention of the CDEvents spec: `dev.cdeventsx.<tool>-<subject>.<predicate>.<version>`.
pub fn cdevents_type(kind: StepEventKind) -> &'static str {
    if kind.is_terminal() {
        CDEVENTS_FINISHED_TYPE
    } else {
        CDEVENTS_STARTED_TYPE
    }
}

/// The CDEvents type of a step run that began.
pub const CDEVENTS_STARTED_TYPE: &str = "dev.cdeventsx.tekton-steprun.started.0.1.0";
/// The CDEvents type of a step run that ended, ran or not.
pub const CDEVENTS_FINISHED_TYPE: &str = "dev.cdeventsx.tekton-steprun.finished.0.1.0";

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

/// The vocabulary an event is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventFormat {
    /// Our own CloudEvents, `<prefix>.<kind>.v1` (the step plugin's shape).
    Native = 0,
    /// CDEvents custom events, `dev.cdeventsx.tekton-steprun.<predicate>.<version>`.
    CdEvents = 1,
}

impl EventFormat {
    /// The format's word in flags and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EventFormat::Native => "native",
            EventFormat::CdEvents => "cdevents",
        }
    }
}

/// Which formats are owed (`--event-format`): each wanted format's events
/// are owed, sent and recorded in the ledger on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventFormats {
    wanted: [bool; 2],
}

impl Default for EventFormats {
    /// Native only: what the observer always sent.
    fn default() -> Self {
        Self::NATIVE
    }
}

impl EventFormats {
    /// Native events only.
    pub const NATIVE: EventFormats = EventFormats {
        wanted: [true, false],
    };

    /// Parses `native`, `cdevents` or `both`, or a comma-separated list of
    /// them as the `formats` key of Tekton's `config-events` is written
    /// (`tektonv1,cdevents`). `tektonv1`, that key's one value today, means
    /// native: both name Tekton's own CloudEvents vocabulary.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut wanted = [false; 2];
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word.to_ascii_lowercase().as_str() {
                "native" | "tektonv1" => wanted[EventFormat::Native as usize] = true,
                "cdevents" => wanted[EventFormat::CdEvents as usize] = true,
                "both" => wanted = [true, true],
                other => {
                    return Err(format!(
                        "{other:?} is not an event format; use native, cdevents or both"
                    ));
                }
            }
        }
        if wanted.iter().all(|w| !w) {
            return Err("no event format given; use native, cdevents or both".to_owned());
        }
        Ok(Self { wanted })
    }

    /// Whether events in `format` are owed.
    pub fn contains(self, format: EventFormat) -> bool {
        self.wanted[format as usize]
    }

    /// The wanted formats, native first.
    pub fn iter(self) -> impl Iterator<Item = EventFormat> {
        [EventFormat::Native, EventFormat::CdEvents]
            .into_iter()
            .filter(move |f| self.contains(*f))
    }
}

impl std::fmt::Display for EventFormats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.wanted {
            [true, true] => "both",
            [false, true] => "cdevents",
            _ => "native",
        })
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

    #[test]
    fn event_formats_parse_the_three_words_and_tektons_own() {
        for (text, native, cdevents) in [
            ("native", true, false),
            ("tektonv1", true, false),
            (" CDEvents ", false, true),
            ("both", true, true),
            ("tektonv1,cdevents", true, true),
            ("cdevents, cdevents", false, true),
        ] {
            let formats = EventFormats::parse(text).unwrap();
            assert_eq!(formats.contains(EventFormat::Native), native, "{text}");
            assert_eq!(formats.contains(EventFormat::CdEvents), cdevents, "{text}");
            assert_eq!(EventFormats::parse(&formats.to_string()).unwrap(), formats);
        }
        assert_eq!(EventFormats::default(), EventFormats::NATIVE);
        let error = EventFormats::parse("cloudevents").unwrap_err();
        assert!(error.contains("\"cloudevents\""), "{error}");
        assert!(EventFormats::parse(" , ").is_err(), "no format at all");
    }
}
