//! The CNI conf dir: which file the runtime uses, and putting our entry into it (or taking it
//! out of every file) without ever making a file worse.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::InstallError;
use crate::atomic::{self, Durability, FileMode};
use crate::conflist::{self, PluginEntry, Shape};

/// Extensions libcni (containerd) and ocicni (CRI-O) load, in that order of preference.
pub const CNI_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// A parsed config file, with the bytes it was parsed from so a write can detect that someone
/// else changed the file in between.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub raw: Vec<u8>,
    pub doc: Value,
}

/// The file the runtime uses, plus the files before it that had to be skipped.
#[derive(Debug)]
pub struct Selection {
    pub file: Loaded,
    pub shape: Shape,
    pub skipped: Vec<InstallError>,
}

/// What `ensure_conf_dir` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChange {
    Unchanged(PathBuf),
    Written(PathBuf),
    /// A single-plugin `.conf` became a `.conflist` with our entry; the `.conf` was removed.
    Converted {
        from: PathBuf,
        to: PathBuf,
    },
}

#[derive(Debug)]
pub struct EnsureOutcome {
    pub change: ConfChange,
    /// Unusable files sorted before the selected one (logged, left untouched).
    pub skipped: Vec<InstallError>,
}

#[derive(Debug, Default)]
pub struct RemoveOutcome {
    pub edited: Vec<PathBuf>,
    pub removed_entries: Vec<Value>,
    pub skipped: Vec<InstallError>,
}

/// Config files in `dir`, sorted by name as libcni sorts them.
pub fn candidates(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut paths = Vec::new();
    for dirent in fs::read_dir(dir).map_err(|e| InstallError::io(dir, e))? {
        let path = dirent.map_err(|e| InstallError::io(dir, e))?.path();
        let has_cni_ext = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CNI_EXTENSIONS.contains(&e));
        if has_cni_ext && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Reads and parses one file. Empty or truncated files (a primary CNI mid-write) are errors.
pub fn load(path: &Path) -> Result<Loaded, InstallError> {
    let raw = fs::read(path).map_err(|e| InstallError::io(path, e))?;
    let doc = serde_json::from_slice(&raw).map_err(|e| InstallError::Unparsable {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(Loaded {
        path: path.to_path_buf(),
        raw,
        doc,
    })
}

/// The lexicographically first config that parses and is not a meta-plugin's (multus) own.
pub fn select_primary(dir: &Path) -> Result<Selection, InstallError> {
    let mut skipped = Vec::new();
    for path in candidates(dir)? {
        let file = match load(&path) {
            Ok(file) => file,
            Err(e) => {
                skipped.push(e);
                continue;
            }
        };
        if conflist::is_delegating(&file.doc) {
            continue;
        }
        match conflist::shape_of(&file.doc) {
            Ok(shape) => {
                return Ok(Selection {
                    file,
                    shape,
                    skipped,
                });
            }
            Err(e) => skipped.push(InstallError::InvalidConfig {
                path,
                msg: e.to_string(),
            }),
        }
    }
    Err(match skipped.into_iter().next() {
        Some(first_problem) => first_problem,
        None => InstallError::NoConfig {
            dir: dir.to_path_buf(),
        },
    })
}

/// Puts our entry into the runtime's config, writing only when the content changes.
/// `supported` is what the plugin's VERSION reported: a conflist version outside it is refused.
pub fn ensure_conf_dir(
    dir: &Path,
    entry: &PluginEntry,
    supported: &[String],
) -> Result<EnsureOutcome, InstallError> {
    let Selection {
        file,
        shape,
        skipped,
    } = select_primary(dir)?;
    check_version_supported(&file, supported)?;
    let change = match shape {
        Shape::List => ensure_in_list(&file, entry)?,
        Shape::Single => convert_single(&file, entry)?,
    };
    Ok(EnsureOutcome { change, skipped })
}

/// Whether the runtime's config already holds our entry as desired (changes nothing).
/// `Ok(None)` when it does; `Ok(Some(reason))` when an install round would still write.
pub fn check_conf_dir(dir: &Path, entry: &PluginEntry) -> Result<Option<String>, InstallError> {
    let Selection { file, shape, .. } = select_primary(dir)?;
    let path = file.path.display();
    if shape == Shape::Single {
        return Ok(Some(format!(
            "{path} is a single-plugin config, not yet converted"
        )));
    }
    let mut doc = file.doc;
    match conflist::ensure_entry(&mut doc, entry) {
        Ok(false) => Ok(None),
        Ok(true) => Ok(Some(format!(
            "{path} lacks our entry or has an outdated one"
        ))),
        Err(e) => Err(invalid(&file.path, e)),
    }
}

/// Takes our entry out of every config file that has one. Unparsable files are reported and
/// left alone; a failed write is an error (the caller must then keep the binary).
pub fn remove_from_conf_dir(dir: &Path) -> Result<RemoveOutcome, InstallError> {
    let mut outcome = RemoveOutcome::default();
    for path in candidates(dir)? {
        let file = match load(&path) {
            Ok(file) => file,
            Err(e) => {
                outcome.skipped.push(e);
                continue;
            }
        };
        if conflist::find_entry(&file.doc).is_none() {
            continue;
        }
        let mut doc = file.doc.clone();
        let removed = conflist::remove_entries(&mut doc).map_err(|e| invalid(&path, e))?;
        write_if_unchanged_since_read(&file, &path, &doc)?;
        outcome.removed_entries.extend(removed);
        outcome.edited.push(path);
    }
    Ok(outcome)
}

fn check_version_supported(file: &Loaded, supported: &[String]) -> Result<(), InstallError> {
    match conflist::cni_version(&file.doc) {
        Some(v) if !supported.is_empty() && !supported.iter().any(|s| s == v) => {
            Err(InstallError::UnsupportedVersion {
                path: file.path.clone(),
                version: v.to_string(),
                supported: supported.join(" "),
            })
        }
        _ => Ok(()),
    }
}

fn ensure_in_list(file: &Loaded, entry: &PluginEntry) -> Result<ConfChange, InstallError> {
    let mut doc = file.doc.clone();
    if !conflist::ensure_entry(&mut doc, entry).map_err(|e| invalid(&file.path, e))? {
        return Ok(ConfChange::Unchanged(file.path.clone()));
    }
    write_if_unchanged_since_read(file, &file.path, &doc)?;
    Ok(ConfChange::Written(file.path.clone()))
}

/// libcni prefers `X.conf` over `X.conflist` (it sorts first), so the `.conf` is removed once
/// the `.conflist` is safely in place.
fn convert_single(file: &Loaded, entry: &PluginEntry) -> Result<ConfChange, InstallError> {
    let mut doc = conflist::single_to_list(&file.doc).map_err(|e| invalid(&file.path, e))?;
    conflist::ensure_entry(&mut doc, entry).map_err(|e| invalid(&file.path, e))?;
    let to = file.path.with_extension("conflist");
    let mode = current_mode(&file.path)?;
    ensure_unchanged_since_read(file)?;
    atomic::write_atomic(
        &to,
        conflist::render(&doc).as_bytes(),
        mode,
        Durability::Durable,
    )?;
    atomic::remove_durably(&file.path)?;
    Ok(ConfChange::Converted {
        from: file.path.clone(),
        to,
    })
}

/// Writes `doc` over `target` (the file `file` was read from, or what its symlink points to)
/// unless the file changed since it was read: then the primary CNI is writing it and the next
/// round picks up its version.
fn write_if_unchanged_since_read(
    file: &Loaded,
    target: &Path,
    doc: &Value,
) -> Result<(), InstallError> {
    let target = resolve_symlink(target)?;
    let mode = current_mode(&target)?;
    ensure_unchanged_since_read(file)?;
    atomic::write_atomic(
        &target,
        conflist::render(doc).as_bytes(),
        mode,
        Durability::Durable,
    )?;
    Ok(())
}

fn ensure_unchanged_since_read(file: &Loaded) -> Result<(), InstallError> {
    let now = fs::read(&file.path).map_err(|e| InstallError::io(&file.path, e))?;
    if now == file.raw {
        Ok(())
    } else {
        Err(InstallError::ChangedDuringEdit {
            path: file.path.clone(),
        })
    }
}

/// Writing through a symlink must replace the file it points to, not the link.
fn resolve_symlink(path: &Path) -> Result<PathBuf, InstallError> {
    let meta = fs::symlink_metadata(path).map_err(|e| InstallError::io(path, e))?;
    if meta.file_type().is_symlink() {
        fs::canonicalize(path).map_err(|e| InstallError::io(path, e))
    } else {
        Ok(path.to_path_buf())
    }
}

fn current_mode(path: &Path) -> Result<FileMode, InstallError> {
    fs::metadata(path)
        .map(|m| FileMode::of(&m))
        .map_err(|e| InstallError::io(path, e))
}

fn invalid(path: &Path, e: conflist::ShapeError) -> InstallError {
    InstallError::InvalidConfig {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> PluginEntry {
        PluginEntry::new(
            vec!["10.96.0.10".parse().unwrap()],
            vec!["169.254.20.10".parse().unwrap()],
        )
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#;

    #[test]
    fn first_parsable_non_multus_file_is_selected() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("00-multus.conf"),
            r#"{"type":"multus","name":"m"}"#,
        )
        .unwrap();
        fs::write(dir.path().join("05-broken.conflist"), "{\"cniVersion\":").unwrap();
        fs::write(dir.path().join("10-net.conflist"), BRIDGE).unwrap();
        fs::write(dir.path().join("20-other.conflist"), BRIDGE).unwrap();
        fs::write(dir.path().join("01-ignored.txt"), BRIDGE).unwrap();
        let sel = select_primary(dir.path()).unwrap();
        assert_eq!(sel.file.path, dir.path().join("10-net.conflist"));
        assert_eq!(sel.skipped.len(), 1);
        assert!(matches!(sel.skipped[0], InstallError::Unparsable { .. }));
    }

    #[test]
    fn empty_dir_reports_no_config_and_corrupt_only_dir_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            select_primary(dir.path()),
            Err(InstallError::NoConfig { .. })
        ));
        fs::write(dir.path().join("10-net.conflist"), "").unwrap();
        assert!(matches!(
            select_primary(dir.path()),
            Err(InstallError::Unparsable { .. })
        ));
    }

    #[test]
    fn unsupported_cni_version_is_refused_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-net.conflist");
        fs::write(&path, BRIDGE).unwrap();
        let err = ensure_conf_dir(dir.path(), &entry(), &["0.4.0".to_string()]).unwrap_err();
        assert!(matches!(err, InstallError::UnsupportedVersion { .. }));
        assert_eq!(fs::read_to_string(&path).unwrap(), BRIDGE);
    }

    #[test]
    fn ensure_writes_once_then_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-net.conflist");
        fs::write(&path, BRIDGE).unwrap();
        let first = ensure_conf_dir(dir.path(), &entry(), &[]).unwrap();
        assert_eq!(first.change, ConfChange::Written(path.clone()));
        let second = ensure_conf_dir(dir.path(), &entry(), &[]).unwrap();
        assert_eq!(second.change, ConfChange::Unchanged(path));
    }

    #[test]
    fn symlinked_config_is_edited_through_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.txt");
        fs::write(&real, BRIDGE).unwrap();
        let link = dir.path().join("10-net.conflist");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        ensure_conf_dir(dir.path(), &entry(), &[]).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            fs::read_to_string(&real)
                .unwrap()
                .contains("node-local-dns")
        );
    }
}
