"""Shared fixtures: crafted Q4_K_M models served by a local hub, and a way to run the real script.

Everything the local hub serves (all models are crafted: every layer zero, so the next token's logits are known;
"puck" = token "▁puck", "goal" = "▁goal"):

| repository                              | files                              | what it is for                        |
|-----------------------------------------|------------------------------------|---------------------------------------|
| microsoft/Phi-3-mini-4k-instruct-gguf   | Phi-3-mini-4k-instruct-q4.gguf     | the default run: puck-goal.gguf       |
| microsoft/Phi-3-mini-4k-instruct        | tokenizer.json                     | Phi-3's special tokens at their ids   |
| phi-console-tests/crafted               | puck-goal.gguf                     | puck logit 10, goal 9, all others 0   |
|                                         | end.gguf                           | <|end|> first: the reply ends at once |
|                                         | placeholder.gguf                   | a special token that is never printed |
|                                         | emoji.gguf                         | byte tokens F0 9F 98 80: U+1F600      |
|                                         | huge-string/huge-array/huge-counts/| GGUFs that lie about their sizes, or  |
|                                         | truncated/wrong-magic.gguf         | are cut short or mislabelled          |
|                                         | not-a-model.gguf                   | text                                  |
| phi-console-tests/mismatched-tokenizer  | tokenizer.json                     | <|end|> at another id than the GGUF's |
| phi-console-tests/broken-tokenizer      | tokenizer.json                     | not JSON                              |
| phi-console-tests/plain-tokenizer       | tokenizer.json                     | no Phi-3 chat tokens                  |
| phi-console-tests/huge-tokenizer        | tokenizer.json                     | 65 MB                                 |
| phi-console-tests/gated                 | Phi-3-mini-4k-instruct-q4.gguf     | refused without a token               |
| phi-console-tests/slow                  | slow.gguf                          | random weights: prompts take seconds  |
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from local_hub import Hub
from phi3_models import (SPECIAL_TOKENS, byte_token, hostile_ggufs, quantize_q4_k_m, token_id, tokenizer_json,
                         write_gguf)

SCRIPT = Path(__file__).resolve().parent.parent / "phi_console.py"
# The Python that runs the script under test: the tests' own, or another (PHI_CONSOLE_PYTHON=.venv39/bin/python)
# to check the script on a Python the tests themselves cannot run on, such as macOS's own 3.9.
PYTHON = os.environ.get("PHI_CONSOLE_PYTHON", sys.executable)
MODEL_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"  # the script's defaults, served locally
MODEL_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
TOKENIZER_REPO = "microsoft/Phi-3-mini-4k-instruct"
CRAFTED = "phi-console-tests/crafted"  # every crafted model, by file name
RANDOM = "phi-console-tests/random"  # Q4_K_M models with random weights: every reply depends on every number cached
PATIENCE = 600  # seconds a test waits for a run before giving up: room for a machine several times slower than ours
PUCK, GOAL = token_id("▁puck"), token_id("▁goal")
END, PLACEHOLDER = SPECIAL_TOKENS["<|end|>"], SPECIAL_TOKENS["<|placeholder1|>"]

CRAFTED_LOGITS = {
    "puck-goal.gguf": {PUCK: 10.0, GOAL: 9.0},  # greedy says "puck"; a penalty > 10/9 turns it to "goal"
    "end.gguf": {END: 10.0},  # the likeliest token ends the reply at once
    "placeholder.gguf": {PLACEHOLDER: 10.0},  # a special token that must never be printed
    "emoji.gguf": {byte_token(0xF0): 10.0, byte_token(0x9F): 9.0, byte_token(0x98): 8.0, byte_token(0x80): 7.0},
}

# Ids a tokenizer.json can give <|end|> that are no token of the model: each must be one error line, never a crash
HOSTILE_IDS = {"negative": -5, "a float": 1e3, "a boolean": True, "text": "5", "past the vocabulary": 32064}

NESTED_JSON = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested deeper than a recursive parser goes

# The two baselines most tests compare against, both greedy (temperature 0) on puck-goal.gguf, 3 tokens:
PENALISED = b"puck goal puck\n"  # the script's default penalty 1.2 > 10/9: once said, "puck" loses to "goal"
UNPENALISED = b"puck puck puck\n"  # penalty 1.0 (what crafted() sets unless told otherwise)


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Crafted models, written as F32 and quantized to Q4_K_M like the real Phi-3 file."""
    folder = tmp_path_factory.mktemp("models")
    built = {}
    for name, logits in CRAFTED_LOGITS.items():
        f32 = write_gguf(folder / f"{name}.f32", logits=logits)
        built[name] = quantize_q4_k_m(f32, folder / name).read_bytes()
        f32.unlink()
    return built


@pytest.fixture(scope="session")
def model_file(models: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A crafted model as a file of its own, by name: for llama.cpp's own tokenizer to read (reference.py)."""
    folder = tmp_path_factory.mktemp("model_files")

    def path(name: str) -> Path:
        if not (folder / name).exists():
            (folder / name).write_bytes(models[name])
        return folder / name

    return path


@pytest.fixture(scope="session")
def hub(models: dict[str, bytes]) -> Hub:
    hub = Hub()
    hub.add(MODEL_REPO, {MODEL_FILE: models["puck-goal.gguf"], "README.md": b"# crafted\n"})
    hub.add(TOKENIZER_REPO, {"tokenizer.json": tokenizer_json()})
    hub.add(CRAFTED, {**models, **hostile_ggufs(models["puck-goal.gguf"]),
                      "not-a-model.gguf": b"this is not a GGUF file at all\n" * 1000})
    swapped = {**SPECIAL_TOKENS, "<|end|>": 32008, "<|placeholder5|>": 32007}
    hub.add("phi-console-tests/mismatched-tokenizer", {"tokenizer.json": tokenizer_json(swapped)})
    hub.add("phi-console-tests/broken-tokenizer", {"tokenizer.json": b"{ not json"})
    hub.add("phi-console-tests/plain-tokenizer", {"tokenizer.json": tokenizer_json({"<unk>": 0, "<s>": 1, "</s>": 2})})
    hub.add("phi-console-tests/huge-tokenizer", {"tokenizer.json": b"{" + b" " * (65 * 2**20) + b"}"})
    hub.add("phi-console-tests/nested-tokenizer", {"tokenizer.json": NESTED_JSON})
    for case, value in HOSTILE_IDS.items():
        hub.add(hostile_tokenizer(case), {"tokenizer.json": tokenizer_with_end_id(value)})
    hub.add("phi-console-tests/gated", {MODEL_FILE: models["puck-goal.gguf"]}, gated=True)
    hub.start()
    yield hub
    hub.stop()


def hostile_tokenizer(case: str) -> str:
    """The repo whose tokenizer.json gives <|end|> the id HOSTILE_IDS[case]."""
    return "phi-console-tests/end-id-" + case.replace(" ", "-")


def tokenizer_with_end_id(value: object) -> bytes:
    data = json.loads(tokenizer_json())
    for token in data["added_tokens"]:
        if token["content"] == "<|end|>":
            token["id"] = value
    return json.dumps(data).encode()


@pytest.fixture(autouse=True)
def fresh_log(request: pytest.FixtureRequest) -> None:
    """Each test sees only its own requests in hub.requests and hub.authorization."""
    if "hub" in request.fixturenames:
        hub = request.getfixturevalue("hub")
        hub.requests.clear()
        hub.authorization.clear()


@pytest.fixture(scope="session")
def warm_home(tmp_path_factory: pytest.TempPathFactory, hub: Hub) -> Path:
    """An HF_HOME that already holds every crafted model, so behaviour tests skip the download."""
    home = tmp_path_factory.mktemp("hf_home")
    for name in CRAFTED_LOGITS:
        result = console("--model-repo", CRAFTED, "--model-file", name, "--sample-len", "1", hub=hub, home=home)
        assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="session")
def startup(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Seconds this machine takes to start the script and import its libraries (its --help). A test that times a run
    bounds it by a few of these plus the wait it is about, so that the bound holds on a slower machine too."""
    started = time.monotonic()
    assert console("--help", hub=None, home=tmp_path_factory.mktemp("startup")).returncode == 0
    return time.monotonic() - started


def console(*args: str, hub: Hub | None, home: Path, env: dict[str, str] | None = None,
            stdin: bytes | None = None, script: Path = SCRIPT, timeout: float = PATIENCE,
            max_file_size: int | None = None) -> Result:
    """Run the real phi_console.py the way a user does and capture what they would see."""
    environment = environment_for(hub, home)
    environment.update(env or {})
    environment = {k: v for k, v in environment.items() if v is not None}
    completed = subprocess.run([PYTHON, str(script), *one_thread(args)], input=stdin,
                               stdin=None if stdin is not None else subprocess.DEVNULL,
                               capture_output=True, env=environment, timeout=timeout,
                               preexec_fn=lambda: as_a_user(max_file_size=max_file_size))
    return Result(completed.returncode, completed.stdout, completed.stderr.decode("utf-8", "replace"))


def one_thread(args: tuple[str, ...]) -> list[str]:
    """A run's flags with `--threads 1` unless the test chose a count: tests run two scripts at once on two cores, and
    threads that outnumber the cores spin in llama.cpp's barrier (a run took 12 s instead of 1)."""
    return [*args, "--threads", "1"] if "--threads" not in args else list(args)


def start(*args: str, hub: Hub | None, home: Path, stdin: int = subprocess.DEVNULL) -> subprocess.Popen:
    """Start the real script in the background, as console() runs it, for tests that signal it mid-run."""
    return subprocess.Popen([PYTHON, str(SCRIPT), *one_thread(args)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment_for(hub, home), preexec_fn=as_a_user)


def storm(process: subprocess.Popen, until: threading.Event) -> threading.Thread:
    """Ctrl-C every 3 ms, as from a hand that will not stop, until `until` is set or the process ends."""

    def press() -> None:
        while not until.is_set() and process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.003)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    return thread


class Streams:
    """What a running process writes to stdout and stderr, read as it comes so that no pipe fills up."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.out, self.err = process, bytearray(), bytearray()
        self.readers = [threading.Thread(target=self.read, args=(stream, into), daemon=True)
                        for stream, into in ((process.stdout, self.out), (process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def read(stream, into: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            into.extend(chunk)

    def wait_for(self, what: bytes, where: str = "err") -> None:
        deadline = time.monotonic() + PATIENCE
        while what not in getattr(self, where):
            assert time.monotonic() < deadline and self.process.poll() is None, bytes(self.err[-2000:])
            time.sleep(0.02)

    def close(self) -> tuple[str, str]:
        for reader in self.readers:
            reader.join(timeout=PATIENCE)
        return self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace")


def as_a_user(*, max_file_size: int | None = None) -> None:
    """In the child before exec: Ctrl-C, SIGTERM and SIGHUP act as they do for someone at a terminal.

    Whoever started pytest may ignore SIGINT (a background job does, and children inherit it); the script
    rightly keeps an inherited ignore, so a test that presses Ctrl-C must restore it. max_file_size caps
    every file the script writes (RLIMIT_FSIZE), as a disk that fills up mid-download does.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a closed terminal's
    if max_file_size is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))


def the_error(result: Result, code: int = 1) -> str:
    """The one `error:` line of a run that failed as expected: nothing on stdout, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stdout == b""
    return errors[0]


def environment_for(hub: Hub | None, home: Path) -> dict[str, str]:
    """The environment of a user whose hub is the local one and whose cache is `home`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    environment.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                       HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9")
    return environment


def crafted(model: str = "puck-goal.gguf", **settings: object) -> list[str]:
    """Flags that pick a crafted model, with every sampling setting the test does not name turned off.

    A setting given as None is left out, so the script's own default (or stdin, for the prompt) applies.
    """
    chosen = {"temperature": 0, "repeat_penalty": 1.0, "sample_len": 8, "prompt": "say something", **settings}
    return ["--model-repo", CRAFTED, "--model-file", model, *flags(**chosen)]


def flags(**settings: object) -> list[str]:
    """`--top-p 0.5` for top_p=0.5, `--repack` / `--no-repack` for True / False: each setting as its flag; one
    given as None is left out."""
    switches = [f"--{'' if value else 'no-'}{name.replace('_', '-')}" for name, value in settings.items()
                if isinstance(value, bool)]
    return switches + [x for name, value in settings.items() if value is not None and not isinstance(value, bool)
                       for x in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory, hub: Hub) -> list[str]:
    """Flags for a model whose prompt evaluation takes seconds per 512-token batch (random weights, F16).

    On one core of a 2-core EPYC a 512-token batch takes about 4 s, so a Ctrl-C that waited for its batch to end
    would take seconds.
    """
    path = write_gguf(tmp_path_factory.mktemp("slow") / "slow.gguf", logits={}, n_embd=1024, n_ff=4096, n_layer=12,
                      n_head=8, random_weights=True, dtype=np.float16)
    hub.add("phi-console-tests/slow", {"slow.gguf": path.read_bytes()})
    return ["--model-repo", "phi-console-tests/slow", "--model-file", "slow.gguf", "--threads", "1"]


@pytest.fixture(scope="session")
def random_models(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two Q4_K_M models with random weights, wide enough (1024) to take the kernels the real file takes, and the
    first as F16 (f16.gguf), whose weights llama.cpp never repacks."""
    folder = tmp_path_factory.mktemp("random")
    served = {}
    for name, layers in (("two-layers.gguf", 2), ("three-layers.gguf", 3)):
        f16 = write_gguf(folder / f"{name}.f16", logits={}, n_embd=1024, n_ff=2048, n_head=8, n_layer=layers,
                         random_weights=True, dtype=np.float16)
        served[name] = quantize_q4_k_m(f16, folder / name).read_bytes()
        served.setdefault("f16.gguf", f16.read_bytes())
    hub.add(RANDOM, served)


@pytest.fixture(scope="session")
def phi3_vocab_model(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Flags for a small Q4_K_M model with random weights and Phi-3's own vocabulary (llama.cpp's vocabulary-only
    models/ggml-vocab-phi-3.gguf, kept in tests/): its multi-character pieces ("{\"", "\":", "<|") are what a
    grammar meets in the real model, which the crafted vocabulary lacks."""
    folder = tmp_path_factory.mktemp("phi3_vocab")
    f16 = write_gguf(folder / "phi3-vocab.f16", logits={}, n_embd=256, n_ff=512, n_head=4, n_layer=2,
                     random_weights=True, dtype=np.float16, vocab=Path(__file__).parent / "ggml-vocab-phi-3.gguf")
    hub.add("phi-console-tests/phi3-vocab", {"phi3-vocab.gguf": quantize_q4_k_m(f16, folder / "m.gguf").read_bytes()})
    return ["--model-repo", "phi-console-tests/phi3-vocab", "--model-file", "phi3-vocab.gguf"]


LONG_PROMPT = " ".join(["hello world"] * 750)  # about 1500 tokens: three batches of about 4 s on the slow model


@pytest.fixture(scope="module")
def slow_home(hub: Hub, slow_model: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME that already holds the slow model; one per test module, so no module sees another's prompts."""
    home = tmp_path_factory.mktemp("slow_home")
    assert console(*slow_model, "--sample-len", "1", hub=hub, home=home).returncode == 0  # downloaded once
    return home
