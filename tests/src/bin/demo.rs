//! `node-local-dns-demo`: builds the simulated node (kube-proxy rules, two cluster DNS pods,
//! a podman pod with the conflist node-local-dns-install produced, the daemon as its
//! DaemonSet runs it) and narrates what happens to the pod's DNS: served locally, the daemon
//! killed and DNS still working through kube-proxy, the daemon back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use simnode::dns::{LoadSpec, PortMode, TYPE_A, query_udp, spawn_load};
use simnode::netns::in_netns;
use simnode::{Backend, KubeProxyMode, Pod, Runtime, SimNode, SimOptions};

const NAME: &str = "web.default.svc.cluster.local";

fn main() -> Result<()> {
    let (mode, runtime) = parse_args()?;
    say(&format!(
        "Building a simulated node: network namespaces, kube-proxy ({}) DNAT for kube-dns 10.96.0.10, two knotd cluster DNS pods, {}.",
        mode.name(),
        runtime.name()
    ));
    let mut opts = SimOptions::new(mode);
    opts.runtime = runtime;
    let mut sim = SimNode::new(opts).context("building the simulated node")?;
    let conflist = sim.conflist()?;
    let chain: Vec<&str> = conflist["plugins"]
        .as_array()
        .map(|p| p.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    say(&format!(
        "node-local-dns-install chained the plugin into the bridge conflist: {}",
        chain.join(" → ")
    ));
    let dopts = sim.daemon_options();
    sim.start_daemon(dopts)
        .context("starting node-local-dns-resolver")?;
    say("The resolver daemon runs with hostNetwork, bound to 10.96.0.10:53 and 169.254.20.10:53.");
    let pod = sim.run_pod("default").context("starting a pod")?;
    say(&format!(
        "Pod {} started by {}, resolv.conf as the kubelet writes it:",
        pod.id,
        runtime.name()
    ));
    for line in pod.resolv_conf()?.lines() {
        println!("      {line}");
    }
    sim.node.count_name(NAME)?;

    served_locally(&mut sim, &pod)?;
    killed_falls_back(&mut sim, &pod)?;
    back_again(&mut sim, &pod)?;
    say("Done: cleaning up every namespace and process the demo started.");
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

fn say(text: &str) {
    println!("\n==> {text}");
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
    say("1. The pod looks up `web` (glibc, search path, ndots:5):");
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
    say("2. kill -9 the daemon while the pod sends 500 queries/s:");
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
    say("3. The daemon comes back (as the DaemonSet restarts it):");
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
