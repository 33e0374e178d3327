//! The named settings (iptables backend, socket match) and their one spelling: the plugin's
//! conflist entry, the resolver's and installer's flags and the ConfigMap all parse them
//! through the tables here, so the three programs cannot drift apart.

/// Which iptables implementation to program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// Whichever the node's kube-proxy uses (more `KUBE-` chains; nft when tied).
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// How the PREROUTING rules match the daemon's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketMatch {
    /// `-m socket`: ignores wildcard (0.0.0.0:53) listeners (docs/design-facts.md §1).
    #[default]
    Safe,
    /// The Deckhouse module's `-m socket --nowildcard` (documented hazard).
    NoWildcard,
}

/// A setting's value is not one of the names it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {}", quoted(allowed))]
pub struct UnknownSetting {
    pub value: String,
    pub allowed: &'static [&'static str],
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A setting spelled by name. One table per setting, so the three programs cannot drift apart.
pub trait Setting: std::str::FromStr<Err = UnknownSetting> + Copy + Send + Sync + 'static {
    /// Every accepted name, the default first.
    const NAMES: &'static [&'static str];
}

/// clap parser for a setting (feature `clap`): `--help` lists its names.
#[cfg(feature = "clap")]
pub fn clap_parser<T: Setting>() -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(T::NAMES.iter().copied()).try_map(|s| s.parse::<T>())
}

macro_rules! named_setting {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl Setting for $ty {
            const NAMES: &'static [&'static str] = &[$($name),+];
        }

        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownSetting;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownSetting {
                        value: s.to_string(),
                        allowed: <Self as Setting>::NAMES,
                    }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_setting!(IptablesBackend { Auto => "auto", Legacy => "legacy", Nft => "nft" });
named_setting!(SocketMatch { Safe => "safe", NoWildcard => "nowildcard" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_from_the_names_they_print_as_and_nothing_else() {
        for b in [
            IptablesBackend::Auto,
            IptablesBackend::Legacy,
            IptablesBackend::Nft,
        ] {
            assert_eq!(b.as_str().parse::<IptablesBackend>(), Ok(b));
            assert!(<IptablesBackend as Setting>::NAMES.contains(&b.as_str()));
        }
        for m in [SocketMatch::Safe, SocketMatch::NoWildcard] {
            assert_eq!(m.to_string().parse::<SocketMatch>(), Ok(m));
        }
        let err = "NoWildcard".parse::<SocketMatch>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#""NoWildcard" is not one of "safe", "nowildcard""#
        );
        assert!("".parse::<IptablesBackend>().is_err());
    }

    #[test]
    fn the_default_is_listed_first() {
        assert_eq!(
            <IptablesBackend as Setting>::NAMES[0],
            IptablesBackend::default().as_str()
        );
        assert_eq!(
            <SocketMatch as Setting>::NAMES[0],
            SocketMatch::default().as_str()
        );
    }
}
