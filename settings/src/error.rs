//! The errors of every setting: each names the flag or environment variable and the value.

/// A string that does not follow a grammar; the caller knows which flag or variable it came
/// from (clap prints it after the flag's name, [`SettingsError::invalid`] after the variable's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

impl GrammarError {
    pub fn expected(what: &str) -> Self {
        Self(format!("expected {what}"))
    }
}

/// A setting the program cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The value does not parse.
    #[error("{name} {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// The value parses but is outside what the program can honour, or contradicts another.
    #[error("{name} {value}: must be {bound}")]
    Bound {
        name: &'static str,
        value: String,
        bound: String,
    },
    /// The ClusterIP is needed and none of its sources has one.
    #[error(
        "no kube-dns ClusterIP for {needed_for}: give --cluster-dns, KUBE_DNS_SVC_IP or KUBE_DNS_SERVICE_HOST"
    )]
    NoClusterIp { needed_for: &'static str },
}

impl SettingsError {
    pub fn invalid(name: &'static str, value: &str, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            name,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn bound(
        name: &'static str,
        value: impl std::fmt::Display,
        bound: impl std::fmt::Display,
    ) -> Self {
        Self::Bound {
            name,
            value: value.to_string(),
            bound: bound.to_string(),
        }
    }

    /// The flag or variable the error is about (`None` when it is about several sources).
    pub fn name(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { name, .. } | Self::Bound { name, .. } => Some(name),
            Self::NoClusterIp { .. } => None,
        }
    }
}
