"""Real child processes without the import bill: one server process imports attribindex, torch, transformers and
faiss once, then forks a child per request that runs a script exactly as `python -c SCRIPT ARGS` would.

A child is a real process (its own pid, exit status, stdout and stderr files, SIGKILL kills it); what the fork saves
is the ~2.5-4.5 s of imports each `python -c` would pay. The server only imports, so no thread pool has started
when it forks (torch starts its pools lazily, in the child). `tests/test_bad_inputs.py` checks once that a forked
command prints what `python -m attribindex` prints.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_SERVER = r"""
import json, os, sys, traceback
# what the scripts import first; importing them here is the whole point (nothing runs before the fork)
import faiss, peft, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM
import attribindex, attribindex.cli, attribindex.pipeline, attribindex.query, attribindex.serve

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.stdout.reconfigure(write_through=True)  # as `python -u`: what ran before a SIGKILL is not lost
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["-c", *request["args"]]
        try:
            exec(compile(request["script"], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as exit:  # as the interpreter ends on one
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if not isinstance(exit.code, (int, type(None))):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class ForkServer:
    """`run(script, *args)` -> CompletedProcess of `python -c script *args`, in a child forked from a process that
    has imported the heavy modules. One request at a time (a lock); a child past `timeout` is killed and reported
    as subprocess.TimeoutExpired, as `subprocess.run` does."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._logs = Path(tempfile.mkdtemp(prefix="attribindex-fork-"))

    def _server(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        return self._process

    def _answer(self, server: subprocess.Popen, timeout: float) -> dict | None:
        if not select.select([server.stdout], [], [], timeout)[0]:
            return None
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died (see its stderr above)")
        return json.loads(line)

    def run(
        self, script: str, *args: str, timeout: float = 300, cwd: str | Path | None = None, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        with self._lock:
            server = self._server()
            out, err = self._logs / "stdout", self._logs / "stderr"
            request = {
                "script": script,
                "args": [str(a) for a in args],
                "stdout": str(out),
                "stderr": str(err),
                "cwd": str(cwd or os.getcwd()),
                "env": dict(os.environ if env is None else env),
            }
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            pid = self._answer(server, 60)["pid"]
            answer = self._answer(server, timeout)
            if answer is None:
                os.kill(pid, signal.SIGKILL)
                self._answer(server, 60)
                raise subprocess.TimeoutExpired(["python", "-c", "..."], timeout, out.read_text(), err.read_text())
            command = ["python", "-c", script, *request["args"]]
            return subprocess.CompletedProcess(command, answer["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=60)


_shared: ForkServer | None = None


def forked(script: str, *args: str, **options) -> subprocess.CompletedProcess:
    """`subprocess.run([python, "-c", script, *args], capture_output=True, text=True)`, forked (see ForkServer).

    Example:
        >>> forked("import sys; print(sys.argv[1:])", "a", "b").stdout
        "['a', 'b']\\n"
    """
    global _shared
    if _shared is None:
        _shared = ForkServer()
        atexit.register(_shared.close)
    return _shared.run(script, *args, **options)
