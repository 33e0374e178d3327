//! Socket creation: listeners bound to exact addresses with IP_FREEBIND (they may bind before
//! node setup adds the address), and the choice of upstream source address (docs/design-facts.md §1).

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{what} {addr}: {source}")]
pub struct SocketError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: io::Error,
}

pub(crate) fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

pub(crate) fn set_freebind(s: &Socket, addr: &SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        s.set_freebind_v4(true)
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)
    }
}

/// UDP listener on exactly `addr` (SO_REUSEPORT so several receive threads can share it).
/// `recv_timeout` lets the receive loop notice shutdown. With `incoming_cpu`, the kernel
/// (>= 6.2) prefers this socket of the reuseport group for datagrams it receives on that CPU
/// (SO_INCOMING_CPU); older kernels ignore the preference and spread by hash.
pub fn bind_udp(
    addr: SocketAddr,
    recv_timeout: Duration,
    incoming_cpu: Option<usize>,
) -> Result<Socket, SocketError> {
    let wrap = |what, source| SocketError { what, addr, source };
    let s = Socket::new(domain(&addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| wrap("udp socket", e))?;
    set_freebind(&s, &addr).map_err(|e| wrap("udp freebind", e))?;
    s.set_reuse_port(true)
        .map_err(|e| wrap("udp reuseport", e))?;
    s.set_read_timeout(Some(recv_timeout))
        .map_err(|e| wrap("udp rcvtimeo", e))?;
    if let Some(cpu) = incoming_cpu {
        s.set_cpu_affinity(cpu)
            .map_err(|e| wrap("udp incoming cpu", e))?;
    }
    // Bursts of misses and answers: room for a few thousand datagrams.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&SockAddr::from(addr))
        .map_err(|e| wrap("udp bind", e))?;
    Ok(s)
}

/// TCP listener on exactly `addr`, non-blocking, ready for tokio. SO_REUSEPORT as for UDP:
/// during a rolling update with maxSurge the new pod binds while the old one still listens.
pub fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, SocketError> {
    let wrap = |what, source| SocketError { what, addr, source };
    let s = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| wrap("tcp socket", e))?;
    set_freebind(&s, &addr).map_err(|e| wrap("tcp freebind", e))?;
    s.set_reuse_address(true)
        .map_err(|e| wrap("tcp reuseaddr", e))?;
    s.set_reuse_port(true)
        .map_err(|e| wrap("tcp reuseport", e))?;
    s.bind(&SockAddr::from(addr))
        .map_err(|e| wrap("tcp bind", e))?;
    s.listen(1024).map_err(|e| wrap("tcp listen", e))?;
    s.set_nonblocking(true)
        .map_err(|e| wrap("tcp nonblocking", e))?;
    Ok(s.into())
}

/// The source address the kernel would pick for `to` (no packet is sent).
pub fn kernel_source_for(to: SocketAddr) -> io::Result<IpAddr> {
    let s = Socket::new(domain(&to), Type::DGRAM, Some(Protocol::UDP))?;
    s.connect(&SockAddr::from(to))?;
    s.local_addr()?
        .as_socket()
        .map(|a| a.ip())
        .ok_or_else(|| io::Error::other("local address is not an IP socket"))
}

/// The default route's source address for the family of `like` (no packet is sent).
pub fn default_route_source(like: IpAddr) -> io::Result<IpAddr> {
    // Any global address routes via the default route; TEST-NET/documentation ranges are
    // never local, so this never selects a more specific local route by accident.
    let probe: SocketAddr = if like.is_ipv4() {
        SocketAddr::from(([192, 0, 2, 1], 53))
    } else {
        SocketAddr::new(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]), 53)
    };
    kernel_source_for(probe)
}

/// Where the kernel source lookup comes from (real kernel, or fixed answers in tests).
pub trait RouteLookup {
    fn source_for(&self, to: SocketAddr) -> io::Result<IpAddr>;
    fn default_source(&self, like: IpAddr) -> io::Result<IpAddr>;
}

pub struct KernelRoutes;
impl RouteLookup for KernelRoutes {
    fn source_for(&self, to: SocketAddr) -> io::Result<IpAddr> {
        kernel_source_for(to)
    }
    fn default_source(&self, like: IpAddr) -> io::Result<IpAddr> {
        default_route_source(like)
    }
}

/// The address upstream sockets to `upstream` bind to: `None` lets the kernel choose, which
/// is fine unless it would choose a listen address (e.g. the ClusterIP itself); then the
/// configured node IP, else the default route's source.
pub fn upstream_bind_source(
    upstream: SocketAddr,
    listen: &[SocketAddr],
    configured: Option<IpAddr>,
    routes: &dyn RouteLookup,
) -> io::Result<Option<IpAddr>> {
    let is_listen = |ip: IpAddr| listen.iter().any(|l| l.ip() == ip);
    let kernel_pick = routes.source_for(upstream).ok();
    let needs_override = is_listen(upstream.ip()) || kernel_pick.is_some_and(is_listen);
    if !needs_override {
        return Ok(None);
    }
    if let Some(ip) = configured.filter(|ip| ip.is_ipv4() == upstream.is_ipv4()) {
        return Ok(Some(ip));
    }
    let ip = routes.default_source(upstream.ip())?;
    if is_listen(ip) {
        return Err(io::Error::other(format!(
            "the default route's source {ip} is a listen address; set --upstream-source"
        )));
    }
    Ok(Some(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        pick: IpAddr,
        default: IpAddr,
    }
    impl RouteLookup for Fixed {
        fn source_for(&self, _to: SocketAddr) -> io::Result<IpAddr> {
            Ok(self.pick)
        }
        fn default_source(&self, _like: IpAddr) -> io::Result<IpAddr> {
            Ok(self.default)
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn upstream_that_is_a_listen_address_gets_the_node_ip() {
        let listen = [sa("10.96.0.10:53"), sa("169.254.20.10:53")];
        let routes = Fixed {
            pick: "10.96.0.10".parse().unwrap(),
            default: "192.168.0.7".parse().unwrap(),
        };
        let got = upstream_bind_source(sa("10.96.0.10:53"), &listen, None, &routes).unwrap();
        assert_eq!(got, Some("192.168.0.7".parse().unwrap()));
        let got = upstream_bind_source(
            sa("10.96.0.10:53"),
            &listen,
            Some("192.168.0.9".parse().unwrap()),
            &routes,
        )
        .unwrap();
        assert_eq!(got, Some("192.168.0.9".parse().unwrap()));
    }

    #[test]
    fn ordinary_upstream_keeps_the_kernel_choice() {
        let listen = [sa("10.96.0.10:53")];
        let routes = Fixed {
            pick: "192.168.0.7".parse().unwrap(),
            default: "192.168.0.7".parse().unwrap(),
        };
        assert_eq!(
            upstream_bind_source(sa("10.0.0.3:53"), &listen, None, &routes).unwrap(),
            None
        );
    }

    #[test]
    fn refuses_a_listen_address_as_the_only_source() {
        let listen = [sa("10.96.0.10:53")];
        let routes = Fixed {
            pick: "10.96.0.10".parse().unwrap(),
            default: "10.96.0.10".parse().unwrap(),
        };
        assert!(upstream_bind_source(sa("10.96.0.10:53"), &listen, None, &routes).is_err());
    }

    #[test]
    fn binds_a_free_address_with_freebind() {
        // 127.0.30.250 is on lo anyway; the point is the exact (non-wildcard) bind.
        let s = bind_udp(sa("127.0.30.250:0"), Duration::from_millis(10), None).unwrap();
        let local = s.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(local.ip(), "127.0.30.250".parse::<IpAddr>().unwrap());
    }
}
