//! The node agent's parts that its two binaries share: the `SIMULATED_*` step contract,
//! read by the agent (to validate it and pick the stand-in) and by the stand-in itself.

#![forbid(unsafe_code)]

pub mod simulated;
