//! tekton-step-observer: one CloudEvent for every step transition of every
//! Tekton TaskRun.
#![forbid(unsafe_code)]

pub mod error;
