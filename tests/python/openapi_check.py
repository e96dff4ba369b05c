"""Validates a running amlserve's /swagger.json with openapi-spec-validator.

Usage: python openapi_check.py http://127.0.0.1:PORT
"""
import json
import sys
import urllib.request

from openapi_spec_validator import validate


def main(base: str) -> None:
    with urllib.request.urlopen(f"{base}/swagger.json") as r:
        spec = json.load(r)
    validate(spec)
    paths = set(spec["paths"])
    for route in ["/", "/health", "/score", "/v1/chat/completions", "/v1/completions", "/v1/models", "/info", "/chat/completions", "/metrics", "/v1/embeddings", "/embeddings"]:
        assert route in paths, route
    print("openapi document valid")


if __name__ == "__main__":
    main(sys.argv[1])
