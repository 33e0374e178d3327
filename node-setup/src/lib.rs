//! Node setup shared by the CNI plugin, the resolver daemon and the installer: the
//! `nodelocaldns` interface with the kube-dns ClusterIP(s) and local IPs, and the raw-table
//! rules that send pod DNS to the cache while its socket is open (DESIGN.md §1).
//!
//! SEAM CONTRACT (the plugin, daemon and installer code against these names; the node-setup
//! work fills them in and may add to them but keeps their meaning):
//! - `NodeConfig` is the desired state as data; `ensure_node` applies it idempotently in the
//!   calling thread's network namespace (blocking; serialised by a lock file; "already exists"
//!   is success), `check_node` lists what is missing without changing anything,
//!   `teardown_node` removes everything (uninstall only, never on pod DEL or daemon exit).
//! - `SetupError::kind()` is the `errortype` label of `coredns_nodecache_setup_errors_total`.
//! - `stats` is the small state file the plugin appends its ADD/CHECK counts, durations and
//!   setup errors to, and the daemon reads to export them as metrics.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod desired;
pub mod legacy;
pub mod links;
mod lock;
mod nftgen;
pub mod rules;
pub mod stats;

use desired::{DesiredState, Family, RuleDiff, SavedRule};
use links::{Links, NetState, Netlink};
use rules::{Backend, Iptables, RuleTable};

pub const DEFAULT_INTERFACE: &str = "nodelocaldns";
pub const DEFAULT_LOCAL_IP: &str = "169.254.20.10";
pub const DEFAULT_LOCK_PATH: &str = "/run/node-local-dns/setup.lock";
pub const DEFAULT_STATS_DIR: &str = "/run/node-local-dns";

/// Which iptables implementation to program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// Whichever the node's kube-proxy uses (more `KUBE-` chains; nft when tied).
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// How the PREROUTING rules match the daemon's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketMatch {
    /// `-m socket`: ignores wildcard (0.0.0.0:53) listeners (DESIGN.md §1).
    #[default]
    Safe,
    /// The seed's `-m socket --nowildcard` (documented hazard).
    NoWildcard,
}

/// A setting's value is not one of the names it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {}", quoted(allowed))]
pub struct UnknownSetting {
    pub value: String,
    pub allowed: &'static [&'static str],
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The names the settings are spelled with everywhere: the plugin's conflist entry, the
/// resolver's and installer's flags and the ConfigMap. One table per setting, so the three
/// programs cannot drift apart.
pub trait Setting: std::str::FromStr<Err = UnknownSetting> + Copy + Send + Sync + 'static {
    /// Every accepted name, the default first.
    const NAMES: &'static [&'static str];
}

/// clap parser for a setting (feature `clap`): `--help` lists its names.
#[cfg(feature = "clap")]
pub fn clap_parser<T: Setting>() -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(T::NAMES.iter().copied()).try_map(|s| s.parse::<T>())
}

macro_rules! named_setting {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl Setting for $ty {
            const NAMES: &'static [&'static str] = &[$($name),+];
        }

        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownSetting;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownSetting {
                        value: s.to_string(),
                        allowed: <Self as Setting>::NAMES,
                    }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_setting!(IptablesBackend { Auto => "auto", Legacy => "legacy", Nft => "nft" });
named_setting!(SocketMatch { Safe => "safe", NoWildcard => "nowildcard" });

/// Desired node state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub interface: String,
    /// kube-dns ClusterIPs (one per family).
    pub cluster_dns: Vec<IpAddr>,
    /// Link-local listen addresses (default 169.254.20.10).
    pub local_ips: Vec<IpAddr>,
    pub backend: IptablesBackend,
    pub socket_match: SocketMatch,
    pub lock_path: PathBuf,
    pub lock_timeout: Duration,
}

impl NodeConfig {
    /// Defaults for everything but the ClusterIPs.
    pub fn new(cluster_dns: Vec<IpAddr>) -> Self {
        Self {
            interface: DEFAULT_INTERFACE.to_string(),
            cluster_dns,
            local_ips: vec![IpAddr::from([169, 254, 20, 10])],
            backend: IptablesBackend::Auto,
            socket_match: SocketMatch::Safe,
            lock_path: PathBuf::from(DEFAULT_LOCK_PATH),
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// What `ensure_node` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupReport {
    /// Link kind in use: "dummy", or the fallback used when the kernel has no dummy.
    pub link_kind: String,
    /// Human-readable list of changes made (empty on the fast path).
    pub changes: Vec<String>,
    /// iptables backend programmed: "legacy" or "nft".
    pub iptables_backend: String,
}

/// One piece of desired state that is not in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Interface(String),
    Address(IpAddr),
    /// Rule described as its iptables arguments (table, chain, spec).
    Rule {
        table: String,
        chain: String,
        spec: String,
    },
    /// Rule present but not at the top of its chain (or present more than once there).
    RuleNotFirst {
        table: String,
        chain: String,
        spec: String,
    },
    /// Rule present more than once.
    RuleDuplicated {
        table: String,
        chain: String,
        spec: String,
    },
    /// A rule tagged as ours that the configuration does not want (old ClusterIP, other
    /// socketMatch): `ensure_node` deletes it.
    UnwantedRule {
        table: String,
        chain: String,
        spec: String,
    },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Interface(name) => write!(f, "interface {name} missing"),
            Missing::Address(ip) => write!(f, "address {ip} missing"),
            Missing::Rule { table, chain, spec } => {
                write!(f, "rule missing: -t {table} -A {chain} {spec}")
            }
            Missing::RuleNotFirst { table, chain, spec } => {
                write!(f, "rule not at the top: -t {table} -A {chain} {spec}")
            }
            Missing::RuleDuplicated { table, chain, spec } => {
                write!(f, "rule duplicated: -t {table} -A {chain} {spec}")
            }
            Missing::UnwantedRule { table, chain, spec } => {
                write!(f, "stale rule: -t {table} -A {chain} {spec}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("lock {path}: {msg}")]
    Lock { path: PathBuf, msg: String },
    #[error("interface {name}: {msg}")]
    Interface { name: String, msg: String },
    #[error("address {addr}: {msg}")]
    Address { addr: IpAddr, msg: String },
    #[error("iptables ({cmd}): {msg}")]
    Iptables { cmd: String, msg: String },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("invalid node config: {0}")]
    Config(String),
}

impl SetupError {
    /// `errortype` label for coredns_nodecache_setup_errors_total.
    pub fn kind(&self) -> &'static str {
        match self {
            SetupError::Lock { .. } => "lock",
            SetupError::Interface { .. } => "interface_add",
            SetupError::Address { .. } => "address_add",
            SetupError::Iptables { .. } => "iptables",
            SetupError::Netlink(_) => "netlink",
            SetupError::Config(_) => "config",
        }
    }
}

impl NodeConfig {
    /// Rejects what the kernel would reject later with a less clear message.
    pub fn validate(&self) -> Result<(), SetupError> {
        let name = &self.interface;
        // IFNAMSIZ is 16 including the NUL.
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) || name == "." {
            return Err(SetupError::Config(format!(
                "interface name {name:?} is not a valid Linux interface name (1-15 characters, no '/' or spaces)"
            )));
        }
        if self.cluster_dns.is_empty() {
            return Err(SetupError::Config("no kube-dns ClusterIP given".into()));
        }
        Ok(())
    }
}

/// What one look at the namespace found (one netlink dump, one raw `-save` per family).
struct Observed {
    net: NetState,
    rules: Vec<(Family, RuleDiff, Vec<SavedRule>)>,
}

impl Observed {
    fn missing(&self, desired: &DesiredState) -> Vec<Missing> {
        let mut out = Vec::new();
        if self.net.link(&desired.interface).is_none() {
            out.push(Missing::Interface(desired.interface.clone()));
        }
        out.extend(
            links::absent_addresses(desired, &self.net)
                .into_iter()
                .map(|a| Missing::Address(a.ip)),
        );
        for (family, diff, _) in &self.rules {
            let wanted: Vec<&desired::Rule> = desired.rules_of(*family).collect();
            out.extend(desired::rule_diff_to_missing(diff, &wanted));
        }
        out
    }

    fn link_kind(&self, desired: &DesiredState) -> String {
        self.net
            .link(&desired.interface)
            .map(|l| l.kind.clone())
            .unwrap_or_default()
    }
}

fn observe(
    desired: &DesiredState,
    links: &dyn Links,
    table: &dyn RuleTable,
    rules_known_clean: bool,
) -> Result<Observed, SetupError> {
    let net = links.dump(&desired.interface)?;
    let mut rules = Vec::new();
    if rules_known_clean {
        return Ok(Observed { net, rules });
    }
    for family in desired.rule_families() {
        let (diff, saved) = rules::observe_family(table, desired, family)?;
        rules.push((family, diff, saved));
    }
    Ok(Observed { net, rules })
}

/// Where the lock lives and how long to wait for it.
struct LockSpec<'a> {
    path: &'a std::path::Path,
    timeout: Duration,
}

impl LockSpec<'_> {
    /// Beside the lock: the rules generation at which our rules were last seen complete.
    fn verified_path(&self) -> PathBuf {
        self.path.with_extension("verified")
    }
}

/// Beside the lock: the last `auto` backend answer and what it was based on.
fn backend_cache_path(cfg: &NodeConfig) -> PathBuf {
    cfg.lock_path.with_extension("backend")
}

/// What the verified file holds when `desired`'s rules were complete at generation `stamp`.
fn verified_key(stamp: &str, desired: &DesiredState) -> String {
    let mut key = format!("{stamp}\n");
    for rule in &desired.rules {
        key.push_str(&format!(
            "{:?} {} {}\n",
            rule.family,
            rule.chain,
            rule.save_spec()
        ));
    }
    key
}

/// The key for the current generation, and whether our rules are known to be complete at it
/// (then no `-save` is needed: nothing changed since they were verified).
fn rules_generation(
    desired: &DesiredState,
    table: &dyn RuleTable,
    lock: &LockSpec<'_>,
) -> (Option<String>, bool) {
    let Some(stamp) = table.generation() else {
        return (None, false);
    };
    let key = verified_key(&stamp, desired);
    let known = std::fs::read_to_string(lock.verified_path()).is_ok_and(|v| v == key);
    (Some(key), known)
}

/// Records that the rules were complete at the generation read before they were checked.
/// Best effort: without the file the next call simply checks in full.
fn remember_verified(key: &str, lock: &LockSpec<'_>) {
    let path = lock.verified_path();
    let tmp = path.with_extension(format!(
        "tmp.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, key))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::debug!(error = %e, path = %path.display(), "could not record verified rules generation");
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The whole ensure flow over the two traits: look without the lock (fast path: everything in
/// place, nothing written), otherwise take the lock, look again (another ADD may have fixed it
/// meanwhile) and repair what is still missing.
fn ensure_with(
    desired: &DesiredState,
    links: &dyn Links,
    table: &dyn RuleTable,
    lock: &LockSpec<'_>,
) -> Result<(String, Vec<String>), SetupError> {
    // The generation is read before the rules are, so a change in between shows up as a
    // different generation next time.
    let (key, rules_known_clean) = rules_generation(desired, table, lock);
    let first = observe(desired, links, table, rules_known_clean)?;
    if first.missing(desired).is_empty() {
        if let (Some(key), false) = (&key, rules_known_clean) {
            remember_verified(key, lock);
        }
        return Ok((first.link_kind(desired), Vec::new()));
    }
    let _guard = lock::acquire(lock.path, lock.timeout)?;
    let now = observe(desired, links, table, false)?;
    let mut changes = Vec::new();
    let net = repair_links(desired, links, &now.net, &mut changes)?;
    for (family, diff, saved) in &now.rules {
        if !diff.is_clean() {
            changes.extend(rules::repair_family(table, desired, *family, diff, saved)?);
        }
    }
    let kind = net
        .link(&desired.interface)
        .map(|l| l.kind.clone())
        .unwrap_or_default();
    Ok((kind, changes))
}

/// Creates the interface if needed and adds the addresses no interface carries yet.
fn repair_links(
    desired: &DesiredState,
    links: &dyn Links,
    net: &NetState,
    changes: &mut Vec<String>,
) -> Result<NetState, SetupError> {
    let mut net = net.clone();
    if net.link(&desired.interface).is_none() {
        if let Some(kind) = links::create_link(links, &desired.interface)? {
            changes.push(format!("created interface {} ({kind})", desired.interface));
        }
        net = links.dump(&desired.interface)?;
    }
    let index = net
        .link(&desired.interface)
        .map(|l| l.index)
        .ok_or_else(|| SetupError::Interface {
            name: desired.interface.clone(),
            msg: "not found right after it was created".into(),
        })?;
    let absent = links::absent_addresses(desired, &net);
    for addr in &absent {
        links.add_address(index, *addr)?;
        changes.push(format!(
            "added {}/{} to {}",
            addr.ip, addr.prefix, desired.interface
        ));
    }
    if !absent.is_empty() {
        net = links.dump(&desired.interface)?;
    }
    Ok(net)
}

/// Makes the node state match `cfg` in the calling thread's network namespace.
pub fn ensure_node(cfg: &NodeConfig) -> Result<SetupReport, SetupError> {
    cfg.validate()?;
    let desired = DesiredState::from_config(cfg);
    let backend = rules::resolve_backend(cfg.backend, Some(&backend_cache_path(cfg)))?;
    let links = Netlink::open()?;
    let lock = LockSpec {
        path: &cfg.lock_path,
        timeout: cfg.lock_timeout,
    };
    let (link_kind, changes) = ensure_with(&desired, &links, &Iptables::new(backend), &lock)?;
    Ok(SetupReport {
        link_kind,
        changes,
        iptables_backend: backend.name().to_string(),
    })
}

/// Lists what is missing; changes nothing.
pub fn check_node(cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError> {
    cfg.validate()?;
    let desired = DesiredState::from_config(cfg);
    let backend = rules::resolve_backend(cfg.backend, Some(&backend_cache_path(cfg)))?;
    let links = Netlink::open()?;
    let table = Iptables::new(backend);
    let lock = LockSpec {
        path: &cfg.lock_path,
        timeout: cfg.lock_timeout,
    };
    let (_, rules_known_clean) = rules_generation(&desired, &table, &lock);
    Ok(observe(&desired, &links, &table, rules_known_clean)?.missing(&desired))
}

/// Removes the interface and our rules (uninstall with --teardown-node only).
pub fn teardown_node(cfg: &NodeConfig) -> Result<(), SetupError> {
    cfg.validate()?;
    // Uninstall is rare: detect afresh rather than trust a remembered answer.
    let backend = rules::resolve_backend(cfg.backend, None)?;
    let links = Netlink::open()?;
    let _guard = lock::acquire(&cfg.lock_path, cfg.lock_timeout)?;
    teardown_with(cfg, &links, &Iptables::new(backend))?;
    // Rules left in the other backend (the node switched backends since they were added)
    // would keep steering DNS after uninstall. Best effort: that backend may not exist.
    let other = match backend {
        Backend::Legacy => Backend::Nft,
        Backend::Nft => Backend::Legacy,
    };
    for family in families_of(cfg) {
        if let Err(e) = rules::remove_ours(&Iptables::new(other), family) {
            tracing::debug!(error = %e, backend = other.name(), "no rules removed from the other backend");
        }
    }
    Ok(())
}

fn families_of(cfg: &NodeConfig) -> std::collections::BTreeSet<Family> {
    cfg.cluster_dns.iter().map(Family::of).collect()
}

fn teardown_with(
    cfg: &NodeConfig,
    links: &dyn Links,
    table: &dyn RuleTable,
) -> Result<(), SetupError> {
    for family in families_of(cfg) {
        rules::remove_ours(table, family)?;
    }
    if let Some(link) = links.dump(&cfg.interface)?.link(&cfg.interface) {
        links.delete_link(link.index)?;
    }
    Ok(())
}

/// The backend `Auto` resolves to on this node right now.
pub fn detect_backend(requested: IptablesBackend) -> Result<&'static str, SetupError> {
    rules::resolve_backend(requested, None).map(Backend::name)
}

#[cfg(test)]
mod tests;
