//! The installer as the DaemonSet's long-running container runs it on the node: it chains our
//! entry in, puts it back when the primary CNI rewrites its conflist (as flannel or calico do
//! when their pods restart), and leaves everything installed when it gets SIGTERM.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use simnode::cmd::KillOnDrop;
use simnode::dns::TYPE_A;
use simnode::runtime::{CNI_BIN_DIR, CNI_CONF_DIR, bridge_conflist};
use simnode::{KubeProxyMode, SimNode, SimOptions, bin_path};

fn plugin_types(sim: &SimNode) -> Vec<String> {
    sim.conflist().unwrap()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_for_our_entry(sim: &SimNode, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while plugin_types(sim).last().map(String::as_str) != Some("node-local-dns") {
        assert!(
            Instant::now() < deadline,
            "{what}: conflist {:?}",
            plugin_types(sim)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_installer(sim: &SimNode) -> KillOnDrop {
    let installer = bin_path("node-local-dns-install");
    let plugin = bin_path("node-local-dns");
    assert!(
        installer.exists() && plugin.exists(),
        "run cargo build --workspace --bins first"
    );
    sim.fs
        .command(&installer.to_string_lossy())
        .args([
            "install",
            "--bin-dir",
            CNI_BIN_DIR,
            "--conf-dir",
            CNI_CONF_DIR,
        ])
        .args(["--cluster-dns", "10.96.0.10", "--plugin-binary"])
        .arg(&plugin)
        .env("NODE_LOCAL_DNS_DEBOUNCE", "200ms")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .expect("installer starts")
}

fn installer_keeps_entry(mode: KubeProxyMode) {
    let mut opts = SimOptions::new(mode);
    opts.install = false;
    let mut sim = SimNode::new(opts).expect("simulated node");
    let mut installer = start_installer(&sim);
    wait_for_our_entry(&sim, "installed");

    // The primary CNI's pod restarts and writes its own conflist again, without our entry.
    sim.write_conflist(&bridge_conflist("1.0.0", false))
        .unwrap();
    wait_for_our_entry(&sim, "re-inserted after the primary CNI rewrote its file");
    assert_eq!(
        plugin_types(&sim),
        vec!["bridge", "portmap", "node-local-dns"]
    );

    let pod = sim.run_pod("default").expect("pod starts");
    assert_eq!(
        sim.node.our_raw_rules(false).unwrap().len(),
        4,
        "the pod's ADD set the node up"
    );
    let server = SocketAddr::from(([10, 96, 0, 10], 53));
    let a = pod
        .query(
            server,
            "web.default.svc.cluster.local",
            TYPE_A,
            Duration::from_secs(3),
        )
        .expect("pod resolves");
    assert_eq!(
        a.addrs,
        vec!["10.100.0.1".parse::<std::net::IpAddr>().unwrap()]
    );

    // SIGTERM (pod deleted or restarted): everything stays installed so pods keep starting.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(installer.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = installer.0.wait().unwrap();
    assert!(
        status.success(),
        "installer exits cleanly on SIGTERM: {status}"
    );
    assert_eq!(
        plugin_types(&sim).last().map(String::as_str),
        Some("node-local-dns")
    );
    let bins = sim.fs.in_mount_ns(&["ls", CNI_BIN_DIR]).unwrap();
    assert!(
        bins.lines().any(|l| l == "node-local-dns"),
        "binary kept: {bins}"
    );
}

#[test]
fn installer_container_reinserts_entry_legacy() {
    installer_keeps_entry(KubeProxyMode::IptablesLegacy);
}

#[test]
fn installer_container_reinserts_entry_nft() {
    installer_keeps_entry(KubeProxyMode::IptablesNft);
}
