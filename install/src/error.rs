use std::path::PathBuf;

/// Everything the installer can fail on. Each variant names the file it concerns so the log
/// line alone tells the operator what to look at.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    // The io::Error is part of the message, not a `source`, so it is printed once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not valid JSON ({msg}); left untouched, will retry")]
    Unparsable { path: PathBuf, msg: String },
    #[error("{path}: not a usable CNI config: {msg}; left untouched")]
    InvalidConfig { path: PathBuf, msg: String },
    #[error("{path}: changed while we were editing it (the primary CNI is writing it); will retry")]
    ChangedDuringEdit { path: PathBuf },
    #[error("no CNI config (.conf/.conflist/.json) in {dir} yet; waiting for the primary CNI")]
    NoConfig { dir: PathBuf },
    #[error("plugin binary {path} failed the CNI_COMMAND=VERSION check: {msg}")]
    PluginCheck { path: PathBuf, msg: String },
    #[error("{path}: cniVersion {version} is not supported by the plugin (supports {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        version: String,
        supported: String,
    },
    #[error("node teardown: {0}")]
    Teardown(#[from] node_setup::SetupError),
    #[error("file watch on {path}: {msg}")]
    Watch { path: PathBuf, msg: String },
}

/// A failed atomic write or removal is an I/O error on the file it names.
impl From<node_setup::atomic::AtomicError> for InstallError {
    fn from(e: node_setup::atomic::AtomicError) -> Self {
        InstallError::Io {
            path: e.path,
            err: e.err,
        }
    }
}

impl InstallError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        InstallError::Io {
            path: path.into(),
            err: source,
        }
    }
}
