"""Faults a real download meets, injected for real: damaged caches, killed processes, dropped and hanging
connections, a full disk, hostile files. None may leave a crash, a hang, or a model that runs on bad bytes."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (MODEL_FILE, MODEL_REPO, PATIENCE, PENALISED, TOKENIZER_REPO, console, crafted, start, storm,
                      the_error)


def cached(home: Path, repo: str, name: str) -> Path:
    """The blob behind a cached file."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    return next(folder.glob(f"*/{name}")).resolve()


def leftovers(home: Path) -> list[Path]:
    return list((home / "hub").rglob("*.incomplete"))


def default_run(hub, home, **kwargs):
    return console("--temperature", "0", "--sample-len", "3", hub=hub, home=home, **kwargs)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "append"])
def test_a_damaged_cached_model_is_noticed_and_downloaded_again(hub, tmp_path, damage):
    assert default_run(hub, tmp_path).returncode == 0
    blob = cached(tmp_path, MODEL_REPO, MODEL_FILE)
    original = blob.read_bytes()
    if damage == "flip a byte":
        with open(blob, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes([original[len(original) // 2] ^ 0xFF]))
    elif damage == "truncate":
        blob.write_bytes(original[: len(original) // 3])
    else:
        blob.write_bytes(original + b"\0" * 100)
    hub.requests.clear()
    result = default_run(hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    assert "damaged" in result.stderr and "downloading it again" in result.stderr
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == original
    assert any(path.startswith("/cdn/") for _, path in hub.requests)


def test_a_damaged_tokenizer_is_downloaded_again_too(hub, tmp_path):
    assert default_run(hub, tmp_path).returncode == 0
    blob = cached(tmp_path, TOKENIZER_REPO, "tokenizer.json")
    original = blob.read_bytes()
    blob.write_bytes(original.replace(b"<|end|>", b"<|END|>"))
    result = default_run(hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert cached(tmp_path, TOKENIZER_REPO, "tokenizer.json").read_bytes() == original


def test_offline_a_damaged_cache_is_refused_with_the_way_to_repair_it(hub, tmp_path):
    assert default_run(hub, tmp_path).returncode == 0
    blob = cached(tmp_path, MODEL_REPO, MODEL_FILE)
    blob.write_bytes(blob.read_bytes()[:-10])
    line = the_error(default_run(None, tmp_path, env={"HF_HUB_OFFLINE": "1"}))
    assert "damaged" in line and "HF_HUB_OFFLINE" in line
    assert runs_normally(hub, tmp_path)


def runs_normally(hub, home: Path) -> bool:
    return default_run(hub, home).stdout == PENALISED


def test_a_verified_file_is_not_hashed_again_on_every_run(hub, tmp_path):
    assert default_run(hub, tmp_path).returncode == 0
    state = tmp_path / "phi-console" / "verified.json"
    recorded = json.loads(state.read_text())
    assert str(cached(tmp_path, MODEL_REPO, MODEL_FILE)) in recorded
    before = state.stat().st_mtime_ns
    assert default_run(hub, tmp_path).returncode == 0
    assert state.stat().st_mtime_ns == before  # nothing was hashed, so nothing was recorded again


def start_download(hub, home: Path, *args: str) -> subprocess.Popen:
    return start("--temperature", "0", "--sample-len", "3", *args, hub=hub, home=home)


def partial_files(home: Path) -> list[Path]:
    """What a stopped download keeps for the next run."""
    return list((home / "hub").rglob("*.partial"))


def wait_for_partial_file(home: Path, at_least: int, timeout: float = PATIENCE) -> list[int]:
    """Wait until a partial file holds `at_least` bytes; every size it was seen at on the way."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        seen += [p.stat().st_size for p in partial_files(home) if p.exists()]
        if seen and seen[-1] >= at_least:
            return seen
        time.sleep(0.02)
    raise AssertionError("the download never started")


def served_model(hub) -> bytes:
    """The 12 MB model the hub serves under the default names."""
    return hub.repos[MODEL_REPO].files[MODEL_FILE]

CHUNK = 1 << 20  # what the script writes at a time: a stopped run loses at most this much of what it received


def stop_download(hub, home: Path, at: int, signum: int) -> tuple[int, str, list[int]]:
    """Start a first run on a slow hub, stop it once `at` bytes of the model are on disk; its exit code and stderr,
    and the sizes its partial file was seen at."""
    with hub.faults(throttle=4 << 20):  # the 12 MB model takes about 3 s
        process = start_download(hub, home)
        seen = wait_for_partial_file(home, at)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=PATIENCE)
    settle(hub)
    return process.returncode, stderr.decode("utf-8", "replace"), seen


def settle(hub) -> None:
    """Wait until the hub has stopped sending to a stopped client, so that hub.sent counts only what follows."""
    while True:
        before = hub.sent
        time.sleep(0.3)
        if hub.sent == before:
            return


def resumes(hub, home: Path) -> None:
    """The next run fetches only what is missing, and ends with the hub's exact bytes and no partial file."""
    kept = sum(p.stat().st_size for p in partial_files(home))
    hub.sent = 0
    result = default_run(hub, home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    assert hub.sent == len(served_model(hub)) - kept  # exactly the rest
    assert cached(home, MODEL_REPO, MODEL_FILE).read_bytes() == served_model(hub)
    assert partial_files(home) == [] and leftovers(home) == []


@pytest.mark.parametrize("killed_at", [1, 1 << 20, 9 << 20])
def test_a_download_killed_at_any_moment_is_resumed_by_the_next_run(hub, tmp_path, killed_at):
    code, _, seen = stop_download(hub, tmp_path, killed_at, signal.SIGKILL)  # no chance to clean up, a power cut
    assert code == -signal.SIGKILL
    # What arrived reached the disk a CHUNK at a time (watched every 20 ms at 4 MB/s), so a stop loses at most that
    grew = sorted(set([0, *seen]))
    assert max(b - a for a, b in zip(grew, grew[1:])) <= CHUNK
    resumes(hub, tmp_path)


@pytest.mark.parametrize("stopped_at", [1, 6 << 20])
def test_ctrl_c_during_a_download_exits_130_and_the_next_run_resumes(hub, tmp_path, stopped_at):
    code, stderr, _ = stop_download(hub, tmp_path, stopped_at, signal.SIGINT)
    assert code == 130 and "Traceback" not in stderr
    assert len(partial_files(tmp_path)) == 1
    resumes(hub, tmp_path)


def test_a_storm_of_ctrl_c_during_a_download_exits_130_and_the_next_run_resumes(hub, tmp_path):
    with hub.faults(throttle=4 << 20):
        process = start_download(hub, tmp_path)
        wait_for_partial_file(tmp_path, 1 << 20)
        storm(process, threading.Event())
        _, stderr = process.communicate(timeout=PATIENCE)
    settle(hub)
    assert process.returncode == 130
    assert "Traceback" not in stderr.decode() and "Exception ignored" not in stderr.decode()
    assert len(partial_files(tmp_path)) == 1
    resumes(hub, tmp_path)


def test_the_resumed_download_says_what_was_already_there(hub, tmp_path):
    stop_download(hub, tmp_path, 6 << 20, signal.SIGINT)
    result = default_run(hub, tmp_path)
    assert "resuming after the 0.01 GB a stopped run left" in result.stderr


def test_a_damaged_partial_file_costs_a_fresh_download_never_a_wrong_file(hub, tmp_path):
    stop_download(hub, tmp_path, 4 << 20, signal.SIGKILL)
    [partial] = partial_files(tmp_path)
    with open(partial, "r+b") as f:
        f.seek(1000)
        f.write(bytes(b ^ 0xFF for b in f.read(2)))
    kept = partial.stat().st_size
    hub.sent = 0
    result = default_run(hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == served_model(hub)
    # The rest, a failed check, then all of it:
    assert hub.sent == (len(served_model(hub)) - kept) + len(served_model(hub))
    assert partial_files(tmp_path) == []


def test_a_file_replaced_on_the_hub_between_runs_is_downloaded_whole(hub, tmp_path):
    repo = "phi-console-tests/replaced"
    old = served_model(hub)
    new = old[:-16] + bytes(b ^ 1 for b in old[-16:])  # a weight changed: same size, another sha256
    hub.add(repo, {MODEL_FILE: old})
    with hub.faults(throttle=4 << 20):
        process = start_download(hub, tmp_path, "--model-repo", repo)
        wait_for_partial_file(tmp_path, 4 << 20)
        process.kill()
        process.wait()
    settle(hub)
    hub.add(repo, {MODEL_FILE: new})
    hub.sent = 0
    result = console("--model-repo", repo, "--sample-len", "1", hub=hub, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert hub.sent == len(new)  # the old partial was of another file: none of it is used
    assert cached(tmp_path, repo, MODEL_FILE).read_bytes() == new
    assert partial_files(tmp_path) == []


def test_two_runs_started_at_once_share_the_cache_without_corrupting_it(hub, tmp_path):
    hub.sent = 0
    with hub.faults(throttle=8 << 20):
        runs = [start_download(hub, tmp_path) for _ in range(2)]
        outputs = [run.communicate(timeout=PATIENCE) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert all(out == PENALISED for out, _ in outputs)
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == served_model(hub)
    assert hub.sent == len(served_model(hub))  # the second waited for the first, and downloaded nothing
    assert partial_files(tmp_path) == [] and leftovers(tmp_path) == []


def test_the_resumed_cache_is_a_normal_huggingface_hub_entry(hub, tmp_path):
    stop_download(hub, tmp_path, 6 << 20, signal.SIGKILL)
    assert default_run(hub, tmp_path).returncode == 0
    folder = tmp_path / "hub" / f"models--{MODEL_REPO.replace('/', '--')}"
    commit = hub.repos[MODEL_REPO].commit
    assert (folder / "refs" / "main").read_text() == commit
    link = folder / "snapshots" / commit / MODEL_FILE
    assert link.is_symlink() and link.resolve().parent == folder / "blobs"
    assert link.resolve().name == hashlib.sha256(served_model(hub)).hexdigest()


def test_a_connection_dropped_mid_body_is_resumed_within_the_run(hub, tmp_path):
    with hub.faults(drop_after=3 << 20):
        result = default_run(hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    assert len([path for _, path in hub.requests if path.startswith("/cdn/")]) == 2  # the second one resumes
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == hub.repos[MODEL_REPO].files[MODEL_FILE]


def test_a_hub_that_never_answers_is_reported_within_the_timeout(hub, tmp_path, startup):
    with hub.faults(hang=True):
        started = time.monotonic()
        result = default_run(hub, tmp_path, env={"HF_HUB_ETAG_TIMEOUT": "2"})
        elapsed = time.monotonic() - started
    line = the_error(result)
    assert "did not answer within 2 s" in line
    assert elapsed < 3 * startup + 2 + 3  # not the library's retries, which take far longer


def test_a_full_disk_names_the_cache_and_the_space_needed_and_the_next_run_succeeds(hub, tmp_path):
    result = default_run(hub, tmp_path, max_file_size=4 << 20)  # the model is 12 MB
    line = the_error(result)
    assert "no room to save" in line and "0.01 GB" in line and str(tmp_path / "hub") in line
    blobs = [p for p in (tmp_path / "hub").rglob("blobs/*") if not p.name.endswith(".partial")]
    assert all(p.stat().st_size < 1 << 20 for p in blobs)  # only the tokenizer, nothing that looks like the model
    assert leftovers(tmp_path) == []
    assert [p.stat().st_size for p in partial_files(tmp_path)] == [4 << 20]  # what fitted waits for the next run
    resumes(hub, tmp_path)


@pytest.mark.parametrize("name", ["huge-string.gguf", "huge-array.gguf", "huge-counts.gguf", "truncated.gguf",
                                  "wrong-magic.gguf"])
def test_a_hostile_gguf_is_refused_in_one_line(hub, tmp_path, startup, name):
    started = time.monotonic()
    result = console(*crafted(model=name), hub=hub, home=tmp_path)
    line = the_error(result)
    assert "not a loadable GGUF" in line and name in line
    assert "llama.cpp could not read it" not in line  # llama.cpp's own reason, from its log's error lines
    assert time.monotonic() - started < 3 * startup + 15  # no attempt to read the sizes it claims


@pytest.mark.parametrize("repo,expected", [
    ("phi-console-tests/plain-tokenizer", "lacks the special tokens"),
    ("phi-console-tests/huge-tokenizer", "not a usable tokenizer.json"),
    ("phi-console-tests/nested-tokenizer", "not a usable tokenizer.json"),
])
def test_a_tokenizer_without_what_phi3_needs_is_refused(hub, warm_home, repo, expected):
    line = the_error(console(*crafted(), "--tokenizer-repo", repo, hub=hub, home=warm_home))
    assert expected in line


TOKEN = "hf_phiConsoleTestsSecretToken0123456789"  # what HF_TOKEN holds in the token tests


def never_shows_the_token(result, home: Path) -> None:
    """The token appears in none of what the script printed or wrote."""
    assert TOKEN not in result.stderr and TOKEN.encode() not in result.stdout
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_the_token_goes_to_the_hub_and_never_to_the_file_host(hub, tmp_path):
    with hub.faults(drop_after=3 << 20):  # the resumed request after the drop too
        result = default_run(hub, tmp_path, env={"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    sent_to = {who: [value for w, value in hub.authorization if w == who] for who in ("hub", "cdn")}
    assert len(sent_to["cdn"]) == 2 and set(sent_to["cdn"]) == {None}  # the download and its resumption
    assert set(sent_to["hub"]) == {f"Bearer {TOKEN}"}  # every request to the hub itself carries it
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == served_model(hub)
    never_shows_the_token(result, tmp_path)


def test_a_link_that_expires_mid_download_is_replaced_and_only_the_rest_is_sent(hub, tmp_path):
    hub.sent = 0
    with hub.faults(drop_after=3 << 20, expire_on_drop=True):  # the retry after the drop meets an expired link
        result = default_run(hub, tmp_path, env={"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    model_heads = [path for method, path in hub.requests if method == "HEAD" and path.endswith(MODEL_FILE)]
    assert len(model_heads) == 3  # the first, the one asking for a fresh link, and hf_hub_download's own
    assert hub.sent == len(served_model(hub))  # the 3 MiB before the drop, then only the rest
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == served_model(hub)
    assert partial_files(tmp_path) == [] and leftovers(tmp_path) == []
    assert "X-Amz" not in result.stderr
    never_shows_the_token(result, tmp_path)


def test_a_file_host_that_refuses_every_link_is_one_line_after_a_few_fresh_links(hub, tmp_path):
    with hub.faults(refuse=True):
        result = default_run(hub, tmp_path, env={"HF_TOKEN": TOKEN})
    line = the_error(result)
    assert "refused" in line and "HTTP 403" in line and MODEL_FILE in line
    assert "X-Amz" not in line and "127.0.0.2" not in line  # no signed link in the message
    model_heads = [path for method, path in hub.requests if method == "HEAD" and path.endswith(MODEL_FILE)]
    assert len(model_heads) == 4  # the first link and three fresh ones, then it stops
    never_shows_the_token(result, tmp_path)
