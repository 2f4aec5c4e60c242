"""Answers a program can use: a document piped in with an instruction."""
from __future__ import annotations

import re
import shutil

import pytest

from conftest import RANDOM, console, crafted, flags
DOCUMENT = " ".join(["hello world"] * 480)  # about 960 tokens: more than one 512-token batch


def random_model(**settings: object) -> list[str]:
    chosen = {"temperature": 1.0, "sample_len": 40, "prompt": "say something", **settings}
    return ["--model-repo", RANDOM, "--model-file", "two-layers.gguf", *flags(**chosen)]


@pytest.fixture
def random_home(hub, random_models, tmp_path_factory):
    """A cache that holds the random models and no saved prompt."""
    home = tmp_path_factory.getbasetemp() / "answers_home"
    if not home.exists():
        assert console(*random_model(sample_len=1, prompt_cache_gb=0), hub=hub, home=home).returncode == 0
    shutil.rmtree(home / "phi-console" / "prompts", ignore_errors=True)
    return home


def fed_tokens(result) -> str:
    """The prompt's tokens as --verbose shows them."""
    assert result.returncode == 0, result.stderr
    return re.search(r"^prompt: \d+ tokens \[.*\]$", result.stderr, re.M)[0]


# --- A document and an instruction ------------------------------------------------------------------------------------
def test_a_piped_document_comes_first_then_a_blank_line_then_the_instruction(hub, warm_home):
    piped = console(*crafted(prompt="say something"), "--verbose", hub=hub, home=warm_home,
                    stdin=b"hello world\nquick brown fox\n")
    typed = console(*crafted(prompt="hello world\nquick brown fox\n\nsay something"), "--verbose", hub=hub,
                    home=warm_home)
    assert fed_tokens(piped) == fed_tokens(typed)
    assert piped.stdout == typed.stdout


def test_without_an_instruction_the_pipe_is_the_whole_prompt_and_dash_reads_it_alone(hub, warm_home):
    alone = fed_tokens(console(*crafted(prompt="hello world"), "--verbose", hub=hub, home=warm_home))
    for prompt in (None, "-"):
        piped = console(*crafted(prompt=prompt), "--verbose", hub=hub, home=warm_home, stdin=b"hello world")
        assert fed_tokens(piped) == alone


def test_an_empty_pipe_leaves_the_instruction_alone(hub, warm_home):
    alone = fed_tokens(console(*crafted(prompt="say something"), "--verbose", hub=hub, home=warm_home))
    piped = console(*crafted(prompt="say something"), "--verbose", hub=hub, home=warm_home, stdin=b" \n")
    assert fed_tokens(piped) == alone


def test_a_second_instruction_over_the_same_document_restores_the_document_from_the_first(hub, random_home):
    first = console(*random_model(prompt="say something", sample_len=8), hub=hub, home=random_home,
                    stdin=DOCUMENT.encode())
    assert first.returncode == 0, first.stderr
    second = console(*random_model(prompt="write haiku", seed=3, sample_len=8), hub=hub, home=random_home,
                     stdin=DOCUMENT.encode())
    restored = int(re.search(r"prompt: \d+ tokens, (\d+) restored from an earlier run", second.stderr)[1])
    assert restored >= 512
    evaluated = console(*random_model(prompt="write haiku", seed=3, sample_len=8, prompt_cache_gb=0), hub=hub,
                        home=random_home, stdin=DOCUMENT.encode())
    assert second.stdout == evaluated.stdout  # the restored start is the document's own
