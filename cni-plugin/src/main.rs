//! Wires the real process (environment, stdin, stdout, exit code) to `skel::run`.

use std::io::{Read, Write};

use node_local_dns_cni::{error, plugin::RealNode, skel};

fn main() {
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
