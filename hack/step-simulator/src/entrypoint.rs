//! What Tekton's entrypoint binary (cmd/entrypoint, pkg/entrypoint) would do for a step:
//! the container's exit code, the termination message it writes to `/tekton/termination`,
//! the lines it logs itself, and whether it makes the following steps skip (its `.err`
//! post file).
//!
//! Reference: tektoncd/pipeline v1.9.2, `Entrypointer.Go` and `cmd/entrypoint/main.go`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::plan::{OnError, StepPlan};

/// Key of the result holding when the step's command started (`result.RunResult.Key`).
const STARTED_AT_KEY: &str = "StartedAt";
/// Key of the result holding a `continue` step's real exit code.
const EXIT_CODE_KEY: &str = "ExitCode";
/// Key of the result holding why the step ended (Skipped, TimeoutExceeded, Cancelled).
const REASON_KEY: &str = "Reason";
/// `result.InternalTektonResultType`: the type of all the results above.
const INTERNAL_TEKTON_RESULT_TYPE: u8 = 3;
/// The entrypoint's `timeFormat` for StartedAt: RFC 3339 with milliseconds.
const STARTED_AT_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";
/// Go's `log` package prefix (`log.LstdFlags`), which the entrypoint's own messages carry.
const GO_LOG_TIME_FORMAT: &str = "%Y/%m/%d %H:%M:%S";
/// A skipped or timed-out step's entrypoint exits 1 (`os.Exit(1)` / `log.Fatal`).
const ENTRYPOINT_FAILURE_EXIT_CODE: i32 = 1;
/// A cancelled step's entrypoint exits with `int(syscall.SIGKILL)`, which is 9.
const CANCELLED_EXIT_CODE: i32 = 9;

/// One entry of the termination message, as `result.RunResult` marshals it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunResult {
    /// Result name.
    pub key: String,
    /// Result value.
    pub value: String,
    /// Result type; always [`INTERNAL_TEKTON_RESULT_TYPE`] here.
    #[serde(rename = "type")]
    pub result_type: u8,
}

impl RunResult {
    fn internal(key: &str, value: String) -> Self {
        Self {
            key: key.to_owned(),
            value,
            result_type: INTERNAL_TEKTON_RESULT_TYPE,
        }
    }
}

/// How a step ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepVerdict {
    /// The command exited 0.
    Succeeded,
    /// The command exited non-zero and the step fails.
    Failed {
        /// The command's exit code.
        exit_code: i32,
    },
    /// The command exited non-zero but the step has `onError: continue`.
    FailureContinued {
        /// The command's exit code.
        exit_code: i32,
    },
    /// The command outlived the step's own timeout.
    TimedOut,
    /// A previous step failed, so the command never ran.
    Skipped,
    /// The pod's `tekton.dev/cancel` annotation cancelled the step (keep-pod-on-cancel).
    Cancelled,
}

impl StepVerdict {
    /// Decides how a step that is not cancelled ends.
    pub fn decide(step: &StepPlan, a_previous_step_failed: bool) -> Self {
        if a_previous_step_failed {
            return Self::Skipped;
        }
        if step.timeout.is_some_and(|timeout| step.duration > timeout) {
            return Self::TimedOut;
        }
        match (step.exit_code, step.on_error) {
            (0, _) => Self::Succeeded,
            (exit_code, OnError::Continue) => Self::FailureContinued { exit_code },
            (exit_code, OnError::StopAndFail) => Self::Failed { exit_code },
        }
    }

    /// How long the step's container runs its command before the entrypoint exits.
    pub fn run_time(self, step: &StepPlan) -> Duration {
        match self {
            Self::Skipped | Self::Cancelled => Duration::ZERO,
            Self::TimedOut => step.timeout.unwrap_or(step.duration),
            Self::Succeeded | Self::Failed { .. } | Self::FailureContinued { .. } => step.duration,
        }
    }

    /// Exit code of the step's container, that is of the entrypoint. It is non-zero exactly
    /// when the entrypoint writes the `.err` post file that makes all later steps skip.
    pub fn container_exit_code(self) -> i32 {
        match self {
            Self::Succeeded | Self::FailureContinued { .. } => 0,
            Self::Failed { exit_code } => exit_code,
            Self::TimedOut | Self::Skipped => ENTRYPOINT_FAILURE_EXIT_CODE,
            Self::Cancelled => CANCELLED_EXIT_CODE,
        }
    }

    /// Whether the step's command started, so that its output is in the log.
    pub fn command_ran(self) -> bool {
        !matches!(self, Self::Skipped | Self::Cancelled)
    }

    /// The results the entrypoint writes as the termination message.
    pub fn results(self, started_at: DateTime<Utc>) -> Vec<RunResult> {
        let mut results = vec![RunResult::internal(
            STARTED_AT_KEY,
            started_at.format(STARTED_AT_FORMAT).to_string(),
        )];
        match self {
            Self::Succeeded | Self::Failed { .. } => {}
            Self::FailureContinued { exit_code } => {
                results.push(RunResult::internal(EXIT_CODE_KEY, exit_code.to_string()));
            }
            Self::TimedOut => results.push(RunResult::internal(
                REASON_KEY,
                "TimeoutExceeded".to_owned(),
            )),
            Self::Skipped => results.push(RunResult::internal(REASON_KEY, "Skipped".to_owned())),
            Self::Cancelled => {
                results.push(RunResult::internal(REASON_KEY, "Cancelled".to_owned()))
            }
        }
        results
    }

    /// The lines the entrypoint itself writes to stderr, without Go's log prefix.
    pub fn entrypoint_messages(self) -> &'static [&'static str] {
        match self {
            Self::Succeeded | Self::Failed { .. } | Self::FailureContinued { .. } => &[],
            Self::TimedOut => &["context deadline exceeded"],
            Self::Skipped => &["Skipping step because a previous step failed"],
            Self::Cancelled => &["INFO Step was canceling", "Step was cancelled"],
        }
    }
}

/// The termination message: the results as Go's `json.Marshal` writes them.
pub fn termination_message(results: &[RunResult]) -> String {
    // Serialising a Vec of plain structs cannot fail; fall back to what the entrypoint writes
    // for no results anyway.
    serde_json::to_string(results).unwrap_or_else(|_| "[]".to_owned())
}

/// Prefixes an entrypoint message as Go's standard logger does.
pub fn go_log_line(at: DateTime<Utc>, message: &str) -> String {
    format!("{} {message}", at.format(GO_LOG_TIME_FORMAT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn step(
        exit_code: i32,
        duration_ms: u64,
        on_error: OnError,
        timeout_ms: Option<u64>,
    ) -> StepPlan {
        StepPlan {
            container_index: 0,
            exit_code,
            duration: Duration::from_millis(duration_ms),
            log: String::new(),
            filler_log_bytes: 0,
            on_error,
            timeout: timeout_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn verdicts() {
        use OnError::{Continue, StopAndFail};
        let cases = [
            (
                step(0, 100, StopAndFail, None),
                false,
                StepVerdict::Succeeded,
            ),
            (step(0, 100, StopAndFail, None), true, StepVerdict::Skipped),
            (
                step(2, 100, StopAndFail, None),
                false,
                StepVerdict::Failed { exit_code: 2 },
            ),
            (
                step(2, 100, Continue, None),
                false,
                StepVerdict::FailureContinued { exit_code: 2 },
            ),
            (step(0, 100, Continue, None), false, StepVerdict::Succeeded),
            (
                step(0, 3000, StopAndFail, Some(1000)),
                false,
                StepVerdict::TimedOut,
            ),
            (
                step(5, 3000, Continue, Some(1000)),
                false,
                StepVerdict::TimedOut,
            ),
            (
                step(0, 1000, StopAndFail, Some(1000)),
                false,
                StepVerdict::Succeeded,
            ),
            (
                step(0, 3000, StopAndFail, Some(1000)),
                true,
                StepVerdict::Skipped,
            ),
        ];
        for (plan, previous_failed, expected) in cases {
            assert_eq!(
                StepVerdict::decide(&plan, previous_failed),
                expected,
                "{plan:?}"
            );
        }
    }

    #[test]
    fn exits() {
        // (verdict, container exit code, command ran, run time ms)
        let plan = step(7, 3000, OnError::StopAndFail, Some(1000));
        let cases = [
            (StepVerdict::Succeeded, 0, true, 3000),
            (StepVerdict::Failed { exit_code: 7 }, 7, true, 3000),
            (
                StepVerdict::FailureContinued { exit_code: 7 },
                0,
                true,
                3000,
            ),
            (StepVerdict::TimedOut, 1, true, 1000),
            (StepVerdict::Skipped, 1, false, 0),
            (StepVerdict::Cancelled, 9, false, 0),
        ];
        for (verdict, exit_code, ran, run_ms) in cases {
            assert_eq!(verdict.container_exit_code(), exit_code, "{verdict:?}");
            assert_eq!(verdict.command_ran(), ran, "{verdict:?}");
            assert_eq!(
                verdict.run_time(&plan),
                Duration::from_millis(run_ms),
                "{verdict:?}"
            );
        }
    }

    #[test]
    fn termination_messages_match_the_entrypoint() {
        let started_at = Utc
            .with_ymd_and_hms(2025, 3, 4, 5, 6, 7)
            .single()
            .map(|at| at + chrono::Duration::milliseconds(89))
            .expect("valid test time");
        let started = r#"{"key":"StartedAt","value":"2025-03-04T05:06:07.089Z","type":3}"#;
        let cases = [
            (StepVerdict::Succeeded, format!("[{started}]")),
            (StepVerdict::Failed { exit_code: 1 }, format!("[{started}]")),
            (
                StepVerdict::FailureContinued { exit_code: 42 },
                format!(r#"[{started},{{"key":"ExitCode","value":"42","type":3}}]"#),
            ),
            (
                StepVerdict::TimedOut,
                format!(r#"[{started},{{"key":"Reason","value":"TimeoutExceeded","type":3}}]"#),
            ),
            (
                StepVerdict::Skipped,
                format!(r#"[{started},{{"key":"Reason","value":"Skipped","type":3}}]"#),
            ),
            (
                StepVerdict::Cancelled,
                format!(r#"[{started},{{"key":"Reason","value":"Cancelled","type":3}}]"#),
            ),
        ];
        for (verdict, expected) in cases {
            assert_eq!(
                termination_message(&verdict.results(started_at)),
                expected,
                "{verdict:?}"
            );
        }
    }

    #[test]
    fn go_log_prefix() {
        let at = Utc
            .with_ymd_and_hms(2025, 3, 4, 5, 6, 7)
            .single()
            .expect("valid test time");
        assert_eq!(
            go_log_line(at, "Skipping step because a previous step failed"),
            "2025/03/04 05:06:07 Skipping step because a previous step failed"
        );
    }
}
