"""Benchmark: phi_console.py against llama.cpp's own llama-bench and the usual llama-cpp-python snippet.

    python tests/benchmark.py

Everything is measured in one run on this machine, with the same number of threads, in RUNS rounds: each round
runs every llama-bench configuration once and each of the script's runs once, so that the machine's drift hits
both alike; a ratio is the median of the rounds' ratios, a figure the median of its rounds:

- the model is Phi-3-mini-shaped (32 layers, n_embd 3072, n_ff 8192, vocab 32064) with random weights,
  quantized to Q4_K_M like the real file: the same size and kernels, so the same cost per token;
- llama-bench and llama-completion are built with CMake from the sdist of the installed llama-cpp-python (same
  llama.cpp source and build flags: requirements.txt's cmake.args, which leave out the AMX-INT8 kernel, then
  CMAKE_ARGS as pip read them); llama-bench's best configuration (`--repack`, `-fa`) counts, and
  llama-completion is the yardstick for a warm rerun's wall time;
- phi_console.py runs through its real code path: the model is served by the tests' local hub, downloaded
  once into the benchmark's HF_HOME, and every measured run starts from that cache.

The results go to tests/BENCHMARKS.md: one section per machine (its CPU, thread count and instruction set),
replaced by that machine's next run; other machines' sections are kept as they are. The first run spends about
15 minutes writing and quantizing the model and building llama.cpp's tools; both are kept in
~/.cache/phi-console-bench (or $PHI_BENCH_CACHE) for later runs, which take 15 minutes to an hour.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_hub import Hub  # noqa: E402
from phi_console import PARALLEL as DEFAULT_PARALLEL, PROMPT as DEFAULT_PROMPT  # noqa: E402
from phi3_models import quantize_q4_k_m, tokenizer_json, write_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "phi_console.py"
CACHE = Path(os.environ.get("PHI_BENCH_CACHE", Path.home() / ".cache" / "phi-console-bench"))
MODEL_REPO, MODEL_FILE = "bench/phi3-mini-random", "phi3-mini-random-Q4_K_M.gguf"
TOKENIZER_REPO = "bench/phi3-tokenizer"
THREADS = len(os.sched_getaffinity(0))  # one per core here (no SMT); the script's own default
GEN_TOKENS, PROMPT_TOKENS, RUNS = 128, 512, 3
BATCH_PROMPTS, SEQUENCES = 8, (1, 2, 4, 8)  # --prompts: how many, and the --parallel counts measured
# A schema for generation under a grammar: random weights write its one string on and on, so the reply stays under the
# grammar for all GEN_TOKENS tokens (and ends incomplete, exit status 3) or closes it early, as a real reply would
SPEED_SCHEMA = json.dumps({"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]})
RESULTS = Path(__file__).resolve().parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Written by `tests/benchmark.py`; do not edit. Each machine has its own section, which its next run of the
benchmark replaces; the sections of other machines are kept as they are.

How the figures are taken. The model is Phi-3-mini-shaped (32 layers, n_embd 3072, n_ff 8192, vocab 32064) with
random weights, quantized to Q4_K_M like the real file: the same size and kernels, so the same cost per token.
`phi_console.py` runs through its real download and cache path (the tests' local hub serves the model once),
with 2 threads, temperature 0, and `--verbose` so that llama.cpp's own timings are in its log. The yardsticks are
built from the same llama.cpp source and build flags as the installed llama-cpp-python: `llama-bench`
(every configuration of `--repack` and `-fa`; the best one counts, for prompts the best without flash attention,
which the script leaves off on a CPU), `llama-completion` and `llama-batched-bench`. Everything runs in
rounds: each round runs every llama-bench configuration once and each of the script's runs once, in turns, so
that the machine's drift hits both alike. A figure is the median of its rounds, with the lowest and highest
round in brackets; a ratio is the median of the rounds' ratios. `--prompts` runs at each count in turns with
llama-batched-bench at that count (`-npp 12 -ntg 128 -kvu -fa off`, the script's layout for generation): both
rates are generated tokens a second with the prompts' evaluation included. Memory is the process's own (Private_Dirty in
`/proc/PID/smaps_rollup`, sampled every 0.1 s in runs of their own), not RSS, which also counts the mapped
file's page cache. The script's prompt figures count everything from the loaded model to the first token
(making the context, restoring a saved prompt); llama-bench's count only its batches, after an untimed warm-up.
"""
# The CMake flags the installed llama-cpp-python was built with: requirements.txt's cmake.args (no AMX-INT8 kernel),
# then CMAKE_ARGS, in the order scikit-build-core passes them
BUILD_FLAGS = [*re.search(r"cmake\.args=(\S+)", (ROOT / "requirements.txt").read_text())[1].split(";"),
               *os.environ.get("CMAKE_ARGS", "").split()]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_model() -> Path:
    target = CACHE / MODEL_FILE
    if not target.exists():
        log("writing a Phi-3-mini-shaped F16 model with random weights (about 7.6 GB, once)...")
        f16 = write_gguf(CACHE / "phi3-mini-random-F16.gguf", logits={}, n_embd=3072, n_ff=8192, n_layer=32,
                         n_head=32, random_weights=True, dtype=np.float16)
        log("quantizing it to Q4_K_M with llama.cpp (a few minutes, once)...")
        quantize_q4_k_m(f16, CACHE / "partial.gguf").rename(target)
        f16.unlink()
    return target


def llama_tool(name: str) -> Path:
    """llama.cpp's own `name` (llama-bench, llama-completion), built from the installed library's source."""
    version = importlib.metadata.version("llama-cpp-python")
    flags = "-" + hashlib.sha256(" ".join(BUILD_FLAGS).encode()).hexdigest()[:8] if BUILD_FLAGS else ""  # per build
    build = CACHE / f"llama-bench-{version}{flags}"
    exe = build / "bin" / name
    if exe.exists():
        return exe
    log(f"building {name} from the llama-cpp-python {version} sdist (a few minutes, once)...")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(CACHE / "src")], check=True)
    source = CACHE / "src" / f"llama_cpp_python-{version}"
    if not source.exists():
        with tarfile.open(CACHE / "src" / f"llama_cpp_python-{version}.tar.gz") as archive:
            archive.extractall(CACHE / "src")
    with open(CACHE / "llama-bench-build.log", "w") as build_log:  # compiler chatter stays out of the report
        subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build),
                        "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", *BUILD_FLAGS],
                       check=True, stdout=build_log, stderr=build_log)
        subprocess.run(["cmake", "--build", str(build), "--target", name, f"-j{os.cpu_count()}"],
                       check=True, stdout=build_log, stderr=build_log)
    return exe


def read_bandwidth() -> float:
    """Streaming read bandwidth in bytes/s: every core summing its share of a 2 GiB array, best of 5."""
    data = np.ones(2**28, dtype=np.float64)
    parts = np.array_split(data, THREADS)
    best = 0.0
    for _ in range(5):
        threads = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, data.nbytes / (time.perf_counter() - started))
    return best


def bytes_per_token(model: Path) -> int:
    """What one generated token reads: every weight except the embedding table (one row of it is used)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(model).tensors if t.name != "token_embd.weight")


def run_llama_bench(exe: Path, model: Path, *args: str) -> list[dict]:
    """Each configuration that args name, once."""
    result = subprocess.run([str(exe), "-m", str(model), "-t", str(THREADS), "-r", "1", "-o", "json", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def best(rounds: list[list[dict]], depth: int = 0, fa_off: bool = False) -> tuple[dict, list[float]]:
    """The configuration (at that depth; with fa_off, of those without flash attention, as the script runs on a CPU)
    whose median over the rounds is highest, and its speed in each round."""
    speeds: dict[tuple[int, object], list[float]] = {}
    for results in rounds:
        for r in results:
            if r["n_depth"] == depth and not (fa_off and r["flash_attn"]):
                speeds.setdefault((int(r["repack"]), r["flash_attn"]), []).append(r["avg_ts"])
    (repack, flash_attn), chosen = max(speeds.items(), key=lambda item: statistics.median(item[1]))
    return {"repack": repack, "flash_attn": flash_attn, "median_ts": statistics.median(chosen)}, chosen


def ratio(ours: list[float], theirs: list[float]) -> float:
    """The median of the rounds' ratios: the two figures of a round were measured minutes apart, not an hour."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def in_rounds(steps: dict[str, Callable[[], Any]]) -> dict[str, list]:
    """What each step returns, in each of RUNS rounds; every round runs every step once, in turns."""
    results: dict[str, list] = {name: [] for name in steps}
    for round_ in range(RUNS):
        log(f"  round {round_ + 1} of {RUNS}: {', '.join(steps)}")
        for name, step in steps.items():
            results[name].append(step())
    return results


def private_dirty(pid: int) -> int:
    """A process's own anonymous memory in bytes (Private_Dirty): unlike RSS, not the file pages it shares."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Private_Dirty:"))
    except (OSError, StopIteration):
        return 0


def run_measured(command: list[str], env: dict[str, str], memory: bool = False,
                 codes: tuple[int, ...] = (0,)) -> tuple[str, str, int]:
    """Run a command that exits with one of `codes`; return its stdout, its stderr and, with memory, its peak
    Private_Dirty in bytes.

    Memory is sampled every 0.1 s, and only when asked: reading smaps_rollup walks the process's page tables
    and slows it, so timed runs are not sampled.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               stdin=subprocess.DEVNULL, text=True, errors="replace")
    streams: dict[str, str] = {}
    readers = [threading.Thread(target=lambda n=name, f=stream: streams.__setitem__(n, f.read()))
               for name, stream in (("out", process.stdout), ("err", process.stderr))]
    for reader in readers:
        reader.start()
    peak = 0
    while memory and readers[1].is_alive():
        peak = max(peak, private_dirty(process.pid))
        readers[1].join(0.1)
    for reader in readers:
        reader.join()
    _, status, _ = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in codes:
        raise RuntimeError(f"exit {code}: {streams['err'][-1500:]}")
    return streams["out"], streams["err"], peak


SNIPPET = r"""
import json, sys, time, llama_cpp
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=4096, verbose=False)  # everything else: the library's defaults
started = time.perf_counter()
stamps = [time.perf_counter() for _ in llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), stream=True)]
tokens = llama_cpp.llama_perf_context(llm._ctx.ctx).n_eval + 1
print(json.dumps({"first": stamps[0] - started, "rate": (tokens - 1) / (stamps[-1] - stamps[0]), "tokens": tokens}))
"""


def script_run(command: list[str], env: dict[str, str], codes: tuple[int, ...] = (0,)) -> dict[str, float]:
    """Run phi_console.py once; its own report (load, prompt and generation speed)."""
    _, err, _ = run_measured(command, env, codes=codes)
    report = re.search(r"loaded in ([\d.]+) s \| prompt: (\d+) tokens, (?:([\d.]+) tok/s|(\d+) restored from an "
                       r"earlier run, first token in ([\d.]+) s) \| generated: (\d+) tokens, "
                       r"([\d.]+|n/a)", err)
    if not report:
        raise RuntimeError(f"no report in: {err[-500:]}")
    load, n_prompt, pp, n_restored, seconds, n_gen, tg = (float(x) if x not in (None, "n/a") else 0.0
                                                          for x in report.groups())
    if n_restored:  # the speed of what was evaluated after the restored start, restoring included
        pp = (n_prompt - n_restored) / seconds
    # With --verbose, llama.cpp prints its own decode time per token: ours minus it is Python + sampling.
    decode = re.search(r" eval time = +[\d.]+ ms / +\d+ runs +\( *([\d.]+) ms per token", err)
    overhead = 1000 / tg - float(decode.group(1)) if decode and tg else float("nan")
    return dict(load=load, n_prompt=n_prompt, pp=pp, n_gen=n_gen, tg=tg, overhead=overhead)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def walls(commands: dict[str, list[str]], env: dict[str, str], before: dict | None = None,
          after: dict | None = None) -> dict[str, float]:
    """Median wall time of each command, run in turns RUNS times so that drift hits them all alike.

    before[name] and after[name], if given, run untimed before and after each run of that command.
    """
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, command in commands.items():
            if before and name in before:
                before[name]()
            started = time.perf_counter()
            run_measured(command, env)
            times[name].append(time.perf_counter() - started)
            if after and name in after:
                after[name]()
    return {name: statistics.median(t) for name, t in times.items()}


def ctrl_c_latency(command: list[str], env: dict[str, str]) -> float:
    """Median seconds from SIGINT, 1 s into evaluating a long prompt, to the script's exit (with code 130)."""
    waits = []
    for _ in range(RUNS):
        # As at a terminal: a benchmark started in the background inherits an ignored SIGINT, which the script keeps.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=env,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for line in process.stderr:  # --verbose: llama.cpp's last line before the prompt is evaluated
            if b"reserve took" in line:
                break
        threading.Thread(target=process.stderr.read, daemon=True).start()
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        signalled = time.perf_counter()
        code = process.wait(timeout=120)
        waits.append(time.perf_counter() - signalled)
        if code != 130:
            raise RuntimeError(f"Ctrl-C during the prompt: exit {code}, not 130")
    return statistics.median(waits)


def batch_rates(script: Callable[..., list[str]], env: dict[str, str], *, tmp: Path, repacked: bool, exe: Path,
                model: Path) -> tuple[dict[int, list[tuple[float, float]]], int]:
    """--prompts at each --parallel count against llama-batched-bench at the same count, in turns, in RUNS rounds:
    generated tokens a second, prompt evaluation included in both, (ours, theirs) per round; and the script's peak
    memory at the default count, in a run of its own. The prompts are as long as batched-bench's (-npp): 12 tokens."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("".join(f"Say something about number {n}\n" for n in range(BATCH_PROMPTS)))
    rates: dict[int, list[tuple[float, float]]] = {n: [] for n in SEQUENCES}
    for round_ in range(RUNS):
        log(f"  --prompts, round {round_ + 1} of {RUNS}")
        for n in SEQUENCES:
            command = script(None, GEN_TOKENS, "--prompts", str(prompts), "--parallel", str(n))
            _, err, _ = run_measured(command, env, codes=(0, 3))  # random weights may end early
            summary = re.search(r"generated: (\d+) tokens, ([\d.]+) tok/s", err)
            if not summary:
                raise RuntimeError(f"no summary in: {err[-500:]}")
            theirs = subprocess.run([str(exe), "-m", str(model), "-t", str(THREADS), "-npp", "12", "-ntg",
                                     str(GEN_TOKENS), "-npl", str(n), "-kvu", "-fa", "off", "--output-format", "jsonl",
                                     *([] if repacked else ["--no-repack"])], capture_output=True, text=True)
            line = next((json.loads(x) for x in theirs.stdout.splitlines() if x.startswith("{")), None)
            if theirs.returncode != 0 or line is None:
                raise RuntimeError(f"llama-batched-bench failed: {theirs.stderr[-1500:]}")
            rates[n].append((float(summary[2]), line["pl"] * line["tg"] / line["t"]))
            log(f"  --parallel {n}: {rates[n][-1][0]:.2f} tok/s ({summary[1]} tokens); "
                f"llama-batched-bench {rates[n][-1][1]:.2f}")
    command = script(None, GEN_TOKENS, "--prompts", str(prompts), "--parallel", str(DEFAULT_PARALLEL))
    return rates, run_measured(command, env, memory=True, codes=(0, 3))[2]


RAY_PROMPTS, RAY_TOKENS = 32, 64  # phi_console.Answers in Ray Data against --prompts on the same prompts
RAY_DRIVER = """
import json, sys, time, ray, phi_console
settings, prompts = json.loads(sys.argv[1]), sys.argv[2]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"py_modules": [phi_console.__file__]})
started = time.perf_counter()
rows = ray.data.read_json(prompts).map_batches(phi_console.Answers, fn_constructor_kwargs=settings, batch_size=8,
                                               compute=ray.data.ActorPoolStrategy(size=1)).take_all()
print(json.dumps({"tokens": sum(row["tokens"] or 0 for row in rows), "seconds": time.perf_counter() - started}))
"""


def ray_rates(script: Callable[..., list[str]], env: dict[str, str], *, tmp: Path) -> list[tuple[float, float]]:
    """Generated tokens a second, load included in both, of phi_console.Answers with one Ray Data actor and of
    --prompts on the same RAY_PROMPTS prompts, in turns, in RUNS rounds: (ray, --prompts) per round."""
    if importlib.util.find_spec("ray") is None:
        return []
    prompts = tmp / "ray-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about number {n}"}) + "\n"
                               for n in range(RAY_PROMPTS)))
    settings = {"model_repo": MODEL_REPO, "model_file": MODEL_FILE, "tokenizer_repo": TOKENIZER_REPO, "seed": 1,
                "temperature": 0, "repeat_penalty": 1, "threads": THREADS, "sample_len": RAY_TOKENS}
    rates = []
    for round_ in range(RUNS):
        log(f"  Ray Data against --prompts, round {round_ + 1} of {RUNS}")
        started = time.perf_counter()
        _, err, _ = run_measured(script(None, RAY_TOKENS, "--prompts", str(prompts), "--seed", "1"), env, codes=(0, 3))
        ours = int(re.search(r"generated: (\d+) tokens", err)[1]) / (time.perf_counter() - started)
        ray_env = {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        out, _, _ = run_measured([sys.executable, "-c", RAY_DRIVER, json.dumps(settings), str(prompts)], ray_env)
        seen = json.loads(out.splitlines()[-1])
        rates.append((seen["tokens"] / seen["seconds"], ours))
        log(f"  Ray Data {rates[-1][0]:.2f} tok/s, --prompts {ours:.2f}")
    return rates


def span(values: list[float], digits: int = 2) -> str:
    """The median of a figure over the rounds, and its lowest and highest round."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def batch_rows(batch: dict[int, list[tuple[float, float]]], peak: int) -> list[tuple[str, str, str, str]]:
    """BENCHMARKS.md's --prompts rows: each count's rates against batched-bench's, and the default count's gain."""
    rows = [(f"--prompts, {BATCH_PROMPTS} prompts x {GEN_TOKENS} tokens, --parallel {n} (generated tok/s)",
             span([ours for ours, _ in pairs]), f"llama-batched-bench -npl {n}: {span([t for _, t in pairs])}" +
             (f"; peak Private_Dirty {peak / 2**30:.2f} GiB" if n == DEFAULT_PARALLEL else ""),
             f"{ratio([ours for ours, _ in pairs], [t for _, t in pairs]):.3f}") for n, pairs in batch.items()]
    gains = [(ours / one, theirs / their_one) for (ours, theirs), (one, their_one)
             in zip(batch[DEFAULT_PARALLEL], batch[1])]  # each round's gain over its own --parallel 1
    rows.append((f"--prompts: gain of --parallel {DEFAULT_PARALLEL} over 1", span([g for g, _ in gains]) + "x",
                 f"llama-batched-bench: {span([t for _, t in gains])}x",
                 f"{ratio([g for g, _ in gains], [t for _, t in gains]):.3f}"))
    return rows


def main() -> None:
    import llama_cpp

    CACHE.mkdir(parents=True, exist_ok=True)
    model = bench_model()
    exe = llama_tool("llama-bench")
    completion = llama_tool("llama-completion")
    home = CACHE / "hf_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    hub = Hub()
    if not (home / "hub").exists():
        log("serving the model through the local hub once, so the script downloads it for real...")
        hub.add(MODEL_REPO, {MODEL_FILE: model.read_bytes()})
    hub.add(TOKENIZER_REPO, {"tokenizer.json": tokenizer_json()})
    hub.start()
    env["HF_ENDPOINT"] = hub.url
    long_prompt = " ".join(["hello world"] * 250)  # 510 tokens with the chat format
    rerun_prompt = " ".join(["hello world"] * 420)  # 850 tokens: a long prompt rerun with new settings
    saved_prompts = home / "phi-console" / "prompts"

    def script(prompt: str | None, sample_len: int, *more: str) -> list[str]:
        return [sys.executable, str(SCRIPT), "--model-repo", MODEL_REPO, "--model-file", MODEL_FILE,
                "--tokenizer-repo", TOKENIZER_REPO, "--temperature", "0", "--repeat-penalty", "1",
                "--threads", str(THREADS), "--sample-len", str(sample_len), "--verbose", *more,
                *(["--prompt", prompt] if prompt is not None else [])]

    def evaluated(prompt: str, sample_len: int) -> list[str]:
        """The script, made to evaluate its prompt rather than restore it."""
        return script(prompt, sample_len, "--prompt-cache-gb", "0")

    run_measured(script("hello", 1), env)  # downloads if needed, and warms the page cache
    hub.stop()
    layouts = home / "phi-console" / "layouts.json"
    answers: list[dict] = []
    log("the script's choice of weight layouts: a first run that measures it, against one that reads it...")
    choosing = walls({"measuring": script("hello", 1), "reading": script("hello", 1)}, env,
                     before={"measuring": lambda: layouts.unlink(missing_ok=True)},
                     after={"measuring": lambda: answers.extend(json.loads(layouts.read_text()).values())})
    chosen = answers[-1]  # the answer later runs read

    # A build with the AMX kernel crashes on K-quant weights once they are repacked: it never repacks them
    amx = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    repacks, unrepacked = ("0", ["--no-repack"]) if amx else ("0,1", [])
    log("warm reruns of the default prompt, one token: phi_console.py against llama-completion...")
    blob = next((home / "hub").glob(f"models--{MODEL_REPO.replace('/', '--')}/snapshots/*/{MODEL_FILE}"))
    run_measured(script(DEFAULT_PROMPT, 1), env)  # saves the default prompt's state for the runs that restore it
    formatted = f"<|user|>\n{DEFAULT_PROMPT}<|end|>\n<|assistant|>"
    reruns = walls({"restored": script(DEFAULT_PROMPT, 1), "evaluated": evaluated(DEFAULT_PROMPT, 1),
                    "llama-completion": [str(completion), "-m", str(blob), "-t", str(THREADS), "-n", "1",
                                         "--no-warmup", "-no-cnv", "-p", formatted, *unrepacked]},
                   env)
    log("an 850-token prompt, then the same prompt with another temperature...")
    rerun = walls({"first": script(rerun_prompt, 16), "rerun": script(rerun_prompt, 16, "--temperature", "0.7")}, env,
                  before={"first": lambda: shutil.rmtree(saved_prompts, ignore_errors=True)})
    log("Ctrl-C during a long prompt...")
    stopped = ctrl_c_latency(evaluated(" ".join(["hello world"] * 1000), 1), env)
    log("measuring bandwidth...")
    bandwidth = read_bandwidth()
    shared = " ".join(["hello world"] * 260)  # more than 512 tokens that both prompts start with

    def at_depth_512() -> dict[str, float]:
        """A prompt whose first 512 tokens an earlier run saved: the rest is evaluated at depth 512."""
        shutil.rmtree(saved_prompts, ignore_errors=True)
        run_measured(script(shared + " quick brown fox", 1), env)
        return script_run(script(" ".join(["hello world"] * 500), 1), env)

    log("llama-bench (every configuration of --repack and -fa) and phi_console.py, in turns: generation, prompt "
        "evaluation at depth 0 and 512, and generation after a 500-token prompt...")
    steps: dict[str, Callable[[], Any]] = {
        "tg": lambda: run_llama_bench(exe, model, "-p", "0", "-n", str(GEN_TOKENS), "--repack", repacks, "-fa", "0,1"),
        "short": lambda: script_run(evaluated("hello", GEN_TOKENS), env),
        "schema": lambda: script_run(evaluated("hello", GEN_TOKENS) + ["--json-schema", SPEED_SCHEMA], env,
                                     codes=(0, 3)),
        "pp": lambda: run_llama_bench(exe, model, "-p", str(PROMPT_TOKENS), "-n", "0", "-d", "0,512",
                                      "--repack", repacks, "-fa", "0,1"),
        "prompt": lambda: script_run(evaluated(long_prompt, 1), env),
        "at_depth": at_depth_512,
        "deep": lambda: run_llama_bench(exe, model, "-p", "0", "-n", str(GEN_TOKENS), "-d", "500",
                                        "--repack", repacks, "-fa", "0,1"),
        "both": lambda: script_run(evaluated(long_prompt, GEN_TOKENS), env),
    }
    fixed = {} if amx else {"plain": "--no-repack", "repacked": "--repack"}  # each layout for both phases
    for name, flag in fixed.items():
        steps[name] = lambda flag=flag: script_run(evaluated(long_prompt, GEN_TOKENS) + [flag], env)
    measured = in_rounds(steps)
    (tg, tg_speeds), (pp, pp_speeds), (pp_deep, pp_deep_speeds), (deep, deep_speeds) = (
        best(measured["tg"]), best(measured["pp"], fa_off=True), best(measured["pp"], depth=512, fa_off=True),
        best(measured["deep"], depth=500))
    short, prompt, at_depth, both = (medians(measured[name]) for name in ("short", "prompt", "at_depth", "both"))
    layout_runs = {name: medians(measured[name]) for name in fixed}

    def rounds_of(name: str, key: str) -> list[float]:
        return [run[key] for run in measured[name]]

    log("phi_console.py: peak memory, in runs of their own...")
    short["peak"] = run_measured(evaluated("hello", GEN_TOKENS), env, memory=True)[2]
    both["peak"] = run_measured(evaluated(long_prompt, GEN_TOKENS), env, memory=True)[2]
    for name, flag in fixed.items():
        layout_runs[name]["peak"] = run_measured(evaluated(long_prompt, GEN_TOKENS) + [flag], env, memory=True)[2]
    batch, batch_peak = batch_rates(script, env, tmp=home, repacked=chosen["generation"],
                                    exe=llama_tool("llama-batched-bench"), model=model)
    ray = ray_rates(script, env, tmp=home)

    log("the llama-cpp-python snippet (library defaults) on the same 500-token prompt...")
    formatted = f"<|user|>\n{long_prompt}<|end|>\n<|assistant|>"
    snippets = []
    for _ in range(2):
        try:
            out, _, _ = run_measured([sys.executable, "-c", SNIPPET, str(model), formatted, str(GEN_TOKENS)], env)
            snippets.append(json.loads(out))
        except RuntimeError as error:
            snippets.append({"error": str(error).splitlines()[0]})
    ok = [s for s in snippets if "rate" in s]
    snippet_rate = statistics.median(s["rate"] for s in ok) if ok else None
    snippet_first = statistics.median(s["first"] for s in ok) if ok else None

    size = model.stat().st_size
    per_token = bytes_per_token(model)
    ceiling = bandwidth / per_token
    first_token = prompt["load"] + prompt["n_prompt"] / prompt["pp"]
    both_first = both["n_prompt"] / both["pp"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    system = llama_cpp.llama_print_system_info().decode()

    def config(r: dict) -> str:
        return f"repack {int(r['repack'])}, fa {r['flash_attn']}"

    def spread(name: str, key: str, digits: int) -> str:
        return span(rounds_of(name, key), digits)

    def theirs(label: str, chosen: dict, speeds: list[float], digits: int) -> str:
        return f"{label}: {span(speeds, digits)}, {config(chosen)}"

    rows = [
        (f"generation, {GEN_TOKENS} tokens after a short prompt (tok/s)", spread("short", "tg", 2),
         theirs(f"llama-bench tg{GEN_TOKENS}", tg, tg_speeds, 2), f"{ratio(rounds_of('short', 'tg'), tg_speeds):.3f}"),
        (f"generation under a JSON schema, {GEN_TOKENS} tokens at most, same prompt (tok/s)", spread("schema", "tg", 2),
         f"without: {spread('short', 'tg', 2)}; Python and sampling per token: {spread('schema', 'overhead', 2)} ms, "
         f"without: {spread('short', 'overhead', 2)} ms",
         f"{ratio(rounds_of('schema', 'tg'), rounds_of('short', 'tg')):.3f}"),
        (f"prompt evaluation, {int(prompt['n_prompt'])} tokens (tok/s)", spread("prompt", "pp", 1),
         theirs(f"llama-bench pp{PROMPT_TOKENS}", pp, pp_speeds, 1),
         f"{ratio(rounds_of('prompt', 'pp'), pp_speeds):.3f}"),
        (f"prompt evaluation, {int(at_depth['n_prompt']) - 512} tokens after 512 restored (tok/s)",
         spread("at_depth", "pp", 1), theirs(f"llama-bench pp{PROMPT_TOKENS} @ d512", pp_deep, pp_deep_speeds, 1),
         f"{ratio(rounds_of('at_depth', 'pp'), pp_deep_speeds):.3f}"),
        ("generation after that prompt (tok/s)", spread("both", "tg", 2),
         theirs(f"llama-bench tg{GEN_TOKENS} @ d500", deep, deep_speeds, 2),
         f"{ratio(rounds_of('both', 'tg'), deep_speeds):.3f}"),
        *((f"the same, both phases on {name} weights (`{flag}`): prompt, then generation (tok/s)",
           f"{spread(name, 'pp', 1)}, {spread(name, 'tg', 2)}",
           f"loaded in {layout_runs[name]['load']:.2f} s (default: {both['load']:.2f} s); "
           f"peak Private_Dirty {layout_runs[name]['peak'] / 2**30:.2f} GiB",
           f"{ratio(rounds_of(name, 'pp'), rounds_of('both', 'pp')):.3f}, "
           f"{ratio(rounds_of(name, 'tg'), rounds_of('both', 'tg')):.3f} of the default")
          for name, flag in fixed.items()),
        ("choosing the layouts: a first run, which measures, against a later one (s)",
         f"{choosing['measuring']:.2f}", f"a later run: {choosing['reading']:.2f}",
         f"+{choosing['measuring'] - choosing['reading']:.2f} s"),
        *batch_rows(batch, batch_peak),
        *([(f"phi_console.Answers, one Ray Data actor, {RAY_PROMPTS} prompts x {RAY_TOKENS} tokens (tok/s, load "
            "included)", span([r for r, _ in ray]), f"--prompts, the same: {span([p for _, p in ray])}",
            f"{ratio([r for r, _ in ray], [p for _, p in ray]):.3f}")] if ray else []),
        ("time to first token, warm cache: load + prompt (s)",
         f"{prompt['load']:.2f} + {prompt['n_prompt'] / prompt['pp']:.2f} = {first_token:.2f}", "", ""),
        ("peak Private_Dirty (short prompt run)", f"{short['peak'] / 2**30:.2f} GiB",
         f"model file {size / 2**30:.2f} GiB", f"{short['peak'] / size:.2f}x"),
        ("peak Private_Dirty (500-token prompt + 128 tokens)", f"{both['peak'] / 2**30:.2f} GiB", "",
         f"{both['peak'] / size:.2f}x"),
        ("vs the snippet: generation after the 500-token prompt (tok/s)", f"{both['tg']:.2f}",
         f"snippet: {snippet_rate:.2f}" if snippet_rate else f"snippet failed: {snippets[0].get('error')}",
         f"{both['tg'] / snippet_rate:.2f}x" if snippet_rate else ""),
        ("vs the snippet: prompt evaluation to first token (s)", f"{both_first:.2f}",
         f"snippet: {snippet_first:.2f}" if snippet_first else "",
         f"{snippet_first / both_first:.2f}x" if snippet_first else ""),
        ("Python and sampling time per generated token (ms)", f"{short['overhead']:.2f}",
         "wall time per token - llama.cpp's own decode time, same run", ""),
        ("share of the bandwidth ceiling, generation", f"{short['tg']:.2f}",
         f"{ceiling:.2f} tok/s = {bandwidth / 1e9:.1f} GB/s / {per_token / 1e9:.2f} GB per token",
         f"{short['tg'] / ceiling:.2f}"),
        ("warm rerun of the default prompt, 1 token, prompt restored (s)", f"{reruns['restored']:.2f}",
         f"llama-completion -n 1 --no-warmup: {reruns['llama-completion']:.2f}",
         f"{reruns['restored'] / reruns['llama-completion']:.2f}"),
        ("warm rerun of the default prompt, 1 token, prompt evaluated (s)", f"{reruns['evaluated']:.2f}",
         f"llama-completion -n 1 --no-warmup: {reruns['llama-completion']:.2f}",
         f"{reruns['evaluated'] / reruns['llama-completion']:.2f}"),
        ("850-token prompt + 16 tokens, rerun with another temperature (s)", f"{rerun['rerun']:.2f}",
         f"the first run: {rerun['first']:.2f}", f"{rerun['rerun'] / rerun['first']:.2f}"),
        ("Ctrl-C 1 s into a 2000-token prompt, until exit (s)", f"{stopped:.2f}", "", ""),
    ]
    measures = [("tg", 0, f"tg{GEN_TOKENS}"), ("pp", 0, f"pp{PROMPT_TOKENS}"), ("pp", 512, f"pp{PROMPT_TOKENS} @ d512"),
                ("deep", 500, f"tg{GEN_TOKENS} @ d500")]
    configs = sorted({(int(r["repack"]), r["flash_attn"]) for r in measured["tg"][0]})

    def by_config(name: str, depth: int, repack: int, flash_attn: object) -> str:
        speeds = [r["avg_ts"] for results in measured[name] for r in results
                  if r["n_depth"] == depth and int(r["repack"]) == repack and r["flash_attn"] == flash_attn]
        return f"{statistics.median(speeds):.2f} ({min(speeds):.2f}-{max(speeds):.2f})"

    isa = "AVX-512" if "AVX512 = 1" in system else "AVX2, no AVX-512" if "AVX2 = 1" in system else "no AVX2"
    if "AMX_INT8 = 1" not in system and "-U__AMX_INT8__" in " ".join(BUILD_FLAGS):  # the CPU has it, the build not
        isa += ", built without the AMX kernel"
    heading = f"{cpu}, {THREADS} threads ({isa})"
    layout = (f"prompts on {'repacked' if chosen['prompt'] else 'plain'} weights, generation on "
              f"{'repacked' if chosen['generation'] else 'plain'} ones, as its first run measured "
              f"({len(answers)} times: {[(a['prompt'], a['generation']) for a in answers]}, (prompt, generation) "
              f"repacked; its rates: {answers[-1]['tokens a second, prompt and generation']})")
    lines = [f"{time.strftime('%Y-%m-%d')}: llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, "
             f"huggingface_hub {importlib.metadata.version('huggingface_hub')}, Python {platform.python_version()}, "
             f"{os.cpu_count()} logical CPUs; by default (`REPACK`) {layout}. "
             f"Model: {size / 1e9:.2f} GB Q4_K_M, Phi-3-mini shape, random weights; {RUNS} rounds.",
             "", f"llama.cpp features: `{system.strip()}`", "",
             "| measure | phi_console.py | reference | ratio |", "|---|---|---|---|",
             *("| " + " | ".join(row) + " |" for row in rows), "",
             "llama-bench, every configuration (tok/s; median, and the lowest and highest round):", "",
             "| measure | " + " | ".join(f"repack {r}, fa {f}" for r, f in configs) + " |",
             "|---|" + "---|" * len(configs),
             *(f"| {label} | " + " | ".join(by_config(name, depth, r, f) for r, f in configs) + " |"
               for name, depth, label in measures),
             "", f"Snippet runs: `{snippets}`", ""]
    section = "\n".join(lines)
    print(f"## {heading}\n\n{section}")
    write_results(heading, section)


def write_results(heading: str, section: str) -> None:
    """Put this machine's section into BENCHMARKS.md, in place of its last one; other machines' stay as they are."""
    sections: dict[str, str] = {}
    if RESULTS.exists():
        for part in RESULTS.read_text().split("\n## ")[1:]:
            title, _, body = part.partition("\n")
            sections[title] = body.strip("\n")
    sections[heading] = section.strip("\n")
    RESULTS.write_text(HEADER + "".join(f"\n## {title}\n\n{body}\n" for title, body in sections.items()))

if __name__ == "__main__":
    main()
