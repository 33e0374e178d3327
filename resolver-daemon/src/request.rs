//! One client query on its way from the socket to the answer: the message bytes, parsed
//! once, with the context that decides and accounts for the reply (transport, the client's
//! size limit, peer, receive time).

use crate::metrics::Proto;
use crate::wire::{self, ParsedQuery, Query};
use std::net::SocketAddr;
use std::time::Instant;

/// A query the cache could not answer, owned so it can wait for an upstream.
#[derive(Debug)]
pub struct Request {
    bytes: Vec<u8>,
    parsed: ParsedQuery,
    limit: usize,
    peer: SocketAddr,
    transport: Proto,
    received: Instant,
}

impl Request {
    /// Takes over `bytes` together with `parsed`, which `wire::parse_query` found in them.
    pub fn new(
        bytes: Vec<u8>,
        parsed: ParsedQuery,
        peer: SocketAddr,
        transport: Proto,
        received: Instant,
    ) -> Self {
        let limit = answer_limit(&parsed.attach(&bytes), transport);
        Self {
            bytes,
            parsed,
            limit,
            peer,
            transport,
            received,
        }
    }

    /// The parsed query, without parsing again.
    pub fn query(&self) -> Query<'_> {
        self.parsed.attach(&self.bytes)
    }

    /// The client's message as it arrived.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Largest answer this client accepts over its transport.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn qtype(&self) -> u16 {
        self.parsed.qtype()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn transport(&self) -> Proto {
        self.transport
    }

    pub fn received(&self) -> Instant {
        self.received
    }
}

/// Largest answer a client accepts: its UDP limit, or a whole TCP message.
pub fn answer_limit(q: &Query<'_>, transport: Proto) -> usize {
    match transport {
        Proto::Udp => wire::udp_limit(q),
        Proto::Tcp => wire::TCP_LIMIT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_keeps_its_parse_and_the_clients_limit() {
        // id 0x0102, RD, one question `a. A IN`, OPT with UDP size 4096
        let msg = vec![
            1, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, b'a', 0, 0, 1, 0, 1, 0, 0, 41, 16, 0, 0, 0, 0,
            0, 0, 0,
        ];
        let parsed = wire::parse_query(&msg).unwrap().detach();
        let peer = "192.0.2.1:5353".parse().unwrap();
        let udp = Request::new(msg.clone(), parsed, peer, Proto::Udp, Instant::now());
        let q = udp.query();
        assert_eq!((q.id, q.qname, q.qtype), (0x0102, &b"\x01a\x00"[..], 1));
        assert_eq!(udp.limit(), 1232, "EDNS size clamped to ours");
        let tcp = Request::new(msg, parsed, peer, Proto::Tcp, Instant::now());
        assert_eq!(tcp.limit(), wire::TCP_LIMIT);
        assert_eq!(tcp.query().question_end, 19);
    }
}
