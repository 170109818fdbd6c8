"""The cost of capturing an index while training: the same AdamW training loop with and without `capture_training`.

Both loops train a fresh copy of the same model on the same batches; runs alternate (plain, captured, plain, …)
so that drift in the machine's speed hits both. The ratio is captured step time ÷ plain step time (target ≤ 1.20
for hidden size ≥ 512). The captured time includes everything the capture does during training (hooks,
projections, curvature sums, writing rows); the index's final fit, after training, is printed apart.

    python tools/bench_train_capture.py                     # Llama, hidden 512, 4 layers, batches of 8 × 128 tokens
    python tools/bench_train_capture.py --hidden 1024 --rank 16
    python tools/bench_train_capture.py --fold               # AdamW's second moments refolded at every step
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attribindex.config import BuildConfig, ExtractConfig, HessianConfig, ProjectionConfig, StoreConfig
from attribindex.model import load_model
from attribindex.testing import make_tiny_model, tiny_corpus
from attribindex.train import capture_training


def batches(tokenizer, count: int, size: int, length: int, seed: int):
    texts = [d["text"] for d in tiny_corpus(count * size, seed=seed)]
    for start in range(0, len(texts), size):
        part = texts[start : start + size]
        inputs = tokenizer(part, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        yield [f"doc-{start + i}" for i in range(len(part))], dict(inputs)


def run(model, tokenizer, data, out: Path | None, config: BuildConfig, fold: bool = False) -> tuple[float, float]:
    """(seconds per training step, seconds to write the index after training) for one pass over `data`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(inputs, capture=None, ids=None):
        if capture is None:
            model(**inputs).loss.backward()
        else:
            with capture.batch(ids):
                model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(data[0][1])  # warm-up, untimed (allocations, kernel choice)
    if out is None:
        started = time.perf_counter()
        for _, inputs in data[1:]:
            step(inputs)
        return (time.perf_counter() - started) / (len(data) - 1), 0.0
    context = capture_training(
        model, tokenizer, out, config, optimizer=optimizer, overwrite=True, fold_second_moments=fold
    )
    capture = context.__enter__()
    started = time.perf_counter()
    for ids, inputs in data[1:]:
        step(inputs, capture, ids)  # the optimizer's step ends the capture's step
    per_step = (time.perf_counter() - started) / (len(data) - 1)
    closed = time.perf_counter()
    context.__exit__(None, None, None)
    return per_step, time.perf_counter() - closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating")
    parser.add_argument("--rank", type=int, default=16, help="projection rank per side")
    parser.add_argument("--fold", action="store_true", help="fold AdamW's current second moments in at every step")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BuildConfig(
        projection=ProjectionConfig(modules=("*",), rank_in=args.rank, rank_out=args.rank),
        hessian=HessianConfig(kind="raw", damping=0.1),
        extract=ExtractConfig(batch_size=args.batch_size, max_length=args.length, device="cpu"),
        store=StoreConfig(dtype="float16", chunk_rows=4096),
    )
    with tempfile.TemporaryDirectory() as tmp:
        texts = [d["text"] for d in tiny_corpus(400)]
        path = make_tiny_model(Path(tmp) / "model", arch="llama", texts=texts, hidden=args.hidden, layers=args.layers)
        base, tokenizer = load_model(str(path), dtype="float32", device="cpu")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        data = list(batches(tokenizer, args.steps + 1, args.batch_size, args.length, seed=1))
        plain, captured, finals = [], [], []
        for repeat in range(args.repeats):
            plain.append(run(copy.deepcopy(base).train().requires_grad_(True), tokenizer, data, None, config)[0])
            model = copy.deepcopy(base).train().requires_grad_(True)
            per_step, final = run(model, tokenizer, data, Path(tmp) / "index", config, args.fold)
            captured.append(per_step)
            finals.append(final)
            print(f"run {repeat}: plain {plain[-1] * 1000:.0f} ms/step, captured {captured[-1] * 1000:.0f} ms/step")
    parameters = sum(p.numel() for p in base.parameters())
    median_plain, median_captured = statistics.median(plain), statistics.median(captured)
    print(
        f"Llama hidden {args.hidden} × {args.layers} layers ({parameters / 1e6:.1f} M parameters), AdamW, "
        f"batches of {args.batch_size} × {args.length} tokens, rank {args.rank} per side on every linear layer, "
        f"{torch.get_num_threads()} threads" + (", second moments refolded at every step" if args.fold else "")
    )
    print(f"training step: plain {median_plain * 1000:.0f} ms, with capture {median_captured * 1000:.0f} ms")
    print(f"capture overhead: {median_captured / median_plain:.3f}× (median of {args.repeats} alternating runs)")
    print(f"writing the index after training ({args.steps * args.batch_size} rows): {statistics.median(finals):.2f} s")


if __name__ == "__main__":
    main()
