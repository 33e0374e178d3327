//! conflist-examples/: every example parses, ends with our entry, and is exactly what the real
//! installer makes of its `without` twin (and makes nothing more of on a second run).

mod common;

use std::fs;

use common::*;

#[test]
fn there_are_the_five_required_examples() {
    let names = example_names();
    for required in [
        "calico",
        "cilium-generic-veth",
        "containerd-bridge",
        "crio-bridge",
        "flannel",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "missing example {required}: {names:?}"
        );
        assert!(
            examples_dir()
                .join(format!("{required}.conflist"))
                .is_file()
        );
    }
}

#[test]
fn each_example_parses_and_ends_with_our_entry() {
    for name in example_names() {
        let with = read_json(&examples_dir().join(format!("{name}.conflist")));
        let plugins = with["plugins"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no plugins"));
        let last = plugins.last().unwrap();
        assert_eq!(last["type"], "node-local-dns", "{name}");
        assert_eq!(
            last["clusterDNS"],
            serde_json::json!([CLUSTER_DNS]),
            "{name}"
        );
        assert_eq!(
            last["localIPs"],
            serde_json::json!(["169.254.20.10"]),
            "{name}"
        );
        let ours = plugins
            .iter()
            .filter(|p| p["type"] == "node-local-dns")
            .count();
        assert_eq!(ours, 1, "{name}");

        let without =
            read_json(&examples_dir().join(format!("{name}.without-node-local-dns.conflist")));
        let theirs = without["plugins"].as_array().unwrap();
        assert!(
            theirs.iter().all(|p| p["type"] != "node-local-dns"),
            "{name}"
        );
        assert_eq!(
            &plugins[..plugins.len() - 1],
            theirs.as_slice(),
            "{name}: other entries changed"
        );
    }
}

#[test]
fn installer_turns_each_without_into_with_byte_for_byte_and_is_then_stable() {
    for name in example_names() {
        let node = Node::new();
        let target = node.conf(&format!("10-{name}.conflist"));
        fs::copy(
            examples_dir().join(format!("{name}.without-node-local-dns.conflist")),
            &target,
        )
        .unwrap();
        let expected = fs::read(examples_dir().join(format!("{name}.conflist"))).unwrap();

        assert_ok(&node.install_once(&[]));
        assert_eq!(
            String::from_utf8(fs::read(&target).unwrap()).unwrap(),
            String::from_utf8(expected.clone()).unwrap(),
            "{name}: first run"
        );
        let inode_after_first = inode(&target);

        assert_ok(&node.install_once(&[]));
        assert_eq!(fs::read(&target).unwrap(), expected, "{name}: second run");
        assert_eq!(
            inode(&target),
            inode_after_first,
            "{name}: second run rewrote the file"
        );
        assert_eq!(
            node.conf_names(),
            vec![format!("10-{name}.conflist")],
            "{name}: stray files"
        );
    }
}

#[test]
fn uninstall_turns_each_with_back_into_without_byte_for_byte() {
    for name in example_names() {
        let node = Node::new();
        let target = node.conf(&format!("10-{name}.conflist"));
        fs::copy(examples_dir().join(format!("{name}.conflist")), &target).unwrap();
        assert_ok(&node.uninstall(&[]));
        let without =
            fs::read(examples_dir().join(format!("{name}.without-node-local-dns.conflist")))
                .unwrap();
        assert_eq!(fs::read(&target).unwrap(), without, "{name}");
    }
}
