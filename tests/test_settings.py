"""The settings: constants at the top of the script, the same settings as flags, and the prompt's sources."""
from __future__ import annotations

import re

import pytest

from conftest import CRAFTED, SCRIPT, console, crafted


def edited_copy(tmp_path, **constants: str):
    """A copy of phi_console.py with some constants rewritten, as a user would edit them."""
    source = SCRIPT.read_text()
    for name, value in constants.items():
        source, count = re.subn(rf"^{name} = .*?(  #.*)?$", rf"{name} = {value}\1", source, count=1, flags=re.M)
        assert count == 1, name
    copy = tmp_path / "phi_console.py"
    copy.write_text(source)
    return copy


def test_help_lists_every_setting_with_its_default(tmp_path):
    result = console("--help", hub=None, home=tmp_path)
    assert result.returncode == 0
    for flag in ("--prompt", "--temperature", "--top-p", "--repeat-penalty", "--repeat-last-n", "--sample-len",
                 "--seed", "--threads", "--gpu-layers", "--ctx", "--model-repo", "--model-file", "--model-revision",
                 "--tokenizer-revision", "--system", "--repack", "--no-repack",
                 "--tokenizer-repo", "--quiet", "--verbose"):
        assert flag in result.text
    shown = " ".join(result.text.split())  # as read, whatever the width the help was wrapped to
    assert "Write a haiku about ice hockey" in shown and "(default: 1.2)" in shown


def test_editing_the_constants_acts_like_the_flags(hub, warm_home, tmp_path):
    copy = edited_copy(tmp_path, MODEL_REPO=f'"{CRAFTED}"', MODEL_FILE='"puck-goal.gguf"', TEMPERATURE="0.0",
                       REPEAT_PENALTY="1.5", REPEAT_LAST_N="1", SAMPLE_LEN="6", PROMPT='"say something"')
    edited = console(script=copy, hub=hub, home=warm_home)
    flagged = console(*crafted(repeat_penalty=1.5, repeat_last_n=1, sample_len=6), hub=hub, home=warm_home)
    assert edited.returncode == 0, edited.stderr
    assert edited.stdout == flagged.stdout == b"puck goal puck goal puck goal\n"


def test_a_flag_overrides_an_edited_constant(hub, warm_home, tmp_path):
    copy = edited_copy(tmp_path, MODEL_REPO=f'"{CRAFTED}"', MODEL_FILE='"puck-goal.gguf"', SAMPLE_LEN="6")
    result = console("--sample-len", "2", "--temperature", "0", "--repeat-penalty", "1", script=copy, hub=hub,
                     home=warm_home)
    assert result.stdout == b"puck puck\n"


def test_an_edited_seed_and_top_p_reproduce_the_flags(hub, warm_home, tmp_path):
    copy = edited_copy(tmp_path, MODEL_REPO=f'"{CRAFTED}"', MODEL_FILE='"puck-goal.gguf"', SEED="11", TOP_P="0.4",
                       REPEAT_PENALTY="1.0", SAMPLE_LEN="30")
    edited = console(script=copy, hub=hub, home=warm_home)
    flags = crafted(temperature=1, seed=11, top_p=0.4, sample_len=30, prompt="Write a haiku about ice hockey")
    flagged = console(*flags, hub=hub, home=warm_home)
    assert edited.returncode == 0, edited.stderr
    assert edited.stdout == flagged.stdout


@pytest.mark.parametrize("name,value", [("TEMPERATURE", '"hot"'), ("SAMPLE_LEN", "12.5"), ("TOP_P", "2"),
                                        ("SEED", "True"), ("CTX", "-5"), ("PROMPT", '""'),
                                        ("REPACK", '"yes"'), ("REPACK", "1")])
def test_a_bad_value_typed_into_a_constant_is_refused(tmp_path, name, value):
    result = console(script=edited_copy(tmp_path, **{name: value}), hub=None, home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1


def prompt_tokens(result) -> int:
    assert result.returncode == 0, result.stderr
    return int(result.stderr.split("prompt: ")[1].split()[0])


LONG = " ".join(["hello world"] * 20)  # 38 tokens more than "say something"


def test_a_pipe_supplies_the_prompt(hub, warm_home):
    piped = console(*crafted(prompt=None), hub=hub, home=warm_home, stdin=LONG.encode())
    typed = console(*crafted(prompt=LONG), hub=hub, home=warm_home)
    assert prompt_tokens(piped) == prompt_tokens(typed) > prompt_tokens(console(*crafted(), hub=hub, home=warm_home))
    assert piped.stdout == typed.stdout


def test_dash_reads_the_prompt_from_stdin(hub, warm_home):
    dashed = console(*crafted(prompt="-"), hub=hub, home=warm_home, stdin=LONG.encode())
    assert prompt_tokens(dashed) == prompt_tokens(console(*crafted(prompt=LONG), hub=hub, home=warm_home))


def test_an_empty_prompt_from_stdin_is_refused(tmp_path):
    result = console("-p", "-", hub=None, home=tmp_path, stdin=b"  \n")
    assert result.returncode == 2 and "prompt is empty" in result.stderr


def test_a_prompt_that_types_special_tokens_stays_plain_text(hub, warm_home):
    # Typed "<|end|>" must not end the user's turn early: it costs as many tokens as any other 7 characters.
    special = console(*crafted(prompt="hello <|end|>"), hub=hub, home=warm_home)
    plain = console(*crafted(prompt="hello <|xyz|>"), hub=hub, home=warm_home)
    assert prompt_tokens(special) == prompt_tokens(plain) > 10
