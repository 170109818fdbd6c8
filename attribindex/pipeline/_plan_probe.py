"""Measuring what a build will meet: the corpus tokenised as the build tokenises it (every document, or a sample of
a streamed one), and a timing probe of a few real batches through the real `GradientExtractor`, with the curvature
sums and the store's encoding of the config."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass

import torch

from attribindex._progress import progress as progress_bar
from attribindex.config import BuildConfig
from attribindex.data import Corpus, TokenizedExample, batched
from attribindex.errors import AttribIndexError
from attribindex.hessian import FACTOR_KINDS, CurvatureSums
from attribindex.logra import GradientExtractor
from attribindex.pipeline._exact import ExactFactors
from attribindex.pipeline._plan_report import CorpusPlan
from attribindex.store import encode

PROBE_BATCHES = 3  # timed batches of the probe, after a warm-up batch (kernels, allocator, caches)
PROBE_MIN_SECONDS = 0.5  # below this, more batches are timed (up to PROBE_MAX_BATCHES): tiny models time noisily
PROBE_MAX_BATCHES = 16


@dataclass
class TokenStats:
    documents: int = 0
    tokens: int = 0
    truncated: int = 0
    empty: int = 0
    text_bytes: int = 0
    seconds: float = 0.0


def tokenize_corpus(
    corpus: Corpus, extractor: GradientExtractor, sample: int | None, keep: int, progress: bool
) -> tuple[TokenStats, list[TokenizedExample]]:
    """Tokenise the corpus (its first `sample` documents when given) as the build does, and keep the first `keep`
    examples for the probe."""
    stats, kept = TokenStats(), []
    started = time.perf_counter()
    total = corpus.known_length() if sample is None else min(sample, corpus.limit or sample)
    with progress_bar(total=total, desc="tokenise", unit="doc", enabled=progress) as bar:
        for _, doc in corpus.numbered(corpus.start):
            if sample is not None and stats.documents >= sample:
                break
            stats.documents += 1
            # the docs.jsonl line the chunk writer writes for this document
            line = json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n"
            stats.text_bytes += len(line.encode("utf-8"))
            bar.update(1)
            try:
                (example,) = extractor.tokenize([doc.text], [doc.id])
            except AttribIndexError:
                stats.empty += 1
                continue
            stats.tokens += len(example.input_ids)
            stats.truncated += int(example.truncated)
            if len(kept) < keep:
                kept.append(example)
    stats.seconds = time.perf_counter() - started
    return stats, kept


# Bytes of a docs.jsonl line per token when no corpus is read: ~4 characters of English text per token (OpenAI's
# rule of thumb for its BPE tokenizers, "one token generally corresponds to ~4 characters"), ~1 byte each in UTF-8.
TEXT_BYTES_PER_TOKEN = 4.0


def given_corpus(documents: int, text_field: str, id_field: str | None, sampled: Corpus | None) -> Corpus:
    """A corpus of `documents` documents known by their number alone (`--documents`): it has a length, windows
    and a description, and yields nothing. `sampled`: the corpus its documents are estimated from, if any."""
    described = f"{documents:,} documents (--documents" + (f", sampled from {sampled.description})" if sampled else ")")
    return Corpus(described, lambda: iter(()), text_field, id_field, limit=documents, available=documents)


def plan_given_corpus(corpus: Corpus, tokens_per_document: float) -> CorpusPlan:
    """The documents of a `given_corpus` at `tokens_per_document` each, their text estimated at
    TEXT_BYTES_PER_TOKEN bytes a token; nothing is tokenised."""
    documents = len(corpus)
    return CorpusPlan(
        description=corpus.description,
        documents=documents,
        counted=False,
        sample=0,
        tokens=round(documents * tokens_per_document),
        truncated=0,
        empty=0,
        text_bytes=round(documents * tokens_per_document * TEXT_BYTES_PER_TOKEN),
        tokenize_seconds=0.0,
    )


def plan_corpus(corpus: Corpus, stats: TokenStats, counted: bool, skip_empty: bool) -> CorpusPlan:
    documents = corpus.known_length() or corpus.limit or stats.documents  # a streamed corpus: at most `limit`
    scale = documents / max(stats.documents, 1)  # 1 when counted
    empty = round(stats.empty * scale)
    rows = documents - empty if skip_empty else documents  # without skip_empty an empty document stops the build
    kept = max(stats.documents - stats.empty, 1)
    return CorpusPlan(
        description=corpus.description,
        documents=rows,
        counted=counted,
        sample=stats.documents,
        tokens=round(stats.tokens / kept * rows),
        truncated=round(stats.truncated / kept * rows),
        empty=empty,
        text_bytes=round(stats.text_bytes / max(stats.documents, 1) * rows),
        tokenize_seconds=stats.seconds,
    )


@dataclass
class Timing:
    batches: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0


def probe(
    config: BuildConfig,
    extractor: GradientExtractor,
    examples: list[TokenizedExample],
    exact: ExactFactors | None,
    batches: int,
) -> tuple[Timing, int]:
    """Time `batches` real batches as the extraction runs them — longest first, forward + backward with the hooks,
    the curvature sums of the Hessian kind (and the exact section's factors), the store's encoding — after one
    warm-up batch; more while they took under PROBE_MIN_SECONDS. Returns the timing and the activation memory
    measured."""
    if not examples:
        raise AttribIndexError("no document of the corpus carries loss; nothing to plan for.")
    names = [m.name for m in extractor.projections.modules]
    dims, shapes = extractor.projections.block_dims, extractor.projections.block_shapes
    kind = config.hessian.kind
    sums = CurvatureSums.for_kind(kind, names, shapes, exact.empty_shapes() if exact else None)
    factors = kind in FACTOR_KINDS
    cuda = extractor.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(extractor.device)
        torch.cuda.reset_peak_memory_stats(extractor.device)
        baseline = torch.cuda.memory_allocated(extractor.device)
    else:
        _reset_peak_rss()
        baseline = _peak_rss()
    timing = Timing()
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))  # as `_window_rows` orders a window
    groups = list(batched(ordered, config.extract.batch_size))
    # Timed batches are taken across the sorted window (a golden-ratio sequence), not from its long end only, so
    # that a probe stopped early has seen short and long documents alike.
    spread = sorted(range(1, len(groups)), key=lambda i: (i * 0.6180339887) % 1)
    for number, batch in enumerate(groups[i] for i in [0, *spread]):
        if timing.batches >= batches and timing.seconds >= PROBE_MIN_SECONDS:
            break
        started = time.perf_counter()
        if exact is not None:  # the sample's share of the batch, as the build picks it by position
            exact.select(list(range(number * len(batch), (number + 1) * len(batch))))
        extracted = extractor.extract(batch, factors=factors, listeners=exact.same_pass if exact else ())
        rows = extracted.concatenated(names)  # (B, D)
        factor_rows = None
        if factors:
            factor_rows = {n: extracted.factors[n] for n in names}
        sums.update(dict(zip(names, rows.cpu().split(dims, dim=1))), factor_rows, exact.take(batch) if exact else None)
        encode(rows, dims, config.store.dtype)
        if cuda:
            torch.cuda.synchronize(extractor.device)
        if number > 0 or len(ordered) <= config.extract.batch_size:  # a one-batch corpus: its only batch counts
            timing.batches += 1
            timing.examples += len(batch)
            timing.tokens += sum(len(e.input_ids) for e in batch)
            timing.seconds += time.perf_counter() - started
    if cuda:
        activations = torch.cuda.max_memory_allocated(extractor.device) - baseline
    else:
        activations = max(0, _peak_rss() - baseline)
    return timing, activations


def _reset_peak_rss() -> None:
    """Start this process's peak resident set afresh (Linux: writing 5 to clear_refs resets VmHWM), so that the
    probe's growth is measured even where the process peaked higher before (a notebook, a long pipeline)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # not Linux, or not allowed: the lifetime peak (ru_maxrss) is what there is
        pass


def _peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM (resettable, this process's own), else ru_maxrss (which
    holds the lifetime peak, and a child's starts at its parent's)."""
    try:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmHWM:")[1].split()[0]) * 1024  # kB
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
