"""Several `attribindex` command lines in one `torchrun` launch, one after another, each run as `python -m
attribindex` runs it (the same `main`, its errors printed and turned into an exit status), so that a test pays for
one launch per scenario, not per parameter. Each rank prints `=== command <i> exit <status>` on stdout and stderr
after command i.

The first command runs as under `torchrun -m attribindex`: attribindex starts the process group and ends it. A
group cannot be started twice in one process on torchrun's own store, so the later commands join a group this
script starts on a file store (STORE_FILE), as in a user's own script that builds under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/pipeline/torchrun_commands.py \
        STORE_FILE '[["build", ...], ...]'
"""

import json
import os
import sys

import torch.distributed as dist

from attribindex.cli import main

store_file, commands = sys.argv[1], json.loads(sys.argv[2])
for number, arguments in enumerate(commands):
    if number == 1:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    try:
        main(arguments, prog_name="attribindex")
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
    for stream in (sys.stdout, sys.stderr):
        print(f"=== command {number} exit {status}", file=stream, flush=True)
if dist.is_initialized():
    dist.destroy_process_group()
