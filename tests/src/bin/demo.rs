//! `node-local-dns-demo`: builds the simulated node (kube-proxy rules, two cluster DNS pods,
//! a podman pod with the conflist node-local-dns-install produced, the daemon as its
//! DaemonSet runs it) and narrates what happens to the pod's DNS: served locally, the daemon
//! killed and DNS still working through kube-proxy, the daemon back.
//!
//! Ctrl-C and SIGTERM clean up as a finished run does. The process started from the shell
//! only supervises: it runs the demo as a child in a process group of its own, so the
//! terminal's SIGINT reaches neither the demo's knotd, containerd, podman and mount-namespace
//! holder (which would die half-way, leaving containers that can no longer be removed) nor
//! the demo itself, and forwards SIGINT/SIGTERM to the child as SIGTERM. The child stops at
//! the next step and drops the simulated node, which removes everything it started.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, Signal};
use simnode::dns::{LoadSpec, PortMode, TYPE_A, query_udp, spawn_load};
use simnode::netns::in_netns;
use simnode::{Backend, KubeProxyMode, Pod, Runtime, SimNode, SimOptions};

const NAME: &str = "web.default.svc.cluster.local";

/// Set in the supervised child's environment; its presence makes the process the demo itself.
const CHILD_ENV: &str = "NODE_LOCAL_DNS_DEMO_CHILD";

/// Set once SIGINT or SIGTERM arrived; every step checks it before it starts.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Returned by [`step`] after a signal, so `run` unwinds and drops the simulated node.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

fn main() -> ExitCode {
    if std::env::var_os(CHILD_ENV).is_some() {
        demo_child()
    } else {
        supervise()
    }
}

/// SIGINT and SIGTERM, blocked in the calling thread (and the threads it starts later) so
/// that only a thread calling `wait` on this set receives them.
fn block_stop_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    Ok(set)
}

/// Runs the demo as a child in its own process group and forwards SIGINT/SIGTERM to it.
/// std's `Command` resets the signal mask in the child, so blocking here does not leak.
fn supervise() -> ExitCode {
    let started = block_stop_signals().and_then(|set| {
        let exe = std::env::current_exe().context("locating the demo binary")?;
        let child = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the demo")?;
        Ok((set, child))
    });
    let (set, mut child) = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        while set.wait().is_ok() {
            // The child is ours and still unreaped (main waits for it), so the PID is its.
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        }
    });
    match child.wait() {
        Ok(status) => status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .map_or(ExitCode::FAILURE, ExitCode::from),
        Err(e) => {
            eprintln!("error: waiting for the demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo itself: a signal sets [`INTERRUPTED`]; `run` returns at its next step and the
/// simulated node is dropped (namespaces, knotd, containers, containerd, mounts) before
/// this function reports.
fn demo_child() -> ExitCode {
    match block_stop_signals() {
        Ok(set) => {
            std::thread::spawn(move || {
                if set.wait().is_ok() {
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    println!(
                        "\n==> Interrupted: stopping after the current step and removing everything the demo started."
                    );
                }
            });
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => {
            println!(
                "\n==> Cleaned up: every namespace, process and mount the demo started is gone."
            );
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let (mode, runtime) = parse_args()?;
    step(&format!(
        "Building a simulated node: network namespaces, kube-proxy ({}) DNAT for kube-dns 10.96.0.10, two knotd cluster DNS pods, {}.",
        mode.name(),
        runtime.name()
    ))?;
    let mut opts = SimOptions::new(mode);
    opts.runtime = runtime;
    let mut sim = SimNode::new(opts).context("building the simulated node")?;
    let conflist = sim.conflist()?;
    let chain: Vec<&str> = conflist["plugins"]
        .as_array()
        .map(|p| p.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    step(&format!(
        "node-local-dns-install chained the plugin into the bridge conflist: {}",
        chain.join(" → ")
    ))?;
    let dopts = sim.daemon_options();
    sim.start_daemon(dopts)
        .context("starting node-local-dns-resolver")?;
    step(
        "The resolver daemon runs with hostNetwork, bound to 10.96.0.10:53 and 169.254.20.10:53.",
    )?;
    let pod = sim.run_pod("default").context("starting a pod")?;
    step(&format!(
        "Pod {} started by {}, resolv.conf as the kubelet writes it:",
        pod.id,
        runtime.name()
    ))?;
    for line in pod.resolv_conf()?.lines() {
        println!("      {line}");
    }
    sim.node.count_name(NAME)?;

    served_locally(&mut sim, &pod)?;
    killed_falls_back(&mut sim, &pod)?;
    back_again(&mut sim, &pod)?;
    step("Done: cleaning up every namespace and process the demo started.")?;
    Ok(())
}

fn parse_args() -> Result<(KubeProxyMode, Runtime)> {
    let mut nftables = false;
    let mut backend = None;
    let mut runtime = Runtime::Podman;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--legacy" => backend = Some(Backend::Legacy),
            "--nft" => backend = Some(Backend::Nft),
            "--kube-proxy" => {
                nftables = match args.next().as_deref() {
                    Some("iptables") => false,
                    Some("nftables") => true,
                    other => bail!(
                        "--kube-proxy {}: use iptables or nftables",
                        other.unwrap_or("(missing value)")
                    ),
                }
            }
            "--containerd" => runtime = Runtime::Containerd,
            "--podman" => runtime = Runtime::Podman,
            other => {
                bail!(
                    "unknown argument {other}; use --kube-proxy iptables|nftables, --legacy|--nft and --podman|--containerd"
                )
            }
        }
    }
    let mode = match (nftables, backend) {
        (true, Some(b)) => bail!(
            "--{}: kube-proxy in nftables mode writes no iptables rules; drop it or use --kube-proxy iptables",
            b.name()
        ),
        (true, None) => KubeProxyMode::Nftables,
        (false, Some(Backend::Legacy)) => KubeProxyMode::IptablesLegacy,
        (false, _) => KubeProxyMode::IptablesNft,
    };
    Ok((mode, runtime))
}

/// Prints the next step's headline, or stops the demo when a signal arrived.
fn step(text: &str) -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    println!("\n==> {text}");
    Ok(())
}

fn cluster_dns() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10], 53))
}

/// Round-trip times (µs) of `n` queries from the pod to the ClusterIP.
fn latencies(pod: &Pod, n: usize) -> Result<Vec<u128>> {
    let times = in_netns(&pod.netns(), move || {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                query_udp(cluster_dns(), NAME, TYPE_A, Duration::from_secs(2))
                    .map(|_| t.elapsed().as_micros())
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    times.map_err(|e| anyhow::anyhow!("query failed: {e:?}"))
}

/// Median round-trip times (µs) of five names asked for the first time, then again.
fn miss_then_hit(pod: &Pod) -> Result<(u128, u128)> {
    const NAMES: [&str; 5] = [
        "db.prod.svc.cluster.local",
        "api.prod.svc.cluster.local",
        "metrics.monitoring.svc.cluster.local",
        "www.example.org",
        "api.example.com",
    ];
    let rounds = in_netns(&pod.netns(), || {
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let mut times = Vec::new();
            for name in NAMES {
                let t = Instant::now();
                query_udp(cluster_dns(), name, TYPE_A, Duration::from_secs(2))?;
                times.push(t.elapsed().as_micros());
            }
            rounds.push(median(times));
        }
        Ok::<_, simnode::dns::QueryError>(rounds)
    })?
    .map_err(|e| anyhow::anyhow!("query failed: {e:?}"))?;
    Ok((rounds[0], rounds[1]))
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn served_locally(sim: &mut SimNode, pod: &Pod) -> Result<()> {
    step("1. The pod looks up `web` (glibc, search path, ndots:5):")?;
    let out = pod.exec_host_tool(&["getent", "ahostsv4", "web"])?;
    println!("      {}", out.lines().next().unwrap_or(""));
    let (miss, hit) = miss_then_hit(pod)?;
    println!("      5 new names: median {miss} µs (misses, forwarded to cluster DNS)");
    println!("      the same 5 again: median {hit} µs (cache hits)");
    let before = sim.daemon()?.metrics()?;
    let upstream_before = sim.node.upstream_queries_for(NAME)?;
    let hits = latencies(pod, 200)?;
    let after = sim.daemon()?.metrics()?;
    let upstream_after = sim.node.upstream_queries_for(NAME)?;
    println!(
        "      200 more lookups from the pod: median {} µs (cache hits)",
        median(hits)
    );
    println!(
        "      coredns_cache_hits_total +{}, coredns_cache_misses_total +{}, queries that reached the cluster DNS pods: {}",
        after.sum("coredns_cache_hits_total", &[]) - before.sum("coredns_cache_hits_total", &[]),
        after.sum("coredns_cache_misses_total", &[])
            - before.sum("coredns_cache_misses_total", &[]),
        upstream_after - upstream_before
    );
    Ok(())
}

fn load() -> LoadSpec {
    LoadSpec {
        server: cluster_dns(),
        name: NAME.into(),
        expect: "10.100.0.1"
            .parse()
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
        rate: 500,
        duration: Duration::from_secs(3),
        timeout: Duration::from_secs(1),
        workers: 4,
        ports: PortMode::Fresh,
    }
}

fn killed_falls_back(sim: &mut SimNode, pod: &Pod) -> Result<()> {
    step("2. kill -9 the daemon while the pod sends 500 queries/s:")?;
    let upstream_before = sim.node.upstream_queries_for(NAME)?;
    let run = spawn_load(pod.netns(), load());
    std::thread::sleep(Duration::from_secs(1));
    sim.daemon()?.kill9();
    let report = run
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let via_dnat = sim.node.upstream_queries_for(NAME)? - upstream_before;
    println!(
        "      sent {}, answered {}, lost {} (timeouts {}, refused {}); {} answers came from the cluster DNS pods through kube-proxy's DNAT",
        report.sent,
        report.answered,
        report.failed(),
        report.timeouts,
        report.refused,
        via_dnat
    );
    let slow = latencies(pod, 100)?;
    println!(
        "      lookups now take {} µs (median) through kube-proxy to cluster DNS",
        median(slow)
    );
    println!(
        "      (here the cluster DNS pods share the machine, so that path is short too; on a cluster it"
    );
    println!("      crosses conntrack, DNAT and usually the network to another node)");
    Ok(())
}

fn back_again(sim: &mut SimNode, pod: &Pod) -> Result<()> {
    step("3. The daemon comes back (as the DaemonSet restarts it):")?;
    let dopts = sim.daemon_options();
    sim.start_daemon(dopts)?;
    latencies(pod, 1)?;
    let upstream_before = sim.node.upstream_queries_for(NAME)?;
    let fast = latencies(pod, 200)?;
    let upstream_after = sim.node.upstream_queries_for(NAME)?;
    let m = sim.daemon()?.metrics()?;
    println!(
        "      200 lookups: median {} µs, {} reached the cluster DNS pods; the new daemon counts {} cache hits",
        median(fast),
        upstream_after - upstream_before,
        m.sum("coredns_cache_hits_total", &[])
    );
    Ok(())
}
