//! Contract and root tests of the built `node-local-dns` binary: env + stdin in, stdout and
//! exit code out, for every CNI version. Node state is checked in throwaway network namespaces
//! (`ip netns add nldc-…`, removed on drop) with both iptables backends; the host's own rules
//! and interfaces are never touched. Run as root; they fail, not skip, otherwise.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_node-local-dns");
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const CLUSTER: &str = "10.96.0.10";

/// A named network namespace that is deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nldc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        sh("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn exec(&self, cmd: &str, args: &[&str]) -> String {
        sh(
            "ip",
            &[&["netns", "exec", &self.name, cmd][..], args].concat(),
        )
    }

    fn raw_rules(&self, ipt: &str) -> Vec<String> {
        self.exec(&format!("{ipt}-save"), &["-t", "raw"])
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(String::from)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// One plugin invocation's inputs.
struct Invocation {
    env: Vec<(&'static str, String)>,
    stdin: String,
}

impl Invocation {
    fn new(command: &str, config: &Value) -> Invocation {
        Invocation {
            env: vec![
                ("CNI_COMMAND", command.into()),
                ("CNI_CONTAINERID", "c0ffee".into()),
                ("CNI_NETNS", "/var/run/netns/pod".into()),
                ("CNI_IFNAME", "eth0".into()),
                ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni".into()),
            ],
            stdin: config.to_string(),
        }
    }

    fn set(mut self, key: &'static str, value: &str) -> Invocation {
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    fn unset(mut self, key: &str) -> Invocation {
        self.env.retain(|(k, _)| *k != key);
        self
    }

    fn command(&self, netns: Option<&Netns>) -> Command {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn run_in(&self, netns: Option<&Netns>) -> Output {
        let mut child = self.command(netns).spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn run(&self) -> Output {
        self.run_in(None)
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The error JSON a failing invocation printed on stdout.
fn error_of(out: &Output) -> Value {
    assert!(!out.status.success(), "expected failure: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["code"].is_u64() && v["msg"].is_string(), "{v}");
    v
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A conflist entry as a runtime hands it over, with our files in a private directory.
    fn config(&self, version: &str, extra: Value) -> Value {
        let d = self.dir.path().display();
        let mut c = json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "node-local-dns",
            "clusterDNS": [CLUSTER],
            "iptables": "nft",
            "logFile": format!("{d}/cni.log"),
            "statsDir": format!("{d}/stats"),
            "lockFile": format!("{d}/setup.lock"),
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cni.log")).unwrap_or_default()
    }
}

/// A realistic bridge + host-local result, with fields a typed re-encode would lose.
fn prev_result(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "mtu": 1450, "sandbox": "/var/run/netns/pod", "socketPath": "/x"}
        ],
        "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1", "table": 100, "scope": 0}],
        "dns": {"nameservers": ["10.96.0.10"]},
        "someNewerField": {"kept": [1, 2.5, null]}
    })
}

fn ours(rules: &[String]) -> Vec<&String> {
    rules
        .iter()
        .filter(|l| l.contains("node-local-dns:"))
        .collect()
}

/// Interface, both addresses and the four rules, each exactly once; ours on top of PREROUTING.
fn assert_node_state_once(ns: &Netns, ipt: &str, cluster: &str) {
    let rules = ns.raw_rules(ipt);
    let ours = ours(&rules);
    assert_eq!(ours.len(), 4, "{rules:#?}");
    assert_eq!(
        ours.iter().collect::<std::collections::BTreeSet<_>>().len(),
        4
    );
    let pre: Vec<&String> = rules
        .iter()
        .filter(|l| l.starts_with("-A PREROUTING"))
        .collect();
    assert!(
        pre[..2]
            .iter()
            .all(|l| l.contains("node-local-dns:") && l.contains(cluster)),
        "{pre:#?}"
    );
    let addrs = ns.exec("ip", &["-o", "addr", "show", "dev", "nodelocaldns"]);
    assert_eq!(addrs.matches(&format!(" {cluster}/")).count(), 1, "{addrs}");
    let links = ns.exec("ip", &["-o", "link", "show"]);
    assert_eq!(links.matches("nodelocaldns").count(), 1, "{links}");
}

#[test]
fn version_lists_all_five_for_every_version() {
    for v in VERSIONS {
        let out = Invocation::new("VERSION", &json!({"cniVersion": v}))
            .unset("CNI_CONTAINERID")
            .unset("CNI_NETNS")
            .run();
        assert!(out.status.success(), "{out:?}");
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got, json!({"cniVersion": v, "supportedVersions": VERSIONS}));
    }
}

#[test]
fn add_prints_prev_result_unchanged_and_sets_up_the_node_for_every_version() {
    for v in VERSIONS {
        let (fx, ns) = (Fixture::new(), Netns::new());
        let mut cfg = fx.config(v, json!({}));
        cfg["prevResult"] = prev_result(v);
        let out = Invocation::new("ADD", &cfg).run_in(Some(&ns));
        assert!(out.status.success(), "{v}: {out:?}");
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got, prev_result(v), "{v}");
        assert_node_state_once(&ns, "iptables-nft", CLUSTER);
        let stats = node_setup::stats::load(&fx.dir.path().join("stats")).unwrap();
        assert_eq!(stats.operations["ADD"], 1);
    }
}

#[test]
fn add_without_prev_result_is_code_7_for_every_version() {
    for v in VERSIONS {
        let (fx, ns) = (Fixture::new(), Netns::new());
        let out = Invocation::new("ADD", &fx.config(v, json!({}))).run_in(Some(&ns));
        let err = error_of(&out);
        assert_eq!(
            (err["code"].as_u64(), err["cniVersion"].as_str()),
            (Some(7), Some(v))
        );
        assert!(!ns.exec("ip", &["-o", "link"]).contains("nodelocaldns"));
    }
}

#[test]
fn each_error_code_is_reported_on_stdout() {
    let fx = Fixture::new();
    let mut good = fx.config("1.0.0", json!({}));
    good["prevResult"] = prev_result("1.0.0");
    // 6: not JSON.
    let mut bad_json = Invocation::new("ADD", &good);
    bad_json.stdin = "{\"cniVersion\": \"1.0.0\", ".into();
    assert_eq!(error_of(&bad_json.run())["code"], 6);
    // 4: missing environment.
    for var in [
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
        "CNI_COMMAND",
    ] {
        let err = error_of(&Invocation::new("ADD", &good).unset(var).run());
        assert_eq!(err["code"], 4, "{var}: {err}");
    }
    // 7: no clusterDNS, a bad IP, a bad option value.
    for (key, value) in [
        ("clusterDNS", json!(null)),
        ("clusterDNS", json!(["10.96.0.999"])),
        ("socketMatch", json!("sometimes")),
    ] {
        let mut cfg = good.clone();
        cfg[key] = value.clone();
        let err = error_of(&Invocation::new("ADD", &cfg).run());
        assert_eq!(err["code"], 7, "{key}={value}: {err}");
    }
    // 1: unsupported version, with the supported list.
    let mut cfg = good.clone();
    cfg["cniVersion"] = json!("2.0.0");
    let err = error_of(&Invocation::new("ADD", &cfg).run());
    assert_eq!(err["code"], 1);
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0")
    );
}

#[test]
fn del_always_exits_0_silently_and_leaves_node_state() {
    let (fx, ns) = (Fixture::new(), Netns::new());
    for v in VERSIONS {
        let mut cfg = fx.config(v, json!({}));
        cfg["prevResult"] = prev_result(v);
        assert!(
            Invocation::new("ADD", &cfg)
                .run_in(Some(&ns))
                .status
                .success()
        );
        let before = ns.raw_rules("iptables-nft");
        let cases = [
            Invocation::new("DEL", &fx.config(v, json!({}))),
            Invocation::new("DEL", &cfg).set("CNI_NETNS", ""),
            Invocation::new("DEL", &cfg).set("CNI_NETNS", "/var/run/netns/nldc-gone"),
            Invocation::new("DEL", &cfg).set("CNI_CONTAINERID", "never-added"),
            Invocation::new("DEL", &cfg),
            Invocation::new("DEL", &cfg),
        ];
        for inv in cases {
            let out = inv.run_in(Some(&ns));
            assert!(out.status.success(), "{v}: {out:?}");
            assert!(out.stdout.is_empty(), "{v}: {out:?}");
        }
        assert_eq!(ns.raw_rules("iptables-nft"), before);
        assert_node_state_once(&ns, "iptables-nft", CLUSTER);
    }
}

#[test]
fn add_works_with_a_path_without_sbin() {
    let (fx, ns) = (Fixture::new(), Netns::new());
    let mut cfg = fx.config("1.0.0", json!({}));
    cfg["prevResult"] = prev_result("1.0.0");
    // Fail-open would hide a setup failure in the exit code: the node state tells.
    let inv = Invocation::new("ADD", &cfg);
    let mut child = inv
        .command(Some(&ns))
        .env("PATH", "/usr/bin:/bin")
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(inv.stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_node_state_once(&ns, "iptables-nft", CLUSTER);
}

#[test]
fn status_and_gc_exit_0_silently() {
    let fx = Fixture::new();
    let mut gc = fx.config("1.1.0", json!({}));
    let attachments = json!([{"containerID": "c0ffee", "ifname": "eth0"}]);
    gc["cni.dev/valid-attachments"] = attachments.clone();
    gc["cni.dev/attachments"] = attachments;
    for (command, cfg) in [("STATUS", fx.config("1.1.0", json!({}))), ("GC", gc)] {
        let out = Invocation::new(command, &cfg)
            .unset("CNI_CONTAINERID")
            .unset("CNI_NETNS")
            .unset("CNI_IFNAME")
            .run();
        assert!(out.status.success(), "{command}: {out:?}");
        assert!(out.stdout.is_empty(), "{command}: {out:?}");
    }
}

#[test]
fn check_passes_when_in_place_and_repairs_or_reports_otherwise() {
    let (fx, ns) = (Fixture::new(), Netns::new());
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut cfg = fx.config(v, json!({}));
        cfg["prevResult"] = prev_result(v);
        assert!(
            Invocation::new("ADD", &cfg)
                .run_in(Some(&ns))
                .status
                .success()
        );
        let out = Invocation::new("CHECK", &cfg).run_in(Some(&ns));
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "{v}: {out:?}"
        );
        // Lose a rule: closed reports it (code 11), open repairs it.
        ns.exec("iptables-nft", &["-t", "raw", "-F", "OUTPUT"]);
        cfg["failurePolicy"] = json!("closed");
        let err = error_of(&Invocation::new("CHECK", &cfg).run_in(Some(&ns)));
        assert_eq!(err["code"], 11, "{err}");
        assert!(
            err["msg"].as_str().unwrap().contains("rule missing"),
            "{err}"
        );
        cfg["failurePolicy"] = json!("open");
        let out = Invocation::new("CHECK", &cfg).run_in(Some(&ns));
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "{v}: {out:?}"
        );
        assert_node_state_once(&ns, "iptables-nft", CLUSTER);
    }
}

#[test]
fn setup_failure_is_logged_and_counted_when_open_and_code_11_when_closed() {
    let (fx, ns) = (Fixture::new(), Netns::new());
    // A lock path below a regular file cannot be created: a real, deterministic failure.
    let blocker = fx.dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let lock = blocker.join("setup.lock").display().to_string();
    let mut cfg = fx.config("1.0.0", json!({"lockFile": lock}));
    cfg["prevResult"] = prev_result("1.0.0");
    let out = Invocation::new("ADD", &cfg).run_in(Some(&ns));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        prev_result("1.0.0")
    );
    assert!(fx.log().contains("node setup failed"), "{}", fx.log());
    let stats = node_setup::stats::load(&fx.dir.path().join("stats")).unwrap();
    assert_eq!(stats.setup_errors["lock"], 1);
    cfg["failurePolicy"] = json!("closed");
    let err = error_of(&Invocation::new("ADD", &cfg).run_in(Some(&ns)));
    assert_eq!(err["code"], 11);
    assert!(err["msg"].as_str().unwrap().contains("setup.lock"), "{err}");
    assert!(stdout(&out).starts_with('{'));
}

#[test]
fn node_setup_happens_in_the_plugins_namespace_not_the_pods() {
    let (fx, node, pod) = (Fixture::new(), Netns::new(), Netns::new());
    let mut cfg = fx.config("1.0.0", json!({}));
    cfg["prevResult"] = prev_result("1.0.0");
    let out = Invocation::new("ADD", &cfg)
        .set("CNI_NETNS", &pod.path())
        .run_in(Some(&node));
    assert!(out.status.success(), "{out:?}");
    assert_node_state_once(&node, "iptables-nft", CLUSTER);
    assert!(!pod.exec("ip", &["-o", "link"]).contains("nodelocaldns"));
    assert!(ours(&pod.raw_rules("iptables-nft")).is_empty());
}

fn fifty_parallel_adds_leave_one_copy(backend: &str) {
    let (fx, ns) = (Fixture::new(), Netns::new());
    let mut cfg = fx.config("1.0.0", json!({"iptables": backend}));
    cfg["prevResult"] = prev_result("1.0.0");
    let children: Vec<_> = (0..50)
        .map(|i| {
            let inv = Invocation::new("ADD", &cfg).set("CNI_CONTAINERID", &format!("pod{i}"));
            let mut child = inv.command(Some(&ns)).spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(inv.stdin.as_bytes())
                .unwrap();
            child
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got, prev_result("1.0.0"));
    }
    assert_node_state_once(&ns, &format!("iptables-{backend}"), CLUSTER);
    let stats = node_setup::stats::load(&fx.dir.path().join("stats")).unwrap();
    assert_eq!(stats.operations["ADD"], 50);
    assert!(stats.setup_errors.is_empty(), "{stats:?}\n{}", fx.log());
}

#[test]
fn fifty_parallel_adds_leave_one_copy_legacy() {
    fifty_parallel_adds_leave_one_copy("legacy");
}

#[test]
fn fifty_parallel_adds_leave_one_copy_nft() {
    fifty_parallel_adds_leave_one_copy("nft");
}

fn add_restores_deleted_rules_and_moves_foreign_accept_below(backend: &str) {
    let (fx, ns) = (Fixture::new(), Netns::new());
    let ipt = format!("iptables-{backend}");
    let mut cfg = fx.config("0.4.0", json!({"iptables": backend}));
    cfg["prevResult"] = prev_result("0.4.0");
    assert!(
        Invocation::new("ADD", &cfg)
            .run_in(Some(&ns))
            .status
            .success()
    );
    ns.exec(&ipt, &["-w", "-t", "raw", "-F", "OUTPUT"]);
    ns.exec(
        &ipt,
        &["-w", "-t", "raw", "-I", "PREROUTING", "1", "-j", "ACCEPT"],
    );
    let out = Invocation::new("ADD", &cfg).run_in(Some(&ns));
    assert!(out.status.success(), "{out:?}");
    assert_node_state_once(&ns, &ipt, CLUSTER);
    assert_eq!(ns.raw_rules(&ipt)[2], "-A PREROUTING -j ACCEPT");
}

#[test]
fn add_restores_deleted_rules_and_moves_foreign_accept_below_legacy() {
    add_restores_deleted_rules_and_moves_foreign_accept_below("legacy");
}

#[test]
fn add_restores_deleted_rules_and_moves_foreign_accept_below_nft() {
    add_restores_deleted_rules_and_moves_foreign_accept_below("nft");
}

fn ipv6_cluster_ip(backend: &str) {
    let (fx, ns) = (Fixture::new(), Netns::new());
    let mut cfg = fx.config(
        "1.0.0",
        json!({"iptables": backend, "clusterDNS": ["fd00::a"], "localIPs": ["169.254.20.10", "fd00::20:10"]}),
    );
    cfg["prevResult"] = prev_result("1.0.0");
    let out = Invocation::new("ADD", &cfg).run_in(Some(&ns));
    assert!(out.status.success(), "{out:?}");
    assert_node_state_once(&ns, &format!("ip6tables-{backend}"), "fd00::a");
    assert!(ours(&ns.raw_rules(&format!("iptables-{backend}"))).is_empty());
    let addrs = ns.exec("ip", &["-6", "-o", "addr", "show", "dev", "nodelocaldns"]);
    for a in ["fd00::a/128", "fd00::20:10/128"] {
        let line = addrs.lines().find(|l| l.contains(a)).unwrap();
        assert!(
            line.contains("nodad") && !line.contains("tentative"),
            "{addrs}"
        );
    }
}

#[test]
fn ipv6_cluster_ip_legacy() {
    ipv6_cluster_ip("legacy");
}

#[test]
fn ipv6_cluster_ip_nft() {
    ipv6_cluster_ip("nft");
}

#[test]
fn the_entry_the_installer_writes_is_applied_as_written() {
    use settings::entry::PluginEntry;
    let (fx, ns) = (Fixture::new(), Netns::new());
    let d = fx.dir.path();
    // The installer's type, with every node setting away from its default.
    let mut entry = PluginEntry::new(
        vec![CLUSTER.parse().unwrap()],
        vec!["169.254.20.11".parse().unwrap()],
    );
    entry.interface = "nld0".into();
    entry.iptables = node_setup::IptablesBackend::Legacy;
    entry.socket_match = node_setup::SocketMatch::NoWildcard;
    entry.log_file = Some(d.join("cni.log"));
    entry.stats_dir = Some(d.join("stats"));
    entry.lock_file = Some(d.join("setup.lock"));
    let mut cfg = entry.to_value();
    cfg["cniVersion"] = "1.0.0".into();
    cfg["name"] = "k8s-pod-network".into();
    cfg["prevResult"] = prev_result("1.0.0");
    let out = Invocation::new("ADD", &cfg).run_in(Some(&ns));
    assert!(out.status.success(), "{out:?}");
    let addrs = ns.exec("ip", &["-o", "addr", "show", "dev", "nld0"]);
    assert!(addrs.contains(" 169.254.20.11/"), "{addrs}");
    let rules = ns.raw_rules("iptables-legacy");
    let ours = ours(&rules);
    assert_eq!(ours.len(), 4, "{rules:#?}");
    assert!(
        ours.iter()
            .filter(|l| l.starts_with("-A PREROUTING"))
            .all(|l| l.contains("--nowildcard")),
        "{ours:#?}"
    );
    assert!(ns.raw_rules("iptables-nft").is_empty());
}
