//! The Grafana dashboard (dashboards/node-local-dns.json) and the alerts
//! (install/monitoring/prometheusrule.yaml) against the real thing: knotd as the cluster DNS,
//! the real node-local-dns-resolver under a query mix, and Debian's Prometheus scraping it with
//! the PodMonitor's relabelings and the PrometheusRule loaded as its rule file. Every dashboard
//! expression must parse and return series; every alert must load, evaluate and parse.
//!
//! Addresses: 127.0.40.1 knotd, 127.0.40.2 the daemon, 127.0.40.3 Prometheus, 127.0.40.4 a
//! dead upstream (loopback only). The CNI panels get data from the real plugin, run twice in
//! throwaway network namespaces (`unshare --net`): one ADD that sets the namespace up, one
//! whose lock file cannot be created (a real setup error, failure policy open).
//! Needs root (port 53, netns), knotd, prometheus, promtool, unshare, iptables and
//! /usr/bin/python3 with python3-yaml.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

const UPSTREAM: &str = "127.0.40.1:53";
/// A second upstream nobody listens on: its health checks fail, so the health-check panels
/// have series and the health-check alert must go pending for exactly this `to`.
const DEAD_UPSTREAM: &str = "127.0.40.4:53";
const DAEMON_DNS: &str = "127.0.40.2:53";
const DAEMON_METRICS: &str = "127.0.40.2:9253";
const DAEMON_HEALTH: &str = "127.0.40.2:8080";
const PROMETHEUS: &str = "127.0.40.3:9090";
/// What `__meta_kubernetes_pod_node_name` would be; the PodMonitor turns it into `node`.
const NODE_NAME: &str = "nldm-node-1";
/// Grafana's `$__rate_interval` is at least four scrape intervals; scrapes here are 1 s apart.
const RATE_INTERVAL: &str = "10s";
/// How long the slow steps (start-up, scrapes, rare counters appearing) may take before the
/// test fails. Generous: the machine is shared; nothing here asserts on speed.
const PATIENCE: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard_path() -> PathBuf {
    repo_root().join("dashboards/node-local-dns.json")
}

fn monitoring_dir() -> PathBuf {
    repo_root().join("install/monitoring")
}

// ---------------------------------------------------------------------------------------
// Files: the dashboard JSON and the monitoring manifests (YAML read via python3-yaml, since
// the e2e crate has no YAML parser and Debian's python3-yaml is on every test machine).

fn load_dashboard() -> Result<Value> {
    let text = std::fs::read_to_string(dashboard_path()).context("read dashboard")?;
    serde_json::from_str(&text).context("dashboard is not valid JSON")
}

fn load_yaml(path: &Path) -> Result<Value> {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .context("run /usr/bin/python3 (apt install python3-yaml)")?;
    ensure!(
        out.status.success(),
        "YAML {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("python3 printed invalid JSON")
}

fn load_manifest(name: &str) -> Result<Value> {
    load_yaml(&monitoring_dir().join(name))
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, expression) for every query target of the dashboard.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in all_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?").to_string();
                out.push((title, expr.to_string()));
            }
        }
    }
    out
}

/// The dashboard's query variables as (name, label, PromQL selector) from
/// `label_values(<selector>, <label>)`, in dashboard order.
fn query_variables(dashboard: &Value) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().context("variable without name")?;
        let def = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .with_context(|| format!("variable {name} has no query"))?;
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .with_context(|| format!("variable {name}: not label_values(...): {def}"))?;
        let (selector, label) = inner
            .rsplit_once(',')
            .with_context(|| format!("variable {name}: label_values needs a label: {def}"))?;
        out.push((name.into(), label.trim().into(), selector.trim().into()));
    }
    Ok(out)
}

/// Escapes a label value for a `=~` matcher inside a PromQL string, as Grafana does.
fn regex_escape(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// Substitutes Grafana variables the way a dashboard with "All" selected does: a multi-value
/// variable becomes the alternation of its values. Fails on a variable left unsubstituted.
fn substitute(expr: &str, values: &BTreeMap<String, Vec<String>>) -> Result<String> {
    let mut out = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__interval", "2s")
        .replace("$__range", "1m");
    // Longest names first so `$node` does not eat the start of `$nodes`.
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let alternation = values[name]
            .iter()
            .map(|v| regex_escape(v))
            .collect::<Vec<_>>()
            .join("|");
        let value = format!("({alternation})");
        out = out
            .replace(&format!("${{{name}}}"), &value)
            .replace(&format!("${name}"), &value);
    }
    ensure!(!out.contains('$'), "unknown variable left in: {out}");
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Checks that need no daemon.

#[test]
fn dashboard_json_is_what_the_generator_writes() {
    let out = Command::new("/usr/bin/python3")
        .arg(repo_root().join("dashboards/generate.py"))
        .arg("--stdout")
        .output()
        .expect("run dashboards/generate.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read(dashboard_path()).unwrap();
    assert!(
        out.stdout == committed,
        "dashboards/node-local-dns.json is stale: run python3 dashboards/generate.py"
    );
}

#[test]
fn dashboard_has_the_rows_variables_and_panels_operators_expect() {
    let d = load_dashboard().unwrap();
    assert_eq!(d["title"], "Kubernetes / DNS (node local)");
    let rows: Vec<(String, String)> = all_panels(&d)
        .into_iter()
        .filter(|p| p["type"] == "row")
        .map(|p| {
            (
                p["title"].as_str().unwrap().to_string(),
                p["repeat"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expected = [
        ("General", ""),
        ("Node $node", "node"),
        ("Upstream $upstream", "upstream"),
    ];
    assert_eq!(
        rows,
        expected.map(|(t, r)| (t.to_string(), r.to_string())),
        "rows as docs/design-facts.md §5"
    );

    let vars = query_variables(&d).unwrap();
    let var = |name: &str| vars.iter().find(|v| v.0 == name).cloned().unwrap();
    assert!(var("node").2.starts_with("coredns_build_info") && var("node").1 == "node");
    assert_eq!(var("rcode").1, "rcode");
    assert_eq!(var("upstream").1, "to");

    let exprs: String = panel_queries(&d)
        .into_iter()
        .map(|q| q.1)
        .collect::<Vec<_>>()
        .join("\n");
    for metric in [
        "coredns_cache_served_stale_total",
        "coredns_cache_prefetch_total",
        "node_local_dns_prefetch_unasked_total",
        "node_local_dns_prefetch_dropped_total",
        "node_local_dns_coalesced_queries_total",
        "coredns_nodecache_setup_errors_total",
        "node_local_dns_cni_operation_duration_seconds_sum{job=\"node-local-dns\", node=~\"$node\", command=\"ADD\"}",
        "node_local_dns_cni_operation_duration_seconds_count{job=\"node-local-dns\", node=~\"$node\", command=\"ADD\"}",
        "node_local_dns_cni_operations_total",
        "coredns_dns_request_duration_seconds_bucket",
        "coredns_proxy_request_duration_seconds_bucket",
        "coredns_cache_entries",
    ] {
        assert!(exprs.contains(metric), "no panel charts {metric}");
    }
    // Every series selector is scoped to the PodMonitor's job and the node variable.
    for (title, expr) in panel_queries(&d) {
        assert!(
            expr.contains("job=\"node-local-dns\"") && expr.contains("node=~\"$node\""),
            "panel {title:?} is not scoped by job and $node: {expr}"
        );
    }
    // Panels fit the 24-column grid and do not overlap.
    let boxes: Vec<(u64, u64, u64, u64)> = all_panels(&d)
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| g[k].as_u64().unwrap();
            (n("x"), n("y"), n("w"), n("h"))
        })
        .collect();
    for (i, a) in boxes.iter().enumerate() {
        assert!(a.0 + a.2 <= 24, "panel {i} leaves the grid: {a:?}");
        for b in &boxes[i + 1..] {
            let apart =
                a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
            assert!(apart, "panels overlap: {a:?} {b:?}");
        }
    }
    // Panel ids are unique (Grafana uses them for links and repeats).
    let ids: Vec<u64> = all_panels(&d)
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "duplicate panel ids");
}

#[test]
fn service_and_podmonitor_agree_on_port_labels_and_relabelling() {
    let svc = load_manifest("service.yaml").unwrap();
    let pm = load_manifest("podmonitor.yaml").unwrap();
    let kust = load_manifest("kustomization.yaml").unwrap();
    for file in ["service.yaml", "podmonitor.yaml", "prometheusrule.yaml"] {
        assert!(
            kust["resources"].as_array().unwrap().contains(&json!(file)),
            "{file} not in kustomization.yaml"
        );
    }
    assert_eq!(svc["spec"]["clusterIP"], "None", "Service must be headless");
    let port = &svc["spec"]["ports"][0];
    assert_eq!(
        (port["name"].as_str(), port["port"].as_u64()),
        (Some("metrics"), Some(9355))
    );
    assert_eq!(
        svc["spec"]["selector"], pm["spec"]["selector"]["matchLabels"],
        "Service and PodMonitor must select the same pods"
    );
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    let relabel = prometheus_relabel_configs(&pm).unwrap();
    assert!(relabel.contains(&json!({
        "action": "replace",
        "source_labels": ["__meta_kubernetes_pod_node_name"],
        "target_label": "node"
    })));
    assert!(relabel.contains(&json!({
        "action": "replace", "target_label": "job", "replacement": "node-local-dns"
    })));
}

#[test]
fn alert_rules_pass_promtool_and_cover_every_alert() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = write_rule_file(tmp.path()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool (apt install prometheus)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let exprs: String = alert_rules()
        .unwrap()
        .into_iter()
        .map(|r| r.1)
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "coredns_cache_evictions_total",
        "coredns_proxy_healthcheck_failures_total",
        "coredns_forward_max_concurrent_rejects_total",
        "coredns_nodecache_setup_errors_total",
        "histogram_quantile(0.95",
        "kube_pod_status_ready",
    ] {
        assert!(exprs.contains(needle), "no alert uses {needle}");
    }
}

#[test]
fn alerts_fire_for_the_node_in_trouble_in_promtool_unit_tests() {
    // dashboards/alerts.test.yaml reads `rules.json` from its own directory.
    let tmp = tempfile::tempdir().unwrap();
    write_rule_file(tmp.path()).unwrap();
    let tests = tmp.path().join("alerts.test.yaml");
    std::fs::copy(repo_root().join("dashboards/alerts.test.yaml"), &tests).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
        .expect("run promtool (apt install prometheus)");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert of the PrometheusRule has at least one case.
    let text = std::fs::read_to_string(&tests).unwrap();
    for (name, _) in alert_rules().unwrap() {
        assert!(
            text.contains(&format!("alertname: {name}\n")),
            "no promtool case for {name}"
        );
    }
}

/// The PodMonitor's relabelings in Prometheus' own spelling (sourceLabels → source_labels).
fn prometheus_relabel_configs(podmonitor: &Value) -> Result<Vec<Value>> {
    let relabelings = podmonitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
        .as_array()
        .context("PodMonitor has no relabelings")?;
    Ok(relabelings
        .iter()
        .map(|r| {
            let obj = r.as_object().into_iter().flatten().map(|(k, v)| {
                let snake: String = k
                    .chars()
                    .flat_map(|c| {
                        if c.is_ascii_uppercase() {
                            vec!['_', c.to_ascii_lowercase()]
                        } else {
                            vec![c]
                        }
                    })
                    .collect();
                let v = if snake == "action" {
                    json!(v.as_str().unwrap_or("").to_ascii_lowercase())
                } else {
                    v.clone()
                };
                (snake, v)
            });
            Value::Object(obj.collect())
        })
        .collect())
}

/// (alert name, expression) for every rule of the PrometheusRule.
fn alert_rules() -> Result<Vec<(String, String)>> {
    let rule = load_manifest("prometheusrule.yaml")?;
    let mut out = Vec::new();
    for group in rule["spec"]["groups"].as_array().context("no groups")? {
        for r in group["rules"].as_array().context("group without rules")? {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            let expr = r["expr"].as_str().context("rule without expr")?;
            out.push((name.to_string(), expr.to_string()));
        }
    }
    Ok(out)
}

/// Writes `spec` of the PrometheusRule as a Prometheus rule file (JSON is YAML).
fn write_rule_file(dir: &Path) -> Result<PathBuf> {
    let rule = load_manifest("prometheusrule.yaml")?;
    let path = dir.join("rules.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&rule["spec"])?)?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------
// Processes this test starts; each is killed by its own PID when dropped.

struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let log = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc { name, child })
    }

    /// Fails with `Exited` if the process already exited (bad flags, port in use, bad config).
    fn ensure_running(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(Exited(format!("{} exited ({status}):\n{text}", self.name)).into());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Child::kill signals exactly this PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started process died: waiting longer cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Exited(String);

/// Polls `ready` until it succeeds, failing with its last error after PATIENCE (at once if
/// a process died).
fn wait_for<T>(what: &str, mut ready: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match ready() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline || e.is::<Exited>() => {
                return Err(e.context(format!("gave up waiting for {what}")));
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// knotd: the stand-in cluster DNS with a small cluster.local zone.

const ZONE: &str = "\
$ORIGIN cluster.local.
$TTL 30
@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5
@ IN NS ns.dns
ns.dns IN A 127.0.40.1
kubernetes.default.svc 5 IN A 10.96.0.1
kube-dns.kube-system.svc IN A 10.96.0.10
web.default.svc IN A 10.96.12.7
web.default.svc IN AAAA fd00::12:7
*.wild IN A 10.0.0.9
";

fn start_knotd(dir: &Path) -> Result<Proc> {
    let d = dir.display();
    let conf = format!(
        "server:\n  rundir: \"{d}\"\n  listen: {}\n  user: root:root\n\
         database:\n  storage: \"{d}\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         zone:\n  - domain: cluster.local\n    storage: \"{d}\"\n    file: cluster.local.zone\n",
        UPSTREAM.replace(':', "@")
    );
    std::fs::write(dir.join("knot.conf"), conf)?;
    std::fs::write(dir.join("cluster.local.zone"), ZONE)?;
    let log = dir.join("knotd.log");
    let mut knotd = Proc::spawn(
        "knotd",
        Command::new("knotd").arg("-c").arg(dir.join("knot.conf")),
        &log,
    )?;
    let upstream: SocketAddr = UPSTREAM.parse()?;
    wait_for("knotd to answer", || {
        knotd.ensure_running(&log)?;
        let answer = dns_udp(upstream, "kube-dns.kube-system.svc.cluster.local", QTYPE_A)?;
        ensure!(answer.rcode == 0 && answer.answers == 1, "{answer:?}");
        Ok(())
    })?;
    Ok(knotd)
}

// ---------------------------------------------------------------------------------------
// A minimal DNS client: one question, read rcode and answer count.

const QTYPE_A: u16 = 1;
const QTYPE_AAAA: u16 = 28;

#[derive(Debug)]
struct Answer {
    rcode: u8,
    answers: u16,
}

fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    q
}

fn parse_answer(id: u16, reply: &[u8]) -> Result<Answer> {
    ensure!(reply.len() >= 12, "short reply ({} bytes)", reply.len());
    ensure!(reply[..2] == id.to_be_bytes(), "reply ID mismatch");
    ensure!(reply[2] & 0x80 != 0, "not a response");
    Ok(Answer {
        rcode: reply[3] & 0x0f,
        answers: u16::from_be_bytes([reply[6], reply[7]]),
    })
}

fn query_id() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    (nanos ^ (nanos >> 16)) as u16
}

fn dns_udp(server: SocketAddr, name: &str, qtype: u16) -> Result<Answer> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let id = query_id();
    sock.send_to(&dns_query(id, name, qtype), server)?;
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).context("no UDP reply")?;
    parse_answer(id, &buf[..n])
}

fn dns_tcp(server: SocketAddr, name: &str, qtype: u16) -> Result<Answer> {
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let id = query_id();
    let q = dns_query(id, name, qtype);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    conn.write_all(&framed)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    conn.read_exact(&mut reply)?;
    parse_answer(id, &reply)
}

/// Sends the same question from `n` sockets before reading any reply, so the daemon sees
/// identical misses while the first is still upstream (what it coalesces).
fn dns_burst(server: SocketAddr, name: &str, n: usize) -> Result<usize> {
    let mut socks = Vec::new();
    for _ in 0..n {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let id = query_id();
        sock.send_to(&dns_query(id, name, QTYPE_A), server)?;
        socks.push((sock, id));
    }
    let mut ok = 0;
    let mut buf = [0u8; 4096];
    for (sock, id) in socks {
        if let Ok((len, _)) = sock.recv_from(&mut buf)
            && parse_answer(id, &buf[..len]).is_ok_and(|a| a.rcode == 0)
        {
            ok += 1;
        }
    }
    Ok(ok)
}

/// The query mix, repeated until `stop`: cache hits on a few names (one with a 5 s TTL, so it
/// is refreshed and prefetched), misses on fresh wildcard names, NXDOMAIN, AAAA, TCP, and
/// bursts of identical misses. Returns how many replies had each rcode.
fn query_mix(server: SocketAddr, stop: &AtomicBool) -> BTreeMap<String, u64> {
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut count = |r: Result<Answer>| {
        let key = match r {
            Ok(a) => format!("rcode{}", a.rcode),
            Err(_) => "error".to_string(),
        };
        *seen.entry(key).or_default() += 1;
    };
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..5 {
            count(dns_udp(
                server,
                "kubernetes.default.svc.cluster.local",
                QTYPE_A,
            ));
            count(dns_udp(server, "web.default.svc.cluster.local", QTYPE_A));
        }
        count(dns_udp(
            server,
            &format!("m{round}.wild.cluster.local"),
            QTYPE_A,
        ));
        count(dns_udp(
            server,
            &format!("nope{round}.default.svc.cluster.local"),
            QTYPE_A,
        ));
        count(dns_udp(server, "web.default.svc.cluster.local", QTYPE_AAAA));
        if round.is_multiple_of(5) {
            count(dns_tcp(
                server,
                "kube-dns.kube-system.svc.cluster.local",
                QTYPE_A,
            ));
            let _ = dns_burst(server, &format!("b{round}.wild.cluster.local"), 16);
        }
        round += 1;
        thread::sleep(Duration::from_millis(50));
    }
    seen
}

// ---------------------------------------------------------------------------------------
// HTTP: a plain HTTP/1.0 GET is all the daemon's endpoints and Prometheus' API need.

fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let addr: SocketAddr = addr.parse()?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        conn,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP reply without header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP reply without status")?;
    Ok((status, body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Calls a Prometheus API endpoint; Err carries Prometheus' own error (e.g. a parse error).
fn prom_api(endpoint: &str, params: &[(&str, &str)]) -> Result<Value> {
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", url_encode(v)))
        .collect();
    let (status, body) = http_get(
        PROMETHEUS,
        &format!("/api/v1/{endpoint}?{}", query.join("&")),
    )?;
    let reply: Value = serde_json::from_str(&body)
        .with_context(|| format!("Prometheus answered HTTP {status}: {body}"))?;
    if reply["status"] != "success" {
        bail!(
            "Prometheus {}: {}",
            reply["errorType"].as_str().unwrap_or("error"),
            reply["error"].as_str().unwrap_or(&body)
        );
    }
    Ok(reply["data"].clone())
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Instant query: the result vector.
fn instant(expr: &str) -> Result<Vec<Value>> {
    let data = prom_api("query", &[("query", expr)])?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// Range query over the last minute, as a Grafana panel runs it: the result series.
fn range(expr: &str) -> Result<Vec<Value>> {
    let end = now_secs();
    let (start, end) = (format!("{:.3}", end - 60.0), format!("{end:.3}"));
    let data = prom_api(
        "query_range",
        &[
            ("query", expr),
            ("start", &start),
            ("end", &end),
            ("step", "2"),
        ],
    )?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

fn first_value(result: &[Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// The daemon and Prometheus.

/// Runs the real CNI plugin's ADD in a fresh network namespace of its own, so its node setup
/// changes nothing of this machine; the stats it records land in `stats_dir`.
fn run_cni_add(stats_dir: &Path, lock_file: &Path) -> Result<()> {
    let plugin = simnode::bin_path("node-local-dns");
    ensure!(
        plugin.exists(),
        "{} missing: build the workspace bins",
        plugin.display()
    );
    let prev = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/nldm"}],"ips":[{"address":"10.244.0.5/24","interface":0}]}"#;
    let config = json!({
        "cniVersion": "1.0.0", "name": "k8s", "type": "node-local-dns",
        "clusterDNS": ["10.96.0.10"], "failurePolicy": "open",
        "logFile": stats_dir.join("cni.log"), "statsDir": stats_dir, "lockFile": lock_file,
        "prevResult": serde_json::from_str::<Value>(prev)?,
    });
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(&plugin)
        .envs([
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "nldm-dashboards"),
            ("CNI_NETNS", "/var/run/netns/nldm"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run unshare --net node-local-dns")?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && out.stdout == prev.as_bytes(),
        "plugin ADD ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn start_daemon(dir: &Path, stats_dir: &Path) -> Result<Proc> {
    let bin = simnode::bin_path("node-local-dns-resolver");
    ensure!(
        bin.exists(),
        "{} missing: run `cargo build -p node-local-dns-resolver` first",
        bin.display()
    );
    let log = dir.join("daemon.log");
    let mut daemon = Proc::spawn(
        "node-local-dns-resolver",
        Command::new(&bin)
            .args([
                "--listen",
                DAEMON_DNS,
                "--upstream",
                &format!("{UPSTREAM},{DEAD_UPSTREAM}"),
                "--no-node-setup",
                "--metrics-listen",
                DAEMON_METRICS,
                "--health-listen",
                DAEMON_HEALTH,
            ])
            .arg("--stats-dir")
            .arg(stats_dir),
        &log,
    )?;
    let server: SocketAddr = DAEMON_DNS.parse()?;
    wait_for("the daemon to be ready and answer", || {
        daemon.ensure_running(&log)?;
        let (status, body) = http_get(DAEMON_HEALTH, "/ready")?;
        ensure!(status == 200, "/ready: {status} {body}");
        let answer = dns_udp(server, "kubernetes.default.svc.cluster.local", QTYPE_A)?;
        ensure!(answer.rcode == 0 && answer.answers == 1, "{answer:?}");
        Ok(())
    })?;
    let (status, _) = http_get(DAEMON_METRICS, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(daemon)
}

/// Prometheus config: one scrape job standing in for the PodMonitor, with the pod's node as
/// Kubernetes service discovery would set it and the PodMonitor's relabelings applied.
fn prometheus_config(rule_file: &Path) -> Result<Value> {
    let pm = load_manifest("podmonitor.yaml")?;
    let path = pm["spec"]["podMetricsEndpoints"][0]["path"]
        .as_str()
        .unwrap_or("/metrics");
    Ok(json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rule_file],
        "scrape_configs": [{
            // prometheus-operator names PodMonitor jobs like this; the relabelings override it.
            "job_name": "podMonitor/kube-system/node-local-dns/0",
            "metrics_path": path,
            "static_configs": [{
                "targets": [DAEMON_METRICS],
                "labels": {
                    "__meta_kubernetes_pod_node_name": NODE_NAME,
                    "__meta_kubernetes_namespace": "kube-system",
                    "__meta_kubernetes_pod_name": "node-local-dns-nldm1",
                },
            }],
            "relabel_configs": prometheus_relabel_configs(&pm)?,
        }],
    }))
}

fn start_prometheus(dir: &Path) -> Result<Proc> {
    let rules = write_rule_file(dir)?;
    let config = dir.join("prometheus.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&prometheus_config(&rules)?)?,
    )?;
    let log = dir.join("prometheus.log");
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--log.level=warn"),
        &log,
    )?;
    wait_for("Prometheus to be ready", || {
        prom.ensure_running(&log)?;
        let (status, body) = http_get(PROMETHEUS, "/-/ready")?;
        ensure!(status == 200, "/-/ready: {status} {body}");
        Ok(())
    })?;
    Ok(prom)
}

/// Waits until Prometheus has scraped the daemon often enough for rates over RATE_INTERVAL.
fn wait_for_scrapes() -> Result<()> {
    let selector = format!("up{{job=\"node-local-dns\", node=\"{NODE_NAME}\"}}");
    wait_for("Prometheus to scrape the daemon", || {
        let up = first_value(&instant(&selector)?);
        ensure!(up == Some(1.0), "{selector} = {up:?}");
        let samples = first_value(&instant(&format!("count_over_time({selector}[1m])"))?);
        ensure!(samples.unwrap_or(0.0) >= 15.0, "only {samples:?} scrapes");
        Ok(())
    })
}

/// Waits until every rule of the rule file was evaluated, and fails on any evaluation error.
fn check_rules_loaded_and_healthy(expected: usize) -> Result<()> {
    wait_for("every alert rule to be evaluated", || {
        let data = prom_api("rules", &[])?;
        let rules: Vec<&Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        ensure!(
            rules.len() == expected,
            "{} of {expected} rules loaded",
            rules.len()
        );
        for r in &rules {
            ensure!(
                r["health"] == "ok",
                "rule {} health {}: {}",
                r["name"],
                r["health"],
                r["lastError"]
            );
        }
        Ok(())
    })
}

/// Alerts on a misspelt metric would parse and stay silent forever: every daemon metric an
/// alert names must have series in Prometheus (kube-state-metrics ones are not scraped here).
fn alert_metrics_are_exported(alerts: &[(String, String)]) -> Result<()> {
    for (name, expr) in alerts {
        let metrics = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.starts_with("coredns_") || w.starts_with("node_local_dns_"));
        for metric in metrics {
            let found = instant(&format!("count({metric}{{job=\"node-local-dns\"}})"))?;
            ensure!(!found.is_empty(), "alert {name}: {metric} has no series");
        }
    }
    Ok(())
}

/// The health-check alert must catch the dead upstream, labelled as the PodMonitor sets it,
/// and must not blame the live one.
fn wait_for_dead_upstream_alert() -> Result<()> {
    wait_for(
        "NodeLocalDNSUpstreamHealthCheckFailing for the dead upstream",
        || {
            let data = prom_api("alerts", &[])?;
            let firing: Vec<&Value> = data["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["labels"]["alertname"] == "NodeLocalDNSUpstreamHealthCheckFailing")
                .collect();
            let blames = |to: &str| {
                firing
                    .iter()
                    .any(|a| a["labels"]["to"] == to && a["labels"]["node"] == NODE_NAME)
            };
            ensure!(
                !blames(UPSTREAM),
                "alert blames the live upstream: {firing:?}"
            );
            ensure!(blames(DEAD_UPSTREAM), "alert not raised: {firing:?}");
            Ok(())
        },
    )
}

/// Evaluates the variables' label_values() queries in order; returns each variable's values.
fn variable_values(dashboard: &Value) -> Result<BTreeMap<String, Vec<String>>> {
    let mut values = BTreeMap::new();
    for (name, label, selector) in query_variables(dashboard)? {
        let expr = substitute(&format!("group by ({label}) ({selector})"), &values)?;
        let found: Vec<String> = instant(&expr)?
            .iter()
            .filter_map(|s| s["metric"][&label].as_str().map(str::to_string))
            .collect();
        ensure!(!found.is_empty(), "variable ${name} has no values: {expr}");
        values.insert(name, found);
    }
    Ok(values)
}

/// Lists the panels whose query returns no series; fails at once on any query error.
fn panels_without_series(queries: &[(String, String)]) -> Result<Vec<String>> {
    let mut empty = Vec::new();
    for (title, expr) in queries {
        let series = range(expr).with_context(|| format!("panel {title:?}: {expr}"))?;
        if series.is_empty() {
            empty.push(format!("{title:?}: {expr}"));
        }
    }
    Ok(empty)
}

#[test]
fn every_dashboard_query_and_alert_evaluates_against_the_real_daemon() -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("nldm-dash").tempdir()?;
    let knot_dir = tmp.path().join("knot");
    std::fs::create_dir(&knot_dir)?;
    let _knotd = start_knotd(&knot_dir)?;
    let stats_dir = tmp.path().join("stats");
    run_cni_add(&stats_dir, &tmp.path().join("setup.lock"))?;
    run_cni_add(&stats_dir, Path::new("/proc/nldm-no-such-dir/setup.lock"))?;
    let _daemon = start_daemon(tmp.path(), &stats_dir)?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let server: SocketAddr = DAEMON_DNS.parse()?;
        thread::spawn(move || query_mix(server, &stop))
    };
    let result = evaluate_everything(tmp.path());
    stop.store(true, Ordering::Relaxed);
    let seen = load.join().map_err(|_| anyhow!("query thread panicked"))?;
    eprintln!("replies seen by the query mix: {seen:?}");
    result?;
    // The mix really went through the daemon: answers, NXDOMAINs.
    ensure!(
        seen.get("rcode0").copied().unwrap_or(0) > 0,
        "no NOERROR: {seen:?}"
    );
    ensure!(
        seen.get("rcode3").copied().unwrap_or(0) > 0,
        "no NXDOMAIN: {seen:?}"
    );
    Ok(())
}

fn evaluate_everything(dir: &Path) -> Result<()> {
    let _prom = start_prometheus(dir)?;
    wait_for_scrapes()?;

    let alerts = alert_rules()?;
    check_rules_loaded_and_healthy(alerts.len())?;
    for (name, expr) in &alerts {
        instant(expr).with_context(|| format!("alert {name}: {expr}"))?;
    }
    alert_metrics_are_exported(&alerts)?;
    wait_for_dead_upstream_alert()?;

    let dashboard = load_dashboard()?;
    let values = wait_for("every dashboard variable to have values", || {
        variable_values(&dashboard)
    })?;
    let queries = panel_queries(&dashboard)
        .into_iter()
        .map(|(title, expr)| Ok((title, substitute(&expr, &values)?)))
        .collect::<Result<Vec<_>>>()?;
    ensure!(queries.len() >= 30, "only {} panel queries", queries.len());
    // Parse errors are final; missing series may still appear (prefetches, bursts), so retry.
    panels_without_series(&queries)?;
    wait_for("every panel query to return series", || {
        let empty = panels_without_series(&queries)?;
        ensure!(empty.is_empty(), "no series:\n{}", empty.join("\n"));
        Ok(())
    })?;
    check_panels_show_what_happened(&queries)?;
    print_totals();
    Ok(())
}

/// For the log (no assertions: how often a burst coalesces depends on scheduling).
fn print_totals() {
    for metric in [
        "coredns_dns_requests_total",
        "coredns_cache_hits_total",
        "coredns_cache_misses_total",
        "node_local_dns_coalesced_queries_total",
        "coredns_cache_prefetch_total",
        "coredns_proxy_healthcheck_failures_total",
    ] {
        let total = instant(&format!("sum({metric}{{job=\"node-local-dns\"}})"))
            .ok()
            .and_then(|r| first_value(&r));
        eprintln!("{metric}: {total:?}");
    }
}

/// Values of `label` across the series of every panel titled `title`.
fn panel_labels(
    queries: &[(String, String)],
    title: &str,
    label: &str,
) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for (_, expr) in queries.iter().filter(|q| q.0 == title) {
        for series in range(expr)? {
            if let Some(v) = series["metric"][label].as_str() {
                out.insert(v.to_string());
            }
        }
    }
    ensure!(
        queries.iter().any(|q| q.0 == title),
        "no panel titled {title:?}"
    );
    Ok(out)
}

/// The panels show the traffic and events this test caused, under the labels they display.
fn check_panels_show_what_happened(queries: &[(String, String)]) -> Result<()> {
    let has = |title: &str, label: &str, want: &[&str]| -> Result<()> {
        let got = panel_labels(queries, title, label)?;
        for w in want {
            ensure!(
                got.contains(*w),
                "panel {title:?}: no {label}={w} in {got:?}"
            );
        }
        Ok(())
    };
    has("Responses by rcode", "rcode", &["NOERROR", "NXDOMAIN"])?;
    has("Requests by qtype", "type", &["A", "AAAA"])?;
    has("UDP / TCP requests", "proto", &["udp", "tcp"])?;
    has("Node setup errors", "errortype", &["lock"])?;
    has("CNI operations", "command", &["ADD"])?;
    let failures = |to: &str| panel_max(queries, "Forward health-check failures", ("to", to));
    ensure!(
        failures(DEAD_UPSTREAM)? > 0.0,
        "dead upstream shows no failures"
    );
    ensure!(failures(UPSTREAM)? == 0.0, "live upstream shows failures");
    // Repeated hits on a few names: the hit-rate panel must show hits at some point.
    let best = panel_max(queries, "Cache hit rate by node", ("node", NODE_NAME))?;
    ensure!(best > 0.5, "cache hit rate never above 50%: {best}");
    Ok(())
}

/// Highest value over the last minute of the series with `label` = value of the panel
/// titled `title` (0 when it has no such series).
fn panel_max(
    queries: &[(String, String)],
    title: &str,
    (label, value): (&str, &str),
) -> Result<f64> {
    let (_, expr) = queries
        .iter()
        .find(|q| q.0 == title)
        .with_context(|| format!("no panel titled {title:?}"))?;
    Ok(range(expr)?
        .iter()
        .filter(|s| s["metric"][label] == value)
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v[1].as_str().and_then(|x| x.parse::<f64>().ok()))
        .filter(|v| !v.is_nan())
        .fold(0.0f64, f64::max))
}
