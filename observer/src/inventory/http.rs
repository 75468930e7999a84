//! The HTTP the node-local APIs (ECS agent, kubelet) share: one GET, and errors that say what
//! went wrong without the request's secrets.

use std::time::Duration;

use super::SourceError;
use crate::body::{self, BodyError};

/// `url` without trailing slashes, so paths can be appended.
pub(super) fn base_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// An API and the most observer reads of one answer from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Api {
    /// For errors: "the ECS agent", "the kubelet".
    pub name: &'static str,
    pub max_body: usize,
}

pub(crate) const ECS_AGENT: Api = Api {
    name: "the ECS agent",
    max_body: body::ECS_AGENT_MAX,
};

pub(crate) const KUBELET: Api = Api {
    name: "the kubelet",
    max_body: body::KUBELET_PODS_MAX,
};

/// `GET url` with an optional bearer token; the body of a 2xx answer, at most
/// `api.max_body` bytes of it.
///
/// Errors name the URL, never the token (reqwest marks a bearer header sensitive and does not
/// put headers in its errors).
pub(super) async fn get(
    api: Api,
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    bearer: Option<&str>,
) -> Result<hyper::body::Bytes, SourceError> {
    let mut request = client.get(url).timeout(timeout);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| request_error(url, timeout, &e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(SourceError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
        });
    }
    read_body(api, response, url, timeout).await
}

/// The body of `response`, capped at `api.max_body`.
pub(super) async fn read_body(
    api: Api,
    response: reqwest::Response,
    url: &str,
    timeout: Duration,
) -> Result<hyper::body::Bytes, SourceError> {
    body::read_capped(response, api.max_body)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => SourceError::TooLarge {
                api: api.name,
                url: url.to_owned(),
                limit,
            },
            BodyError::Read(e) => request_error(url, timeout, &e),
        })
}

/// A reqwest error as a [`SourceError`], with the underlying cause (connection refused, TLS
/// verification) spelled out.
pub(super) fn request_error(url: &str, timeout: Duration, e: &reqwest::Error) -> SourceError {
    if e.is_timeout() {
        return SourceError::Timeout {
            url: url.to_owned(),
            after: timeout,
        };
    }
    SourceError::Unreachable {
        url: url.to_owned(),
        reason: error_chain(e),
    }
}

/// An error and its sources, each once: "client error (Connect): tcp connect error: ...".
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        // reqwest's top level repeats the URL the caller already names.
        let text = match text.strip_prefix("error sending request for url (") {
            Some(_) => String::new(),
            None => text,
        };
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_answers_name_the_api() {
        let (addr, _) = body::tests::flood(usize::MAX).await;
        let url = format!("http://{addr}/v1/tasks");
        let api = Api {
            max_body: 64 << 10,
            ..ECS_AGENT
        };
        let client = reqwest::Client::new();
        let err = get(api, &client, &url, Duration::from_secs(10), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the ECS agent at {url} answered more than 64 KiB (observer reads no more)")
        );
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:51678/"),
            "http://127.0.0.1:51678"
        );
        assert_eq!(base_url("http://h:1"), "http://h:1");
    }
}
