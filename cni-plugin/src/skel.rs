//! The process boundary: `CNI_*` environment, stdin and stdout are passed in, so tests drive
//! every command with a map and a buffer. Validates the environment per command and the
//! version before any plugin logic runs, and turns every failure into a spec-coded error.

use std::io::Write;

use crate::config::{self, PluginConfig};
use crate::error::{CniError, INCOMPATIBLE_VERSION, INVALID_ENV, IO_FAILURE};
use crate::plugin::{self, NodeOps};

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    /// Variables a runtime must set for this command (CNI spec, as libcni's skel checks them).
    fn required_env(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            _ => &[],
        }
    }
}

/// Runs one plugin invocation. On error nothing has been written to `stdout`; `main` prints
/// the error JSON there.
pub fn run(
    getenv: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    stdout: &mut dyn Write,
    node: &dyn NodeOps,
) -> Result<(), CniError> {
    let name = getenv("CNI_COMMAND").unwrap_or_default();
    let command = Command::parse(&name).ok_or_else(|| {
        CniError::new(
            INVALID_ENV,
            format!("CNI_COMMAND {name:?} is not a CNI command"),
        )
    })?;
    match command {
        // DEL never touches node state (the node's other pods still need it) and must
        // succeed in every case: no prevResult, no netns, twice, unknown container.
        // STATUS must not fail for our problems: a failing STATUS marks the node NotReady.
        Command::Del | Command::Status | Command::Gc => Ok(()),
        Command::Version => print(stdout, &version_json(stdin)),
        Command::Add | Command::Check => {
            check_env(command, getenv)?;
            let cfg = parse_versioned(command, stdin)?;
            crate::logging::init(&cfg.log_file);
            let out = match command {
                Command::Add => plugin::add(&cfg, node)?,
                _ => plugin::check(&cfg, node).map(|()| String::new())?,
            };
            print(stdout, &out).map_err(|e| e.with_version(&cfg.cni_version))
        }
    }
}

fn check_env(command: Command, getenv: &dyn Fn(&str) -> Option<String>) -> Result<(), CniError> {
    let missing: Vec<&str> = command
        .required_env()
        .iter()
        .copied()
        .filter(|k| getenv(k).is_none_or(|v| v.is_empty()))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            INVALID_ENV,
            format!(
                "required environment variables missing: {}",
                missing.join(", ")
            ),
        ))
    }
}

/// Checks the version first (an unknown version may mean an unknown config layout), then
/// parses the config. CHECK exists only from 0.4.0 on.
fn parse_versioned(command: Command, stdin: &[u8]) -> Result<PluginConfig, CniError> {
    let version = config::peek_version(stdin);
    if let Some(v) = &version
        && !SUPPORTED_VERSIONS.contains(&v.as_str())
    {
        return Err(unsupported(v));
    }
    let err_version = version.as_deref().unwrap_or(LATEST_VERSION);
    let cfg = config::parse(stdin).map_err(|e| e.with_version(err_version))?;
    if command == Command::Check && matches!(cfg.cni_version.as_str(), "0.3.0" | "0.3.1") {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!("CHECK is not defined for cniVersion {}", cfg.cni_version),
        )
        .with_version(&cfg.cni_version));
    }
    Ok(cfg)
}

fn unsupported(version: &str) -> CniError {
    CniError::new(
        INCOMPATIBLE_VERSION,
        format!("cniVersion {version:?} is not supported"),
    )
    .with_details(format!(
        "supported versions: {}",
        SUPPORTED_VERSIONS.join(", ")
    ))
}

/// VERSION answers with the caller's version when it is one we speak.
fn version_json(stdin: &[u8]) -> String {
    let version = config::peek_version(stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    serde_json::json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

fn print(stdout: &mut dyn Write, text: &str) -> Result<(), CniError> {
    if text.is_empty() {
        return Ok(());
    }
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| CniError::new(IO_FAILURE, format!("writing the result: {e}")))
}
