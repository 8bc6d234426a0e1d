#!/usr/bin/env python3
"""Opens N HTTP/1.1 keep-alive connections to ADDR, sends one request on each,
reads the whole answer, and holds them all open until told to stop (stdin
closed). Prints `open N SECONDS` once every connection is open and idle.

Used by scripts/bench.sh (scenario `idle_conns`) to measure a proxy's memory
with many idle client connections.
"""
import resource
import socket
import sys
import time


def read_response(s: socket.socket) -> bytes:
    """Reads one response with a content-length body; returns its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data[:80]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    return head


def main() -> int:
    addr, count, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    host, port = addr.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 64)), hard))
    conns = []
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    start = time.monotonic()
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        s.sendall(request)
        head = read_response(s)
        if not head.startswith(b"HTTP/1.1 200"):
            print(f"unexpected answer: {head[:80]!r}", file=sys.stderr)
            return 1
        conns.append(s)
    print(f"open {len(conns)} {time.monotonic() - start:.2f}", flush=True)
    sys.stdin.read()
    for s in conns:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
