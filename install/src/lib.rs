//! node-local-dns-install: puts the node-local-dns CNI plugin on a node and keeps it there.
//!
//! Flow: `plugin_binary` copies and proves the plugin binary, `confdir` picks the conflist the
//! runtime uses and edits it through `conflist` (pure JSON edits) and `atomic` (node-setup's
//! temp file + fsync + rename, the workspace's one implementation), and `watch` repeats that on
//! every change of the conf dir and on a timer.

#![deny(unsafe_code)]

pub use node_setup::atomic;
pub mod confdir;
pub mod conflist;
pub mod error;
pub mod plugin_binary;
pub mod watch;

pub use error::InstallError;
