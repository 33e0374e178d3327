//! Address grammars: an IP, a comma-separated IP list, `IP[:PORT]` / `[V6][:PORT]`, and the
//! rule that a ClusterIP list holds at most one address per family.

use std::net::{IpAddr, SocketAddr};

use crate::error::GrammarError;

/// One IP address.
pub fn parse_ip(s: &str) -> Result<IpAddr, GrammarError> {
    s.trim()
        .parse()
        .map_err(|_| GrammarError::expected("an IP address such as 10.96.0.10 or fd00::a"))
}

/// `IP[,IP…]`, spaces around the commas allowed.
pub fn parse_ip_list(s: &str) -> Result<Vec<IpAddr>, GrammarError> {
    s.split(',')
        .map(|part| {
            parse_ip(part).map_err(|_| {
                GrammarError(format!(
                    "{:?} is not an IP address (expected IP[,IP], e.g. 10.96.0.10,fd00::a)",
                    part.trim()
                ))
            })
        })
        .collect()
}

/// `IP`, `IP:PORT`, `[V6]` or `[V6]:PORT`; port 0 is refused (nothing can be reached there).
pub fn parse_host_port(s: &str, default_port: u16) -> Result<SocketAddr, GrammarError> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (h, Some(p)),
        _ => (s, None),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = host.parse::<IpAddr>().map_err(|_| {
        GrammarError::expected("IP or IP:PORT ([V6]:PORT for IPv6), e.g. 10.96.0.10:53")
    })?;
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(GrammarError(format!("port {p:?} is not in 1..=65535"))),
        },
    };
    Ok(SocketAddr::new(ip, port))
}

/// A ClusterIP list: one address per family at most (a Service has one ClusterIP per family).
pub fn check_one_per_family(ips: &[IpAddr]) -> Result<(), GrammarError> {
    for (i, a) in ips.iter().enumerate() {
        if let Some(b) = ips[i + 1..].iter().find(|b| b.is_ipv4() == a.is_ipv4()) {
            let family = if a.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(GrammarError(format!(
                "two {family} addresses ({a}, {b}): a kube-dns Service has one ClusterIP per family"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("10.0.0.1", 53), Ok(sa("10.0.0.1:53")));
        assert_eq!(
            parse_host_port(" 10.0.0.1:5353 ", 53),
            Ok(sa("10.0.0.1:5353"))
        );
        assert_eq!(parse_host_port("fd00::a", 53), Ok(sa("[fd00::a]:53")));
        assert_eq!(parse_host_port("[fd00::a]", 53), Ok(sa("[fd00::a]:53")));
        assert_eq!(
            parse_host_port("[fd00::a]:5353", 53),
            Ok(sa("[fd00::a]:5353"))
        );
    }

    #[test]
    fn bad_host_or_port_says_which() {
        for bad in [
            "notanip",
            "nonsense:53",
            "10.0.0.300",
            "[10.0.0.1",
            "",
            ":53",
        ] {
            let err = parse_host_port(bad, 53).expect_err(bad).to_string();
            assert!(err.contains("IP or IP:PORT"), "{bad}: {err}");
        }
        for bad in ["1.2.3.4:99999", "1.2.3.4:0", "[fd00::a]:x", "1.2.3.4:"] {
            let err = parse_host_port(bad, 53).expect_err(bad).to_string();
            assert!(err.contains("1..=65535"), "{bad}: {err}");
        }
    }

    #[test]
    fn ip_lists_name_the_bad_item() {
        assert_eq!(
            parse_ip_list("10.96.0.10, fd00::a").unwrap(),
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00::a".parse().unwrap()
            ]
        );
        let err = parse_ip_list("10.96.0.10,kube-dns")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"kube-dns\" is not an IP address"), "{err}");
        assert!(parse_ip_list("").is_err());
    }

    #[test]
    fn one_address_per_family() {
        let ips = |s: &str| parse_ip_list(s).unwrap();
        assert!(check_one_per_family(&ips("10.96.0.10,fd00::a")).is_ok());
        assert!(check_one_per_family(&ips("fd00::a")).is_ok());
        let err = check_one_per_family(&ips("10.96.0.10,10.96.0.11"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("two IPv4 addresses (10.96.0.10, 10.96.0.11)"),
            "{err}"
        );
        assert!(check_one_per_family(&ips("fd00::a,fd00::b,10.0.0.1")).is_err());
    }
}
