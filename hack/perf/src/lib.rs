//! `make perf`: the observer measured side by side with Tekton's own events
//! on the local cluster. The binary runs the scenarios; this library holds
//! what they measured and how it is reported.

pub mod report;
pub mod results;
