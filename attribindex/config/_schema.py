"""Typed, validated build configuration. YAML presets in `index_configs/` load into these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from attribindex._records import omitted_when_default
from attribindex.errors import AttribIndexError

HessianKind = Literal["raw", "identity", "kfac", "ekfac"]
ScoreMode = Literal["dot", "cosine"]
StoreDtype = Literal["float16", "bfloat16", "float32"]
ComputeDtype = Literal["float32", "float64", "bfloat16", "float16"]
IndexKind = Literal["flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw"]
IndexStorage = Literal["float32", "float16", "bfloat16"]
MipsMethod = Literal["auto", "augment", "inner_product"]
Device = Literal["auto", "cpu", "cuda"]
ExactKind = Literal["kfac", "ekfac"]
FisherLabels = Literal["empirical", "true"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AttribIndexError(message)


@dataclass(frozen=True)
class ProjectionConfig:
    """Which layers are captured and how their gradients are projected (LoGra).

    Args:
        modules: fnmatch patterns on module names (``model.layers.3.mlp.up_proj``); a module is
            captured when it is a Linear / GPT-2 Conv1D and matches one pattern. ``"*"`` = all.
        exclude: patterns removed after ``modules``.
        include_head: capture the model's output embedding (``get_output_embeddings()``, whatever its
            name: ``lm_head``, GPT-NeoX's ``embed_out``) when the patterns match it. Off by default: the
            head is as large as the vocabulary, mostly measures token frequency, and capturing it turns the
            memory-saving chunked head off.
        bias: capture the bias of every captured layer that has one (GPT-2's Conv1D, Qwen2's q/k/v), as an
            extra input column of the layer's gradient (``[x; 1]``); its projection adds one column to
            ``P_in``.
        last_n_blocks: keep only modules inside the last N transformer blocks (None = all blocks).
        rank_in: rows of ``P_in`` (projected activation dimension) per module.
        rank_out: rows of ``P_out`` (projected output-gradient dimension) per module.
        seed: seed of the Gaussian projections; same seed + config = identical matrices anywhere.
        optimizer_state: path of the training optimizer's state (HF Trainer's ``optimizer.pt``, a torch
            optimizer ``state_dict``, or a name-keyed safetensors from
            ``attribindex.logra.save_named_second_moments``). Gradients are then divided by the optimizer's
            √v before projection (as TrackStar / LESS do), folded into the projections: exact for
            Adafactor's factored moments, a rank-1 row/column approximation of Adam's v (its error is
            recorded in the manifest).
        optimizer_eps: Adam's ε, the floor of √v (ignored for Adafactor).
        lora: for a PEFT LoRA model, which layers are captured: ``adapters``, the adapters' trainable A and B
            matrices (the gradients of what fine-tuning trained, as LESS does), or ``base``, the frozen base
            layers the adapters sit on. Other layers are left out either way; ``modules`` patterns then match
            peft's names (``base_model.model.…c_attn.lora_A.default``, ``….c_attn.base_layer``).

    Example:
        >>> ProjectionConfig(modules=("*.mlp.*",), last_n_blocks=4, rank_in=16, rank_out=16)
        ProjectionConfig(modules=('*.mlp.*',), exclude=(), include_head=False, bias=True, last_n_blocks=4, rank_in=16, rank_out=16, seed=0, optimizer_state=None, optimizer_eps=1e-08, lora='adapters')
    """

    modules: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    include_head: bool = False
    bias: bool = True
    last_n_blocks: int | None = None
    rank_in: int = 16
    rank_out: int = 16
    seed: int = 0
    optimizer_state: str | None = None
    optimizer_eps: float = 1e-8
    lora: Literal["adapters", "base"] = "adapters"

    def __post_init__(self) -> None:
        _require(self.optimizer_eps > 0, f"projection.optimizer_eps must be > 0, got {self.optimizer_eps}.")
        _require(
            self.lora in ("adapters", "base"),
            f"projection.lora must be 'adapters' (the LoRA A and B matrices) or 'base' (the frozen layers under "
            f"them), got {self.lora!r}.",
        )
        _require(len(self.modules) > 0, "projection.modules is empty; use ['*'] to capture all linear layers.")
        _require(
            self.rank_in >= 1 and self.rank_out >= 1,
            f"projection.rank_in/rank_out must be >= 1, got rank_in={self.rank_in}, rank_out={self.rank_out}. "
            f"Set both to a positive rank such as 16.",
        )
        _require(
            self.last_n_blocks is None or self.last_n_blocks >= 1,
            f"projection.last_n_blocks must be >= 1 or null, got {self.last_n_blocks}.",
        )
        _require(self.seed >= 0, f"projection.seed must be >= 0, got {self.seed}.")


@dataclass(frozen=True)
class HessianConfig:
    """Curvature used to whiten gradients so influence becomes an inner product.

    Args:
        kind: ``raw`` = projected empirical Fisher per module (E[g gᵀ], d×d with d = rank_out·rank_in);
            ``kfac`` = Kronecker factors E[δ̃δ̃ᵀ] ⊗ E[x̃x̃ᵀ] of projected output gradients and inputs
            (rank_out² + rank_in² numbers per module, so large ranks stay affordable); ``ekfac`` = KFAC's
            eigenbasis with eigenvalues corrected by one more pass over the stored rows; ``identity`` = no
            whitening (plain gradient similarity). See docs/quality.md for measured LDS of each.
        damping: α in ``λ = α · mean(eigenvalues)`` added before ``H^{-1/2}``.

    Example:
        >>> HessianConfig(kind="raw", damping=0.1)
        HessianConfig(kind='raw', damping=0.1)
    """

    kind: HessianKind = "raw"
    damping: float = 0.1

    def __post_init__(self) -> None:
        _require(
            self.damping > 0, f"hessian.damping must be > 0 (relative to the mean eigenvalue), got {self.damping}."
        )


@dataclass(frozen=True)
class ExtractConfig:
    """How the model is run to capture gradients.

    Args:
        batch_size: examples per forward+backward pass (results do not depend on it).
        max_length: documents are truncated to this many tokens.
        dtype: dtype the model computes in (float64 for exactness tests, bfloat16 on GPUs).
        device: ``auto`` picks CUDA when available.

    Example:
        >>> ExtractConfig(batch_size=16, max_length=256)
        ExtractConfig(batch_size=16, max_length=256, dtype='float32', device='auto')
    """

    batch_size: int = 8
    max_length: int = 512
    dtype: ComputeDtype = "float32"
    device: Device = "auto"

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"extract.batch_size must be >= 1, got {self.batch_size}.")
        _require(
            self.max_length >= 2,
            f"extract.max_length must be >= 2 (one token predicts the next), got {self.max_length}.",
        )


@dataclass(frozen=True)
class StoreConfig:
    """On-disk storage of raw projected gradients.

    Args:
        dtype: element type of stored raw gradients. float16 values are stored divided by a
            per-row, per-module fp32 scale so tiny gradients do not flush to zero.
        chunk_rows: rows per chunk file; peak build memory is bounded by one chunk.

    Example:
        >>> StoreConfig(dtype="bfloat16", chunk_rows=8192)
        StoreConfig(dtype='bfloat16', chunk_rows=8192)
    """

    dtype: StoreDtype = "float16"
    chunk_rows: int = 4096

    def __post_init__(self) -> None:
        _require(self.chunk_rows >= 1, f"store.chunk_rows must be >= 1, got {self.chunk_rows}.")


@dataclass(frozen=True)
class IndexConfig:
    """The searchable index over the whitened vectors: exact over the row store, or a FAISS kind.

    Args:
        mode: ``dot`` = influence ``⟨H^{-1/2}g_q, H^{-1/2}g_t⟩``; ``cosine`` = the same on
            unit-normalised vectors (robust to gradient-norm outliers).
        kind: ``flat`` = exhaustive search (with float32 storage: exact, over the row store itself); ``ivf_flat``, ``ivf_sq8``,
            ``ivf_pq`` = inverted lists over ``nlist`` k-means cells, ``nprobe`` of them scanned per
            query (full vectors, 8-bit scalar codes, product-quantised codes); ``hnsw`` = a graph
            (CPU only).
        mips: how approximate kinds search un-normalised (``dot``) vectors: ``inner_product`` = FAISS's
            inner-product metric as is; ``augment`` (``ivf_flat`` only) = the MIPS→L2 augmentation
            ``[x, √(M² − ‖x‖²)]`` (M = the largest norm, recorded), because inner-product cells ignore norms
            (on heavy-tailed norms it reached recall@10 0.94 where inner-product cells reached 0.71, at a
            quarter of the cells). Quantised codes and HNSW graphs lose the inner product in the large extra
            coordinate (recall@10 0.3–0.8 against 0.95–0.99), so they refuse it. ``auto`` = ``augment`` for
            ``ivf_flat``, ``inner_product`` otherwise. Cosine mode ignores this.
        storage: element type of a ``flat`` index: ``float32`` searches the stored rows themselves, exactly (no
            copy); ``float16``/``bfloat16`` keep a FAISS copy of the whitened rows in that type (scores approximate
            until re-ranked).
        nlist: k-means cells of IVF kinds (None = the power of two nearest √N, at most N/39).
        nprobe: cells scanned per query (None = nlist/16, or the operating point `eval recall` records).
        pq_m: sub-quantisers of ``ivf_pq`` (None = one per 4 dimensions; codes are pq_m bytes).
        hnsw_m: graph degree of ``hnsw``.
        ef_construction / ef_search: HNSW candidate-list sizes when building / searching
            (searching uses at least the number of candidates fetched).
        rerank: non-exact kinds fetch ``rerank × k`` candidates and re-score them exactly from the stored
            raw gradients; 0 returns the approximate scores as they are.
        train_per_centroid: IVF training rows per cell, sampled from the stored vectors (39–256).
        seed: seed of the training sample and of k-means (the same seed and data give the same index).
        device: ``auto`` uses a GPU when GPU faiss and a GPU are present.

    Example:
        >>> IndexConfig(mode="dot", kind="ivf_pq").rerank
        4
    """

    mode: ScoreMode = "cosine"
    kind: IndexKind = "flat"
    storage: IndexStorage = "float32"
    mips: MipsMethod = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    rerank: int = 4
    train_per_centroid: int = 64
    seed: int = 0
    device: Device = "auto"

    def __post_init__(self) -> None:
        _require(
            self.storage == "float32" or self.kind == "flat",
            f"index.storage={self.storage} applies to kind 'flat' only; {self.kind} stores its own codes. "
            f"Remove index.storage or set index.kind: flat.",
        )
        _require(
            self.mips != "augment" or self.kind == "ivf_flat",
            f"index.mips=augment needs kind ivf_flat, got {self.kind}: quantised codes and graphs lose the inner "
            f"product in the augmented coordinate (measured recall@10 0.3–0.8). Use mips: inner_product.",
        )
        for name in ("nlist", "nprobe", "pq_m"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"index.{name} must be >= 1 or null (derived), got {value}.")
        _require(
            self.nlist is None or self.nprobe is None or self.nprobe <= self.nlist,
            f"index.nprobe ({self.nprobe}) cannot exceed index.nlist ({self.nlist}).",
        )
        for name in ("hnsw_m", "ef_construction", "ef_search"):
            _require(getattr(self, name) >= 1, f"index.{name} must be >= 1, got {getattr(self, name)}.")
        _require(self.rerank >= 0, f"index.rerank must be >= 0 (0 = no exact re-rank), got {self.rerank}.")
        _require(
            39 <= self.train_per_centroid <= 256,
            f"index.train_per_centroid must be within 39..256 (faiss k-means needs 39 per cell and gains "
            f"nothing past 256), got {self.train_per_centroid}.",
        )
        _require(self.seed >= 0, f"index.seed must be >= 0, got {self.seed}.")

    @property
    def exact(self) -> bool:
        """True when search returns the exact top-k with exact scores."""
        return self.kind == "flat" and self.storage == "float32"


@dataclass(frozen=True)
class ExactConfig:
    """Unprojected curvature for exact re-ranking at query time (`attribute(..., exact=C)`).

    With it, the build also sums each captured layer's full Kronecker factors A = Σ x̄x̄ᵀ and S = Σ δδᵀ
    (x̄ = [x, 1] for a layer with a bias): Σ (n_in'² + n_out²) × 8 bytes, in memory and on disk. A query then
    takes the index's top-C candidates and scores them with the unprojected KFAC / EK-FAC influence.

    Args:
        enabled: keep the unprojected factors (off by default: they cost memory and disk).
        kind: ``kfac`` = eigenvalues s_i·a_j of the factors; ``ekfac`` = eigenvalues corrected by a second pass
            over ``sample`` examples (E[(U_Sᵀ G U_A)²], George et al. 2018).
        damping: α in ``λ = α · mean(eigenvalues)``, per layer.
        sample: examples of the EK-FAC correction pass, drawn (seeded) from the indexed rows.
        factor_sample: about how many examples of a build (or an append) feed the factors A and S, drawn (seeded)
            by corpus position; each is weighted by 1 / its inclusion probability, so the sums estimate those
            over every example. The factors cost more than the layer's own weight gradient, and their
            eigenbases settle long before the corpus ends (kronfluence's default is 100,000 examples). None:
            every example (as is every example of a streamed corpus, whose length is unknown).
        fisher: ``empirical`` = factors from the data's labels (the gradients that are scored); ``true`` =
            labels sampled from the model's own predictions (kronfluence's recipe for language models), which
            costs one more forward and backward per batch.
        seed: seed of the correction sample, of the factor sample and of the sampled labels.
        memory_gb: the most memory the factor sums may take while building (None = half of this machine's
            RAM); a larger model is refused before the build starts.

    Example:
        >>> ExactConfig(enabled=True, kind="ekfac", sample=512).damping
        0.1
    """

    enabled: bool = False
    kind: ExactKind = "ekfac"
    damping: float = 0.1
    sample: int = 1024
    factor_sample: int | None = 1024
    fisher: FisherLabels = "empirical"
    seed: int = 0
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        _require(self.damping > 0, f"exact.damping must be > 0 (relative to the mean eigenvalue), got {self.damping}.")
        _require(self.sample >= 1, f"exact.sample must be >= 1 (examples of the EK-FAC correction), got {self.sample}.")
        _require(
            self.factor_sample is None or self.factor_sample >= 1,
            f"exact.factor_sample must be >= 1 (examples whose tokens feed the factors) or null (every example), "
            f"got {self.factor_sample}.",
        )
        _require(self.seed >= 0, f"exact.seed must be >= 0, got {self.seed}.")
        _require(
            self.memory_gb is None or self.memory_gb > 0,
            f"exact.memory_gb must be > 0 or null (half of RAM), got {self.memory_gb}.",
        )


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines an index, loaded from a YAML preset.

    Example:
        >>> cfg = BuildConfig(projection=ProjectionConfig(rank_in=8, rank_out=8))
        >>> cfg.index.mode
        'cosine'
    """

    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    exact: ExactConfig = omitted_when_default(ExactConfig())
