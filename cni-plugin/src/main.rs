//! Wires the real process (environment, stdin, stdout, exit code) to `skel::run`.

#![deny(unsafe_code)]

use std::io::{Read, Write};

use node_local_dns_cni::{error, plugin::RealNode, skel};

// Changing the process environment is unsafe in edition 2024; it is done once, here.
#[allow(unsafe_code)]
mod sbin_path {
    /// Where iptables lives on every distribution we run on. Runtimes pass their own PATH on to
    /// plugins, and a minimal one (no sbin) would make every node setup fail.
    const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

    pub fn ensure_sbin_on_path() {
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
            // SAFETY: called as the first statement of main, before any other thread exists, so
            // nothing can read the environment concurrently.
            unsafe { std::env::set_var("PATH", joined) };
        }
    }
}

fn main() {
    sbin_path::ensure_sbin_on_path();
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
