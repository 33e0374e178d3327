//! The one kernel call of this crate that has no safe wrapper: `getsockopt` with an option the
//! libc and nix crates do not model (x_tables' GET_INFO/GET_ENTRIES, SO_NETNS_COOKIE). The
//! callers build and parse the bytes; only the call itself is unsafe, and it lives here.

use std::os::fd::{AsRawFd, BorrowedFd};

/// asm-generic/socket.h; not in the libc crate yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Calls `getsockopt(fd, level, opt)` into `buf` (which also carries the request, for the
/// x_tables options) and returns how many bytes the kernel wrote.
pub fn get_into(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is a live descriptor for the borrow's lifetime; `buf` is valid for writes
    // of `len` bytes, and the kernel writes at most `len` bytes and stores the count in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// The cookie of the network namespace `fd` lives in: unique per boot, never reused.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = [0u8; 8];
    let len = get_into(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie)?;
    if len != cookie.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    Ok(u64::from_ne_bytes(cookie))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn reads_an_option_and_the_namespace_cookie_of_a_real_socket() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ty = [0u8; 4];
        let len = get_into(socket.as_fd(), libc::SOL_SOCKET, libc::SO_TYPE, &mut ty).unwrap();
        assert_eq!(len, 4);
        assert_eq!(i32::from_ne_bytes(ty), libc::SOCK_DGRAM);
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cookie = netns_cookie(socket.as_fd()).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(
            netns_cookie(other.as_fd()).unwrap(),
            cookie,
            "same namespace"
        );
    }

    #[test]
    fn an_unknown_option_is_an_error() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 4];
        assert!(get_into(socket.as_fd(), libc::SOL_SOCKET, 0x7fff, &mut buf).is_err());
    }
}
