//! `observer health`: asks a running observer's `/healthz`, for health checks in an image with
//! no shell or curl (ECS `healthCheck` in exec form). Plain blocking HTTP/1.0 over one TCP
//! connection: no runtime, nothing to configure beyond the listen address.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "observer health asks the running observer's /healthz, so it needs the address it \
         listens on: set --prometheus-listen / OBSERVER_PROMETHEUS_LISTEN as for the observer"
    )]
    NoListenAddress,
    #[error("no answer from http://{addr}/healthz: {source}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http://{addr}/healthz answered {status:?}")]
    Unhealthy { addr: SocketAddr, status: String },
}

/// Where to ask: an unspecified listen address (0.0.0.0, ::) is asked on loopback.
pub fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The status line's code, if it is an HTTP response.
fn status_code(response: &str) -> Option<u16> {
    let line = response.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|w| w.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

/// Ok when `/healthz` at `listen` answers 200 within `timeout`.
pub fn check(listen: Option<SocketAddr>, timeout: Duration) -> Result<SocketAddr, HealthError> {
    let addr = probe_address(listen.ok_or(HealthError::NoListenAddress)?);
    let unreachable = |source| HealthError::Unreachable { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    // One write: a request in pieces can meet a server that answers after the first.
    let request = format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut response = Vec::new();
    // Enough for a status line; the body does not matter.
    stream
        .take(4096)
        .read_to_end(&mut response)
        .map_err(unreachable)?;
    let response = String::from_utf8_lossy(&response);
    match status_code(&response) {
        Some(200) => Ok(addr),
        _ => Err(HealthError::Unhealthy {
            addr,
            status: response.lines().next().unwrap_or("").to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn unspecified_addresses_are_asked_on_loopback() {
        assert_eq!(
            probe_address("0.0.0.0:9435".parse().unwrap()),
            "127.0.0.1:9435".parse().unwrap()
        );
        assert_eq!(
            probe_address("[::]:9435".parse().unwrap()),
            "[::1]:9435".parse().unwrap()
        );
        assert_eq!(
            probe_address("10.0.0.7:9435".parse().unwrap()),
            "10.0.0.7:9435".parse().unwrap()
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code("HTTP/1.1 200 OK\r\n\r\nok"), Some(200));
        assert_eq!(
            status_code("HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(""), None);
    }

    /// A one-shot server on loopback answering `response`.
    fn serve_once(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                // The whole request, so closing does not reset the connection.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(response.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn healthy_and_unhealthy_answers() {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(check(Some(ok), Duration::from_secs(2)).unwrap(), ok);
        let bad = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = check(Some(bad), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, HealthError::Unhealthy { .. }), "{err}");
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[test]
    fn nothing_listening_and_no_address_are_explained() {
        // Bound then dropped: nothing listens there now.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = check(Some(port), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, HealthError::Unreachable { .. }), "{err}");
        let err = check(None, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("OBSERVER_PROMETHEUS_LISTEN"),
            "{err}"
        );
    }
}
