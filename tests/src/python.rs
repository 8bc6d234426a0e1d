//! Running the Python clients in `tests/python/` as subprocesses.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The interpreter: `$INFERMESH_PYTHON`, else `<repo>/.venv/bin/python`
/// (made by `scripts/setup.sh`), else `python3`.
pub fn interpreter() -> PathBuf {
    if let Some(path) = std::env::var_os("INFERMESH_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = crate::repo_root().join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// Whether `INFERMESH_SKIP_PYTHON` asks to skip the Python client tests.
pub fn skipped() -> bool {
    std::env::var_os("INFERMESH_SKIP_PYTHON").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Checks that the interpreter can import `modules`; panics with the set-up
/// command when it cannot, so a missing package never passes as a skip.
pub fn require_modules(modules: &[&str]) {
    let python = interpreter();
    let imports = modules.join(", ");
    let output = Command::new(&python)
        .args(["-c", &format!("import {imports}")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run scripts/setup.sh", python.display()));
    assert!(
        output.status.success(),
        "{} cannot import {imports}: {}\nrun scripts/setup.sh (or set INFERMESH_PYTHON, or INFERMESH_SKIP_PYTHON=1 to skip)",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `tests/python/<script>` with `args`; kills it after `timeout`.
pub fn run_script(script: &str, args: &[&str], timeout: Duration) -> Output {
    let path = crate::repo_root().join("tests/python").join(script);
    let mut command = Command::new(interpreter());
    // Loopback traffic must not go through an HTTP proxy from the environment.
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "grpc_proxy",
    ] {
        command.env_remove(var);
    }
    let child = command
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let pid = child.id();
    let started = Instant::now();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        if started.elapsed() > timeout {
            // SAFETY: kill(2) on the child we started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = waiter
        .join()
        .expect("waiter thread")
        .expect("wait for python");
    assert!(
        started.elapsed() <= timeout + Duration::from_secs(1),
        "{script} was killed after {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
