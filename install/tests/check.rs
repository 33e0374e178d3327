//! `check`: the installer container's readiness. It reports what an install round would still
//! do, and changes nothing.

mod common;

use std::fs;

use common::*;

fn example(name: &str) -> Vec<u8> {
    fs::read(examples_dir().join(name)).unwrap()
}

fn run_check(node: &Node, cluster_dns: &str) -> std::process::Output {
    let mut cmd = installer();
    cmd.arg("check")
        .arg("--bin-dir")
        .arg(&node.bin_dir)
        .arg("--conf-dir")
        .arg(&node.conf_dir)
        .arg("--plugin-binary")
        .arg(&node.plugin)
        .arg("--cluster-dns")
        .arg(cluster_dns);
    cmd.output().unwrap()
}

#[test]
fn check_fails_before_install_passes_after_and_changes_nothing() {
    let node = Node::new();
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example("flannel.without-node-local-dns.conflist")).unwrap();

    let before = run_check(&node, CLUSTER_DNS);
    assert!(!before.status.success());
    assert!(
        stderr(&before).contains("node-local-dns is missing"),
        "{}",
        stderr(&before)
    );
    assert!(
        stderr(&before).contains("lacks our entry"),
        "{}",
        stderr(&before)
    );
    assert_eq!(
        fs::read(&conf).unwrap(),
        example("flannel.without-node-local-dns.conflist")
    );
    assert!(!node.installed_plugin().exists());

    assert_ok(&node.install_once(&[]));
    assert_ok(&run_check(&node, CLUSTER_DNS));
}

#[test]
fn check_fails_when_the_entry_is_outdated_the_binary_differs_or_the_file_is_corrupt() {
    let node = Node::new();
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example("flannel.without-node-local-dns.conflist")).unwrap();
    assert_ok(&node.install_once(&[]));

    let outdated = run_check(&node, "10.96.0.11");
    assert!(!outdated.status.success());
    assert!(
        stderr(&outdated).contains("outdated"),
        "{}",
        stderr(&outdated)
    );

    fs::write(node.installed_plugin(), b"#!/bin/sh\nexit 1\n").unwrap();
    let differs = run_check(&node, CLUSTER_DNS);
    assert!(!differs.status.success());
    assert!(stderr(&differs).contains("differs"), "{}", stderr(&differs));

    assert_ok(&node.install_once(&[]));
    fs::write(&conf, b"{\"half").unwrap();
    let corrupt = run_check(&node, CLUSTER_DNS);
    assert!(!corrupt.status.success());
    assert!(
        stderr(&corrupt).contains("not valid JSON"),
        "{}",
        stderr(&corrupt)
    );
    assert_eq!(fs::read(&conf).unwrap(), b"{\"half");
}
