"""The official openai Python SDK against an amlserve serving several models (tests/multi_model.rs): models
`chat` (the default) and `other`, embedding model `emb`.

Usage: python multi_model_sdk.py http://127.0.0.1:PORT   (exits non-zero on the first failed check)
"""
import sys

import openai
from openai import OpenAI


def main(base: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    assert ids == ["chat", "other", "emb"], ids

    for model in ("chat", "other"):
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=2, temperature=0
        )
        assert chat.model == model, chat
        comp = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
        assert comp.model == model, comp

    emb = client.embeddings.create(model="emb", input="A cat sits on the mat")
    assert emb.model == "emb" and len(emb.data[0].embedding) == 384, emb.model

    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and "chat (default), other" in str(e), e

    try:
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        raise AssertionError("an embedding model served a chat")
    except openai.BadRequestError as e:
        assert "embedding model" in str(e), e

    print("multi-model SDK checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
