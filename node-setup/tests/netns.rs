//! Root tests against the real kernel, real netlink and real iptables (legacy and nft), each
//! in a fresh network namespace of its own thread (unshare(CLONE_NEWNET)): the host's rules,
//! routes and interfaces are never touched. They fail, not skip, when not run as root.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use nix::sched::{CloneFlags, setns, unshare};
use node_setup::{
    IptablesBackend, Missing, NodeConfig, SocketMatch, check_node, ensure_node, teardown_node,
};

const CLUSTER_V4: &str = "10.96.0.10";
const CLUSTER_V6: &str = "fd00::a";

/// Runs `f` on a thread that lives in a brand-new network namespace.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): tests must run as root");
        f()
    })
    .join()
    .expect("test thread panicked")
}

fn cfg(backend: IptablesBackend, cluster: &[&str], dir: &tempfile::TempDir) -> NodeConfig {
    let mut c = NodeConfig::new(cluster.iter().map(|s| s.parse().unwrap()).collect());
    c.backend = backend;
    c.lock_path = dir.path().join("setup.lock");
    c
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn save_cmd(backend: IptablesBackend, v6: bool) -> String {
    let b = match backend {
        IptablesBackend::Legacy => "legacy",
        _ => "nft",
    };
    format!("{}-{b}", if v6 { "ip6tables" } else { "iptables" })
}

/// Our rules in the namespace's raw table, as `-A CHAIN spec` lines.
fn raw_rules(backend: IptablesBackend, v6: bool) -> Vec<String> {
    sh(&format!("{}-save", save_cmd(backend, v6)), &["-t", "raw"])
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(String::from)
        .collect()
}

fn ours(rules: &[String]) -> Vec<&String> {
    rules
        .iter()
        .filter(|l| l.contains("node-local-dns:"))
        .collect()
}

fn addresses(dev: &str) -> String {
    sh("ip", &["-o", "addr", "show", "dev", dev])
}

fn assert_everything_once(backend: IptablesBackend, v6: bool, cluster: &str) {
    let rules = raw_rules(backend, v6);
    let ours = ours(&rules);
    assert_eq!(ours.len(), 4, "{rules:#?}");
    let unique: std::collections::BTreeSet<_> = ours.iter().collect();
    assert_eq!(unique.len(), 4, "{rules:#?}");
    let pre: Vec<&String> = rules
        .iter()
        .filter(|l| l.starts_with("-A PREROUTING"))
        .collect();
    for top in &pre[..2] {
        assert!(
            top.contains(&format!("-d {cluster}/")) && top.contains("-m socket"),
            "{pre:#?}"
        );
    }
    let addrs = addresses("nodelocaldns");
    assert_eq!(addrs.matches(&format!(" {cluster}/")).count(), 1, "{addrs}");
    assert_eq!(addrs.matches(" 169.254.20.10/32").count(), 1, "{addrs}");
}

fn fresh_node_gets_interface_addresses_and_rules_once(backend: IptablesBackend) {
    in_new_netns(move || {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(backend, &[CLUSTER_V4], &dir);
        assert!(!check_node(&c).unwrap().is_empty());
        let report = ensure_node(&c).unwrap();
        assert!(!report.changes.is_empty());
        let link = sh("ip", &["-d", "link", "show", "nodelocaldns"]);
        assert!(
            ["dummy", "bridge"].contains(&report.link_kind.as_str()),
            "{report:?}"
        );
        assert!(link.contains(&report.link_kind), "{link}");
        assert_everything_once(backend, false, CLUSTER_V4);
        assert_eq!(check_node(&c).unwrap(), Vec::<Missing>::new());
        let again = ensure_node(&c).unwrap();
        assert!(again.changes.is_empty(), "{again:?}");
        assert_eq!(again.link_kind, report.link_kind);
        // The cache can bind the ClusterIP and the local IP specifically.
        UdpSocket::bind((CLUSTER_V4, 53)).unwrap();
        UdpSocket::bind(("169.254.20.10", 53)).unwrap();
    });
}

#[test]
fn fresh_node_gets_interface_addresses_and_rules_once_legacy() {
    fresh_node_gets_interface_addresses_and_rules_once(IptablesBackend::Legacy);
}

#[test]
fn fresh_node_gets_interface_addresses_and_rules_once_nft() {
    fresh_node_gets_interface_addresses_and_rules_once(IptablesBackend::Nft);
}

fn deleted_rules_and_foreign_accept_are_repaired(backend: IptablesBackend) {
    in_new_netns(move || {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(backend, &[CLUSTER_V4], &dir);
        ensure_node(&c).unwrap();
        // The second call verifies in full and remembers the rules generation (nft) or the
        // raw table's content stamp (legacy); the edits below must invalidate it.
        assert!(ensure_node(&c).unwrap().changes.is_empty());
        assert!(dir.path().join("setup.verified").exists());
        let ipt = save_cmd(backend, false);
        let rules = raw_rules(backend, false);
        let out_rule = rules.iter().find(|l| l.starts_with("-A OUTPUT")).unwrap();
        let del_line = out_rule.replacen("-A", "-D", 1);
        let del: Vec<&str> = shell_words(&del_line);
        sh(&ipt, &[&["-w", "-t", "raw"][..], &del].concat());
        sh(
            &ipt,
            &["-w", "-t", "raw", "-I", "PREROUTING", "1", "-j", "ACCEPT"],
        );
        let missing = check_node(&c).unwrap();
        assert!(
            missing.iter().any(|m| matches!(m, Missing::Rule { .. })),
            "{missing:?}"
        );
        assert!(
            missing
                .iter()
                .any(|m| matches!(m, Missing::RuleNotFirst { .. })),
            "{missing:?}"
        );
        ensure_node(&c).unwrap();
        assert_everything_once(backend, false, CLUSTER_V4);
        let after = raw_rules(backend, false);
        assert_eq!(after[2], "-A PREROUTING -j ACCEPT", "{after:#?}");
        assert!(check_node(&c).unwrap().is_empty());
    });
}

/// What the NodeLocal DNSCache addon leaves on a node (`-localip 169.254.20.10,10.96.0.10`):
/// its raw and filter rules in `iptables-save` form.
const ADDON_SAVE: &str = include_str!("data/addon-rules.save");

fn restore(backend: IptablesBackend, text: &str) {
    use std::io::Write;
    let mut child = Command::new(format!("{}-restore", save_cmd(backend, false)))
        .args(["-w", "-n"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn addon_rules(backend: IptablesBackend, table: &str) -> Vec<String> {
    sh(
        &format!("{}-save", save_cmd(backend, false)),
        &["-t", table],
    )
    .lines()
    .filter(|l| l.contains("NodeLocal DNS Cache"))
    .map(String::from)
    .collect()
}

/// The addon's interface (a bridge: this kernel has no dummy) with its two addresses.
fn addon_interface() {
    sh("ip", &["link", "add", "nodelocaldns", "type", "bridge"]);
    for addr in ["169.254.20.10/32", "10.96.0.10/32"] {
        sh("ip", &["addr", "add", addr, "dev", "nodelocaldns"]);
    }
}

/// The addon's state in place: `ensure_node` deletes exactly its four NOTRACKs for DNS to the
/// ClusterIP (raw PREROUTING and OUTPUT, no socket match), reports and counts them, keeps its
/// other rules and its interface; after the addon's own teardown the next ensure restores the
/// interface it took with it.
fn addon_blackholes_removed_and_the_rest_kept(backend: IptablesBackend) {
    in_new_netns(move || {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(backend, &[CLUSTER_V4], &dir);
        addon_interface();
        restore(backend, ADDON_SAVE);
        let foreign: Vec<Missing> = check_node(&c)
            .unwrap()
            .into_iter()
            .filter(|m| matches!(m, Missing::ForeignRule { .. }))
            .collect();
        assert_eq!(foreign.len(), 4, "{foreign:#?}");

        let report = ensure_node(&c).unwrap();
        assert_eq!(report.foreign_rules_removed, 4, "{report:?}");
        assert_everything_once(backend, false, CLUSTER_V4);
        assert_eq!(check_node(&c).unwrap(), Vec::<Missing>::new());
        let raw = addon_rules(backend, "raw");
        assert_eq!(raw.len(), 12, "{raw:#?}");
        assert!(
            !raw.iter()
                .any(|r| r.contains("-d 10.96.0.10/32") && r.contains("--dport 53 ")),
            "{raw:#?}"
        );
        assert_eq!(addon_rules(backend, "filter").len(), 8);
        assert_eq!(ensure_node(&c).unwrap().foreign_rules_removed, 0);

        // The addon's teardown: its rules by their exact text, then its interface.
        for table in ["raw", "filter"] {
            for line in addon_rules(backend, table) {
                let del = line.replacen("-A", "-D", 1);
                sh(
                    &save_cmd(backend, false),
                    &[&["-w", "-t", table][..], &shell_words(&del)].concat(),
                );
            }
        }
        sh("ip", &["link", "del", "nodelocaldns"]);
        assert!(
            check_node(&c)
                .unwrap()
                .contains(&Missing::Interface("nodelocaldns".into())),
            "the addon's teardown takes the shared interface"
        );
        ensure_node(&c).unwrap();
        assert_everything_once(backend, false, CLUSTER_V4);
    });
}

#[test]
fn addon_blackholes_removed_and_the_rest_kept_legacy() {
    addon_blackholes_removed_and_the_rest_kept(IptablesBackend::Legacy);
}

#[test]
fn addon_blackholes_removed_and_the_rest_kept_nft() {
    addon_blackholes_removed_and_the_rest_kept(IptablesBackend::Nft);
}

/// Splits a save line, keeping the quoted comment as one word.
fn shell_words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap();
            out.push(&r[..end]);
            rest = r[end + 1..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    out
}

#[test]
fn deleted_rules_and_foreign_accept_are_repaired_legacy() {
    deleted_rules_and_foreign_accept_are_repaired(IptablesBackend::Legacy);
}

#[test]
fn deleted_rules_and_foreign_accept_are_repaired_nft() {
    deleted_rules_and_foreign_accept_are_repaired(IptablesBackend::Nft);
}

fn ipv6_cluster_ip_is_usable_at_once(backend: IptablesBackend) {
    in_new_netns(move || {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(backend, &[CLUSTER_V4, CLUSTER_V6], &dir);
        ensure_node(&c).unwrap();
        assert_everything_once(backend, false, CLUSTER_V4);
        assert_everything_once(backend, true, CLUSTER_V6);
        let addrs = addresses("nodelocaldns");
        let ours = addrs.lines().find(|l| l.contains(" fd00::a/128 ")).unwrap();
        assert!(
            ours.contains("nodad") && !ours.contains("tentative"),
            "{addrs}"
        );
        // No DAD wait: bind succeeds right away even on a link without carrier.
        let v6: IpAddr = CLUSTER_V6.parse().unwrap();
        UdpSocket::bind(SocketAddr::new(v6, 53)).unwrap();
        assert!(check_node(&c).unwrap().is_empty());
    });
}

#[test]
fn ipv6_cluster_ip_is_usable_at_once_legacy() {
    ipv6_cluster_ip_is_usable_at_once(IptablesBackend::Legacy);
}

#[test]
fn ipv6_cluster_ip_is_usable_at_once_nft() {
    ipv6_cluster_ip_is_usable_at_once(IptablesBackend::Nft);
}

#[test]
fn nowildcard_option_programs_the_deckhouse_form() {
    in_new_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(IptablesBackend::Nft, &[CLUSTER_V4], &dir);
        c.socket_match = SocketMatch::NoWildcard;
        ensure_node(&c).unwrap();
        let rules = raw_rules(IptablesBackend::Nft, false);
        let nowild = rules
            .iter()
            .filter(|l| l.contains("-m socket --nowildcard"))
            .count();
        assert_eq!(nowild, 2, "{rules:#?}");
        // Switching back to the safe default replaces them instead of adding to them.
        c.socket_match = SocketMatch::Safe;
        ensure_node(&c).unwrap();
        assert_everything_once(IptablesBackend::Nft, false, CLUSTER_V4);
        assert!(
            !raw_rules(IptablesBackend::Nft, false)
                .iter()
                .any(|l| l.contains("nowildcard"))
        );
    });
}

#[test]
fn parallel_ensures_end_with_one_copy_of_everything() {
    in_new_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(IptablesBackend::Legacy, &[CLUSTER_V4], &dir);
        let ns = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let (c, ns) = (c.clone(), ns.try_clone().unwrap());
                std::thread::spawn(move || {
                    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
                    ensure_node(&c).map(|_| ())
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_everything_once(IptablesBackend::Legacy, false, CLUSTER_V4);
        assert_eq!(sh("ip", &["-o", "link"]).matches("nodelocaldns").count(), 1);
    });
}

#[test]
fn ensure_works_inside_tokio_spawn_blocking() {
    in_new_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(IptablesBackend::Nft, &[CLUSTER_V4], &dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let report = rt
            .block_on(async move { tokio::task::spawn_blocking(move || ensure_node(&c)).await })
            .unwrap()
            .unwrap();
        assert!(!report.changes.is_empty());
        assert_everything_once(IptablesBackend::Nft, false, CLUSTER_V4);
    });
}

#[test]
fn auto_backend_follows_kube_proxy_chains() {
    in_new_netns(|| {
        assert_eq!(
            node_setup::detect_backend(IptablesBackend::Auto).unwrap(),
            "nft"
        );
        sh(
            "iptables-legacy",
            &["-w", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
        );
        sh(
            "iptables-legacy",
            &["-w", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"],
        );
        assert_eq!(
            node_setup::detect_backend(IptablesBackend::Auto).unwrap(),
            "legacy"
        );
        let dir = tempfile::tempdir().unwrap();
        let report = ensure_node(&cfg(IptablesBackend::Auto, &[CLUSTER_V4], &dir)).unwrap();
        assert_eq!(report.iptables_backend, "legacy");
        assert_everything_once(IptablesBackend::Legacy, false, CLUSTER_V4);
        assert!(ours(&raw_rules(IptablesBackend::Nft, false)).is_empty());
        let remembered = std::fs::read_to_string(dir.path().join("setup.backend")).unwrap();
        assert!(remembered.ends_with("\nlegacy"), "{remembered}");
        // The answer is remembered (a doctored memory is believed while nothing changed)...
        let c = cfg(IptablesBackend::Auto, &[CLUSTER_V4], &dir);
        let path = dir.path().join("setup.backend");
        std::fs::write(&path, remembered.replace("\nlegacy", "\nnft")).unwrap();
        assert_eq!(ensure_node(&c).unwrap().iptables_backend, "nft");
        // ...but any change on either side makes it detect again (that ensure changed nft).
        assert_eq!(ensure_node(&c).unwrap().iptables_backend, "legacy");
        for chain in [
            "KUBE-IPTABLES-HINT",
            "KUBE-KUBELET-CANARY",
            "KUBE-PROXY-CANARY",
        ] {
            sh("iptables-nft", &["-w", "-t", "mangle", "-N", chain]);
        }
        assert_eq!(ensure_node(&c).unwrap().iptables_backend, "nft");
        assert_everything_once(IptablesBackend::Nft, false, CLUSTER_V4);
        for chain in ["KUBE-PROXY-CANARY", "KUBE-EXTRA"] {
            sh("iptables-legacy", &["-w", "-t", "mangle", "-N", chain]);
        }
        assert_eq!(ensure_node(&c).unwrap().iptables_backend, "legacy");
    });
}

#[test]
fn teardown_removes_interface_and_rules() {
    in_new_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(IptablesBackend::Nft, &[CLUSTER_V4, CLUSTER_V6], &dir);
        ensure_node(&c).unwrap();
        // Rules the node got under the other backend go too.
        ensure_node(&cfg(IptablesBackend::Legacy, &[CLUSTER_V4], &dir)).unwrap();
        teardown_node(&c).unwrap();
        assert!(ours(&raw_rules(IptablesBackend::Legacy, false)).is_empty());
        assert!(ours(&raw_rules(IptablesBackend::Nft, false)).is_empty());
        assert!(ours(&raw_rules(IptablesBackend::Nft, true)).is_empty());
        assert!(!sh("ip", &["-o", "link"]).contains("nodelocaldns"));
        teardown_node(&c).unwrap();
    });
}

#[test]
fn lock_held_elsewhere_bounds_the_wait() {
    in_new_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(IptablesBackend::Nft, &[CLUSTER_V4], &dir);
        c.lock_timeout = Duration::from_millis(50);
        let held = std::fs::File::create(&c.lock_path).unwrap();
        let _flock = nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let err = ensure_node(&c).unwrap_err();
        assert_eq!(err.kind(), "lock", "{err}");
    });
}

fn legacy_stamp_ignores_counters_but_sees_rule_changes(v6: bool) {
    in_new_netns(move || {
        let (ipt, dst) = if v6 {
            ("ip6tables-legacy", "::1")
        } else {
            ("iptables-legacy", "127.0.0.1")
        };
        sh("ip", &["link", "set", "lo", "up"]);
        let rule = ["-p", "udp", "-m", "udp", "--dport", "9", "-j", "ACCEPT"];
        sh(
            ipt,
            &[&["-w", "-t", "raw", "-A", "OUTPUT"][..], &rule].concat(),
        );
        let before = node_setup::legacy::raw_table_stamp(v6).unwrap();
        let sock = UdpSocket::bind((dst, 0)).unwrap();
        sock.send_to(b"counted", (dst, 9)).unwrap();
        let counted = sh(&format!("{ipt}-save"), &["-c", "-t", "raw"]);
        assert!(counted.contains("[1:"), "{counted}");
        assert_eq!(node_setup::legacy::raw_table_stamp(v6).unwrap(), before);
        // Same size, different port: the stamp must change.
        let port10 = ["-p", "udp", "-m", "udp", "--dport", "10", "-j", "ACCEPT"];
        sh(
            ipt,
            &[&["-w", "-t", "raw", "-R", "OUTPUT", "1"][..], &port10].concat(),
        );
        assert_ne!(node_setup::legacy::raw_table_stamp(v6).unwrap(), before);
    });
}

#[test]
fn legacy_stamp_ignores_counters_but_sees_rule_changes_v4() {
    legacy_stamp_ignores_counters_but_sees_rule_changes(false);
}

#[test]
fn legacy_stamp_ignores_counters_but_sees_rule_changes_v6() {
    legacy_stamp_ignores_counters_but_sees_rule_changes(true);
}
