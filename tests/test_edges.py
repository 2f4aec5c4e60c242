"""At every edge of what a user types, pipes in or leaves on disk, and of how the script is started and stopped:
each is one `error:` line (or a note) and the right exit code, never a traceback, a hang or a crash.

A FIFO, a symlink and a file in a temporary folder stand for devices: no test touches a real one, but for writing
to /dev/full, which discards what it is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest

from conftest import (MODEL_REPO, PATIENCE, PYTHON, RANDOM, SCRIPT, Streams, as_a_user, console, crafted,
                      environment_for, flags, start, the_error)
from test_chat import RANDOM_MODEL, chat, context_used, evaluated, saved_conversation, stats


def errors_in(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def state_of(path):
    return path.with_name(path.name + ".state")


# --- 1. Names: checked with huggingface_hub's own rules, before anything else, online or offline ----------------------
@pytest.mark.parametrize(("flag", "value"), [
    ("--model-repo", MODEL_REPO + " "), ("--model-repo", "a/b/c"), ("--model-repo", "../../etc"),
    ("--tokenizer-repo", "microsoft//Phi-3"), ("--model-file", "/etc/passwd"), ("--model-file", "a/../../b"),
    ("--model-revision", "../../x"), ("--tokenizer-revision", "main branch")])
def test_a_mistyped_name_is_one_line_naming_the_setting_and_its_form(tmp_path, flag, value):
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        line = the_error(console(flag, value, "-p", "hi", hub=None, home=tmp_path, env=env), code=2)
        assert line.startswith(f"error: argument {flag}: must be ") and repr(value) in line
        assert not (tmp_path / "hub").exists()  # refused before the cache was looked at


def test_a_pasted_hub_link_is_answered_with_the_repo_it_names(tmp_path):
    link = f"https://huggingface.co/{MODEL_REPO}/blob/main/Phi-3-mini-4k-instruct-q4.gguf"
    line = the_error(console("--model-repo", link, hub=None, home=tmp_path), code=2)
    assert line.startswith("error: argument --model-repo: must be a repo: org/name") and f"repo is {MODEL_REPO}" in line


def test_a_branch_with_a_slash_is_a_revision_like_any_other(hub, warm_home):
    # refs/pr/1 is how the hub names a pull request: allowed by the check, then not found on this hub
    line = the_error(console(*crafted(), "--model-revision", "refs/pr/1", hub=hub, home=warm_home))
    assert "revision 'refs/pr/1' not found" in line


# --- 2. /save writes only where a regular file is or may be -----------------------------------------------------------
def test_save_through_a_symlink_writes_the_file_it_names_and_keeps_its_mode(hub, warm_home, tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("{}")
    real.chmod(0o640)
    link.symlink_to(real)
    assert chat(hub, warm_home, ["hello", f"/save {link}"]).returncode == 0
    assert link.is_symlink() and json.loads(real.read_text())["messages"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # the file's own mode, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(state_of(real).stat().st_mode) == 0o666 & ~umask  # a new file: as any program makes it
    loaded = chat(hub, warm_home, [f"/load {link}", "hello", "/stats"])
    assert "not using" not in loaded.stderr and evaluated(stats(loaded)[0]) < 20  # its state found beside the file


@pytest.mark.parametrize("what", ["a FIFO", "a folder", "a FIFO where its state goes"])
def test_save_refuses_what_is_not_a_regular_file_and_leaves_it_be(hub, warm_home, tmp_path, what):
    path = tmp_path / "talk.json"
    spot = state_of(path) if what.endswith("state goes") else path
    os.mkfifo(spot) if "FIFO" in what else spot.mkdir()
    result = chat(hub, warm_home, ["hello", f"/save {path}", "/show"])
    assert result.returncode == 0, result.stderr
    assert errors_in(result) == [f"error: could not save to {path}: not a regular file; nothing was changed"]
    assert (stat.S_ISFIFO if "FIFO" in what else stat.S_ISDIR)(os.lstat(spot).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == [spot.name]  # nothing else written, no temporary left


# --- 3. llama.cpp is handed only states this installation wrote -------------------------------------------------------
def forged(state, record: dict, field: str) -> None:
    """Cut a state just after its header (magic, version, token count, tokens) and the first number of its data, and
    record the cut file's sha256, as anyone can: llama.cpp would believe the sizes it reads and abort (SIGABRT)."""
    header = 12 + 4 * int.from_bytes(state.read_bytes()[8:12], "little")
    state.write_bytes(state.read_bytes()[: header + 4])
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    record.update({field: digest, "sha256": digest})


def test_a_forged_state_is_never_loaded_and_the_conversation_is_evaluated_again(hub, warm_home, random_models,
                                                                                tmp_path):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path, random_model=True)  # random weights: each reply depends on the cache
    record = json.loads(path.read_text())
    forged(state_of(path), record["state"], "hmac")
    path.write_text(json.dumps(record))
    typed = [f"/load {path}", "hello", "/stats"]
    results = [chat(hub, warm_home, typed, random_model=True),
               console(*RANDOM_MODEL, *flags(temperature=0, sample_len=3), "--load", str(path), hub=hub,
                       home=warm_home, stdin=b"hello\n/stats\n")]
    state_of(path).unlink()  # as it is without any state: the same tokens, evaluated in the same batches
    gone = chat(hub, warm_home, typed, random_model=True)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "not using talk.json.state (it was not saved by this installation" in result.stderr
        assert result.stdout == gone.stdout  # the saved tokens, evaluated again
        assert evaluated(stats(result)[0]) > 20


def test_a_state_saved_by_another_installation_is_evaluated_again(hub, warm_home, tmp_path):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path)
    elsewhere = tmp_path / "elsewhere"  # the same models, another key
    shutil.copytree(warm_home, elsewhere, symlinks=True, ignore=shutil.ignore_patterns("state.key", "prompts"))
    result = chat(hub, elsewhere, [f"/load {path}", "/show"])
    assert result.returncode == 0, result.stderr
    assert "not using talk.json.state (it was not saved by this installation" in result.stderr
    assert (elsewhere / "phi-console" / "state.key").stat().st_mode & 0o077 == 0  # its own key, for its owner only


def test_a_forged_saved_prompt_is_never_loaded(hub, random_models, tmp_path):
    run = [*flags(model_repo=RANDOM, model_file="two-layers.gguf", prompt="why is the sky blue", seed=3)]
    first = console(*run, hub=hub, home=tmp_path)
    assert first.returncode == 0, first.stderr
    (index,) = (tmp_path / "phi-console" / "prompts").glob("*.json")
    record = json.loads(index.read_text())
    forged(index.with_suffix(".state"), record, "hmac")
    index.write_text(json.dumps(record))
    again = console(*run, hub=hub, home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "not using the saved state of this prompt" in again.stderr and again.stdout == first.stdout


@pytest.mark.parametrize("damage", ["longer than a key", "a folder"])
def test_a_damaged_state_key_makes_saved_states_evaluated_again_not_a_traceback(hub, random_models, tmp_path, damage):
    run = [*flags(model_repo=RANDOM, model_file="two-layers.gguf", prompt="why is the sky blue", seed=3)]
    first = console(*run, hub=hub, home=tmp_path)
    assert first.returncode == 0, first.stderr
    key = tmp_path / "phi-console" / "state.key"
    key.unlink()
    key.write_bytes(os.urandom(1000)) if damage == "longer than a key" else key.mkdir()
    again = console(*run, hub=hub, home=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "not using the saved state of this prompt" in again.stderr and again.stdout == first.stdout
    third = console(*run, hub=hub, home=tmp_path)  # the state the run before saved: signed by the same key, or none
    assert third.returncode == 0 and "Traceback" not in third.stderr and third.stdout == first.stdout, third.stderr
    assert ("restored from an earlier run" in third.stderr) == (damage == "longer than a key")


# --- 4 and 11. A failed /load changes nothing and names the field; names in messages are one short line --------------
def test_a_nul_in_state_file_is_refused_naming_the_field_and_the_chat_goes_on(hub, warm_home, tmp_path):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path)
    record = json.loads(path.read_text())
    record["state"]["file"] = "talk\0.state"
    path.write_text(json.dumps(record))
    result = chat(hub, warm_home, ["hello", f"/load {path}", "/show", "say something"])
    assert result.returncode == 0, result.stderr
    assert errors_in(result) == [f"error: cannot load {path}: state.file must name a file beside it "
                                 "(got 'talk\\x00.state')"]
    assert context_used(result)[0] > 0 and result.stdout == b"puck puck puck\npuck puck puck\n"


def test_a_long_name_with_a_newline_is_shown_on_one_short_line(hub, warm_home, tmp_path):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path)
    record = json.loads(path.read_text())
    record["state"]["file"] = "two\nlines" + "x" * 1_000_000
    path.write_text(json.dumps(record))
    result = chat(hub, warm_home, [f"/load {path}", f"/load {tmp_path}/{'y' * 5000}"])
    assert result.returncode == 0, result.stderr
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note: not using")]
    assert note.startswith("note: not using two\\nlines") and len(note) < 500
    (error,) = errors_in(result)
    assert error.startswith(f"error: cannot load {tmp_path}/yyy") and len(error) < 500


# --- 5. Standard streams, closed or full ------------------------------------------------------------------------------
def with_closed(descriptor: int, *args: str, hub, home):
    """Run the script with one of its standard streams closed, as `>&-` in a shell does."""

    def child() -> None:
        as_a_user()
        os.close(descriptor)

    completed = subprocess.run([PYTHON, str(SCRIPT), *args], env=environment_for(hub, home), capture_output=True,
                               stdin=subprocess.DEVNULL if descriptor else None, preexec_fn=child, timeout=PATIENCE)
    return completed.returncode, completed.stdout, completed.stderr.decode()


def test_a_closed_stdout_is_one_line_and_exit_1(hub, warm_home):
    code, _, stderr = with_closed(1, *crafted(), hub=hub, home=warm_home)
    assert code == 1 and stderr == "error: stdout is closed: there is nowhere to write the reply\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_stdout_is_one_line_and_exit_1(hub, warm_home):
    with open("/dev/full", "wb") as full:  # every write to it fails with ENOSPC; nothing is changed by writing
        completed = subprocess.run([PYTHON, str(SCRIPT), *crafted()], env=environment_for(hub, warm_home),
                                   stdout=full, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=PATIENCE)
    stderr = completed.stderr.decode()
    assert completed.returncode == 1 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: could not write the reply to stdout: No space left on device"]


@pytest.mark.parametrize("args", [("-p", "-"), ("--chat",)])
def test_a_closed_stdin_where_input_is_needed_is_one_line_and_exit_2(hub, warm_home, args):
    code, stdout, stderr = with_closed(0, *crafted(prompt=None), *args, hub=hub, home=warm_home)
    assert code == 2 and stdout == b""
    assert stderr == "error: stdin is closed, and --chat and -p - read from it; pass the prompt with -p TEXT\n"


def test_a_closed_stderr_changes_no_exit_code(hub, warm_home):
    assert with_closed(2, *crafted(), "--temperature", "hot", hub=hub, home=warm_home)[0] == 2
    assert with_closed(2, *crafted(sample_len=3), hub=hub, home=warm_home)[:2] == (0, b"puck puck puck\n")


# --- 6. A pipe longer than the context could hold is refused at once, and read no further -----------------------------
def test_a_huge_pipe_is_refused_at_once_without_being_read_whole(tmp_path, startup):
    # No hub and nothing cached: had it been tokenized, or read whole, the run would get as far as the download.
    process = subprocess.Popen([PYTHON, str(SCRIPT), "--ctx", "4096"], env=environment_for(None, tmp_path),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=as_a_user)
    sent = [0]

    def feed() -> None:  # 200 MB of text, as long as the script reads it
        block = b"hockey " * 150_000
        try:
            while sent[0] < 200 * 2**20:
                process.stdin.write(block)
                sent[0] += len(block)
            process.stdin.close()
        except BrokenPipeError:
            pass

    started = time.monotonic()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    process.wait(timeout=PATIENCE)  # not communicate(), which would close its stdin: an end to the text
    took = time.monotonic() - started
    feeder.join(timeout=PATIENCE)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    assert process.returncode == 2 and stdout == b"", stderr
    assert stderr.decode().startswith("error: the prompt on stdin is longer than 262144 bytes, more than 4096 tokens")
    assert sent[0] < 8 * 2**20  # what it read, and what the pipe held: not the whole of it
    assert took < 3 * startup + 1


# --- 7. Numbers that a 32-bit float turns into 0 or infinity are refused ---------------------------------------------
@pytest.mark.parametrize(("flag", "value"), [("--repeat-penalty", "1e-300"), ("--temperature", "1e308"),
                                             ("--temperature", "1e-300"), ("--top-p", "1e-45")])
def test_a_number_a_32_bit_float_cannot_hold_is_refused(tmp_path, flag, value):
    line = the_error(console(flag, value, hub=None, home=tmp_path), code=2)
    assert line.startswith(f"error: argument {flag}: must be ") and "1e-30" in line


def test_help_says_where_each_range_ends(tmp_path):
    shown = "".join(console("--help", hub=None, home=tmp_path).stdout.decode().split())  # however it is wrapped
    for expected in ("--temperatureX0=greedy,higher=morerandom;0,oranumberin1e-30..1e30",
                     "anumberin1e-30..1,ornone", "anumberin1e-30..1e30(default:1.2)"):
        assert expected in shown


def test_set_refuses_such_a_number_too_and_the_chat_goes_on(hub, warm_home):
    result = chat(hub, warm_home, ["/set temperature 1e-300", "/show", "hello"])
    assert result.returncode == 0 and result.stdout == b"puck puck puck\n"
    assert errors_in(result) == ["error: temperature must be 0, or a number in 1e-30..1e30 (got '1e-300')"]
    assert "temperature = 0.0" in result.stderr  # as it was


# --- 8. SIGHUP: as SIGTERM, exit 129, nothing left behind ------------------------------------------------------------
def test_sighup_ends_a_reply_with_exit_129(hub, warm_home):
    process = start(*crafted(sample_len=100_000, ctx=4096), hub=hub, home=warm_home)
    assert process.stdout.read(4) == b"puck"
    process.send_signal(signal.SIGHUP)
    stdout, stderr = process.communicate(timeout=PATIENCE)
    assert process.returncode == 129 and b"Traceback" not in stderr
    assert stdout.endswith(b"\n")  # the line ended


@pytest.fixture(scope="module")
def random_home(hub, random_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("random_home")
    assert console(*flags(model_repo=RANDOM, model_file="two-layers.gguf", sample_len=1), hub=hub,
                   home=home).returncode == 0
    return home


def test_sighup_during_a_save_leaves_no_temporary_file(hub, random_home, tmp_path):
    path = tmp_path / "talk.json"
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2):
        process = start("--model-repo", RANDOM, "--model-file", "two-layers.gguf", "--chat",
                        *flags(sample_len=2, temperature=0), hub=hub, home=random_home, stdin=subprocess.PIPE)
        process.stdin.write(b"hello world " * 300 + b"\n")
        process.stdin.flush()
        process.stdout.readline()  # the reply: now a large conversation to save
        process.stdin.write(f"/save {path}\n".encode())
        process.stdin.flush()
        time.sleep(delay)
        process.send_signal(signal.SIGHUP)
        _, stderr = process.communicate(timeout=PATIENCE)
        assert process.returncode == 129 and b"Traceback" not in stderr, stderr
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- 9. A chat keeps room for its history -----------------------------------------------------------------------------
def test_a_reply_as_long_as_the_context_does_not_push_out_the_history(hub, warm_home, tmp_path):
    # end.gguf ends each reply at once: four short exchanges fit 256 tokens many times over.
    lines = ["hello", "say something", "and more", "and more still", "/show", f"/save {tmp_path / 't.json'}"]
    result = console(*crafted("end.gguf", prompt=None, sample_len=256), "--ctx", "256", "--chat", hub=hub,
                     home=warm_home, stdin="".join(line + "\n" for line in lines).encode())
    assert result.returncode == 0, result.stderr
    assert "forgot" not in result.stderr and "saved 4 exchange(s)" in result.stderr


def test_what_save_reports_is_what_the_model_still_holds(hub, warm_home, tmp_path):
    messages = [f"hello world number {i}" for i in range(30)]
    typed = "".join(line + "\n" for line in [*messages, f"/save {tmp_path / 't.json'}"])
    result = console(*crafted(prompt=None, sample_len=8, system="say puck"), "--chat", "--ctx", "128", hub=hub,
                     home=warm_home, stdin=typed.encode())
    assert result.returncode == 0 and "forgot the oldest" in result.stderr, result.stderr
    record = json.loads((tmp_path / "t.json").read_text())
    said = [m["content"] for m in record["messages"] if m["role"] == "user"]
    assert len(said) == len(record["context"]["exchanges"]) < 30
    assert said[0] == messages[0] and said[1:] == messages[len(messages) - len(said) + 1:]  # the first: the system's


# --- 10. Only regular files are read: a FIFO or a folder is one line, never a hang ------------------------------------
def test_load_of_a_fifo_or_a_folder_is_one_line_and_the_chat_goes_on(hub, warm_home, tmp_path, startup):
    fifo = tmp_path / "talk.json"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = chat(hub, warm_home, ["hello", f"/load {fifo}", f"/load {tmp_path}", "/show"])
    assert time.monotonic() - started < 10 * startup + 10
    assert result.returncode == 0, result.stderr
    assert errors_in(result) == [f"error: cannot load {fifo}: not a regular file",
                                 f"error: cannot load {tmp_path}: not a regular file"]
    assert context_used(result)[0] > 0
    line = the_error(console(*crafted(prompt=None), "--load", str(fifo), hub=None, home=tmp_path), code=2)
    assert line == f"error: --load: cannot load {fifo}: not a regular file"


def test_a_state_file_that_is_a_fifo_is_not_read_and_the_conversation_is_evaluated_again(hub, warm_home, tmp_path):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path)
    state_of(path).unlink()
    os.mkfifo(state_of(path))
    result = chat(hub, warm_home, [f"/load {path}", "/show"])
    assert result.returncode == 0, result.stderr
    assert "not using talk.json.state (not a regular file); evaluating the conversation again" in result.stderr


def test_a_cached_tokenizer_that_is_a_fifo_is_one_line(hub, tmp_path):
    assert console(*crafted(sample_len=1), hub=hub, home=tmp_path).returncode == 0
    (blob,) = (tmp_path / "hub").glob("models--microsoft--Phi-3-mini-4k-instruct/blobs/*")
    blob.unlink()
    os.mkfifo(blob)
    line = the_error(console(*crafted(sample_len=3), hub=hub, home=tmp_path))
    assert "is not a usable tokenizer.json (OSError: [Errno 22] not a regular file); delete it" in line


# --- 12. Ctrl-C at any moment of start-up -----------------------------------------------------------------------------
def test_ctrl_c_at_any_moment_of_start_up_exits_130_without_a_traceback(hub, warm_home, startup):
    # Timed from the script's first line, `from __future__ import ...`: before it, Ctrl-C meets Python's own start-up,
    # which no script can guard. Python says when each import is done (PYTHONPROFILEIMPORTTIME). Half the presses
    # come in the first 50 ms, among the imports of the standard library.
    delays = [random.uniform(0, 0.05) for _ in range(5)] + [random.uniform(0, 1.5 * startup) for _ in range(5)]
    for delay in delays:
        # -p - with a pipe nobody closes: the run waits for its prompt, so it can only end by the Ctrl-C
        process = subprocess.Popen([PYTHON, str(SCRIPT), *crafted(prompt="-")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.PIPE, preexec_fn=as_a_user,
                                   env={**environment_for(hub, warm_home), "PYTHONPROFILEIMPORTTIME": "1"})
        seen = b""
        while not seen.rstrip().endswith(b"| __future__"):
            seen = process.stderr.readline()
            assert seen, "the script never imported __future__"
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        streams = Streams(process)
        process.wait(timeout=PATIENCE)  # stdin still open: only the Ctrl-C ends the run
        process.stdin.close()
        _, stderr = streams.close()
        assert "Traceback" not in stderr and process.returncode == 130, (delay, process.returncode, stderr[-800:])


def test_ctrl_c_raised_inside_a_finalizer_is_not_lost(tmp_path):
    # Python prints an exception raised inside a finalizer (or a callback from C) and goes on: a Ctrl-C that lands
    # there would be a traceback and then nothing. Such a moment cannot be placed at will inside a real run, so this
    # runs the script's own run() around a main() whose object's finalizer receives the Ctrl-C.
    program = f"""
import os, signal, sys, time
sys.path.insert(0, {str(SCRIPT.parent)!r})
import phi_console

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs in here

def main():
    Finalized()
    time.sleep(60)
    return 0

phi_console.main = main
phi_console.run()
"""
    result = subprocess.run([PYTHON, "-c", program], capture_output=True, stdin=subprocess.DEVNULL,
                            preexec_fn=as_a_user, timeout=PATIENCE)
    assert result.returncode == 130 and result.stderr == b"", result.stderr[-800:]  # main() would have returned 0


# --- 13. Paths that are not UTF-8 -------------------------------------------------------------------------------------
def test_a_cache_and_a_save_in_a_folder_whose_name_is_not_utf8(hub, random_models, tmp_path):
    home = tmp_path / os.fsdecode(b"caf\xff")
    run = flags(model_repo=RANDOM, model_file="two-layers.gguf", prompt="why is the sky blue", seed=3)
    first = console(*run, hub=hub, home=home)  # random weights: a reply from a wrong cache would differ
    assert first.returncode == 0, first.stderr
    again = console(*run, hub=hub, home=home)
    assert "restored from an earlier run" in again.stderr and again.stdout == first.stdout
    saved_conversation(hub, home, tmp_path / "talk.json")  # typed at the chat, a name must be text: moved after
    path = home / "talk.json"
    for name in ("talk.json", "talk.json.state"):
        (tmp_path / name).rename(home / name)
    loaded = console(*crafted(prompt=None), "--load", str(path), hub=hub, home=home, stdin=b"hello\n/stats\n")
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded 2 exchange(s)" in loaded.stderr and "not using" not in loaded.stderr


def test_arguments_that_are_not_utf8_are_a_reply_and_a_save_keeps_them(hub, warm_home, tmp_path):
    result = console(*crafted(prompt=os.fsdecode(b"caf\xe9"), system=os.fsdecode(b"be \xff")), hub=hub, home=warm_home)
    assert result.returncode == 0 and result.stdout == b"puck puck puck puck puck puck puck puck\n", result.stderr
    grammar = tmp_path / os.fsdecode(b"g\xff.gbnf")  # a legal file name, which /save must keep as it is
    grammar.write_text('root ::= " puck"\n')
    talk = tmp_path / "talk.json"
    saved = console(*crafted(prompt=None, grammar=grammar), "--chat", hub=hub, home=warm_home,
                    stdin=f"hello\n/save {talk}\n".encode())
    assert saved.returncode == 0 and "saved 1 exchange(s)" in saved.stderr, saved.stderr
    loaded = console(*crafted(prompt=None), "--load", str(talk), hub=hub, home=warm_home, stdin=b"/show\nhello\n")
    assert loaded.returncode == 0, loaded.stderr
    assert f"grammar = {str(grammar)!r}" in loaded.stderr and loaded.stdout == b" puck\n"


def test_a_grammar_can_come_from_a_pipe_as_the_shell_passes_one(hub, warm_home, tmp_path):
    # `--grammar <(printf ...)` hands the script /dev/fd/N: a pipe, read once, whole, and bounded as a file is
    read, write = os.pipe()
    os.write(write, b'root ::= " goal" " puck"\n')
    os.close(write)
    result = subprocess.run([PYTHON, str(SCRIPT), *crafted(grammar=f"/dev/fd/{read}")], pass_fds=[read],
                            capture_output=True, env=environment_for(hub, warm_home), timeout=PATIENCE,
                            stdin=subprocess.DEVNULL, preexec_fn=as_a_user)
    os.close(read)
    assert result.returncode == 0, result.stderr[-800:]
    assert result.stdout == b" goal puck\n"


def test_a_state_key_that_cannot_be_read_is_named_not_the_users_file(hub, warm_home, tmp_path):
    talk = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, talk)
    key = warm_home / "phi-console" / "state.key"
    kept = key.read_bytes()
    key.unlink()
    key.symlink_to(tmp_path / "nowhere")  # dangling
    try:
        loaded = chat(hub, warm_home, [f"/load {talk}", "/show"])
    finally:
        key.unlink()
        key.write_bytes(kept)
    assert loaded.returncode == 0, loaded.stderr
    assert f"the key {key} cannot be read" in loaded.stderr and "evaluating the conversation again" in loaded.stderr


def test_a_prompt_longer_than_the_model_can_hold_does_not_ask_for_a_larger_context(hub, warm_home):
    line = the_error(console(*crafted(prompt="hello " * 5000), hub=hub, home=warm_home), code=2)
    assert "shorten the prompt (the model takes at most 4096)" in line and "--ctx" not in line
    smaller = the_error(console(*crafted(prompt="hello " * 600), "--ctx", "512", hub=hub, home=warm_home), code=2)
    assert "or raise --ctx (to at most 4096)" in smaller
