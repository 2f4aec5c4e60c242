"""Many prompts in one run (--prompts FILE): one load, up to --parallel prompts decoded together as sequences of one
batch, one JSON line out for each prompt, in the file's order, each as its one-shot run would reply.

Replies come from the random-weights model, so that each depends on its own prompt, seed and cache.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess

import llama_cpp
import pytest

from conftest import PATIENCE, PYTHON, RANDOM, SCRIPT, Streams, console, environment_for, flags, start, the_error

RANDOM_MODEL = ["--model-repo", RANDOM, "--model-file", "two-layers.gguf"]


@pytest.fixture(scope="module")
def home(hub, random_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("prompts_home")
    assert console(*RANDOM_MODEL, "--sample-len", "1", "--prompt-cache-gb", "0", hub=hub, home=home).returncode == 0
    return home


def many(hub, home, path, *args: str, **settings):
    chosen = {"temperature": 1.0, "sample_len": 12, "seed": 7, "prompt_cache_gb": 0, **settings}
    return console(*RANDOM_MODEL, "--prompts", str(path), *flags(**chosen), *args, hub=hub, home=home)


def lines_of(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.decode().split("\n")[:-1]]  # JSON lines end at \n only


def test_a_plain_file_gets_one_json_line_per_prompt_in_its_order(hub, home, tmp_path):
    (tmp_path / "p.txt").write_text("why is the sky blue\n\nwrite a haiku\nsay hello world\n")  # a blank line skipped
    lines = lines_of(many(hub, home, tmp_path / "p.txt"))
    assert [line["prompt"] for line in lines] == ["why is the sky blue", "write a haiku", "say hello world"]
    assert [line["seed"] for line in lines] == [8, 10, 11]  # the run's seed plus the line's number
    for line in lines:
        assert line["finish"] in ("end", "length") and 0 < line["tokens"] <= 12 and isinstance(line["reply"], str)


def test_jsonl_carries_its_keys_and_settings_and_the_same_run_gives_the_same_bytes(hub, home, tmp_path):
    rows = [{"id": 1, "prompt": "why is the sky blue"}, {"id": "b", "prompt": "write", "seed": 3, "sample_len": 2},
            {"prompt": "say something", "tags": ["x"], "temperature": 0}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    first = many(hub, home, tmp_path / "p.jsonl")
    lines = lines_of(first)
    assert [line.get("id") for line in lines] == [1, "b", None] and lines[2]["tags"] == ["x"]
    assert lines[1]["seed"] == 3 and lines[1]["tokens"] <= 2  # its own seed and length
    assert "sample_len" not in lines[1]  # a setting, not a key to carry
    assert many(hub, home, tmp_path / "p.jsonl").stdout == first.stdout


@pytest.mark.parametrize("repack", [False, True])
def test_with_parallel_1_each_line_is_the_one_shot_reply_for_its_seed_on_the_same_layout(hub, home, tmp_path, repack):
    # A one-shot run may evaluate its prompt on the other layout, as measured faster: the weights' layout is fixed
    if repack and b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        pytest.skip("this build never repacks")
    prompts = ["why is the sky blue", "write a haiku about ice hockey " * 3, "hello"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    lines = lines_of(many(hub, home, tmp_path / "p.txt", parallel=1, sample_len=24, repack=repack))
    for prompt, line in zip(prompts, lines):
        alone = console(*RANDOM_MODEL, *flags(prompt=prompt, seed=line["seed"], temperature=1.0, sample_len=24,
                                              prompt_cache_gb=0, repack=repack), hub=hub, home=home)
        assert alone.returncode == 0, alone.stderr
        assert alone.stdout == (line["reply"] + "\n").encode()


def test_parallel_prompts_of_every_length_and_ending_each_get_what_their_settings_allow(hub, home, tmp_path):
    rows = [{"prompt": "hello " * n, "sample_len": 3 + n} for n in (1, 40, 3, 200, 9, 2, 80)]
    rows[2]["stop"] = ["w"]  # the random vocabulary's pieces are "w123": a stop string ends it at once
    rows[4]["json_schema"] = '{"enum": ["red", "blue"]}'
    rows[5]["temperature"] = 0
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = lines_of(many(hub, home, tmp_path / "p.jsonl", parallel=3))
    assert [line["prompt"] for line in lines] == [row["prompt"] for row in rows]
    for row, line in zip(rows, lines):
        assert line["tokens"] <= row["sample_len"]
    assert lines[2]["finish"] == "stop" and "w" not in lines[2]["reply"]
    assert lines[4]["finish"] == "end" and json.loads(lines[4]["reply"]) in ("red", "blue")
    assert lines[0]["finish"] == "length" and lines[0]["tokens"] == 4


def test_a_start_that_prompts_share_is_evaluated_once(hub, home, tmp_path):
    system = "You are a terse assistant. " * 20  # about 120 tokens, the same at the start of every prompt
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\nfour\n")
    result = many(hub, home, tmp_path / "p.txt", parallel=4, system=system, sample_len=4)
    alone = many(hub, home, tmp_path / "p.txt", parallel=1, system=system, sample_len=4)
    evaluated = [int(re.search(r"prompt tokens: (\d+) evaluated, (\d+) shared", r.stderr)[1]) for r in (result, alone)]
    assert evaluated[0] < evaluated[1] / 2  # the system prompt once, not four times
    assert len(lines_of(result)) == 4


@pytest.mark.parametrize("name", ["missing.txt", "."])
def test_a_file_that_cannot_be_read_is_one_line_before_any_request(hub, tmp_path, name):
    line = the_error(console(*RANDOM_MODEL, "--prompts", str(tmp_path / name), hub=hub, home=tmp_path / "home"), code=2)
    assert line.startswith("error: --prompts: cannot read") and "\n" not in line.strip()
    assert hub.requests == []


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_a_file_without_a_prompt_says_so(hub, home, tmp_path, content):
    (tmp_path / "p.txt").write_text(content)
    assert "holds no prompt" in the_error(many(hub, home, tmp_path / "p.txt"), code=2)


BAD_LINES = {  # a line, and what its answer's error must say
    '{"prompt": 5}': 'needs a "prompt" that is non-empty text',
    '{"prompt": "x", "temperature": -1}': "temperature must be",
    '{"prompt": "x"': "is not JSON",
    '{"prompt": "x", "json_schema": {"oneOf": []}}': "the JSON schema cannot be used: Unsatisfiable",
    '{"prompt": "x", "grammar": "GRAMMAR"}': "no-such-token",  # checked against the vocabulary when it is read
    '{"prompt": "x", "error": null}': "'error', a key of the answer",
    '{"prompt": "x", "reply": "mine"}': "'reply', a key of the answer",
    "x" * 300_000: "longer than the 4096 tokens of context could hold",
}


def test_a_bad_line_is_that_line_s_error_and_every_other_line_is_answered(hub, home, tmp_path):
    (tmp_path / "g.gbnf").write_text("root ::= <|no-such-token|>\n")
    bad = [line.replace("GRAMMAR", str(tmp_path / "g.gbnf")) for line in BAD_LINES]
    lines = [f"good {n}" if n % 2 == 0 else bad[n // 2] for n in range(2 * len(bad) + 1)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    result = many(hub, home, tmp_path / "p.jsonl", sample_len=2)
    assert result.returncode == 1, result.stderr
    answers = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(answers) == len(lines) and len(result.stdout) < 10_000  # a long line is never echoed whole
    for n, answer in enumerate(answers):
        if n % 2 == 0:
            assert answer["prompt"] == f"good {n}" and "reply" in answer and "error" not in answer, answer
        else:
            said = list(BAD_LINES.values())[n // 2]
            assert said in answer["error"] and f"line {n + 1}" in answer["error"], answer
            assert "reply" not in answer


def test_lines_end_at_newlines_only_and_a_bom_and_json_s_own_forms_are_taken(hub, home, tmp_path):
    rows = ['\ufeff{"id": 1, "prompt": "a\u2028b"}', "form\x0cfeed\x85next\x1crecord\vtab", "windows\r",
            '{"prompt": "x", "stop": "Q:", "json_schema": {"enum": ["red", "blue"]}}', '{"prompt": "y", "stop": null}']
    (tmp_path / "p.txt").write_bytes("\n".join(rows).encode("utf-8") + b"\n")
    answers = lines_of(many(hub, home, tmp_path / "p.txt", sample_len=8))
    assert [answer["prompt"] for answer in answers] == ["a\u2028b", "form\x0cfeed\x85next\x1crecord\vtab", "windows",
                                                         "x", "y"]
    assert answers[0]["id"] == 1 and answers[1]["seed"] == 7 + 2  # the run's seed plus the line's number
    assert json.loads(answers[3]["reply"]) in ("red", "blue")


def test_a_pipe_is_a_prompts_file_too(hub, home):
    script = shlex.join([PYTHON, str(SCRIPT), *RANDOM_MODEL, "--threads", "1", *flags(sample_len=2, prompt_cache_gb=0)])
    result = subprocess.run(["bash", "-c", script + " --prompts <(printf 'one\\ntwo\\n')"], capture_output=True,
                            env=environment_for(hub, home), stdin=subprocess.DEVNULL, timeout=PATIENCE)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in result.stdout.decode().splitlines()] == ["one", "two"]


def test_the_context_is_sized_by_the_prompts_in_flight_not_by_parallel(hub, home, tmp_path):
    (tmp_path / "p.txt").write_text("one short prompt\n")
    result = many(hub, home, tmp_path / "p.txt", "--verbose", parallel=64, sample_len=8)
    assert result.returncode == 0, result.stderr
    assert int(re.search(r"n_ctx\s+= (\d+)", result.stderr)[1]) == 256  # one sequence's need, rounded up to 256


def test_a_prompt_too_long_says_so_on_its_line_and_the_others_go_on(hub, home, tmp_path):
    (tmp_path / "p.txt").write_text("hello\n" + "hello " * 600 + "\nworld\n")
    result = many(hub, home, tmp_path / "p.txt", "--ctx", "256")
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert "error" not in lines[0] and "error" not in lines[2] and "reply" in lines[2]
    assert "the context holds 256" in lines[1]["error"] and "reply" not in lines[1]
    assert len(lines[1]["prompt"]) < 300  # never echoed whole


def test_stdin_is_a_prompts_file_too(hub, home):
    prompts = "".join(f"prompt number {n}\n" for n in range(6)).encode()
    result = console(*RANDOM_MODEL, "--prompts", "-", *flags(sample_len=2, prompt_cache_gb=0), hub=hub, home=home,
                     stdin=prompts)
    assert [line["prompt"] for line in lines_of(result)] == [f"prompt number {n}" for n in range(6)]


def test_a_reader_that_stops_early_ends_the_run_quietly(hub, home, tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt number {n}\n" for n in range(20)))
    command = [PYTHON, str(SCRIPT), *RANDOM_MODEL, "--prompts", str(tmp_path / "p.txt"),
               *flags(sample_len=2, prompt_cache_gb=0)]
    result = subprocess.run(["bash", "-c", "set -o pipefail; " + shlex.join(command) + " | head -n 3"],
                            capture_output=True, env=environment_for(hub, home), stdin=subprocess.DEVNULL,
                            timeout=PATIENCE)
    assert result.returncode == 0 and result.stderr.count(b"error") == 0, result.stderr[-800:]
    assert len(result.stdout.splitlines()) == 3


def test_ctrl_c_after_the_first_line_exits_130_and_every_line_out_is_whole(hub, home, tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt number {n}\n" for n in range(40)))
    process = start(*RANDOM_MODEL, "--prompts", str(tmp_path / "p.txt"), *flags(sample_len=200, prompt_cache_gb=0),
                    "--parallel", "2", hub=hub, home=home)
    streams = Streams(process)
    streams.wait_for(b"\n", where="out")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=PATIENCE) == 130
    stdout, stderr = streams.close()
    assert "Traceback" not in stderr
    assert stdout.endswith("\n") and all(json.loads(line)["prompt"] for line in stdout.splitlines())
