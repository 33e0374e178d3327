//! Prometheus metrics under the CoreDNS names operators already chart (docs/design-facts.md §4), plus the
//! node_local_dns_* extras. Hot paths hold pre-resolved handles (`ServerMetrics`) so counting
//! a query is a few uncontended atomic adds, never a label lookup.

use crate::cache::{Cache, EntryKind};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub const ZONE: &str = ".";

/// Query types CoreDNS reports by name; everything else is "other".
const QTYPES: [(u16, &str); 16] = [
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (35, "NAPTR"),
    (43, "DS"),
    (48, "DNSKEY"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (252, "AXFR"),
    (255, "ANY"),
];
const OTHER_TYPE: usize = QTYPES.len();

pub fn qtype_index(qtype: u16) -> usize {
    QTYPES
        .iter()
        .position(|(t, _)| *t == qtype)
        .unwrap_or(OTHER_TYPE)
}

fn qtype_label(idx: usize) -> &'static str {
    QTYPES.get(idx).map(|(_, n)| *n).unwrap_or("other")
}

const RCODES: [&str; 11] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE",
];

/// Label of a (possibly extended) rcode.
pub fn rcode_label(rcode: u16) -> &'static str {
    match rcode {
        16 => "BADVERS",
        r => RCODES.get(r as usize).copied().unwrap_or("other"),
    }
}
pub const RCODE_SLOTS: usize = RCODES.len() + 2; // + BADVERS + other

pub fn rcode_slot(rcode: u16) -> usize {
    match rcode {
        16 => RCODES.len(),
        r if (r as usize) < RCODES.len() => r as usize,
        _ => RCODES.len() + 1,
    }
}

pub fn slot_label(slot: usize) -> &'static str {
    match slot {
        s if s < RCODES.len() => RCODES[s],
        s if s == RCODES.len() => "BADVERS",
        _ => "other",
    }
}

/// Who wrote a response (the `plugin` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Cache,
    Forward,
    /// Errors written by the server itself (FORMERR, NOTIMP, BADVERS, overload SERVFAIL).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn label(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

pub fn server_label(addr: SocketAddr) -> String {
    format!("dns://{addr}")
}

/// All metric families; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    durations: HistogramVec,
    responses: IntCounterVec,
    request_size: HistogramVec,
    response_size: HistogramVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_prefetch: IntCounterVec,
    cache_stale: IntCounterVec,
    pub panics: IntCounter,
    pub forward: ForwardMetrics,
    pub coalesced: IntCounter,
    pub prefetch_dropped: IntCounter,
    pub prefetch_unasked: IntCounter,
    setup_errors: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// Upstream (forward plugin) families.
#[derive(Clone)]
pub struct ForwardMetrics {
    pub requests: IntCounterVec,
    pub responses: IntCounterVec,
    pub duration: HistogramVec,
    pub proxy_duration: HistogramVec,
    pub healthcheck_failures: IntCounterVec,
    pub proxy_healthcheck_failures: IntCounterVec,
    pub max_concurrent_rejects: IntCounter,
    pub healthcheck_broken: IntCounter,
    pub healthy: IntGaugeVec,
}

impl ForwardMetrics {
    /// Pre-resolved handles for one upstream (label lookups stay off the miss path).
    pub fn upstream(&self, to: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            requests: self.requests.with_label_values(&[to]),
            duration: self.duration.with_label_values(&[to]),
            by_rcode: (0..RCODE_SLOTS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            healthy: self.healthy.with_label_values(&[to]),
            healthcheck_failures: self.healthcheck_failures.with_label_values(&[to]),
            proxy_healthcheck_failures: self
                .proxy_healthcheck_failures
                .with_label_values(&["forward", to]),
            families: self.clone(),
            to: to.to_string(),
        }
    }
}

/// The `to="IP:PORT"` series of one upstream.
pub struct UpstreamMetrics {
    pub requests: IntCounter,
    pub duration: Histogram,
    /// Per-rcode series, created on first use (as CoreDNS does) and then kept.
    by_rcode: Vec<std::sync::OnceLock<(IntCounter, Histogram)>>,
    pub healthy: IntGauge,
    pub healthcheck_failures: IntCounter,
    pub proxy_healthcheck_failures: IntCounter,
    families: ForwardMetrics,
    to: String,
}

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamMetrics")
            .field("to", &self.to)
            .finish()
    }
}

impl UpstreamMetrics {
    pub fn response(&self, rcode: u16, secs: f64) {
        let slot = rcode_slot(rcode);
        let (count, hist) = self.by_rcode[slot].get_or_init(|| {
            let label = slot_label(slot);
            (
                self.families
                    .responses
                    .with_label_values(&[&self.to, label]),
                self.families
                    .proxy_duration
                    .with_label_values(&["forward", &self.to, label]),
            )
        });
        count.inc();
        hist.observe(secs);
        self.duration.observe(secs);
    }
}

fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.00025, 2.0, 16).unwrap_or_default()
}

/// CoreDNS's size buckets.
const SIZE_BUCKETS: [f64; 14] = [
    0.0, 100.0, 200.0, 300.0, 400.0, 511.0, 1023.0, 2047.0, 4095.0, 8291.0, 16e3, 32e3, 48e3, 64e3,
];

impl Metrics {
    pub fn new(
        stats_dir: PathBuf,
        cache: Arc<Cache>,
        cache_server: String,
    ) -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let cv =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                r.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let hv = |name: &str,
                  help: &str,
                  labels: &[&str],
                  buckets: Vec<f64>|
         -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
            r.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let c0 = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "coredns_build_info",
                "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built.",
            ),
            &["version", "revision", "goversion"],
        )?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "node-local-dns-resolver", "rust"])
            .set(1);
        r.register(Box::new(build))?;
        let forward = ForwardMetrics {
            requests: cv(
                "coredns_forward_requests_total",
                "Counter of requests made per upstream.",
                &["to"],
            )?,
            responses: cv(
                "coredns_forward_responses_total",
                "Counter of responses received per upstream.",
                &["to", "rcode"],
            )?,
            duration: hv(
                "coredns_forward_request_duration_seconds",
                "Histogram of the time each request took.",
                &["to"],
                duration_buckets(),
            )?,
            proxy_duration: hv(
                "coredns_proxy_request_duration_seconds",
                "Histogram of the time each request took.",
                &["proxy_name", "to", "rcode"],
                duration_buckets(),
            )?,
            healthcheck_failures: cv(
                "coredns_forward_healthcheck_failures_total",
                "Counter of the number of failed healthchecks.",
                &["to"],
            )?,
            proxy_healthcheck_failures: cv(
                "coredns_proxy_healthcheck_failures_total",
                "Counter of the number of failed healthchecks.",
                &["proxy_name", "to"],
            )?,
            max_concurrent_rejects: c0(
                "coredns_forward_max_concurrent_rejects_total",
                "Counter of the number of queries rejected because the concurrent queries were at maximum.",
            )?,
            healthcheck_broken: c0(
                "coredns_forward_healthcheck_broken_total",
                "Counter of the number of complete failures of the healthchecks.",
            )?,
            healthy: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "node_local_dns_upstream_healthy",
                        "1 when the upstream answered its last health check.",
                    ),
                    &["to"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
        };
        let setup_errors = Arc::new(Mutex::new(BTreeMap::new()));
        r.register(Box::new(NodeCollector::new(
            stats_dir,
            setup_errors.clone(),
        )?))?;
        r.register(Box::new(CacheCollector::new(cache, cache_server)?))?;
        let size = SIZE_BUCKETS.to_vec();
        Ok(Self {
            requests: cv(
                "coredns_dns_requests_total",
                "Counter of DNS requests made per zone, protocol and family.",
                &["server", "zone", "proto", "family", "type"],
            )?,
            durations: hv(
                "coredns_dns_request_duration_seconds",
                "Histogram of the time (in seconds) each request took per zone.",
                &["server", "zone", "type"],
                duration_buckets(),
            )?,
            responses: cv(
                "coredns_dns_responses_total",
                "Counter of response status codes.",
                &["server", "zone", "rcode", "plugin"],
            )?,
            request_size: hv(
                "coredns_dns_request_size_bytes",
                "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.",
                &["server", "zone", "proto"],
                size.clone(),
            )?,
            response_size: hv(
                "coredns_dns_response_size_bytes",
                "Size of the returned response in bytes.",
                &["server", "zone", "proto"],
                size,
            )?,
            cache_hits: cv(
                "coredns_cache_hits_total",
                "The count of cache hits.",
                &["server", "type", "zones"],
            )?,
            cache_misses: cv(
                "coredns_cache_misses_total",
                "The count of cache misses.",
                &["server", "zones"],
            )?,
            cache_requests: cv(
                "coredns_cache_requests_total",
                "The count of cache requests.",
                &["server", "zones"],
            )?,
            cache_prefetch: cv(
                "coredns_cache_prefetch_total",
                "The number of times the cache has prefetched a cached item.",
                &["server", "zones"],
            )?,
            cache_stale: cv(
                "coredns_cache_served_stale_total",
                "The number of requests served from stale cache entries.",
                &["server", "zones"],
            )?,
            panics: c0(
                "coredns_panics_total",
                "A metrics that counts the number of panics.",
            )?,
            coalesced: c0(
                "node_local_dns_coalesced_queries_total",
                "Client queries that joined an in-flight upstream query instead of sending their own.",
            )?,
            prefetch_dropped: c0(
                "node_local_dns_prefetch_dropped_total",
                "Background refreshes dropped because the queue to the upstream side was full; those entries expire and are fetched on demand.",
            )?,
            prefetch_unasked: c0(
                "node_local_dns_prefetch_unasked_total",
                "Background refreshes of popular entries whose prefetch point passed without a client asking (the idle sweep, --prefetch-unasked).",
            )?,
            forward,
            setup_errors,
            registry: r,
        })
    }

    /// Handles for one listener and transport.
    pub fn server(&self, addr: SocketAddr, proto: Proto) -> ServerMetrics {
        let server = server_label(addr);
        let family = if addr.is_ipv4() { "1" } else { "2" };
        let s = server.as_str();
        let types = 0..=OTHER_TYPE;
        ServerMetrics {
            requests: types
                .clone()
                .map(|i| {
                    self.requests.with_label_values(&[
                        s,
                        ZONE,
                        proto.label(),
                        family,
                        qtype_label(i),
                    ])
                })
                .collect(),
            durations: types
                .map(|i| self.durations.with_label_values(&[s, ZONE, qtype_label(i)]))
                .collect(),
            responses: [Plugin::Cache, Plugin::Forward, Plugin::None]
                .iter()
                .map(|p| {
                    let plugin = match p {
                        Plugin::Cache => "cache",
                        Plugin::Forward => "forward",
                        Plugin::None => "",
                    };
                    (0..RCODE_SLOTS)
                        .map(|slot| {
                            self.responses
                                .with_label_values(&[s, ZONE, slot_label(slot), plugin])
                        })
                        .collect()
                })
                .collect(),
            request_size: self
                .request_size
                .with_label_values(&[s, ZONE, proto.label()]),
            response_size: self
                .response_size
                .with_label_values(&[s, ZONE, proto.label()]),
            hits_success: self.cache_hits.with_label_values(&[
                s,
                EntryKind::Success.as_label(),
                ZONE,
            ]),
            hits_denial: self.cache_hits.with_label_values(&[
                s,
                EntryKind::Denial.as_label(),
                ZONE,
            ]),
            misses: self.cache_misses.with_label_values(&[s, ZONE]),
            cache_requests: self.cache_requests.with_label_values(&[s, ZONE]),
            prefetch: self.cache_prefetch.with_label_values(&[s, ZONE]),
            stale: self.cache_stale.with_label_values(&[s, ZONE]),
        }
    }

    /// Counts one failed node setup (daemon side) under `errortype`.
    pub fn count_setup_error(&self, kind: &str) {
        if let Ok(mut m) = self.setup_errors.lock() {
            *m.entry(kind.to_string()).or_default() += 1;
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let fams = self.registry.gather();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&fams, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Pre-resolved handles for one listener + transport.
#[derive(Clone)]
pub struct ServerMetrics {
    requests: Vec<IntCounter>,
    durations: Vec<Histogram>,
    /// [plugin][rcode slot]
    responses: Vec<Vec<IntCounter>>,
    request_size: Histogram,
    response_size: Histogram,
    hits_success: IntCounter,
    hits_denial: IntCounter,
    pub misses: IntCounter,
    pub cache_requests: IntCounter,
    pub prefetch: IntCounter,
    pub stale: IntCounter,
}

impl ServerMetrics {
    pub fn request(&self, type_idx: usize, size: usize) {
        self.requests[type_idx.min(OTHER_TYPE)].inc();
        self.request_size.observe(size as f64);
    }

    pub fn response(&self, type_idx: usize, plugin: Plugin, rcode: u16, size: usize, seconds: f64) {
        let p = match plugin {
            Plugin::Cache => 0,
            Plugin::Forward => 1,
            Plugin::None => 2,
        };
        self.responses[p][rcode_slot(rcode)].inc();
        self.response_size.observe(size as f64);
        self.durations[type_idx.min(OTHER_TYPE)].observe(seconds);
    }

    pub fn cache_hit(&self, kind: EntryKind) {
        self.cache_requests.inc();
        match kind {
            EntryKind::Success => self.hits_success.inc(),
            EntryKind::Denial => self.hits_denial.inc(),
        }
    }

    pub fn cache_miss(&self) {
        self.cache_requests.inc();
        self.misses.inc();
    }
}

fn counter_family(
    name: &str,
    help: &str,
    label: Option<&str>,
    values: &[(String, f64)],
) -> MetricFamily {
    use prometheus::proto::{Counter, LabelPair, Metric, MetricType};
    let mut fam = MetricFamily::default();
    fam.set_name(name.to_string());
    fam.set_help(help.to_string());
    fam.set_field_type(MetricType::COUNTER);
    for (lv, v) in values {
        let mut m = Metric::default();
        if let Some(l) = label {
            let mut lp = LabelPair::default();
            lp.set_name(l.to_string());
            lp.set_value(lv.clone());
            m.set_label(vec![lp]);
        }
        let mut c = Counter::default();
        c.set_value(*v);
        m.set_counter(c);
        fam.mut_metric().push(m);
    }
    fam
}

/// `SetupError::kind()` values (node-setup) plus our own "panic".
const SETUP_ERROR_KINDS: [&str; 5] = [
    "lock",
    "interface_add",
    "address_add",
    "iptables",
    "netlink",
];

/// Exports the plugin's counters from the node-setup stats file plus the daemon's own setup
/// errors, read at scrape time (the file is the plugin's; we never write it).
struct NodeCollector {
    dir: PathBuf,
    own_errors: Arc<Mutex<BTreeMap<String, u64>>>,
    descs: Vec<Desc>,
}

impl NodeCollector {
    fn new(
        dir: PathBuf,
        own_errors: Arc<Mutex<BTreeMap<String, u64>>>,
    ) -> Result<Self, prometheus::Error> {
        let descs = vec![
            Desc::new(
                "coredns_nodecache_setup_errors_total".into(),
                "The number of errors during periodic network setup for node-cache.".into(),
                vec!["errortype".into()],
                Default::default(),
            )?,
            Desc::new(
                "node_local_dns_cni_operations_total".into(),
                "CNI plugin invocations by command.".into(),
                vec!["command".into()],
                Default::default(),
            )?,
            Desc::new(
                "node_local_dns_cni_operation_duration_seconds".into(),
                "Time the CNI plugin spent per command.".into(),
                vec!["command".into()],
                Default::default(),
            )?,
        ];
        Ok(Self {
            dir,
            own_errors,
            descs,
        })
    }

    fn load(&self) -> node_setup::stats::CniStats {
        // The plugin's seam may still be unimplemented in some builds: a panic there must not
        // take the scrape (or the daemon) down.
        let dir = self.dir.clone();
        match std::panic::catch_unwind(move || node_setup::stats::load(&dir)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading CNI stats");
                Default::default()
            }
            Err(_) => Default::default(),
        }
    }
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use prometheus::proto::{LabelPair, Metric, MetricType, Summary};
        let stats = self.load();
        // Known error types and commands are exported at zero from the start.
        let mut errors: BTreeMap<String, u64> = SETUP_ERROR_KINDS
            .iter()
            .map(|k| (k.to_string(), 0))
            .collect();
        for (k, v) in &stats.setup_errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        if let Ok(own) = self.own_errors.lock() {
            for (k, v) in own.iter() {
                *errors.entry(k.clone()).or_default() += v;
            }
        }
        let errs: Vec<(String, f64)> = errors.into_iter().map(|(k, v)| (k, v as f64)).collect();
        let mut operations = stats.operations.clone();
        for cmd in ["ADD", "CHECK"] {
            operations.entry(cmd.to_string()).or_default();
        }
        let ops: Vec<(String, f64)> = operations
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64))
            .collect();
        let mut dur = MetricFamily::default();
        dur.set_name("node_local_dns_cni_operation_duration_seconds".into());
        dur.set_help("Time the CNI plugin spent per command.".into());
        dur.set_field_type(MetricType::SUMMARY);
        for (cmd, count) in &operations {
            let mut m = Metric::default();
            let mut lp = LabelPair::default();
            lp.set_name("command".into());
            lp.set_value(cmd.clone());
            m.set_label(vec![lp]);
            let mut s = Summary::default();
            s.set_sample_count(*count);
            s.set_sample_sum(stats.duration_seconds_sum.get(cmd).copied().unwrap_or(0.0));
            m.set_summary(s);
            dur.mut_metric().push(m);
        }
        vec![
            counter_family(
                "coredns_nodecache_setup_errors_total",
                "The number of errors during periodic network setup for node-cache.",
                Some("errortype"),
                &errs,
            ),
            counter_family(
                "node_local_dns_cni_operations_total",
                "CNI plugin invocations by command.",
                Some("command"),
                &ops,
            ),
            dur,
        ]
    }
}

/// Cache size and eviction figures, read from the cache at scrape time.
struct CacheCollector {
    cache: Arc<Cache>,
    entries: IntGaugeVec,
    evictions: IntCounterVec,
    server: String,
}

impl CacheCollector {
    fn new(cache: Arc<Cache>, server: String) -> Result<Self, prometheus::Error> {
        Ok(Self {
            cache,
            entries: IntGaugeVec::new(
                Opts::new(
                    "coredns_cache_entries",
                    "The number of elements in the cache.",
                ),
                &["server", "type", "zones"],
            )?,
            evictions: IntCounterVec::new(
                Opts::new(
                    "coredns_cache_evictions_total",
                    "The count of cache evictions.",
                ),
                &["server", "type", "zones"],
            )?,
            server,
        })
    }
}

impl Collector for CacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.entries.desc();
        d.extend(self.evictions.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let cache = self.cache.clone();
        let Ok(st) = std::panic::catch_unwind(move || cache.stats()) else {
            return Vec::new();
        };
        let s = self.server.as_str();
        self.entries
            .with_label_values(&[s, "success", ZONE])
            .set(st.success_entries as i64);
        self.entries
            .with_label_values(&[s, "denial", ZONE])
            .set(st.denial_entries as i64);
        for (kind, total) in [
            ("success", st.success_evictions),
            ("denial", st.denial_evictions),
        ] {
            let c = self.evictions.with_label_values(&[s, kind, ZONE]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        let mut f = self.entries.collect();
        f.extend(self.evictions.collect());
        f
    }
}

/// Gauge helper so callers need not import prometheus.
pub fn set_gauge(g: &IntGauge, v: bool) {
    g.set(v as i64);
}
