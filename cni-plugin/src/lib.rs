//! The node-local-dns CNI chained plugin: on every pod ADD (and CHECK) it makes sure the
//! node's `nodelocaldns` interface and raw-table rules are in place (node-setup), then hands
//! the previous plugin's result on unchanged. DEL, STATUS and GC never fail and change nothing.

#![deny(unsafe_code)]

pub mod config;
pub mod error;
mod logging;
pub mod plugin;
pub mod skel;

#[cfg(test)]
mod tests;
