//! The sink comes from a flag and two ConfigMaps anyone with access to
//! Tekton's namespace can edit: resolving it must never panic, a configured
//! sink must be a usable http(s) URL, and the precedence must hold.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tekton_step_observer::sink_config::{
    CONFIG_DEFAULTS_SINK_KEY, CONFIG_EVENTS_SINK_KEY, SinkSource, SinkState, resolve_sink,
};

#[derive(Arbitrary, Debug)]
struct SinkConfig {
    flag: Option<String>,
    config_events: Option<BTreeMap<String, String>>,
    config_defaults: Option<BTreeMap<String, String>>,
}

impl SinkConfig {
    /// The first place holding a non-blank value, by the documented
    /// precedence; blank values count as unset.
    fn winner(&self) -> Option<SinkSource> {
        let events = self.config_events.as_ref();
        let defaults = self.config_defaults.as_ref();
        [
            (self.flag.as_ref(), SinkSource::Flag),
            (
                events.and_then(|data| data.get(CONFIG_EVENTS_SINK_KEY)),
                SinkSource::ConfigEvents,
            ),
            (
                defaults.and_then(|data| data.get(CONFIG_DEFAULTS_SINK_KEY)),
                SinkSource::ConfigDefaults,
            ),
        ]
        .into_iter()
        .find(|(value, _)| value.is_some_and(|v| !v.trim().is_empty()))
        .map(|(_, source)| source)
    }
}

fuzz_target!(|config: SinkConfig| {
    let state = resolve_sink(
        config.flag.as_deref(),
        config.config_events.as_ref(),
        config.config_defaults.as_ref(),
    );
    let winner = config.winner();
    match &state {
        SinkState::Configured(url, source) => {
            assert!(
                matches!(url.scheme(), "http" | "https"),
                "configured sink {url} is not http(s)"
            );
            assert!(
                url.host_str().is_some_and(|host| !host.is_empty()),
                "configured sink {url} has no host"
            );
            assert_eq!(Some(*source), winner, "{config:?} resolved to {state:?}");
        }
        SinkState::Invalid { value, source, .. } => {
            assert!(
                !value.is_empty() && value.trim() == value,
                "invalid value {value:?} is not the trimmed one"
            );
            assert_eq!(Some(*source), winner, "{config:?} resolved to {state:?}");
        }
        SinkState::Missing => assert_eq!(winner, None, "{config:?} resolved to Missing"),
    }
});
