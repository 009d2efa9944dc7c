//! tekton-step-observer: one CloudEvent for every step transition of every
//! Tekton TaskRun.
#![forbid(unsafe_code)]

pub mod app;
pub mod cdevent;
pub mod cli;
pub mod context;
pub mod controller;
pub mod delivery;
pub mod display;
pub mod error;
pub mod event;
pub mod inspect;
pub mod leader;
pub mod ledger;
pub mod logs;
pub mod metrics;
pub mod otel;
pub mod server;
pub mod signature;
pub mod sink;
pub mod sink_config;
pub mod sink_credentials;
pub mod step_event;
pub mod step_span;
pub mod steps;
pub mod tekton;
#[doc(hidden)]
pub mod testing;
pub mod watermark;
