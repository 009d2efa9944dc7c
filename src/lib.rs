//! tekton-step-observer: one CloudEvent for every step transition of every
//! Tekton TaskRun.
#![forbid(unsafe_code)]

pub mod error;
pub mod event;
pub mod ledger;
pub mod steps;
pub mod tekton;
#[doc(hidden)]
pub mod testing;
