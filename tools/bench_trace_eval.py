"""Time per sample of `attribindex trace-eval` on a real lm-eval run, with and without the exact re-rank.

Workload: tools/bench_fidelity.py's (4,096 stdlib docstrings, a 2-layer GPT-NeoX at hidden 128 trained on them,
rank 32 per side, EK-FAC, the `exact` section), whose cached corpus, model and index it reuses from --out (run
tools/bench_factor_sample.py or tools/bench_fidelity.py there first). The task: the 16 held-out docstrings and 48
training ones, each cut in half: lm-eval (`lm_eval` itself, a process of its own) generates up to 32 tokens after
the first half, scored by exact_match against the second; `trace-eval` then traces every sample (the prompt + the
response, and the prompt + the target) with -k 10, then again into another folder with --exact 200. Each command
is its own process; its wall time includes loading the index and the model.

    python tools/bench_trace_eval.py [--out bench-factor-sample] [--index r32-s0-factors-sample-1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} … failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-factor-sample"))
    parser.add_argument("--index", default="r32-s0-factors-sample-1024", help="an index under OUT/indexes")
    parser.add_argument("--exact", type=int, default=200)
    args = parser.parse_args()
    out, index, model = args.out, args.out / "indexes" / args.index, args.out / "model"
    if not (index / "manifest.json").is_file() or not (model / "config.json").is_file():
        raise SystemExit(f"{index} or {model} is missing: run tools/bench_factor_sample.py --out {out} first.")
    corpus = json.loads((out / "corpus.json").read_text())
    texts = corpus["queries"] + [r["text"] for r in corpus["train"][:48]]
    work = out / "trace-eval"
    work.mkdir(exist_ok=True)
    rows = []
    for text in texts:
        words = text.split()
        half = max(1, len(words) // 2)
        rows.append({"prompt": " ".join(words[:half]), "target": " " + " ".join(words[half:])})
    (work / "docstrings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": "docstring_halves",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(work / "docstrings.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 32, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (work / "task.yaml").write_text(yaml.safe_dump(task))
    env = os.environ | OFFLINE
    bin_dir = Path(sys.executable).parent
    evaluated = work / "lm-out"
    lm_eval_s = run(
        [str(bin_dir / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32"]
        + ["--tasks", "docstring_halves", "--include_path", str(work), "--device", "cpu", "--batch_size", "16"]
        + ["--log_samples", "--output_path", str(evaluated)],
        env,
    )
    print(f"lm_eval: {len(rows)} samples generated and scored in {lm_eval_s:.1f} s")
    trace = [str(bin_dir / "attribindex"), "trace-eval", str(index), str(evaluated), "-k", "10", "--overwrite"]
    for label, extra in (("index alone", []), (f"exact re-rank C={args.exact}", ["--exact", str(args.exact)])):
        folder = work / ("traces-exact" if extra else "traces")
        seconds = run([*trace, "--out", str(folder), *extra], env)
        traces = [json.loads(line) for line in (folder / "traces.jsonl").read_text().splitlines()]
        texts_traced = sum(len(t["queries"]) for t in traces)
        print(
            f"trace-eval, {label}: {len(traces)} samples ({texts_traced} texts) in {seconds:.1f} s = "
            f"{1000 * seconds / len(traces):.0f} ms per sample, the process's start and loads included"
        )


if __name__ == "__main__":
    main()
