"""OpenAI's request and response shapes, and their translation to and from the network's job
and result bodies. Pure functions: no I/O.

What the network cannot do is refused (400) rather than ignored: `n` other than 1, tool
calls, non-text message parts, `echo`, `suffix`. Keys OpenAI clients add that change nothing
here (`user`, `metadata`, ...) are ignored. Omitted `temperature` keeps the network's default,
greedy decoding (OpenAI's default is 1), so that an answer is reproducible unless asked
otherwise. The gateway has no tokenizer: logprobs name tokens as `token_id:<id>`, as vLLM's
server does with `return_tokens_as_token_ids`.
"""

import base64
import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.codec import describe
from schemas.job import Job
from schemas.result import ResultBody

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
HEADER_PREFIX = "X-Resultity-"


class ApiError(Exception):
    """An answer in OpenAI's error shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.openai_code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.openai_code,
            }
        }


class Lenient(BaseModel):
    """OpenAI bodies: keys this gateway does not know are ignored, not refused."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(Lenient):
    role: str
    content: str | list[TextPart]
    tool_calls: list[Any] | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Common(Lenient):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None


class CompletionRequest(Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


def parse(model: type[Common], data: Any) -> Any:
    """Validate a decoded JSON body; a 400 naming the fields otherwise."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, describe(exc)) from exc


def _params(req: Common) -> dict[str, Any]:
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    params: dict[str, Any] = {}
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(req, key)
        if value is not None:
            params[key] = value
    if req.max_tokens is not None:
        params["max_tokens"] = req.max_tokens
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return params


def _message(m: ChatMessage) -> dict[str, str]:
    role = CHAT_ROLES.get(m.role)
    if role is None or m.tool_calls:
        raise ApiError(400, f"message role {m.role!r} is not supported", param="messages")
    text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
    return {"role": role, "content": text}


def chat_job(req: ChatRequest, job_id: str, deadline: float) -> dict[str, Any]:
    """The job body for a chat request (validated against `schemas.job.Job`)."""
    if req.tools:
        raise ApiError(400, "tools are not supported", param="tools")
    params = _params(req)
    if req.max_completion_tokens is not None:
        params["max_tokens"] = req.max_completion_tokens
    if req.logprobs:
        params["logprobs"] = req.top_logprobs or 0
    elif req.top_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        params["response_format"] = (
            {"type": "json_schema", "json_schema": fmt.json_schema}
            if fmt.type == "json_schema"
            else {"type": "json_object"}
        )
    job = {
        "job_id": job_id,
        "model_id": req.model,
        "messages": [_message(m) for m in req.messages],
        "params": params,
        "deadline": deadline,
    }
    return _checked(job, req.stream)


def completion_job(req: CompletionRequest, job_id: str, deadline: float) -> dict[str, Any]:
    """The job body for a (legacy) completion request."""
    if req.echo or req.suffix:
        raise ApiError(400, "echo and suffix are not supported")
    params = _params(req)
    if req.logprobs is not None:
        params["logprobs"] = req.logprobs
    job: dict[str, Any] = {"job_id": job_id, "model_id": req.model, "params": params}
    prompt = req.prompt
    if isinstance(prompt, str):
        job["prompt"] = prompt
    elif prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        job["prompt"] = prompt[0]
    else:
        job["prompt_token_ids"] = prompt
    job["deadline"] = deadline
    return _checked(job, req.stream)


def _checked(job: dict[str, Any], stream: bool) -> dict[str, Any]:
    if stream:
        job["stream"] = True  # partial output from the node (PROTOCOL.md v2)
    try:
        Job.model_validate(job)
    except ValidationError as exc:
        raise ApiError(400, describe(exc)) from exc
    return job


def provenance(result: ResultBody, envelope: bytes) -> dict[str, Any]:
    """The `resultity` field: what the answer rests on, and the signed result itself."""
    return {
        "job_id": result.job_id,
        "node_id": result.node_id,
        "model": {"id": result.model.id, "version": result.model.version},
        "model_sha256": result.model.sha256,
        "input_sha256": result.input_sha256,
        "envelope": base64.b64encode(envelope).decode(),
    }


def provenance_headers(result: ResultBody, envelope: bytes) -> dict[str, str]:
    """`X-Resultity-*` headers (the envelope itself is in the body: it can be large)."""
    return {
        f"{HEADER_PREFIX}Job-Id": result.job_id,
        f"{HEADER_PREFIX}Node-Id": result.node_id,
        f"{HEADER_PREFIX}Model-Sha256": result.model.sha256,
        f"{HEADER_PREFIX}Input-Sha256": result.input_sha256,
        f"{HEADER_PREFIX}Envelope-Sha256": hashlib.sha256(envelope).hexdigest(),
    }


def usage(result: ResultBody) -> dict[str, int]:
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token(token_id: int) -> str:
    return f"token_id:{token_id}"


def _wire_logprobs(result: ResultBody) -> list[dict[str, Any]] | None:
    if result.output.logprobs is None:
        return None
    return [entry.model_dump() for entry in result.output.logprobs]


def chat_logprobs(result: ResultBody) -> dict[str, Any] | None:
    entries = _wire_logprobs(result)
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": _token(e["token_id"]),
                "logprob": e["logprob"],
                "bytes": None,
                "top_logprobs": [
                    {"token": _token(t), "logprob": lp, "bytes": None} for t, lp in e["top"]
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(result: ResultBody) -> dict[str, Any] | None:
    entries = _wire_logprobs(result)
    if entries is None:
        return None
    return {
        "tokens": [_token(e["token_id"]) for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{_token(t): lp for t, lp in e["top"]} for e in entries],
        "text_offset": [],
    }


def chat_completion(result: ResultBody, envelope: bytes, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.job_id}",
        "object": "chat.completion",
        "created": created,
        "model": result.model.id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.output.text},
                "logprobs": chat_logprobs(result),
                "finish_reason": result.output.finish_reason,
            }
        ],
        "usage": usage(result),
        "resultity": provenance(result, envelope),
    }


def text_completion(result: ResultBody, envelope: bytes, created: int) -> dict[str, Any]:
    return {
        "id": f"cmpl-{result.job_id}",
        "object": "text_completion",
        "created": created,
        "model": result.model.id,
        "choices": [
            {
                "index": 0,
                "text": result.output.text,
                "logprobs": completion_logprobs(result),
                "finish_reason": result.output.finish_reason,
            }
        ],
        "usage": usage(result),
        "resultity": provenance(result, envelope),
    }


def chunk(
    kind: Literal["chat", "text"],
    job_id: str,
    model: str,
    created: int,
    text: str | None,
    *,
    finish_reason: str | None = None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: a piece of text, or the end (`finish_reason`)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice["delta"] = delta
        return {
            "id": f"chatcmpl-{job_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    choice["text"] = text or ""
    return {
        "id": f"cmpl-{job_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(kind: Literal["chat", "text"], result: ResultBody, created: int) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    body = chunk(kind, result.job_id, result.model.id, created, None)
    body["choices"] = []
    body["usage"] = usage(result)
    return body
