"""Plain socket clients for the pods suite, run inside a pod with
`ip netns exec`: a TCP echo exchange, a UDP echo exchange, and a bare TCP
connect, each printing one JSON line with what happened and how long it took.

Usage: sockets.py tcp-echo HOST PORT TEXT
       sockets.py udp-echo HOST PORT TEXT
       sockets.py banner HOST PORT      (reads the first line a server sends, sending nothing)
       sockets.py connect HOST PORT
"""

import json
import socket
import sys
import time


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_echo(host: str, port: int, text: str) -> dict:
    data = text.encode()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(data)
        reply = b""
        while len(reply) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return {"ok": True, "reply": reply.decode(errors="replace")}


def udp_echo(host: str, port: int, text: str) -> dict:
    with socket.socket(family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(text.encode(), (host, port))
        reply, peer = sock.recvfrom(65536)
    return {"ok": True, "reply": reply.decode(errors="replace"), "peer": peer[0]}


def banner(host: str, port: int) -> dict:
    with socket.create_connection((host, port), timeout=5) as sock:
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            reply += chunk
    return {"ok": True, "reply": reply.decode(errors="replace")}


def connect(host: str, port: int) -> dict:
    with socket.create_connection((host, port), timeout=10):
        pass
    return {"ok": True}


def main() -> None:
    command, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    started = time.monotonic()
    try:
        if command == "tcp-echo":
            result = tcp_echo(host, port, sys.argv[4])
        elif command == "udp-echo":
            result = udp_echo(host, port, sys.argv[4])
        elif command == "banner":
            result = banner(host, port)
        elif command == "connect":
            result = connect(host, port)
        else:
            sys.exit(f"unknown command {command}")
    except OSError as error:
        result = {"ok": False, "error": type(error).__name__, "message": str(error)}
    result["seconds"] = time.monotonic() - started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
