//! The desired node state as the callers give it (`NodeConfig`), its defaults and the checks
//! that reject what the kernel would reject later with a less clear message.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::SetupError;
use crate::setting::{IptablesBackend, SocketMatch};

pub const DEFAULT_INTERFACE: &str = "nodelocaldns";
pub const DEFAULT_LOCAL_IP: &str = "169.254.20.10";
pub const DEFAULT_LOCK_PATH: &str = "/run/node-local-dns/setup.lock";
pub const DEFAULT_STATS_DIR: &str = "/run/node-local-dns";

/// IFNAMSIZ is 16 including the NUL.
const MAX_INTERFACE_NAME: usize = 15;

/// Desired node state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub interface: String,
    /// kube-dns ClusterIPs (one per family).
    pub cluster_dns: Vec<IpAddr>,
    /// Link-local listen addresses (default 169.254.20.10).
    pub local_ips: Vec<IpAddr>,
    pub backend: IptablesBackend,
    pub socket_match: SocketMatch,
    pub lock_path: PathBuf,
    pub lock_timeout: Duration,
}

impl NodeConfig {
    /// Defaults for everything but the ClusterIPs.
    pub fn new(cluster_dns: Vec<IpAddr>) -> Self {
        Self {
            interface: DEFAULT_INTERFACE.to_string(),
            cluster_dns,
            local_ips: vec![IpAddr::from([169, 254, 20, 10])],
            backend: IptablesBackend::Auto,
            socket_match: SocketMatch::Safe,
            lock_path: PathBuf::from(DEFAULT_LOCK_PATH),
            lock_timeout: Duration::from_secs(5),
        }
    }

    /// Rejects what the kernel would reject later with a less clear message.
    pub fn validate(&self) -> Result<(), SetupError> {
        let name = &self.interface;
        if !is_interface_name(name) {
            return Err(SetupError::InvalidConfig(format!(
                "interface name {name:?} is not a valid Linux interface name (1-15 characters, no '/' or spaces)"
            )));
        }
        if self.cluster_dns.is_empty() {
            return Err(SetupError::InvalidConfig(
                "no kube-dns ClusterIP given".into(),
            ));
        }
        Ok(())
    }
}

fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME
        && !name.contains(['/', ' ', '\0'])
        && name != "."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cluster: &[&str]) -> NodeConfig {
        NodeConfig::new(cluster.iter().map(|s| s.parse().unwrap()).collect())
    }

    #[test]
    fn invalid_config_is_rejected_with_a_clear_error() {
        let mut c = cfg(&["10.96.0.10"]);
        c.interface = "a-name-longer-than-15".into();
        let err = c.validate().unwrap_err();
        assert_eq!(err.kind(), "config");
        assert!(err.to_string().contains("a-name-longer-than-15"), "{err}");
        assert_eq!(cfg(&[]).validate().unwrap_err().kind(), "config");
    }

    #[test]
    fn defaults_are_valid_and_match_their_constants() {
        let c = cfg(&["10.96.0.10"]);
        c.validate().unwrap();
        assert_eq!(c.interface, DEFAULT_INTERFACE);
        assert_eq!(
            c.local_ips,
            vec![DEFAULT_LOCAL_IP.parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.lock_path, PathBuf::from(DEFAULT_LOCK_PATH));
        let mut longest = c.clone();
        longest.interface = "a".repeat(MAX_INTERFACE_NAME);
        longest.validate().unwrap();
    }
}
