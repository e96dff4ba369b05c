"""Schemathesis hooks for tests/schemathesis.rs: keeps generation requests short on a CPU.

The token-limit fields accept any integer from 1 up (the context window is checked once the prompt is
tokenized), but generating thousands of tokens per case would take the run minutes. Values inside the
documented range are lowered to at most MAX_GENERATED, which keeps them inside it, so a positive case stays
positive; values outside it (negative cases: 0, -3, 1.5, "ten", true) are left as generated.
"""
import os
import sys

import schemathesis

# Hypothesis describes strategies by parsing source with `ast`; deep in a nested request schema that can hit
# the default limit of 1000 and fail inside CPython ("AST constructor recursion depth mismatch").
sys.setrecursionlimit(20000)

LIMIT_FIELDS = {"max_tokens", "max_completion_tokens", "max_new_tokens"}
MAX_GENERATED = int(os.environ.get("AMLSERVE_SCHEMATHESIS_MAX_TOKENS", "4"))


def _in_documented_range(value):
    # Integral floats count: JSON Schema's integer includes 5.0, and so does the server.
    if type(value) is float:
        return value.is_integer() and value >= 1
    return type(value) is int and value >= 1


def _clamp(value):
    if isinstance(value, dict):
        return {
            k: min(v, MAX_GENERATED) if k in LIMIT_FIELDS and _in_documented_range(v) else _clamp(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_clamp(v) for v in value]
    return value


@schemathesis.hook
def map_case(context, case):
    # map_case (not map_body) so the coverage phase's cases are lowered too.
    if isinstance(case.body, (dict, list)):
        case.body = _clamp(case.body)
    return case
