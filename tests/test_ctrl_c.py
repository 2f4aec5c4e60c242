"""Ctrl-C pressed any number of times, at any moment: a chat goes on, its record and its cache in agreement; any other
run exits 130, with no traceback and nothing printed from inside a callback.

A storm is SIGINT every few milliseconds. llama.cpp's worker threads exist from the first reply on, and the kernel
may hand a signal to any of them: the script must act on it all the same, and only where that is safe.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import llama_cpp
import pytest

from conftest import LONG_PROMPT, PATIENCE, RANDOM, Streams, console, flags, start, storm


@pytest.fixture(scope="module")
def storm_home(hub, random_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("storm_home")
    assert console("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--sample-len", "1", hub=hub,
                   home=home).returncode == 0
    return home


def chat_with(hub, home, lines: list[str], **settings):
    chosen = {"temperature": 1.0, "seed": 5, "sample_len": 20, **settings}
    return console("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--chat", *flags(**chosen), hub=hub,
                   home=home, stdin="".join(line + "\n" for line in lines).encode())


def test_a_storm_of_ctrl_c_never_ends_a_chat_and_leaves_its_record_and_cache_in_agreement(hub, storm_home, tmp_path):
    big, after = tmp_path / "big.json", tmp_path / "after.json"
    made = chat_with(hub, storm_home, [" ".join(["hello world"] * 1200), f"/save {big}"], sample_len=4)
    assert made.returncode == 0, made.stderr  # a conversation of about 2,400 tokens
    process = start("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--chat",
                    *flags(temperature=1.0, seed=5, sample_len=2000), hub=hub, home=storm_home, stdin=subprocess.PIPE)
    streams = Streams(process)

    def say(line: str) -> None:
        process.stdin.write(line.encode() + b"\n")
        process.stdin.flush()

    say("hello")
    streams.wait_for(b"\n", where="out")  # a first reply: llama.cpp's threads are there
    calm = threading.Event()
    storm(process, calm)
    say(f"/load {big}")  # a few thousand tokens restored while Ctrl-C keeps coming
    time.sleep(1.0)
    say("tell me more")  # a reply of up to 2,000 tokens, asked in the storm
    time.sleep(1.0)
    calm.set()
    time.sleep(1.0)  # the last ones, noted or raised at the prompt, are over
    for line in ["/set sample_len 20", "/set temperature 0", "hello", f"/save {after}", "hello", "/bye"]:
        say(line)  # a reply after the storm, so that the record is never empty, then the one to compare
    process.stdin.close()
    process.wait(timeout=PATIENCE)
    stdout, stderr = streams.close()
    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "(to leave, type /bye or press Ctrl-D)" in stderr  # the storm reached the prompt too
    assert "saved" in stderr and after.exists(), stderr[-2000:]
    # A new process restores the saved pair without evaluating it again: llama.cpp's state holds exactly as many
    # positions as the record has tokens. And it says what the process that saved it went on to say: the record and the
    # cache it kept are the ones that process held. (Not compared with a process that evaluates the record's tokens
    # anew: a cache computed in batches of other shapes rounds differently, by up to 0.04 in a logit on these models,
    # and that is enough to turn a near tie the other way, greedily too.)
    restored = chat_with(hub, storm_home, [f"/load {after}", "hello", "/stats"])  # with the saved settings
    assert restored.returncode == 0, restored.stderr
    assert "not using" not in restored.stderr
    assert int(re.search(r"(\d+) prompt tokens evaluated", restored.stderr)[1]) < 20
    assert restored.stdout.decode() == stdout.splitlines(keepends=True)[-1] and len(restored.stdout) > 1


@pytest.mark.parametrize("marker", [b"llama_model_loader", b"reserve took"])  # the model loads; the prompt is evaluated
def test_a_storm_of_ctrl_c_ends_any_other_run_with_130_and_nothing_else(hub, slow_model, slow_home, marker):
    process = start(*slow_model, "--prompt", LONG_PROMPT, "--verbose", hub=hub, home=slow_home)
    streams = Streams(process)
    streams.wait_for(marker)
    storm(process, threading.Event())
    process.wait(timeout=PATIENCE)
    stdout, stderr = streams.close()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stdout in ("", "\n")


def test_ctrl_c_while_a_load_checks_the_saved_state_leaves_the_conversation_as_it_was(hub, slow_model, slow_home,
                                                                                       tmp_path):
    talk, state = tmp_path / "talk.json", tmp_path / "talk.json.state"
    made = console(*slow_model, "--chat", *flags(sample_len=2), hub=hub, home=slow_home,
                   stdin=f"hello\n/save {talk}\n".encode())
    assert made.returncode == 0, made.stderr
    saved = json.loads(talk.read_text())  # a record of 3,900 tokens, whose state may be as large as 383 MB here ...
    saved["context"]["tokens"] += saved["context"]["tokens"][-1:] * (3900 - len(saved["context"]["tokens"]))
    talk.write_text(json.dumps(saved))
    with open(state, "r+b") as grown:
        grown.truncate(300 * 2**20)  # ... and is 300 MiB (sparse): checked, and that takes a while to hash
    process = start(*slow_model, "--chat", *flags(sample_len=4), hub=hub, home=slow_home, stdin=subprocess.PIPE)
    streams = Streams(process)
    for line in ["what is new", "/show", f"/load {talk}"]:
        process.stdin.write(line.encode() + b"\n")
    process.stdin.flush()
    deadline = time.monotonic() + PATIENCE
    while os.path.realpath(state) not in open_files(process.pid):  # until the state is being read, to check it
        assert time.monotonic() < deadline and process.poll() is None, bytes(streams.err[-2000:])
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    process.stdin.write(b"/show\n/bye\n")
    process.stdin.close()
    process.wait(timeout=PATIENCE)
    _, stderr = streams.close()
    assert process.returncode == 0, stderr[-2000:]
    assert "error: loading was stopped; the conversation is as it was" in stderr
    before, after = re.findall(r"context: (\d+) of", stderr)
    assert before == after != "0"


def test_a_saved_state_larger_than_its_record_can_have_is_refused_unread(hub, storm_home, tmp_path):
    talk, state = tmp_path / "talk.json", tmp_path / "talk.json.state"
    assert chat_with(hub, storm_home, ["hello", f"/save {talk}"], sample_len=4).returncode == 0
    with open(state, "r+b") as grown:
        grown.truncate(60 * 10**9)  # 60 GB (sparse): minutes to hash, and no state of this record is that large
    loaded = chat_with(hub, storm_home, [f"/load {talk}", "/show"], sample_len=4)
    assert loaded.returncode == 0, loaded.stderr
    assert "it is 60.00 GB, more than a state of" in loaded.stderr
    assert "evaluating the conversation again" in loaded.stderr


def open_files(pid: int) -> list[str]:
    links = []
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(descriptor))
    return links


def test_ctrl_c_while_both_layouts_are_timed_exits_130_and_keeps_no_half_measured_answer(hub, slow_model, slow_home,
                                                                                        tmp_path):
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        pytest.skip("this build never repacks, so it measures nothing")
    home = tmp_path / "home"  # the slow model cached, its layouts not yet measured
    shutil.copytree(slow_home, home, symlinks=True, ignore=shutil.ignore_patterns("layouts.json", "prompts"))
    process = start(*slow_model, "--prompt", "hello", "--verbose", hub=hub, home=home)
    streams = Streams(process)
    streams.wait_for(b"llama_context: n_ctx ")  # the first context: the one that times a layout
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=PATIENCE) == 130
    _, err = streams.close()
    assert "Traceback" not in err and not (home / "phi-console" / "layouts.json").exists()
