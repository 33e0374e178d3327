//! The settings node-local-dns's programs share, each with one grammar and one owner.
//!
//! The resolver, the installer and the CNI plugin read the same settings: the kube-dns
//! ClusterIP, the node settings (interface, link-local addresses, iptables backend, socket
//! match), durations and sizes in flags, the log format. Each is parsed here, once, so a value
//! one program accepts is accepted by all of them and a wrong value is refused with the same
//! message naming the flag or environment variable it came from.
//!
//! - [`duration`], [`size`], [`addr`]: the grammars.
//! - [`env`]: environment strings behind a trait, so tests use a map.
//! - [`cluster_dns`]: where the kube-dns ClusterIP comes from, in order.
//! - [`node`]: the node flags as one clap `Args` struct the binaries flatten.
//! - [`entry`]: the plugin's conflist entry, written by the installer, read by the plugin.
//! - [`logging`]: log format, subscriber setup, the fatal-error line.
//! - [`cli`]: clap errors that name the environment variable a bad value came from.
#![forbid(unsafe_code)]

pub mod addr;
pub mod cli;
pub mod cluster_dns;
mod decimal;
pub mod duration;
pub mod entry;
pub mod env;
pub mod error;
pub mod logging;
pub mod node;
pub mod size;

pub use duration::parse_duration;
pub use env::{Env, MapEnv, ProcessEnv};
pub use error::SettingsError;
pub use size::parse_size;
