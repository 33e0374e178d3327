//! `uninstall`: our entry out of every config file first, then the binary; corrupt files left
//! alone; `--teardown-node` removes the node state (root, in a network namespace of its own).

mod common;

use std::fs;
use std::process::Command;

use common::*;
use nix::sched::{CloneFlags, unshare};
use node_setup::{IptablesBackend, Missing, NodeConfig, check_node, ensure_node};

fn example(name: &str) -> Vec<u8> {
    fs::read(examples_dir().join(name)).unwrap()
}

fn installed_node() -> Node {
    let node = Node::new();
    fs::write(
        node.conf("10-flannel.conflist"),
        example("flannel.without-node-local-dns.conflist"),
    )
    .unwrap();
    assert_ok(&node.install_once(&[]));
    node
}

#[test]
fn removes_entry_from_every_file_then_the_binary() {
    let node = installed_node();
    // An older file that also carries our entry (e.g. from before the primary CNI changed).
    fs::write(node.conf("20-calico.conflist"), example("calico.conflist")).unwrap();
    assert_ok(&node.uninstall(&[]));
    assert_eq!(
        fs::read(node.conf("10-flannel.conflist")).unwrap(),
        example("flannel.without-node-local-dns.conflist")
    );
    assert_eq!(
        fs::read(node.conf("20-calico.conflist")).unwrap(),
        example("calico.without-node-local-dns.conflist")
    );
    assert!(!node.installed_plugin().exists());
    assert_ok(&node.uninstall(&[]));
}

#[test]
fn corrupt_file_is_left_untouched_and_reported() {
    let node = installed_node();
    let corrupt = node.conf("05-broken.conflist");
    fs::write(&corrupt, b"{\"plugins\": [").unwrap();
    let out = node.uninstall(&[]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("05-broken.conflist"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(&corrupt).unwrap(), b"{\"plugins\": [");
    assert!(!node.installed_plugin().exists());
}

#[test]
fn binary_stays_when_the_entry_cannot_be_removed() {
    let node = installed_node();
    let missing = node.root.path().join("no-such-conf-dir");
    let out = installer()
        .arg("uninstall")
        .arg("--bin-dir")
        .arg(&node.bin_dir)
        .arg("--conf-dir")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no-such-conf-dir"),
        "{}",
        stderr(&out)
    );
    assert!(
        node.installed_plugin().is_file(),
        "binary removed while a conflist may still name it"
    );
}

#[test]
fn teardown_without_any_cluster_ip_is_a_clear_error() {
    let node = Node::new();
    let out = node.uninstall(&["--teardown-node"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--cluster-dns"), "{}", stderr(&out));
}

/// Runs `f` on a thread inside a brand-new network namespace; processes it spawns inherit it.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): this test must run as root");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

fn teardown_removes_node_state(backend: IptablesBackend, backend_arg: &'static str) {
    in_new_netns(move || {
        let node = installed_node();
        let mut cfg = NodeConfig::new(vec![CLUSTER_DNS.parse().unwrap()]);
        cfg.backend = backend;
        cfg.lock_path = node.root.path().join("setup.lock");
        ensure_node(&cfg).expect("node setup in the test namespace");
        assert!(check_node(&cfg).unwrap().is_empty());

        // No --cluster-dns: the ClusterIP is read back from the entry being removed.
        let out = node.uninstall(&[
            "--teardown-node",
            "--iptables-backend",
            backend_arg,
            "--setup-lock",
            cfg.lock_path.to_str().unwrap(),
        ]);
        assert_ok(&out);

        let missing = check_node(&cfg).unwrap();
        assert!(
            missing.contains(&Missing::Interface(cfg.interface.clone())),
            "{missing:?}"
        );
        let save = Command::new(format!("iptables-{backend_arg}-save"))
            .args(["-t", "raw"])
            .output()
            .unwrap();
        assert!(save.status.success());
        let rules = String::from_utf8_lossy(&save.stdout);
        assert!(
            !rules.contains("node-local-dns"),
            "rules left after teardown:\n{rules}"
        );
        assert!(!node.installed_plugin().exists());
    });
}

#[test]
fn teardown_node_removes_interface_and_rules_legacy() {
    teardown_removes_node_state(IptablesBackend::Legacy, "legacy");
}

#[test]
fn teardown_node_removes_interface_and_rules_nft() {
    teardown_removes_node_state(IptablesBackend::Nft, "nft");
}
