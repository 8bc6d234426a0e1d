//! `infermesh-init` against the real kernel: each test builds its own network
//! namespaces ("pods"), runs the real binary inside one with `ip netns exec`,
//! reads the rules back with `nft`, and proves with real TCP and UDP sockets
//! where connections land and what `SO_ORIGINAL_DST` says about them.
//!
//! Needs root (CI runs as root), `ip` (iproute2), `nft` (nftables), `setpriv`
//! and `bash`. Where the kernel or the permissions refuse to create a network
//! namespace, a test prints `SKIP` with the reason and returns.

use std::fs::File;
use std::io::ErrorKind;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use infermesh_tests::process::init_binary;

/// How long a connection or datagram may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(5);
/// How long to wait for something that must not arrive.
const SILENCE: Duration = Duration::from_millis(300);

const POD: &str = "10.77.0.1";
const PEER: &str = "10.77.0.2";
const PEER_SKIPPED: &str = "10.77.0.3";
const POD6: &str = "fd77::1";
const PEER6: &str = "fd77::2";

// === network namespaces ===

/// A network namespace of this test process, removed on drop (also when the
/// test panics).
struct Netns {
    name: String,
}

/// Why a namespace could not be made: the kernel or the permissions refused.
struct Refused(String);

impl Netns {
    fn create() -> Result<Self, Refused> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "im-init-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let output = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run `ip netns add` (iproute2 is required)");
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            let refused = ["Operation not permitted", "Permission denied"]
                .iter()
                .any(|reason| stderr.contains(reason));
            assert!(refused, "ip netns add {name} failed: {stderr}");
            return Err(Refused(stderr));
        }
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        Ok(netns)
    }

    /// Runs `program args` inside the namespace and returns what it did.
    fn exec(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    /// `ip -n NAME args`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let output = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            output.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `infermesh-init args` inside the namespace.
    fn init(&self, args: &[&str]) -> Output {
        self.exec(init_binary(), args)
    }

    /// `infermesh-init args`, which must succeed.
    fn init_ok(&self, args: &[&str]) -> String {
        let output = self.init(args);
        assert!(
            output.status.success(),
            "infermesh-init {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// `nft args` inside the namespace, which must succeed; its stdout.
    fn nft(&self, args: &[&str]) -> String {
        let output = self.exec("nft", args);
        assert!(
            output.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// `nft -f -` inside the namespace with `ruleset` on its stdin, which
    /// must succeed.
    fn nft_apply(&self, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ruleset.as_bytes())
            .expect("write the ruleset");
        let output = child.wait_with_output().expect("wait for nft");
        assert!(output.status.success(), "nft -f -: {}", stderr(&output));
    }

    /// The tables in the namespace, one `family name` each.
    fn tables(&self) -> Vec<String> {
        self.nft(&["list", "tables"])
            .lines()
            .map(|line| line.trim_start_matches("table ").to_string())
            .collect()
    }

    /// Runs `f` on a thread that has entered the namespace, so the sockets it
    /// makes live there (and may be used from any thread afterwards).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on a valid namespace fd only changes this
                // thread's network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().expect("socket address");
        let listener = self
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        listener.set_nonblocking(true).expect("nonblocking");
        listener
    }

    fn udp(&self, addr: &str) -> UdpSocket {
        let addr: SocketAddr = addr.parse().expect("socket address");
        let socket = self
            .run(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {}: {e}", self.name));
        socket.set_read_timeout(Some(SILENCE)).expect("timeout");
        socket
    }

    /// A TCP connection from this namespace, as root.
    fn connect(&self, addr: &str) -> TcpStream {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.run(|| TcpStream::connect_timeout(&addr, ARRIVAL))
            .unwrap_or_else(|e| panic!("connect to {addr} from {}: {e}", self.name))
    }

    /// A TCP connection from this namespace by a process of `uid`/`gid`
    /// (bash's /dev/tcp under setpriv), which must connect.
    fn connect_as(&self, uid: u32, gid: u32, host: &str, port: u16) {
        let (uid, gid) = (uid.to_string(), gid.to_string());
        let script = format!("exec 3<>/dev/tcp/{host}/{port}");
        let output = self.exec(
            "setpriv",
            &[
                "--reuid",
                &uid,
                "--regid",
                &gid,
                "--clear-groups",
                "timeout",
                "5",
                "bash",
                "-c",
                &script,
            ],
        );
        assert!(
            output.status.success(),
            "uid {uid} connecting to {host}:{port}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair: the "pod" (10.77.0.1, fd77::1)
/// and a "peer" (10.77.0.2 and 10.77.0.3, fd77::2). The addresses are the
/// same in every test: each test has namespaces of its own.
struct Pods {
    pod: Netns,
    peer: Netns,
}

impl Pods {
    fn create() -> Result<Self, Refused> {
        let pod = Netns::create()?;
        let peer = Netns::create()?;
        pod.ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &peer.name,
        ]);
        pod.ip(&["addr", "add", "10.77.0.1/24", "dev", "veth0"]);
        pod.ip(&["addr", "add", "fd77::1/64", "dev", "veth0", "nodad"]);
        pod.ip(&["link", "set", "veth0", "up"]);
        peer.ip(&["addr", "add", "10.77.0.2/24", "dev", "veth1"]);
        peer.ip(&["addr", "add", "10.77.0.3/24", "dev", "veth1"]);
        peer.ip(&["addr", "add", "fd77::2/64", "dev", "veth1", "nodad"]);
        peer.ip(&["link", "set", "veth1", "up"]);
        Ok(Self { pod, peer })
    }
}

/// Makes the namespace(s) a test needs, or prints why the kernel refused and
/// returns from the test.
macro_rules! or_skip {
    ($made:expr, $test:literal) => {
        match $made {
            Ok(made) => made,
            Err(Refused(reason)) => {
                eprintln!(
                    "SKIP {}: cannot create network namespaces here: {}",
                    $test,
                    reason.trim()
                );
                return;
            }
        }
    };
}

// === where connections land ===

/// Named listeners; a connection is looked for on all of them.
struct Listeners(Vec<(&'static str, TcpListener)>);

/// A connection that arrived: at which listener, from where, and its original
/// destination before any redirect.
#[derive(Debug)]
struct Arrival {
    at: &'static str,
    peer: SocketAddr,
    /// None when the connection is not tracked (no NAT table in the
    /// namespace yet).
    original_dst: Option<SocketAddr>,
    _stream: TcpStream,
}

impl Listeners {
    /// The one listener a connection arrived at; every other listener must
    /// have received nothing.
    fn arrival(&self) -> Arrival {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            for (at, listener) in &self.0 {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let original_dst = original_dst(&stream);
                        self.assert_quiet();
                        return Arrival {
                            at,
                            peer,
                            original_dst,
                            _stream: stream,
                        };
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept on {at}: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no connection arrived at any of {:?} within {ARRIVAL:?}",
                self.0.iter().map(|(at, _)| at).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn assert_quiet(&self) {
        for (at, listener) in &self.0 {
            match listener.accept() {
                Ok((_, peer)) => panic!("a second connection, from {peer}, arrived at {at}"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept on {at}: {e}"),
            }
        }
    }
}

/// The destination a connection had before NAT (`SO_ORIGINAL_DST`, or
/// `IP6T_SO_ORIGINAL_DST` for IPv6); for a connection that was not
/// redirected it is the address it was made to, and None when conntrack
/// does not know the connection.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let fd = stream.as_raw_fd();
    let local = stream.local_addr().expect("local address");
    // SAFETY: getsockopt writes at most `len` bytes into a zeroed sockaddr
    // of the matching family.
    unsafe {
        if local.is_ipv4() {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            );
            if rc != 0 {
                return untracked("SO_ORIGINAL_DST");
            }
            Some(SocketAddr::new(
                IpAddr::from(u32::from_be(addr.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(addr.sin_port),
            ))
        } else {
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            );
            if rc != 0 {
                return untracked("IP6T_SO_ORIGINAL_DST");
            }
            Some(SocketAddr::new(
                IpAddr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
            ))
        }
    }
}

/// ENOENT from the original-destination option: conntrack has no entry.
fn untracked(option: &str) -> Option<SocketAddr> {
    let error = std::io::Error::last_os_error();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{option}: {error}");
    None
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A copy of the init binary in a world-readable directory, for a process
/// of another user (which cannot read files under /root).
fn world_readable_init() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::Builder::new()
        .prefix("infermesh-init-test")
        .tempdir_in("/tmp")
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    let binary = dir.path().join("infermesh-init");
    std::fs::copy(init_binary(), &binary).expect("copy infermesh-init");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
        .expect("chmod infermesh-init");
    (dir, binary)
}

// === the tests ===

#[test]
fn rules_apply_idempotently_and_clean_removes_only_them() {
    let pod = or_skip!(
        Netns::create(),
        "rules_apply_idempotently_and_clean_removes_only_them"
    );
    let other = "table inet other {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\ttcp dport 22 counter accept\n\t}\n}\n";
    pod.nft_apply(other);
    let other_listed = pod.nft(&["list", "table", "inet", "other"]);

    let summary = pod.init_ok(&[]);
    assert!(
        summary.contains("applied table inet infermesh"),
        "{summary}"
    );
    let first = pod.nft(&["list", "table", "inet", "infermesh"]);
    for rule in [
        "type nat hook output priority -100; policy accept;",
        "meta skuid 2102 return",
        "meta skgid 2102 return",
        "oif \"lo\" return",
        "ip daddr 127.0.0.0/8 return",
        "ip6 daddr ::1 return",
        "meta l4proto tcp redirect to :4140",
        "type nat hook prerouting priority dstnat; policy accept;",
        "tcp dport { 4140, 4143, 4191 } return",
        "meta l4proto tcp redirect to :4143",
    ] {
        assert!(first.contains(rule), "missing {rule:?} in\n{first}");
    }
    assert_eq!(pod.tables(), ["inet other", "inet infermesh"]);

    // Again: the same one table, not a second copy of each rule.
    pod.init_ok(&[]);
    assert_eq!(pod.tables(), ["inet other", "inet infermesh"]);
    assert_eq!(pod.nft(&["list", "table", "inet", "infermesh"]), first);

    // Other flags replace the rules as a whole.
    pod.init_ok(&["--skip-outbound-ports", "22"]);
    let changed = pod.nft(&["list", "table", "inet", "infermesh"]);
    assert!(changed.contains("tcp dport 22 return"), "{changed}");
    assert_eq!(changed.matches("redirect to :4140").count(), 1);
    assert_eq!(pod.tables(), ["inet other", "inet infermesh"]);

    let cleaned = pod.init_ok(&["--clean"]);
    assert!(
        cleaned.contains("removed table inet infermesh"),
        "{cleaned}"
    );
    assert_eq!(pod.tables(), ["inet other"]);
    assert_eq!(pod.nft(&["list", "table", "inet", "other"]), other_listed);
    pod.init_ok(&["--clean"]);
    assert_eq!(pod.tables(), ["inet other"]);
}

#[test]
fn dry_run_prints_the_ruleset_and_applies_nothing() {
    let pod = or_skip!(
        Netns::create(),
        "dry_run_prints_the_ruleset_and_applies_nothing"
    );
    let flags = [
        "--skip-outbound-cidrs",
        "10.96.0.0/12,fd00::/8",
        "--skip-inbound-ports",
        "8022",
    ];
    let printed = pod.init_ok(&[&["--dry-run"][..], &flags].concat());
    assert!(printed.contains("table inet infermesh {"), "{printed}");
    assert!(
        printed.contains("ip daddr { 10.96.0.0/12 } return"),
        "{printed}"
    );
    assert!(
        printed.contains("tcp dport { 4140, 4143, 4191, 8022 } return"),
        "{printed}"
    );
    assert!(
        pod.tables().is_empty(),
        "dry run applied {:?}",
        pod.tables()
    );

    // It needs no nft at all.
    let without_nft = pod.exec(
        "env",
        &[
            &[
                "PATH=/nonexistent",
                init_binary().to_str().unwrap(),
                "--dry-run",
            ][..],
            &flags,
        ]
        .concat(),
    );
    assert!(without_nft.status.success(), "{}", stderr(&without_nft));
    assert_eq!(String::from_utf8_lossy(&without_nft.stdout), printed);

    // What it prints is exactly what a real run gives nft.
    pod.nft_apply(&printed);
    let from_dry_run = pod.nft(&["list", "ruleset"]);
    pod.init_ok(&["--clean"]);
    assert!(pod.tables().is_empty());
    pod.init_ok(&flags);
    assert_eq!(pod.nft(&["list", "ruleset"]), from_dry_run);

    // --clean --dry-run prints the removal and removes nothing.
    let clean = pod.init_ok(&["--clean", "--dry-run"]);
    assert_eq!(
        clean,
        "table inet infermesh\ndelete table inet infermesh\ntable ip infermesh\ndelete table ip infermesh\n"
    );
    assert_eq!(pod.tables(), ["inet infermesh"]);
}

#[test]
fn outbound_tcp_is_redirected_except_the_proxy_user_skips_and_loopback() {
    let Pods { pod, peer } = or_skip!(
        Pods::create(),
        "outbound_tcp_is_redirected_except_the_proxy_user_skips_and_loopback"
    );
    let listeners = Listeners(vec![
        ("pod outbound 127.0.0.1:4140", pod.listen("127.0.0.1:4140")),
        ("pod 127.0.0.1:8000", pod.listen("127.0.0.1:8000")),
        ("pod 10.77.0.1:8000", pod.listen("10.77.0.1:8000")),
        ("peer 10.77.0.2:8000", peer.listen("10.77.0.2:8000")),
        ("peer 10.77.0.2:9050", peer.listen("10.77.0.2:9050")),
        ("peer 10.77.0.3:8000", peer.listen("10.77.0.3:8000")),
    ]);

    // Before the rules: every connection goes where it was sent.
    let _client = pod.connect("10.77.0.2:8000");
    assert_eq!(listeners.arrival().at, "peer 10.77.0.2:8000");

    pod.init_ok(&[
        "--skip-outbound-ports",
        "22,9000-9100",
        "--skip-outbound-cidrs",
        "10.77.0.3/32,fd00:1::/32",
    ]);

    let _client = pod.connect("10.77.0.2:8000");
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod outbound 127.0.0.1:4140");
    assert_eq!(arrival.original_dst, Some(addr("10.77.0.2:8000")));
    assert_eq!(arrival.peer.ip(), POD.parse::<IpAddr>().unwrap());

    // Another user's connection is redirected too...
    pod.connect_as(3000, 3000, PEER, 8000);
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod outbound 127.0.0.1:4140");
    assert_eq!(arrival.original_dst, Some(addr("10.77.0.2:8000")));
    // ...but not the proxy's own, by UID or by GID.
    pod.connect_as(2102, 2102, PEER, 8000);
    assert_eq!(listeners.arrival().at, "peer 10.77.0.2:8000");
    pod.connect_as(3000, 2102, PEER, 8000);
    assert_eq!(listeners.arrival().at, "peer 10.77.0.2:8000");
    pod.connect_as(2102, 3000, PEER, 8000);
    assert_eq!(listeners.arrival().at, "peer 10.77.0.2:8000");

    // A skipped port (inside a skipped range) and a skipped CIDR go direct.
    let _client = pod.connect("10.77.0.2:9050");
    assert_eq!(listeners.arrival().at, "peer 10.77.0.2:9050");
    let _client = pod.connect(&format!("{PEER_SKIPPED}:8000"));
    assert_eq!(listeners.arrival().at, "peer 10.77.0.3:8000");

    // Loopback destinations, and the pod's own address (routed over lo).
    let _client = pod.connect("127.0.0.1:8000");
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod 127.0.0.1:8000");
    assert_eq!(arrival.original_dst, Some(addr("127.0.0.1:8000")));
    let _client = pod.connect("10.77.0.1:8000");
    assert_eq!(listeners.arrival().at, "pod 10.77.0.1:8000");

    // After --clean, direct again.
    pod.init_ok(&["--clean"]);
    let _client = pod.connect("10.77.0.2:8000");
    assert_eq!(listeners.arrival().at, "peer 10.77.0.2:8000");
}

#[test]
fn inbound_tcp_is_redirected_except_the_admin_and_skipped_ports() {
    let Pods { pod, peer } = or_skip!(
        Pods::create(),
        "inbound_tcp_is_redirected_except_the_admin_and_skipped_ports"
    );
    let listeners = Listeners(vec![
        ("pod inbound :4143", pod.listen("0.0.0.0:4143")),
        ("pod admin :4191", pod.listen("0.0.0.0:4191")),
        ("pod app :8000", pod.listen("0.0.0.0:8000")),
        ("pod app :8022", pod.listen("0.0.0.0:8022")),
        ("pod outbound 127.0.0.1:4140", pod.listen("127.0.0.1:4140")),
    ]);
    pod.init_ok(&["--skip-inbound-ports", "8022"]);

    let _client = peer.connect("10.77.0.1:8000");
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod inbound :4143");
    assert_eq!(arrival.original_dst, Some(addr("10.77.0.1:8000")));
    assert_eq!(arrival.peer.ip(), PEER.parse::<IpAddr>().unwrap());

    let _client = peer.connect("10.77.0.1:4191");
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod admin :4191");
    assert_eq!(arrival.original_dst, Some(addr("10.77.0.1:4191")));

    let _client = peer.connect("10.77.0.1:8022");
    assert_eq!(listeners.arrival().at, "pod app :8022");

    // A connection straight to the inbound port is left as it is.
    let _client = peer.connect("10.77.0.1:4143");
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod inbound :4143");
    assert_eq!(arrival.original_dst, Some(addr("10.77.0.1:4143")));

    // The app's own connection to its local port is not inbound traffic.
    let _client = pod.connect("10.77.0.1:8000");
    assert_eq!(listeners.arrival().at, "pod app :8000");

    pod.init_ok(&["--clean"]);
    let _client = peer.connect("10.77.0.1:8000");
    assert_eq!(listeners.arrival().at, "pod app :8000");
}

#[test]
fn udp_is_not_redirected() {
    let Pods { pod, peer } = or_skip!(Pods::create(), "udp_is_not_redirected");
    let pod_outbound = pod.udp("127.0.0.1:4140");
    let pod_inbound = pod.udp("0.0.0.0:4143");
    let pod_app = pod.udp("10.77.0.1:5353");
    let peer_dns = peer.udp("10.77.0.2:53");
    let tcp_outbound = Listeners(vec![(
        "pod outbound 127.0.0.1:4140",
        pod.listen("127.0.0.1:4140"),
    )]);
    pod.init_ok(&[]);

    let received = |socket: &UdpSocket| -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => Some(buf[..n].to_vec()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("recv: {e}"),
        }
    };
    let wait = |socket: &UdpSocket| -> Option<Vec<u8>> {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            if let Some(data) = received(socket) {
                return Some(data);
            }
            if Instant::now() > deadline {
                return None;
            }
        }
    };

    // Outbound: a DNS-like query reaches the peer, not the proxy's port.
    let client = pod.udp("0.0.0.0:0");
    client
        .send_to(b"query", addr("10.77.0.2:53"))
        .expect("send udp");
    assert_eq!(wait(&peer_dns).as_deref(), Some(&b"query"[..]));
    assert_eq!(received(&pod_outbound), None);

    // Inbound: a datagram to the pod reaches the app's socket.
    let sender = peer.udp("0.0.0.0:0");
    sender
        .send_to(b"inbound", addr("10.77.0.1:5353"))
        .expect("send udp");
    assert_eq!(wait(&pod_app).as_deref(), Some(&b"inbound"[..]));
    assert_eq!(received(&pod_inbound), None);

    // The same rules do redirect TCP (the control).
    let _client = pod.connect("10.77.0.2:53");
    assert_eq!(tcp_outbound.arrival().at, "pod outbound 127.0.0.1:4140");
}

#[test]
fn ipv6_is_redirected_by_default_and_not_with_ipv6_false() {
    let Pods { pod, peer } = or_skip!(
        Pods::create(),
        "ipv6_is_redirected_by_default_and_not_with_ipv6_false"
    );
    let listeners = Listeners(vec![
        ("pod outbound [::1]:4140", pod.listen("[::1]:4140")),
        ("pod outbound 127.0.0.1:4140", pod.listen("127.0.0.1:4140")),
        ("pod inbound [::]:4143", pod.listen("[::]:4143")),
        ("pod app [fd77::1]:8000", pod.listen("[fd77::1]:8000")),
        ("peer [fd77::2]:8000", peer.listen("[fd77::2]:8000")),
        ("peer [fd77::2]:9000", peer.listen("[fd77::2]:9000")),
        ("peer 10.77.0.2:8000", peer.listen("10.77.0.2:8000")),
    ]);
    let peer6 = format!("[{PEER6}]:8000");
    pod.init_ok(&[
        "--skip-outbound-cidrs",
        "fd77::2/128",
        "--skip-outbound-ports",
        "9000",
    ]);
    // A skipped IPv6 CIDR goes direct; then without it, it is redirected.
    let _client = pod.connect(&peer6);
    assert_eq!(listeners.arrival().at, "peer [fd77::2]:8000");
    let _client = pod.connect(&format!("[{PEER6}]:9000"));
    assert_eq!(listeners.arrival().at, "peer [fd77::2]:9000");

    pod.init_ok(&[]);
    assert_eq!(pod.tables(), ["inet infermesh"]);
    let _client = pod.connect(&peer6);
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod outbound [::1]:4140");
    assert_eq!(arrival.original_dst, Some(addr(&peer6)));
    assert_eq!(arrival.peer.ip(), POD6.parse::<IpAddr>().unwrap());

    let _client = peer.connect(&format!("[{POD6}]:8000"));
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod inbound [::]:4143");
    assert_eq!(arrival.original_dst, Some(addr(&format!("[{POD6}]:8000"))));

    // --ipv6=false replaces the inet table with an IPv4-only ip table.
    let summary = pod.init_ok(&["--ipv6=false"]);
    assert!(summary.contains("table ip infermesh"), "{summary}");
    assert_eq!(pod.tables(), ["ip infermesh"]);
    let _client = pod.connect(&peer6);
    assert_eq!(listeners.arrival().at, "peer [fd77::2]:8000");
    let _client = peer.connect(&format!("[{POD6}]:8000"));
    assert_eq!(listeners.arrival().at, "pod app [fd77::1]:8000");
    let _client = pod.connect("10.77.0.2:8000");
    let arrival = listeners.arrival();
    assert_eq!(arrival.at, "pod outbound 127.0.0.1:4140");
    assert_eq!(arrival.original_dst, Some(addr("10.77.0.2:8000")));

    pod.init_ok(&["--clean"]);
    assert!(pod.tables().is_empty());
}

#[test]
fn bad_flags_exit_2_with_the_reason_and_apply_nothing() {
    let pod = or_skip!(
        Netns::create(),
        "bad_flags_exit_2_with_the_reason_and_apply_nothing"
    );
    let cases: &[(&[&str], &str)] = &[
        (&["--proxy-uid", "0"], "the proxy must not run as root"),
        (&["--proxy-gid", "0"], "must not run in the root group"),
        (
            &["--proxy-uid", "nobody"],
            "invalid value 'nobody' for '--proxy-uid <UID>'",
        ),
        (
            &["--outbound-port", "0"],
            "invalid value '0' for '--outbound-port <PORT>'",
        ),
        (
            &["--inbound-port", "65536"],
            "invalid value '65536' for '--inbound-port <PORT>'",
        ),
        (
            &["--admin-port", "4140"],
            "--outbound-port and --admin-port are both 4140",
        ),
        (
            &["--skip-outbound-ports", "22,70000"],
            "port 70000 is out of range (1-65535)",
        ),
        (
            &["--skip-outbound-ports", "9100-9000"],
            "range 9100-9000 runs backwards",
        ),
        (
            &["--skip-inbound-ports", "http"],
            "\"http\" is not a port number",
        ),
        (
            &["--skip-outbound-cidrs", "10.0.0.1/8"],
            "did you mean 10.0.0.0/8?",
        ),
        (
            &["--skip-outbound-cidrs", "10.0.0.0/33"],
            "no valid prefix length (0-32)",
        ),
        (
            &["--skip-outbound-cidrs", "10.0.0/8"],
            "not an IPv4 or IPv6 address",
        ),
        (
            &["--ipv6=false", "--skip-outbound-cidrs", "fd00::/8"],
            "--ipv6=false installs IPv4 rules only",
        ),
        (&["--ipv6=maybe"], "invalid value 'maybe' for '--ipv6"),
    ];
    for (args, reason) in cases {
        let output = pod.init(args);
        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(reason),
            "{args:?}: {stderr:?} lacks {reason:?}"
        );
        assert!(output.stdout.is_empty(), "{args:?} printed something");
    }
    assert!(
        pod.tables().is_empty(),
        "bad flags applied {:?}",
        pod.tables()
    );
}

#[test]
fn a_missing_or_failing_nft_exits_1_and_applies_nothing() {
    let pod = or_skip!(
        Netns::create(),
        "a_missing_or_failing_nft_exits_1_and_applies_nothing"
    );
    let init = init_binary();
    let output = pod.exec(
        "env",
        &["PATH=/nonexistent", init.to_str().expect("utf-8 path")],
    );
    let reason = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{reason}");
    assert!(
        reason.contains("nft not found: install the Debian package nftables"),
        "{reason}"
    );
    assert!(pod.tables().is_empty());

    // nft refusing (here: not allowed, run by the proxy's user) exits 1 with
    // nft's own reason, and the rules in force stay as they were.
    pod.init_ok(&["--skip-outbound-ports", "22"]);
    let before = pod.nft(&["list", "ruleset"]);
    let (_dir, copy) = world_readable_init();
    let output = pod.exec(
        "setpriv",
        &[
            "--reuid",
            "2102",
            "--regid",
            "2102",
            "--clear-groups",
            copy.to_str().expect("utf-8 path"),
        ],
    );
    let reason = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{reason}");
    assert!(reason.contains("nft refused the ruleset"), "{reason}");
    assert!(reason.contains("nothing was applied"), "{reason}");
    assert!(reason.contains("Operation not permitted"), "{reason}");
    assert!(output.stdout.is_empty());
    assert_eq!(pod.nft(&["list", "ruleset"]), before);
}
