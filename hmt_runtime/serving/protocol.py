"""The OpenAI protocol of `hmt serve`: the request bodies (pydantic), the error type and its JSON shape, and
the limits quoted in messages (hmt_runtime.serving.server describes the endpoints)."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, Optional, Union

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.config import SERVE_LIMITS


log = logging.getLogger("hmt.serve")

MAX_STOP = 4  # stop strings per request, as in the OpenAI API
RATE_WINDOW_S = 10.0  # the tokens/s gauge averages over this many seconds
DISCONNECT_CHECK_S = 0.2  # how often a non-streamed request checks that its client is still there
EXCERPT = 40  # characters of a client's input quoted in an error message
LIMITS = SERVE_LIMITS  # the defaults of the limit flags (see the module docstring)


# ============================================================================================== errors
class APIError(Exception):
    """An error answered with the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class QueueFull(Exception):
    pass


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds this server's limit of {limit} bytes (--max-request-bytes)")


def _excerpt(value, limit: int = EXCERPT) -> str:
    """A short quotation of a client's value for an error message (JSON with escapes, cut with "...")."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ============================================================================================== request bodies
Number = float  # strict models: ints are accepted for floats, strings and bools are not


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both completion endpoints.  Fields the OpenAI API has but this server cannot honour are
    accepted only at their no-op value (checked in ``_unsupported``); any other field is a 400."""

    model: str
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    memory: Optional[str] = None
    user: Optional[str] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class MemoryRequest(_Body):
    text: Optional[str] = None
    token_ids: Optional[list[int]] = None


_FIELDS = set()
for _model in (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions, MemoryRequest):
    _FIELDS |= set(_model.model_fields)


def _unsupported(body: _Sampling) -> None:
    """A 400 naming the first field set to a value this server cannot honour."""
    no_op = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
             "logprobs": (None, False), "echo": (None, False), "best_of": (None, 1), "suffix": (None,),
             "top_logprobs": (None,)}
    for name, allowed in no_op.items():
        if name in body.model_fields_set and getattr(body, name, None) not in allowed:
            raise APIError(400, f"{name}={_excerpt(getattr(body, name))} is not supported by this server "
                                f"(accepted: {' or '.join(json.dumps(a) for a in allowed)})", param=name)


def _param(loc: tuple, extra: bool = False) -> str | None:
    """The request field a pydantic error location names: ("body", "messages", 0, "role") -> "messages.0.role"
    (union member tags such as "list[int]" are dropped; with ``extra`` the last part is an unknown field name)."""
    loc = loc[1:] if loc and loc[0] == "body" else loc
    if extra and loc:
        head = _param(loc[:-1])
        return f"{head}.{loc[-1]}" if head else str(loc[-1])
    parts = []
    for part in loc:
        if isinstance(part, int) and parts:
            parts.append(str(part))
        elif isinstance(part, str) and part in _FIELDS:
            parts.append(part)
        else:
            break
    return ".".join(parts) or None


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _param(tuple(first.get("loc", ())), extra=first.get("type") == "extra_forbidden")
    if param is not None and len(param) > EXCERPT:
        param = param[:EXCERPT] + "..."
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"{param or 'body'}: a required field is missing"
    else:
        got = first.get("input")
        shown = _excerpt(got) if isinstance(got, (str, int, float, bool, list, dict, type(None))) \
            else type(got).__name__
        message = f"{param or 'body'}: {first.get('msg')} (got {shown})"
    return APIError(400, message[:300], param=param).response()


def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, _BodyTooLarge):
        return APIError(413, str(exc.detail), code="request_too_large").response()
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind).response()


def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error (details are in the server's log)", type="server_error",
                    code="internal_error").response()


