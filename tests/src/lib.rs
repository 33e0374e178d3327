//! The simulated node: a Kubernetes node built from network namespaces, shared by the
//! end-to-end tests and the demo.

use std::path::PathBuf;

/// Path of one of the workspace's binaries (`node-local-dns`, `node-local-dns-resolver`,
/// `node-local-dns-install`). `NLD_BIN_DIR` overrides the directory; otherwise the target
/// directory of the profile these tests were built with. The test command builds all bins
/// first (`cargo build --workspace --bins && cargo test --workspace`).
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("NLD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    target.join(profile).join(name)
}
