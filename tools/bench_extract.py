"""LoGra extraction vs a plain training step (forward + backward computing every parameter gradient).

Both run on the same batches, interleaved, after a warm-up; the ratio is LoGra time ÷ plain time
(target ≤ 0.9 for hidden size ≥ 512: LoGra computes no weight gradients). Also prints examples/s,
the cost of the curvature update, and the peak RSS of the process.

    python tools/bench_extract.py                      # tiny GPT-2 (hidden 32) and a Llama with hidden 512
    python tools/bench_extract.py --model PATH         # any local causal LM folder
    python tools/bench_extract.py --smollm2            # the demo's SmolLM2-135M (hidden 576)
    python tools/bench_extract.py --llama-1b --device cuda --dtype bfloat16   # 1.24B parameters, random weights
    python tools/bench_extract.py --grid             # issue 27's regression guard (docs/speed.md keeps its table)

`--llama-1b` builds a model of Llama-3.2-1B's shape from its config here (hidden 2048, 16 layers, 32 heads, 8 KV
heads, MLP 8192, vocabulary 128,256, tied embeddings) with random weights, directly on `--device`: nothing is
downloaded, and random weights time like trained ones (dense kernels do not depend on the values).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attribindex.config import ExactConfig, ProjectionConfig
from attribindex.data import batched
from attribindex.hessian import CurvatureSums
from attribindex.logra import GradientExtractor, ProjectionSet, per_example_loss, select_modules
from attribindex.model import DTYPES, load_model
from attribindex.testing import make_tiny_model, make_tokenizer, tiny_corpus

EXACT_DOCUMENTS = 4096  # issue 27's workload: the build whose factor sample the exact section's rows are taken at
SCALE_DOCUMENTS = 100_000  # and a larger corpus, where the same factor sample is a smaller share of each batch

# Llama-3.2-1B's shape (its published config.json), for a throughput figure at the 1B scale without its weights
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)


def llama_1b(device: str, dtype: str):
    """(model, tokenizer): random weights in Llama-3.2-1B's shape, initialised on `device`, and a byte-level BPE
    tokenizer trained on the bench's own texts (its ids are a small part of the 128,256-row vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):  # initialised where it runs: 5 GB of float32 weights never pass through the host
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    tokenizer = make_tokenizer([d["text"] for d in tiny_corpus(300)])
    return model.to(DTYPES[dtype]).eval(), tokenizer


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step(model, batch) -> None:
    model.requires_grad_(True)
    device = next(model.parameters()).device
    input_ids, attention_mask, loss_mask = (
        t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.loss_mask)
    )
    loss = per_example_loss(model, input_ids, attention_mask, loss_mask).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def bench(
    name: str,
    path: str | None,
    batch_size: int,
    max_length: int,
    batches: int,
    rank: int,
    modules: tuple[str, ...],
    device: str = "cpu",
    dtype: str = "float32",
    loaded: tuple | None = None,
    exact: ExactConfig | None = None,
    documents: int = EXACT_DOCUMENTS,
    quiet: bool = False,
) -> dict:
    """Time LoGra extraction, the curvature update and a plain step on the model at `path` (or `loaded`); with
    `exact`, the extraction also sums that `exact` section's unprojected factors in the same pass, as a build of
    `documents` documents does (its factor sample: a share of each batch). Returns the medians (seconds per batch)
    and examples/s."""
    from attribindex.data import collate
    from attribindex.pipeline._exact import ExactFactors

    model, tokenizer = loaded or load_model(path, dtype=dtype, device=device)
    on = next(model.parameters()).device
    specs = select_modules(model, ProjectionConfig(modules=modules, rank_in=rank, rank_out=rank))
    projections = ProjectionSet.generate(specs, seed=0, rank_in=rank, rank_out=rank)
    extractor = GradientExtractor(model, tokenizer, projections, max_length=max_length, dtype=DTYPES[dtype])
    # Full-length documents so every batch has the same shape.
    texts = [" ".join(d["text"] for d in tiny_corpus(40, seed=i)) for i in range(batch_size * (batches + 2))]
    groups = [extractor.tokenize(g) for g in batched(texts, batch_size)]
    curvature = CurvatureSums(dict(zip([s.name for s in specs], projections.block_dims)))
    factors = ExactFactors(extractor, exact, documents) if exact else None

    logra, plain, curv = [], [], []
    for i, group in enumerate(groups):
        batch = collate(group, extractor.pad_token_id)
        synchronize(on)
        started = time.perf_counter()
        if factors:
            factors.select(list(range(i * batch_size, (i + 1) * batch_size)))
        extracted = extractor.extract(group, listeners=factors.same_pass if factors else ())
        if factors:
            factors.take(group)
        synchronize(on)
        t_logra = time.perf_counter() - started
        started = time.perf_counter()
        curvature.update(extracted.blocks)
        synchronize(on)
        t_curv = time.perf_counter() - started
        started = time.perf_counter()
        plain_step(model, batch)
        synchronize(on)
        t_plain = time.perf_counter() - started
        if i >= 2:  # warm-up
            logra.append(t_logra)
            plain.append(t_plain)
            curv.append(t_curv)
    ml, mp, mc = statistics.median(logra), statistics.median(plain), statistics.median(curv)
    measured = {"ratio": ml / mp, "plain_per_s": batch_size / mp, "extract_per_s": batch_size / ml}
    if quiet:
        return measured
    hidden = getattr(model.config, "hidden_size", getattr(model.config, "n_embd", "?"))
    parameters = sum(p.numel() for p in model.parameters())
    tokens = batch.attention_mask.shape[1]
    print(
        f"{name}: {parameters / 1e6:,.1f}M parameters, hidden {hidden}, {dtype} on {on}, {len(specs)} modules at rank "
        f"{rank}×{rank} (D={projections.dim:,}), batch {batch_size}×{tokens} tokens, {len(logra)} timed batches"
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
    if on.type == "cuda":
        print(f"  peak GPU memory so far:                     {torch.cuda.max_memory_allocated(on) / 2**20:8.0f} MiB")
    return measured


def grid(tmp: Path, batches: int) -> None:
    """Issue 27's regression guard: extraction ÷ a plain step on a 2-layer GPT-NeoX (batch 16 × 128 tokens, rank 32
    on its 8 linear layers), at hidden 128 and 512, float32 and float64, without and with the `exact` section (EK-FAC:
    factors over every example, and over the default factor sample in builds of 4,096 and 100,000 documents)."""
    texts = [d["text"] for d in tiny_corpus(300)]
    sample = ExactConfig().factor_sample
    sections = {  # label: (exact section, documents of the build)
        "no": (None, EXACT_DOCUMENTS),
        "every example": (ExactConfig(enabled=True, factor_sample=None), EXACT_DOCUMENTS),
        f"sample {sample:,} of {EXACT_DOCUMENTS:,}": (ExactConfig(enabled=True), EXACT_DOCUMENTS),
        f"sample {sample:,} of {SCALE_DOCUMENTS:,}": (ExactConfig(enabled=True), SCALE_DOCUMENTS),
    }
    print("exact section: EK-FAC; its factor sample is a share of each batch, set by the build's documents")
    print("| hidden | dtype | exact section | plain examples/s | extraction examples/s | extraction ÷ plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for hidden in (128, 512):
        model = make_tiny_model(tmp / f"neox-{hidden}", "gpt_neox", texts, hidden=hidden, layers=2)
        for dtype in ("float32", "float64"):
            for label, (exact, documents) in sections.items():
                run = dict(batch_size=16, max_length=128, batches=batches, rank=32, modules=("*",), dtype=dtype)
                m = bench(f"neox-{hidden}", str(model), **run, exact=exact, documents=documents, quiet=True)
                print(
                    f"| {hidden} | {dtype} | {label} | {m['plain_per_s']:.1f} "
                    f"| {m['extract_per_s']:.1f} | {m['ratio']:.2f} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder (default: generated models)")
    parser.add_argument("--smollm2", action="store_true", help="benchmark the demo model SmolLM2-135M")
    parser.add_argument(
        "--llama-1b", action="store_true", help="random weights in Llama-3.2-1B's shape (1.24B parameters), built here"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modules", default="*", help="comma-separated module patterns")
    parser.add_argument(
        "--grid", action="store_true", help="issue 27's table: hidden 128 / 512 × float32 / float64 × exact section"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    modules = tuple(args.modules.split(","))
    run = dict(
        batch_size=args.batch_size,
        max_length=args.max_length,
        batches=args.batches,
        rank=args.rank,
        modules=modules,
        device=args.device,
        dtype=args.dtype,
    )
    if args.grid:
        with tempfile.TemporaryDirectory() as tmp:
            grid(Path(tmp), args.batches)
        return
    if args.llama_1b:
        bench("Llama-3.2-1B shape (random weights)", None, **run, loaded=llama_1b(args.device, args.dtype))
        return
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
