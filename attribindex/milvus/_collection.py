"""What a Milvus collection of an index holds, and the record of it that the collection carries.

Schema: ``row`` (INT64, primary key: the global row), ``id`` and ``source`` (VARCHAR: the example's external id and
where it came from), ``vector`` (FLOAT_VECTOR: the row's whitened vector, as a local flat index holds it; one
coordinate longer when the collection searches the MIPS→L2 augmentation, `MilvusKind.augments`). Everything else is in the collection's properties, under ``attribindex.``: the index
it mirrors (index_id, version, rows, hashes, dims, normalisation), how it searches (kind, the augmentation's M, the
sketch, the operating point) and the state of a push under way (target version, rows written so far). Properties
change with one `alter_collection_properties` call each, so a reader always sees a whole record.

Above Milvus's 32,768 dims (a server's `proxy.maxDimension`), the collection holds a CountSketch of each whitened
row instead: dimension i goes to bucket h(i) with sign s(i), both drawn from ``numpy.random.default_rng([seed, D,
S])`` (``h = integers(0, S, D)``, then ``s = 2 · integers(0, 2, D) − 1``), and sketch(x)_b = Σ_{h(i) = b} s(i) x_i.
It keeps inner products in expectation; the candidates it finds are re-scored from the full stored rows. Measured
on 100,000 real rows of 8,192 dims (tools/bench_sketch.py, two seeds), the top-10 after re-scoring 400 candidates
recalled 0.994–1.000 of the exact top-10 with a sketch of half the dims, 0.962–0.969 with a quarter.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch

from attribindex.errors import AttribIndexError
from attribindex.index import augmentation_column, default_nlist
from attribindex.milvus._target import MilvusTarget, milvus_errors

PREFIX = "attribindex."
FORMAT = 1  # of the record below; a collection of another format is refused, naming the fix
MAX_DIM = 32_768  # Milvus's default limit on a vector field's dimension (a server's proxy.maxDimension)
MIPS_METHODS = ("auto", "augment", "inner_product")
SKETCH_RERANK = 40  # a sketched collection's candidates per result at least: 400 for a top-10 (module docstring)
MAX_TOPK = 16_384  # Milvus's limit on one search's `limit`
# Milvus Lite (3.2.2) rebuilds an index from its defaults whenever it reopens a file, whatever nlist it was created
# with; a collection in a Lite file is therefore made with Lite's default, so that its record says what it searches.
LITE_NLIST = 128
TEXT_LENGTH = 65_535  # VARCHAR capacity of `id` and `source` (longer values are cut: they are labels only)


@dataclass(frozen=True)
class MilvusKind:
    """One Milvus index type as attribindex uses it.

    `effort` names the search parameter `eval recall --search` sweeps and the operating point records.
    """

    name: str
    effort: str | None = None  # "ef" (HNSW), "nprobe" (IVF), "search_list" (DISKANN), "itopk_size" (GPU_CAGRA)
    build: tuple[tuple[str, int], ...] = ()

    def augments(self, mips: str, mode: str) -> bool:
        """Whether to index the MIPS→L2 augmentation [x, √(M² − ‖x‖²)] (metric L2, queries [q, 0]) instead of the
        vectors (metric IP). `mips` as the config's `index.mips`: ``auto`` augments IVF_FLAT only, as a local index
        does, because inner-product cells ignore norms; on a graph the augmentation loses the inner product in the
        large extra coordinate (Milvus Lite HNSW over 100,000 real rows: recall@10 0.006 augmented against 0.93 on
        inner product, docs/scale.md), though raw inner product can fail a graph too (milvus-io/milvus#51821):
        `eval recall --search` measures either. Cosine vectors all have norm 1: nothing to augment."""
        if mips not in MIPS_METHODS:
            raise AttribIndexError(f"unknown mips method {mips!r}. Choose one of: {', '.join(MIPS_METHODS)}.")
        return mode == "dot" and (mips == "augment" or (mips == "auto" and self.name == "IVF_FLAT"))

    def nlist(self, rows: int, lite: bool) -> int:
        """IVF cells for `rows` rows (as a local IVF index would have; Lite's fixed default in a Lite file); 0 for a
        kind without cells."""
        if self.effort != "nprobe":
            return 0
        return min(LITE_NLIST, rows) if lite else default_nlist(max(rows, 1))

    def search_params(self, effort: int | None, limit: int) -> dict:
        params = {}
        if self.effort in ("ef", "search_list", "itopk_size"):  # a graph's candidate list holds at least `limit`
            params[self.effort] = max(effort or 0, limit)
        elif self.effort == "nprobe":
            params["nprobe"] = effort or 16
        return params


KINDS = {
    kind.name: kind
    for kind in (
        MilvusKind("FLAT"),
        MilvusKind("IVF_FLAT", effort="nprobe"),
        MilvusKind("IVF_SQ8", effort="nprobe"),
        MilvusKind("HNSW", effort="ef", build=(("M", 16), ("efConstruction", 200))),
        MilvusKind("DISKANN", effort="search_list"),
        MilvusKind("GPU_CAGRA", effort="itopk_size"),
        MilvusKind("GPU_BRUTE_FORCE"),
    )
}


def milvus_kind(name: str) -> MilvusKind:
    kind = KINDS.get(name.upper())
    if kind is None:
        raise AttribIndexError(f"unknown Milvus index kind {name!r}. Choose one of: {', '.join(KINDS)}.")
    return kind


@dataclass(frozen=True)
class CollectionState:
    """The record a collection carries in its properties.

    `version` and `rows` describe the last complete push (0 and 0 before the first); `pushing` is the version a push
    under way is writing (0 when none is), `rewrite` whether that push started the collection over, and
    `pushed_through` the row below which its inserts are done.
    """

    index_id: str
    version: int
    rows: int
    model_fingerprint: str
    projection_hash: str
    preconditioner_hash: str
    dim: int  # the index's dims (the vector field holds one more when the kind is augmented)
    normalization: str
    kind: str
    max_norm: float  # M of the augmentation (0 when the vectors are not augmented)
    augmented: bool = False  # L2 over [x, √(M² − ‖x‖²)] rather than inner product over x
    nlist: int = 0  # IVF cells (0 for a kind without cells)
    sketch_dim: int = 0  # S of the CountSketch the collection holds (0: the whitened rows themselves)
    sketch_seed: int = 0
    pushing: int = 0
    rewrite: bool = False
    pushed_through: int = 0
    operating_point: str = ""  # JSON {"effort": …, "recall": …, "k": …, "ms_per_query": …} from `eval recall`

    @property
    def milvus_kind(self) -> MilvusKind:
        return milvus_kind(self.kind)

    @property
    def effort(self) -> int | None:
        return json.loads(self.operating_point)["effort"] if self.operating_point else None

    def properties(self) -> dict[str, str]:
        values = {"format": FORMAT} | dataclasses.asdict(self)
        return {PREFIX + key: str(int(value) if isinstance(value, bool) else value) for key, value in values.items()}

    @classmethod
    def from_properties(cls, properties: dict[str, str], target: MilvusTarget) -> CollectionState:
        ours = {key[len(PREFIX) :]: value for key, value in properties.items() if key.startswith(PREFIX)}
        if not ours:
            raise AttribIndexError(
                f"{target.uri}: the collection {target.collection!r} was not made by attribindex push. Name another "
                f"collection, or drop this one if it is yours to drop."
            )
        if ours.get("format") != str(FORMAT):
            raise AttribIndexError(
                f"{target.uri}: the collection was pushed by another attribindex version (format {ours.get('format')}, "
                f"this one reads {FORMAT}). Push again with --replace to rewrite it."
            )
        values = {}
        for field in dataclasses.fields(cls):
            raw = ours.get(field.name, "")
            values[field.name] = raw if field.type == "str" else float(raw) if field.type == "float" else int(raw)
        values["rewrite"], values["augmented"] = bool(values["rewrite"]), bool(values["augmented"])
        return cls(**values)

    def vector_dim(self) -> int:
        return (self.sketch_dim or self.dim) + self.augmented

    @property
    def metric(self) -> str:
        return "L2" if self.augmented else "IP"

    def sketched(self, whitened: np.ndarray) -> np.ndarray:
        """(n, D) whitened vectors → (n, S) their CountSketch, or themselves when the collection holds no sketch."""
        whitened = np.ascontiguousarray(whitened, dtype=np.float32)
        return count_sketch(whitened, self.sketch_dim, self.sketch_seed) if self.sketch_dim else whitened

    def vectors(self, whitened: np.ndarray) -> np.ndarray:
        """(n, D) whitened rows → the float32 vectors the collection stores: sketched, then augmented (L2 kinds)."""
        vectors = self.sketched(whitened)  # (n, S or D)
        if not self.augmented:
            return vectors
        return np.concatenate([vectors, augmentation_column(vectors, self.max_norm)[:, None]], axis=1)

    def queries(self, whitened: np.ndarray) -> np.ndarray:
        """(Q, D) whitened query vectors → what the collection is searched with (sketched; [q, 0] for L2 kinds)."""
        vectors = self.sketched(whitened)
        if not self.augmented:
            return vectors
        return np.concatenate([vectors, np.zeros((len(vectors), 1), np.float32)], axis=1)


def count_sketch(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(n, D) → (n, `dim`) float32 CountSketch of the rows (module docstring: how buckets and signs are drawn).

    Example:
        >>> x = np.arange(12, dtype=np.float32).reshape(2, 6)
        >>> count_sketch(x, 3, seed=0).shape
        (2, 3)
    """
    rng = np.random.default_rng([seed, x.shape[1], dim])
    buckets = rng.integers(0, dim, x.shape[1])  # (D,)
    signs = (2 * rng.integers(0, 2, x.shape[1]) - 1).astype(np.float32)  # (D,)
    out = torch.zeros(len(x), dim)  # (n, S)
    out.index_add_(1, torch.from_numpy(buckets), torch.from_numpy(x * signs))
    return out.numpy()


def read_state(client, target: MilvusTarget) -> CollectionState | None:
    """The collection's record; None when the collection does not exist."""
    with milvus_errors(target):
        if not client.has_collection(target.collection):
            return None
        properties = client.describe_collection(target.collection).get("properties", {})
    return CollectionState.from_properties(properties, target)


def write_state(client, target: MilvusTarget, state: CollectionState) -> None:
    with milvus_errors(target):
        client.alter_collection_properties(target.collection, properties=state.properties())


def create_collection(client, target: MilvusTarget, state: CollectionState) -> None:
    """A new, empty collection for `state` (with its index, loaded for search)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("id", DataType.VARCHAR, max_length=TEXT_LENGTH)
    schema.add_field("source", DataType.VARCHAR, max_length=TEXT_LENGTH)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=state.vector_dim())
    kind = state.milvus_kind
    index_params = client.prepare_index_params()
    params = dict(kind.build) | ({"nlist": state.nlist} if state.nlist else {})
    index_params.add_index(field_name="vector", index_type=kind.name, metric_type=state.metric, params=params)
    with milvus_errors(target):
        client.create_collection(
            target.collection,
            schema=schema,
            index_params=index_params,
            properties=state.properties(),
            consistency_level="Strong",  # a search sees every insert and delete acknowledged before it
        )
