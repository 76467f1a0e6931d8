"""The native tool-call formats of Qwen3.5/Qwen3-Coder (XML parameters) and Gemma 4 as pure functions:
parse against llama.cpp's own strings (tests/test-chat.cpp at the pinned version: the Qwen3.5-4B,
Qwen3-Coder and google-gemma-4-31B-it cases), format detection on llama.cpp's templates, the forced
grammars (accepted by llama.cpp, and matching what they must), history for older Gemma 4 templates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvproxy.backends.grammar import json_gbnf
from kvproxy.protocol import ChatCompletionRequest
from kvproxy.serving.tool_turns import ToolTurn
from kvproxy.tool_calls import ToolChoice, ToolFormat, ToolPlan, gemma4, qwen_xml, tool_format
from tests.llama_tools import llama_bin


def tool(name: str, props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    params = {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }
    return {"type": "function", "function": {"name": name, "parameters": params}}


SPECIAL = tool("special_function", {"arg1": {"type": "integer"}})
WITH_OPT = tool(
    "special_function_with_opt", {"arg1": {"type": "integer"}, "arg2": {"type": "integer"}}, ["arg1"]
)
PYTHON = tool("python", {"code": {"type": "string"}})
EDIT = tool(
    "edit", {"filename": {"type": "string"}, "oldString": {"type": "string"}, "newString": {"type": "string"}}
)
TERMINAL = tool("run_in_terminal", {"command": {"type": "string"}})
GET_TIME = tool("get_time", {"city": {"type": "string"}})
GET_WEATHER = tool("get_weather", {"city": {"type": "string"}})
EMPTY = tool("empty_args", {})
AMOUNT = tool("amount", {"orig": {"type": "number"}})
TOGGLE = tool("toggle", {"enabled": {"type": "boolean"}})
NULLABLE = tool("set_nullable", {"value": {"type": "null"}})
TODO = tool("todo_list", {"todos": {"type": "array", "items": {"type": "string"}}})
CONFIG = tool("set_config", {"config": {"type": "object"}})
MIXED = tool(
    "mixed", {"x": {"type": ["integer", "string"]}, "y": {"anyOf": [{"type": "object"}, {"type": "string"}]}}
)
ALL = [
    SPECIAL,
    WITH_OPT,
    PYTHON,
    EDIT,
    TERMINAL,
    GET_TIME,
    GET_WEATHER,
    EMPTY,
    AMOUNT,
    TOGGLE,
    NULLABLE,
    TODO,
]
ALL += [CONFIG, MIXED]


def plan(mode: str = "auto", parallel: bool = True, tools: Any = None, name: str | None = None) -> ToolPlan:
    return ToolPlan(tuple(tools or ALL), ToolChoice(mode, name), parallel)  # type: ignore[arg-type]


def calls_of(result: tuple[str | None, list[Any]]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in result[1]]


def xml(name: str, *args: tuple[str, str]) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args)
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


# ---- Qwen3.5 / Qwen3-Coder XML parameters ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        (xml("special_function", ("arg1", "1")), [("special_function", {"arg1": 1})]),
        (
            xml("special_function", ("arg1", "1"))
            + "\n"
            + xml("special_function_with_opt", ("arg1", "1"), ("arg2", "2")),
            [("special_function", {"arg1": 1}), ("special_function_with_opt", {"arg1": 1, "arg2": 2})],
        ),
        (
            xml("python", ("code", 'def hello():\n    print("Hello, world!")\n\nhello()')),
            [("python", {"code": 'def hello():\n    print("Hello, world!")\n\nhello()'})],
        ),
        (
            xml("edit", ("filename", "foo.c"), ("oldString", "#iclunde"), ("newString", "#include")),
            [("edit", {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include"})],
        ),
        (  # a value ending in a newline keeps it
            xml("edit", ("filename", "foo.c"), ("oldString", "#iclunde"), ("newString", "#include\n")),
            [("edit", {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include\n"})],
        ),
        (
            xml("python", ("code", '    print("Hello, world!")')),
            [("python", {"code": '    print("Hello, world!")'})],
        ),
        (xml("run_in_terminal", ("command", "pwd")), [("run_in_terminal", {"command": "pwd"})]),
        (  # a string parameter is text even where it reads as JSON
            xml("run_in_terminal", ("command", "42")),
            [("run_in_terminal", {"command": "42"})],
        ),
        (  # either type: JSON where it parses as the other type, else text
            xml("mixed", ("x", "7"), ("y", '{"a": 1}')) + xml("mixed", ("x", "seven"), ("y", "[1]")),
            [("mixed", {"x": 7, "y": {"a": 1}}), ("mixed", {"x": "seven", "y": "[1]"})],
        ),
    ],
)
def test_qwen_xml_parse_llama_cpp_strings(text: str, calls: list[tuple[str, Any]]) -> None:
    assert calls_of(qwen_xml.parse(text, plan())) == calls
    content, _ = qwen_xml.parse("Let me see.\n" + text, plan())
    assert content == "Let me see.\n"


def test_qwen_xml_arguments_are_compact_json_in_generation_order() -> None:
    text = xml("special_function_with_opt", ("arg2", "2"), ("arg1", "1"))
    assert qwen_xml.parse(text, plan())[1][0].arguments == '{"arg2":2,"arg1":1}'


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!\nWhat's up?",
        xml("special_function", ("arg1", "one")),  # an integer parameter that is not one
        xml("special_function", ("nope", "1")),  # a parameter the function lacks
        xml("special_function_with_opt", ("arg2", "2")),  # a required parameter missing
        xml("unknown", ("arg1", "1")),  # a function not offered
        xml("special_function", ("arg1", "1"))[:-5],  # cut short
        xml("special_function", ("arg1", "1")) + " and then text",
    ],
)
def test_qwen_xml_unmatched_output_stays_content(text: str) -> None:
    assert qwen_xml.parse(text, plan()) == (text, [])


def test_qwen_xml_one_call_without_parallel() -> None:
    two = xml("special_function", ("arg1", "1")) + "\n" + xml("special_function", ("arg1", "2"))
    assert qwen_xml.parse(two, plan(parallel=False)) == (two, [])
    assert len(qwen_xml.parse(two, plan(parallel=True))[1]) == 2


def test_qwen_xml_named_choice_reads_only_that_function() -> None:
    text = xml("special_function", ("arg1", "1"))
    assert qwen_xml.parse(text, plan("required", name="python")) == (text, [])


@pytest.mark.parametrize("parallel", [False, True])
def test_qwen_xml_grammar_is_accepted_by_llama_cpp(parallel: bool) -> None:
    from kvproxy.backends.grammar_child import parse_error

    p = plan("required", parallel)
    values = qwen_xml.values_schema(p)
    assert values is not None and len(values["properties"]) == 8  # the parameters that cannot be text
    grammar = qwen_xml.grammar(p, json_gbnf(values))
    assert parse_error(grammar) is None, grammar
    assert ("root ::= tool-call tool-call*" in grammar) is parallel
    # required parameters in any order (llama.cpp's permute), optional ones after them
    assert "tool-edit-args-7 ::= tool-edit-arg-filename tool-edit-args-6 |" in grammar
    assert "tool-special-function-with-opt-arg-arg1 ( tool-special-function-with-opt-arg-arg2 )*" in grammar
    assert 'tool-special-function-arg-arg1 ::= "<parameter=arg1>\\n" integer "\\n</parameter>\\n"' in grammar
    assert 'tool-python-arg-code ::= "<parameter=code>\\n" xml-arg-string' in grammar
    # string-only tools need no compile
    assert qwen_xml.values_schema(plan("required", tools=[PYTHON, EDIT])) is None
    assert parse_error(qwen_xml.grammar(plan("required", tools=[PYTHON, EDIT]), None)) is None


def test_xml_arg_string_rule_stops_at_the_first_delimiter() -> None:
    """The automaton llama.cpp writes for text up to ``\\n</parameter>\\n``, run by hand."""
    from kvproxy.tool_calls.gbnf import _next_state

    delim = qwen_xml.ARG_CLOSE
    for text, end in [
        ("a\n</parameter>\n", 15),
        ("#include\n\n</parameter>\nx", 23),
        ("\n</par\n</parameter>\n", 20),
    ]:
        state = 0
        for i, ch in enumerate(text):
            state = _next_state(delim, state, ch)
            if state == len(delim):
                assert i + 1 == end
                break
        else:
            pytest.fail(text)


# ---- Gemma 4 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            '<|tool_call>call:get_time{city:<|"|>London<|"|>}<tool_call|>',
            None,
            [("get_time", {"city": "London"})],
        ),
        (
            '<|tool_call>call:get_time{city:<|"|>San Francisco<|"|>}<tool_call|>',
            None,
            [("get_time", {"city": "San Francisco"})],
        ),
        ("<|tool_call>call:empty_args{}<tool_call|>", None, [("empty_args", {})]),
        (
            'Hello, world!\nWhat\'s up?<|tool_call>call:get_time{city:<|"|>Paris<|"|>}<tool_call|>',
            "Hello, world!\nWhat's up?",
            [("get_time", {"city": "Paris"})],
        ),
        (
            '<|tool_call>call:get_time{city:<|"|>London<|"|>}<tool_call|>'
            '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>',
            None,
            [("get_time", {"city": "London"}), ("get_weather", {"city": "Paris"})],
        ),
        (
            "<|tool_call>call:special_function{arg1:42}<tool_call|>",
            None,
            [("special_function", {"arg1": 42})],
        ),
        (
            "<|tool_call>call:special_function{arg1:-7}<tool_call|>",
            None,
            [("special_function", {"arg1": -7})],
        ),
        ("<|tool_call>call:amount{orig:3.14}<tool_call|>", None, [("amount", {"orig": 3.14})]),
        ("<|tool_call>call:toggle{enabled:true}<tool_call|>", None, [("toggle", {"enabled": True})]),
        ("<|tool_call>call:toggle{enabled:false}<tool_call|>", None, [("toggle", {"enabled": False})]),
        ("<|tool_call>call:set_nullable{value:null}<tool_call|>", None, [("set_nullable", {"value": None})]),
        (
            '<|tool_call>call:todo_list{todos:[<|"|>buy milk<|"|>,<|"|>walk dog<|"|>]}<tool_call|>',
            None,
            [("todo_list", {"todos": ["buy milk", "walk dog"]})],
        ),
        (
            '<|tool_call>call:set_config{config:{theme:<|"|>dark<|"|>,count:3}}<tool_call|>',
            None,
            [("set_config", {"config": {"theme": "dark", "count": 3}})],
        ),
        ("<|tool_call>call:todo_list{todos:[]}<tool_call|>", None, [("todo_list", {"todos": []})]),
        ("<|tool_call>call:set_config{config:{}}<tool_call|>", None, [("set_config", {"config": {}})]),
        ("<|tool_call>call:amount{orig:1.5e10}<tool_call|>", None, [("amount", {"orig": 1.5e10})]),
    ],
)
def test_gemma4_parse_llama_cpp_strings(text: str, content: str | None, calls: list[tuple[str, Any]]) -> None:
    result = gemma4.parse(text, plan())
    assert result[0] == content and calls_of(result) == calls


def test_gemma4_arguments_written_as_llama_cpp_writes_them() -> None:
    text = '<|tool_call>call:amount{orig:1.5e10,note:<|"|>a "q"\n<|"|>}<tool_call|>'
    assert gemma4.parse(text, plan())[1][0].arguments == '{"orig":1.5e10,"note":"a \\"q\\"\\n"}'


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        '<|tool_call>call:get_time{city:<|"|>London<|"|>}',  # cut short
        '<|tool_call>call:unknown{city:<|"|>London<|"|>}<tool_call|>',
        '<|tool_call>call:get_time{city:<|"|>London}<tool_call|>',
        "<|tool_call>call:get_time{city:}<tool_call|>",
    ],
)
def test_gemma4_unmatched_output_stays_content(text: str) -> None:
    assert gemma4.parse(text, plan()) == (text, [])


@pytest.mark.parametrize("parallel", [False, True])
def test_gemma4_grammar_is_accepted_by_llama_cpp(parallel: bool) -> None:
    from kvproxy.backends.grammar_child import parse_error

    grammar = gemma4.grammar(plan("required", parallel, tools=[GET_TIME, GET_WEATHER]))
    assert parse_error(grammar) is None, grammar
    assert grammar.startswith('root ::= ( "<|tool_call>call:" ( tool-get-time | tool-get-weather )')
    assert grammar.splitlines()[0].endswith('"<tool_call|>" )' + ("+" if parallel else ""))


def test_gemma4_history_folds_results_for_older_templates() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"time": "noon"}'},
        {"role": "assistant", "content": "Noon."},
        {"role": "user", "content": "thanks"},
    ]
    folded = gemma4.history(messages, "older template")
    assert folded == [
        messages[0],
        {
            "role": "assistant",
            "tool_calls": [call],
            "tool_responses": [{"name": "get_time", "response": {"time": "noon"}}],
            "content": "Noon.",
        },
        messages[4],
    ]
    assert gemma4.history(messages, gemma4.CURRENT_TEMPLATE) == messages


# ---- detection and the turn ---------------------------------------------------------------------


def _template(name: str) -> str:
    return (llama_bin().parent / "src" / "models" / "templates" / name).read_text()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen3.5-4B.jinja", ToolFormat.QWEN_XML),
        ("Qwen3-Coder.jinja", ToolFormat.QWEN_XML),
        ("google-gemma-4-31B-it.jinja", ToolFormat.GEMMA4),
        ("google-gemma-4-31B-it-interleaved.jinja", ToolFormat.GEMMA4),
    ],
)
def test_native_formats_detected_in_llama_cpp_templates(name: str, expected: ToolFormat) -> None:
    assert tool_format(_template(name)) is expected


def test_turn_of_native_format_parses_with_ids_and_defaults_to_parallel(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [SPECIAL, PYTHON]}
    req = ChatCompletionRequest.model_validate(body)
    turn = ToolTurn.of(req, _template("Qwen3.5-4B.jinja"))
    assert turn is not None and turn.format is ToolFormat.QWEN_XML and turn.plan and turn.plan.parallel
    content, calls = turn.parse(xml("special_function", ("arg1", "1")) + xml("python", ("code", "x")))
    assert content is None and [c.function.name for c in calls] == ["special_function", "python"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    g = ToolTurn.of(req, _template("google-gemma-4-31B-it.jinja"))
    assert g is not None and g.format is ToolFormat.GEMMA4
    assert (
        g.parse("<|tool_call>call:special_function{arg1:1}<tool_call|>")[1][0].function.arguments
        == '{"arg1":1}'
    )


@pytest.mark.parametrize(
    ("generated", "reasoning", "calls"),
    [
        (xml("special_function", ("arg1", "1")), None, 1),  # a forced call straight after <think>
        ("Let me call it.\n" + xml("special_function", ("arg1", "1")), "Let me call it.\n", 1),
        ("Thought.\n</think>\n\n" + xml("special_function", ("arg1", "1")), "Thought.\n", 1),
        ("Only thinking", "Only thinking", 0),
    ],
)
def test_qwen_thinking_ends_where_a_call_starts(generated: str, reasoning: str | None, calls: int) -> None:
    from kvproxy.model.reasoning import QWEN, ReasoningSplitter
    from kvproxy.serving.tool_turns import split

    r, rest = split(generated, ReasoningSplitter(QWEN, "<|im_start|>assistant\n<think>\n"))
    assert r == reasoning
    assert len(qwen_xml.parse(rest, plan())[1]) == calls
