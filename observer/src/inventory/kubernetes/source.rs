//! `--platform kubernetes`: the kubelet's `/pods` on this node.
//!
//! HTTPS (port 10250) with the service-account token as bearer, re-read from its file on every
//! request because projected tokens rotate (about hourly), and the certificate checked against
//! the cluster CA unless `--kubelet-insecure-tls`. A plain `http://` URL is the read-only port
//! (10255): no TLS, and the token is never sent over it. The token is never logged nor put in
//! an error.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use super::decode::{KubeletError, PodList};
use crate::inventory::{
    http::{base_url, error_chain, read_body, KUBELET},
    sources::{BuildError, SourceConfig},
    Inventory, InventoryFuture, InventorySource, SourceError, WorkloadKind,
};

/// Pod phases whose containers have all ended: such pods stay in `/pods` until deleted. They
/// are no workloads, and a cgroup of theirs that lingers does not keep them
/// ([`Inventory::stopped`]).
const ENDED_PHASES: [&str; 2] = ["Succeeded", "Failed"];

/// The kubelet's `/pods`.
#[derive(Debug)]
pub struct KubeletSource {
    pods_url: String,
    http: reqwest::Client,
    timeout: Duration,
    /// None for plain HTTP: no token over an unencrypted connection.
    token_file: Option<PathBuf>,
    node_name: Option<String>,
    /// Pods skipped as malformed at the last fetch, so the warning comes once per change.
    skipped: usize,
}

impl KubeletSource {
    /// A source for `config.kubelet_url`: reads the CA file now (a missing one is a start-up
    /// error, not a failure every interval); the token file is read at each fetch.
    pub fn new(config: &SourceConfig) -> Result<Self, BuildError> {
        let url = config
            .kubelet_url
            .as_deref()
            .ok_or(BuildError::NoKubeletUrl)?;
        let url = base_url(url);
        let tls = if url.starts_with("https://") {
            true
        } else if url.starts_with("http://") {
            false
        } else {
            return Err(BuildError::KubeletScheme {
                url: url.to_owned(),
            });
        };
        let mut builder = reqwest::Client::builder()
            // Node-local APIs: never through an HTTP(S)_PROXY from the environment.
            .no_proxy()
            .connect_timeout(config.timeout);
        if let Some(warning) = insecure_warning(url, tls, config.kubelet_insecure_tls) {
            // Built once, at start: said once.
            log::warn!("{warning}");
        }
        if tls && config.kubelet_insecure_tls {
            builder = builder.danger_accept_invalid_certs(true);
        } else if tls {
            // Only the cluster CA: the kubelet's certificate is not a public one.
            builder = builder.tls_built_in_root_certs(false);
            for cert in read_ca(&config.kubelet_ca_file)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| BuildError::Http(e.to_string()))?;
        Ok(Self {
            pods_url: format!("{url}/pods"),
            http,
            timeout: config.timeout,
            token_file: tls.then(|| config.kubelet_token_file.clone()),
            node_name: config.env.node_name.clone(),
            skipped: 0,
        })
    }

    pub fn pods_url(&self) -> &str {
        &self.pods_url
    }

    async fn fetch_inner(&mut self) -> Result<Inventory, SourceError> {
        let token = match &self.token_file {
            Some(path) => read_token(path)?,
            None => None,
        };
        let body = self.get(token.as_deref()).await?;
        let list = PodList::decode(&body).map_err(|e| match e {
            KubeletError::Json(source) => SourceError::Decode {
                url: self.pods_url.clone(),
                source,
            },
            e => SourceError::Other(format!("{}: {e}", self.pods_url)),
        })?;
        let skipped_before = std::mem::replace(&mut self.skipped, list.skipped);
        if skipped_before != list.skipped && list.skipped > 0 {
            log::warn!(
                "kubelet {}: {} pods skipped as malformed: {}{}",
                self.pods_url,
                list.skipped,
                list.skip_reasons.join("; "),
                if list.skipped > list.skip_reasons.len() {
                    "; ..."
                } else {
                    ""
                }
            );
        }
        let mut inventory = Inventory::empty("kubernetes");
        inventory.fetched_at = SystemTime::now();
        inventory.node.instance = self.node_name.clone();
        let (ended, live): (Vec<_>, Vec<_>) = list.pods.iter().partition(|p| {
            let phase = p.status.phase.as_deref().unwrap_or_default();
            ENDED_PHASES.contains(&phase)
        });
        inventory.workloads = live.into_iter().filter_map(|p| p.to_workload()).collect();
        inventory.stopped = ended
            .into_iter()
            .filter(|p| !p.metadata.uid.is_empty())
            .map(|p| (WorkloadKind::KubernetesPod, p.metadata.uid.clone()))
            .collect();
        Ok(inventory)
    }

    async fn get(&self, token: Option<&str>) -> Result<hyper::body::Bytes, SourceError> {
        let url = &self.pods_url;
        let mut request = self.http.get(url).timeout(self.timeout);
        if let Some(token) = token {
            // Marked sensitive by reqwest: kept out of its Debug output.
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                return SourceError::Timeout {
                    url: url.clone(),
                    after: self.timeout,
                };
            }
            let mut reason = error_chain(&e);
            if reason.contains("certificate") || reason.contains("UnknownIssuer") {
                reason.push_str(
                    " (the kubelet's serving certificate is not signed by the CA in \
                     --kubelet-ca-file; --kubelet-insecure-tls skips the check)",
                );
            }
            SourceError::Unreachable {
                url: url.clone(),
                reason,
            }
        })?;
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            401 => {
                return Err(SourceError::Other(format!(
                    "{url} answered HTTP 401: the kubelet did not accept the service-account \
                     token (kubelet needs --authentication-token-webhook)"
                )))
            }
            403 => {
                return Err(SourceError::Other(format!(
                    "{url} answered HTTP 403: the service account may not get nodes/proxy \
                     (or nodes/pods)"
                )))
            }
            _ => {
                return Err(SourceError::Status {
                    url: url.clone(),
                    status,
                })
            }
        }
        read_body(KUBELET, response, url, self.timeout).await
    }
}

impl InventorySource for KubeletSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn fetch(&mut self) -> InventoryFuture<'_> {
        Box::pin(self.fetch_inner())
    }
}

/// What `--kubelet-insecure-tls` costs, for the start-up log: the token goes to whoever
/// answers. None when the flag is off or the URL is plain HTTP (no token is sent there).
fn insecure_warning(url: &str, tls: bool, insecure: bool) -> Option<String> {
    (tls && insecure).then(|| {
        format!(
            "--kubelet-insecure-tls: the kubelet's certificate at {url} is not verified, so the \
             service-account bearer token is sent to whatever peer answers there; give the \
             cluster CA with --kubelet-ca-file instead where you can"
        )
    })
}

/// The CA bundle's certificates; at least one.
fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, BuildError> {
    let pem = std::fs::read(path).map_err(|source| BuildError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| BuildError::CaPem {
        path: path.to_owned(),
        reason: error_chain(&e),
    })?;
    if certs.is_empty() {
        return Err(BuildError::CaPem {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The token in `path`, trimmed; None when the file is empty. The error names the file, not
/// its content.
fn read_token(path: &Path) -> Result<Option<String>, SourceError> {
    let token = std::fs::read_to_string(path).map_err(|e| {
        SourceError::Other(format!(
            "cannot read the kubelet token file {}: {e}",
            path.display()
        ))
    })?;
    let token = token.trim();
    Ok((!token.is_empty()).then(|| token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::sources::{Platform, PlatformEnv};

    fn config(url: &str) -> SourceConfig {
        SourceConfig {
            platform: Platform::Kubernetes,
            kubelet_url: Some(url.into()),
            ..SourceConfig::new(PlatformEnv::default())
        }
    }

    #[test]
    fn read_only_port_needs_no_ca_and_sends_no_token() {
        let source = KubeletSource::new(&config("http://node-1:10255/")).unwrap();
        assert_eq!(source.pods_url(), "http://node-1:10255/pods");
        assert_eq!(source.token_file, None);
    }

    #[test]
    fn https_needs_a_readable_ca_unless_insecure() {
        let mut config = config("https://node-1:10250");
        config.kubelet_ca_file = "/nonexistent/ca.crt".into();
        let err = KubeletSource::new(&config).unwrap_err();
        assert!(matches!(err, BuildError::CaFile { .. }));
        assert!(err.to_string().contains("--kubelet-insecure-tls"), "{err}");
        config.kubelet_insecure_tls = true;
        let source = KubeletSource::new(&config).unwrap();
        assert_eq!(
            source.token_file.as_deref(),
            Some(Path::new(crate::defaults::KUBELET_TOKEN_FILE))
        );
    }

    #[test]
    fn insecure_tls_says_where_the_token_goes() {
        let url = "https://10.0.0.7:10250";
        let warning = insecure_warning(url, true, true).unwrap();
        assert!(
            warning.contains(url)
                && warning.contains("bearer token")
                && warning.contains("not verified"),
            "{warning}"
        );
        assert_eq!(insecure_warning(url, true, false), None);
        // The read-only port never gets the token.
        assert_eq!(insecure_warning("http://10.0.0.7:10255", false, true), None);
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("observer-ca-{}.crt", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let mut config = config("https://node-1:10250");
        config.kubelet_ca_file = path.clone();
        let err = KubeletSource::new(&config).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BuildError::CaPem { .. }), "{err}");
    }

    #[test]
    fn other_schemes_are_refused() {
        let err = KubeletSource::new(&config("node-1:10250")).unwrap_err();
        assert!(matches!(err, BuildError::KubeletScheme { .. }));
    }

    /// A kubelet that streams without end costs at most the cap, and the error says so.
    #[tokio::test]
    async fn an_endless_pods_answer_stops_at_the_cap() {
        let (addr, written) = crate::body::tests::flood(usize::MAX).await;
        let mut config = config(&format!("http://{addr}"));
        config.timeout = Duration::from_secs(30);
        let mut source = KubeletSource::new(&config).unwrap();
        let err = source.fetch().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the kubelet at http://{addr}/pods answered more than 16 MiB (observer reads no more)"
            )
        );
        let sent = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            sent < crate::body::KUBELET_PODS_MAX * 2,
            "{sent} bytes sent"
        );
    }

    #[test]
    fn tokens_are_trimmed_and_never_in_errors() {
        let path = std::env::temp_dir().join(format!("observer-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret-token\n").unwrap();
        assert_eq!(read_token(&path).unwrap().as_deref(), Some("s3cret-token"));
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), None);
        std::fs::remove_file(&path).unwrap();
        let err = read_token(&path).unwrap_err().to_string();
        assert!(
            err.contains("kubelet token file") && !err.contains("s3cret"),
            "{err}"
        );
    }
}
