//! Running the firewall tools (iptables, nft) as child processes.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// No firewall command may hang the sync loop or teardown for ever.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Where system binaries live even when `PATH` is minimal (e.g. a distroless image).
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Finds an executable by name on `PATH` or in the usual system directories.
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `program args...`, optionally feeding `stdin`, and returns its output whatever the
/// exit status. Errors only when it cannot be started or exceeds the timeout.
pub(crate) async fn run(
    program: &Path,
    args: &[String],
    stdin: Option<&str>,
) -> std::io::Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let fut = async {
        let mut child = cmd.spawn()?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await?;
            pipe.shutdown().await?;
            drop(pipe);
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(res) => res,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "{} did not finish within {COMMAND_TIMEOUT:?}",
                program.display()
            ),
        )),
    }
}

/// A one-line rendering of a command's stderr (or stdout if stderr is empty) for error messages.
pub(crate) fn output_text(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let text = if err.trim().is_empty() {
        String::from_utf8_lossy(&out.stdout)
    } else {
        err
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
