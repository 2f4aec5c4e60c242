"""Past one machine: phi_console.Answers as a Ray Data stage, on a real one-node Ray cluster, answering as --prompts
does; and the cells Arrow and pandas hand it (numpy arrays, NaN, float seeds), without Ray."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PATIENCE, PYTHON, RANDOM, SCRIPT, console, environment_for, flags

RANDOM_MODEL = {"model_repo": RANDOM, "model_file": "two-layers.gguf"}
SETTINGS = {**RANDOM_MODEL, "threads": 1, "sample_len": 12, "temperature": 1.0, "prompt_cache_gb": 0, "parallel": 1}
ROWS = [{"prompt": "why is the sky blue", "seed": 3}, {"prompt": "write a haiku", "temperature": 0, "id": "b"},
        {"prompt": "say hello", "seed": 5, "stop": ["w1"], "tags": ["x", "y"]}, {"prompt": "", "seed": 6},
        {"prompt": "count to three", "seed": 9, "sample_len": 4}]


@pytest.fixture(scope="module")
def home(hub, random_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("ray_home")
    assert console("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--sample-len", "1",
                   "--prompt-cache-gb", "0", hub=hub, home=home).returncode == 0
    return home


def in_python(code: str, hub, home) -> subprocess.CompletedProcess:
    """Python code that imports phi_console, run as a user's program would run it, offline from the warm cache."""
    environment = {**environment_for(hub, home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parent)}
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=environment, timeout=PATIENCE,
                          stdin=subprocess.DEVNULL)


def test_a_ray_data_pipeline_answers_each_row_as_prompts_does(hub, home, tmp_path):
    if subprocess.run([PYTHON, "-c", "import ray.data"], capture_output=True).returncode != 0:
        pytest.skip("ray[data] is not installed for the Python that runs the script (it needs 3.10)")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    code = f"""
import json, ray, phi_console
environment = {{"HF_HOME": {str(home)!r}, "HF_HUB_OFFLINE": "1"}}  # the actors' cache: the warm one, offline
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={{"py_modules": [{str(SCRIPT)!r}], "env_vars": environment}})
rows = ray.data.read_json({str(tmp_path / "rows.jsonl")!r}).map_batches(
    phi_console.Answers, fn_constructor_kwargs={SETTINGS!r}, compute=ray.data.ActorPoolStrategy(size=1),
    batch_size=2).take_all()
print(json.dumps(sorted(rows, key=lambda row: row["prompt"]), default=str))
"""
    result = in_python(code, hub, home)
    assert result.returncode == 0, result.stderr[-3000:]
    by_prompt = {row["prompt"]: row for row in json.loads(result.stdout.splitlines()[-1])}
    assert set(by_prompt) == {row["prompt"] for row in ROWS}
    for row in by_prompt.values():
        assert {"reply", "seed", "tokens", "finish", "error"} <= row.keys()
    assert by_prompt[""]["error"] and by_prompt[""]["reply"] is None  # a bad row is its error, the others go on
    assert by_prompt["write a haiku"]["id"] == "b"  # the batch's own columns come back
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    alone = console("--prompts", str(tmp_path / "p.jsonl"), *flags(**SETTINGS), hub=hub, home=home)
    for line in map(json.loads, alone.stdout.decode().splitlines()):
        if "seed" in next(row for row in ROWS if row["prompt"] == line["prompt"]) and "reply" in line:
            assert by_prompt[line["prompt"]]["reply"] == line["reply"]  # byte for byte, at --parallel 1 on both
            assert by_prompt[line["prompt"]]["seed"] == line["seed"]


def test_cells_as_arrow_and_pandas_give_them_and_replies_independent_of_batches(hub, home):
    code = f"""
import json, numpy as np, phi_console
answers = phi_console.Answers(**{SETTINGS!r}, seed=11)
batch = {{"prompt": np.array(["hello", "world", "again"], dtype=object), "seed": np.array([3.0, np.nan, np.nan]),
          "stop": np.array([np.array(["zz"]), None, None], dtype=object), "sample_len": np.array([4.0, np.nan, 2.0])}}
whole = answers(batch)
parts = [answers({{name: column[i:i + 1] for name, column in batch.items()}}) for i in range(3)]
print(json.dumps({{"whole": {{k: list(map(str, whole[k])) for k in ("reply", "seed", "tokens", "error")}},
                   "parts": [{{k: str(part[k][0]) for k in ("reply", "seed", "tokens")}} for part in parts]}}))
try:
    phi_console.Answers(**{RANDOM_MODEL!r}, temperature=-1)
except ValueError as wrong:
    print("refused:", wrong)
"""
    result = in_python(code, hub, home)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[0])
    whole, parts = seen["whole"], seen["parts"]
    assert whole["seed"][0] == "3" and whole["error"] == ["None"] * 3  # 3.0 is the seed 3; NaN is not given
    assert int(whole["tokens"][0]) <= 4 and int(whole["tokens"][2]) <= 2  # whole floats are the integers they are
    assert [part["reply"] for part in parts] == whole["reply"]  # however the rows are cut into batches
    assert [part["seed"] for part in parts] == whole["seed"]
    assert result.stdout.splitlines()[1] == "refused: temperature must be 0, or a number in 1e-30..1e30 (got -1)"
