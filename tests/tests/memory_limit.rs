//! Memory fits the DaemonSet's limit: the resolver, given no `--cache-max-bytes`, takes its
//! cache budget from its cgroup's memory limit. Inside a 128 MiB cgroup (no swap) it is filled
//! with ~1 KiB answers (knotd, a wildcard TXT zone) well past that budget: no OOM kill, RSS
//! under the limit, and the cache evicts instead of growing.
//!
//! Runs as root in a network namespace of its own (knotd and the resolver on its loopback).

use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use simnode::bin_path;
use simnode::cmd::KillOnDrop;
use simnode::dns::query_udp;
use simnode::memcg::{MemCgroup, rss_bytes};
use simnode::metrics::{http_get, scrape};
use simnode::netns::{Netns, in_netns, unique_name};

/// The resolver container's limit in install/daemonset.yaml.
const LIMIT: u64 = 128 << 20;
const UPSTREAM: &str = "127.0.0.53";
const LISTEN: &str = "127.0.0.54";
/// Unique names queried: each answer's cache entry takes ~1.2 KiB, so this is about twice
/// what the budget from a 128 MiB limit holds (and below the entry capacity, so bytes, not
/// the entry count, are what evicts).
const NAMES: usize = 100_000;

/// ~1 KiB of TXT data (four 250-byte strings) for every name under big.test.
fn zone() -> String {
    let chunk = "x".repeat(250);
    format!(
        "$ORIGIN big.test.\n$TTL 300\n@ SOA ns hostmaster 1 7200 1800 86400 300\n@ NS ns\nns A {UPSTREAM}\n\
         * TXT \"{chunk}\" \"{chunk}\" \"{chunk}\" \"{chunk}\"\n"
    )
}

fn start_knotd(ns: &Netns, dir: &std::path::Path) -> KillOnDrop {
    fs::create_dir_all(dir.join("db")).unwrap();
    fs::write(dir.join("big.test.zone"), zone()).unwrap();
    let conf = format!(
        "server:\n    rundir: \"{d}\"\n    listen: {UPSTREAM}@53\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n\
         database:\n    storage: \"{d}/db\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         template:\n  - id: default\n    storage: \"{d}\"\n    zonefile-sync: -1\n    journal-content: none\n\
         zone:\n  - domain: big.test\n    file: \"big.test.zone\"\n",
        d = dir.display()
    );
    fs::write(dir.join("knot.conf"), conf).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "knotd", "-c"])
        .arg(dir.join("knot.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("knotd (apt install knot)");
    KillOnDrop(child)
}

fn answered(ns: &Netns, server: &str, name: &str) -> bool {
    let server: SocketAddr = format!("{server}:53").parse().unwrap();
    let name = name.to_string();
    in_netns(&ns.path(), move || {
        query_udp(server, &name, 16, Duration::from_millis(500))
    })
    .ok()
    .and_then(Result::ok)
    .is_some_and(|a| a.rcode == 0)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..200 {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not come up");
}

#[test]
fn a_full_cache_stays_under_a_128_mib_limit() {
    let ns = Netns::create(&unique_name("mem")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _knotd = start_knotd(&ns, dir.path());
    wait_for("knotd", || answered(&ns, UPSTREAM, "a.big.test"));

    let cg = MemCgroup::create("mem", LIMIT).unwrap();
    let bin = bin_path("node-local-dns-resolver");
    assert!(bin.exists(), "run cargo build --workspace --bins first");
    let metrics: SocketAddr = format!("{LISTEN}:9355").parse().unwrap();
    // Joins the cgroup before exec, so the budget is read inside the limit.
    let log = fs::File::create(dir.path().join("resolver.log")).unwrap();
    // nsenter, not `ip netns exec`, which mounts a fresh /sys without the cgroup mounts the
    // resolver reads its limit from.
    let resolver = Command::new("sh")
        .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
        .arg(cg.procs())
        .arg("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(&bin)
        .args([
            "--listen",
            LISTEN,
            "--upstream",
            UPSTREAM,
            "--no-node-setup",
        ])
        .args(["--metrics-listen", &metrics.to_string()])
        .args(["--health-listen", &format!("{LISTEN}:9354")])
        .env_remove("NODE_LOCAL_DNS_CACHE_MAX_BYTES")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut resolver = KillOnDrop(resolver);
    let pid = resolver.0.id() as i32;
    wait_for("the resolver", || answered(&ns, LISTEN, "b.big.test"));

    // Unique names, well past the budget.
    let queries = dir.path().join("queries.txt");
    let text: String = (0..NAMES).map(|i| format!("n{i}.big.test TXT\n")).collect();
    fs::write(&queries, text).unwrap();
    let perf = Command::new("ip")
        .args(["netns", "exec", ns.name(), "dnsperf", "-s", LISTEN, "-d"])
        .arg(&queries)
        .args(["-n", "1", "-c", "4", "-q", "200", "-t", "5"])
        .output()
        .expect("dnsperf (apt install dnsperf)");
    assert!(
        perf.status.success(),
        "{}",
        String::from_utf8_lossy(&perf.stderr)
    );

    assert!(
        matches!(resolver.0.try_wait(), Ok(None)),
        "the resolver exited: {}",
        fs::read_to_string(dir.path().join("resolver.log")).unwrap_or_default()
    );
    assert_eq!(
        cg.oom_kills().unwrap(),
        0,
        "OOM kills in the 128 MiB cgroup"
    );
    let rss = rss_bytes(pid).unwrap();
    let m = scrape(&ns.path(), metrics).unwrap();
    let entries = m.sum("coredns_cache_entries", &["type=\"success\""]);
    let evictions = m.sum("coredns_cache_evictions_total", &[]);
    eprintln!(
        "128 MiB limit: RSS {} MiB after {NAMES} ~1 KiB answers; {entries} entries, {evictions} evictions",
        rss >> 20
    );
    assert!(rss < LIMIT, "RSS {rss} over the limit");
    assert!(
        evictions > 0.0,
        "no evictions: the cache never reached its budget"
    );
    assert!(
        entries < NAMES as f64 * 0.9,
        "{entries} entries: the budget did not bound the cache"
    );
    // Still serving.
    assert!(matches!(
        http_get(
            &ns.path(),
            format!("{LISTEN}:9354").parse().unwrap(),
            "/health"
        ),
        Ok((200, _))
    ));
    drop(resolver);
}
