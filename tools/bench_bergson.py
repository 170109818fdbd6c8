"""Side by side: attribindex against bergson 2.5.1 (EleutherAI's gradient store + FAISS), on one CPU workload.

    python tools/bench_bergson.py [--out bench-bergson] [--repeats 1] [--skip-install]

bergson is not a dependency of this project: the script makes a virtual environment of its own for it,
OUT/bergson-venv, unless one is there (a rerun reuses it), with `pip install --no-deps bergson==2.5.1` and then
bergson's runtime requirements (read from its metadata) with torch pinned to the machine's CPU build,
torch==2.13.0, and faiss-cpu for its FAISS search. torchvision and torchaudio, which bergson declares but never
imports, are left out: PyPI's torchvision is a CUDA build whose extension needs libtorch_cuda.so, and once
installed it breaks `transformers` (which imports it when present: "operator torchvision::nms does not exist");
PyPI has no torchaudio for torch 2.13. No nvidia-* / triton wheel is installed (the script checks).

Workload (tools/bench_fidelity.py's, cached under --out): 4,096 docstrings of the installed standard library of
at most 128 tokens, 16 held-out docstrings as queries, a 2-layer GPT-NeoX (hidden 128) trained on them. Both
tools attribute over the 8 linear layers of the 2 blocks with a Kronecker projection of rank 32 per side (1,024
dims per module, 8,192 in all), float32 on the CPU, max length 128, and return the top 10 of each query. Every
phase runs as its own process, timed by wall clock, with that process's peak resident memory (os.wait4's
ru_maxrss, which covers the child and its reaped descendants):

  attribindex build   attribindex build --config OUT/attribindex.yaml --model MODEL --data train.jsonl
                      --id-field id --out OUT/attribindex-index --overwrite, with projection
                      {modules: [gpt_neox.layers.*], rank_in: 32, rank_out: 32}, hessian {kind: ekfac},
                      extract {batch_size: 32, max_length: 128, dtype: float32, device: cpu},
                      store {dtype: float32}, index {mode: dot, kind: flat, device: cpu}
  attribindex query   attribindex query OUT/attribindex-index --text Q1 … --text Q16 -k 10 --json --device cpu
  bergson gradients   bergson build OUT/bergson-index --model MODEL --dataset train.jsonl --truncation
                      --projection_dim 32 --include_bias --token_batch_size 128 --precision fp32 --overwrite
  bergson Hessian     bergson hessian OUT/bergson-hessian --method autocorrelation (the same model, data and
                      projection options)
  bergson query       bergson query --index OUT/bergson-index --faiss --hessian_path OUT/bergson-hessian
                      --top_k 10 --record OUT/bergson-query.csv, the 16 queries on its standard input, one a line

How the two setups differ (each is what bergson 2.5.1 allows or does; see its source):
  * Hessian. attribindex: EK-FAC in the projected space (32 × 32 Kronecker factors per module gathered during
    extraction, eigenvalues corrected over the stored rows; no second model pass). bergson: the dense 1,024 ×
    1,024 autocorrelation (empirical Fisher) of each module's projected gradients, from a second forward and
    backward pass over the corpus: its EK-FAC (`hessian --method kfac --ev_correction`) refuses projected
    gradients (ValueError in approximate_hessians) and its query refuses factored Hessians with FAISS
    (NotImplementedError in Attributor), so this is the one preconditioner its FAISS query takes here. It is
    attribindex's `hessian.kind: raw`, not ekfac. Damping is the same: 0.1 × the mean eigenvalue per module.
  * Scores. attribindex `dot`: g_q · H⁻¹ · g_i. bergson: cosine of H^-1/2-whitened gradients (its default
    --unit_norm true). With --unit_norm false its FAISS path multiplies the index by H⁻¹ in create_index and the
    query by H⁻¹ again in search (H⁻² in all), so cosine is its one correctly preconditioned FAISS mode.
  * Search. attribindex `flat` (float32): an exact scan of its float32 store (no FAISS file). bergson: a
    FAISS `Flat` inner-product index, built from the store on the first query (whitening and normalising all
    4,096 rows), so its query phase includes that build.
  * Batches. bergson refuses a --token_batch_size above the model's context (128), so a batch holds at most 128
    tokens (1,440 batches of about 2.8 documents); attribindex runs 32 documents per batch (128 batches).
  * Queries. `bergson query` is an interactive prompt reading one query per line, so every query's newlines are
    replaced by spaces, for both tools (the same 16 texts). It also returns the bottom 10 of each query (a second
    forward + backward and a full sort per query). Its query gradient is the HF mean loss, attribindex's the
    summed one (a per-query scale: no effect on a ranking, and none at all under cosine).
  * Projections. Both project [x; 1] (bias as an extra input column, bergson's --include_bias) and δ to 32 per
    side, with different random matrices (bergson: Rademacher; attribindex: Gaussian, seed 0).
  * faiss-cpu. bergson 2.5.1's FAISS code tests `isinstance(index, faiss.GpuIndex)`, a class that faiss-cpu lacks
    (AttributeError in _is_gpu_resident); its faiss extra is faiss-gpu-cu12, which needs CUDA wheels. The query
    process therefore starts bergson's CLI with `faiss.GpuIndex` set to an empty class when faiss has none (so
    the test is False, as it is for every CPU index); nothing else is changed.
  * Imports. Each bergson command imports bitsandbytes (through peft), about 1 s of its ~6 s of imports.

Prints a markdown table (per tool and phase: wall seconds and peak RSS; medians over --repeats, which alternate
the order of the tools), the ratios attribindex ÷ bergson, and each tool's top 3 for the first query; writes
the same to OUT/bergson.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_fidelity import (  # noqa: E402 (a sibling script, found on the path set above)
    CAPTURED,
    check_settings,
    prepare_corpus,
    trained_model,
)

from attribindex.config import (  # noqa: E402
    BuildConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
    config_to_dict,
)

BERGSON = "bergson==2.5.1"
TORCH = "torch==2.13.0"  # the CPU build this machine's pip finds locally
LEFT_OUT = {"torchvision", "torchaudio"}  # declared by bergson, never imported by it (see the docstring)
EXTRA = ["faiss-cpu"]  # bergson's faiss extra is faiss-gpu-cu12
ATTRIBINDEX = Path(sys.executable).with_name("attribindex")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# bergson's CLI, with faiss.GpuIndex defined on faiss-cpu (bergson 2.5.1 tests isinstance against it)
BERGSON_CPU_FAISS = (
    "import sys, faiss\n"
    "faiss.GpuIndex = getattr(faiss, 'GpuIndex', type('GpuIndex', (), {}))\n"
    "from bergson.__main__ import main\n"
    "sys.argv[0] = 'bergson'\n"
    "main()\n"
)


def pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", *args]
    print("  $", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def venv_python(venv: Path, skip_install: bool) -> Path:
    """The Python of bergson's own environment, made (or completed) unless --skip-install."""
    python = venv / "bin" / "python"
    marker = venv / "bench-installed.json"
    wanted = {"bergson": BERGSON, "torch": TORCH, "left_out": sorted(LEFT_OUT), "extra": EXTRA}
    if skip_install or (marker.is_file() and json.loads(marker.read_text()) == wanted):
        if not python.is_file():
            raise SystemExit(f"no bergson environment at {venv}; run without --skip-install")
        print(f"bergson environment: reusing {venv}")
        return python
    print(f"bergson environment: {venv}")
    if not python.is_file():
        print(f"  $ {sys.executable} -m venv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(python, "install", "--no-deps", BERGSON)
    requires = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('bergson')))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    runtime = [r.strip() for r in requires if r.strip() and "extra ==" not in r]
    names = {r: re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in runtime}
    kept = [TORCH if names[r] == "torch" else r for r in runtime if names[r] not in LEFT_OUT]
    print(f"  bergson's runtime requirements, less {sorted(LEFT_OUT)}, torch pinned, plus {EXTRA}:")
    pip(python, "install", *kept, *EXTRA)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True)
    stray = [p["name"] for p in json.loads(listed.stdout) if p["name"].lower().startswith(("nvidia-", "triton"))]
    stray += [p["name"] for p in json.loads(listed.stdout) if p["name"].lower() in LEFT_OUT]
    if stray:
        pip(python, "uninstall", "-y", *stray)
    check = "import bergson.__main__, faiss, torch; print('bergson importable; torch', torch.__version__)"
    subprocess.run([str(python), "-c", check], check=True, env=os.environ | OFFLINE, stderr=subprocess.DEVNULL)
    marker.write_text(json.dumps(wanted))
    return python


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def run_phase(name: str, command: list[str], log: Path, stdout: Path | None = None, stdin: Path | None = None):
    """Run one phase as a child process: (wall seconds, peak RSS in MiB). Its output goes to `log` (its standard
    output to `stdout` when given); bergson's dataset cache goes beside the logs."""
    print(f"  {name} …", end=" ", flush=True)
    env = os.environ | OFFLINE | {"HF_DATASETS_CACHE": str(log.parent / "hf-datasets")}
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out, open(stdin or os.devnull) as inp:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdin=inp, stdout=out if stdout else err, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{name} failed (exit {child.returncode}); the end of {log}:\n{tail}")
    print(f"{seconds:.1f} s, {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    return seconds, usage.ru_maxrss / 1024


def run_attribindex(out: Path, config: Path, model: Path, corpus: Path, queries: list[str]):
    """Phases {name: (s, MiB)}, the build's own split (from its summary), and each query's top-10 ids."""
    index, logs = out / "attribindex-index", out / "logs"
    build = [str(ATTRIBINDEX), "build", "--config", str(config), "--model", str(model), "--data", str(corpus)]
    build += ["--id-field", "id", "--out", str(index), "--overwrite"]
    phases = {"build": run_phase("attribindex build", build, logs / "attribindex-build.log")}
    summary = (logs / "attribindex-build.log").read_text()
    split = {k: float(re.search(rf"^{k}\s+([\d.]+) s", summary, re.M).group(1)) for k in ("extract", "total")}
    query = [str(ATTRIBINDEX), "query", str(index), *[a for q in queries for a in ("--text", q)]]
    query += ["-k", "10", "--json", "--device", "cpu"]
    answer = logs / "attribindex-query.json"
    phases["query"] = run_phase("attribindex query", query, logs / "attribindex-query.log", stdout=answer)
    tops = [[hit["id"] for hit in result["top"]] for result in json.loads(answer.read_text())["results"]]
    return phases, split, tops


def run_bergson(out: Path, python: Path, model: Path, corpus: Path, queries: list[str], ids: list[str]):
    """Phases {name: (s, MiB)} and each query's top-10 ids (bergson reports dataset rows)."""
    index, hessian, logs = out / "bergson-index", out / "bergson-hessian", out / "logs"
    bergson = str(python.with_name("bergson"))
    common = ["--model", str(model), "--dataset", str(corpus), "--truncation", "--projection_dim", "32"]
    common += ["--include_bias", "--token_batch_size", "128", "--precision", "fp32", "--overwrite"]
    shutil.rmtree(logs / "hf-datasets", ignore_errors=True)  # each run parses the jsonl, as attribindex does
    phases = {
        "gradients": run_phase("bergson build", [bergson, "build", str(index), *common], logs / "bergson-build.log"),
        "hessian": run_phase(
            "bergson hessian",
            [bergson, "hessian", str(hessian), "--method", "autocorrelation", *common],
            logs / "bergson-hessian.log",
        ),
    }
    record, lines = out / "bergson-query.csv", out / "bergson-queries.txt"
    record.unlink(missing_ok=True)  # bergson appends to it
    lines.write_text("".join(q + "\n" for q in queries) + "exit\n")
    query = [str(python), "-c", BERGSON_CPU_FAISS, "query", "--index", str(index), "--faiss"]
    query += ["--hessian_path", str(hessian), "--top_k", "10", "--record", str(record)]
    phases["query"] = run_phase("bergson query", query, logs / "bergson-query.log", stdin=lines)
    rows = [r for r in csv.DictReader(record.open()) if r["direction"] == "Top"]
    tops = [[ids[int(r["result_index"])] for r in rows if r["query"] == q] for q in queries]
    return phases, tops


def fmt(seconds: float) -> str:
    return f"{seconds:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-bergson"))
    parser.add_argument("--repeats", type=int, default=1, help="runs of both tools; medians are reported")
    parser.add_argument("--skip-install", action="store_true", help="use OUT/bergson-venv as it is")
    # bench_fidelity's workload settings (its defaults; they key the cached corpus and model)
    settings = dict(docs=4096, queries=16, k=10, damping=0.1, sample=1024, hidden=128, vocab=2048, max_length=128)
    settings |= dict(epochs=3, batch_size=32)
    args = argparse.Namespace(**settings, **vars(parser.parse_args()))
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    python = venv_python(out / "bergson-venv", args.skip_install)
    check_settings(out, args)
    documents, queries, corpus = prepare_corpus(out, args)
    model = trained_model(out, documents, args)
    queries = [q.replace("\n", " ") for q in queries]  # bergson's prompt reads one query per line
    ids = [d.id for d in documents]
    config = BuildConfig(
        projection=ProjectionConfig(modules=CAPTURED, rank_in=32, rank_out=32),
        hessian=HessianConfig(kind="ekfac", damping=args.damping),
        extract=ExtractConfig(batch_size=args.batch_size, max_length=args.max_length, dtype="float32", device="cpu"),
        store=StoreConfig(dtype="float32"),
        index=IndexConfig(mode="dot", kind="flat", device="cpu"),
    )
    config_path = out / "attribindex.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    runs = []
    for repeat in range(args.repeats):
        order = ["attribindex", "bergson"] if repeat % 2 == 0 else ["bergson", "attribindex"]
        print(f"repetition {repeat + 1}/{args.repeats}: {' then '.join(order)}", flush=True)
        run = {}
        for tool in order:
            if tool == "attribindex":
                phases, split, a_tops = run_attribindex(out, config_path, model, corpus, queries)
                run["attribindex"] = phases | {"extract": (split["extract"], None), "total": (split["total"], None)}
            else:
                run["bergson"], b_tops = run_bergson(out, python, model, corpus, queries, ids)
        runs.append(run)

    def median(tool: str, phase: str, which: int) -> float | None:
        values = [r[tool][phase][which] for r in runs if r[tool][phase][which] is not None]
        return statistics.median(values) if values else None

    a = {p: (median("attribindex", p, 0), median("attribindex", p, 1)) for p in runs[0]["attribindex"]}
    b = {p: (median("bergson", p, 0), median("bergson", p, 1)) for p in runs[0]["bergson"]}
    a_build, b_build = a["build"][0], b["gradients"][0] + b["hessian"][0]
    a_total, b_total = a_build + a["query"][0], b_build + b["query"][0]
    a_peak, b_peak = max(a["build"][1], a["query"][1]), max(v[1] for v in b.values())
    rows = [
        ("attribindex", "build (one process)", a_build, a["build"][1]),
        ("", "↳ extract: gradients + Kronecker factors (its summary)", a["extract"][0], None),
        ("", "↳ EK-FAC correction, whitening, index (total − extract)", a["total"][0] - a["extract"][0], None),
        ("", "↳ start-up: imports, model, corpus (wall − total)", a_build - a["total"][0], None),
        ("", "query, 16 texts", a["query"][0], a["query"][1]),
        ("", "**build + query**", a_total, a_peak),
        ("bergson", "build: gradients (`bergson build`)", b["gradients"][0], b["gradients"][1]),
        ("", "build: Hessian pass (`bergson hessian`)", b["hessian"][0], b["hessian"][1]),
        ("", "build, both processes", b_build, max(b["gradients"][1], b["hessian"][1])),
        ("", "query, 16 texts (`bergson query --faiss`, builds the FAISS index)", b["query"][0], b["query"][1]),
        ("", "**build + query**", b_total, b_peak),
    ]
    heading = "median of " + str(args.repeats) + " runs" if args.repeats > 1 else "one run"
    print(f"\n## attribindex vs bergson 2.5.1 ({heading}; 2 CPU cores, 4,096 docs, 16 queries, top-10)\n")
    print("| tool | phase | wall s | peak RSS MiB |\n| --- | --- | --- | --- |")
    for tool, phase, seconds, mib in rows:
        print(f"| {tool} | {phase} | {fmt(seconds)} | {'—' if mib is None else f'{mib:,.0f}'} |")
    ratios = {"build_plus_query_time": a_total / b_total, "largest_peak_memory": a_peak / b_peak}
    print(f"\nattribindex ÷ bergson: build + query time {ratios['build_plus_query_time']:.2f} ×, ", end="")
    print(f"largest peak memory {ratios['largest_peak_memory']:.2f} ×")

    overlap = statistics.mean(len(set(x) & set(y)) / 10 for x, y in zip(a_tops, b_tops))
    print(f"\nsanity, first query: {queries[0][:80]!r}…")
    texts = {d.id: d.text for d in documents}
    for tool, tops in (("attribindex", a_tops), ("bergson", b_tops)):
        first = [texts[i][:60].replace("\n", " ") for i in tops[0][:3]]
        print(f"  {tool:11s} top 3: {tops[0][:3]}  {first}")
    print(f"  top-10 overlap of the two tools, mean over the 16 queries: {overlap:.2f}")

    report = {
        "settings": {"docs": args.docs, "queries": args.queries, "k": 10, "rank": 32, "max_length": 128},
        "repeats": args.repeats,
        "bergson_venv": {"path": str(out / "bergson-venv"), "mib": folder_mib(out / "bergson-venv")},
        "runs": runs,
        "table": [{"tool": t, "phase": p, "seconds": s, "peak_mib": m} for t, p, s, m in rows],
        "ratios_attribindex_over_bergson": ratios,
        "first_query_top3": {"attribindex": a_tops[0][:3], "bergson": b_tops[0][:3]},
        "top10_overlap": overlap,
        "top10": {"attribindex": a_tops, "bergson": b_tops},
    }
    (out / "bergson.json").write_text(json.dumps(report, indent=2))
    print(f"\nbergson environment: {report['bergson_venv']['mib']:,.0f} MiB; wrote {out / 'bergson.json'}")


if __name__ == "__main__":
    main()
