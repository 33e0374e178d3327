//! Where the kube-dns ClusterIP comes from, in order: `--cluster-dns` (or its variable
//! `NODE_LOCAL_DNS_CLUSTER_DNS`), then `KUBE_DNS_SVC_IP` (the manifests' ConfigMap), then
//! `KUBE_DNS_SERVICE_HOST`, which Kubernetes injects into every kube-system pod while the
//! kube-dns Service exists (service links, hostNetwork pods included). The last holds one
//! address: the second family of a dual-stack cluster has to be set explicitly.

use std::net::IpAddr;

use crate::addr::{check_one_per_family, parse_ip, parse_ip_list};
use crate::env::Env;
use crate::error::SettingsError;

pub const FLAG: &str = "--cluster-dns";
pub const KUBE_DNS_SVC_IP: &str = "KUBE_DNS_SVC_IP";
pub const KUBE_DNS_SERVICE_HOST: &str = "KUBE_DNS_SERVICE_HOST";

/// Which source the ClusterIP(s) came from (logged at start, so an operator sees which won).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    KubeDnsSvcIp,
    KubeDnsServiceHost,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Flag => FLAG,
            Source::KubeDnsSvcIp => KUBE_DNS_SVC_IP,
            Source::KubeDnsServiceHost => KUBE_DNS_SERVICE_HOST,
        }
    }
}

/// The kube-dns ClusterIP(s), at most one per family, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    pub ips: Vec<IpAddr>,
    pub source: Source,
}

/// The first source that is set wins; a set source with a bad value is an error (never a
/// silent fall-through to the next). `Ok(None)`: no source is set.
pub fn resolve(from_flag: &[IpAddr], env: &dyn Env) -> Result<Option<ClusterDns>, SettingsError> {
    let found = if !from_flag.is_empty() {
        ClusterDns {
            ips: from_flag.to_vec(),
            source: Source::Flag,
        }
    } else if let Some(v) = env.var(KUBE_DNS_SVC_IP) {
        ClusterDns {
            ips: parse_ip_list(&v).map_err(|e| SettingsError::invalid(KUBE_DNS_SVC_IP, &v, e))?,
            source: Source::KubeDnsSvcIp,
        }
    } else if let Some(v) = env.var(KUBE_DNS_SERVICE_HOST) {
        ClusterDns {
            ips: vec![
                parse_ip(&v).map_err(|e| SettingsError::invalid(KUBE_DNS_SERVICE_HOST, &v, e))?,
            ],
            source: Source::KubeDnsServiceHost,
        }
    } else {
        return Ok(None);
    };
    check_one_per_family(&found.ips).map_err(|e| {
        let list: Vec<String> = found.ips.iter().map(IpAddr::to_string).collect();
        SettingsError::invalid(found.source.name(), &list.join(","), e)
    })?;
    Ok(Some(found))
}

/// Like [`resolve`], for a program that cannot do without the ClusterIP: `needed_for` says why
/// in the error.
pub fn require(
    from_flag: &[IpAddr],
    env: &dyn Env,
    needed_for: &'static str,
) -> Result<ClusterDns, SettingsError> {
    resolve(from_flag, env)?.ok_or(SettingsError::NoClusterIp { needed_for })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_flag_wins_then_kube_dns_svc_ip_then_the_service_link() {
        let all = MapEnv::new([
            (KUBE_DNS_SVC_IP, "10.96.0.11,fd00::b"),
            (KUBE_DNS_SERVICE_HOST, "10.96.0.12"),
        ]);
        let flag = [ip("10.96.0.10")];
        let found = resolve(&flag, &all).unwrap().unwrap();
        assert_eq!((found.ips, found.source), (flag.to_vec(), Source::Flag));

        let found = resolve(&[], &all).unwrap().unwrap();
        assert_eq!(found.ips, vec![ip("10.96.0.11"), ip("fd00::b")]);
        assert_eq!(found.source, Source::KubeDnsSvcIp);

        let link_only = MapEnv::new([(KUBE_DNS_SERVICE_HOST, "10.96.0.12")]);
        let found = resolve(&[], &link_only).unwrap().unwrap();
        assert_eq!(found.ips, vec![ip("10.96.0.12")]);
        assert_eq!(found.source, Source::KubeDnsServiceHost);

        // An empty variable (an absent optional ConfigMap key) is unset.
        let empty_svc_ip = MapEnv::new([(KUBE_DNS_SVC_IP, ""), (KUBE_DNS_SERVICE_HOST, "fd00::a")]);
        assert_eq!(
            resolve(&[], &empty_svc_ip).unwrap().unwrap().ips,
            vec![ip("fd00::a")]
        );
        assert_eq!(resolve(&[], &MapEnv::default()), Ok(None));
    }

    #[test]
    fn a_bad_value_names_its_source_and_does_not_fall_through() {
        let bad_svc_ip = MapEnv::new([
            (KUBE_DNS_SVC_IP, "kube-dns"),
            (KUBE_DNS_SERVICE_HOST, "10.96.0.12"),
        ]);
        let err = resolve(&[], &bad_svc_ip).unwrap_err();
        assert_eq!(err.name(), Some(KUBE_DNS_SVC_IP));
        assert!(
            err.to_string()
                .starts_with("KUBE_DNS_SVC_IP \"kube-dns\": "),
            "{err}"
        );

        let bad_link = MapEnv::new([(KUBE_DNS_SERVICE_HOST, "kube-dns.kube-system")]);
        let err = resolve(&[], &bad_link).unwrap_err();
        assert_eq!(err.name(), Some(KUBE_DNS_SERVICE_HOST));
        assert!(
            err.to_string().contains("\"kube-dns.kube-system\""),
            "{err}"
        );

        // A list is not a service link's shape.
        let list_in_link = MapEnv::new([(KUBE_DNS_SERVICE_HOST, "10.96.0.10,fd00::a")]);
        assert!(resolve(&[], &list_in_link).is_err());
    }

    #[test]
    fn two_addresses_of_one_family_are_refused_from_every_source() {
        let err = resolve(&[ip("10.96.0.10"), ip("10.96.0.11")], &MapEnv::default()).unwrap_err();
        assert_eq!(err.name(), Some(FLAG));
        assert!(err.to_string().contains("10.96.0.10,10.96.0.11"), "{err}");
        assert!(err.to_string().contains("two IPv4 addresses"), "{err}");
        let env = MapEnv::new([(KUBE_DNS_SVC_IP, "fd00::a,fd00::b")]);
        assert_eq!(
            resolve(&[], &env).unwrap_err().name(),
            Some(KUBE_DNS_SVC_IP)
        );
    }

    #[test]
    fn none_at_all_names_all_three_sources() {
        let err = require(&[], &MapEnv::default(), "node setup").unwrap_err();
        let text = err.to_string();
        for source in [FLAG, KUBE_DNS_SVC_IP, KUBE_DNS_SERVICE_HOST] {
            assert!(text.contains(source), "{text}");
        }
        assert!(text.contains("node setup"), "{text}");
        assert!(!text.contains('\n'));
    }
}
