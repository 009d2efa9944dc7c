//! Images without a registry: nothing is ever pulled. An image name maps to a root file
//! system the sandbox builds from this machine:
//! - Tekton's own images (`tekton.local/<name>:<version>`, as `hack/cluster` names them in
//!   the controller's flags) are the host's tools plus the binary built from the pinned
//!   module at `/ko-app/<name>`, where ko puts it;
//! - an image whose registry host ends in `.invalid` cannot be pulled: the container waits
//!   with `ErrImagePull`, then `ImagePullBackOff`, as on a real node;
//! - every other image (a step's, Tekton's shell image) is the host's root file system,
//!   read-only, so `script` and `command` run with the host's `/bin/sh` and coreutils.

use std::collections::HashMap;
use std::path::PathBuf;

/// Registry host suffix that marks an image as unpullable (RFC 2606 keeps `.invalid`
/// from ever resolving).
const UNPULLABLE_HOST_SUFFIX: &str = ".invalid";
/// Where ko installs an image's binary, and so where Tekton's pod specs call it.
pub const KO_APP_DIR: &str = "/ko-app";

/// What an image name stands for on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Image {
    /// The host's root file system, read-only.
    Host,
    /// The host's root file system plus one of Tekton's binaries at `/ko-app/<name>`.
    Binary {
        /// The binary's name inside the image.
        name: String,
        /// The binary on the host.
        path: PathBuf,
    },
    /// An image no registry serves.
    Unpullable,
}

/// The images this node knows by name.
#[derive(Clone, Debug, Default)]
pub struct Images {
    binaries: HashMap<String, PathBuf>,
}

impl Images {
    /// Knows the given `image=binary path` pairs.
    pub fn new(binaries: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        Self {
            binaries: binaries.into_iter().collect(),
        }
    }

    /// What `image` stands for.
    pub fn resolve(&self, image: &str) -> Image {
        if let Some(path) = self.binaries.get(image) {
            return Image::Binary {
                name: binary_name(image),
                path: path.clone(),
            };
        }
        match registry_host(image) {
            Some(host)
                if host
                    .split(':')
                    .next()
                    .is_some_and(|name| name.ends_with(UNPULLABLE_HOST_SUFFIX)) =>
            {
                Image::Unpullable
            }
            // An unknown image of the registry we name Tekton's images under was never built.
            Some(host)
                if self
                    .binaries
                    .keys()
                    .any(|known| registry_host(known) == Some(host)) =>
            {
                Image::Unpullable
            }
            _ => Image::Host,
        }
    }
}

/// The last path component of an image's repository: ko names the binary after it.
fn binary_name(image: &str) -> String {
    let repository = image.split('@').next().unwrap_or(image);
    let last = repository.rsplit('/').next().unwrap_or(repository);
    last.split(':').next().unwrap_or(last).to_owned()
}

/// The registry host of an image name, if it names one (a first component with a dot or a
/// port, or `localhost`), as container runtimes read it.
fn registry_host(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_host_binaries_or_nothing() {
        let images = Images::new([(
            "tekton.local/entrypoint:v1.15.0".to_owned(),
            PathBuf::from("/cache/tekton-entrypoint-v1.15.0"),
        )]);
        let cases = [
            (
                "tekton.local/entrypoint:v1.15.0",
                Image::Binary {
                    name: "entrypoint".to_owned(),
                    path: PathBuf::from("/cache/tekton-entrypoint-v1.15.0"),
                },
            ),
            ("tekton.local/nop:v1.15.0", Image::Unpullable),
            ("registry.invalid/app:1", Image::Unpullable),
            ("pull.me.invalid:5000/app@sha256:00", Image::Unpullable),
            ("busybox", Image::Host),
            ("alpine:3", Image::Host),
            ("library/ubuntu", Image::Host),
            (
                "cgr.dev/chainguard/busybox@sha256:19f02276bf8dbdd62f069b922f10c65262cc34b710eea26ff928129a736be791",
                Image::Host,
            ),
        ];
        for (image, expected) in cases {
            assert_eq!(images.resolve(image), expected, "{image}");
        }
    }
}
