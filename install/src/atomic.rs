//! Atomic file replacement: readers (containerd, CRI-O, the kubelet) see the old file or the new
//! one, never a half-written one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::InstallError;

/// Prefix of every temp file we create. The name ends in `.tmp`, never in a CNI extension, so a
/// runtime that lists the conf dir mid-write cannot load it.
pub const TEMP_PREFIX: &str = ".node-local-dns-";

/// Mode and owner the written file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode {
    pub mode: u32,
    pub owner: Option<(u32, u32)>,
}

impl FileMode {
    /// Keeps what the file being replaced (or converted) had.
    pub fn of(meta: &fs::Metadata) -> Self {
        FileMode {
            mode: meta.permissions().mode() & 0o7777,
            owner: Some((meta.uid(), meta.gid())),
        }
    }

    pub fn new(mode: u32) -> Self {
        FileMode { mode, owner: None }
    }
}

/// Writes `contents` to `target` via a temp file in the same directory: write, fsync, set
/// mode/owner, rename over the target, fsync the directory.
pub fn write_atomic(target: &Path, contents: &[u8], mode: FileMode) -> Result<(), InstallError> {
    let dir = parent_dir(target);
    let temp = temp_path(dir);
    let result = write_temp(&temp, contents, mode)
        .and_then(|()| fs::rename(&temp, target).map_err(|e| InstallError::io(target, e)))
        .and_then(|()| sync_dir(dir));
    if result.is_err() {
        // Best effort: a leftover temp file has no CNI extension and is harmless.
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Copies `source` (streamed: plugin binaries can be large) into a complete temp file beside
/// `target` and returns its path; the caller checks it and then calls [`commit`]. Used for the
/// plugin binary, which is proven before it replaces one.
pub fn stage_copy(source: &Path, target: &Path, mode: FileMode) -> Result<PathBuf, InstallError> {
    let temp = temp_path(parent_dir(target));
    let mut from = File::open(source).map_err(|e| InstallError::io(source, e))?;
    let written = write_temp_with(&temp, mode, |file| {
        std::io::copy(&mut from, file).map(|_| ())
    });
    match written {
        Ok(()) => Ok(temp),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Renames a staged file over its target and makes the rename durable.
pub fn commit(staged: &Path, target: &Path) -> Result<(), InstallError> {
    fs::rename(staged, target).map_err(|e| InstallError::io(target, e))?;
    sync_dir(parent_dir(target))
}

/// Removes a file and makes the removal durable; a missing file is success.
pub fn remove_durably(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_dir(path)).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::io(path, e)),
    }
}

fn write_temp(temp: &Path, contents: &[u8], mode: FileMode) -> Result<(), InstallError> {
    write_temp_with(temp, mode, |file| file.write_all(contents))
}

fn write_temp_with(
    temp: &Path,
    mode: FileMode,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), InstallError> {
    let io = |e| InstallError::io(temp, e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.mode)
        .open(temp)
        .map_err(io)?;
    fill(&mut file).map_err(io)?;
    // The umask may have cleared bits at create time; set the exact mode.
    file.set_permissions(fs::Permissions::from_mode(mode.mode))
        .map_err(io)?;
    if let Some((uid, gid)) = mode.owner {
        chown_if_needed(&file, temp, uid, gid)?;
    }
    file.sync_all().map_err(io)
}

fn chown_if_needed(file: &File, path: &Path, uid: u32, gid: u32) -> Result<(), InstallError> {
    let meta = file.metadata().map_err(|e| InstallError::io(path, e))?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(|e| InstallError::io(path, e))
}

/// Removes temp files an earlier run left behind when it was killed mid-write. Call before
/// this process writes anything: every file with our prefix is then someone else's leftover.
pub fn remove_stale_temp_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(InstallError::io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| InstallError::io(dir, e))?.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TEMP_PREFIX) && n.ends_with(".tmp"));
        if ours && remove_durably(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Unique per process and call; the clock part keeps two containers that both run as PID 1
/// from picking the same name.
fn temp_path(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(
        "{TEMP_PREFIX}{}-{nanos}-{n}.tmp",
        std::process::id()
    ))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| InstallError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_keeps_requested_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("10-net.conflist");
        fs::write(&target, "old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let mode = FileMode::of(&fs::metadata(&target).unwrap());
        write_atomic(&target, b"new", mode).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("10-net.conflist")]);
    }

    #[test]
    fn failed_write_leaves_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing-subdir").join("x.conflist");
        assert!(write_atomic(&target, b"new", FileMode::new(0o644)).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn stale_temp_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".node-local-dns-1-0.tmp");
        fs::write(&stale, "half").unwrap();
        fs::write(dir.path().join("10-net.conflist"), "{}").unwrap();
        fs::write(dir.path().join(".other.tmp"), "x").unwrap();
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), vec![stale]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert!(
            remove_stale_temp_files(&dir.path().join("missing"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn temp_names_have_no_cni_extension() {
        let p = temp_path(Path::new("/x"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(TEMP_PREFIX) && name.ends_with(".tmp"));
        for ext in [".conf", ".conflist", ".json"] {
            assert!(!name.ends_with(ext));
        }
    }
}
