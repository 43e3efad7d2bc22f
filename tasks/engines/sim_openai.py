"""The sim engine's OpenAI wire format, without I/O: request validation, error bodies, full responses and
pre-rendered SSE chunks.

Generated text is `tasks.tokenizer.token_text(i)` for the i-th output token; every reply ends with
finish_reason "length" because the sim always generates exactly `max_tokens` tokens.
"""
from __future__ import annotations

import json
from typing import Any

from tasks.tokenizer import VOCAB, count_tokens, token_text

DEFAULT_MAX_TOKENS = 16
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# The i-th generated token's text as a JSON string body (quotes stripped), precomputed once.
_TOKEN_JSON: list[str] = [json.dumps(token_text(i))[1:-1] for i in range(len(VOCAB))]


class HttpError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def error_body(exc: HttpError) -> dict[str, Any]:
    return {"error": {"message": str(exc), "type": exc.kind, "param": None, "code": exc.status}}


# ---------------------------------------------------------------- requests
def _text_tokens(content: Any) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(count_tokens(p.get("text", "")) for p in content if isinstance(p, dict))
    if content is None:
        return 0
    raise HttpError(400, "message content must be a string or a list of content parts")


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list")
        return sum(_text_tokens(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids
    raise HttpError(400, "'prompt' must be a string, a list of one string, or a list of token ids")


def _max_tokens(body: dict[str, Any], chat: bool) -> int:
    value = body.get("max_completion_tokens") if chat else None
    value = body.get("max_tokens") if value is None else value
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HttpError(400, f"max_tokens must be an integer >= 1, got {value!r}")
    return value


def parse_request(body: Any, chat: bool, model_name: str, max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, max tokens) of a (chat) completion body; HttpError as vLLM would refuse it."""
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise HttpError(404, f"The model `{model}` does not exist.", "NotFoundError")
    if body.get("n", 1) != 1:
        raise HttpError(400, "the sim engine supports n=1 only")
    prompt, max_tokens = _prompt_tokens(body, chat), _max_tokens(body, chat)
    if prompt < 1:
        raise HttpError(400, "the prompt is empty")
    if prompt + max_tokens > max_model_len:
        raise HttpError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion.",
        )
    return prompt, max_tokens


# ---------------------------------------------------------------- responses
def full_response(chat: bool, rid: str, created: int, model_name: str, prompt_tokens: int,
                  max_tokens: int) -> dict[str, Any]:
    """The non-streamed reply body."""
    text = "".join(token_text(i) for i in range(max_tokens))
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": "length"}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
             "total_tokens": prompt_tokens + max_tokens}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": [choice], "usage": usage}


class SseChunks:
    """Pre-rendered pieces of one streamed response: a chunk is then a few string concatenations."""

    __slots__ = ("head_first", "head", "tail", "tail_last", "final")

    def __init__(self, chat: bool, rid: str, created: int, model_json: str, include_usage: bool,
                 prompt_tokens: int, max_tokens: int) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        pre = f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{model_json},'
        if chat:
            # The role rides on the first content chunk, so chunks == tokens (OpenAI sends it alone).
            self.head_first = pre + '"choices":[{"index":0,"delta":{"role":"assistant","content":"'
            self.head = pre + '"choices":[{"index":0,"delta":{"content":"'
            close = '"},"logprobs":null,"finish_reason":'
        else:
            self.head_first = self.head = pre + '"choices":[{"index":0,"text":"'
            close = '","logprobs":null,"finish_reason":'
        self.tail = close + "null}]}\n\n"
        self.tail_last = close + '"length"}]}\n\n'
        usage = (
            pre + f'"choices":[],"usage":{{"prompt_tokens":{prompt_tokens},'
            f'"completion_tokens":{max_tokens},"total_tokens":{prompt_tokens + max_tokens}}}}}\n\n'
        )
        self.final = (usage if include_usage else "") + "data: [DONE]\n\n"

    def chunk(self, start: int, count: int, last: bool) -> bytes:
        """The SSE event(s) of output tokens start..start+count; `last` appends usage and [DONE]."""
        text = "".join(_TOKEN_JSON[(start + i) % len(_TOKEN_JSON)] for i in range(count))
        head = self.head_first if start == 0 else self.head
        tail = self.tail_last + self.final if last else self.tail
        return (head + text + tail).encode()
