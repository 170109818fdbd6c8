"""DDP training of the tiny GPT-2 with a capture, every scenario of `SCENARIOS` in one process group:
`python -m torch.distributed.run --nproc-per-node 2 -m tests.train.ddp_training MODEL CORPUS OUT` (gloo on CPU)
writes OUT/<scenario>; `train(..., world=1)` makes the same run of one scenario in one process.

Two epochs, the second shifted by one document, so that each document is trained on by both ranks; each step
trains on a global batch of 4 documents, and rank r takes every RANKS-th of them (one process takes them all).

- `per_step`, `summed`: one micro-batch per rank and step. The loss is the model's own (num_items_in_batch = the
  global batch's counted tokens) times the world size, as the HF Trainer makes it, so that DDP's averaged
  gradients equal the one process's and both runs pass through the same weights.
- `accumulation`: gradient accumulation as a plain loop does it: each rank's 2 documents in 2 micro-batches of
  one, the model's mean loss divided by the accumulation steps, DDP's all-reduce skipped (`no_sync`) on the first.
  One process runs every rank's micro-batches and divides by the ranks as well (DDP's average), so the capture
  reads a factor c from the gradient reaching the loss that differs between the two runs.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import sys
from pathlib import Path

import torch

from attribindex.model import load_model
from attribindex.train import capture_training
from tests.conftest import exact_config

GLOBAL_BATCH = 4
RANKS = 2  # the DDP run's world size, which the one-process run stands in for
SCENARIOS = {"per_step": ("per_step", 1), "summed": ("summed", 1), "accumulation": ("per_step", 2)}  # rows, micro


def train(model_path: str, corpus: Path, out: Path, scenario: str, rank: int = 0, world: int = 1) -> list[dict]:
    """One scenario's run; returns the state dict each optimizer step trained at (the same on every rank)."""
    rows, accumulation = SCENARIOS[scenario]
    model, tokenizer = load_model(model_path, dtype="float64", device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.train().requires_grad_(True)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    records = records + records[1:] + records[:1]
    weights = []

    def forward_backward(part: list[dict], last: bool, **loss) -> None:
        inputs = tokenizer([r["text"] for r in part], padding=True, truncation=True, max_length=32, return_tensors="pt")
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        skip_all_reduce = trained.no_sync() if world > 1 and not last else contextlib.nullcontext()
        with skip_all_reduce, capture.batch([r["id"] for r in part], texts=[r["text"] for r in part]):
            output = trained(**inputs, labels=labels, num_items_in_batch=loss.get("num_items_in_batch"))
            (output.loss * loss["factor"]).backward()

    with capture_training(trained, tokenizer, out, exact_config("dot"), optimizer=optimizer, rows=rows) as capture:
        for start in range(0, len(records), GLOBAL_BATCH):
            weights.append(copy.deepcopy(model.state_dict()))
            batch = records[start : start + GLOBAL_BATCH]
            if accumulation == 1:
                counted = sum(len(tokenizer(r["text"], truncation=True, max_length=32)["input_ids"]) - 1 for r in batch)
                forward_backward(batch[rank::world], True, num_items_in_batch=counted, factor=world)
            else:
                parts = [[r] for shard in range(rank, RANKS, world) for r in batch[shard::RANKS]]  # this process's
                for number, part in enumerate(parts):
                    forward_backward(part, number == len(parts) - 1, factor=1 / (accumulation * RANKS / world))
            optimizer.step()
            optimizer.zero_grad()
    return weights


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        for name in SCENARIOS:
            train(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) / name, name, rank, world)
            # Both ranks leave a scenario together, its DDP wrapper collected: a rank that ran ahead into the next
            # scenario (or out of the group) while the other still used the last one aborted gloo now and then.
            gc.collect()
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
