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


def _grammars(body):
    """Output-control fields whose validity the schema cannot say (a regex or Lark grammar that compiles, a
    schema llguidance can enforce, a named tool that is in `tools`) are set to values that are valid; values
    of the wrong shape (negative cases) are left as generated."""
    if not isinstance(body, dict):
        return body
    so = body.get("structured_outputs")
    if isinstance(so, dict):
        if isinstance(so.get("regex"), str):
            so["regex"] = "[0-9]{1,3}"
        if isinstance(so.get("grammar"), str):
            so["grammar"] = 'start: "yes" | "no"'
        if isinstance(so.get("json"), (dict, str)):
            so["json"] = {"type": "object"}
    rf = body.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict) and isinstance(rf["json_schema"].get("schema"), dict):
        rf["json_schema"]["schema"] = {"type": "object"}
    if isinstance(so, dict) and isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        del body["structured_outputs"]
    rf2 = body.get("response_format")
    grammar = isinstance(body.get("structured_outputs"), dict) or (isinstance(rf2, dict) and rf2.get("type") != "text")
    if body.get("ignore_eos") is True and (grammar or (isinstance(body.get("tools"), list) and body["tools"])):
        body["ignore_eos"] = False  # a grammar ends where it is complete: ignore_eos with one is a 400
    top = body.get("top_logprobs")
    if type(top) is int and 0 < top <= 20 and body.get("logprobs") is not True:
        body["logprobs"] = True  # top_logprobs needs logprobs: true
    tools = body.get("tools")
    if isinstance(tools, list) and tools and body.get("tool_choice") != "none":
        # Tools and a response grammar cannot be combined (a 400 the schema cannot express).
        body.pop("structured_outputs", None)
        if isinstance(body.get("response_format"), dict):
            body["response_format"] = {"type": "text"}
    for t in tools if isinstance(tools, list) else []:
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("parameters"), dict):
            t["function"]["parameters"] = {"type": "object"}
    names = [t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)] if isinstance(tools, list) else []
    choice = body.get("tool_choice")
    named = isinstance(choice, dict) and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    if (named and choice["function"]["name"] not in names) or (choice in ("required", "auto") and not names):
        body["tool_choice"] = "none"
    if isinstance(tools, list) and len(set(names)) < len(names):
        body["tools"] = []
        if choice is not None:
            body["tool_choice"] = "none"
    return body


@schemathesis.hook
def map_case(context, case):
    # map_case (not map_body) so the coverage phase's cases are lowered too.
    if isinstance(case.body, (dict, list)):
        case.body = _grammars(_clamp(case.body))
    return case
