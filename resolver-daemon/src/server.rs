//! Wiring: builds the cache, forwarder and metrics from a `Config`, binds the listeners,
//! starts the threads and tasks, and runs the shutdown sequence (listeners closed first,
//! in-flight queries drained within the grace period).

use crate::cache::Cache;
use crate::config::{Config, MAX_UDP_THREADS, UdpThreads};
use crate::http::{self, Endpoints};
use crate::metrics::{Metrics, Proto, ServerMetrics, server_label};
use crate::resolve::{RefreshQueue, Resolver};
use crate::sockets::{self, KernelRoutes};
use crate::tcp::TcpServer;
use crate::udp::{HotPath, Job, Miss, ReplyHandle, ThreadProgress};
use crate::upstream::{Forwarder, ForwarderConfig, Upstream, UpstreamSet, resolv_conf_servers};
use crate::watchdog::{self, Heartbeat};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};

/// Misses waiting for the tokio side; past this the hot path answers stale/SERVFAIL itself.
const JOB_QUEUE: usize = 8192;
const RECV_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Socket(#[from] sockets::SocketError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("upstream source for {upstream}: {source}")]
    UpstreamSource {
        upstream: SocketAddr,
        source: std::io::Error,
    },
    #[error("http listener {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("thread: {0}")]
    Thread(std::io::Error),
}

struct Listener {
    addr: SocketAddr,
    reply: ReplyHandle,
    udp_metrics: ServerMetrics,
}

struct Health {
    metrics: Metrics,
    resolver: Arc<Resolver>,
    listening: AtomicBool,
}

impl Endpoints for Health {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
    fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && self.resolver.forwarder.any_answered()
    }
}

fn build_forwarder(cfg: &Config, metrics: &Metrics) -> Result<Forwarder, ServerError> {
    let with_source = |addr: SocketAddr| -> Result<Upstream, ServerError> {
        let source =
            sockets::upstream_bind_source(addr, &cfg.listen, cfg.upstream_source, &KernelRoutes)
                .map_err(|source| ServerError::UpstreamSource {
                    upstream: addr,
                    source,
                })?;
        if let Some(src) = source {
            tracing::info!(upstream = %addr, %src, "upstream queries bind to the node address (not a listen address)");
        }
        Ok(Upstream::new(addr, source))
    };
    let primary = UpstreamSet::new(
        cfg.upstreams
            .iter()
            .map(|a| with_source(*a))
            .collect::<Result<_, _>>()?,
    );
    let external = if cfg.external_to_resolv_conf {
        let text = std::fs::read_to_string(&cfg.resolv_conf).unwrap_or_else(|e| {
            tracing::warn!(path = %cfg.resolv_conf.display(), error = %e, "cannot read resolv.conf; external names go to the upstreams");
            String::new()
        });
        let servers = resolv_conf_servers(&text, &cfg.listen);
        if servers.is_empty() {
            None
        } else {
            Some(UpstreamSet::new(
                servers
                    .into_iter()
                    .map(with_source)
                    .collect::<Result<_, _>>()?,
            ))
        }
    } else {
        None
    };
    let fcfg = ForwarderConfig {
        proto: cfg.upstream_proto,
        timeout: cfg.upstream_timeout,
        attempts: cfg.upstream_attempts,
        max_concurrent: cfg.max_concurrent,
        cluster_domain: cfg.cluster_domain.clone(),
    };
    Ok(Forwarder::new(
        primary,
        external,
        fcfg,
        metrics.forward.clone(),
    ))
}

/// Runs the daemon until SIGTERM/SIGINT; Ok after a clean drain.
pub async fn run(cfg: Config) -> Result<(), ServerError> {
    let cache = Arc::new(Cache::new(cfg.cache.clone()));
    let first = cfg
        .listen
        .first()
        .copied()
        .map(server_label)
        .unwrap_or_default();
    let metrics = Metrics::new(cfg.stats_dir.clone(), cache.clone(), first)?;
    install_panic_counter(metrics.panics.clone());
    if let Some(node) = &cfg.node_setup {
        crate::setup::ensure_once(node, &metrics).await;
    }
    let forwarder = Arc::new(build_forwarder(&cfg, &metrics)?);
    let (refresh_tx, refresh_rx) = mpsc::channel(crate::pace::queue_len(cfg.prefetch_rate));
    let resolver = Arc::new(Resolver::new(
        cache.clone(),
        forwarder.clone(),
        metrics.coalesced.clone(),
        RefreshQueue {
            tx: refresh_tx,
            dropped: metrics.prefetch_dropped.clone(),
        },
    ));
    tokio::spawn(
        resolver
            .clone()
            .pace_refreshes(refresh_rx, cfg.prefetch_rate),
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut progress = Vec::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(JOB_QUEUE);

    let mut listeners = Vec::new();
    let mut threads = Vec::new();
    let mut tcp_listeners = Vec::new();
    let thread_cpus = udp_thread_cpus(cfg.threads);
    for (idx, addr) in cfg.listen.iter().copied().enumerate() {
        let udp_metrics = metrics.server(addr, Proto::Udp);
        for (t, &cpu) in thread_cpus.iter().enumerate() {
            let sock = sockets::bind_udp(addr, RECV_TIMEOUT, cpu)?;
            if t == 0 {
                let clone = sock.try_clone().map_err(|source| sockets::SocketError {
                    what: "udp clone",
                    addr,
                    source,
                })?;
                listeners.push(Listener {
                    addr,
                    reply: ReplyHandle::new(clone, addr),
                    udp_metrics: udp_metrics.clone(),
                });
            }
            let hot = HotPath {
                socket: sock,
                cache: cache.clone(),
                jobs: jobs_tx.clone(),
                metrics: udp_metrics.clone(),
                listener: idx,
                shutdown: shutdown.clone(),
                log_queries: cfg.log_queries,
                progress: Arc::new(ThreadProgress::default()),
                coalesce: cfg.udp_coalesce,
                slice: cfg.udp_slice,
                cpu,
                prefetch_dropped: metrics.prefetch_dropped.clone(),
            };
            progress.push(hot.progress.clone());
            let h = std::thread::Builder::new()
                .name(format!("udp-{addr}-{t}"))
                .spawn(move || hot.run())
                .map_err(ServerError::Thread)?;
            threads.push(h);
        }
        tcp_listeners.push((addr, sockets::bind_tcp(addr)?));
    }
    drop(jobs_tx);
    let listeners = Arc::new(listeners);
    tracing::info!(listen = ?cfg.listen, upstreams = ?cfg.upstreams, "listening");

    let conns = Arc::new(Semaphore::new(cfg.tcp_max_connections));
    for (addr, l) in tcp_listeners {
        let l = tokio::net::TcpListener::from_std(l).map_err(|source| sockets::SocketError {
            what: "tcp listener",
            addr,
            source,
        })?;
        let server = Arc::new(TcpServer {
            resolver: resolver.clone(),
            metrics: metrics.server(addr, Proto::Tcp),
            connections: conns.clone(),
            idle_timeout: cfg.tcp_idle_timeout,
            log_queries: cfg.log_queries,
        });
        tokio::spawn(server.serve(l, stop_rx.clone()));
    }
    tokio::spawn(dispatch_jobs(
        jobs_rx,
        resolver.clone(),
        listeners.clone(),
        cfg.log_queries,
    ));

    let health = Arc::new(Health {
        metrics: metrics.clone(),
        resolver: resolver.clone(),
        listening: AtomicBool::new(true),
    });
    start_http(&cfg, health.clone()).await?;
    start_background(&cfg, &forwarder, &metrics);
    if cfg.cache.prefetch_unasked > 0 {
        tokio::spawn(
            resolver
                .clone()
                .sweep_idle_entries(metrics.prefetch_unasked.clone()),
        );
    }
    let heartbeat = Arc::new(Heartbeat::default());
    start_heartbeat(heartbeat.clone());
    if let Some(timeout) = cfg.watchdog_timeout {
        watchdog::spawn(
            probe_targets(&cfg),
            timeout,
            heartbeat,
            progress,
            shutdown.clone(),
        );
    }

    wait_for_signal().await?;
    tracing::info!("shutting down: closing listeners");
    health.listening.store(false, Ordering::Relaxed);
    shutdown.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for l in listeners.iter() {
        l.reply.close();
    }
    let _ =
        tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    drain(&resolver, cfg.grace_period).await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Probes go to addresses kube-proxy does not DNAT for locally generated traffic: a probe
/// to the ClusterIP from the node itself would be answered by the cluster DNS, not us.
fn probe_targets(cfg: &Config) -> Vec<SocketAddr> {
    let local: Vec<SocketAddr> = cfg
        .listen
        .iter()
        .copied()
        .filter(|a| !cfg.cluster_dns.contains(&a.ip()))
        .collect();
    if local.is_empty() {
        cfg.listen.clone()
    } else {
        local
    }
}

async fn start_http(cfg: &Config, health: Arc<Health>) -> Result<(), ServerError> {
    let mut addrs = vec![cfg.metrics_listen];
    if cfg.health_listen != cfg.metrics_listen {
        addrs.push(cfg.health_listen);
    }
    for addr in addrs {
        let l = sockets::bind_tcp(addr).map_err(|e| ServerError::Http {
            addr,
            source: e.source,
        })?;
        let l = tokio::net::TcpListener::from_std(l)
            .map_err(|source| ServerError::Http { addr, source })?;
        let ep: Arc<dyn Endpoints> = health.clone();
        tokio::spawn(http::serve(l, ep));
    }
    Ok(())
}

fn start_background(cfg: &Config, forwarder: &Arc<Forwarder>, metrics: &Metrics) {
    let f = forwarder.clone();
    let every = cfg.health_check_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            f.health_check().await;
        }
    });
    if let Some(node) = cfg.node_setup.clone() {
        tokio::spawn(crate::setup::sync_loop(
            node,
            cfg.sync_interval,
            metrics.clone(),
        ));
    }
}

fn start_heartbeat(hb: Arc<Heartbeat>) {
    hb.beat();
    tokio::spawn(async move {
        loop {
            hb.beat();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// The CPU each UDP thread of a listener is pinned to (`None`: not pinned).
fn udp_thread_cpus(threads: UdpThreads) -> Vec<Option<usize>> {
    match threads {
        UdpThreads::Fixed(n) => vec![None; n],
        UdpThreads::PerCpu => match crate::sched::allowed_cpus() {
            Ok(cpus) if !cpus.is_empty() => {
                cpus.into_iter().take(MAX_UDP_THREADS).map(Some).collect()
            }
            other => {
                tracing::warn!(result = ?other, "no CPU list for --threads auto: one unpinned UDP thread");
                vec![None]
            }
        },
    }
}

/// Misses and prefetches from the UDP threads: one task each.
async fn dispatch_jobs(
    mut rx: mpsc::Receiver<Job>,
    resolver: Arc<Resolver>,
    listeners: Arc<Vec<Listener>>,
    log_queries: bool,
) {
    while let Some(job) = rx.recv().await {
        let job = match job {
            Job::Prefetch(packets) => {
                packets
                    .into_iter()
                    .for_each(|p| resolver.refresh_in_background(p));
                continue;
            }
            Job::Miss(miss) => miss,
        };
        let r = resolver.clone();
        let ls = listeners.clone();
        r.busy.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            answer_udp_miss(&r, &ls, job, log_queries).await;
            r.busy.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn answer_udp_miss(r: &Arc<Resolver>, ls: &[Listener], job: Miss, log_queries: bool) {
    let Some(l) = ls.get(job.listener) else {
        return;
    };
    let Some(reply) = r.resolve_miss(&job.packet, false, &l.udp_metrics).await else {
        return;
    };
    let qtype = crate::wire::parse_query(&job.packet)
        .map(|q| q.qtype)
        .unwrap_or(0);
    l.udp_metrics.response(
        crate::metrics::qtype_index(qtype),
        reply.plugin,
        reply.rcode,
        reply.bytes.len(),
        job.received.elapsed().as_secs_f64(),
    );
    if log_queries {
        tracing::info!(proto = "udp", client = %job.peer, server = %l.addr, qtype, rcode = reply.rcode, "query answered");
    }
    l.reply.send(&reply.bytes, job.peer);
}

async fn drain(resolver: &Resolver, grace: Duration) {
    let deadline = Instant::now() + grace;
    while resolver.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = resolver.busy.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!(left, "grace period over with queries in flight");
    }
}

async fn wait_for_signal() -> Result<(), ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn install_panic_counter(counter: prometheus::IntCounter) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counter.inc();
        previous(info);
    }));
}
