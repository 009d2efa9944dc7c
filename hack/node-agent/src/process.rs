//! One container's process: started through its sandbox with stdout and stderr piped into
//! its CRI log file, signalled as a kubelet signals a container (its PID 1), and reported
//! when it has exited and its output is all in the log.

use std::path::Path;
use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::logs::{ContainerLog, Stream};
use crate::sandbox::Sandbox;

/// Added to a signal's number for the exit code of a process it killed, as shells and
/// container runtimes report it.
const SIGNAL_EXIT_CODE_BASE: i32 = 128;

/// A container process that runs.
#[derive(Debug)]
pub struct Process {
    /// PID (in the agent's PID namespace) of the sandbox's outer `bwrap`, whose only child
    /// is the container's PID 1.
    sandbox_pid: u32,
}

/// A container's process ended.
#[derive(Debug)]
pub struct Exit<K> {
    /// Which container (the caller's key).
    pub key: K,
    /// Its exit code, 128 + N for a process killed by signal N.
    pub exit_code: i32,
}

impl Process {
    /// Starts the sandbox; reports its exit, with its output flushed to `log_path`, on
    /// `exits` under `key`.
    pub async fn start<K: Send + 'static>(
        sandbox: &Sandbox,
        log_path: &Path,
        key: K,
        exits: mpsc::UnboundedSender<Exit<K>>,
    ) -> std::io::Result<Self> {
        let (program, args) = sandbox.command_line();
        let log = ContainerLog::open(log_path).await?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let sandbox_pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the sandbox exited at once"))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        tokio::spawn(async move {
            let pump_stdout = async {
                if let Some(stdout) = stdout {
                    log.pump(Stream::Stdout, stdout).await?;
                }
                Ok::<(), std::io::Error>(())
            };
            let pump_stderr = async {
                if let Some(stderr) = stderr {
                    log.pump(Stream::Stderr, stderr).await?;
                }
                Ok::<(), std::io::Error>(())
            };
            let (status, out, err) = tokio::join!(child.wait(), pump_stdout, pump_stderr);
            for result in [out, err] {
                if let Err(error) = result {
                    tracing::warn!(%error, "cannot write a container's log");
                }
            }
            let exit_code = match status {
                Ok(status) => exit_code(status),
                Err(error) => {
                    tracing::warn!(%error, "cannot wait for a container");
                    SIGNAL_EXIT_CODE_BASE + Signal::SIGKILL as i32
                }
            };
            // The receiver is gone only when the pod's task is: nothing left to tell.
            let _ = exits.send(Exit { key, exit_code });
        });
        Ok(Self { sandbox_pid })
    }

    /// The container's PID 1, once the sandbox has started it.
    fn container_pid(&self) -> Option<Pid> {
        child_pids(self.sandbox_pid).into_iter().next()
    }

    /// Sends `signal` to the container's PID 1 (as a kubelet does), or kills the sandbox
    /// if it has not started one yet.
    pub fn signal(&self, signal: Signal) {
        let (target, signal) = match self.container_pid() {
            Some(pid) => (pid, signal),
            None => (
                Pid::from_raw(i32::try_from(self.sandbox_pid).unwrap_or(i32::MAX)),
                Signal::SIGKILL,
            ),
        };
        if let Err(error) = kill(target, signal) {
            tracing::debug!(%error, pid = %target, "signal not delivered (the process is gone)");
        }
    }

    /// Whether the container's command has started another process: for a Tekton step,
    /// that its entrypoint stopped waiting and runs the step's own command.
    ///
    /// NB: while bwrap sets the sandbox up, the future PID 1 is still bwrap (or setpriv)
    /// and may have a helper child of its own; only once it runs the container's command
    /// do its children count.
    pub fn runs_a_command(&self) -> bool {
        let Some(pid) = self
            .container_pid()
            .and_then(|pid| u32::try_from(pid.as_raw()).ok())
        else {
            return false;
        };
        if is_sandbox_setup(pid) {
            return false;
        }
        child_pids(pid)
            .into_iter()
            .filter_map(|child| u32::try_from(child.as_raw()).ok())
            .any(|child| !is_sandbox_setup(child))
    }
}

/// Whether a process is still bwrap or setpriv setting a sandbox up, not a container's
/// own program.
fn is_sandbox_setup(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| matches!(name.trim(), "bwrap" | "setpriv"))
        .unwrap_or(true)
}

/// The children of a process, from every one of its threads (Go forks from any thread).
fn child_pids(pid: u32) -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|child| child.parse::<i32>().ok())
                .map(Pid::from_raw)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The exit code a container runtime reports for a process status.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| SIGNAL_EXIT_CODE_BASE + signal))
        .unwrap_or(SIGNAL_EXIT_CODE_BASE + Signal::SIGKILL as i32)
}
