//! The HTTP side: /metrics, /healthz and /readyz on one axum router, served by an accept loop
//! of its own so that no client can hold the endpoint: every connection must send its
//! headers within a timeout, and past a cap of open connections the oldest is let go.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State as Extract,
    http::{
        header::{ACCEPT, CONTENT_TYPE},
        HeaderMap, StatusCode,
    },
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, OwnedSemaphorePermit, Semaphore},
};

use super::{
    exposition::{render, Format},
    health::{liveness, readiness, Verdict},
    state::State,
};

/// What the handlers read.
#[derive(Debug)]
pub struct Shared {
    pub registry: Registry,
    pub state: Arc<Mutex<State>>,
    pub started: Instant,
    pub interval: Duration,
}

/// The routes of the endpoint.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn index() -> &'static str {
    "observer: /metrics (Prometheus, OpenMetrics), /healthz, /readyz\n"
}

async fn metrics(Extract(shared): Extract<Arc<Shared>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(ACCEPT).and_then(|v| v.to_str().ok()));
    match render(&shared.registry, format) {
        Ok(body) => ([(CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "observer could not encode its metrics\n",
        )
            .into_response(),
    }
}

async fn healthz(Extract(shared): Extract<Arc<Shared>>) -> Response {
    let own = shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .own
        .clone();
    answer(liveness(
        &own,
        shared.started,
        shared.interval,
        Instant::now(),
    ))
}

async fn readyz(Extract(shared): Extract<Arc<Shared>>) -> Response {
    let own = shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .own
        .clone();
    answer(readiness(&own))
}

/// 200 or 503, with the verdict's sentence as a plain-text body.
fn answer(v: Verdict) -> Response {
    let status = if v.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{}\n", v.message)).into_response()
}

/// What one client may cost the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest wait for a request's headers, between keep-alive requests too: a connection
    /// that sends nothing is closed after this.
    pub header_read_timeout: Duration,
    /// Connections open at once. One more makes the oldest close: at once if it is idle,
    /// after its answer if not, so idle clients cannot lock out the probes.
    pub max_connections: usize,
    /// Longest an evicted connection may take to finish its answer (a client that does not
    /// read it would hold the slot for ever).
    pub evicted_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            evicted_grace: Duration::from_secs(5),
        }
    }
}

/// Prometheus and the kubelet send their headers at once; 10 s is generous on any network.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A scraper or two and the probes need a handful; 64 bounds memory and file descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// Request headers for these endpoints are small: 64 KiB per connection is plenty.
const MAX_REQUEST_BUFFER: usize = 64 << 10;

/// Open connections by age, each with the sender that asks it to close.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, oneshot::Sender<()>>,
}

fn lock_open(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves `router` on `listener` until `stop` fires (or its sender is dropped); then the
/// listener closes and open connections finish their current request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    log::debug!("Prometheus endpoint: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Let the oldest go, then wait for its slot (or any other that frees).
                let oldest = lock_open(&open).by_age.pop_first();
                drop(oldest);
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = &mut stop => break,
                }
            }
        };
        let (evict, evicted) = oneshot::channel();
        let id = {
            let mut open = lock_open(&open);
            let id = open.next;
            open.next += 1;
            open.by_age.insert(id, evict);
            id
        };
        let open = open.clone();
        let router = router.clone();
        tokio::spawn(async move {
            connection(stream, router, limits, evicted, permit).await;
            lock_open(&open).by_age.remove(&id);
        });
    }
    // Dropping the senders asks every connection to finish.
    lock_open(&open).by_age.clear();
}

/// One connection, until the client closes it, it times out, or it is asked to close.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    evicted: oneshot::Receiver<()>,
    _slot: OwnedSemaphorePermit,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_BUFFER);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // Sent or dropped: either way this connection should end.
        _ = evicted => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.evicted_grace, conn)
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        // Timeouts and resets are the client's business; the endpoint goes on.
        log::debug!("Prometheus endpoint connection: {e}");
    }
}
