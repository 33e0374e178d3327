//! `install --once` against real temp dirs with the real binary: what gets written, what is
//! kept, and what is refused.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::json;

const FLANNEL: &str = "flannel.without-node-local-dns.conflist";

fn example(name: &str) -> Vec<u8> {
    fs::read(examples_dir().join(name)).unwrap()
}

#[test]
fn plugin_binary_is_copied_identical_executable_and_answers_version() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    assert_ok(&node.install_once(&[]));
    let installed = node.installed_plugin();
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(&node.plugin).unwrap()
    );
    assert_eq!(mode(&installed), 0o755);
    assert!(answers_version(&installed));
    let names: Vec<_> = fs::read_dir(&node.bin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("node-local-dns")],
        "no temp files left in bin dir"
    );
}

#[test]
fn identical_binary_is_not_rewritten() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    assert_ok(&node.install_once(&[]));
    let first = inode(&node.installed_plugin());
    assert_ok(&node.install_once(&[]));
    assert_eq!(inode(&node.installed_plugin()), first);
}

#[test]
fn broken_plugin_never_replaces_the_installed_one_and_conflist_is_not_touched() {
    let node = Node::new();
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example(FLANNEL)).unwrap();
    fs::write(node.installed_plugin(), b"previous").unwrap();
    let broken = node.root.path().join("broken");
    write_script(&broken, "#!/bin/sh\necho not-json\n");

    let mut broken_node = Node::new();
    broken_node.plugin = broken;
    broken_node.bin_dir = node.bin_dir.clone();
    broken_node.conf_dir = node.conf_dir.clone();
    let out = broken_node.install_once(&[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("CNI_COMMAND=VERSION"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(node.installed_plugin()).unwrap(), b"previous");
    assert_eq!(fs::read(&conf).unwrap(), example(FLANNEL));
    assert_eq!(
        fs::read_dir(&node.bin_dir).unwrap().count(),
        1,
        "staged copy removed"
    );
}

#[test]
fn single_plugin_conf_is_converted_to_conflist_keeping_mode_and_keys() {
    let node = Node::new();
    let conf = node.conf("10-bridge.conf");
    let original = json!({
        "cniVersion": "0.4.0", "name": "k8s-pod-network", "type": "bridge", "bridge": "cni0",
        "x-vendor": {"keep": [1, 2]}, "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}
    });
    fs::write(&conf, serde_json::to_vec(&original).unwrap()).unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();

    assert_ok(&node.install_once(&[]));
    assert_eq!(node.conf_names(), vec!["10-bridge.conflist".to_string()]);
    let list = node.conf("10-bridge.conflist");
    assert_eq!(mode(&list), 0o600);
    let doc = read_json(&list);
    assert_eq!(
        doc,
        json!({
            "cniVersion": "0.4.0", "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "x-vendor": {"keep": [1, 2]},
                 "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}},
                {"type": "node-local-dns", "clusterDNS": [CLUSTER_DNS], "localIPs": ["169.254.20.10"],
                 "interface": "nodelocaldns", "iptables": "auto", "socketMatch": "safe"}
            ]
        })
    );
    let keys: Vec<&String> = doc["plugins"][0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["type", "bridge", "x-vendor", "ipam"], "order kept");
}

#[test]
fn file_mode_unknown_keys_key_order_and_cni_version_are_kept() {
    let node = Node::new();
    let conf = node.conf("10-net.conflist");
    let text = r#"{"zz":1,"cniVersion":"0.3.0","name":"n","cniVersions":["0.3.0","0.4.0"],"plugins":[{"type":"ptp","mtu":1400,"unknownFutureField":{"a":null}}],"aa":[true]}"#;
    fs::write(&conf, text).unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
    assert_ok(&node.install_once(&[]));
    assert_eq!(mode(&conf), 0o640);
    let doc = read_json(&conf);
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["zz", "cniVersion", "name", "cniVersions", "plugins", "aa"]
    );
    assert_eq!(doc["cniVersion"], "0.3.0");
    assert_eq!(doc["cniVersions"], json!(["0.3.0", "0.4.0"]));
    assert_eq!(
        doc["plugins"][0],
        json!({"type":"ptp","mtu":1400,"unknownFutureField":{"a":null}})
    );
    assert_eq!(doc["plugins"][1]["type"], "node-local-dns");
}

#[test]
fn existing_entry_is_updated_in_place_only_when_different() {
    let node = Node::new();
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example("flannel.conflist")).unwrap();
    let before = inode(&conf);
    assert_ok(&node.install_once(&[]));
    assert_eq!(inode(&conf), before, "same entry: no write");

    let changed = node
        .install_cmd(&[
            "--once",
            "--cluster-dns",
            "10.96.0.10,fd00::a",
            "--local-ip",
            "169.254.20.11",
        ])
        .output()
        .unwrap();
    assert_ok(&changed);
    let doc = read_json(&conf);
    let plugins = doc["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2]["clusterDNS"], json!(["10.96.0.10", "fd00::a"]));
    assert_eq!(plugins[2]["localIPs"], json!(["169.254.20.11"]));
}

#[test]
fn corrupt_first_file_is_never_touched_and_the_next_parsable_one_is_used() {
    let node = Node::new();
    let corrupt = node.conf("05-half-written.conflist");
    let half = &example(FLANNEL)[..40];
    fs::write(&corrupt, half).unwrap();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    let out = node.install_once(&[]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("05-half-written.conflist"),
        "skipped file is logged: {}",
        stderr(&out)
    );
    assert_eq!(fs::read(&corrupt).unwrap(), half);
    assert_eq!(
        fs::read(node.conf("10-flannel.conflist")).unwrap(),
        example("flannel.conflist")
    );
}

#[test]
fn only_corrupt_files_means_failure_and_nothing_written() {
    let node = Node::new();
    let corrupt = node.conf("10-flannel.conflist");
    fs::write(&corrupt, b"").unwrap();
    let out = node.install_once(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not valid JSON"), "{}", stderr(&out));
    assert_eq!(fs::read(&corrupt).unwrap(), b"");
    assert_eq!(node.conf_names(), vec!["10-flannel.conflist".to_string()]);
}

#[test]
fn multus_file_is_skipped_and_the_primary_cni_file_edited() {
    let node = Node::new();
    let multus = br#"{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus","kubeconfig":"/etc/cni/net.d/multus.d/multus.kubeconfig","delegates":[]}"#;
    fs::write(node.conf("00-multus.conf"), multus).unwrap();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    assert_ok(&node.install_once(&[]));
    assert_eq!(fs::read(node.conf("00-multus.conf")).unwrap(), multus);
    assert_eq!(
        fs::read(node.conf("10-flannel.conflist")).unwrap(),
        example("flannel.conflist")
    );
}

#[test]
fn empty_conf_dir_is_a_clear_error() {
    let node = Node::new();
    let out = node.install_once(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no CNI config"), "{}", stderr(&out));
    assert!(node.conf_names().is_empty());
}

#[test]
fn cni_version_the_plugin_does_not_support_is_refused() {
    let node = Node::new();
    let conf = node.conf("10-net.conflist");
    let text = br#"{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"bridge"}]}"#;
    fs::write(&conf, text).unwrap();
    let out = node.install_once(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("0.2.0"), "{}", stderr(&out));
    assert_eq!(fs::read(&conf).unwrap(), text);
}

#[test]
fn bad_input_gets_clear_errors() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    let no_dns = node.install_cmd(&["--once"]).output().unwrap();
    assert!(!no_dns.status.success());
    assert!(
        stderr(&no_dns).contains("KUBE_DNS_SVC_IP"),
        "{}",
        stderr(&no_dns)
    );

    let bad_ip = node
        .install_cmd(&["--once", "--cluster-dns", "10.96.0.300"])
        .output()
        .unwrap();
    assert!(!bad_ip.status.success());
    assert!(
        stderr(&bad_ip).contains("10.96.0.300"),
        "{}",
        stderr(&bad_ip)
    );

    let bad_env = node
        .install_cmd(&["--once"])
        .env("KUBE_DNS_SVC_IP", "kube-dns")
        .output()
        .unwrap();
    assert!(!bad_env.status.success());
    assert!(
        stderr(&bad_env).contains("KUBE_DNS_SVC_IP"),
        "{}",
        stderr(&bad_env)
    );

    // Node settings the plugin would refuse on every pod ADD are refused here first.
    for (env, value, says) in [
        ("NODE_LOCAL_DNS_SOCKET_MATCH", "sometimes", "nowildcard"),
        ("NODE_LOCAL_DNS_IPTABLES_BACKEND", "ebpf", "legacy"),
        (
            "NODE_LOCAL_DNS_INTERFACE",
            "a-name-longer-than-15",
            "interface name",
        ),
    ] {
        let out = node
            .install_cmd(&["--once", "--cluster-dns", CLUSTER_DNS])
            .env(env, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env}={value} accepted");
        assert!(stderr(&out).contains(says), "{env}: {}", stderr(&out));
    }

    assert_eq!(
        fs::read(node.conf("10-flannel.conflist")).unwrap(),
        example(FLANNEL),
        "nothing written"
    );
}

#[test]
fn cluster_dns_comes_from_kube_dns_svc_ip_and_flags_from_env() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    let out = installer()
        .arg("install")
        .env("KUBE_DNS_SVC_IP", "10.96.0.10,fd00::a")
        .env("NODE_LOCAL_DNS_CNI_BIN_DIR", &node.bin_dir)
        .env("NODE_LOCAL_DNS_CNI_CONF_DIR", &node.conf_dir)
        .env("NODE_LOCAL_DNS_PLUGIN_BINARY", &node.plugin)
        .env("NODE_LOCAL_DNS_INSTALL_ONCE", "true")
        // The resolver's node settings, as the ConfigMap gives them to both containers.
        .env("NODE_LOCAL_DNS_INTERFACE", "nld0")
        .env("NODE_LOCAL_DNS_IPTABLES_BACKEND", "legacy")
        .env("NODE_LOCAL_DNS_SOCKET_MATCH", "nowildcard")
        .output()
        .unwrap();
    assert_ok(&out);
    let doc = read_json(&node.conf("10-flannel.conflist"));
    let ours = &doc["plugins"][2];
    assert_eq!(ours["clusterDNS"], json!(["10.96.0.10", "fd00::a"]));
    assert_eq!(ours["interface"], "nld0");
    assert_eq!(ours["iptables"], "legacy");
    assert_eq!(ours["socketMatch"], "nowildcard");
    assert!(node.installed_plugin().is_file());
}

#[test]
fn cluster_dns_comes_from_the_service_link_when_nothing_else_names_it() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    // Kubernetes injects KUBE_DNS_SERVICE_HOST into kube-system pods; an empty
    // KUBE_DNS_SVC_IP (an absent optional ConfigMap key) does not hide it.
    let out = node
        .install_cmd(&["--once"])
        .env("KUBE_DNS_SERVICE_HOST", "10.96.0.10")
        .env("KUBE_DNS_SVC_IP", "")
        .output()
        .unwrap();
    assert_ok(&out);
    let doc = read_json(&node.conf("10-flannel.conflist"));
    assert_eq!(doc["plugins"][2]["clusterDNS"], json!(["10.96.0.10"]));

    // KUBE_DNS_SVC_IP comes first: it may carry the second family.
    let out = node
        .install_cmd(&["--once"])
        .env("KUBE_DNS_SERVICE_HOST", "10.96.0.10")
        .env("KUBE_DNS_SVC_IP", "10.96.0.10,fd00::a")
        .output()
        .unwrap();
    assert_ok(&out);
    let doc = read_json(&node.conf("10-flannel.conflist"));
    assert_eq!(
        doc["plugins"][2]["clusterDNS"],
        json!(["10.96.0.10", "fd00::a"])
    );
}

#[test]
fn bad_settings_are_one_line_naming_their_source() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    for (env, value, says) in [
        (
            "KUBE_DNS_SERVICE_HOST",
            "kube-dns",
            "KUBE_DNS_SERVICE_HOST \"kube-dns\"",
        ),
        (
            "KUBE_DNS_SVC_IP",
            "10.96.0.10,10.96.0.11",
            "two IPv4 addresses",
        ),
        (
            "NODE_LOCAL_DNS_CLUSTER_DNS",
            "10.96.0.300",
            "NODE_LOCAL_DNS_CLUSTER_DNS \"10.96.0.300\"",
        ),
        (
            "NODE_LOCAL_DNS_RESYNC_INTERVAL",
            "5x",
            "NODE_LOCAL_DNS_RESYNC_INTERVAL \"5x\": expected a duration",
        ),
    ] {
        let out = node
            .install_cmd(&["--once"])
            .env(env, value)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{env}={value} accepted");
        assert!(err.contains(says), "{env}={value}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{env}={value}: {err}");
    }
    let out = node.install_cmd(&["--once"]).output().unwrap();
    let err = stderr(&out);
    for source in ["--cluster-dns", "KUBE_DNS_SVC_IP", "KUBE_DNS_SERVICE_HOST"] {
        assert!(err.contains(source), "{source}: {err}");
    }
    assert_eq!(
        fs::read(node.conf("10-flannel.conflist")).unwrap(),
        example(FLANNEL),
        "nothing written"
    );
}

#[test]
fn a_failed_start_is_logged_in_the_chosen_format() {
    let node = Node::new();
    let out = node
        .install_cmd(&["--once", "--log-format", "json"])
        .env("KUBE_DNS_SVC_IP", "kube-dns")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line: serde_json::Value = serde_json::from_str(stderr(&out).trim_end()).unwrap();
    assert_eq!(line["level"], "ERROR");
    let message = line["fields"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("KUBE_DNS_SVC_IP \"kube-dns\""),
        "{message}"
    );

    // Text on a pipe: no colour codes.
    let out = node
        .install_cmd(&["--once"])
        .env("KUBE_DNS_SVC_IP", "kube-dns")
        .output()
        .unwrap();
    assert!(!stderr(&out).contains('\x1b'), "{}", stderr(&out));
}

#[test]
fn temp_files_of_an_interrupted_run_are_removed() {
    let node = Node::new();
    fs::write(node.conf("10-flannel.conflist"), example(FLANNEL)).unwrap();
    fs::write(node.conf(".node-local-dns-1-123-0.tmp"), b"{\"half").unwrap();
    fs::write(node.bin_dir.join(".node-local-dns-1-456-0.tmp"), b"\x7fELF").unwrap();
    assert_ok(&node.install_once(&[]));
    assert_eq!(node.conf_names(), vec!["10-flannel.conflist".to_string()]);
    let bins: Vec<_> = fs::read_dir(&node.bin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(bins, vec![std::ffi::OsString::from("node-local-dns")]);
}
