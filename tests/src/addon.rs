//! The NodeLocal DNSCache addon (kubernetes/dns `node-cache`) as it leaves a node it runs on,
//! for the migration tests: its interface `nodelocaldns` holding 169.254.20.10 and the kube-dns
//! ClusterIP, its raw and filter rules (the real texts, loaded with iptables-restore), and a
//! stand-in for its CoreDNS: knotd bound to both addresses with SO_REUSEPORT (as CoreDNS binds),
//! answering the cluster zone. docs/addon-migration.md describes what the addon writes.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::clusterdns::SERVICES;
use crate::cmd::kill_child;
use crate::dns::{Answer, query_udp};
use crate::iptables::{self, Backend};
use crate::netns::{Netns, in_netns};
use crate::node::{CLUSTER_IP, LOCAL_IP};

/// The addon's rules with `-localip 169.254.20.10,10.96.0.10 -health-port 8080`, as
/// `iptables-save` prints them (the same file node-setup's tests load).
pub const RULES: &str = include_str!("../../node-setup/tests/data/addon-rules.save");

/// The interface the addon creates (type dummy).
pub const INTERFACE: &str = "nodelocaldns";

/// Comment prefix of every rule the addon writes.
pub const COMMENT: &str = "NodeLocal DNS Cache";

/// The addon's state on one node; the stand-in listener is killed (by PID) on drop.
#[derive(Debug)]
pub struct Addon {
    node_ns: String,
    backend: Backend,
    dir: PathBuf,
    listener: Option<Child>,
}

impl Addon {
    /// Sets up what the addon has on a node where it runs: interface, addresses, rules,
    /// listener (in this order, as node-cache: interface at init, rules once CoreDNS runs).
    pub fn start(ns: &Netns, backend: Backend, dir: PathBuf) -> Result<Self, HarnessError> {
        fs::create_dir_all(&dir).map_err(|e| HarnessError::Io(format!("{dir:?}"), e))?;
        add_interface(ns)?;
        iptables::restore(ns, backend, false, RULES)?;
        let mut addon = Self {
            node_ns: ns.name().to_string(),
            backend,
            dir,
            listener: None,
        };
        addon.start_listener()?;
        Ok(addon)
    }

    fn start_listener(&mut self) -> Result<(), HarnessError> {
        write_knot_files(&self.dir)?;
        let log = fs::File::create(self.dir.join("knotd.log"))
            .map_err(|e| HarnessError::Io("addon knotd.log".into(), e))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns, "knotd", "-c"])
            .arg(self.dir.join("knot.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                command: "knotd (addon stand-in)".into(),
                source,
            })?;
        self.listener = Some(child);
        self.wait_answering()
    }

    fn wait_answering(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let path = PathBuf::from("/run/netns").join(&self.node_ns);
        let server = SocketAddr::new(local_ip()?, 53);
        loop {
            let answer = in_netns(&path, move || {
                query_udp(server, SERVICES[0].0, 1, Duration::from_millis(200))
            })?;
            if matches!(answer, Ok(Answer { rcode: 0, .. })) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("knotd.log")).unwrap_or_default();
                return Err(HarnessError::Other(format!(
                    "addon stand-in not answering on {server}: {answer:?} {log}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The addon's listener dies (SIGKILL, by PID) and leaves everything else in place: what
    /// `-skipteardown`, an OOM kill or a crash leave behind.
    pub fn kill_listener(&mut self) {
        if let Some(mut child) = self.listener.take() {
            kill_child(&mut child);
        }
    }

    /// What node-cache does on SIGTERM without `-skipteardown`: its listener exits, then it
    /// deletes each of its rules by its exact text (errors ignored, as it only logs them) and
    /// its interface, with every address on it.
    pub fn terminate_with_teardown(&mut self) -> Result<(), HarnessError> {
        self.kill_listener();
        let tool = iptables::tool(self.backend, false, "");
        for (table, spec) in rules_by_table(RULES) {
            let mut args = vec![
                "netns",
                "exec",
                &self.node_ns,
                &tool,
                "-w",
                "-t",
                &table,
                "-D",
            ];
            args.extend(shell_words(&spec));
            let _ = crate::cmd::run("ip", args);
        }
        run_ip(&self.node_ns, &["link", "del", INTERFACE])
    }

    /// The addon's rules still in `table` of the node.
    pub fn rules_left(&self, table: &str) -> Result<Vec<String>, HarnessError> {
        let tool = iptables::tool(self.backend, false, "-save");
        let saved = crate::cmd::run("ip", ["netns", "exec", &self.node_ns, &tool, "-t", table])?;
        Ok(saved
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains(COMMENT))
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Addon {
    fn drop(&mut self) {
        self.kill_listener();
    }
}

fn local_ip() -> Result<IpAddr, HarnessError> {
    LOCAL_IP
        .parse()
        .map_err(|_| HarnessError::Other(format!("bad LOCAL_IP {LOCAL_IP}")))
}

fn run_ip(ns: &str, args: &[&str]) -> Result<(), HarnessError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    crate::cmd::run("ip", all).map(|_| ())
}

/// The addon's dummy interface with both addresses. This kernel has no dummy link type, so a
/// port-less bridge stands in (it delivers locally just the same, docs/design-facts.md §1).
fn add_interface(ns: &Netns) -> Result<(), HarnessError> {
    if ns.ip(&["link", "add", INTERFACE, "type", "dummy"]).is_err() {
        ns.ip(&["link", "add", INTERFACE, "type", "bridge"])?;
    }
    for addr in [LOCAL_IP, CLUSTER_IP] {
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", INTERFACE])?;
    }
    Ok(())
}

/// knotd bound to the addon's two addresses with SO_REUSEPORT, as CoreDNS binds them, so our
/// daemon can bind beside it: on UDP knotd does that with more than one UDP worker, on TCP with
/// tcp-reuseport. Not socket-affinity: that attaches a BPF program to the reuseport group that
/// would steer every query to knotd's own sockets, which CoreDNS does not do.
fn write_knot_files(dir: &std::path::Path) -> Result<(), HarnessError> {
    let mut zone = String::from(
        "$ORIGIN cluster.local.\n$TTL 30\n@ SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ NS ns.dns.cluster.local.\nns.dns A 10.96.0.10\n",
    );
    for (name, ip) in SERVICES {
        zone.push_str(&format!("{name}. A {ip}\n"));
    }
    let conf = format!(
        "server:\n    rundir: \"{d}\"\n    listen: [ {CLUSTER_IP}@53, {LOCAL_IP}@53 ]\n    udp-workers: 2\n    tcp-workers: 1\n    background-workers: 1\n    tcp-reuseport: on\n\
         database:\n    storage: \"{d}/db\"\n\
         log:\n  - target: stderr\n    any: error\n\
         zone:\n  - domain: cluster.local\n    storage: \"{d}\"\n    file: \"cluster.local.zone\"\n    zonefile-sync: -1\n    journal-content: none\n",
        d = dir.display()
    );
    for (file, text) in [("cluster.local.zone", zone), ("knot.conf", conf)] {
        let path = dir.join(file);
        fs::write(&path, text).map_err(|e| HarnessError::Io(format!("{path:?}"), e))?;
    }
    fs::create_dir_all(dir.join("db")).map_err(|e| HarnessError::Io("addon knot db".into(), e))
}

/// `(table, spec)` of every `-A` line of an `iptables-save` text.
fn rules_by_table(save: &str) -> Vec<(String, String)> {
    let mut table = String::new();
    let mut out = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            out.push((table.clone(), rule.to_string()));
        }
    }
    out
}

/// Splits a save line into arguments, keeping a quoted comment as one word.
fn shell_words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let (word, tail) = match rest.strip_prefix('"') {
            Some(r) => r.split_once('"').unwrap_or((r, "")),
            None => rest.split_once(' ').unwrap_or((rest, "")),
        };
        out.push(word);
        rest = tail.trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_is_split_into_table_and_arguments() {
        let rules = rules_by_table(RULES);
        assert_eq!(rules.iter().filter(|(t, _)| t == "raw").count(), 16);
        assert_eq!(rules.iter().filter(|(t, _)| t == "filter").count(), 8);
        let (_, first) = &rules[0];
        assert_eq!(
            shell_words(first),
            [
                "PREROUTING",
                "-d",
                "10.96.0.10/32",
                "-p",
                "udp",
                "-m",
                "udp",
                "--dport",
                "53",
                "-m",
                "comment",
                "--comment",
                "NodeLocal DNS Cache: skip conntrack",
                "-j",
                "NOTRACK"
            ]
        );
    }
}
