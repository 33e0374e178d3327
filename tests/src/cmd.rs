//! Running the system tools the simulated node is built from (ip, iptables, knotd, podman, ctr).

use std::ffi::OsStr;
use std::process::{Command, Output};

use crate::HarnessError;

/// Runs `program args…`, failing with its stderr when it exits non-zero. Returns stdout.
pub fn run<I, S>(program: &str, args: I) -> Result<String, HarnessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    output_of(&mut cmd)
}

/// Runs a prepared command, failing with its stderr when it exits non-zero. Returns stdout.
pub fn output_of(cmd: &mut Command) -> Result<String, HarnessError> {
    let described = describe(cmd);
    let out: Output = cmd.output().map_err(|source| HarnessError::Spawn {
        command: described.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(HarnessError::CommandFailed {
            command: described,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program arg arg…` for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Sends SIGKILL to one process we started and reaps it. Errors are ignored: the process may
/// already be gone, which is the state we want.
pub fn kill_child(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends a signal to one PID we started (never by name).
pub fn signal_pid(pid: i32, sig: nix::sys::signal::Signal) -> Result<(), HarnessError> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .map_err(|e| HarnessError::Other(format!("kill -{sig} {pid}: {e}")))
}

/// A child process that is killed (by its PID) and reaped when the guard is dropped, so a
/// failing test never leaves it running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_child(&mut self.0);
    }
}
