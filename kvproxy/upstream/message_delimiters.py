"""The message delimiters a llama-server primary splits chat prompts with, asked of the server itself.

llama-server reports neither its template mode nor its delimiters (``/apply-template`` returns the
prompt only), so kvproxy finds them once per replica as llama.cpp does (kvproxy.model.message_spans):

* the template mode: a legacy (``--no-jinja``) server refuses ``tool_choice`` with "requires
  --jinja"; then there are no delimiters and no message cuts;
* the template's source (``/props``): a template with a dedicated parser has a fixed list;
* otherwise llama.cpp's autoparser probes, rendered by this server's ``/apply-template`` (so by its
  own Jinja engine), and the marker detection ported in kvproxy.model.message_spans;
* each delimiter's token ids from its ``/tokenize`` (``parse_special``, no BOS: ``common_tokenize(
  vocab, text, false, true)``).

A replica restarted with another template keeps the delimiters found before (one probe per replica
and proxy process); restart the proxy with it. A primary without ``/props`` (not a llama-server, or
one from before it) gets no delimiters, with a warning: its replays are cut as for legacy templates.
A failure that may pass (a refused connection, a 5xx) fails the job and is asked again next time.
"""

from __future__ import annotations

import logging

import orjson

from kvproxy.model.message_spans import PROBES, Delimiters, autoparser_delimiters, specialized_delimiters
from kvproxy.upstream.replicas import Replica, map_upstream_status

log = logging.getLogger(__name__)

TokenDelimiters = tuple[tuple[str, tuple[int, ...]], ...]  # (role, token ids), in llama-server's order


async def uses_jinja(replica: Replica) -> bool:
    """A legacy-template server answers ``tool_choice`` with "tool_choice param requires --jinja flag"."""
    body = {"messages": [{"role": "user", "content": "x"}], "tool_choice": "none"}
    status, content = await replica.post("/apply-template", orjson.dumps(body))
    if status == 200:
        return True
    if b"--jinja" in content:
        return False
    raise map_upstream_status(replica, status, content)


async def render(replica: Replica, messages: list[dict[str, str]]) -> str | None:
    """A probe conversation as the autoparser renders it (no generation prompt, thinking on); None
    when the template fails on it (llama-server answers 400 or 500 then)."""
    body = {
        "messages": messages,
        "add_generation_prompt": False,
        "chat_template_kwargs": {"enable_thinking": True},
    }
    status, content = await replica.post("/apply-template", orjson.dumps(body))
    if status == 200:
        return str(orjson.loads(content)["prompt"])
    if status in (400, 500):
        return None
    raise map_upstream_status(replica, status, content)


async def template_delimiters(replica: Replica) -> Delimiters:
    """The delimiters as text: none for legacy templates, a dedicated parser's, or the autoparser's."""
    if not await uses_jinja(replica):
        return ()
    status, content = await replica.get("/props")
    if status == 404:
        log.warning(
            "%s has no /props: its chat template is unknown, so shadow replays of its chats are not "
            "cut at user messages as a llama-server with Jinja templates cuts them",
            replica.url,
        )
        return ()
    if status != 200:
        raise map_upstream_status(replica, status, content)
    src = str(orjson.loads(content).get("chat_template") or "")
    found = specialized_delimiters(src)
    if found is not None:
        return found
    renders = {name: await render(replica, messages) for name, messages in PROBES.items()}
    return autoparser_delimiters(src, renders)


async def tokenize_special(replica: Replica, text: str) -> tuple[int, ...]:
    body = {"content": text, "add_special": False, "parse_special": True}
    status, content = await replica.post("/tokenize", orjson.dumps(body))
    if status != 200:
        raise map_upstream_status(replica, status, content)
    return tuple(int(t) for t in orjson.loads(content)["tokens"])


class DelimiterCache:
    """Each replica's delimiters as token ids, found on first use."""

    def __init__(self) -> None:
        self._found: dict[str, TokenDelimiters] = {}

    async def get(self, replica: Replica) -> TokenDelimiters:
        if replica.url not in self._found:
            found = [
                (d.role, await tokenize_special(replica, d.text)) for d in await template_delimiters(replica)
            ]
            self._found[replica.url] = tuple(found)
        return self._found[replica.url]
