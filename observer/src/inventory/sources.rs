//! What every platform source is ([`InventorySource`]) and which one runs: `--platform`, or
//! [`detect`] at start ([`select`]), built from a [`SourceConfig`]. The sources themselves are
//! in the platform folders ([`super::ecs`], [`super::kubernetes`], [`super::docker`]);
//! [`super::refresh::Refresher`] adds the timeout, the backoff and the last good inventory on
//! top.

use std::{fmt, future::Future, path::PathBuf, pin::Pin, str::FromStr, time::Duration};

use super::{
    detect::detect, docker::DockerClient, docker::DockerSource, ecs::EcsSource,
    kubernetes::KubeletSource, Inventory,
};
use crate::defaults;

/// Why a source could not produce an inventory. The caller keeps the last good one.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{api} at {url} answered more than {} (observer reads no more)", crate::body::Size(*limit))]
    TooLarge {
        api: &'static str,
        url: String,
        limit: usize,
    },
    #[error(
        "{url} returned a body that does not decode: {}",
        crate::body::clip(source)
    )]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// The future an [`InventorySource`] returns: boxed so the trait stays object-safe and a
/// `Box<dyn InventorySource>` can be chosen at start-up by `--platform`.
pub type InventoryFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Inventory, SourceError>> + Send + 'a>>;

/// One platform's way of listing what runs on this node (ECS agent, kubelet, Docker socket).
///
/// Implementations are `Send + Sync` and fetch on a tokio runtime; the caller applies the
/// timeout and backoff and keeps the last good [`Inventory`] when `fetch` fails, so an
/// implementation just tries once and says why it failed. `fetch` takes `&mut self`: the
/// refresher owns its source alone, so caches and retry state are plain fields.
///
/// ```
/// use observer::inventory::{Inventory, InventoryFuture, InventorySource};
///
/// #[derive(Default)]
/// struct Counting(u32);
/// impl InventorySource for Counting {
///     fn name(&self) -> &'static str { "counting" }
///     fn fetch(&mut self) -> InventoryFuture<'_> {
///         self.0 += 1;
///         Box::pin(async { Ok(Inventory::empty("counting")) })
///     }
/// }
/// let source: Box<dyn InventorySource> = Box::new(Counting::default());
/// assert_eq!(source.name(), "counting");
/// ```
pub trait InventorySource: Send + Sync {
    /// Short name for logs and output: "ecs", "kubernetes", "docker", "none".
    fn name(&self) -> &'static str;

    /// Asks the platform once for the current inventory.
    fn fetch(&mut self) -> InventoryFuture<'_>;
}

/// `--platform none`: cgroups only, no metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSource;

impl InventorySource for NoSource {
    fn name(&self) -> &'static str {
        "none"
    }

    fn fetch(&mut self) -> InventoryFuture<'_> {
        Box::pin(async { Ok(Inventory::empty("none")) })
    }
}

/// Which platform to ask: `--platform` (env `OBSERVER_PLATFORM`) parses straight into it.
///
/// The variant comments are the values' help in `observer --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Platform {
    /// Detect at start: the ECS agent, then the kubelet, then the Docker socket, else none
    #[default]
    Auto,
    /// The ECS agent's introspection API, with Docker labels as the fallback
    Ecs,
    /// The kubelet's /pods (also "k8s")
    #[value(alias = "k8s")]
    Kubernetes,
    /// The Docker socket; Compose projects as the groups
    Docker,
    /// cgroups only
    None,
}

impl Platform {
    /// The name `--platform` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ecs => "ecs",
            Self::Kubernetes => "kubernetes",
            Self::Docker => "docker",
            Self::None => "none",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names and aliases clap accepts, in any case.
impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            format!("unknown platform {s:?} (expected auto, ecs, kubernetes, docker or none)")
        })
    }
}

/// What the process environment says about the platform; read once, passed in so tests can
/// set it without touching the real environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformEnv {
    /// `NODE_NAME`: the Kubernetes node (from the downward API, `spec.nodeName`).
    pub node_name: Option<String>,
    /// `NODE_IP`: the node's address (downward API `status.hostIP`); preferred over the node
    /// name for the kubelet, since node names often do not resolve from pods.
    pub node_ip: Option<String>,
    /// `ECS_CONTAINER_METADATA_URI_V4`, else `ECS_CONTAINER_METADATA_URI`: set by the ECS agent
    /// in every task container.
    pub ecs_metadata_uri: Option<String>,
    /// `KUBERNETES_SERVICE_HOST`: set by the kubelet in every pod.
    pub kubernetes_service_host: Option<String>,
}

impl PlatformEnv {
    /// Reads the variables from this process's environment; empty values count as unset.
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            node_name: var("NODE_NAME"),
            node_ip: var("NODE_IP"),
            ecs_metadata_uri: var("ECS_CONTAINER_METADATA_URI_V4")
                .or_else(|| var("ECS_CONTAINER_METADATA_URI")),
            kubernetes_service_host: var("KUBERNETES_SERVICE_HOST"),
        }
    }
}

/// The default kubelet URL for a node (its address or name): its authenticated HTTPS port.
pub fn default_kubelet_url(node: &str) -> String {
    let port = defaults::KUBELET_PORT;
    if node.contains(':') && !node.starts_with('[') {
        // An IPv6 address.
        format!("https://[{node}]:{port}")
    } else {
        format!("https://{node}:{port}")
    }
}

/// How to reach the platform. Plain data; the CLI fills it from flags and environment, the
/// defaults are [`crate::defaults`]':
///
/// | field | flag | env | default |
/// |---|---|---|---|
/// | `platform` | `--platform` | `OBSERVER_PLATFORM` | `auto` |
/// | `ecs_agent_url` | `--ecs-agent-url` | `OBSERVER_ECS_AGENT_URL` | [`defaults::ECS_AGENT_URL`] |
/// | `kubelet_url` | `--kubelet-url` | `OBSERVER_KUBELET_URL` | `https://$NODE_IP:10250`, else `https://$NODE_NAME:10250` |
/// | `kubelet_token_file` | `--kubelet-token-file` | `OBSERVER_KUBELET_TOKEN_FILE` | the service-account token |
/// | `kubelet_ca_file` | `--kubelet-ca-file` | `OBSERVER_KUBELET_CA_FILE` | the service-account `ca.crt` |
/// | `kubelet_insecure_tls` | `--kubelet-insecure-tls` | `OBSERVER_KUBELET_INSECURE_TLS` | false |
/// | `docker_socket` | `--docker-socket` | `OBSERVER_DOCKER_SOCKET` | [`defaults::DOCKER_SOCKET`] |
/// | `timeout` | | | [`defaults::PLATFORM_TIMEOUT`] |
///
/// The kubelet's read-only port is used by giving a plain HTTP URL
/// (`--kubelet-url http://$NODE_NAME:10255`): no TLS, and no token is sent over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub platform: Platform,
    /// Base URL of the ECS agent's introspection API.
    pub ecs_agent_url: String,
    /// Base URL of the kubelet (`/pods` is appended). None when neither given nor derivable
    /// (`NODE_NAME` unset): choosing kubernetes then fails with a message that says so.
    pub kubelet_url: Option<String>,
    /// Bearer token for the kubelet, re-read on every request because projected tokens rotate.
    /// An empty file means no token.
    pub kubelet_token_file: PathBuf,
    /// PEM CA bundle that signed the kubelet's serving certificate.
    pub kubelet_ca_file: PathBuf,
    /// Do not verify the kubelet's certificate (self-signed serving certificates).
    pub kubelet_insecure_tls: bool,
    pub docker_socket: PathBuf,
    /// Per HTTP request.
    pub timeout: Duration,
    /// The environment facts detection and the kubelet default use.
    pub env: PlatformEnv,
}

impl SourceConfig {
    /// Defaults, with the kubelet URL derived from `env.node_ip`, else `env.node_name`.
    pub fn new(env: PlatformEnv) -> Self {
        Self {
            platform: Platform::Auto,
            ecs_agent_url: defaults::ECS_AGENT_URL.to_owned(),
            kubelet_url: env
                .node_ip
                .as_deref()
                .or(env.node_name.as_deref())
                .map(default_kubelet_url),
            kubelet_token_file: defaults::KUBELET_TOKEN_FILE.into(),
            kubelet_ca_file: defaults::KUBELET_CA_FILE.into(),
            kubelet_insecure_tls: false,
            docker_socket: defaults::DOCKER_SOCKET.into(),
            timeout: defaults::PLATFORM_TIMEOUT,
            env,
        }
    }

    /// The Docker client for this configuration.
    pub fn docker_client(&self) -> DockerClient {
        DockerClient::new(&self.docker_socket, self.timeout)
    }
}

impl Default for SourceConfig {
    /// Defaults from this process's environment.
    fn default() -> Self {
        Self::new(PlatformEnv::from_process())
    }
}

/// Why a source could not be set up. These end the program at start-up, so each says what to
/// change.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "--platform kubernetes needs the kubelet URL: set NODE_IP (downward API status.hostIP), \
         NODE_NAME (spec.nodeName) or --kubelet-url / OBSERVER_KUBELET_URL"
    )]
    NoKubeletUrl,
    #[error("kubelet URL {url:?} must start with https:// or http:// (read-only port)")]
    KubeletScheme { url: String },
    #[error(
        "cannot read the kubelet CA file {path}: {source} (set --kubelet-ca-file, or \
         --kubelet-insecure-tls to skip verification)"
    )]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the kubelet CA file {path} holds no usable PEM certificate: {reason}")]
    CaPem { path: PathBuf, reason: String },
    #[error("ECS agent URL {url:?} must start with http:// or https://")]
    EcsScheme { url: String },
    #[error("cannot set up the HTTP client: {0}")]
    Http(String),
    #[error("platform auto must be detected first (sources::select does)")]
    Undetected,
}

/// Builds the source for `config.platform`, which must not be `Auto` (see [`select`]).
///
/// ECS gets the Docker socket for its label fallback when the socket exists.
pub fn build(config: &SourceConfig) -> Result<Box<dyn InventorySource>, BuildError> {
    Ok(match config.platform {
        Platform::Auto => return Err(BuildError::Undetected),
        Platform::Ecs => Box::new(EcsSource::new(config)?),
        Platform::Kubernetes => Box::new(KubeletSource::new(config)?),
        Platform::Docker => Box::new(DockerSource::new(config.docker_client())),
        Platform::None => Box::new(NoSource),
    })
}

/// The chosen source and why, for the start-up log line.
pub struct Selected {
    pub source: Box<dyn InventorySource>,
    /// Never `Auto`.
    pub platform: Platform,
    /// "ECS agent answered at http://127.0.0.1:51678", "--platform docker", ...
    pub reason: String,
}

impl fmt::Debug for Selected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selected")
            .field("platform", &self.platform)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// Detects the platform when `config.platform` is `Auto`, then builds its source.
pub async fn select(config: &SourceConfig) -> Result<Selected, BuildError> {
    let (platform, reason) = match config.platform {
        Platform::Auto => {
            let found = detect(config).await;
            (found.platform, found.reason)
        }
        chosen => (chosen, format!("--platform {chosen}")),
    };
    let config = SourceConfig {
        platform,
        ..config.clone()
    };
    Ok(Selected {
        source: build(&config)?,
        platform,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_print() {
        for p in [
            Platform::Auto,
            Platform::Ecs,
            Platform::Kubernetes,
            Platform::Docker,
            Platform::None,
        ] {
            assert_eq!(p.as_str().parse::<Platform>(), Ok(p));
        }
        assert_eq!("K8S".parse::<Platform>(), Ok(Platform::Kubernetes));
        assert!("swarm".parse::<Platform>().unwrap_err().contains("swarm"));
    }

    #[test]
    fn defaults_follow_the_environment() {
        let config = SourceConfig::new(PlatformEnv {
            node_name: Some("ip-10-0-1-5.ec2.internal".into()),
            ..PlatformEnv::default()
        });
        assert_eq!(config.platform, Platform::Auto);
        assert_eq!(config.ecs_agent_url, "http://127.0.0.1:51678");
        assert_eq!(
            config.kubelet_url.as_deref(),
            Some("https://ip-10-0-1-5.ec2.internal:10250")
        );
        assert_eq!(config.timeout, Duration::from_secs(3));
        assert_eq!(config.docker_socket, PathBuf::from("/var/run/docker.sock"));
        assert!(!config.kubelet_insecure_tls);
        assert_eq!(SourceConfig::new(PlatformEnv::default()).kubelet_url, None);
    }

    #[test]
    fn the_node_ip_is_preferred_for_the_kubelet() {
        let env = |ip: &str| PlatformEnv {
            node_name: Some("node-1".into()),
            node_ip: Some(ip.into()),
            ..PlatformEnv::default()
        };
        assert_eq!(
            SourceConfig::new(env("10.0.1.5")).kubelet_url.as_deref(),
            Some("https://10.0.1.5:10250")
        );
        assert_eq!(
            SourceConfig::new(env("fd00::5")).kubelet_url.as_deref(),
            Some("https://[fd00::5]:10250")
        );
    }

    #[test]
    fn kubernetes_without_a_node_name_says_what_to_set() {
        let config = SourceConfig {
            platform: Platform::Kubernetes,
            ..SourceConfig::new(PlatformEnv::default())
        };
        let Err(err) = build(&config) else {
            panic!("built without a kubelet URL")
        };
        assert!(matches!(err, BuildError::NoKubeletUrl));
        assert!(err.to_string().contains("NODE_NAME"), "{err}");
    }

    #[tokio::test]
    async fn explicit_platforms_build_without_probing() {
        let mut config = SourceConfig::new(PlatformEnv::default());
        for (platform, name) in [
            (Platform::Ecs, "ecs"),
            (Platform::Docker, "docker"),
            (Platform::None, "none"),
        ] {
            config.platform = platform;
            let selected = select(&config).await.unwrap();
            assert_eq!(selected.source.name(), name);
            assert_eq!(selected.platform, platform);
            assert_eq!(selected.reason, format!("--platform {name}"));
        }
        config.platform = Platform::Auto;
        assert!(matches!(build(&config), Err(BuildError::Undetected)));
    }

    #[tokio::test]
    async fn sources_are_object_safe_and_run_on_tokio() {
        let mut sources: Vec<Box<dyn InventorySource>> = vec![Box::new(NoSource)];
        for source in &mut sources {
            let inv = source.fetch().await.unwrap();
            assert_eq!(inv.source, source.name());
            assert!(inv.workloads.is_empty() && inv.standalone.is_empty());
        }
        // The future is Send, so it can be spawned.
        let handle = tokio::spawn(async { NoSource.fetch().await.map(|i| i.source) });
        assert_eq!(handle.await.unwrap().unwrap(), "none");
    }
}
