//! Migration from the NodeLocal DNSCache addon on the simulated node, once per iptables
//! backend: the addon's state in place (its interface, its real rules, a stand-in for its
//! CoreDNS on 169.254.20.10:53 and ClusterIP:53) answering pod DNS → under ≥ 500 q/s from a
//! pod, install ours (installer --once, then our daemon) → the addon goes away → every lost
//! query is counted and reported; then our own kill -9 fallback and restart still work.
//! docs/addon-migration.md reports the numbers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use simnode::addon::Addon;
use simnode::dns::{LoadReport, LoadSpec, PortMode, TYPE_A, query_udp, spawn_load};
use simnode::netns::in_netns;
use simnode::{Backend, KubeProxyMode, Pod, SimNode, SimOptions};

/// The load runs need the two cores to themselves to keep ≥ 500 q/s.
static HEAVY: Mutex<()> = Mutex::new(());

const DB: &str = "db.prod.svc.cluster.local";
const DB_IP: &str = "10.100.0.2";
const RATE: u32 = 500;
const LOAD_SECS: u64 = 6;

/// How long after the addon's exit a query may be sent and still be one it had taken.
const EXIT_SLACK: Duration = Duration::from_millis(50);

/// The earliest send time of a query still waiting in a listener's queue at `kill`: one
/// query timeout before it (an older one has timed out already; a loaded machine can leave
/// another process's queue unread for a while).
fn queued_at(kill: Duration) -> Duration {
    kill.saturating_sub(load(LOAD_SECS).timeout)
}

/// How the addon leaves the node.
#[derive(Debug, Clone, Copy)]
enum AddonExit {
    /// `-skipteardown` (or a crash, an OOM kill): the listener dies, every rule stays,
    /// among them the NOTRACK that would blackhole pod DNS once nobody listens.
    ListenerDiesRulesStay,
    /// Its default SIGTERM path: it deletes its rules and its interface, and with that
    /// interface the addresses our daemon listens on.
    Teardown,
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cluster_dns() -> SocketAddr {
    SocketAddr::new(ip(simnode::node::CLUSTER_IP), 53)
}

fn load(secs: u64) -> LoadSpec {
    LoadSpec {
        server: cluster_dns(),
        name: DB.to_string(),
        expect: ip(DB_IP),
        rate: RATE,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(1),
        workers: 4,
        ports: PortMode::Fresh,
    }
}

fn describe(r: &LoadReport) -> String {
    format!(
        "sent {} at {:.0} q/s, answered {}, timeouts {}, refused {}, wrong {}; first failures {:?}",
        r.sent,
        r.rate(),
        r.answered,
        r.timeouts,
        r.refused,
        r.wrong,
        r.failures.iter().take(5).collect::<Vec<_>>()
    )
}

fn query_db(pod: &Pod) -> Result<IpAddr, String> {
    let server = cluster_dns();
    let answer = in_netns(&pod.netns(), move || {
        query_udp(server, DB, TYPE_A, Duration::from_secs(2))
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{e:?}"))?;
    answer
        .addrs
        .first()
        .copied()
        .ok_or_else(|| format!("no address in {answer:?}"))
}

/// (a) A node where only the addon runs: pod DNS is answered by the addon's listener, never
/// by the cluster DNS pods behind kube-proxy.
fn node_with_addon(backend: Backend) -> (SimNode, Addon, Pod) {
    // The addon only speaks iptables: kube-proxy in iptables mode through the same backend.
    let mut opts = SimOptions::new(KubeProxyMode::iptables(backend));
    opts.install = false;
    let mut sim = SimNode::new(opts).expect("simulated node");
    let addon_dir = sim.node.dir.path().join("addon");
    let addon = Addon::start(&sim.node.ns, backend, addon_dir).expect("the addon's state");
    let pod = sim.run_pod("default").expect("pod starts");
    sim.node.count_name(DB).unwrap();
    assert_eq!(query_db(&pod), Ok(ip(DB_IP)));
    assert_eq!(
        sim.node.upstream_queries_for(DB).unwrap(),
        0,
        "the addon's listener answered, not cluster DNS"
    );
    (sim, addon, pod)
}

/// What the migration run saw, times since the load started.
struct Migration {
    report: LoadReport,
    /// From the signal to the addon until it was gone (listener killed, teardown done).
    addon_exit: std::ops::Range<Duration>,
    /// When our addresses were back on the interface after the addon's teardown.
    restored_at: Option<Duration>,
}

/// Waits until the node's interface holds the ClusterIP and the link-local address again.
fn wait_addresses_back(sim: &SimNode) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted = [
        format!("{}/32", simnode::node::CLUSTER_IP),
        format!("{}/32", simnode::node::LOCAL_IP),
    ];
    loop {
        let addrs = sim.nodelocaldns_addrs();
        if wanted.iter().all(|w| addrs.contains(w)) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "our daemon never restored the addresses the addon's teardown took: {addrs:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (b) + (c): ours installed under load, then the addon goes.
fn install_ours_then_remove_addon(
    sim: &mut SimNode,
    addon: &mut Addon,
    pod: &Pod,
    exit: AddonExit,
) -> Migration {
    let started = Instant::now();
    let run = spawn_load(pod.netns(), load(LOAD_SECS));
    std::thread::sleep(Duration::from_millis(1000));
    simnode::install::install(&sim.fs, &sim.cluster_dns(), &[]).expect("installer --once");
    let opts = sim.daemon_options();
    sim.start_daemon(opts)
        .expect("our daemon starts beside the addon");
    std::thread::sleep(Duration::from_millis(1500));
    let exit_sent_at = started.elapsed();
    match exit {
        AddonExit::ListenerDiesRulesStay => addon.kill_listener(),
        AddonExit::Teardown => addon.terminate_with_teardown().expect("addon teardown"),
    }
    let exited_at = started.elapsed();
    let restored_at = match exit {
        AddonExit::ListenerDiesRulesStay => None,
        AddonExit::Teardown => Some(wait_addresses_back(sim) - started),
    };
    let report = run.join().unwrap().expect("load ran");
    Migration {
        report,
        addon_exit: exit_sent_at..exited_at,
        restored_at,
    }
}

/// (d) Our kill -9 fallback: with the addon's leftovers on the node, queries after the kill
/// are answered through kube-proxy's DNAT; a restart takes DNS back.
fn our_fallback_and_restart_work(sim: &mut SimNode, pod: &Pod, backend: Backend) {
    sim.daemon().unwrap().kill9();
    let before = sim.node.upstream_queries_for(DB).unwrap();
    let report = spawn_load(pod.netns(), load(2))
        .join()
        .unwrap()
        .expect("load ran");
    let via_dnat = sim.node.upstream_queries_for(DB).unwrap() - before;
    eprintln!(
        "[{}] after the migration, our daemon killed -9: {}; {via_dnat} reached cluster DNS",
        backend.name(),
        describe(&report)
    );
    assert_eq!(report.failed(), 0, "{}", describe(&report));
    assert!(
        via_dnat >= report.answered,
        "answered through kube-proxy's DNAT: {via_dnat} of {}",
        report.answered
    );

    let opts = sim.daemon_options();
    sim.start_daemon(opts).expect("our daemon restarts");
    let served = |sim: &mut SimNode| {
        let m = sim.daemon().unwrap().metrics().unwrap();
        m.sum("coredns_dns_requests_total", &[])
    };
    let before = served(sim);
    assert_eq!(query_db(pod), Ok(ip(DB_IP)));
    assert!(
        served(sim) > before,
        "the restarted daemon answers pod DNS again"
    );
}

fn migration(backend: Backend, exit: AddonExit) {
    let _g = lock();
    let (mut sim, mut addon, pod) = node_with_addon(backend);
    let Migration {
        report,
        addon_exit: exit_window,
        restored_at,
    } = install_ours_then_remove_addon(&mut sim, &mut addon, &pod, exit);
    let outage = restored_at.map(|r| r.saturating_sub(exit_window.end));
    eprintln!(
        "[{}] migration ({exit:?}): addon exit took {:?}, addresses gone for {outage:?}; {}",
        backend.name(),
        exit_window.end - exit_window.start,
        describe(&report)
    );
    assert!(
        report.sent >= u64::from(RATE) * LOAD_SECS,
        "load kept ≥ {RATE} q/s: {}",
        describe(&report)
    );
    assert_eq!(report.wrong, 0, "{}", describe(&report));

    match exit {
        AddonExit::ListenerDiesRulesStay => {
            // The addon's listener may take the queries in its sockets' queues with it: at
            // most one per load worker (each has one query outstanding), sent less than a
            // query timeout before the kill, plus any sent while it was dying. Nothing else
            // is lost: not at our install, not after its exit (its blackhole rule is gone).
            let dying = exit_window.end - exit_window.start;
            let in_flight = u64::from(load(LOAD_SECS).workers);
            let may_lose = in_flight + (dying.as_secs_f64() * report.rate()).ceil() as u64;
            assert!(
                report.failed() <= may_lose,
                "at most {may_lose} queries lost: {}",
                describe(&report)
            );
            let window = queued_at(exit_window.start)..exit_window.end + EXIT_SLACK;
            assert!(
                report.failures.iter().all(|f| window.contains(&f.at)),
                "queries were lost only when the addon's listener died ({window:?}): {}",
                describe(&report)
            );
            let raw = addon.rules_left("raw").unwrap();
            assert_eq!(raw.len(), 12, "the addon's harmless rules stay: {raw:#?}");
            let log = sim.daemons[0].log_text();
            assert!(
                log.contains("deleted the NodeLocal DNSCache addon's NOTRACK rules"),
                "our daemon says what it removed:\n{log}"
            );
            assert!(
                !raw.iter()
                    .any(|r| r.contains("-d 10.96.0.10/32") && r.contains("--dport 53 ")),
                "its NOTRACKs for DNS to the ClusterIP are gone: {raw:#?}"
            );
        }
        AddonExit::Teardown => {
            // Its teardown takes the shared interface, and our addresses with it, until our
            // daemon's next sync puts them back: queries sent in between are lost (each load
            // worker waits out its timeout, so the count understates the outage; the outage
            // is reported above). None is lost outside it.
            let restored = restored_at.unwrap_or_default();
            let window = queued_at(exit_window.start)..restored + EXIT_SLACK;
            assert!(
                report.failures.iter().all(|f| window.contains(&f.at)),
                "queries were lost only until our daemon restored the addresses ({window:?}): {}",
                describe(&report)
            );
            assert!(addon.rules_left("raw").unwrap().is_empty());
        }
    }
    our_fallback_and_restart_work(&mut sim, &pod, backend);
}

/// The control: without us, the addon's leftovers (`-skipteardown`, a crash) blackhole pod
/// DNS: its NOTRACK keeps kube-proxy's DNAT away and nobody listens on the ClusterIP.
fn addon_leftovers_blackhole_pod_dns_without_us(backend: Backend) {
    let _g = lock();
    let (sim, mut addon, pod) = node_with_addon(backend);
    addon.kill_listener();
    let result = query_db(&pod);
    eprintln!(
        "[{}] the addon's listener dead, its rules left, no cache of ours: {result:?}",
        backend.name()
    );
    assert!(result.is_err(), "pod DNS is blackholed: {result:?}");
    assert_eq!(sim.node.upstream_queries_for(DB).unwrap(), 0);
}

/// Outcomes of one query per name from the pod (fresh names: cache misses), by rcode/error.
fn misses(pod: &Pod, tag: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..n {
        let name = format!("{tag}{i}.default.svc.cluster.local");
        let server = cluster_dns();
        let result = in_netns(&pod.netns(), move || {
            query_udp(server, &name, TYPE_A, Duration::from_secs(1))
        })
        .expect("enter pod netns");
        let key = match result {
            Ok(a) => format!("rcode {}", a.rcode),
            Err(e) => format!("{e:?}"),
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    outcomes
}

/// While both run, the addon's sync loop puts its rules back every `-syncinterval`; its raw
/// OUTPUT NOTRACK then loops our daemon's upstream queries back into the node, so our cache
/// misses fail until our next ensure (our sync, or any pod ADD) removes it again. Measured,
/// then repaired by a pod ADD: misses are answered again.
fn addon_rules_put_back_while_both_run(backend: Backend) {
    let _g = lock();
    let (mut sim, addon, pod) = node_with_addon(backend);
    simnode::install::install(&sim.fs, &sim.cluster_dns(), &[]).expect("installer --once");
    let mut opts = sim.daemon_options();
    // Only the pod ADD below repairs: the window stays open while it is measured.
    opts.sync_interval_secs = 3600;
    sim.start_daemon(opts)
        .expect("our daemon starts beside the addon");
    simnode::iptables::restore(&sim.node.ns, backend, false, simnode::addon::RULES).unwrap();
    let during = misses(&pod, "during", 10);
    let _second = sim.run_pod("prod").expect("a pod ADD runs our plugin");
    let left = addon.rules_left("raw").unwrap();
    let after = misses(&pod, "after", 10);
    eprintln!(
        "[{}] 10 misses with the addon's rules put back: {during:?}; after a pod ADD: {after:?}",
        backend.name()
    );
    assert!(
        !left
            .iter()
            .any(|r| r.contains("-d 10.96.0.10/32") && r.contains("--dport 53 ")),
        "the pod ADD removed the addon's NOTRACKs again: {left:#?}"
    );
    assert_eq!(
        after.get("rcode 3"),
        Some(&10),
        "every miss answered (NXDOMAIN): {after:?}"
    );
}

macro_rules! both_backends {
    ($($name:ident => $body:expr;)*) => {
        mod legacy {
            use super::*;
            $(#[test] fn $name() { let f: fn(Backend) = $body; f(Backend::Legacy) })*
        }
        mod nft {
            use super::*;
            $(#[test] fn $name() { let f: fn(Backend) = $body; f(Backend::Nft) })*
        }
    };
}

both_backends! {
    control_addon_leftovers_blackhole_pod_dns => addon_leftovers_blackhole_pod_dns_without_us;
    addon_rules_put_back_by_its_sync => addon_rules_put_back_while_both_run;
    addon_listener_dies_rules_stay => |b| migration(b, AddonExit::ListenerDiesRulesStay);
    addon_tears_down => |b| migration(b, AddonExit::Teardown);
}
