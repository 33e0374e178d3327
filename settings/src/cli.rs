//! Command-line parsing that names the environment variable a bad value came from: clap
//! reports a bad `NODE_LOCAL_DNS_THREADS=0` as `--threads`, which the operator never typed.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Command, Parser};

/// `T::parse()`, with errors about a value from the environment naming the variable.
pub fn parse<T: Parser>() -> T {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match T::try_parse_from(&argv) {
        Ok(parsed) => parsed,
        Err(e) => name_env_source(e, &T::command(), &argv).exit(),
    }
}

/// When `err` is about a bad value of a flag that is absent from `argv` (so the value came
/// from its variable: defaults are valid), a one-line error naming the variable, the value and
/// what was expected; else `err`.
pub fn name_env_source(err: clap::Error, cmd: &Command, argv: &[OsString]) -> clap::Error {
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return err;
    }
    let Some(ContextValue::String(shown)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    let Some(long) = shown
        .split_whitespace()
        .next()
        .and_then(|f| f.strip_prefix("--"))
    else {
        return err;
    };
    let Some(variable) = find_env(cmd, long) else {
        return err;
    };
    let on_command_line = argv.iter().skip(1).any(|a| {
        a.to_str().is_some_and(|a| {
            a.strip_prefix("--")
                .is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
        })
    });
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    if on_command_line {
        return err;
    }
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!("{variable} {value:?}: {}\n", reason(&err)),
    )
}

/// The variable of the flag `--long` in `cmd` or any of its subcommands.
fn find_env(cmd: &Command, long: &str) -> Option<String> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .or_else(|| cmd.get_subcommands().find_map(|sub| find_env(sub, long)))
}

/// What clap says was expected: the value parser's message, or the accepted names.
fn reason(err: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(err) {
        return source.to_string();
    }
    match err.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(names)) => format!("expected one of {}", names.join(", ")),
        _ => "invalid value".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, env = "TEST_CLI_COUNT", value_parser = clap::value_parser!(u8).range(1..))]
        count: Option<u8>,
        #[arg(long, env = "TEST_CLI_MODE", value_parser = ["a", "b"])]
        mode: Option<String>,
    }

    /// clap reads the process environment, which a test must not change: the value is
    /// passed on the command line and the error judged against an argv without it, as if
    /// it had come from the variable.
    fn error_for(argv: &[&str]) -> String {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let err = Cli::try_parse_from(&argv).unwrap_err();
        name_env_source(err, &Cli::command(), &argv[..1]).to_string()
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        let err = error_for(&["x", "--count", "0"]);
        assert!(err.contains("TEST_CLI_COUNT \"0\": "), "{err}");
        assert!(!err.contains("--count"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let err = error_for(&["x", "--mode", "c"]);
        assert!(
            err.contains("TEST_CLI_MODE \"c\": expected one of a, b"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_on_the_command_line_keeps_claps_message() {
        let argv: Vec<OsString> = ["x", "--count=0"].iter().map(OsString::from).collect();
        let err = Cli::try_parse_from(&argv).unwrap_err();
        let text = name_env_source(err, &Cli::command(), &argv).to_string();
        assert!(text.contains("--count"), "{text}");
        // Not a value error at all: unchanged.
        let err = Cli::try_parse_from(["x", "--nope"]).unwrap_err();
        let text = name_env_source(err, &Cli::command(), &[]).to_string();
        assert!(text.contains("--nope"), "{text}");
    }
}
