#!/usr/bin/env python3
"""Captures what real Forward clients send, as seeds for the `forward` fuzz target.

Listens on loopback, runs Python's fluent-logger (PyPI) and fluent-logger-golang (the Docker
driver's library, built by tests/deps.sh) in each of their modes, acks every chunk it is
asked to, and writes each connection's bytes to fuzz/seeds/forward/<client>_<mode>.

    bash tests/deps.sh && target/test-deps/venv/bin/python fuzz/capture.py
"""
import os
import socket
import subprocess
import sys
import threading
import time

import msgpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPS = os.path.join(ROOT, "target", "test-deps")
OUT = os.path.join(ROOT, "fuzz", "seeds", "forward")

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
port = listener.getsockname()[1]
captured = []


def serve(conn):
    data = bytearray()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    while chunk := conn.recv(65536):
        data += chunk
        unpacker.feed(chunk)
        for msg in unpacker:
            opts = msg[-1] if isinstance(msg, list) and len(msg) > 2 else None
            if isinstance(opts, dict) and "chunk" in opts:
                conn.sendall(msgpack.packb({"ack": opts["chunk"]}))
    conn.close()
    captured.append(bytes(data))


def accept():
    while True:
        conn, _ = listener.accept()
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        threads.append(t)


threads = []
threading.Thread(target=accept, daemon=True).start()

clients = {
    "python_sync": [sys.executable, "tests/clients/fluent_send.py", "--mode", "sync"],
    "python_nanos": [sys.executable, "tests/clients/fluent_send.py", "--mode", "nanos"],
    "python_async": [sys.executable, "tests/clients/fluent_send.py", "--mode", "async"],
    "go_sync": [os.path.join(DEPS, "fluent-go-client"), "-mode", "sync"],
    "go_async": [os.path.join(DEPS, "fluent-go-client"), "-mode", "async"],
    "go_ack": [os.path.join(DEPS, "fluent-go-client"), "-mode", "ack"],
}
for name, argv in clients.items():
    flag = "--" if argv[0] == sys.executable else "-"
    argv = argv + [flag + "port", str(port), flag + "tag", "cap", flag + "count", "3"]
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    # The client has exited, so its connections are closed: wait for their readers.
    for _ in range(100):
        if captured and all(not t.is_alive() for t in threads):
            break
        time.sleep(0.05)
    data = b"".join(captured)
    captured.clear()
    threads.clear()
    if not data:
        sys.exit(f"{name}: nothing captured")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
    print(f"{name}: {len(data)} bytes")
