"""``kvproxy llama-server-args``: the llama-server arguments that serve a model as kvproxy does.

With Jinja on (llama-server's default, and what tools need) llama-server renders a chat with the
GGUF's own template, and where the GGUF has none it falls back to ChatML. kvproxy's embedded backend
uses the model family's published turn format instead (kvproxy.model.chat_template), so the bundled Gemma 3
270M, whose GGUF carries no template, saw ChatML turns behind a llama-server started as the README
said and answered in the wrong turn format. This command writes the family's template to a file (for
Gemma, with tool calls llama-server can parse: kvproxy.model.gemma_tools_template) and prints
``-m MODEL --jinja``, plus ``--chat-template-file FILE`` where one is needed, so a proxy's primary
and reference render a chat as the embedded backend would.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from kvproxy.model.chat_template import FAMILY_TEMPLATES, GEMMA_TEMPLATE
from kvproxy.model.gemma_tools_template import GEMMA_TOOLS_TEMPLATE
from kvproxy.model.gguf_info import read_model_info


def cache_dir() -> Path:
    """Where kvproxy keeps what it builds (``$KVPROXY_CACHE``, else ``~/.cache/kvproxy``)."""
    configured = os.environ.get("KVPROXY_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvproxy"


def template_file(model: Path, directory: Path) -> Path | None:
    """The family template kvproxy renders ``model`` with, written under ``directory``; None where
    llama-server's own choice is kvproxy's too (the GGUF's template, or the ChatML fallback)."""
    info = read_model_info(model)
    if info.chat_template or info.architecture not in FAMILY_TEMPLATES:
        return None
    path = directory / f"{info.architecture}.jinja"
    text = FAMILY_TEMPLATES[info.architecture]
    if text == GEMMA_TEMPLATE:  # the same turns, and tool calls llama-server's autoparser reads
        text = GEMMA_TOOLS_TEMPLATE
    if not path.is_file() or path.read_text() != text:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def llama_server_args(model: Path, directory: Path) -> list[str]:
    args = ["-m", str(model), "--jinja"]
    template = template_file(model, directory)
    if template is not None:
        args += ["--chat-template-file", str(template)]
    return args


def format_args(args: list[str]) -> str:
    return shlex.join(args)
