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
    /// What the default build is, in words (its allocator).
    pub observer_name: String,
    /// Extra environment of the latency scenario's observer.
    pub observer_env: Vec<(String, String)>,
    /// The same observer built with glibc's malloc, if given.
    pub glibc_build: Option<PathBuf>,
    /// Other builds of the same observer (another allocator), by name.
    pub other_builds: Vec<(String, PathBuf)>,
}

/// One way to run the observer in the memory scenario: a build, flags and
/// environment.
pub struct ObserverVariant {
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ObserverVariant {
    /// For file names.
    pub fn slug(&self) -> String {
        self.name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    }
}

/// The watch's ways of listing: pages of 100 (the default), pages of 500
/// (kube's default), a streaming list (each object on its own, no page held
/// at once).
const LIST_SETTINGS: &[(&str, &[&str])] = &[
    ("", &[]),
    ("--list-page-size=500", &["--list-page-size=500"]),
    ("--streaming-list", &["--streaming-list"]),
];

/// glibc's malloc keeps one arena per thread that touched the heap, so
/// decoding the list on several runtime threads can leave memory behind;
/// fewer arenas trade that for contention, a trim threshold returns free
/// heap tops sooner.
const GLIBC_SETTINGS: &[&[(&str, &str)]] = &[
    &[("MALLOC_ARENA_MAX", "2")],
    &[("MALLOC_ARENA_MAX", "1")],
    &[
        ("MALLOC_ARENA_MAX", "2"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ],
];

impl Env {
    pub fn namespace(&self, scenario: &str) -> String {
        format!("perf-{scenario}-{}", self.run_id)
    }

    pub fn observer_log(&self, name: &str) -> PathBuf {
        self.work_dir.join(format!("observer-{name}.log"))
    }
}

impl Env {
    /// Every variant the memory scenario tries besides the default: the
    /// watch's list settings on the default build, then the other builds.
    pub fn memory_variants(&self) -> Vec<ObserverVariant> {
        // Each build with each way of listing; the default build's default
        // listing is the scenario's main case, not a variant.
        let mut builds = vec![(self.observer_name.clone(), self.observer_bin.clone())];
        if let Some(glibc) = self
            .glibc_build
            .as_ref()
            .filter(|g| **g != self.observer_bin)
        {
            builds.push(("glibc malloc".to_owned(), glibc.clone()));
        }
        builds.extend(self.other_builds.iter().cloned());
        let mut variants = Vec::new();
        for (index, (name, binary)) in builds.iter().enumerate() {
            for (list, args) in LIST_SETTINGS {
                if index == 0 && args.is_empty() {
                    continue;
                }
                variants.push(ObserverVariant {
                    name: if list.is_empty() {
                        name.clone()
                    } else {
                        format!("{name}, {list}")
                    },
                    binary: binary.clone(),
                    args: args.iter().map(|a| (*a).to_owned()).collect(),
                    env: Vec::new(),
                });
            }
        }
        if let Some(glibc) = &self.glibc_build {
            for settings in GLIBC_SETTINGS {
                let words: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
                variants.push(ObserverVariant {
                    name: format!("glibc malloc, {}", words.join(", ")),
                    binary: glibc.clone(),
                    args: Vec::new(),
                    env: settings
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                });
            }
        }
        variants
    }
}
