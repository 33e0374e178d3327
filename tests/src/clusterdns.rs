//! The cluster DNS pods: knotd serving cluster.local (Services across namespaces, an SOA for
//! negative answers) and stand-in external zones, each in its own network namespace.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::cmd::kill_child;
use crate::dns::{Answer, query_udp};
use crate::iptables::{Backend, iptables};
use crate::netns::{Netns, in_netns};

/// Comment on the counting rules in each DNS pod's INPUT chain.
const COUNT_COMMENT: &str = "nlde-count-dns";

/// Names the cluster zone serves, with their A records (the AAAA is `fd00:100::<last octet>`).
pub const SERVICES: &[(&str, &str)] = &[
    ("kube-dns.kube-system.svc.cluster.local", "10.96.0.10"),
    ("web.default.svc.cluster.local", "10.100.0.1"),
    ("db.prod.svc.cluster.local", "10.100.0.2"),
    ("api.prod.svc.cluster.local", "10.100.0.3"),
    ("metrics.monitoring.svc.cluster.local", "10.100.0.4"),
];

/// External names (stand-in zones example.com and example.org) and their A records.
pub const EXTERNAL: &[(&str, &str)] = &[
    ("www.example.com", "192.0.2.1"),
    ("api.example.com", "192.0.2.2"),
    ("www.example.org", "198.51.100.1"),
];

/// Record TTL in the zones (within the cache's [5 s, 30 s] clamp).
pub const ZONE_TTL: u32 = 30;

fn zone_files() -> Vec<(&'static str, String)> {
    let soa = |origin: &str| {
        format!(
            "$ORIGIN {origin}.\n$TTL {ZONE_TTL}\n@ SOA ns.dns.cluster.local. hostmaster.{origin}. 1 7200 1800 86400 5\n@ NS ns.dns.cluster.local.\n"
        )
    };
    let mut cluster = soa("cluster.local");
    cluster.push_str("ns.dns A 10.96.0.10\n");
    for (name, ip) in SERVICES {
        let rel = name.trim_end_matches(".cluster.local");
        let last = ip.rsplit('.').next().unwrap_or("1");
        cluster.push_str(&format!("{rel} A {ip}\n{rel} AAAA fd00:100::{last}\n"));
    }
    let mut zones = vec![("cluster.local", cluster)];
    for origin in ["example.com", "example.org"] {
        let mut z = soa(origin);
        for (name, ip) in EXTERNAL.iter().filter(|(n, _)| n.ends_with(origin)) {
            z.push_str(&format!("{name}. A {ip}\n"));
        }
        zones.push((origin, z));
    }
    zones
}

fn knot_conf(dir: &Path) -> String {
    let mut conf = format!(
        "server:\n    rundir: \"{d}\"\n    listen: [ 0.0.0.0@53, ::@53 ]\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n\
         database:\n    storage: \"{d}/db\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         template:\n  - id: default\n    storage: \"{d}\"\n    zonefile-sync: -1\n    journal-content: none\n\
         zone:\n",
        d = dir.display()
    );
    for (origin, _) in zone_files() {
        conf.push_str(&format!(
            "  - domain: {origin}\n    file: \"{origin}.zone\"\n"
        ));
    }
    conf
}

/// One cluster DNS pod: a network namespace with knotd on port 53.
#[derive(Debug)]
pub struct ClusterDns {
    pub ns: Netns,
    pub ips: Vec<IpAddr>,
    dir: PathBuf,
    backend: Backend,
    knotd: Option<Child>,
}

impl ClusterDns {
    /// Writes the zones and starts knotd in `ns` (already wired to the node), and installs
    /// the INPUT rules that count the queries it receives.
    pub fn start(
        ns: Netns,
        ips: Vec<IpAddr>,
        dir: PathBuf,
        backend: Backend,
    ) -> Result<Self, HarnessError> {
        fs::create_dir_all(dir.join("db")).map_err(|e| HarnessError::Io(format!("{dir:?}"), e))?;
        for (origin, text) in zone_files() {
            let path = dir.join(format!("{origin}.zone"));
            fs::write(&path, text).map_err(|e| HarnessError::Io(format!("{path:?}"), e))?;
        }
        let conf = dir.join("knot.conf");
        fs::write(&conf, knot_conf(&dir)).map_err(|e| HarnessError::Io(format!("{conf:?}"), e))?;
        for v6 in [false, true] {
            for proto in ["udp", "tcp"] {
                iptables(
                    &ns,
                    backend,
                    v6,
                    &[
                        "-A",
                        "INPUT",
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-m",
                        "comment",
                        "--comment",
                        COUNT_COMMENT,
                    ],
                )?;
            }
        }
        let mut pod = Self {
            ns,
            ips,
            dir,
            backend,
            knotd: None,
        };
        pod.start_server()?;
        Ok(pod)
    }

    /// Starts knotd (again) and waits until it answers.
    pub fn start_server(&mut self) -> Result<(), HarnessError> {
        if self.knotd.is_some() {
            return Ok(());
        }
        let log = fs::File::create(self.dir.join("knotd.log"))
            .map_err(|e| HarnessError::Io("knotd.log".into(), e))?;
        let conf = self.dir.join("knot.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name(), "knotd", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                command: "knotd".into(),
                source,
            })?;
        self.knotd = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let server = SocketAddr::new(self.ips[0], 53);
        loop {
            let ok = in_netns(&self.ns.path(), move || {
                query_udp(server, "www.example.com", 1, Duration::from_millis(200))
            })?;
            if matches!(ok, Ok(Answer { rcode: 0, .. })) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("knotd.log")).unwrap_or_default();
                return Err(HarnessError::Other(format!(
                    "knotd in {} not answering: {log}",
                    self.ns.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills knotd (SIGKILL, by PID): the pod is gone, its port unreachable.
    pub fn stop_server(&mut self) {
        if let Some(mut child) = self.knotd.take() {
            kill_child(&mut child);
        }
    }

    /// Starts counting the queries for `name` this pod receives (an INPUT rule matching the
    /// wire-encoded name, case-insensitively since resolvers may randomise case).
    pub fn count_name(&self, name: &str) -> Result<(), HarnessError> {
        let hex = wire_hex(name);
        let comment = name_comment(name);
        for v6 in [false, true] {
            for proto in ["udp", "tcp"] {
                iptables(
                    &self.ns,
                    self.backend,
                    v6,
                    &[
                        "-A",
                        "INPUT",
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-m",
                        "string",
                        "--algo",
                        "bm",
                        "--icase",
                        "--hex-string",
                        &hex,
                        "-m",
                        "comment",
                        "--comment",
                        &comment,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Queries for `name` received since `count_name(name)`.
    pub fn queries_for(&self, name: &str) -> Result<u64, HarnessError> {
        self.sum_counter(&name_comment(name))
    }

    /// Drops (`true`) or stops dropping every DNS packet this pod receives: an unreachable
    /// pod that sends no ICMP back, so clients see only timeouts.
    pub fn set_blackhole(&self, on: bool) -> Result<(), HarnessError> {
        let op = if on { "-I" } else { "-D" };
        for v6 in [false, true] {
            for proto in ["udp", "tcp"] {
                iptables(
                    &self.ns,
                    self.backend,
                    v6,
                    &[
                        op,
                        "INPUT",
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-m",
                        "comment",
                        "--comment",
                        "nlde-blackhole",
                        "-j",
                        "DROP",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Queries (udp+tcp, both families) this pod has received so far.
    pub fn queries_seen(&self) -> Result<u64, HarnessError> {
        self.sum_counter(COUNT_COMMENT)
    }

    fn sum_counter(&self, comment: &str) -> Result<u64, HarnessError> {
        let mut total = 0;
        for v6 in [false, true] {
            let out = iptables(
                &self.ns,
                self.backend,
                v6,
                &["-L", "INPUT", "-n", "-v", "-x"],
            )?;
            total += out
                .lines()
                .filter(|l| l.contains(&format!("/* {comment} */")))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        Ok(total)
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// Sum of the queries all cluster DNS pods have received.
pub fn total_queries(pods: &[ClusterDns]) -> Result<u64, HarnessError> {
    pods.iter().map(ClusterDns::queries_seen).sum()
}

fn name_comment(name: &str) -> String {
    format!("nlde-q:{}", name.trim_end_matches('.'))
}

/// `|03|web|07|default|…|00|`: the name as it appears in a query's question.
fn wire_hex(name: &str) -> String {
    let mut hex = String::new();
    for label in name.trim_end_matches('.').split('.') {
        hex.push_str(&format!("|{:02x}|{label}", label.len()));
    }
    hex.push_str("|00|");
    hex
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_matched_in_wire_format() {
        assert_eq!(
            super::wire_hex("web.default.svc"),
            "|03|web|07|default|03|svc|00|"
        );
    }
}
