//! Logs go to the configured file, never to stdout (stdout is the CNI result). When the file
//! cannot be opened they go to stderr, which runtimes capture.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

pub fn init(path: &Path) {
    let file = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| OpenOptions::new().create(true).append(true).open(path));
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(settings::logging::env_filter("NODE_LOCAL_DNS_CNI_LOG"));
    // try_init: a second call in the same process (unit tests) keeps the first subscriber.
    let _ = match file {
        Ok(f) => builder.with_writer(Mutex::new(f)).try_init(),
        Err(e) => {
            eprintln!(
                "node-local-dns: cannot open log file {}: {e}",
                path.display()
            );
            builder.with_writer(std::io::stderr).try_init()
        }
    };
}
