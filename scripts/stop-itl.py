#!/usr/bin/env python3
"""Inter-token latency of one stream next to a neighbour with and without 16 stop strings of 1,000 characters.

Prints p50/p99 ITL (ms) of a 200-token stream while a 400-token neighbour runs, alternating the two cases
twice. Usage: scripts/stop-itl.py PORT (against a running release amlserve on 127.0.0.1:PORT).
"""
import json, sys, time, threading, http.client, statistics
port = int(sys.argv[1])
def stream(body, out):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse(); last = None; gaps = []
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk: break
        now = time.perf_counter()
        for _ in range(chunk.count(b"data: ")):
            if last is not None: gaps.append((now - last) * 1000)
            last = now
    out.extend(gaps)
base = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
def run(with_stops):
    out = []; ts = []
    t = threading.Thread(target=stream, args=(base, out)); ts.append(t)
    if with_stops:
        hostile = dict(base, stop=[f"{i}" + "z" * 999 for i in range(16)], max_tokens=400)
        ts.append(threading.Thread(target=stream, args=(hostile, [])))
    else:
        ts.append(threading.Thread(target=stream, args=(dict(base, max_tokens=400), [])))
    for t in ts: t.start()
    for t in ts: t.join()
    return statistics.median(out), sorted(out)[int(len(out) * 0.99)]
for label, w in [("neighbour without stops", False), ("neighbour with 16 stops of 1000 chars", True)] * 2:
    p50, p99 = run(w)
    print(f"| {label} | {p50:.1f} | {p99:.1f} |")
