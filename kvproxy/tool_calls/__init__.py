"""Function calling for the embedded backend: tools into the prompt, a grammar that forces a call,
and the model's output back into OpenAI ``tool_calls``.

Pure functions only (no model, no I/O): :mod:`.spec` reads a request's tools and ``tool_choice``,
:mod:`.formats` picks the tool-call format a chat template speaks, :mod:`.generic` and
:mod:`.hermes`, :mod:`.qwen_xml` and :mod:`.gemma4` render, constrain and parse one format each
(:mod:`.gbnf`: the grammar pieces they share). kvproxy.serving.embedded wires them in.
"""

from kvproxy.tool_calls.formats import ToolFormat, tool_format
from kvproxy.tool_calls.spec import ParsedCall, ToolChoice, ToolPlan, new_call_id

__all__ = ["ParsedCall", "ToolChoice", "ToolFormat", "ToolPlan", "new_call_id", "tool_format"]
