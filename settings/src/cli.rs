//! Command-line parsing that names the environment variable a bad value came from (clap
//! reports a bad `NODE_LOCAL_DNS_THREADS=0` as `--threads`, which the operator never typed),
//! and reports it in the log format asked for, even though parsing did not finish.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Command, Parser, ValueEnum};

use crate::env::{Env, ProcessEnv};
use crate::logging::{LogFormat, init_logging, log_fatal};

/// The id of the log format flag (`log_format: LogFormat` in the programs' `Args`).
const LOG_FORMAT_ID: &str = "log_format";

/// `T::parse()`, with errors about a value from the environment naming the variable, and
/// logged as one JSON event when `--log-format json` (or its variable) was asked for: in a
/// cluster a bad ConfigMap value is such an error, and the log pipeline expects JSON.
pub fn parse<T: Parser>() -> T {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match T::try_parse_from(&argv) {
        Ok(parsed) => parsed,
        Err(e) => {
            let cmd = T::command();
            let e = name_env_source(e, &cmd, &argv);
            if e.use_stderr() && requested_log_format(&cmd, &argv, &ProcessEnv) == LogFormat::Json {
                init_logging(LogFormat::Json);
                log_fatal(&first_line(&e.to_string()));
                std::process::exit(e.exit_code());
            }
            e.exit()
        }
    }
}

/// The log format `argv` or the flag's variable asks for, read before parsing finished;
/// text when neither says (or says something unknown: that is the error being reported).
pub fn requested_log_format(cmd: &Command, argv: &[OsString], env: &dyn Env) -> LogFormat {
    let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == LOG_FORMAT_ID) else {
        return LogFormat::Text;
    };
    let flag = arg.get_long().map(|l| format!("--{l}"));
    let mut from_argv = None;
    let mut words = argv.iter().skip(1).filter_map(|a| a.to_str());
    while let Some(word) = words.next() {
        let Some(flag) = flag.as_deref() else { break };
        if word == flag {
            from_argv = words.next().map(str::to_string);
        } else if let Some(v) = word.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            from_argv = Some(v.to_string());
        }
    }
    let from_env = || {
        arg.get_env()
            .and_then(|name| env.var(&name.to_string_lossy()))
    };
    from_argv
        .or_else(from_env)
        .and_then(|v| LogFormat::from_str(v.trim(), true).ok())
        .unwrap_or_default()
}

/// clap's message without its `error: ` prefix and the usage hint below it.
fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
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
        #[arg(long, env = "TEST_CLI_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
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
    fn the_log_format_is_known_before_parsing_finishes() {
        let format = |argv: &[&str], env: &[(&str, &str)]| {
            let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
            requested_log_format(
                &Cli::command(),
                &argv,
                &crate::env::MapEnv::new(env.iter().copied()),
            )
        };
        assert_eq!(format(&["x"], &[]), LogFormat::Text);
        assert_eq!(
            format(&["x", "--log-format", "json", "--count", "0"], &[]),
            LogFormat::Json
        );
        assert_eq!(format(&["x", "--log-format=json"], &[]), LogFormat::Json);
        assert_eq!(
            format(&["x"], &[("TEST_CLI_LOG_FORMAT", "json")]),
            LogFormat::Json
        );
        // The command line wins over the variable, as in clap.
        assert_eq!(
            format(
                &["x", "--log-format", "text"],
                &[("TEST_CLI_LOG_FORMAT", "json")]
            ),
            LogFormat::Text
        );
        assert_eq!(format(&["x", "--log-format", "yaml"], &[]), LogFormat::Text);
        assert_eq!(
            first_line(
                "error: invalid value 'x' for '--count'\n\nFor more information, try '--help'.\n"
            ),
            "invalid value 'x' for '--count'"
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
