//! Cheap looks at loaded legacy (x_tables) tables through getsockopt, instead of starting
//! `iptables-legacy-save`:
//! - `table_info`: an IPv4 table's entry count and blob size (one `IPT_SO_GET_INFO`). Adding
//!   or removing a chain changes both, so with the list of loaded tables it tells whether
//!   kube-proxy's or kubelet's legacy chains may have changed since the backend was detected.
//! - `raw_table_stamp`: a hash of the raw table's exact content without counters, the
//!   stand-in for the generation number legacy tables lack.

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};

use crate::sockopt;

/// Why a legacy table could not be looked at. The callers then fall back to a full check.
#[derive(Debug, thiserror::Error)]
pub enum LegacyTableError {
    #[error("table name {0:?} too long")]
    NameTooLong(String),
    #[error("legacy {0} table not loaded")]
    NotLoaded(&'static str),
    #[error("{call}: {err}")]
    Kernel { call: String, err: std::io::Error },
    #[error("malformed entry table: {0}")]
    Malformed(&'static str),
}

fn kernel(call: impl Into<String>) -> impl FnOnce(std::io::Error) -> LegacyTableError {
    move |err| LegacyTableError::Kernel {
        call: call.into(),
        err,
    }
}

/// linux/netfilter_ipv4/ip_tables.h: GET_INFO, then GET_ENTRIES, on both families.
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
const XT_TABLE_MAXNAMELEN: usize = 32;
const NF_INET_NUMHOOKS: usize = 5;
/// `struct ipt_getinfo`: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const GETINFO_LEN: usize = XT_TABLE_MAXNAMELEN + 4 + 2 * 4 * NF_INET_NUMHOOKS + 4 + 4;
const NUM_ENTRIES_AT: usize = GETINFO_LEN - 8;
const SIZE_AT: usize = GETINFO_LEN - 4;
/// `struct ip{,6}t_get_entries`: name[32], size, then the 8-aligned entry table.
const GET_ENTRIES_HEADER: usize = 40;

/// Where `next_offset` and the packet/byte counters sit in one `struct ip{,6}t_entry`.
struct EntryLayout {
    next_offset_at: usize,
    counters_at: usize,
}

/// ipt_entry: ipt_ip (84) nfcache target_offset next_offset@90 comefrom counters@96.
const IPV4_ENTRY: EntryLayout = EntryLayout {
    next_offset_at: 90,
    counters_at: 96,
};
/// ip6t_entry: ip6t_ip6 (136) nfcache target_offset next_offset@142 comefrom counters@152.
const IPV6_ENTRY: EntryLayout = EntryLayout {
    next_offset_at: 142,
    counters_at: 152,
};
const COUNTERS_LEN: usize = 16;

fn raw_socket(family: AddressFamily) -> Result<OwnedFd, LegacyTableError> {
    socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )
    .map_err(|e| kernel("raw socket")(e.into()))
}

/// A GET_INFO request for `table`: the name, NUL-padded; the kernel fills in the rest.
fn info_request(table: &str) -> Result<[u8; GETINFO_LEN], LegacyTableError> {
    if table.len() >= XT_TABLE_MAXNAMELEN {
        return Err(LegacyTableError::NameTooLong(table.to_string()));
    }
    let mut info = [0u8; GETINFO_LEN];
    info[..table.len()].copy_from_slice(table.as_bytes());
    Ok(info)
}

/// A table's `struct ipt_getinfo` as bytes.
fn get_info(
    fd: &OwnedFd,
    level: libc::c_int,
    mut info: [u8; GETINFO_LEN],
) -> Result<[u8; GETINFO_LEN], LegacyTableError> {
    sockopt::get_into(fd.as_fd(), level, SO_GET_INFO, &mut info).map_err(kernel("GET_INFO"))?;
    Ok(info)
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, LegacyTableError> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(LegacyTableError::Malformed("short GET_INFO reply"))
}

/// "entries/size" of a legacy table of the calling thread's namespace.
///
/// Only call it for a table listed in ip_tables_names: asking for a table that is not loaded
/// makes the kernel create it.
pub fn table_info(table: &str) -> Result<String, LegacyTableError> {
    let request = info_request(table)?;
    let fd = raw_socket(AddressFamily::Inet)?;
    let info = get_info(&fd, libc::IPPROTO_IP, request)?;
    Ok(format!(
        "{}/{}",
        u32_at(&info, NUM_ENTRIES_AT)?,
        u32_at(&info, SIZE_AT)?
    ))
}

/// A stamp of the legacy raw table's content (rules, chains, hooks; not the counters, which
/// move with traffic) in the calling thread's namespace, with the namespace's cookie.
/// Legacy tables have no generation number; this is the exact-content stand-in, read with
/// two getsockopt calls instead of starting `iptables-legacy-save`.
///
/// Only call it when `raw` is listed as loaded: asking for a missing table creates it.
pub fn raw_table_stamp(v6: bool) -> Result<String, LegacyTableError> {
    let (family, level, layout) = if v6 {
        (AddressFamily::Inet6, libc::IPPROTO_IPV6, &IPV6_ENTRY)
    } else {
        (AddressFamily::Inet, libc::IPPROTO_IP, &IPV4_ENTRY)
    };
    let request = info_request("raw")?;
    let fd = raw_socket(family)?;
    let info = get_info(&fd, level, request)?;
    let size = u32_at(&info, SIZE_AT)? as usize;
    let mut buf = vec![0u8; GET_ENTRIES_HEADER + size];
    buf[..3].copy_from_slice(b"raw");
    buf[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
    // EAGAIN when the table changed size in between: no stamp, the caller checks in full.
    sockopt::get_into(fd.as_fd(), level, SO_GET_ENTRIES, &mut buf)
        .map_err(kernel("GET_ENTRIES raw"))?;
    let entries = &mut buf[GET_ENTRIES_HEADER..];
    zero_counters(entries, layout)?;
    let cookie = sockopt::netns_cookie(fd.as_fd()).map_err(kernel("SO_NETNS_COOKIE"))?;
    // Hooks and underflows (GET_INFO between the name and the size) say where each chain
    // starts.
    let hooks = &info[XT_TABLE_MAXNAMELEN..SIZE_AT];
    Ok(format!(
        "{cookie}:{:016x}{:016x}",
        fnv1a(hooks),
        fnv1a(entries)
    ))
}

fn zero_counters(entries: &mut [u8], layout: &EntryLayout) -> Result<(), LegacyTableError> {
    let truncated = LegacyTableError::Malformed("truncated entry");
    let mut at = 0;
    while at < entries.len() {
        let Some(next) = entries.get(at + layout.next_offset_at..at + layout.next_offset_at + 2)
        else {
            return Err(truncated);
        };
        let next = usize::from(u16::from_ne_bytes([next[0], next[1]]));
        let Some(counters) =
            entries.get_mut(at + layout.counters_at..at + layout.counters_at + COUNTERS_LEN)
        else {
            return Err(truncated);
        };
        counters.fill(0);
        if next == 0 {
            return Err(LegacyTableError::Malformed("entry with next_offset 0"));
        }
        at += next;
    }
    Ok(())
}

/// FNV-1a: stable across builds (the plugin and the daemon compare each other's stamps).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getinfo_has_the_kernel_size() {
        // 32 name + 4 valid_hooks + 5*4 hook_entry + 5*4 underflow + 4 + 4.
        assert_eq!(GETINFO_LEN, 84);
        assert_eq!((NUM_ENTRIES_AT, SIZE_AT), (76, 80));
    }

    #[test]
    fn counters_are_zeroed_and_bad_tables_are_refused() {
        let layout = EntryLayout {
            next_offset_at: 0,
            counters_at: 2,
        };
        // Two 20-byte entries: next_offset 20, then 16 bytes of counters, then padding.
        let mut entries = vec![0xffu8; 40];
        for at in [0, 20] {
            entries[at..at + 2].copy_from_slice(&20u16.to_ne_bytes());
        }
        zero_counters(&mut entries, &layout).unwrap();
        assert!(entries[2..18].iter().all(|b| *b == 0));
        assert!(entries[22..38].iter().all(|b| *b == 0));
        assert_eq!(entries[18], 0xff, "bytes after the counters stay");
        let mut zero_next = vec![0u8; 20];
        assert!(matches!(
            zero_counters(&mut zero_next, &layout),
            Err(LegacyTableError::Malformed(_))
        ));
        let mut short = 20u16.to_ne_bytes().to_vec();
        assert!(zero_counters(&mut short, &layout).is_err());
    }

    #[test]
    fn long_table_names_are_refused_before_any_kernel_call() {
        let name = "t".repeat(XT_TABLE_MAXNAMELEN);
        assert!(matches!(
            table_info(&name),
            Err(LegacyTableError::NameTooLong(n)) if n == name
        ));
        assert_eq!(&info_request("nat").unwrap()[..4], b"nat\0");
    }
}
