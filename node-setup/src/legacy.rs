//! A cheap look at a loaded legacy (x_tables) IPv4 table: entry count and blob size, from one
//! `getsockopt(IPT_SO_GET_INFO)`. Adding or removing a chain changes both, so together with
//! the list of loaded tables it tells whether kube-proxy's or kubelet's legacy chains may have
//! changed since the backend was last detected, without starting `iptables-legacy-save`.

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

#[cfg(test)]
mod tests {
    #[test]
    fn getinfo_struct_has_the_kernel_size() {
        // 32 name + 4 valid_hooks + 5*4 hook_entry + 5*4 underflow + 4 + 4.
        assert_eq!(std::mem::size_of::<super::IptGetinfo>(), 84);
    }
}
