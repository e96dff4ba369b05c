"""The official azure-ai-inference SDK against a running amlserve: model info, chat, streaming chat, extras.

Usage: python azure_inference_sdk.py http://127.0.0.1:PORT [API_KEY]   (exits non-zero on a failed check)
"""
import sys

from azure.ai.inference import ChatCompletionsClient, EmbeddingsClient
from azure.ai.inference.models import SystemMessage, UserMessage
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError


def main(base: str, key: str) -> None:
    client = ChatCompletionsClient(endpoint=base, credential=AzureKeyCredential(key))

    info = client.get_model_info()
    assert info.model_name == "SmolLM2-135M-Instruct.Q4_1", info
    assert info.model_type == "chat-completions", info

    messages = [SystemMessage("You are a helpful assistant."), UserMessage("What is the capital of France? Answer in one sentence.")]
    result = client.complete(messages=messages, max_tokens=24, temperature=0)
    text = result.choices[0].message.content
    assert "Paris" in text, text
    assert result.usage.completion_tokens > 0, result.usage

    pieces = []
    for update in client.complete(messages=messages, max_tokens=24, temperature=0, stream=True):
        if update.choices and update.choices[0].delta.content:
            pieces.append(update.choices[0].delta.content)
    assert "".join(pieces) == text, ("".join(pieces), text)

    # model_extras travel with `extra-parameters: pass-through`.
    extra = client.complete(messages=messages, max_tokens=24, temperature=0.9, seed=5, model_extras={"top_k": 1})
    assert extra.choices[0].message.content == text, extra.choices[0].message.content

    embedder = EmbeddingsClient(endpoint=base, credential=AzureKeyCredential(key))
    emb = embedder.embed(input=["A cat sits on the mat", "Stock markets fell"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb

    if key != "unused":
        bad = ChatCompletionsClient(endpoint=base, credential=AzureKeyCredential("wrong-key"))
        try:
            bad.get_model_info()
            raise AssertionError("wrong key accepted")
        except HttpResponseError as e:
            assert e.status_code == 401, e

    print("azure-ai-inference SDK checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "unused")
