"""Request bodies every deployment refuses, with the parameter and the message part the refusal
names: shared by the real-server tests (test_errors.py) and the in-process ones (test_api_fast.py)."""

from __future__ import annotations

from typing import Any

MSG = [{"role": "user", "content": "Hi"}]

# None marks a field left out of the request
SCHEMA_VIOLATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"model": None, "messages": MSG}, "model", "Field required"),
    ({"messages": None}, "messages", "Field required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": MSG, "temperature": 5}, "temperature", "less than or equal to 2"),
    ({"messages": MSG, "max_tokens": "many"}, "max_tokens", "integer"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": MSG, "top_logprobs": 50, "logprobs": True}, "top_logprobs", "20"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "system"),
    ({"messages": MSG, "frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
]

UNHONOURED: list[tuple[dict[str, Any], str | None, str]] = [
    ({"n": 2}, "n", "n > 1 is not supported"),
    (
        {"functions": [{"name": "f", "parameters": {}}]},
        "functions",
        "use tools of type function",
    ),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools' are specified"),
    ({"logit_bias": {"42": 5}}, "logit_bias", "not supported"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_object"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio is not supported"),
    ({"modalities": ["text", "audio"]}, "modalities", "modalities other than text"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "prediction is not supported"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "does not reason"),
    ({"verbosity": "low"}, "verbosity", "verbosity 'low' is not supported"),
    ({"web_search_options": {}}, "web_search_options", "built-in tools"),
    ({"top_logprobs": 2}, None, "top_logprobs requires logprobs"),
    ({"stream_options": {"include_usage": True}}, None, "only allowed when stream is true"),
]
