"""Rerunning a prompt: the state an earlier run evaluated is restored, and the reply is the same to the byte.

These tests use a small model with random weights, so every reply depends on the whole prompt and on every
number in the cache: a state restored wrongly, or from another prompt, would change the text. The reference
for each reply is a run with --prompt-cache-gb 0, which neither restores nor saves anything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import llama_cpp
import pytest

from conftest import PATIENCE, RANDOM, console, crafted, flags, start

LONG = " ".join(["hello world"] * 300)  # about 620 tokens with the chat format: more than one 512-token batch
FEATURES = llama_cpp.llama_print_system_info()


@pytest.fixture
def home(hub, random_models, tmp_path_factory):
    """A cache that holds both random models and no saved prompt."""
    home = tmp_path_factory.getbasetemp() / "random_home"
    if not home.exists():
        for name in ("two-layers.gguf", "three-layers.gguf"):
            assert run(hub, home, "hello", model=name, prompt_cache_gb=0).returncode == 0
    shutil.rmtree(home / "phi-console" / "prompts", ignore_errors=True)
    return home


def run(hub, home, prompt: str, *, model: str = "two-layers.gguf", **settings: object):
    chosen = {"temperature": 1.0, "seed": 7, "sample_len": 12, **settings}
    return console("--model-repo", RANDOM, "--model-file", model, "--prompt", prompt, *flags(**chosen),
                   hub=hub, home=home)


def fresh(hub, home, prompt: str, **settings: object) -> bytes:
    """The reply with nothing restored."""
    result = run(hub, home, prompt, **settings, prompt_cache_gb=0)
    assert result.returncode == 0 and "restored" not in result.stderr, result.stderr
    return result.stdout


def restored(result) -> int:
    """How many prompt tokens the run says it restored (0 if it evaluated them all)."""
    assert result.returncode == 0, result.stderr
    found = re.search(r"prompt: \d+ tokens, (\d+) restored from an earlier run", result.stderr)
    return int(found[1]) if found else 0


def prompt_tokens(result) -> int:
    return int(re.search(r"prompt: (\d+) tokens", result.stderr)[1])


def saved(home) -> list:
    return sorted((home / "phi-console" / "prompts").glob("*.state"))


def test_a_rerun_with_other_sampling_settings_restores_the_prompt_and_replies_as_a_fresh_run_would(hub, home):
    first = run(hub, home, LONG)
    assert restored(first) == 0 and first.stdout == fresh(hub, home, LONG)
    for settings in ({"temperature": 0.7, "seed": 3}, {"top_p": 0.9, "repeat_penalty": 1.5}, {}):
        again = run(hub, home, LONG, **settings)
        assert restored(again) == prompt_tokens(again) - 1 > 512  # the last token's logits are not saved
        assert again.stdout == fresh(hub, home, LONG, **settings)
    assert len(saved(home)) == 1  # restoring a prompt does not save it again


def test_a_reply_stopped_with_ctrl_c_still_leaves_its_prompt_for_the_rerun(hub, home):
    # A 1024-token context: the reply has room for about 400 tokens, so it is still streaming when Ctrl-C comes, and
    # a rerun gets the same cache (a saved state is reused only there) without asking for thousands of tokens.
    process = start("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--prompt", LONG, "--ctx", "1024",
                    *flags(seed=7, sample_len=3000), hub=hub, home=home)
    process.stdout.read(1)  # the reply has begun
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=PATIENCE)
    assert process.returncode == 130
    again = run(hub, home, LONG, sample_len=3000, ctx=1024)
    assert restored(again) == prompt_tokens(again) - 1


def test_a_short_prompt_is_restored_too(hub, home):
    run(hub, home, "why is the sky blue")
    again = run(hub, home, "why is the sky blue", seed=11)
    assert restored(again) == prompt_tokens(again) - 1
    assert again.stdout == fresh(hub, home, "why is the sky blue", seed=11)


def test_a_rerun_that_asks_for_a_longer_or_shorter_reply_restores_the_prompt(hub, home):
    # 13 prompt tokens and any of these replies fit one 256-token step of the cache: the same state serves them all.
    run(hub, home, "why is the sky blue", sample_len=12)
    for sample_len in (13, 100, 3):
        again = run(hub, home, "why is the sky blue", sample_len=sample_len)
        assert restored(again) == prompt_tokens(again) - 1
        assert again.stdout == fresh(hub, home, "why is the sky blue", sample_len=sample_len)


def test_a_prompt_that_shares_a_start_with_a_saved_one_reuses_whole_batches_of_it(hub, home):
    run(hub, home, LONG + " quick brown fox")
    again = run(hub, home, LONG + " blue sky")
    assert restored(again) == 512  # the batch the two prompts share; the rest is evaluated as without it
    assert again.stdout == fresh(hub, home, LONG + " blue sky")


def test_what_a_shared_start_leaves_in_the_cache_is_what_evaluating_the_whole_prompt_leaves(hub, home, tmp_path):
    # Each run saves its prompt's state: compare them byte for byte, the cache's every number.
    run(hub, home, LONG + " quick brown fox")
    assert restored(run(hub, home, LONG + " blue sky")) == 512
    shutil.copytree(home, tmp_path / "fresh", symlinks=True, ignore=shutil.ignore_patterns("prompts"))
    assert restored(run(hub, tmp_path / "fresh", LONG + " blue sky")) == 0
    record = json.loads((tmp_path / "fresh" / "phi-console" / "prompts").glob("*.json").__next__().read_text())
    ours = [index for index in (home / "phi-console" / "prompts").glob("*.json")
            if json.loads(index.read_text())["tokens"] == record["tokens"]]
    assert json.loads(ours[0].read_text())["hmac"] == record["hmac"]


def test_a_different_prompt_is_never_answered_from_another_prompts_state(hub, home):
    run(hub, home, "why is the sky blue")
    other = run(hub, home, "why is the fox quick")
    assert restored(other) == 0
    assert other.stdout == fresh(hub, home, "why is the fox quick")


def test_another_model_file_evaluates_the_prompt_again(hub, home):
    run(hub, home, "why is the sky blue")
    other = run(hub, home, "why is the sky blue", model="three-layers.gguf")
    assert restored(other) == 0
    assert other.stdout == fresh(hub, home, "why is the sky blue", model="three-layers.gguf")


@pytest.mark.parametrize("changed", [{"sample_len": 400}, {"threads": 2}])
def test_another_context_size_or_thread_count_evaluates_the_prompt_again(hub, home, changed):
    # A completion's cache holds its prompt and reply, in llama.cpp's steps of 256 tokens: 13 + 12 tokens fit
    # in 256, 13 + 400 do not.
    run(hub, home, "why is the sky blue", sample_len=12)
    other = run(hub, home, "why is the sky blue", **{"sample_len": 12, **changed})
    assert restored(other) == 0
    assert other.stdout == fresh(hub, home, "why is the sky blue", **{"sample_len": 12, **changed})


def test_a_longer_reply_with_the_same_seed_begins_with_the_shorter_one(hub, home):
    # Whatever size of cache a completion gets, it computes the same numbers: more tokens only add to the reply.
    short = run(hub, home, "why is the sky blue", sample_len=12)
    long = run(hub, home, "why is the sky blue", sample_len=400)
    assert long.stdout.startswith(short.stdout.rstrip(b"\n")) and len(long.stdout) > len(short.stdout)


def test_a_state_saved_by_another_llama_cpp_build_is_not_used(hub, home):
    run(hub, home, "why is the sky blue")
    index = saved(home)[0].with_suffix(".json")
    record = json.loads(index.read_text())
    record["key"]["llama.cpp"] = "0.0.1 CPU : AVX = 1 |"
    index.write_text(json.dumps(record))
    assert restored(run(hub, home, "why is the sky blue")) == 0


@pytest.mark.parametrize("damage", ["flipped", "truncated", "emptied", "deleted"])
def test_a_damaged_state_is_ignored_and_replaced(hub, home, damage):
    run(hub, home, LONG)
    state = saved(home)[0]
    data = bytearray(state.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF  # one byte of the cache's numbers: only its hash can tell
        state.write_bytes(data)
    elif damage == "truncated":
        state.write_bytes(data[: len(data) // 3])
    elif damage == "emptied":
        state.write_bytes(b"")
    else:
        state.unlink()
    again = run(hub, home, LONG, seed=5)
    assert restored(again) == 0 and "not using the saved state of this prompt" in again.stderr
    assert "Traceback" not in again.stderr
    assert again.stdout == fresh(hub, home, LONG, seed=5)
    assert restored(run(hub, home, LONG, seed=5)) > 0  # the damaged state was replaced by a good one


def test_a_damaged_record_of_saved_prompts_is_ignored(hub, home):
    run(hub, home, "why is the sky blue")
    saved(home)[0].with_suffix(".json").write_text("{ not json")
    again = run(hub, home, "why is the sky blue")
    assert restored(again) == 0 and again.stdout == fresh(hub, home, "why is the sky blue")


def test_saved_prompts_stay_within_their_disk_limit_dropping_the_least_recently_used(hub, home):
    prompts = ["why is the sky blue", "why is the fox quick", "say hello world"]
    run(hub, home, prompts[0])
    size = saved(home)[0].stat().st_size
    limit = 2.5 * size / 1e9  # room for two states of this size, not three
    for prompt in [*prompts, prompts[0]]:  # the first is used again: the second is now the oldest
        run(hub, home, prompt, prompt_cache_gb=limit)
    assert sum(f.stat().st_size for f in saved(home)) <= limit * 1e9
    assert restored(run(hub, home, prompts[1], prompt_cache_gb=limit)) == 0  # dropped
    assert restored(run(hub, home, prompts[0], prompt_cache_gb=limit)) > 0


def test_a_prompt_cache_of_zero_saves_nothing(hub, home):
    run(hub, home, "why is the sky blue", prompt_cache_gb=0)
    assert saved(home) == []


# The layout of the weights: as the file has them, or repacked by llama.cpp for this CPU (--repack), one per run.
def verbose(hub, home, prompt: str, *, model: str = "two-layers.gguf", **settings: object):
    chosen = {"temperature": 1.0, "seed": 7, "sample_len": 12, **settings}
    result = console("--model-repo", RANDOM, "--model-file", model, "--prompt", prompt, "--verbose",
                     *flags(**chosen), hub=hub, home=home)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def repacked(result) -> bool:
    return "CPU_REPACK model buffer size" in result.stderr


def test_a_full_disk_does_not_change_the_reply_and_leaves_no_file_behind(hub, home):
    # The prompt's state cannot be saved: the reply is the same, and no half-written file is left in the folder.
    result = console("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--prompt", LONG,
                     *flags(temperature=1.0, seed=7, sample_len=12), hub=hub, home=home,
                     max_file_size=4096)
    assert result.returncode == 0, result.stderr
    assert result.stdout == fresh(hub, home, LONG)
    assert list((home / "phi-console" / "prompts").glob("*")) == []


# By default, which layout each phase uses is measured: once per machine, model file and thread count.
def layouts(home) -> dict:
    return json.loads((home / "phi-console" / "layouts.json").read_text())


def loads(result) -> int:
    """How many times the run loaded the model (llama.cpp logs each load's file type once)."""
    return result.stderr.count("print_info: file type")


def test_by_default_the_first_run_times_both_layouts_and_later_runs_read_its_answer(hub, random_models, tmp_path):
    if b"AMX_INT8 = 1" in FEATURES:
        pytest.skip("this build never repacks")
    verbose(hub, tmp_path, "hello", repack=False)
    assert not (tmp_path / "phi-console" / "layouts.json").exists()  # --no-repack and --repack decide outright
    first = verbose(hub, tmp_path, "hello", repack=None)
    (key, answer), = layouts(tmp_path).items()
    assert loads(first) == 2 and type(answer["prompt"]) is type(answer["generation"]) is bool
    assert all(rate > 0 for pair in answer["tokens a second, prompt and generation"].values() for rate in pair)
    again = verbose(hub, tmp_path, "hello", repack=None)
    assert layouts(tmp_path) == {key: answer}  # read, not measured again
    assert loads(again) == len({answer["prompt"], answer["generation"]}) and again.stdout == first.stdout
    if b"AVX2 = 1" in FEATURES:  # llama.cpp repacks Q4_K weights on x86-64 CPUs with AVX2
        assert repacked(again) == (answer["prompt"] or answer["generation"])
    if answer["prompt"] == answer["generation"]:
        assert again.stdout == fresh(hub, tmp_path, "hello", repack=answer["prompt"])


def test_phases_faster_on_different_layouts_each_run_on_theirs_and_the_prompt_s_cache_moves_whole(hub, random_models,
                                                                                                  tmp_path):
    if b"AMX_INT8 = 1" in FEATURES:
        pytest.skip("this build never repacks")
    # llama.cpp repacks no F16 weights, so both layouts compute the same numbers here: the reply is the one-layout
    # reply to the byte only if the prompt's cache (two batches) reached the generation's model whole.
    f16 = {"model": "f16.gguf", "prompt_cache_gb": 0}
    verbose(hub, tmp_path, "hello", **f16)  # measured
    file = tmp_path / "phi-console" / "layouts.json"
    file.write_text(json.dumps({key: {"prompt": False, "generation": True} for key in layouts(tmp_path)}))
    split = verbose(hub, tmp_path, LONG, **f16)
    assert loads(split) == 2 and split.stdout == verbose(hub, tmp_path, LONG, **f16, repack=False).stdout
    saved = verbose(hub, tmp_path, LONG, model="f16.gguf")
    again = verbose(hub, tmp_path, LONG, model="f16.gguf", seed=3)
    assert restored(saved) == 0 and restored(again) == prompt_tokens(again) - 1
    assert again.stdout == verbose(hub, tmp_path, LONG, **f16, repack=False, seed=3).stdout
    # 512 tokens restored, and the rest evaluated on the prompts' layout: the cache moves there and back
    other = verbose(hub, tmp_path, LONG + " blue sky", model="f16.gguf")
    assert restored(other) == 512 and other.stdout == verbose(hub, tmp_path, LONG + " blue sky", **f16,
                                                                 repack=False).stdout
    chat = console("--model-repo", RANDOM, "--model-file", "f16.gguf", "--chat", "--verbose", hub=hub, home=tmp_path,
                   stdin=b"hello\n")
    assert chat.returncode == 0 and loads(chat) == 1  # a chat uses the generation's layout for all


@pytest.mark.parametrize("damage", ["[1, 2]", "{}", "not JSON", "null", '{"prompt": 1, "generation": true}',
                                    '{"prompt": false}'])
def test_a_damaged_answer_is_measured_again_not_trusted(hub, random_models, tmp_path, damage):
    if b"AMX_INT8 = 1" in FEATURES:
        pytest.skip("this build never repacks")
    verbose(hub, tmp_path, "hello", prompt_cache_gb=0)
    file = tmp_path / "phi-console" / "layouts.json"
    (key, answer), = layouts(tmp_path).items()
    file.write_text(damage if damage in ("[1, 2]", "not JSON") else f"{{{json.dumps(key)}: {damage}}}")
    result = verbose(hub, tmp_path, "hello", prompt_cache_gb=0)
    assert loads(result) == 2 and "Traceback" not in result.stderr
    assert layouts(tmp_path).keys() == {key}


def test_runs_that_measure_at_once_keep_both_answers_and_an_unwritable_file_is_one_note(hub, random_models, tmp_path):
    if b"AMX_INT8 = 1" in FEATURES:
        pytest.skip("this build never repacks")
    run = ("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--sample-len", "1", "--prompt-cache-gb", "0")
    assert console(*run, "--no-repack", hub=hub, home=tmp_path).returncode == 0  # cached, nothing measured yet
    both = [start(*run, "--threads", str(threads), hub=hub, home=tmp_path) for threads in (1, 2)]
    assert [process.wait(timeout=PATIENCE) for process in both] == [0, 0]
    assert len(layouts(tmp_path)) == 2  # one entry for each thread count: neither run's write lost the other's
    shutil.rmtree(tmp_path / "phi-console")
    (tmp_path / "phi-console" / "layouts.json").mkdir(parents=True)  # a folder where the file goes
    result = console(*run, hub=hub, home=tmp_path)
    assert result.returncode == 0 and result.stderr.count("cannot be kept") == 1, result.stderr


@pytest.mark.parametrize("repack", [False, True])
def test_on_either_layout_a_rerun_restores_the_prompt_and_replies_the_same(hub, home, repack):
    if repack and b"AMX_INT8 = 1" in FEATURES:
        pytest.skip("this build never repacks")
    first = verbose(hub, home, LONG, repack=repack)
    again = verbose(hub, home, LONG, repack=repack, temperature=0.7, seed=3)
    if b"AVX2 = 1" in FEATURES:  # llama.cpp repacks Q4_K weights on x86-64 CPUs with AVX2, and only when asked to
        assert repacked(first) == repack
    assert restored(first) == 0
    assert restored(again) == prompt_tokens(again) - 1
    assert first.stdout == fresh(hub, home, LONG, repack=repack)
    assert again.stdout == fresh(hub, home, LONG, repack=repack, temperature=0.7, seed=3)


def test_a_prompt_saved_by_a_run_on_one_layout_is_not_restored_by_a_run_on_the_other(hub, home):
    if b"AMX_INT8 = 1" in FEATURES:
        pytest.skip("this build never repacks")
    # A short prompt, the same on both: only the recorded layout tells the states apart.
    run(hub, home, "why is the sky blue", repack=False)
    other = run(hub, home, "why is the sky blue", repack=True)
    assert restored(other) == 0 and other.stdout == fresh(hub, home, "why is the sky blue", repack=True)


def test_repack_is_refused_on_a_build_whose_amx_kernel_would_crash(hub, home):
    if b"AMX_INT8 = 1" not in FEATURES:
        pytest.skip("this build has no AMX kernel")
    result = run(hub, home, "hello", repack=True)
    assert result.returncode == 2 and b"" == result.stdout
    assert "--repack" in result.stderr and "AMX" in result.stderr and "Traceback" not in result.stderr


# --- runs that share one cache ---------------------------------------------------------------------------------------
def stray_files(home) -> list:
    """What in the prompts folder is neither a saved prompt's record nor the state beside a record."""
    folder = home / "phi-console" / "prompts"
    kept = {name for index in folder.glob("*.json") for name in (index.name, index.with_suffix(".state").name)}
    return [path.name for path in folder.iterdir() if path.name not in kept]


def test_six_runs_at_once_on_one_cache_all_finish_and_every_prompt_is_restored_afterwards(hub, home):
    prompts = [LONG + " quick brown fox", LONG + " blue sky", LONG + " say hello"] * 2  # each twice, at once
    runs = [start("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--prompt", prompt,
                  *flags(temperature=1.0, seed=7, sample_len=4), hub=hub, home=home) for prompt in prompts]
    for process in runs:
        _, stderr = process.communicate(timeout=PATIENCE)
        assert process.returncode == 0, stderr.decode()[-2000:]
    assert stray_files(home) == []
    for prompt in prompts[:3]:
        again = run(hub, home, prompt, sample_len=4)
        assert restored(again) == prompt_tokens(again) - 1
        assert again.stdout == fresh(hub, home, prompt, sample_len=4)


def test_a_full_disk_while_a_prompt_is_saved_keeps_the_prompts_saved_before(hub, home):
    run(hub, home, "why is the sky blue")
    size = saved(home)[0].stat().st_size
    # Room for one state; the next cannot be written whole (the disk is full): the one saved before must stay.
    failed = console("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--prompt", "why is the fox quick",
                     *flags(temperature=1.0, seed=7, sample_len=12, prompt_cache_gb=1.5 * size / 1e9), hub=hub,
                     home=home, max_file_size=size // 2)
    assert failed.returncode == 0, failed.stderr
    assert restored(run(hub, home, "why is the sky blue")) > 0
    assert stray_files(home) == []


def test_what_a_killed_run_left_is_cleaned_up_later_but_not_what_a_running_one_is_writing(hub, home):
    run(hub, home, "why is the sky blue")
    folder = home / "phi-console" / "prompts"
    left = folder / ".0123abcd.state.killed.tmp"  # as a run killed while writing its state leaves it
    writing = folder / ".4567cdef.state.running.tmp"  # being written by a run that is alive: just touched
    for path in (left, writing):
        path.write_bytes(b"\0" * 1000)
    an_hour_ago = time.time() - 3700
    os.utime(left, (an_hour_ago, an_hour_ago))
    run(hub, home, "why is the fox quick")  # saves a prompt, and tidies the folder under its lock
    assert not left.exists() and writing.exists()
    writing.unlink()
    assert stray_files(home) == []


def test_a_run_never_deletes_the_state_another_run_has_just_renamed_into_place(hub, tmp_path):
    from filelock import FileLock  # the lock huggingface_hub's WeakFileLock takes, which the script takes too

    first = console(*crafted(), hub=hub, home=tmp_path)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "phi-console" / "prompts"
    with FileLock(tmp_path / "phi-console" / "prompts.lock"):  # as another run holds it between its two renames
        renamed = folder / "another-run.state"
        renamed.write_bytes(b"\0" * 1000)  # its state is in place, its record not yet
        process = start(*crafted(prompt="why is the fox quick"), hub=hub, home=tmp_path)
        assert process.stdout.read(len(first.stdout)) == first.stdout  # replied; now it saves its prompt
        time.sleep(1.0)
        assert process.poll() is None  # it waits for the lock
        (folder / "another-run.json").write_text("{}")
    _, stderr = process.communicate(timeout=PATIENCE)
    assert process.returncode == 0, stderr.decode()
    assert renamed.exists() and len(list(folder.glob("*.state"))) == 3
