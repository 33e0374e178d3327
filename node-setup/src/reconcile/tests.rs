//! Unit tests of the ensure/check/teardown flow over fake links and a fake raw table.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::SocketMatch;
use crate::desired::{Address, output_rule, prerouting_rule};
use crate::links::{AddLinkError, Link};

struct FakeLinks {
    has_dummy: bool,
    state: RefCell<NetState>,
}

impl FakeLinks {
    fn new(has_dummy: bool) -> FakeLinks {
        let lo = Link {
            index: 1,
            name: "lo".into(),
            kind: String::new(),
        };
        FakeLinks {
            has_dummy,
            state: RefCell::new(NetState {
                links: vec![lo],
                addresses: vec![(1, "127.0.0.1".parse().unwrap())],
            }),
        }
    }

    fn addresses_on(&self, name: &str) -> Vec<IpAddr> {
        let st = self.state.borrow();
        let idx = st.link(name).unwrap().index;
        st.addresses
            .iter()
            .filter(|(i, _)| *i == idx)
            .map(|(_, a)| *a)
            .collect()
    }
}

impl Links for FakeLinks {
    fn dump(&self, name: &str) -> Result<NetState, SetupError> {
        let mut st = self.state.borrow().clone();
        st.links.retain(|l| l.name == name);
        Ok(st)
    }
    fn add_link(&self, name: &str, kind: &str) -> Result<(), AddLinkError> {
        if kind == "dummy" && !self.has_dummy {
            return Err(AddLinkError::Unsupported);
        }
        let mut st = self.state.borrow_mut();
        if st.link(name).is_some() {
            return Err(AddLinkError::Exists);
        }
        let index = st.links.len() as u32 + 1;
        st.links.push(Link {
            index,
            name: name.into(),
            kind: kind.into(),
        });
        Ok(())
    }
    fn add_address(&self, index: u32, addr: Address) -> Result<(), SetupError> {
        self.state.borrow_mut().addresses.push((index, addr.ip));
        Ok(())
    }
    fn delete_link(&self, index: u32) -> Result<(), SetupError> {
        let mut st = self.state.borrow_mut();
        st.links.retain(|l| l.index != index);
        st.addresses.retain(|(i, _)| *i != index);
        Ok(())
    }
}

/// A raw table per family, as (chain, spec) in order; counts the saves and edits.
#[derive(Default)]
struct FakeTable {
    rules: RefCell<BTreeMap<Family, Vec<(String, String)>>>,
    edits: RefCell<usize>,
    /// Like nft: a generation that every change bumps.
    has_generation: bool,
    generation: Cell<u64>,
    saves: Cell<usize>,
}

impl FakeTable {
    fn chain(&self, family: Family, chain: &str) -> Vec<String> {
        self.rules
            .borrow()
            .get(&family)
            .map(|r| {
                r.iter()
                    .filter(|(c, _)| c == chain)
                    .map(|(_, s)| s.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn push_first(&self, family: Family, chain: &str, spec: &str) {
        self.generation.set(self.generation.get() + 1);
        self.rules
            .borrow_mut()
            .entry(family)
            .or_default()
            .insert(0, (chain.into(), spec.into()));
    }
}

impl RuleTable for FakeTable {
    fn save_raw(&self, family: Family) -> Result<String, SetupError> {
        self.saves.set(self.saves.get() + 1);
        let mut out = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for (chain, spec) in self.rules.borrow().get(&family).into_iter().flatten() {
            out.push_str(&format!("-A {chain} {spec}\n"));
        }
        out.push_str("COMMIT\n");
        Ok(out)
    }
    fn insert_first(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError> {
        *self.edits.borrow_mut() += 1;
        self.push_first(family, chain, spec);
        Ok(())
    }
    fn delete(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError> {
        *self.edits.borrow_mut() += 1;
        self.generation.set(self.generation.get() + 1);
        let mut all = self.rules.borrow_mut();
        let rules = all.entry(family).or_default();
        if let Some(pos) = rules.iter().position(|(c, s)| c == chain && s == spec) {
            rules.remove(pos);
        }
        Ok(())
    }
    fn generation(&self) -> Option<String> {
        self.has_generation
            .then(|| format!("fake:{}", self.generation.get()))
    }
}

const CLUSTER: &str = "10.96.0.10";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg(cluster: &[&str]) -> NodeConfig {
    NodeConfig::new(cluster.iter().map(|s| ip(s)).collect())
}

fn run_ensure(
    cfg: &NodeConfig,
    links: &FakeLinks,
    table: &FakeTable,
) -> (String, Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (kind, changes) = ensure_in(dir.path(), cfg, links, table);
    (kind, changes, dir)
}

fn ensure_in(
    dir: &Path,
    cfg: &NodeConfig,
    links: &FakeLinks,
    table: &FakeTable,
) -> (String, Vec<String>) {
    let applied = applied_in(dir, cfg, links, table);
    (applied.link_kind, applied.changes)
}

fn applied_in(dir: &Path, cfg: &NodeConfig, links: &FakeLinks, table: &FakeTable) -> Applied {
    let lock_path = dir.join("setup.lock");
    let lock = LockSpec {
        path: &lock_path,
        timeout: Duration::from_secs(1),
    };
    ensure_with(&DesiredState::from_config(cfg), links, table, &lock).unwrap()
}

#[test]
fn unchanged_generation_skips_reading_rules_and_any_change_rechecks() {
    let (links, dir) = (FakeLinks::new(false), tempfile::tempdir().unwrap());
    let table = FakeTable {
        has_generation: true,
        ..FakeTable::default()
    };
    let c = cfg(&[CLUSTER]);
    ensure_in(dir.path(), &c, &links, &table);
    // Our own repair changed the generation: the next call checks in full, then remembers.
    let (_, changes) = ensure_in(dir.path(), &c, &links, &table);
    assert!(changes.is_empty());
    let saves = table.saves.get();
    let (_, changes) = ensure_in(dir.path(), &c, &links, &table);
    assert!(changes.is_empty());
    assert_eq!(
        table.saves.get(),
        saves,
        "fast path must not read the rules"
    );
    // Someone else changes the table: the generation moves, the rules are read and repaired.
    table.delete(Family::V4, "PREROUTING", &udp_pre()).unwrap();
    let (_, changes) = ensure_in(dir.path(), &c, &links, &table);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(table.saves.get() > saves);
    assert_eq!(table.chain(Family::V4, "PREROUTING")[0], udp_pre());
    // A different desired state never matches the remembered key.
    ensure_in(dir.path(), &c, &links, &table);
    let saves = table.saves.get();
    ensure_in(dir.path(), &cfg(&["10.96.0.11"]), &links, &table);
    assert!(table.saves.get() > saves);
}

#[test]
fn without_a_generation_every_call_reads_the_rules() {
    let (links, table, dir) = (
        FakeLinks::new(false),
        FakeTable::default(),
        tempfile::tempdir().unwrap(),
    );
    let c = cfg(&[CLUSTER]);
    ensure_in(dir.path(), &c, &links, &table);
    ensure_in(dir.path(), &c, &links, &table);
    let saves = table.saves.get();
    ensure_in(dir.path(), &c, &links, &table);
    assert_eq!(table.saves.get(), saves + 1);
    assert!(!dir.path().join("setup.verified").exists());
}

fn missing(cfg: &NodeConfig, links: &FakeLinks, table: &FakeTable) -> Vec<Missing> {
    let desired = DesiredState::from_config(cfg);
    observe(&desired, links, table, false)
        .unwrap()
        .missing(&desired)
}

fn udp_pre() -> String {
    prerouting_rule(ip(CLUSTER), "udp", SocketMatch::Safe).save_spec()
}

#[test]
fn rules_are_in_iptables_save_form() {
    assert_eq!(
        udp_pre(),
        "-d 10.96.0.10/32 -p udp -m udp --dport 53 -m socket -m comment --comment \
         \"node-local-dns: udp to 10.96.0.10 goes to the local cache when it listens\" -j NOTRACK"
    );
    assert_eq!(
        output_rule(ip("fd00::a"), "tcp").save_spec(),
        "-s fd00::a/128 -p tcp -m tcp --sport 53 -m comment --comment \
         \"node-local-dns: tcp replies from fd00::a are not tracked\" -j NOTRACK"
    );
    let nowild = prerouting_rule(ip(CLUSTER), "tcp", SocketMatch::NoWildcard).save_spec();
    assert!(
        nowild.contains("-m socket --nowildcard -m comment"),
        "{nowild}"
    );
}

#[test]
fn desired_state_has_addresses_and_four_rules_per_cluster_ip() {
    let d = DesiredState::from_config(&cfg(&[CLUSTER, "fd00::a"]));
    let addrs: Vec<(IpAddr, u8)> = d.addresses.iter().map(|a| (a.ip, a.prefix)).collect();
    assert_eq!(
        addrs,
        vec![
            (ip(CLUSTER), 32),
            (ip("fd00::a"), 128),
            (ip("169.254.20.10"), 32)
        ]
    );
    assert_eq!(d.rules_of(Family::V4).count(), 4);
    assert_eq!(d.rules_of(Family::V6).count(), 4);
    // PREROUTING rules come first: they are inserted last, at position 1.
    assert_eq!(d.rules[0].chain, "PREROUTING");
}

#[test]
fn fresh_node_falls_back_to_bridge_and_gets_everything() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    let c = cfg(&[CLUSTER]);
    let (kind, changes, _d) = run_ensure(&c, &links, &table);
    assert_eq!(kind, "bridge");
    assert!(!changes.is_empty());
    assert_eq!(
        links.addresses_on("nodelocaldns"),
        vec![ip(CLUSTER), ip("169.254.20.10")]
    );
    let pre = table.chain(Family::V4, "PREROUTING");
    assert_eq!(pre.len(), 2);
    assert_eq!(pre[0], udp_pre());
    assert_eq!(table.chain(Family::V4, "OUTPUT").len(), 2);
    assert!(missing(&c, &links, &table).is_empty());
}

#[test]
fn dummy_is_used_when_the_kernel_has_it() {
    let (links, table) = (FakeLinks::new(true), FakeTable::default());
    let (kind, _, _d) = run_ensure(&cfg(&[CLUSTER]), &links, &table);
    assert_eq!(kind, "dummy");
}

#[test]
fn second_ensure_is_the_fast_path_and_takes_no_lock() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    let c = cfg(&[CLUSTER]);
    run_ensure(&c, &links, &table);
    let edits = *table.edits.borrow();
    let (kind, changes, dir) = run_ensure(&c, &links, &table);
    assert_eq!((kind.as_str(), changes.len()), ("bridge", 0));
    assert_eq!(*table.edits.borrow(), edits);
    assert!(!dir.path().join("setup.lock").exists());
}

#[test]
fn address_on_another_interface_is_not_duplicated() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    links
        .state
        .borrow_mut()
        .addresses
        .push((1, ip("169.254.20.10")));
    run_ensure(&cfg(&[CLUSTER]), &links, &table);
    assert_eq!(links.addresses_on("nodelocaldns"), vec![ip(CLUSTER)]);
}

#[test]
fn foreign_accept_above_our_rules_is_moved_below() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    let c = cfg(&[CLUSTER]);
    run_ensure(&c, &links, &table);
    table.push_first(Family::V4, "PREROUTING", "-j ACCEPT");
    let m = missing(&c, &links, &table);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|m| matches!(m, Missing::RuleNotFirst { .. })));
    run_ensure(&c, &links, &table);
    let pre = table.chain(Family::V4, "PREROUTING");
    assert_eq!(pre.len(), 3);
    assert_eq!(pre[0], udp_pre());
    assert_eq!(pre[2], "-j ACCEPT");
}

#[test]
fn deleted_and_duplicated_rules_are_repaired_to_one_copy() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    let c = cfg(&[CLUSTER]);
    run_ensure(&c, &links, &table);
    let out_udp = output_rule(ip(CLUSTER), "udp").save_spec();
    table.delete(Family::V4, "PREROUTING", &udp_pre()).unwrap();
    table.push_first(Family::V4, "OUTPUT", &out_udp);
    let m = missing(&c, &links, &table);
    assert!(m.contains(&Missing::Rule {
        table: "raw".into(),
        chain: "PREROUTING".into(),
        spec: udp_pre()
    }));
    assert!(
        m.iter()
            .any(|m| matches!(m, Missing::RuleDuplicated { .. }))
    );
    run_ensure(&c, &links, &table);
    assert!(missing(&c, &links, &table).is_empty());
    let out = table.chain(Family::V4, "OUTPUT");
    assert_eq!(out.iter().filter(|s| **s == out_udp).count(), 1);
    assert_eq!(table.chain(Family::V4, "PREROUTING")[0], udp_pre());
}

#[test]
fn stale_rules_of_ours_are_removed_and_foreign_rules_kept() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    run_ensure(&cfg(&["10.96.0.99"]), &links, &table);
    table.push_first(Family::V4, "OUTPUT", "-j CT --notrack");
    let c = cfg(&[CLUSTER]);
    let m = missing(&c, &links, &table);
    assert_eq!(
        m.iter()
            .filter(|m| matches!(m, Missing::UnwantedRule { .. }))
            .count(),
        4
    );
    run_ensure(&c, &links, &table);
    assert!(missing(&c, &links, &table).is_empty());
    let all: Vec<String> = ["PREROUTING", "OUTPUT"]
        .iter()
        .flat_map(|ch| table.chain(Family::V4, ch))
        .collect();
    assert_eq!(all.len(), 5);
    assert!(!all.iter().any(|s| s.contains("10.96.0.99")));
    assert!(all.contains(&"-j CT --notrack".to_string()));
}

#[test]
fn dual_stack_programs_each_family_separately() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    run_ensure(&cfg(&[CLUSTER, "fd00::a"]), &links, &table);
    for fam in [Family::V4, Family::V6] {
        assert_eq!(table.chain(fam, "PREROUTING").len(), 2);
        assert_eq!(table.chain(fam, "OUTPUT").len(), 2);
    }
    assert!(table.chain(Family::V6, "PREROUTING")[0].starts_with("-d fd00::a/128 -p udp"));
}

#[test]
fn check_lists_everything_on_a_fresh_node() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    let m = missing(&cfg(&[CLUSTER]), &links, &table);
    assert_eq!(m[0], Missing::Interface("nodelocaldns".into()));
    assert_eq!(
        m.iter()
            .filter(|m| matches!(m, Missing::Address(_)))
            .count(),
        2
    );
    assert_eq!(
        m.iter()
            .filter(|m| matches!(m, Missing::Rule { .. }))
            .count(),
        4
    );
    assert_eq!(*table.edits.borrow(), 0);
}

#[test]
fn teardown_removes_our_rules_and_interface_only() {
    let (links, table) = (FakeLinks::new(false), FakeTable::default());
    let c = cfg(&[CLUSTER]);
    run_ensure(&c, &links, &table);
    table.push_first(Family::V4, "PREROUTING", "-j ACCEPT");
    teardown_with(&c, &links, &table).unwrap();
    assert_eq!(table.chain(Family::V4, "PREROUTING"), vec!["-j ACCEPT"]);
    assert!(table.chain(Family::V4, "OUTPUT").is_empty());
    assert!(links.state.borrow().link("nodelocaldns").is_none());
}

/// What the NodeLocal DNSCache addon writes with `-localip 169.254.20.10,10.96.0.10`, as
/// `iptables-save` prints it (raw and filter; identical for both backends).
const ADDON_SAVE: &str = include_str!("../../tests/data/addon-rules.save");

/// The raw-table part of `ADDON_SAVE` (the filter table is not ours to read).
fn addon_raw() -> Vec<SavedRule> {
    let raw = ADDON_SAVE.split("*filter").next().unwrap_or_default();
    desired::parse_save(raw)
}

fn with_addon_rules(table: &FakeTable) {
    for saved in addon_raw().iter().rev() {
        table.push_first(Family::V4, &saved.chain, &saved.spec);
    }
}

fn addon_blackholes(table: &FakeTable) -> Vec<String> {
    ["PREROUTING", "OUTPUT"]
        .iter()
        .flat_map(|ch| table.chain(Family::V4, ch))
        .filter(|s| s.contains("NodeLocal DNS Cache") && s.starts_with("-d 10.96.0.10/32"))
        .filter(|s| s.contains("--dport 53 "))
        .collect()
}

fn ensure_applied(cfg: &NodeConfig, links: &FakeLinks, table: &FakeTable) -> Applied {
    applied_in(tempfile::tempdir().unwrap().path(), cfg, links, table)
}

#[test]
fn addon_rules_are_classified_by_comment_target_and_socket_match() {
    let cluster = [ip(CLUSTER)];
    let blackholes: Vec<SavedRule> = addon_raw()
        .into_iter()
        .filter(|s| s.is_addon_cluster_dns_blackhole(&cluster))
        .collect();
    let described: Vec<(&str, &str)> = blackholes
        .iter()
        .map(|s| (s.chain.as_str(), &s.spec[..41]))
        .collect();
    assert_eq!(
        described,
        [
            ("PREROUTING", "-d 10.96.0.10/32 -p udp -m udp --dport 53"),
            ("PREROUTING", "-d 10.96.0.10/32 -p tcp -m tcp --dport 53"),
            ("OUTPUT", "-d 10.96.0.10/32 -p udp -m udp --dport 53"),
            ("OUTPUT", "-d 10.96.0.10/32 -p tcp -m tcp --dport 53"),
        ]
    );
    let rule = |chain: &str, spec: &str| SavedRule {
        chain: chain.into(),
        spec: spec.into(),
    };
    let comment = "-m comment --comment \"NodeLocal DNS Cache: skip conntrack\"";
    // With a socket match the rule already falls back: harmless.
    let gated = format!("-d 10.96.0.10/32 -p udp -m udp --dport 53 -m socket {comment} -j NOTRACK");
    assert!(!rule("PREROUTING", &gated).is_addon_cluster_dns_blackhole(&cluster));
    // Another product's rule, even the same match: not ours to judge.
    let untagged = "-d 10.96.0.10/32 -p udp -m udp --dport 53 -j NOTRACK";
    assert!(!rule("PREROUTING", untagged).is_addon_cluster_dns_blackhole(&cluster));
    // The CT target spelling, and an IPv6 ClusterIP.
    let ct6 = format!("-d fd00::a/128 -p udp -m udp --dport 53 {comment} -j CT --notrack");
    assert!(rule("PREROUTING", &ct6).is_addon_cluster_dns_blackhole(&[ip("fd00::a")]));
    // A ClusterIP we are not configured for is left alone.
    assert!(!blackholes[0].is_addon_cluster_dns_blackhole(&[ip("10.96.0.11")]));
}

#[test]
fn addon_blackhole_rules_are_removed_counted_and_the_rest_kept() {
    let (links, table) = (FakeLinks::new(true), FakeTable::default());
    with_addon_rules(&table);
    let c = cfg(&[CLUSTER]);
    let foreign: Vec<Missing> = missing(&c, &links, &table)
        .into_iter()
        .filter(|m| matches!(m, Missing::ForeignRule { .. }))
        .collect();
    assert_eq!(foreign.len(), 4, "{foreign:?}");
    assert!(
        foreign[0]
            .to_string()
            .starts_with("foreign rule blackholes DNS")
    );

    let applied = ensure_applied(&c, &links, &table);
    assert_eq!(applied.foreign_rules_removed, 4);
    let deleted = applied
        .changes
        .iter()
        .filter(|c| c.starts_with("deleted foreign rule"))
        .count();
    assert_eq!(deleted, 4, "{:?}", applied.changes);
    assert!(addon_blackholes(&table).is_empty());
    assert!(missing(&c, &links, &table).is_empty());
    // The other 12 rules of the addon stay, below ours.
    let pre = table.chain(Family::V4, "PREROUTING");
    assert_eq!(pre[0], udp_pre());
    let addon_left = ["PREROUTING", "OUTPUT"]
        .iter()
        .flat_map(|ch| table.chain(Family::V4, ch))
        .filter(|s| s.contains("NodeLocal DNS Cache"))
        .count();
    assert_eq!(addon_left, 12);
    assert_eq!(ensure_applied(&c, &links, &table).foreign_rules_removed, 0);
}

#[test]
fn addon_rule_added_back_by_its_sync_loop_is_removed_again() {
    let (links, dir) = (FakeLinks::new(true), tempfile::tempdir().unwrap());
    let table = FakeTable {
        has_generation: true,
        ..FakeTable::default()
    };
    let c = cfg(&[CLUSTER]);
    with_addon_rules(&table);
    ensure_in(dir.path(), &c, &links, &table);
    ensure_in(dir.path(), &c, &links, &table);
    // The addon's periodic EnsureRule prepends it again (above ours).
    let addon_pre = addon_raw()[0].spec.clone();
    table.push_first(Family::V4, "PREROUTING", &addon_pre);
    let (_, changes) = ensure_in(dir.path(), &c, &links, &table);
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("deleted foreign rule")),
        "{changes:?}"
    );
    assert!(addon_blackholes(&table).is_empty());
    assert_eq!(table.chain(Family::V4, "PREROUTING")[0], udp_pre());
}
