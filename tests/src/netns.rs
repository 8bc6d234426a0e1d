//! "Pods" built from Linux network namespaces, for end-to-end tests of
//! transparent interception.
//!
//! A [`Cluster`] is a "node" namespace holding a bridge (`br0`, the first
//! address of a private /24 and of an IPv6 ULA /64) and any number of
//! [`Pod`]s: each a namespace with `lo` up and a veth `eth0` whose peer is a
//! port of the bridge, its own address in the /24 and the /64 and a default
//! route via the bridge. Every interface is created inside its namespace
//! (`ip -n NS link add … peer … netns NODE`), so the root namespace is never
//! touched. Names are unique per test run: `im-<pid>-<n>-<role>`.
//!
//! Processes run in a pod with `ip netns exec`, as root or, through
//! `setpriv`, as another user (the proxy's UID). Both exec their command,
//! so the pid of a spawned child is the program's own. Binaries a pod runs
//! as another user are copied by [`Cluster::install`] into a directory
//! every user can read (the repository may sit under `/root`).
//!
//! Dropping the cluster kills every process left in its namespaces and
//! deletes them, also when a test panics. When the kernel or the
//! permissions refuse to create a namespace, [`Cluster::new`] returns the
//! reason so the test can print `SKIP: <reason>`; any other failure panics.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The bridge in the node namespace.
pub const BRIDGE: &str = "br0";

/// Proxy-related variables a client in a pod must not inherit.
const PROXY_VARS: [&str; 7] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "grpc_proxy",
];

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// A node namespace with a bridge, and the pods attached to it.
pub struct Cluster {
    prefix: String,
    node: String,
    net: [u8; 2],
    /// Pod namespaces, in creation order.
    pods: Mutex<Vec<String>>,
    next_host: AtomicU32,
    bin_dir: tempfile::TempDir,
    /// Why the pods have no IPv6 addresses, when the kernel refused them.
    ipv6_refused: Option<String>,
}

/// One pod: a network namespace with `eth0` on the cluster's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The namespace's name (for `ip netns exec`).
    pub ns: String,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (ULA); unset where the kernel refuses IPv6
    /// ([`Cluster::ipv6_refused`]).
    pub ip6: Ipv6Addr,
    /// The pod's port on the bridge (the node's end of its veth).
    pub port: String,
}

impl Cluster {
    /// Creates the node namespace and its bridge. `Err` carries the reason
    /// to skip when the kernel or the permissions refuse namespaces; any
    /// other failure panics.
    pub fn new() -> Result<Self, String> {
        let pid = std::process::id();
        let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("im-{pid}-{n}");
        let node = format!("{prefix}-node");
        // Namespaces are isolated from each other, so any /24 would do; a
        // varying one makes a leftover of an earlier run easy to tell apart.
        let net = [
            (16 + (pid >> 8) % 200) as u8,
            ((pid & 0xff) as u8).wrapping_add((n as u8).wrapping_mul(37)),
        ];
        match Command::new("ip").args(["netns", "add", &node]).output() {
            Err(e) => return Err(format!("cannot run `ip` (iproute2): {e}")),
            Ok(out) if !out.status.success() => {
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                let refused = [
                    "Operation not permitted",
                    "Permission denied",
                    "not supported",
                    "Function not implemented",
                    "Invalid argument",
                ];
                if refused.iter().any(|r| stderr.contains(r)) {
                    return Err(format!(
                        "the kernel refuses to create a network namespace: {}",
                        stderr.trim()
                    ));
                }
                panic!("ip netns add {node} failed: {}", stderr.trim());
            }
            Ok(_) => {}
        }
        let bin_dir = tempfile::Builder::new()
            .prefix("infermesh-pods-bin-")
            .tempdir()
            .expect("a temporary directory for the pods' binaries");
        std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755 the binaries' directory");
        let cluster = Self {
            prefix,
            node,
            net,
            pods: Mutex::new(Vec::new()),
            next_host: AtomicU32::new(2),
            bin_dir,
            ipv6_refused: None,
        };
        let mut cluster = cluster;
        let node = cluster.node.as_str();
        let v4 = format!("{}/24", cluster.node_ip());
        let v6 = format!("{}/64", cluster.node_ip6());
        ip(&["-n", node, "link", "set", "lo", "up"]);
        ip(&["-n", node, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&["-n", node, "addr", "add", &v4, "dev", BRIDGE]);
        ip(&["-n", node, "link", "set", BRIDGE, "up"]);
        // A kernel without IPv6 (ipv6.disable=1) refuses the address: the
        // pods are then IPv4 only, and IPv6 checks skip saying why.
        let out = Command::new("ip")
            .args(["-n", node, "addr", "add", &v6, "dev", BRIDGE, "nodad"])
            .output()
            .expect("run ip");
        if !out.status.success() {
            cluster.ipv6_refused = Some(format!(
                "the kernel refuses IPv6 addresses: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(cluster)
    }

    /// Why the pods have no IPv6 addresses (`None`: they have).
    pub fn ipv6_refused(&self) -> Option<&str> {
        self.ipv6_refused.as_deref()
    }

    /// The node namespace's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's address on the bridge (the pods' default gateway).
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], 1)
    }

    /// The node's IPv6 address on the bridge.
    pub fn node_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            self.net[0] as u16,
            self.net[1] as u16,
            0,
            0,
            0,
            0,
            1,
        )
    }

    /// The pods' IPv4 network, `10.A.B.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.{}.{}.0/24", self.net[0], self.net[1])
    }

    /// The next free IPv4 address of the /24 (for a pod, or a second
    /// address of one).
    pub fn next_ip(&self) -> Ipv4Addr {
        let host = self.next_host.fetch_add(1, Ordering::SeqCst);
        assert!(host < 255, "the cluster's /24 is full");
        Ipv4Addr::new(10, self.net[0], self.net[1], host as u8)
    }

    /// `ip netns exec NODE`, for commands run in the node namespace.
    pub fn node_wrap(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.node]
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Creates a pod called `role` (at most 8 characters: its bridge port
    /// is `v-<role>`, and interface names are at most 15).
    pub fn pod(&self, role: &str) -> Pod {
        assert!(
            !role.is_empty() && role.len() <= 8,
            "pod role {role:?}: 1 to 8 characters"
        );
        let ns = format!("{}-{role}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.pods.lock().unwrap().push(ns.clone());
        let ip4 = self.next_ip();
        let host = ip4.octets()[3] as u16;
        let ip6 = Ipv6Addr::new(
            0xfd00,
            self.net[0] as u16,
            self.net[1] as u16,
            0,
            0,
            0,
            0,
            host,
        );
        let port = format!("v-{role}");
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &self.node,
        ]);
        ip(&["-n", &self.node, "link", "set", &port, "master", BRIDGE]);
        ip(&["-n", &self.node, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip4}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &self.node_ip().to_string(),
        ]);
        if self.ipv6_refused.is_none() {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.node_ip6().to_string(),
            ]);
        }
        Pod {
            ns,
            ip: ip4,
            ip6,
            port,
        }
    }

    /// Puts `binary` into a directory every user can read and execute (the
    /// repository may sit where only root can reach), and returns its path
    /// there.
    pub fn install(&self, binary: &Path) -> PathBuf {
        let name = binary.file_name().expect("a binary has a file name");
        let target = self.bin_dir.path().join(name);
        if !target.exists() {
            // A hard link when the file is already 0755 and on the same
            // file system (debug binaries are large), else a copy.
            let executable = std::fs::metadata(binary)
                .map(|m| m.permissions().mode() & 0o755 == 0o755)
                .unwrap_or(false);
            if !(executable && std::fs::hard_link(binary, &target).is_ok()) {
                // `cp`, not std::fs::copy: a file this process had open for
                // writing could leak into a child another thread is forking,
                // and exec-ing it would then fail with "Text file busy".
                let status = Command::new("cp")
                    .arg(binary)
                    .arg(&target)
                    .status()
                    .unwrap_or_else(|e| panic!("run cp: {e}"));
                assert!(
                    status.success(),
                    "cp {} for the pods: {status}",
                    binary.display()
                );
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod 755 a pod's binary");
            }
        }
        target
    }

    /// A directory every user can read, for files the pods need.
    pub fn shared_dir(&self) -> &Path {
        self.bin_dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut namespaces = self.pods.lock().unwrap().clone();
        namespaces.push(self.node.clone());
        for ns in &namespaces {
            kill_all_in(ns);
        }
        for ns in &namespaces {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            if let Ok(out) = out {
                if !out.status.success() {
                    eprintln!(
                        "ip netns del {ns}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
    }
}

/// SIGKILLs every process in namespace `ns` (they are all this harness's:
/// the namespace is).
fn kill_all_in(ns: &str) {
    for _ in 0..5 {
        let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
            return;
        };
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) on a process of a namespace this harness made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Pod {
    /// `ip netns exec NS`.
    pub fn wrap(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns]
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// `ip netns exec NS setpriv --reuid UID --regid GID --clear-groups`.
    pub fn wrap_as(&self, uid: u32, gid: u32) -> Vec<String> {
        let mut wrap = self.wrap();
        wrap.extend([
            "setpriv".to_string(),
            "--reuid".to_string(),
            uid.to_string(),
            "--regid".to_string(),
            gid.to_string(),
            "--clear-groups".to_string(),
        ]);
        wrap
    }

    /// A command running `program` in the pod as root, without the proxy
    /// variables of the environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).arg(program);
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        command
    }

    /// A command running `program` in the pod as `uid`/`gid`.
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let wrap = self.wrap_as(uid, gid);
        let mut command = Command::new(&wrap[0]);
        command.args(&wrap[1..]).arg(program);
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        command
    }

    /// Runs `args` in the pod as root and waits for it (at most `timeout`).
    pub fn run(&self, args: &[&str], timeout: Duration) -> Output {
        let mut command = self.command(args[0]);
        command.args(&args[1..]);
        output_within(command, timeout)
    }

    /// Runs `args`, panicking with its output when it fails.
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.run(args, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "`{}` in pod {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            args.join(" "),
            self.ns,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs curl in the pod (`--silent --show-error --max-time 10` first),
    /// returning (exit code, stdout, stderr).
    pub fn curl(&self, args: &[&str]) -> (i32, String, String) {
        let mut command = self.command("curl");
        command
            .args(["--silent", "--show-error", "--max-time", "10"])
            .args(args);
        let out = output_within(command, Duration::from_secs(20));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `args` in the pod as root, waiting until a line of its
    /// stdout or stderr contains `ready` (when given).
    pub fn spawn(&self, name: &str, args: &[&str], ready: Option<&str>) -> PodProcess {
        let mut command = self.command(args[0]);
        command.args(&args[1..]);
        PodProcess::spawn(name, command, ready)
    }
}

/// Runs `command` to completion, killing it after `timeout`.
pub fn output_within(mut command: Command, timeout: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let started = Instant::now();
    while !waiter.is_finished() {
        if started.elapsed() > timeout {
            // SAFETY: kill(2) on the child we started (exec'd by `ip netns exec`).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    waiter
        .join()
        .expect("waiter thread")
        .expect("wait for the command")
}

/// A background process in a pod (a fixture, tcpdump), killed when dropped;
/// its output is kept and shown when the test panics.
pub struct PodProcess {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    exited: bool,
}

/// How long a pod process may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

impl PodProcess {
    /// Starts `command`, waiting until a line of its stdout or stderr
    /// contains `ready` (when given); panics, with its output, when it
    /// exits or stays silent for [`READY_TIMEOUT`].
    pub fn spawn(name: &str, mut command: Command, ready: Option<&str>) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<()>();
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for pipe in pipes {
            let output = output.clone();
            let tx = tx.clone();
            let ready = ready.map(str::to_string);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    // Kept before the ready signal, so that the waiter finds it.
                    {
                        let mut output = output.lock().unwrap();
                        output.push_str(&line);
                        output.push('\n');
                    }
                    if ready.as_deref().is_some_and(|r| line.contains(r)) {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let mut process = Self {
            name: name.to_string(),
            child,
            output,
            exited: false,
        };
        if ready.is_some() {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) => break,
                    Err(_) if Instant::now() >= deadline => panic!(
                        "{name} printed no line with {ready:?} within {READY_TIMEOUT:?}:\n{}",
                        process.output()
                    ),
                    Err(_) => {
                        if let Ok(Some(status)) = process.child.try_wait() {
                            process.exited = true;
                            std::thread::sleep(Duration::from_millis(100));
                            panic!(
                                "{name} exited with {status} before it was ready:\n{}",
                                process.output()
                            );
                        }
                    }
                }
            }
        }
        process
    }

    /// Everything it printed so far (stdout and stderr, line by line).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` and waits up to `timeout` for the exit; SIGKILL after.
    pub fn stop(&mut self, signal: i32, timeout: Duration) {
        if self.exited {
            return;
        }
        // SAFETY: kill(2) on the child we started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.exited = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let output = self.output();
            let start = output.len().saturating_sub(8 * 1024);
            let start = (start..output.len())
                .find(|&i| output.is_char_boundary(i))
                .unwrap_or(output.len());
            eprintln!("--- {} output\n{}", self.name, &output[start..]);
        }
    }
}

/// The TCP payloads of a pcap file (Ethernet, IPv4 or IPv6) whose source or
/// destination port is `port`, in capture order.
pub fn tcp_payloads(pcap: &[u8], port: u16) -> Vec<Vec<u8>> {
    tcp_segments(pcap)
        .into_iter()
        .filter(|s| s.source_port == port || s.destination_port == port)
        .map(|s| s.payload)
        .collect()
}

/// One TCP segment with a payload, from a capture.
#[derive(Debug, Clone)]
pub struct Segment {
    pub ipv6: bool,
    pub source_port: u16,
    pub destination_port: u16,
    pub payload: Vec<u8>,
}

/// The TCP segments carrying data in a pcap file (Ethernet frames, IPv4 or
/// IPv6 without extension headers), in capture order.
pub fn tcp_segments(pcap: &[u8]) -> Vec<Segment> {
    let mut segments = Vec::new();
    if pcap.len() < 24 {
        return segments;
    }
    let little = match pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file (magic {:02x?})", &pcap[..4]),
    };
    let u32_at = |at: usize| {
        let b = [pcap[at], pcap[at + 1], pcap[at + 2], pcap[at + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let captured = u32_at(at + 8) as usize;
        let start = at + 16;
        let end = (start + captured).min(pcap.len());
        at = start + captured;
        let frame = &pcap[start..end];
        if frame.len() < 14 {
            continue;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let (proto, l4) = match ethertype {
            0x0800 if frame.len() >= 34 => {
                let ihl = ((frame[14] & 0x0f) as usize) * 4;
                let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
                let end = (14 + total).min(frame.len());
                (frame[23], &frame[(14 + ihl).min(end)..end])
            }
            0x86dd if frame.len() >= 54 => {
                let len = u16::from_be_bytes([frame[18], frame[19]]) as usize;
                let end = (54 + len).min(frame.len());
                (frame[20], &frame[54..end])
            }
            _ => continue,
        };
        if proto != 6 || l4.len() < 20 {
            continue;
        }
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        let offset = ((l4[12] >> 4) as usize) * 4;
        if l4.len() > offset {
            segments.push(Segment {
                ipv6: ethertype == 0x86dd,
                source_port: sport,
                destination_port: dport,
                payload: l4[offset..].to_vec(),
            });
        }
    }
    segments
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A packet capture on a pod's port of the cluster's bridge (`tcpdump` in
/// the node namespace): every frame the pod sends or receives. (A capture
/// on the bridge device itself would only see frames to and from the node,
/// not those forwarded between ports.)
pub struct Capture {
    process: PodProcess,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `tcpdump` on `pod`'s bridge port with this filter
    /// (`"tcp port 8000"`) and waits until it listens.
    pub fn capture(&self, pod: &Pod, filter: &str) -> Capture {
        let dir = tempfile::Builder::new()
            .prefix("infermesh-capture-")
            .tempdir()
            .expect("a temporary directory for the capture");
        let file = dir.path().join("bridge.pcap");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.node, "tcpdump", "-i", &pod.port])
            // Root keeps writing (Debian's tcpdump drops to its own user);
            // immediate mode hands each packet over at once (not a block
            // per second) and -U writes it at once; -s 0 keeps whole frames.
            .args([
                "-Z",
                "root",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-n",
                "-w",
            ])
            .arg(&file)
            .args(filter.split_whitespace());
        let process = PodProcess::spawn("tcpdump", command, Some("listening on"));
        Capture {
            process,
            file,
            _dir: dir,
        }
    }
}

impl Capture {
    /// Stops the capture (SIGINT, so tcpdump flushes) and returns the pcap file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // Let the last packets reach the capture.
        std::thread::sleep(Duration::from_millis(300));
        self.process.stop(libc::SIGINT, Duration::from_secs(5));
        std::fs::read(&self.file).unwrap_or_else(|e| {
            panic!(
                "read the capture {}: {e}\n{}",
                self.file.display(),
                self.process.output()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian pcap file holding `frames`.
    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut file = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&65535u32.to_le_bytes());
        file.extend_from_slice(&1u32.to_le_bytes());
        for frame in frames {
            file.extend_from_slice(&[0; 8]);
            file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            file.extend_from_slice(frame);
        }
        file
    }

    fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut segment = Vec::new();
        segment.extend_from_slice(&sport.to_be_bytes());
        segment.extend_from_slice(&dport.to_be_bytes());
        segment.extend_from_slice(&[0; 8]);
        segment.push(5 << 4); // data offset: 20 bytes
        segment.extend_from_slice(&[0; 7]);
        segment.extend_from_slice(payload);
        segment
    }

    fn ipv4_frame(segment: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + segment.len()) as u16;
        frame.extend_from_slice(&[0x45, 0]);
        frame.extend_from_slice(&total.to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0]);
        frame.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 3]);
        frame.extend_from_slice(segment);
        // Ethernet padding after the IP packet is not payload.
        frame.extend_from_slice(&[0xee; 6]);
        frame
    }

    fn ipv6_frame(segment: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; 12];
        frame.extend_from_slice(&[0x86, 0xdd]);
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[6, 64]);
        frame.extend_from_slice(&[0; 32]);
        frame.extend_from_slice(segment);
        frame
    }

    #[test]
    fn tcp_payloads_of_both_families_are_read_from_a_capture() {
        let file = pcap(&[
            ipv4_frame(&tcp(40000, 8000, b"hello")),
            ipv4_frame(&tcp(8000, 40000, b"")),
            ipv6_frame(&tcp(8000, 40001, b"world")),
            ipv4_frame(&tcp(40002, 7000, b"other")),
        ]);
        assert_eq!(
            tcp_payloads(&file, 8000),
            vec![b"hello".to_vec(), b"world".to_vec()]
        );
        let segments = tcp_segments(&file);
        assert_eq!(segments.len(), 3);
        assert!(segments[1].ipv6 && !segments[0].ipv6);
        assert_eq!(segments[2].destination_port, 7000);
        assert!(contains(&file, b"world") && !contains(&file, b"absent"));
    }
}
