//! iptables backends and the rules kube-proxy (iptables mode) writes for the kube-dns Service.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use node_setup::desired::Family;

use crate::HarnessError;
use crate::netns::Netns;

/// An iptables implementation: where kube-proxy's iptables modes write their rules, and where
/// the plugin/daemon (backend `auto`) must put ours (see `KubeProxyMode::backend`). The same
/// type node setup programs, so a run and the setup name backends alike.
pub use node_setup::backend::Backend;

/// `iptables-legacy`, `ip6tables-nft-save`, … for the family of `v6`.
pub fn tool(backend: Backend, v6: bool, suffix: &str) -> String {
    let family = if v6 { Family::V6 } else { Family::V4 };
    format!("{}{suffix}", backend.command(family))
}

/// One kube-dns endpoint (a cluster DNS pod).
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

/// The nat table kube-proxy writes for Service `kube-system/kube-dns` (dns udp/53, dns-tcp
/// tcp/53) with the given endpoints: KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* DNAT, random
/// balancing, KUBE-MARK-MASQ for traffic from outside the pod CIDR and for hairpin, and
/// KUBE-POSTROUTING MASQUERADE. Chain names follow kube-proxy's hash-like style.
pub fn kube_proxy_nat(cluster_ip: IpAddr, pod_cidr: &str, endpoints: &[Endpoint]) -> String {
    let host_len = if cluster_ip.is_ipv6() { 128 } else { 32 };
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-MARK-MASQ".into(),
        "KUBE-POSTROUTING".into(),
    ];
    let mut rules = vec![
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_string(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into(),
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".into(),
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".into(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".into(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
    ];
    for proto in ["udp", "tcp"] {
        let svc = format!("KUBE-SVC-NLDE{}", proto.to_uppercase());
        chains.push(svc.clone());
        rules.push(format!(
            "-A KUBE-SERVICES -d {cluster_ip}/{host_len} -p {proto} -m comment --comment \"kube-system/kube-dns:dns{proto} cluster IP\" -m {proto} --dport 53 -j {svc}"
        ));
        rules.push(format!(
            "-A {svc} ! -s {pod_cidr} -d {cluster_ip}/{host_len} -p {proto} -m {proto} --dport 53 -j KUBE-MARK-MASQ"
        ));
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-NLDE{}{i}", proto.to_uppercase());
            chains.push(sep.clone());
            let remaining = n - i;
            if remaining > 1 {
                let p = 1.0 / remaining as f64;
                rules.push(format!(
                    "-A {svc} -m statistic --mode random --probability {p:.11} -j {sep}"
                ));
            } else {
                rules.push(format!("-A {svc} -j {sep}"));
            }
            let to = match ep.ip {
                IpAddr::V4(ip) => format!("{ip}:{}", ep.port),
                IpAddr::V6(ip) => format!("[{ip}]:{}", ep.port),
            };
            rules.push(format!(
                "-A {sep} -s {}/{host_len} -j KUBE-MARK-MASQ",
                ep.ip
            ));
            rules.push(format!(
                "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {to}"
            ));
        }
    }
    let mut text = String::from("*nat\n");
    for c in chains {
        text.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in rules {
        text.push_str(&r);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    text
}

/// Loads `rules` (iptables-save format) into `ns` without flushing other tables.
pub fn restore(ns: &Netns, backend: Backend, v6: bool, rules: &str) -> Result<(), HarnessError> {
    feed(ns, &tool(backend, v6, "-restore"), &["--noflush"], rules)
}

/// Runs `program args…` in `ns` with `input` on its stdin (a ruleset loader such as
/// `iptables-restore` or `nft -f -`), failing with its stderr and the input it refused.
pub fn feed(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<(), HarnessError> {
    let described = format!("{program} {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            command: described.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| HarnessError::Io(format!("{program} stdin"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| HarnessError::Io(described.clone(), e))?;
    if !out.status.success() {
        return Err(HarnessError::CommandFailed {
            command: described,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout: input.to_string(),
        });
    }
    Ok(())
}

/// `iptables-save` output of one table in `ns`.
pub fn save(ns: &Netns, backend: Backend, v6: bool, table: &str) -> Result<String, HarnessError> {
    ns.exec(&tool(backend, v6, "-save"), &["-t", table])
}

/// Runs `iptables-<backend> args…` in `ns`.
pub fn iptables(
    ns: &Netns,
    backend: Backend,
    v6: bool,
    args: &[&str],
) -> Result<String, HarnessError> {
    ns.exec(&tool(backend, v6, ""), args)
}

/// Rules of `table` whose text contains `needle`, as iptables-save prints them.
pub fn rules_matching(
    ns: &Netns,
    backend: Backend,
    v6: bool,
    table: &str,
    needle: &str,
) -> Result<Vec<String>, HarnessError> {
    Ok(save(ns, backend, v6, table)?
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains(needle))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_rules_balance_over_every_endpoint_for_both_protocols() {
        let eps = [
            Endpoint {
                ip: "10.244.1.10".parse().unwrap(),
                port: 53,
            },
            Endpoint {
                ip: "10.244.1.11".parse().unwrap(),
                port: 53,
            },
        ];
        let text = kube_proxy_nat("10.96.0.10".parse().unwrap(), "10.244.0.0/16", &eps);
        assert!(text.contains("-A KUBE-SVC-NLDEUDP -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-NLDEUDP0"));
        assert!(text.contains("-A KUBE-SVC-NLDETCP -j KUBE-SEP-NLDETCP1"));
        assert!(text.contains(
            "-A KUBE-SEP-NLDEUDP1 -p udp -m udp -j DNAT --to-destination 10.244.1.11:53"
        ));
        assert!(text.contains("-d 10.96.0.10/32 -p tcp"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let eps = [Endpoint {
            ip: "fd00:244:1::10".parse().unwrap(),
            port: 53,
        }];
        let text = kube_proxy_nat("fd00::a".parse().unwrap(), "fd00:244::/48", &eps);
        assert!(text.contains("--to-destination [fd00:244:1::10]:53"));
        assert!(text.contains("-d fd00::a/128"));
    }
}
