//! DNS over TCP on tokio: a cap on connections, an idle timeout, pipelined queries answered
//! concurrently (replies may come back out of order, as RFC 7766 allows).

use crate::answer::{Accounting, Responder, answer_miss, finish};
use crate::fast::Fast;
use crate::metrics::Proto;
use crate::request::Request;
use crate::resolve::Resolver;
use crate::wire;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, watch};

/// Queries of one connection answered at the same time.
const PIPELINE_DEPTH: usize = 64;

pub struct TcpServer {
    pub resolver: Arc<Resolver>,
    /// Metrics and query log of this listener's TCP side.
    pub accounting: Accounting,
    pub connections: Arc<Semaphore>,
    pub idle_timeout: Duration,
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
                    Ok((stream, peer)) => match self.connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let this = self.clone();
                            let sd = shutdown.clone();
                            tokio::spawn(async move {
                                this.connection(stream, peer, sd).await;
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

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let wr = Arc::new(Mutex::new(wr));
        let to = Responder::Tcp(wr.clone());
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
            let to = to.clone();
            let busy = this.resolver.in_flight();
            tokio::spawn(async move {
                this.answer(msg, peer, &to).await;
                drop(busy);
                drop(permit);
            });
        }
        // Let in-flight answers finish writing before the write half is dropped.
        let _ = depth.acquire_many(PIPELINE_DEPTH as u32).await;
        let _ = wr.lock().await.shutdown().await;
    }

    /// From the cache or an error reply at once; a miss goes the shared miss path.
    async fn answer(&self, msg: Vec<u8>, peer: SocketAddr, to: &Responder) {
        let received = Instant::now();
        let mut out = Vec::with_capacity(512);
        let m = self.accounting.metrics();
        let parsed = match self
            .resolver
            .answer_fast(&msg, received, &mut out, Proto::Tcp, m)
        {
            Fast::Drop => return,
            Fast::Reply { answered, .. } => {
                return finish(&self.accounting, to, &answered, &out, peer, received).await;
            }
            Fast::Miss(parsed) => parsed,
        };
        let req = Request::new(msg, parsed, peer, Proto::Tcp, received);
        answer_miss(&self.resolver, req, &self.accounting, to).await;
    }
}

/// One length-prefixed message; `None` at a clean EOF.
async fn read_message(rd: &mut tokio::net::tcp::OwnedReadHalf) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; wire::TCP_PREFIX_LEN];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; wire::tcp_message_len(len)];
    rd.read_exact(&mut msg).await?;
    Ok(Some(msg))
}
