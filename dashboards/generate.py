#!/usr/bin/env python3
"""Writes node-local-dns.json, the Grafana dashboard "Kubernetes / DNS (node local)".

The dashboard is data: the panel tables below. Edit them and run
`python3 dashboards/generate.py`; tests/tests/dashboards.rs fails when the committed JSON
differs from what this script prints, and evaluates every expression against a real
Prometheus scraping the real daemon.
"""

import json
import sys
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}

# Every series comes from the PodMonitor (install/monitoring/podmonitor.yaml), which sets
# job="node-local-dns" and node=<the pod's node>.
SEL = 'job="node-local-dns", node=~"$node"'
NODE_SEL = SEL
UP_SEL = 'job="node-local-dns", node=~"$node", to=~"$upstream"'
RI = "$__rate_interval"


def rate(metric, sel, by):
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RI}]))"


def mean(metric, sel, by):
    """Mean of a histogram or summary: rate of _sum over rate of _count."""
    return f"{rate(metric + '_sum', sel, by)}\n/\n{rate(metric + '_count', sel, by)}"


def p(q, metric, sel, by):
    return (
        f"histogram_quantile({q}, sum by ({by}, le) "
        f"(rate({metric}_bucket{{{sel}}}[{RI}])))"
    )


def heat(metric, sel):
    return f"sum by (le) (increase({metric}_bucket{{{sel}}}[{RI}]))"


def ts(title, targets, unit="short", desc="", stack=False):
    """A time series panel; targets are (expr, legend) pairs."""
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "targets": [
            {"expr": e, "legendFormat": leg, "refId": chr(ord("A") + i)}
            for i, (e, leg) in enumerate(targets)
        ],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "fillOpacity": 10,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def heatmap(title, expr, desc=""):
    """A heatmap of a Prometheus histogram: one bucket per `le`, counts per interval."""
    return {
        "type": "heatmap",
        "title": title,
        "description": desc,
        "targets": [{"expr": expr, "format": "heatmap", "legendFormat": "{{le}}", "refId": "A"}],
        "options": {
            "calculate": False,
            "yAxis": {"unit": "s", "axisPlacement": "left"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Spectral", "steps": 64, "exponent": 0.5},
            "tooltip": {"show": True, "yHistogram": True},
            "rowsFrame": {"layout": "auto"},
        },
    }


GENERAL = [
    ts("Requests by node", [(rate("coredns_dns_requests_total", SEL, "node"), "{{node}}")],
       "reqps", "Client queries received per second (UDP and TCP)."),
    ts("Mean request duration by node",
       [(mean("coredns_dns_request_duration_seconds", SEL, "node"), "{{node}}")], "s",
       "From receipt to reply: cache hits and forwarded misses together."),
    heatmap("Request duration", heat("coredns_dns_request_duration_seconds", SEL)),
    ts("Forwarded requests by node",
       [(rate("coredns_proxy_request_duration_seconds_count", SEL, "node"), "{{node}}")], "reqps",
       "Cache misses sent to the cluster DNS."),
    ts("Forwarded request duration (p50 / p95) by node",
       [(p(0.5, "coredns_proxy_request_duration_seconds", SEL, "node"), "p50 {{node}}"),
        (p(0.95, "coredns_proxy_request_duration_seconds", SEL, "node"), "p95 {{node}}")], "s"),
    ts("Forward health-check failures",
       [(rate("coredns_proxy_healthcheck_failures_total", SEL, "node, to"), "{{node}} → {{to}}")],
       "short", "Failed health checks per second, per upstream."),
    ts("Cache hit rate by node",
       [(f"{rate('coredns_cache_hits_total', SEL, 'node')}\n/\n"
         f"{rate('coredns_cache_requests_total', SEL, 'node')}", "{{node}}")], "percentunit"),
    ts("Cache size by node",
       [(f"sum by (node, type) (coredns_cache_entries{{{SEL}}})", "{{node}} {{type}}")], "short"),
    ts("Responses by rcode",
       [(rate("coredns_dns_responses_total", SEL + ', rcode=~"$rcode"', "rcode"), "{{rcode}}")],
       "reqps", "", stack=True),
    ts("UDP / TCP requests",
       [(rate("coredns_dns_requests_total", SEL, "proto"), "{{proto}}")], "reqps", "", stack=True),
    # What this daemon adds to CoreDNS's set.
    ts("Stale answers served",
       [(rate("coredns_cache_served_stale_total", SEL, "node"), "{{node}}")], "reqps",
       "Expired entries answered because the upstream failed or was over its concurrency limit."),
    ts("Prefetches",
       [(rate("coredns_cache_prefetch_total", SEL, "node"), "{{node}}"),
        (rate("node_local_dns_prefetch_unasked_total", SEL, "node"), "{{node}} unasked"),
        (rate("node_local_dns_prefetch_dropped_total", SEL, "node"), "{{node}} dropped")], "reqps",
       "Popular entries refreshed before they expire; unasked: refreshed by the idle sweep with "
       "no client asking (at most --prefetch-unasked in a row per name); dropped: refreshes lost "
       "to a full queue (those entries expire and are fetched on demand)."),
    ts("Coalesced queries",
       [(rate("node_local_dns_coalesced_queries_total", SEL, "node"), "{{node}}")], "reqps",
       "Client queries that joined an identical in-flight upstream query instead of sending one."),
    ts("Cache evictions",
       [(rate("coredns_cache_evictions_total", SEL, "node, type"), "{{node}} {{type}}")], "short",
       "Entries dropped before expiry because the cache was full."),
    ts("Max-concurrent rejects",
       [(rate("coredns_forward_max_concurrent_rejects_total", SEL, "node"), "{{node}}")], "reqps",
       "Misses refused (stale or SERVFAIL) because too many were in flight upstream."),
    ts("Node setup errors",
       [(f"sum by (node, errortype) (increase(coredns_nodecache_setup_errors_total{{{SEL}}}[{RI}]))",
         "{{node}} {{errortype}}")], "short",
       "Failures to create the interface, addresses or raw-table rules (daemon and CNI plugin)."),
    ts("CNI ADD latency (mean)",
       [(f"sum by (node) (rate(node_local_dns_cni_operation_duration_seconds_sum{{{SEL}, command=\"ADD\"}}[{RI}]))\n/\n"
         f"sum by (node) (rate(node_local_dns_cni_operation_duration_seconds_count{{{SEL}, command=\"ADD\"}}[{RI}]))",
         "{{node}}")], "s", "Time the chained plugin adds to every pod start."),
    ts("CNI operations",
       [(rate("node_local_dns_cni_operations_total", SEL, "node, command"), "{{node}} {{command}}")],
       "short", "Plugin invocations per second by command."),
]

NODE = [
    ts("Requests by qtype", [(rate("coredns_dns_requests_total", NODE_SEL, "type"), "{{type}}")],
       "reqps", "", stack=True),
    ts("Responses by rcode",
       [(rate("coredns_dns_responses_total", NODE_SEL + ', rcode=~"$rcode"', "rcode"), "{{rcode}}")],
       "reqps", "", stack=True),
    ts("Forwarded requests by upstream",
       [(rate("coredns_proxy_request_duration_seconds_count", NODE_SEL, "to"), "{{to}}")], "reqps"),
    ts("Forwarded responses by rcode",
       [(rate("coredns_proxy_request_duration_seconds_count", NODE_SEL, "rcode"), "{{rcode}}")],
       "reqps", "", stack=True),
    ts("Forward health-check failures",
       [(rate("coredns_proxy_healthcheck_failures_total", NODE_SEL, "to"), "{{to}}")], "short"),
    ts("UDP / TCP requests", [(rate("coredns_dns_requests_total", NODE_SEL, "proto"), "{{proto}}")],
       "reqps", "", stack=True),
    ts("Cache hits and misses",
       [(rate("coredns_cache_hits_total", NODE_SEL, "type"), "hit {{type}}"),
        (f"sum (rate(coredns_cache_misses_total{{{NODE_SEL}}}[{RI}]))", "miss")], "reqps"),
    ts("Cache size by type",
       [(f"sum by (type) (coredns_cache_entries{{{NODE_SEL}}})", "{{type}}")], "short"),
    ts("Requests by zone", [(rate("coredns_dns_requests_total", NODE_SEL, "zone"), "{{zone}}")],
       "reqps"),
    ts("Response size (p50 / p95) by proto",
       [(p(0.5, "coredns_dns_response_size_bytes", NODE_SEL, "proto"), "p50 {{proto}}"),
        (p(0.95, "coredns_dns_response_size_bytes", NODE_SEL, "proto"), "p95 {{proto}}")], "bytes"),
    heatmap("Request duration", heat("coredns_dns_request_duration_seconds", NODE_SEL)),
    heatmap("Forwarded request duration", heat("coredns_proxy_request_duration_seconds", NODE_SEL)),
]

UPSTREAM = [
    ts("Forwarded requests by node",
       [(rate("coredns_proxy_request_duration_seconds_count", UP_SEL, "node"), "{{node}}")], "reqps"),
    ts("Forwarded responses by rcode",
       [(rate("coredns_proxy_request_duration_seconds_count", UP_SEL, "rcode"), "{{rcode}}")],
       "reqps", "", stack=True),
    heatmap("Forwarded request duration", heat("coredns_proxy_request_duration_seconds", UP_SEL)),
    ts("Health-check failures",
       [(rate("coredns_proxy_healthcheck_failures_total", UP_SEL, "node"), "{{node}}")], "short"),
    ts("Upstream healthy",
       [(f"min by (node) (node_local_dns_upstream_healthy{{{UP_SEL}}})", "{{node}}")], "bool",
       "1 while the daemon considers the upstream healthy."),
]


def variable(name, label, query, doc):
    return {
        "name": name,
        "label": label,
        "description": doc,
        "type": "query",
        "datasource": DS,
        "definition": query,
        # A plain string: read by every Grafana version (newer ones migrate it on load).
        "query": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


TEMPLATING = [
    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
     "current": {}, "hide": 0, "options": [], "refresh": 1, "regex": ""},
    variable("node", "Node", 'label_values(coredns_build_info{job="node-local-dns"}, node)',
             "Nodes with a node-local-dns pod (label set by the PodMonitor)."),
    variable("rcode", "Rcode",
             'label_values(coredns_dns_responses_total{job="node-local-dns", node=~"$node"}, rcode)',
             "Response codes sent to clients."),
    # Every configured upstream has this gauge from start-up, so an upstream that never
    # answered (the one you want to look at) still gets its row.
    variable("upstream", "Upstream",
             'label_values(node_local_dns_upstream_healthy{job="node-local-dns", node=~"$node"}, to)',
             "Configured upstream servers (the `to` label), normally the kube-dns ClusterIP."),
]


def layout(panels, y, next_id, width=8, height=8):
    """Places panels three to a line from height y; returns (panels, new y, next id)."""
    placed = []
    per_line = 24 // width
    for i, panel in enumerate(panels):
        panel = dict(panel, id=next_id, datasource=DS,
                     gridPos={"h": height, "w": width, "x": (i % per_line) * width,
                              "y": y + (i // per_line) * height})
        next_id += 1
        placed.append(panel)
    lines = (len(panels) + per_line - 1) // per_line
    return placed, y + lines * height, next_id


def row(title, y, next_id, repeat=None):
    r = {"type": "row", "title": title, "collapsed": False, "panels": [], "id": next_id,
         "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
    if repeat:
        r["repeat"] = repeat
    return r


def dashboard():
    panels, y, next_id = [], 0, 1
    for title, content, repeat in (("General", GENERAL, None),
                                   ("Node $node", NODE, "node"),
                                   ("Upstream $upstream", UPSTREAM, "upstream")):
        panels.append(row(title, y, next_id, repeat))
        placed, y, next_id = layout(content, y + 1, next_id + 1)
        panels.extend(placed)
    return {
        "title": "Kubernetes / DNS (node local)",
        "uid": "node-local-dns",
        "description": "node-local-dns: the per-node DNS cache, its upstreams and its CNI plugin.",
        "tags": ["dns", "kubernetes", "node-local-dns"],
        "timezone": "",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": TEMPLATING},
        "panels": panels,
    }


def render():
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--stdout"]:
        sys.stdout.write(render())
    else:
        (Path(__file__).parent / "node-local-dns.json").write_text(render())
