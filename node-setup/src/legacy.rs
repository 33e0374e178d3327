//! Cheap looks at loaded legacy (x_tables) tables through getsockopt, instead of starting
//! `iptables-legacy-save`:
//! - `table_info`: an IPv4 table's entry count and blob size (one `IPT_SO_GET_INFO`). Adding
//!   or removing a chain changes both, so with the list of loaded tables it tells whether
//!   kube-proxy's or kubelet's legacy chains may have changed since the backend was detected.
//! - `raw_table_stamp`: a hash of the raw table's exact content without counters, the
//!   stand-in for the generation number legacy tables lack.

/// linux/netfilter_ipv4/ip_tables.h
const IPT_SO_GET_INFO: libc::c_int = 64;
const XT_TABLE_MAXNAMELEN: usize = 32;
const NF_INET_NUMHOOKS: usize = 5;

/// struct ipt_getinfo
#[repr(C)]
struct IptGetinfo {
    name: [u8; XT_TABLE_MAXNAMELEN],
    valid_hooks: u32,
    hook_entry: [u32; NF_INET_NUMHOOKS],
    underflow: [u32; NF_INET_NUMHOOKS],
    num_entries: u32,
    size: u32,
}

/// "entries/size" of a legacy table of the calling thread's namespace.
///
/// Only call it for a table listed in ip_tables_names: asking for a table that is not loaded
/// makes the kernel create it.
pub fn table_info(table: &str) -> Result<String, String> {
    if table.len() >= XT_TABLE_MAXNAMELEN {
        return Err(format!("table name {table:?} too long"));
    }
    let mut info = IptGetinfo {
        name: [0; XT_TABLE_MAXNAMELEN],
        valid_hooks: 0,
        hook_entry: [0; NF_INET_NUMHOOKS],
        underflow: [0; NF_INET_NUMHOOKS],
        num_entries: 0,
        size: 0,
    };
    info.name[..table.len()].copy_from_slice(table.as_bytes());
    // SAFETY: a plain socket call; the fd is closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    let mut len = std::mem::size_of::<IptGetinfo>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_IP,
            IPT_SO_GET_INFO,
            (&mut info as *mut IptGetinfo).cast(),
            &mut len,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours and still open.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(format!("IPT_SO_GET_INFO {table}: {err}"));
    }
    Ok(format!("{}/{}", info.num_entries, info.size))
}

/// linux/netfilter_ipv{4,6}/ip{,6}_tables.h: GET_ENTRIES follows GET_INFO on both families.
const SO_GET_ENTRIES: libc::c_int = 65;
/// asm-generic/socket.h; not in the libc crate yet.
const SO_NETNS_COOKIE: libc::c_int = 71;
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

/// An owned socket fd, closed on drop.
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and open.
        unsafe { libc::close(self.0) };
    }
}

fn getsockopt_into(
    fd: &Fd,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which is that large.
    let rc = unsafe { libc::getsockopt(fd.0, level, opt, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(len as usize)
}

/// A stamp of the legacy raw table's content (rules, chains, hooks; not the counters, which
/// move with traffic) in the calling thread's namespace, with the namespace's cookie.
/// Legacy tables have no generation number; this is the exact-content stand-in, read with
/// two getsockopt calls instead of starting `iptables-legacy-save`.
///
/// Only call it when `raw` is listed as loaded: asking for a missing table creates it.
pub fn raw_table_stamp(v6: bool) -> Result<String, String> {
    let (domain, level, layout) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_IPV6, &IPV6_ENTRY)
    } else {
        (libc::AF_INET, libc::IPPROTO_IP, &IPV4_ENTRY)
    };
    // SAFETY: a plain socket call; Fd closes it.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    let fd = Fd(raw);
    let mut info = [0u8; std::mem::size_of::<IptGetinfo>()];
    info[..3].copy_from_slice(b"raw");
    getsockopt_into(&fd, level, IPT_SO_GET_INFO, &mut info)
        .map_err(|e| format!("GET_INFO raw: {e}"))?;
    let size_at = info.len() - 4;
    let size = u32::from_ne_bytes(info[size_at..].try_into().map_err(|_| "short info")?) as usize;
    let mut buf = vec![0u8; GET_ENTRIES_HEADER + size];
    buf[..3].copy_from_slice(b"raw");
    buf[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
    // EAGAIN when the table changed size in between: no stamp, the caller checks in full.
    getsockopt_into(&fd, level, SO_GET_ENTRIES, &mut buf)
        .map_err(|e| format!("GET_ENTRIES raw: {e}"))?;
    let entries = &mut buf[GET_ENTRIES_HEADER..];
    zero_counters(entries, layout)?;
    let mut cookie = [0u8; 8];
    getsockopt_into(&fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie)
        .map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
    // Hooks and underflows (info minus the name) say where each chain starts.
    let hooks = &info[32..size_at];
    Ok(format!(
        "{}:{:016x}{:016x}",
        u64::from_ne_bytes(cookie),
        fnv1a(hooks),
        fnv1a(entries)
    ))
}

fn zero_counters(entries: &mut [u8], layout: &EntryLayout) -> Result<(), String> {
    let mut at = 0;
    while at < entries.len() {
        let next = entries
            .get(at + layout.next_offset_at..at + layout.next_offset_at + 2)
            .ok_or("truncated entry")?;
        let next = usize::from(u16::from_ne_bytes([next[0], next[1]]));
        let counters = entries
            .get_mut(at + layout.counters_at..at + layout.counters_at + COUNTERS_LEN)
            .ok_or("truncated entry")?;
        counters.fill(0);
        if next == 0 {
            return Err("entry with next_offset 0".into());
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
    #[test]
    fn getinfo_struct_has_the_kernel_size() {
        // 32 name + 4 valid_hooks + 5*4 hook_entry + 5*4 underflow + 4 + 4.
        assert_eq!(std::mem::size_of::<super::IptGetinfo>(), 84);
    }
}
