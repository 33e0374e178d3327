//! The long-running `install`: it puts our entry back when the primary CNI rewrites its file,
//! waits out half-written files without touching them, never loops on its own writes, and
//! leaves everything installed on SIGTERM.

mod common;

use std::fs;

use common::*;

const WITHOUT: &str = "flannel.without-node-local-dns.conflist";
const WITH: &str = "flannel.conflist";
const RESYNC_LINE: &str = "conflist already has our entry";
const WRITE_LINE: &str = "conflist entry written";

fn example(name: &str) -> Vec<u8> {
    fs::read(examples_dir().join(name)).unwrap()
}

/// A watching installer on `node` with short intervals so tests finish quickly.
fn start_watching(node: &Node) -> (Running, Logs) {
    start_watching_with_resync(node, "300ms")
}

fn start_watching_with_resync(node: &Node, resync: &str) -> (Running, Logs) {
    spawn_logged(node.install_cmd(&[
        "--cluster-dns",
        CLUSTER_DNS,
        "--resync-interval",
        resync,
        "--debounce",
        "50ms",
        "--retry-interval",
        "100ms",
    ]))
}

fn started(node: &Node) -> (Running, Logs, std::path::PathBuf) {
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example(WITHOUT)).unwrap();
    let (child, logs) = start_watching(node);
    wait_until("the first install", || {
        fs::read(&conf).unwrap() == example(WITH)
    });
    (child, logs, conf)
}

#[test]
fn entry_is_put_back_when_the_primary_cni_rewrites_its_file() {
    let node = Node::new();
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example(WITHOUT)).unwrap();
    // A resync interval far beyond the test's deadline: only inotify events can drive this.
    let (_child, logs) = start_watching_with_resync(&node, "60m");
    wait_until("the first install", || {
        fs::read(&conf).unwrap() == example(WITH)
    });
    for round in 0..3 {
        // flannel's install-cni copies its file in place (truncate + write), dropping our entry.
        fs::write(&conf, example(WITHOUT)).unwrap();
        wait_until(&format!("entry re-inserted (round {round})"), || {
            fs::read(&conf).unwrap() == example(WITH)
        });
    }
    // The log line follows the write: wait for it rather than race the reader thread.
    wait_until("a logged write per round", || logs.count(WRITE_LINE) >= 4);
}

#[test]
fn half_written_file_is_left_alone_until_complete() {
    let node = Node::new();
    let (_child, logs, conf) = started(&node);
    let half = &example(WITHOUT)[..50];
    fs::write(&conf, half).unwrap();
    // Several failed rounds must pass (each logs the file as unparsable) without a write.
    wait_until("three retries on the half-written file", || {
        logs.count("not valid JSON") >= 3
    });
    assert_eq!(
        fs::read(&conf).unwrap(),
        half,
        "half-written file was modified"
    );
    fs::write(&conf, example(WITHOUT)).unwrap();
    wait_until("entry inserted after the file is complete", || {
        fs::read(&conf).unwrap() == example(WITH)
    });
}

#[test]
fn own_writes_cause_no_write_loop() {
    let node = Node::new();
    let (_child, logs, conf) = started(&node);
    let inode_after_install = inode(&conf);
    // A resync line after the install means the install's own log lines were read too.
    wait_until("the first resync", || logs.count(RESYNC_LINE) >= 1);
    let writes = logs.count(WRITE_LINE);
    assert_eq!(writes, 1, "{}", logs.text());
    let resyncs = logs.count(RESYNC_LINE);
    wait_until("five more resync rounds", || {
        logs.count(RESYNC_LINE) >= resyncs + 5
    });
    assert_eq!(
        logs.count(WRITE_LINE),
        writes,
        "wrote again without a reason:\n{}",
        logs.text()
    );
    assert_eq!(inode(&conf), inode_after_install);
    assert_eq!(
        node.conf_names(),
        vec!["10-flannel.conflist".to_string()],
        "temp files left behind"
    );
}

#[test]
fn deleted_plugin_binary_is_restored_on_resync() {
    let node = Node::new();
    let (_child, _logs, _conf) = started(&node);
    fs::remove_file(node.installed_plugin()).unwrap();
    wait_until("binary restored", || node.installed_plugin().is_file());
    assert!(answers_version(&node.installed_plugin()));
}

#[test]
fn new_primary_config_sorting_first_gets_our_entry() {
    let node = Node::new();
    let (_child, _logs, conf) = started(&node);
    let calico = node.conf("05-calico.conflist");
    fs::write(&calico, example("calico.without-node-local-dns.conflist")).unwrap();
    wait_until("entry in the new first file", || {
        fs::read(&calico).unwrap() == example("calico.conflist")
    });
    assert_eq!(
        fs::read(&conf).unwrap(),
        example(WITH),
        "old file left as it was"
    );
}

#[test]
fn waits_for_the_primary_cni_when_conf_dir_is_empty() {
    let node = Node::new();
    let (_child, logs) = start_watching(&node);
    wait_until("a logged wait for the primary CNI", || {
        logs.count("no CNI config") >= 2
    });
    assert!(
        node.conf_names().is_empty(),
        "installer must not create a config of its own"
    );
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example(WITHOUT)).unwrap();
    wait_until("entry inserted once the primary CNI wrote its file", || {
        fs::read(&conf).unwrap() == example(WITH)
    });
}

#[test]
fn sigterm_exits_zero_and_leaves_everything_installed() {
    let node = Node::new();
    let (child, logs, conf) = started(&node);
    let status = child.terminate();
    assert!(status.success(), "{status}: {}", logs.text());
    assert_eq!(fs::read(&conf).unwrap(), example(WITH));
    assert!(answers_version(&node.installed_plugin()));
}

/// In a container the installer is PID 1, for which the kernel drops signals that have no
/// handler; SIGTERM must still stop it cleanly (it is blocked and taken with sigwait).
#[test]
fn sigterm_stops_the_installer_as_pid_1_of_its_pid_namespace() {
    let node = Node::new();
    let conf = node.conf("10-flannel.conflist");
    fs::write(&conf, example(WITHOUT)).unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        INSTALLER,
        "install",
        "--cluster-dns",
        CLUSTER_DNS,
    ])
    .arg("--bin-dir")
    .arg(&node.bin_dir)
    .arg("--conf-dir")
    .arg(&node.conf_dir)
    .arg("--plugin-binary")
    .arg(&node.plugin);
    let (unshare, logs) = spawn_logged(cmd);
    wait_until("installed", || fs::read(&conf).unwrap() == example(WITH));
    let children = format!("/proc/{0}/task/{0}/children", unshare.pid());
    let installer_pid: i32 = fs::read_to_string(&children)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = fs::read_to_string(format!("/proc/{installer_pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.ends_with("\t1"),
        "not PID 1 in its namespace: {nspid}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(installer_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("the stop is logged", || logs.count("stays installed") == 1);
    let mut unshare = unshare;
    let exit = unshare.0.take().unwrap().wait().unwrap();
    assert!(exit.success(), "{exit}: {}", logs.text());
    assert_eq!(fs::read(&conf).unwrap(), example(WITH));
}
