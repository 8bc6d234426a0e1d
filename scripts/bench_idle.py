#!/usr/bin/env python3
"""Opens N HTTP/1.1 keep-alive connections to ADDR, sends one request on each,
reads the answer, and holds them all open until told to stop (stdin closed).

Used by scripts/bench-idle.sh to measure a proxy's memory with many idle
client connections (issue: 1,000 concurrent idle keep-alive connections).
"""
import resource
import socket
import sys


def main() -> int:
    addr, count, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    host, port = addr.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 64)), hard))
    conns = []
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        s.sendall(request)
        head = s.recv(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            print(f"unexpected answer: {head[:80]!r}", file=sys.stderr)
            return 1
        conns.append(s)
    print(f"open {len(conns)}", flush=True)
    sys.stdin.read()
    for s in conns:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
