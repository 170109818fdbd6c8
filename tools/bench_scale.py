"""A million rows on one machine: build throughput and memory as N grows, and the storage diet at full size.

Workload (offline; every artefact goes under --out and a rerun reuses what is finished):
  1. corpus: tools/make_corpus.py writes --docs + --queries distinct real documents of at most 64 bytes (so at most
     64 tokens of any byte-level BPE); the file is in content-hash order, so its first --docs are the training
     corpus and the last --queries, held out, are the queries;
  2. model: a byte-level BPE (vocab 4,096) trained on 100,000 of the training texts, and a 2-layer GPT-NeoX (hidden
     128, 4 heads, MLP 4×) trained one epoch on 50,000 of them;
  3. build: `attribindex build` in its own process — rank 32 per side on the 8 linear layers of the blocks (8,192
     dims), projected empirical Fisher, dot mode, the exact index over the fp16 row store — sampled every second:
     rows written (chunk files), the process's RSS and its peak (VmHWM). The table gives, at 100k, 300k and 1M
     rows, rows/s over the 40,960 rows before the mark and since the previous mark, and the peak RSS so far.
     Rerunning resumes an interrupted build (its table then starts where it resumed);
  4. diet: one pass over the store whitens every row once and fills every candidate index at the same time
     (IVF-SQ8, IVF-PQ with 64-, 128-, 224- and 256-byte codes, each trained on its own seeded sample; HNSW over the first
     --hnsw-rows, as a float32 graph at 8,192 dims needs 32 KB per row); the same pass scores every row against
     the queries from an int8 copy of the raw row (one scale per row and module) to compare with the fp16 store.
     Then per kind and operating point (16, 64 or all 256 IVF cells probed; the top-100 or top-400 re-scored from
     the store with `AttributionIndex.rescore`): bytes per row on disk and in RAM, build seconds (its own training
     and adding; the shared whitening pass is reported once), latency p50/p95 of --queries single queries in this
     warm process (the query gradient, the same for every kind, is not included), and recall@10 against the exact
     flat top-10. The exact flat scan of the store is timed warm (page cache) and, when this process may drop the
     page cache (root), cold;
  5. exact re-rank (tools/bench_scale_exact.py): `--exact C` against the exact answer over all N rows, at each N of
     --exact-rows.

    python tools/bench_scale.py [--docs 1000000] [--queries 16] [--out bench-scale] [--phase all|build|diet|exact]

Prints the tables and writes --out/scale.json. The numbers in docs/scale.md come from the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MARKS = (100_000, 300_000, 1_000_000)
CHUNK_ROWS = 4096
WINDOW = 10 * CHUNK_ROWS  # rows over which a mark's rate is measured


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # make_corpus's forked workers find `work` through it
    spec.loader.exec_module(module)
    return module


def prepare_corpus(out: Path, args) -> tuple[Path, list[str]]:
    """(the training jsonl, the held-out query texts)."""
    from attribindex.testing import make_tokenizer

    train, queries = out / "train.jsonl", out / "queries.json"
    if train.is_file() and queries.is_file():
        return train, json.loads(queries.read_text())
    byte_tokenizer = out / "byte-tokenizer"  # one token per byte: no merges in a 257-entry vocabulary
    make_tokenizer(["a"], vocab_size=257).save_pretrained(byte_tokenizer)
    everything = out / "corpus.jsonl"
    if not everything.is_file():
        count = str(args.docs + args.queries)
        load_tool("make_corpus").main(["--count", count, "--tokenizer", str(byte_tokenizer), "--out", str(everything)])
    lines = everything.read_text(encoding="utf-8").splitlines(keepends=True)
    partial = train.with_suffix(".partial")
    partial.write_text("".join(lines[: args.docs]), encoding="utf-8")
    partial.rename(train)
    queries.write_text(json.dumps([json.loads(line)["text"] for line in lines[args.docs :]]))
    return train, json.loads(queries.read_text())


def trained_model(out: Path, train: Path) -> Path:
    """The GPT-NeoX the index explains, trained on a sample of the training texts."""
    from bench_fidelity import two_layer_neox

    from attribindex.data import Document
    from attribindex.eval import TrainingRecipe, train_causal_lm
    from attribindex.testing import make_tokenizer

    folder = out / "model"
    if (folder / "config.json").is_file():
        return folder
    texts = []
    with train.open(encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if len(texts) == 100_000:
                break
    tokenizer = make_tokenizer(texts, vocab_size=4096)
    model = two_layer_neox(tokenizer, hidden=128, max_length=64)
    documents = [Document(f"t{i}", t, "train") for i, t in enumerate(texts[:50_000])]
    started = time.perf_counter()
    train_causal_lm(model, tokenizer, documents, TrainingRecipe(epochs=1, batch_size=32, learning_rate=3e-3), seed=0)
    print(f"model: GPT-NeoX 2 × 128 trained on {len(documents):,} documents in {time.perf_counter() - started:.0f} s")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CONFIG = f"""\
projection: {{modules: ["gpt_neox.layers.*"], rank_in: 32, rank_out: 32, seed: 0}}
hessian: {{kind: raw, damping: 0.1}}
extract: {{batch_size: 64, max_length: 64, dtype: float32, device: cpu}}
store: {{dtype: float16, chunk_rows: {CHUNK_ROWS}}}
index: {{mode: dot, kind: flat, device: cpu}}
"""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def build(out: Path, model: Path, train: Path, docs: int) -> dict:
    """Run the build in its own process, sampling rows and memory every second; the per-mark table."""
    record = out / "build.json"
    index = out / "index"
    if record.is_file() and (index / "manifest.json").is_file():
        return json.loads(record.read_text())
    config = out / "scale.yaml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "attribindex", "build", "--config", str(config), "--model", str(model)]
    command += ["--data", str(train), "--id-field", "id", "--out", str(index)]
    log = (out / "build.log").open("a")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=log)
    samples, marks = [], [m for m in MARKS if m <= docs] + ([docs] if docs not in MARKS else [])
    try:
        while process.poll() is None:
            time.sleep(1.0)
            try:
                status = proc_status(process.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            if len(status) < 2:  # exiting: the memory fields are gone
                break
            chunks = len(list((index / "rows").glob("*.ids.npy"))) if (index / "rows").is_dir() else 0
            samples.append({"s": time.perf_counter() - started, "rows": chunks * CHUNK_ROWS} | status)
    finally:
        if process.poll() is None:
            process.terminate()
    if process.wait() != 0:
        raise SystemExit(f"the build failed (exit {process.returncode}); see {out / 'build.log'}")
    total_s = time.perf_counter() - started
    result = {"total_s": total_s, "marks": marks, "samples": samples}
    record.write_text(json.dumps(result))
    return result


def mark_rows(samples: list[dict], marks: list[int]) -> list[dict]:
    """Per mark: when it was reached, rows/s over the WINDOW rows before it and since the previous mark, and the
    peak RSS so far. The windowed rate is the flatness test: it does not average in earlier, slower stretches."""
    out, previous = [], {"s": 0.0, "rows": samples[0]["rows"]}
    for mark in marks:
        reached = next((s for s in samples if s["rows"] >= mark), None)
        if reached is None:  # the last chunk is partial: the mark is reached when the extraction ends
            reached = max(samples, key=lambda s: s["rows"])
        window = next(s for s in samples if s["rows"] >= reached["rows"] - WINDOW)

        def rate(since: dict, reached: dict = reached) -> float:
            return (reached["rows"] - since["rows"]) / max(1e-9, reached["s"] - since["s"])

        out.append(
            {
                "rows": mark,
                "s": reached["s"],
                "rows_per_s_window": rate(window),
                "rows_per_s_since_last": rate(previous),
                "peak_rss": max(s["VmHWM"] for s in samples if s["s"] <= reached["s"]),
                "rss": reached["VmRSS"],
            }
        )
        previous = reached
    return out


def build_table(result: dict) -> str:
    lines = [
        f"| rows | elapsed | rows/s, last {WINDOW:,} rows | rows/s since the last mark | peak RSS so far | RSS now |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in mark_rows(result["samples"], result["marks"]):
        lines.append(
            f"| {m['rows']:,} | {m['s']:.0f} s | {m['rows_per_s_window']:.0f} | {m['rows_per_s_since_last']:.0f} "
            f"| {m['peak_rss'] / 2**20:.0f} MiB | {m['rss'] / 2**20:.0f} MiB |"
        )
    lines.append(f"\nwhole build (extraction, Hessian, norms, manifest): {result['total_s']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--hnsw-rows", type=int, default=50_000, help="rows of the HNSW graph (32 KB each)")
    parser.add_argument("--exact-rows", default="4096,102400", help="index sizes of the exact re-rank study")
    parser.add_argument("--phase", choices=("all", "build", "diet", "exact"), default="all")
    parser.add_argument("--out", type=Path, default=Path("bench-scale"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    train, queries = prepare_corpus(out, args)
    model = trained_model(out, train)
    saved = out / "scale.json"
    report = json.loads(saved.read_text()) if saved.is_file() else {}
    if args.phase in ("all", "build", "diet"):
        built = build(out, model, train, args.docs)
        report["build"] = {"total_s": built["total_s"], "marks": mark_rows(built["samples"], built["marks"])}
        print(build_table(built), flush=True)
    if args.phase in ("all", "diet"):
        from bench_scale_diet import diet, diet_table  # noqa: PLC0415 (the diet pass needs the index built first)

        report["diet"] = diet(out, queries, args)
        print(diet_table(report["diet"]), flush=True)
    if args.phase in ("all", "exact"):
        from bench_scale_exact import exact_at_scale, exact_table  # noqa: PLC0415

        sizes = [int(n) for n in args.exact_rows.split(",")]
        report["exact_rerank"] = exact_at_scale(out, model, train, queries, sizes)
        print(exact_table(report["exact_rerank"]), flush=True)
    saved.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
