//! The real `infermesh-control serve` process, run as a child.
//!
//! [`ControlPlaneProcess`] writes policy files into a temporary directory it
//! owns, starts `infermesh-control serve --policies DIR --listen 127.0.0.1:0
//! --admin 127.0.0.1:0`, waits for its `listening grpc=… admin=…` line and
//! exposes the addresses. Tests edit the files to drive it, can kill
//! it (SIGKILL, as a crash) and start it again on the same ports over the
//! same directory, and read its admin `/proxies` and `/policy`.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::START_TIMEOUT;
use crate::HttpClient;

/// The `infermesh-control` binary: `$INFERMESH_CONTROL_BIN`, or the one next
/// to this test executable, built with cargo once when it is missing.
pub fn control_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            crate::process::find_or_build(
                "infermesh-control",
                "infermesh-control",
                "INFERMESH_CONTROL_BIN",
            )
        })
        .clone()
}

/// A running `infermesh-control serve`.
pub struct ControlPlaneProcess {
    child: Child,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    wrap: Vec<String>,
    /// The policy gRPC server proxies subscribe to.
    pub grpc: SocketAddr,
    /// `/live`, `/ready`, `/metrics`, `/proxies`, `/policy`.
    pub admin: SocketAddr,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: bool,
}

impl ControlPlaneProcess {
    /// Writes `files` (name, contents) into a fresh policy directory and
    /// serves it.
    pub fn start(files: &[(&str, &str)]) -> Self {
        Self::start_with(files, &[])
    }

    /// [`ControlPlaneProcess::start`] with more arguments after `serve …`.
    pub fn start_with(files: &[(&str, &str)], extra_args: &[&str]) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_wrapped(files, extra_args, &[], any)
    }

    /// [`ControlPlaneProcess::start_with`] run under `wrap` (a command that
    /// execs its arguments, such as `ip netns exec NS`, so the child's pid
    /// is the control plane's), both servers listening on `listen` (port 0:
    /// any free port).
    pub fn start_wrapped(
        files: &[(&str, &str)],
        extra_args: &[&str],
        wrap: &[&str],
        listen: SocketAddr,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("infermesh-policies-")
            .tempdir()
            .expect("temporary policy directory");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).expect("write policy file");
        }
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        let wrap: Vec<String> = wrap.iter().map(|a| a.to_string()).collect();
        let (child, grpc, admin, stderr) = spawn(dir.path(), listen, listen, &extra_args, &wrap);
        Self {
            child,
            dir,
            extra_args,
            wrap,
            grpc,
            admin,
            stderr,
            exited: false,
        }
    }

    /// `http://<grpc>`, the proxies' `--control-plane`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://<admin>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The watched policy directory.
    pub fn policy_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces a policy file atomically: writes a hidden temporary file
    /// beside it and renames it over the old one, as most editors, `kubectl
    /// cp` and ConfigMap volumes do, so the control plane sees the old
    /// contents or the new ones, never a half-written file.
    pub fn write(&self, name: &str, contents: &str) {
        let temp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&temp, contents).expect("write temporary policy file");
        std::fs::rename(&temp, self.dir.path().join(name)).expect("rename policy file");
    }

    /// Rewrites a policy file in place (truncate, then write), as `echo >`
    /// and some editors do.
    pub fn write_in_place(&self, name: &str, contents: &str) {
        std::fs::write(self.dir.path().join(name), contents).expect("write policy file");
    }

    /// Removes a policy file.
    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove policy file");
    }

    /// Everything the control plane wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
    }

    /// Starts the control plane again on the same ports over the same policy
    /// directory (after [`ControlPlaneProcess::kill`]).
    pub fn restart(&mut self) {
        if !self.exited {
            self.kill();
        }
        // The old process's sockets are gone with it; the ports can be bound
        // again at once, but allow for a slow kernel.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match try_spawn(
                self.dir.path(),
                self.grpc,
                self.admin,
                &self.extra_args,
                &self.wrap,
            ) {
                Ok((child, grpc, admin, stderr)) => {
                    assert_eq!((grpc, admin), (self.grpc, self.admin));
                    self.child = child;
                    self.stderr = stderr;
                    self.exited = false;
                    return;
                }
                Err(error) if Instant::now() < deadline => {
                    eprintln!("restarting infermesh-control: {error}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => panic!("cannot restart infermesh-control: {error}"),
            }
        }
    }

    /// `GET /proxies` as JSON.
    pub async fn proxies(&self) -> Value {
        self.get_json("/proxies").await
    }

    /// `GET /policy` as JSON.
    pub async fn policy(&self) -> Value {
        self.get_json("/policy").await
    }

    async fn get_json(&self, path: &str) -> Value {
        let reply = HttpClient::http1()
            .get(&format!("{}{path}", self.admin_url()))
            .await;
        assert_eq!(
            reply.status,
            200,
            "GET {path} on the control plane: {}",
            reply.text()
        );
        reply.json()
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let stderr = self.stderr();
            let start = stderr.len().saturating_sub(16 * 1024);
            let start = (start..stderr.len())
                .find(|&i| stderr.is_char_boundary(i))
                .unwrap_or(stderr.len());
            eprintln!(
                "--- infermesh-control stderr (last {} bytes)\n{}",
                stderr.len() - start,
                &stderr[start..]
            );
        }
    }
}

type Spawned = (Child, SocketAddr, SocketAddr, Arc<Mutex<Vec<u8>>>);

fn spawn(
    dir: &Path,
    grpc: SocketAddr,
    admin: SocketAddr,
    extra: &[String],
    wrap: &[String],
) -> Spawned {
    try_spawn(dir, grpc, admin, extra, wrap).unwrap_or_else(|error| panic!("{error}"))
}

/// Starts `infermesh-control serve` and waits for its `listening` line.
fn try_spawn(
    dir: &Path,
    grpc: SocketAddr,
    admin: SocketAddr,
    extra: &[String],
    wrap: &[String],
) -> Result<Spawned, String> {
    let binary = control_binary();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(&binary);
            command
        }
        None => Command::new(&binary),
    };
    let mut child = command
        .arg("serve")
        .arg("--policies")
        .arg(dir)
        .arg("--listen")
        .arg(grpc.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = child.stderr.take().expect("piped stderr");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    });
    let stdout = child.stdout.take().expect("piped stdout");
    let (line_tx, line_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("listening ") {
                let _ = line_tx.send(line);
            }
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let line = loop {
        match line_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => break line,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Ok(Some(status)) = child.try_wait() {
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "infermesh-control exited with {status} before listening\n--- stderr\n{}",
                        String::from_utf8_lossy(&stderr.lock().unwrap())
                    ));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "infermesh-control printed no `listening` line within {START_TIMEOUT:?}\n--- stderr\n{}",
                    String::from_utf8_lossy(&stderr.lock().unwrap())
                ));
            }
        }
    };
    let (grpc, admin) = parse_listening(&line).map_err(|e| {
        let _ = child.kill();
        format!("cannot parse the control plane's listening line {line:?}: {e}")
    })?;
    Ok((child, grpc, admin, stderr))
}

/// Parses `listening grpc=IP:PORT admin=IP:PORT` (later fields are ignored).
pub fn parse_listening(line: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let fields = line
        .strip_prefix("listening ")
        .ok_or("no `listening ` prefix")?;
    let find = |key: &str| -> Result<SocketAddr, String> {
        let value = fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .ok_or(format!("no {key}="))?;
        value.parse().map_err(|e| format!("{key}: {e}"))
    };
    Ok((find("grpc")?, find("admin")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_parses() {
        let (grpc, admin) =
            parse_listening("listening grpc=127.0.0.1:4000 admin=127.0.0.1:4001").unwrap();
        assert_eq!(grpc.port(), 4000);
        assert_eq!(admin.port(), 4001);
        assert!(parse_listening("listening admin=127.0.0.1:1").is_err());
    }
}
