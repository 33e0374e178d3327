//! What can go wrong (`SetupError`) and what can be missing (`Missing`) in the node state.

use std::net::IpAddr;
use std::path::PathBuf;

/// A node-setup step that failed. Each variant names the step, so the log line alone tells
/// the operator what to look at.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("lock {path}: {msg}")]
    AcquireLock { path: PathBuf, msg: String },
    #[error("interface {name}: {msg}")]
    AddInterface { name: String, msg: String },
    #[error("address {addr}: {msg}")]
    AddAddress { addr: IpAddr, msg: String },
    #[error("iptables ({cmd}): {msg}")]
    RunIptables { cmd: String, msg: String },
    #[error("netlink: {request}: {msg}")]
    NetlinkRequest { request: String, msg: String },
    #[error("invalid node config: {0}")]
    InvalidConfig(String),
}

impl SetupError {
    /// `errortype` label of `coredns_nodecache_setup_errors_total`. Operators chart and alert
    /// on these values: never change them.
    pub fn kind(&self) -> &'static str {
        match self {
            SetupError::AcquireLock { .. } => "lock",
            SetupError::AddInterface { .. } => "interface_add",
            SetupError::AddAddress { .. } => "address_add",
            SetupError::RunIptables { .. } => "iptables",
            SetupError::NetlinkRequest { .. } => "netlink",
            SetupError::InvalidConfig(_) => "config",
        }
    }
}

/// One piece of desired state that is not in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Interface(String),
    Address(IpAddr),
    /// Rule described as its iptables arguments (table, chain, spec).
    Rule {
        table: String,
        chain: String,
        spec: String,
    },
    /// Rule present but not at the top of its chain (or present more than once there).
    RuleNotFirst {
        table: String,
        chain: String,
        spec: String,
    },
    /// Rule present more than once.
    RuleDuplicated {
        table: String,
        chain: String,
        spec: String,
    },
    /// A rule tagged as ours that the configuration does not want (old ClusterIP, other
    /// socketMatch): `ensure_node` deletes it.
    UnwantedRule {
        table: String,
        chain: String,
        spec: String,
    },
    /// Another product's rule that defeats the fallback to kube-proxy (the NodeLocal
    /// DNSCache addon's NOTRACK for DNS to the ClusterIP without a socket match): pod DNS is
    /// blackholed whenever no cache listens. `ensure_node` deletes it.
    ForeignRule {
        table: String,
        chain: String,
        spec: String,
    },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Interface(name) => write!(f, "interface {name} missing"),
            Missing::Address(ip) => write!(f, "address {ip} missing"),
            Missing::Rule { table, chain, spec } => {
                write!(f, "rule missing: -t {table} -A {chain} {spec}")
            }
            Missing::RuleNotFirst { table, chain, spec } => {
                write!(f, "rule not at the top: -t {table} -A {chain} {spec}")
            }
            Missing::RuleDuplicated { table, chain, spec } => {
                write!(f, "rule duplicated: -t {table} -A {chain} {spec}")
            }
            Missing::UnwantedRule { table, chain, spec } => {
                write!(f, "stale rule: -t {table} -A {chain} {spec}")
            }
            Missing::ForeignRule { table, chain, spec } => {
                write!(
                    f,
                    "foreign rule blackholes DNS when no cache listens: -t {table} -A {chain} {spec}"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric label values are a published interface.
    #[test]
    fn error_kinds_are_the_published_label_values() {
        let path = PathBuf::from("/run/x.lock");
        let addr: IpAddr = "10.96.0.10".parse().unwrap();
        let s = String::new;
        let all = [
            SetupError::AcquireLock { path, msg: s() },
            SetupError::AddInterface {
                name: s(),
                msg: s(),
            },
            SetupError::AddAddress { addr, msg: s() },
            SetupError::RunIptables { cmd: s(), msg: s() },
            SetupError::NetlinkRequest {
                request: s(),
                msg: s(),
            },
            SetupError::InvalidConfig(s()),
        ];
        let kinds: Vec<&str> = all.iter().map(SetupError::kind).collect();
        assert_eq!(
            kinds,
            [
                "lock",
                "interface_add",
                "address_add",
                "iptables",
                "netlink",
                "config"
            ]
        );
    }

    #[test]
    fn messages_name_what_failed() {
        let e = SetupError::NetlinkRequest {
            request: "get link nodelocaldns".into(),
            msg: "EPERM".into(),
        };
        assert_eq!(e.to_string(), "netlink: get link nodelocaldns: EPERM");
        let m = Missing::Address("10.96.0.10".parse().unwrap());
        assert_eq!(m.to_string(), "address 10.96.0.10 missing");
    }
}
