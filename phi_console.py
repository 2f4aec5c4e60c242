#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = [
#     "llama-cpp-python==0.3.36",
#     "huggingface_hub==2.4.0; python_version >= '3.10'",
#     "huggingface_hub==1.8.0; python_version < '3.10'",
# ]
# ///
"""Stream a completion from Microsoft's Phi-3-mini, on your own machine.

    python phi_console.py
    python phi_console.py -p "Why is the sky blue?" --temperature 0
    echo "Explain a GGUF file in two sentences" | python phi_console.py --seed 7

The first run downloads the model (about 2.4 GB) and its tokenizer into the Hugging Face cache;
later runs start from the cache without touching the network. Edit the settings below and rerun,
or pass the same settings as flags (--help lists them). Only the completion goes to stdout.

The file, in the order the work happens (the sections marked optional can be skipped on a first read):
  Settings         the constants to edit, and SETTINGS: each one's type, check and meaning
  Command line     flags over constants, every value checked before anything slow; the prompt from stdin
  Download         the cache first, the hub only for what it lacks; every file checked against its hash
  Resumable        (optional) a stopped download goes on where it stopped; the token stays on the hub
  Load             llama.cpp maps the weights, repacked for this CPU where that pays; model and tokenizer must agree
  Prompt           Phi-3's chat format; evaluate(), the batches a prompt is fed in, with Ctrl-C and a bar;
                   where the weights are repacked, a long prompt is evaluated on the file's own layout of them
  Stream           the sampler, generate() (the token loop), complete(): one reply to one prompt
  Saved prompts    (optional) a rerun restores its evaluated prompt instead of evaluating it again
  Chat             (optional) a conversation kept in the KV cache; /save and /load
  Main             main(): settings -> download -> load -> prompt -> stream -> report
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, NoReturn, TypeVar

try:
    import llama_cpp
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, are_progress_bars_disabled, build_hf_headers, disable_progress_bars
    from huggingface_hub.utils import tqdm as hub_tqdm
    try:
        from huggingface_hub.utils import httpx as hub_httpx  # huggingface_hub 2.x's HTTP client (httpx2)
    except ImportError:  # huggingface_hub 1.x, the last for Python 3.9 (macOS's own python3), uses httpx itself
        import httpx as hub_httpx
    from huggingface_hub.utils import logging as hub_logging
except ImportError as missing:
    sys.exit(f"error: {missing.name} is not installed; run: pip install -r requirements.txt")

# ---------------------------------------------------------------------------------------------
# Settings: edit these and rerun, or pass the same setting as a flag (--top-p for TOP_P; --help lists them)
# ---------------------------------------------------------------------------------------------
PROMPT = "Write a haiku about ice hockey"  # your words; Phi-3's chat format is added around them
SYSTEM = None  # None, or instructions the model reads before your first message ("Answer in French.")
TEMPERATURE = 1.0  # >= 0; 0 = greedy (always the likeliest token), higher = more random
TOP_P = None  # None = off; else 0 < p <= 1: draw only from the likeliest tokens whose probabilities sum to p
REPEAT_PENALTY = 1.2  # > 0; 1.0 = off, > 1.0 makes tokens the reply has already used less likely
REPEAT_LAST_N = 64  # >= 0; how many of the reply's latest tokens the penalty looks at, 0 = none
SAMPLE_LEN = 100  # >= 1; the most tokens to generate
SEED = None  # None = a new random seed each run (printed at the end); 0 .. 4294967294 repeats a run exactly
CHAT = False  # True = a conversation at a `>>> ` prompt instead of one completion
CTX = 4096  # >= 1 tokens of context (prompt + reply, or the whole chat); at most the model's own 4096
THREADS = None  # >= 1 CPU threads; None = the number of physical cores
GPU_LAYERS = None  # layers to offload to a GPU, -1 = all; None = all when this build can offload, else 0
REPACK = None  # True = generate on a copy of the weights llama.cpp repacks for this CPU; None = only where that pays
PROMPT_CACHE_GB = 2.0  # disk for saved prompt states, so that rerunning a prompt skips evaluating it; 0 = off
MODEL_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"  # Hugging Face repo that holds the weights
MODEL_FILE = "Phi-3-mini-4k-instruct-q4.gguf"  # the weights: Q4_K_M, about 2.4 GB
MODEL_REVISION = "main"  # branch, tag, or a 40-hex commit that pins the exact bytes
TOKENIZER_REPO = "microsoft/Phi-3-mini-4k-instruct"  # repo whose tokenizer.json names the stop tokens
TOKENIZER_REVISION = "main"  # branch, tag or commit of the tokenizer's repo

class Setting(NamedTuple):
    """One row of SETTINGS: how a setting is read, checked and explained."""

    kind: type  # what a flag's text is read as
    none: bool  # may be None ("none" as text)
    valid: Callable[[Any], bool]  # when a value of that kind is allowed
    must_be: str  # the same in words, for error lines and --help
    meaning: str  # --help's and /help's line


# Each setting once. Its name spells the constant (TOP_P), the flag (--top-p) and chat's `/set top_p`.
SETTINGS: dict[str, Setting] = {
    "prompt": Setting(str, False, lambda s: s.strip() != "", "non-empty text",
                      "your words; '-' reads stdin, as does a pipe when --prompt is absent"),
    "system": Setting(str, True, lambda s: s.strip() != "", "non-empty text, or none",
                      "instructions the model reads before your first message"),
    "temperature": Setting(float, False, lambda t: t >= 0, "a number >= 0", "0 = greedy, higher = more random"),
    "top_p": Setting(float, True, lambda p: 0 < p <= 1, "a number in (0, 1], or none",
                     "draw only from the likeliest tokens whose probabilities add up to P; none = off"),
    "repeat_penalty": Setting(float, False, lambda x: x > 0, "a number > 0",
                              "1.0 = off; above 1, tokens the reply has already used become less likely"),
    "repeat_last_n": Setting(int, False, lambda n: n >= 0, "an integer >= 0",
                             "how many of the reply's latest tokens the penalty looks at; 0 = none"),
    "sample_len": Setting(int, False, lambda n: n >= 1, "an integer >= 1", "the most tokens to generate"),
    "seed": Setting(int, True, lambda n: 0 <= n <= MAX_SEED, "an integer in 0..4294967294, or none",
                    "the same seed repeats a run exactly; none = random, printed at the end"),
    "chat": Setting(bool, False, lambda b: True, "True or False",
                    "talk back and forth at a '>>> ' prompt (/help there)"),
    "ctx": Setting(int, False, lambda n: n >= 1, "an integer >= 1",
                   "tokens of context: prompt + reply, or the whole chat; at most the model's own"),
    "threads": Setting(int, True, lambda n: n >= 1, "an integer >= 1, or none",
                       "CPU threads; none = one per physical core"),
    "gpu_layers": Setting(int, True, lambda n: n >= -1, "an integer >= -1, or none",
                          "layers offloaded to a GPU, -1 = all; none = all if this build can offload"),
    "repack": Setting(bool, True, lambda b: True, "True, False or none",
                      "generate on a copy of the weights that llama.cpp repacks for this CPU at each load (faster "
                      "on some CPUs, at about 1.5 GB of memory and a slower load); none (the default) = only on "
                      "CPUs with AVX-512"),
    "prompt_cache_gb": Setting(float, False, lambda g: g >= 0, "a number >= 0",
                               "disk (in the Hugging Face cache) for the evaluated prompts of recent runs, "
                               "so that a rerun of one starts at once; 0 = off"),
    "model_repo": Setting(str, False, lambda s: s.strip() != "", "a repo name",
                          "Hugging Face repo of the GGUF weights"),
    "model_file": Setting(str, False, lambda s: s.strip() != "", "a file name", "the GGUF file in that repo"),
    "model_revision": Setting(str, False, lambda s: s.strip() != "", "a branch, tag or commit",
                              "revision of the model repo; a commit pins the exact bytes"),
    "tokenizer_repo": Setting(str, False, lambda s: s.strip() != "", "a repo name",
                              "repo whose tokenizer.json names the stop tokens"),
    "tokenizer_revision": Setting(str, False, lambda s: s.strip() != "", "a branch, tag or commit",
                                  "revision of the tokenizer's repo"),
}
DEFAULTS = {name: globals()[name.upper()] for name in SETTINGS}  # each setting's constant, by its name
CHAT_SETTINGS = ("system", "temperature", "top_p", "repeat_penalty", "repeat_last_n", "sample_len", "seed")

TOKENIZER_FILE = "tokenizer.json"  # the file in TOKENIZER_REPO that lists Phi-3's special tokens
TOKENIZER_MAX_BYTES = 64 * 2**20  # Phi-3's is a few MB; a bigger file is refused rather than parsed into memory
CHAT_TOKENS = ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>")  # tokens the chat format uses
STOP_TOKENS = ("<|end|>", "<|endoftext|>")  # a reply ends at either; the GGUF declares only the second
MAX_SEED = 2**32 - 2  # llama.cpp reserves 2**32 - 1 for "pick a random seed"
BATCH = 512  # prompt tokens evaluated per llama_decode call
LOAD_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"  # the load's bar counts percent, not bytes
LINK_REFRESHES = 3  # fresh download links asked of the hub in a row, with no byte between, before giving up
PLAIN_PROMPT_TOKENS = 256  # a prompt this long is evaluated on the file's own layout: prompt_on_plain_weights

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one `error:` line on stderr and exit; expected faults never show a traceback."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def note(message: str, *, quiet: bool) -> None:
    if not quiet:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def progress(what: str, *, total: float, unit: str, bar_format: str | None = None) -> Iterator[list[float]]:
    """A bar on stderr, like the download's, for work that may take seconds; yields [done] for the work to update.

    A thread redraws it twice a second, so it moves while llama.cpp holds the main thread. It appears only after
    a second, only at a terminal, never with --quiet, and is erased when the work ends, so stdout and the
    terminal stay clean.
    """
    done = [0.0]
    if are_progress_bars_disabled() or not sys.stderr.isatty():
        yield done
        return
    finished = threading.Event()

    def draw() -> None:
        if finished.wait(1.0):
            return
        with hub_tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr,
                      bar_format=bar_format) as bar:
            while True:
                bar.n = min(int(done[0]), int(total))
                bar.refresh()
                if finished.wait(0.5):
                    return

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        finished.set()
        thread.join()


# ---------------------------------------------------------------------------------------------
# Command line: settings from flags, checked before anything slow happens
# ---------------------------------------------------------------------------------------------
def parse_settings(argv: list[str] | None) -> argparse.Namespace:
    """One flag per setting, each defaulting to its constant; a bad value is refused, never clamped."""
    parser = argparse.ArgumentParser(
        description="Stream a completion from Phi-3-mini (llama.cpp on your CPU or GPU). "
        "Only the completion goes to stdout; progress and speed go to stderr.",
        epilog="Every default comes from the constants at the top of phi_console.py.")
    parser.error = lambda message: fail(f"{message} (see --help)", code=2)  # one line, not usage + error
    for name, setting in SETTINGS.items():
        flags = ["-p", "--prompt"] if name == "prompt" else ["--" + name.replace("_", "-")]
        shown = f"{setting.meaning}; {setting.must_be} (default: {DEFAULTS[name]!r})".replace("%", "%%")
        if setting.kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown)
        else:
            parser.add_argument(*flags, type=functools.partial(read_value, name),
                                metavar={int: "N", float: "X"}.get(setting.kind, "TEXT"), default=argparse.SUPPRESS,
                                help=shown)
    parser.add_argument("--load", metavar="FILE", help="continue a conversation saved with /save (implies --chat)")
    parser.add_argument("-q", "--quiet", action="store_true", help="stderr shows errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show llama.cpp's own log on stderr")
    given = vars(parser.parse_args(argv))
    for name in SETTINGS.keys() - given.keys() - {"prompt"}:  # the prompt's default waits for a possible pipe
        wrong = problem(name, DEFAULTS[name])
        if wrong:
            fail(f"{name.upper()} {wrong}; fix it at the top of phi_console.py", code=2)
    return argparse.Namespace(**{**DEFAULTS, "prompt": None, **given})


def problem(name: str, value: object) -> str | None:
    """What is wrong with a value for a setting, or None if nothing is."""
    setting = SETTINGS[name]
    if value is None:
        ok = setting.none
    elif setting.kind is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):  # True is an int to Python, but never a number here
        ok = False
    elif setting.kind is float:  # an integer is a number too; NaN and infinity are not
        ok = isinstance(value, (int, float)) and math.isfinite(value) and setting.valid(value)
    else:
        ok = isinstance(value, setting.kind) and setting.valid(value)
    return None if ok else f"must be {setting.must_be} (got {value!r})"


def read_value(name: str, text: str) -> object:
    """A setting typed as text (a flag, or /set in chat) as the value it stands for; 'none' is None."""
    setting = SETTINGS[name]
    if setting.none and text.strip().lower() == "none":
        value: object = None
    elif setting.kind is str:
        value = text
    else:
        try:
            value = setting.kind(text)
        except ValueError:
            value = text  # not a number: problem() says what it must be
    wrong = problem(name, value)
    if wrong:
        raise argparse.ArgumentTypeError(wrong.replace(repr(value), repr(text)))
    return value


def read_prompt(prompt: str | None, *, default: object) -> str:
    """`-` reads stdin; so does a pipe or a file on stdin when -p was not given."""
    if prompt == "-" or (prompt is None and stdin_is_piped()):
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace").strip()
    if prompt is None:
        prompt = default
    wrong = problem("prompt", prompt)
    if wrong:
        wrong = f"is empty (got {prompt!r})" if isinstance(prompt, str) else wrong
        fail(f"the prompt {wrong}; pass --prompt, pipe text in, or set PROMPT", code=2)
    return prompt  # type: ignore[return-value]


def stdin_is_piped() -> bool:
    """Is stdin a pipe or a file (`echo ... |`, `< question.txt`), rather than a terminal or nothing?"""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no stdin, or a closed one
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def physical_cores() -> int:
    """llama.cpp's own default thread count; the library's (half the logical CPUs) halves speed on small machines."""
    try:  # Linux: one entry per set of hyperthread siblings among the CPUs we may run on
        cpus = os.sched_getaffinity(0)
        siblings = set()
        for cpu in cpus:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings.add(f.read().strip())
        return max(len(siblings), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Download: the cache answers first, so a cached run sends no request at all
# ---------------------------------------------------------------------------------------------
def download(files: list[tuple[str, str, str]], *, state: Path, timeout: float, quiet: bool) -> list[str]:
    """Return verified local paths for (repo, file, revision) triples, fetching only what the cache lacks."""
    paths = [try_to_load_from_cache(repo, name, revision=revision) for repo, name, revision in files]
    for index, path in enumerate(paths):  # a damaged cached file is fetched again, like a missing one
        if isinstance(path, str) and not verified(path, state=state):
            if hub_constants.HF_HUB_OFFLINE:
                fail(f"the cached {path} is damaged (its hash does not match the hub's); "
                     "run without HF_HUB_OFFLINE to download it again")
            note(f"the cached {files[index][1]} is damaged (its hash does not match the hub's); downloading it again",
                 quiet=quiet)
            try:
                os.remove(os.path.realpath(path))
            except OSError as error:
                fail(f"the cached {path} is damaged and cannot be removed ({error.strerror}); delete it and run again")
            paths[index] = None
    missing = [(spec, i) for i, (spec, path) in enumerate(zip(files, paths)) if not isinstance(path, str)]
    if not missing:
        return paths  # type: ignore[return-value]
    if hub_constants.HF_HUB_OFFLINE:
        names = ", ".join(f"{repo}/{name}" for (repo, name, _), _ in missing)
        fail(f"{names} not in the cache and HF_HUB_OFFLINE is set; run once with a network connection")
    # One HEAD per file, without the library's retries: an unreachable hub is reported in seconds.
    metas = []
    for (repo, name, revision), _ in missing:
        head = functools.partial(get_hf_file_metadata, hf_hub_url(repo, name, revision=revision), timeout=timeout)
        metas.append(hub_call(head, repo=repo, name=name, revision=revision, timeout=timeout))
    have = sum(partial_size(repo, name, meta) for ((repo, name, _), _), meta in zip(missing, metas))
    needed = sum(meta.size or 0 for meta in metas) - have
    cache = Path(hub_constants.HF_HUB_CACHE)
    free = shutil.disk_usage(next(p for p in (cache, *cache.parents) if p.exists())).free
    if needed > free:
        fail(f"the download needs {needed / 1e9:.2f} GB in {cache}, but only {free / 1e9:.2f} GB is free; "
             "free some space, or set HF_HOME to a disk with room")
    resumed = f", resuming after the {have / 1e9:.2f} GB a stopped run left" if have else ""
    note(f"downloading {needed / 1e9:.2f} GB into {cache}{resumed} (once: later runs start from this cache)",
         quiet=quiet)
    for ((repo, name, revision), i), meta in zip(missing, metas):
        get = functools.partial(fetch, repo, name, revision, meta, state=state, timeout=timeout)
        paths[i] = hub_call(get, repo=repo, name=name, revision=revision, timeout=timeout, size=meta.size or 0)
    return paths  # type: ignore[return-value]


def hashes_to(path: Path, etag: str) -> bool:
    """Does the file hash to the hub's etag: the sha256 of an LFS file (the GGUF), git's blob sha1 of a small one?"""
    if len(etag) not in (40, 64) or any(c not in "0123456789abcdef" for c in etag):
        return True  # not named by a hash: nothing to check against
    digest = hashlib.sha256() if len(etag) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    return file_digest(path, digest) == etag


def file_digest(path: Path, digest: Any = None) -> str:
    """The hex digest of a file's bytes (sha256 unless told otherwise), read 16 MiB at a time (2.4 GB: seconds)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f, progress("hashing", total=os.fstat(f.fileno()).st_size, unit="B") as done:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
            done[0] += len(chunk)
    return digest.hexdigest()


def verified(path: str, *, state: Path) -> bool:
    """Does a cached file hash to the etag it is stored under? Hashes only when its size or mtime changed.

    The hub names each blob by its etag; huggingface_hub itself checks only the size of a download.
    """
    blob = os.path.realpath(path)
    info = os.stat(blob)
    if read_json(state).get(blob) == [info.st_size, info.st_mtime_ns]:
        return True
    if not hashes_to(Path(blob), os.path.basename(blob)):
        return False
    remember_verified(blob, state=state)
    return True


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON object the script keeps; {} if it is missing or damaged (it is only ever a shortcut)."""
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    return seen if isinstance(seen, dict) else {}


def remember_verified(blob: str, *, state: Path) -> None:
    """Note a blob's size and mtime as verified, so that later runs need not hash it again."""
    info = os.stat(blob)
    seen = {**read_json(state), blob: [info.st_size, info.st_mtime_ns]}
    try:  # a read-only cache just means hashing again next time
        state.parent.mkdir(parents=True, exist_ok=True)
        write_whole(state, json.dumps(seen))
    except OSError:
        pass


def hub_call(call: Callable[[], T], *, repo: str, name: str, revision: str, timeout: float, size: int = 0) -> T:
    """Call huggingface_hub, turning each way it can fail into one line that says what to do."""
    endpoint = hub_constants.ENDPOINT
    try:
        return call()
    except hub_errors.GatedRepoError:
        fail(f"{repo} is gated: accept its terms on the model page, then set HF_TOKEN to a token that may read it")
    except hub_errors.RepositoryNotFoundError:
        fail(f"repository {repo} not found on {endpoint} (check the repo name; a private repo needs HF_TOKEN)")
    except hub_errors.RevisionNotFoundError:
        fail(f"revision {revision!r} not found in {repo} (check --model-revision and --tokenizer-revision)")
    except hub_errors.RemoteEntryNotFoundError:
        fail(f"{name} not found in {repo} at revision {revision!r} (check the file name)")
    except hub_errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        fail(f"the hub at {endpoint} answered HTTP {status} for {repo}/{name}; try again later")
    except (hub_httpx.TimeoutException, TimeoutError):
        fail(f"the hub at {endpoint} did not answer within {timeout:g} s while fetching {repo}/{name}; "
             "check your connection and run again (HF_HUB_ETAG_TIMEOUT sets the wait)")
    except (hub_httpx.HTTPError, ConnectionError) as error:
        fail(f"cannot reach the hub at {endpoint} ({type(error).__name__}) and {repo}/{name} is not cached; "
             "connect once to download it")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            fail(f"no room to save {repo}/{name} ({size / 1e9:.2f} GB) in {hub_constants.HF_HUB_CACHE}: "
                 f"{error.strerror}; free some space, or set HF_HOME to a disk with room")
        fail(f"could not save {repo}/{name} in {hub_constants.HF_HUB_CACHE}: {error.strerror or error}")


def read_special_tokens(path: str) -> dict[str, int]:
    """Map each special token's text to its id, from tokenizer.json's `added_tokens` list."""
    try:
        if os.path.getsize(path) > TOKENIZER_MAX_BYTES:
            raise ValueError(f"{os.path.getsize(path)} bytes is far more than a tokenizer needs")
        with open(path, encoding="utf-8") as f:
            added = json.load(f)["added_tokens"]
        specials = {t["content"]: int(t["id"]) for t in added if t.get("special")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        fail(f"{path} is not a usable tokenizer.json ({type(error).__name__}: {error}); delete it to download again")
    absent = [name for name in CHAT_TOKENS if name not in specials]
    if absent:
        fail(f"{path} lacks the special tokens {', '.join(absent)}: is --tokenizer-repo a Phi-3 tokenizer?")
    return specials


# ---------------------------------------------------------------------------------------------
# Resumable (optional on a first read): a stopped download goes on where it stopped
# ---------------------------------------------------------------------------------------------
def partial_file(repo: str, name: str, etag: str) -> Path:
    """Where a stopped download of `name` waits for the next run: beside the blobs, named for the file and etag."""
    folder = Path(hub_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
    return folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.{etag}.partial"


def partial_size(repo: str, name: str, meta: Any) -> int:
    """How many bytes of the file a stopped run left, if they can be a beginning of it."""
    if not meta.etag:
        return 0  # a server that names no blob: nothing to resume
    partial = partial_file(repo, name, meta.etag)
    if not partial.exists():
        return 0
    size = partial.stat().st_size
    if size > (meta.size or 0):
        return 0  # longer than the file: fetch_rest starts it again
    return size


def fetch(repo: str, name: str, revision: str, meta: Any, *, state: Path, timeout: float) -> str:
    """Download one file into the cache, resuming what a stopped run left; nothing unverified enters the cache.

    huggingface_hub writes each download to a file named for its process and deletes it when stopped, so a
    stopped 2.4 GB download would start again from zero. Here the bytes stay in a partial file that the next
    run continues with a Range request (the library's own http_get), under the library's lock for that file.
    """
    if not meta.etag or not meta.location:  # a server that names no blob: the library's download, unresumed
        return hf_hub_download(repo, name, revision=revision, etag_timeout=timeout)
    folder = repo_folder_name(repo_id=repo, repo_type="model")
    blob, partial = Path(hub_constants.HF_HUB_CACHE) / folder / "blobs" / meta.etag, partial_file(repo, name, meta.etag)
    lock = Path(hub_constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # the same lock hf_hub_download takes: two runs never write one file at once
        for stale in partial.parent.glob(f"{partial.name.split('.')[0]}.*.partial"):
            if stale != partial:
                stale.unlink(missing_ok=True)  # the file has changed on the hub since that run stopped
        for leftover in partial.parent.glob(f"{meta.etag}.*.incomplete"):  # the library's, from killed runs
            leftover.unlink(missing_ok=True)
        while not blob.exists():
            resumed = fetch_rest(repo, name, revision, meta, partial, timeout=timeout)
            if hashes_to(partial, meta.etag):
                os.replace(partial, blob)
                remember_verified(str(blob), state=state)
            else:
                partial.unlink()
                if not resumed:  # a damaged partial costs one fresh download; a damaged fresh one is an error
                    fail(f"{repo}/{name} arrived damaged (its hash does not match the hub's); run again to retry")
    # The blob is in place: the library links it into the snapshot and writes the ref, as for its own downloads.
    return hf_hub_download(repo, name, revision=revision, etag_timeout=timeout)


def fetch_rest(repo: str, name: str, revision: str, meta: Any, partial: Path, *, timeout: float) -> int:
    """Append what `partial` lacks of the file `meta` describes; returns how many bytes it already had.

    The hub sends the bytes from another host, through a signed link that expires (after an hour on
    huggingface.co): a slow download, or a retry after a dropped connection, can outlive it. When that host
    refuses the link, one HEAD asks the hub for a fresh one and the download goes on from the bytes on disk.
    A connection dropped after some bytes arrived is taken up again from them too.
    """
    hub_constants.DOWNLOAD_CHUNK_SIZE = 1 << 20  # written every MiB (not 10): a stop loses at most that
    with open(partial, "r+b" if partial.exists() else "wb") as f:
        had = have = f.seek(0, os.SEEK_END)
        if meta.size is not None and have > meta.size:  # longer than the file: not a beginning of it
            f.truncate(0)
            had = have = f.seek(0)
        refusals = 0  # in a row, with no byte arriving between them
        while True:
            try:
                http_get(meta.location, f, resume_size=have, headers=headers_for(meta.location),
                         expected_size=meta.size, displayed_filename=name)
                return had
            except hub_httpx.TransportError:  # huggingface_hub 2.x resumes a dropped connection itself; 1.x not
                if f.seek(0, os.SEEK_END) <= have:
                    raise  # nothing arrived: the host is out of reach
                have, refusals = f.tell(), 0
                continue  # the connection dropped after some bytes: go on from them, with the same link
            except hub_errors.HfHubHTTPError as error:
                status = error.response.status_code if error.response is not None else None
                if status not in (401, 403):
                    raise
                got = f.seek(0, os.SEEK_END)
                refusals = 1 if got > have else refusals + 1
                have = got
                if refusals > LINK_REFRESHES:
                    fail(f"the file host refused {repo}/{name} with HTTP {status} {refusals} times in a row, also with "
                         f"fresh links from the hub; run again later to resume after the {have / 1e9:.2f} GB here")
            fresh = get_hf_file_metadata(hf_hub_url(repo, name, revision=revision), timeout=timeout)
            if fresh.etag != meta.etag or not fresh.location:
                fail(f"{repo}/{name} changed on the hub during the download; run again to download the new file")
            meta = fresh


def headers_for(url: str) -> dict[str, str]:
    """huggingface_hub's request headers, with the user's token only if `url` is on the hub itself.

    A signed link points to a CDN or storage host that must never see the token; huggingface_hub drops it
    there too (file_download.py: `_is_same_or_hub_host`), by the same comparison of origins.
    """
    headers = build_hf_headers()
    if origin(url) not in {origin(hub_constants.ENDPOINT), origin("https://huggingface.co"), origin("https://hf.co")}:
        headers.pop("authorization", None)
    return headers


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port: two URLs share an origin when these are equal."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


# ---------------------------------------------------------------------------------------------
# Load: llama.cpp maps the GGUF into memory; its log stays quiet unless --verbose
# ---------------------------------------------------------------------------------------------
def route_llama_log(*, verbose: bool) -> tuple[list[str], list[str]]:
    """Show llama.cpp's log when verbose; keep its error lines, to explain a failure in one line, and the lines
    that name the buffers the weights went to (a CPU_REPACK one holds weights repacked into a faster layout)."""
    errors: list[str] = []
    buffers: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        if verbose:
            sys.stderr.write(message)
        elif level == 3 and message.strip():  # GGML_LOG_LEVEL_ERROR
            errors.append(message.strip())
        if "model buffer size" in message:
            buffers.append(message.strip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    route_llama_log.keep_alive = on_log  # type: ignore[attr-defined]  # llama.cpp holds a raw pointer to it
    return errors, buffers


def repack_weights(setting: bool | None) -> bool:
    """Whether llama.cpp may copy weights into layouts made for this CPU (its extra buffer types): the setting, or
    for None, whether that was measured to pay on CPUs like this one."""
    features = llama_cpp.llama_print_system_info()
    if b"AMX_INT8 = 1" in features:
        # ggml's AMX kernel crashes on K-quant weights (this model is Q4_K_M), and a default build has it.
        # Without extra buffer types the weights never reach it. A build with -U__AMX_INT8__ in its C and C++
        # flags lacks the kernel.
        if setting:
            fail("--repack: this llama.cpp build has the AMX kernel, which crashes on K-quant weights; "
                 "build it without (README: Troubleshooting)", code=2)
        return False
    if setting is not None:
        return setting
    # Measured with llama-bench, in turns. An Intel Xeon (AVX-512) generated 7-34% faster on repacked Q4_K weights
    # in 4 of 5 pairs. An AMD EPYC (AVX2 only) did not: 9.09 against 9.33 tok/s at depth 0, 7.14 against 7.04 at
    # depth 500, while the copy cost its prompts 24% (17.6 against 23.2 tok/s), 1.45 GiB of memory and 1.7-3.4 s
    # a load (the script: 0.41 against 1.87 GiB peak Private_Dirty, loaded in 0.25 against 1.99 s).
    # Elsewhere (ARM, say) nothing was measured, and llama.cpp's own choice stands.
    return b"AVX512 = 1" in features or b"AVX2 = 1" not in features


def load_model(path: str, *, gpu_layers: int | None, log_errors: list[str], repack: bool) -> llama_cpp.llama_model_p:
    """The model, its weights mapped from the file; with repack, llama.cpp's choice of layout for this CPU."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    if gpu_layers is None:
        gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0  # -1 = every layer
    params.n_gpu_layers = gpu_layers
    params.use_extra_bufts = repack  # False: every weight used in place, as the file has it
    # The weights are mapped (llama.cpp's default): a rerun starts from the page cache without copying 2.4 GB,
    # the tensors used in place are shared with that cache, and pages of tensors that were repacked into a
    # faster layout are never touched again, so the OS may drop them. Reading the file instead (load mode NONE)
    # made a warm start 1.5x slower and kept a private copy as large as the file.
    with signals_noted() as caught, progress("loading", total=100, unit="%", bar_format=LOAD_BAR) as done:

        def loaded(fraction: float, data: ctypes.c_void_p) -> bool:  # llama.cpp reports as it reads; False stops it
            done[0] = fraction * 100
            return not caught

        params.progress_callback = llama_cpp.llama_progress_callback(loaded)
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if caught:
        if model:
            llama_cpp.llama_model_free(model)
        raise_caught(caught)
    if not model:
        reason = log_errors[0].split(": ", 1)[-1] if log_errors else "llama.cpp could not read it"
        fail(f"{path} is not a loadable GGUF model ({reason}); delete it to download it again")
    return model


def check_model(model: llama_cpp.llama_model_p, specials: dict[str, int], *, n_ctx: int) -> None:
    """The model must fit the settings, and agree with tokenizer.json on the chat tokens' ids."""
    trained = llama_cpp.llama_model_n_ctx_train(model)
    if n_ctx > trained:
        fail(f"--ctx {n_ctx} is larger than the model's context of {trained} tokens", code=2)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    for name in CHAT_TOKENS:
        token = specials[name]
        text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace") if token < n_vocab else None
        if text != name:
            fail(f"tokenizer.json gives {name} the id {token}, but the GGUF has {text!r} there: "
                 "the model and tokenizer files do not belong together")


def identity(model_path: str, *, gpu_layers: int | None, repack: bool) -> dict[str, Any]:
    """What a saved KV state depends on: the model's exact bytes (the cache names the file by its hash), the build,
    where the layers run and in which layout."""
    blob = os.path.realpath(model_path)
    build = llama_cpp.__version__ + " " + llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {"model": f"{os.path.basename(blob)} {os.path.getsize(blob)}", "llama.cpp": build, "gpu_layers": gpu_layers,
            "repack": repack}


def new_context(model: llama_cpp.llama_model_p, *, n_ctx: int, threads: int, batch: int,
                gpu: bool) -> tuple[llama_cpp.llama_context_p, dict[str, Any]]:
    """A context of n_ctx tokens, and the settings of it that change the numbers it computes (context_facts)."""
    facts = context_facts(n_ctx, threads=threads, batch=batch, gpu=gpu)
    params = llama_cpp.llama_context_default_params()
    params.flash_attn_type = facts["flash_attn"]
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = min(n_ctx, batch)
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = False
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        fail(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?); try a smaller --ctx")
    facts["n_ctx"] = llama_cpp.llama_n_ctx(ctx)  # the same, unless a llama.cpp sizes its cache another way
    return ctx, facts


def context_facts(n_ctx: int, *, threads: int, batch: int, gpu: bool) -> dict[str, Any]:
    """What a context of n_ctx tokens computes with, known before creating it.

    That is: the cache's size (llama.cpp rounds it up to a multiple of 256), the batches a prompt is cut into
    (of `batch` tokens: a smaller context cannot hold a longer prompt), threads and flash attention.
    """
    # On the CPU, flash attention is off at every depth: measured on an AMD EPYC and an Intel Xeon, it slows
    # generation by 22-41% once 256 or more tokens are in the context, and what it gains in a shorter one is
    # a few percent (-6% to +8%); switching it by size would make a longer --sample-len change the reply.
    # Evaluating long prompts with it on, then moving the state into a context with it off (V transposed into
    # that layout), was measured on the AMD EPYC: the move cost what the prompt gained (1008 tokens: the first
    # token after 47.2 against 47.5 s). On a GPU, llama.cpp's own choice stands.
    flash_attn = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if gpu else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return {"n_ctx": -(-n_ctx // 256) * 256, "batch": batch, "threads": threads, "flash_attn": flash_attn}


# ---------------------------------------------------------------------------------------------
# Prompt: Phi-3's chat format, tokenized once and evaluated in batches
# ---------------------------------------------------------------------------------------------
def tokenize(vocab: llama_cpp.llama_vocab_p, text: str, *, add_bos: bool) -> list[int]:
    """Tokenize plain text; special-token text typed by the user stays plain text."""
    data = text.encode("utf-8")
    size = len(data) + 2  # SPM never makes more tokens than bytes, plus BOS and the space prefix
    tokens = (llama_cpp.llama_token * size)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, size, add_bos, False)
    return list(tokens[:n])


def user_turn(vocab: llama_cpp.llama_vocab_p, text: str, specials: dict[str, int]) -> list[int]:
    """`<|user|>\\n{text}<|end|>\\n<|assistant|>`, as llama.cpp tokenizes it with special tokens parsed.

    A one-shot prompt is BOS and one such turn; a chat adds one per message.
    """
    return [specials["<|user|>"], *tokenize(vocab, "\n" + text, add_bos=False), specials["<|end|>"],
            *tokenize(vocab, "\n", add_bos=False), specials["<|assistant|>"]]


def with_system(system: str | None, text: str) -> str:
    """Phi-3-mini-4k's chat format has no system role: its instructions open the first message instead."""
    return f"{system}\n\n{text}" if system else text


def evaluate(ctx: llama_cpp.llama_context_p, tokens: list[int]) -> None:
    """Feed tokens to the model a batch at a time; only the last one's logits are kept.

    Ctrl-C or SIGTERM stops it within one graph node, not one batch (seconds of work), and raises as the
    signal would have; the KV cache then holds exactly the batches that were evaluated whole. A bar shows
    how far it is, also within a batch: llama.cpp computes the same number of graph nodes for every batch,
    so the nodes of the first one measure the rest.
    """
    batch, memory = llama_cpp.llama_n_batch(ctx), llama_cpp.llama_get_memory(ctx)
    nodes = [0, 0]  # graph nodes computed in the batch under way, and in a whole batch (once one has finished)
    span = [0, 0]  # where the batch under way starts in `tokens`, and its length
    with signals_noted() as caught, progress("prompt", total=len(tokens), unit="tok") as done:

        def after_node(data: ctypes.c_void_p) -> bool:  # llama.cpp asks this after every graph node
            nodes[0] += 1
            if nodes[1]:
                done[0] = span[0] + span[1] * min(nodes[0] / nodes[1], 1.0)
            return bool(caught)

        callback = llama_cpp.ggml_abort_callback(after_node)
        llama_cpp.llama_set_abort_callback(ctx, callback, None)
        try:
            for start in range(0, len(tokens), batch):
                known = llama_cpp.llama_memory_seq_pos_max(memory, 0) + 1
                chunk = tokens[start : start + batch]
                array = (llama_cpp.llama_token * len(chunk))(*chunk)
                nodes[0], span[:] = 0, [start, len(chunk)]
                status = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(chunk)))
                if status == 2:  # aborted: drop whatever of this batch reached the cache
                    llama_cpp.llama_memory_seq_rm(memory, 0, known, -1)
                elif status != 0:
                    fail("llama.cpp failed to evaluate the prompt")
                if caught:
                    break
                nodes[1] = nodes[1] or nodes[0]
                done[0] = start + len(chunk)
        finally:
            llama_cpp.llama_set_abort_callback(ctx, llama_cpp.ggml_abort_callback(), None)
    raise_caught(caught)


@contextlib.contextmanager
def signals_noted() -> Iterator[list[int]]:
    """While llama.cpp works, Ctrl-C and SIGTERM are only noted; yields the signals caught.

    Python runs its signal handlers only between its own bytecodes, so a signal waits for a long llama.cpp
    call to return, and an exception raised inside a ctypes callback is lost. Instead the callbacks llama.cpp
    asks (the abort callback after every graph node, the load's progress callback) see the note and tell it
    to stop; raise_caught then raises as the signal would have. An inherited SIG_IGN is kept.
    """
    caught: list[int] = []
    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in watched}
    try:
        yield caught
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def raise_caught(caught: list[int]) -> None:
    if caught:
        raise KeyboardInterrupt if caught[0] == signal.SIGINT else SystemExit(128 + caught[0])


def prompt_on_plain_weights(path: str, model: llama_cpp.llama_model_p, held: list[int],
                            found: tuple[Path, dict[str, Any], int] | None, *, n_ctx: int, context: dict[str, Any],
                            folder: Path, quiet: bool) -> tuple[llama_cpp.llama_context_p, int]:
    """Evaluate `held` on the weights as the file has them; a context of `model` that holds it, and how many of
    its tokens an earlier run's saved state gave (`found`, as saved_prompt finds it).

    On a CPU, llama.cpp repacks some weights (with REPACK) into a layout that suits generation (one token at a time)
    better than prompts (hundreds at a time): on an Intel Xeon (AVX-512) 512-token batches ran 1.1-1.7x slower on
    it, while generation gained. So the file is mapped a second time without repacking (no copy: both mappings share
    the page cache; it takes 0.1-0.3 s), the prompt is evaluated there, and its cache moves through a file into a
    new context of the repacked model (about 1.5 ms per token on an AMD EPYC). That file is written, not mapped, and
    the second model and context are freed before the new context is made, so this process's own memory peaks no
    higher than with one model. Below PLAIN_PROMPT_TOKENS those fixed costs, and the plain layout's slower small
    batches, outweigh the gain.
    """
    plain = load_model(path, gpu_layers=0, log_errors=[], repack=False)
    moving = folder / f"{os.getpid()}.moving"
    try:
        ctx, _ = new_context(plain, n_ctx=n_ctx, batch=BATCH, **context)
        try:
            restored = restore_prompt(ctx, found, quiet=quiet) if found else 0
            evaluate(ctx, held[restored:])
            in_memory = state_out(ctx, moving, held)
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(plain)
    try:
        ctx, _ = new_context(model, n_ctx=n_ctx, batch=BATCH, **context)
        state_in(ctx, moving, in_memory, held)
    finally:
        moving.unlink(missing_ok=True)
    return ctx, restored


def state_out(ctx: llama_cpp.llama_context_p, path: Path, tokens: list[int]) -> ctypes.Array | None:
    """Write the cache's state, which holds `tokens`, to path; where no file can be written, return it instead."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob("*.moving"):  # left by a run that was killed while moving its prompt
            with contextlib.suppress(OSError):  # (or being written by another run right now: then recent)
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()
        write_state(ctx, path, tokens)
        return None
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)  # a full or read-only disk: in memory, for this once
    data = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(ctx, data, size, 0)
    return data


def state_in(ctx: llama_cpp.llama_context_p, path: Path, data: ctypes.Array | None, tokens: list[int]) -> None:
    """Load what state_out kept into an empty context."""
    if data is None:
        moved = read_state(ctx, path, tokens)
    else:
        with uninterrupted():
            moved = llama_cpp.llama_state_seq_set_data(ctx, data, len(data), 0) == len(data)
        moved = moved and llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 0) + 1 == len(tokens)
    if not moved:
        fail("llama.cpp could not move the evaluated prompt into the context that generates")


# ---------------------------------------------------------------------------------------------
# Stream: sample in llama.cpp, yield text as soon as it is whole UTF-8
# ---------------------------------------------------------------------------------------------
def make_sampler(*, n_vocab: int, temperature: float, top_p: float | None, repeat_penalty: float,
                 repeat_last_n: int, seed: int) -> llama_cpp.llama_sampler_p:
    """repeat penalty -> temperature -> top-p -> draw; nothing else (no hidden top-k or min-p)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    links = [llama_cpp.llama_sampler_init_penalties(n_vocab, repeat_last_n, repeat_penalty, 0.0, 0.0)]
    if temperature == 0:
        links.append(llama_cpp.llama_sampler_init_greedy())
    else:
        links.append(llama_cpp.llama_sampler_init_temp(temperature))
        if top_p is not None:
            links.append(llama_cpp.llama_sampler_init_top_p(top_p, 1))
        links.append(llama_cpp.llama_sampler_init_dist(seed))
    for link in links:
        llama_cpp.llama_sampler_chain_add(chain, link)
    return chain


def sampler_for(vocab: llama_cpp.llama_vocab_p, settings: dict[str, Any], *,
                window: list[int]) -> llama_cpp.llama_sampler_p:
    """The sampler the settings describe, its repeat-penalty window primed with the reply tokens so far."""
    sampler = make_sampler(n_vocab=llama_cpp.llama_vocab_n_tokens(vocab), seed=chosen_seed(settings["seed"]),
                           **{k: settings[k] for k in ("temperature", "top_p", "repeat_penalty", "repeat_last_n")})
    for token in window[-settings["repeat_last_n"]:] if settings["repeat_last_n"] else []:
        llama_cpp.llama_sampler_accept(sampler, token)
    return sampler


def chosen_seed(seed: int | None) -> int:
    """The seed itself, or a fresh random one for None."""
    return random.SystemRandom().randint(0, MAX_SEED) if seed is None else seed


def token_bytes(vocab: llama_cpp.llama_vocab_p, token: int, *, first: bool) -> bytes:
    """The bytes a token stands for; a reply's first token loses the space SPM puts before words."""
    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        if first:  # detokenize applies the vocabulary's own rule for that space
            n = llama_cpp.llama_detokenize(vocab, (llama_cpp.llama_token * 1)(token), 1, buffer, size, False, False)
        else:
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n  # too small: llama.cpp says how many bytes it needs


def generate(ctx: llama_cpp.llama_context_p, *, prompt: list[int], sampler: llama_cpp.llama_sampler_p,
             stop_ids: set[int], hidden_ids: set[int], sample_len: int,
             last_alone: bool = False) -> Iterator[tuple[int, str]]:
    """Evaluate the prompt, then yield each sampled token with the text it adds ("" mid-character).

    last_alone: evaluate the prompt's last token by itself, after the rest. A saved state holds no logits, so a
    restored prompt's last token is evaluated by itself; doing the same when nothing was restored makes the
    two compute the same numbers.
    """
    vocab = llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx))
    split = len(prompt) - 1 if last_alone else len(prompt)
    evaluate(ctx, prompt[:split])  # the prompt is not shown to the sampler: the repeat penalty looks at the reply only
    evaluate(ctx, prompt[split:])
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    one = (llama_cpp.llama_token * 1)()
    for index in range(sample_len):
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)  # also records it for the penalty
        stop = token in stop_ids or llama_cpp.llama_vocab_is_eog(vocab, token)
        last = stop or index == sample_len - 1
        data = b"" if stop or token in hidden_ids else token_bytes(vocab, token, first=index == 0)
        yield token, utf8.decode(data, final=last)
        if last:
            return
        one[0] = token
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
            fail("llama.cpp failed to evaluate a token")


def show(pieces: Iterator[tuple[int, str]], *, tokens: list[int], stamps: list[float],
         text: list[str] | None = None) -> None:
    """Print the reply as it comes, ending the line even when interrupted; note each token, its time and text."""
    out = sys.stdout.buffer
    try:
        for token, piece in pieces:
            stamps.append(time.perf_counter())
            tokens.append(token)
            if text is not None:
                text.append(piece)
            if piece:
                out.write(piece.encode("utf-8"))
                out.flush()
    finally:
        out.write(b"\n")
        out.flush()


def speed(count: int, seconds: float) -> str:
    return f"{count / seconds:.2f} tok/s" if count > 0 and seconds > 0 else "n/a"


def complete(model: llama_cpp.llama_model_p, *, prompt: str, specials: dict[str, int], n_ctx: int,
             context: dict[str, Any], sampling: dict[str, Any], identity: dict[str, Any], prompts: Path,
             prompt_cache_gb: float, plain_weights: str | None, started: float, quiet: bool, verbose: bool) -> int:
    """One reply to one prompt, streamed to stdout; load, prompt and generation speed on stderr.

    A prompt evaluated by an earlier run (same model, build and context) is restored from the state that run
    saved in `prompts`, instead of being evaluated again. plain_weights: the model file, when the prompt is to be
    evaluated on its weights as the file has them (see prompt_on_plain_weights); None = on `model`.
    """
    vocab = llama_cpp.llama_model_get_vocab(model)
    tokens = tokenize(vocab, "", add_bos=True) + user_turn(vocab, with_system(sampling["system"], prompt), specials)
    if len(tokens) >= n_ctx:
        fail(f"the prompt is {len(tokens)} tokens and the context holds {n_ctx}; shorten the prompt or raise --ctx",
             code=2)
    sample_len = min(sampling["sample_len"], n_ctx - len(tokens) + 1)
    if sample_len < sampling["sample_len"]:
        note(f"note: the context leaves room for {sample_len} tokens of reply; raise --ctx for more", quiet=quiet)
    size = min(n_ctx, len(tokens) + sample_len)  # no more cache than the prompt and reply: less memory to clear
    held = tokens[:-1]  # what a saved state holds: it keeps no logits, so the last token is evaluated every run
    if len(held) < PLAIN_PROMPT_TOKENS:  # a short prompt: the second mapping costs more than it saves
        plain_weights = None
    facts = {**identity, **context_facts(size, batch=BATCH, **context),
             "prompt weights": "as in the file" if plain_weights else "as loaded"}
    loaded = time.perf_counter()
    found = saved_prompt(prompts, held, facts, batch=min(size, BATCH)) if prompt_cache_gb else None
    ctx, restored = None, 0
    if found and (found[2] == len(held) or not plain_weights):  # all of it saved, or no other weights to use
        ctx, _ = new_context(model, n_ctx=size, batch=BATCH, **context)
        restored, found = restore_prompt(ctx, found, quiet=quiet), None
    if plain_weights and restored < len(held):
        if ctx:
            llama_cpp.llama_free(ctx)  # its saved state turned out unusable
        ctx, restored = prompt_on_plain_weights(plain_weights, model, held, found, n_ctx=size, context=context,
                                                folder=prompts, quiet=quiet)
        if verbose:
            note("prompt: evaluated on the weights as the file has them; generating on the repacked ones", quiet=quiet)
    elif ctx is None:
        ctx, _ = new_context(model, n_ctx=size, batch=BATCH, **context)
    start = len(held) if plain_weights else restored  # the prompt's tokens already in the cache
    seed = chosen_seed(sampling["seed"])  # chosen here, so that the report can name it
    sampler = sampler_for(vocab, {**sampling, "seed": seed}, window=[])
    reply: list[int] = []
    stamps: list[float] = []
    try:
        show(generate(ctx, prompt=tokens[start:], sampler=sampler, stop_ids={specials[name] for name in STOP_TOKENS},
                      hidden_ids=set(specials.values()), sample_len=sample_len, last_alone=True),
             tokens=reply, stamps=stamps)
    finally:
        if reply and prompt_cache_gb and restored < len(held):  # the prompt was evaluated whole, even if Ctrl-C
            save_prompt(ctx, held, facts, folder=prompts, limit=prompt_cache_gb * 1e9)  # stopped the reply
    if verbose:  # llama.cpp's own timings, next to ours: the difference is the time spent in Python
        llama_cpp.llama_perf_context_print(ctx)
    first = stamps[0] if stamps else time.perf_counter()
    if restored:
        evaluation = f"{restored} restored from an earlier run in {first - loaded:.2f} s"
    else:
        evaluation = speed(len(tokens), first - loaded)
    rate = speed(len(reply) - 1, stamps[-1] - first) if stamps else speed(0, 0)
    note(f"loaded in {loaded - started:.2f} s | prompt: {len(tokens)} tokens, {evaluation}"
         f" | generated: {len(reply)} tokens, {rate} | seed {seed}", quiet=quiet)
    return 0


# ---------------------------------------------------------------------------------------------
# Saved prompts (optional on a first read): reruns and /load restore an evaluated prompt
# ---------------------------------------------------------------------------------------------
def saved_prompt(folder: Path, tokens: list[int], facts: dict[str, Any], *,
                 batch: int) -> tuple[Path, dict[str, Any], int] | None:
    """The saved prompt, of those earlier runs saved under the same facts, that can give the longest start of
    `tokens`: its index file, the index, and that length.

    What it can give back is exactly what evaluating those tokens here would compute: all of them, or a shared
    start cut where evaluation's batches end (a multiple of `batch`), so that the rest is evaluated in the same
    batches as without it. The reply is then the same to the byte.
    """
    best, usable = None, 0
    for index in folder.glob("*.json"):
        saved = read_json(index)
        have = saved.get("tokens") if saved.get("facts") == facts else None
        if not isinstance(have, list):
            continue
        common = next((i for i, (a, b) in enumerate(zip(have, tokens)) if a != b),
                      min(len(have), len(tokens)))
        length = len(tokens) if common == len(have) == len(tokens) else common // batch * batch
        if length > usable:
            best, usable = (index, saved), length
    return None if best is None else (*best, usable)


def restore_prompt(ctx: llama_cpp.llama_context_p, found: tuple[Path, dict[str, Any], int], *, quiet: bool) -> int:
    """Put what saved_prompt found into the cache; how many tokens that is (0 if the saved state is not usable)."""
    index, saved, usable = found
    distrust = load_state(ctx, index.with_suffix(".state"), saved.get("sha256"), saved["tokens"])
    if distrust:
        note(f"note: not using the saved state of this prompt ({distrust}); evaluating it again", quiet=quiet)
        forget_prompt(index)
        return 0
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, usable, -1)
    with contextlib.suppress(OSError):
        os.utime(index)  # just used: the last to be dropped for room
    return usable


def save_prompt(ctx: llama_cpp.llama_context_p, tokens: list[int], facts: dict[str, Any], *, folder: Path,
                limit: float) -> None:
    """Keep the cache's first len(tokens) positions for later runs, and forget what follows them.

    The least recently used saved prompts are deleted to keep all of them within `limit` bytes.
    """
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, len(tokens), -1)
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    if size > limit:
        return
    name = hashlib.sha256(json.dumps([facts, tokens]).encode()).hexdigest()[:32]
    partial = folder / f"{name}.{os.getpid()}.state"  # a run saving the same prompt at once writes its own file
    with contextlib.suppress(OSError):  # a full or read-only disk only means evaluating the prompt again next time
        folder.mkdir(parents=True, exist_ok=True)
        make_room_for_prompt(folder, keep=limit - size)
        sha256 = save_state(ctx, partial, tokens)
        os.replace(partial, folder / f"{name}.state")
        write_whole(folder / f"{name}.json", json.dumps({"facts": facts, "tokens": tokens, "sha256": sha256}))
    partial.unlink(missing_ok=True)


def make_room_for_prompt(folder: Path, *, keep: float) -> None:
    """Delete saved prompts, least recently used first, until the rest take at most `keep` bytes."""
    for state in folder.glob("*.state"):  # a partial one, or left by a run stopped while saving
        if not state.with_suffix(".json").exists():
            state.unlink(missing_ok=True)
    saved = []
    for index in folder.glob("*.json"):
        try:
            saved.append((index.stat().st_mtime, index.with_suffix(".state").stat().st_size, index))
        except OSError:
            forget_prompt(index)
    total = sum(size for _, size, _ in saved)
    for _, size, index in sorted(saved):
        if total <= keep:
            break
        forget_prompt(index)
        total -= size


def forget_prompt(index: Path) -> None:
    with contextlib.suppress(OSError):
        index.unlink(missing_ok=True)
        index.with_suffix(".state").unlink(missing_ok=True)


def save_state(ctx: llama_cpp.llama_context_p, state: Path, tokens: list[int]) -> str:
    """Write llama.cpp's state of the cache, which holds `tokens` (no logits); the file's sha256."""
    write_state(ctx, state, tokens)
    return file_digest(state)


def load_state(ctx: llama_cpp.llama_context_p, state: Path, sha256: str | None, tokens: list[int]) -> str | None:
    """Load what save_state wrote, if the file still hashes to sha256 and holds exactly `tokens`; else say why not."""
    try:
        if file_digest(state) != sha256:
            return "it has changed since it was saved"
    except OSError as error:
        return error.strerror or str(error)
    return None if read_state(ctx, state, tokens) else "llama.cpp could not restore it"


def write_state(ctx: llama_cpp.llama_context_p, state: Path, tokens: list[int]) -> None:
    """Write the cache's state, which holds `tokens`; OSError if llama.cpp could not."""
    with uninterrupted():
        written = llama_cpp.llama_state_seq_save_file(ctx, str(state).encode(), 0,
                                                      (llama_cpp.llama_token * len(tokens))(*tokens), len(tokens))
    if not written:
        raise OSError(f"llama.cpp could not write {state}")


def read_state(ctx: llama_cpp.llama_context_p, state: Path, tokens: list[int]) -> bool:
    """Load what write_state wrote into an empty cache, if it holds exactly `tokens`; else leave the cache empty."""
    out, count = (llama_cpp.llama_token * max(len(tokens), 1))(), ctypes.c_size_t(0)
    memory = llama_cpp.llama_get_memory(ctx)
    with uninterrupted():
        read = llama_cpp.llama_state_seq_load_file(ctx, str(state).encode(), 0, out, len(tokens), ctypes.byref(count))
        if read and out[:count.value] == tokens and llama_cpp.llama_memory_seq_pos_max(memory, 0) + 1 == len(tokens):
            return True
        llama_cpp.llama_memory_clear(memory, True)
    return False


# ---------------------------------------------------------------------------------------------
# Chat (optional on a first read): a conversation kept in the KV cache; each turn evaluates only its own tokens
# ---------------------------------------------------------------------------------------------
SAVED_FORMAT = "phi-console conversation 1"  # the "format" of a /save file; other files are refused
SAVED_REPLY_TOKENS = 4096  # the most recent reply tokens a /save keeps for the repeat penalty's window
COMMANDS = {  # what a chat understands, for /help; the settings /set takes are listed after /set
    "/set NAME VALUE": "change a setting (system starts the conversation over):",
    "/show": "the current settings and how much of the context is used",
    "/save FILE": "write the conversation to FILE (JSON) and llama.cpp's state of it to FILE.state",
    "/load FILE": "continue a saved conversation, without evaluating it again",
    "/reset": "forget the conversation",
    "/stats": "speed of the last reply",
    "/help": "this list",
    "/bye": 'leave (so does Ctrl-D); Ctrl-C stops a reply; a line of just """ starts and ends a message of many lines',
}


class Conversation:
    """A chat's record and the KV cache that holds it, kept in agreement.

    Position i of the cache holds tokens[i]. exchanges[k] is where the k-th remembered exchange (a message and
    its reply) starts in tokens; `pending` ends the last reply and goes into the cache with the next message.
    `replies` holds every token the model said, newest last: the repeat penalty's window. Every change to the
    record and the cache runs with Ctrl-C held back, so the two always agree.
    """

    def __init__(self, ctx: llama_cpp.llama_context_p, *, specials: dict[str, int], n_ctx: int,
                 settings: dict[str, Any], identity: dict[str, Any], quiet: bool) -> None:
        self.ctx, self.specials, self.n_ctx, self.settings = ctx, specials, n_ctx, settings
        self.identity, self.quiet, self.sampler, self.stats = identity, quiet, None, "no reply yet"
        self.vocab = llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx))
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.stop_ids = {specials[name] for name in STOP_TOKENS}
        self.reply_end = [specials["<|end|>"], *tokenize(self.vocab, "\n", add_bos=False)]
        self.reset()

    def reset(self) -> str:
        """Forget everything said; the settings stay."""
        with uninterrupted():
            llama_cpp.llama_memory_clear(self.memory, True)
            self.tokens: list[int] = []
            self.exchanges: list[int] = []
            self.pending: list[int] = []
            self.replies: list[int] = []
            self.messages: list[dict[str, str]] = []
        self.new_sampler()
        return "the conversation is forgotten"

    def new_sampler(self) -> None:
        """A sampler for the current settings, whose penalty window carries on over the replies so far."""
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
        self.sampler = sampler_for(self.vocab, self.settings, window=self.replies)

    def change(self, name: str, text: str) -> str:
        """/set: a new value for a setting, checked like a flag's."""
        if name not in CHAT_SETTINGS:
            raise ValueError(f"/set takes one of {', '.join(CHAT_SETTINGS)} (got {name!r})")
        try:
            self.settings[name] = read_value(name, text)
        except argparse.ArgumentTypeError as wrong:
            raise ValueError(f"{name} {wrong}") from None
        if name == "system":  # it belongs at the start of the conversation, so the conversation starts over
            return f"{name} = {self.settings[name]!r}; {self.reset()}"
        self.new_sampler()
        return f"{name} = {self.settings[name]!r}"

    def show(self) -> str:
        return "".join(f"{name} = {self.settings[name]!r}\n" for name in CHAT_SETTINGS) + \
            f"context: {len(self.tokens)} of {self.n_ctx} tokens used"

    def make_room(self, turn: int) -> int | None:
        """Forget the oldest exchanges until a message of `turn` tokens and a full reply fit; how many were forgotten.

        The exchange that carries the system prompt is kept. None, and nothing forgotten, if the message cannot fit.
        """
        keep = 1 if self.settings["system"] and self.exchanges else 0
        if not keep:
            least = 1  # what the context must hold besides the message: BOS at the least
        elif len(self.exchanges) > 1:
            least = self.exchanges[1]  # the kept first exchange
        else:
            least = len(self.tokens) + len(self.pending)  # the first exchange is all there is
        if least + turn > self.n_ctx:
            return None
        forgotten = 0
        while len(self.exchanges) > keep and \
                len(self.tokens) + len(self.pending) + turn + self.settings["sample_len"] > self.n_ctx:
            start = self.exchanges[keep]
            stop = self.exchanges[keep + 1] if len(self.exchanges) > keep + 1 else len(self.tokens)
            with uninterrupted():
                llama_cpp.llama_memory_seq_rm(self.memory, 0, start, stop)  # forget the exchange ...
                llama_cpp.llama_memory_seq_add(self.memory, 0, stop, -1, start - stop)  # ... and slide the rest down
                del self.tokens[start:stop]
                if len(self.exchanges) == keep + 1:
                    self.pending = []  # the end of a forgotten reply goes with it
                self.exchanges[keep:] = [at - (stop - start) for at in self.exchanges[keep + 1:]]
            forgotten += 1
        return forgotten

    def answer(self, text: str) -> None:
        """Reply to a message on stdout. Ctrl-C stops the reply; what was said stays said."""
        content = with_system(self.settings["system"], text) if not self.tokens else text
        turn = user_turn(self.vocab, content, self.specials)
        forgotten = self.make_room(len(turn))
        if forgotten is None:
            raise ValueError(f"that message is {len(turn)} tokens and the context holds {self.n_ctx}; send a shorter "
                             "one (or /reset, or start with a larger --ctx)")
        if forgotten:
            note(f"note: forgot the oldest {forgotten} exchange(s) to make room in the {self.n_ctx}-token context",
                 quiet=self.quiet)
        prompt = (tokenize(self.vocab, "", add_bos=True) if not self.tokens else []) + self.pending + turn
        room = min(self.settings["sample_len"], self.n_ctx - len(self.tokens) - len(prompt) + 1)
        llama_cpp.llama_perf_context_reset(self.ctx)  # its counters read max(1, n): a difference would be off by one
        asked = time.perf_counter()
        sampled: list[int] = []
        stamps: list[float] = []
        said: list[str] = []
        try:
            show(generate(self.ctx, prompt=prompt, sampler=self.sampler, stop_ids=self.stop_ids,
                          hidden_ids=set(self.specials.values()), sample_len=room), tokens=sampled, stamps=stamps,
                 text=said)
        except KeyboardInterrupt:
            if not sampled:  # stopped before the reply began: as if the message had not been sent
                with uninterrupted():
                    llama_cpp.llama_memory_seq_rm(self.memory, 0, len(self.tokens), -1)
                note("(stopped before the reply began: that message is forgotten)", quiet=self.quiet)
                return
            note("(stopped)", quiet=self.quiet)
        self.record(prompt=prompt, turn=len(turn), sampled=sampled, message=text, reply="".join(said))
        evaluated = llama_cpp.llama_perf_context(self.ctx).n_p_eval
        waited = stamps[0] - asked if stamps else 0.0  # until the first token
        rate = speed(len(sampled) - 1, stamps[-1] - stamps[0]) if stamps else speed(0, 0)
        self.stats = (f"last reply: {evaluated} prompt tokens evaluated, first token after {waited:.2f} s | "
                      f"{len(sampled)} tokens, {rate} | context {len(self.tokens)} of {self.n_ctx} tokens")

    def record(self, *, prompt: list[int], turn: int, sampled: list[int], message: str, reply: str) -> None:
        """The cache keeps what it evaluated; what it has not yet goes in with the next message."""
        with uninterrupted():
            self.exchanges.append(len(self.tokens) + len(prompt) - turn)
            kept = llama_cpp.llama_memory_seq_pos_max(self.memory, 0) + 1
            ended = bool(sampled) and sampled[-1] in self.stop_ids  # never evaluated; the format's own end follows
            everything = self.tokens + prompt + (sampled[:-1] if ended else sampled)
            self.tokens, self.pending = everything[:kept], everything[kept:] + self.reply_end
            self.replies += sampled
            self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]

    def save(self, path: Path) -> str:
        """/save: the conversation as JSON at `path`, and llama.cpp's state of the cache beside it."""
        state = path.with_name(path.name + ".state")
        with uninterrupted():
            try:
                sha256 = save_state(self.ctx, state, self.tokens)
                record = {"format": SAVED_FORMAT, "settings": self.settings, "messages": self.messages,
                          "context": {"tokens": self.tokens, "exchanges": self.exchanges, "pending": self.pending,
                                      "replies": self.replies[-SAVED_REPLY_TOKENS:]},
                          "state": {"file": state.name, "sha256": sha256, **self.identity}}
                text = json.dumps(record, indent=1, ensure_ascii=False)  # readable messages; token lists on one line:
                write_whole(path, re.sub(r"(?<=\[)[-\d,\s]+(?=\])", lambda m: " ".join(m[0].split()), text) + "\n")
            except OSError as error:
                raise ValueError(f"could not save to {path}: {error.strerror or error}") from None
        return f"saved {len(self.messages) // 2} exchange(s) to {path} (and {state.name})"

    def load(self, path: Path) -> str:
        """/load: continue a saved conversation; its state is restored if it can be trusted, else re-evaluated."""
        saved = read_saved(path, n_vocab=llama_cpp.llama_vocab_n_tokens(self.vocab), n_ctx=self.n_ctx)
        self.settings.update(saved["settings"])
        self.reset()
        context = saved["context"]
        distrust = self.restore(path.with_name(Path(saved["state"]["file"]).name), saved["state"], context["tokens"])
        if distrust:
            note(f"note: not using {saved['state']['file']} ({distrust}); evaluating the conversation again",
                 quiet=self.quiet)
            try:
                evaluate(self.ctx, context["tokens"])
            except KeyboardInterrupt:
                self.reset()
                raise ValueError("loading was stopped; the conversation starts empty") from None
        with uninterrupted():
            self.tokens, self.exchanges, self.pending = context["tokens"], context["exchanges"], context["pending"]
            self.replies, self.messages = context["replies"], saved["messages"]
        self.new_sampler()
        return f"loaded {len(self.messages) // 2} exchange(s) from {path}: {len(self.tokens)} tokens of context"

    def restore(self, state: Path, facts: dict[str, Any], tokens: list[int]) -> str | None:
        """Load llama.cpp's saved state of the cache, if it is the one saved for these tokens; else why not."""
        if any(facts.get(key) != value for key, value in self.identity.items()):
            return "it was saved by another model file, llama.cpp build or context settings"
        return load_state(self.ctx, state, facts.get("sha256"), tokens)


def read_saved(path: Path, *, n_vocab: int, n_ctx: int) -> dict[str, Any]:
    """A /save file, checked whole before anything is changed; ValueError names the part that is wrong."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load {path}: {getattr(error, 'strerror', None) or error}") from None
    wrong = saved_problem(saved, n_vocab=n_vocab)
    if wrong:
        raise ValueError(f"cannot load {path}: {wrong}")
    context = saved["context"]
    held = len(context["tokens"]) + len(context["pending"])
    if held >= n_ctx:
        raise ValueError(f"{path} holds {held} tokens and the context holds {n_ctx}; start with a larger --ctx")
    return {**saved, "settings": {name: saved["settings"][name] for name in CHAT_SETTINGS}}


def saved_problem(saved: Any, *, n_vocab: int) -> str | None:
    """What is wrong with a /save file's contents, naming the field and its value; None if nothing is."""
    if not isinstance(saved, dict):
        return f"it is not a conversation saved by phi_console.py (a JSON {type(saved).__name__}, not an object)"
    if saved.get("format") != SAVED_FORMAT:
        return (f"it is not a conversation saved by phi_console.py "
                f"(format {shorten(saved.get('format'))}, not {SAVED_FORMAT!r})")
    state = saved.get("state")
    if not isinstance(state, dict):
        return f"state must be an object (got {shorten(state)})"
    if not isinstance(state.get("file"), str):
        return f"state.file must name the state file (got {shorten(state.get('file'))})"
    parts = (context_problem(saved.get("context"), n_vocab=n_vocab), messages_problem(saved.get("messages")),
             settings_problem(saved.get("settings")))
    return next((wrong for wrong in parts if wrong), None)


def context_problem(context: Any, *, n_vocab: int) -> str | None:
    """What is wrong with a saved context: tokens this model has, exchanges in order inside it."""
    if not isinstance(context, dict):
        return f"context must be an object (got {shorten(context)})"
    for field in ("tokens", "pending", "replies", "exchanges"):
        if not isinstance(context.get(field), list):
            return f"context.{field} must be a list (got {shorten(context.get(field))})"
    for field in ("tokens", "pending", "replies"):
        for index, token in enumerate(context[field]):
            if not isinstance(token, int) or not 0 <= token < n_vocab:
                return f"context.{field}[{index}] is {shorten(token)}, not a token of this model (0..{n_vocab - 1})"
    length = len(context["tokens"]) + len(context["pending"])
    for index, start in enumerate(context["exchanges"]):
        if not isinstance(start, int) or not 0 < start <= length:
            return f"context.exchanges[{index}] is {shorten(start)}, not a position in the context (1..{length})"
    if context["exchanges"] != sorted(context["exchanges"]):
        return f"context.exchanges must be in order (got {shorten(context['exchanges'])})"
    return None


def messages_problem(messages: Any) -> str | None:
    """What is wrong with a saved list of messages: each has a role and a content, both text."""
    if not isinstance(messages, list):
        return f"messages must be a list (got {shorten(messages)})"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] must be an object (got {shorten(message)})"
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                return f"messages[{index}].{field} must be text (got {shorten(message.get(field))})"
    return None


def settings_problem(settings: Any) -> str | None:
    """What is wrong with saved settings: each chat setting present, and a value /set would take."""
    if not isinstance(settings, dict):
        return f"settings must be an object (got {shorten(settings)})"
    for name in CHAT_SETTINGS:
        if name not in settings:
            return f"settings.{name} is missing"
        wrong = problem(name, settings[name])
        if wrong:
            return f"settings.{name} {wrong}"
    return None


def shorten(value: Any) -> str:
    """A value as an error line shows it: its repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_whole(path: Path, text: str) -> None:
    """Write a file whole or not at all: a crash mid-write leaves the old one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def command(talk: Conversation, line: str) -> str:
    """Run one /command; its answer is for stderr. ValueError: what was wrong with it."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    needs = {"/set": "NAME VALUE", "/save": "FILE", "/load": "FILE"}
    takes_argument = name in needs
    if takes_argument != bool(argument):  # missing, or given to a command that takes none
        raise ValueError(f"{name} takes {needs.get(name, 'nothing')} (got {line!r}); /help lists the commands")
    if name == "/set":
        return talk.change(*argument.partition(" ")[::2])
    actions = {"/show": talk.show, "/reset": talk.reset, "/stats": lambda: talk.stats, "/help": chat_help,
               "/save": lambda: talk.save(Path(argument)), "/load": lambda: talk.load(Path(argument))}
    if name not in actions:
        raise ValueError(f"unknown command {name!r}; /help lists the commands")
    return actions[name]()


def chat_help() -> str:
    lines = [f"  {usage:<17} {meaning}" for usage, meaning in COMMANDS.items()]
    settings = [f"      {name:<15} {SETTINGS[name].meaning} ({SETTINGS[name].must_be})" for name in CHAT_SETTINGS]
    return "\n".join(["commands:", lines[0], *settings, *lines[1:]])


def typed_messages(interactive: bool) -> Iterator[str]:
    """Each message typed at `>>> `, until Ctrl-D or the end of piped input.

    A line of just \"\"\" starts a message of many lines and the next such line ends it. At a terminal, a
    pasted block is one message too (readline's bracketed paste). Ctrl-C at the prompt explains how to leave.
    """
    prompt, more = (">>> ", "... ") if interactive else ("", "")
    while True:
        try:
            line = input(prompt)
            if line.strip() == '"""':
                block = []
                while (line := input(more)).strip() != '"""':
                    block.append(line)
                line = "\n".join(block)
        except EOFError:
            return
        except KeyboardInterrupt:
            sys.stderr.write("\n(to leave, type /bye or press Ctrl-D)\n")
            continue
        if line.strip():
            yield line.strip()


def chat(model: llama_cpp.llama_model_p, *, specials: dict[str, int], n_ctx: int, context: dict[str, Any],
         sampling: dict[str, Any], identity: dict[str, Any], load: str | None, quiet: bool) -> int:
    """Talk at `>>> ` until /bye or the end of input; replies go to stdout, everything else to stderr."""
    ctx, settings = new_context(model, n_ctx=n_ctx, batch=BATCH, **context)
    talk = Conversation(ctx, specials=specials, n_ctx=n_ctx, settings=sampling, identity={**identity, **settings},
                        quiet=quiet)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing, history and bracketed paste for input())
    note("chatting with the model: /help lists commands, /bye or Ctrl-D leaves", quiet=quiet)
    for line in itertools.chain([f"/load {load}"] if load else [], typed_messages(interactive)):
        try:
            if line == "/bye":
                return 0
            if line.startswith("/") and "\n" not in line:
                sys.stderr.write(command(talk, line) + "\n")
            else:
                talk.answer(line)
        except ValueError as wrong:
            sys.stderr.write(f"error: {wrong}\n")
        except KeyboardInterrupt:
            sys.stderr.write("\n(to leave, type /bye or press Ctrl-D)\n")
    return 0


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back while the conversation's record changes, so it always agrees with the cache."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})



# ---------------------------------------------------------------------------------------------
# Main: settings -> download -> load -> prompt -> stream -> report
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)  # 1. settings: flags over constants, every value checked
    prompt = None if settings.chat or settings.load else read_prompt(settings.prompt, default=DEFAULTS["prompt"])
    quiet, verbose = settings.quiet and not settings.verbose, settings.verbose
    repack = repack_weights(settings.repack)  # before the download: --repack is refused on a build it would crash
    if quiet:
        disable_progress_bars()
    if not verbose:
        hub_logging.set_verbosity_error()  # the library's retry and cache chatter

    kept = Path(hub_constants.HF_HOME) / "phi-console"  # what this script keeps beside the hub's cache
    model_path, tokenizer_path = download(  # 2. download: the cache first, the hub only for what it lacks
        [(settings.model_repo, settings.model_file, settings.model_revision),
         (settings.tokenizer_repo, TOKENIZER_FILE, settings.tokenizer_revision)],
        state=kept / "verified.json",
        timeout=hub_constants.HF_HUB_ETAG_TIMEOUT, quiet=quiet)
    specials = read_special_tokens(tokenizer_path)

    started = time.perf_counter()  # 3. load
    errors, buffers = route_llama_log(verbose=verbose)
    model = load_model(model_path, gpu_layers=settings.gpu_layers, log_errors=errors, repack=repack)
    check_model(model, specials, n_ctx=settings.ctx)
    context = dict(threads=settings.threads or physical_cores(),
                   gpu=llama_cpp.llama_supports_gpu_offload() and settings.gpu_layers != 0)
    sampling = {name: getattr(settings, name) for name in CHAT_SETTINGS}
    model_identity = identity(model_path, gpu_layers=settings.gpu_layers, repack=repack)
    # Some weights repacked for this CPU: prompts are faster on the file's own layout (prompt_on_plain_weights)
    repacked = not context["gpu"] and any("CPU_REPACK" in line for line in buffers)
    if settings.chat or settings.load:  # 4-6. prompt, stream and report, once or for every message
        return chat(model, specials=specials, n_ctx=settings.ctx, context=context, sampling=sampling,
                    identity=model_identity, load=settings.load, quiet=quiet)
    return complete(model, prompt=prompt, specials=specials, n_ctx=settings.ctx, context=context, sampling=sampling,
                    identity=model_identity, prompts=kept / "prompts", prompt_cache_gb=settings.prompt_cache_gb,
                    plain_weights=model_path if repacked else None, started=started, quiet=quiet, verbose=verbose)


def run() -> None:
    """Exit codes: 0 done, 1 fault, 2 bad setting, 130 Ctrl-C, 143 SIGTERM; a closed stdout ends quietly."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `| head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    run()
