"""What one request asks of the shadow path, handed down explicitly from the route to the ticket.

The route reads it from the request's headers (kvproxy.api.shadow_ask): the ``X-KVProxy-Shadow``
directive, the slot its per-position scores are kept in when it opted in, and its x-request-id.
Serving code passes it through unchanged to ``ShadowPath.ticket``; the first ticket issued for the
request claims the slot (a guard's background probe, issued later, finds it taken).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from kvproxy.scoring.kept import KeptScores

ShadowDirective = Literal["force", "skip"]


@dataclass(frozen=True)
class ShadowAsk:
    directive: ShadowDirective | None = None  # None: the deployment's sample rate decides
    keep: KeptScores | None = None  # the opted-in request's slot for its per-position numbers
    request_id: str | None = None  # the request's x-request-id (kvproxy.http.request_id)

    def claim(self) -> KeptScores | None:
        """The slot, for the request's first ticket only."""
        if self.keep is None or self.keep.claimed:
            return None
        self.keep.claimed = True
        return self.keep

    def forced(self) -> ShadowAsk:
        """The same request, sampled whatever the rate (a guard's probe on the primary)."""
        return replace(self, directive="force")


NO_ASK = ShadowAsk()
FORCE = ShadowAsk("force")
