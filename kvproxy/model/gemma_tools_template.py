"""Gemma's turn format with Hermes-style tool calls, for a llama-server primary of a Gemma 2/3 GGUF
that carries no template (the bundled Gemma 3 270M).

The pinned llama.cpp has no generic tool-call format any more: its autoparser finds tool syntax in a
template or none, and for a template that knows nothing of tools (Gemma's published one, ChatML)
llama-server ignores ``tools`` and answers plain text, even for ``tool_choice: required``. This
template renders every chat without tools exactly as kvproxy.model.chat_template.GEMMA_TEMPLATE does, and
with tools it lists them and writes calls as ``<tool_call>{"name", "arguments"}</tool_call>`` (tool
results as a user turn of ``<tool_response>`` blocks), the syntax llama.cpp's autoparser reads as
Hermes / Qwen 2.5 calls: llama-server then parses calls and forces ``required`` and named choices by
grammar. ``kvproxy llama-server-args`` hands it to llama-server (``--chat-template-file``).
Unlike Gemma's own, it does not refuse a chat whose user and assistant turns do not alternate.
"""

from __future__ import annotations

GEMMA_TOOLS_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(tools="") -%}
{%- if tools -%}
    {%- set ns.tools = "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
        + "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" -%}
    {%- for tool in tools -%}
        {%- set ns.tools = ns.tools + "\\n" + (tool | tojson) -%}
    {%- endfor -%}
    {%- set ns.tools = ns.tools + "\\n</tools>\\n\\nFor each function call, return a json object with "
        + "function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
        + "{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>\\n\\n" -%}
{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = ns.tools + messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = ns.tools -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'tool' -%}
        {%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' -%}
            {{ '<start_of_turn>user' }}
        {%- endif -%}
        {{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}
        {%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' -%}
            {{ '<end_of_turn>\\n' }}
        {%- endif -%}
    {%- else -%}
        {%- if (message['role'] == 'assistant') -%}
            {%- set role = "model" -%}
        {%- else -%}
            {%- set role = message['role'] -%}
        {%- endif -%}
        {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
        {%- if message['content'] -%}
            {{- message['content'] | trim }}
        {%- endif -%}
        {%- if message['tool_calls'] -%}
            {%- for call in message['tool_calls'] -%}
                {%- if call['function'] is defined -%}
                    {%- set call = call['function'] -%}
                {%- endif -%}
                {{- '\\n<tool_call>\\n{"name": "' + call['name'] + '", "arguments": ' }}
                {%- if call['arguments'] is string -%}
                    {{- call['arguments'] }}
                {%- else -%}
                    {{- call['arguments'] | tojson }}
                {%- endif -%}
                {{- '}\\n</tool_call>' }}
            {%- endfor -%}
        {%- endif -%}
        {{- '<end_of_turn>\\n' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""
