"""``kvproxy llama-server-args`` and the Gemma template it hands llama-server (kvproxy.cli.llama_args,
kvproxy.model.gemma_tools_template): the printed arguments, and chats without tools rendered exactly
as kvproxy's own Gemma template renders them. A real llama-server started with the printed arguments:
tests/test_client_matrix.py."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from kvproxy.model.chat_template import GEMMA_TEMPLATE, ChatTemplate
from kvproxy.model.gemma_tools_template import GEMMA_TOOLS_TEMPLATE

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "The sea?"}]},
    ],
]


def _render(template: str, messages: list[dict[str, object]], **variables: object) -> str:
    return ChatTemplate(template, "test", "<bos>", "<eos>").render(messages, variables=variables or None)


def test_chats_without_tools_render_as_kvproxys_gemma_template() -> None:
    for chat in CHATS:
        assert _render(GEMMA_TOOLS_TEMPLATE, chat) == _render(GEMMA_TEMPLATE, chat)


def test_tools_calls_and_results_render_hermes_style() -> None:
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    chat = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "warm"},
    ]
    text = _render(GEMMA_TOOLS_TEMPLATE, chat, tools=[tool])
    assert text.startswith("<bos><start_of_turn>user\n# Tools\n") and '"name": "weather"' in text
    called = '{"name": "weather", "arguments": {"city": "Oslo"}}'
    assert f"<start_of_turn>model\n\n<tool_call>\n{called}\n</tool_call><end_of_turn>" in text
    assert (
        "<start_of_turn>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response><end_of_turn>"
        in text
    )
    assert text.endswith("<start_of_turn>model\n")


def test_the_printed_arguments_name_the_model_and_its_template(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvproxy", "llama-server-args"],
        check=True,
        capture_output=True,
        text=True,
        env={"KVPROXY_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    args = shlex.split(out)
    assert args[0] == "-m" and args[1].endswith(".gguf") and args[2] == "--jinja"
    assert args[3:] == ["--chat-template-file", str(tmp_path / "templates" / "gemma3.jinja")]
    assert Path(args[4]).read_text() == GEMMA_TOOLS_TEMPLATE
    missing = subprocess.run(
        [sys.executable, "-m", "kvproxy", "llama-server-args", "--model", str(tmp_path / "none.gguf")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
