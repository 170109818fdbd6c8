"""Exact top-k on one GPU: faiss-gpu GpuIndexFlatIP vs attribindex's TorchFlatIndex (resident bf16/fp16/fp32,
streamed from host memory), timed per batch size, with recall@k against a float32 torch reference.

Data: N rows of dimension D drawn on the device in chunks (nothing is read from disk): a rank-64 Gaussian
part plus isotropic Gaussian noise, each row normalised then scaled by a lognormal(0, 0.5) norm, so norms
are heavy-tailed like gradient vectors and float16 scores stay far from overflow. Queries come from the
same generator. Times include uploading the float32 queries and downloading the answers.

    python tools/gpu_exact_search.py                    # N=1,000,000 x D=4096 on cuda (< 5 min on an H200)
    python tools/gpu_exact_search.py --quick            # N=100,000 on cuda
    python tools/gpu_exact_search.py --quick --device cpu   # smoke test: N=20,000 x D=256 on CPU

Writes the table as JSON to $OUT/gpu_exact_search.json when OUT is set. Exits 0 with a message when torch
or CUDA is missing.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEAK_HBM_BYTES_PER_S = 4.3e12  # the H200 HBM bandwidth this report compares against
LOW_RANK = 64


def load_blockwise():
    """attribindex.index._blockwise, even where the package's own dependencies (transformers, ...) are missing."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("attribindex.index._blockwise")
    except Exception as err:  # usually ImportError: transformers, fastapi, ... are not installed here
        print(f"importing attribindex failed ({err}); loading attribindex/index/_blockwise.py without its package")
    # bare packages whose __init__ does not run: only errors.py and _blockwise.py are executed
    for name, folder in (("attribindex", REPO / "attribindex"), ("attribindex.index", REPO / "attribindex" / "index")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    sys.modules.pop("attribindex.index._blockwise", None)
    return importlib.import_module("attribindex.index._blockwise")


def generate(torch, rows: int, dim: int, device: str, seed: int, chunk: int = 65536):
    """(rows, dim) float32 on `device`: low-rank + noise directions, lognormal norms (see the module docstring)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(LOW_RANK, dim, device=device, generator=generator) / LOW_RANK**0.5  # (r, D)
    out = torch.empty(rows, dim, device=device)  # (N, D)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        mixed = torch.randn(n, LOW_RANK, device=device, generator=generator) @ basis  # (n, D)
        mixed += 0.5 * torch.randn(n, dim, device=device, generator=generator)
        norms = torch.exp(0.5 * torch.randn(n, 1, device=device, generator=generator))  # (n, 1)
        out[start : start + n] = mixed * (norms / mixed.norm(dim=1, keepdim=True))
    return out


def agreement(scores, rows, ref_scores, ref_rows) -> dict:
    k = ref_rows.shape[1]
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows.tolist(), ref_rows.tolist())]))
    error = float(np.abs(scores.astype(np.float64) - ref_scores).max())  # position-wise, so ties cannot inflate it
    return {
        "recall": recall,
        "max_abs_score_error": error,
        "max_rel_score_error": error / float(np.abs(ref_scores).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="N=100,000 on cuda; N=20,000 x D=256 on cpu")
    parser.add_argument("--rows", type=int, help="N (default 1,000,000)")
    parser.add_argument("--dim", type=int, help="D (default 4096)")
    parser.add_argument("--stream-rows", type=int, help="N for the streamed paths (default: N)")
    parser.add_argument("--nq", default="1,32,256,2048", help="comma-separated batch sizes")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--runs", type=int, help="timed runs per (path, nq) after one warm-up (default 5, cpu 3)")
    parser.add_argument("--max-score-mib", type=int, default=256, help="TorchFlatIndex max_score_bytes in MiB")
    parser.add_argument("--budget-s", type=float, default=270, help="skip what is left once this many seconds passed")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("torch is not installed here: nothing to time. Install torch (a CUDA build) and rerun.")
        return 0
    on_cpu = args.device == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        print(
            f"torch {torch.__version__} sees no CUDA GPU: nothing to time. Rerun on a GPU machine or pass --device cpu."
        )
        return 0
    blockwise = load_blockwise()
    try:
        import faiss
    except ImportError:
        faiss = None
    faiss_gpu = faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0

    rows = args.rows or (20_000 if on_cpu and args.quick else 100_000 if args.quick else 1_000_000)
    dim = args.dim or (256 if on_cpu and args.quick else 4096)
    stream_rows = min(args.stream_rows or rows, rows)
    batches = [int(x) for x in args.nq.split(",")]
    runs = args.runs or (3 if on_cpu else 5)
    k, max_score_bytes = args.k, args.max_score_mib * 2**20
    device = "cpu" if on_cpu else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must really be float32
    gpu_name = "cpu" if on_cpu else torch.cuda.get_device_name(0)
    header = {
        "gpu": gpu_name,
        "torch": torch.__version__,
        "cuda": None if on_cpu else torch.version.cuda,
        "faiss": getattr(faiss, "__version__", None),
        "faiss_gpu": faiss_gpu,
        "python": platform.python_version(),
        "rows": rows,
        "dim": dim,
        "stream_rows": stream_rows,
        "k": k,
        "runs": runs,
        "max_score_bytes": max_score_bytes,
        "data": f"rank-{LOW_RANK} Gaussian + 0.5 isotropic noise, rows normalised, lognormal(0, 0.5) norms",
    }
    for key, value in header.items():
        print(f"{key:>16}: {value}")
    started = time.perf_counter()

    def sync():
        if not on_cpu:
            torch.cuda.synchronize()

    def free():
        gc.collect()
        if not on_cpu:
            torch.cuda.empty_cache()

    base = generate(torch, rows, dim, device, seed=0)  # (N, D) float32 on the device
    queries = generate(torch, max(batches), dim, device, seed=1).cpu().numpy()  # (Q, D) float32 on the host
    sync()
    print(f"generated {rows} x {dim} in {time.perf_counter() - started:.1f}s")

    reference_index = blockwise.TorchFlatIndex(
        base, device=device, dtype=torch.float32, max_score_bytes=max_score_bytes
    )
    ref_scores, ref_rows = reference_index.search(queries, k)  # (Q, k), the float32 truth for every path
    ref_scores = ref_scores.astype(np.float64)
    results: list[dict] = []
    target = Path(os.environ["OUT"]) / "gpu_exact_search.json" if os.environ.get("OUT") else None

    def save() -> None:
        """After every row, so a run cut short still leaves what it measured."""
        if target is not None:
            target.write_text(json.dumps({**header, "results": results}, indent=1))

    def time_path(name: str, search, stored_bytes: int, reference=(ref_scores, ref_rows), repeat=runs) -> None:
        """Warm-up, then the median of `repeat` timed batches for every nq; one failure skips the rest of the path."""
        for nq in batches:
            if time.perf_counter() - started > args.budget_s:
                print(f"{name} nq={nq}: skipped, the {args.budget_s:.0f}s budget is spent")
                results.append({"path": name, "nq": nq, "error": "skipped: time budget spent"})
                continue
            batch = queries[:nq]
            try:
                search(batch)  # warm-up: kernels, cuBLAS handles, allocator, pinned buffers
                sync()
                times = []
                for _ in range(repeat):
                    sync()
                    tick = time.perf_counter()
                    scores, found = search(batch)
                    sync()
                    times.append(time.perf_counter() - tick)
            except Exception as err:  # one broken path must not hide the others
                print(f"{name} nq={nq}: FAILED {type(err).__name__}: {err}")
                traceback.print_exc(limit=3)
                results.append({"path": name, "nq": nq, "error": f"{type(err).__name__}: {err}"})
                save()
                free()
                return
            seconds = statistics.median(times)
            row = {
                "path": name,
                "nq": nq,
                "ms": 1e3 * seconds,
                "queries_per_s": nq / seconds,
                "gb_per_s": stored_bytes / seconds / 1e9,
                "hbm_fraction": None if on_cpu else stored_bytes / seconds / PEAK_HBM_BYTES_PER_S,
                **agreement(scores, found, reference[0][:nq], reference[1][:nq]),
            }
            results.append(row)
            save()
            print(
                f"{name:<34} nq={nq:<5} {row['ms']:9.2f} ms {row['queries_per_s']:11.1f} q/s "
                f"{row['gb_per_s']:8.1f} GB/s recall@{k} {row['recall']:.4f} max|ds| {row['max_abs_score_error']:.2e}"
            )

    # (a) faiss: GpuIndexFlatIP fp32 and fp16 storage; on --device cpu, faiss-cpu IndexFlatIP for comparison
    if faiss is None:
        print("faiss not installed: skipped")
    elif on_cpu or faiss_gpu:
        variants = [("fp32", False), ("fp16", True)] if not on_cpu else [("fp32", False)]
        for label, float16 in variants:
            try:
                if on_cpu:
                    name, index = "faiss-cpu IndexFlatIP fp32", faiss.IndexFlatIP(dim)
                else:
                    name = f"faiss-gpu GpuIndexFlatIP {label}"
                    resources = faiss.StandardGpuResources()
                    config = faiss.GpuIndexFlatConfig()
                    config.device = 0
                    if float16 and not hasattr(config, "useFloat16"):
                        print("faiss GpuIndexFlatConfig has no useFloat16: fp16 storage skipped")
                        continue
                    config.useFloat16 = float16
                    index = faiss.GpuIndexFlatIP(resources, dim, config)
                    index.referenced_resources = resources
                for start in range(0, rows, 65536):  # through the host in chunks: no 16 GB numpy copy at once
                    index.add(np.ascontiguousarray(base[start : start + 65536].cpu().numpy()))
                time_path(name, lambda batch, index=index: index.search(batch, k), rows * dim * (2 if float16 else 4))
            except Exception as err:
                print(f"faiss {label}: FAILED {type(err).__name__}: {err}")
                results.append({"path": f"faiss {label}", "error": f"{type(err).__name__}: {err}"})
                save()
            index = None
            free()
    else:
        print("faiss-gpu not installed: skipped")

    # (b, c, f) TorchFlatIndex resident in bf16, fp16 and fp32 (fp32 is the reference index itself)
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        name = f"torch {'resident' if not on_cpu else 'cpu'} {label}" + (" (reference)" if label == "fp32" else "")
        try:
            index = (
                reference_index
                if dtype == torch.float32
                else blockwise.TorchFlatIndex(base, device=device, dtype=dtype, max_score_bytes=max_score_bytes)
            )
            element = torch.empty((), dtype=dtype).element_size()
            time_path(name, lambda batch, index=index: index.search(batch, k), rows * dim * element)
        except Exception as err:
            print(f"{name}: FAILED {type(err).__name__}: {err}")
            results.append({"path": name, "error": f"{type(err).__name__}: {err}"})
            save()
        index = None
        free()
    reference_index = None
    free()

    # (d) streamed from host memory each search: float32 numpy (converted into pinned bf16 staging), and a
    # pinned bf16 tensor copied as is
    if on_cpu:
        print("streamed paths need CUDA: skipped on --device cpu")
    else:
        stream_ref = (ref_scores, ref_rows)
        if stream_rows < rows:
            print(f"streamed paths use the first {stream_rows} rows; their reference is recomputed on those rows")
            truth = blockwise.TorchFlatIndex(base[:stream_rows], device=device, dtype=torch.float32)
            stream_scores, stream_found = truth.search(queries, k)
            stream_ref = (stream_scores.astype(np.float64), stream_found)
            truth = None
        tick = time.perf_counter()
        host = np.empty((stream_rows, dim), dtype=np.float32)
        for start in range(0, stream_rows, 65536):
            host[start : start + 65536] = base[start : min(start + 65536, stream_rows)].cpu().numpy()
        print(f"host copy of {stream_rows} x {dim} float32 in {time.perf_counter() - tick:.1f}s")
        base = None
        free()
        for name, source, element in (
            ("torch streamed bf16 (fp32 host)", "numpy", 4),
            ("torch streamed bf16 (pinned bf16)", "pinned", 2),
        ):
            try:
                if source == "numpy":
                    vectors = host
                else:
                    vectors = torch.empty((stream_rows, dim), dtype=torch.bfloat16, pin_memory=True)
                    for start in range(0, stream_rows, 65536):
                        vectors[start : start + 65536].copy_(torch.from_numpy(host[start : start + 65536]))
                index = blockwise.TorchFlatIndex(
                    vectors, device="cuda", dtype=torch.bfloat16, max_score_bytes=max_score_bytes, resident_bytes=0
                )
                assert index.streamed
                search = lambda batch, index=index: index.search(batch, k)  # noqa: E731
                time_path(name, search, stream_rows * dim * element, stream_ref, repeat=min(runs, 3))
            except Exception as err:
                print(f"{name}: FAILED {type(err).__name__}: {err}")
                results.append({"path": name, "error": f"{type(err).__name__}: {err}"})
                save()
            index = vectors = None
            free()

    print()
    print(
        f"exact top-{k}, N={rows}, D={dim} on {gpu_name} (median of {runs}; streamed paths N={stream_rows}, bytes = host)"
    )
    print(
        f"{'path':<34} {'nq':>5} {'ms/batch':>10} {'queries/s':>11} {'GB/s':>8} {'of 4.3TB/s':>10} {'recall':>7} {'max|ds|':>9} {'rel':>9}"
    )
    for row in results:
        if "error" in row:
            status = row["error"] if row["error"].startswith("skipped") else f"FAILED: {row['error']}"
            print(f"{row['path']:<34} {row.get('nq', ''):>5} {status}")
            continue
        fraction = "-" if row["hbm_fraction"] is None else f"{row['hbm_fraction']:.1%}"
        print(
            f"{row['path']:<34} {row['nq']:>5} {row['ms']:>10.2f} {row['queries_per_s']:>11.1f} {row['gb_per_s']:>8.1f} "
            f"{fraction:>10} {row['recall']:>7.4f} {row['max_abs_score_error']:>9.2e} {row['max_rel_score_error']:>9.2e}"
        )
    print(f"total {time.perf_counter() - started:.1f}s")
    if target is not None:
        save()
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
