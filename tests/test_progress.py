"""Every long wait moves a bar at a terminal, like the download's; nothing of it reaches a pipe or stdout."""
from __future__ import annotations

import fcntl
import itertools
import os
import pty
import re
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import LONG_PROMPT, PATIENCE, PYTHON, SCRIPT, as_a_user, environment_for

BAR = re.compile(rb"prompt:\s+(\d+)%\|[^|]*\|\s+(\d+)/(\d+)")  # tqdm's "prompt:  42%|####  | 640/1503 [...]"


def run_long_prompt(hub, home, model_flags, *extra: str, stderr_at_a_terminal: bool,
                    prompt: str = LONG_PROMPT) -> tuple:
    """Run a prompt of seconds with stdout a pipe and stderr a terminal (80 columns) or a pipe.

    Returns the exit code, stdout, stderr, when stdout's first byte came, and each piece of stderr with when it came.
    """
    args = [PYTHON, str(SCRIPT), *model_flags, "--prompt", prompt, "--sample-len", "3",
            "--prompt-cache-gb", "0", *extra]  # no saved prompt: every run evaluates it
    if stderr_at_a_terminal:
        reader, writer = pty.openpty()
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        modes = termios.tcgetattr(writer)
        modes[1] &= ~termios.ONLCR  # read exactly the bytes the script wrote: no "\r" added before each "\n"
        termios.tcsetattr(writer, termios.TCSANOW, modes)
    else:
        reader, writer = os.pipe()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=writer,
                               env=environment_for(hub, home), preexec_fn=as_a_user)
    os.close(writer)
    first_stdout: list[float] = []
    stdout = bytearray()

    def read_stdout() -> None:
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            first_stdout.append(time.monotonic())
            stdout.extend(chunk)

    thread = threading.Thread(target=read_stdout, daemon=True)
    thread.start()
    pieces: list[tuple[float, bytes]] = []
    while True:
        try:
            chunk = os.read(reader, 4096)
        except OSError:  # the terminal's other end closed
            chunk = b""
        if not chunk:
            break
        pieces.append((time.monotonic(), chunk))
    os.close(reader)
    process.wait(timeout=PATIENCE)
    thread.join(timeout=10)
    stderr = b"".join(chunk for _, chunk in pieces)
    return process.returncode, bytes(stdout), stderr, (first_stdout or [float("inf")])[0], pieces


@pytest.mark.parametrize("words", [750, 250])  # about 1,500 tokens in three batches; about 500 tokens in one
def test_at_a_terminal_a_long_prompt_shows_a_moving_bar_that_is_gone_before_the_reply(hub, slow_model, slow_home,
                                                                                      startup, words):
    code, stdout, stderr, reply_began, pieces = run_long_prompt(hub, slow_home, slow_model, stderr_at_a_terminal=True,
                                                                prompt=" ".join(["hello world"] * words))
    assert code == 0, stderr
    drawn = [(at, match) for at, chunk in pieces for match in BAR.finditer(chunk)]
    assert len(drawn) >= 5, stderr  # the batch takes about 2 s here, and the bar shows after 1 s
    total = int(drawn[0][1].group(3))
    assert total > 2 * words  # the whole prompt, counted in tokens
    counts = [int(match.group(2)) for _, match in drawn]
    assert counts == sorted(counts)  # it only moves forward
    assert any(0 < n < min(total, 512) for n in counts)  # it moves within the first batch, long before it ends
    assert any(0 < n < total and n % 512 for n in counts)  # and within a batch, not only between them
    times = [at for at, _ in drawn]
    # It moves every few tenths of a second: far more often than a batch of seconds, on this machine or a slower one
    assert max(b - a for a, b in itertools.pairwise(times)) < 2 * startup
    assert times[-1] < reply_began  # drawn while the prompt was evaluated, before the reply
    assert stderr.rsplit(b"\r", 1)[-1].startswith(b"loaded in")  # erased: the report starts on a clean line
    assert b"\r" not in stdout and not BAR.search(stdout)  # the reply alone on stdout
    assert stdout.endswith(b"\n") and len(stdout) > 1


@pytest.mark.parametrize("where", ["stderr a pipe", "--quiet at a terminal"])
def test_in_a_pipe_or_with_quiet_no_bar_is_drawn(hub, slow_model, slow_home, where):
    at_a_terminal = where != "stderr a pipe"
    extra = ("--quiet",) if at_a_terminal else ()
    code, stdout, stderr, _, _ = run_long_prompt(hub, slow_home, slow_model, *extra, stderr_at_a_terminal=at_a_terminal)
    assert code == 0, stderr
    assert b"\r" not in stderr and not BAR.search(stderr)
    assert b"\r" not in stdout and not BAR.search(stdout)
    assert stdout.endswith(b"\n") and len(stdout) > 1
