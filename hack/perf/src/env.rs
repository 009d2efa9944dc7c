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
    /// The same observer built with glibc's malloc, if given.
    pub glibc_build: Option<PathBuf>,
    /// The same observer built with jemalloc, if given.
    pub jemalloc_build: Option<PathBuf>,
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
        let default = |name: &str, args: &[&str]| ObserverVariant {
            name: format!("{} {name}", self.observer_name),
            binary: self.observer_bin.clone(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
        };
        let mut variants = vec![
            default("--list-page-size=100", &["--list-page-size=100"]),
            default("--streaming-list", &["--streaming-list"]),
        ];
        if let Some(glibc) = &self.glibc_build {
            variants.push(ObserverVariant {
                name: "glibc malloc".to_owned(),
                binary: glibc.clone(),
                args: Vec::new(),
                env: Vec::new(),
            });
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
        if let Some(jemalloc) = &self.jemalloc_build {
            variants.push(ObserverVariant {
                name: "jemalloc".to_owned(),
                binary: jemalloc.clone(),
                args: Vec::new(),
                env: Vec::new(),
            });
        }
        variants
    }
}
