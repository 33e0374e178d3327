//! The desired node state as plain data, and the comparison with what is observed.
//!
//! Rules are kept in the exact form `iptables-save` prints them (identical for the legacy and
//! nft backends, verified on iptables 1.8.9), so one `-save` per family answers "is everything
//! in place" without a `-C` call per rule.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::{Missing, NodeConfig, SocketMatch};

/// Every rule we own carries a comment starting with this, so it can be found, checked and
/// removed again (uninstall, config changes). Never change it: upgrades depend on it.
pub const COMMENT_PREFIX: &str = "node-local-dns:";
/// The NodeLocal DNSCache addon (kubernetes/dns `node-cache`) tags its rules with this
/// (docs/addon-migration.md lists them).
pub const ADDON_COMMENT_PREFIX: &str = "NodeLocal DNS Cache:";
pub const TABLE: &str = "raw";
pub const PREROUTING: &str = "PREROUTING";
pub const OUTPUT: &str = "OUTPUT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// One raw-table rule, as the arguments after `-A <chain>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub family: Family,
    pub chain: &'static str,
    pub args: Vec<String>,
}

impl Rule {
    /// The rule as `iptables-save` prints it after `-A <chain> ` (comment quoted).
    pub fn save_spec(&self) -> String {
        let quoted: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("\"{a}\"")
                } else {
                    a.clone()
                }
            })
            .collect();
        quoted.join(" ")
    }

    /// PREROUTING rules must stay above every other rule (docs/design-facts.md §1): an ACCEPT above them
    /// would silently disable the cache.
    pub fn must_be_first(&self) -> bool {
        self.chain == PREROUTING
    }

    fn to_missing(&self, not_first: bool) -> Missing {
        let (table, chain, spec) = (TABLE.to_string(), self.chain.to_string(), self.save_spec());
        if not_first {
            Missing::RuleNotFirst { table, chain, spec }
        } else {
            Missing::Rule { table, chain, spec }
        }
    }
}

/// One address to carry, with its host prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub prefix: u8,
}

/// Everything `ensure_node` makes true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub interface: String,
    pub addresses: Vec<Address>,
    pub rules: Vec<Rule>,
    /// The kube-dns ClusterIPs: another product's unconditional NOTRACK for DNS to one of
    /// them defeats the fallback and is removed.
    pub cluster_ips: Vec<IpAddr>,
}

impl DesiredState {
    pub fn from_config(cfg: &NodeConfig) -> DesiredState {
        let mut addresses: Vec<Address> = Vec::new();
        for ip in cfg.cluster_dns.iter().chain(cfg.local_ips.iter()) {
            let addr = Address {
                ip: *ip,
                prefix: Family::of(ip).host_prefix(),
            };
            if !addresses.contains(&addr) {
                addresses.push(addr);
            }
        }
        let mut rules = Vec::new();
        for ip in &cfg.cluster_dns {
            for proto in ["udp", "tcp"] {
                let rule = prerouting_rule(*ip, proto, cfg.socket_match);
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
        }
        for ip in &cfg.cluster_dns {
            for proto in ["udp", "tcp"] {
                let rule = output_rule(*ip, proto);
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
        }
        DesiredState {
            interface: cfg.interface.clone(),
            addresses,
            rules,
            cluster_ips: cfg.cluster_dns.clone(),
        }
    }

    /// Families that need rules (those with a ClusterIP).
    pub fn rule_families(&self) -> BTreeSet<Family> {
        self.rules.iter().map(|r| r.family).collect()
    }

    pub fn rules_of(&self, family: Family) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(move |r| r.family == family)
    }
}

fn host(ip: IpAddr) -> String {
    format!("{ip}/{}", Family::of(&ip).host_prefix())
}

/// `-d CLUSTER_IP -p PROTO --dport 53 -m socket -j NOTRACK`: untracked (so kube-proxy's DNAT is
/// skipped) only while a socket is bound to CLUSTER_IP:53, i.e. while the cache runs.
pub fn prerouting_rule(ip: IpAddr, proto: &str, socket_match: SocketMatch) -> Rule {
    let mut args: Vec<String> = [
        "-d",
        &host(ip),
        "-p",
        proto,
        "-m",
        proto,
        "--dport",
        "53",
        "-m",
        "socket",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if socket_match == SocketMatch::NoWildcard {
        args.push("--nowildcard".into());
    }
    let comment =
        format!("{COMMENT_PREFIX} {proto} to {ip} goes to the local cache when it listens");
    args.extend(["-m".into(), "comment".into(), "--comment".into(), comment]);
    args.extend(["-j".into(), "NOTRACK".into()]);
    Rule {
        family: Family::of(&ip),
        chain: PREROUTING,
        args,
    }
}

/// `-s CLUSTER_IP -p PROTO --sport 53 -j NOTRACK`: the cache's replies create no conntrack
/// entries that would later break the fallback path (docs/design-facts.md §1).
pub fn output_rule(ip: IpAddr, proto: &str) -> Rule {
    let comment = format!("{COMMENT_PREFIX} {proto} replies from {ip} are not tracked");
    let args = [
        "-s",
        &host(ip),
        "-p",
        proto,
        "-m",
        proto,
        "--sport",
        "53",
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "NOTRACK",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Rule {
        family: Family::of(&ip),
        chain: OUTPUT,
        args,
    }
}

/// One `-A` line of `iptables-save -t raw`, split into chain and spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    pub spec: String,
}

impl SavedRule {
    pub fn is_ours(&self) -> bool {
        self.has_comment_prefix(COMMENT_PREFIX)
    }

    /// Written by the NodeLocal DNSCache addon.
    pub fn is_addon(&self) -> bool {
        self.has_comment_prefix(ADDON_COMMENT_PREFIX)
    }

    fn has_comment_prefix(&self, prefix: &str) -> bool {
        self.spec.contains(&format!("--comment \"{prefix}"))
    }

    /// The addon's NOTRACK for DNS to a kube-dns ClusterIP with no socket match (its raw
    /// PREROUTING rule for pods, its raw OUTPUT rule for hostNetwork clients). Once its cache
    /// is gone that rule still skips kube-proxy's DNAT, so DNS to the ClusterIP is delivered
    /// to a port nobody listens on: it defeats our fallback (docs/design-facts.md §1), and in OUTPUT
    /// it also loops our own upstream queries back to the node. The addon's other rules (for
    /// its link-local address, for replies, for its health port) do no harm beside ours.
    pub fn is_addon_cluster_dns_blackhole(&self, cluster_ips: &[IpAddr]) -> bool {
        let args: Vec<&str> = self.spec.split_whitespace().collect();
        let follows = |flag: &str, value: &str| args.windows(2).any(|w| w == [flag, value]);
        let to_cluster_ip = cluster_ips.iter().any(|ip| follows("-d", &host(*ip)));
        let notrack =
            follows("-j", "NOTRACK") || (follows("-j", "CT") && args.contains(&"--notrack"));
        self.is_addon()
            && (self.chain == PREROUTING || self.chain == OUTPUT)
            && to_cluster_ip
            && follows("--dport", "53")
            && !follows("-m", "socket")
            && notrack
    }
}

/// Parses `iptables-save -t raw` output into its rules, in order.
pub fn parse_save(text: &str) -> Vec<SavedRule> {
    text.lines()
        .filter_map(|line| line.strip_prefix("-A "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(chain, spec)| SavedRule {
            chain: chain.to_string(),
            spec: spec.trim_end().to_string(),
        })
        .collect()
}

/// What is wrong with one family's raw table compared with the desired rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleDiff {
    /// Desired rules not present at all.
    pub absent: Vec<Rule>,
    /// PREROUTING must be rebuilt: some of ours are below a foreign rule or duplicated.
    pub prerouting_misplaced: bool,
    /// Duplicated OUTPUT rules.
    pub output_duplicated: Vec<Rule>,
    /// Rules tagged as ours that the config no longer wants (old ClusterIP, other socketMatch).
    pub unwanted: Vec<SavedRule>,
    /// Another product's rules that defeat our fallback (the addon's unconditional NOTRACK
    /// for DNS to the ClusterIP): removed.
    pub foreign: Vec<SavedRule>,
}

impl RuleDiff {
    pub fn is_clean(&self) -> bool {
        self.absent.is_empty()
            && !self.prerouting_misplaced
            && self.output_duplicated.is_empty()
            && self.unwanted.is_empty()
            && self.foreign.is_empty()
    }
}

/// Compares one family's desired rules with its `-save` output; `cluster_ips` are the
/// ClusterIPs whose DNS another product's rules must not blackhole.
pub fn diff_rules(desired: &[&Rule], cluster_ips: &[IpAddr], saved: &[SavedRule]) -> RuleDiff {
    let count = |rule: &Rule| {
        let spec = rule.save_spec();
        saved
            .iter()
            .filter(|s| s.chain == rule.chain && s.spec == spec)
            .count()
    };
    let mut diff = RuleDiff::default();
    for rule in desired {
        let n = count(rule);
        if n == 0 {
            diff.absent.push((*rule).clone());
        } else if n > 1 && !rule.must_be_first() {
            diff.output_duplicated.push((*rule).clone());
        }
    }
    diff.prerouting_misplaced = prerouting_misplaced(desired, saved);
    diff.unwanted = saved
        .iter()
        .filter(|s| s.is_ours())
        .filter(|s| {
            !desired
                .iter()
                .any(|r| r.chain == s.chain && r.save_spec() == s.spec)
        })
        .cloned()
        .collect();
    diff.foreign = saved
        .iter()
        .filter(|s| s.is_addon_cluster_dns_blackhole(cluster_ips))
        .cloned()
        .collect();
    diff
}

/// True when the present PREROUTING rules of ours are not exactly the top of the chain, once
/// each. Absent ones are reported separately; they are inserted at the top anyway.
fn prerouting_misplaced(desired: &[&Rule], saved: &[SavedRule]) -> bool {
    let wanted: Vec<String> = desired
        .iter()
        .filter(|r| r.must_be_first())
        .map(|r| r.save_spec())
        .collect();
    let chain: Vec<&SavedRule> = saved.iter().filter(|s| s.chain == PREROUTING).collect();
    let present: Vec<&String> = wanted
        .iter()
        .filter(|w| chain.iter().any(|s| &&s.spec == w))
        .collect();
    let top = &chain[..present.len().min(chain.len())];
    let each_once = present
        .iter()
        .all(|w| chain.iter().filter(|s| &&s.spec == w).count() == 1);
    let all_on_top = present.iter().all(|w| top.iter().any(|s| &&s.spec == w));
    !(each_once && all_on_top)
}

/// Turns a rule diff into the public `Missing` list.
pub fn rule_diff_to_missing(diff: &RuleDiff, desired: &[&Rule]) -> Vec<Missing> {
    let mut out: Vec<Missing> = diff.absent.iter().map(|r| r.to_missing(false)).collect();
    if diff.prerouting_misplaced {
        out.extend(
            desired
                .iter()
                .filter(|r| r.must_be_first() && !diff.absent.contains(r))
                .map(|r| r.to_missing(true)),
        );
    }
    out.extend(
        diff.output_duplicated
            .iter()
            .map(|r| Missing::RuleDuplicated {
                table: TABLE.into(),
                chain: r.chain.into(),
                spec: r.save_spec(),
            }),
    );
    out.extend(diff.unwanted.iter().map(|s| Missing::UnwantedRule {
        table: TABLE.into(),
        chain: s.chain.clone(),
        spec: s.spec.clone(),
    }));
    out.extend(diff.foreign.iter().map(|s| Missing::ForeignRule {
        table: TABLE.into(),
        chain: s.chain.clone(),
        spec: s.spec.clone(),
    }));
    out
}
