//! The plugin's entry in a conflist: one type with the keys the installer writes and the
//! plugin reads, so the two cannot drift apart.
//!
//! ```json
//! {"type": "node-local-dns", "clusterDNS": ["10.96.0.10"], "localIPs": ["169.254.20.10"],
//!  "interface": "nodelocaldns", "iptables": "auto", "socketMatch": "safe"}
//! ```
//!
//! The installer owns the keys above and rewrites them; `failurePolicy`, `logFile`,
//! `lockFile` and `statsDir` are read by the plugin but left to the operator (never written
//! unless set). The plugin accepts unknown keys: runtimes add `name`, `runtimeConfig`,
//! `prevResult`, and newer CNI versions add more.

use std::net::IpAddr;
use std::path::PathBuf;

use node_setup::{IptablesBackend, NodeConfig, Setting, SocketMatch, UnknownSetting};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `type` of the entry; how the runtime finds the plugin binary and the installer finds
/// its entry again in any conflist.
pub const PLUGIN_TYPE: &str = "node-local-dns";

/// What the plugin does when node setup fails (`failurePolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Log and count the failure; the pod still starts (kube-proxy's path still works).
    #[default]
    Open,
    /// Fail the ADD with code 11 so the runtime retries.
    Closed,
}

impl Setting for FailurePolicy {
    const NAMES: &'static [&'static str] = &["open", "closed"];
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Open => "open",
            FailurePolicy::Closed => "closed",
        }
    }
}

impl std::str::FromStr for FailurePolicy {
    type Err = UnknownSetting;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(FailurePolicy::Open),
            "closed" => Ok(FailurePolicy::Closed),
            _ => Err(UnknownSetting {
                value: s.to_string(),
                allowed: Self::NAMES,
            }),
        }
    }
}

/// The entry as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawEntry", into = "RawEntry")]
pub struct PluginEntry {
    /// `clusterDNS` (required): the kube-dns ClusterIP(s).
    pub cluster_dns: Vec<IpAddr>,
    /// `localIPs`, default `["169.254.20.10"]`.
    pub local_ips: Vec<IpAddr>,
    /// `interface`, default `nodelocaldns`.
    pub interface: String,
    /// `iptables`: `auto` | `legacy` | `nft`.
    pub iptables: IptablesBackend,
    /// `socketMatch`: `safe` | `nowildcard`.
    pub socket_match: SocketMatch,
    /// `failurePolicy`: `open` (default) | `closed`.
    pub failure_policy: Option<FailurePolicy>,
    /// `logFile`, default [`DEFAULT_LOG_FILE`].
    pub log_file: Option<PathBuf>,
    /// `lockFile`, default node-setup's lock path.
    pub lock_file: Option<PathBuf>,
    /// `statsDir`, default node-setup's stats dir.
    pub stats_dir: Option<PathBuf>,
}

pub const DEFAULT_LOG_FILE: &str = "/var/log/node-local-dns-cni.log";

/// Why an entry cannot be used (the plugin answers CNI code 7 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("clusterDNS (list of kube-dns ClusterIPs) is required")]
    NoClusterDns,
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("{0}")]
    Node(String),
}

impl PluginEntry {
    /// An entry with node-setup's defaults for everything but the addresses.
    pub fn new(cluster_dns: Vec<IpAddr>, local_ips: Vec<IpAddr>) -> Self {
        Self {
            cluster_dns,
            local_ips,
            interface: node_setup::DEFAULT_INTERFACE.to_string(),
            iptables: IptablesBackend::default(),
            socket_match: SocketMatch::default(),
            failure_policy: None,
            log_file: None,
            lock_file: None,
            stats_dir: None,
        }
    }

    /// The entry as JSON, `type` first, then the keys in a fixed order; unset optional keys
    /// are left out.
    pub fn to_value(&self) -> Value {
        // Cannot fail: the raw form holds strings and lists of strings only.
        serde_json::to_value(RawEntry::from(self.clone())).unwrap_or_default()
    }

    /// The node state the entry asks for, checked as the plugin checks it on every ADD (so
    /// the installer writes only entries the plugin can use).
    pub fn node_config(&self) -> Result<NodeConfig, EntryError> {
        let mut cfg = NodeConfig::new(self.cluster_dns.clone());
        cfg.local_ips = self.local_ips.clone();
        cfg.interface = self.interface.clone();
        cfg.backend = self.iptables;
        cfg.socket_match = self.socket_match;
        if let Some(lock) = &self.lock_file {
            cfg.lock_path = lock.clone();
        }
        cfg.validate()
            .map_err(|e| EntryError::Node(e.to_string()))?;
        Ok(cfg)
    }

    /// The ClusterIPs of an installed entry, however broken its other keys (uninstall's node
    /// teardown needs them even from an entry the plugin would refuse).
    pub fn cluster_dns_of(entry: &Value) -> Vec<IpAddr> {
        RawEntry::deserialize(entry)
            .ok()
            .and_then(|raw| raw.cluster_dns)
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.trim().parse().ok())
            .collect()
    }
}

/// The keys as they appear in JSON; every value a string so wrong ones get our messages.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEntry {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    plugin_type: Option<String>,
    #[serde(rename = "clusterDNS", skip_serializing_if = "Option::is_none")]
    cluster_dns: Option<Vec<String>>,
    #[serde(rename = "localIPs", skip_serializing_if = "Option::is_none")]
    local_ips: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iptables: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_match: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lock_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats_dir: Option<PathBuf>,
}

impl From<PluginEntry> for RawEntry {
    fn from(e: PluginEntry) -> Self {
        let ips = |ips: &[IpAddr]| Some(ips.iter().map(IpAddr::to_string).collect());
        RawEntry {
            plugin_type: Some(PLUGIN_TYPE.to_string()),
            cluster_dns: ips(&e.cluster_dns),
            local_ips: ips(&e.local_ips),
            interface: Some(e.interface),
            iptables: Some(e.iptables.as_str().to_string()),
            socket_match: Some(e.socket_match.as_str().to_string()),
            failure_policy: e.failure_policy.map(|p| p.as_str().to_string()),
            log_file: e.log_file,
            lock_file: e.lock_file,
            stats_dir: e.stats_dir,
        }
    }
}

impl TryFrom<RawEntry> for PluginEntry {
    type Error = EntryError;

    fn try_from(raw: RawEntry) -> Result<Self, EntryError> {
        let cluster_dns = match raw.cluster_dns.as_deref() {
            Some(list) if !list.is_empty() => parse_ips("clusterDNS", list)?,
            _ => return Err(EntryError::NoClusterDns),
        };
        let mut entry = PluginEntry::new(cluster_dns, default_local_ips());
        if let Some(list) = raw.local_ips.as_deref() {
            entry.local_ips = parse_ips("localIPs", list)?;
        }
        if let Some(name) = raw.interface {
            entry.interface = name;
        }
        entry.iptables = parse_setting("iptables", raw.iptables.as_deref())?;
        entry.socket_match = parse_setting("socketMatch", raw.socket_match.as_deref())?;
        entry.failure_policy = raw
            .failure_policy
            .as_deref()
            .map(|v| parse_setting("failurePolicy", Some(v)))
            .transpose()?;
        entry.log_file = raw.log_file;
        entry.lock_file = raw.lock_file;
        entry.stats_dir = raw.stats_dir;
        Ok(entry)
    }
}

fn default_local_ips() -> Vec<IpAddr> {
    vec![IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 20, 10))]
}

fn parse_ips(key: &'static str, values: &[String]) -> Result<Vec<IpAddr>, EntryError> {
    values
        .iter()
        .map(|v| {
            v.trim().parse().map_err(|_| EntryError::Invalid {
                key,
                reason: format!("{v:?} is not an IP address"),
            })
        })
        .collect()
}

/// A named setting: its default when absent.
fn parse_setting<T: Setting + Default>(
    key: &'static str,
    v: Option<&str>,
) -> Result<T, EntryError> {
    v.map_or(Ok(T::default()), |v| {
        v.parse().map_err(|e: UnknownSetting| EntryError::Invalid {
            key,
            reason: e.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn read(v: Value) -> Result<PluginEntry, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn the_default_local_ip_is_node_setups() {
        assert_eq!(default_local_ips(), vec![ip(node_setup::DEFAULT_LOCAL_IP)]);
    }

    #[test]
    fn what_the_installer_writes_the_plugin_reads_back() {
        let mut written = PluginEntry::new(
            vec![ip("10.96.0.10"), ip("fd00::a")],
            vec![ip("169.254.0.1")],
        );
        written.interface = "nld0".into();
        written.iptables = IptablesBackend::Nft;
        written.socket_match = SocketMatch::NoWildcard;
        let text = serde_json::to_string(&written.to_value()).unwrap();
        let read_back: PluginEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(read_back, written);

        let mut all = written.clone();
        all.failure_policy = Some(FailurePolicy::Closed);
        all.log_file = Some("/tmp/x.log".into());
        all.lock_file = Some("/tmp/x.lock".into());
        all.stats_dir = Some("/tmp/stats".into());
        assert_eq!(read(all.to_value()), Ok(all));
    }

    #[test]
    fn keys_are_written_type_first_and_unset_options_left_out() {
        let entry = PluginEntry::new(vec![ip("10.96.0.10")], vec![ip("169.254.20.10")]);
        let v = entry.to_value();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "type",
                "clusterDNS",
                "localIPs",
                "interface",
                "iptables",
                "socketMatch"
            ]
        );
        assert_eq!(
            v,
            json!({"type": "node-local-dns", "clusterDNS": ["10.96.0.10"],
                   "localIPs": ["169.254.20.10"], "interface": "nodelocaldns",
                   "iptables": "auto", "socketMatch": "safe"})
        );
    }

    #[test]
    fn absent_keys_get_defaults_and_unknown_keys_are_accepted() {
        let entry = read(json!({"cniVersion": "1.0.0", "type": "node-local-dns",
            "clusterDNS": ["10.96.0.10"], "prevResult": {"ips": []}, "future": 1}))
        .unwrap();
        assert_eq!(
            entry,
            PluginEntry::new(vec![ip("10.96.0.10")], default_local_ips())
        );
    }

    #[test]
    fn wrong_values_name_their_key() {
        for (doc, says) in [
            (
                json!({}),
                "clusterDNS (list of kube-dns ClusterIPs) is required",
            ),
            (json!({"clusterDNS": []}), "clusterDNS (list"),
            (
                json!({"clusterDNS": ["10.96.0.300"]}),
                "clusterDNS: \"10.96.0.300\" is not an IP",
            ),
            (
                json!({"clusterDNS": ["10.96.0.10"], "localIPs": ["x"]}),
                "localIPs: \"x\"",
            ),
            (
                json!({"clusterDNS": ["10.96.0.10"], "iptables": "nf"}),
                "iptables: \"nf\"",
            ),
            (
                json!({"clusterDNS": ["10.96.0.10"], "socketMatch": "x"}),
                "socketMatch: \"x\"",
            ),
            (
                json!({"clusterDNS": ["10.96.0.10"], "failurePolicy": "x"}),
                "failurePolicy: \"x\" is not one of \"open\", \"closed\"",
            ),
            (json!({"clusterDNS": "10.96.0.10"}), "invalid type"),
        ] {
            let err = read(doc.clone()).expect_err(&doc.to_string());
            assert!(err.contains(says), "{doc}: {err}");
        }
    }

    #[test]
    fn the_node_config_is_checked_as_the_plugin_checks_it() {
        let mut entry = PluginEntry::new(vec![ip("10.96.0.10")], default_local_ips());
        entry.lock_file = Some("/tmp/l.lock".into());
        let cfg = entry.node_config().unwrap();
        assert_eq!(cfg.lock_path, PathBuf::from("/tmp/l.lock"));
        entry.interface = "much-too-long-name".into();
        assert!(
            matches!(entry.node_config(), Err(EntryError::Node(m)) if m.contains("interface name"))
        );
    }

    #[test]
    fn cluster_dns_is_read_back_from_any_entry() {
        let entry = PluginEntry::new(vec![ip("10.96.0.10"), ip("fd00::a")], default_local_ips());
        assert_eq!(
            PluginEntry::cluster_dns_of(&entry.to_value()),
            entry.cluster_dns
        );
        let broken =
            json!({"type": "node-local-dns", "clusterDNS": ["10.96.0.10", "x"], "iptables": "?"});
        assert_eq!(PluginEntry::cluster_dns_of(&broken), vec![ip("10.96.0.10")]);
        assert!(PluginEntry::cluster_dns_of(&json!({"type": "node-local-dns"})).is_empty());
        assert!(PluginEntry::cluster_dns_of(&json!({"clusterDNS": "x"})).is_empty());
    }
}
