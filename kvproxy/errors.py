"""Errors in OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``, with their status.

Everything the proxy refuses goes through :class:`OpenAIError`, so clients (and the official SDK's
exception classes, which key on the status) see the same shape whatever went wrong.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvproxy.protocol import ErrorDetail, ErrorResponse
from kvproxy.upstream.replicas import UpstreamFailure


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.detail).model_dump()


def upstream_error(failure: UpstreamFailure) -> OpenAIError:
    """An upstream failure as the client sees it."""
    f = failure
    return OpenAIError(f.status, f.message, type=f.type, param=f.param, code=f.code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unknown_route(method: str, path: str) -> OpenAIError:
    """A 404 that names the route (OpenAI words it so too)."""
    return OpenAIError(
        404,
        f"Invalid URL ({method} {path}): kvproxy serves no such route.",
        code="unknown_route",
    )


def model_loading() -> OpenAIError:
    return OpenAIError(503, "Loading model", type="unavailable_error", code="model_loading")


def server_busy(message: str, retry_after: int, *, code: str = "server_busy") -> OpenAIError:
    """No capacity now: a 503 whose Retry-After says when to try again (the openai SDK honours it)."""
    return OpenAIError(
        503, message, type="unavailable_error", code=code, headers={"Retry-After": str(retry_after)}
    )


def model_load_failed(reason: str) -> OpenAIError:
    return OpenAIError(
        500, f"The model failed to load: {reason}", type="server_error", code="model_load_failed"
    )


def context_length_exceeded(
    n_ctx: int, prompt_tokens: int, completion_tokens: int | None, *, at_least: bool = False
) -> OpenAIError:
    """``at_least``: the prompt was refused from its length before it was tokenized, so its token
    count is a lower bound."""
    some = "at least " if at_least else ""
    if completion_tokens is None:
        detail = f"your prompt has {some}{prompt_tokens} tokens, leaving no room for a completion"
        param = "messages"
    else:
        detail = (
            f"you requested {some}{prompt_tokens + completion_tokens} tokens ({some}{prompt_tokens} "
            f"in the prompt, {completion_tokens} for the completion)"
        )
        param = "max_tokens"
    return OpenAIError(
        400,
        f"This model's maximum context length is {n_ctx} tokens. However, {detail}. "
        "Please reduce the length of the prompt or of the completion.",
        param=param,
        code="context_length_exceeded",
    )


_BRANCH_TAGS = ("list[", "dict[", "str", "int", "float", "bool", "function-", "constrained-", "literal[")


def _is_branch_tag(part: object) -> bool:
    """pydantic names the union member it tried inside ``loc`` ("str", "list[str]", ...)."""
    return isinstance(part, str) and part.startswith(_BRANCH_TAGS)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not _is_branch_tag(p)]
    return ".".join(parts) or None


def _branch_matches_input(error: Any) -> bool:
    """True when the error comes from the union member of the same JSON type as the input.

    For ``stop: ["a", ..., "e"]`` pydantic reports both "not a string" and "at most 4 items"; the
    second is what the client needs to read.
    """
    tags = [p for p in error.get("loc", ()) if _is_branch_tag(p)]
    if not tags:
        return True
    return str(tags[-1]).startswith(type(error.get("input")).__name__)


def validation_error(exc: RequestValidationError | ValidationError) -> OpenAIError:
    """One OpenAI error for a failed validation: the first problem, naming the parameter."""
    errors = list(exc.errors())
    if not errors:
        return OpenAIError(400, "Invalid request body.")
    errors.sort(key=lambda e: not _branch_matches_input(e))  # stable: keeps pydantic's order otherwise
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return OpenAIError(
            400, f"We could not parse the JSON body of your request: {reason}", code="invalid_json"
        )
    param = _param_from_loc(tuple(first.get("loc", ())))
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "model_attributes_type" and param is None:
        return OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    others = {_param_from_loc(tuple(e.get("loc", ()))) for e in errors} - {param}
    if others:
        message += f" (and problems with: {', '.join(sorted(str(o) for o in others))})"
    text = f"Invalid value for '{param}': {message}" if param else message
    return OpenAIError(400, text, param=param, code=_range_code(kind, first.get("ctx")))


# a number out of range gets OpenAI's code for it (``temperature: 7``: decimal_above_max_value)
_RANGE_KINDS = {
    "greater_than_equal": "below_min",
    "greater_than": "below_min",
    "less_than_equal": "above_max",
    "less_than": "above_max",
}


def _range_code(kind: str, ctx: Any) -> str | None:
    """The code for a bound the parameter's type gives (an int bound: an integer parameter)."""
    side = _RANGE_KINDS.get(kind)
    bound = next(iter(ctx.values()), None) if isinstance(ctx, dict) else None
    if side is None or not isinstance(bound, int | float) or isinstance(bound, bool):
        return None
    return f"{'integer' if isinstance(bound, int) else 'decimal'}_{side}_value"


def pydantic_error(exc: ValidationError) -> OpenAIError:
    return validation_error(exc)


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def unexpected_error(exc: Exception) -> OpenAIError:
    """What a client sees of a bug: the exception's type, never its message (it may hold data)."""
    return OpenAIError(500, f"Internal error: {type(exc).__name__}", type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404 and exc.detail == "Not Found":  # no route matched: say which
            err = unknown_route(request.method, request.url.path)
        else:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            err = OpenAIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(unexpected_error(exc))

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
