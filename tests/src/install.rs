//! `node-local-dns-install` run on the node as the DaemonSet's installer container runs it:
//! hostPath CNI bin and conf dirs (here, the node's private mount namespace).

use std::net::IpAddr;

use crate::HarnessError;
use crate::runtime::{CNI_BIN_DIR, CNI_CONF_DIR, NodeFs};

pub const INSTALLER_BIN: &str = "node-local-dns-install";
pub const PLUGIN_BIN: &str = "node-local-dns";

fn installer() -> Result<String, HarnessError> {
    let bin = crate::bin_path(INSTALLER_BIN);
    if !bin.exists() {
        return Err(HarnessError::MissingBinary(bin));
    }
    Ok(bin.to_string_lossy().into_owned())
}

/// `install --once`: copies the plugin into the CNI bin dir and chains our entry into the
/// conflist the runtime uses. Extra args go after the standard ones.
pub fn install(
    fs_: &NodeFs,
    cluster_dns: &[IpAddr],
    extra: &[&str],
) -> Result<String, HarnessError> {
    let plugin = crate::bin_path(PLUGIN_BIN);
    if !plugin.exists() {
        return Err(HarnessError::MissingBinary(plugin));
    }
    let dns: Vec<String> = cluster_dns.iter().map(ToString::to_string).collect();
    let dns = dns.join(",");
    let plugin = plugin.to_string_lossy().into_owned();
    let bin = installer()?;
    let mut args = vec![
        bin.as_str(),
        "install",
        "--bin-dir",
        CNI_BIN_DIR,
        "--conf-dir",
        CNI_CONF_DIR,
        "--cluster-dns",
        &dns,
        "--plugin-binary",
        &plugin,
        "--once",
    ];
    args.extend_from_slice(extra);
    fs_.in_mount_ns(&args)
}

/// `uninstall`: our conflist entry first, then the binary.
pub fn uninstall(fs_: &NodeFs) -> Result<String, HarnessError> {
    let bin = installer()?;
    fs_.in_mount_ns(&[
        &bin,
        "uninstall",
        "--bin-dir",
        CNI_BIN_DIR,
        "--conf-dir",
        CNI_CONF_DIR,
    ])
}
