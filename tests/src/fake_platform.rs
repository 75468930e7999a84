//! A fake ECS agent introspection API and a fake kubelet, on 127.0.0.1 (random port), serving
//! bodies shaped like the documented ones (the agent's `/v1/metadata` and `/v1/tasks`, a v1
//! `PodList` from the kubelet's `/pods`). Each can be switched at run time to answer slowly,
//! with HTTP 500, with invalid JSON, or not at all (the port is closed), and records every
//! request with its `Authorization` header. The kubelet can serve HTTPS with a certificate
//! from a CA of its own ([`FakeKubelet::start_tls`]).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    extract::{RawQuery, State},
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The documented bodies.
    Ok,
    /// The documented bodies after this delay.
    Slow(Duration),
    /// HTTP 500 with a text body.
    Error500,
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// The port is closed: connections are refused.
    Down,
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Path and query, e.g. `/v1/tasks?dockerid=abc`.
    pub uri: String,
    /// The `Authorization` header as sent (tests compare it to the token they wrote).
    pub authorization: Option<String>,
}

/// State shared with the handlers.
#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Recorded>>,
    /// ECS: `/v1/metadata` body.
    metadata: Mutex<Value>,
    /// ECS: the tasks of `/v1/tasks`; kubelet: the pods of `/pods`.
    items: Mutex<Vec<Value>>,
    /// Kubelet: the only `Authorization` value accepted, if set.
    bearer: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server part both fakes share: listening, switching modes, going down and up again on
/// the same port.
struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Server {
    async fn start(router: Router<Arc<Shared>>, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        Self::start_at(router, tls, "127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1")
    }

    /// Listens on `addr` exactly; fails (with the address) if it is taken.
    async fn start_at(
        router: Router<Arc<Shared>>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        addr: &str,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Ok),
            requests: Mutex::new(Vec::new()),
            metadata: Mutex::new(Value::Null),
            items: Mutex::new(Vec::new()),
            bearer: Mutex::new(None),
        });
        let router = router
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found\n") })
            .with_state(shared.clone());
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr()?;
        let mut server = Self {
            addr,
            shared,
            router,
            tls,
            running: None,
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let router = self.router.clone();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = match self.tls.clone() {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await;
            }),
            Some(acceptor) => tokio::spawn(async move {
                let listener = TlsListener { listener, acceptor };
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await;
            }),
        };
        self.running = Some((stop, task));
    }

    async fn set_mode(&mut self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
        match (mode, self.running.is_some()) {
            (Mode::Down, true) => {
                let (stop, task) = self.running.take().expect("running");
                let _ = stop.send(());
                // Open keep-alive connections are closed too, so clients see the port closed.
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            (Mode::Down, false) | (_, true) => {}
            (_, false) => {
                let listener = TcpListener::bind(self.addr)
                    .await
                    .expect("the same port again");
                self.serve(listener);
            }
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// Records the request, then answers as the mode says; `body` makes the normal answer.
async fn answer(
    shared: &Shared,
    (uri, headers): (Uri, HeaderMap),
    body: impl FnOnce() -> Response,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let uri = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    lock(&shared.requests).push(Recorded {
        uri,
        authorization: authorization.clone(),
    });
    let mode = *lock(&shared.mode);
    match mode {
        Mode::Ok | Mode::Down => {}
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::Error500 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
        Mode::Garbage => {
            return (
                [(header::CONTENT_TYPE, "application/json")],
                "{\"Tasks\": [{\"Arn\"",
            )
                .into_response()
        }
    }
    let wanted = lock(&shared.bearer).clone();
    if let Some(token) = wanted {
        if authorization.as_deref() != Some(format!("Bearer {token}").as_str()) {
            return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
        }
    }
    body()
}

fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// ECS agent

/// A container of a fake ECS task, as `/v1/tasks` lists it.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub docker_id: String,
    /// The name in the task definition.
    pub name: String,
    /// (container port, host port) of TCP mappings, as `Ports` lists them: bridge, the host
    /// port Docker chose; host mode, the task definition's mappings repeated.
    pub ports: Vec<(u16, u16)>,
}

/// A task of the fake ECS agent.
#[derive(Debug, Clone)]
pub struct FakeTask {
    pub arn: String,
    pub family: String,
    pub version: String,
    /// "RUNNING", "STOPPED", ...
    pub known_status: String,
    /// "awsvpc" adds the container `Networks` the agent gives awsvpc tasks.
    pub network_mode: Option<String>,
    pub containers: Vec<FakeContainer>,
}

impl FakeTask {
    /// A RUNNING task with a new-format ARN in `cluster`.
    pub fn running(cluster: &str, task_id: &str, family: &str, version: &str) -> Self {
        Self {
            arn: task_arn(cluster, task_id),
            family: family.into(),
            version: version.into(),
            known_status: "RUNNING".into(),
            network_mode: None,
            containers: Vec::new(),
        }
    }

    pub fn container(mut self, docker_id: &str, name: &str) -> Self {
        self.containers.push(FakeContainer {
            docker_id: docker_id.into(),
            name: name.into(),
            ports: Vec::new(),
        });
        self
    }

    /// A TCP port mapping of the last added container.
    pub fn port(mut self, container_port: u16, host_port: u16) -> Self {
        if let Some(c) = self.containers.last_mut() {
            c.ports.push((container_port, host_port));
        }
        self
    }

    pub fn awsvpc(mut self) -> Self {
        self.network_mode = Some("awsvpc".into());
        self
    }

    pub fn stopped(mut self) -> Self {
        self.known_status = "STOPPED".into();
        self
    }

    /// The `TaskResponse` JSON, as the agent writes it (Go omits what is empty).
    pub fn to_json(&self) -> Value {
        let containers: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let docker_name = format!(
                    "ecs-{}-{}-{}-fcae8ac8f9f1d89d8301",
                    self.family, self.version, c.name
                );
                let mut v = json!({
                    "DockerId": c.docker_id,
                    "DockerName": docker_name,
                    "Name": c.name,
                    "Image": "local/busybox",
                    "ImageID": "sha256:d691691e9652791a60114e67b365688d20d19940dde7c4736ea30e660d8d3553",
                    "CreatedAt": "2026-01-01T00:00:00Z",
                    "StartedAt": "2026-01-01T00:00:01Z",
                });
                // `omitempty`: no mappings, no `Ports`; `HostIp` is left empty by the
                // introspection API (only the task metadata endpoint fills it).
                if !c.ports.is_empty() {
                    v["Ports"] = c
                        .ports
                        .iter()
                        .map(|(container, host)| {
                            json!({"ContainerPort": container, "Protocol": "tcp", "HostPort": host})
                        })
                        .collect();
                }
                if let Some(mode) = &self.network_mode {
                    v["Networks"] = json!([{"NetworkMode": mode, "IPv4Addresses": ["10.0.2.61"]}]);
                }
                v
            })
            .collect();
        json!({
            "Arn": self.arn,
            "DesiredStatus": "RUNNING",
            "KnownStatus": self.known_status,
            "Family": self.family,
            "Version": self.version,
            "Containers": containers,
        })
    }
}

/// A task ARN in the current format: `arn:aws:ecs:us-east-1:111122223333:task/<cluster>/<id>`.
pub fn task_arn(cluster: &str, task_id: &str) -> String {
    format!("arn:aws:ecs:us-east-1:111122223333:task/{cluster}/{task_id}")
}

/// The fake ECS agent: `/v1/metadata`, `/v1/tasks` (with `?dockerid=` and `?taskarn=`), `/`.
pub struct FakeEcsAgent {
    server: Server,
}

impl FakeEcsAgent {
    /// Cluster `test-cluster`, no tasks, on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        Self::start_at("127.0.0.1:0").await.expect("bind 127.0.0.1")
    }

    /// The same on `addr` exactly, e.g. the real agent's `127.0.0.1:51678` for an observer
    /// that uses its default agent URL; an error names the address when it is taken (a real
    /// agent, or another test's fake).
    pub async fn start_at(addr: &str) -> std::io::Result<Self> {
        let router = Router::new()
            .route("/", get(ecs_root))
            .route("/v1/metadata", get(ecs_metadata))
            .route("/v1/tasks", get(ecs_tasks));
        let server = Server::start_at(router, None, addr).await?;
        let agent = Self { server };
        agent.set_cluster("test-cluster");
        Ok(agent)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn set_cluster(&self, cluster: &str) {
        *lock(&self.server.shared.metadata) = json!({
            "Cluster": cluster,
            "ContainerInstanceArn": format!(
                "arn:aws:ecs:us-east-1:111122223333:container-instance/{cluster}/6a2a4b8c1e2d4f5a9b0c1d2e3f4a5b6c"
            ),
            "Version": "Amazon ECS Agent - v1.30.0 (02ff320c)",
        });
    }

    pub fn set_tasks(&self, tasks: &[FakeTask]) {
        *lock(&self.server.shared.items) = tasks.iter().map(FakeTask::to_json).collect();
    }

    pub async fn set_mode(&mut self, mode: Mode) {
        self.server.set_mode(mode).await;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.server.requests()
    }
}

async fn ecs_root(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    answer(&shared, (uri, headers), || {
        json_response(&json!({"AvailableCommands": ["/v1/metadata", "/v1/tasks", "/license"]}))
    })
    .await
}

async fn ecs_metadata(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let body = lock(&shared.metadata).clone();
    answer(&shared, (uri, headers), || json_response(&body)).await
}

async fn ecs_tasks(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let tasks = lock(&shared.items).clone();
    answer(&shared, (uri, headers), move || {
        let query = query.unwrap_or_default();
        let param = |key: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let empty =
            json!({"Arn": "", "KnownStatus": "", "Family": "", "Version": "", "Containers": null});
        let found = |pred: &dyn Fn(&Value) -> bool| match tasks.iter().find(|t| pred(t)) {
            Some(task) => json_response(task),
            None => (StatusCode::NOT_FOUND, json_response(&empty)).into_response(),
        };
        match (param("dockerid"), param("taskarn")) {
            (Some(_), Some(_)) => (StatusCode::BAD_REQUEST, json_response(&empty)).into_response(),
            (Some(id), None) => found(&|t| {
                t["Containers"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["DockerId"].as_str().is_some_and(|d| d.starts_with(&id)))
                })
            }),
            (None, Some(arn)) => found(&|t| t["Arn"] == arn.as_str()),
            // The agent builds the list by appending to a nil slice: none is `null`.
            (None, None) if tasks.is_empty() => json_response(&json!({ "Tasks": null })),
            (None, None) => json_response(&json!({ "Tasks": tasks })),
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// kubelet

/// A container of a fake pod.
#[derive(Debug, Clone)]
pub struct FakePodContainer {
    pub name: String,
    /// `containerd://<id>`, `docker://<id>`, `cri-o://<id>`.
    pub container_id: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// A pod of the fake kubelet.
#[derive(Debug, Clone)]
pub struct FakePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// (kind, name) of the controlling owner.
    pub owner: Option<(String, String)>,
    pub host_network: bool,
    /// "Running", "Succeeded", ...
    pub phase: String,
    pub containers: Vec<FakePodContainer>,
    /// `status.podIP` (for a hostNetwork pod the kubelet gives the node's, as `hostIP`).
    pub pod_ip: String,
    pub host_ip: String,
}

impl FakePod {
    /// A running pod without containers yet.
    pub fn running(uid: &str, namespace: &str, name: &str) -> Self {
        Self {
            uid: uid.into(),
            namespace: namespace.into(),
            name: name.into(),
            labels: Vec::new(),
            annotations: Vec::new(),
            owner: None,
            host_network: false,
            phase: "Running".into(),
            containers: Vec::new(),
            pod_ip: "10.0.1.23".into(),
            host_ip: "10.0.1.5".into(),
        }
    }

    /// `status.podIP`: where the pod's own network namespace is reached.
    pub fn pod_ip(mut self, ip: &str) -> Self {
        self.pod_ip = ip.into();
        self
    }

    pub fn container(mut self, name: &str, container_id: &str) -> Self {
        self.containers.push(FakePodContainer {
            name: name.into(),
            container_id: container_id.into(),
            cpu_limit: None,
            memory_limit: None,
        });
        self
    }

    /// Limits on the last added container ("500m", "128Mi").
    pub fn limits(mut self, cpu: &str, memory: &str) -> Self {
        if let Some(c) = self.containers.last_mut() {
            c.cpu_limit = Some(cpu.into());
            c.memory_limit = Some(memory.into());
        }
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.into(), value.into()));
        self
    }

    pub fn owned_by(mut self, kind: &str, name: &str) -> Self {
        self.owner = Some((kind.into(), name.into()));
        self
    }

    /// hostNetwork: the pod's IP is its node's.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self.pod_ip = self.host_ip.clone();
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }

    /// The v1.Pod JSON, as the kubelet writes it.
    pub fn to_json(&self) -> Value {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let annotations: serde_json::Map<String, Value> = self
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let owners: Vec<Value> = self
            .owner
            .iter()
            .map(|(kind, name)| {
                json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                       "uid": "0b0a7e2e-5f8f-4c59-9d4c-2f0c1e6c3b1a", "controller": true,
                       "blockOwnerDeletion": true})
            })
            .collect();
        let specs: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let mut limits = serde_json::Map::new();
                if let Some(cpu) = &c.cpu_limit {
                    limits.insert("cpu".into(), json!(cpu));
                }
                if let Some(memory) = &c.memory_limit {
                    limits.insert("memory".into(), json!(memory));
                }
                json!({"name": c.name, "image": "local/busybox",
                       "resources": {"limits": limits}})
            })
            .collect();
        // In an ended phase every container has terminated, as the kubelet reports it.
        let ended = match self.phase.as_str() {
            "Succeeded" => Some((0, "Completed")),
            "Failed" => Some((1, "Error")),
            _ => None,
        };
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let state = match ended {
                    Some((code, reason)) => json!({"terminated": {
                        "exitCode": code, "reason": reason, "containerID": c.container_id,
                        "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:05:00Z"}}),
                    None => json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}}),
                };
                json!({"name": c.name, "ready": ended.is_none(), "restartCount": 0,
                       "image": "local/busybox:latest",
                       "imageID": "docker.io/local/busybox@sha256:d691691e9652791a60114e67b365688d20d19940dde7c4736ea30e660d8d3553",
                       "containerID": c.container_id, "started": ended.is_none(),
                       "state": state})
            })
            .collect();
        json!({
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                         "resourceVersion": "4242", "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": labels, "annotations": annotations,
                         "ownerReferences": owners},
            "spec": {"nodeName": "node-1", "hostNetwork": self.host_network,
                     "containers": specs, "restartPolicy": "Always"},
            "status": {"phase": self.phase, "qosClass": "BestEffort", "podIP": self.pod_ip,
                       "hostIP": self.host_ip, "containerStatuses": statuses},
        })
    }
}

/// The CA and key material of a TLS fake.
#[derive(Debug, Clone)]
pub struct FakeCa {
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: String,
}

impl FakeCa {
    /// Writes the CA certificate to `path` (for `--kubelet-ca-file`).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }
}

/// A CA of its own and a server certificate it signed for 127.0.0.1, localhost and
/// `extra_sans` (IP addresses or DNS names).
fn tls_material(extra_sans: &[&str]) -> (FakeCa, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fake cluster CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    let mut sans: Vec<String> = vec!["127.0.0.1".into(), "localhost".into()];
    sans.extend(extra_sans.iter().map(|s| s.to_string()));
    // rcgen makes an IP address SAN of each name that parses as one, a DNS SAN otherwise.
    let mut params = CertificateParams::new(sans).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "node-1");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server TLS config");
    (
        FakeCa { ca_pem: ca.pem() },
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
}

/// TLS over a TCP listener for `axum::serve`; failed handshakes (a client that rejects the
/// certificate) are skipped.
struct TlsListener {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The fake kubelet: `/pods` (a v1 PodList) and `/healthz`.
pub struct FakeKubelet {
    server: Server,
    ca: Option<FakeCa>,
}

impl FakeKubelet {
    /// Plain HTTP, like the read-only port.
    pub async fn start() -> Self {
        Self {
            server: Server::start(kubelet_router(), None).await,
            ca: None,
        }
    }

    /// HTTPS with a certificate for 127.0.0.1 signed by a CA of its own ([`FakeKubelet::ca`]).
    pub async fn start_tls() -> Self {
        let (ca, acceptor) = tls_material(&[]);
        Self {
            server: Server::start(kubelet_router(), Some(acceptor)).await,
            ca: Some(ca),
        }
    }

    /// HTTPS on `addr` exactly (e.g. a node IP and the kubelet's port 10250), with a
    /// certificate for 127.0.0.1, localhost and `sans` (IP addresses or DNS names, e.g. that
    /// node IP) signed by a CA of its own; an error names the address when it is taken.
    pub async fn start_tls_at(addr: &str, sans: &[&str]) -> std::io::Result<Self> {
        let (ca, acceptor) = tls_material(sans);
        Ok(Self {
            server: Server::start_at(kubelet_router(), Some(acceptor), addr).await?,
            ca: Some(ca),
        })
    }

    /// `http://<address>:<port>` or `https://<address>:<port>` (127.0.0.1 unless started at
    /// another address).
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.server.addr)
    }

    /// The CA of a TLS fake.
    pub fn ca(&self) -> Option<&FakeCa> {
        self.ca.as_ref()
    }

    /// Answer 401 unless `Authorization: Bearer <token>` (None: accept anything).
    pub fn require_token(&self, token: Option<&str>) {
        *lock(&self.server.shared.bearer) = token.map(str::to_owned);
    }

    pub fn set_pods(&self, pods: &[FakePod]) {
        *lock(&self.server.shared.items) = pods.iter().map(FakePod::to_json).collect();
    }

    pub async fn set_mode(&mut self, mode: Mode) {
        self.server.set_mode(mode).await;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.server.requests()
    }
}

fn kubelet_router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/pods", get(kubelet_pods))
        .route("/healthz", get(kubelet_healthz))
}

async fn kubelet_pods(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let pods = lock(&shared.items).clone();
    answer(&shared, (uri, headers), move || {
        json_response(
            &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}),
        )
    })
    .await
}

async fn kubelet_healthz(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    answer(&shared, (uri, headers), || "ok".into_response()).await
}
