//! The stand-in command of the `SIMULATED_*` step contract. Tekton's entrypoint runs it in
//! place of a step's script when the step's environment sets any `SIMULATED_*` variable:
//! it sleeps `SIMULATED_DURATION_MS`, prints `SIMULATED_LOG_BYTES` of filler and then
//! `SIMULATED_LOG` to stdout, and exits with `SIMULATED_EXIT_CODE`.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use node_agent::simulated::SimulatedStep;

/// Exit code for values the node agent should have refused before the step started.
const INVALID_CONTRACT_EXIT_CODE: u8 = 2;

fn main() -> ExitCode {
    let step = match SimulatedStep::from_env(|name| std::env::var(name).ok()) {
        Ok(Some(step)) => step,
        // Started without the contract (by hand): nothing to do.
        Ok(None) => return ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("simulated-step: {error}");
            return ExitCode::from(INVALID_CONTRACT_EXIT_CODE);
        }
    };
    std::thread::sleep(step.duration);
    if let Err(error) = step.print(&mut std::io::stdout().lock()) {
        eprintln!("simulated-step: writing the log: {error}");
    }
    ExitCode::from(step.exit_code)
}
