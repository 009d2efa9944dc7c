//! What the sink client carries besides the URL: CAs to trust on top of the
//! system's, a client certificate (mTLS), a bearer token and Standard
//! Webhooks signing secrets. Each comes from a file, so a mounted Secret or a
//! projected ServiceAccount token works as is; the CA can also come from key
//! `sink.CACerts` of Tekton's `config-events` (Knative's name for a sink's
//! CA, see sink_config.rs).
//!
//! Kubernetes swaps a mounted Secret's files under the running process, so
//! [`CredentialFiles::read`] is called again periodically and the client is
//! rebuilt only when what it read differs from what it holds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;

/// How often the files are read again. The kubelet refreshes mounted
/// Secrets and projected tokens within about a minute; a few seconds more
/// costs a handful of small reads.
pub const CREDENTIAL_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Where each credential is read from; all optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialFiles {
    /// PEM bundle of CAs trusted on top of the system's (`--sink-ca-file`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain (`--sink-client-cert`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate (`--sink-client-key`).
    pub client_key: Option<PathBuf>,
    /// A bearer token (`--sink-token-file`), sent as `Authorization: Bearer`.
    pub token_file: Option<PathBuf>,
    /// Standard Webhooks secrets, whitespace-separated
    /// (`--sink-signing-secret-file`).
    pub signing_secret_file: Option<PathBuf>,
}

/// What was read, as read. Compared to decide whether to rebuild the client;
/// never printed (it holds keys and tokens).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Material {
    /// The `--sink-ca-file` bundle.
    pub ca_file: Option<Vec<u8>>,
    /// `sink.CACerts` of `config-events`.
    pub config_ca: Option<String>,
    /// The client certificate chain and key.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The bearer token, trimmed.
    pub token: Option<String>,
    /// The signing secrets' text.
    pub signing_secrets: Option<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("ca_file", &self.ca_file.is_some())
            .field("config_ca", &self.config_ca.is_some())
            .field("client_identity", &self.client_identity.is_some())
            .field("token", &self.token.is_some())
            .field("signing_secrets", &self.signing_secrets.is_some())
            .finish()
    }
}

impl CredentialFiles {
    /// Reads every configured file; `config_ca` is the CA bundle from
    /// Tekton's ConfigMap, if any.
    pub fn read(&self, config_ca: Option<&str>) -> Result<Material, Error> {
        let client_identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((
                read_file(cert, "--sink-client-cert")?,
                read_file(key, "--sink-client-key")?,
            )),
            (None, None) => None,
            _ => {
                return Err(Error::SinkCredentials {
                    what: "--sink-client-cert / --sink-client-key".to_owned(),
                    reason: "a client certificate needs both its certificate and its key"
                        .to_owned(),
                });
            }
        };
        let token = match &self.token_file {
            Some(path) => {
                let bytes = read_file(path, "--sink-token-file")?;
                let token = String::from_utf8(bytes).map_err(|_| Error::SinkCredentials {
                    what: format!("--sink-token-file {}", path.display()),
                    reason: "the token is not UTF-8 text".to_owned(),
                })?;
                let token = token.trim().to_owned();
                if token.is_empty() {
                    return Err(Error::SinkCredentials {
                        what: format!("--sink-token-file {}", path.display()),
                        reason: "the file is empty".to_owned(),
                    });
                }
                Some(token)
            }
            None => None,
        };
        let signing_secrets = match &self.signing_secret_file {
            Some(path) => Some(
                String::from_utf8(read_file(path, "--sink-signing-secret-file")?).map_err(
                    |_| Error::SinkCredentials {
                        what: format!("--sink-signing-secret-file {}", path.display()),
                        reason: "the secrets are not UTF-8 text".to_owned(),
                    },
                )?,
            ),
            None => None,
        };
        Ok(Material {
            ca_file: self
                .ca_file
                .as_deref()
                .map(|path| read_file(path, "--sink-ca-file"))
                .transpose()?,
            config_ca: config_ca
                .map(str::trim)
                .filter(|pem| !pem.is_empty())
                .map(str::to_owned),
            client_identity,
            token,
            signing_secrets,
        })
    }
}

fn read_file(path: &Path, flag: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::SinkCredentials {
        what: format!("{flag} {}", path.display()),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tso-credentials-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn nothing_configured_reads_nothing() {
        let material = CredentialFiles::default().read(None).unwrap();
        assert_eq!(material, Material::default());
    }

    #[test]
    fn the_token_is_trimmed_and_an_empty_one_refused() {
        let files = CredentialFiles {
            token_file: Some(scratch("token", "  abc.def\n")),
            ..CredentialFiles::default()
        };
        assert_eq!(files.read(None).unwrap().token.as_deref(), Some("abc.def"));
        let empty = CredentialFiles {
            token_file: Some(scratch("empty-token", "\n")),
            ..CredentialFiles::default()
        };
        let error = empty.read(None).unwrap_err().to_string();
        assert!(
            error.contains("--sink-token-file") && error.contains("empty"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_file_names_its_flag_and_path() {
        let files = CredentialFiles {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..CredentialFiles::default()
        };
        let error = files.read(None).unwrap_err().to_string();
        assert!(
            error.contains("--sink-ca-file /nonexistent/ca.pem"),
            "{error}"
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let files = CredentialFiles {
            client_cert: Some(scratch("cert", "x")),
            ..CredentialFiles::default()
        };
        let error = files.read(None).unwrap_err().to_string();
        assert!(error.contains("both"), "{error}");
    }

    #[test]
    fn a_blank_config_ca_counts_as_none_and_debug_hides_values() {
        let material = CredentialFiles {
            token_file: Some(scratch("secret-token", "s3cret")),
            ..CredentialFiles::default()
        }
        .read(Some("  \n"))
        .unwrap();
        assert_eq!(material.config_ca, None);
        assert!(!format!("{material:?}").contains("s3cret"));
    }
}
