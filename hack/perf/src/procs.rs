//! The local cluster's processes, as /proc shows them: CPU time and memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Components of the local cluster whose CPU the scenarios report.
pub const COMPONENTS: &[&str] = &[
    "kube-apiserver",
    "etcd",
    "tekton-controller",
    "tekton-events",
    "tekton-webhook",
    "node-agent",
    "kwok",
    "kube-controller-manager",
];

/// The pid `hack/cluster` recorded for a component, if it runs.
pub fn component_pid(cluster_dir: &Path, component: &str) -> Option<u32> {
    let text =
        std::fs::read_to_string(cluster_dir.join("run").join(format!("{component}.pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// User + system CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

/// (VmRSS, VmHWM) in bytes.
pub fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed memory line")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds of a set of named processes at one moment.
#[derive(Clone, Debug, Default)]
pub struct CpuSnapshot {
    pub taken: Option<std::time::Instant>,
    pub seconds: BTreeMap<String, f64>,
}

impl CpuSnapshot {
    pub fn take(processes: &[(String, u32)]) -> Self {
        let seconds = processes
            .iter()
            .filter_map(|(name, pid)| cpu_seconds(*pid).ok().map(|s| (name.clone(), s)))
            .collect();
        Self {
            taken: Some(std::time::Instant::now()),
            seconds,
        }
    }

    /// CPU seconds each process used between `self` and `later`.
    pub fn used_until(&self, later: &CpuSnapshot) -> BTreeMap<String, f64> {
        later
            .seconds
            .iter()
            .filter_map(|(name, end)| {
                self.seconds
                    .get(name)
                    .map(|start| (name.clone(), end - start))
            })
            .collect()
    }

    pub fn wall_seconds_until(&self, later: &CpuSnapshot) -> f64 {
        match (self.taken, later.taken) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// The cluster components that run, with their pids.
pub fn cluster_processes(cluster_dir: &Path) -> Vec<(String, u32)> {
    COMPONENTS
        .iter()
        .filter_map(|c| component_pid(cluster_dir, c).map(|pid| ((*c).to_owned(), pid)))
        .collect()
}

/// Where `hack/cluster` keeps its logs.
pub fn logs_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("logs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let (rss, hwm) = memory(pid).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
