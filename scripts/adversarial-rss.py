#!/usr/bin/env python3
"""Rounds of memory-hungry traffic against a running amlserve; prints its RSS (MiB) after each round.

Each round sends, 8 at a time, twice each: a 2 MB digit prompt, a /score body of 300k one-key objects, a
100-prompt completion with 16 stops of 1,000 characters, and a ~3,000-token chat. Used to find what the
server keeps resident after bursts (see src/allocator.rs).

Usage: scripts/adversarial-rss.py PORT SERVER_PID ROUNDS
(start the server with e.g. `target/release/amlserve --port PORT --prefix-cache-mb 0`, so the prefix cache's
own, intended, memory does not count).
"""
import json, sys, time, threading, urllib.request, os
port, pid = sys.argv[1], sys.argv[2]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])//1024
def post(path, body, ct="application/json"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers={"content-type": ct})
    try:
        with urllib.request.urlopen(req, timeout=120) as r: r.read(); return r.status
    except urllib.error.HTTPError as e: e.read(); return e.code
    except Exception as e: return str(e)
print("start", rss())
big = [
 ("/v1/completions", json.dumps({"prompt": "7"*(2<<20), "max_tokens": 1})),
 ("/score", json.dumps({"inputs": [{"a":1}]*300000})),
 ("/v1/completions", json.dumps({"prompt": ["word "*500]*100, "max_tokens": 4, "stop": ["z"*1000]*16})),
 ("/v1/chat/completions", json.dumps({"messages":[{"role":"user","content":"hello "*3000}], "max_tokens": 8})),
]
for rnd in range(int(sys.argv[3])):
    ts=[]
    for path, body in big*2:
        t=threading.Thread(target=post, args=(path, body.encode())); t.start(); ts.append(t)
    for t in ts: t.join()
    print("round", rnd, rss(), flush=True)
time.sleep(3)
print("end", rss())
