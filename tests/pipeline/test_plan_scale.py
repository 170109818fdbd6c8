"""`attribindex plan --documents`: a billion-row build of Llama-3-8B planned offline from its config alone (no weights,
no tokenizer, no corpus), each figure checked against its definition and its provenance label."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from attribindex.cli import main
from attribindex.pipeline._plan_scale import BERGSON_CHART

LLAMA = Path(__file__).resolve().parents[2] / "index_configs" / "models" / "llama3-8b"
BILLION = 1_000_000_000
ARGS = [
    "plan",
    "--documents",
    str(BILLION),
    "--config",
    "llama3-8b-paper",
    "--model",
    str(LLAMA),
    "--tokens-per-document",
    "512",
    "--gpus",
    "64",
]


def _plan(*extra: str) -> dict:
    result = CliRunner().invoke(main, [*ARGS, *extra, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def planned() -> dict:
    return _plan()


def test_the_folder_holds_a_config_and_nothing_else():
    assert [p.name for p in LLAMA.iterdir()] == ["config.json"]


def test_dims_come_from_the_config(planned):
    """224 modules (7 linear layers × 32 blocks) at rank 64 × 64: 917,504 dims, with Llama-3-8B's shapes."""
    assert len(planned["modules"]) == 224 and planned["dim"] == 224 * 64 * 64 == 917_504
    shapes = {(m["out_features"], m["in_features"]) for m in planned["modules"]}
    assert shapes == {(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)}
    assert planned["time"] is None  # no weights: no probe
    assert planned["memory"]["model"] - 2 * 8_030_261_248 in range(0, 4096)  # bf16 parameters + the rotary buffer
    assert planned["scale"]["parameters"] == 8_030_261_248


def test_gpu_hours_from_the_labelled_estimate(planned):
    scale = planned["scale"]
    rate = scale["tokens_per_second"]
    assert scale["throughput"] == "estimate"
    assert scale["throughput_source"].startswith("estimate, from bergson's chart (")
    (p0, t0), (p1, t1) = BERGSON_CHART
    assert t1 < rate < t0  # 8.03B parameters: between the chart's 1B and 12B points
    assert rate == pytest.approx(t0 * (8_030_261_248 / p0) ** (math.log(t1 / t0) / math.log(p1 / p0)))
    assert scale["tokens"] == BILLION * 512 and scale["tokens_per_document"] == 512
    assert scale["gpu_hours"] == pytest.approx(BILLION * 512 / rate / 3600)
    assert scale["wall_clock_hours"] == pytest.approx(scale["gpu_hours"] / 64)
    assert (scale["shards"], scale["rows_per_shard"], scale["shards_source"]) == (64, 15_625_000, "one per GPU")


def test_disk_is_rows_times_bytes_per_row(planned):
    """fp16 rows of 917,504 dims, a fp32 scale per module, an 8-byte id and an 8-byte text offset; the exact index
    adds 4 bytes of norm per row (index/norms.npy)."""
    scale = planned["scale"]
    per_row = 917_504 * 2 + 224 * 4 + 8 + 8
    assert scale["bytes_per_row"] == planned["disk"]["store_per_example"] == per_row
    assert scale["store_bytes"] == BILLION * per_row
    norms = next(s for s in scale["search"] if s["kind"] == "exact flat")
    assert scale["exact_index_bytes"] == scale["store_bytes"] + norms["ram_bytes"]
    assert norms["bytes_per_row"] == 4 and norms["ram_bytes"] == 4 * BILLION + norms["fixed_bytes"]


def test_search_ram_per_node_by_kind(planned):
    scale = planned["scale"]
    node = 512 * 2**30
    assert scale["node_ram_bytes"] == node
    rows = {s["kind"]: s for s in scale["search"]}
    assert list(rows) == ["exact flat", "IVF-SQ8", "IVF-PQ64", "IVF-PQ128", "IVF-PQ256", "HNSW32"]
    per_row = {"IVF-SQ8": 917_504 + 8, "IVF-PQ64": 64 + 8, "IVF-PQ128": 128 + 8, "IVF-PQ256": 256 + 8}
    per_row |= {"HNSW32": 4 * 917_504 + 2 * 32 * 4 + 4 + 12, "exact flat": 4}  # + a level and an offset per node
    for kind, row in rows.items():
        assert row["bytes_per_row"] == per_row[kind], kind
        assert row["ram_bytes"] == BILLION * per_row[kind] + row["fixed_bytes"], kind
        assert row["nodes"] == max(1, math.ceil(row["ram_bytes"] / node)), kind
    assert rows["IVF-PQ64"]["fixed_bytes"] >= 32_768 * 917_504 * 4  # the coarse centroids, √N of them
    assert rows["exact flat"]["nodes"] == 1 and rows["HNSW32"]["nodes"] > 6000
    assert _plan("--node-ram-gb", "1024")["scale"]["search"][1]["nodes"] == math.ceil(rows["IVF-SQ8"]["nodes"] / 2)


def test_a_given_throughput_replaces_the_estimate_and_its_label(planned):
    given = _plan("--tokens-per-second", "20000")["scale"]
    assert given["tokens_per_second"] == 20000 and given["throughput"] == "given"
    assert "--tokens-per-second" in given["throughput_source"] and "bergson" not in given["throughput_source"]
    assert given["gpu_hours"] == pytest.approx(BILLION * 512 / 20000 / 3600)
    assert given["gpu_hours"] != pytest.approx(planned["scale"]["gpu_hours"])


def test_text_output_labels_every_figure():
    result = CliRunner().invoke(main, ARGS)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "estimate, from bergson's chart" in out and "GPU-hours" in out and "on 64 GPUs" in out
    assert "given with --tokens-per-document" in out and "15,625,000 rows each" in out
    assert "IVF-PQ64" in out and "HNSW32" in out and "norms.npy" in out
    assert "no weights" in result.stderr and "no timing probe" in result.stderr


@pytest.mark.parametrize(
    "bad, cause",
    [
        (["--documents", "0"], "--documents must be >= 1, got 0"),
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--tokens-per-second", "-5"], "--tokens-per-second must be > 0"),
    ],
)
def test_bad_sizes_give_one_clear_line(bad, cause):
    option, value = bad
    args = list(ARGS)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += bad
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AttributeError | TypeError)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and cause in lines[-1], result.stderr
    assert sum(line.startswith("Error") for line in lines) == 1


def test_plan_without_data_or_documents_is_refused():
    args = [a for a in ARGS if a not in ("--documents", str(BILLION))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--data" in result.stderr and "--documents" in result.stderr
