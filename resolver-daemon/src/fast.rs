//! The fast path shared by the UDP threads and TCP: answer a client message from the cache
//! or with an error reply without allocating (`answer_fast`), and the rule for a query no
//! upstream will answer (`stale_or_servfail`).

use crate::answer::Answered;
use crate::cache::{Answer, Cache};
use crate::metrics::{Plugin, Proto, ServerMetrics, qtype_index};
use crate::request::answer_limit;
use crate::wire::{self, ParsedQuery, Query, rcode, reply_rcode};
use std::time::Instant;

/// What the fast path decided for one client message.
#[derive(Debug, Clone, Copy)]
pub enum Fast {
    /// `out` holds the reply.
    Reply { answered: Answered, prefetch: bool },
    /// Nothing to send (too short, QR=1).
    Drop,
    /// Not in the cache: the tokio side must forward it. The parse travels on with the
    /// message (`ParsedQuery::attach`), so the query is parsed once.
    Miss(ParsedQuery),
}

/// Parses and answers from the cache or with an error reply; never allocates once `out`
/// has grown to its working size.
pub fn answer_fast(
    cache: &Cache,
    pkt: &[u8],
    now: Instant,
    out: &mut Vec<u8>,
    transport: Proto,
    m: &ServerMetrics,
) -> Fast {
    out.clear();
    let q = match wire::parse_query(pkt) {
        Ok(q) => q,
        Err(e) => {
            let Some(rcode) = e.rcode() else {
                return Fast::Drop;
            };
            let answered = Answered::new(Plugin::None, rcode, 0);
            m.request(answered.type_idx, pkt.len());
            wire::write_error_response(pkt, None, rcode, out);
            return Fast::Reply {
                answered,
                prefetch: false,
            };
        }
    };
    let type_idx = qtype_index(q.qtype);
    m.request(type_idx, pkt.len());
    match cache.answer(&q, now, out, answer_limit(&q, transport)) {
        Answer::Fresh { kind, prefetch } => {
            m.cache_hit(kind);
            if prefetch {
                m.prefetch.inc();
            }
            let answered = Answered {
                plugin: Plugin::Cache,
                rcode: reply_rcode(out),
                qtype: q.qtype,
                type_idx,
            };
            Fast::Reply { answered, prefetch }
        }
        Answer::Miss => {
            m.cache_miss();
            Fast::Miss(q.detach())
        }
    }
}

/// No upstream answer to give (upstream failed, concurrency cap, full miss queue): an
/// expired answer if the cache still has one (RFC 8767), else SERVFAIL. Writes into `out`.
pub fn stale_or_servfail(
    cache: &Cache,
    q: &Query<'_>,
    msg: &[u8],
    now: Instant,
    limit: usize,
    m: &ServerMetrics,
    out: &mut Vec<u8>,
) -> Answered {
    out.clear();
    if cache.answer_stale(q, now, out, limit) {
        m.stale.inc();
        return Answered::new(Plugin::Cache, reply_rcode(out), q.qtype);
    }
    wire::write_error_response(msg, Some(q), rcode::SERVFAIL, out);
    Answered::new(Plugin::None, rcode::SERVFAIL, q.qtype)
}
