#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = [
#     "llama-cpp-python==0.3.36",
#     "huggingface_hub==2.4.0; python_version >= '3.10'",
#     "huggingface_hub==1.8.0; python_version < '3.10'",
#     "llguidance==1.9.1; python_version >= '3.10'",
#     "llguidance==1.3.0; python_version < '3.10'",
# ]
# ///
"""Stream a completion from Microsoft's Phi-3-mini, on your own machine.

    python phi_console.py
    python phi_console.py -p "Why is the sky blue?" --temperature 0
    echo "Explain a GGUF file in two sentences" | python phi_console.py --seed 7

The first run downloads the model (about 2.4 GB) and its tokenizer into the Hugging Face cache; later runs start
from the cache without touching the network. Edit the settings below and rerun, or pass the same settings as flags
(--help lists them). Only the completion goes to stdout.

The program, a whole default run in the order the work happens; it ends with main():
  Settings      the constants to edit, and SETTINGS: each one's type, check and meaning
  Command line  flags over constants, every value checked before anything slow
  Load          llama.cpp maps the weights; the model and tokenizer must agree on the chat tokens
  Prompt        Phi-3's chat format, evaluated in batches that Ctrl-C can stop
  Stream        the sampler, Reply (one reply as it is made), generate() (the token loop), complete()
  Main          main(): settings -> download -> load -> prompt -> stream -> report; ready_run(): steps 2-3
Then the machinery that makes it robust and fast, each part entered by one call from the program:
  Weight layouts        load_layouts(): prompts and generation each on the weights' layout measured faster here
  Download (machinery)  fetch_files(): every file checked against the hub's hash, a stopped download resumed
  Saved prompts         reusing_prompt(): a rerun restores its evaluated prompt instead of evaluating it again
  Chat                  chat(): a conversation kept in the KV cache; /save and /load (read_saved() checks --load)
  Answers               constraint(), sample(), StopStrings: replies that fit a schema or grammar, stop strings
  Many prompts          answer_all(): --prompts read as answered, PARALLEL at a time as sequences of one batch
  Helpers               Ctrl-C noted until it is safe to act, progress bars, files written whole, run()
"""
from __future__ import annotations

try:  # from the first line on, Ctrl-C, SIGTERM and SIGHUP end the script at once (nothing is under way yet, and an
    import os  # exception raised instead could be lost in an import's own cleanup), until run() takes them over
    import signal
    import sys

    ENDINGS = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))  # SIGHUP: a closed terminal
    for _signum in ENDINGS if __name__ == "__main__" else ():
        if signal.getsignal(_signum) is not signal.SIG_IGN:  # an inherited ignore (a background job's) is kept
            signal.signal(_signum, lambda signum, frame: os._exit(128 + signum))

    import argparse
    import codecs
    import collections
    import contextlib
    import ctypes
    import dataclasses
    import errno
    import functools
    import hashlib
    import hmac
    import itertools
    import json
    import math
    import random
    import re
    import reprlib
    import shutil
    import stat
    import tempfile
    import threading
    import time
    import traceback
    import urllib.parse
    import zlib
    from pathlib import Path
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, BinaryIO, NamedTuple, NoReturn

    import llama_cpp
    import llguidance  # JSON schemas, compiled and enforced as llama.cpp itself does when built with it
    import llguidance.llamacpp
    import numpy as np  # llama-cpp-python's own dependency: the token arrays a grammar is applied to
    from huggingface_hub import constants as hub_constants, errors as hub_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers, disable_progress_bars, tqdm as hub_tqdm
    from huggingface_hub.utils import logging as hub_logging, validate_repo_id
    try:
        from huggingface_hub.utils import httpx as hub_httpx  # huggingface_hub 2.x's HTTP client (httpx2)
    except ImportError:  # huggingface_hub 1.x, the last for Python 3.9 (macOS's own python3), uses httpx itself
        import httpx as hub_httpx
except ImportError as missing:
    sys.exit(f"error: {missing.name} is not installed; run: pip install -r requirements.txt")
except KeyboardInterrupt:  # Ctrl-C before the handler above was set
    raise SystemExit(130) from None

# --- Settings: edit these and rerun, or pass the same setting as a flag (--top-p for TOP_P; --help lists them) --------
PROMPT = "Write a haiku about ice hockey"  # your words; Phi-3's chat format is added around them
SYSTEM = None  # None, or instructions the model reads before your first message ("Answer in French.")
TEMPERATURE = 1.0  # 0, or 1e-30 .. 1e30; 0 = greedy (always the likeliest token), higher = more random
TOP_P = None  # None = off; else 1e-30 <= p <= 1: draw only from the likeliest tokens whose probabilities sum to p
REPEAT_PENALTY = 1.2  # 1e-30 .. 1e30; 1.0 = off, > 1.0 makes tokens the reply has already used less likely
REPEAT_LAST_N = 64  # 0 .. 65536; how many of the reply's latest tokens the penalty looks at, 0 = none
SAMPLE_LEN = 100  # >= 1; the most tokens to generate
STOP = []  # texts that end the reply just before the first of them; no byte of one is ever printed
JSON_SCHEMA = None  # None, or a JSON Schema (its text, or a file that holds it): the reply is JSON that fits it
GRAMMAR = None  # None, or a GBNF grammar file (llama.cpp's format): the reply follows it
SEED = None  # None = a new random seed each run (printed at the end); 0 .. 4294967294 repeats a run exactly
CHAT = False  # True = a conversation at a `>>> ` prompt instead of one completion
PROMPTS = None  # None, or a file of prompts ("-" = stdin), one a line or JSONL: one JSON line out for each
PARALLEL = 4  # 1 .. 64 prompts of PROMPTS answered at once, as sequences of one batch (4 measured fastest here)
CTX = 4096  # >= 1 tokens of context (prompt + reply, or the whole chat); at most the model's own 4096
THREADS = None  # 1 .. 1024 CPU threads; None = the number of physical cores
GPU_LAYERS = None  # layers to offload to a GPU, -1 = all; None = all when this build can offload, else 0
REPACK = None  # True = llama.cpp repacks the weights for this CPU at each load; None = each phase as measured here
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


TINY, HUGE = 1e-30, 1e30  # the ends of the float ranges: llama.cpp's 32-bit floats hold them, not 0 or infinity
HUB_URL = re.compile(r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([\w.-]+/[\w.-]+)")  # a model page, pasted
# Each setting once. Its name spells the constant (TOP_P), the flag (--top-p) and chat's `/set top_p`.
SETTINGS: dict[str, Setting] = {
    "prompt": Setting(str, False, lambda s: s.strip() != "", "non-empty text", "your words; '-' or a pipe reads stdin"),
    "system": Setting(str, True, lambda s: s.strip() != "", "non-empty text, or none",
                      "instructions the model reads before your first message"),
    "temperature": Setting(float, False, lambda t: t == 0 or TINY <= t <= HUGE, "0, or a number in 1e-30..1e30",
                           "0 = greedy, higher = more random"),
    "top_p": Setting(float, True, lambda p: TINY <= p <= 1, "a number in 1e-30..1, or none",
                     "draw only from the likeliest tokens whose probabilities add up to P; none = off"),
    "repeat_penalty": Setting(float, False, lambda x: TINY <= x <= HUGE, "a number in 1e-30..1e30",
                              "1.0 = off; above 1, tokens the reply has already used become less likely"),
    "repeat_last_n": Setting(int, False, lambda n: 0 <= n <= 65536, "an integer in 0..65536",
                             "how many of the reply's latest tokens the penalty looks at; 0 = none"),
    "sample_len": Setting(int, False, lambda n: n >= 1, "an integer >= 1", "the most tokens to generate"),
    "stop": Setting(list, False, lambda texts: all(isinstance(t, str) and t != "" for t in texts), "non-empty "
                    "texts: one, a JSON list, or none", "the reply ends just before any; repeat --stop for more"),
    "json_schema": Setting(str, True, lambda s: s.strip() != "", "JSON or a file that holds it, or none",
                           "the reply is JSON that fits this JSON Schema (its text, or a file's name); none = off"),
    "grammar": Setting(str, True, lambda s: s.strip() != "", "a file, or none", "the reply follows this file's GBNF "
                       "grammar (llama.cpp's format); none = off"),
    "seed": Setting(int, True, lambda n: 0 <= n <= MAX_SEED, "an integer in 0..4294967294, or none",
                    "the same seed repeats a run exactly; none = random, printed at the end"),
    "chat": Setting(bool, False, lambda b: True, "True or False", "talk at a '>>> ' prompt (/help there)"),
    "prompts": Setting(str, True, lambda s: s.strip() != "", "a file, '-' for stdin, or none", "many prompts: one a "
                       "line, or JSON objects with a \"prompt\" (and any chat setting); one JSON line out for each"),
    "parallel": Setting(int, False, lambda n: 1 <= n <= 64, "an integer in 1..64",
                        "how many of --prompts are answered at once, as sequences of one batch"),
    "ctx": Setting(int, False, lambda n: n >= 1, "an integer >= 1", "tokens of context: prompt + reply, or the chat"),
    "threads": Setting(int, True, lambda n: 1 <= n <= 1024, "1..1024, or none", "CPU threads; none = physical cores"),
    "gpu_layers": Setting(int, True, lambda n: n >= -1, "an integer >= -1, or none",
                          "layers offloaded to a GPU, -1 = all; none = all if this build can offload"),
    "repack": Setting(bool, True, lambda b: True, "True, False or none",
                      "let llama.cpp repack the weights for this CPU at each load (faster on some CPUs, more memory); "
                      "none = each phase on the layout measured faster here (GPU: repacked; AMX kernel: never)"),
    "prompt_cache_gb": Setting(float, False, lambda g: g >= 0, "a number >= 0",
                               "disk for recent runs' evaluated prompts, so that a rerun starts at once; 0 = off"),
    "model_repo": Setting(str, False, lambda s: repo_id_ok(s), "a repo: org/name", "Hugging Face repo of the weights"),
    "model_file": Setting(str, False, lambda s: in_repo_ok(s), "a file's path in the repo, such as name.gguf",
                          "the GGUF file in that repo"),
    "model_revision": Setting(str, False, lambda s: in_repo_ok(s, ref=True), "a branch, tag or commit",
                              "revision of the model repo; a commit pins the exact bytes"),
    "tokenizer_repo": Setting(str, False, lambda s: repo_id_ok(s), "a repo: org/name", "repo of the tokenizer.json"),
    "tokenizer_revision": Setting(str, False, lambda s: in_repo_ok(s, ref=True), "a branch, tag or commit",
                                  "revision of the tokenizer's repo"),
}
DEFAULTS = {name: globals()[name.upper()] for name in SETTINGS}  # each setting's constant, by its name
CHAT_SETTINGS = ("system", "temperature", "top_p", "repeat_penalty", "repeat_last_n", "sample_len", "seed", "stop",
                 "json_schema", "grammar")

TOKENIZER_MAX_BYTES = 64 * 2**20  # Phi-3's is a few MB; a bigger file is refused rather than parsed into memory
CHAT_TOKENS = ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>")  # tokens the chat format uses
STOP_TOKENS = ("<|end|>", "<|endoftext|>")  # a reply ends at either; the GGUF declares only the second
MAX_SEED = 2**32 - 2  # llama.cpp reserves 2**32 - 1 for "pick a random seed"
BATCH = 512  # prompt tokens evaluated per llama_decode call (at most the context's size)
C_WHITESPACE = " \t\n\v\f\r"  # what an rstrip token drops after it (C's isspace, which llama.cpp's rstrip uses)
CACHE_STEP = 256  # llama.cpp rounds a context's size up to a multiple of this many tokens
DECODE_ABORTED = 2  # llama_decode's status when the abort callback stopped it
GGML_LOG_LEVEL_ERROR = 4  # the level of llama.cpp's log lines that say why something failed (3 is a warning)
TOKEN_MAX_BYTES = 64  # the most text one token stands for: SentencePiece pieces are at most 16 characters of 4 bytes


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one `error:` line on stderr and exit; expected faults never show a traceback."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def note(message: str, *, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# --- Command line: settings from flags, checked before anything slow happens ------------------------------------------
def parse_settings(argv: list[str] | None) -> argparse.Namespace:
    """One flag per setting, each defaulting to its constant; a bad value is refused, never clamped."""
    parser = argparse.ArgumentParser(description="Stream a completion from Phi-3-mini (llama.cpp on your CPU or GPU). "
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
                                help=shown, action="extend" if setting.kind is list else "store")
    parser.add_argument("--load", metavar="FILE", help="continue a conversation saved with /save (implies --chat)")
    parser.add_argument("-q", "--quiet", action="store_true", help="stderr shows errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show llama.cpp's own log on stderr")
    given = vars(parser.parse_args(argv))
    for name in SETTINGS.keys() - given.keys() - {"prompt"}:  # the prompt's default waits for a possible pipe
        if wrong := problem(name, DEFAULTS[name]):
            fail(f"{name.upper()} {wrong}; fix it at the top of phi_console.py", code=2)
    settings = argparse.Namespace(**{**DEFAULTS, "prompt": None, **given})
    reads_stdin = settings.chat or settings.load is not None or "-" in (settings.prompt, settings.prompts)
    if reads_stdin and sys.stdin is None:
        fail("stdin is closed, and --chat and -p - read from it; pass the prompt with -p TEXT", code=2)
    route_llama_log(verbose=settings.verbose)  # from here on, llama.cpp's log shows only with --verbose
    if settings.load is not None:  # a file a flag names is a setting too: checked now, not after the download
        try:
            settings.load = read_saved(Path(settings.load), n_ctx=settings.ctx)
        except ValueError as wrong:
            fail(f"--load: {wrong}", code=2)
        settings.load["replaced"] = flags_over_saved(settings.load["settings"], given)
    check_grammar(None, vars(settings))  # parsed now: a GrammarError ends in run()
    settings.prompts_file = open_prompts(settings) if settings.prompts is not None else None  # before anything slow
    return settings


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
    url = HUB_URL.match(value) if isinstance(value, str) else None  # a link to the model's page, pasted
    hint = f"; that link's repo is {url[1]}" if url else ""
    return None if ok else f"must be {setting.must_be} (got {shorten(value, quoted=True)}){hint}"


def read_value(name: str, text: str) -> object:
    """A setting typed as text (a flag, or /set in chat) as the value it stands for; 'none' is None."""
    setting = SETTINGS[name]
    if name != "grammar":  # an argument's bytes that are not UTF-8 (Linux allows them) as U+FFFD; a file name as is
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if setting.none and text.strip().lower() == "none":
        value: object = None
    elif setting.kind is str:
        value = text
    elif setting.kind is list:
        value = read_texts(text)
    else:
        try:
            value = setting.kind(text)
        except ValueError:
            value = text  # not a number: problem() says what it must be
    if wrong := problem(name, value):
        raise argparse.ArgumentTypeError(wrong.replace(repr(value), repr(text)))
    return value


def read_prompt(prompt: str | None, *, n_ctx: int) -> str:
    """`-` reads stdin; so does a pipe or a file on stdin without -p; with -p TEXT, it is a document TEXT is about."""
    if prompt == "-" or stdin_is_piped():
        document = read_stdin(n_ctx=n_ctx)
        # The document before the instruction: another instruction over it reuses its evaluated start (Saved prompts)
        prompt = document if prompt in ("-", None) else f"{document}\n\n{prompt}".lstrip()
    prompt = DEFAULTS["prompt"] if prompt is None else prompt
    if wrong := problem("prompt", prompt):
        wrong = f"is empty (got {prompt!r})" if isinstance(prompt, str) else wrong
        fail(f"the prompt {wrong}; pass --prompt, pipe text in, or set PROMPT", code=2)
    return prompt  # type: ignore[return-value]


# --- Load: llama.cpp maps the GGUF into memory; its log stays quiet unless --verbose ----------------------------------
def repack_weights(setting: bool | None, *, gpu: bool) -> bool | None:
    """The setting (None: measured, in Weight layouts), but True on a GPU (llama.cpp's own), never with AMX."""
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        # ggml's AMX kernel (a default build has it) crashes on K-quant weights, which reach it only when repacked
        if setting:
            fail("--repack: this llama.cpp build has the AMX kernel, which crashes on K-quant weights; "
                 "build it without (README: Troubleshooting)", code=2)
        return False
    return True if setting is None and gpu else setting


def load_model(path: str, *, gpu_layers: int | None, repack: bool) -> llama_cpp.llama_model_p:
    """The model, its weights mapped from the file; with repack, llama.cpp's choice of layout for this CPU."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    if gpu_layers is None:
        gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0  # -1 = every layer
    params.n_gpu_layers = gpu_layers
    params.use_extra_bufts = repack  # False: every weight used in place, as the file has it
    LlamaLog.errors.clear()  # a failed load names its own reason, not an earlier one
    # Mapped (llama.cpp's default), not read: a rerun starts from the page cache, without a second copy of the file
    with progress("loading", total=100, unit="%") as bar:

        def loaded(fraction: float, data: ctypes.c_void_p) -> bool:  # llama.cpp reports as it reads; False stops it
            bar.update(int(fraction * 100) - bar.n)
            return not Signals.noted

        params.progress_callback = llama_cpp.llama_progress_callback(loaded)
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    if model and Signals.noted:
        llama_cpp.llama_model_free(model)
    raise_noted()
    if not model:
        reason = LlamaLog.errors[0].split(": ", 1)[-1] if LlamaLog.errors else "llama.cpp could not read it"
        fail(f"{path} is not a loadable GGUF model ({reason}); delete it to download it again")
    return model


def new_context(model: llama_cpp.llama_model_p, *, n_ctx: int, threads: int, gpu: bool, sequences: int = 1,
                advice: str = "try a smaller --ctx") -> tuple[llama_cpp.llama_context_p, dict[str, Any]]:
    """A context of n_ctx tokens (for `sequences` at once, in one pool), and the settings of it that change the
    numbers it computes: the cache's size as llama.cpp made it (rounded up to 256), batches, threads, attention."""
    params = llama_cpp.llama_context_default_params()
    # Flash attention stays off on the CPU: it slows generation once the context holds a few hundred tokens, and
    # switching it by size would make a longer --sample-len change the reply. On a GPU, llama.cpp's choice stands.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if gpu else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    # The size rounded up as llama.cpp rounds it, but first: it limits the batch to the size asked for, and every
    # size within one step must make the same context, so that a rerun with another --sample-len reuses its prompt
    params.n_ctx = math.ceil(n_ctx / CACHE_STEP) * CACHE_STEP
    params.n_batch = params.n_ubatch = min(params.n_ctx, BATCH)
    params.n_threads = params.n_threads_batch = threads
    params.no_perf, params.n_seq_max, params.kv_unified = False, sequences, True
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        fail(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?); {advice}")
    return ctx, {"n_ctx": llama_cpp.llama_n_ctx(ctx), "batch": llama_cpp.llama_n_batch(ctx), "threads": threads,
                 "flash_attn": params.flash_attn_type}


# --- Prompt: Phi-3's chat format, tokenized once and evaluated in batches ---------------------------------------------
def tokenize(vocab: llama_cpp.llama_vocab_p, text: str, *, add_bos: bool) -> list[int]:
    """Tokenize plain text; special-token text typed by the user stays plain text."""
    data = text.encode("utf-8")
    size = len(data) + 2  # SPM rarely makes more tokens than bytes, plus BOS and the space prefix
    while True:
        tokens = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, size, add_bos, False)
        if n >= 0:
            return list(tokens[:n])
        size = -n  # too small: llama.cpp says how many tokens it needs


def user_turn(vocab: llama_cpp.llama_vocab_p, text: str, specials: dict[str, int], *, system: str | None) -> list[int]:
    """Phi-3's `<|user|>\\n{text}<|end|>\\n<|assistant|>\\n` as its own tokenizer gives it; `system` opens the text
    (Phi-3 has no such role). Its chat tokens are rstrip tokens: the whitespace right after one is dropped, so the
    template's newlines never become tokens (llama.cpp follows the same rule), and the text gets SPM's leading `▁`."""
    text = f"{system}\n\n{text}" if system else text
    return [specials["<|user|>"], *tokenize(vocab, text.lstrip(C_WHITESPACE), add_bos=False), specials["<|end|>"],
            specials["<|assistant|>"]]


def evaluate(ctx: llama_cpp.llama_context_p, tokens: list[int]) -> None:
    """Feed tokens to the model a batch at a time; a noted Ctrl-C stops it between graph nodes, whole batches kept."""
    batch, memory = llama_cpp.llama_n_batch(ctx), llama_cpp.llama_get_memory(ctx)
    with prompt_bar(ctx, total=len(tokens)) as next_batch:
        for start in range(0, len(tokens), batch):
            n_past = cached_tokens(ctx)
            chunk = tokens[start : start + batch]
            next_batch(start, len(chunk))
            array = token_array(chunk)  # held in a name: the batch only points at it
            status = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(chunk)))
            if status == DECODE_ABORTED:  # Ctrl-C: drop whatever of this batch reached the cache
                llama_cpp.llama_memory_seq_rm(memory, 0, n_past, -1)
                break
            if status != 0:
                fail("llama.cpp failed to evaluate the prompt")
    raise_noted()


# --- Stream: sample in llama.cpp, yield text as soon as it is whole UTF-8 ---------------------------------------------
def make_sampler(vocab: llama_cpp.llama_vocab_p, settings: dict[str, Any], *, seed: int,
                 window: list[int]) -> llama_cpp.llama_sampler_p:
    """llama.cpp's sampler chain, in four steps over the next token's logits:
    1. repeat penalty: divides the logits of tokens among the reply's last REPEAT_LAST_N (`window` starts it off);
    2. temperature: divides every logit by it, so the probabilities flatten (> 1) or sharpen (< 1); 0 is greedy;
    3. top-p: keeps the likeliest tokens whose probabilities add up to P (with temperature 0 nothing is left to cut);
    4. draw: one token at random by those probabilities, from `seed`.
    The penalty comes first because it reshapes the logits that temperature and top-p then read."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = functools.partial(llama_cpp.llama_sampler_chain_add, chain)
    add(llama_cpp.llama_sampler_init_penalties(llama_cpp.llama_vocab_n_tokens(vocab), settings["repeat_last_n"],
                                               settings["repeat_penalty"], 0.0, 0.0))
    if settings["temperature"] == 0:
        add(llama_cpp.llama_sampler_init_greedy())
    else:
        add(llama_cpp.llama_sampler_init_temp(settings["temperature"]))
        if settings["top_p"] is not None:
            add(llama_cpp.llama_sampler_init_top_p(settings["top_p"], 1))
        add(llama_cpp.llama_sampler_init_dist(seed))
    for token in window[-settings["repeat_last_n"]:] if settings["repeat_last_n"] else []:
        llama_cpp.llama_sampler_accept(chain, token)
    return chain


def draw_seed(seed: int | None) -> int:
    """The seed itself, or a new random one in its place, to be printed so that the run can be repeated."""
    return random.SystemRandom().randint(0, MAX_SEED) if seed is None else seed


def token_bytes(vocab: llama_cpp.llama_vocab_p, token: int, *, first: bool = False, special: bool = False) -> bytes:
    """The bytes a token stands for (special tokens as their text only if asked); a reply's first token loses the
    space SPM puts before words."""
    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        if first:  # detokenize applies the vocabulary's own rule for that space
            n = llama_cpp.llama_detokenize(vocab, token_array([token]), 1, buffer, size, False, special)
        else:
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, special)
        if n >= 0:
            return buffer.raw[:n]
        size = -n  # too small: llama.cpp says how many bytes it needs


class Reply:
    """One reply as it is made, for the one-shot run, the chat and many prompts alike: its sampler chain, grammar,
    stop strings, UTF-8 decoding, what it produced and why it ended: `finish` is None until "end" (of the turn),
    "length" (its `room`), "stop" (a stop string), "grammar" (it allows no token more) or "stopped" (Ctrl-C)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, settings: dict[str, Any], *, specials: dict[str, int],
                 seed: int, room: int, window: list[int] | None = None) -> None:
        self.stop_ids, self.hidden = {specials[name] for name in STOP_TOKENS}, set(specials.values())
        self.constraint = constraint(vocab, settings, end=specials["<|end|>"])  # first: a GrammarError frees nothing
        self.sampler = make_sampler(vocab, settings, seed=seed, window=window or [])
        self.stops, self.utf8 = StopStrings(settings["stop"]), codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.vocab, self.seed, self.room, self.asked = vocab, seed, room, settings["sample_len"]
        if self.constraint:  # never drawn under a grammar or schema, which would read text the reply never prints
            self.unprintable = unprintable(vocab, frozenset(self.hidden - self.stop_ids), frozenset(self.stop_ids))
        self.tokens, self.stamps, self.text = [], [], []  # token ids, when each came, the text each added
        self.finish: str | None = None

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exception: object) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        if self.constraint:
            self.constraint.free()

    def next(self, ctx: llama_cpp.llama_context_p, index: int = -1) -> str:
        """Sample the next token from the logits of the batch's token `index` and say whether it ends the reply; the
        text it adds ("" mid-character, for a hidden special token, or while it may begin a stop string)."""
        token = sample(ctx, self, index)
        if token is not None:
            self.tokens.append(token)
            self.stamps.append(time.perf_counter())
        if token is None or token in self.stop_ids or llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self.finish = "end" if token is not None else "grammar"
            piece = self.stops.feed(self.utf8.decode(b"", final=True), final=True)
        else:
            last = len(self.tokens) == self.room
            # A grammar reads a reply's first token with its leading space, and what it accepted is what is printed
            data = b"" if token in self.hidden else token_bytes(self.vocab, token, first=len(self.tokens) == 1
                                                                and self.constraint is None)
            piece = self.stops.feed(self.utf8.decode(data, final=last), final=last)
            self.finish = "stop" if self.stops.found else "length" if last else None
        self.text.append(piece)
        return piece


def generate(ctx: llama_cpp.llama_context_p, reply: Reply) -> None:
    """The token loop, once the prompt is evaluated: sample, stop?, print, decode."""
    while reply.finish is None:
        raise_noted()  # Ctrl-C stops the reply here, before one more token is drawn
        if piece := reply.next(ctx):  # sample, stop?, and print
            write_out(piece.encode("utf-8"))
        if reply.finish is None:  # decode: the token goes into the cache, and its logits are the next step's
            one = token_array(reply.tokens[-1:])
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                fail("llama.cpp failed to evaluate a token")


def complete(run: Run, prompt_model: llama_cpp.llama_model_p, *, prompt: str, sampling: dict[str, Any],
             prompt_cache_gb: float, started: float) -> int:
    """One reply to one prompt, streamed to stdout; load, prompt and generation speed, and the seed, on stderr."""
    vocab, specials = llama_cpp.llama_model_get_vocab(run.model), run.specials
    tokens = tokenize(vocab, "", add_bos=True) + user_turn(vocab, prompt, specials, system=sampling["system"])
    room = reply_room(len(tokens), n_ctx=run.n_ctx, sample_len=sampling["sample_len"], quiet=run.quiet,
                      most=llama_cpp.llama_model_n_ctx_train(run.model))
    loaded, restored = time.perf_counter(), 0
    with Reply(vocab, sampling, specials=specials, seed=draw_seed(sampling["seed"]), room=room) as reply:
        ctx, key = new_context(run.model, n_ctx=min(run.n_ctx, len(tokens) + room), **run.context)  # what it needs
        if run.verbose:
            show_tokens(vocab, tokens)
        try:  # A saved state holds no logits, so the prompt's last token is evaluated alone, whether the rest was
            # restored or not: both runs then compute the same numbers, and give the same reply
            with reusing_prompt(ctx, tokens[:-1], run.identity | key, limit=prompt_cache_gb * 1e9,
                                quiet=run.quiet) as restored, reply_line():
                # On the prompts' layout of the weights, where that is another; the penalty never sees the prompt
                evaluate_on(prompt_model, ctx, tokens[restored:-1], context=run.context)
                evaluate(ctx, tokens[-1:])
                generate(ctx, reply)
        finally:  # also when Ctrl-C stopped it: the seed repeats the run
            if run.verbose:  # llama.cpp's own timings, next to ours: the difference is the time spent in Python
                llama_cpp.llama_perf_context_print(ctx)
            note(report(load=loaded - started, prompt=len(tokens), restored=restored, asked=loaded,
                        stamps=reply.stamps, seed=reply.seed), quiet=run.quiet)
        if why := incomplete(reply):  # a script notices a reply that does not fit
            sys.stderr.write(f"error: {why}\n")
            return INCOMPLETE
    return 0


def too_long(prompt: int, *, n_ctx: int, most: int) -> str:
    larger = f" or raise --ctx (to at most {most})" if n_ctx < most else f" (the model takes at most {most})"
    return f"the prompt is {prompt} tokens and the context holds {n_ctx}; shorten the prompt{larger}"


def reply_room(prompt: int, *, n_ctx: int, sample_len: int, quiet: bool, most: int) -> int:
    """How many tokens the reply may have: SAMPLE_LEN, or what the context leaves after a prompt of `prompt` tokens."""
    if prompt >= n_ctx:
        fail(too_long(prompt, n_ctx=n_ctx, most=most), code=2)
    room = min(sample_len, n_ctx - prompt + 1)  # + 1: the last token is never evaluated
    if room < sample_len:
        note(f"note: the context leaves room for {room} tokens of reply; raise --ctx for more", quiet=quiet)
    return room


class Run(NamedTuple):
    """What every reply of a run shares, settled once by ready_run() and passed whole."""
    model: llama_cpp.llama_model_p  # the loaded model that generates
    specials: dict[str, int]  # the chat tokens' ids, from tokenizer.json
    n_ctx: int  # CTX: the tokens a prompt and its reply, or a whole chat, may fill
    context: dict[str, Any]  # what new_context() makes contexts with: threads, gpu
    identity: dict[str, Any]  # what a saved state must come from: the model file, llama.cpp, the layout
    quiet: bool  # stderr shows errors only
    verbose: bool  # llama.cpp's log and the prompt's tokens too


# --- Main: settings -> download -> load -> prompt -> stream -> report -------------------------------------------------
@contextlib.contextmanager
def ready_run(settings: dict[str, Any], *, split: bool, quiet: bool,
              verbose: bool) -> Iterator[tuple[Run, llama_cpp.llama_model_p, float]]:
    """main()'s steps 2 and 3, which Answers takes too: the files (the cache first), the model loaded, each phase on
    its faster layout (`split`: a prompt's may differ). Yields the Run, the prompts' model and when the load began."""
    context = dict(threads=settings["threads"] or physical_cores(),
                   gpu=llama_cpp.llama_supports_gpu_offload() and settings["gpu_layers"] != 0)
    repack = repack_weights(settings["repack"], gpu=context["gpu"])  # before the download: refused where it crashes
    if not verbose:
        hub_logging.set_verbosity_error()  # the library's retry and cache chatter
    model_path, tokenizer_path = fetch_files(
        [(settings["model_repo"], settings["model_file"], settings["model_revision"]),
         (settings["tokenizer_repo"], "tokenizer.json", settings["tokenizer_revision"])], quiet=quiet)
    specials = read_special_tokens(tokenizer_path)
    with ctrl_c(at_once=False):  # Ctrl-C now stops llama.cpp only where that is safe
        started = time.perf_counter()
        model, prompt_model, repacked = load_layouts(model_path, repack=repack, split=split, quiet=quiet,
                                                     gpu_layers=settings["gpu_layers"], threads=context["threads"])
        check_model(model, specials, n_ctx=settings["ctx"])
        # A saved state names the layout that evaluated its prompt
        identity = state_identity(model_path, gpu_layers=settings["gpu_layers"]) | {"repack": repacked}
        yield Run(model, specials, settings["ctx"], context, identity, quiet, verbose), prompt_model, started


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)  # 1. settings: flags over constants, every value checked
    chatting, many = settings.chat or settings.load is not None, settings.prompts is not None
    prompt = None if chatting or many else read_prompt(settings.prompt, n_ctx=settings.ctx)
    quiet = settings.quiet and not settings.verbose
    if quiet:
        disable_progress_bars()
    with ready_run(vars(settings), split=not (chatting or many), quiet=quiet,  # 2. download, 3. load
                   verbose=settings.verbose) as (run, prompt_model, started):
        sampling = {name: getattr(settings, name) for name in CHAT_SETTINGS}
        if many:  # 4-6. for every prompt of a file, as it is read, PARALLEL at a time
            seed = draw_seed(settings.seed)
            return answer_all(run, read_jobs(settings.prompts_file, run, sampling, seed=seed),
                              parallel=settings.parallel, seed=seed)
        if chatting:  # 4-6. for every message
            return chat(run, sampling=sampling, load=settings.load, first=settings.prompt)
        return complete(run, prompt_model, prompt=prompt, sampling=sampling, prompt_cache_gb=settings.prompt_cache_gb,
                        started=started)


# --- Weight layouts (machinery): prompts and generation each on the layout of the weights measured faster here ------
# llama.cpp can repack the weights into a layout for this CPU's kernels at each load. Whether that is faster differs
# from CPU to CPU, and between evaluating a prompt (many tokens a batch) and generating (one): it is measured.
LAYOUT_RECORD = {"prompt": bool, "generation": bool}  # an entry of layouts.json: which phase is repacked
PROBE_TOKENS = 32  # prompt tokens evaluated as one batch to time a layout's prompts (a 512-batch's proxy, quicker)
PROBE_STEPS = 8  # tokens then evaluated one at a time to time its generation
PROBE_ROUNDS = 2  # each layout is timed this many times, in turns, and its best kept: a busy moment slows one
NOISE = 1.1  # repacked weights must measure this much faster than the file's layout to be used for a phase


def load_layouts(path: str, *, repack: bool | None, gpu_layers: int | None, split: bool, threads: int,
                 quiet: bool) -> tuple[llama_cpp.llama_model_p, llama_cpp.llama_model_p, bool]:
    """The model that generates, the one that evaluates prompts (the same one unless `split` and the two phases are
    faster on different layouts), and whether the latter is repacked. `repack` decides, or where it is None this
    machine's measurement: taken once for this build, model file and thread count, and kept in layouts.json."""
    if repack is not None:
        model = load_model(path, gpu_layers=gpu_layers, repack=repack)
        return model, model, repack
    identity = state_identity(path, gpu_layers=gpu_layers)
    file, key = DATA_DIR / "layouts.json", json.dumps([identity["model"], identity["llama.cpp"], cpu_name(), threads])
    known = read_json(file)
    if shape_problem(known.get(key), LAYOUT_RECORD, "") is None:
        prompt, generation = known[key]["prompt"], known[key]["generation"]
        models = {layout: load_model(path, gpu_layers=gpu_layers, repack=layout)
                  for layout in {generation, prompt if split else generation}}
    else:
        models = {layout: load_model(path, gpu_layers=gpu_layers, repack=layout) for layout in (False, True)}
        speeds = layout_speeds(models, threads=threads)  # tokens a second: prompt, generation
        prompt, generation = (speeds[True][phase] > speeds[False][phase] * NOISE for phase in (0, 1))
        entry = {"prompt": prompt, "generation": generation, "tokens a second, prompt and generation":
                 {"as in the file": speeds[False], "repacked": speeds[True]}}
        try:  # under a lock, read again: runs that measure at once (other thread counts) keep each other's entries
            with WeakFileLock(file.with_name("layouts.lock")):
                write_whole(file, json.dumps({**read_json(file), key: entry}, indent=1))
        except OSError as error:
            note(f"note: the measured layouts cannot be kept in {file} ({error.strerror or error}); each run will "
                 "measure them again", quiet=quiet)
    prompt = prompt if split else generation
    for layout in set(models) - {prompt, generation}:
        llama_cpp.llama_model_free(models.pop(layout))
    return models[generation], models[prompt], prompt


def layout_speeds(models: dict[bool, llama_cpp.llama_model_p], *, threads: int) -> dict[bool, list[float]]:
    """Each layout's prompt and generation speed, the best of PROBE_ROUNDS rounds taken in turns."""
    best = {layout: [0.0, 0.0] for layout in models}
    with progress("timing both layouts of the weights (once for this CPU, model and build)", total=PROBE_ROUNDS * 2,
                  unit="run") as bar:
        for _ in range(PROBE_ROUNDS):
            for layout, model in models.items():
                best[layout] = [max(pair) for pair in zip(best[layout], layout_speed(model, threads=threads))]
                bar.update()
    return best


def layout_speed(model: llama_cpp.llama_model_p, *, threads: int) -> tuple[float, float]:
    """Tokens a second: PROBE_TOKENS in one batch, then PROBE_STEPS one at a time (any tokens: speed is the same)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    tokens = [index % n_vocab for index in range(1 + PROBE_TOKENS + PROBE_STEPS)]
    ctx, _ = new_context(model, n_ctx=len(tokens), threads=threads, gpu=False)
    try:
        evaluate(ctx, tokens[:1])  # not timed: the first pass reads the weights into memory
        times = [time.perf_counter()]
        for batch in [tokens[1 : PROBE_TOKENS + 1], *([token] for token in tokens[PROBE_TOKENS + 1 :])]:
            evaluate(ctx, batch)
            times.append(time.perf_counter())
    finally:
        llama_cpp.llama_free(ctx)
    return PROBE_TOKENS / (times[1] - times[0]), PROBE_STEPS / (times[-1] - times[1])


def evaluate_on(model: llama_cpp.llama_model_p, ctx: llama_cpp.llama_context_p, tokens: list[int], *,
                context: dict[str, Any]) -> None:
    """evaluate() into ctx's cache, computed by `model` (the other layout, or ctx's own): in a temporary context, the
    cache moved there and back (meanwhile two caches are held). Ctrl-C leaves ctx as it was."""
    if model == llama_cpp.llama_get_model(ctx) or not tokens:
        return evaluate(ctx, tokens)
    other, _ = new_context(model, n_ctx=llama_cpp.llama_n_ctx(ctx), **context)
    try:
        if cached_tokens(ctx):
            move_cache(ctx, other)
        evaluate(other, tokens)
        move_cache(other, ctx)
    finally:
        llama_cpp.llama_free(other)


def move_cache(source: llama_cpp.llama_context_p, target: llama_cpp.llama_context_p) -> None:
    """Put sequence 0's cache of one context in place of the other's, in llama.cpp's state format, in memory: the
    weights' layout changes how the numbers are computed, not how the cache holds them."""
    size = llama_cpp.llama_state_seq_get_size(source, 0)  # 0 where llama.cpp failed
    state = (ctypes.c_uint8 * size)()
    if not size or llama_cpp.llama_state_seq_get_data(source, state, size, 0) != size or \
            llama_cpp.llama_state_seq_set_data(target, state, size, 0) != size:
        fail("llama.cpp could not move the prompt's cache between the two layouts' contexts; try --no-repack")


# --- Download (machinery): files checked against the hub's hash, a stopped download resumed; HF_TOKEN for the hub only
LINK_REFRESHES = 3  # fresh download links asked of the hub in a row, with no byte between, before giving up
DATA_DIR = Path(hub_constants.HF_HOME) / "phi-console"  # what this script keeps beside the hub's cache
TIMEOUT = hub_constants.HF_HUB_ETAG_TIMEOUT  # seconds to wait for the hub's answer (HF_HUB_ETAG_TIMEOUT sets it)


def read_special_tokens(path: str) -> dict[str, int]:
    """Each special token's text and id, from tokenizer.json's `added_tokens` list; every id an integer >= 0."""
    try:
        added = json.loads(read_bounded(Path(path), limit=TOKENIZER_MAX_BYTES))["added_tokens"]
        specials = {t["content"]: t["id"] for t in added if t.get("special")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        fail(f"{path} is not a usable tokenizer.json ({type(error).__name__}: {error}); delete it to download again")
    for name, token in specials.items():
        if type(token) is not int or token < 0:  # JSON's true, 1e3 and "5" are no ids; llama.cpp aborts on -5
            fail(f"{path} gives {name} the id {token!r}, not a token id (an integer >= 0); delete it to download again")
    if absent := [name for name in CHAT_TOKENS if name not in specials]:
        fail(f"{path} lacks the special tokens {', '.join(absent)}: is --tokenizer-repo a Phi-3 tokenizer?")
    return specials


def check_model(model: llama_cpp.llama_model_p, specials: dict[str, int], *, n_ctx: int) -> None:
    """The model must fit the settings, and agree with tokenizer.json on the special tokens' ids."""
    if n_ctx > (trained := llama_cpp.llama_model_n_ctx_train(model)):
        fail(f"--ctx {n_ctx} is larger than the model's context of {trained} tokens", code=2)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    apart = "the model and tokenizer files do not belong together"
    for name, token in specials.items():
        if token >= n_vocab:  # llama.cpp would abort on it
            fail(f"tokenizer.json gives {name} the id {token}, but the GGUF has only {n_vocab} tokens: {apart}")
    for name in CHAT_TOKENS:
        if (text := llama_cpp.llama_vocab_get_text(vocab, specials[name]).decode("utf-8", "replace")) != name:
            fail(f"tokenizer.json gives {name} the id {specials[name]}, but the GGUF has {text!r} there: {apart}")


def fetch_files(files: list[tuple[str, str, str]], *, quiet: bool) -> list[str]:
    """Local paths of (repo, file, revision) triples: the cache's where they still hash to the hub's etag, so that a
    cached run sends no request at all; the others fetched."""
    cached = [try_to_load_from_cache(repo, name, revision=revision) for repo, name, revision in files]
    paths = [path if isinstance(path, str) and verified(path, quiet=quiet) else None for path in cached]
    missing = [(files[index], index) for index, path in enumerate(paths) if path is None]
    if not missing:
        return paths  # type: ignore[return-value]
    if hub_constants.HF_HUB_OFFLINE:
        names = ", ".join(f"{repo}/{name}" for (repo, name, _), _ in missing)
        fail(f"{names} not in the cache and HF_HUB_OFFLINE is set; run once with a network connection")
    metas = []  # one HEAD per file, without the library's retries: an unreachable hub is reported in seconds
    for (repo, name, revision), _ in missing:
        head = functools.partial(get_hf_file_metadata, hf_hub_url(repo, name, revision=revision), timeout=TIMEOUT)
        metas.append(hub_call(head, repo=repo, name=name, revision=revision))
    partials = [partial_file(repo, name, meta.etag) for ((repo, name, _), _), meta in zip(missing, metas) if meta.etag]
    have = 0  # what stopped runs left
    for partial in partials:
        with contextlib.suppress(FileNotFoundError):  # or another run just finished it
            have += partial.stat().st_size
    needed = sum(meta.size or 0 for meta in metas) - have
    cache = Path(hub_constants.HF_HUB_CACHE)
    free = shutil.disk_usage(next(p for p in (cache, *cache.parents) if p.exists())).free
    if needed > free:
        fail(f"the download needs {needed / 1e9:.2f} GB in {cache}, but only {free / 1e9:.2f} GB is free; "
             "free some space, or set HF_HOME to a disk with room")
    resumed = f", resuming after the {have / 1e9:.2f} GB a stopped run left" if have else ""
    note(f"downloading {needed / 1e9:.2f} GB into {cache}{resumed}; later runs start from this cache", quiet=quiet)
    for ((repo, name, revision), index), meta in zip(missing, metas):
        get = functools.partial(fetch, repo, name, revision, meta)
        paths[index] = hub_call(get, repo=repo, name=name, revision=revision, size=meta.size or 0)
    return paths  # type: ignore[return-value]


def verified(path: str, *, quiet: bool) -> bool:
    """Does a cached file hash to the etag it is stored under (huggingface_hub checks only its size)? Hashed again
    only when its size or mtime changed; a damaged one is deleted, to be fetched again."""
    blob = os.path.realpath(path)
    info = os.stat(blob)
    if read_json(DATA_DIR / "verified.json").get(blob) == [info.st_size, info.st_mtime_ns]:
        return True
    if hashes_to(Path(blob), os.path.basename(blob)):
        remember_verified(blob)
        return True
    damaged = f"the cached {path} is damaged (its hash does not match the hub's)"
    if hub_constants.HF_HUB_OFFLINE:
        fail(f"{damaged}; run without HF_HUB_OFFLINE to download it again")
    note(f"{damaged}; downloading it again", quiet=quiet)
    try:
        os.remove(blob)
    except OSError as error:  # but gone already is fine: another run that found it damaged removed it first
        if not isinstance(error, FileNotFoundError):
            fail(f"{damaged} and cannot be removed ({error.strerror}); delete it and run again")
    return False


def hashes_to(path: Path, etag: str) -> bool:
    """Does the file hash to the hub's etag: the sha256 of an LFS file (the GGUF), git's blob sha1 of a small one?"""
    if len(etag) not in (40, 64) or any(c not in "0123456789abcdef" for c in etag):
        return True  # not named by a hash: nothing to check against
    digest = hashlib.sha256() if len(etag) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    return file_digest(path, digest) == etag


def remember_verified(blob: str) -> None:
    """Note a blob's size and mtime as verified, so that later runs need not hash it again."""
    info = os.stat(blob)
    seen = {**read_json(DATA_DIR / "verified.json"), blob: [info.st_size, info.st_mtime_ns]}
    with contextlib.suppress(OSError):  # a read-only cache just means hashing again next time
        write_whole(DATA_DIR / "verified.json", json.dumps(seen))


def hub_call(call: Callable[[], Any], *, repo: str, name: str, revision: str, size: int = 0) -> Any:
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
        fail(f"the hub at {endpoint} did not answer within {TIMEOUT:g} s while fetching {repo}/{name}; "
             "check your connection and run again (HF_HUB_ETAG_TIMEOUT sets the wait)")
    except (hub_httpx.HTTPError, ConnectionError) as error:
        fail(f"cannot reach the hub at {endpoint} ({type(error).__name__}) and {repo}/{name} is not cached; "
             "connect once to download it")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            fail(f"no room to save {repo}/{name} ({size / 1e9:.2f} GB) in {hub_constants.HF_HUB_CACHE}: "
                 f"{error.strerror}; free some space, or set HF_HOME to a disk with room")
        fail(f"could not save {repo}/{name} in {hub_constants.HF_HUB_CACHE}: {error.strerror or error}")


def partial_file(repo: str, name: str, etag: str) -> Path:
    """Where a stopped download of `name` waits for the next run: beside the blobs, named for the file and etag."""
    folder = Path(hub_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
    return folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.{etag}.partial"


def fetch(repo: str, name: str, revision: str, meta: Any) -> str:
    """Download one file into the cache, in a partial file that a stopped run leaves for the next to continue with a
    Range request (huggingface_hub deletes its own); nothing unverified enters the cache."""
    if not meta.etag or not meta.location:  # a server that names no blob: the library's download, unresumed
        return hf_hub_download(repo, name, revision=revision, etag_timeout=TIMEOUT)
    folder = repo_folder_name(repo_id=repo, repo_type="model")
    blob, partial = Path(hub_constants.HF_HUB_CACHE) / folder / "blobs" / meta.etag, partial_file(repo, name, meta.etag)
    lock = Path(hub_constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"
    partial.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # the same lock hf_hub_download takes: two runs never write one file at once
        for stale in partial.parent.glob(f"{partial.name.split('.')[0]}.*.partial"):
            if stale != partial:
                stale.unlink(missing_ok=True)  # the file has changed on the hub since that run stopped
        for leftover in partial.parent.glob(f"{meta.etag}.*.incomplete"):  # the library's, from killed runs
            leftover.unlink(missing_ok=True)
        while not blob.exists():
            resumed = fetch_rest(repo, name, revision, meta, partial)
            if hashes_to(partial, meta.etag):
                os.replace(partial, blob)
                remember_verified(str(blob))
            else:
                partial.unlink()
                if not resumed:  # a damaged partial costs one fresh download; a damaged fresh one is an error
                    fail(f"{repo}/{name} arrived damaged (its hash does not match the hub's); run again to retry")
    return hf_hub_download(repo, name, revision=revision, etag_timeout=TIMEOUT)  # links it, as its own downloads


def fetch_rest(repo: str, name: str, revision: str, meta: Any, partial: Path) -> int:
    """Append what `partial` lacks of the file, with the library's http_get; how many bytes it had. A signed link
    expires (after an hour on huggingface.co): when its host refuses it, the hub is asked for a fresh one."""
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
                refusals = 1 if f.seek(0, os.SEEK_END) > have else refusals + 1
                have = f.tell()
                if refusals > LINK_REFRESHES:
                    fail(f"the file host refused {repo}/{name} with HTTP {status} {refusals} times in a row, also with "
                         f"fresh links from the hub; run again later to resume after the {have / 1e9:.2f} GB here")
            fresh = get_hf_file_metadata(hf_hub_url(repo, name, revision=revision), timeout=TIMEOUT)
            if fresh.etag != meta.etag or not fresh.location:
                fail(f"{repo}/{name} changed on the hub during the download; run again to download the new file")
            meta = fresh


def headers_for(url: str) -> dict[str, str]:
    """huggingface_hub's headers, with the token only if `url` is on the hub itself, as on the library's own path."""
    headers = build_hf_headers()
    if origin(url) not in {origin(hub_constants.ENDPOINT), origin("https://huggingface.co"), origin("https://hf.co")}:
        headers.pop("authorization", None)
    return headers


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port: two URLs share an origin when these are equal."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


# --- Saved prompts (machinery): a rerun restores its evaluated prompt instead of evaluating it again ------------------
# Each saved prompt is NAME.json (key, tokens, the state's HMAC) beside NAME.state. Runs share the folder: a state
# is written under a unique temporary name; renaming it, writing its record and deleting happen under one lock.
PROMPT_RECORD = {"key": dict, "tokens": [int], "hmac": str}  # a NAME.json, as shape_problem reads it
LEFTOVER_S = 3600  # a temporary file unchanged this long was left by a run that was killed
KEPT_MAX_BYTES = 64 * 2**20  # a record or list the script keeps is far smaller; a larger one is damaged
KEY_BYTES = 32  # the key that signs saved states: as long as its HMAC's sha256
PROMPT_DIR = DATA_DIR / "prompts"  # the saved prompts, which every run shares


def state_identity(model_path: str, *, gpu_layers: int | None) -> dict[str, Any]:
    """What a saved KV state depends on, but for the layout that computed it (the caller adds it): the model's bytes
    (its file is named by its hash), the build, the layers on a GPU."""
    blob = os.path.realpath(model_path)
    build = llama_cpp.__version__ + " " + llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {"model": f"{os.path.basename(blob)} {os.path.getsize(blob)}", "llama.cpp": build, "gpu_layers": gpu_layers}


@contextlib.contextmanager
def reusing_prompt(ctx: llama_cpp.llama_context_p, prefix: list[int], key: dict[str, Any], *, limit: float,
                   quiet: bool) -> Iterator[int]:
    """Restore the longest start of the prompt's prefix a run saved under this key (the model, build and context that
    made it), yield its length; save the prefix if it was evaluated here."""
    restored = restore_prompt(ctx, prefix, key, quiet=quiet) if limit else 0
    try:
        yield restored
    finally:
        if limit and restored < len(prefix) and cached_tokens(ctx) >= len(prefix):  # also when Ctrl-C stopped the reply
            save_prompt(ctx, prefix, key, limit=limit)


def restore_prompt(ctx: llama_cpp.llama_context_p, tokens: list[int], key: dict[str, Any], *, quiet: bool) -> int:
    """Restore the saved prompt that gives the longest start of `tokens`: all of them, or whole batches; its length."""
    best, usable = None, 0
    for index in PROMPT_DIR.glob("*.json"):
        saved = read_json(index)
        if saved.get("key") != key or shape_problem(saved, PROMPT_RECORD, "record"):
            continue
        common = len(os.path.commonprefix([saved["tokens"], tokens]))  # it compares lists too
        whole = common == len(saved["tokens"]) == len(tokens)
        length = len(tokens) if whole else common // key["batch"] * key["batch"]
        if length > usable:
            best, usable = (index, saved), length
    if best is None:
        return 0
    index, saved = best
    # A distrusted state is not deleted: the next save replaces it, and another run may be writing it right now
    state = index.with_suffix(".state")
    if distrust := untrusted(state, saved["hmac"], ctx=ctx, tokens=len(saved["tokens"])) or \
            load_state(ctx, state, saved["tokens"]):
        note(f"note: not using the saved state of this prompt ({distrust}); evaluating it again", quiet=quiet)
        return 0
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, usable, -1)
    with contextlib.suppress(OSError):
        os.utime(index)  # just used: the last to be dropped for room
    return usable


def save_prompt(ctx: llama_cpp.llama_context_p, tokens: list[int], key: dict[str, Any], *, limit: float) -> None:
    """Keep the cache's first len(tokens) positions for later runs, then make room; a failed write loses nothing."""
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, len(tokens), -1)
    if llama_cpp.llama_state_seq_get_size(ctx, 0) > limit:
        return
    name = hashlib.sha256(json.dumps([key, tokens]).encode()).hexdigest()[:32]
    with contextlib.suppress(OSError):
        PROMPT_DIR.mkdir(parents=True, exist_ok=True)
        with temporary_beside(PROMPT_DIR / f"{name}.state") as partial:
            mac = save_state(ctx, partial, tokens)
            with WeakFileLock(PROMPT_DIR.with_name("prompts.lock")):
                os.replace(partial, PROMPT_DIR / f"{name}.state")
                write_whole(PROMPT_DIR / f"{name}.json", json.dumps({"key": key, "tokens": tokens, "hmac": mac}))
                tidy_prompts(keep=PROMPT_DIR / f"{name}.json", limit=limit)


def tidy_prompts(*, keep: Path, limit: float) -> None:
    """Under the lock: delete states no record names, killed runs' files, then least recently used prompts to fit."""
    saved = []
    for index in PROMPT_DIR.glob("*.json"):
        with contextlib.suppress(OSError):  # a record whose state is gone waits to be replaced
            saved.append((index.stat().st_mtime, index.with_suffix(".state").stat().st_size, index))
    for path in PROMPT_DIR.iterdir():
        with contextlib.suppress(OSError):  # gone already: another run's temporary file, renamed
            stale = path.suffix == ".tmp" and time.time() - path.stat().st_mtime > LEFTOVER_S
            if stale or (path.suffix == ".state" and not path.with_suffix(".json").exists()):
                path.unlink()
    total = sum(size for _, size, _ in saved)
    for _, size, index in sorted(saved):
        if total > limit and index != keep:
            with contextlib.suppress(OSError):
                index.unlink()
                index.with_suffix(".state").unlink()
            total -= size


def save_state(ctx: llama_cpp.llama_context_p, path: Path, tokens: list[int]) -> str:
    """Write llama.cpp's state of the cache, which holds `tokens` (no logits); its HMAC. OSError unless whole."""
    written = llama_cpp.llama_state_seq_save_file(ctx, os.fsencode(path), 0, token_array(tokens), len(tokens))
    if not written or os.path.getsize(path) != written:  # llama.cpp does not check its last write, at close
        raise OSError(errno.EIO, f"llama.cpp could not write {path.name} whole")
    return state_mac(path)


def untrusted(path: Path, mac: str, *, ctx: llama_cpp.llama_context_p, tokens: int) -> str | None:
    """Why a state file must not reach llama.cpp, which trusts the sizes it gives (a forged one aborts it); None if
    its HMAC is `mac`: written here. One larger than a cache of `tokens` can be is refused unread (K and V, at most
    4 bytes a number); Ctrl-C and SIGTERM while a large one is hashed are raised at once, before anything changes."""
    model = llama_cpp.llama_get_model(ctx)
    most = (tokens + 1) * 8 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_embd(model) + 2**20
    try:
        if (size := os.path.getsize(path)) > most:
            return f"it is {size / 1e9:.2f} GB, more than a state of {tokens} tokens can be"
        made = state_mac(path)
    except OSError as error:
        return error.strerror or str(error)
    raise_noted()
    same = hmac.compare_digest(made.encode(), mac.encode("utf-8", "replace"))
    return None if same else "it was not saved by this installation, or has changed since"


def load_state(ctx: llama_cpp.llama_context_p, path: Path, tokens: list[int]) -> str | None:
    """Load save_state's file, which untrusted() passed, into the empty cache if it holds `tokens`; else say why not."""
    out, count = (llama_cpp.llama_token * max(len(tokens), 1))(), ctypes.c_size_t(0)
    read = llama_cpp.llama_state_seq_load_file(ctx, os.fsencode(path), 0, out, len(tokens), ctypes.byref(count))
    if read and out[:count.value] == tokens and cached_tokens(ctx) == len(tokens):
        return None
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    return "llama.cpp could not restore it"


def state_mac(path: Path) -> str:
    """A state file's HMAC under this installation's random key, made once beside the cache (its owner's only, and
    linked into place whole): a state made or changed elsewhere cannot have the one recorded for it."""
    key = DATA_DIR / "state.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        with temporary_beside(key) as new:  # mkstemp makes it 0600
            new.write_bytes(os.urandom(KEY_BYTES))
            with contextlib.suppress(FileExistsError):  # another run made it first: both use that one
                os.link(new, key)
    try:  # its first KEY_BYTES: a damaged key only makes every state distrusted
        with open_regular(key) as secret:
            signer = hmac.new(secret.read(KEY_BYTES), digestmod=hashlib.sha256)
    except OSError as error:
        raise OSError(error.errno, f"the key {key} cannot be read ({error.strerror}); delete it") from None
    return file_digest(path, signer)


# --- Chat (machinery): a conversation kept in the KV cache; each turn evaluates only its own tokens -------------------
SAVED_FORMAT = "phi-console conversation 1"  # the "format" of a /save file; other files are refused
SAVED_REPLY_TOKENS = 4096  # the most recent reply tokens a /save keeps for the repeat penalty's window
SAVED_BYTES_PER_TOKEN = 1024  # far more than a /save file takes per token; a larger file is refused, not read whole
REPLY_SHARE = 0.5  # the most of the context a reply may push history out for: a long --sample-len never empties it
SAVED_CONVERSATION = {  # the shape of a /save file, as shape_problem reads it
    "settings": dict, "messages": [{"role": str, "content": str}], "state": {"file": str},
    "context": {"tokens": [int], "exchanges": [int], "pending": [int], "replies": [int]}}
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


def chat(run: Run, *, sampling: dict[str, Any], load: dict[str, Any] | None, first: str | None) -> int:
    """Talk at `>>> ` until /bye or the end of input, replies on stdout; Ctrl-C stops a reply but never the chat.
    `first` (-p with --chat) is the first message, as if typed."""
    ctx, key = new_context(run.model, n_ctx=run.n_ctx, **run.context)
    talk = Conversation(ctx, run, settings=sampling, identity=run.identity | key)
    if load is not None:  # --load: checked before the model loaded, all but its tokens against the vocabulary
        try:
            note(talk.load(load), quiet=run.quiet)
        except ValueError as wrong:
            fail(f"--load: {wrong}", code=2)
        if load["replaced"]:
            note(f"note: the flags given replace the saved {load['replaced']}", quiet=run.quiet)
    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]  # bytes that are no UTF-8 never end it
    if interactive := sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing, history and bracketed paste for input())
    note(f"chatting with the model, seed {talk.settings['seed']}: /help lists commands, /bye or Ctrl-D leaves",
         quiet=run.quiet)
    typed = typed_messages(interactive, limit=run.n_ctx * TOKEN_MAX_BYTES)
    for line in itertools.chain([first] if first else [], typed):
        if line == "/bye":
            return 0
        try:
            if line.startswith("/") and "\n" not in line:
                sys.stderr.write(command(talk, line) + "\n")
            else:
                talk.answer(line)
        except ValueError as wrong:
            sys.stderr.write(f"error: {wrong}\n")
    return 0


def typed_messages(interactive: bool, *, limit: int) -> Iterator[str]:
    """Each message typed at `>>> ` until Ctrl-D or end of input; a line of just \"\"\" opens and closes a long one.
    Of a message longer than `limit` characters (more than the context holds), no more than that is kept."""
    prompt, more = (">>> ", "... ") if interactive else ("", "")
    while True:
        if set(Signals.noted) - {signal.SIGINT}:  # SIGTERM or SIGHUP during the last reply: leave now
            raise_noted()
        Signals.noted.clear()  # a Ctrl-C noted since the last prompt has stopped what it was for
        try:
            with ctrl_c(at_once=True):  # at the prompt, Ctrl-C raises at once (and is caught just below)
                line = read_line(prompt, interactive=interactive, limit=limit)
                if line.strip() == '"""':
                    block, size = [], 0
                    with contextlib.suppress(EOFError):  # input that ends inside a block still sends the block
                        while (line := read_line(more, interactive=interactive, limit=limit)).strip() != '"""':
                            block.append(line[:max(limit + 1 - size, 0)])
                            size += len(block[-1]) + 1
                    line = "\n".join(block)
        except EOFError:
            return
        except KeyboardInterrupt:
            sys.stderr.write("\n(to leave, type /bye or press Ctrl-D)\n")
            continue
        if line.strip():
            yield line.strip()


def read_line(prompt: str, *, interactive: bool, limit: int) -> str:
    """input(); from a pipe, only a line's first limit + 1 characters are kept, and its rest is read past."""
    if interactive:
        return input(prompt)
    line = sys.stdin.readline(limit + 1)
    if not line:
        raise EOFError
    while not line.endswith("\n") and (rest := sys.stdin.readline(limit)):  # the rest of a line no message holds
        if rest.endswith("\n"):
            break
    return line.rstrip("\n")


def command(talk: Conversation, line: str) -> str:
    """Run one /command; its answer is for stderr. ValueError: what was wrong with it."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    needs = {"/set": "NAME VALUE", "/save": "FILE", "/load": "FILE"}
    if (name in needs) != bool(argument):  # missing, or given to a command that takes none
        raise ValueError(f"{name} takes {needs.get(name, 'nothing')} (got {shorten(line)}); /help lists the commands")
    if name == "/set":
        return talk.change(*argument.partition(" ")[::2])
    if name == "/load":
        try:
            return talk.load(read_saved(Path(argument), n_ctx=talk.n_ctx))
        except KeyboardInterrupt:
            raise ValueError("loading was stopped; the conversation starts empty") from None
    if name == "/help":  # each command, and under /set the settings it takes
        lines = [f"  {usage:<17} {meaning}" for usage, meaning in COMMANDS.items()]
        settings = [f"      {key:<15} {SETTINGS[key].meaning} ({SETTINGS[key].must_be})" for key in CHAT_SETTINGS]
        return "\n".join(["commands:", lines[0], *settings, *lines[1:]])
    if name == "/show":
        shown = [f"{key} = {talk.settings[key]!r}" for key in CHAT_SETTINGS]
        return "\n".join([*shown, f"context: {len(talk.tokens)} of {talk.n_ctx} tokens used"])
    actions = {"/reset": talk.reset, "/stats": lambda: talk.stats, "/save": lambda: talk.save(Path(argument))}
    if name not in actions:
        raise ValueError(f"unknown command {shorten(name)}; /help lists the commands")
    return actions[name]()


class Conversation:
    """A chat's record and the KV cache that holds it, in agreement: position i of the cache holds tokens[i].
    exchanges[k] is where the k-th exchange (message and reply) starts; `pending` goes in with the next message."""

    def __init__(self, ctx: llama_cpp.llama_context_p, run: Run, *, settings: dict[str, Any],
                 identity: dict[str, Any]) -> None:
        self.ctx, self.specials, self.n_ctx, self.settings = ctx, run.specials, run.n_ctx, settings
        self.identity, self.quiet, self.verbose = identity, run.quiet, run.verbose
        self.stats = "no reply yet"
        self.vocab = llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx))
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.reply_end = [run.specials["<|end|>"]]  # the template's "\n" after it is dropped, as in user_turn
        self.reset()

    def reset(self) -> str:
        """Forget everything said; the settings stay."""
        llama_cpp.llama_memory_clear(self.memory, True)
        self.tokens, self.exchanges, self.pending, self.replies = [], [], [], []  # token ids and positions
        self.messages: list[dict[str, str]] = []
        self.settings["seed"] = draw_seed(self.settings["seed"])  # kept, so that /show, /save and the start say it
        return "the conversation is forgotten"

    def change(self, name: str, text: str) -> str:
        """/set: a new value for a setting, checked like a flag's."""
        if name not in CHAT_SETTINGS:
            raise ValueError(f"/set takes one of {', '.join(CHAT_SETTINGS)} (got {shorten(name)})")
        try:
            value = read_value(name, text)
        except argparse.ArgumentTypeError as wrong:
            raise ValueError(f"{name} {wrong}") from None
        check_grammar(self.vocab, {**self.settings, name: value}, end=self.specials["<|end|>"])
        self.settings[name] = value
        if name == "system":  # it belongs at the start of the conversation, so the conversation starts over
            return f"{name} = {self.settings[name]!r}; {self.reset()}"
        return f"{name} = {self.settings[name]!r}"

    def make_room(self, turn: int) -> bool:
        """Forget the oldest exchanges, but the one that carries the system prompt, until a message of `turn` tokens
        and a full reply (at most a REPLY_SHARE of the context) fit, and say so; False, none forgotten, if it cannot."""
        keep = 1 if self.settings["system"] and self.exchanges else 0
        kept_end = self.exchanges[keep] if len(self.exchanges) > keep else len(self.tokens) + len(self.pending)
        if max(kept_end, 1) + turn > self.n_ctx:  # what must stay, BOS at the least, and the message
            return False
        forgotten, reply = 0, min(self.settings["sample_len"], int(self.n_ctx * REPLY_SHARE))
        while len(self.exchanges) > keep and len(self.tokens) + len(self.pending) + turn + reply > self.n_ctx:
            start = self.exchanges[keep]
            first = max(len(self.messages) - 2 * (len(self.exchanges) - keep), 0)  # its message and reply
            del self.messages[first:first + 2]
            stop = self.exchanges[keep + 1] if len(self.exchanges) > keep + 1 else len(self.tokens)
            llama_cpp.llama_memory_seq_rm(self.memory, 0, start, stop)  # forget the exchange ...
            llama_cpp.llama_memory_seq_add(self.memory, 0, stop, -1, start - stop)  # ... and slide the rest down
            del self.tokens[start:stop]
            if len(self.exchanges) == keep + 1:
                self.pending = []  # the end of a forgotten reply goes with it
            self.exchanges[keep:] = [at - (stop - start) for at in self.exchanges[keep + 1:]]
            forgotten += 1
        if forgotten:
            note(f"note: forgot the oldest {forgotten} exchange(s) to make room in the {self.n_ctx}-token context",
                 quiet=self.quiet)
        return True

    def answer(self, text: str) -> None:
        """Reply to a message on stdout. Ctrl-C stops the reply; what was said stays said."""
        if len(text) > self.n_ctx * TOKEN_MAX_BYTES:  # typed_messages kept no more of it
            raise ValueError(f"that message is longer than the {self.n_ctx} tokens the context holds; send a shorter "
                             "one (or start with a larger --ctx)")
        turn = user_turn(self.vocab, text, self.specials, system=None if self.tokens else self.settings["system"])
        if not self.make_room(len(turn)):
            raise ValueError(f"that message is {len(turn)} tokens and the context holds {self.n_ctx}; send a shorter "
                             "one (or /reset, or start with a larger --ctx)")
        prompt = (tokenize(self.vocab, "", add_bos=True) if not self.tokens else []) + self.pending + turn
        room = min(self.settings["sample_len"], self.n_ctx - len(self.tokens) - len(prompt) + 1)
        seed = reply_seed(self.settings["seed"], len(self.messages) // 2)  # each reply its own draws
        with Reply(self.vocab, self.settings, specials=self.specials, seed=seed, room=room,
                   window=self.replies) as reply:  # the penalty's window runs on over the replies
            llama_cpp.llama_perf_context_reset(self.ctx)  # its counters read max(1, n): a difference would be off by 1
            asked = time.perf_counter()
            if self.verbose:
                show_tokens(self.vocab, prompt)
            try:
                with reply_line():
                    evaluate(self.ctx, prompt)
                    generate(self.ctx, reply)
            except KeyboardInterrupt:
                if not reply.tokens:  # stopped before the reply began: as if the message had not been sent
                    llama_cpp.llama_memory_seq_rm(self.memory, 0, len(self.tokens), -1)
                    note("(stopped before the reply began: that message is forgotten)", quiet=self.quiet)
                    return
                note("(stopped)", quiet=self.quiet)
                reply.finish = "stopped"  # a reply the user stopped is not called incomplete
            self.record(prompt=prompt, turn=len(turn), reply=reply, message=text)
            if why := incomplete(reply):
                sys.stderr.write(f"error: {why}\n")
        evaluated, stamps = llama_cpp.llama_perf_context(self.ctx).n_p_eval, reply.stamps
        waited = stamps[0] - asked if stamps else 0.0  # until the first token
        rate = speed(len(stamps) - 1, stamps[-1] - stamps[0]) if stamps else speed(0, 0)
        self.stats = (f"last reply: {evaluated} prompt tokens evaluated, first token after {waited:.2f} s | "
                      f"{len(stamps)} tokens, {rate} | context {len(self.tokens)} of {self.n_ctx} tokens")

    def record(self, *, prompt: list[int], turn: int, reply: Reply, message: str) -> None:
        """The cache keeps what it evaluated; what it has not yet goes in with the next message."""
        self.exchanges.append(len(self.tokens) + len(prompt) - turn)
        n_past = cached_tokens(self.ctx)
        said, text = reply.tokens[:-1] if reply.finish == "end" else reply.tokens, "".join(reply.text)  # the end
        # token is never evaluated: the format's own end follows
        if reply.finish == "stop":  # A stop string ended the reply, perhaps mid-token or across tokens, so the tokens
            # drawn are not what was printed: the printed reply, tokenized again, goes in with the next message
            # (simpler than finding the token the cut fell in and tokenizing only the rest of it, for a few tokens)
            said, n_past = tokenize(self.vocab, text, add_bos=False) if text else [], len(self.tokens) + len(prompt)
            llama_cpp.llama_memory_seq_rm(self.memory, 0, n_past, -1)
        everything = self.tokens + prompt + said
        self.tokens, self.pending = everything[:n_past], everything[n_past:] + self.reply_end
        self.replies += reply.tokens
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]

    def save(self, path: Path) -> str:
        """/save: the conversation as JSON at `path` and llama.cpp's state beside it: both written whole, or neither."""
        target = Path(os.path.realpath(path))  # a symlink's file is written, not the link replaced
        state = target.with_name(target.name + ".state")
        try:
            modes = new_file_mode(state), new_file_mode(target)  # before anything is written: both or neither
            with temporary_beside(state) as new_state, temporary_beside(target) as new_path:
                mac = save_state(self.ctx, new_state, self.tokens)
                record = {"format": SAVED_FORMAT, "settings": self.settings, "messages": self.messages,
                          "context": {"tokens": self.tokens, "exchanges": self.exchanges, "pending": self.pending,
                                      "replies": self.replies[-SAVED_REPLY_TOKENS:]},
                          "state": {"file": state.name, "hmac": mac, **self.identity}}
                text = json.dumps(record, indent=1, ensure_ascii=False)  # readable messages; token lists on one line:
                text = re.sub(r"(?<=\[)[-\d,\s]+(?=\])", lambda m: " ".join(m[0].split()), text)
                # a file name's bytes that are not UTF-8 (--grammar) as JSON's \udcXX escapes, read back as they were
                new_path.write_text(text + "\n", encoding="utf-8", errors="backslashreplace")
                os.chmod(new_state, modes[0])
                os.chmod(new_path, modes[1])
                os.replace(new_state, state)
                os.replace(new_path, target)
        except OSError as error:  # the new pair was not written whole: the old one, if any, is as it was
            raise ValueError(f"could not save to {shorten(path)}: {error.strerror or error}; nothing was changed") \
                from None
        return f"saved {len(self.messages) // 2} exchange(s) to {shorten(path)} (and {shorten(state.name)})"

    def load(self, saved: dict[str, Any]) -> str:
        """/load: continue a conversation read_saved checked, from its saved state if it can be trusted, else anew."""
        context, path, state = saved["context"], saved["path"], saved["state"]
        if wrong := tokens_problem(context, n_vocab=llama_cpp.llama_vocab_n_tokens(self.vocab)):
            raise ValueError(f"cannot load {shorten(path)}: {wrong}")
        beside = Path(os.path.realpath(path)).with_name(state["file"])  # as /save wrote it, through a symlink
        if any(state.get(key) != value for key, value in self.identity.items()):
            distrust = "it was saved by another model file, llama.cpp build or context settings"
        else:
            try:  # before anything changes: a state of a long conversation takes seconds to hash
                distrust = untrusted(beside, str(state.get("hmac")), ctx=self.ctx, tokens=len(context["tokens"]))
            except KeyboardInterrupt:
                raise ValueError("loading was stopped; the conversation is as it was") from None
        self.reset()
        if distrust := distrust or load_state(self.ctx, beside, context["tokens"]):
            note(f"note: not using {shorten(state['file'])} ({distrust}); evaluating the conversation again",
                 quiet=self.quiet)
            try:
                evaluate(self.ctx, context["tokens"])
            except KeyboardInterrupt:
                self.reset()
                raise
        self.tokens, self.exchanges, self.pending = context["tokens"], context["exchanges"], context["pending"]
        self.replies, self.messages = context["replies"], saved["messages"]
        self.settings.update(saved["settings"])
        self.settings["seed"] = draw_seed(self.settings["seed"])
        used = f"{len(self.tokens)} tokens of context"
        return f"loaded {len(self.messages) // 2} exchange(s) from {shorten(path)}: {used}"


def flags_over_saved(saved: dict[str, Any], given: dict[str, Any]) -> str:
    """--load with flags: each chat setting typed as a flag replaces the saved one; which saved values it replaced."""
    typed = {name: given[name] for name in CHAT_SETTINGS if name in given and given[name] != saved[name]}
    if "system" in typed:  # it is part of the conversation's first message, already in the saved tokens
        fail("--system cannot change a saved conversation (its first message holds the system prompt); "
             "after loading, /set system starts a new one", code=2)
    replaced = ", ".join(f"{name} = {saved[name]!r}" for name in typed)
    saved.update(typed)
    return replaced


def read_saved(path: Path, *, n_ctx: int) -> dict[str, Any]:
    """A /save file, checked whole before anything changes (its vocabulary by load); ValueError says what is wrong.
    A file larger than any /save of this context can be is refused after reading only that much of it."""
    try:
        saved = json.loads(read_bounded(path, limit=(n_ctx + SAVED_REPLY_TOKENS) * SAVED_BYTES_PER_TOKEN))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"cannot load {shorten(path)}: {getattr(error, 'strerror', None) or error}") from None
    if wrong := saved_problem(saved):
        raise ValueError(f"cannot load {shorten(path)}: {wrong}")
    if (length := len(saved["context"]["tokens"]) + len(saved["context"]["pending"])) >= n_ctx:
        raise ValueError(f"{shorten(path)} holds {length} tokens and the context holds {n_ctx}; "
                         "start with a larger --ctx")
    settings = {name: saved["settings"].get(name, DEFAULTS[name]) for name in CHAT_SETTINGS}  # older files lack some
    try:  # a schema or grammar that cannot be used, as a flag's would be
        check_grammar(None, settings)
    except GrammarError as wrong:
        raise ValueError(f"cannot load {shorten(path)}: its settings: {wrong}") from None
    return {**saved, "settings": settings, "path": path}


def saved_problem(saved: Any) -> str | None:
    """What is wrong with a /save file's contents, naming the field and its value; None if nothing is."""
    if not isinstance(saved, dict) or saved.get("format") != SAVED_FORMAT:
        found = reprlib.repr(saved.get("format")) if isinstance(saved, dict) else f"a JSON {type(saved).__name__}"
        return f"it is not a conversation saved by phi_console.py (format {found}, not {SAVED_FORMAT!r})"
    if wrong := shape_problem(saved, SAVED_CONVERSATION, "") or tokens_problem(saved["context"], n_vocab=None):
        return wrong
    file, exchanges, length = saved["state"]["file"], saved["context"]["exchanges"], len(saved["context"]["tokens"])
    if Path(file).name != file or file in ("", "..") or "\0" in file:  # a NUL is no file name either
        return f"state.file must name a file beside it (got {reprlib.repr(file)})"
    for index, start in enumerate(exchanges):  # each starts inside the tokens: make_room slides the cache by them
        if not 0 < start < length:
            return f"context.exchanges[{index}] is {start}, not a position in the context (1..{length - 1})"
    if exchanges != sorted(set(exchanges)):
        return f"context.exchanges must be in order (got {reprlib.repr(exchanges)})"
    for name in [name for name in CHAT_SETTINGS if name in saved["settings"]]:  # a missing one takes its default
        if wrong := problem(name, saved["settings"][name]):
            return f"settings.{name} {wrong}"
    return None


def tokens_problem(context: dict[str, Any], *, n_vocab: int | None) -> str | None:
    """Which of a saved context's tokens is no token id (of this model's n_vocab, once it is known), if any."""
    known = f"a token of this model (0..{n_vocab - 1})" if n_vocab else "a token id (an integer >= 0)"
    for field in ("tokens", "pending", "replies"):
        for index, token in enumerate(context[field]):
            if not 0 <= token < (n_vocab or 2**31):
                return f"context.{field}[{index}] is {token}, not {known}"
    return None


# --- Answers (machinery): replies a program can use: a JSON schema or grammar they follow, stop strings ---------------
GRAMMAR_MAX_BYTES = 2**20  # far more than any grammar; a longer file (or /dev/zero) is refused, not read whole
SCHEMA_MAX_BYTES = 2**24  # real schemas run to megabytes (Kubernetes' own); a longer file is refused, not read whole
GRAMMAR_MAX_DEPTH = 1000  # the most nested groups a grammar may have; llama.cpp's parser crashes on deeper ones
GROUPS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^]\\])*\]|#[^\n]*|([()])')  # a grammar's parentheses, not in text
# A reply to a schema is one line of JSON spaced as Python's json.dumps spaces it: a program reads it a line at a time,
# and a model cannot drift into blank lines and spend its tokens there (any whitespace would be valid JSON)
SCHEMA_SPACE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
SCHEMA_STRICT = {"lenient": False, "coerce_one_of": False}  # every keyword enforced, or the schema refused
SCHEMA_DATA = {"enum", "const", "default", "examples"}  # keywords whose values are JSON data, not schemas
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}  # names -> schemas
CALENDAR_DAY = (r"[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-"
                r"(?:0[1-9]|1[0-9]|2[0-8]))|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29")
CALENDAR_FORMATS = {"date": f"^(?:{CALENDAR_DAY})$", "date-time": f"^(?:{CALENDAR_DAY})[Tt].*$"}
SCHEMA_OPEN = {"additionalProperties", "patternProperties", "unevaluatedProperties"}  # a schema's say on extra keys
INCOMPLETE = 3  # exit status of a reply cut short before its grammar was complete, so that a script notices
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama.cpp's llama_token_data


class GrammarError(ValueError):
    """A JSON schema or grammar that cannot shape a reply: one line, and exit 2 (run()) unless in a chat."""


class Grammar:
    """A GBNF grammar, on llama.cpp's grammar sampler. It and Schema answer the same four questions for Reply."""

    def __init__(self, sampler: llama_cpp.llama_sampler_p, vocab: llama_cpp.llama_vocab_p) -> None:
        self.sampler, self.vocab = sampler, vocab

    def allows(self, token: int) -> bool:
        _, logits = apply_sampler(self.sampler, np.zeros(1, dtype=np.float32), ids=np.array([token]))
        return bool(logits[0] > -np.inf)

    def mask(self, logits: np.ndarray) -> None:
        """Every token it refuses gets the logit -inf."""
        logits[:] = apply_sampler(self.sampler, logits)[1]

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def complete(self) -> bool:
        """It allows the end of generation only once what it accepted is complete."""
        return self.allows(llama_cpp.llama_vocab_eos(self.vocab))

    def stuck(self) -> str:
        return "the grammar allows no token after it; no reply holds a NUL, a special token or an unknown id"

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


class Schema:
    """A JSON schema, on llguidance's matcher: the engine llama.cpp itself uses for schemas, which checks a token in
    about a microsecond and computes the whole vocabulary's mask in about ten."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def allows(self, token: int) -> bool:
        return self.matcher.validate_tokens([token]) == 1 and not self.matcher.is_error()

    def mask(self, logits: np.ndarray) -> None:
        bits = np.zeros((len(logits) + 31) // 32, dtype=np.int32)  # a bit for each token: may it come next?
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        logits[np.unpackbits(bits.view(np.uint8), bitorder="little")[:len(logits)] == 0] = -np.inf
        if self.matcher.is_error():  # a limit of its parser reached: it would allow only the end, as if complete
            logits[:] = -np.inf

    def stuck(self) -> str:
        return f"llguidance could not go on ({one_line(self.matcher.get_error().split('<state>')[0])})"

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    def complete(self) -> bool:
        return self.matcher.is_accepting()

    def free(self) -> None:
        pass


def constraint(vocab: llama_cpp.llama_vocab_p | None, settings: dict[str, Any], *,
               end: int | None = None) -> Grammar | Schema | None:
    """What shapes the reply: JSON_SCHEMA on llguidance, GRAMMAR's file on llama.cpp's grammar sampler (whose meaning
    llguidance's conversion would change), or None. Without a vocabulary it is only checked; `end` is <|end|>'s id."""
    schema, path = settings["json_schema"], settings["grammar"]
    if schema is not None and path is not None:
        raise GrammarError("a JSON schema and a grammar file are both set; set one of them to none")
    if schema is not None:
        grammar = schema_grammar(schema)
        if vocab is None:
            return None
        matcher = llguidance.LLMatcher(schema_tokenizer(vocab, end), grammar, log_level=0)
        if matcher.is_error():  # what only the vocabulary shows
            raise GrammarError(f"the JSON schema cannot be used: {one_line(matcher.get_error())}")
        return Schema(matcher)
    if path is None:
        return None
    what = f"the grammar file {shorten(path)}"
    try:
        text = read_text(path, limit=GRAMMAR_MAX_BYTES)
    except (OSError, ValueError) as error:
        raise GrammarError(f"{what} cannot be used: {getattr(error, 'strerror', None) or error}") from None
    # llama.cpp parses and samples by recursion, one C frame per nested group: a deep one would overflow its stack
    parentheses = (+1 if c == "(" else -1 for c in GROUPS.findall(text) if c)
    if (depth := max(itertools.accumulate(parentheses), default=0)) > GRAMMAR_MAX_DEPTH:
        raise GrammarError(f"{what} nests {depth} groups deep, more than the {GRAMMAR_MAX_DEPTH} llama.cpp can take")
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:  # llama.cpp's parser writes why a grammar does not parse to stderr itself
        os.dup2(said.fileno(), 2)
        LlamaLog.errors.clear()  # and a left recursion to its log
        try:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root") if text.strip() else None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        lines = said.read().decode("utf-8", "replace").splitlines() + LlamaLog.errors
    reason = next((line.split("parsing grammar: ")[-1] for line in lines if line.strip()), "it is empty")
    if not grammar and (vocab or not reason.startswith("no vocab")):
        raise GrammarError(f"{what} does not parse ({reason})")
    return Grammar(grammar, vocab) if grammar else None


def check_grammar(vocab: llama_cpp.llama_vocab_p | None, settings: dict[str, Any], *, end: int | None = None) -> None:
    """A schema or grammar that cannot be used is refused (GrammarError) when it is set, not at every reply after."""
    if shaper := constraint(vocab, settings, end=end):
        shaper.free()


@functools.lru_cache(maxsize=16)
def schema_grammar(value: str) -> str:
    """llguidance's grammar for JSON_SCHEMA: the schema as JSON text, or the path of a file that holds it. Whatever
    llguidance cannot enforce, it refuses, and so does this (GrammarError, with its reason)."""
    is_text = value.lstrip()[:1] in ("{", "[") or value.strip() in ("true", "false")
    what, hint = "the JSON schema" if is_text else f"the JSON schema file {shorten(value)}", ""
    try:
        text = value if is_text else read_text(value, limit=SCHEMA_MAX_BYTES)
        schema = json.loads(text, parse_constant=not_json, parse_float=finite)  # Python's takes NaN; llguidance not
        # A schema's own "x-guidance" options may not loosen it: what is refused stays refused
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(closed(schema)), defaults=SCHEMA_SPACE,
                                                                overrides=SCHEMA_STRICT)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except RecursionError:
        error = f"it nests deeper than {sys.getrecursionlimit()} levels"
    except json.JSONDecodeError as wrong:
        error, hint = str(wrong), "; --json-schema takes the schema's JSON text, or a file that holds it"
    except (OSError, ValueError) as wrong:
        error = getattr(wrong, "strerror", None) or str(wrong)
    if error:
        if "coerce_one_of" in error:  # an option the overrides keep off: anyOf is what the reply can be held to
            error = "oneOf is enforced only where no value can fit two of its schemas; use anyOf"
        raise GrammarError(f"{what} cannot be used: {one_line(error)}{hint}")
    return grammar


def closed(schema: Any, *, combined: bool = False) -> Any:
    """The schema as ollama's format (llama.cpp's converter) and OpenAI's strict mode read it: an object holds only the
    properties it names, unless it says otherwise or is one of allOf's parts, and a pattern matches the whole string.
    That is narrower than the specification's reading, so a reply that fits it fits the schema as written too."""
    if isinstance(schema, list):
        return [closed(part, combined=combined) for part in schema]
    if not isinstance(schema, dict):
        return schema
    walked = {}
    for key, value in schema.items():
        if key in SCHEMA_DATA:
            walked[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):  # names, each with its schema: no name is a keyword
            walked[key] = {name: closed(part) for name, part in value.items()}
        else:
            walked[key] = closed(value, combined=key == "allOf")
    schema = walked
    if isinstance(pattern := schema.get("pattern"), str):  # whole-string: its own ^ and $ at the ends add nothing
        pattern = pattern.removeprefix("^")
        pattern = pattern[:-1] if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
        schema["pattern"] = f"^(?:{pattern})$"
    if isinstance(form := schema.get("format"), str) and form in CALENDAR_FORMATS:  # llguidance's allow Feb 29th
        schema["allOf"] = [*schema.get("allOf", []), {"pattern": CALENDAR_FORMATS[form]}]  # in every year
    names, required = schema.get("properties"), schema.get("required", [])
    if isinstance(names, dict) and not (combined or SCHEMA_OPEN & schema.keys()) and isinstance(required, list) \
            and set(map(str, required)) <= names.keys():
        schema["additionalProperties"] = False
    return schema


@functools.lru_cache(maxsize=2)
def schema_tokenizer(vocab: llama_cpp.llama_vocab_p, end: int) -> llguidance.LLTokenizer:
    """llguidance's view of a loaded vocabulary (about 0.2 s, once), ending at <|end|>; special tokens are no text."""
    return llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=end)


def not_json(word: str) -> NoReturn:
    raise ValueError(f"{word} is not JSON")


def finite(text: str) -> float:
    if not math.isfinite(number := float(text)):
        raise ValueError(f"{text} is beyond a double's range")
    return number


def one_line(text: str) -> str:
    return " ".join(text.split())[:500] or "no reason given"


def read_text(path: str, *, limit: int) -> str:
    """A file a setting names, read again when it changed (a pipe, <(...), only once: its text is then gone)."""
    info = os.stat(path)
    return read_file(path, (info.st_ino, *([info.st_mtime_ns, info.st_size] if stat.S_ISREG(info.st_mode) else [])),
                     limit)


@functools.lru_cache(maxsize=4)
def read_file(path: str, stamp: tuple[int, ...], limit: int) -> str:
    """A file (a regular file or a pipe) no longer than `limit`, as UTF-8; a BOM is no text."""
    return read_bounded(Path(path), limit=limit, pipes=True).decode("utf-8").lstrip("\ufeff")


def sample(ctx: llama_cpp.llama_context_p, reply: Reply, index: int = -1) -> int | None:
    """The next token from the logits of the batch's token `index`. Under a schema or grammar, as llama.cpp's own
    sampling loop (common/sampling.cpp): the chain draws, the constraint checks that token alone, and only if it
    refuses it is the draw made again with every refused token masked first (the costly step). The penalty sees the
    token once. Tokens whose printed text differs from what the constraint reads (special tokens, [PAD...]) are
    never drawn under one; None where it allows no token at all: llama.cpp would throw, and end the process."""
    if reply.constraint is None:
        return llama_cpp.llama_sampler_sample(reply.sampler, ctx, index)  # llama.cpp draws and accepts in one call
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(len(reply.unprintable),))
    token, _ = apply_sampler(reply.sampler, logits)
    if reply.unprintable[token] or not reply.constraint.allows(token):  # refused
        allowed = np.where(reply.unprintable, -np.inf, logits).astype(np.float32)
        reply.constraint.mask(allowed)
        if np.isneginf(allowed).all():
            return None
        token, _ = apply_sampler(reply.sampler, allowed)
    reply.constraint.accept(token)
    llama_cpp.llama_sampler_accept(reply.sampler, token)
    return token


def apply_sampler(sampler: llama_cpp.llama_sampler_p, logits: np.ndarray,
                  ids: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """A sampler applied to tokens' logits (every token's, or those of `ids`), as llama_sampler_sample applies it:
    the token it selected (a chain's draw), and the logits as it left them (a grammar's refusals at -inf)."""
    data = np.empty(len(logits), dtype=TOKEN_DATA)
    data["id"], data["logit"], data["p"] = np.arange(len(logits)) if ids is None else ids, logits, 0.0
    array = llama_cpp.llama_token_data_array(data.ctypes.data_as(llama_cpp.llama_token_data_p), len(data), -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return array.data[max(array.selected, 0)].id, data["logit"]


@functools.lru_cache(maxsize=2)
def unprintable(vocab: llama_cpp.llama_vocab_p, hidden: frozenset[int], stops: frozenset[int]) -> np.ndarray:
    """For each token, whether what the reply prints for it differs from what a grammar reads: special tokens (the
    reply hides them; a grammar reads "<|user|>") and any llama.cpp prints as nothing (Phi-3's [PAD32011])."""
    return np.array([token not in stops and (token in hidden or token_bytes(vocab, token) != token_bytes(
        vocab, token, special=True)) for token in range(llama_cpp.llama_vocab_n_tokens(vocab))])


def incomplete(reply: Reply) -> str | None:
    """Why the reply ended before its schema or grammar was complete, and what to do; None if it was complete, had
    none, or the user stopped it. A stop string always cuts a grammar's text short."""
    if reply.constraint is None or reply.finish == "stopped":
        return None
    if reply.finish == "stop":
        why = "a stop string ended it before its grammar was complete; remove the stop strings its text can hold"
    elif reply.finish == "grammar":
        why = f"it can never be complete: {reply.constraint.stuck()}"
    elif reply.constraint.complete():
        return None
    else:
        more = "--sample-len" if reply.room == reply.asked else "--ctx (or shorten the prompt)"
        why = f"its {reply.room} tokens ended before its grammar was complete; raise {more}"
    return f"the reply is incomplete: {why}"


class StopStrings:
    """A reply's text as it may be printed: feed() takes each piece and returns what can no longer be part of a stop
    string, holding back an end that could still begin one; from the first stop string on, nothing (`found`). Each
    character is matched once, against the stop strings begun so far and those it begins, however long they are."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.found = stops, "", False
        self.begun: list[tuple[int, int]] = []  # (stop string, how many of its characters the text ends with)
        self.starting: dict[str, list[int]] = {}  # a character, and the stop strings that begin with it
        for index, stop in enumerate(stops):
            self.starting.setdefault(stop[0], []).append(index)

    def feed(self, piece: str, *, final: bool = False) -> str:  # final: the reply's last piece, which releases all
        text, self.held, starts = self.held + piece, "", []
        for at, char in enumerate(piece, start=len(text) - len(piece)):
            begun = [(stop, n + 1) for stop, n in self.begun if self.stops[stop][n] == char]
            begun += [(stop, 1) for stop in self.starting.get(char, [])]
            starts += [at + 1 - n for stop, n in begun if n == len(self.stops[stop])]
            self.begun = [(stop, n) for stop, n in begun if n < len(self.stops[stop])]
        if starts or self.found:
            self.found = True
            return text[:min(starts, default=0)]
        if not final:  # the longest end of the text that begins a stop string
            self.held = text[len(text) - max((n for _, n in self.begun), default=0):]
        return text[:len(text) - len(self.held)]


def read_texts(text: str) -> object:
    """A list setting typed: a JSON list is its items ('["\\n\\n", "Q:"]'), 'none' no items, anything else one text."""
    with contextlib.suppress(ValueError, RecursionError):
        if isinstance(items := json.loads(text), list):
            return items  # problem() checks that each is text
    return [] if text.strip().lower() == "none" else [text]


# --- Many prompts (machinery): PARALLEL prompts at a time as sequences of one context, read as they are answered -----
SHARED_MIN = 16  # prompt tokens two prompts must share at their start before one copies the other's cache
DONE_MAX = 256  # finished lines held back for an earlier one still generating; past this, no new line starts
ANSWER_KEYS = ("reply", "tokens", "finish", "error")  # the run's keys on an output line, which no input line may carry


@dataclasses.dataclass
class Job:
    """One prompt of --prompts (a line) or of Answers (a row): what it asks and, while it runs, where it stands."""
    line: int  # its line in the file, or its row
    prompt: str | None  # None where the line could not be read
    settings: dict[str, Any]  # every chat setting: its own over the run's
    extra: dict[str, Any]  # its other keys, which come back on its answer
    seed: int
    error: str | None = None  # why it cannot be answered: it never runs
    tokens: list[int] = dataclasses.field(default_factory=list)  # its prompt, as the model is fed it
    room: int = 0  # the most tokens its reply may have
    seq: int = 0  # its sequence in the context while it runs
    n_past: int = 0  # how many of its tokens the cache holds
    reply: Reply | None = None
    at: int | None = None  # the batch index of its last token, whose logits the next draw reads
    copy: tuple[Job, int] | None = None  # a running job whose evaluated start it copies, and that start's length


def open_prompts(settings: argparse.Namespace) -> BinaryIO:
    """--prompts' file (a pipe too), opened before anything slow: its lines are read as they are answered."""
    if settings.chat or settings.load is not None or settings.prompt is not None:
        fail("--prompts answers the prompts of its file: give it without --chat, --load or -p", code=2)
    if settings.prompts == "-":
        return sys.stdin.buffer
    try:
        return open_regular(settings.prompts, pipes=True)
    except OSError as error:
        fail(f"--prompts: cannot read {shorten(settings.prompts)}: {error.strerror or error}", code=2)


def read_jobs(source: BinaryIO, run: Run, defaults: dict[str, Any], *, seed: int) -> Iterator[Job]:
    """Each line that is not blank, as a Job, read and checked when a sequence is free for it: a prompt, or a JSON
    object with a "prompt" and any chat setting. What is wrong with a line is that line's error; the others go on.
    Lines end at \\n only (and \\r\\n); a BOM opens the file; a line longer than the context could hold is not kept."""
    limit = run.n_ctx * TOKEN_MAX_BYTES + GRAMMAR_MAX_BYTES  # a prompt the context holds, and settings beside it
    for number in itertools.count(1):
        with ctrl_c(at_once=True):  # a pipe may keep it waiting for its next line
            data = rest = source.readline(limit + 1)
            while len(data) > limit and rest[-1:] not in (b"\n", b""):  # the rest of a line too long to keep
                rest = source.readline(2**20)
        if not data:
            return
        text = data.decode("utf-8", "replace").removeprefix("\ufeff" if number == 1 else "").rstrip("\r\n")
        if len(data) > limit:
            yield Job(number, None, defaults, {}, reply_seed(seed, number), error=f"line {number} is longer than the "
                      f"{run.n_ctx} tokens of context could hold; shorten it or raise --ctx")
        elif text.strip():
            try:
                item = json.loads(text) if text.lstrip().startswith("{") else {"prompt": text}
            except (ValueError, RecursionError) as error:
                yield Job(number, None, defaults, {}, reply_seed(seed, number), error=f"line {number} is not JSON "
                          f"({error})")
                continue
            yield new_job(number, item, run, defaults, seed=reply_seed(seed, number))


def new_job(number: int, item: Any, run: Run, defaults: dict[str, Any], *, seed: int) -> Job:
    """A line's (or row's) item as a Job: its prompt, settings, seed (its own, else `seed`) and tokens, or its error."""
    item = item if isinstance(item, dict) else {}
    own = {name: normal(name, item[name]) for name in CHAT_SETTINGS if name in item}
    extra = {key: value for key, value in item.items() if key not in ("prompt", *own, *ANSWER_KEYS)}
    seed = own["seed"] if type(own.get("seed")) is int else seed
    job = Job(number, item.get("prompt"), {**defaults, **own}, extra, seed)
    job.error = job_problem(job, item, run)
    if job.error and isinstance(job.prompt, str) and len(job.prompt) > SHOWN_CHARS:
        job.prompt = shorten(job.prompt)  # an answer never echoes whole a prompt too long to answer
    return job


def normal(name: str, value: Any) -> Any:
    """A setting as JSON gives it, in the type a flag would: a schema as an object is its text, a stop one text."""
    if name == "json_schema" and isinstance(value, (dict, bool)):
        return json.dumps(value)
    if name == "stop" and (value is None or isinstance(value, str)):
        return [] if value is None else [value]
    return value


def job_problem(job: Job, item: dict[str, Any], run: Run) -> str | None:
    """Why a job cannot be answered, checked as a flag's value is, its schema or grammar against the vocabulary, and
    its prompt against the context; None if it can, with its tokens and room set."""
    if not isinstance(job.prompt, str) or not job.prompt.strip():
        return f'line {job.line} needs a "prompt" that is non-empty text'
    if taken := [key for key in ANSWER_KEYS if key in item]:
        return f"line {job.line} has {taken[0]!r}, a key of the answer; rename it"
    for name in [name for name in CHAT_SETTINGS if name in item]:
        if wrong := problem(name, job.settings[name]):
            return f"line {job.line}: {name} {wrong}"
    if len(job.prompt.encode("utf-8", "replace")) > run.n_ctx * TOKEN_MAX_BYTES:  # refused before it is tokenized
        return f"line {job.line}'s prompt is longer than the {run.n_ctx} tokens of context could hold; shorten it"
    vocab = llama_cpp.llama_model_get_vocab(run.model)
    try:
        check_grammar(vocab, job.settings, end=run.specials["<|end|>"])
    except GrammarError as wrong:
        return f"line {job.line}: {wrong}"
    job.tokens = tokenize(vocab, "", add_bos=True) + user_turn(vocab, job.prompt, run.specials,
                                                               system=job.settings["system"])
    if len(job.tokens) >= run.n_ctx:
        return too_long(len(job.tokens), n_ctx=run.n_ctx, most=llama_cpp.llama_model_n_ctx_train(run.model))
    job.room = min(job.settings["sample_len"], run.n_ctx - len(job.tokens) + 1)
    return None


def answer_all(run: Run, jobs: Iterator[Job], *, parallel: int, seed: int) -> int:
    """--prompts: one JSON line on stdout for each prompt of the file, in its order, as soon as it and every one before
    it are answered; the count, speed and seed on stderr, the seed also when Ctrl-C ends the run."""
    counts, began = collections.Counter(), time.perf_counter()
    try:
        with progress("prompts", total=None, unit="prompt") as bar:
            for line in answers(run, jobs, parallel=parallel, counts=counts):
                write_out(json.dumps(line, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")
                bar.update()
        if not counts["answered"]:
            fail("--prompts: the file holds no prompt", code=2)
    finally:
        rate = speed(counts["generated"], time.perf_counter() - began)
        note(f"answered {counts['answered']} prompts | prompt tokens: {counts['evaluated']} evaluated, "
             f"{counts['shared']} shared | generated: {counts['generated']} tokens, {rate} | seed {seed}",
             quiet=run.quiet)
    return 1 if counts["errors"] else INCOMPLETE if counts["incomplete"] else 0


def answers(run: Run, jobs: Iterable[Job], *, parallel: int, counts: collections.Counter) -> Iterator[dict[str, Any]]:
    """Each job's answer, in the jobs' order, up to `parallel` at a time as sequences of one context: each step is one
    llama_decode with the next token of every sequence that generates and the prompt tokens of those that start, and
    a finished sequence's place goes to the next job at once. Jobs are taken as places free up, so memory holds what
    is in flight; the context holds what the jobs in flight can need, made anew (when idle) for one that needs more."""
    jobs, vocab = iter(jobs), llama_cpp.llama_model_get_vocab(run.model)
    first = list(itertools.islice(jobs, parallel))  # the first jobs size the context
    pool, ctx = sum(len(job.tokens) + job.room for job in first if not job.error), None
    waiting = itertools.chain(enumerate(first), zip(itertools.count(len(first)), jobs))
    running: dict[int, Job] = {}
    done: dict[int, dict[str, Any]] = {}
    held, written, exhausted, batch = None, 0, False, llama_cpp.llama_batch_init(BATCH, 0, 1)
    try:
        while running or held or not exhausted:
            while len(running) < parallel and len(done) < DONE_MAX:  # a free sequence takes the next job
                index, job = held or next(waiting, (None, None))
                held, exhausted = None, job is None
                if job is None:
                    break
                if job.error:
                    done[index] = answered(job, error=job.error)
                    continue
                need = len(job.tokens) + job.room
                if ctx is None or need > pool - sum(len(other.tokens) + other.room for other in running.values()):
                    if running:  # it waits for the room those in flight will leave
                        held = index, job
                        break
                    if ctx is not None:
                        llama_cpp.llama_free(ctx)
                    pool = max(pool, need)
                    advice = f"lower --parallel ({parallel}), --sample-len or --ctx ({run.n_ctx})"
                    ctx, made = new_context(run.model, n_ctx=pool, sequences=parallel, **run.context, advice=advice)
                    pool = made["n_ctx"]  # as llama.cpp made it, rounded up: room that jobs in flight may share
                    llama_cpp.llama_set_abort_callback(ctx, ABORT, None)  # Ctrl-C stops a step between graph nodes
                job.seq = min(set(range(parallel)) - {other.seq for other in running.values()})
                job.reply = Reply(vocab, job.settings, specials=run.specials, seed=job.seed, room=job.room)
                job.copy = shared_start(job, running.values())  # a start another prompt evaluates: copied
                running[index] = job
            if running:
                step(ctx, batch, running.values(), counts)
            for index, job in list(running.items()):
                if job.at is not None:
                    job.reply.next(ctx, job.at)
                if job.reply.finish:  # its place goes to the next job
                    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), job.seq, -1, -1)
                    with job.reply as reply:
                        done[index] = answered(job, reply=reply)
                    counts["generated"] += len(reply.tokens)
                    del running[index]
            while written in done:  # in order, each answer as soon as it and every one before it are done
                line = done.pop(written)
                counts.update(answered=1, errors="error" in line and "reply" not in line,
                              incomplete="error" in line and "reply" in line)
                yield line
                written += 1
    finally:
        llama_cpp.llama_batch_free(batch)
        for job in running.values():
            job.reply.__exit__()
        if ctx is not None:
            llama_cpp.llama_free(ctx)


def shared_start(job: Job, others: Iterable[Job]) -> tuple[Job, int] | None:
    """The running job whose tokens share the longest start with this one's (SHARED_MIN at least; never its last
    token, evaluated for its logits), and how long that start is: its cache is copied once evaluated."""
    best: tuple[Job, int] | None = None
    for other in others:
        length = len(os.path.commonprefix([other.tokens[:-1], job.tokens[:-1]]))
        if length >= max(SHARED_MIN, best[1] + 1 if best else 0):
            best = other, length
    return best


def step(ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch, jobs: Iterable[Job],
         counts: collections.Counter) -> None:
    """One llama_decode: the last token drawn of each sequence that generates, then prompt tokens of those that start,
    up to BATCH; a prompt's last token in a step of its own, as the one-shot run evaluates it."""
    memory, jobs, n = llama_cpp.llama_get_memory(ctx), list(jobs), 0
    for job in jobs:  # a start another prompt has evaluated by now is copied, not evaluated again
        if (source := job.copy) and (source[0].reply is None or source[0].n_past >= source[1]):
            if source[0].reply is not None:  # else it ended before: this prompt evaluates its start itself
                llama_cpp.llama_memory_seq_cp(memory, source[0].seq, job.seq, 0, source[1])
                job.n_past, counts["shared"] = source[1], counts["shared"] + source[1]
            job.copy = None

    def add(token: int, job: Job, logits: bool) -> None:
        nonlocal n
        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, job.n_past, 1, logits
        batch.seq_id[n][0] = job.seq
        job.n_past += 1
        job.at = n if logits else None
        n += 1

    for job in jobs:
        if job.reply.tokens:  # generating: its last token goes in, and its logits are the next draw's
            add(job.reply.tokens[-1], job, True)
    for job in jobs:
        last = len(job.tokens) - 1
        if job.reply.tokens or job.copy or n == BATCH:
            continue
        chunk = [last] if job.n_past == last else range(job.n_past, min(last, job.n_past + BATCH - n))
        for position in chunk:  # the last token alone, with its logits
            add(job.tokens[position], job, position == last)
            counts["evaluated"] += 1
    batch.n_tokens = n
    status = llama_cpp.llama_decode(ctx, batch) if n else 0
    raise_noted()  # after DECODE_ABORTED too: Ctrl-C stopped it
    if status != 0:
        fail("llama.cpp failed to evaluate a batch of prompts")


def answered(job: Job, *, reply: Reply | None = None, error: str | None = None) -> dict[str, Any]:
    """A prompt's answer: its own keys, the prompt, the reply as a one-shot run prints it, the seed, the tokens
    generated and why the reply ended, and what went wrong, if anything."""
    line = {**job.extra, "prompt": job.prompt, "seed": job.seed}
    if reply is not None:
        line.update(reply="".join(reply.text), tokens=len(reply.tokens), finish=reply.finish)
        error = incomplete(reply)
    return {**line, "error": error} if error else line


# --- Ray Data (machinery): the --prompts engine as a batch stage, for more machines than one ------------------------
class Answers:
    """`ds.map_batches(phi_console.Answers, fn_constructor_kwargs={...}, compute=ray.data.ActorPoolStrategy(size=N))`:
    one load per actor, then each batch (a dict of columns: "prompt" and any chat setting) answered on the --prompts
    engine, PARALLEL rows at a time; its columns come back with reply, seed, tokens, finish and error added, as
    --prompts writes them (None where a row has none). A bad row is its error; a failure of llama.cpp raises, and
    Ray runs the batch again. A row without its own seed gets the run's plus a number its prompt's text gives, so
    that the replies do not depend on how Ray cuts the data into batches."""

    def __init__(self, **given: Any) -> None:
        """Every setting checked as its flag is (ValueError, in the same words), then main()'s download and load;
        quiet unless quiet=False. `prompt`, `chat`, `prompts` and `load` have no place here."""
        settings = {**DEFAULTS, "quiet": True, **{name: cell(value) for name, value in given.items()}}
        for name in given:
            if name not in SETTINGS.keys() - {"prompt", "chat", "prompts"} | {"quiet"}:
                raise ValueError(f"Answers takes no setting {name!r}")
            if name != "quiet" and (wrong := problem(name, settings[name])):
                raise ValueError(f"{name} {wrong}")
        check_grammar(None, settings)
        route_llama_log(verbose=False)
        with ready_run(settings, split=False, quiet=settings["quiet"], verbose=False) as (self.run, _, _):
            self.defaults, self.parallel = {name: settings[name] for name in CHAT_SETTINGS}, settings["parallel"]
            self.seed = draw_seed(settings["seed"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = [{name: cell(column[row]) for name, column in batch.items()} for row in range(len(batch["prompt"]))]
        jobs = [new_job(row, {key: value for key, value in item.items() if value is not None}, self.run,
                        self.defaults, seed=reply_seed(self.seed, zlib.crc32(str(item.get("prompt")).encode())))
                for row, item in enumerate(rows)]  # a row's seed: its own, else the run's plus its prompt's number
        try:
            lines = list(answers(self.run, jobs, parallel=self.parallel, counts=collections.Counter()))
        except SystemExit:  # llama.cpp failed (fail() said why on stderr): Ray retries the batch
            raise RuntimeError("llama.cpp failed to answer this batch") from None
        return {**batch, **{key: [line.get(key) for line in lines] for key in ("reply", "seed", *ANSWER_KEYS[1:])}}


def cell(value: Any) -> Any:
    """A cell as Arrow and pandas give it, as JSON would: None or NaN is not given, a whole float is an integer, a
    numpy array a list, a numpy number Python's."""
    if isinstance(value, np.ndarray):
        return [cell(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


# --- Helpers: Ctrl-C and SIGTERM noted, progress bars, files written whole, values read from files --------------------
SHOWN_CHARS = 200  # the most of a name or value from the user that a message shows


def write_out(data: bytes) -> None:
    """Write to stdout at once. The only writer to it: run() tells a reply that could not be written by this frame."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@contextlib.contextmanager
def reply_line() -> Iterator[None]:
    """The reply's line on stdout, ended however the reply ends: done, or stopped by Ctrl-C (its prompt too)."""
    try:
        yield
    finally:
        write_out(b"\n")


class Signals:
    """Ctrl-C, SIGTERM and SIGHUP, as on_signal takes them for the whole run, in the main thread whichever thread the
    kernel picked: raised at once while the network or keyboard is waited on, else noted and acted on where safe."""
    noted: list[int] = []  # seen by llama.cpp's callbacks, which then stop their work; raise_noted() raises them
    at_once = True  # raise at once; once one is raised, later ones are noted, so that its handling is not cut short


def on_signal(signum: int, frame: object) -> None:
    Signals.noted.append(signum)
    if Signals.at_once:
        raise_noted()


def on_lost_signal(unraisable: Any) -> None:
    """sys.unraisablehook: a signal raised where Python can only print it (inside a finalizer, or a callback from C)
    is sent again a moment later, from a thread, to be raised once Python is back where it can be, rather than
    printed and lost; anything else is printed as ever."""
    error = unraisable.exc_value
    if isinstance(error, KeyboardInterrupt):
        signum = signal.SIGINT
    elif isinstance(error, SystemExit) and error.code in [128 + ending for ending in ENDINGS]:
        signum = error.code - 128
    else:
        return sys.__unraisablehook__(unraisable)
    Signals.at_once = True  # it was raised at once, and nothing acted on it
    threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()  # sent now, it would be raised right here


ABORT = llama_cpp.ggml_abort_callback(lambda data: bool(Signals.noted))  # llama.cpp asks between graph nodes


def raise_noted() -> None:
    """Raise what was noted, SIGTERM or SIGHUP first, as the signal would have (KeyboardInterrupt, or exit 128 + it)."""
    if not Signals.noted:
        return
    signum = next((noted for noted in Signals.noted if noted != signal.SIGINT), signal.SIGINT)
    Signals.noted.clear()
    Signals.at_once = False
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def report(*, load: float, prompt: int, restored: int, asked: float, stamps: list[float], seed: int) -> str:
    """The run's last line: the load, the prompt (evaluated, or restored) and the reply, timed; the seed."""
    first = stamps[0] if stamps else time.perf_counter()
    evaluation = speed(prompt, first - asked) if stamps else "stopped"  # a prompt stopped part-way has no speed
    if restored and stamps:
        evaluation = f"{restored} restored from an earlier run, first token in {first - asked:.2f} s"
    rate = speed(len(stamps) - 1, stamps[-1] - first) if stamps else speed(0, 0)
    return (f"loaded in {load:.2f} s | prompt: {prompt} tokens, {evaluation} | "
            f"generated: {len(stamps)} tokens, {rate} | seed {seed}")


def speed(count: int, seconds: float) -> str:
    return f"{count / seconds:.2f} tok/s" if count > 0 and seconds > 0 else "n/a"


def reply_seed(seed: int, index: int) -> int:
    """The seed of a run's index-th reply (a chat's exchange, a line of --prompts): each draws its own numbers."""
    return (seed + index) % (MAX_SEED + 1)


def show_tokens(vocab: llama_cpp.llama_vocab_p, tokens: list[int]) -> None:
    """--verbose: the tokens about to be evaluated, ids and pieces, as llama.cpp's simple example shows its prompt."""
    pieces = [token_bytes(vocab, token, special=True).decode("utf-8", "replace") for token in tokens]
    sys.stderr.write(f"prompt: {len(tokens)} tokens {tokens}\npieces: {pieces}\n")


class LlamaLog:
    """What llama.cpp's log says that the script uses: its error lines, to explain a failure in one line; the nodes of
    a batch's graph, which it logs for each new context: the prompt bar's measure of a first batch (the abort
    callback skips the graph's views, so that bar lags, then catches up when the batch ends)."""
    errors: list[str] = []
    graph_nodes = 0


def route_llama_log(*, verbose: bool) -> None:
    """llama.cpp's log goes to stderr with --verbose; LlamaLog keeps what the script uses of it either way."""

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        if verbose:
            sys.stderr.write(message)
        if level == GGML_LOG_LEVEL_ERROR and message.strip():
            LlamaLog.errors.append(message.strip())
        if nodes := re.search(r"graph: nodes = (\d+)", message):
            LlamaLog.graph_nodes = int(nodes[1])

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    route_llama_log.keep_alive = on_log  # type: ignore[attr-defined]  # llama.cpp holds a raw pointer to it


@contextlib.contextmanager
def prompt_bar(ctx: llama_cpp.llama_context_p, *, total: int) -> Iterator[Callable[[int, int], None]]:
    """A bar over a prompt's tokens that moves within each batch too, from the graph nodes llama.cpp has computed
    (it calls back after each; the first batch is measured against the graph's size as llama.cpp logged it); the
    callback also stops a batch on Ctrl-C. Yields next_batch(start, length), to call before each batch."""
    counted = {"nodes": 0, "per_batch": LlamaLog.graph_nodes, "start": 0, "length": 0}
    with progress("prompt", total=total, unit="tok") as bar:

        def after_node(data: ctypes.c_void_p) -> bool:  # llama.cpp asks this after every graph node; True stops it
            counted["nodes"] += 1
            done = min(counted["nodes"] / counted["per_batch"], 1.0) if counted["per_batch"] else 0.0
            bar.update(counted["start"] + int(counted["length"] * done) - bar.n)
            return bool(Signals.noted)

        def next_batch(start: int, length: int) -> None:
            if counted["start"] < start:  # a batch has finished: every batch computes as many nodes as it did
                counted["per_batch"] = counted["nodes"]
            bar.update(start - bar.n)
            counted.update(nodes=0, start=start, length=length)

        callback = llama_cpp.ggml_abort_callback(after_node)
        llama_cpp.llama_set_abort_callback(ctx, callback, None)
        try:
            yield next_batch
        finally:
            llama_cpp.llama_set_abort_callback(ctx, llama_cpp.ggml_abort_callback(), None)


def cached_tokens(ctx: llama_cpp.llama_context_p) -> int:
    """How many positions sequence 0's KV cache holds (llama.cpp gives the last one's, -1 when empty)."""
    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 0) + 1


def token_array(tokens: list[int]) -> ctypes.Array:
    return (llama_cpp.llama_token * len(tokens))(*tokens)


@contextlib.contextmanager
def ctrl_c(*, at_once: bool) -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM are raised at once, or only noted, for llama.cpp's callbacks and raise_noted() to
    act on where nothing is half done. On leaving, the way before is back; one noted inside is raised if at once."""
    was, Signals.at_once = Signals.at_once, at_once
    try:
        yield
    finally:
        Signals.at_once = was
        if was:
            raise_noted()


def progress(what: str, *, total: float, unit: str) -> hub_tqdm:
    """A bar on stderr like the download's, for work of seconds: shown after a second, only at a terminal; erased."""
    return hub_tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr, delay=1,
                    miniters=1, disable=not sys.stderr.isatty())


def file_digest(path: Path, digest: Any) -> str:
    """The hex digest, by `digest` (a hashlib or hmac object), of a regular file's bytes, read 16 MiB at a time."""
    with open_regular(path) as f, progress("hashing", total=os.fstat(f.fileno()).st_size, unit="B") as bar:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
            bar.update(len(chunk))
            raise_noted()  # Ctrl-C and SIGTERM are answered within a chunk's time
    return digest.hexdigest()


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A new empty file with a unique name (hidden, ending in .tmp) beside path, gone at the end unless renamed; no
    Ctrl-C can leave it behind: one is only noted inside (and raised at the end where it would have been at once)."""
    with ctrl_c(at_once=False):
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.close(descriptor)
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):  # renamed
                os.unlink(name)


def write_whole(path: Path, text: str) -> None:
    """Write a file whole or not at all: a crash or a full disk mid-write leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_beside(path) as partial:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON object the script keeps; {} if it is missing or damaged (it is only ever a shortcut)."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        seen = json.loads(read_bounded(path, limit=KEPT_MAX_BYTES))
        return seen if isinstance(seen, dict) else {}
    return {}


def shape_problem(value: Any, shape: Any, where: str) -> str | None:
    """Why a value read from a file lacks a shape ({key: shape}, [shape] or a type; a bool is no int), or None."""
    kinds = {str: "text", int: "an integer", dict: "an object", list: "a list", bool: "true or false"}
    if isinstance(shape, dict) and isinstance(value, dict):
        inner = (shape_problem(value.get(key), part, f"{where}.{key}".lstrip(".")) for key, part in shape.items())
        return next((wrong for wrong in inner if wrong), None)
    if isinstance(shape, list) and isinstance(value, list):
        inner = (shape_problem(item, shape[0], f"{where}[{index}]") for index, item in enumerate(value))
        return next((wrong for wrong in inner if wrong), None)
    kind = type(shape) if isinstance(shape, (dict, list)) else shape
    return None if type(value) is kind else f"{where} must be {kinds[kind]} (got {reprlib.repr(value)})"


def open_regular(path: Path | str, *, pipes: bool = False) -> BinaryIO:
    """A file opened for reading, if it is a regular one (or with pipes, a pipe): a FIFO, device or folder is an
    OSError, never a wait (the open does not block on a FIFO without a writer, so Ctrl-C and SIGTERM keep working)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)  # Windows: bytes as they are
    descriptor = os.open(path, flags)
    mode = os.fstat(descriptor).st_mode
    if not (stat.S_ISREG(mode) or pipes and stat.S_ISFIFO(mode)):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file")
    os.set_blocking(descriptor, True)  # a pipe is read as it is written; one with no writer is at its end
    return os.fdopen(descriptor, "rb")


def read_bounded(source: Path | BinaryIO, *, limit: int, what: str = "the file", pipes: bool = False) -> bytes:
    """A regular file's or stream's bytes, read at most one byte past `limit` (memory stays flat); more: ValueError."""
    with open_regular(source, pipes=pipes) if isinstance(source, Path) else contextlib.nullcontext(source) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    return data


def shorten(name: object, *, quoted: bool = False) -> str:
    """A name or value from the user as one line: controls escaped, a long one cut in the middle; quoted, as repr."""
    text = repr(name) if quoted else repr(str(name))[1:-1]
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS // 2]}...{text[-SHOWN_CHARS // 2:]}"


def repo_id_ok(name: str) -> bool:
    """Is it a repo name by huggingface_hub's own rule (org/name), that the cache and the hub's links can hold?"""
    with contextlib.suppress(hub_errors.HFValidationError):
        return validate_repo_id(name) is None  # it raises, or returns nothing
    return False


def in_repo_ok(name: str, *, ref: bool = False) -> bool:
    """Is it a file's path in a repo (or with ref, a branch, tag or commit) that stays inside the cache's folder for
    it: '/'-separated parts, none empty, '.' or '..', printable; a ref also without git's forbidden characters?"""
    forbidden = set(" ~^:?*[\\") if ref else set("\\")
    parts_ok = all(part not in ("", ".", "..") for part in name.split("/"))
    return parts_ok and name.isprintable() and not forbidden & set(name)


def new_file_mode(path: Path) -> int:
    """The mode for a file written in place of `path`: its own, or a new file's (the umask's default); OSError for
    anything but a regular file (a FIFO, device, socket or folder is never replaced)."""
    if not os.path.exists(path):
        umask = os.umask(0o022)  # the only way to read it: set it, and set it back
        os.umask(umask)
        return 0o666 & ~umask
    if not stat.S_ISREG(mode := os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return stat.S_IMODE(mode)


def guard_standard_streams() -> None:
    """Put the null device where stdin, stdout or stderr is closed, so that no file opened later takes its number
    (llama.cpp would log into it); Python keeps None for it. A closed stdout leaves the reply nowhere to go."""
    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # for the run's whole life
    if sys.stdout is None:
        fail("stdout is closed: there is nowhere to write the reply")


def read_stdin(*, n_ctx: int) -> str:
    """The text on stdin, read no further than n_ctx tokens could hold (none stands for more than TOKEN_MAX_BYTES):
    a longer pipe is refused at once, before it is tokenized, and memory stays flat."""
    try:
        data = read_bounded(sys.stdin.buffer, limit=n_ctx * TOKEN_MAX_BYTES, what="the prompt on stdin")
    except ValueError as wrong:
        fail(f"{wrong}, more than {n_ctx} tokens of context hold; shorten it or raise --ctx", code=2)
    return data.decode("utf-8", errors="replace").strip()


def stdin_is_piped() -> bool:
    """Is stdin a pipe or a file (`echo ... |`, `< question.txt`), rather than a terminal or nothing?"""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no stdin, or a closed one: not piped
        mode = os.fstat(sys.stdin.fileno()).st_mode
        return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)
    return False


def cpu_name() -> str:
    """The CPU's model name where Linux gives it (else the platform's): a choice measured on one kind of CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[-1].strip()
    return sys.platform


def physical_cores() -> int:
    """llama.cpp's own default thread count; the library's (half the logical CPUs) leaves cores idle."""
    try:  # Linux: one entry per set of hyperthread siblings among the CPUs we may run on
        return max(len({Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
                        for cpu in os.sched_getaffinity(0)}), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run() -> None:
    """Exit codes: 0 done, 1 fault, 2 bad setting, 3 reply short of its grammar's end, 130 Ctrl-C, 143 SIGTERM, 129
    SIGHUP; a reader that stops early (`| head`) ends it quietly."""
    guard_standard_streams()
    sys.unraisablehook = on_lost_signal
    for signum in ENDINGS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # an inherited ignore (a background job's) is kept
            signal.signal(signum, on_signal)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except GrammarError as wrong:  # a JSON schema or grammar that cannot be used: before the download where it can
        fail(str(wrong), code=2)
    except BrokenPipeError:  # `| head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as error:  # from the only writers to stdout, the reply could not be written: a full disk
        if list(traceback.walk_tb(error.__traceback__))[-1][0].f_code is not write_out.__code__:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left unwritten goes nowhere
        fail(f"could not write the reply to stdout: {error.strerror or error}")
    finally:  # as Python ends it gives Ctrl-C its default action back, which would kill the exit itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
