//! The nftables ruleset generation of the calling thread's network namespace.
//!
//! The kernel bumps this number on every nftables change in the namespace (any table, any
//! family, any tool). When it equals the one read just before we last verified our rules,
//! nothing can have changed them, and the fast path skips `iptables-nft-save` entirely: a
//! single netlink round trip instead of a process start. The socket's network-namespace
//! cookie (unique per boot, never reused) is part of the stamp, so a stamp from another or a
//! recreated namespace never matches.

use std::os::fd::AsFd;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use crate::sockopt;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_ID: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// Why the generation could not be read. The callers then fall back to a full check.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("netlink {step}: {err}")]
    Socket {
        step: &'static str,
        err: std::io::Error,
    },
    #[error("nftables answered with an error")]
    ErrorReply,
    #[error("unexpected reply type {0:#x}")]
    UnexpectedReply(u16),
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
}

fn socket_step(step: &'static str) -> impl FnOnce(std::io::Error) -> GenerationError {
    move |err| GenerationError::Socket { step, err }
}

/// "<netns cookie>:<generation>" of the calling thread's network namespace.
pub fn stamp() -> Result<String, GenerationError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(socket_step("socket"))?;
    socket.bind_auto().map_err(socket_step("bind"))?;
    let cookie = sockopt::netns_cookie(socket.as_fd()).map_err(socket_step("SO_NETNS_COOKIE"))?;
    socket
        .send(&getgen_request(1), 0)
        .map_err(socket_step("send"))?;
    let (reply, _) = socket.recv_from_full().map_err(socket_step("recv"))?;
    let generation = parse_newgen(&reply)?;
    Ok(format!("{cookie}:{generation}"))
}

/// nlmsghdr + nfgenmsg asking for the generation.
pub fn getgen_request(seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN);
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    buf.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id 0.
    buf.extend_from_slice(&[0, 0, 0, 0]);
    buf
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

/// Reads NFTA_GEN_ID out of an NFT_MSG_NEWGEN reply.
pub fn parse_newgen(reply: &[u8]) -> Result<u32, GenerationError> {
    let msg_type = u16_at(reply, 4).ok_or(GenerationError::Malformed("short reply"))?;
    if msg_type == NLMSG_ERROR {
        return Err(GenerationError::ErrorReply);
    }
    if msg_type != ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN) {
        return Err(GenerationError::UnexpectedReply(msg_type));
    }
    let mut at = NLMSG_HDRLEN + NFGENMSG_LEN;
    while let (Some(len), Some(kind)) = (u16_at(reply, at), u16_at(reply, at + 2)) {
        let len = usize::from(len);
        if len < 4 {
            break;
        }
        if kind & 0x3fff == NFTA_GEN_ID {
            // Netfilter attributes are big-endian.
            return reply
                .get(at + 4..at + 8)
                .and_then(|v| v.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or(GenerationError::Malformed("short NFTA_GEN_ID"));
        }
        at += (len + 3) & !3;
    }
    Err(GenerationError::Malformed("no NFTA_GEN_ID in reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newgen_reply_is_parsed_and_errors_are_rejected() {
        let mut reply = getgen_request(7);
        reply[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN).to_ne_bytes());
        // NFTA_GEN_ID = 0x01020304 (big-endian), then NFTA_GEN_PROC_PID.
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        reply.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_newgen(&reply).unwrap(), 0x0102_0304);
        let mut err = getgen_request(7);
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(matches!(
            parse_newgen(&err),
            Err(GenerationError::ErrorReply)
        ));
        assert!(matches!(
            parse_newgen(&[0, 1]),
            Err(GenerationError::Malformed(_))
        ));
        let getgen = getgen_request(7);
        assert!(matches!(
            parse_newgen(&getgen),
            Err(GenerationError::UnexpectedReply(_))
        ));
    }
}
