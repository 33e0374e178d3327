//! The demo interrupted with Ctrl-C cleans up as a finished run does: once the simulated node
//! is up and a pod runs, SIGINT to the demo leaves no network namespace, process (knotd,
//! the resolver, podman's conmon, the mount-namespace holder) or temp dir of that run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Children of `pid` (its main thread's; the demo forks only from it).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `pid` and every process below it, with their start times (to tell a reused PID apart).
fn process_tree(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Some(start) = start_time(p) {
            out.push((p, start));
        }
        todo.extend(children(p));
    }
    out
}

/// Field 22 of /proc/PID/stat, for a process that has not exited (zombies count as gone).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    (fields.first() != Some(&"Z")).then(|| fields.get(19).map(|s| s.to_string()))?
}

/// Live processes working in this demo run's temp dir `/tmp/nlde-<backend>-<pid>-…` (conmon,
/// containerd's shim, knotd), whoever their parent is now.
fn demo_processes(tag: &str) -> Vec<String> {
    processes_mentioning("/tmp/nlde-")
        .into_iter()
        .filter(|p| p.contains(tag))
        .collect()
}

/// Live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (cmdline.contains(needle) && start_time(pid).is_some()).then(|| format!("{pid} {cmdline}"))
    })
    .collect()
}

fn netns_with(needle: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn sigint_after_the_node_is_up_leaves_nothing_behind() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_node-local-dns-demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let supervisor = demo.id();
    let stdout = demo.stdout.take().expect("piped stdout");
    let (lines, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("demo: {line}");
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // The pod is running (containers, conmon, knotd and the daemon all exist) once its line
    // is printed; if the demo ends first, the channel closes and the test fails here.
    let pod_up = seen
        .iter()
        .any(|l| l.starts_with("==> Pod ") && l.contains("started"));
    assert!(pod_up, "the demo never got a pod running");

    let child = *children(supervisor)
        .first()
        .expect("the supervisor runs the demo as its child");
    let tag = format!("-{child}-");
    let tree = process_tree(child);
    assert!(
        !netns_with(&tag).is_empty(),
        "the running demo's namespaces are visible as nlde-*{tag}*"
    );
    assert!(
        !demo_processes(&tag).is_empty(),
        "the demo's processes name its temp dir"
    );

    kill(Pid::from_raw(supervisor as i32), Signal::SIGINT).expect("SIGINT to the demo");
    let status = demo.wait().expect("the demo exits");

    assert_eq!(status.code(), Some(130), "an interrupted demo exits 130");
    assert_eq!(netns_with(&tag), Vec::<String>::new(), "namespaces left");
    let survivors: Vec<u32> = tree
        .iter()
        .filter(|(pid, start)| start_time(*pid).as_ref() == Some(start))
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(survivors, Vec::<u32>::new(), "processes of the demo left");
    assert_eq!(
        demo_processes(&tag),
        Vec::<String>::new(),
        "conmon or containers left"
    );
    let temp_dirs: Vec<String> = std::fs::read_dir("/tmp")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("nlde-") && n.contains(&tag))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(temp_dirs, Vec::<String>::new(), "temp dirs left");
}
