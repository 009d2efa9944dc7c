//! The published `SIMULATED_*` step contract: a step whose environment sets any of these
//! variables runs the built-in stand-in command (`simulated-step`) under Tekton's real
//! entrypoint, in place of its script or command. The stand-in sleeps, prints and exits as
//! the variables say; everything around it (waiting for the previous step, skipping after
//! a failure, timeouts, `onError`, results, the termination message) is Tekton's own code.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

/// Exit code the stand-in's command exits with.
pub const EXIT_CODE_ENV: &str = "SIMULATED_EXIT_CODE";
/// How long the stand-in runs, in milliseconds.
pub const DURATION_ENV: &str = "SIMULATED_DURATION_MS";
/// What the stand-in prints to stdout (its log).
pub const LOG_ENV: &str = "SIMULATED_LOG";
/// Bytes of filler lines the stand-in prints before `SIMULATED_LOG`: logs far larger than a
/// pod's environment could carry.
pub const LOG_BYTES_ENV: &str = "SIMULATED_LOG_BYTES";
/// Every variable of the contract; setting any of them selects the stand-in.
pub const CONTRACT_ENV: [&str; 4] = [EXIT_CODE_ENV, DURATION_ENV, LOG_ENV, LOG_BYTES_ENV];
/// The most filler a step may ask for (1 GiB): far beyond any test's need, and a typo can
/// not fill the disk.
pub const MAX_LOG_BYTES: u64 = 1 << 30;
/// Length of one full filler line, its newline included: long enough that the CRI prefix
/// adds little to the log file, far below the 16 KiB at which runtimes split lines.
pub const FILLER_LINE_BYTES: u64 = 1024;
/// A step that states no duration runs this long: short, yet visibly running.
const DEFAULT_DURATION: Duration = Duration::from_millis(100);

/// What one step's `SIMULATED_*` variables ask of the stand-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedStep {
    /// Exit code of the command.
    pub exit_code: u8,
    /// How long the command runs before it prints and exits.
    pub duration: Duration,
    /// Printed to stdout last.
    pub log: String,
    /// Bytes of [`filler`] printed before `log`.
    pub filler_log_bytes: u64,
}

/// A `SIMULATED_*` value that cannot be used; the kubelet side reports it as a container
/// configuration error, so Tekton fails the TaskRun at once.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimulatedError {
    /// `SIMULATED_EXIT_CODE` is not an integer in 0..=255.
    #[error("{EXIT_CODE_ENV}={0:?} is not an exit code (0..=255)")]
    ExitCode(String),
    /// `SIMULATED_DURATION_MS` is not a non-negative integer.
    #[error("{DURATION_ENV}={0:?} is not a number of milliseconds")]
    Duration(String),
    /// `SIMULATED_LOG_BYTES` is not an integer in 0..=[`MAX_LOG_BYTES`].
    #[error("{LOG_BYTES_ENV}={0:?} is not a number of bytes (0..={MAX_LOG_BYTES})")]
    LogBytes(String),
}

impl SimulatedStep {
    /// Reads the contract from an environment; `None` when it sets none of its variables.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, SimulatedError> {
        if CONTRACT_ENV.iter().all(|name| lookup(name).is_none()) {
            return Ok(None);
        }
        let exit_code = match lookup(EXIT_CODE_ENV) {
            None => 0,
            Some(value) => value
                .trim()
                .parse::<u8>()
                .map_err(|_| SimulatedError::ExitCode(value))?,
        };
        let duration = match lookup(DURATION_ENV) {
            None => DEFAULT_DURATION,
            Some(value) => value
                .trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| SimulatedError::Duration(value))?,
        };
        let filler_log_bytes = match lookup(LOG_BYTES_ENV) {
            None => 0,
            Some(value) => value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|bytes| *bytes <= MAX_LOG_BYTES)
                .ok_or(SimulatedError::LogBytes(value))?,
        };
        Ok(Some(Self {
            exit_code,
            duration,
            log: lookup(LOG_ENV).unwrap_or_default(),
            filler_log_bytes,
        }))
    }

    /// Prints the step's output: the filler lines, then `log` ending in a newline.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        filler(self.filler_log_bytes, |line| {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")
        })?;
        if !self.log.is_empty() {
            out.write_all(self.log.as_bytes())?;
            if !self.log.ends_with('\n') {
                out.write_all(b"\n")?;
            }
        }
        out.flush()
    }
}

/// The filler lines of `SIMULATED_LOG_BYTES=bytes`, exactly `bytes` bytes of log in all
/// (newlines included): lines of [`FILLER_LINE_BYTES`] reading
/// `filler 0000000001 xxx…`, numbered from 1, then one shorter line of `x`s for the
/// remainder. Calls `line` with each line's text, without its newline, reusing one buffer.
pub fn filler<E>(bytes: u64, mut line: impl FnMut(&str) -> Result<(), E>) -> Result<(), E> {
    let width = FILLER_LINE_BYTES as usize - 1;
    let mut text = String::with_capacity(width);
    for number in 1..=bytes / FILLER_LINE_BYTES {
        text.clear();
        // Writing to a String cannot fail.
        let _ = write!(text, "filler {number:010} ");
        text.extend(std::iter::repeat_n('x', width - text.len()));
        line(&text)?;
    }
    let rest = (bytes % FILLER_LINE_BYTES) as usize;
    if rest > 0 {
        text.clear();
        text.extend(std::iter::repeat_n('x', rest - 1));
        line(&text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<SimulatedStep>, SimulatedError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        SimulatedStep::from_env(|name| env.get(name).cloned())
    }

    #[test]
    fn no_contract_variable_means_the_real_command_runs() {
        assert_eq!(read(&[("OTHER", "1")]), Ok(None));
    }

    #[test]
    fn contract_values_and_defaults() {
        assert_eq!(
            read(&[(LOG_ENV, "hello")]),
            Ok(Some(SimulatedStep {
                exit_code: 0,
                duration: DEFAULT_DURATION,
                log: "hello".to_owned(),
                filler_log_bytes: 0,
            }))
        );
        assert_eq!(
            read(&[
                (EXIT_CODE_ENV, " 7 "),
                (DURATION_ENV, "2500"),
                (LOG_BYTES_ENV, "4096")
            ]),
            Ok(Some(SimulatedStep {
                exit_code: 7,
                duration: Duration::from_millis(2500),
                log: String::new(),
                filler_log_bytes: 4096,
            }))
        );
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            (
                EXIT_CODE_ENV,
                "256",
                SimulatedError::ExitCode("256".to_owned()),
            ),
            (
                EXIT_CODE_ENV,
                "-1",
                SimulatedError::ExitCode("-1".to_owned()),
            ),
            (
                DURATION_ENV,
                "1s",
                SimulatedError::Duration("1s".to_owned()),
            ),
            (
                LOG_BYTES_ENV,
                "1073741825",
                SimulatedError::LogBytes("1073741825".to_owned()),
            ),
        ];
        for (name, value, expected) in cases {
            assert_eq!(read(&[(name, value)]), Err(expected), "{name}={value}");
        }
    }

    #[test]
    fn filler_is_exactly_as_long_as_asked() {
        for bytes in [0, 1, 2, 17, 1023, 1024, 1025, 3 * 1024, 5000] {
            let mut printed = Vec::new();
            let step = SimulatedStep {
                exit_code: 0,
                duration: Duration::ZERO,
                log: "last".to_owned(),
                filler_log_bytes: bytes,
            };
            step.print(&mut printed).expect("printing to memory");
            let text = String::from_utf8(printed).expect("filler is ASCII");
            let filler = text.strip_suffix("last\n").expect("log comes last");
            assert_eq!(filler.len() as u64, bytes, "{bytes}");
            assert!(
                filler
                    .lines()
                    .all(|line| (line.len() as u64) < FILLER_LINE_BYTES),
                "{bytes}"
            );
            if bytes >= FILLER_LINE_BYTES {
                assert!(filler.starts_with("filler 0000000001 xxx"), "{bytes}");
            }
        }
    }
}
