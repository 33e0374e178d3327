//! Atomic file replacement, the one implementation for the whole workspace: readers
//! (containerd, CRI-O, the kubelet, the daemon reading the plugin's counters) see the old file
//! or the new one, never a half-written one.
//!
//! The rule (docs/design-facts.md §3): write a temp file in the same directory whose name has no CNI
//! extension (a runtime listing the conf dir mid-write cannot load it), fsync it, rename it over
//! the target, fsync the directory; the written file keeps the replaced file's mode and owner.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every temp file we create.
pub const TEMP_PREFIX: &str = ".node-local-dns-";
/// Suffix of every temp file we create: never a CNI extension (`.conf`, `.conflist`, `.json`).
pub const TEMP_SUFFIX: &str = ".tmp";

/// A file operation that failed, with the path it concerns.
#[derive(Debug, thiserror::Error)]
// The io::Error is part of the message, not a `source`, so it is printed once.
#[error("{path}: {err}")]
pub struct AtomicError {
    pub path: PathBuf,
    pub err: std::io::Error,
}

impl AtomicError {
    fn at(path: &Path) -> impl FnOnce(std::io::Error) -> AtomicError + '_ {
        move |err| AtomicError {
            path: path.to_path_buf(),
            err,
        }
    }
}

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

    /// What `target` has now, or `mode` when it does not exist yet.
    pub fn of_target_or(target: &Path, mode: u32) -> Result<Self, AtomicError> {
        match fs::metadata(target) {
            Ok(meta) => Ok(FileMode::of(&meta)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileMode::new(mode)),
            Err(e) => Err(AtomicError::at(target)(e)),
        }
    }
}

/// Whether a write must survive a crash of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after: CNI configs and binaries.
    Durable,
    /// The rename alone: readers still never see a torn file, but a crash may lose the write.
    /// For state under /run that is rebuilt when lost and written on the pod ADD path, where
    /// an fsync on a disk-backed /run cost milliseconds per ADD.
    RenameOnly,
}

/// Writes `contents` to `target` via a temp file in the same directory: write, (fsync,) set
/// mode/owner, rename over the target, (fsync the directory).
pub fn write_atomic(
    target: &Path,
    contents: &[u8],
    mode: FileMode,
    durability: Durability,
) -> Result<(), AtomicError> {
    let dir = parent_dir(target);
    let temp = temp_path(dir);
    let result = write_temp(&temp, mode, durability, |file| file.write_all(contents))
        .and_then(|()| rename(&temp, target, durability));
    if result.is_err() {
        // Best effort: a leftover temp file has no CNI extension and is harmless.
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Copies `source` (streamed: plugin binaries can be large) into a complete, synced temp file
/// beside `target` and returns its path; the caller checks it and then calls [`commit`]. Used
/// for the plugin binary, which is proven before it replaces one.
pub fn stage_copy(source: &Path, target: &Path, mode: FileMode) -> Result<PathBuf, AtomicError> {
    let temp = temp_path(parent_dir(target));
    let mut from = File::open(source).map_err(AtomicError::at(source))?;
    let written = write_temp(&temp, mode, Durability::Durable, |file| {
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
pub fn commit(staged: &Path, target: &Path) -> Result<(), AtomicError> {
    rename(staged, target, Durability::Durable)
}

/// Removes a file and makes the removal durable; a missing file is success.
pub fn remove_durably(path: &Path) -> Result<bool, AtomicError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_dir(path)).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(AtomicError::at(path)(e)),
    }
}

/// Whether `path` names one of our temp files.
pub fn is_temp_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX) && n.ends_with(TEMP_SUFFIX))
}

/// Removes temp files an earlier run left behind when it was killed mid-write. Call before
/// this process writes anything: every file with our prefix is then someone else's leftover.
pub fn remove_stale_temp_files(dir: &Path) -> Result<Vec<PathBuf>, AtomicError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(AtomicError::at(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(AtomicError::at(dir))?.path();
        if is_temp_file(&path) && remove_durably(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

fn write_temp(
    temp: &Path,
    mode: FileMode,
    durability: Durability,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), AtomicError> {
    let io = AtomicError::at(temp);
    let written = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.mode)
            .open(temp)?;
        fill(&mut file)?;
        // The umask may have cleared bits at create time; set the exact mode.
        file.set_permissions(fs::Permissions::from_mode(mode.mode))?;
        if let Some((uid, gid)) = mode.owner {
            chown_if_needed(&file, uid, gid)?;
        }
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        Ok(())
    };
    written().map_err(io)
}

fn chown_if_needed(file: &File, uid: u32, gid: u32) -> std::io::Result<()> {
    let meta = file.metadata()?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(uid), Some(gid))
}

fn rename(from: &Path, target: &Path, durability: Durability) -> Result<(), AtomicError> {
    fs::rename(from, target).map_err(AtomicError::at(target))?;
    match durability {
        Durability::Durable => sync_dir(parent_dir(target)),
        Durability::RenameOnly => Ok(()),
    }
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
        "{TEMP_PREFIX}{}-{nanos}-{n}{TEMP_SUFFIX}",
        std::process::id()
    ))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<(), AtomicError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(AtomicError::at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn replaces_content_keeps_requested_mode_and_leaves_no_temp() {
        for durability in [Durability::Durable, Durability::RenameOnly] {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("10-net.conflist");
            fs::write(&target, "old").unwrap();
            fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
            let mode = FileMode::of(&fs::metadata(&target).unwrap());
            write_atomic(&target, b"new", mode, durability).unwrap();
            assert_eq!(fs::read_to_string(&target).unwrap(), "new");
            assert_eq!(mode_of(&target), 0o600, "{durability:?}");
            assert_eq!(names_in(dir.path()), ["10-net.conflist"], "{durability:?}");
        }
    }

    #[test]
    fn mode_of_target_is_kept_and_a_new_file_gets_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cni-stats.json");
        let fresh = FileMode::of_target_or(&target, 0o640).unwrap();
        assert_eq!(fresh, FileMode::new(0o640));
        write_atomic(&target, b"1", fresh, Durability::RenameOnly).unwrap();
        assert_eq!(mode_of(&target), 0o640);
        fs::set_permissions(&target, fs::Permissions::from_mode(0o604)).unwrap();
        let kept = FileMode::of_target_or(&target, 0o640).unwrap();
        write_atomic(&target, b"2", kept, Durability::RenameOnly).unwrap();
        assert_eq!(mode_of(&target), 0o604);
        assert_eq!(fs::read_to_string(&target).unwrap(), "2");
    }

    #[test]
    fn failed_write_leaves_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing-subdir").join("x.conflist");
        let err =
            write_atomic(&target, b"new", FileMode::new(0o644), Durability::Durable).unwrap_err();
        assert!(
            err.path.starts_with(dir.path().join("missing-subdir")),
            "{err}"
        );
        assert!(!target.exists());
    }

    #[test]
    fn staged_copy_is_complete_before_commit_and_replaces_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("new-bin"), dir.path().join("bin"));
        fs::write(&source, b"\x7fELF new").unwrap();
        fs::write(&target, b"\x7fELF old").unwrap();
        let staged = stage_copy(&source, &target, FileMode::new(0o755)).unwrap();
        assert!(is_temp_file(&staged), "{}", staged.display());
        assert_eq!(fs::read(&staged).unwrap(), b"\x7fELF new");
        assert_eq!(mode_of(&staged), 0o755);
        assert_eq!(fs::read(&target).unwrap(), b"\x7fELF old");
        commit(&staged, &target).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"\x7fELF new");
        assert_eq!(names_in(dir.path()), ["bin", "new-bin"]);
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
        assert!(is_temp_file(&p), "{}", p.display());
        let name = p.file_name().unwrap().to_str().unwrap();
        for ext in [".conf", ".conflist", ".json"] {
            assert!(!name.ends_with(ext));
        }
        assert_ne!(temp_path(Path::new("/x")), p, "two calls, two names");
        assert!(!is_temp_file(Path::new(
            "/etc/cni/net.d/10-flannel.conflist"
        )));
        assert!(!is_temp_file(Path::new("/etc/cni/net.d/.other.tmp")));
    }
}
