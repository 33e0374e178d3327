//! DNS over TCP on tokio: a cap on connections, an idle timeout, pipelined queries answered
//! concurrently (replies may come back out of order, as RFC 7766 allows).

use crate::metrics::{ServerMetrics, qtype_index};
use crate::resolve::{Fast, Resolver, answer_fast};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, watch};

/// Queries of one connection answered at the same time.
const PIPELINE_DEPTH: usize = 64;

pub struct TcpServer {
    pub resolver: Arc<Resolver>,
    pub metrics: ServerMetrics,
    pub connections: Arc<Semaphore>,
    pub idle_timeout: Duration,
    pub log_queries: bool,
}

impl TcpServer {
    /// Accepts until `shutdown` flips; the listener is dropped (closed) right then.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => match self.connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let this = self.clone();
                            let sd = shutdown.clone();
                            tokio::spawn(async move {
                                this.connection(stream, sd).await;
                                drop(permit);
                            });
                        }
                        // Over the cap: close at once rather than let it wait.
                        Err(_) => drop(stream),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "tcp accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, mut shutdown: watch::Receiver<bool>) {
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let wr = Arc::new(Mutex::new(wr));
        let depth = Arc::new(Semaphore::new(PIPELINE_DEPTH));
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => break,
                m = tokio::time::timeout(self.idle_timeout, read_message(&mut rd)) => m,
            };
            let Ok(Ok(Some(msg))) = msg else { break };
            let Ok(permit) = depth.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            let wr = wr.clone();
            this.resolver.busy.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                this.answer(&msg, &wr).await;
                this.resolver.busy.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            });
        }
        // Let in-flight answers finish writing before the write half is dropped.
        let _ = depth.acquire_many(PIPELINE_DEPTH as u32).await;
        let _ = wr.lock().await.shutdown().await;
    }

    async fn answer(&self, msg: &[u8], wr: &Mutex<OwnedWriteHalf>) {
        let now = Instant::now();
        let mut out = Vec::with_capacity(512);
        let (bytes, plugin, rcode, type_idx) = match answer_fast(
            &self.resolver.cache,
            msg,
            now,
            &mut out,
            true,
            &self.metrics,
        ) {
            Fast::Drop => return,
            Fast::Reply {
                plugin,
                rcode,
                type_idx,
                ..
            } => (out, plugin, rcode, type_idx),
            Fast::Miss => {
                let idx = crate::wire::parse_query(msg)
                    .map(|q| qtype_index(q.qtype))
                    .unwrap_or(0);
                match self.resolver.resolve_miss(msg, true, &self.metrics).await {
                    Some(r) => (r.bytes, r.plugin, r.rcode, idx),
                    None => return,
                }
            }
        };
        self.metrics.response(
            type_idx,
            plugin,
            rcode,
            bytes.len(),
            now.elapsed().as_secs_f64(),
        );
        if self.log_queries {
            tracing::info!(proto = "tcp", rcode, size = bytes.len(), "query answered");
        }
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        let _ = wr.lock().await.write_all(&framed).await;
    }
}

/// One length-prefixed message; `None` at a clean EOF.
async fn read_message(rd: &mut tokio::net::tcp::OwnedReadHalf) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    rd.read_exact(&mut msg).await?;
    Ok(Some(msg))
}
