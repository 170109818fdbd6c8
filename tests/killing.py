"""Kill a real subprocess with SIGKILL at a chosen point of a library call, to test crash safety."""

from __future__ import annotations

import json
import subprocess

from tests.forking import forked

# Patches `module.attr` so that its call number `nth` SIGKILLs the process just before it starts
# ("before") or just after it returns ("after"), then runs attribindex.<function>(*args, **kwargs), or with
# function "cli", the command line `attribindex *args`.
_DRIVER = """
import importlib, json, os, signal, sys
module_name, attr, nth, when, function, arguments = sys.argv[1:]
owner_name, _, name = attr.rpartition(".")
module = importlib.import_module(module_name)
owner = getattr(module, owner_name) if owner_name else module
original = getattr(owner, name)
calls = 0
def wrapper(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, wrapper)
import attribindex
arguments = json.loads(arguments)
if function == "cli":
    from attribindex.cli import main
    main(arguments["args"], prog_name="attribindex")
if "config" in arguments["kwargs"]:
    arguments["args"].insert(0, attribindex.load_config(arguments["kwargs"].pop("config")))
getattr(attribindex, function)(*arguments["args"], **arguments["kwargs"])
"""


def run_killed(kill_at: tuple[str, str, int, str], function: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """Run attribindex.`function` in a subprocess killed at `kill_at` = (module, attr, nth call, before|after).

    A `config=PATH` keyword is loaded with `load_config` and passed as the first argument.
    """
    module, attr, nth, when = kill_at
    arguments = json.dumps({"args": [str(a) for a in args], "kwargs": kwargs})
    # a real process, forked from one that has imported attribindex (its stdout is unbuffered, as with -u)
    return forked(_DRIVER, module, attr, str(nth), when, function, arguments)


def cli_killed(kill_at: tuple[str, str, int, str], *args: str) -> subprocess.CompletedProcess:
    """The command line `attribindex *args` in a subprocess killed at `kill_at` (as `run_killed`)."""
    return run_killed(kill_at, "cli", *args)


def build_killed(kill_at, model, corpus, out, config_file, **kwargs) -> subprocess.CompletedProcess:
    """`build_index(load_config(config_file), model, corpus, out, id_field="id")` in a subprocess killed at `kill_at`."""
    return run_killed(
        kill_at, "build_index", model, corpus, out, config=str(config_file), id_field="id", progress=False, **kwargs
    )
