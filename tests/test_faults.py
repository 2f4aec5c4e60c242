"""Faults a real download meets, injected for real: damaged caches, killed processes, dropped and hanging
connections, a full disk, hostile files. None may leave a crash, a hang, or a model that runs on bad bytes."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MODEL_FILE, MODEL_REPO, PENALISED, TOKENIZER_REPO, console, crafted, start, the_error


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


def wait_for_partial_file(home: Path, at_least: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_size >= at_least for p in leftovers(home) if p.exists()):
            return
        time.sleep(0.02)
    raise AssertionError("the download never started")


@pytest.mark.parametrize("killed_at", [0, 1 << 20, 9 << 20])
def test_a_download_killed_at_any_moment_is_completed_by_the_next_run(hub, tmp_path, killed_at):
    with hub.faults(throttle=4 << 20):  # the 12 MB model takes about 3 s
        process = start_download(hub, tmp_path)
        wait_for_partial_file(tmp_path, killed_at)
        process.kill()  # SIGKILL: no chance to clean up, like a power cut
        process.wait()
    result = default_run(hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == hub.repos[MODEL_REPO].files[MODEL_FILE]
    assert leftovers(tmp_path) == []  # the killed run's partial file is gone too


def test_ctrl_c_during_a_download_leaves_a_usable_cache(hub, tmp_path):
    with hub.faults(throttle=4 << 20):
        process = start_download(hub, tmp_path)
        wait_for_partial_file(tmp_path, 1 << 20)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130
    assert b"Traceback" not in stderr
    assert leftovers(tmp_path) == []
    assert runs_normally(hub, tmp_path)


def test_a_connection_dropped_mid_body_is_resumed_within_the_run(hub, tmp_path):
    with hub.faults(drop_after=3 << 20):
        result = default_run(hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PENALISED
    assert len([path for _, path in hub.requests if path.startswith("/cdn/")]) == 2  # the second one resumes
    assert cached(tmp_path, MODEL_REPO, MODEL_FILE).read_bytes() == hub.repos[MODEL_REPO].files[MODEL_FILE]


def test_a_hub_that_never_answers_is_reported_within_the_timeout(hub, tmp_path):
    with hub.faults(hang=True):
        started = time.monotonic()
        result = default_run(hub, tmp_path, env={"HF_HUB_ETAG_TIMEOUT": "2"})
        elapsed = time.monotonic() - started
    line = the_error(result)
    assert "did not answer within 2 s" in line
    assert elapsed < 8


def test_a_full_disk_names_the_cache_and_the_space_needed_and_the_next_run_succeeds(hub, tmp_path):
    result = default_run(hub, tmp_path, max_file_size=4 << 20)  # the model is 12 MB
    line = the_error(result)
    assert "no room to save" in line and "0.01 GB" in line and str(tmp_path / "hub") in line
    blobs = [p for p in (tmp_path / "hub").rglob("blobs/*")]
    assert all(p.stat().st_size < 1 << 20 for p in blobs)  # only the tokenizer, nothing that looks like the model
    assert leftovers(tmp_path) == []
    assert runs_normally(hub, tmp_path)


@pytest.mark.parametrize("name", ["huge-string.gguf", "huge-array.gguf", "huge-counts.gguf", "truncated.gguf",
                                  "wrong-magic.gguf"])
def test_a_hostile_gguf_is_refused_in_one_line(hub, tmp_path, name):
    started = time.monotonic()
    result = console(*crafted(model=name), hub=hub, home=tmp_path)
    line = the_error(result)
    assert "not a loadable GGUF" in line and name in line
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("repo,expected", [
    ("phi-console-tests/plain-tokenizer", "lacks the special tokens"),
    ("phi-console-tests/huge-tokenizer", "not a usable tokenizer.json"),
])
def test_a_tokenizer_without_what_phi3_needs_is_refused(hub, warm_home, repo, expected):
    line = the_error(console(*crafted(), "--tokenizer-repo", repo, hub=hub, home=warm_home))
    assert expected in line
