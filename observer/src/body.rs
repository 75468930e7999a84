//! Size-capped reads of HTTP answers: no API observer asks (ECS agent, kubelet, Docker,
//! Mackerel) can make it hold more than a cap in memory. Each caller names its own cap and
//! turns [`BodyError::TooLarge`] into an error that says which API answered too much.

use std::fmt;

use hyper::body::Bytes;

/// `/v1/metadata` and `/v1/tasks` of the ECS agent: a task is a few KiB, and an instance runs
/// at most a few hundred.
pub const ECS_AGENT_MAX: usize = 8 << 20;
/// The kubelet's `/pods`: 110 pods per node by default, tens of KiB each with managed fields.
pub const KUBELET_PODS_MAX: usize = 16 << 20;
/// Any Docker Engine API answer (`/containers/json`, an inspect, a stats sample).
pub const DOCKER_MAX: usize = 4 << 20;
/// Any Mackerel API answer: observer only reads ids and short lists back.
pub const MACKEREL_MAX: usize = 1 << 20;

/// Why a capped read failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {}", Size(*limit))]
    TooLarge { limit: usize },
    #[error(transparent)]
    Read(#[from] reqwest::Error),
}

/// A byte count as people read caps: "8 MiB", "1 KiB", else bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub usize);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{} MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{} KiB", n >> 10),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// Longest error text quoted from a decoder: serde quotes the value it could not take, and
/// that value is the sender's to choose.
pub const MAX_ERROR_CHARS: usize = 300;

/// `error` as text, cut to [`MAX_ERROR_CHARS`] characters.
pub fn clip(error: &impl fmt::Display) -> String {
    let text = error.to_string();
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}... ({} bytes in all)", &text[..cut], text.len()),
        None => text,
    }
}

/// The body of `response`, or [`BodyError::TooLarge`] as soon as it passes `limit`: a
/// Content-Length over the cap is refused before reading, a longer stream is cut at the cap.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge { limit };
    let announced = response.content_length().unwrap_or(0);
    if announced > limit as u64 {
        return Err(too_large);
    }
    // The announced length is at most the cap, so trusting it for the allocation is safe.
    let mut body = Vec::with_capacity(announced as usize);
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.into())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// An HTTP server that answers every request with 200 and a chunked body of `total` bytes
    /// of `x` (or until the client goes away), and keeps the most it wrote on one connection.
    pub(crate) async fn flood(total: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicUsize::new(0));
        let most = written.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(flood_one(stream, total, most.clone()));
            }
        });
        (addr, written)
    }

    async fn flood_one(mut stream: tokio::net::TcpStream, total: usize, most: Arc<AtomicUsize>) {
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 << 10];
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        let mut sent = 0;
        while sent < total {
            if stream.write_all(&framed).await.is_err() {
                return;
            }
            sent += chunk.len();
            most.fetch_max(sent, Ordering::Relaxed);
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }

    #[test]
    fn decoder_errors_are_clipped() {
        let long = format!(r#"{{"a": 1, "b": "{}"}}"#, "x".repeat(100_000));
        let err =
            serde_json::from_str::<std::collections::BTreeMap<String, u8>>(&long).unwrap_err();
        let text = clip(&err);
        assert!(text.len() < MAX_ERROR_CHARS + 40, "{}", text.len());
        assert!(text.starts_with("invalid type: string \"xxx"), "{text}");
        assert_eq!(clip(&"short"), "short");
    }

    #[test]
    fn sizes_read_like_caps() {
        assert_eq!(Size(16 << 20).to_string(), "16 MiB");
        assert_eq!(Size(4096).to_string(), "4 KiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    #[tokio::test]
    async fn reads_stop_at_the_cap() {
        let limit = 1 << 20;
        // Far more than the cap: a read that did not stop would take this long to fail.
        let (addr, written) = flood(usize::MAX).await;
        let response = reqwest::get(format!("http://{addr}/")).await.unwrap();
        let err = read_capped(response, limit).await.unwrap_err();
        assert!(
            matches!(err, BodyError::TooLarge { limit: l } if l == limit),
            "{err}"
        );
        assert_eq!(err.to_string(), "the answer is larger than 1 MiB");
        // What the server got out: the cap plus what socket buffers hold, not the flood.
        let sent = written.load(Ordering::Relaxed);
        assert!(sent < limit + (16 << 20), "the server wrote {sent} bytes");

        let (addr, _) = flood(limit).await;
        let response = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert_eq!(read_capped(response, limit).await.unwrap().len(), limit);
    }
}
