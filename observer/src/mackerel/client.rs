//! Mackerel API client: the calls observer makes, their JSON shapes, and errors sorted by what
//! the caller should do next (retry later, give up on this request, or report a bad answer).
//!
//! The API key only ever goes into the `X-Api-Key` header (marked sensitive); [`ApiKey`] prints
//! as `<redacted>` and response bodies quoted in errors have the key cut out.

use std::{
    collections::HashMap,
    fmt,
    time::{Duration, SystemTime},
};

use hyper::body::Bytes;
use reqwest::{
    header::{HeaderMap, HeaderValue, RETRY_AFTER},
    Method, StatusCode, Url,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::model::{HostMeta, HostStatus};
use crate::body::{self, BodyError};

/// Longest Retry-After honoured as given; a longer one is treated as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Longest response body quoted in an error.
const MAX_BODY_CHARS: usize = 1000;

/// The Mackerel API key. Its Debug and Display print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

/// Why a string cannot be an API key. The messages never quote the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the Mackerel API key is empty")]
    Empty,
    #[error("the Mackerel API key has characters that cannot go in an HTTP header")]
    NotVisibleAscii,
}

impl ApiKey {
    /// The key, without surrounding whitespace (a key file usually ends in a newline).
    pub fn new(key: &str) -> Result<Self, KeyError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::NotVisibleAscii);
        }
        Ok(Self(key.to_string()))
    }

    fn header(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&self.0).expect("checked in ApiKey::new");
        value.set_sensitive(true);
        value
    }

    /// `text` with every occurrence of the key replaced, for quoting what a server said.
    fn redact(&self, text: &str) -> String {
        text.replace(&self.0, "<redacted>")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Body of create host and update host.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostParam {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    pub custom_identifier: String,
    pub meta: HostMeta,
    pub role_fullnames: Vec<String>,
}

/// A host as the API lists it (only the fields observer reads).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub custom_identifier: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub meta: serde_json::Value,
    #[serde(default)]
    pub is_retired: bool,
}

/// A metric's latest value as GET /api/v0/tsdb/latest gives it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Latest {
    pub time: i64,
    pub value: f64,
}

/// One value of one host's metric, as POST /api/v0/tsdb takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricValue {
    pub host_id: String,
    pub name: String,
    /// Unix seconds.
    pub time: i64,
    pub value: f64,
}

/// A graph definition for custom metrics (POST /api/v0/graph-defs/create).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphDef {
    pub name: String,
    pub display_name: String,
    pub unit: String,
    pub metrics: Vec<GraphMetric>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphMetric {
    pub name: String,
    pub display_name: String,
    pub is_stacked: bool,
}

/// A failed call, sorted by what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Could not connect, timed out, 5xx or 429: the same request may succeed later.
    #[error("{call}: Mackerel API unavailable: {reason}")]
    Retryable {
        call: &'static str,
        reason: String,
        /// What the server asked for in Retry-After, if it did.
        retry_after: Option<Duration>,
    },
    /// Any other 4xx: the request itself or the key is wrong, so sending it again will not help.
    #[error("{call}: Mackerel API refused the request: HTTP {status}: {body}")]
    Rejected {
        call: &'static str,
        status: u16,
        /// The response body, truncated, with the key cut out.
        body: String,
    },
    /// A success status with a body we could not read, or a status that makes no sense here.
    #[error("{call}: unexpected answer from the Mackerel API: {reason}")]
    Decode { call: &'static str, reason: String },
}

impl ApiError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ApiError::Retryable { .. })
    }

    /// The HTTP status of a refused request.
    pub fn rejected_status(&self) -> Option<u16> {
        match self {
            ApiError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Mackerel API base {0:?} is not an http(s) URL")]
    BadBase(String),
    #[error("making the HTTP client: {0}")]
    Http(String),
    #[error("application metrics: {0}")]
    AppMetrics(String),
}

/// The Mackerel API at one base URL, with one key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Always ends in '/', so relative joins keep a base path.
    base: Url,
    key: ApiKey,
    /// The most read of one answer.
    max_body: usize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("key", &self.key)
            .finish()
    }
}

#[derive(Deserialize)]
struct HostsResponse {
    hosts: Vec<Host>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LatestResponse {
    tsdb_latest: HashMap<String, HashMap<String, Option<Latest>>>,
}

#[derive(Deserialize)]
struct CreatedResponse {
    id: String,
}

impl Client {
    /// A client for `base_url` whose every request gives up after `timeout`.
    pub fn new(key: ApiKey, base_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let bad_base = || ClientError::BadBase(base_url.to_string());
        let mut base = Url::parse(base_url).map_err(|_| bad_base())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad_base());
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut headers = HeaderMap::new();
        headers.insert("X-Api-Key", key.header());
        let http = reqwest::Client::builder()
            .user_agent(concat!("observer/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ClientError::Http(error_chain(&e)))?;
        Ok(Self {
            http,
            base,
            key,
            max_body: body::MACKEREL_MAX,
        })
    }

    /// The base URL requests go to.
    pub fn base(&self) -> &str {
        self.base.as_str()
    }

    /// Non-retired hosts with this customIdentifier (at most one, the API keeps it unique).
    pub async fn find_hosts(&self, custom_identifier: &str) -> Result<Vec<Host>, ApiError> {
        const CALL: &str = "finding host";
        let mut url = self.url(CALL, &["api", "v0", "hosts"])?;
        // Every status but retired: the API's default leaves out maintenance and poweroff.
        url.query_pairs_mut()
            .append_pair("customIdentifier", custom_identifier)
            .append_pair("status", "working")
            .append_pair("status", "standby")
            .append_pair("status", "maintenance")
            .append_pair("status", "poweroff");
        let found: HostsResponse = self.send(CALL, Method::GET, url, None::<&()>).await?;
        Ok(found.hosts)
    }

    /// Non-retired hosts of one role (the API filters hosts by service and role, not by meta).
    pub async fn hosts_in_role(&self, service: &str, role: &str) -> Result<Vec<Host>, ApiError> {
        const CALL: &str = "listing hosts of a role";
        let mut url = self.url(CALL, &["api", "v0", "hosts"])?;
        url.query_pairs_mut()
            .append_pair("service", service)
            .append_pair("role", role)
            .append_pair("status", "working")
            .append_pair("status", "standby")
            .append_pair("status", "maintenance")
            .append_pair("status", "poweroff");
        let found: HostsResponse = self.send(CALL, Method::GET, url, None::<&()>).await?;
        Ok(found.hosts)
    }

    /// The latest value of each of `names` for each of `host_ids` (None: no value yet).
    pub async fn latest(
        &self,
        host_ids: &[String],
        names: &[String],
    ) -> Result<HashMap<String, HashMap<String, Option<Latest>>>, ApiError> {
        const CALL: &str = "reading latest values";
        let mut url = self.url(CALL, &["api", "v0", "tsdb", "latest"])?;
        {
            let mut q = url.query_pairs_mut();
            for id in host_ids {
                q.append_pair("hostId", id);
            }
            for name in names {
                q.append_pair("name", name);
            }
        }
        let got: LatestResponse = self.send(CALL, Method::GET, url, None::<&()>).await?;
        Ok(got.tsdb_latest)
    }

    /// Registers a host; returns its id.
    pub async fn create_host(&self, param: &HostParam) -> Result<String, ApiError> {
        const CALL: &str = "creating host";
        let url = self.url(CALL, &["api", "v0", "hosts"])?;
        let created: CreatedResponse = self.send(CALL, Method::POST, url, Some(param)).await?;
        Ok(created.id)
    }

    /// Replaces a host's name, meta and customIdentifier; adds roles (none are removed).
    pub async fn update_host(&self, host_id: &str, param: &HostParam) -> Result<(), ApiError> {
        const CALL: &str = "updating host";
        let url = self.url(CALL, &["api", "v0", "hosts", host_id])?;
        let _: serde::de::IgnoredAny = self.send(CALL, Method::PUT, url, Some(param)).await?;
        Ok(())
    }

    /// Sets a host's status (working, standby, maintenance, poweroff).
    pub async fn set_host_status(&self, host_id: &str, status: HostStatus) -> Result<(), ApiError> {
        const CALL: &str = "setting host status";
        let url = self.url(CALL, &["api", "v0", "hosts", host_id, "status"])?;
        let body = serde_json::json!({ "status": status.as_str() });
        let _: serde::de::IgnoredAny = self.send(CALL, Method::POST, url, Some(&body)).await?;
        Ok(())
    }

    pub async fn retire_host(&self, host_id: &str) -> Result<(), ApiError> {
        const CALL: &str = "retiring host";
        let url = self.url(CALL, &["api", "v0", "hosts", host_id, "retire"])?;
        let empty = serde_json::Map::new();
        let _: serde::de::IgnoredAny = self.send(CALL, Method::POST, url, Some(&empty)).await?;
        Ok(())
    }

    /// Posts values of any number of hosts in one request.
    pub async fn post_metrics(&self, values: &[MetricValue]) -> Result<(), ApiError> {
        const CALL: &str = "posting metrics";
        let url = self.url(CALL, &["api", "v0", "tsdb"])?;
        let _: serde::de::IgnoredAny = self.send(CALL, Method::POST, url, Some(values)).await?;
        Ok(())
    }

    pub async fn create_graph_defs(&self, defs: &[GraphDef]) -> Result<(), ApiError> {
        const CALL: &str = "creating graph definitions";
        let url = self.url(CALL, &["api", "v0", "graph-defs", "create"])?;
        let _: serde::de::IgnoredAny = self.send(CALL, Method::POST, url, Some(defs)).await?;
        Ok(())
    }

    fn url(&self, call: &'static str, segments: &[&str]) -> Result<Url, ApiError> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|()| ApiError::Decode {
                call,
                reason: "the base URL cannot take a path".to_string(),
            })?;
            // Drops the empty segment the trailing '/' leaves, then percent-encodes each part.
            path.pop_if_empty().extend(segments);
        }
        Ok(url)
    }

    async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        call: &'static str,
        method: Method,
        url: Url,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let transport = |e: reqwest::Error| ApiError::Retryable {
            call,
            reason: error_chain(&e.without_url()),
            retry_after: None,
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let (bytes, too_large) = match body::read_capped(response, self.max_body).await {
            Ok(bytes) => (bytes, None),
            Err(BodyError::Read(e)) => return Err(transport(e)),
            Err(e @ BodyError::TooLarge { .. }) => (Bytes::new(), Some(e.to_string())),
        };
        // An error status is still sorted by its status; only a success needs the body.
        let text = || match &too_large {
            Some(reason) => format!("<{reason}>"),
            None => self.key.redact(&truncate(&String::from_utf8_lossy(&bytes))),
        };
        if status.is_success() {
            if let Some(reason) = &too_large {
                return Err(ApiError::Decode {
                    call,
                    reason: format!("HTTP {}, but {reason}", status.as_u16()),
                });
            }
            return serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
                call,
                reason: format!("{} in {:?}", body::clip(&e), text()),
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(ApiError::Retryable {
                call,
                reason: format!("HTTP {}: {}", status.as_u16(), text()),
                retry_after,
            });
        }
        if status.is_client_error() {
            return Err(ApiError::Rejected {
                call,
                status: status.as_u16(),
                body: text(),
            });
        }
        Err(ApiError::Decode {
            call,
            reason: format!("HTTP {}: {}", status.as_u16(), text()),
        })
    }
}

/// Retry-After as delay-seconds or an HTTP date, measured from `now`; capped at
/// [`MAX_RETRY_AFTER`]. A date in the past means "now" (zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

fn truncate(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_BODY_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes in all)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// An error and its causes on one line: reqwest's own message alone says only
/// "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_prints() {
        let key = ApiKey::new(" secret-key-123\n").unwrap();
        assert_eq!(format!("{key}"), "<redacted>");
        assert_eq!(format!("{key:?}"), "<redacted>");
        assert_eq!(key.redact("echo secret-key-123!"), "echo <redacted>!");
        let client = Client::new(key, "http://127.0.0.1:1", Duration::from_secs(1)).unwrap();
        assert!(!format!("{client:?}").contains("secret"));
        assert!(format!("{:?}", client.key.header()).contains("Sensitive"));
    }

    #[test]
    fn bad_keys() {
        assert_eq!(ApiKey::new("  \n"), Err(KeyError::Empty));
        assert_eq!(ApiKey::new("ab cd"), Err(KeyError::NotVisibleAscii));
        assert_eq!(ApiKey::new("abcé"), Err(KeyError::NotVisibleAscii));
        assert!(!KeyError::NotVisibleAscii.to_string().contains("ab"));
    }

    #[test]
    fn urls_keep_a_base_path() {
        let key = ApiKey::new("k").unwrap();
        let c = Client::new(
            key.clone(),
            "https://api.mackerelio.com",
            Duration::from_secs(1),
        )
        .unwrap();
        let u = c
            .url("t", &["api", "v0", "hosts", "abc", "retire"])
            .unwrap();
        assert_eq!(
            u.as_str(),
            "https://api.mackerelio.com/api/v0/hosts/abc/retire"
        );
        let c = Client::new(
            key.clone(),
            "http://proxy:8080/mackerel",
            Duration::from_secs(1),
        )
        .unwrap();
        let u = c.url("t", &["api", "v0", "hosts", "a/b"]).unwrap();
        assert_eq!(u.as_str(), "http://proxy:8080/mackerel/api/v0/hosts/a%2Fb");
        assert!(Client::new(key.clone(), "ftp://x", Duration::from_secs(1)).is_err());
        assert!(Client::new(key, "not a url", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    /// An API (or a proxy in front of it) that streams without end costs at most the cap.
    #[tokio::test]
    async fn an_endless_answer_stops_at_the_cap() {
        let (addr, written) = body::tests::flood(usize::MAX).await;
        let key = ApiKey::new("k").unwrap();
        let client = Client::new(key, &format!("http://{addr}"), Duration::from_secs(30)).unwrap();
        let err = client.find_hosts("x").await.unwrap_err();
        assert_eq!(
            err,
            ApiError::Decode {
                call: "finding host",
                reason: "HTTP 200, but the answer is larger than 1 MiB".into()
            }
        );
        let sent = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < body::MACKEREL_MAX * 16, "{sent} bytes sent");
    }

    #[test]
    fn bodies_are_truncated() {
        let long = "x".repeat(5000);
        let t = truncate(&long);
        assert!(t.starts_with(&"x".repeat(MAX_BODY_CHARS)));
        assert!(t.ends_with("(5000 bytes in all)"));
        assert_eq!(truncate(" short \n"), "short");
    }

    #[test]
    fn wire_shapes() {
        let v = serde_json::to_value(MetricValue {
            host_id: "h1".into(),
            name: "container.cpu.app.usage".into(),
            time: 1_767_225_600,
            value: 12.5,
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"hostId": "h1", "name": "container.cpu.app.usage",
                               "time": 1_767_225_600, "value": 12.5})
        );
        let mut param = HostParam {
            name: "n".into(),
            display_name: None,
            memo: None,
            custom_identifier: "ci".into(),
            meta: HostMeta::observer(None),
            role_fullnames: vec!["s:r".into()],
        };
        let p = serde_json::to_value(&param).unwrap();
        // Omitted when empty, as the container agent sends them.
        assert!(
            p.get("displayName").is_none() && p.get("memo").is_none(),
            "{p}"
        );
        param.display_name = Some("web".into());
        param.memo = Some("m".into());
        let p = serde_json::to_value(&param).unwrap();
        assert_eq!(p["displayName"], "web");
        assert_eq!(p["memo"], "m");
        assert_eq!(p["customIdentifier"], "ci");
        assert_eq!(p["roleFullnames"][0], "s:r");
        let g = serde_json::to_value(GraphMetric {
            name: "custom.a.b".into(),
            display_name: "b".into(),
            is_stacked: false,
        })
        .unwrap();
        assert_eq!(g["displayName"], "b");
        assert_eq!(g["isStacked"], false);
    }
}
