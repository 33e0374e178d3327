//! The plugin binary in the node's CNI bin dir: copied atomically, and proven to run with
//! `CNI_COMMAND=VERSION` before and after it takes the place of the old one.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::InstallError;
use crate::atomic::{self, FileMode};
use crate::conflist::PLUGIN_TYPE;

/// How long the VERSION probe may take; a plugin that hangs is as bad as one that fails.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// What `ensure_binary` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryOutcome {
    pub path: PathBuf,
    pub replaced: bool,
    /// `supportedVersions` the installed binary reported.
    pub supported_versions: Vec<String>,
}

/// Where the plugin lives in `bin_dir`: runtimes look it up by its `type`.
pub fn installed_path(bin_dir: &Path) -> PathBuf {
    bin_dir.join(PLUGIN_TYPE)
}

/// Makes `bin_dir/node-local-dns` a byte-identical copy of `source` that answers VERSION.
/// A source that fails the probe never replaces the installed binary.
pub fn ensure_binary(source: &Path, bin_dir: &Path) -> Result<BinaryOutcome, InstallError> {
    let target = installed_path(bin_dir);
    let replaced = if same_contents(source, &target)? {
        false
    } else {
        install_new(source, &target)?;
        true
    };
    let supported_versions = probe_version(&target)?;
    Ok(BinaryOutcome {
        path: target,
        replaced,
        supported_versions,
    })
}

/// Whether `bin_dir` holds an identical copy of `source` that answers VERSION (changes
/// nothing). `Ok(None)` when it does, else the reason.
pub fn check_binary(source: &Path, bin_dir: &Path) -> Result<Option<String>, InstallError> {
    let target = installed_path(bin_dir);
    if !same_contents(source, &target)? {
        return Ok(Some(format!(
            "{} is missing or differs from {}",
            target.display(),
            source.display()
        )));
    }
    Ok(probe_version(&target).err().map(|e| e.to_string()))
}

/// Removes the installed binary; a missing one is success.
pub fn remove_binary(bin_dir: &Path) -> Result<bool, InstallError> {
    Ok(atomic::remove_durably(&installed_path(bin_dir))?)
}

/// Compares in chunks so memory stays flat whatever the binary's size. A missing or unreadable
/// target simply differs.
fn same_contents(source: &Path, target: &Path) -> Result<bool, InstallError> {
    let open_source = || fs::File::open(source).map_err(|e| InstallError::io(source, e));
    let (Ok(target_meta), Ok(mut installed)) = (fs::metadata(target), fs::File::open(target))
    else {
        open_source()?;
        return Ok(false);
    };
    let source_meta = fs::metadata(source).map_err(|e| InstallError::io(source, e))?;
    if source_meta.len() != target_meta.len() {
        return Ok(false);
    }
    let mut wanted = open_source()?;
    let (mut a, mut b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut wanted, &mut a).map_err(|e| InstallError::io(source, e))?;
        let m = read_full(&mut installed, &mut b).map_err(|e| InstallError::io(target, e))?;
        if n != m || a[..n] != b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` unless the file ends first; returns the bytes read.
fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn install_new(source: &Path, target: &Path) -> Result<(), InstallError> {
    fs::create_dir_all(target.parent().unwrap_or(Path::new(".")))
        .map_err(|e| InstallError::io(target, e))?;
    let staged = atomic::stage_copy(source, target, FileMode::new(0o755))?;
    let proven = probe_version(&staged)
        .and_then(|_| atomic::commit(&staged, target).map_err(InstallError::from));
    if proven.is_err() {
        let _ = fs::remove_file(&staged);
    }
    proven
}

/// Runs `path` as the CNI runtime would for VERSION and returns its `supportedVersions`.
pub fn probe_version(path: &Path) -> Result<Vec<String>, InstallError> {
    let fail = |msg: String| InstallError::PluginCheck {
        path: path.to_path_buf(),
        msg,
    };
    let mut child = Command::new(path)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The spec passes the config's cniVersion on stdin; a plugin may ignore it.
        let _ = stdin.write_all(br#"{"cniVersion":"1.0.0"}"#);
    }
    let status = wait_bounded(&mut child).map_err(fail)?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_string(&mut out)
            .map_err(|e| fail(format!("reading stdout: {e}")))?;
    }
    if !status.success() {
        return Err(fail(format!("exit {status}, stdout {out:?}")));
    }
    parse_supported_versions(&out).map_err(fail)
}

fn wait_bounded(child: &mut std::process::Child) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {VERSION_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

fn parse_supported_versions(stdout: &str) -> Result<Vec<String>, String> {
    let doc: Value = serde_json::from_str(stdout)
        .map_err(|e| format!("stdout is not JSON ({e}): {stdout:?}"))?;
    let versions: Vec<String> = doc
        .get("supportedVersions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if versions.is_empty() {
        return Err(format!("no supportedVersions in {stdout:?}"));
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_compare_across_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&a, &big).unwrap();
        assert!(!same_contents(&a, &b).unwrap(), "missing target differs");
        fs::write(&b, &big).unwrap();
        assert!(same_contents(&a, &b).unwrap());
        let mut changed = big.clone();
        changed[150_000] ^= 1;
        fs::write(&b, &changed).unwrap();
        assert!(!same_contents(&a, &b).unwrap());
        assert!(
            same_contents(&dir.path().join("missing"), &b).is_err(),
            "missing source is an error"
        );
    }

    #[test]
    fn version_output_is_parsed() {
        let out = r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","1.1.0"]}"#;
        assert_eq!(parse_supported_versions(out).unwrap(), ["0.3.0", "1.1.0"]);
        assert!(parse_supported_versions("").is_err());
        assert!(parse_supported_versions(r#"{"cniVersion":"1.0.0"}"#).is_err());
    }
}
