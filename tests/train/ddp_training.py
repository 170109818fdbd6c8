"""DDP training of the tiny GPT-2 with a capture: `python -m torch.distributed.run --nproc-per-node 2 -m
tests.train.ddp_training MODEL CORPUS OUT ROWS` (gloo on CPU), or `train(..., world=1)` for the same run in one process.

Two epochs, the second shifted by one document, so that each document is trained on by both ranks; each step
trains on a global batch of 4 documents, and rank r takes every world-th of them. The loss is the model's own
(num_items_in_batch = the global batch's counted tokens) times the world size, as the HF Trainer makes it, so that
DDP's averaged gradients equal the one process's and both runs pass through the same weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from attribindex.model import load_model
from attribindex.train import capture_training
from tests.conftest import exact_config

GLOBAL_BATCH = 4


def train(model_path: str, corpus: Path, out: Path, rows: str, rank: int = 0, world: int = 1) -> None:
    model, tokenizer = load_model(model_path, dtype="float64", device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.train().requires_grad_(True)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    records = records + records[1:] + records[:1]
    with capture_training(trained, tokenizer, out, exact_config("dot"), optimizer=optimizer, rows=rows) as capture:
        for start in range(0, len(records), GLOBAL_BATCH):
            batch = records[start : start + GLOBAL_BATCH]
            counted = sum(len(tokenizer(r["text"], truncation=True, max_length=32)["input_ids"]) - 1 for r in batch)
            mine = batch[rank::world]
            inputs = tokenizer(
                [r["text"] for r in mine], padding=True, truncation=True, max_length=32, return_tensors="pt"
            )
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            with capture.batch([r["id"] for r in mine], texts=[r["text"] for r in mine]):
                (trained(**inputs, labels=labels, num_items_in_batch=counted).loss * world).backward()
            optimizer.step()
            optimizer.zero_grad()


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        train(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], rank, world)
    finally:
        torch.distributed.destroy_process_group()
