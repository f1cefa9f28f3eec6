"""Zarr v3 activation store: sharded, written streaming with bounded memory, resumable; readers and a lazy delta.

Layout of ``<path>.zarr`` (one store per model):

- root attrs: ``model``, ``dtype`` (stored activation dtype), ``params`` (what made the store), ``layout``
  (sizes, sites, views, shard sizes, code lists of ``dataset``/``split``), ``fingerprint`` (compared on
  resume), ``rows_done`` / ``tok_done`` (prompts / token rows committed), ``complete``, and ``stats``
  (running count, mean and M2 per site and view, float64, committed together with ``rows_done``).
- root arrays, one row per prompt: ``prompt_id`` int64, ``n_tokens`` int32, ``tok_offset`` int64,
  ``dataset`` int16 and ``split`` int8 (codes into the ``layout`` name lists), optional ``decision`` int32
  and optional ``logits`` (N, V) float16 at the decision token.
- token index (when a site stores ``tokens``): ``tok_prompt`` int64 (prompt id of each token row),
  ``tok_pos`` int32 (position in its prompt), ``tok_id`` int32 (token id).
- one group per site (``L12.resid_post``) holding ``last`` and ``mean`` (N, d) and ``tokens`` (T, d).

Every array is sharded (one file per ``shard_rows`` prompts, or ``tok_shard_rows`` token rows), so a store
is a few files per site. A writer buffers one shard of prompt rows (and one shard of token rows), writes
whole shard-aligned blocks, and only then advances ``rows_done`` in one atomic metadata write: a crash
leaves no corrupt or duplicated rows, and ``create(..., resume=True)`` continues from ``rows_done``.

Several processes (data-parallel extraction under torchrun) write one store together: each takes a
shard-aligned slice of the prompts (`rank_slice`) and a `StoreWriter(store, rows=(lo, hi))`. Row shards are
whole per rank; token shards shared by two ranks' slices are kept aside as small ``.npy`` pieces. Each rank
commits its progress and running statistics to its own ``_ranks/<lo>.json`` (so a killed rank resumes its own
slice); `finalize_ranks` then writes the pieces, merges the statistics (Chan et al.) and marks the store complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mechdiff.errors import MechdiffError, first_line
from mechdiff.io import to_jsonable

FORMAT = 1
VIEWS = ("last", "mean", "tokens")
ROW_VIEWS = ("last", "mean")
STORE_DTYPES = ("float32", "float16")
COMPRESSORS = (None, "lz4", "zstd")
INDEX_NAMES = ("prompt_id", "dataset", "split", "n_tokens", "tok_offset", "decision", "tok_prompt", "tok_pos",
               "tok_id")
_RESERVED = {*INDEX_NAMES, "logits"}
_IDX_CHUNK = 1 << 16
_IDX_SHARD = 1 << 22
RANK_DIR = "_ranks"  # per-rank progress and shared-shard token pieces while several processes write a store


# --------------------------------------------------------------------------------------------- helpers


def _chunk_for(shard: int, target: int) -> int:
    """Largest divisor of `shard` that is <= `target` (zarr needs chunks to tile a shard)."""
    for c in range(min(shard, target), 0, -1):
        if shard % c == 0:
            return c
    return 1


def _codecs(name: str | None):
    if name is None:
        return None
    if name == "lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    raise MechdiffError(f"unknown compressor {name!r}: use None, 'lz4' or 'zstd'")


def _jsonable(x: Any, what: str) -> Any:
    """`x` converted by `mechdiff.io.to_jsonable` and round-tripped through JSON, as zarr attrs will hold it."""
    try:
        return json.loads(json.dumps(to_jsonable(x)))
    except (TypeError, ValueError) as exc:
        raise MechdiffError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {exc}") from exc


def _hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _block_stats(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) of the rows of x, in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean(axis=0)
    return x.shape[0], m, ((x - m) ** 2).sum(axis=0)


class _Welford:
    """Running count, mean and M2 per column, merged block by block (Chan et al. parallel update)."""

    def __init__(self, d: int, state: Mapping[str, Any] | None = None) -> None:
        if state:
            self.n = int(state["n"])
            self.mean = np.asarray(state["mean"], dtype=np.float64)
            self.m2 = np.asarray(state["m2"], dtype=np.float64)
        else:
            self.n, self.mean, self.m2 = 0, np.zeros(d), np.zeros(d)

    def add(self, x: np.ndarray) -> None:
        if len(x):
            self.merge(*_block_stats(x))

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / tot)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / tot)
        self.n = tot

    def copy(self) -> _Welford:
        w = _Welford(len(self.mean))
        w.n, w.mean, w.m2 = self.n, self.mean.copy(), self.m2.copy()
        return w

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n) if self.n else np.full_like(self.mean, np.nan)


def _as_rows(rows: Any, n: int, what: str) -> np.ndarray:
    r = np.asarray(rows)
    if r.dtype == bool:
        if r.shape != (n,):
            raise MechdiffError(f"{what}: boolean row mask has shape {r.shape}, expected ({n},)")
        return np.flatnonzero(r)
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise MechdiffError(f"{what}: rows must be a 1-D array of integer row indices")
    r = r.astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= n):
        raise MechdiffError(f"{what}: row index out of range 0..{n - 1}")
    return r


def _is_store_dir(p: Path) -> bool:
    meta = p / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return "mechdiff_store" in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _parallel(fn, items: Sequence[Any]) -> list[Any]:
    """Run fn over items in a few threads (zarr I/O and numpy release the GIL); exceptions propagate."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(fn, items))


def _remove_partials(p: Path) -> None:
    """Delete temporary files a killed writer may have left behind."""
    for root, _dirs, files in os.walk(p):
        for f in files:
            if f.endswith(".partial"):
                Path(root, f).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- readers


class _Reader:
    """Shared batch reader: subclasses give the number of rows, the block size and range reads of a view."""

    def _n_rows(self, site: str, view: str) -> int:
        raise NotImplementedError

    def _block_rows(self, site: str, view: str) -> int:
        raise NotImplementedError

    def _read_range(self, site: str, view: str, a: int, b: int) -> np.ndarray:
        raise NotImplementedError

    def iter_batches(
        self, site: str, view: str, batch_size: int, *, rows: np.ndarray | None = None, shuffle: bool = True,
        seed: int = 0, buffer_rows: int = 65536, epochs: int = 1, cache_bytes: int = 1 << 30,
    ) -> Iterator[np.ndarray]:
        """Stream float32 batches of `batch_size` rows (the last one of each epoch may be smaller).

        Blocks of one chunk are read in random order and shuffled again within a buffer of `buffer_rows`, so
        the whole array is never loaded. `rows` restricts to those row indices (token rows for 'tokens').
        Every selected row appears exactly once per epoch; the order is fixed by `seed`. Over several epochs,
        selected rows that fit in `cache_bytes` are read from the store once and kept (0: always stream);
        the batches are the same either way.
        """
        if batch_size < 1 or buffer_rows < 1 or epochs < 1:
            raise MechdiffError("iter_batches: batch_size, buffer_rows and epochs must all be >= 1")
        total = self._n_rows(site, view)
        blk = self._block_rows(site, view)
        sel = None if rows is None else np.unique(_as_rows(rows, total, f"iter_batches({site}, {view})"))
        block_ids = np.arange(math.ceil(total / blk)) if sel is None else np.unique(sel // blk)
        rng = np.random.default_rng(seed)
        buf: np.ndarray | None = None  # one preallocated buffer: held rows live in buf[:held]
        kept: dict[int, np.ndarray] | None = None  # block -> its selected rows, when they fit in cache_bytes
        for _ in range(epochs):
            order = rng.permutation(block_ids) if shuffle else block_ids
            held = 0
            for b in order:
                a0, a1 = int(b) * blk, min(total, (int(b) + 1) * blk)
                x = kept.get(int(b)) if kept is not None else None
                if x is None:
                    x = self._read_range(site, view, a0, a1)
                    if sel is not None:
                        lo, hi = np.searchsorted(sel, [a0, a1])
                        x = x[sel[lo:hi] - a0]
                    if kept is None and epochs > 1 and (total if sel is None else len(sel)) * x.shape[1] * 4 <= cache_bytes:
                        kept = {}
                    if kept is not None:
                        kept[int(b)] = x
                if buf is None:
                    buf = np.empty((max(buffer_rows, batch_size) + blk, x.shape[1]), dtype=np.float32)
                buf[held : held + len(x)] = x
                held += len(x)
                del x
                if held >= buffer_rows:
                    data = buf[:held][rng.permutation(held)] if shuffle else buf[:held].copy()
                    full = held // batch_size * batch_size
                    for i in range(0, full, batch_size):
                        yield data[i : i + batch_size]
                    held -= full
                    buf[:held] = data[full:]
                    del data
            if held:
                data = buf[:held][rng.permutation(held)] if shuffle else buf[:held].copy()
                for i in range(0, held, batch_size):
                    yield data[i : i + batch_size]
                del data


class ActStore(_Reader):
    """An activation store on disk (see the module docstring); open with `create` (to write) or `open`."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise MechdiffError(f"store mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        if not _is_store_dir(self.path):
            raise MechdiffError(f"{self.path} is not an activation store: run the extract stage to create it")
        self.mode = mode
        self._root = zarr.open_group(str(self.path), mode=mode)
        a = dict(self._root.attrs)
        if not a.get("initialised"):
            raise MechdiffError(f"store {self.path} was never fully created: delete it and extract again")
        self._lay: dict[str, Any] = a["layout"]
        self._cache: dict[str, np.ndarray] = {}
        self._shards_ok: set[str] = set()

    # ----------------------------------------------------------------------------------- creation

    @classmethod
    def create(
        cls, path: str | Path, *, prompt_ids: np.ndarray, n_tokens: np.ndarray, datasets: list[str],
        splits: list[str], sites: dict[str, int], views: dict[str, list[str]], vocab_size: int | None = None,
        attrs: dict | None = None, dtype: str = "float32", shard_rows: int = 1024, compressor: str | None = None,
        resume: bool = True, decision: np.ndarray | None = None, tok_ids: np.ndarray | None = None,
        tok_shard_rows: int | None = None,
    ) -> ActStore:
        """Create (or, with `resume`, reopen a matching partial) store and return it open for writing.

        `sites` maps site names to widths, `views` site names to a subset of ('last', 'mean', 'tokens').
        `vocab_size` adds a float16 `logits` array. `decision` (N,) and `tok_ids` (T,) are optional index
        arrays. An existing store made with other params raises MechdiffError; `resume=False` replaces it.
        """
        p = Path(path)
        prompt_ids = np.asarray(prompt_ids)
        n_tokens = np.asarray(n_tokens)
        n = len(prompt_ids)
        if n == 0:
            raise MechdiffError("cannot create an activation store with no prompts: the corpus or split is empty")
        if prompt_ids.ndim != 1 or not np.issubdtype(prompt_ids.dtype, np.integer):
            raise MechdiffError("prompt_ids must be a 1-D integer array")
        if len(np.unique(prompt_ids)) != n:
            raise MechdiffError("prompt_ids are not unique: fix the corpus so every prompt has its own pid")
        if n_tokens.shape != (n,) or not np.issubdtype(n_tokens.dtype, np.integer) or (n_tokens < 1).any():
            raise MechdiffError("n_tokens must be a 1-D integer array of positive lengths, one per prompt")
        if len(datasets) != n or len(splits) != n:
            raise MechdiffError(f"datasets and splits need one entry per prompt ({n}), got {len(datasets)}, {len(splits)}")
        if dtype not in STORE_DTYPES:
            raise MechdiffError(f"store dtype {dtype!r} not supported: use one of {', '.join(STORE_DTYPES)}")
        _codecs(compressor)
        if not isinstance(shard_rows, int) or shard_rows < 1:
            raise MechdiffError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        tok_shard_rows = int(tok_shard_rows or 8 * shard_rows)
        if not sites:
            raise MechdiffError("no sites to store: give at least one site, e.g. L12.resid_post")
        sites = {str(k): int(v) for k, v in sites.items()}
        vw: dict[str, list[str]] = {}
        for s, d in sites.items():
            if s in _RESERVED or "/" in s:
                raise MechdiffError(f"site name {s!r} is reserved or invalid: use names like L12.resid_post")
            if d < 1:
                raise MechdiffError(f"site {s}: width must be positive, got {d}")
            v = list(dict.fromkeys(views.get(s, [])))
            if not v or any(x not in VIEWS for x in v):
                raise MechdiffError(f"site {s}: views must be a non-empty subset of {', '.join(VIEWS)}, got {v}")
            vw[s] = v
        if set(views) - set(sites):
            raise MechdiffError(f"views given for unknown sites: {sorted(set(views) - set(sites))}")
        has_tokens = any("tokens" in v for v in vw.values())
        if decision is not None:
            decision = np.asarray(decision)
            if decision.shape != (n,) or (decision < 0).any() or (decision >= n_tokens).any():
                raise MechdiffError("decision must give one in-range position per prompt")
        total = int(n_tokens.sum())
        if tok_ids is not None:
            tok_ids = np.asarray(tok_ids)
            if tok_ids.shape != (total,):
                raise MechdiffError(f"tok_ids must be flat with sum(n_tokens)={total} entries, got {tok_ids.shape}")
        user = _jsonable(dict(attrs or {}), "store attrs")
        ds_names = sorted({str(x) for x in datasets})
        sp_names = sorted({str(x) for x in splits})
        ds_codes = np.searchsorted(ds_names, np.asarray([str(x) for x in datasets])).astype(np.int16)
        sp_codes = np.searchsorted(sp_names, np.asarray([str(x) for x in splits])).astype(np.int8)
        fingerprint = _jsonable({
            "model": user.get("model"), "sites": sites, "views": vw, "dtype": dtype,
            "prompt_ids": _hash_arrays(prompt_ids.astype(np.int64), n_tokens.astype(np.int64)),
            "labels": _hash_arrays(ds_codes, sp_codes) + ":" + ",".join(ds_names) + "|" + ",".join(sp_names),
            "tok_ids": None if tok_ids is None else _hash_arrays(tok_ids.astype(np.int64)),
            "vocab_size": vocab_size, "shard_rows": shard_rows, "tok_shard_rows": tok_shard_rows,
            "compressor": compressor, "params": user,
        }, "store params")

        if p.exists():
            if not _is_store_dir(p):
                if p.is_dir() and not any(p.iterdir()):
                    shutil.rmtree(p)
                else:
                    raise MechdiffError(f"{p} exists and is not an activation store: choose another path")
            else:
                old = dict(zarr.open_group(str(p), mode="r").attrs)
                if resume and old.get("initialised"):
                    prev = old.get("fingerprint", {})
                    diff = [k for k in fingerprint if prev.get(k) != fingerprint[k]]
                    if diff:
                        raise MechdiffError(
                            f"store {p} was made with different {', '.join(diff)}: delete it or use a new path"
                        )
                    _remove_partials(p)
                    return cls(p, mode="r+")
                shutil.rmtree(p)

        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(n_tokens[:-1], out=offsets[1:])
        chunk_rows = _chunk_for(shard_rows, 128)
        tok_chunk = _chunk_for(tok_shard_rows, 1024)
        layout = {
            "n": n, "n_tokens_total": total, "sites": sites, "views": vw, "shard_rows": shard_rows,
            "chunk_rows": chunk_rows, "tok_shard_rows": tok_shard_rows, "tok_chunk_rows": tok_chunk,
            "compressor": compressor, "vocab_size": vocab_size, "datasets": ds_names, "splits": sp_names,
            "has_decision": decision is not None, "has_tokens": has_tokens, "has_tok_ids": tok_ids is not None,
        }
        root = zarr.open_group(str(p), mode="w")
        root.update_attributes({"mechdiff_store": FORMAT, "initialised": False})

        def idx(name: str, arr: np.ndarray) -> None:
            m = max(1, len(arr))
            ch = min(_IDX_CHUNK, m)
            sh = max(ch, min(_IDX_SHARD, math.ceil(m / ch) * ch))
            z = root.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(ch,), shards=(sh,),
                                  compressors=None, fill_value=0)
            z[:] = arr

        idx("prompt_id", prompt_ids.astype(np.int64))
        idx("n_tokens", n_tokens.astype(np.int32))
        idx("tok_offset", offsets)
        idx("dataset", ds_codes)
        idx("split", sp_codes)
        if decision is not None:
            idx("decision", decision.astype(np.int32))
        codecs = _codecs(compressor)
        if has_tokens:
            ch = min(_IDX_CHUNK, total)
            sh = max(ch, min(_IDX_SHARD, math.ceil(total / ch) * ch))
            names = ["tok_prompt", "tok_pos"] + (["tok_id"] if tok_ids is not None else [])
            zs = {nm: root.create_array(nm, shape=(total,), dtype=np.int64 if nm == "tok_prompt" else np.int32,
                                        chunks=(ch,), shards=(sh,), compressors=None, fill_value=0)
                  for nm in names}
            # written shard by shard so memory stays bounded by one shard
            for t0 in range(0, total, sh):
                t1 = min(total, t0 + sh)
                r0 = int(np.searchsorted(offsets, t0, side="right") - 1)
                r1 = int(np.searchsorted(offsets, t1, side="left"))
                pr = np.repeat(np.arange(r0, r1), n_tokens[r0:r1])
                start = offsets[r0]
                sl = slice(t0 - start, t1 - start)
                zs["tok_prompt"][t0:t1] = prompt_ids[pr][sl].astype(np.int64)
                pos = np.arange(len(pr)) - (offsets[pr] - start)
                zs["tok_pos"][t0:t1] = pos[sl].astype(np.int32)
                if tok_ids is not None:
                    zs["tok_id"][t0:t1] = tok_ids[t0:t1].astype(np.int32)
        if vocab_size:
            root.create_array("logits", shape=(n, int(vocab_size)), dtype="float16",
                              chunks=(chunk_rows, int(vocab_size)), shards=(shard_rows, int(vocab_size)),
                              compressors=codecs, fill_value=0)
        def make_site(s: str) -> None:
            d = sites[s]
            g = root.create_group(s)
            for v in vw[s]:
                if v == "tokens":
                    g.create_array(v, shape=(total, d), dtype=dtype, chunks=(tok_chunk, d),
                                   shards=(tok_shard_rows, d), compressors=codecs, fill_value=0)
                else:
                    g.create_array(v, shape=(n, d), dtype=dtype, chunks=(chunk_rows, d), shards=(shard_rows, d),
                                   compressors=codecs, fill_value=0)

        _parallel(make_site, list(sites))
        root.update_attributes({
            "model": user.get("model"), "dtype": dtype, "params": user, "layout": layout,
            "fingerprint": fingerprint, "rows_done": 0, "tok_done": 0, "complete": False, "stats": {},
            "initialised": True,
        })
        return cls(p, mode="r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ActStore:
        """Open an existing store for reading ('r') or appending ('r+')."""
        return cls(path, mode)

    # ----------------------------------------------------------------------------------- metadata

    @property
    def sites(self) -> list[str]:
        """Site names in the store, e.g. ['L12.resid_post']."""
        return list(self._lay["sites"])

    @property
    def n(self) -> int:
        """Number of prompts (rows of the per-prompt views)."""
        return int(self._lay["n"])

    @property
    def n_tokens_total(self) -> int:
        """Number of token rows (rows of the 'tokens' views)."""
        return int(self._lay["n_tokens_total"])

    @property
    def rows_done(self) -> int:
        """Prompts committed so far."""
        return int(self._root.attrs["rows_done"])

    @property
    def complete(self) -> bool:
        """Whether every prompt has been written."""
        return bool(self._root.attrs.get("complete", False))

    @property
    def attrs(self) -> dict:
        """Root attributes (model, dtype, params, layout, rows_done, complete), without the running stats."""
        a = dict(self._root.attrs)
        a.pop("stats", None)
        return json.loads(json.dumps(a))

    @property
    def vocab_size(self) -> int | None:
        """Width of the stored decision-token logits, or None if no logits were stored."""
        return self._lay.get("vocab_size")

    def views(self, site: str) -> list[str]:
        """Views stored for a site."""
        self._check_site(site)
        return list(self._lay["views"][site])

    def width(self, site: str) -> int:
        """Activation width d of a site."""
        self._check_site(site)
        return int(self._lay["sites"][site])

    def _check_site(self, site: str) -> None:
        if site not in self._lay["sites"]:
            raise MechdiffError(f"site {site!r} not in store {self.path}: it has {', '.join(self.sites)}")

    def array(self, site: str | None, view: str) -> zarr.Array:
        """The underlying zarr array of a view (site None or 'logits' for the logits)."""
        if site is None or site == "logits":
            if not self.vocab_size:
                raise MechdiffError(f"store {self.path} has no logits: extract with store_logits enabled")
            key = "logits"
        else:
            self._check_site(site)
            if view not in self._lay["views"][site]:
                raise MechdiffError(f"site {site} has no view {view!r} in {self.path}: it has "
                                    f"{', '.join(self.views(site))}")
            key = f"{site}/{view}"
        try:
            return self._root[key]
        except KeyError as exc:  # the layout names it, but its zarr.json is gone
            raise MechdiffError(f"store {self.path}: the array {key} is missing or its metadata (zarr.json) is gone: "
                                "restore it with `dvc checkout`, or delete the store and rerun its extract stage"
                                ) from exc

    def _check_shards(self, z: zarr.Array) -> None:
        """Every shard file of an activation or logits array is on disk (checked once per array and process).

        The writer stores every shard, all-zero ones too (`write_empty_chunks`), so a complete store has them all;
        zarr would read a missing one as the fill value, zeros, and a stage would go on with wrong numbers."""
        if z.path in self._shards_ok:
            return
        grid = z.shards or z.chunks
        for coords in itertools.product(*(range(math.ceil(n / g)) for n, g in zip(z.shape, grid, strict=True))):
            key = z.metadata.encode_chunk_key(coords)
            if not (self.path / z.path / key).is_file():
                raise MechdiffError(f"store {self.path}: the shard {z.path}/{key} is missing (it would read as zeros): "
                                    "restore it with `dvc checkout`, or delete the store and rerun its extract stage")
        self._shards_ok.add(z.path)

    def _check_complete(self) -> None:
        if not self.complete:
            raise MechdiffError(
                f"store {self.path} is incomplete ({self.rows_done}/{self.n} prompts): rerun extraction to finish it"
            )

    # ----------------------------------------------------------------------------------- reading

    def _n_rows(self, site: str, view: str) -> int:
        self.array(site, view)
        self._check_complete()
        return self.n_tokens_total if view == "tokens" else self.n

    def _block_rows(self, site: str, view: str) -> int:
        return int(self._lay["tok_chunk_rows"] if view == "tokens" else self._lay["chunk_rows"])

    @contextlib.contextmanager
    def _damaged(self, what: str) -> Iterator[None]:
        """Chunk reads: a chunk that fails to decode (a checksum mismatch, a truncated or corrupt file) is a
        one-line error naming the store and the array, not a codec traceback."""
        try:
            yield
        except MechdiffError:
            raise
        except (ValueError, RuntimeError, OSError) as exc:
            raise MechdiffError(f"store {self.path}: a chunk of {what} is damaged ({type(exc).__name__}: "
                                f"{first_line(exc)}): "
                                "restore it with `dvc checkout`, or delete the store and rerun its extract stage"
                                ) from exc

    def _read_range(self, site: str, view: str, a: int, b: int) -> np.ndarray:
        z = self.array(site, view)
        self._check_shards(z)
        with self._damaged(f"{site}/{view}"):
            return np.asarray(z[a:b], dtype=np.float32)

    def read(self, site: str | None, view: str = "last", rows: np.ndarray | None = None) -> np.ndarray:
        """Rows of a view as float32 (all rows when `rows` is None); site None or 'logits' reads the logits."""
        z = self.array(site, view)
        self._check_complete()
        self._check_shards(z)
        what = "logits" if site is None or site == "logits" else f"{site}/{view}"
        if rows is None:
            with self._damaged(what):
                return np.asarray(z[:], dtype=np.float32)
        r = _as_rows(rows, z.shape[0], f"read({site}, {view})")
        if r.size == 0:
            return np.zeros((0, z.shape[1]), dtype=np.float32)
        u, inv = np.unique(r, return_inverse=True)
        with self._damaged(what):
            if len(u) == u[-1] - u[0] + 1:  # contiguous: one slice read
                x = z[int(u[0]) : int(u[-1]) + 1]
            else:
                x = z.get_orthogonal_selection((u, slice(None)))
        return np.asarray(x, dtype=np.float32)[inv]

    def read_logits(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Decision-token logits (N, V) as float32."""
        return self.read(None, "logits", rows)

    def index(self, name: str) -> np.ndarray:
        """An index array: prompt_id, dataset, split (as str), n_tokens, tok_offset, decision, tok_prompt, tok_pos, tok_id."""
        if name not in INDEX_NAMES:
            raise MechdiffError(f"unknown index {name!r}: use one of {', '.join(INDEX_NAMES)}")
        if name not in self._cache:
            if name not in self._root:
                raise MechdiffError(f"store {self.path} has no {name!r} index (no tokens view, decision or token ids stored)")
            with self._damaged(f"the {name} index"):
                a = np.asarray(self._root[name][:])
            if name in ("dataset", "split"):
                a = np.asarray(self._lay[name + "s"], dtype=str)[a]
            self._cache[name] = a
        return self._cache[name].copy()

    def rows_where(self, *, split: str | None = None, dataset: str | None = None) -> np.ndarray:
        """Row indices of prompts with the given split and/or dataset (empty if none match)."""
        m = np.ones(self.n, dtype=bool)
        if split is not None:
            m &= self.index("split") == split
        if dataset is not None:
            m &= self.index("dataset") == dataset
        return np.flatnonzero(m)

    @property
    def shared_prefix(self) -> int:
        """How many leading tokens every prompt of the store has in common (`model.tokens.shared_prefix`: at most
        each decision position and length - 1); 0 for a store without token ids or decision positions."""
        if "_shared_prefix" not in self._cache:
            from mechdiff.model.tokens import shared_prefix

            p = 0
            if self.n and all(k in self._root for k in ("tok_id", "tok_offset", "decision")):
                ids, off, nt = self.index("tok_id"), self.index("tok_offset"), self.index("n_tokens")
                p = shared_prefix([ids[o : o + n].tolist() for o, n in zip(off, nt)], self.index("decision").tolist())
            self._cache["_shared_prefix"] = p
        return int(self._cache["_shared_prefix"])

    def token_rows(self, rows: np.ndarray) -> np.ndarray:
        """Token-row indices (into 'tokens' views) of the given prompt rows, in row order."""
        r = _as_rows(rows, self.n, "token_rows")
        off, nt = self.index("tok_offset"), self.index("n_tokens")
        if r.size == 0:
            return np.zeros(0, dtype=np.int64)
        lens = nt[r].astype(np.int64)
        starts = np.repeat(off[r] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        return starts + np.arange(lens.sum())

    def stats(self, site: str, view: str) -> tuple[np.ndarray, np.ndarray]:
        """Running per-dimension mean and std (population, float64) of a view over all committed rows."""
        self.array(site, view)
        st = self._root.attrs.get("stats", {}).get(site, {}).get(view)
        if not st or not st["n"]:
            raise MechdiffError(f"no statistics for {site}/{view} in {self.path}: the store has no rows written yet")
        w = _Welford(self.width(site), st)
        return w.mean.copy(), w.std()

    def writer(self, rows: tuple[int, int] | None = None, world: int | None = None) -> StoreWriter:
        """A writer that continues from `rows_done` (prompts must be appended in store order); with `rows`
        (lo, hi) from `rank_slice(rank, world)`, one rank's writer of that slice, resuming from its own
        committed state."""
        if self.mode != "r+":
            raise MechdiffError(f"store {self.path} is open read-only: open it with mode='r+' to write")
        return StoreWriter(self, rows, world)

    def rank_slice(self, rank: int, world: int) -> tuple[int, int]:
        """Rows (lo, hi) of rank `rank` of `world`: contiguous runs of whole shards, as even as shards allow."""
        if not 0 <= rank < world:
            raise MechdiffError(f"rank {rank} out of range for {world} processes")
        sh = int(self._lay["shard_rows"])
        n_sh = math.ceil(self.n / sh)
        a, b = rank * n_sh // world, (rank + 1) * n_sh // world
        return min(self.n, a * sh), min(self.n, b * sh)

    def rank_states(self) -> dict[int, dict]:
        """Committed per-rank states of a store being written by several processes, keyed by their first row."""
        d = self.path / RANK_DIR
        if not d.is_dir():
            return {}
        out = {}
        for f in d.glob("*.json"):
            st = json.loads(f.read_text())
            out[int(st["lo"])] = st
        return out

    def finalize_ranks(self, world: int) -> None:
        """Once every rank of `world` has finished its slice: write the kept token pieces, merge the running
        statistics in row order and mark the store complete (idempotent; raises if a slice is unfinished)."""
        if self.complete:
            return
        states = self.rank_states()
        slices = [self.rank_slice(r, world) for r in range(world)]
        for lo, hi in slices:
            if lo == hi:
                continue
            st = states.get(lo)
            if st is None or st.get("hi") != hi or not st.get("complete"):
                done = "none" if st is None else f"{st.get('rows_done', lo) - lo}/{hi - lo}"
                raise MechdiffError(f"store {self.path}: the rank writing rows {lo}..{hi} has not finished "
                                    f"({done} rows): rerun the extraction to resume it")
        lay = self._lay
        merged = {(site, v): _Welford(int(lay["sites"][site])) for site, vs in lay["views"].items() for v in vs}
        for lo, hi in slices:
            if lo == hi:
                continue
            for site, per in states[lo]["stats"].items():
                for v, state in per.items():
                    w = _Welford(int(lay["sites"][site]), state)
                    merged[(site, v)].merge(w.n, w.mean, w.m2)
        pieces = sorted((self.path / RANK_DIR).glob("tok-*.npy"))
        for f in pieces:  # tok-<site>-<a>-<b>.npy: token rows [a, b) of a shard two ranks share
            site, a, b = f.stem[4:].rsplit("-", 2)
            # every shard is stored, all-zero ones too, as the writer does (`_check_shards` relies on it)
            self._root[f"{site}/tokens"].with_config({"write_empty_chunks": True})[int(a) : int(b)] = np.load(f)
        nested: dict[str, dict[str, Any]] = {}
        for (site, v), w in merged.items():
            nested.setdefault(site, {})[v] = w.state()
        self._root.update_attributes({"rows_done": self.n, "tok_done": self.n_tokens_total, "stats": nested,
                                      "complete": True})
        shutil.rmtree(self.path / RANK_DIR, ignore_errors=True)

    def __repr__(self) -> str:
        return f"ActStore({str(self.path)!r}, n={self.n}, sites={self.sites}, complete={self.complete})"


# --------------------------------------------------------------------------------------------- writing


class StoreWriter:
    """Streams prompt rows into a store in store order, flushing shard-aligned blocks and committing atomically.

    Memory is bounded by one shard of prompt rows per (site, view) and one shard of token rows per site.
    Use as a context manager: a clean exit calls `close()`; an exception leaves only committed rows.
    """

    def __init__(self, store: ActStore, rows: tuple[int, int] | None = None, world: int | None = None) -> None:
        self.store = store
        self.world = world
        lay = store._lay
        self._shard = int(lay["shard_rows"])
        self._tshard = int(lay["tok_shard_rows"])
        self._dtype = np.dtype(store._root.attrs["dtype"])
        self._offsets = store.index("tok_offset")
        self._ntok = store.index("n_tokens").astype(np.int64)
        a = dict(store._root.attrs)
        self._rank_file: Path | None = None
        if rows is None:
            self.lo, self._n = 0, int(lay["n"])
        else:
            self.lo, self._n = int(rows[0]), int(rows[1])
            if self.lo % self._shard or not 0 <= self.lo <= self._n <= store.n:
                raise MechdiffError(f"writer rows {rows}: a slice must start on a shard boundary "
                                    f"(multiple of {self._shard}) and lie in 0..{store.n}")
            if self.lo == self._n:
                raise MechdiffError(f"writer rows {rows}: an empty slice has nothing to write")
            if int(a["rows_done"]) or a.get("complete"):
                raise MechdiffError(f"store {store.path} was written by one process ({a['rows_done']} rows): "
                                    "finish it with one process (nproc 1) or delete it")
            self._rank_file = store.path / RANK_DIR / f"{self.lo}.json"
            prev = json.loads(self._rank_file.read_text()) if self._rank_file.is_file() else None
            if prev is not None and int(prev["hi"]) != self._n:
                raise MechdiffError(f"store {store.path} is being written by another number of processes "
                                    f"(a slice {self.lo}..{prev['hi']}): rerun with the same nproc or delete it")
            t_lo = int(self._offsets[self.lo]) if self.lo < store.n else store.n_tokens_total
            a = prev or {"rows_done": self.lo, "tok_done": t_lo, "stats": {}}
            self._t_lo = t_lo
            self._t_hi = int(self._offsets[self._n]) if self._n < store.n else store.n_tokens_total
            (store.path / RANK_DIR).mkdir(exist_ok=True)
            for f in (store.path / RANK_DIR).glob("tok-*.npy"):  # uncommitted pieces of this slice
                if self._t_lo <= int(f.stem.rsplit("-", 2)[1]) < self._t_hi and \
                        int(f.stem.rsplit("-", 2)[1]) >= int(a["tok_done"]):
                    f.unlink()
        self.start = int(a["rows_done"])
        self.next_row = self.start
        self._block_start = self.start
        self._row_keys = [(s, v) for s, vs in lay["views"].items() for v in vs if v in ROW_VIEWS]
        self._tok_sites = [s for s, vs in lay["views"].items() if "tokens" in vs]
        self._width = {s: int(d) for s, d in lay["sites"].items()}
        self._vocab = lay.get("vocab_size")
        keys = [*self._row_keys, *((s, "tokens") for s in self._tok_sites)]
        keys += [("logits", "logits")] if self._vocab else []
        # write_empty_chunks: activations are never all zero, so zarr need not compare every chunk with the fill
        # value before writing it (a fifth of the writer's time)
        self._arrays = dict(zip(keys, _parallel(
            lambda k: store._root[k[0] if k[0] == "logits" else "/".join(k)].with_config({"write_empty_chunks": True}),
            keys)))
        self._buf = {k: np.empty((self._shard, self._width[k[0]]), dtype=self._dtype) for k in self._row_keys}
        self._lbuf = np.empty((self._shard, int(self._vocab)), dtype=np.float16) if self._vocab else None
        self._tbuf = {s: np.empty((self._tshard, self._width[s]), dtype=self._dtype) for s in self._tok_sites}
        self._tstart = int(a["tok_done"])
        self._tfill = 0
        committed = a.get("stats", {})
        self._stats = {
            (s, v): _Welford(self._width[s], committed.get(s, {}).get(v))
            for s, vs in lay["views"].items() for v in vs
        }
        self._pending_tok = {s: _Welford(self._width[s]) for s in self._tok_sites}
        self.max_buffered_rows = 0
        self.max_buffered_tokens = 0
        self.commits = 0

    @property
    def vocab_size(self) -> int | None:
        """Width of the logits this writer expects per prompt, or None when the store keeps no logits."""
        return self._vocab

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the writer's buffers (constant: fixed by shard sizes, not by the corpus)."""
        b = sum(x.nbytes for x in self._buf.values()) + sum(x.nbytes for x in self._tbuf.values())
        return b + (self._lbuf.nbytes if self._lbuf is not None else 0)

    @property
    def end(self) -> int:
        """One past the last row this writer writes (the store's size, or its slice's end)."""
        return self._n

    @property
    def done(self) -> bool:
        """Whether every prompt has been appended."""
        return self.next_row >= self._n

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def append(
        self, views: Mapping[str, Mapping[str, np.ndarray]], tokens: Mapping[str, np.ndarray] | None = None,
        logits: np.ndarray | None = None, *, n: int | None = None,
    ) -> None:
        """Append the next m prompts: views[site][view] (m, d) for 'last'/'mean', tokens[site] (sum of their
        lengths, d) for 'tokens', logits (m, V) when the store has logits; `n` = m when no row view is kept."""
        m = n
        for s, v in self._row_keys:
            try:
                x = views[s][v]
            except KeyError:
                raise MechdiffError(f"append: missing {s}/{v}: every stored site and view must be given") from None
            if x.ndim != 2 or x.shape[1] != self._width[s] or (m is not None and x.shape[0] != m):
                raise MechdiffError(f"append: {s}/{v} has shape {x.shape}, expected (m, {self._width[s]}) for all views")
            m = x.shape[0]
        if m is None:
            raise MechdiffError("append: this store keeps only 'tokens' views: pass n= (the number of prompts)")
        if self._vocab:
            if logits is None or logits.shape != (m, self._vocab):
                raise MechdiffError(f"append: the store keeps logits: pass logits of shape ({m}, {self._vocab})")
        if self.next_row + m > self._n:
            raise MechdiffError(f"append: {self.next_row + m} rows exceed the store's {self._n} prompts")
        t0 = int(self._offsets[self.next_row]) if m else 0
        tn = int(self._ntok[self.next_row : self.next_row + m].sum())
        for s in self._tok_sites:
            if tokens is None or s not in tokens or tokens[s].shape != (tn, self._width[s]):
                got = None if tokens is None or s not in tokens else tokens[s].shape
                raise MechdiffError(f"append: tokens for {s} must have shape ({tn}, {self._width[s]}), got {got}")
        i = 0
        while i < m:
            fill = self.next_row - self._block_start
            take = min(m - i, self._shard - fill)
            for k in self._row_keys:
                self._buf[k][fill : fill + take] = views[k[0]][k[1]][i : i + take]
            if self._lbuf is not None:
                self._lbuf[fill : fill + take] = logits[i : i + take]
            if self._tok_sites:
                a = int(self._offsets[self.next_row]) - t0
                b = a + int(self._ntok[self.next_row : self.next_row + take].sum())
                self._feed_tokens({s: tokens[s][a:b] for s in self._tok_sites})
            self.next_row += take
            i += take
            self.max_buffered_rows = max(self.max_buffered_rows, self.next_row - self._block_start)
            if self.next_row - self._block_start == self._shard:
                self._commit()

    def _feed_tokens(self, toks: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(toks.values())))
        i = 0
        while i < n:
            boundary = (self._tstart // self._tshard + 1) * self._tshard
            cap = boundary - self._tstart
            take = min(n - i, cap - self._tfill)
            for s in self._tok_sites:
                self._tbuf[s][self._tfill : self._tfill + take] = toks[s][i : i + take]
            self._tfill += take
            i += take
            self.max_buffered_tokens = max(self.max_buffered_tokens, self._tfill)
            if self._tfill == cap:
                self._write_tokens()

    def _write_tokens(self) -> None:
        if not self._tfill:
            return
        a, b = self._tstart, self._tstart + self._tfill

        shared = self._shared_token_shard(a)

        def put(s: str) -> tuple[int, np.ndarray, np.ndarray]:
            x = self._tbuf[s][: self._tfill]
            if shared:  # another rank writes the rest of this shard: keep the piece for finalize_ranks
                tmp = self.store.path / RANK_DIR / f".tok-{s}-{a}-{b}.npy.partial"
                with open(tmp, "wb") as fh:
                    np.save(fh, x)
                os.replace(tmp, tmp.with_name(f"tok-{s}-{a}-{b}.npy"))
            else:
                self._arrays[(s, "tokens")][a:b] = x
            return _block_stats(x)

        for s, st in zip(self._tok_sites, _parallel(put, self._tok_sites)):
            self._pending_tok[s].merge(*st)
        self._tstart, self._tfill = b, 0

    def _shared_token_shard(self, t: int) -> bool:
        """Whether the token shard holding row t is also written by another rank's slice."""
        if self._rank_file is None:
            return False
        s0 = t // self._tshard * self._tshard
        s1 = min(s0 + self._tshard, self.store.n_tokens_total)
        return s0 < self._t_lo or s1 > self._t_hi

    def _commit(self) -> None:
        a, b = self._block_start, self.next_row
        if b == a:
            return
        k = b - a
        new = {key: w.copy() for key, w in self._stats.items()}

        def put(key: tuple[str, str]) -> tuple[int, np.ndarray, np.ndarray]:
            x = self._buf[key][:k]
            self._arrays[key][a:b] = x
            return _block_stats(x)

        for key, st in zip(self._row_keys, _parallel(put, self._row_keys)):
            new[key].merge(*st)
        if self._lbuf is not None:
            self._arrays[("logits", "logits")][a:b] = self._lbuf[:k]
        self._write_tokens()
        for s in self._tok_sites:
            w = self._pending_tok[s]
            new[(s, "tokens")].merge(w.n, w.mean, w.m2)
        tok_done = int(self._offsets[b - 1] + self._ntok[b - 1])
        if self._tok_sites and tok_done != self._tstart:
            raise MechdiffError("internal: token rows out of step with prompt rows; delete the store and rerun")
        self._commit_state(b, tok_done, new, b >= self._n)
        self._stats = new
        self._pending_tok = {s: _Welford(self._width[s]) for s in self._tok_sites}
        self._block_start = b
        self.commits += 1

    def _commit_state(self, rows_done: int, tok_done: int, stats: dict[tuple[str, str], _Welford],
                      complete: bool = False) -> None:
        """One atomic metadata write: rows_done, tok_done, the running stats (and completion) move together."""
        nested: dict[str, dict[str, Any]] = {}
        for (s, v), w in stats.items():
            nested.setdefault(s, {})[v] = w.state()
        if self._rank_file is not None:
            tmp = self._rank_file.with_name(f".{self._rank_file.name}.partial")
            tmp.write_text(json.dumps({"lo": self.lo, "hi": self._n, "world": self.world, "rows_done": rows_done,
                                       "tok_done": tok_done, "stats": nested, "complete": complete}))
            os.replace(tmp, self._rank_file)
            return
        self.store._root.update_attributes(
            {"rows_done": rows_done, "tok_done": tok_done, "stats": nested, "complete": complete}
        )

    def close(self) -> None:
        """Commit the last partial block; the store (a rank's slice) is marked complete when every prompt is written."""
        self._commit()


# --------------------------------------------------------------------------------------------- delta


def check_pair_stores(base: ActStore, tuned: ActStore, *, one_vocab: bool) -> None:
    """Raise MechdiffError unless two complete stores hold the same prompts: the same prompt ids in the same order,
    and, where the two models share one vocabulary, token counts that differ by one constant over the prompts
    (0 under one chat template, the length difference of two templates otherwise) wherever neither count is its
    store's longest (a prompt cut at `data.max_len`). A prompt text edited after one store was extracted (a
    `dvc repro -s` of the other extract stage alone) changes its count in that store only. Incomplete stores
    are left to the readers, which say so."""
    if not (base.complete and tuned.complete):
        return
    if base.n != tuned.n or not np.array_equal(base.index("prompt_id"), tuned.index("prompt_id")):
        raise MechdiffError(f"stores {base.path} and {tuned.path} hold different prompts: extract both from the same "
                            "prompts (dvc repro)")
    if not one_vocab:
        return
    nb, nt = base.index("n_tokens").astype(np.int64), tuned.index("n_tokens").astype(np.int64)
    d = (nt - nb)[(nb < nb.max()) & (nt < nt.max())]
    if d.size == 0:
        return
    off = int(d.size - np.unique(d, return_counts=True)[1].max())  # prompts off the commonest difference
    if off:
        raise MechdiffError(f"stores {base.path} and {tuned.path} tokenised {off} of {base.n} prompts to other lengths "
                            "although the two models share one vocabulary: one store is older than the prompts (a text "
                            "changed since it was extracted): run dvc repro, which extracts both again")


class DeltaView(_Reader):
    """Lazy tuned - base view over two stores of the same prompts; same reading API as ActStore."""

    def __init__(self, base: ActStore, tuned: ActStore) -> None:
        if not isinstance(base, ActStore) or not isinstance(tuned, ActStore):
            raise MechdiffError("DeltaView needs two ActStore objects (base, tuned)")
        for st in (base, tuned):
            st._check_complete()
        check_pair_stores(base, tuned, one_vocab=False)
        self.base, self.tuned = base, tuned
        self._sites = [s for s in base.sites if s in tuned.sites]
        if not self._sites:
            raise MechdiffError(f"stores {base.path} and {tuned.path} share no site: extract the same sites from both")
        for s in self._sites:
            if base.width(s) != tuned.width(s):
                raise MechdiffError(f"site {s}: widths differ ({base.width(s)} vs {tuned.width(s)}): not the same architecture")
        self._tok_ok = np.array_equal(base.index("n_tokens"), tuned.index("n_tokens"))
        self._stats: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def sites(self) -> list[str]:
        """Sites present in both stores."""
        return list(self._sites)

    @property
    def n(self) -> int:
        """Number of prompts."""
        return self.base.n

    @property
    def complete(self) -> bool:
        """Always True: both stores were checked complete."""
        return True

    @property
    def attrs(self) -> dict:
        """A small description of the delta (which stores it subtracts)."""
        return {"model": f"delta({self.tuned.attrs.get('model')} - {self.base.attrs.get('model')})",
                "base": str(self.base.path), "tuned": str(self.tuned.path)}

    def views(self, site: str) -> list[str]:
        """Views present in both stores for a site (tokens only when both tokenised the prompts alike)."""
        self._check(site)
        vs = [v for v in self.base.views(site) if v in self.tuned.views(site)]
        return [v for v in vs if v != "tokens" or self._tok_ok]

    def width(self, site: str) -> int:
        """Activation width d of a site."""
        self._check(site)
        return self.base.width(site)

    def _check(self, site: str | None, view: str | None = None) -> None:
        if site is None or site == "logits":
            if self.base.vocab_size != self.tuned.vocab_size or not self.base.vocab_size:
                raise MechdiffError("logits delta needs both stores to keep logits of the same vocabulary size")
            return
        if site not in self._sites:
            raise MechdiffError(f"site {site!r} is not in both stores: shared sites are {', '.join(self._sites)}")
        if view is not None and view not in self.views(site):
            if view == "tokens" and not self._tok_ok:
                raise MechdiffError(f"tokens delta at {site}: the two stores tokenised prompts differently")
            raise MechdiffError(f"view {view!r} of {site} is not in both stores")

    def index(self, name: str) -> np.ndarray:
        """Index arrays, from the base store."""
        return self.base.index(name)

    def rows_where(self, *, split: str | None = None, dataset: str | None = None) -> np.ndarray:
        """Row indices of prompts with the given split and/or dataset."""
        return self.base.rows_where(split=split, dataset=dataset)

    def token_rows(self, rows: np.ndarray) -> np.ndarray:
        """Token-row indices of the given prompt rows."""
        return self.base.token_rows(rows)

    def _n_rows(self, site: str, view: str) -> int:
        self._check(site, view)
        return self.base._n_rows(site, view)

    def _block_rows(self, site: str, view: str) -> int:
        return self.base._block_rows(site, view)

    def _read_range(self, site: str, view: str, a: int, b: int) -> np.ndarray:
        return self.tuned._read_range(site, view, a, b) - self.base._read_range(site, view, a, b)

    def read(self, site: str | None, view: str = "last", rows: np.ndarray | None = None) -> np.ndarray:
        """tuned - base rows of a view, float32."""
        self._check(site, None if site in (None, "logits") else view)
        return self.tuned.read(site, view, rows) - self.base.read(site, view, rows)

    def read_logits(self, rows: np.ndarray | None = None) -> np.ndarray:
        """tuned - base decision-token logits."""
        return self.read(None, "logits", rows)

    def stats(self, site: str, view: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std of the delta, computed in one streaming pass (then cached)."""
        key = (site, view)
        if key not in self._stats:
            w = _Welford(self.width(site))
            total = self._n_rows(site, view)
            blk = max(self._block_rows(site, view), 4096)
            for a in range(0, total, blk):
                w.add(self._read_range(site, view, a, min(total, a + blk)))
            self._stats[key] = (w.mean, w.std())
        m, s = self._stats[key]
        return m.copy(), s.copy()
