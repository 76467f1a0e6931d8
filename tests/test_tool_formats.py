"""The tool-call formats as pure functions: parse, schema, grammar, history, format detection.

Reference strings for the Hermes format are llama.cpp's own (tests/test-chat.cpp at the pinned
version: Hermes 2 Pro, Hermes 3, Qwen 2.5, Granite); for the generic format, the cases llama.cpp's
test-chat.cpp had for it before the autoparser replaced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from kvproxy.backends.grammar import json_gbnf
from kvproxy.errors import validation_error
from kvproxy.protocol import ChatCompletionRequest
from kvproxy.serving.tool_turns import ToolTurn, finish_reason
from kvproxy.tool_calls import ToolChoice, ToolFormat, ToolPlan, generic, hermes, tool_format
from kvproxy.tool_calls.formats import UnsupportedToolFormat
from kvproxy.tool_calls.spec import ParsedCall
from tests.llama_tools import llama_bin

SPECIAL = {
    "type": "function",
    "function": {
        "name": "special_function",
        "description": "I'm special",
        "parameters": {
            "type": "object",
            "properties": {"arg1": {"type": "integer", "description": "The arg."}},
            "required": ["arg1"],
        },
    },
}
PYTHON = {
    "type": "function",
    "function": {
        "name": "python",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}
CALL = ParsedCall("special_function", '{"arg1":1}')


def plan(mode: str = "auto", name: str | None = None, parallel: bool = False, tools: Any = None) -> ToolPlan:
    return ToolPlan(tuple(tools or [SPECIAL, PYTHON]), ToolChoice(mode, name), parallel)  # type: ignore[arg-type]


# ---- Hermes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>', None, [CALL]),
        (
            "Hello, world!\nWhat's up?"
            '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>',
            "Hello, world!\nWhat's up?",
            [CALL],
        ),
        ('<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>', None, [CALL]),
        ("Hello, world!\nWhat's up?", "Hello, world!\nWhat's up?", []),
        (
            '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "python", "arguments": {"code": "print(\\"</tool_call>\\")"}}'
            "\n</tool_call>",
            None,
            [CALL, ParsedCall("python", '{"code":"print(\\"</tool_call>\\")"}')],
        ),
    ],
)
def test_hermes_parse(text: str, content: str | None, calls: list[ParsedCall]) -> None:
    assert hermes.parse(text) == (content, calls)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "special_function", "argu',  # cut short
        '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}',  # no closing tag
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> and text after',
    ],
)
def test_hermes_unparsed_output_stays_content(text: str) -> None:
    assert hermes.parse(text) == (text, [])


@pytest.mark.parametrize("parallel", [False, True])
def test_hermes_grammar_is_accepted_by_llama_cpp(parallel: bool) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    p = plan("required", parallel=parallel)
    grammar = hermes.wrap_grammar(json_gbnf(hermes.call_schema(p)), parallel)
    assert grammar.startswith('root ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"')
    assert ("*" in grammar.splitlines()[0]) is parallel
    LlamaGrammar.from_string(grammar, verbose=False)  # raises if llama.cpp cannot parse it


def test_hermes_history_gives_templates_object_arguments() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]
    out = hermes.history(msgs)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the request is untouched
    assert out[2] == msgs[2]


# ---- generic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            '{\n  "tool_calls": [\n    {\n      "name": "special_function",\n'
            '      "arguments": {"arg1": 1}\n    }\n  ]\n}',
            None,
            [CALL],
        ),
        ('{"tool_call": {"name": "special_function", "arguments": {"arg1": 1}}}', None, [CALL]),
        ('{\n  "response": "Hello, world!\\nWhat\'s up?"\n}', "Hello, world!\nWhat's up?", []),
        ('{"response": {"a": 1}}', '{\n  "a": 1\n}', []),
        (
            '{"tool_calls": [{"name": "python", "arguments": {"code": "1"}, "id": "abcd"}, '
            '{"name": "special_function", "arguments": {"arg1": 1}, "id": "efgh"}]}',
            None,
            [
                ParsedCall("python", '{"code":"1"}', "abcd"),
                ParsedCall("special_function", '{"arg1":1}', "efgh"),
            ],
        ),
        ('{"tool_call": {"name": "special', '{"tool_call": {"name": "special', []),  # cut short
        ("[1, 2]", "[1, 2]", []),
    ],
)
def test_generic_parse(text: str, content: str | None, calls: list[ParsedCall]) -> None:
    assert generic.parse(text) == (content, calls)


def test_generic_schema_required_auto_named_parallel() -> None:
    call = {"tool_call": {"name": "special_function", "arguments": {"arg1": 1}}}
    response = {"response": "hi"}
    required = generic.output_schema(plan("required"))
    jsonschema.validate(call, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(response, required)
    with pytest.raises(jsonschema.ValidationError):  # arguments must match the function's schema
        jsonschema.validate({"tool_call": {"name": "special_function", "arguments": {"arg1": "x"}}}, required)
    auto = generic.output_schema(plan("auto"))
    jsonschema.validate(call, auto)
    jsonschema.validate(response, auto)
    named = generic.output_schema(plan("required", "python"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(call, named)
    jsonschema.validate({"tool_call": {"name": "python", "arguments": {"code": "1"}}}, named)
    parallel = generic.output_schema(plan("required", parallel=True))
    two = {
        "tool_calls": [
            {"name": "special_function", "arguments": {"arg1": 1}, "id": "call"},
            {"name": "python", "arguments": {"code": "x"}, "id": "other"},
        ]
    }
    jsonschema.validate(two, parallel)
    with pytest.raises(jsonschema.ValidationError):  # each needs an id of 4 or more characters
        jsonschema.validate(
            {"tool_calls": [{"name": "python", "arguments": {"code": "x"}, "id": "a"}]}, parallel
        )
    structured = generic.output_schema(plan("auto"), {"type": "object", "required": ["x"]})
    jsonschema.validate({"response": {"x": 1}}, structured)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "text"}, structured)


def test_generic_schema_compiles_within_the_limits() -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    for p in (plan("auto"), plan("required", parallel=True), plan("required", "python")):
        LlamaGrammar.from_string(json_gbnf(generic.output_schema(p)), verbose=False)


def test_generic_history() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "python", "arguments": '{"code": "1"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "special_function", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
    ]
    out = generic.history(msgs, plan())
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n" + generic.INSTRUCTION + "\n\n" + generic.TOOLS_INTRO)
    assert json.loads(out[0]["content"].split(generic.TOOLS_INTRO)[1]) == [SPECIAL, PYTHON]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [
            {"name": "python", "arguments": {"code": "1"}, "id": "c1"},
            {"name": "special_function", "arguments": {}, "id": "c2"},
        ]
    }
    first, second = out[3]["content"].split("\n\n")
    assert json.loads(first) == {"tool_response": {"tool": "python", "content": "1", "tool_call_id": "c1"}}
    assert json.loads(second)["tool_response"]["tool"] == "special_function"
    # tool_choice none: calls and results still readable, no instruction
    assert generic.history(msgs, plan("none"))[0] == msgs[0]


# ---- detection, request, turn ----------------------------------------------------------------

TEMPLATES = llama_bin().parent / "src" / "models" / "templates"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", ToolFormat.HERMES),
        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", ToolFormat.HERMES),
        ("Qwen-Qwen2.5-7B-Instruct.jinja", ToolFormat.HERMES),
        ("Qwen-Qwen3-0.6B.jinja", ToolFormat.HERMES),
        ("google-gemma-2-2b-it.jinja", ToolFormat.GENERIC),
        ("Qwen3.5-4B.jinja", ToolFormat.QWEN_XML),
        ("Qwen3-Coder.jinja", ToolFormat.QWEN_XML),
        ("google-gemma-4-31B-it.jinja", ToolFormat.GEMMA4),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", None),
    ],
)
def test_tool_format_of_real_templates(name: str, expected: ToolFormat | None) -> None:
    text = Path(TEMPLATES / name).read_text()
    if expected is None:
        with pytest.raises(UnsupportedToolFormat):
            tool_format(text)
    else:
        assert tool_format(text) is expected


def test_kvproxy_own_templates_are_generic() -> None:
    from kvproxy.model.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE

    assert tool_format(GEMMA_TEMPLATE) is tool_format(CHATML_TEMPLATE) is ToolFormat.GENERIC


def _request(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "q"}], **body}
    )


def test_request_tool_plan() -> None:
    assert _request().tool_plan(True) is None
    p = _request(
        tools=[SPECIAL, PYTHON], tool_choice={"type": "function", "function": {"name": "python"}}
    ).tool_plan(False)
    assert p is not None and p.choice == ToolChoice("required", "python") and not p.parallel
    assert [t["function"]["name"] for t in p.callable] == ["python"]
    auto = _request(tools=[SPECIAL], parallel_tool_calls=True).tool_plan(False)
    assert auto is not None and auto.choice == ToolChoice("auto") and auto.parallel


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
        (
            {"tools": [SPECIAL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "no function named",
        ),
        ({"tools": [SPECIAL], "tool_choice": "sometimes"}, "tool_choice", "must be 'none', 'auto'"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", ""),
        ({"tools": [SPECIAL, SPECIAL]}, "tools", "unique"),
        ({"functions": [SPECIAL["function"]]}, "functions", "tools of type function"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, None, None),
    ],
)
def test_request_refusals(body: dict[str, Any], param: str | None, words: str | None) -> None:
    if param is None:
        _request(**body)  # an empty list of calls is no call
        return
    with pytest.raises(ValidationError) as err:
        _request(**body)
    error = validation_error(err.value)
    assert error.status == 400 and error.detail.param == param, error.body()
    assert words in error.body()["error"]["message"]


def test_turn_parse_gives_ids_and_finish_reason() -> None:
    req = _request(tools=[SPECIAL], tool_choice="required")
    from kvproxy.model.chat_template import GEMMA_TEMPLATE

    turn = ToolTurn.of(req, GEMMA_TEMPLATE)
    assert turn is not None and turn.format is ToolFormat.GENERIC
    content, calls = turn.parse('{"tool_call": {"name": "special_function", "arguments": {"arg1": 1}}}')
    assert content is None and len(calls) == 1 and calls[0].id.startswith("call_") and len(calls[0].id) == 29
    assert finish_reason("stop", calls) == "tool_calls"
    assert finish_reason("length", calls) == "length"
    assert finish_reason("stop", []) == "stop"
    assert ToolTurn.of(_request(), GEMMA_TEMPLATE) is None


def test_unsupported_template_is_a_400() -> None:
    from kvproxy.errors import OpenAIError

    text = Path(TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    with pytest.raises(OpenAIError) as err:
        ToolTurn.of(_request(tools=[SPECIAL]), text)
    assert err.value.status == 400 and err.value.detail.param == "tools"
    assert "own tool-call format" in err.value.body()["error"]["message"]
