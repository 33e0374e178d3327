//! The plugin's entry in the conflist, parsed and checked up front (unknown keys are accepted:
//! runtimes add `name`, `runtimeConfig`, `prevResult`, and newer versions add more).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use node_setup::NodeConfig;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{CniError, DECODE_FAILURE, INVALID_CONFIG};

pub const DEFAULT_LOG_FILE: &str = "/var/log/node-local-dns-cni.log";

/// What to do when node setup fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Log and count the failure; the pod still starts (kube-proxy's path still works).
    #[default]
    Open,
    /// Fail the ADD with code 11 so the runtime retries.
    Closed,
}

/// The conflist entry as it arrives on stdin (camelCase keys, all optional here so that
/// missing or mistyped values get our own error messages).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig<'a> {
    cni_version: Option<String>,
    #[serde(rename = "clusterDNS")]
    cluster_dns: Option<Vec<String>>,
    #[serde(rename = "localIPs")]
    local_ips: Option<Vec<String>>,
    interface: Option<String>,
    iptables: Option<String>,
    socket_match: Option<String>,
    failure_policy: Option<String>,
    log_file: Option<PathBuf>,
    /// Where the setup lock lives (default /run/node-local-dns/setup.lock).
    lock_file: Option<PathBuf>,
    /// Where the counters for the daemon live (default /run/node-local-dns).
    stats_dir: Option<PathBuf>,
    #[serde(borrow)]
    prev_result: Option<&'a RawValue>,
}

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub cni_version: String,
    pub node: NodeConfig,
    pub failure_policy: FailurePolicy,
    pub log_file: PathBuf,
    pub stats_dir: PathBuf,
    /// `prevResult` exactly as received.
    pub prev_result: Option<String>,
}

/// Only the version, for VERSION and for choosing the error's `cniVersion`.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<V>(stdin).ok()?.cni_version
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(INVALID_CONFIG, msg)
}

fn parse_ips(key: &str, values: &[String]) -> Result<Vec<IpAddr>, CniError> {
    values
        .iter()
        .map(|v| {
            v.trim()
                .parse::<IpAddr>()
                .map_err(|_| invalid(format!("{key}: {v:?} is not an IP address")))
        })
        .collect()
}

/// A named setting (`iptables`, `socketMatch`): its node-setup default when absent.
fn parse_setting<T>(key: &str, v: Option<&str>) -> Result<T, CniError>
where
    T: std::str::FromStr<Err = node_setup::UnknownSetting> + Default,
{
    v.map_or(Ok(T::default()), |v| {
        v.parse().map_err(|e| invalid(format!("{key}: {e}")))
    })
}

fn parse_policy(v: Option<&str>) -> Result<FailurePolicy, CniError> {
    match v.unwrap_or("open") {
        "open" => Ok(FailurePolicy::Open),
        "closed" => Ok(FailurePolicy::Closed),
        other => Err(invalid(format!(
            "failurePolicy: {other:?} is not one of \"open\", \"closed\""
        ))),
    }
}

/// Parses stdin: bad JSON is code 6, wrong or missing values are code 7.
pub fn parse(stdin: &[u8]) -> Result<PluginConfig, CniError> {
    let raw: RawConfig = serde_json::from_slice(stdin).map_err(|e| {
        if e.is_data() {
            invalid(format!("network config: {e}"))
        } else {
            CniError::new(
                DECODE_FAILURE,
                format!("network config is not valid JSON: {e}"),
            )
        }
    })?;
    let cni_version = raw
        .cni_version
        .clone()
        .ok_or_else(|| invalid("cniVersion missing"))?;
    let cluster_dns = match &raw.cluster_dns {
        Some(list) if !list.is_empty() => parse_ips("clusterDNS", list)?,
        _ => {
            return Err(invalid(
                "clusterDNS (list of kube-dns ClusterIPs) is required",
            ));
        }
    };
    let mut node = NodeConfig::new(cluster_dns);
    if let Some(list) = &raw.local_ips {
        node.local_ips = parse_ips("localIPs", list)?;
    }
    if let Some(name) = &raw.interface {
        node.interface = name.clone();
    }
    node.backend = parse_setting("iptables", raw.iptables.as_deref())?;
    node.socket_match = parse_setting("socketMatch", raw.socket_match.as_deref())?;
    if let Some(path) = &raw.lock_file {
        node.lock_path = path.clone();
    }
    // A pod start should not hang long on a stuck lock; the runtime retries ADD anyway.
    node.lock_timeout = Duration::from_secs(10);
    node.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(PluginConfig {
        cni_version,
        node,
        failure_policy: parse_policy(raw.failure_policy.as_deref())?,
        log_file: raw.log_file.unwrap_or_else(|| DEFAULT_LOG_FILE.into()),
        stats_dir: raw
            .stats_dir
            .unwrap_or_else(|| node_setup::DEFAULT_STATS_DIR.into()),
        prev_result: raw.prev_result.map(|r| r.get().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_setup::{IptablesBackend, SocketMatch};

    fn conf(extra: &str) -> String {
        format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"node-local-dns"{extra}}}"#)
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_accepted() {
        let c = parse(conf(r#","clusterDNS":["10.96.0.10"],"someFutureKey":{"x":1}"#).as_bytes())
            .unwrap();
        assert_eq!(c.node.interface, "nodelocaldns");
        assert_eq!(
            c.node.local_ips,
            vec!["169.254.20.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.node.backend, IptablesBackend::Auto);
        assert_eq!(c.node.socket_match, SocketMatch::Safe);
        assert_eq!(c.failure_policy, FailurePolicy::Open);
        assert_eq!(c.log_file, PathBuf::from(DEFAULT_LOG_FILE));
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            conf(
                r#","clusterDNS":["10.96.0.10","fd00::a"],"localIPs":["169.254.0.1"],
                "interface":"nld0","iptables":"legacy","socketMatch":"nowildcard",
                "failurePolicy":"closed","logFile":"/tmp/x.log","prevResult":{"a": 1}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.node.cluster_dns.len(), 2);
        assert_eq!(c.node.interface, "nld0");
        assert_eq!(c.node.backend, IptablesBackend::Legacy);
        assert_eq!(c.node.socket_match, SocketMatch::NoWildcard);
        assert_eq!(c.failure_policy, FailurePolicy::Closed);
        assert_eq!(c.prev_result.as_deref(), Some(r#"{"a": 1}"#));
    }

    #[test]
    fn bad_json_is_code_6_and_bad_values_are_code_7() {
        assert_eq!(parse(b"{not json").unwrap_err().code, DECODE_FAILURE);
        for bad in [
            "",
            r#","clusterDNS":[]"#,
            r#","clusterDNS":["10.96.0.300"]"#,
            r#","clusterDNS":"10.96.0.10""#,
            r#","clusterDNS":["10.96.0.10"],"iptables":"nf""#,
            r#","clusterDNS":["10.96.0.10"],"socketMatch":"x""#,
            r#","clusterDNS":["10.96.0.10"],"failurePolicy":"x""#,
            r#","clusterDNS":["10.96.0.10"],"interface":"much-too-long-name""#,
            r#","clusterDNS":["10.96.0.10"],"localIPs":["x"]"#,
        ] {
            let err = parse(conf(bad).as_bytes()).unwrap_err();
            assert_eq!(err.code, INVALID_CONFIG, "{bad}: {err}");
        }
    }
}
