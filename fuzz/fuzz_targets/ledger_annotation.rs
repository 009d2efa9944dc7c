//! The ledger annotation is written by us but lives on the TaskRun, where
//! anyone with edit rights can change it: parsing must never panic, and what
//! we write back must read back as the same ledger.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tekton_step_observer::ledger::Ledger;

/// Ledgers written under another `--type-prefix` must read the same, so the
/// round trip is tried under the default prefix and the original plugin's.
const TYPE_PREFIXES: [&str; 2] = ["dev.tekton.event.plugin.step", "tom24d.event.plugin.step"];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(ledger) = Ledger::parse(&text) else {
        return;
    };
    for prefix in TYPE_PREFIXES {
        let annotation = ledger.to_annotation(prefix);
        match Ledger::parse(&annotation) {
            Ok(again) => assert_eq!(again, ledger, "round trip through {annotation:?}"),
            Err(error) => panic!("our own annotation {annotation:?} does not parse: {error}"),
        }
    }
});
