#!/usr/bin/env python3
"""Zones for the stand-in cluster DNS and the query files of the three workloads.

    workload.py zones DIR     cluster.local, example.com, example.org, example.net zone files
    workload.py queries DIR   hot.txt, search.txt, miss.txt (dnsperf's "name TYPE" lines)

The zones model what a node-local cache forwards to: CoreDNS's kubernetes zone (Services in 20
namespaces, A and AAAA; every other name below cluster.local is NXDOMAIN with the SOA, which is
what the ndots:5 search expansion produces) and external names (example.com, 70 % with AAAA,
the rest NODATA; example.org, A and AAAA; example.net, a wildcard, so any unique name is a
cacheable NOERROR). TTLs are long (ZONE_TTL, default 3600 s) so that after warm-up the hot and
search workloads are answered from cache by every peer.

Workloads:
  hot     500 names (half Services, half external) x A and AAAA, shuffled: all cache hits.
  search  glibc's ndots:5 expansion from a pod in namespace "default": for 1000 external names
          the three search suffixes (NXDOMAIN) then the name itself, A and AAAA per suffix;
          500 Service lookups (short name, or "svc.ns" which costs one NXDOMAIN first).
  miss    MISS_LINES lines (default 1.5 M): 70 % unique names under example.net, 20 % unique
          search-suffixed names (NXDOMAIN), 10 % from the hot set. Each line is sent once to a
          freshly started server, so unique names really are misses.
Output is deterministic (fixed random seed).
"""
import os
import random
import sys

NAMESPACES = ["default", "kube-system"] + ["team%02d" % i for i in range(18)]
SERVICE_BASES = ["web", "api", "db", "cache", "auth", "queue", "search", "metrics", "frontend", "backend"]
SERVICES_PER_NS = 100
COM_HOSTS, ORG_HOSTS = 5000, 2000
SUFFIXES = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
TTL = int(os.environ.get("ZONE_TTL", "3600"))
MISS_LINES = int(os.environ.get("MISS_LINES", "1500000"))


def service_names():
    """(service, namespace) pairs: web, api, ..., web1, api1, ... in every namespace."""
    out = []
    for ns in NAMESPACES:
        for i in range(SERVICES_PER_NS):
            base, n = SERVICE_BASES[i % len(SERVICE_BASES)], i // len(SERVICE_BASES)
            out.append((base if n == 0 else "%s%d" % (base, n), ns))
    return out


def com_has_aaaa(i):
    return i % 10 < 7


def zone_header(origin):
    return ("$ORIGIN %s.\n$TTL %d\n@ IN SOA ns hostmaster 1 7200 3600 1209600 %d\n@ IN NS ns\n"
            % (origin, TTL, TTL))


def write_zones(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "cluster.local.zone"), "w") as f:
        f.write(zone_header("cluster.local") + "ns IN A 10.96.0.10\n")
        for k, (svc, ns) in enumerate(service_names(), start=1):
            f.write("%s.%s.svc IN A 10.96.%d.%d\n" % (svc, ns, k // 250, k % 250 + 1))
            f.write("%s.%s.svc IN AAAA fd00:96::%x\n" % (svc, ns, k))
    with open(os.path.join(d, "example.com.zone"), "w") as f:
        f.write(zone_header("example.com") + "ns IN A 192.0.2.1\n")
        for i in range(COM_HOSTS):
            f.write("host%d IN A 192.0.%d.%d\n" % (i, 2 + i // 250 % 200, i % 250 + 1))
            if com_has_aaaa(i):
                f.write("host%d IN AAAA 2001:db8::%x\n" % (i, i + 1))
    with open(os.path.join(d, "example.org.zone"), "w") as f:
        f.write(zone_header("example.org") + "ns IN A 192.0.2.2\n")
        for i in range(ORG_HOSTS):
            f.write("www%d IN A 198.51.100.%d\n" % (i, i % 250 + 1))
            f.write("www%d IN AAAA 2001:db8:1::%x\n" % (i, i + 1))
    with open(os.path.join(d, "example.net.zone"), "w") as f:
        f.write(zone_header("example.net") + "ns IN A 192.0.2.3\n* IN A 203.0.113.1\n* IN AAAA 2001:db8:2::1\n")


def write_lines(path, pairs):
    with open(path, "w") as f:
        for name, qtype in pairs:
            f.write("%s %s\n" % (name, qtype))
    return len(pairs)


def hot_questions(rng, services):
    svc = ["%s.%s.svc.cluster.local" % s for s in rng.sample(services, 250)]
    ext = ["host%d.example.com" % i for i in range(COM_HOSTS) if com_has_aaaa(i)]
    ext += ["www%d.example.org" % i for i in range(ORG_HOSTS)]
    qs = [(n, t) for n in svc + rng.sample(ext, 250) for t in ("A", "AAAA")]
    rng.shuffle(qs)
    return qs


def search_lookups(rng, services):
    """Each lookup is the list of questions one getaddrinfo call asks, in order."""
    external = ["host%d.example.com" % i for i in range(COM_HOSTS)] + ["www%d.example.org" % i for i in range(ORG_HOSTS)]
    lookups = []
    for name in rng.sample(external, 1000):
        tries = ["%s.%s" % (name, s) for s in SUFFIXES] + [name]
        lookups.append([(n, t) for n in tries for t in ("A", "AAAA")])
    for svc, ns in rng.sample(services, 500):
        fqdn = "%s.%s.svc.cluster.local" % (svc, ns)
        if ns == "default" or rng.random() < 0.5:
            tries = [fqdn]
        else:
            tries = ["%s.%s.default.svc.cluster.local" % (svc, ns), fqdn]
        lookups.append([(n, t) for n in tries for t in ("A", "AAAA")])
    rng.shuffle(lookups)
    return [q for lookup in lookups for q in lookup]


def miss_questions(rng, hot):
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    used = set()

    def fresh_label():
        while True:
            label = "".join(rng.choice(alphabet) for _ in range(12))
            if label not in used:
                used.add(label)
                return label

    qs = []
    for _ in range(MISS_LINES):
        r, qtype = rng.random(), rng.choice(("A", "AAAA"))
        if r < 0.7:
            qs.append(("%s.example.net" % fresh_label(), qtype))
        elif r < 0.9:
            qs.append(("%s.example.net.%s" % (fresh_label(), SUFFIXES[0]), qtype))
        else:
            qs.append(rng.choice(hot))
    return qs


def write_queries(d):
    os.makedirs(d, exist_ok=True)
    rng = random.Random(20261203)
    services = service_names()
    hot = hot_questions(rng, services)
    for name, qs in (("hot", hot), ("search", search_lookups(rng, services)), ("miss", miss_questions(rng, hot))):
        n = write_lines(os.path.join(d, name + ".txt.tmp"), qs)
        os.replace(os.path.join(d, name + ".txt.tmp"), os.path.join(d, name + ".txt"))
        print("%-7s %8d questions" % (name, n), file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("zones", "queries"):
        sys.exit("usage: workload.py zones|queries DIR")
    (write_zones if sys.argv[1] == "zones" else write_queries)(sys.argv[2])
