//! A tiny HTTP/1.x responder for /metrics, /health and /ready (one request per connection).

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8192;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints report.
pub trait Endpoints: Send + Sync + 'static {
    fn metrics(&self) -> String;
    fn ready(&self) -> bool;
}

pub async fn serve(listener: TcpListener, ep: Arc<dyn Endpoints>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ep = ep.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, ep).await {
                        tracing::debug!(error = %e, "http connection");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "http accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, ep: Arc<dyn Endpoints>) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::other("request timed out"))??;
    let (status, ctype, body) = route(&head, ep.as_ref());
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(std::io::Error::other("request head too large"));
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// (status line, content type, body) for a request head.
pub fn route(head: &str, ep: &dyn Endpoints) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            TEXT,
            "method not allowed\n".into(),
        );
    }
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            ep.metrics(),
        ),
        "/health" => ("200 OK", TEXT, "OK\n".into()),
        "/ready" if ep.ready() => ("200 OK", TEXT, "ready\n".into()),
        "/ready" => (
            "503 Service Unavailable",
            TEXT,
            "not ready: no upstream has answered yet\n".into(),
        ),
        _ => ("404 Not Found", TEXT, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(bool);
    impl Endpoints for Fake {
        fn metrics(&self) -> String {
            "m 1\n".into()
        }
        fn ready(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n", &Fake(true)).2, "m 1\n");
        assert_eq!(route("GET /health HTTP/1.0\r\n", &Fake(false)).0, "200 OK");
        assert_eq!(
            route("GET /ready HTTP/1.1\r\n", &Fake(false)).0,
            "503 Service Unavailable"
        );
        assert_eq!(route("GET /ready HTTP/1.1\r\n", &Fake(true)).0, "200 OK");
        assert_eq!(
            route("GET /nope HTTP/1.1\r\n", &Fake(true)).0,
            "404 Not Found"
        );
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n", &Fake(true)).0,
            "405 Method Not Allowed"
        );
        assert_eq!(route("", &Fake(true)).0, "405 Method Not Allowed");
    }
}
