"""--chat: a conversation at `>>> `, driven through a pipe and through a pseudo-terminal.

With the crafted model every reply is "puck ..." unless the repeat penalty, whose window runs on across the
model's own replies (never the user's words), turns a word into "goal".
"""
from __future__ import annotations

import json
import os
import pty
import re
import resource
import select
import subprocess
import time
from pathlib import Path

import pytest

from reference import llama_cpp_tokens

from conftest import (NESTED_JSON, PATIENCE, PYTHON, RANDOM, SCRIPT, Streams, as_a_user, console, crafted,
                      environment_for, flags, the_error)


def chat(hub, home, lines: list[str], *, random_model: bool = False, **settings):
    """Pipe some lines into --chat; return the result (replies on stdout, the rest on stderr).

    With random_model, the model has random weights (the random_models fixture), so that every reply depends on
    everything in the cache: a greedy reply then shows whether the conversation was held, restored or evaluated
    alike (a sampler's random draws would differ by how many replies it drew before).
    """
    chosen = {"sample_len": 3, **settings}
    model = [*RANDOM_MODEL, *flags(**{"temperature": 0, **chosen})] if random_model else \
        crafted(prompt=None, **chosen)
    return console(*model, "--chat", hub=hub, home=home, stdin="".join(line + "\n" for line in lines).encode())


RANDOM_MODEL = ["--model-repo", RANDOM, "--model-file", "two-layers.gguf"]


def evaluated(stats_line: str) -> int:
    return int(re.search(r"(\d+) prompt tokens evaluated", stats_line).group(1))


def test_bytes_that_are_no_utf8_are_a_message_like_any_other(hub, warm_home):
    result = console(*crafted(prompt=None, sample_len=2), "--chat", hub=hub, home=warm_home,
                     stdin=b"hello \xff\xfe world\nsay something\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck\npuck puck\n" and "Traceback" not in result.stderr


def test_each_message_gets_a_reply_on_stdout(hub, warm_home):
    result = chat(hub, warm_home, ["hello", "say something"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck puck\npuck puck puck\n"


def test_later_turns_evaluate_only_their_own_tokens(hub, warm_home):
    # Read from llama.cpp's performance counters: a long first message must not be evaluated again.
    short = chat(hub, warm_home, ["hello", "/stats", "say something", "/stats"])
    long = chat(hub, warm_home, ["hello world " * 150, "/stats", "say something", "/stats"])
    for result in (short, long):
        assert result.returncode == 0, result.stderr
    short_stats = [line for line in short.stderr.splitlines() if line.startswith("last reply")]
    long_stats = [line for line in long.stderr.splitlines() if line.startswith("last reply")]
    assert evaluated(long_stats[0]) > 300  # the long first message itself
    assert evaluated(long_stats[1]) == evaluated(short_stats[1]) < 20  # the second turn costs the same


def test_set_changes_sampling_mid_conversation(hub, warm_home):
    # "puck" said in the first reply is inside the penalty window when the second reply starts.
    result = chat(hub, warm_home, ["hello", "/set repeat_penalty 1.5", "say something"])
    assert result.stdout == b"puck puck puck\ngoal puck puck\n"
    assert "repeat_penalty = 1.5" in result.stderr


def test_the_users_words_are_not_in_the_penalty_window(hub, warm_home):
    result = chat(hub, warm_home, ["puck puck goal"], repeat_penalty=1.5)
    assert result.stdout == b"puck goal puck\n"


def test_set_refuses_a_bad_value_and_the_conversation_goes_on(hub, warm_home):
    result = chat(hub, warm_home, ["/set temperature -3", "/set top_p 7", "/set bogus 1", "/set seed x", "hello"])
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "temperature must be" in errors[0] and "top_p must be" in errors[1]
    assert result.stdout == b"puck puck puck\n"


def test_show_help_and_unknown_commands(hub, warm_home):
    result = chat(hub, warm_home, ["/show", "/help", "/nonsense"], temperature=0.5, seed=4)
    assert result.returncode == 0
    assert "temperature = 0.5" in result.stderr and "seed = 4" in result.stderr
    assert "/reset" in result.stderr and "/bye" in result.stderr
    assert "error: unknown command" in result.stderr
    assert result.stdout == b""


def test_reset_forgets_the_conversation(hub, warm_home):
    result = chat(hub, warm_home, ["hello", "/reset", "hello"], repeat_penalty=1.5)
    # Without /reset the second reply would start with "goal": "puck" would still be in the window.
    assert result.stdout == b"puck goal puck\npuck goal puck\n"


def test_bye_leaves_and_ignores_the_rest(hub, warm_home):
    result = chat(hub, warm_home, ["hello", "/bye", "never answered"])
    assert result.returncode == 0
    assert result.stdout == b"puck puck puck\n"


def test_a_long_conversation_forgets_its_oldest_turns_and_goes_on(hub, warm_home):
    messages = [f"hello world number {i}" for i in range(30)]
    result = console(*crafted(prompt=None, sample_len=8), "--chat", "--ctx", "128", hub=hub, home=warm_home,
                     stdin="".join(m + "\n" for m in messages).encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck puck puck puck puck puck puck\n" * 30
    assert "forgot the oldest" in result.stderr and "Traceback" not in result.stderr


def test_a_prompt_given_with_chat_is_its_first_message(hub, warm_home):
    result = console(*crafted(prompt="hello", sample_len=2), "--chat", hub=hub, home=warm_home, stdin=b"hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck\npuck puck\n"  # one reply to -p, one to the line typed


def test_a_line_longer_than_any_context_is_read_no_further_and_the_chat_goes_on(hub, warm_home):
    line = b"hello " * 50_000_000  # 300 MB on one line, as a pipe can hold: never read whole, never tokenized
    result = console(*crafted(prompt=None, sample_len=2), "--chat", hub=hub, home=warm_home,
                     stdin=line + b"\nhello\n")
    assert result.returncode == 0, result.stderr
    assert "error: that message is longer than the 4096 tokens the context holds" in result.stderr
    assert result.stdout == b"puck puck\n"


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(hub, warm_home):
    result = console(*crafted(prompt=None, sample_len=2), "--chat", "--ctx", "64", hub=hub, home=warm_home,
                     stdin=("hello world " * 60 + "\nhello\n").encode())
    assert result.returncode == 0, result.stderr
    assert "error: that message is" in result.stderr
    assert result.stdout == b"puck puck\n"


def test_the_chat_constant_turns_chat_on(hub, warm_home, tmp_path):
    source = SCRIPT.read_text().replace("\nCHAT = False", "\nCHAT = True", 1)
    (tmp_path / "phi_console.py").write_text(source)
    result = console(*crafted(prompt=None, sample_len=2), hub=hub, home=warm_home, stdin=b"hello\nhi\n",
                     script=tmp_path / "phi_console.py")
    assert result.stdout == b"puck puck\npuck puck\n"


class Terminal:
    """The script in a pseudo-terminal, as a person at a console runs it."""

    def __init__(self, hub, home, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec the script with the terminal as its controlling tty
            as_a_user()
            os.execve(PYTHON, [PYTHON, str(SCRIPT), *args],
                      {**environment_for(hub, home), "TERM": "xterm"})
        self.seen = b""
        self.cursor = 0

    def read_until(self, marker: bytes, timeout: float = PATIENCE) -> bytes:
        """What the terminal shows from where the last read stopped up to and including `marker`."""
        deadline = time.monotonic() + timeout
        while (found := self.seen.find(marker, self.cursor)) < 0:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} on the terminal; last output: {self.seen[-400:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {marker!r}: {self.seen[-400:]!r}")
            self.seen += chunk
        shown, self.cursor = self.seen[self.cursor : found + len(marker)], found + len(marker)
        return shown

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_at_a_terminal_ctrl_c_stops_a_reply_and_keeps_the_conversation(hub, warm_home, model_file):
    term = Terminal(hub, warm_home, *crafted(prompt=None, sample_len=3000), "--chat")
    term.read_until(b">>> ")
    term.type(b"hello\r")
    said = term.read_until(b"puck puck puck")
    term.type(b"\x03")  # Ctrl-C while the reply streams
    said += term.read_until(b">>> ")
    words = said.count(b"puck")
    assert words < 3000  # stopped early
    term.type(b"/show\r")
    used = int(re.search(rb"context: (\d+) of", term.read_until(b"tokens used")).group(1))
    # The prompt, as llama.cpp would feed it, and every word said but the last one, which goes in with the next message
    assert used >= len(llama_cpp_tokens(model_file("puck-goal.gguf"), [("user", "hello")])) + words - 1
    term.read_until(b">>> ")
    # A person presses Ctrl-C after the prompt shows. Pressed within microseconds of it, the signal can land
    # between CPython's input() printing the prompt and blocking on the terminal, and wait for the next key.
    time.sleep(0.5)
    term.type(b"\x03")  # Ctrl-C at an empty prompt explains how to leave
    assert b"/bye" in term.read_until(b">>> ")
    term.type(b"\x04")  # Ctrl-D leaves
    assert term.exit_code() == 0


def test_a_reply_under_a_grammar_stopped_by_ctrl_c_is_stopped_not_incomplete(hub, warm_home, tmp_path):
    (tmp_path / "words.gbnf").write_text('root ::= (" puck")+ " goal"\n')  # "▁puck" reads " puck"; ends at a goal
    term = Terminal(hub, warm_home, *crafted(prompt=None, sample_len=3000, grammar=tmp_path / "words.gbnf"), "--chat")
    term.read_until(b">>> ")
    term.type(b"hello\r")
    term.read_until(b"puck puck puck")
    term.type(b"\x03")  # Ctrl-C while the reply streams, long before the grammar could be complete
    said = term.read_until(b">>> ")
    assert b"(stopped)" in said and b"incomplete" not in said and b"error" not in said
    term.type(b"\x04")
    assert term.exit_code() == 0


def test_at_a_terminal_the_prompt_is_shown_and_bye_leaves(hub, warm_home):
    term = Terminal(hub, warm_home, *crafted(prompt=None, sample_len=2), "--chat")
    term.read_until(b">>> ")
    term.type(b"hello\r")
    assert b"puck puck" in term.read_until(b">>> ")
    term.type(b"/bye\r")
    assert term.exit_code() == 0


# --- messages of many lines, a system prompt, and conversations saved and loaded ---------------------------

def stats(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("last reply")]


def context_used(result) -> list[int]:
    return [int(n) for n in re.findall(r"context: (\d+) of", result.stderr)]


def test_a_triple_quoted_block_is_one_message(hub, warm_home):
    block = chat(hub, warm_home, ['"""', "hello", "", "say something", '"""', "/stats"])
    assert block.returncode == 0, block.stderr
    assert block.stdout == b"puck puck puck\n"  # one reply for the three lines
    joined = chat(hub, warm_home, ["hello say something", "/stats"])
    # The block's two line breaks are in the message: it costs more tokens than the same words on one line.
    assert evaluated(stats(block)[0]) > evaluated(stats(joined)[0])


def test_the_system_prompt_opens_the_first_message_only(hub, warm_home):
    plain = chat(hub, warm_home, ["hello", "/stats", "hello", "/stats"])
    system = chat(hub, warm_home, ["hello", "/stats", "hello", "/stats"], system="say puck")
    assert evaluated(stats(system)[0]) > evaluated(stats(plain)[0])  # its tokens are in the first prompt
    assert evaluated(stats(system)[1]) == evaluated(stats(plain)[1])  # and only there


def test_system_applies_to_one_shot_runs_too(hub, warm_home, random_models):
    from test_settings import prompt_tokens

    plain = console(*RANDOM_MODEL, *flags(prompt="hello", seed=5, sample_len=12), hub=hub, home=warm_home)
    system = console(*RANDOM_MODEL, *flags(prompt="hello", seed=5, sample_len=12, system="say puck"), hub=hub,
                     home=warm_home)
    assert prompt_tokens(system) > prompt_tokens(plain)
    assert system.stdout != plain.stdout  # the model read it: the same seed draws another reply


def test_set_system_starts_the_conversation_over(hub, warm_home):
    result = chat(hub, warm_home, ["hello", "/set system be brief", "/show", "hello"], repeat_penalty=1.5)
    assert result.returncode == 0, result.stderr
    assert "the conversation is forgotten" in result.stderr and "system = 'be brief'" in result.stderr
    assert context_used(result) == [0]
    assert result.stdout == b"puck goal puck\npuck goal puck\n"  # the penalty window started over too


def saved_conversation(hub, home, path, **settings):
    """Two exchanges, then /show and /save: what a later process loads."""
    result = chat(hub, home, ["hello", "say something", "/show", f"/save {path}"], **settings)
    assert result.returncode == 0, result.stderr
    assert path.exists() and path.with_name(path.name + ".state").exists()
    return result


def test_save_then_load_in_a_new_process_restores_the_context_without_evaluating_it(hub, warm_home, tmp_path):
    saved = saved_conversation(hub, warm_home, tmp_path / "talk.json", repeat_penalty=1.5)
    record = json.loads((tmp_path / "talk.json").read_text())
    # The window runs on across replies: in the second, both words are already penalised, and puck wins again.
    assert [m["content"] for m in record["messages"]] == ["hello", "puck goal puck", "say something", "puck puck puck"]
    going_on = chat(hub, warm_home, ["hello", "say something", "hello", "/stats"], repeat_penalty=1.5)
    loaded = chat(hub, warm_home, [f"/load {tmp_path / 'talk.json'}", "/show", "hello", "/stats"], repeat_penalty=1.5)
    assert loaded.returncode == 0, loaded.stderr
    assert "not using" not in loaded.stderr
    assert context_used(loaded) == context_used(saved)  # /show: the same context use as before /save
    # The next turn evaluates only its own tokens, as it would have in the first process, and says the same.
    assert evaluated(stats(loaded)[0]) == evaluated(stats(going_on)[-1]) < 20
    assert loaded.stdout == going_on.stdout.splitlines(keepends=True)[-1]


def test_a_loaded_conversation_replies_as_the_process_that_held_it_would(hub, warm_home, random_models, tmp_path):
    saved_conversation(hub, warm_home, tmp_path / "talk.json", random_model=True)
    going_on = chat(hub, warm_home, ["hello", "say something", "hello"], random_model=True)
    loaded = chat(hub, warm_home, [f"/load {tmp_path / 'talk.json'}", "hello", "/stats"], random_model=True)
    assert "not using" not in loaded.stderr and evaluated(stats(loaded)[0]) < 20  # restored, not evaluated
    assert loaded.stdout == going_on.stdout.splitlines(keepends=True)[-1]  # random weights: the cache is the same
    fresh = chat(hub, warm_home, ["hello"], random_model=True)
    assert fresh.stdout != loaded.stdout  # and it matters: without the conversation, the reply differs


def test_load_at_start_takes_the_saved_settings(hub, warm_home, tmp_path):
    saved_conversation(hub, warm_home, tmp_path / "talk.json", temperature=0.5, seed=9)
    untyped = crafted(prompt=None, temperature=None, repeat_penalty=None, sample_len=None)  # the model's flags only
    result = console(*untyped, "--load", str(tmp_path / "talk.json"), hub=hub, home=warm_home, stdin=b"/show\n")
    assert result.returncode == 0, result.stderr
    for shown in ("loaded 2 exchange(s)", "temperature = 0.5", "seed = 9", "sample_len = 3"):
        assert shown in result.stderr
    assert "replace" not in result.stderr


def test_flags_typed_with_load_win_over_the_saved_settings_and_a_note_says_which(hub, warm_home, tmp_path):
    saved_conversation(hub, warm_home, tmp_path / "talk.json", temperature=0.5, seed=9)
    typed = crafted(prompt=None, temperature=0, repeat_penalty=None, sample_len=None, seed=9)
    result = console(*typed, "--load", str(tmp_path / "talk.json"), hub=hub, home=warm_home, stdin=b"/show\n")
    assert result.returncode == 0, result.stderr
    assert "temperature = 0.0\n" in result.stderr and "seed = 9" in result.stderr  # /show
    notes = [line for line in result.stderr.splitlines() if "replace" in line]
    assert notes == ["note: the flags given replace the saved temperature = 0.5"]  # seed 9 was typed, not changed


def test_system_typed_with_load_is_refused_it_would_rewrite_the_first_message(hub, warm_home, tmp_path):
    saved_conversation(hub, warm_home, tmp_path / "talk.json")
    result = console(*crafted(prompt=None, system="be brief"), "--load", str(tmp_path / "talk.json"), hub=hub,
                     home=warm_home)
    assert "--system cannot change a saved conversation" in the_error(result, code=2)


def test_a_chat_shows_the_seed_it_drew_and_that_seed_repeats_the_chat(hub, warm_home, random_models):
    lines = ["hello", "/show", "say something"]
    first = chat(hub, warm_home, lines, random_model=True, temperature=1.0, seed=None, sample_len=8)
    drawn = int(re.search(r"chatting with the model, seed (\d+)", first.stderr)[1])
    assert f"seed = {drawn}\n" in first.stderr  # /show
    again = chat(hub, warm_home, lines, random_model=True, temperature=1.0, seed=drawn, sample_len=8)
    assert again.stdout == first.stdout and len(first.stdout.splitlines()) == 2
    other = chat(hub, warm_home, lines, random_model=True, temperature=1.0, seed=None, sample_len=8)
    assert f"seed {drawn}:" not in other.stderr  # a new one each chat


def test_a_file_saved_before_a_setting_existed_loads_with_its_default(hub, warm_home, tmp_path):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path, top_p=0.5)
    record = json.loads(path.read_text())
    del record["settings"]["top_p"]  # as a file from a version without it
    path.write_text(json.dumps(record))
    result = chat(hub, warm_home, [f"/load {path}", "/show", "hello"])
    assert result.returncode == 0 and "error" not in result.stderr, result.stderr
    assert "loaded 2 exchange(s)" in result.stderr and "top_p = None" in result.stderr
    assert result.stdout == b"puck puck puck\n"


def test_input_that_ends_inside_a_block_sends_the_block(hub, warm_home):
    result = chat(hub, warm_home, ["hello", '"""', "say", "something"])  # no closing """
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"puck puck puck\npuck puck puck\n"


def test_load_of_an_endless_or_huge_file_is_refused_at_once_and_the_chat_goes_on(hub, warm_home, tmp_path, startup):
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:  # valid JSON: only its size is wrong
        f.write(b'{"format": "phi-console conversation 1", "padding": "')
        f.write(b"x" * (100 << 20))
        f.write(b'"}')
    process = subprocess.Popen([PYTHON, str(SCRIPT), *crafted(prompt=None, sample_len=3), "--chat"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=environment_for(hub, warm_home), preexec_fn=capped)
    lines = Streams(process)
    process.stdin.write(b"hello\n")
    process.stdin.flush()
    lines.wait_for(b"puck puck puck", "out")
    before = peak_memory(process.pid)
    for name in ("/dev/zero", str(huge)):
        process.stdin.write(f"/load {name}\n".encode())
        process.stdin.flush()
        sent = time.monotonic()
        lines.wait_for(f"error: cannot load {name}".encode())
        assert time.monotonic() - sent < startup  # less than it takes to start the script: nothing read whole
    grown = peak_memory(process.pid) - before
    process.stdin.write(b"say something\n")
    process.stdin.close()
    assert process.wait(timeout=PATIENCE) == 0
    lines.close()
    assert grown < 30 << 20  # far less than the 100 MB file
    assert bytes(lines.out) == b"puck puck puck\npuck puck puck\n"  # the chat went on, its conversation whole


def capped() -> None:
    """As a user runs it, with at most 4 GiB of address space: a script that read /dev/zero whole fails, not the
    machine."""
    as_a_user()
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def peak_memory(pid: int) -> int:
    """The most memory a process has held so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024



def test_a_damaged_state_is_not_trusted_and_the_conversation_is_evaluated_again(hub, warm_home, random_models,
                                                                                tmp_path):
    saved_conversation(hub, warm_home, tmp_path / "talk.json", random_model=True)
    intact = chat(hub, warm_home, [f"/load {tmp_path / 'talk.json'}", "hello", "/stats"], random_model=True,
                  sample_len=40)
    state = tmp_path / "talk.json.state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    damaged = chat(hub, warm_home, [f"/load {tmp_path / 'talk.json'}", "/show", "hello", "/stats"],
                   random_model=True, sample_len=40)
    assert damaged.returncode == 0, damaged.stderr
    assert "not using talk.json.state" in damaged.stderr and "evaluating the conversation again" in damaged.stderr
    assert evaluated(stats(damaged)[0]) > evaluated(stats(intact)[0])  # the history was evaluated again
    state.unlink()  # and as it is without any state: the same tokens in the same batches, the same reply (the intact
    # state's replies were cached a token at a time, which rounds differently and can turn a near tie the other way)
    gone = chat(hub, warm_home, [f"/load {tmp_path / 'talk.json'}", "/show", "hello", "/stats"], random_model=True,
                sample_len=40)
    assert "not using talk.json.state" in gone.stderr and damaged.stdout == gone.stdout


def test_a_state_saved_with_another_model_is_not_trusted(hub, warm_home, tmp_path):
    saved = saved_conversation(hub, warm_home, tmp_path / "talk.json")
    other = console(*crafted(model="end.gguf", prompt=None), "--chat", hub=hub, home=warm_home,
                    stdin=f"/load {tmp_path / 'talk.json'}\n/show\n".encode())
    assert other.returncode == 0, other.stderr
    assert "saved by another model file" in other.stderr
    assert context_used(other) == context_used(saved)  # the same conversation, evaluated again


@pytest.mark.parametrize("content", [None, b"{ not json", b'{"format": "something else"}', b"[]", NESTED_JSON])
def test_a_missing_or_malformed_file_is_one_error_and_the_conversation_goes_on(hub, warm_home, tmp_path, content):
    path = tmp_path / "talk.json"
    if content is not None:
        path.write_bytes(content)
    result = chat(hub, warm_home, ["hello", f"/load {path}", "/show", "say something"])
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load" in errors[0] and "Traceback" not in result.stderr
    assert context_used(result)[0] > 0  # the first exchange is still there
    assert result.stdout == b"puck puck puck\npuck puck puck\n"


def damage(record: dict, part: str) -> str:
    """Spoil one part of a saved conversation; what the error line must then name."""
    if part == "a token outside the vocabulary":
        record["context"]["tokens"][3] = 99999
        return "context.tokens[3] is 99999, not a token of this model"
    if part == "exchanges out of order":
        record["context"]["exchanges"].reverse()
        return "context.exchanges must be in order"
    if part == "a setting out of range":
        record["settings"]["temperature"] = -1
        return "settings.temperature must be 0, or a number in 1e-30..1e30 (got -1)"
    if part == "an exchange beyond its tokens":  # it would make the cache slide the wrong way when room is made
        record["context"]["exchanges"][-1] = len(record["context"]["tokens"]) + 50
        return f"context.exchanges[1] is {len(record['context']['tokens']) + 50}, not a position in the context"
    if part == "a window llama.cpp cannot allocate":
        record["settings"]["repeat_last_n"] = 2_000_000_000
        return "settings.repeat_last_n must be an integer in 0..65536 (got 2000000000)"
    if part == "a schema llguidance cannot enforce":  # checked as the flag would be
        record["settings"]["json_schema"] = '{"oneOf": [{"type": "integer"}, {"type": "number"}]}'
        return "its settings: the JSON schema cannot be used: oneOf is enforced only where"
    if part == "a token id that is a number but no integer":
        record["context"]["pending"][0] = 5.0
        return "context.pending[0] must be an integer (got 5.0)"
    record["messages"][1]["content"] = None
    return "messages[1].content must be text (got None)"


@pytest.mark.parametrize("part", ["a token outside the vocabulary", "exchanges out of order", "a setting out of range",
                                  "a message that is not text", "an exchange beyond its tokens",
                                  "a window llama.cpp cannot allocate", "a schema llguidance cannot enforce",
                                  "a token id that is a number but no integer"])
def test_a_damaged_saved_conversation_is_refused_naming_the_field_and_value(hub, warm_home, tmp_path, part):
    path = tmp_path / "talk.json"
    saved_conversation(hub, warm_home, path)
    record = json.loads(path.read_text())
    expected = damage(record, part)
    path.write_text(json.dumps(record))
    result = chat(hub, warm_home, ["hello", f"/load {path}", "/show"])
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot load {path}: {expected}"), result.stderr
    assert context_used(result)[0] > 0  # the conversation it had goes on


def test_help_lists_every_command(hub, warm_home):
    result = chat(hub, warm_home, ["/help"])
    for command in ("/set", "/show", "/save", "/load", "/reset", "/stats", "/help", "/bye", '"""'):
        assert command in result.stderr


def replies_at_a_terminal(hub, home, keys: list[bytes]) -> bytes:
    """Type each key sequence at the `>>> ` prompt, then leave; what the terminal showed."""
    term = Terminal(hub, home, *crafted(prompt=None, sample_len=2), "--chat")
    term.read_until(b">>> ")
    for sequence in keys:
        term.type(sequence)
        time.sleep(0.3)
    shown = term.read_until(b">>> ")  # the reply is over: a key typed during it would be echoed into it
    term.type(b"/stats\r")
    shown += term.read_until(b"tokens evaluated")
    term.type(b"/bye\r")
    assert term.exit_code() == 0
    return shown


def test_at_a_terminal_a_triple_quoted_block_is_one_message(hub, warm_home):
    shown = replies_at_a_terminal(hub, warm_home, [b'"""\r', b"hello\r", b"world\r", b'"""\r'])
    assert b"... " in shown  # the block's own prompt
    assert shown.count(b"puck puck") == 1


def test_at_a_terminal_a_pasted_block_is_one_message(hub, warm_home, model_file):
    # Terminals wrap a paste in ESC[200~ ... ESC[201~; readline then takes its line breaks as text.
    shown = replies_at_a_terminal(hub, warm_home, [b"\x1b[200~hello\rworld\rsay something\x1b[201~", b"\r"])
    assert shown.count(b"puck puck") == 1
    # All three lines went in, as llama.cpp would feed them
    pasted = [("user", "hello\nworld\nsay something")]
    assert int(re.search(rb"(\d+) prompt tokens evaluated", shown).group(1)) == len(
        llama_cpp_tokens(model_file("puck-goal.gguf"), pasted))


def test_a_full_context_keeps_the_exchange_that_carries_the_system_prompt(hub, warm_home, tmp_path):
    messages = [f"hello world number {i}" for i in range(30)]
    typed = "".join(line + "\n" for line in [*messages, f"/save {tmp_path / 't.json'}"])
    result = console(*crafted(prompt=None, sample_len=8, system="say puck"), "--chat", "--ctx", "128", hub=hub,
                     home=warm_home, stdin=typed.encode())
    assert result.returncode == 0, result.stderr
    assert "forgot the oldest" in result.stderr
    record = json.loads((tmp_path / "t.json").read_text())
    first = console(*crafted(prompt=None, sample_len=8, system="say puck"), "--chat", hub=hub, home=warm_home,
                    stdin=f"{messages[0]}\n/save {tmp_path / 'first.json'}\n".encode())
    assert first.returncode == 0, first.stderr
    kept = json.loads((tmp_path / "first.json").read_text())["context"]["tokens"]
    assert record["context"]["tokens"][: len(kept)] == kept  # the system prompt's exchange is still first
    assert len(record["context"]["tokens"]) <= 128


@pytest.mark.parametrize("part", ["missing", "not JSON", "exchanges out of order", "a setting out of range",
                                  "a schema llguidance cannot enforce"])
def test_load_at_start_refuses_a_bad_file_before_the_model_is_downloaded_or_loaded(hub, warm_home, tmp_path, part):
    path = tmp_path / "talk.json"
    if part == "not JSON":
        path.write_text("{ not json")
    elif part != "missing":
        saved_conversation(hub, warm_home, path)
        record = json.loads(path.read_text())
        damage(record, part)
        path.write_text(json.dumps(record))
    home = tmp_path / "empty"  # nothing cached and no hub: the run can only get as far as the settings
    line = the_error(console("--load", str(path), hub=None, home=home), code=2)
    assert line.startswith(f"error: --load: cannot load {path}")
    if part == "a schema llguidance cannot enforce":
        assert "its settings: the JSON schema cannot be used: oneOf" in line
    assert not (home / "hub").exists()


def test_a_failed_save_leaves_the_earlier_save_whole_and_loadable(hub, warm_home, tmp_path):
    path, state = tmp_path / "talk.json", tmp_path / "talk.json.state"
    saved_conversation(hub, warm_home, path)
    before = path.read_bytes(), state.read_bytes()
    # Files may grow to twice the first state, not to the state of a conversation ten times longer: a full disk.
    long = " ".join(["hello world"] * 300)
    failed = console(*crafted(prompt=None, sample_len=3), "--chat", hub=hub, home=warm_home,
                     stdin=f"/load {path}\n{long}\n/save {path}\n".encode(), max_file_size=2 * len(before[1]))
    assert failed.returncode == 0, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"could not save to {path}" in errors[0] and "nothing was changed" in errors[0]
    assert (path.read_bytes(), state.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["talk.json", "talk.json.state"]
    loaded = chat(hub, warm_home, [f"/load {path}", "hello", "/stats"])
    assert "not using" not in loaded.stderr and evaluated(stats(loaded)[0]) < 20  # restored, not evaluated again
