//! The real `infermesh-sim` binary (a simulated vLLM server), run as a child
//! process: started with `--addr 127.0.0.1:0` and the flags given, its
//! `listening addr=…` line read back, killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};

use crate::process::{find_or_build, START_TIMEOUT};

/// The `infermesh-sim` binary: `$INFERMESH_SIM_BIN`, or the one next to this
/// test executable, built with cargo once when it is missing.
pub fn sim_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| find_or_build("infermesh-sim", "infermesh-sim", "INFERMESH_SIM_BIN"))
        .clone()
}

/// The `infermesh-sim-load` binary: `$INFERMESH_SIM_LOAD_BIN`, or the one
/// next to this test executable, built with cargo once when it is missing.
pub fn sim_load_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            find_or_build(
                "infermesh-sim-load",
                "infermesh-sim",
                "INFERMESH_SIM_LOAD_BIN",
            )
        })
        .clone()
}

/// A running simulated server.
#[derive(Debug)]
pub struct SimServer {
    child: Child,
    addr: SocketAddr,
}

impl SimServer {
    /// Starts one with `args` (besides `--addr`); panics with its stderr
    /// when it does not come up.
    pub fn start(args: &[&str]) -> SimServer {
        let mut child = Command::new(sim_binary())
            .arg("--addr")
            .arg("127.0.0.1:0")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start infermesh-sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening addr=") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => SimServer {
                addr: addr.parse().expect("a socket address"),
                child,
            },
            Err(_) => {
                let _ = child.kill();
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                panic!("infermesh-sim {args:?} did not start: {stderr}");
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
