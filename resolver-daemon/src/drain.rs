//! Answers for UDP queries still in flight at shutdown. The listening socket closes first
//! (docs/design-facts.md §1: the closed socket is what sends pods to kube-proxy), so an answer that comes
//! back from the upstream afterwards leaves through a raw socket bound to the listener's
//! address, with the listener's port as its source: the client's socket, connected to
//! ClusterIP:53, takes it like any other answer. A raw socket claims no port, so the
//! `-m socket` rule no longer matches and new queries keep going to kube-proxy.

use crate::sockets::{domain, set_freebind};
use socket2::{Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};

const UDP_HEADER_LEN: usize = 8;

/// Sends UDP datagrams from a fixed local address and port without a UDP socket on it.
pub struct RawUdpSender {
    sock: Socket,
    local: SocketAddr,
}

impl RawUdpSender {
    /// Needs CAP_NET_RAW (the DaemonSet grants it).
    pub fn open(local: SocketAddr) -> io::Result<Self> {
        let sock = Socket::new(domain(&local), Type::RAW, Some(Protocol::UDP))?;
        set_freebind(&sock, &local)?;
        // Every UDP datagram to this address is copied to a raw UDP socket; nobody reads
        // them, so keep the queue at the kernel's minimum.
        let _ = sock.set_recv_buffer_size(0);
        sock.bind(&SockAddr::from(SocketAddr::new(local.ip(), 0)))?;
        Ok(Self { sock, local })
    }

    /// Best effort, never blocks.
    pub fn send(&self, payload: &[u8], peer: SocketAddr) -> io::Result<()> {
        let datagram = udp_datagram(self.local, peer, payload).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer family differs or payload too long",
            )
        })?;
        // Raw sockets take the destination without a port (IPv6 would read it as protocol).
        let to = match peer {
            SocketAddr::V4(a) => SocketAddr::V4(SocketAddrV4::new(*a.ip(), 0)),
            SocketAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(*a.ip(), 0, 0, a.scope_id())),
        };
        self.sock
            .send_to_with_flags(&datagram, &SockAddr::from(to), libc::MSG_DONTWAIT)
            .map(drop)
    }
}

/// UDP header and payload, checksummed over the pseudo-header of RFC 768 / RFC 8200 §8.1.
/// None when the families differ or the datagram would not fit a UDP length field.
pub fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    let len = u16::try_from(UDP_HEADER_LEN + payload.len()).ok()?;
    let mut d = Vec::with_capacity(usize::from(len));
    d.extend_from_slice(&src.port().to_be_bytes());
    d.extend_from_slice(&dst.port().to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let sum = add_words(pseudo_header_sum(src.ip(), dst.ip(), len), &d);
    // A computed 0 is sent as all ones (0 means "no checksum" in IPv4, invalid in IPv6).
    let checksum = match !fold(sum) {
        0 => 0xffff,
        c => c,
    };
    d[6..8].copy_from_slice(&checksum.to_be_bytes());
    Some(d)
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, len: u16) -> u64 {
    let mut sum = u64::from(libc::IPPROTO_UDP as u16) + u64::from(len);
    for ip in [src, dst] {
        sum = match ip {
            IpAddr::V4(a) => add_words(sum, &a.octets()),
            IpAddr::V6(a) => add_words(sum, &a.octets()),
        };
    }
    sum
}

/// Adds `bytes` as big-endian 16-bit words (odd length: zero-padded) to `sum`.
fn add_words(sum: u64, bytes: &[u8]) -> u64 {
    bytes.chunks(2).fold(sum, |acc, w| {
        acc + u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))
    })
}

/// One's-complement fold to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The receiver's check: the one's-complement sum over pseudo-header and datagram,
    /// checksum included, is all ones.
    fn verifies(src: SocketAddr, dst: SocketAddr, d: &[u8]) -> bool {
        let len = u16::from_be_bytes([d[4], d[5]]);
        fold(add_words(pseudo_header_sum(src.ip(), dst.ip(), len), d)) == 0xffff
    }

    #[test]
    fn datagrams_carry_ports_length_and_a_checksum_receivers_accept() {
        for (src, dst) in [
            (sa("10.96.0.10:53"), sa("10.244.1.7:41000")),
            (sa("[fd00::a]:53"), sa("[fd00:10:244::7]:41000")),
        ] {
            for payload in [&b"odd"[..], b"even", b""] {
                let d = udp_datagram(src, dst, payload).unwrap();
                assert_eq!(&d[..6], &[0, 53, 0xa0, 0x28, 0, 8 + payload.len() as u8]);
                assert_eq!(&d[8..], payload);
                assert!(verifies(src, dst, &d), "{src} -> {dst}, {payload:?}");
                let mut corrupt = d.clone();
                corrupt[8..].iter_mut().for_each(|b| *b ^= 0x5a);
                assert!(payload.is_empty() || !verifies(src, dst, &corrupt));
            }
        }
    }

    /// Known answer: computed by hand for 192.0.2.1:53 → 192.0.2.2:1024, payload "hi".
    #[test]
    fn checksum_matches_a_hand_computed_value() {
        let d = udp_datagram(sa("192.0.2.1:53"), sa("192.0.2.2:1024"), b"hi").unwrap();
        // Pseudo-header c000 0201 c000 0202 0011 000a, header 0035 0400 000a 0000, data
        // 6869: sum 0x1f0c6, folded 0xf0c7, complemented 0x0f38.
        assert_eq!(&d[6..8], &[0x0f, 0x38]);
    }

    #[test]
    fn mixed_families_and_oversized_payloads_are_refused() {
        assert!(udp_datagram(sa("10.0.0.1:53"), sa("[::1]:5"), b"x").is_none());
        assert!(udp_datagram(sa("10.0.0.1:53"), sa("10.0.0.2:5"), &vec![0; 65_528]).is_none());
    }
}
