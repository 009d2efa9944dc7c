//! What every scenario needs: the cluster, the observer build, the run's id.

use std::path::PathBuf;

use kube::Client;

pub struct Env {
    pub client: Client,
    /// The local cluster's state directory (`.cluster`).
    pub cluster_dir: PathBuf,
    pub observer_bin: PathBuf,
    /// A kubeconfig of the observer's own ServiceAccount.
    pub observer_kubeconfig: PathBuf,
    /// Its user name in the audit log.
    pub observer_user: String,
    /// Unique per run: namespaces and labels carry it.
    pub run_id: String,
    /// Where logs and intermediate files go (target/perf).
    pub work_dir: PathBuf,
    pub tekton_version: String,
}

impl Env {
    pub fn namespace(&self, scenario: &str) -> String {
        format!("perf-{scenario}-{}", self.run_id)
    }

    pub fn observer_log(&self, name: &str) -> PathBuf {
        self.work_dir.join(format!("observer-{name}.log"))
    }
}
