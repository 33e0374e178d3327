//! The cache's memory budget when `--cache-max-bytes` is not given: what the container's memory
//! limit leaves after the rest of the process, so a full cache never gets the pod OOM-killed.
//!
//! The limit is the lowest `memory.max` (cgroup v2) or `memory.limit_in_bytes` (v1) on the
//! path from the process's own cgroup (`/proc/self/cgroup`) up to the root of the mounted
//! hierarchy (`/proc/self/mountinfo`): the container's limit, or its pod's when lower. With no
//! limit (or no readable cgroup) the budget is [`DEFAULT_BUDGET`].

use std::io;
use std::path::{Path, PathBuf};

/// Budget without a memory limit: enough for the default entry capacities.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// What the process needs besides the cache: binary, thread stacks, allocator arenas,
/// metrics, the HTTP listeners, and the socket buffers and in-flight upstream queries the
/// memory cgroup also charges. Measured (release build): idle RSS 5.4 MiB with 1 UDP thread,
/// 7.0 MiB with 8; the rest is headroom for receive queues that fill under a burst
/// (several MiB per socket with a raised rmem) and TCP clients.
pub const RESERVE: u64 = 40 << 20;

/// Share of what is left that cache entries may take: the budget counts entry bytes, RSS
/// also holds the allocator's per-allocation overhead and fragmentation. Measured with ~1 KiB
/// answers filling a 58.7 MiB budget (128 MiB limit): RSS 78 MiB (release build; 88 MiB
/// debug), i.e. ~1.2x the counted bytes on top of the idle process.
const CACHE_SHARE: (u64, u64) = (2, 3);

/// Smallest budget handed out, so a tiny limit still caches something.
const MIN_BUDGET: u64 = 4 << 20;

/// v1 reports "no limit" as the largest page-aligned i64; anything this large is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// Reads the files this module needs (a fake in the tests).
pub trait CgroupFs {
    fn read(&self, path: &Path) -> io::Result<String>;
}

/// The real /proc and /sys.
pub struct HostFs;

impl CgroupFs for HostFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// The budget for this process: from its memory limit, or [`DEFAULT_BUDGET`] without one.
pub fn default_cache_max_bytes() -> usize {
    budget_for(memory_limit(&HostFs))
}

/// Budget for a memory limit in bytes (`None`: no limit).
pub fn budget_for(limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return DEFAULT_BUDGET;
    };
    let (num, den) = CACHE_SHARE;
    let share = limit.saturating_sub(RESERVE) / den * num;
    let budget = share.max(MIN_BUDGET).min(DEFAULT_BUDGET as u64);
    usize::try_from(budget).unwrap_or(DEFAULT_BUDGET)
}

/// The lowest memory limit on the path from this process's cgroup to the hierarchy's root.
pub fn memory_limit(fs: &dyn CgroupFs) -> Option<u64> {
    let cgroups = fs.read(Path::new("/proc/self/cgroup")).ok()?;
    let mounts = fs.read(Path::new("/proc/self/mountinfo")).ok()?;
    let mounts = parse_mountinfo(&mounts);
    [Version::V2, Version::V1]
        .into_iter()
        .find_map(|v| limit_in(fs, v, &cgroups, &mounts))
}

/// cgroup v2 (unified) or v1 (a `memory` hierarchy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    fn limit_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }
}

/// The lowest limit in one hierarchy; `None` when it is not mounted, has no memory controller
/// here, or sets no limit anywhere on the path.
fn limit_in(fs: &dyn CgroupFs, v: Version, cgroups: &str, mounts: &[Mount]) -> Option<u64> {
    let path = own_cgroup(cgroups, v)?;
    let mount = mounts.iter().find(|m| m.serves(v))?;
    let mut dir = mount.dir_of(path)?;
    let mut lowest: Option<u64> = None;
    let mut found_file = false;
    loop {
        if let Ok(text) = fs.read(&dir.join(v.limit_file())) {
            found_file = true;
            if let Some(limit) = parse_limit(&text, v) {
                lowest = Some(lowest.map_or(limit, |l| l.min(limit)));
            }
        }
        if dir == mount.point || !dir.pop() {
            break;
        }
    }
    if found_file { lowest } else { None }
}

/// The process's cgroup path in one hierarchy, from `/proc/self/cgroup`
/// (`0::/path` for v2, `N:...,memory,...:/path` for v1).
pub fn own_cgroup(proc_self_cgroup: &str, v: Version) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match v {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        matches.then_some(path)
    })
}

/// A limit file's value: `None` for no limit ("max" in v2, a huge number in v1) or garbage.
pub fn parse_limit(text: &str, v: Version) -> Option<u64> {
    let text = text.trim();
    if v == Version::V2 && text == "max" {
        return None;
    }
    let n: u64 = text.parse().ok()?;
    (v == Version::V2 || n < V1_UNLIMITED).then_some(n)
}

/// One cgroup filesystem mount: which part of the hierarchy (`root`) it shows where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub root: String,
    pub point: PathBuf,
    pub version: Version,
    /// Super options (v1: the controllers, e.g. `rw,memory`).
    pub options: String,
}

impl Mount {
    fn serves(&self, v: Version) -> bool {
        self.version == v && (v == Version::V2 || self.options.split(',').any(|o| o == "memory"))
    }

    /// Where a cgroup path of this hierarchy is in the filesystem. A container sees its own
    /// cgroup as the mount's root: its path outside (`/kubepods/...`) starts with `root`.
    fn dir_of(&self, cgroup: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            cgroup
        } else {
            cgroup.strip_prefix(self.root.as_str())?
        };
        Some(self.point.join(rel.trim_start_matches('/')))
    }
}

/// The cgroup and cgroup2 mounts listed in `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let version = match *right.first()? {
                "cgroup2" => Version::V2,
                "cgroup" => Version::V1,
                _ => return None,
            };
            Some(Mount {
                root: unescape(left.get(3)?),
                point: PathBuf::from(unescape(left.get(4)?)),
                version,
                options: right.get(2).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeFs(HashMap<PathBuf, String>);

    impl CgroupFs for FakeFs {
        fn read(&self, path: &Path) -> io::Result<String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn fake(files: &[(&str, &str)]) -> FakeFs {
        FakeFs(
            files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), t.to_string()))
                .collect(),
        )
    }

    const V2_MOUNT: &str =
        "41 31 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    const V1_MOUNTS: &str = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices\n";

    #[test]
    fn own_cgroup_reads_each_version_line() {
        let text = "9:name=systemd:/\n4:memory:/kubepods/pod1/c1\n3:cpu,cpuacct:/x\n0::/kubepods.slice/c2\n";
        assert_eq!(own_cgroup(text, Version::V2), Some("/kubepods.slice/c2"));
        assert_eq!(own_cgroup(text, Version::V1), Some("/kubepods/pod1/c1"));
        assert_eq!(own_cgroup("0::/\n", Version::V1), None);
    }

    #[test]
    fn parse_limit_knows_each_version_s_unlimited() {
        assert_eq!(parse_limit("134217728\n", Version::V2), Some(128 << 20));
        assert_eq!(parse_limit("max\n", Version::V2), None);
        assert_eq!(parse_limit("134217728\n", Version::V1), Some(128 << 20));
        assert_eq!(parse_limit("9223372036854771712\n", Version::V1), None);
        assert_eq!(parse_limit("garbage", Version::V2), None);
    }

    #[test]
    fn mountinfo_lists_cgroup_mounts_with_their_roots() {
        let text = format!(
            "22 1 0:21 / /proc rw - proc proc rw\n\
             50 31 0:38 /kubepods/pod\\0401 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n{V1_MOUNTS}"
        );
        let mounts = parse_mountinfo(&text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].root, "/kubepods/pod 1");
        assert_eq!(mounts[0].version, Version::V2);
        assert!(mounts[1].serves(Version::V1));
        assert!(
            !mounts[2].serves(Version::V1),
            "devices has no memory limit"
        );
    }

    #[test]
    fn v2_takes_the_lowest_limit_up_to_the_mount() {
        let fs = fake(&[
            ("/proc/self/cgroup", "0::/kubepods/pod1/c1\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
            ("/sys/fs/cgroup/kubepods/pod1/c1/memory.max", "max\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.max", "134217728\n"),
            ("/sys/fs/cgroup/kubepods/memory.max", "1073741824\n"),
        ]);
        assert_eq!(memory_limit(&fs), Some(128 << 20));
    }

    /// A container with its own cgroup namespace or a bind of its cgroup as the mount root:
    /// the path in /proc/self/cgroup is relative to the mount.
    #[test]
    fn a_container_sees_its_cgroup_at_the_mount_root() {
        let fs = fake(&[
            ("/proc/self/cgroup", "0::/\n"),
            (
                "/proc/self/mountinfo",
                "50 31 0:38 /kubepods/c1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n",
            ),
            ("/sys/fs/cgroup/memory.max", "134217728\n"),
        ]);
        assert_eq!(memory_limit(&fs), None, "/ is not under /kubepods/c1");
        let fs = fake(&[
            ("/proc/self/cgroup", "0::/kubepods/c1\n"),
            (
                "/proc/self/mountinfo",
                "50 31 0:38 /kubepods/c1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n",
            ),
            ("/sys/fs/cgroup/memory.max", "134217728\n"),
        ]);
        assert_eq!(memory_limit(&fs), Some(128 << 20));
    }

    #[test]
    fn v1_is_used_when_v2_has_no_memory_controller() {
        let fs = fake(&[
            ("/proc/self/cgroup", "4:memory:/test/c1\n0::/\n"),
            ("/proc/self/mountinfo", &format!("{V2_MOUNT}{V1_MOUNTS}")),
            (
                "/sys/fs/cgroup/memory/test/c1/memory.limit_in_bytes",
                "134217728\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]);
        assert_eq!(memory_limit(&fs), Some(128 << 20));
    }

    #[test]
    fn no_limit_or_no_cgroup_means_the_default_budget() {
        let fs = fake(&[
            ("/proc/self/cgroup", "0::/c\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
            ("/sys/fs/cgroup/c/memory.max", "max\n"),
        ]);
        assert_eq!(memory_limit(&fs), None);
        assert_eq!(memory_limit(&fake(&[])), None);
        assert_eq!(budget_for(None), DEFAULT_BUDGET);
    }

    #[test]
    fn budget_leaves_the_reserve_and_the_allocator_s_share() {
        let b = budget_for(Some(128 << 20)) as u64;
        assert!(b + RESERVE < 128 << 20);
        assert_eq!(b, ((128 << 20) - RESERVE) / 3 * 2);
        assert_eq!(budget_for(Some(8 << 20)) as u64, MIN_BUDGET);
        assert_eq!(budget_for(Some(64 << 30)), DEFAULT_BUDGET);
    }
}
