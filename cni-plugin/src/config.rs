//! The plugin's stdin parsed and checked up front: the CNI envelope here, our entry's keys by
//! `settings::entry::PluginEntry`, the type the installer writes them with (unknown keys are
//! accepted: runtimes add `name`, `runtimeConfig`, and newer versions add more).

use std::path::PathBuf;
use std::time::Duration;

use node_setup::NodeConfig;
use serde::Deserialize;
use serde_json::value::RawValue;
use settings::entry::PluginEntry;
pub use settings::entry::{DEFAULT_LOG_FILE, FailurePolicy};

use crate::error::{CniError, DECODE_FAILURE, INVALID_CONFIG};

/// The keys of the CNI envelope around our entry.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    cni_version: Option<String>,
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
    serde_json::from_slice::<Envelope>(stdin).ok()?.cni_version
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(INVALID_CONFIG, msg)
}

/// Bad JSON is code 6; JSON of the wrong shape or with wrong values is code 7.
fn decode_error(e: serde_json::Error) -> CniError {
    if e.is_data() {
        invalid(format!("network config: {e}"))
    } else {
        CniError::new(
            DECODE_FAILURE,
            format!("network config is not valid JSON: {e}"),
        )
    }
}

/// Parses stdin: the envelope (`cniVersion`, `prevResult`), then our entry's keys, read by the
/// same type the installer writes them with.
pub fn parse(stdin: &[u8]) -> Result<PluginConfig, CniError> {
    let envelope: Envelope = serde_json::from_slice(stdin).map_err(decode_error)?;
    let cni_version = envelope
        .cni_version
        .ok_or_else(|| invalid("cniVersion missing"))?;
    let entry: PluginEntry = serde_json::from_slice(stdin).map_err(decode_error)?;
    let mut node = entry.node_config().map_err(|e| invalid(e.to_string()))?;
    // A pod start should not hang long on a stuck lock; the runtime retries ADD anyway.
    node.lock_timeout = Duration::from_secs(10);
    Ok(PluginConfig {
        cni_version,
        node,
        failure_policy: entry.failure_policy.unwrap_or_default(),
        log_file: entry.log_file.unwrap_or_else(|| DEFAULT_LOG_FILE.into()),
        stats_dir: entry
            .stats_dir
            .unwrap_or_else(|| node_setup::DEFAULT_STATS_DIR.into()),
        prev_result: envelope.prev_result.map(|r| r.get().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_setup::{IptablesBackend, SocketMatch};
    use std::net::IpAddr;

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
    fn the_entry_the_installer_writes_is_read_as_written() {
        let mut written = PluginEntry::new(
            vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            vec!["169.254.0.1".parse().unwrap()],
        );
        written.interface = "nld0".into();
        written.iptables = IptablesBackend::Nft;
        written.socket_match = SocketMatch::NoWildcard;
        // As the runtime passes it: the list's cniVersion and name around our entry.
        let mut stdin = written.to_value();
        stdin["cniVersion"] = "0.4.0".into();
        stdin["name"] = "k8s-pod-network".into();
        let c = parse(stdin.to_string().as_bytes()).unwrap();
        let mut expected = written.node_config().unwrap();
        expected.lock_timeout = Duration::from_secs(10);
        assert_eq!(c.node, expected);
        assert_eq!(c.node.interface, "nld0");
        assert_eq!(c.failure_policy, FailurePolicy::Open);
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
