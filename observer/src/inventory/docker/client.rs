//! A small client of the Docker Engine API on its unix socket ([`DockerClient`]), for the
//! Docker source and the ECS source alike.
//!
//! HTTP/1.1 through hyper's client connection over a `UnixStream`: one connection per request,
//! which the daemon handles cheaply and which leaves no pool to go stale across restarts.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{body::Bytes, header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::decode::{ContainerInspect, ContainerList, ContainerSummary};
use crate::{
    body::{self, Size},
    inventory::{cgroup_path::is_container_id, Container, SourceError},
};

/// Why a Docker API call failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot connect to the Docker socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Docker API {path}: {source}")]
    Http {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Docker API {path} did not answer within {after:?}")]
    Timeout { path: String, after: Duration },
    #[error("Docker API {path} answered HTTP {status}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
    },
    #[error("Docker API {path} answered more than {} (observer reads no more)", Size(*limit))]
    TooLarge { path: String, limit: usize },
    #[error("Docker API path {path:?} is not a valid request target")]
    BadPath { path: String },
    #[error(
        "Docker API {path} returned a body that does not decode: {}",
        body::clip(source)
    )]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl DockerError {
    /// True for HTTP 404: the container went away between listing and inspecting it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }

    /// The error in the inventory's terms, the socket as the URL.
    pub fn into_source_error(self, socket: &Path) -> SourceError {
        let url = format!("unix://{}", socket.display());
        match self {
            Self::Connect { source, .. } => SourceError::Unreachable {
                url,
                reason: source.to_string(),
            },
            Self::Timeout { path, after } => SourceError::Timeout {
                url: format!("{url}{path}"),
                after,
            },
            Self::Status { path, status, .. } => SourceError::Status {
                url: format!("{url}{path}"),
                status,
            },
            Self::Decode { path, source } => SourceError::Decode {
                url: format!("{url}{path}"),
                source,
            },
            Self::TooLarge { path, limit } => SourceError::TooLarge {
                api: "the Docker daemon",
                url: format!("{url}{path}"),
                limit,
            },
            e @ (Self::Http { .. } | Self::BadPath { .. }) => SourceError::Unreachable {
                url,
                reason: e.to_string(),
            },
        }
    }
}

/// A client of the Docker Engine API on a unix socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DockerClient {
    socket: PathBuf,
    timeout: Duration,
    max_body: usize,
}

impl DockerClient {
    /// A client of the daemon at `socket`; each call gives up after `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
            max_body: body::DOCKER_MAX,
        }
    }

    /// The most read of one answer (default [`body::DOCKER_MAX`]).
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /_ping`: Ok when the daemon answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.get("/_ping").await.map(drop)
    }

    /// `GET /containers/json`: the running containers, at most
    /// [`crate::inventory::MAX_ITEMS`].
    pub async fn list(&self) -> Result<Vec<ContainerSummary>, DockerError> {
        self.get_json::<ContainerList>("/containers/json")
            .await
            .map(|l| l.0)
    }

    /// `GET /containers/<id>/json`.
    pub async fn inspect(&self, id: &str) -> Result<ContainerInspect, DockerError> {
        self.get_json(&format!("/containers/{id}/json")).await
    }

    /// `GET /containers/<id>/stats?stream=false`: one stats sample as Docker sends it.
    ///
    /// Docker waits for a second sample to fill `precpu_stats`, so this takes about a second.
    pub async fn stats(&self, id: &str) -> Result<serde_json::Value, DockerError> {
        self.get_json(&format!("/containers/{id}/stats?stream=false"))
            .await
    }

    /// `GET path` decoded as JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, DockerError> {
        let body = self.get(path).await?;
        serde_json::from_slice(&body).map_err(|source| DockerError::Decode {
            path: path.to_owned(),
            source,
        })
    }

    /// `GET path`: the body of a 2xx answer.
    pub async fn get(&self, path: &str) -> Result<Bytes, DockerError> {
        match tokio::time::timeout(self.timeout, self.get_once(path)).await {
            Ok(result) => result,
            Err(_) => Err(DockerError::Timeout {
                path: path.to_owned(),
                after: self.timeout,
            }),
        }
    }

    async fn get_once(&self, path: &str) -> Result<Bytes, DockerError> {
        let http = |source| DockerError::Http {
            path: path.to_owned(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| DockerError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection task ends when the response is read and the sender dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("Docker socket connection: {e}");
            }
        });
        // Paths carry ids from the daemon's own answers: a bad one is an error, not a panic.
        let request = Request::get(path)
            // HTTP/1.1 wants a Host; the daemon ignores it.
            .header(header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|_| DockerError::BadPath {
                path: path.to_owned(),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                // The only other error Limited gives.
                Err(_) => DockerError::TooLarge {
                    path: path.to_owned(),
                    limit: self.max_body,
                },
            })?;
        let body = body.to_bytes();
        if !status.is_success() {
            return Err(DockerError::Status {
                path: path.to_owned(),
                status: status.as_u16(),
                message: error_message(status, &body),
            });
        }
        Ok(body)
    }

    /// The running containers as [`Container`]s with what inspect adds (limits, full labels,
    /// network mode), inspecting each container once: `cache` keeps the answers by id.
    pub(crate) async fn containers(
        &self,
        cache: &mut InspectCache,
    ) -> Result<Vec<Container>, DockerError> {
        let list = self.list().await?;
        let mut containers = Vec::with_capacity(list.len());
        // The list holds running (and paused) containers: all have cgroups.
        for summary in &list {
            if let Some(known) = cache.get(&summary.id) {
                containers.push(known);
                continue;
            }
            // The id goes into a request path: only a real container id is asked about.
            if !is_container_id(&summary.id) {
                containers.push(summary.to_container());
                continue;
            }
            match self.inspect(&summary.id).await {
                Ok(inspect) => {
                    let container = inspect.to_container();
                    cache.put(container.clone());
                    containers.push(container);
                }
                // Gone since the list: it has no cgroup any more either.
                Err(e) if e.is_not_found() => {}
                // Keep what the list says rather than lose the container.
                Err(e) => {
                    log::debug!("{e}; using the container list entry");
                    containers.push(summary.to_container());
                }
            }
        }
        cache.retain(list.iter().map(|s| s.id.as_str()));
        Ok(containers)
    }
}

/// The daemon's `{"message": "..."}` error body, else the status text.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    serde_json::from_slice::<Message>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| status.canonical_reason().unwrap_or("").to_owned())
}

/// Inspect answers by container id. A container's network mode, labels and cgroup parent never
/// change, so one inspect per container is enough; limits may change through `docker update`,
/// which observer then sees once the container restarts.
#[derive(Debug, Default)]
pub(crate) struct InspectCache {
    by_id: HashMap<String, Container>,
}

impl InspectCache {
    fn get(&self, id: &str) -> Option<Container> {
        self.by_id.get(id).cloned()
    }

    fn put(&mut self, container: Container) {
        self.by_id.insert(container.id.clone(), container);
    }

    /// Forgets containers that are no longer listed.
    fn retain<'a>(&mut self, ids: impl Iterator<Item = &'a str>) {
        let keep: HashSet<&str> = ids.collect();
        self.by_id.retain(|id, _| keep.contains(id.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_message(
                StatusCode::NOT_FOUND,
                br#"{"message":"No such container: x"}"#
            ),
            "No such container: x"
        );
        assert_eq!(
            error_message(StatusCode::INTERNAL_SERVER_ERROR, b"<html>"),
            "Internal Server Error"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_with_its_path() {
        let client = DockerClient::new("/nonexistent/docker.sock", Duration::from_secs(1));
        let err = client.ping().await.unwrap_err();
        assert!(matches!(err, DockerError::Connect { .. }), "{err}");
        let err = err.into_source_error(client.socket());
        assert!(
            err.to_string()
                .starts_with("cannot reach unix:///nonexistent/docker.sock:"),
            "{err}"
        );
    }

    /// A daemon stand-in on a fresh socket: `serve` gets each accepted connection.
    fn fake_daemon<F, Fut>(name: &str, serve: F) -> (PathBuf, tokio::task::JoinHandle<()>)
    where
        F: Fn(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let dir = std::env::temp_dir().join(format!("observer-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
        (socket, server)
    }

    /// A daemon that streams without end costs at most the cap, and the error says so.
    #[tokio::test]
    async fn an_endless_answer_stops_at_the_cap() {
        use std::sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let written = Arc::new(AtomicUsize::new(0));
        let most = written.clone();
        let (socket, server) = fake_daemon("docker-flood", move |mut stream| {
            let most = most.clone();
            async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                let chunk = [b"10000\r\n".as_slice(), &[b'x'; 1 << 16], b"\r\n"].concat();
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut sent = 0;
                while stream.write_all(&chunk).await.is_ok() {
                    sent += 1 << 16;
                    most.fetch_max(sent, Ordering::Relaxed);
                }
            }
        });
        let client = DockerClient::new(&socket, Duration::from_secs(30));
        let err = client.list().await.unwrap_err();
        assert!(matches!(err, DockerError::TooLarge { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "Docker API /containers/json answered more than 4 MiB (observer reads no more)"
        );
        let sent = written.load(Ordering::Relaxed);
        assert!(sent < body::DOCKER_MAX * 2, "{sent} bytes sent");
        let err = err.into_source_error(&socket).to_string();
        assert!(err.starts_with("the Docker daemon at unix://"), "{err}");
        server.abort();
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }

    /// Ids from the list go into request paths: one that is not a container id is never
    /// asked about (the list entry stands), and a path that is no URI is an error.
    #[tokio::test]
    async fn hostile_ids_never_reach_a_request() {
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let paths = Arc::new(Mutex::new(Vec::new()));
        let seen = paths.clone();
        let (socket, server) = fake_daemon("docker-ids", move |mut stream| {
            let seen = seen.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.lock()
                    .unwrap()
                    .push(request.lines().next().unwrap_or("").to_owned());
                let body =
                    r#"[{"Id":"../../images/json?x= y","Names":["/evil"]},{"Id":"a b\r\nc"}]"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        let client = DockerClient::new(&socket, Duration::from_secs(5));
        let containers = client
            .containers(&mut InspectCache::default())
            .await
            .unwrap();
        let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["evil", ""]);
        assert_eq!(
            *paths.lock().unwrap(),
            ["GET /containers/json HTTP/1.1"],
            "no inspect of a non-id"
        );
        let err = client.inspect("a b\r\nc").await.unwrap_err();
        assert!(matches!(err, DockerError::BadPath { .. }), "{err}");
        server.abort();
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn http_over_a_unix_socket() {
        // A one-shot daemon stand-in: answers the first request with a fixed response.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("observer-docker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let mut requests = Vec::new();
            for body in [
                r#"[{"Id":"abc","State":"running"}]"#,
                r#"{"message":"boom"}"#,
            ] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                requests.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let status = if body.contains("boom") {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            }
            requests
        });
        let client = DockerClient::new(&socket, Duration::from_secs(5));
        let list = client.list().await.unwrap();
        assert_eq!(list[0].id, "abc");
        let err = client.inspect("abc").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "Docker API /containers/abc/json answered HTTP 500: boom"
        );
        let requests = server.await.unwrap();
        assert!(requests[0].starts_with("GET /containers/json HTTP/1.1\r\n"));
        assert!(requests[1].starts_with("GET /containers/abc/json HTTP/1.1\r\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
