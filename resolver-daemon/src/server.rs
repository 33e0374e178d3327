//! Wiring: builds the cache, forwarder and metrics from a `Config`, binds the listeners,
//! starts the threads and tasks, and runs the shutdown sequence (listeners closed first,
//! in-flight queries drained within the grace period).

use crate::answer::{Accounting, Responder, answer_miss};
use crate::cache::Cache;
use crate::config::{Config, MAX_UDP_THREADS, UdpThreads};
use crate::http::{self, Endpoints};
use crate::metrics::{Metrics, Proto, server_label};
use crate::resolve::{RefreshQueue, Resolver};
use crate::sockets::{self, KernelRoutes};
use crate::tcp::TcpServer;
use crate::udp::{HotPath, Job, ReplyHandle, ThreadProgress};
use crate::upstream::{
    Forwarder, ForwarderConfig, UpstreamServer, UpstreamSet, resolv_conf_servers,
};
use crate::watchdog::{self, Heartbeat};
use socket2::Socket;
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

/// The tokio side's view of one UDP listener: where its misses' replies go, and their
/// accounting.
struct Listener {
    reply: ReplyHandle,
    responder: Responder,
    accounting: Accounting,
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
    /// Ready while listening and some upstream is healthy now (`Forwarder::ready`); liveness
    /// (`/health`) does not depend on upstreams.
    fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && self.resolver.upstream_ready()
    }
}

fn build_forwarder(cfg: &Config, metrics: &Metrics) -> Result<Forwarder, ServerError> {
    let with_source = |addr: SocketAddr| -> Result<UpstreamServer, ServerError> {
        let source =
            sockets::upstream_bind_source(addr, &cfg.listen, cfg.upstream_source, &KernelRoutes)
                .map_err(|source| ServerError::UpstreamSource {
                    upstream: addr,
                    source,
                })?;
        if let Some(src) = source {
            tracing::info!(upstream = %addr, %src, "upstream queries bind to the node address (not a listen address)");
        }
        Ok(UpstreamServer::new(addr, source))
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

/// The shared core every listener answers from.
struct Core {
    cache: Arc<Cache>,
    metrics: Metrics,
    forwarder: Arc<Forwarder>,
    resolver: Arc<Resolver>,
}

/// One listen address: its UDP sockets (one per thread, with the CPU the thread serves)
/// and its TCP listener.
struct Bound {
    addr: SocketAddr,
    udp: Vec<(Socket, Option<usize>)>,
    tcp: std::net::TcpListener,
}

/// The UDP receive threads and what the rest of the daemon needs of them.
struct UdpSide {
    listeners: Arc<Vec<Listener>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    progress: Vec<Arc<ThreadProgress>>,
    /// Tells the threads to stop.
    shutdown: Arc<AtomicBool>,
    jobs: mpsc::Receiver<Job>,
}

/// Runs the daemon until SIGTERM/SIGINT; Ok after a clean drain.
pub async fn run(cfg: Config) -> Result<(), ServerError> {
    let core = build_core(&cfg).await?;
    let bound = bind_listeners(&cfg)?;
    let (udp, tcp) = start_udp_threads(&cfg, &core, bound)?;
    tracing::info!(listen = ?cfg.listen, upstreams = ?cfg.upstreams, "listening");
    let stop_tcp = start_tokio_side(&cfg, &core, tcp, udp.jobs, udp.listeners.clone())?;
    let health = start_services(&cfg, &core, udp.progress, udp.shutdown.clone()).await?;
    wait_for_signal().await?;
    let stopping = Stopping {
        health,
        shutdown: udp.shutdown,
        stop_tcp,
        listeners: udp.listeners,
        threads: udp.threads,
    };
    shut_down(stopping, &core.resolver, cfg.grace_period).await;
    Ok(())
}

/// Metrics, node setup (the addresses must exist before binding), cache, forwarder and the
/// resolver with its refresh pacer.
async fn build_core(cfg: &Config) -> Result<Core, ServerError> {
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
    let forwarder = Arc::new(build_forwarder(cfg, &metrics)?);
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
    Ok(Core {
        cache,
        metrics,
        forwarder,
        resolver,
    })
}

/// Binds every listen address: UDP sockets for the receive threads, one TCP listener.
fn bind_listeners(cfg: &Config) -> Result<Vec<Bound>, ServerError> {
    let thread_cpus = udp_thread_cpus(cfg.threads);
    let mut bound = Vec::new();
    for addr in cfg.listen.iter().copied() {
        let udp = thread_cpus
            .iter()
            .map(|&cpu| Ok((sockets::bind_udp(addr, RECV_TIMEOUT, cpu)?, cpu)))
            .collect::<Result<_, ServerError>>()?;
        let tcp = sockets::bind_tcp(addr)?;
        bound.push(Bound { addr, udp, tcp });
    }
    Ok(bound)
}

/// Starts one receive thread per UDP socket; returns the UDP side and the TCP listeners.
fn start_udp_threads(
    cfg: &Config,
    core: &Core,
    bound: Vec<Bound>,
) -> Result<(UdpSide, Vec<(SocketAddr, std::net::TcpListener)>), ServerError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let (jobs_tx, jobs) = mpsc::channel::<Job>(JOB_QUEUE);
    let mut listeners = Vec::new();
    let mut threads = Vec::new();
    let mut progress = Vec::new();
    let mut tcp = Vec::new();
    for (idx, b) in bound.into_iter().enumerate() {
        let addr = b.addr;
        let accounting = Accounting::new(
            core.metrics.server(addr, Proto::Udp),
            cfg.log_queries,
            addr,
            Proto::Udp,
        );
        for (t, (socket, cpu)) in b.udp.into_iter().enumerate() {
            if t == 0 {
                let clone = socket.try_clone().map_err(|source| sockets::SocketError {
                    what: "udp clone",
                    addr,
                    source,
                })?;
                let reply = ReplyHandle::new(clone, addr);
                listeners.push(Listener {
                    responder: Responder::Udp(reply.clone()),
                    reply,
                    accounting: accounting.clone(),
                });
            }
            let hot = HotPath {
                socket,
                cache: core.cache.clone(),
                jobs: jobs_tx.clone(),
                accounting: accounting.clone(),
                listener: idx,
                shutdown: shutdown.clone(),
                progress: Arc::new(ThreadProgress::default()),
                coalesce: cfg.udp_coalesce,
                slice: cfg.udp_slice,
                cpu,
                prefetch_dropped: core.metrics.prefetch_dropped.clone(),
            };
            progress.push(hot.progress.clone());
            let h = std::thread::Builder::new()
                .name(format!("udp-{addr}-{t}"))
                .spawn(move || hot.run())
                .map_err(ServerError::Thread)?;
            threads.push(h);
        }
        tcp.push((addr, b.tcp));
    }
    let udp = UdpSide {
        listeners: Arc::new(listeners),
        threads,
        progress,
        shutdown,
        jobs,
    };
    Ok((udp, tcp))
}

/// TCP servers and the task answering the UDP threads' misses; returns the TCP stop signal.
fn start_tokio_side(
    cfg: &Config,
    core: &Core,
    tcp: Vec<(SocketAddr, std::net::TcpListener)>,
    jobs: mpsc::Receiver<Job>,
    listeners: Arc<Vec<Listener>>,
) -> Result<watch::Sender<bool>, ServerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let conns = Arc::new(Semaphore::new(cfg.tcp_max_connections));
    for (addr, l) in tcp {
        let l = tokio::net::TcpListener::from_std(l).map_err(|source| sockets::SocketError {
            what: "tcp listener",
            addr,
            source,
        })?;
        let server = Arc::new(TcpServer {
            resolver: core.resolver.clone(),
            accounting: Accounting::new(
                core.metrics.server(addr, Proto::Tcp),
                cfg.log_queries,
                addr,
                Proto::Tcp,
            ),
            connections: conns.clone(),
            idle_timeout: cfg.tcp_idle_timeout,
        });
        tokio::spawn(server.serve(l, stop_rx.clone()));
    }
    tokio::spawn(dispatch_jobs(jobs, core.resolver.clone(), listeners));
    Ok(stop_tx)
}

/// HTTP endpoints, upstream health checks, node setup sync, idle sweep, heartbeat and the
/// watchdog; returns the readiness state the shutdown flips.
async fn start_services(
    cfg: &Config,
    core: &Core,
    progress: Vec<Arc<ThreadProgress>>,
    shutdown: Arc<AtomicBool>,
) -> Result<Arc<Health>, ServerError> {
    let health = Arc::new(Health {
        metrics: core.metrics.clone(),
        resolver: core.resolver.clone(),
        listening: AtomicBool::new(true),
    });
    start_http(cfg, health.clone()).await?;
    start_background(cfg, &core.forwarder, &core.metrics);
    if cfg.cache.prefetch_unasked > 0 {
        tokio::spawn(
            core.resolver
                .clone()
                .sweep_idle_entries(core.metrics.prefetch_unasked.clone()),
        );
    }
    let heartbeat = Arc::new(Heartbeat::default());
    start_heartbeat(heartbeat.clone());
    if let Some(timeout) = cfg.watchdog_timeout {
        watchdog::spawn(probe_targets(cfg), timeout, heartbeat, progress, shutdown);
    }
    Ok(health)
}

/// What the shutdown sequence stops.
struct Stopping {
    health: Arc<Health>,
    shutdown: Arc<AtomicBool>,
    stop_tcp: watch::Sender<bool>,
    listeners: Arc<Vec<Listener>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Listeners first (not ready, sockets closed: clients fall back to kube-proxy's path),
/// then the queries in flight get the grace period.
async fn shut_down(s: Stopping, resolver: &Resolver, grace: Duration) {
    tracing::info!("shutting down: closing listeners");
    s.health.listening.store(false, Ordering::Relaxed);
    s.shutdown.store(true, Ordering::Relaxed);
    let _ = s.stop_tcp.send(true);
    for l in s.listeners.iter() {
        l.reply.close();
    }
    let threads = s.threads;
    let _ =
        tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    drain(resolver, grace).await;
    tracing::info!("shutdown complete");
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
) {
    while let Some(job) = rx.recv().await {
        let miss = match job {
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
        let busy = r.in_flight();
        tokio::spawn(async move {
            if let Some(l) = ls.get(miss.listener) {
                answer_miss(&r, miss.request, &l.accounting, &l.responder).await;
            }
            drop(busy);
        });
    }
}

async fn drain(resolver: &Resolver, grace: Duration) {
    let deadline = Instant::now() + grace;
    while resolver.queries_in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = resolver.queries_in_flight();
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
