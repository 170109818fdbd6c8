"""Several `attribindex` command lines in one `torchrun` launch, one after another, each run as `python -m
attribindex` runs it (the same `main`, its errors printed and turned into an exit status), so that a test pays for
one launch per scenario, not per parameter. Each rank writes command i's stdout, stderr and exit status to
`OUT_DIR/<i>.<rank>.{stdout,stderr,status}`: files of their own, because two ranks writing to one pipe interleave.

The first command runs as under `torchrun -m attribindex`: attribindex starts the process group and ends it. A
group cannot be started twice in one process on torchrun's own store, so the later commands join a group this
script starts on a file store (STORE_FILE), as in a user's own script that builds under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/pipeline/torchrun_commands.py \
        STORE_FILE OUT_DIR '[["build", ...], ...]'
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from attribindex.cli import main


def _run(arguments: list[str]) -> int:
    try:
        main(arguments, prog_name="attribindex")
        return 0
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1


store_file, out_dir, commands = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
saved = {fd: os.dup(fd) for fd in (1, 2)}
for number, arguments in enumerate(commands):
    if number == 1:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    stem = out_dir / f"{number}.{rank}"
    with open(f"{stem}.stdout", "w") as stdout, open(f"{stem}.stderr", "w") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        status = _run(arguments)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
    Path(f"{stem}.status").write_text(str(status))
if dist.is_initialized():
    dist.destroy_process_group()
