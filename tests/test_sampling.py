"""What the reply looks like: each sampling setting does exactly what it says, and nothing else.

The crafted model gives "puck" the logit 10 and "goal" the logit 9 at every position; every other
token has logit 0 (see phi3_models.py). The repeat penalty looks only at the reply, never the prompt.
"""
from __future__ import annotations

import gguf
import pytest

from conftest import console, crafted


def words(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\n")
    return result.text.split()


def test_the_crafted_models_are_q4_k_m_like_the_real_file(models, tmp_path):
    # K-quant weights take other kernels than F32 (on AMX machines, kernels that crash): test those.
    (tmp_path / "model.gguf").write_bytes(models["puck-goal.gguf"])
    types = {t.tensor_type for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types and gguf.GGMLQuantizationType.Q6_K in types


def test_temperature_zero_is_greedy(hub, warm_home):
    result = console(*crafted(temperature=0, sample_len=6), hub=hub, home=warm_home)
    assert result.stdout == b"puck puck puck puck puck puck\n"


def test_the_first_word_has_no_leading_space_and_stdout_has_nothing_else(hub, warm_home):
    result = console(*crafted(sample_len=2), hub=hub, home=warm_home)
    assert result.stdout == b"puck puck\n"
    assert "tok/s" in result.stderr and "seed" in result.stderr  # the report goes to stderr


def test_repeat_penalty_above_the_logit_ratio_changes_the_second_token(hub, warm_home):
    # 10 / 1.5 < 9: once "puck" has been said, "goal" wins; then both are penalised and "puck" wins again.
    result = console(*crafted(repeat_penalty=1.5, sample_len=5), hub=hub, home=warm_home)
    assert words(result) == ["puck", "goal", "puck", "puck", "puck"]


def test_repeat_penalty_below_the_logit_ratio_changes_nothing(hub, warm_home):
    result = console(*crafted(repeat_penalty=1.05, sample_len=5), hub=hub, home=warm_home)
    assert words(result) == ["puck"] * 5


def test_repeat_window_of_one_token_alternates(hub, warm_home):
    # Only the last token is penalised, so the two words take turns.
    result = console(*crafted(repeat_penalty=1.5, repeat_last_n=1, sample_len=6), hub=hub, home=warm_home)
    assert words(result) == ["puck", "goal"] * 3


def test_repeat_window_of_zero_turns_the_penalty_off(hub, warm_home):
    result = console(*crafted(repeat_penalty=1.5, repeat_last_n=0, sample_len=4), hub=hub, home=warm_home)
    assert words(result) == ["puck"] * 4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tiny_top_p_keeps_only_the_likeliest_token_at_temperature_one(hub, warm_home, seed):
    result = console(*crafted(temperature=1, top_p=0.01, sample_len=30, seed=seed), hub=hub, home=warm_home)
    assert words(result) == ["puck"] * 30


def test_top_p_keeps_the_smallest_set_that_reaches_p(hub, warm_home):
    # At temperature 1: P(puck) ~ 0.35, P(goal) ~ 0.13, the other 32062 tokens share the rest.
    result = console(*crafted(temperature=1, top_p=0.4, sample_len=60, seed=5), hub=hub, home=warm_home)
    assert set(words(result)) == {"puck", "goal"}


def test_without_top_p_the_tail_is_sampled_too(hub, warm_home):
    # No hidden top-k or min-p: about half of all draws come from the 32062 tokens outside the top two.
    result = console(*crafted(temperature=1, sample_len=60, seed=5), hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    others = [w for w in result.text.split() if w not in ("puck", "goal")]
    assert len(others) >= 10


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(hub, warm_home):
    runs = [console(*crafted(temperature=1, sample_len=40, seed=seed), hub=hub, home=warm_home) for seed in (7, 7, 8)]
    assert all(r.returncode == 0 for r in runs)
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout != runs[2].stdout


def test_without_a_seed_each_run_differs_and_reports_its_seed(hub, warm_home):
    runs = [console(*crafted(temperature=1, sample_len=40), hub=hub, home=warm_home) for _ in range(2)]
    assert runs[0].stdout != runs[1].stdout
    seed = runs[0].stderr.rsplit("seed ", 1)[1].split()[0]
    again = console(*crafted(temperature=1, sample_len=40, seed=seed), hub=hub, home=warm_home)
    assert again.stdout == runs[0].stdout


@pytest.mark.parametrize("length", [1, 7, 23])
def test_sample_len_is_the_number_of_tokens_generated(hub, warm_home, length):
    result = console(*crafted(sample_len=length), hub=hub, home=warm_home)
    assert words(result) == ["puck"] * length
    assert f"generated: {length} tokens" in result.stderr


def test_stops_at_end_although_the_gguf_declares_endoftext_as_eos(hub, warm_home):
    result = console(*crafted(model="end.gguf", sample_len=50), hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"\n"
    assert "generated: 1 tokens" in result.stderr


def test_stops_at_end_when_sampling_too(hub, warm_home):
    result = console(*crafted(model="end.gguf", temperature=1, sample_len=200, seed=3), hub=hub, home=warm_home)
    generated = int(result.stderr.split("generated: ")[1].split()[0])
    assert generated < 200  # P(<|end|>) is about 0.4 per token


def test_special_tokens_are_never_printed(hub, warm_home):
    result = console(*crafted(model="placeholder.gguf", sample_len=5), hub=hub, home=warm_home)
    assert result.stdout == b"\n"
    assert "generated: 5 tokens" in result.stderr


def test_a_character_split_over_four_byte_tokens_is_printed_whole(hub, warm_home):
    # Byte tokens <0xF0> <0x9F> <0x98> <0x80>, in that order thanks to a strong penalty: U+1F600.
    result = console(*crafted(model="emoji.gguf", repeat_penalty=100, sample_len=4), hub=hub, home=warm_home)
    assert result.stdout == "\U0001F600\n".encode()


def test_an_unfinished_character_at_the_end_becomes_a_replacement_mark(hub, warm_home):
    result = console(*crafted(model="emoji.gguf", repeat_penalty=100, sample_len=3), hub=hub, home=warm_home)
    assert result.stdout == "\ufffd\n".encode()


def test_quiet_leaves_stderr_empty(hub, warm_home):
    result = console(*crafted(sample_len=3), "--quiet", hub=hub, home=warm_home)
    assert result.stdout == b"puck puck puck\n"
    assert result.stderr == ""


def test_verbose_shows_llama_cpp_log(hub, warm_home):
    result = console(*crafted(sample_len=3), "--verbose", hub=hub, home=warm_home)
    assert result.stdout == b"puck puck puck\n"
    assert "llama_model_loader" in result.stderr or "print_info" in result.stderr


def test_the_repeat_window_covers_the_reply_not_the_prompt(hub, warm_home):
    # As in the seed: asking about "puck" does not push "puck" down; once the reply has said it, it does.
    result = console(*crafted(prompt="say puck puck goal", repeat_penalty=1.5, sample_len=3), hub=hub, home=warm_home)
    assert words(result) == ["puck", "goal", "puck"]
