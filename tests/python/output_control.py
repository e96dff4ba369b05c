"""Structured outputs and tool calls through the official openai SDK (and tools through azure-ai-inference).

Usage: python output_control.py http://127.0.0.1:PORT   (exits non-zero on the first failed check)

Every output under a grammar must validate: 20 JSON schemas x 3 prompts are checked with `jsonschema`, as are
the arguments of every forced tool call.
"""
import json
import sys

import jsonschema
from openai import OpenAI
from pydantic import BaseModel

PROMPTS = [
    "Describe a person.",
    "Give me some data about a city.",
    "Answer in JSON.",
]

S = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, S]}}, "required": ["id"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"first": S, "last": S}, "required": ["first", "last"], "additionalProperties": False}}, "required": ["person"]},
    {"type": "object", "properties": {"points": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"], "additionalProperties": False}, "minItems": 2, "maxItems": 2}}, "required": ["points"]},
    {"type": "object", "properties": {"city": S, "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}, "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"const": "fixed"}, "b": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"nums": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3, "maxItems": 3}}, "required": ["nums"]},
    {"type": "object", "properties": {"maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}}, "required": ["maybe"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}, "genre": {"enum": ["drama", "comedy"]}}, "required": ["title", "year", "genre"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}, "required": ["matrix"]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}, "note": {"type": "string", "maxLength": 12}}, "required": ["level", "note"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "object", "properties": {"yes": {"type": "boolean"}}, "required": ["yes"], "additionalProperties": False}, {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}]}}, "required": ["answer"]},
]



def closed(schema):
    """OpenAI's strict mode: every object lists its properties and allows no others."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [closed(v) for v in schema]
    return schema


SCHEMAS = [closed(s) for s in SCHEMAS]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"], "additionalProperties": False},
    },
}
TOOLS = [WEATHER, TIME]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(BaseModel):
    name: str
    age: int


def chat(client, model, content, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=kw.pop("max_tokens", 160), temperature=0, **kw
    )


def structured(client, model):
    for i, schema in enumerate(SCHEMAS):
        for prompt in PROMPTS:
            r = chat(client, model, prompt, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop", (i, prompt, r.choices[0].finish_reason, text)
            jsonschema.validate(json.loads(text), schema)
    # json_object bounds nothing: greedy SmolLM2-135M can loop (`{"name":{"name":...` for "a JSON object holding
    # your name") until max_tokens; these prompts ask for a small one.
    ended = 0
    for prompt in ["Return a JSON object with the key city set to Paris.", "JSON with keys a and b, both numbers."]:
        r = chat(client, model, prompt, response_format={"type": "json_object"}, max_tokens=400)
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:  # cut by max_tokens: still the start of one object (nothing before it, no second value)
            assert text.startswith("{") and r.choices[0].finish_reason == "length", (prompt, text)
        ended += r.choices[0].finish_reason == "stop"
    assert ended >= 1, "no json_object answer ended"
    parsed = client.beta.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
        response_format=Person,
        max_tokens=60,
        temperature=0,
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person), parsed
    r = chat(client, model, "Pick a colour.", extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert r.choices[0].message.content in ("red", "green", "blue"), r
    r = chat(client, model, "A date:", extra_body={"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    import re

    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.choices[0].message.content), r
    # Streamed structured output is the same text.
    schema = SCHEMAS[10]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    whole = chat(client, model, PROMPTS[1], response_format=fmt).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in chat(client, model, PROMPTS[1], response_format=fmt, stream=True) if c.choices]
    assert "".join(parts) == whole, (parts, whole)


def tools(client, model):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "get_time"}}]:
        r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls, c
        for call in c.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function", call
            if isinstance(choice, dict):
                assert call.function.name == choice["function"]["name"], call
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
        # Streamed, reassembled by the SDK's stream helper: the same calls.
        with client.beta.chat.completions.stream(model=model, messages=ask, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0) as s:
            final = s.get_final_completion()
        got = [(t.function.name, json.loads(t.function.arguments)) for t in final.choices[0].message.tool_calls]
        want = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
        assert got == want, (got, want)
    # parallel_tool_calls=false: exactly one call.
    r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=0)
    assert len(r.choices[0].message.tool_calls) == 1, r
    # Round trip: call -> result -> final answer in text.
    call = r.choices[0].message.tool_calls[0]
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "unit": "celsius"})},
    ]
    final = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=40, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls, final
    # auto: text or calls, and whatever comes is well-formed.
    r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, max_tokens=120, temperature=0)
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    else:
        assert c.message.content is not None and not c.message.content.startswith("<"), c


def azure_tools(base):
    from azure.ai.inference import ChatCompletionsClient
    from azure.ai.inference.models import ChatCompletionsToolDefinition, FunctionDefinition, UserMessage
    from azure.core.credentials import AzureKeyCredential

    client = ChatCompletionsClient(endpoint=base, credential=AzureKeyCredential("unused"))
    fn = WEATHER["function"]
    tool = ChatCompletionsToolDefinition(function=FunctionDefinition(name=fn["name"], description=fn["description"], parameters=fn["parameters"]))
    r = client.complete(messages=[UserMessage(content="Weather in Rome?")], tools=[tool], tool_choice="required", max_tokens=120, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), fn["parameters"])


def main(base):
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    structured(client, model)
    tools(client, model)
    azure_tools(base)
    print("output control checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
