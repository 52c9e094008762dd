#!/usr/bin/env python3
"""Sends events to sluice with the fluent-logger library from PyPI, as an application would.

Each record carries `seq` (0..count-1) and `client` so the tests can check that every
event arrived exactly once. Exits non-zero if the library reports an error.
"""
import argparse
import sys

from fluent import asyncsender, sender

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--prefix", default="app")
p.add_argument("--tag", required=True, help="label; the event tag is PREFIX.TAG")
p.add_argument("--count", type=int, default=100)
p.add_argument("--mode", choices=["sync", "async", "nanos"], default="sync")
a = p.parse_args()

cls = asyncsender.FluentSender if a.mode == "async" else sender.FluentSender
s = cls(a.prefix, host="127.0.0.1", port=a.port, timeout=10, nanosecond_precision=(a.mode != "sync"))
for i in range(a.count):
    ok = s.emit(a.tag, {"seq": i, "client": "python-" + a.mode, "log": "line %d from python" % i})
    if not ok:
        print("emit failed: %r" % (s.last_error,), file=sys.stderr)
        sys.exit(1)
s.close()
if a.mode != "async" and s.last_error is not None:
    print("close failed: %r" % (s.last_error,), file=sys.stderr)
    sys.exit(1)
