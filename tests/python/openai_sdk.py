"""The official openai Python SDK against a running amlserve: chat, streaming chat, completions, models, errors.

Usage: python openai_sdk.py http://127.0.0.1:PORT   (exits non-zero on the first failed check)
"""
import sys

import openai
from openai import OpenAI


def main(base: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    models = client.models.list()
    ids = [m.id for m in models.data]
    # The language model first (the default), then the embedding model the tests serve beside it.
    assert ids == ["SmolLM2-135M-Instruct.Q4_1", "all-minilm-l6-v2"], ids
    assert [m.model_type for m in models.data] == ["chat-completions", "embeddings"], models.data
    model = ids[0]

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=24,
        temperature=0,
    )
    text = chat.choices[0].message.content
    assert "Paris" in text, text
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens == 42 and chat.usage.completion_tokens > 0, chat.usage

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert roles == ["assistant"], roles
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert finish == chat.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in comp.choices[0].text, comp.choices[0].text
    assert comp.usage.completion_tokens <= 5

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=3)
        raise AssertionError("empty messages accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "messages" in str(e), e

    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=3
        )
        raise AssertionError("temperature 3 accepted")
    except openai.BadRequestError as e:
        assert "temperature" in str(e), e

    # The SDK asks for base64 by default and decodes it.
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["A cat sits on the mat", "A kitten rests"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb
    assert abs(sum(x * x for x in emb.data[0].embedding) - 1.0) < 1e-4
    floats = client.embeddings.create(model="all-minilm-l6-v2", input="A kitten rests", encoding_format="float")
    assert all(abs(a - b) < 1e-6 for a, b in zip(floats.data[0].embedding, emb.data[1].embedding))
    assert emb.usage.prompt_tokens > 0

    print("openai SDK checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
