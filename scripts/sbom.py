#!/usr/bin/env python3
"""A CycloneDX 1.5 SBOM (JSON) of what the amlserve binary is built from: `make sbom`.

Reads `cargo metadata --locked` (the dependency graph cargo resolved for this platform, no build needed) and
Cargo.lock (each crate's registry checksum), and lists every crate reachable from the `amlserve` package through
normal (run-time) dependencies: name, version, package URL (pkg:cargo/...), declared license, the SHA-256 the Rust
crate registry publishes, and the dependency edges. Build-only and dev-only crates are left out: they are not in
the binary. `cargo cyclonedx` (the cargo-cyclonedx crate) makes the same kind of document, but has to be compiled
first; this needs only cargo and Python.

Usage: scripts/sbom.py [OUT]   (default target/sbom/amlserve.cdx.json; prints a one-line summary)
Env: SBOM_TARGET (the target triple to resolve for, default x86_64-unknown-linux-gnu).
"""

import datetime
import json
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "amlserve"


def metadata():
    target = os.environ.get("SBOM_TARGET", "x86_64-unknown-linux-gnu")
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def checksums():
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    return {(p["name"], p["version"]): p["checksum"] for p in lock["package"] if "checksum" in p}


def runtime_closure(meta, root_id):
    """Package ids reachable from root_id through normal dependencies, with their normal-dependency edges."""
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    edges, seen, todo = {}, {root_id}, [root_id]
    while todo:
        pid = todo.pop()
        deps = [d["pkg"] for d in nodes[pid]["deps"] if any(k["kind"] is None for k in d["dep_kinds"])]
        edges[pid] = sorted(deps)
        for d in deps:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return edges


def component(pkg, sums):
    purl = f"pkg:cargo/{pkg['name']}@{pkg['version']}"
    c = {"type": "library", "bom-ref": purl, "name": pkg["name"], "version": pkg["version"], "purl": purl}
    if pkg.get("description"):
        c["description"] = " ".join(pkg["description"].split())
    if pkg.get("license"):
        c["licenses"] = [{"expression": pkg["license"]}]
    if (pkg["name"], pkg["version"]) in sums:
        c["hashes"] = [{"alg": "SHA-256", "content": sums[(pkg["name"], pkg["version"])]}]
    refs = [{"type": "vcs", "url": pkg["repository"]}] if pkg.get("repository") else []
    if refs:
        c["externalReferences"] = refs
    return c


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "sbom" / "amlserve.cdx.json"
    meta = metadata()
    packages = {p["id"]: p for p in meta["packages"]}
    root_id = next(i for i in meta["workspace_members"] if packages[i]["name"] == PACKAGE)
    edges = runtime_closure(meta, root_id)
    sums = checksums()
    ref = {pid: f"pkg:cargo/{packages[pid]['name']}@{packages[pid]['version']}" for pid in edges}
    root = component(packages[root_id], sums)
    root["type"] = "application"
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "tools": {"components": [{"type": "application", "name": "scripts/sbom.py (cargo metadata)"}]},
            "component": root,
        },
        "components": [component(packages[pid], sums) for pid in sorted(edges, key=ref.get) if pid != root_id],
        "dependencies": [{"ref": ref[pid], "dependsOn": [ref[d] for d in deps]} for pid, deps in sorted(edges.items())],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bom, indent=1) + "\n")
    unlicensed = [c["name"] for c in bom["components"] if "licenses" not in c]
    print(f"{out}: CycloneDX {bom['specVersion']}, {packages[root_id]['name']} {packages[root_id]['version']}, "
          f"{len(bom['components'])} crates"
          + (f", without a declared license: {', '.join(unlicensed)}" if unlicensed else ""))


if __name__ == "__main__":
    main()
