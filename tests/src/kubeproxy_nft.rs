//! The ruleset kube-proxy's nftables mode (`--proxy-mode nftables`, GA in Kubernetes 1.33)
//! writes for the kube-dns Service, modelled on its proxier (pkg/proxy/nftables): one table
//! `ip kube-proxy` / `ip6 kube-proxy`; nat-prerouting and nat-output at dstnat jump to
//! `services`, which dispatches through the `service-ips` verdict map to one chain per service
//! port; that chain marks traffic from outside the pod CIDR for masquerading and picks an
//! endpoint chain with `numgen random`; the endpoint chain DNATs. Masquerading happens in
//! nat-postrouting by mark. The filter chains run just before DNAT (dstnat-10) and after it
//! (dstnat+10, output), each gated on `ct state new`, so untracked packets (our NOTRACKed pod
//! queries) skip all of it, as they skip the iptables modes' nat rules.

use crate::HarnessError;
use crate::iptables::{Endpoint, feed};
use crate::kubeproxy::KubeDnsService;
use crate::netns::Netns;

pub const TABLE: &str = "kube-proxy";
/// Priorities as numbers: nft 1.0.6 rejects the name `dstnat` on the output hook.
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;
/// kube-proxy's default `--masquerade-bit` 14.
const MASQ_MARK: &str = "0x4000";

/// One chain attached to a netfilter hook and the jumps it holds.
struct BaseChain {
    name: &'static str,
    kind: &'static str,
    hook: &'static str,
    priority: i32,
    rules: &'static [&'static str],
}

/// kube-proxy's base chains: filtering on the pre-DNAT destination (firewall, services without
/// endpoints) before DNAT, the check for unknown ClusterIP ports after it, and the nat hooks.
const BASE_CHAINS: [BaseChain; 8] = [
    BaseChain {
        name: "filter-prerouting",
        kind: "filter",
        hook: "prerouting",
        priority: DSTNAT - 10,
        rules: &["ct state new jump firewall-check"],
    },
    BaseChain {
        name: "filter-input",
        kind: "filter",
        hook: "input",
        priority: DSTNAT - 10,
        rules: &[
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check",
        ],
    },
    BaseChain {
        name: "filter-forward",
        kind: "filter",
        hook: "forward",
        priority: DSTNAT - 10,
        rules: &[
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ],
    },
    BaseChain {
        name: "filter-output",
        kind: "filter",
        hook: "output",
        priority: DSTNAT - 10,
        rules: &[
            "ct state new jump service-endpoints-check",
            "ct state new jump firewall-check",
        ],
    },
    BaseChain {
        name: "filter-output-post-dnat",
        kind: "filter",
        hook: "output",
        priority: DSTNAT + 10,
        rules: &["ct state new jump cluster-ips-check"],
    },
    BaseChain {
        name: "nat-prerouting",
        kind: "nat",
        hook: "prerouting",
        priority: DSTNAT,
        rules: &["jump services"],
    },
    BaseChain {
        name: "nat-output",
        kind: "nat",
        hook: "output",
        priority: DSTNAT,
        rules: &["jump services"],
    },
    BaseChain {
        name: "nat-postrouting",
        kind: "nat",
        hook: "postrouting",
        priority: SRCNAT,
        rules: &["jump masquerading"],
    },
];

/// The words that differ between the `ip` and `ip6` tables.
struct Family {
    table: &'static str,
    addr_type: &'static str,
    not_localhost: &'static str,
}

impl Family {
    fn of(svc: &KubeDnsService) -> Self {
        if svc.is_ipv6() {
            Self {
                table: "ip6",
                addr_type: "ipv6_addr",
                not_localhost: "ip6 daddr != ::1",
            }
        } else {
            Self {
                table: "ip",
                addr_type: "ipv4_addr",
                not_localhost: "ip daddr != 127.0.0.0/8",
            }
        }
    }
}

/// The kube-dns Service's ports: (protocol, port name).
const PORTS: [(&str, &str); 2] = [("udp", "dns"), ("tcp", "dns-tcp")];
const SERVICE: &str = "kube-system/kube-dns";

/// `nft -f` input creating the table of `svc`'s family with everything kube-proxy would
/// write for kube-dns.
pub fn ruleset(svc: &KubeDnsService) -> String {
    let fam = Family::of(svc);
    let mut lines = vec![
        format!("table {} {TABLE} {{", fam.table),
        "\tcomment \"rules for kube-proxy\"".to_string(),
    ];
    lines.extend(sets_and_maps(&fam, svc));
    for chain in &BASE_CHAINS {
        let hook = format!(
            "type {} hook {} priority {}; policy accept;",
            chain.kind, chain.hook, chain.priority
        );
        lines.extend(chain_block(
            chain.name,
            std::iter::once(hook).chain(chain.rules.iter().map(|r| r.to_string())),
        ));
    }
    for (name, rules) in helper_chains(&fam, svc) {
        lines.extend(chain_block(name, rules));
    }
    for (proto, port_name) in PORTS {
        for ep in &svc.endpoints {
            lines.extend(chain_block(
                &endpoint_chain(proto, port_name, ep),
                endpoint_rules(&fam, proto, ep),
            ));
        }
        lines.extend(chain_block(
            &service_chain(proto, port_name),
            service_rules(&fam, svc, proto, port_name),
        ));
    }
    lines.push("}".to_string());
    // Elements last: the verdicts name chains defined above.
    for (proto, port_name) in PORTS {
        lines.push(format!(
            "add element {} {TABLE} service-ips {{ {} . {proto} . 53 : goto {} }}",
            fam.table,
            svc.cluster_ip,
            service_chain(proto, port_name)
        ));
    }
    lines.join("\n") + "\n"
}

fn chain_block(name: &str, rules: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut block = vec![format!("\tchain {name} {{")];
    block.extend(rules.into_iter().map(|r| format!("\t\t{r}")));
    block.push("\t}".to_string());
    block
}

fn sets_and_maps(fam: &Family, svc: &KubeDnsService) -> Vec<String> {
    let addr = fam.addr_type;
    let service_key = format!("{addr} . inet_proto . inet_service : verdict");
    let port_key = "inet_proto . inet_service : verdict";
    let map = |name: &str, key: &str, comment: &str| {
        format!("\tmap {name} {{ type {key}; comment \"{comment}\"; }}")
    };
    vec![
        format!(
            "\tset cluster-ips {{ type {addr}; comment \"Active ClusterIPs\"; elements = {{ {} }}; }}",
            svc.cluster_ip
        ),
        map(
            "service-ips",
            &service_key,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        map("service-nodeports", port_key, "NodePort traffic"),
        map(
            "no-endpoint-services",
            &service_key,
            "vmap to drop or reject packets to services with no endpoints",
        ),
        map(
            "no-endpoint-nodeports",
            port_key,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        map(
            "firewall-ips",
            &service_key,
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
    ]
}

/// The regular chains the base chains jump to.
fn helper_chains(fam: &Family, svc: &KubeDnsService) -> Vec<(&'static str, Vec<String>)> {
    let ipx = fam.table;
    let dispatch = |map: &str| format!("{ipx} daddr . meta l4proto . th dport vmap @{map}");
    let nodeports = |map: &str| {
        format!(
            "fib daddr type local {} meta l4proto . th dport vmap @{map}",
            fam.not_localhost
        )
    };
    vec![
        ("firewall-check", vec![dispatch("firewall-ips")]),
        (
            "service-endpoints-check",
            vec![dispatch("no-endpoint-services")],
        ),
        (
            "nodeport-endpoints-check",
            vec![nodeports("no-endpoint-nodeports")],
        ),
        (
            "cluster-ips-check",
            vec![
                format!(
                    "{ipx} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
                ),
                format!(
                    "{ipx} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
                    svc.service_cidr
                ),
            ],
        ),
        ("reject-chain", vec!["reject".to_string()]),
        (
            "mark-for-masquerade",
            vec![format!("mark set mark or {MASQ_MARK}")],
        ),
        (
            "masquerading",
            vec![
                format!("mark and {MASQ_MARK} == 0 return"),
                format!("mark set mark xor {MASQ_MARK}"),
                "masquerade fully-random".to_string(),
            ],
        ),
        (
            "services",
            vec![dispatch("service-ips"), nodeports("service-nodeports")],
        ),
    ]
}

/// Marks traffic from outside the pod CIDR for masquerading, then picks an endpoint uniformly.
fn service_rules(fam: &Family, svc: &KubeDnsService, proto: &str, port_name: &str) -> Vec<String> {
    let ipx = fam.table;
    let choices: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(proto, port_name, ep)))
        .collect();
    vec![
        format!(
            "{ipx} daddr {} {proto} dport 53 {ipx} saddr != {} jump mark-for-masquerade",
            svc.cluster_ip, svc.pod_cidr
        ),
        format!(
            "numgen random mod {} vmap {{ {} }}",
            choices.len(),
            choices.join(", ")
        ),
    ]
}

/// Hairpin traffic (the endpoint reaching itself) is masqueraded; everything is DNATed.
fn endpoint_rules(fam: &Family, proto: &str, ep: &Endpoint) -> Vec<String> {
    let to = if ep.ip.is_ipv6() {
        format!("[{}]:{}", ep.ip, ep.port)
    } else {
        format!("{}:{}", ep.ip, ep.port)
    };
    vec![
        format!("{} saddr {} jump mark-for-masquerade", fam.table, ep.ip),
        format!("meta l4proto {proto} dnat to {to}"),
    ]
}

/// `service-<HASH>-kube-system/kube-dns/udp/dns`, kube-proxy's naming.
pub fn service_chain(proto: &str, port_name: &str) -> String {
    format!(
        "service-{}",
        hashed(&format!("{SERVICE}/{proto}/{port_name}"))
    )
}

/// `endpoint-<HASH>-kube-system/kube-dns/udp/dns__10.244.1.10/53`; IPv6 colons become dots
/// (nft names cannot hold colons).
pub fn endpoint_chain(proto: &str, port_name: &str, ep: &Endpoint) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    format!(
        "endpoint-{}",
        hashed(&format!("{SERVICE}/{proto}/{port_name}__{ip}/{}", ep.port))
    )
}

/// `name` prefixed with 8 base32 characters of a hash of itself, the shape of kube-proxy's
/// chain names (it hashes with SHA-256; any stable hash gives the same shape).
fn hashed(name: &str) -> String {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // FNV-1a, 64 bit.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let tag: String = (0..8)
        .map(|i| char::from(BASE32[((h >> (5 * i)) & 31) as usize]))
        .collect();
    format!("{tag}-{name}")
}

/// Loads `ruleset` into `ns` (`nft -f -` inside the namespace).
pub fn load(ns: &Netns, ruleset: &str) -> Result<(), HarnessError> {
    feed(ns, "nft", &["-f", "-"], ruleset)
}

/// Parses and checks `ruleset` against the kernel without committing it (`nft -c -f -`).
pub fn check(ns: &Netns, ruleset: &str) -> Result<(), HarnessError> {
    feed(ns, "nft", &["-c", "-f", "-"], ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::unique_name;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    fn kube_dns(
        cluster_ip: &str,
        cidrs: (&'static str, &'static str),
        eps: &[&str],
    ) -> KubeDnsService {
        KubeDnsService {
            cluster_ip: cluster_ip.parse().unwrap(),
            service_cidr: cidrs.0,
            pod_cidr: cidrs.1,
            endpoints: eps
                .iter()
                .map(|ip| Endpoint {
                    ip: ip.parse::<IpAddr>().unwrap(),
                    port: 53,
                })
                .collect(),
        }
    }

    fn v4() -> KubeDnsService {
        kube_dns(
            "10.96.0.10",
            ("10.96.0.0/12", "10.244.0.0/16"),
            &["10.244.1.10", "10.244.1.11"],
        )
    }

    fn v6() -> KubeDnsService {
        kube_dns(
            "fd00::a",
            ("fd00::/108", "fd00:244::/48"),
            &["fd00:244:1::10", "fd00:244:1::11"],
        )
    }

    #[test]
    fn chain_names_have_kube_proxys_shape() {
        let ep = v6().endpoints[0];
        let name = endpoint_chain("udp", "dns", &ep);
        assert!(
            name.starts_with("endpoint-")
                && name.ends_with("-kube-system/kube-dns/udp/dns__fd00.244.1..10/53"),
            "{name}"
        );
        let tag = &name["endpoint-".len().."endpoint-".len() + 8];
        assert!(
            tag.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)),
            "{tag}"
        );
        assert_ne!(service_chain("udp", "dns"), service_chain("tcp", "dns-tcp"));
    }

    /// Root: the generated rulesets pass `nft -c` and, loaded into a throwaway namespace, list
    /// kube-proxy's base chains at their hooks and priorities, the service-ips dispatch, the
    /// numgen endpoint choice, the DNAT and the masquerade by mark.
    #[test]
    fn rulesets_load_with_kube_proxys_chains_and_maps() {
        let ns = Netns::create(&unique_name("nftcheck")).expect("netns");
        for (family, svc) in [("ip", v4()), ("ip6", v6())] {
            let text = ruleset(&svc);
            check(&ns, &text).unwrap_or_else(|e| panic!("nft -c refused:\n{e}"));
            load(&ns, &text).expect("nft -f");
            let json = ns
                .exec("nft", &["-j", "list", "table", family, TABLE])
                .expect("nft -j list");
            // As kube-proxy attaches them: dstnat is -100, srcnat 100.
            let want: BTreeMap<String, (String, String, i64)> = [
                ("filter-prerouting", "filter", "prerouting", -110),
                ("filter-input", "filter", "input", -110),
                ("filter-forward", "filter", "forward", -110),
                ("filter-output", "filter", "output", -110),
                ("filter-output-post-dnat", "filter", "output", -90),
                ("nat-prerouting", "nat", "prerouting", -100),
                ("nat-output", "nat", "output", -100),
                ("nat-postrouting", "nat", "postrouting", 100),
            ]
            .into_iter()
            .map(|(name, kind, hook, prio)| (name.into(), (kind.into(), hook.into(), prio)))
            .collect();
            assert_eq!(base_chains(&json), want, "{family}");

            let listing = ns
                .exec("nft", &["list", "table", family, TABLE])
                .expect("nft list");
            let ip = svc.cluster_ip;
            let ep1 = svc.endpoints[1].ip;
            for needle in [
                "map service-ips".to_string(),
                format!("{family} daddr . meta l4proto . th dport vmap @service-ips"),
                format!("{ip} . udp . 53 : goto {}", service_chain("udp", "dns")),
                format!("{ip} . tcp . 53 : goto {}", service_chain("tcp", "dns-tcp")),
                "numgen random mod 2 vmap".to_string(),
                format!(
                    "{family} saddr != {} jump mark-for-masquerade",
                    svc.pod_cidr
                ),
                "meta l4proto tcp dnat to".to_string(),
                ep1.to_string(),
                "ct state new jump cluster-ips-check".to_string(),
                "ct state new jump service-endpoints-check".to_string(),
                format!("{family} daddr @cluster-ips reject"),
                "masquerade fully-random".to_string(),
            ] {
                assert!(
                    listing.contains(&needle),
                    "{needle:?} missing from:\n{listing}"
                );
            }
            let endpoint_chains = listing.matches("\tchain endpoint-").count();
            assert_eq!(endpoint_chains, 4, "2 endpoints × udp, tcp:\n{listing}");
        }
    }

    /// name → (type, hook, priority) of every base chain in `nft -j list table` output.
    fn base_chains(json: &str) -> BTreeMap<String, (String, String, i64)> {
        let v: serde_json::Value = serde_json::from_str(json).expect("nft json");
        v["nftables"]
            .as_array()
            .expect("nftables array")
            .iter()
            .filter_map(|o| o.get("chain"))
            .filter(|c| c.get("hook").is_some())
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (
                    s("name"),
                    (s("type"), s("hook"), c["prio"].as_i64().unwrap_or(0)),
                )
            })
            .collect()
    }
}
