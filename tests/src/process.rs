//! The real `infermesh-proxy` binary, run as a child process.
//!
//! [`ProxyProcess`] writes the policy to a temporary directory, starts the
//! proxy with every listener on `127.0.0.1:0`, waits for its
//! `listening outbound=… inbound=… admin=…` line and exposes the addresses.
//! It captures stderr (shown when a test panics), can send SIGTERM and wait
//! for the exit status, and kills the process when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the proxy may take to print its `listening` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the policy goes and which flags the proxy gets.
#[derive(Debug, Clone, Default)]
pub struct ProxyBuilder {
    files: Vec<(String, String)>,
    config: ConfigArg,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    inbound: Option<SocketAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum ConfigArg {
    /// `--config <dir>/<first file>`.
    #[default]
    File,
    /// `--config <dir>`.
    Dir,
    /// No `--config`: the embedded default policy.
    None,
    /// `--config` with a path that already exists (an example policy).
    Path(PathBuf),
}

/// A finished proxy run, for start-up failures.
#[derive(Debug)]
pub struct ProxyExit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The policy files as written, so assertions can name them.
    pub files: Vec<PathBuf>,
}

impl ProxyBuilder {
    /// Adds a policy file called `name` (written into the temporary config directory).
    pub fn file(mut self, name: &str, contents: &str) -> Self {
        self.files.push((name.to_string(), contents.to_string()));
        self
    }

    /// Binds the inbound listener on `addr` instead of `127.0.0.1:0`, for
    /// policies that must name it before the proxy starts.
    pub fn inbound(mut self, addr: SocketAddr) -> Self {
        self.inbound = Some(addr);
        self
    }

    /// Adds `policy.yaml` with these contents.
    pub fn policy(self, contents: &str) -> Self {
        self.file("policy.yaml", contents)
    }

    /// Passes the directory holding the files to `--config` instead of the first file.
    pub fn config_dir(mut self) -> Self {
        self.config = ConfigArg::Dir;
        self
    }

    /// Starts the proxy without `--config`.
    pub fn no_config(mut self) -> Self {
        self.config = ConfigArg::None;
        self
    }

    /// Passes an existing file or directory to `--config` (nothing is written).
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = ConfigArg::Path(path.into());
        self
    }

    /// Appends a command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// Sets an environment variable for the proxy.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn spawn(&self) -> (Child, tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::Builder::new()
            .prefix("infermesh-policy-")
            .tempdir()
            .expect("temporary policy directory");
        let mut paths = Vec::new();
        for (name, contents) in &self.files {
            let path = dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create policy directory");
            }
            std::fs::write(&path, contents).expect("write policy file");
            paths.push(path);
        }
        let binary = proxy_binary();
        let mut command = Command::new(&binary);
        match &self.config {
            ConfigArg::File => {
                let first = paths
                    .first()
                    .expect("a policy file (use .policy(...)) or .no_config()");
                command.arg("--config").arg(first);
            }
            ConfigArg::Dir => {
                command.arg("--config").arg(dir.path());
            }
            ConfigArg::None => {}
            ConfigArg::Path(path) => {
                command.arg("--config").arg(path);
            }
        }
        let inbound = self
            .inbound
            .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        command
            .args([
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                inbound.as_str(),
                "--admin",
                "127.0.0.1:0",
            ])
            .args(&self.extra_args)
            // One worker, as sidecars run (a current-thread runtime); a
            // test that passes --threads itself gets what it asks for.
            .args(if self.extra_args.iter().any(|a| a == "--threads") {
                &[][..]
            } else {
                &["--threads", "1"][..]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        (child, dir, paths)
    }

    /// Starts the proxy and waits for its `listening` line; panics, showing
    /// stderr, when it exits or stays silent for [`START_TIMEOUT`].
    pub fn start(self) -> ProxyProcess {
        let (mut child, dir, files) = self.spawn();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut pipe = stderr_pipe;
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        let stdout = Arc::new(Mutex::new(Vec::<String>::new()));
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let (line_tx, line_rx) = mpsc::channel::<String>();
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout_pipe).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("listening ") {
                    let _ = line_tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let line = loop {
            match line_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        // Give the reader threads a moment to drain the pipes.
                        std::thread::sleep(Duration::from_millis(100));
                        panic!(
                            "infermesh-proxy exited with {status} before listening\n--- stdout\n{}\n--- stderr\n{}",
                            stdout.lock().unwrap().join("\n"),
                            String::from_utf8_lossy(&stderr.lock().unwrap())
                        );
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "infermesh-proxy printed no `listening` line within {START_TIMEOUT:?}\n--- stdout\n{}\n--- stderr\n{}",
                        stdout.lock().unwrap().join("\n"),
                        String::from_utf8_lossy(&stderr.lock().unwrap())
                    );
                }
            }
        };
        let addrs = parse_listening(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("cannot parse the proxy's listening line {line:?}: {e}")
        });
        ProxyProcess {
            child,
            _dir: dir,
            files,
            outbound: addrs[0],
            inbound: addrs[1],
            admin: addrs[2],
            stderr,
            stdout,
            exit: None,
        }
    }

    /// Runs the proxy expecting it to exit by itself (a refused policy), and
    /// returns its exit status and output; panics when it is still running
    /// after `timeout` or printed a `listening` line.
    pub fn run_to_exit(self, timeout: Duration) -> ProxyExit {
        let (mut child, _dir, files) = self.spawn();
        let mut stdout_pipe = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let out = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout_pipe.read_to_string(&mut text);
            text
        });
        let err = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let status = wait_timeout(&mut child, timeout);
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "infermesh-proxy was still running after {timeout:?}; it should have refused the policy\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            );
        };
        ProxyExit {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            files,
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses `listening outbound=IP:PORT inbound=IP:PORT admin=IP:PORT`.
pub fn parse_listening(line: &str) -> Result<[SocketAddr; 3], String> {
    let mut rest = line
        .strip_prefix("listening ")
        .ok_or("no `listening ` prefix")?
        .split_whitespace();
    let mut take = |key: &str| -> Result<SocketAddr, String> {
        let field = rest.next().ok_or(format!("no {key}="))?;
        let value = field
            .strip_prefix(key)
            .and_then(|v| v.strip_prefix('='))
            .ok_or(format!("expected {key}=…, found {field:?}"))?;
        value.parse().map_err(|e| format!("{key}: {e}"))
    };
    let addrs = [take("outbound")?, take("inbound")?, take("admin")?];
    if let Some(extra) = rest.next() {
        return Err(format!("unexpected {extra:?} after admin="));
    }
    Ok(addrs)
}

/// A running `infermesh-proxy`.
pub struct ProxyProcess {
    child: Child,
    _dir: tempfile::TempDir,
    files: Vec<PathBuf>,
    /// Where applications send traffic to the mesh.
    pub outbound: SocketAddr,
    /// Where the mesh sends traffic to the local model server.
    pub inbound: SocketAddr,
    /// `/live`, `/ready`, `/metrics`, `/config`.
    pub admin: SocketAddr,
    stderr: Arc<Mutex<Vec<u8>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
}

impl ProxyProcess {
    /// Starts the proxy with this policy as its `--config` file.
    pub fn start(policy: &str) -> Self {
        Self::builder().policy(policy).start()
    }

    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::default()
    }

    /// `http://<outbound>` — the base URL applications use.
    pub fn url(&self) -> String {
        format!("http://{}", self.outbound)
    }

    /// `http://<admin>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The policy files the proxy was given.
    pub fn policy_files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Everything the proxy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Lines the proxy wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The exit status, once the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit (blocking the thread).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = wait_timeout(&mut self.child, timeout);
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit, without blocking the runtime.
    pub async fn exited(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let stderr = self.stderr();
            let tail_start = stderr.len().saturating_sub(16 * 1024);
            let tail_start = (tail_start..stderr.len())
                .find(|&i| stderr.is_char_boundary(i))
                .unwrap_or(stderr.len());
            eprintln!(
                "--- infermesh-proxy stderr (last {} bytes)\n{}",
                stderr.len() - tail_start,
                &stderr[tail_start..]
            );
        }
    }
}

/// The `infermesh-proxy` binary: `$INFERMESH_PROXY_BIN`, or the one next to
/// this test executable (`target/<profile>/`), built with cargo once when it
/// is missing.
pub fn proxy_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| find_or_build("infermesh-proxy", "infermesh-proxy", "INFERMESH_PROXY_BIN"))
        .clone()
}

/// The `infermesh-init` binary: `$INFERMESH_INIT_BIN`, or the one next to
/// this test executable, built with cargo once when it is missing.
pub fn init_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| find_or_build("infermesh-init", "infermesh-proxy", "INFERMESH_INIT_BIN"))
        .clone()
}

/// A binary of the workspace: `$env_override`, or `name` next to this test
/// executable, built with `cargo build -p package` when it is missing.
pub(crate) fn find_or_build(name: &str, package: &str, env_override: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !binary.exists() {
        build_binary(&dir, name, package);
    }
    assert!(
        binary.exists(),
        "{} does not exist even after `cargo build -p {package}`",
        binary.display()
    );
    binary
}

/// Builds a binary into the target directory that holds `profile_dir`.
fn build_binary(profile_dir: &Path, name: &str, package: &str) {
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(crate::repo_root())
        .args(["build", "-p", package, "--bin", name, "--profile"])
        .arg(&profile);
    if let Some(target_dir) = profile_dir.parent() {
        command.arg("--target-dir").arg(target_dir);
    }
    eprintln!("building {name}: {command:?}");
    let status = command.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} failed: {status}"
    );
}
