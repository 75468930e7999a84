//! A fake Mackerel API on 127.0.0.1 (random port), strict like the real one: 403 without the
//! right `X-Api-Key`, JSON bodies checked field by field, ids returned on create, hosts found by
//! customIdentifier. It records everything it accepted (hosts with their display name and
//! memo, status changes, retirements, metric points, graph definitions) and every request,
//! and can be told to fail: unreachable, 503, 429 with Retry-After, 400 with a body, or slow.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path, RawQuery, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};

/// How the fake fails a matching request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// New connections are closed at once; requests on open ones get no answer for a minute.
    Unreachable,
    /// 503 Service Unavailable.
    Unavailable,
    /// 429 Too Many Requests with `Retry-After: <value>`.
    TooManyRequests { retry_after: String },
    /// 400 Bad Request with this body.
    BadRequest { body: String },
    /// Answers normally after this delay.
    Slow(Duration),
}

/// Which requests a fault applies to, and how many times.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// e.g. "POST"; None = any.
    pub method: Option<&'static str>,
    /// Path prefix, e.g. "/api/v0/tsdb"; None = any.
    pub path: Option<String>,
    /// Only requests whose body contains this.
    pub body_contains: Option<String>,
    /// Fails this many requests, then the fault is gone; None = until cleared.
    pub times: Option<u32>,
}

impl Scope {
    pub fn all() -> Self {
        Self::default()
    }

    pub fn path(method: &'static str, path: &str) -> Self {
        Self {
            method: Some(method),
            path: Some(path.to_string()),
            ..Self::default()
        }
    }

    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    pub fn body_contains(mut self, s: &str) -> Self {
        self.body_contains = Some(s.to_string());
        self
    }
}

/// A host as the fake holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeHost {
    pub id: String,
    pub name: String,
    pub custom_identifier: Option<String>,
    pub status: String,
    pub meta: Value,
    pub role_fullnames: Vec<String>,
    /// `displayName` and `memo` as last sent (create or update); None when omitted.
    pub display_name: Option<String>,
    pub memo: Option<String>,
    pub retired: bool,
    /// Successful PUTs.
    pub updates: u32,
}

/// One metric value the fake accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub host_id: String,
    pub name: String,
    pub time: i64,
    pub value: f64,
    /// When it arrived.
    pub at: Instant,
}

/// One retirement the fake accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Retirement {
    pub host_id: String,
    pub at: Instant,
}

/// One request, whatever came of it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    pub user_agent: String,
}

#[derive(Debug, Default)]
struct Records {
    hosts: Vec<FakeHost>,
    points: Vec<Point>,
    retirements: Vec<Retirement>,
    /// (host id, status) of every status change accepted, in order.
    statuses: Vec<(String, String)>,
    graph_defs: Vec<Value>,
    requests: Vec<RequestRecord>,
    /// GET /api/v0/hosts with a service filter, and GET /api/v0/tsdb/latest, answered.
    role_listings: u64,
    latest_queries: u64,
    faults: Vec<(Fault, Scope)>,
    next_id: u64,
}

struct Inner {
    api_key: String,
    records: Mutex<Records>,
}

type Shared = Arc<Inner>;

/// The running fake. Dropping it stops the server.
pub struct FakeMackerel {
    addr: SocketAddr,
    inner: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeMackerel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeMackerel {
    /// Starts a fake that accepts `api_key` only, on 127.0.0.1.
    pub async fn start(api_key: &str) -> Self {
        Self::start_at(api_key, "127.0.0.1:0").await
    }

    /// The same on `addr` (e.g. a veth's host side, for an observer in a namespace).
    pub async fn start_at(api_key: &str, addr: &str) -> Self {
        let inner = Arc::new(Inner {
            api_key: api_key.to_string(),
            records: Mutex::new(Records::default()),
        });
        let router = Router::new()
            .route("/api/v0/hosts", get(list_hosts).post(create_host))
            .route("/api/v0/hosts/{id}", put(update_host).get(get_host))
            .route("/api/v0/hosts/{id}/retire", post(retire_host))
            .route("/api/v0/hosts/{id}/status", post(set_status))
            .route("/api/v0/tsdb", post(post_metrics))
            .route("/api/v0/tsdb/latest", get(latest_values))
            .route("/api/v0/graph-defs/create", post(create_graph_defs))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
            .layer(middleware::from_fn_with_state(inner.clone(), front_door))
            .with_state(inner.clone());
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let addr = listener.local_addr().expect("local address");
        let listener = Gate {
            listener,
            inner: inner.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, inner, task }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails the requests in `scope` with `fault` (added to the faults already set).
    pub fn fail(&self, fault: Fault, scope: Scope) {
        self.records().faults.push((fault, scope));
    }

    /// Back to normal.
    pub fn heal(&self) {
        self.records().faults.clear();
    }

    pub fn hosts(&self) -> Vec<FakeHost> {
        self.records().hosts.clone()
    }

    pub fn points(&self) -> Vec<Point> {
        self.records().points.clone()
    }

    /// The points as Mackerel keeps them: one per host, metric and time, the last to arrive
    /// (a value posted again under the same time replaces the earlier one).
    pub fn stored(&self) -> Vec<Point> {
        let mut latest: std::collections::BTreeMap<(String, String, i64), Point> =
            std::collections::BTreeMap::new();
        for p in self.records().points.iter() {
            latest.insert((p.host_id.clone(), p.name.clone(), p.time), p.clone());
        }
        latest.into_values().collect()
    }

    /// What the stored points of one host's `interface.*.<suffix>` series say was moved: each
    /// value is a rate over a whole `period`, so value x period, summed.
    pub fn bytes_told(&self, host_id: &str, suffix: &str, period: Duration) -> f64 {
        self.stored()
            .iter()
            .filter(|p| p.host_id == host_id && p.name.starts_with("interface."))
            .filter(|p| p.name.ends_with(suffix))
            .map(|p| p.value * period.as_secs_f64())
            .sum()
    }

    /// Listings by role and latest-value queries answered: how often observers looked.
    pub fn lookups(&self) -> (u64, u64) {
        let r = self.records();
        (r.role_listings, r.latest_queries)
    }

    pub fn retirements(&self) -> Vec<Retirement> {
        self.records().retirements.clone()
    }

    /// (host id, status) of every POST /api/v0/hosts/<id>/status accepted, in order.
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.records().statuses.clone()
    }

    pub fn graph_defs(&self) -> Vec<Value> {
        self.records().graph_defs.clone()
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.records().requests.clone()
    }

    /// Requests whose method and path are these.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.records()
            .requests
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Sends one raw HTTP/1.1 request (for checking the fake itself); returns status and body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        api_key: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).await.expect("connecting");
        let body = body.unwrap_or("");
        let key = api_key
            .map(|k| format!("X-Api-Key: {k}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{key}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("writing");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("reading");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        self.inner.records.lock().unwrap()
    }
}

/// The listener: while an unscoped [`Fault::Unreachable`] is set, closes new connections at
/// once and fails reads on open ones, so the client sees a dead peer rather than a slow one.
struct Gate {
    listener: TcpListener,
    inner: Shared,
}

impl Inner {
    fn unreachable(&self) -> bool {
        self.records
            .lock()
            .unwrap()
            .faults
            .iter()
            .any(|(f, s)| *f == Fault::Unreachable && s.method.is_none() && s.path.is_none())
    }
}

impl axum::serve::Listener for Gate {
    type Io = GatedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if self.inner.unreachable() {
                drop(stream);
                continue;
            }
            let stream = GatedStream {
                stream,
                inner: self.inner.clone(),
            };
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection that breaks when the fake becomes unreachable.
struct GatedStream {
    stream: TcpStream,
    inner: Shared,
}

impl AsyncRead for GatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let filled = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        // Checked once bytes arrive: a request on a kept-alive connection finds it dead.
        if poll.is_ready() && buf.filled().len() > filled && self.inner.unreachable() {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        poll
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message}}))).into_response()
}

/// Every request passes here: recorded, failed if a fault says so, then authenticated.
async fn front_door(State(inner): State<Shared>, request: Request, next: Next) -> Response {
    let at = Instant::now();
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let user_agent = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let authorized = request
        .headers()
        .get("x-api-key")
        .is_some_and(|k| k.as_bytes() == inner.api_key.as_bytes());
    let json_body = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let fault = take_fault(&inner, &method, &path, &bytes);

    let response = match fault {
        Some(Fault::Unreachable) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            error(StatusCode::SERVICE_UNAVAILABLE, "unreachable")
        }
        Some(Fault::Unavailable) => error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"),
        Some(Fault::TooManyRequests { retry_after }) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&retry_after).expect("a header value"),
            );
            r
        }
        Some(Fault::BadRequest { body }) => (StatusCode::BAD_REQUEST, body).into_response(),
        slow => {
            if let Some(Fault::Slow(d)) = slow {
                tokio::time::sleep(d).await;
            }
            if !authorized {
                error(
                    StatusCode::FORBIDDEN,
                    "Authentication failed. Please try with valid Api Key.",
                )
            } else if parts.method != Method::GET && !json_body {
                error(
                    StatusCode::BAD_REQUEST,
                    "Content-Type must be application/json",
                )
            } else {
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
        }
    };
    inner.records.lock().unwrap().requests.push(RequestRecord {
        at,
        method,
        path,
        query,
        status: response.status().as_u16(),
        user_agent,
    });
    response
}

fn take_fault(inner: &Inner, method: &str, path: &str, body: &[u8]) -> Option<Fault> {
    let mut records = inner.records.lock().unwrap();
    let body = String::from_utf8_lossy(body);
    let i = records.faults.iter().position(|(_, s)| {
        s.method.is_none_or(|m| m == method)
            && s.path.as_deref().is_none_or(|p| path.starts_with(p))
            && s.body_contains.as_deref().is_none_or(|b| body.contains(b))
    })?;
    let (fault, scope) = &mut records.faults[i];
    let fault = fault.clone();
    if let Some(n) = &mut scope.times {
        *n -= 1;
        if *n == 0 {
            records.faults.remove(i);
        }
    }
    Some(fault)
}

fn parse(body: &Bytes) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, &message)
}

/// Mackerel's rule for service and role names.
fn valid_role_part(s: &str) -> bool {
    s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What a create or update body says.
struct HostFields {
    name: String,
    meta: Value,
    custom_identifier: Option<String>,
    roles: Vec<String>,
    display_name: Option<String>,
    memo: Option<String>,
}

/// An optional string field: absent or null is None, anything but a string is refused.
fn optional_string(v: &Value, key: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

/// name, meta, customIdentifier, roleFullnames, displayName and memo of a create or update
/// body.
fn host_fields(v: &Value) -> Result<HostFields, String> {
    let bad = |m: &str| Err(m.to_string());
    let Some(name) = v
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return bad("name is required");
    };
    let meta = v.get("meta").cloned().unwrap_or(json!({}));
    if !meta.is_object() {
        return bad("meta must be an object");
    }
    let custom_identifier = optional_string(v, "customIdentifier")?.filter(|s| !s.is_empty());
    let display_name = optional_string(v, "displayName")?;
    let memo = optional_string(v, "memo")?;
    let mut roles = Vec::new();
    match v.get("roleFullnames") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let ok =
                    item.as_str()
                        .and_then(|r| r.split_once(':'))
                        .is_some_and(|(service, role)| {
                            valid_role_part(service) && valid_role_part(role)
                        });
                if !ok {
                    return bad(&format!("invalid roleFullname: {item}"));
                }
                roles.push(item.as_str().unwrap_or_default().to_string());
            }
        }
        Some(_) => return bad("roleFullnames must be an array"),
    }
    Ok(HostFields {
        name: name.to_string(),
        meta,
        custom_identifier,
        roles,
        display_name,
        memo,
    })
}

fn host_json(h: &FakeHost) -> Value {
    json!({
        "id": h.id,
        "name": h.name,
        "displayName": h.display_name,
        "memo": h.memo,
        "customIdentifier": h.custom_identifier,
        "status": h.status,
        "meta": h.meta,
        "roles": roles_json(&h.role_fullnames),
        "isRetired": h.retired,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `roles` as the API shows it: `{"service": ["role", ...]}`.
fn roles_json(fullnames: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    for r in fullnames {
        if let Some((service, role)) = r.split_once(':') {
            let list = out
                .entry(service.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(list) = list {
                list.push(Value::String(role.to_string()));
            }
        }
    }
    Value::Object(out)
}

/// GET /api/v0/tsdb/latest?hostId=..&name=..: `{"tsdbLatest": {hostId: {name: {time, value}
/// or null}}}`; both parameters are required, as the real API requires them.
async fn latest_values(State(inner): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let mut ids = Vec::new();
    let mut names = Vec::new();
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(k).as_str() {
            "hostId" => ids.push(percent_decode(v)),
            "name" => names.push(percent_decode(v)),
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown parameter {other}"),
                )
            }
        }
    }
    if ids.is_empty() || names.is_empty() {
        return error(StatusCode::BAD_REQUEST, "hostId and name are required");
    }
    let mut records = inner.records.lock().unwrap();
    records.latest_queries += 1;
    let mut out = serde_json::Map::new();
    for id in &ids {
        if !records.hosts.iter().any(|h| &h.id == id) {
            return error(StatusCode::NOT_FOUND, &format!("host {id} not found"));
        }
        let mut per = serde_json::Map::new();
        for name in &names {
            let latest = records
                .points
                .iter()
                .filter(|p| &p.host_id == id && &p.name == name)
                .max_by_key(|p| p.time)
                .map(|p| json!({"time": p.time, "value": p.value}));
            per.insert(name.clone(), latest.unwrap_or(Value::Null));
        }
        out.insert(id.clone(), Value::Object(per));
    }
    Json(json!({ "tsdbLatest": out })).into_response()
}

async fn list_hosts(State(inner): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let mut custom_identifier = None;
    let mut service = None;
    let mut roles = Vec::new();
    let mut statuses = Vec::new();
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(k).as_str() {
            "customIdentifier" => custom_identifier = Some(percent_decode(v)),
            "status" => statuses.push(percent_decode(v)),
            "service" => service = Some(percent_decode(v)),
            "role" => roles.push(percent_decode(v)),
            _ => {}
        }
    }
    if !roles.is_empty() && service.is_none() {
        return error(StatusCode::BAD_REQUEST, "role needs service");
    }
    if statuses.is_empty() {
        statuses = vec!["working".into(), "standby".into()];
    }
    let mut records = inner.records.lock().unwrap();
    if service.is_some() {
        records.role_listings += 1;
    }
    let hosts: Vec<Value> = records
        .hosts
        .iter()
        .filter(|h| !h.retired && statuses.contains(&h.status))
        .filter(|h| {
            custom_identifier
                .as_ref()
                .is_none_or(|ci| h.custom_identifier.as_ref() == Some(ci))
        })
        .filter(|h| {
            service.as_ref().is_none_or(|s| {
                h.role_fullnames.iter().any(|r| {
                    r.split_once(':').is_some_and(|(hs, hr)| {
                        hs == s && (roles.is_empty() || roles.iter().any(|x| x == hr))
                    })
                })
            })
        })
        .map(host_json)
        .collect();
    Json(json!({ "hosts": hosts })).into_response()
}

async fn get_host(State(inner): State<Shared>, Path(id): Path<String>) -> Response {
    let records = inner.records.lock().unwrap();
    match records.hosts.iter().find(|h| h.id == id) {
        Some(h) => Json(json!({ "host": host_json(h) })).into_response(),
        None => error(StatusCode::NOT_FOUND, "Host not found"),
    }
}

async fn create_host(State(inner): State<Shared>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let f = match host_fields(&v) {
        Ok(f) => f,
        Err(m) => return bad_request(m),
    };
    let mut records = inner.records.lock().unwrap();
    if let Some(ci) = &f.custom_identifier {
        let taken = records
            .hosts
            .iter()
            .any(|h| !h.retired && h.custom_identifier.as_ref() == Some(ci));
        if taken {
            return error(
                StatusCode::BAD_REQUEST,
                "customIdentifier is already in use",
            );
        }
    }
    records.next_id += 1;
    let id = format!("fakeHost{:04}", records.next_id);
    records.hosts.push(FakeHost {
        id: id.clone(),
        name: f.name,
        custom_identifier: f.custom_identifier,
        status: "working".into(),
        meta: f.meta,
        role_fullnames: f.roles,
        display_name: f.display_name,
        memo: f.memo,
        retired: false,
        updates: 0,
    });
    Json(json!({ "id": id })).into_response()
}

async fn update_host(State(inner): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let f = match host_fields(&v) {
        Ok(f) => f,
        Err(m) => return bad_request(m),
    };
    let mut records = inner.records.lock().unwrap();
    let Some(h) = records.hosts.iter_mut().find(|h| h.id == id && !h.retired) else {
        return error(StatusCode::NOT_FOUND, "Host not found");
    };
    h.name = f.name;
    h.meta = f.meta;
    h.custom_identifier = f.custom_identifier;
    h.display_name = f.display_name;
    h.memo = f.memo;
    // The API keeps roles that an update does not name.
    for r in f.roles {
        if !h.role_fullnames.contains(&r) {
            h.role_fullnames.push(r);
        }
    }
    h.updates += 1;
    Json(json!({ "id": id })).into_response()
}

async fn set_status(State(inner): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
    if !["working", "standby", "maintenance", "poweroff"].contains(&status) {
        return error(StatusCode::BAD_REQUEST, "invalid status");
    }
    let mut records = inner.records.lock().unwrap();
    let Some(h) = records.hosts.iter_mut().find(|h| h.id == id && !h.retired) else {
        return error(StatusCode::NOT_FOUND, "Host not found");
    };
    h.status = status.to_string();
    records.statuses.push((id, status.to_string()));
    Json(json!({ "success": true })).into_response()
}

async fn retire_host(State(inner): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    // The docs show `{}`; the Go client sends `null`.
    match parse(&body) {
        Ok(Value::Object(_) | Value::Null) => {}
        Ok(_) => return error(StatusCode::BAD_REQUEST, "body must be {}"),
        Err(m) => return bad_request(m),
    }
    let mut records = inner.records.lock().unwrap();
    let Some(h) = records.hosts.iter_mut().find(|h| h.id == id && !h.retired) else {
        return error(StatusCode::NOT_FOUND, "Host not found");
    };
    h.retired = true;
    records.retirements.push(Retirement {
        host_id: id,
        at: Instant::now(),
    });
    Json(json!({ "success": true })).into_response()
}

fn valid_metric_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

async fn post_metrics(State(inner): State<Shared>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let Some(items) = v.as_array() else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be an array of metric values",
        );
    };
    let mut records = inner.records.lock().unwrap();
    let mut accepted = Vec::with_capacity(items.len());
    let now = Instant::now();
    for (i, item) in items.iter().enumerate() {
        let bad = |m: &str| error(StatusCode::BAD_REQUEST, &format!("item {i}: {m}: {item}"));
        let Some(host_id) = item.get("hostId").and_then(Value::as_str) else {
            return bad("hostId is required");
        };
        if !records.hosts.iter().any(|h| h.id == host_id && !h.retired) {
            return bad("no such host, or it is retired");
        }
        let Some(name) = item
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| valid_metric_name(n))
        else {
            return bad("name must match [a-zA-Z0-9._-]+");
        };
        let Some(time) = item.get("time").and_then(Value::as_i64) else {
            return bad("time must be an integer unix time");
        };
        let Some(value) = item.get("value").and_then(Value::as_f64) else {
            return bad("value must be a number");
        };
        accepted.push(Point {
            host_id: host_id.to_string(),
            name: name.to_string(),
            time,
            value,
            at: now,
        });
    }
    records.points.extend(accepted);
    Json(json!({ "success": true })).into_response()
}

async fn create_graph_defs(State(inner): State<Shared>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let Some(defs) = v.as_array() else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be an array of graph definitions",
        );
    };
    const UNITS: [&str; 9] = [
        "float",
        "integer",
        "percentage",
        "seconds",
        "milliseconds",
        "bytes",
        "bytes/sec",
        "bits/sec",
        "iops",
    ];
    for def in defs {
        let bad = |m: &str| error(StatusCode::BAD_REQUEST, &format!("{m}: {def}"));
        let Some(name) = def
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| n.starts_with("custom."))
        else {
            return bad("name must start with custom.");
        };
        if let Some(unit) = def.get("unit").and_then(Value::as_str) {
            if !UNITS.contains(&unit) {
                return bad("unknown unit");
            }
        }
        let Some(metrics) = def.get("metrics").and_then(Value::as_array) else {
            return bad("metrics is required");
        };
        for m in metrics {
            let ok = m
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.starts_with(&format!("{name}.")));
            if !ok {
                return bad("metric names must start with the graph name and a dot");
            }
        }
    }
    inner
        .records
        .lock()
        .unwrap()
        .graph_defs
        .extend(defs.iter().cloned());
    Json(json!({ "success": true })).into_response()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("arn%3Aaws%3Aecs%3Atask%2Fprod%2Fabc"),
            "arn:aws:ecs:task/prod/abc"
        );
        assert_eq!(percent_decode("a+b%zz%4"), "a b%zz%4");
    }
}
