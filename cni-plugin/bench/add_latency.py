#!/usr/bin/env python3
"""ADD latency of the node-local-dns plugin vs /usr/lib/cni/portmap doing its own ADD.

Every case runs in network namespaces this script creates (unshare(CLONE_NEWNET) of its own
process, so children inherit them); the host's rules and interfaces are never touched.
Same harness for every plugin: fork+exec, config on stdin, wall time until exit.

usage: add_latency.py PLUGIN_BINARY [ITERATIONS]
"""
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


def fresh_netns():
    """Moves this process into a brand-new network namespace (the old one goes away)."""
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) (run as root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def prev_result(version):
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/proc/self/ns/net"},
        ],
        "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
        "dns": {},
    }


def run_add(binary, config, container_id, command="ADD"):
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    data = json.dumps(config).encode()
    start = time.perf_counter_ns()
    out = subprocess.run([binary], input=data, env=env, capture_output=True)
    elapsed = (time.perf_counter_ns() - start) / 1e6
    if out.returncode != 0:
        raise RuntimeError(f"{binary} ADD failed: {out.stdout!r} {out.stderr!r}")
    return elapsed


def ours_config(tmp, backend, version="1.0.0"):
    return {
        "cniVersion": version,
        "name": "k8s",
        "type": "node-local-dns",
        "clusterDNS": ["10.96.0.10"],
        "iptables": backend,
        "failurePolicy": "closed",  # a setup failure must fail the benchmark, not hide
        "logFile": f"{tmp}/cni.log",
        "statsDir": f"{tmp}/stats",
        "lockFile": f"{tmp}/setup.lock",
        "prevResult": prev_result(version),
    }


def portmap_config(mappings, version="1.0.0"):
    cfg = {
        "cniVersion": version,
        "name": "k8s",
        "type": "portmap",
        "capabilities": {"portMappings": True},
        "snat": True,
        "prevResult": prev_result(version),
    }
    if mappings:
        cfg["runtimeConfig"] = {
            "portMappings": [{"hostPort": 30080, "containerPort": 80, "protocol": "tcp"}]
        }
    return cfg


def summary(name, samples):
    samples = sorted(samples)
    p90 = samples[int(len(samples) * 0.9) - 1]
    print(f"{name:<52} median {statistics.median(samples):7.2f} ms   "
          f"p90 {p90:7.2f} ms   n={len(samples)}")


def enter_new_netns():
    """A fresh namespace; returns an fd that lets us come back to it later."""
    fresh_netns()
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY)


def enter(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def main():
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    portmap = "/usr/lib/cni/portmap"
    # Variants are interleaved round-robin, each in a namespace of its own, so load from
    # other work on the machine hits them all alike.
    with tempfile.TemporaryDirectory() as tmp:
        def ours(variant):
            backend = variant.split("-")[0]
            return lambda i: run_add(binary, ours_config(f"{tmp}/{variant}", backend), f"pod{i}")

        fast = {
            "node-local-dns VERSION (process start floor)":
                lambda i: run_add(binary, ours_config(tmp, "nft"), "v", "VERSION"),
            "node-local-dns ADD, fast path (auto -> nft)": ours("auto"),
            "node-local-dns ADD, fast path (nft)": ours("nft"),
            "node-local-dns ADD, fast path (legacy)": ours("legacy"),
            "node-local-dns ADD, fast path (auto -> legacy node)": ours("auto-legacy"),
            "portmap ADD, no portMappings":
                lambda i: run_add(portmap, portmap_config(False), f"pod{i}"),
            "portmap ADD, one portMapping (new pod each ADD)":
                lambda i: run_add(portmap, portmap_config(True), f"pod{i}"),
        }
        namespaces = {name: enter_new_netns() for name in fast}
        # A node whose kubelet/kube-proxy use legacy: their canary chains in legacy mangle.
        enter(namespaces["node-local-dns ADD, fast path (auto -> legacy node)"])
        for chain in ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "KUBE-PROXY-CANARY"]:
            subprocess.run(["iptables-legacy", "-w", "-t", "mangle", "-N", chain], check=True)
        for name, fn in fast.items():  # warm-up: sets the node up once
            enter(namespaces[name])
            fn(-1)
        samples = {name: [] for name in fast}
        for i in range(n):
            for name, fn in fast.items():
                enter(namespaces[name])
                samples[name].append(fn(i))
        # Fresh node: a new namespace per ADD, nothing in place yet.
        fresh = {f"node-local-dns ADD, fresh node ({b})": ours(b) for b in ["nft", "legacy"]}
        for name in fresh:
            samples[name] = []
        for i in range(max(n // 4, 10)):
            for name, fn in fresh.items():
                fresh_netns()
                samples[name].append(fn(i))
        for name, values in samples.items():
            summary(name, values)


if __name__ == "__main__":
    main()
