//! The dispatcher driven with a map for the environment, a buffer for stdout and a fake node.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use node_setup::{Missing, NodeConfig, SetupError, SetupReport, stats};
use serde_json::Value;

use crate::error::CniError;
use crate::plugin::NodeOps;
use crate::skel::{self, SUPPORTED_VERSIONS};

#[derive(Default)]
struct FakeNode {
    ensure_fails: bool,
    missing: RefCell<Vec<Missing>>,
    ensures: Cell<usize>,
    checks: Cell<usize>,
}

impl NodeOps for FakeNode {
    fn ensure(&self, _cfg: &NodeConfig) -> Result<SetupReport, SetupError> {
        self.ensures.set(self.ensures.get() + 1);
        if self.ensure_fails {
            return Err(SetupError::RunIptables {
                cmd: "iptables-nft -t raw -I PREROUTING 1".into(),
                msg: "boom".into(),
            });
        }
        self.missing.borrow_mut().clear();
        Ok(SetupReport::default())
    }
    fn check(&self, _cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError> {
        self.checks.set(self.checks.get() + 1);
        Ok(self.missing.borrow().clone())
    }
}

struct Call {
    env: HashMap<&'static str, String>,
    stdin: String,
    dir: tempfile::TempDir,
}

const PREV: &str = r#"{"cniVersion":"VERSION","interfaces":[{"name":"eth0","mtu":1450,"sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.244.0.5/24","gateway":"10.244.0.1","interface":0}],"routes":[{"dst":"0.0.0.0/0","table":100}],"dns":{},"futureField":[1,2,{"k":null}]}"#;

fn call(command: &str, version: &str, extra: &str) -> Call {
    let dir = tempfile::tempdir().unwrap();
    let env = HashMap::from([
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", "c0ffee".to_string()),
        ("CNI_NETNS", "/var/run/netns/x".to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ]);
    let stdin = format!(
        r#"{{"cniVersion":"{version}","name":"k8s","type":"node-local-dns","clusterDNS":["10.96.0.10"],"logFile":"{d}/cni.log","statsDir":"{d}/stats","lockFile":"{d}/setup.lock"{extra}}}"#,
        d = dir.path().display()
    );
    Call { env, stdin, dir }
}

fn with_prev(version: &str) -> String {
    format!(r#","prevResult":{}"#, PREV.replace("VERSION", version))
}

fn run(c: &Call, node: &FakeNode) -> (Result<(), CniError>, String) {
    let mut out = Vec::new();
    let getenv = |k: &str| c.env.get(k).cloned();
    let res = skel::run(&getenv, c.stdin.as_bytes(), &mut out, node);
    (res, String::from_utf8(out).unwrap())
}

#[test]
fn version_lists_all_five_for_every_version() {
    for v in SUPPORTED_VERSIONS {
        let (res, out) = run(&call("VERSION", v, ""), &FakeNode::default());
        res.unwrap();
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["cniVersion"], v);
        assert_eq!(
            json["supportedVersions"],
            serde_json::json!(SUPPORTED_VERSIONS)
        );
    }
}

#[test]
fn add_passes_prev_result_through_unchanged_for_every_version() {
    for v in SUPPORTED_VERSIONS {
        let node = FakeNode::default();
        let (res, out) = run(&call("ADD", v, &with_prev(v)), &node);
        res.unwrap();
        assert_eq!(out, PREV.replace("VERSION", v), "{v}");
        assert_eq!(node.ensures.get(), 1);
    }
}

#[test]
fn add_sets_the_config_version_on_an_older_prev_result_keeping_every_field() {
    let node = FakeNode::default();
    let (res, out) = run(&call("ADD", "1.0.0", &with_prev("0.4.0")), &node);
    res.unwrap();
    let got: Value = serde_json::from_str(&out).unwrap();
    let want: Value = serde_json::from_str(&PREV.replace("VERSION", "1.0.0")).unwrap();
    assert_eq!(got, want);
    assert!(
        out.starts_with(r#"{"cniVersion":"1.0.0","interfaces""#),
        "{out}"
    );
}

#[test]
fn add_without_prev_result_is_code_7_and_changes_nothing() {
    for v in SUPPORTED_VERSIONS {
        let node = FakeNode::default();
        let (res, out) = run(&call("ADD", v, ""), &node);
        let err = res.unwrap_err();
        assert_eq!((err.code, err.cni_version.as_str()), (7, v));
        assert!(out.is_empty());
        assert_eq!(node.ensures.get(), 0);
    }
}

#[test]
fn missing_env_is_code_4() {
    for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
        let mut c = call("ADD", "1.0.0", &with_prev("1.0.0"));
        c.env.remove(var);
        let err = run(&c, &FakeNode::default()).0.unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.msg.contains(var), "{err}");
    }
    let mut c = call("ADD", "1.0.0", "");
    c.env.insert("CNI_COMMAND", "FROB".into());
    assert_eq!(run(&c, &FakeNode::default()).0.unwrap_err().code, 4);
}

#[test]
fn bad_json_is_code_6_and_unsupported_version_is_code_1_with_the_list() {
    let mut c = call("ADD", "1.0.0", "");
    c.stdin = "{\"cniVersion\": ".into();
    assert_eq!(run(&c, &FakeNode::default()).0.unwrap_err().code, 6);
    let err = run(
        &call("ADD", "9.9.9", &with_prev("9.9.9")),
        &FakeNode::default(),
    )
    .0
    .unwrap_err();
    assert_eq!(err.code, 1);
    assert!(
        err.details.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
        "{err}"
    );
}

#[test]
fn del_status_gc_always_succeed_silently_and_touch_nothing() {
    for command in ["DEL", "STATUS", "GC"] {
        for v in SUPPORTED_VERSIONS {
            let node = FakeNode::default();
            let mut c = call(command, v, "");
            c.env.remove("CNI_NETNS");
            let (res, out) = run(&c, &node);
            res.unwrap();
            assert!(out.is_empty());
            c.stdin = "garbage".into();
            let (res, out) = run(&c, &node);
            res.unwrap();
            assert!(out.is_empty());
            assert_eq!(node.ensures.get() + node.checks.get(), 0);
        }
    }
}

#[test]
fn failure_policy_open_logs_counts_and_succeeds() {
    let node = FakeNode {
        ensure_fails: true,
        ..FakeNode::default()
    };
    let c = call("ADD", "1.0.0", &with_prev("1.0.0"));
    let (res, out) = run(&c, &node);
    res.unwrap();
    assert_eq!(out, PREV.replace("VERSION", "1.0.0"));
    let s = stats::load(&c.dir.path().join("stats")).unwrap();
    assert_eq!(s.operations["ADD"], 1);
    assert_eq!(s.setup_errors["iptables"], 1);
}

#[test]
fn failure_policy_closed_is_code_11_naming_the_failure() {
    let node = FakeNode {
        ensure_fails: true,
        ..FakeNode::default()
    };
    let extra = format!(r#","failurePolicy":"closed"{}"#, with_prev("1.0.0"));
    let (res, out) = run(&call("ADD", "1.0.0", &extra), &node);
    let err = res.unwrap_err();
    assert_eq!(err.code, 11);
    assert!(
        err.msg.contains("iptables-nft -t raw -I PREROUTING 1"),
        "{err}"
    );
    assert!(out.is_empty());
}

#[test]
fn check_succeeds_when_in_place_and_repairs_when_open() {
    let node = FakeNode::default();
    run(&call("CHECK", "1.0.0", &with_prev("1.0.0")), &node)
        .0
        .unwrap();
    assert_eq!((node.checks.get(), node.ensures.get()), (1, 0));
    node.missing
        .borrow_mut()
        .push(Missing::Interface("nodelocaldns".into()));
    let (res, out) = run(&call("CHECK", "0.4.0", &with_prev("0.4.0")), &node);
    res.unwrap();
    assert!(out.is_empty());
    assert_eq!(node.ensures.get(), 1);
}

#[test]
fn check_reports_missing_state_when_closed_and_is_refused_before_0_4_0() {
    let node = FakeNode::default();
    node.missing
        .borrow_mut()
        .push(Missing::Interface("nodelocaldns".into()));
    let extra = format!(r#","failurePolicy":"closed"{}"#, with_prev("1.1.0"));
    let c = call("CHECK", "1.1.0", &extra);
    let err = run(&c, &node).0.unwrap_err();
    assert_eq!(err.code, 11);
    assert!(err.msg.contains("interface nodelocaldns missing"), "{err}");
    assert_eq!(node.ensures.get(), 0);
    let s = stats::load(&c.dir.path().join("stats")).unwrap();
    assert_eq!(s.setup_errors["interface_add"], 1);
    for v in ["0.3.0", "0.3.1"] {
        let err = run(&call("CHECK", v, &with_prev(v)), &node).0.unwrap_err();
        assert_eq!(err.code, 1);
    }
}

#[test]
fn error_json_has_the_spec_fields() {
    let err = CniError::new(7, "bad").with_version("0.4.0");
    let json: Value = serde_json::from_str(&err.to_json()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"cniVersion":"0.4.0","code":7,"msg":"bad"})
    );
}
