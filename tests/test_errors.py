"""Every expected failure is one `error:` line naming the cause and the fix, and a non-zero exit."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time

import pytest

from conftest import (CRAFTED, HOSTILE_IDS, LONG_PROMPT, PATIENCE, PYTHON, SCRIPT, console, crafted, environment_for,
                      hostile_tokenizer, start, the_error)


BAD_SETTINGS = [
    ("--temperature", "-0.5"),
    ("--temperature", "nan"),
    ("--temperature", "inf"),
    ("--temperature", "warm"),
    ("--top-p", "0"),
    ("--top-p", "1.5"),
    ("--top-p", "-0.1"),
    ("--repeat-penalty", "0"),
    ("--repeat-penalty", "-1"),
    ("--repeat-last-n", "-1"),
    ("--repeat-last-n", "2.5"),
    ("--repeat-last-n", "100000000"),  # llama.cpp would allocate a window of that many tokens
    ("--sample-len", "0"),
    ("--sample-len", "ten"),
    ("--seed", "-1"),
    ("--seed", str(2**32 - 1)),
    ("--threads", "0"),
    ("--threads", "-4"),
    ("--threads", "100000"),  # llama.cpp would abort, out of memory for their stacks
    ("--gpu-layers", "-2"),
    ("--ctx", "0"),
    ("--model-file", ""),
    ("--model-revision", "  "),
    ("--tokenizer-revision", ""),
    ("--system", " "),
    ("--no-such-flag", "1"),
]


@pytest.mark.parametrize("flag,value", BAD_SETTINGS)
def test_a_bad_setting_is_refused_before_anything_slow(tmp_path, flag, value):
    result = console(flag, value, hub=None, home=tmp_path)  # no hub: refusing must not need the network
    line = the_error(result, code=2)
    assert flag in line
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "hub").exists()  # nothing was downloaded or even looked up


def test_a_context_larger_than_the_model_was_trained_for_is_refused(hub, warm_home):
    line = the_error(console(*crafted(), "--ctx", "8192", hub=hub, home=warm_home), code=2)
    assert "--ctx 8192" in line and "4096" in line


def test_a_prompt_that_leaves_no_room_in_the_context_is_refused(hub, warm_home):
    result = console(*crafted(prompt="hello world " * 40), "--ctx", "64", hub=hub, home=warm_home)
    line = the_error(result, code=2)
    assert "prompt is" in line and "64" in line and "--ctx" in line


def test_a_long_reply_stops_when_the_context_is_full_and_says_so(hub, warm_home):
    result = console(*crafted(prompt="hello", sample_len=100), "--ctx", "40", hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    assert "leaves room for" in result.stderr
    count = len(result.text.split())
    assert 0 < count < 100 and f"generated: {count} tokens" in result.stderr


@pytest.mark.parametrize("args,expected", [
    (("--model-repo", "nobody/no-such-model"), "repository nobody/no-such-model not found"),
    (("--model-file", "no-such-file.gguf"), "no-such-file.gguf not found in"),
    (("--model-revision", "v999"), "revision 'v999' not found"),
    (("--tokenizer-revision", "v998"), "revision 'v998' not found"),
    (("--model-repo", "phi-console-tests/gated"), "HF_TOKEN"),
    (("--tokenizer-repo", "nobody/no-such-tokenizer"), "repository nobody/no-such-tokenizer not found"),
])
def test_hub_refusals_name_what_to_check(hub, tmp_path, args, expected):
    line = the_error(console(*args, hub=hub, home=tmp_path))
    assert expected in line


def test_an_unreachable_hub_with_nothing_cached_answers_within_seconds(tmp_path, startup):
    started = time.monotonic()
    result = console(hub=None, home=tmp_path)  # HF_ENDPOINT points at a closed port
    elapsed = time.monotonic() - started
    line = the_error(result)
    assert "cannot reach the hub" in line and "not cached" in line
    assert "Retry" not in result.stderr
    assert elapsed < 3 * startup + 5  # the library alone would retry with backoff for about 25 s


def test_offline_mode_with_nothing_cached_says_so(hub, tmp_path):
    line = the_error(console(hub=hub, home=tmp_path, env={"HF_HUB_OFFLINE": "1"}))
    assert "HF_HUB_OFFLINE" in line
    assert hub.requests == []


def test_a_file_that_is_not_a_gguf_is_refused(hub, tmp_path):
    result = console("--model-repo", CRAFTED, "--model-file", "not-a-model.gguf", hub=hub, home=tmp_path)
    line = the_error(result)
    assert "not a loadable GGUF" in line and "not-a-model.gguf" in line


def test_a_tokenizer_that_disagrees_with_the_gguf_is_refused(hub, warm_home):
    result = console(*crafted(), "--tokenizer-repo", "phi-console-tests/mismatched-tokenizer", hub=hub, home=warm_home)
    line = the_error(result)
    assert "<|end|>" in line and "32008" in line and "do not belong together" in line


@pytest.mark.parametrize("case", HOSTILE_IDS)
def test_a_tokenizer_whose_chat_token_has_no_usable_id_is_refused_in_one_line(hub, warm_home, case):
    # llama.cpp aborts the whole process (SIGABRT and a stack dump) when asked for the text of an id it lacks.
    result = console(*crafted(), "--tokenizer-repo", hostile_tokenizer(case), hub=hub, home=warm_home)
    line = the_error(result)  # exit 1, one line, nothing on stdout, no traceback
    assert "<|end|>" in line and f"the id {HOSTILE_IDS[case]!r}" in line


def test_a_tokenizer_that_is_not_json_is_refused(hub, warm_home):
    result = console(*crafted(), "--tokenizer-repo", "phi-console-tests/broken-tokenizer", hub=hub, home=warm_home)
    assert "not a usable tokenizer.json" in the_error(result)


def stream_then_signal(hub, home, startup: float, signum: int, *settings: str) -> tuple[int, bytes, str]:
    """Start a long reply, wait until text is streaming, then send a signal."""
    process = start(*crafted(sample_len=4000), *settings, hub=hub, home=home)
    first = b""
    while len(first) < 20:  # until the reply is streaming (read unbuffered: communicate() gets all the rest)
        first += os.read(process.stdout.fileno(), 20 - len(first))
    process.send_signal(signum)
    started = time.monotonic()
    rest, stderr = process.communicate(timeout=PATIENCE)
    assert time.monotonic() - started < 2 * startup  # the next token at most, and the exit: not the 4,000 tokens
    return process.returncode, first + rest, stderr.decode()


def test_ctrl_c_while_streaming_stops_ends_the_line_and_exits_130(hub, warm_home, startup):
    code, stdout, stderr = stream_then_signal(hub, warm_home, startup, signal.SIGINT)
    assert code == 130
    assert stdout.startswith(b"puck puck") and stdout.endswith(b"\n")
    assert len(stdout.split()) < 4000
    assert "Traceback" not in stderr


def test_a_reply_stopped_by_ctrl_c_still_reports_its_seed_which_repeats_it(hub, warm_home, startup):
    code, stdout, stderr = stream_then_signal(hub, warm_home, startup, signal.SIGINT, "--temperature", "1",
                                              "--seed", "none")
    assert code == 130
    report = stderr.splitlines()[-1]
    count, seed = re.search(r"generated: (\d+) tokens, .* \| seed (\d+)$", report).groups()
    # The same seed and length print the same: every token counted was printed, and no token more
    again = console(*crafted(sample_len=int(count), temperature=1, seed=int(seed)), hub=hub, home=warm_home)
    assert again.stdout == stdout and int(count) > 0


def test_sigterm_while_streaming_exits_143(hub, warm_home, startup):
    code, stdout, stderr = stream_then_signal(hub, warm_home, startup, signal.SIGTERM)
    assert code == 143
    assert stdout.endswith(b"\n") and "Traceback" not in stderr


def test_a_closed_stdout_ends_quietly(hub, warm_home):
    command = f"{PYTHON} {SCRIPT} {shlex.join(crafted(sample_len=3000))} | head -c 20; exit ${{PIPESTATUS[0]}}"
    env = environment_for(hub, warm_home)
    result = subprocess.run(["bash", "-c", command], capture_output=True, env=env, timeout=PATIENCE)
    assert result.stdout == b"puck puck puck puck "
    assert result.returncode == 0
    assert b"Traceback" not in result.stderr and b"Error" not in result.stderr




def signal_during_the_prompt(hub, home, model_flags, signum: int, *extra: str, stdin: bytes = b"") -> tuple:
    """Start a run whose prompt takes about 12 s, signal it early in its first batch; exit code, output, reaction time.

    --verbose shows llama.cpp's log, whose last line before the prompt is evaluated says the context is ready.
    """
    process = start(*model_flags, "--sample-len", "5", "--verbose", *extra, hub=hub, home=home, stdin=subprocess.PIPE)
    process.stdin.write(stdin)
    process.stdin.close()
    process.stdin = None  # written whole: nothing more to send
    log: list[bytes] = []
    reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + PATIENCE
    while not any(b"reserve took" in line for line in list(log)):
        assert time.monotonic() < deadline and process.poll() is None, b"".join(log)[-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signum)
    signalled = time.monotonic()
    stdout = process.stdout.read()
    process.wait(timeout=PATIENCE)
    waited = time.monotonic() - signalled
    reader.join(timeout=10)
    return process.returncode, stdout, b"".join(log).decode("utf-8", "replace"), waited


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_during_a_long_prompt_stops_it_within_a_second(hub, slow_model, slow_home, signum, code,
                                                                         startup):
    returncode, stdout, stderr, waited = signal_during_the_prompt(hub, slow_home, slow_model, signum,
                                                                  "--prompt", LONG_PROMPT)
    assert returncode == code, stderr
    assert waited < 1.5 * startup  # a graph node and the exit, not the rest of a batch of seconds
    assert stdout == b"\n" and "Traceback" not in stderr


def test_ctrl_c_during_a_long_message_in_chat_forgets_it_and_the_chat_goes_on(hub, slow_model, slow_home):
    returncode, stdout, stderr, waited = signal_during_the_prompt(
        hub, slow_home, slow_model, signal.SIGINT, "--chat", stdin=f"{LONG_PROMPT}\n/show\nhello\n/show\n".encode())
    assert returncode == 0, stderr
    assert "stopped before the reply began" in stderr and "Traceback" not in stderr
    used = [int(n) for n in re.findall(r"context: (\d+) of", stderr)]
    assert used[0] == 0 and 0 < used[1] < 30  # nothing of the long message stays; "hello" got its reply
    assert len(stdout.splitlines()) == 2  # the stopped message's empty line, then the reply to "hello"
