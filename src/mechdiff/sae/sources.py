"""Training inputs for each SAE source: base, tuned, delta (tuned - base) and crosscoder ([base, tuned])."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mechdiff.data.store import ActStore, DeltaView
from mechdiff.errors import MechdiffError
from mechdiff.model.tokens import Encoded

SOURCES = ("base", "tuned", "delta", "crosscoder")


def init_seed(seed: int, source: str) -> int:
    """Initialisation seed of one source's SAE: distinct per source, so SAEs never share a starting dictionary.

    Matching features across SAEs by decoder cosine (delta Type C, the gates) would otherwise pair features
    that merely kept their common initialisation. The base SAE keeps `seed` itself.
    """
    if source not in SOURCES:
        raise MechdiffError(f"unknown SAE source {source!r}: choose one of {', '.join(SOURCES)}")
    return int(seed) + 7919 * SOURCES.index(source)


def tokens_paired(base: ActStore | Encoded, tuned: ActStore | Encoded, prompt_rows: np.ndarray | None = None) -> bool:
    """The one base/tuned token-pairing check: do both sides hold the same tokens for the prompt rows (all if None)?

    Two activation stores: same prompt count and, for the rows, the same lengths and stored token ids (a store
    without token ids, i.e. without a tokens view, falls back to the hash of every prompt's ids that `extract`
    records, params.token_ids_sha). Two encodings (`Encoded`): the same ids and decision positions.
    """
    if isinstance(base, Encoded) and isinstance(tuned, Encoded):
        rows = range(len(base)) if prompt_rows is None else np.asarray(prompt_rows, dtype=np.int64).tolist()
        return len(base) == len(tuned) and all(base.ids[r] == tuned.ids[r] and base.decision[r] == tuned.decision[r]
                                               for r in rows)
    if not (isinstance(base, ActStore) and isinstance(tuned, ActStore)):
        raise MechdiffError(f"tokens_paired compares two ActStores or two Encoded, got {type(base).__name__} and "
                            f"{type(tuned).__name__}")
    if base.n != tuned.n:
        return False
    rows = np.arange(base.n) if prompt_rows is None else np.asarray(prompt_rows, dtype=np.int64)
    if not np.array_equal(base.index("n_tokens")[rows], tuned.index("n_tokens")[rows]):
        return False
    try:
        ids_b, ids_t = base.index("tok_id"), tuned.index("tok_id")
    except MechdiffError:
        sha = base.attrs.get("params", {}).get("token_ids_sha")
        return sha is not None and sha == tuned.attrs.get("params", {}).get("token_ids_sha")
    tr = base.token_rows(rows)
    return bool(np.array_equal(ids_b[tr], ids_t[tr]))


def check_paired(base: ActStore, tuned: ActStore, view: str, prompt_rows: np.ndarray | None = None, *,
                 what: str = "token-level delta/crosscoder rows") -> None:
    """Raise unless base and tuned rows of `view` pair up for the prompt rows (all if None): anything that sets a
    base row beside a tuned row (delta, crosscoder, base-vs-tuned statistics) needs it. Per-prompt views always
    pair; 'tokens' pairs only when both models hold the same tokens (`tokens_paired`)."""
    if view == "tokens" and not tokens_paired(base, tuned, prompt_rows):
        raise MechdiffError(f"the two models' prompts do not hold the same token ids position by position (their "
                            f"tokenizers split or number the tokens differently), so {what} do not pair up: "
                            "set sae.view to last or mean")


def check_finite(source: str, base: ActStore, tuned: ActStore, site: str, view: str, rows: np.ndarray) -> None:
    """Raise unless every row the SAE of `source` reads (`rows` = `rows_of`) is finite (one streamed pass, before any
    output is touched), and, for the delta SAE, unless the two models' activations differ at the site (their stores'
    running statistics are not all equal: equal ones mean a delta of zeros, with nothing to learn)."""
    if source == "delta":
        (mb, sb), (mt, st_) = base.stats(site, view), tuned.stats(site, view)
        if np.array_equal(mb, mt) and np.array_equal(sb, st_):
            raise MechdiffError(f"the tuned model's activations at {site}/{view} equal the base's (the same mean and "
                                "spread over every prompt), so the delta SAE has nothing to learn: pair.tuned is the "
                                "base itself, or the tuning left this layer unchanged (sae.layers); drop delta from "
                                "sae.sources otherwise")
    stores = {"base": [base], "tuned": [tuned]}.get(source, [base, tuned])
    for st in stores:
        for x in st.iter_batches(site, view, 1 << 16, rows=rows, shuffle=False):
            if not np.isfinite(x).all():
                raise MechdiffError(f"{st.path} has NaN or inf at {site}/{view}: delete it and rerun its extract stage")


def holdout_prompts(train_prompts: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(trained, held out) prompt rows: a seeded share `holdout` of the train prompts is never trained on; it is
    the plateau check's held-out set (whole prompts, so no token of a held-out prompt is seen in training)."""
    n_hold = min(len(train_prompts) - 1, math.ceil(holdout * len(train_prompts))) if holdout > 0 else 0
    if n_hold <= 0:
        return train_prompts, train_prompts[:0]
    held = np.zeros(len(train_prompts), dtype=bool)
    held[np.random.default_rng(seed).choice(len(train_prompts), size=n_hold, replace=False)] = True
    return train_prompts[~held], train_prompts[held]


def source_rows(store: ActStore, view: str, prompt_rows: np.ndarray) -> np.ndarray:
    """Row indices of `view` for the given prompt rows (token rows for 'tokens', from position
    `first_position(store)` on).

    The first token of a prompt is an attention sink whose residual norm is ~100x the others' (25000 vs
    ~200 at SmolLM2's layer 20): left in, it dominates the SAE's input scale and its FVU, so it is
    left out, as is usual for SAE training. So are the positions of the prompts' shared prefix (a chat
    template's constant opening: 24 of SmolLM2's ~45 tokens per prompt): a causal model gives every prompt
    the same activations there, so they would be the same few vectors repeated once per prompt.
    """
    if view != "tokens":
        return np.asarray(prompt_rows, dtype=np.int64)
    rows = store.token_rows(prompt_rows)
    return rows[store.index("tok_pos")[rows] >= first_position(store)]


def first_position(prompts: ActStore | Encoded) -> int:
    """The first token position whose rows are data (`source_rows`): after the sink at 0 and the prompts'
    shared prefix (`ActStore.shared_prefix`, or `Encoded.shared_prefix` of the same prompts)."""
    return max(1, prompts.shared_prefix)


def rows_of(source: str, base: ActStore, tuned: ActStore, view: str, prompt_rows: np.ndarray) -> np.ndarray:
    """Row indices that the SAE source `source` reads for the given prompt rows, each store's rows from that store.

    base: the base store's rows; tuned: the tuned store's own rows (with two tokenizers its token rows differ
    from the base store's); delta and crosscoder set base and tuned rows side by side, so they need
    `check_paired` and then share the base store's rows.
    """
    if source == "tuned":
        return source_rows(tuned, view, prompt_rows)
    if source in ("delta", "crosscoder"):
        check_paired(base, tuned, view, prompt_rows, what=f"token-level {source} rows")
    elif source != "base":
        raise MechdiffError(f"unknown SAE source {source!r}: choose one of {', '.join(SOURCES)}")
    return source_rows(base, view, prompt_rows)


def read_source(source: str, base: ActStore, tuned: ActStore, site: str, view: str, rows: np.ndarray) -> np.ndarray:
    """All rows of a source as one array (for evaluation on held-out prompts); `rows` from `rows_of`."""
    if source == "base":
        return base.read(site, view, rows)
    if source == "tuned":
        return tuned.read(site, view, rows)
    if source == "delta":
        return DeltaView(base, tuned).read(site, view, rows)
    if source == "crosscoder":
        return np.concatenate([base.read(site, view, rows), tuned.read(site, view, rows)], axis=1)
    raise MechdiffError(f"unknown SAE source {source!r}: choose one of {', '.join(SOURCES)}")


def source_batches(source: str, base: ActStore, tuned: ActStore, site: str, view: str, rows: np.ndarray, *,
                   batch_size: int, seed: int, epochs: int) -> Iterator[np.ndarray]:
    """Shuffled training batches of a source (`rows` from `rows_of`), streamed from the stores with bounded memory
    (rows that fit in `iter_batches`' cache_bytes are kept after the first epoch instead of read again)."""
    kw = {"rows": rows, "shuffle": True, "seed": seed, "epochs": epochs}
    if source == "base":
        yield from base.iter_batches(site, view, batch_size, **kw)
    elif source == "tuned":
        yield from tuned.iter_batches(site, view, batch_size, **kw)
    elif source == "delta":
        yield from DeltaView(base, tuned).iter_batches(site, view, batch_size, **kw)
    elif source == "crosscoder":  # same seed, same layout: both streams visit rows in the same order
        for a, b in zip(base.iter_batches(site, view, batch_size, **kw), tuned.iter_batches(site, view, batch_size, **kw),
                        strict=True):
            yield np.concatenate([a, b], axis=1)
    else:
        raise MechdiffError(f"unknown SAE source {source!r}: choose one of {', '.join(SOURCES)}")


DENSE_CHUNK = 1 << 26  # the most dense latents (floats) one chunk holds: 256 MB, a wide imported SAE's bound


def _rows_per_chunk(sae, chunk: int) -> int:
    """`chunk` rows, fewer for an SAE so wide that chunk x width dense latents exceed DENSE_CHUNK (the project's own
    SAEs, width 4608, keep 4096)."""
    return max(64, min(int(chunk), DENSE_CHUNK // max(1, int(sae.width))))


def encode_rows(sae, X: np.ndarray, *, features: np.ndarray | None = None, chunk: int = 4096) -> np.ndarray:
    """SAE latent activations of rows X (n, d), optionally only the given feature columns, in chunks."""
    import torch

    chunk = _rows_per_chunk(sae, chunk)
    out = []
    with torch.no_grad():
        for s in range(0, len(X), chunk):
            z = sae.encode(torch.as_tensor(np.ascontiguousarray(X[s : s + chunk]), dtype=torch.float32))
            out.append((z if features is None else z[:, torch.as_tensor(features)]).numpy())
    width = sae.width if features is None else len(features)
    return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)


@dataclass
class SparseCodes:
    """An SAE's activations on token rows kept sparsely (CSR: the nonzero entries of each row), exact: any feature
    column or block of rows comes back as `encode_rows` gave it."""

    width: int
    indptr: np.ndarray  # (n_rows + 1,)
    feats: np.ndarray  # (nnz,) feature of each entry
    vals: np.ndarray  # (nnz,) float32 activation of each entry

    @property
    def n_rows(self) -> int:
        return int(self.indptr.size - 1)

    def columns(self, features: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense (n_rows, len(features)) activations of the given features."""
        fi = np.asarray(features, dtype=np.int64).reshape(-1)
        out = np.zeros((self.n_rows, fi.size), dtype=self.vals.dtype)
        lut = np.full(self.width, -1, dtype=np.int64)
        lut[fi] = np.arange(fi.size)
        col = lut[self.feats]
        m = col >= 0
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        out[rows[m], col[m]] = self.vals[m]
        return out

    def _entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `rows` of each entry, entry index) of the given rows' entries, row by row in order."""
        r = np.asarray(rows, dtype=np.int64)
        counts = self.indptr[r + 1] - self.indptr[r]
        starts = np.repeat(self.indptr[r] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return np.repeat(np.arange(r.size), counts), starts + np.arange(int(counts.sum()))

    def dense(self, rows: np.ndarray) -> np.ndarray:
        """Dense (len(rows), width) activations of the given rows (positions into the encoded rows)."""
        pos, at = self._entries(rows)
        out = np.zeros((np.asarray(rows).size, self.width), dtype=self.vals.dtype)
        out[pos, self.feats[at]] = self.vals[at]
        return out

    def run_means(self, owner: np.ndarray, n_runs: int, *, rows: np.ndarray | None = None) -> np.ndarray:
        """Mean activations (n_runs, width) over runs of consecutive rows with the same `owner` (e.g. each prompt's
        token rows); `rows` (positions into the encoded rows, default all) are the rows `owner` labels.

        The sums add the runs' entries in row order without making the rows dense (4x faster than a dense
        np.add.reduceat for a TopK SAE of width 4608; the two agree to float32 rounding). Raises unless there are
        `n_runs` runs.
        """
        owner = np.asarray(owner)
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if owner.shape != rows.shape:
            raise MechdiffError(f"run_means: {owner.size} owners for {rows.size} rows: give one owner per row")
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if owner.size else np.zeros(0, np.int64)
        lens = np.diff(np.r_[starts, owner.size])
        if len(lens) != n_runs:
            raise MechdiffError("a prompt has a single token: per-prompt SAE activations need longer prompts")
        pos, at = self._entries(rows)
        run = np.repeat(np.arange(len(lens)), lens)
        out = np.zeros((len(lens), self.width), dtype=self.vals.dtype)
        np.add.at(out, (run[pos], self.feats[at]), self.vals[at])  # unbuffered: in entry order (deterministic)
        return out / lens[:, None]


def encode_sparse(sae: Any, X: np.ndarray, *, chunk: int = 4096) -> SparseCodes:
    """`encode_rows` of every row of X, kept as `SparseCodes` (one pass; the same chunks, so the same values). An
    SAE with `topk_codes` is never made dense: its k indices per row are the codes."""
    import torch

    chunk = _rows_per_chunk(sae, chunk)
    indptr, feats, vals = [np.zeros(1, dtype=np.int64)], [], []
    for s in range(0, len(X), chunk):
        got = None
        if hasattr(sae, "topk_codes"):
            with torch.no_grad():
                got = sae.topk_codes(torch.as_tensor(np.ascontiguousarray(X[s : s + chunk]), dtype=torch.float32))
        if got is not None:
            idx, z = got
            keep = z != 0  # what np.nonzero finds in `encode`'s latents, row by row in feature order
            counts = keep.sum(1).numpy()
            f, v = idx[keep].numpy(), z[keep].numpy()
        else:
            Z = encode_rows(sae, X[s : s + chunk], chunk=chunk)
            r, f = np.nonzero(Z)
            counts, v = np.bincount(r, minlength=Z.shape[0]), Z[r, f]
        indptr.append(indptr[-1][-1] + np.cumsum(counts))
        feats.append(f.astype(np.int32))
        vals.append(v)
    return SparseCodes(width=int(sae.width), indptr=np.concatenate(indptr),
                       feats=np.concatenate(feats) if feats else np.zeros(0, dtype=np.int32),
                       vals=np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32))


def prompt_feature_means(sae, source: str, base: ActStore, tuned: ActStore, site: str, view: str,
                         prompt_rows: np.ndarray, *, chunk_prompts: int = 256) -> np.ndarray:
    """Per-prompt SAE activations (n_prompts, width): the mean over the prompt's token rows (`source_rows`) for
    'tokens', else the row."""
    prompt_rows = np.asarray(prompt_rows, dtype=np.int64)
    if view != "tokens":
        return encode_rows(sae, read_source(source, base, tuned, site, view, prompt_rows))
    tok_prompt = (tuned if source == "tuned" else base).index("tok_prompt")
    out = []
    for s in range(0, len(prompt_rows), chunk_prompts):
        pr = prompt_rows[s : s + chunk_prompts]
        rows = rows_of(source, base, tuned, view, pr)  # in prompt order, from first_position on
        codes = encode_sparse(sae, read_source(source, base, tuned, site, view, rows))
        out.append(codes.run_means(tok_prompt[rows], len(pr)))
    return np.concatenate(out)
