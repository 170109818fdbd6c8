"""Scale-out builds, measured side by side in one run on this machine.

1. Throughput: the same corpus built by one process (all cores), by one process as 2 shards + merge
   (the cost of sharding itself), by one process with one thread, and by `torchrun` with 2 processes ×
   1 thread building 2 shards merged at the end; examples/s for each, and the merge's share of the
   extraction time (target: < 10 %).
2. Streaming merge: shards whose rows total more than the memory the merge is given (RLIMIT_DATA,
   which caps heap and anonymous mappings), merged in a subprocess; prints its peak RSS.

    python tools/bench_shards.py                       # 10k documents; merges of ~0.12 and ~1.2 GB of shards
    python tools/bench_shards.py --documents 2000 --merge-rows 8000   # a quick run
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from attribindex.config import BuildConfig, ExtractConfig, IndexConfig, ProjectionConfig, StoreConfig, config_to_dict
from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl


def run(command: list[str], env: dict | None = None, data_limit: int | None = None) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MiB of the largest process) of a fresh subprocess."""

    def limit_memory():
        if data_limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=out, stderr=err, env=os.environ | (env or {}), preexec_fn=limit_memory
        )
        # wait4, not Popen.wait: its rusage holds the peak RSS of the child or its largest reaped descendant
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        sys.exit(f"command failed: {' '.join(command)}\n{stderr[-3000:]}")
    return stdout, seconds, usage.ru_maxrss / 1024


def seconds_of(label: str, output: str) -> float:
    return float(re.search(rf"^{label}\s+([\d.]+) s", output, re.MULTILINE).group(1))


def write_config(path: Path, rank: int, batch_size: int, max_length: int, chunk_rows: int) -> Path:
    config = BuildConfig(
        projection=ProjectionConfig(rank_in=rank, rank_out=rank),
        extract=ExtractConfig(batch_size=batch_size, max_length=max_length, device="cpu"),
        store=StoreConfig(dtype="float16", chunk_rows=chunk_rows),
        index=IndexConfig(mode="cosine", device="cpu"),
    )
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def throughput(root: Path, model: Path, documents: int) -> None:
    data = write_jsonl(root / "corpus.jsonl", tiny_corpus(documents, seed=3, min_words=20, max_words=60))
    config = write_config(root / "throughput.yaml", rank=8, batch_size=32, max_length=96, chunk_rows=4096)
    build = [sys.executable, "-m", "attribindex", "build", "--config", str(config), "--model", str(model)]
    build += ["--data", str(data)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    torchrun += ["-m", "attribindex", "build", "--config", str(config), "--model", str(model), "--data", str(data)]
    runs = {
        "1 process × 2 threads": (build + ["--out", str(root / "single")], {}),
        "1 process, 2 shards+merge": (build + ["--num-shards", "2", "--out", str(root / "sharded")], {}),
        "1 process × 1 thread": (build + ["--out", str(root / "single-1t")], {"OMP_NUM_THREADS": "1"}),
        "2 processes × 1 thread": (torchrun + ["--num-shards", "2", "--out", str(root / "torchrun")], {}),
    }
    print(f"\n== build throughput: {documents:,} documents (20–60 words), Llama hidden 256 × 4 layers, rank 8×8 ==")
    print(
        f"{'run':<26}{'wall s':>8}{'extract s':>11}{'examples/s':>12}{'merge s':>9}{'merge/extract':>15}{'peak RSS':>10}"
    )
    for name, (command, env) in runs.items():
        output, wall, rss = run(command, env)
        extract = seconds_of("extract", output)
        merge = seconds_of("merge", output) if "merged" in output else float("nan")
        share = f"{merge / extract:.1%}" if merge == merge else "-"
        print(
            f"{name:<27}{wall:>8.1f}{extract:>11.1f}{documents / extract:>12.1f}{merge:>9.2f}{share:>15}{rss:>8.0f} MiB"
        )
    print("(extract s of a sharded build = wall time of the shard phase on rank 0, model loading included)")


def streaming_merge(root: Path, model: Path, rows: int, memory_mib: int) -> None:
    data = write_jsonl(root / f"merge-corpus-{rows}.jsonl", tiny_corpus(rows, seed=4, min_words=4, max_words=8))
    config = write_config(root / "merge.yaml", rank=24, batch_size=64, max_length=16, chunk_rows=2048)
    shards = [root / f"shard{i}-of-{rows}" for i in range(4)]
    for i, shard in enumerate(shards):
        run(
            [sys.executable, "-m", "attribindex", "build", "--config", str(config), "--model", str(model)]
            + ["--data", str(data), "--num-shards", "4", "--shard-index", str(i), "--out", str(shard)]
        )
    stored = sum(p.stat().st_size for s in shards for p in (s / "rows").glob("*.grads.npy"))
    output, wall, rss = run(
        [sys.executable, "-m", "attribindex", "merge", *map(str, shards), "--out", str(root / f"merged-{rows}")],
        data_limit=memory_mib * 2**20,
    )
    index_bytes = (root / f"merged-{rows}" / "index" / "flat.faiss").stat().st_size
    print(f"\n== streaming merge: 4 shards, {rows:,} rows, Llama hidden 256 × 4 layers at rank 24×24 ==")
    print(
        f"stored gradients   {stored / 2**20:,.0f} MiB (float16) → FAISS index {index_bytes / 2**20:,.0f} MiB (float32)"
    )
    print(f"memory given       RLIMIT_DATA = {memory_mib} MiB")
    print(
        f"merge              {wall:.1f} s wall ({seconds_of('merge', output):.1f} s in merge), peak RSS {rss:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--merge-rows", type=int, default=40_000)
    parser.add_argument("--merge-memory-mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        root = Path(tmp)
        texts = [d["text"] for d in tiny_corpus(400)]
        model = make_tiny_model(root / "llama", arch="llama", texts=texts, hidden=256, layers=4, vocab_size=512)
        throughput(root, model, args.documents)
        for rows in (args.merge_rows // 10, args.merge_rows):  # peak RSS must not grow with the rows
            streaming_merge(root, model, rows, args.merge_memory_mib)


if __name__ == "__main__":
    main()
