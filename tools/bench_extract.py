"""LoGra extraction vs a plain training step (forward + backward computing every parameter gradient).

Both run on the same batches, interleaved, after a warm-up; the ratio is LoGra time ÷ plain time
(target ≤ 0.9 for hidden size ≥ 512: LoGra computes no weight gradients). Also prints examples/s,
the cost of the curvature update, and the peak RSS of the process.

    python tools/bench_extract.py                      # tiny GPT-2 (hidden 32) and a Llama with hidden 512
    python tools/bench_extract.py --model PATH         # any local causal LM folder
    python tools/bench_extract.py --smollm2            # the demo's SmolLM2-135M (hidden 576)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attribindex.config import ProjectionConfig
from attribindex.data import batched
from attribindex.hessian import CurvatureSums
from attribindex.logra import GradientExtractor, ProjectionSet, per_example_loss, select_modules
from attribindex.model import load_model
from attribindex.testing import make_tiny_model, tiny_corpus


def plain_step(model, batch) -> None:
    model.requires_grad_(True)
    loss = per_example_loss(model, batch.input_ids, batch.attention_mask, batch.loss_mask).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def bench(name: str, path: str, batch_size: int, max_length: int, batches: int, rank: int, modules: tuple[str, ...]):
    from attribindex.data import collate

    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    specs = select_modules(model, ProjectionConfig(modules=modules, rank_in=rank, rank_out=rank))
    projections = ProjectionSet.generate(specs, seed=0, rank_in=rank, rank_out=rank)
    extractor = GradientExtractor(model, tokenizer, projections, max_length=max_length)
    # Full-length documents so every batch has the same shape.
    texts = [" ".join(d["text"] for d in tiny_corpus(40, seed=i)) for i in range(batch_size * (batches + 2))]
    groups = [extractor.tokenize(g) for g in batched(texts, batch_size)]
    curvature = CurvatureSums(dict(zip([s.name for s in specs], projections.block_dims)))

    logra, plain, curv = [], [], []
    for i, group in enumerate(groups):
        batch = collate(group, extractor.pad_token_id)
        started = time.perf_counter()
        extracted = extractor.extract(group)
        t_logra = time.perf_counter() - started
        started = time.perf_counter()
        curvature.update(extracted.blocks)
        t_curv = time.perf_counter() - started
        started = time.perf_counter()
        plain_step(model, batch)
        t_plain = time.perf_counter() - started
        if i >= 2:  # warm-up
            logra.append(t_logra)
            plain.append(t_plain)
            curv.append(t_curv)
    ml, mp, mc = statistics.median(logra), statistics.median(plain), statistics.median(curv)
    hidden = getattr(model.config, "hidden_size", getattr(model.config, "n_embd", "?"))
    print(
        f"{name}: hidden {hidden}, {len(specs)} modules at rank {rank}×{rank} (D={projections.dim:,}), "
        f"batch {batch_size}×{max_length} tokens, {len(logra)} timed batches"
    )
    print(
        f"  plain forward+backward (all weight grads): {mp * 1000:8.1f} ms/batch  ({batch_size / mp:7.1f} examples/s)"
    )
    print(
        f"  LoGra extraction:                           {ml * 1000:8.1f} ms/batch  ({batch_size / ml:7.1f} examples/s)"
    )
    print(f"  + curvature update (fp64 sums):             {mc * 1000:8.1f} ms/batch")
    print(f"  ratio LoGra / plain:                        {ml / mp:8.2f}   (with curvature {(ml + mc) / mp:.2f})")
    print(
        f"  peak RSS so far:                            {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder (default: generated models)")
    parser.add_argument("--smollm2", action="store_true", help="benchmark the demo model SmolLM2-135M")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modules", default="*", help="comma-separated module patterns")
    args = parser.parse_args()
    torch.manual_seed(0)
    modules = tuple(args.modules.split(","))
    run = dict(
        batch_size=args.batch_size, max_length=args.max_length, batches=args.batches, rank=args.rank, modules=modules
    )
    if args.model:
        bench(args.model, args.model, **run)
        return
    if args.smollm2:
        from attribindex.demo import demo_model_dir

        bench("SmolLM2-135M", str(demo_model_dir()), **run)
        return
    with tempfile.TemporaryDirectory() as tmp:
        texts = [d["text"] for d in tiny_corpus(300)]
        tiny = make_tiny_model(Path(tmp) / "tiny", "gpt2", texts, hidden=32, layers=2)
        bench("tiny GPT-2", str(tiny), **run)
        medium = make_tiny_model(Path(tmp) / "medium", "llama", texts, hidden=512, layers=4)
        bench("Llama (random init)", str(medium), **run)


if __name__ == "__main__":
    main()
