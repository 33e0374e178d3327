//! Wires the real process (environment, stdin, stdout, exit code) to `skel::run`.

use std::io::{Read, Write};

use node_local_dns_cni::{error, plugin::RealNode, skel};

/// Where iptables lives on every distribution we run on. Runtimes pass their own PATH on to
/// plugins, and a minimal one (no sbin) would make every node setup fail.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

fn ensure_sbin_on_path() {
    let path = std::env::var("PATH").unwrap_or_default();
    let missing: Vec<&str> = SBIN_DIRS
        .iter()
        .copied()
        .filter(|d| !path.split(':').any(|p| p == *d))
        .collect();
    if !missing.is_empty() {
        let joined = [path.as_str()]
            .into_iter()
            .chain(missing)
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(":");
        // SAFETY: first statement of main, before any other thread exists.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

fn main() {
    ensure_sbin_on_path();
    let mut stdin = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let result = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => skel::run(&|k| std::env::var(k).ok(), &stdin, &mut stdout, &RealNode),
        Err(e) => Err(error::CniError::new(
            error::IO_FAILURE,
            format!("reading stdin: {e}"),
        )),
    };
    if let Err(e) = result {
        // The spec puts errors on stdout, as JSON.
        let _ = stdout.write_all(e.to_json().as_bytes());
        let _ = stdout.flush();
        std::process::exit(1);
    }
}
