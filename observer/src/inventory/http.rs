//! The HTTP the node-local APIs (ECS agent, kubelet) share: one GET, and errors that say what
//! went wrong without the request's secrets.

use std::time::Duration;

use super::SourceError;

/// `url` without trailing slashes, so paths can be appended.
pub(super) fn base_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// `GET url` with an optional bearer token; the body of a 2xx answer.
///
/// Errors name the URL, never the token (reqwest marks a bearer header sensitive and does not
/// put headers in its errors).
pub(super) async fn get(
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
    response
        .bytes()
        .await
        .map_err(|e| request_error(url, timeout, &e))
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

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:51678/"),
            "http://127.0.0.1:51678"
        );
        assert_eq!(base_url("http://h:1"), "http://h:1");
    }
}
