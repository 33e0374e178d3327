//! The nftables ruleset generation of the calling thread's network namespace.
//!
//! The kernel bumps this number on every nftables change in the namespace (any table, any
//! family, any tool). When it equals the one read just before we last verified our rules,
//! nothing can have changed them, and the fast path skips `iptables-nft-save` entirely: a
//! single netlink round trip instead of a process start. The socket's network-namespace
//! cookie (unique per boot, never reused) is part of the stamp, so a stamp from another or a
//! recreated namespace never matches.

use std::os::fd::AsRawFd;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_ID: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
/// asm-generic/socket.h; not in the libc crate yet.
const SO_NETNS_COOKIE: libc::c_int = 71;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// "<netns cookie>:<generation>", or an error text when nftables cannot be asked.
pub fn stamp() -> Result<String, String> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| format!("socket: {e}"))?;
    socket.bind_auto().map_err(|e| format!("bind: {e}"))?;
    let cookie = netns_cookie(&socket)?;
    socket
        .send(&getgen_request(1), 0)
        .map_err(|e| format!("send: {e}"))?;
    let (reply, _) = socket.recv_from_full().map_err(|e| format!("recv: {e}"))?;
    let generation = parse_newgen(&reply)?;
    Ok(format!("{cookie}:{generation}"))
}

fn netns_cookie(socket: &Socket) -> Result<u64, String> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!(
            "SO_NETNS_COOKIE: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cookie)
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
pub fn parse_newgen(reply: &[u8]) -> Result<u32, String> {
    let msg_type = u16_at(reply, 4).ok_or("short reply")?;
    if msg_type == NLMSG_ERROR {
        return Err("nftables answered with an error".into());
    }
    if msg_type != ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN) {
        return Err(format!("unexpected reply type {msg_type:#x}"));
    }
    let mut at = NLMSG_HDRLEN + NFGENMSG_LEN;
    while let (Some(len), Some(kind)) = (u16_at(reply, at), u16_at(reply, at + 2)) {
        let len = usize::from(len);
        if len < 4 {
            break;
        }
        if kind & 0x3fff == NFTA_GEN_ID {
            let value = reply.get(at + 4..at + 8).ok_or("short NFTA_GEN_ID")?;
            // Netfilter attributes are big-endian.
            return Ok(u32::from_be_bytes(
                value.try_into().map_err(|_| "bad NFTA_GEN_ID")?,
            ));
        }
        at += (len + 3) & !3;
    }
    Err("no NFTA_GEN_ID in reply".into())
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
        assert_eq!(parse_newgen(&reply), Ok(0x0102_0304));
        let mut err = getgen_request(7);
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(parse_newgen(&err).is_err());
        assert!(parse_newgen(&[0, 1]).is_err());
    }
}
