//! Scheduling knobs for the daemon's own threads. None needs a privilege: lowering one's
//! own priority, choosing a shorter EEVDF slice and narrowing one's own CPU affinity are
//! open to any thread.

use std::time::Duration;

/// Nice value of the tokio threads (the UDP threads keep 0). Server capped at half a core,
/// search-path mix at 20k q/s with prefetches, p99: 0.15-0.19 ms at nice 0, 0.10-0.15 at 5,
/// 0.10-0.14 at 10. But at 10 the tokio side gets ~10 % of a saturated CPU, too little to
/// keep refreshing while hits saturate it (entries then expire and misses queue: one run in
/// three went to 5 ms p99); 5 still leaves it a quarter.
const TOKIO_NICE: libc::c_int = 5;

/// Runs on every tokio thread: cache hits (the UDP threads) come before misses, prefetches,
/// TCP and metrics when they share a CPU, so a batch of upstream work does not delay the
/// answers queued behind it.
pub fn lower_priority_of_this_thread() {
    // SAFETY: setpriority on the calling thread (who = 0) only changes its nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, TOKIO_NICE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "setpriority");
    }
}

/// The range Linux accepts for a custom fair-class slice (kernel/sched/syscalls.c clamps to
/// it); `Config` keeps `--udp-slice` inside it.
pub const SLICE_RANGE: (Duration, Duration) =
    (Duration::from_micros(100), Duration::from_millis(100));

/// include/uapi/linux/sched.h
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// `struct sched_attr` as of SCHED_ATTR_SIZE_VER0 (48 bytes); the utilisation clamps that
/// follow it in newer kernels are not used.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks EEVDF (Linux ≥ 6.12) for a short time slice for the calling thread, keeping its
/// policy and nice value. A woken thread with a short slice gets an early virtual deadline,
/// so it preempts a busy CPU's current task instead of waiting for that task's slice (1.4 ms
/// by default on 2 CPUs) to run out: an answer is a few microseconds of work, and a DNS query
/// should not wait behind a pod's batch job. The thread's CPU share is unchanged: the slice
/// moves when it runs, not how much. Returns the slice the kernel now reports, or `None` where
/// the kernel has no custom slices (before 6.12 fair-class `runtime` is ignored).
pub fn request_slice_for_this_thread(slice: Duration) -> std::io::Result<Option<Duration>> {
    let mut attr = get_attr()?;
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(None); // a real-time or deadline policy set by the operator wins
    }
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // Keep reset-on-fork if the operator set it; the utilisation-clamp flags belong to the
    // larger struct versions this call does not send.
    attr.flags &= SCHED_FLAG_RESET_ON_FORK;
    set_attr(&attr)?;
    let now = get_attr()?;
    Ok((now.runtime != 0).then(|| Duration::from_nanos(now.runtime)))
}

/// The CPUs this process may run on (its affinity mask: the container's cpuset, minus what
/// the operator's `taskset` or the kubelet's CPU manager took away), in ascending order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins the calling thread to `cpu`, so that the queries the kernel steers to its socket
/// (SO_INCOMING_CPU: those sent from `cpu`) are answered where they were sent.
pub fn pin_this_thread(cpu: usize) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

fn get_attr() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, which is that large and
    // laid out as the kernel's struct sched_attr (VER0); pid 0 is the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

fn set_attr(attr: &SchedAttr) -> std::io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        ..*attr
    };
    // SAFETY: the kernel reads `attr.size` bytes from a struct of exactly that size; pid 0 is
    // the calling thread, so no other thread's scheduling changes.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "ascending: {cpus:?}");
        let last = *cpus.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_this_thread(last).unwrap();
            (allowed_cpus().unwrap(), nix::sched::sched_getcpu().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (vec![last], last));
        assert_eq!(
            allowed_cpus().unwrap(),
            cpus,
            "other threads keep their mask"
        );
    }

    #[test]
    fn sched_attr_has_the_kernels_ver0_layout() {
        assert_eq!(std::mem::size_of::<SchedAttr>(), 48);
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() {
        let got = std::thread::spawn(|| {
            // SAFETY: changes only this test thread's nice value.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) };
            let slice = request_slice_for_this_thread(Duration::from_micros(300));
            (
                slice.map_err(|e| e.to_string()),
                get_attr().map(|a| a.nice).ok(),
            )
        })
        .join()
        .map_err(|_| "thread panicked");
        let (slice, nice) = got.unwrap();
        assert_eq!(nice, Some(3), "nice value kept");
        // Kernels before 6.12 have no custom slice and say so with None, not an error.
        match slice.unwrap() {
            Some(s) => assert_eq!(s, Duration::from_micros(300)),
            None => eprintln!("kernel without custom EEVDF slices"),
        }
    }
}
