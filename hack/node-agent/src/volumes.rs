//! A pod's volumes and files on the host, under `<pods dir>/<pod uid>/`, as a kubelet
//! keeps them under /var/lib/kubelet/pods: emptyDirs as folders anyone may write (so the
//! unprivileged containers can), the downward API as files rewritten whenever the pod's
//! metadata changes (Tekton's `ready` and `cancel` annotations), ConfigMap, Secret and
//! projected volumes (the ServiceAccount token from the TokenRequest API) as files, and
//! one termination-message file per container. Container environments resolve here too,
//! as they read the same sources.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, EnvVar, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::spec::expand;

/// Mode of an emptyDir: the kubelet makes them writable by any user.
const EMPTY_DIR_MODE: u32 = 0o777;
/// Mode of the folders and files of read-only volumes, and of termination-message files
/// (written by the container's user).
const READ_ONLY_DIR_MODE: u32 = 0o755;
/// Mode of the files of read-only volumes.
const READ_ONLY_FILE_MODE: u32 = 0o644;
/// Mode of a termination-message file: the container's unprivileged user writes it.
const TERMINATION_FILE_MODE: u32 = 0o666;
/// Lifetime the kubelet asks for a projected ServiceAccount token when the pod names none.
const DEFAULT_TOKEN_SECONDS: i64 = 3607;

/// Why a volume or an environment variable cannot be set up (yet).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// An API read failed (a missing ConfigMap or Secret the pod needs, or a request).
    #[error("{what}: {source}")]
    Api {
        /// What was read.
        what: String,
        /// What failed.
        #[source]
        source: kube::Error,
    },
    /// A ConfigMap or Secret lacks a key the pod needs.
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    MissingKey {
        /// ConfigMap or Secret.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The key.
        key: String,
    },
    /// The volume's kind is not one a Tekton pod uses here.
    #[error(
        "volume {0}: this node supports emptyDir, downwardAPI, configMap, secret and projected volumes only"
    )]
    Unsupported(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The host folder of one pod.
#[derive(Clone, Debug)]
pub struct PodFiles {
    root: PathBuf,
}

impl PodFiles {
    /// The folder of the pod with `uid` under `pods_dir`.
    pub fn new(pods_dir: &Path, uid: &str) -> Self {
        Self {
            root: pods_dir.join(uid),
        }
    }

    /// The host folder of a volume.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(name)
    }

    /// The host file behind a container's termination-message path, created empty.
    pub fn termination_file(&self, container: &str) -> Result<PathBuf, VolumeError> {
        let folder = self.root.join("termination");
        create_folder(&folder, READ_ONLY_DIR_MODE)?;
        let path = folder.join(container);
        std::fs::write(&path, b"").map_err(io_error(&path))?;
        set_mode(&path, TERMINATION_FILE_MODE)?;
        Ok(path)
    }

    /// Reads a container's termination message: what the container wrote, cut to the
    /// kubelet's limit of 4096 bytes.
    pub fn termination_message(&self, container: &str) -> Option<String> {
        /// The kubelet keeps at most this much of a termination message.
        const MAX_TERMINATION_MESSAGE_BYTES: usize = 4096;
        let mut bytes = std::fs::read(self.root.join("termination").join(container)).ok()?;
        bytes.truncate(MAX_TERMINATION_MESSAGE_BYTES);
        let message = String::from_utf8_lossy(&bytes).into_owned();
        (!message.is_empty()).then_some(message)
    }

    /// Removes everything of the pod.
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Mounts (creates) every volume of the pod.
    pub async fn set_up(&self, client: &Client, pod: &Pod) -> Result<(), VolumeError> {
        let namespace = pod.namespace().unwrap_or_default();
        for volume in pod
            .spec
            .iter()
            .flat_map(|spec| spec.volumes.iter().flatten())
        {
            let folder = self.volume(&volume.name);
            let files = volume_files(client, &namespace, pod, volume).await?;
            match files {
                None => create_folder(&folder, EMPTY_DIR_MODE)?,
                Some(files) => write_files(&folder, &files)?,
            }
        }
        Ok(())
    }

    /// Rewrites the downward-API files from the pod's current metadata.
    pub fn refresh_downward_api(&self, pod: &Pod) -> Result<(), VolumeError> {
        for volume in pod
            .spec
            .iter()
            .flat_map(|spec| spec.volumes.iter().flatten())
        {
            let mut files = BTreeMap::new();
            if let Some(downward) = &volume.downward_api {
                add_downward_files(&mut files, pod, downward.items.iter().flatten());
            }
            for source in volume
                .projected
                .iter()
                .flat_map(|projected| projected.sources.iter().flatten())
            {
                if let Some(downward) = &source.downward_api {
                    add_downward_files(&mut files, pod, downward.items.iter().flatten());
                }
            }
            if !files.is_empty() {
                write_files(&self.volume(&volume.name), &files)?;
            }
        }
        Ok(())
    }
}

/// The files of a volume; `None` for an emptyDir.
async fn volume_files(
    client: &Client,
    namespace: &str,
    pod: &Pod,
    volume: &Volume,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let mut files = BTreeMap::new();
    if volume.empty_dir.is_some() {
        return Ok(None);
    } else if let Some(downward) = &volume.downward_api {
        add_downward_files(&mut files, pod, downward.items.iter().flatten());
    } else if let Some(source) = &volume.config_map {
        let data = config_map_data(client, namespace, &source.name, source.optional).await?;
        add_key_files(
            &mut files,
            data,
            source.items.as_deref(),
            "ConfigMap",
            namespace,
            &source.name,
        )?;
    } else if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let data = secret_data(client, namespace, &name, source.optional).await?;
        add_key_files(
            &mut files,
            data,
            source.items.as_deref(),
            "Secret",
            namespace,
            &name,
        )?;
    } else if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let value = service_account_token(
                    client,
                    namespace,
                    pod,
                    token.audience.clone(),
                    token.expiration_seconds,
                )
                .await?;
                files.insert(token.path.clone(), value.into_bytes());
            }
            if let Some(source) = &source.config_map {
                let data =
                    config_map_data(client, namespace, &source.name, source.optional).await?;
                add_key_files(
                    &mut files,
                    data,
                    source.items.as_deref(),
                    "ConfigMap",
                    namespace,
                    &source.name,
                )?;
            }
            if let Some(source) = &source.secret {
                let data = secret_data(client, namespace, &source.name, source.optional).await?;
                add_key_files(
                    &mut files,
                    data,
                    source.items.as_deref(),
                    "Secret",
                    namespace,
                    &source.name,
                )?;
            }
            if let Some(downward) = &source.downward_api {
                add_downward_files(&mut files, pod, downward.items.iter().flatten());
            }
        }
    } else {
        return Err(VolumeError::Unsupported(volume.name.clone()));
    }
    Ok(Some(files))
}

fn add_downward_files<'a>(
    files: &mut BTreeMap<String, Vec<u8>>,
    pod: &Pod,
    items: impl Iterator<Item = &'a DownwardAPIVolumeFile>,
) {
    for item in items {
        let value = item
            .field_ref
            .as_ref()
            .map(|field| field_value(pod, &field.field_path).unwrap_or_default())
            .unwrap_or_default();
        files.insert(item.path.clone(), value.into_bytes());
    }
}

fn add_key_files(
    files: &mut BTreeMap<String, Vec<u8>>,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> Result<(), VolumeError> {
    match items {
        None => files.extend(data),
        Some(items) => {
            for item in items {
                let value =
                    data.get(&item.key)
                        .cloned()
                        .ok_or_else(|| VolumeError::MissingKey {
                            kind,
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                            key: item.key.clone(),
                        })?;
                files.insert(item.path.clone(), value);
            }
        }
    }
    Ok(())
}

async fn config_map_data(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    keyed_data::<ConfigMap>(client, namespace, name, optional, |config_map| {
        let mut data: BTreeMap<String, Vec<u8>> = config_map
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.into_bytes()))
            .collect();
        data.extend(
            config_map
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, value.0)),
        );
        data
    })
    .await
}

async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    keyed_data::<Secret>(client, namespace, name, optional, |secret| {
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.0))
            .chain(
                secret
                    .string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.into_bytes())),
            )
            .collect()
    })
    .await
}

/// The keys of a ConfigMap or Secret; a missing one is empty when `optional`,
/// else an error (the kubelet keeps the pod waiting).
async fn keyed_data<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
    keys: impl FnOnce(K) -> BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let what = || format!("{} {namespace}/{name}", K::kind(&()).to_lowercase());
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let found = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        what: what(),
        source,
    })?;
    match found {
        Some(object) => Ok(keys(object)),
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => Err(VolumeError::Api {
            what: what(),
            source: not_found(),
        }),
    }
}

fn not_found() -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure("not found", "NotFound")
            .with_code(404)
            .boxed(),
    )
}

/// A token for the pod's ServiceAccount, bound to the pod, from the TokenRequest API.
async fn service_account_token(
    client: &Client,
    namespace: &str,
    pod: &Pod,
    audience: Option<String>,
    expiration_seconds: Option<i64>,
) -> Result<String, VolumeError> {
    let account = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(audience.into_iter().collect()),
            expiration_seconds: Some(expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS)),
            bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let response = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|source| VolumeError::Api {
            what: format!("token for serviceaccount {namespace}/{account}"),
            source,
        })?;
    Ok(response
        .status
        .and_then(|status| status.token)
        .unwrap_or_default())
}

/// The value of a downward-API field path, as the kubelet renders it.
pub fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let metadata = &pod.metadata;
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    let render_map = |map: &Option<BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(key, value)| format!("{key}={value:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Some(key) = keyed("metadata.annotations['") {
        return Some(
            metadata
                .annotations
                .as_ref()?
                .get(&key)
                .cloned()
                .unwrap_or_default(),
        );
    }
    if let Some(key) = keyed("metadata.labels['") {
        return Some(
            metadata
                .labels
                .as_ref()?
                .get(&key)
                .cloned()
                .unwrap_or_default(),
        );
    }
    match path {
        "metadata.name" => metadata.name.clone(),
        "metadata.namespace" => metadata.namespace.clone(),
        "metadata.uid" => metadata.uid.clone(),
        "metadata.annotations" => Some(render_map(&metadata.annotations)),
        "metadata.labels" => Some(render_map(&metadata.labels)),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "status.podIP" | "status.hostIP" => Some("127.0.0.1".to_owned()),
        _ => None,
    }
}

/// A container's environment, in the kubelet's order and with its `$(VAR)` expansion:
/// literal values, downward-API fields, ConfigMap and Secret keys.
pub async fn resolve_env(
    client: &Client,
    pod: &Pod,
    env: &[EnvVar],
) -> Result<Vec<(String, String)>, VolumeError> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut defined: HashMap<String, String> = HashMap::new();
    let mut resolved = Vec::with_capacity(env.len());
    for var in env {
        let value = if let Some(value) = &var.value {
            expand(value, &defined)
        } else if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                field_value(pod, &field.field_path).unwrap_or_default()
            } else if let Some(key) = &from.config_map_key_ref {
                let data = config_map_data(client, &namespace, &key.name, key.optional).await?;
                let found = key_value(
                    &data,
                    "ConfigMap",
                    &namespace,
                    &key.name,
                    &key.key,
                    key.optional,
                )?;
                match found {
                    Some(value) => value,
                    None => continue,
                }
            } else if let Some(key) = &from.secret_key_ref {
                let data = secret_data(client, &namespace, &key.name, key.optional).await?;
                let found = key_value(
                    &data,
                    "Secret",
                    &namespace,
                    &key.name,
                    &key.key,
                    key.optional,
                )?;
                match found {
                    Some(value) => value,
                    None => continue,
                }
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        defined.insert(var.name.clone(), value.clone());
        resolved.push((var.name.clone(), value));
    }
    Ok(resolved)
}

/// One key of a ConfigMap's or Secret's data as an env value; `None` when it
/// is missing and the reference is optional (the variable is then left out).
fn key_value(
    data: &BTreeMap<String, Vec<u8>>,
    kind: &'static str,
    namespace: &str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>, VolumeError> {
    match data.get(key) {
        Some(value) => Ok(Some(String::from_utf8_lossy(value).into_owned())),
        None if optional == Some(true) => Ok(None),
        None => Err(VolumeError::MissingKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
        }),
    }
}

fn create_folder(folder: &Path, mode: u32) -> Result<(), VolumeError> {
    std::fs::create_dir_all(folder).map_err(io_error(folder))?;
    set_mode(folder, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), VolumeError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error(path))
}

/// Writes files into a read-only volume's folder, each replaced atomically (a reader sees
/// the old or the new content, never half of it), and only when its content changed.
fn write_files(folder: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<(), VolumeError> {
    create_folder(folder, READ_ONLY_DIR_MODE)?;
    for (relative, content) in files {
        let path = folder.join(relative);
        if std::fs::read(&path).is_ok_and(|current| current == *content) {
            continue;
        }
        if let Some(parent) = path.parent() {
            create_folder(parent, READ_ONLY_DIR_MODE)?;
        }
        let temporary = path.with_extension("node-agent-tmp");
        std::fs::write(&temporary, content).map_err(io_error(&temporary))?;
        set_mode(&temporary, READ_ONLY_FILE_MODE)?;
        std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    #[test]
    fn downward_fields_render_as_the_kubelet_does() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("run-1-pod".to_owned()),
                namespace: Some("ci".to_owned()),
                annotations: Some(
                    [("tekton.dev/ready".to_owned(), "READY".to_owned())]
                        .into_iter()
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let cases = [
            ("metadata.annotations['tekton.dev/ready']", Some("READY")),
            ("metadata.annotations['tekton.dev/cancel']", Some("")),
            ("metadata.name", Some("run-1-pod")),
            ("metadata.namespace", Some("ci")),
            ("metadata.annotations", Some("tekton.dev/ready=\"READY\"")),
            ("spec.unknown", None),
        ];
        for (path, expected) in cases {
            assert_eq!(field_value(&pod, path).as_deref(), expected, "{path}");
        }
    }

    #[test]
    fn files_are_replaced_whole() {
        let folder = std::env::temp_dir().join(format!("node-agent-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        let mut files = BTreeMap::new();
        files.insert("ready".to_owned(), Vec::new());
        write_files(&folder, &files).expect("first write");
        files.insert("ready".to_owned(), b"READY".to_vec());
        write_files(&folder, &files).expect("second write");
        let content = std::fs::read(folder.join("ready")).expect("file");
        let leftovers = std::fs::read_dir(&folder).expect("folder").count();
        let _ = std::fs::remove_dir_all(&folder);
        assert_eq!(content, b"READY");
        assert_eq!(leftovers, 1);
    }
}
