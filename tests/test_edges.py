"""At every edge of what a user types, pipes in or leaves on disk, and of how the script is started and stopped:
each is one `error:` line (or a note) and the right exit code, never a traceback, a hang or a crash.

A FIFO, a symlink and a file in a temporary folder stand for devices: no test touches a real one, but for writing
to /dev/full, which discards what it is given.
"""
from __future__ import annotations


import pytest

from conftest import (MODEL_REPO, console, crafted, the_error)
from test_chat import chat


def errors_in(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def state_of(path):
    return path.with_name(path.name + ".state")


# --- 1. Names: checked with huggingface_hub's own rules, before anything else, online or offline ----------------------
@pytest.mark.parametrize(("flag", "value"), [
    ("--model-repo", MODEL_REPO + " "), ("--model-repo", "a/b/c"), ("--model-repo", "../../etc"),
    ("--tokenizer-repo", "microsoft//Phi-3"), ("--model-file", "/etc/passwd"), ("--model-file", "a/../../b"),
    ("--model-revision", "../../x"), ("--tokenizer-revision", "main branch")])
def test_a_mistyped_name_is_one_line_naming_the_setting_and_its_form(tmp_path, flag, value):
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        line = the_error(console(flag, value, "-p", "hi", hub=None, home=tmp_path, env=env), code=2)
        assert line.startswith(f"error: argument {flag}: must be ") and repr(value) in line
        assert not (tmp_path / "hub").exists()  # refused before the cache was looked at


def test_a_pasted_hub_link_is_answered_with_the_repo_it_names(tmp_path):
    link = f"https://huggingface.co/{MODEL_REPO}/blob/main/Phi-3-mini-4k-instruct-q4.gguf"
    line = the_error(console("--model-repo", link, hub=None, home=tmp_path), code=2)
    assert line.startswith("error: argument --model-repo: must be a repo: org/name") and f"repo is {MODEL_REPO}" in line


def test_a_branch_with_a_slash_is_a_revision_like_any_other(hub, warm_home):
    # refs/pr/1 is how the hub names a pull request: allowed by the check, then not found on this hub
    line = the_error(console(*crafted(), "--model-revision", "refs/pr/1", hub=hub, home=warm_home))
    assert "revision 'refs/pr/1' not found" in line


# --- 7. Numbers that a 32-bit float turns into 0 or infinity are refused ---------------------------------------------
@pytest.mark.parametrize(("flag", "value"), [("--repeat-penalty", "1e-300"), ("--temperature", "1e308"),
                                             ("--temperature", "1e-300"), ("--top-p", "1e-45")])
def test_a_number_a_32_bit_float_cannot_hold_is_refused(tmp_path, flag, value):
    line = the_error(console(flag, value, hub=None, home=tmp_path), code=2)
    assert line.startswith(f"error: argument {flag}: must be ") and "1e-30" in line


def test_help_says_where_each_range_ends(tmp_path):
    shown = "".join(console("--help", hub=None, home=tmp_path).stdout.decode().split())  # however it is wrapped
    for expected in ("--temperatureX0=greedy,higher=morerandom;0,oranumberin1e-30..1e30",
                     "anumberin1e-30..1,ornone", "anumberin1e-30..1e30(default:1.2)"):
        assert expected in shown


def test_set_refuses_such_a_number_too_and_the_chat_goes_on(hub, warm_home):
    result = chat(hub, warm_home, ["/set temperature 1e-300", "/show", "hello"])
    assert result.returncode == 0 and result.stdout == b"puck puck puck\n"
    assert errors_in(result) == ["error: temperature must be 0, or a number in 1e-30..1e30 (got '1e-300')"]
    assert "temperature = 0.0" in result.stderr  # as it was
