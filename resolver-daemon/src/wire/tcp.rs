//! DNS over TCP framing (RFC 1035 §4.2.2): a two-byte length before every message.

/// Length of the prefix.
pub const TCP_PREFIX_LEN: usize = 2;

/// `msg` with its length prefix, ready to write. Messages are at most `TCP_LIMIT` long
/// (the answer limit over TCP), so the length fits.
pub fn tcp_framed(msg: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(TCP_PREFIX_LEN + msg.len());
    framed.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    framed.extend_from_slice(msg);
    framed
}

/// Length of the message that follows `prefix`.
pub fn tcp_message_len(prefix: [u8; TCP_PREFIX_LEN]) -> usize {
    usize::from(u16::from_be_bytes(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let framed = tcp_framed(&[7; 300]);
        assert_eq!(framed.len(), 302);
        assert_eq!(tcp_message_len([framed[0], framed[1]]), 300);
        assert_eq!(tcp_message_len([0xff, 0xff]), 65_535);
    }
}
