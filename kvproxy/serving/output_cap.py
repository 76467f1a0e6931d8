"""The one default output cap, and how an answer says which cap it was served under.

``--max-tokens-default`` (1024 unless set) limits the output of every request that sets no limit of
its own, on every generation route (chat completions, completions, responses) and in both modes: no
client has to know it, and none waits for a generation to the end of the context. An answer says the
cap it was served under: the Responses object in ``max_output_tokens`` (OpenAI's response echoes it),
every route in the ``X-KVProxy-Max-Tokens`` header (chat completions and completions have no field
for it, and adding one to their JSON could break a strict client). A request's own limit is its cap;
where the default is 0 and the request sets none, the context is the only cap and no header is sent.
Embedded, the default is further cut to what the context leaves (the request's own limit is not: a
limit the context cannot hold is a 400).
"""

from __future__ import annotations

from typing import Any

HEADER = "X-KVProxy-Max-Tokens"

# each route's limit parameters, in the order OpenAI reads them
LIMIT_KEYS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}


def applied_cap(route: str, body: dict[str, Any], default: int) -> int | None:
    """The output cap of a request on ``route``: its own limit, else ``default`` (None: no cap)."""
    for key in LIMIT_KEYS[route]:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default if default > 0 else None
