//! `--platform auto`: which platform this node is, and why, for the start-up log line.
//!
//! Order matters: an ECS container instance and a Kubernetes node both run Docker or
//! containerd, so the orchestrators are asked first and Docker is the plain-host answer.
//! 1. ECS: the agent answers `/v1/metadata`, or `ECS_CONTAINER_METADATA_URI(_V4)` is set
//!    (observer runs as an ECS task).
//! 2. Kubernetes: `KUBERNETES_SERVICE_HOST` is set (observer runs in a pod), or `NODE_NAME` is
//!    set and the kubelet answers.
//! 3. Docker: the socket exists and answers `/_ping`.
//! 4. None: cgroups only.

use std::time::Duration;

use super::{
    docker::DockerClient,
    ecs::AgentMetadata,
    http::base_url,
    sources::{Platform, SourceConfig},
};

/// Probes give up after this (or the configured timeout, if shorter): a node without the
/// service should not wait long at start-up.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The detected platform and the reason, e.g. "ECS agent answered at http://127.0.0.1:51678".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// Never `Auto`.
    pub platform: Platform,
    pub reason: String,
}

/// Detects the platform of this node (see the module documentation for the order).
pub async fn detect(config: &SourceConfig) -> Detection {
    let timeout = config.timeout.min(PROBE_TIMEOUT);
    let found = |platform, reason: String| Detection { platform, reason };
    let env = &config.env;

    let agent = base_url(&config.ecs_agent_url);
    if let Some(cluster) = ecs_agent_answers(agent, timeout).await {
        return found(
            Platform::Ecs,
            format!("ECS agent answered at {agent} (cluster {cluster:?})"),
        );
    }
    if env.ecs_metadata_uri.is_some() {
        return found(
            Platform::Ecs,
            "ECS_CONTAINER_METADATA_URI is set (running as an ECS task)".into(),
        );
    }

    if env.kubernetes_service_host.is_some() {
        return found(
            Platform::Kubernetes,
            "KUBERNETES_SERVICE_HOST is set (running in a Kubernetes pod)".into(),
        );
    }
    if let (Some(node), Some(url)) = (&env.node_name, &config.kubelet_url) {
        if kubelet_answers(base_url(url), timeout).await {
            return found(
                Platform::Kubernetes,
                format!("NODE_NAME is {node:?} and the kubelet answered at {url}"),
            );
        }
    }

    let socket = config.docker_socket.display();
    if config.docker_socket.exists() {
        let client = DockerClient::new(&config.docker_socket, timeout);
        match client.ping().await {
            Ok(()) => {
                return found(Platform::Docker, format!("Docker answered on {socket}"));
            }
            Err(e) => log::debug!("platform detection: {e}"),
        }
    }

    found(
        Platform::None,
        format!(
            "no ECS agent at {agent}, no Kubernetes environment (KUBERNETES_SERVICE_HOST, \
             NODE_NAME), no Docker answering on {socket}: cgroups only"
        ),
    )
}

/// The cluster name when the ECS agent answers `/v1/metadata` with its metadata.
async fn ecs_agent_answers(agent: &str, timeout: Duration) -> Option<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .ok()?;
    let response = client
        .get(format!("{agent}/v1/metadata"))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = crate::body::read_capped(response, crate::body::ECS_AGENT_MAX)
        .await
        .ok()?;
    let metadata: AgentMetadata = serde_json::from_slice(&body).ok()?;
    Some(metadata.cluster)
}

/// True when something answers HTTP at the kubelet URL, whatever the status (401 without a
/// token is a kubelet too). The probe sends no token and does not check the certificate: it
/// only asks whether a kubelet is there; the source then verifies properly.
async fn kubelet_answers(url: &str, timeout: Duration) -> bool {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .danger_accept_invalid_certs(true)
        .build()
    else {
        return false;
    };
    client.get(format!("{url}/healthz")).send().await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::sources::PlatformEnv;

    /// A configuration where nothing answers: a closed port, no socket.
    fn nothing_here(env: PlatformEnv) -> SourceConfig {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut config = SourceConfig::new(env);
        config.ecs_agent_url = format!("http://127.0.0.1:{port}");
        config.kubelet_url = config
            .kubelet_url
            .map(|_| format!("https://127.0.0.1:{port}"));
        config.docker_socket = "/nonexistent/docker.sock".into();
        config
    }

    #[tokio::test]
    async fn environment_alone_decides_when_nothing_answers() {
        let rows = [
            (PlatformEnv::default(), Platform::None, "cgroups only"),
            (
                PlatformEnv {
                    ecs_metadata_uri: Some("http://169.254.170.2/v4/x".into()),
                    kubernetes_service_host: Some("10.0.0.1".into()),
                    ..PlatformEnv::default()
                },
                Platform::Ecs,
                "ECS_CONTAINER_METADATA_URI",
            ),
            (
                PlatformEnv {
                    kubernetes_service_host: Some("10.0.0.1".into()),
                    node_name: Some("node-1".into()),
                    ..PlatformEnv::default()
                },
                Platform::Kubernetes,
                "KUBERNETES_SERVICE_HOST",
            ),
            // NODE_NAME alone is not enough: its kubelet must answer.
            (
                PlatformEnv {
                    node_name: Some("node-1".into()),
                    ..PlatformEnv::default()
                },
                Platform::None,
                "no ECS agent",
            ),
        ];
        for (env, platform, reason) in rows {
            let found = detect(&nothing_here(env.clone())).await;
            assert_eq!(found.platform, platform, "{env:?}: {}", found.reason);
            assert!(found.reason.contains(reason), "{}", found.reason);
        }
    }
}
