//! The command line that runs one container as a sandboxed process, with Debian's
//! `bubblewrap` (new PID, IPC, UTS and cgroup namespaces and a private mount namespace)
//! and `setpriv` (drop to an unprivileged user without capabilities). The network namespace is inherited: the
//! cluster's, which has nothing but loopback. Pure: the caller creates the host paths.
//!
//! The root file system is a fresh tmpfs holding the host's system folders read-only (the
//! "image"), `/dev`, `/proc`, an empty `/tmp`, the pod's volumes at their mount paths and
//! the container's termination-message file. The host's `/root`, `/home`, `/work`, `/var`
//! and `/run` are not there. The container's command is PID 1 of its PID namespace, as
//! in a real container, so SIGTERM reaches it the way a kubelet sends it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Host folders that make up every image's root file system, when the host has them.
pub const HOST_IMAGE_ENTRIES: [&str; 9] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
];
/// The `PATH` of an image that sets none: Docker's default.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One entry of the host's image folders: a folder, or a symbolic link (merged `/usr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEntry {
    /// A folder bound read-only.
    Folder(String),
    /// A symbolic link recreated with the same target.
    Link {
        /// The entry's name under `/`.
        name: String,
        /// Where the link points.
        target: PathBuf,
    },
}

/// A host path made visible inside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// The path on the host.
    pub source: PathBuf,
    /// The path inside the sandbox.
    pub target: String,
    /// Whether the sandbox may not write through it.
    pub read_only: bool,
}

/// Everything one container's sandbox needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// The unprivileged user and group the container runs as.
    pub user: (u32, u32),
    /// Host name inside the sandbox: the pod's name.
    pub hostname: String,
    /// The image's folders.
    pub image: Vec<HostEntry>,
    /// Volumes, binaries and the termination-message file, mounted in this order.
    pub binds: Vec<Bind>,
    /// Working directory (created if missing, as runtimes do).
    pub working_dir: String,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// The command line.
    pub command: Vec<String>,
}

impl Sandbox {
    /// The program to run and its arguments:
    /// `setpriv --pdeathsig KILL -- bwrap … -- setpriv --reuid … -- command…`.
    ///
    /// NB: bwrap runs as root, without a user namespace, as a container runtime does: it
    /// must read the bound host paths (the binary cache lives under `/root`), and an
    /// unprivileged bwrap could not. Inside, `setpriv` drops to the container's user with
    /// no capabilities at all and `no_new_privs` before it runs the command.
    pub fn command_line(&self) -> (OsString, Vec<OsString>) {
        let (uid, gid) = self.user;
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&[
            // NB: if the agent dies, its containers die with it, as nothing else could
            // report their end.
            "--pdeathsig",
            "KILL",
            "--",
            "bwrap",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",
            "--cap-add",
            "CAP_SETUID,CAP_SETGID",
            "--hostname",
            &self.hostname,
        ]);
        for entry in &self.image {
            match entry {
                HostEntry::Folder(name) => {
                    let path = format!("/{name}");
                    args.extend(["--ro-bind".into(), path.clone().into(), path.into()]);
                }
                HostEntry::Link { name, target } => {
                    args.extend([
                        "--symlink".into(),
                        target.clone().into_os_string(),
                        format!("/{name}").into(),
                    ]);
                }
            }
        }
        args.extend(
            ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
                .iter()
                .map(OsString::from),
        );
        let mut made: Vec<String> = Vec::new();
        let mut make_parents = |args: &mut Vec<OsString>, path: &str| {
            // bwrap would make missing parents 0700, which the container's user could not
            // enter.
            for parent in ancestors(path) {
                if !made.contains(&parent) && !self.image_covers(&parent) {
                    args.extend([
                        "--perms".into(),
                        FOLDER_PERMS.into(),
                        "--dir".into(),
                        parent.clone().into(),
                    ]);
                    made.push(parent);
                }
            }
        };
        for bind in &self.binds {
            make_parents(&mut args, &bind.target);
            let flag = if bind.read_only {
                "--ro-bind"
            } else {
                "--bind"
            };
            args.extend([
                flag.into(),
                bind.source.clone().into_os_string(),
                bind.target.clone().into(),
            ]);
        }
        make_parents(
            &mut args,
            &format!("{}/.", self.working_dir.trim_end_matches('/')),
        );
        args.extend([
            "--chdir".into(),
            self.working_dir.clone().into(),
            "--clearenv".into(),
        ]);
        for (name, value) in &self.env {
            args.extend(["--setenv".into(), name.into(), value.into()]);
        }
        push_all(
            &mut args,
            &[
                "--",
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ],
        );
        args.extend(self.command.iter().map(OsString::from));
        ("setpriv".into(), args)
    }

    /// Whether a path lies in a folder of the image (read-only, already there).
    fn image_covers(&self, path: &str) -> bool {
        let top = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        path == "/"
            || self.image.iter().any(|entry| match entry {
                HostEntry::Folder(name) | HostEntry::Link { name, .. } => name == top,
            })
            || ["dev", "proc", "tmp"].contains(&top)
    }
}

/// Mode of the folders made for mount points and the working directory, as runtimes
/// make them.
const FOLDER_PERMS: &str = "0755";

fn push_all(args: &mut Vec<OsString>, items: &[&str]) {
    args.extend(items.iter().map(OsString::from));
}

/// The proper ancestors of an absolute path, outermost first (`/a/b/c` → `/a`, `/a/b`).
fn ancestors(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
    (1..parts.len())
        .map(|depth| format!("/{}", parts[..depth].join("/")))
        .collect()
}

/// The host's image folders, as found under `root` (normally `/`).
pub fn host_image(root: &Path) -> Vec<HostEntry> {
    HOST_IMAGE_ENTRIES
        .iter()
        .filter_map(|name| {
            let path = root.join(name);
            let metadata = std::fs::symlink_metadata(&path).ok()?;
            if metadata.file_type().is_symlink() {
                let target = std::fs::read_link(&path).ok()?;
                Some(HostEntry::Link {
                    name: (*name).to_owned(),
                    target,
                })
            } else if metadata.is_dir() {
                Some(HostEntry::Folder((*name).to_owned()))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_drops_privileges_then_builds_the_root() {
        let sandbox = Sandbox {
            user: (65532, 65532),
            hostname: "pod-1".to_owned(),
            image: vec![
                HostEntry::Folder("usr".to_owned()),
                HostEntry::Link {
                    name: "bin".to_owned(),
                    target: PathBuf::from("usr/bin"),
                },
            ],
            binds: vec![
                Bind {
                    source: PathBuf::from("/state/pod/volumes/tekton-internal-bin"),
                    target: "/tekton/bin".to_owned(),
                    read_only: false,
                },
                Bind {
                    source: PathBuf::from("/cache/entrypoint"),
                    target: "/ko-app/entrypoint".to_owned(),
                    read_only: true,
                },
            ],
            working_dir: "/workspace".to_owned(),
            env: vec![("PATH".to_owned(), DEFAULT_PATH.to_owned())],
            command: vec!["/ko-app/entrypoint".to_owned(), "init".to_owned()],
        };
        let (program, args) = sandbox.command_line();
        let args: Vec<String> = args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert_eq!(program, "setpriv");
        let joined = args.join(" ");
        assert!(
            joined.starts_with("--pdeathsig KILL -- bwrap --unshare-pid"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "--ro-bind /usr /usr --symlink usr/bin /bin --dev /dev --proc /proc --tmpfs /tmp \
                 --perms 0755 --dir /tekton \
                 --bind /state/pod/volumes/tekton-internal-bin /tekton/bin \
                 --perms 0755 --dir /ko-app \
                 --ro-bind /cache/entrypoint /ko-app/entrypoint \
                 --perms 0755 --dir /workspace \
                 --chdir /workspace --clearenv --setenv PATH "
            ),
            "{joined}"
        );
        assert!(
            joined.ends_with(
                "-- setpriv --reuid=65532 --regid=65532 --clear-groups --inh-caps=-all \
                 --bounding-set=-all --no-new-privs -- /ko-app/entrypoint init"
            ),
            "{joined}"
        );
        assert!(!joined.contains("--share-net"), "{joined}");
    }

    #[test]
    fn ancestors_outermost_first() {
        assert_eq!(ancestors("/a/b/c"), vec!["/a", "/a/b"]);
        assert_eq!(ancestors("/a"), Vec::<String>::new());
        assert_eq!(ancestors("/workspace/."), vec!["/workspace"]);
    }

    #[test]
    fn host_image_keeps_links_and_folders() {
        let root = std::env::temp_dir().join(format!("node-agent-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/bin")).expect("temp folders");
        std::fs::create_dir_all(root.join("etc")).expect("temp folders");
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).expect("temp link");
        let image = host_image(&root);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            image,
            vec![
                HostEntry::Folder("usr".to_owned()),
                HostEntry::Link {
                    name: "bin".to_owned(),
                    target: PathBuf::from("usr/bin"),
                },
                HostEntry::Folder("etc".to_owned()),
            ]
        );
    }
}
