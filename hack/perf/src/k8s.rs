//! The cluster side of the scenarios: namespaces, TaskRuns, the observer
//! process, Tekton's config-events sink and the API server's audit log.

use std::collections::BTreeMap;
use std::io::{BufRead, Seek};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Label on everything a perf run creates, so a run can find (and leave
/// out) what earlier ones left behind.
pub const RUN_LABEL: &str = "perf.tekton-step-observer/run";

pub fn taskrun_resource() -> ApiResource {
    ApiResource {
        group: "tekton.dev".into(),
        version: "v1".into(),
        api_version: "tekton.dev/v1".into(),
        kind: "TaskRun".into(),
        plural: "taskruns".into(),
    }
}

pub fn taskruns(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &taskrun_resource())
}

/// Runs kubectl (on PATH inside `hack/cluster exec`), returning stdout.
pub fn kubectl(args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The label Tekton's webhooks (Knative's) skip namespaces by: writes in such
/// a namespace bypass Tekton's admission.
pub const OUTSIDE_ADMISSION_LABEL: &str = "webhooks.knative.dev/exclude";

pub async fn create_namespace(client: &Client, name: &str, run: &str) -> Result<()> {
    create_namespace_labelled(client, name, run, &[]).await
}

/// A namespace whose writes skip Tekton's admission webhooks: the status
/// writer stands in for Tekton's controller, and the webhook's work on its
/// writes is the rig's cost, not the observer's. [`admit_namespace`] ends it.
pub async fn create_namespace_outside_admission(
    client: &Client,
    name: &str,
    run: &str,
) -> Result<()> {
    create_namespace_labelled(client, name, run, &[(OUTSIDE_ADMISSION_LABEL, "true")]).await
}

/// Writes in `name` go through Tekton's admission webhooks again.
pub async fn admit_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {OUTSIDE_ADMISSION_LABEL: null}}});
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .with_context(|| format!("labelling namespace {name}"))?;
    Ok(())
}

async fn create_namespace_labelled(
    client: &Client,
    name: &str,
    run: &str,
    labels: &[(&str, &str)],
) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let mut all_labels = serde_json::Map::new();
    all_labels.insert(RUN_LABEL.to_owned(), json!(run));
    for (k, v) in labels {
        all_labels.insert((*k).to_owned(), json!(v));
    }
    let ns = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": all_labels},
    }))?;
    api.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    // The namespace's default ServiceAccount, which Tekton's pods use, comes
    // from the controller-manager a moment later.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), name);
    for _ in 0..100 {
        if sas.get_opt("default").await?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("namespace {name} got no default ServiceAccount")
}

/// A TaskRun of `steps` steps that each succeed after `step_ms`, run by the
/// real entrypoint with the SIMULATED_* stand-in (hack/README.md).
pub fn taskrun_manifest(name: &str, run: &str, steps: usize, step_ms: u64) -> Value {
    let steps: Vec<Value> = (0..steps)
        .map(|i| {
            json!({
                "name": format!("s{i}"),
                "image": "busybox",
                "script": "#!/bin/sh\nexit 0\n",
                "env": [
                    {"name": "SIMULATED_EXIT_CODE", "value": "0"},
                    {"name": "SIMULATED_DURATION_MS", "value": step_ms.to_string()},
                    {"name": "SIMULATED_LOG", "value": format!("step s{i} of {name}: ok\n")},
                ],
            })
        })
        .collect();
    json!({
        "apiVersion": "tekton.dev/v1",
        "kind": "TaskRun",
        "metadata": {"name": name, "labels": {RUN_LABEL: run}},
        "spec": {"taskSpec": {"steps": steps}},
    })
}

pub async fn create(api: &Api<DynamicObject>, manifest: Value) -> Result<DynamicObject> {
    let object: DynamicObject = serde_json::from_value(manifest)?;
    api.create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating {}", object.name_any()))
}

/// Tekton's config-events sink: set for the run, put back afterwards.
pub struct ConfigEventsSink {
    client: Client,
    previous: Option<String>,
}

impl ConfigEventsSink {
    pub async fn set(client: &Client, sink: &str) -> Result<Self> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client.clone(), "tekton-pipelines");
        let current = api
            .get("config-events")
            .await
            .context("reading config-events")?;
        let previous = current.data.and_then(|d| d.get("sink").cloned());
        api.patch(
            "config-events",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"sink": sink}})),
        )
        .await
        .context("setting config-events sink")?;
        Ok(Self {
            client: client.clone(),
            previous,
        })
    }

    pub async fn restore(self) -> Result<()> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), "tekton-pipelines");
        let value = self.previous.map_or(Value::Null, Value::String);
        api.patch(
            "config-events",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"sink": value}})),
        )
        .await
        .context("restoring config-events sink")?;
        Ok(())
    }
}

/// The install's RBAC, applied for real, and a kubeconfig with a token of
/// its ServiceAccount: the observer runs with exactly what it ships with,
/// and the audit log tells its requests apart by user.
pub fn observer_kubeconfig(repo: &Path, out: &Path) -> Result<String> {
    kubectl(&["apply", "-k", &repo.join("config").to_string_lossy()])?;
    // The Deployment's pods cannot run on the local node; the RBAC is what matters.
    kubectl(&[
        "-n",
        "tekton-step-observer",
        "scale",
        "deployment/tekton-step-observer",
        "--replicas=0",
    ])?;
    let token = kubectl(&[
        "-n",
        "tekton-step-observer",
        "create",
        "token",
        "tekton-step-observer",
        "--duration=6h",
    ])?;
    let mut config: Value = serde_json::from_str(&kubectl(&[
        "config", "view", "--raw", "--minify", "-o", "json",
    ])?)?;
    config["users"][0]["user"] = json!({"token": token.trim()});
    std::fs::write(out, config.to_string())?;
    Ok("system:serviceaccount:tekton-step-observer:tekton-step-observer".to_owned())
}

/// The observer under test, a release build, as a child process.
pub struct Observer {
    child: Child,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Observer {
    pub async fn start(
        binary: &Path,
        kubeconfig: &Path,
        log: PathBuf,
        args: &[String],
    ) -> Result<Self> {
        Self::start_with_env(binary, kubeconfig, log, args, &[]).await
    }

    /// As [`Observer::start`], with extra environment variables.
    pub async fn start_with_env(
        binary: &Path,
        kubeconfig: &Path,
        log: PathBuf,
        args: &[String],
        extra_env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_niced(binary, kubeconfig, log, args, extra_env, None).await
    }

    /// As [`Observer::start_with_env`], at this `nice` level if given (every
    /// thread inherits it: nice is per thread on Linux, so it is set at exec).
    pub async fn start_niced(
        binary: &Path,
        kubeconfig: &Path,
        log: PathBuf,
        args: &[String],
        extra_env: &[(&str, &str)],
        nice: Option<i32>,
    ) -> Result<Self> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let file = std::fs::File::create(&log)?;
        let mut command = match nice {
            Some(level) => {
                let mut c = Command::new("nice");
                c.args(["-n", &level.to_string()]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("run")
            .args(["--metrics-addr", &metrics.to_string()])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let observer = Self {
            child,
            metrics,
            log,
        };
        for _ in 0..300 {
            if observer.ready().await {
                return Ok(observer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the observer did not become ready in 30 s; see {}",
            observer.log.display()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn ready(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.metrics))
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub async fn metrics_text(&self) -> Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.metrics))
            .await?
            .text()
            .await?)
    }

    /// The value of one sample line (`name{labels} value`), 0 when absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics_text().await?;
        Ok(sample(&text, series).unwrap_or(0.0))
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..200 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// The value of the sample named exactly `series` in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The cumulative buckets (upper bound in seconds, count) of one histogram
/// series, e.g. `tekton_step_observer_dispatch_seconds` with `type="started"`.
pub fn buckets(text: &str, name: &str, label: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// One request as the API server's audit log recorded it.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    /// When the API server received the request.
    pub at: chrono::DateTime<chrono::Utc>,
    pub user: String,
    pub verb: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: String,
    pub code: u16,
}

/// The audit log, read from a byte offset on (what one scenario caused).
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub fn new(cluster_dir: &Path) -> Result<Self> {
        let path = cluster_dir.join("logs").join("audit.log");
        if !path.exists() {
            bail!(
                "{} does not exist: the cluster runs without an audit log; `hack/cluster down` and let `make perf` bring it up",
                path.display()
            );
        }
        Ok(Self { path })
    }

    pub fn offset(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.path)?.len())
    }

    /// Entries from `from` to the current end. The API server writes in
    /// batches: wait a little before reading so the last ones are there.
    pub fn read_from(&self, from: u64) -> Result<Vec<AuditEntry>> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(std::io::SeekFrom::Start(from))?;
        let mut entries = Vec::new();
        // A streamed response (a log, a watch) is logged at ResponseStarted
        // and again at ResponseComplete: count each request once.
        let mut seen = std::collections::HashSet::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if !seen.insert(v["auditID"].as_str().unwrap_or_default().to_owned()) {
                continue;
            }
            let object = &v["objectRef"];
            let mut resource = object["resource"].as_str().unwrap_or_default().to_owned();
            if let Some(sub) = object["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            let at = v["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
                .unwrap_or_default();
            entries.push(AuditEntry {
                at,
                user: v["user"]["username"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                verb: v["verb"].as_str().unwrap_or_default().to_owned(),
                resource,
                namespace: object["namespace"].as_str().unwrap_or_default().to_owned(),
                code: v["responseStatus"]["code"].as_u64().unwrap_or_default() as u16,
            });
        }
        Ok(entries)
    }
}

/// Requests per (verb resource) for one user.
pub fn count_by_request<'a>(
    entries: impl Iterator<Item = &'a AuditEntry>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in entries {
        *counts
            .entry(format!("{} {}", e.verb, e.resource))
            .or_insert(0) += 1;
    }
    counts
}

pub fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_and_buckets() {
        let text = "# HELP x\nx_total 3\nh_seconds_bucket{le=\"0.001\",type=\"started\"} 2\nh_seconds_bucket{le=\"+Inf\",type=\"started\"} 5\nh_seconds_bucket{le=\"0.001\",type=\"failed\"} 9\n";
        assert_eq!(sample(text, "x_total"), Some(3.0));
        assert_eq!(sample(text, "x"), None);
        assert_eq!(
            buckets(text, "h_seconds", "type=\"started\""),
            vec![(0.001, 2.0), (f64::INFINITY, 5.0)]
        );
    }
}
