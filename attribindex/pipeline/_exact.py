"""The build's exact section: memory check, the unprojected factors of each batch, and the exact preconditioner
(EK-FAC's correction pass over a seeded sample of the indexed rows is streamed and resumable)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from attribindex._progress import progress as progress_bar
from attribindex.config import ExactConfig
from attribindex.data import TokenizedExample, batched
from attribindex.errors import AttribIndexError
from attribindex.exact import (
    ExactPreconditioner,
    FactorBatch,
    FactorListener,
    LayerShape,
    RotatedGradients,
    factor_rate,
    factor_selection,
    fit_exact_preconditioner,
    kfac_bases,
    layer_shapes,
)
from attribindex.hessian import CurvatureSums
from attribindex.logra import GradientExtractor, LayerHooks, ModuleSpec, ProjectionSet
from attribindex.model import DTYPES, load_model, model_fingerprint
from attribindex.store import ExactRecord, ManifestHeader, RowStore, layout, save_safetensors

SUM_COPIES = 4  # factor sums held at once while building: committed, pending, and the window's slices (usually 2)
WINDOW_BATCHES = 16  # correction batches read at once and sorted by length (less padding)
CORRECTION_CHECKPOINTS = 8  # the correction pass saves its sums (a model's worth of fp64) this often per pass


def factor_bytes(shapes: dict[str, LayerShape]) -> int:
    """Σ (n_in'² + n_out²) × 8: the bytes of one copy of the unprojected factor sums (fp64)."""
    return sum(shape.factor_numbers for shape in shapes.values()) * 8


def check_exact_memory(config: ExactConfig, shapes: dict[str, LayerShape]) -> None:
    """Refuse, before any work, an exact section whose factor sums would not fit in `config.memory_gb`."""
    one = factor_bytes(shapes)
    limit = config.memory_gb * 2**30 if config.memory_gb is not None else _physical_memory() / 2
    if SUM_COPIES * one > limit:
        widest = max(shapes.items(), key=lambda item: item[1].factor_numbers)
        raise AttribIndexError(
            f"the exact section needs {SUM_COPIES} × {one / 2**30:.2f} GiB = {SUM_COPIES * one / 2**30:.2f} GiB for "
            f"the unprojected Kronecker factors of {len(shapes)} layers (Σ (n_in² + n_out²) × 8 bytes; the largest, "
            f"{widest[0]}, is {widest[1].gradient_shape[1]} in × {widest[1].gradient_shape[0]} out), but the limit is "
            f"{limit / 2**30:.2f} GiB ({'exact.memory_gb' if config.memory_gb is not None else 'half of RAM'}). "
            f"Capture fewer layers (projection.modules / last_n_blocks), raise exact.memory_gb on a larger machine, "
            f"or set exact.enabled: false."
        )


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def exact_shapes(extractor: GradientExtractor) -> dict[str, LayerShape]:
    """The unprojected gradient shapes of the captured layers, with a bias column where the projected rows have one."""
    specs = extractor.projections.modules
    return layer_shapes(extractor.model, [s.name for s in specs], biased={s.name for s in specs if s.bias})


class ExactFactors:
    """The unprojected factor sums of the sampled examples of each batch a build extracts (`factor_sample`):
    captured in the same backward pass as the projected rows (empirical Fisher), or in one more pass of those
    examples with labels sampled from the model (true Fisher). `corpus_length`: the documents of the whole pass
    (all shards of a build; an append's new corpus), which fixes the rate at which positions are sampled."""

    def __init__(self, extractor: GradientExtractor, config: ExactConfig, corpus_length: int | None):
        self.extractor = extractor
        self.config = config
        self.names = [spec.name for spec in extractor.projections.modules]
        self.shapes = exact_shapes(extractor)
        self.rate = factor_rate(config.factor_sample, corpus_length)
        self.listener = FactorListener(self.shapes, trace=config.kind == "kfac")
        self._chosen: list[int] = []

    @property
    def same_pass(self) -> list[FactorListener]:
        """The listeners to hand to the projected pass (none when the factors need their own labels)."""
        return [self.listener] if self.config.fisher == "empirical" else []

    def select(self, positions: list[int]) -> None:
        """Before a batch's projected pass: the corpus positions of its examples, in batch order."""
        chosen = factor_selection(np.asarray(positions), self.rate, self.config.seed)  # (B,) bool
        self._chosen = np.flatnonzero(chosen).tolist()
        rows = None if len(self._chosen) == len(positions) else torch.tensor(self._chosen, dtype=torch.long)
        self.listener.select(rows if self.config.fisher == "empirical" else None, 1.0 / self.rate)

    def take(self, examples: list[TokenizedExample]) -> dict[str, FactorBatch]:
        """The selected examples' factor sums (empty when none was), after the batch's projected pass ran with
        `same_pass`."""
        if self.config.fisher == "true" and self._chosen:
            hooks = LayerHooks(self.extractor.model, self.names, self.extractor.dtype, [self.listener])
            chosen = [examples[i] for i in self._chosen]
            self.extractor.run(hooks, chosen, labels="sampled", seed=self.config.seed)
        return self.listener.take()

    def empty_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: shape.gradient_shape for name, shape in self.shapes.items()}


def model_extractor(folder: Path, header: ManifestHeader) -> GradientExtractor:
    """The recorded model (checked against its fingerprint) with the folder's projections, for a merge's exact
    section."""
    config = header.config
    model, tokenizer = load_model(header.model.name_or_path, config.extract.dtype, config.extract.device)
    if model_fingerprint(model) != header.model.fingerprint:
        raise AttribIndexError(
            f"the model at {header.model.name_or_path} is not the one the shards were built with (fingerprint "
            f"{header.model.fingerprint[:19]}…); the exact section's correction pass needs that model."
        )
    specs = [ModuleSpec(m.name, m.kind, m.in_features, m.out_features, m.bias) for m in header.modules]
    projections = ProjectionSet.load(folder / layout.PROJECTIONS, specs)
    return GradientExtractor(model, tokenizer, projections, config.extract.max_length, DTYPES[config.extract.dtype])


def fit_exact(
    out: Path,
    config: ExactConfig,
    curvature: CurvatureSums,
    store: RowStore,
    extractor: GradientExtractor,
    batch_size: int,
    progress: bool,
) -> ExactRecord:
    """Fit and save the exact preconditioner from the sums (EK-FAC: plus its correction pass with the model of
    `extractor`); returns the manifest's record."""
    names = [spec.name for spec in extractor.projections.modules]  # module order, however the sums were read
    shapes = exact_shapes(extractor)
    bases = kfac_bases(
        {n: curvature.exact_activations[n] for n in names},
        {n: curvature.exact_gradients[n] for n in names},
        {n: curvature.exact_traces[n] for n in names},
        curvature.count,
    )
    dtype = torch.float64 if extractor.dtype == torch.float64 else torch.float32
    corrected, sample = None, 0
    if config.kind == "ekfac":
        rows = sample_rows(store.rows, config.sample, config.seed)
        corrected = _corrected_eigenvalues(out, bases, shapes, store, rows, extractor, config, batch_size, progress)
        sample = len(rows)
    preconditioner = fit_exact_preconditioner(config.kind, bases, shapes, config.damping, corrected, dtype)
    preconditioner.save(out / layout.EXACT_PRECONDITIONER)
    (out / layout.EXACT_CORRECTION).unlink(missing_ok=True)
    return ExactRecord(
        kind=config.kind,
        fisher=config.fisher,
        damping=config.damping,
        examples=curvature.exact_examples,
        sample=sample,
        factor_bytes=factor_bytes(shapes),
        file=layout.EXACT_PRECONDITIONER,
        preconditioner_hash=preconditioner.hash(),
        biased=tuple(name for name, shape in shapes.items() if shape.bias),
        modules=preconditioner.stats(),
    )


def sample_rows(rows: int, sample: int, seed: int) -> np.ndarray:
    """Sorted rows of the EK-FAC correction sample: `sample` of `rows` drawn without replacement (all if fewer).

    Example:
        >>> sample_rows(10, 3, seed=0).tolist()
        [2, 6, 8]
    """
    if sample >= rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))


def _corrected_eigenvalues(
    out: Path,
    bases: dict,
    shapes: dict[str, LayerShape],
    store: RowStore,
    rows: np.ndarray,
    extractor: GradientExtractor,
    config: ExactConfig,
    batch_size: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """E[(U_Sᵀ G U_A)²] per layer over the sampled rows, resuming from the checkpoint of an interrupted pass."""
    curvature = ExactPreconditioner.eigenbases(bases, shapes)
    basis = curvature.hash()  # the checkpoint holds sums in this basis only
    totals, done = _read_correction(out / layout.EXACT_CORRECTION, basis, bases)

    def add(name: str, gradients: torch.Tensor) -> None:  # (B, n_out, n_in') in the eigenbasis
        totals[name] += gradients.double().square().sum(dim=0).cpu()

    rotation = curvature.to(extractor.device, extractor.dtype)
    hooks = LayerHooks(extractor.model, list(bases), extractor.dtype, [RotatedGradients(shapes, rotation, add)])
    labels = "sampled" if config.fisher == "true" else "data"
    since_commit, commit_every = 0, max(1, len(rows) // CORRECTION_CHECKPOINTS)
    with progress_bar(total=len(rows), initial=done, desc="ekfac (exact)", unit="doc", enabled=progress) as bar:
        # Windows of rows in sample order (the checkpoint counts whole windows), batched longest first inside.
        window_rows = max(batch_size, min(batch_size * WINDOW_BATCHES, commit_every))
        for window in batched(rows[done:].tolist(), window_rows):
            documents = store.documents(window)
            examples = extractor.tokenize([d.text for d in documents], [f"document {d.id!r}" for d in documents])
            for group in batched(sorted(examples, key=lambda e: -len(e.input_ids)), batch_size):
                extractor.run(hooks, group, labels=labels, seed=config.seed)
                bar.update(len(group))
            done += len(window)
            since_commit += len(window)
            if since_commit >= commit_every and done < len(rows):
                _write_correction(out / layout.EXACT_CORRECTION, basis, totals, done)
                since_commit = 0
    return {name: total / len(rows) for name, total in totals.items()}


def _read_correction(path: Path, basis: str, bases: dict) -> tuple[dict[str, torch.Tensor], int]:
    fresh = {n: torch.zeros_like(values, dtype=torch.float64) for n, (_, _, values) in bases.items()}
    if not path.is_file():
        return fresh, 0
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        if meta.get("basis") != basis:  # sums in another basis (the factors changed): start the pass again
            return fresh, 0
        return {n: handle.get_tensor(n) for n in fresh}, int(meta["done"])


def _write_correction(path: Path, basis: str, totals: dict[str, torch.Tensor], done: int) -> None:
    save_safetensors({n: t.contiguous() for n, t in totals.items()}, path, {"basis": basis, "done": str(done)})
