"""Download once, then run from the cache: offline, and without a single request."""
from __future__ import annotations

from pathlib import Path

from conftest import MODEL_FILE, MODEL_REPO, PENALISED, TOKENIZER_REPO, console, crafted


def cached_files(home: Path) -> set[str]:
    return {p.name for p in (home / "hub").rglob("*") if p.is_file() and "snapshots" in p.parts}


def test_first_run_downloads_both_files_with_the_default_settings(hub, tmp_path):
    result = console("--temperature", "0", "--sample-len", "3", hub=hub, home=tmp_path)
    assert result.returncode == 0, result.stderr
    # The local hub serves the crafted model under the real names, so the default penalty applies.
    assert result.stdout == PENALISED
    fetched = {path for method, path in hub.requests if method == "GET"}
    assert f"/{TOKENIZER_REPO}/resolve/main/tokenizer.json" in fetched
    assert any(path.startswith("/cdn/") for path in fetched)  # the GGUF comes from the CDN, like the real one
    assert cached_files(tmp_path) == {MODEL_FILE, "tokenizer.json"}
    assert "downloading 0.01 GB into" in result.stderr and str(tmp_path) in result.stderr


def test_a_cached_run_sends_no_request_at_all(hub, tmp_path):
    first = console(*crafted(sample_len=2), hub=hub, home=tmp_path)
    assert first.returncode == 0, first.stderr
    hub.requests.clear()
    # Telemetry left at the library's default: the cached path must not even ask for it.
    again = console(*crafted(sample_len=2), hub=hub, home=tmp_path, env={"HF_HUB_DISABLE_TELEMETRY": None})
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert hub.requests == []
    assert "downloading" not in again.stderr


def test_offline_with_a_cache_works(hub, warm_home):
    result = console(*crafted(sample_len=2), hub=None, home=warm_home, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck\n"


def test_an_unreachable_hub_does_not_matter_once_cached(warm_home):
    result = console(*crafted(sample_len=2), hub=None, home=warm_home)  # HF_ENDPOINT points at a closed port
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck\n"


def test_only_the_missing_file_is_downloaded(hub, tmp_path, warm_home):
    first = console(*crafted(sample_len=1), hub=hub, home=tmp_path)
    assert first.returncode == 0, first.stderr
    hub.requests.clear()
    other = console(*crafted(model="end.gguf", sample_len=1), hub=hub, home=tmp_path)
    assert other.returncode == 0, other.stderr
    assert not any("tokenizer.json" in path for _, path in hub.requests)
    assert any("end.gguf" in path for _, path in hub.requests)


def test_a_pinned_commit_is_served_from_the_cache_too(hub, tmp_path):
    commit = hub.repos[MODEL_REPO].commit
    first = console("--model-revision", commit, "--temperature", "0", "--sample-len", "2", hub=hub, home=tmp_path)
    assert first.returncode == 0, first.stderr
    hub.requests.clear()
    again = console("--model-revision", commit, "--temperature", "0", "--sample-len", "2", hub=None, home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout == b"puck goal\n"  # the default repeat penalty is on
