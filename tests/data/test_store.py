"""Activation store: round trip, statistics, resume after crashes, bounded memory, batch reader, delta view."""

from __future__ import annotations

import os
import shutil
import tracemalloc

import numpy as np
import pytest

from mechdiff.data.store import ActStore, DeltaView, StoreWriter, check_pair_stores
from mechdiff.errors import MechdiffError

SITES = {"L0.resid_post": 8, "L2.mlp_out": 5}
VIEWS = {"L0.resid_post": ["last", "mean", "tokens"], "L2.mlp_out": ["last", "mean"]}
V = 11


def make_data(n: int = 53, seed: int = 0, prompt_seed: int = 0) -> dict:
    """Random prompts, lengths and activations (every array a store would hold), in store order."""
    rng = np.random.default_rng(1000 + prompt_seed)
    lens = rng.integers(1, 9, size=n)
    T = int(lens.sum())
    data = {
        "pid": rng.permutation(np.arange(100, 100 + 3 * n))[:n],
        "lens": lens,
        "ds": [["cultural", "control", "neutral"][i % 3] for i in range(n)],
        "sp": [["train", "val", "test"][(i // 2) % 3] for i in range(n)],
        "dec": np.array([rng.integers(0, x) for x in lens]),
        "tok_ids": rng.integers(0, 500, size=T),
    }
    rng = np.random.default_rng(seed)
    data["logits"] = rng.normal(size=(n, V)).astype(np.float32) * 4
    for s, d in SITES.items():
        for v in VIEWS[s]:
            rows = T if v == "tokens" else n
            data[(s, v)] = (rng.normal(size=(rows, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)).astype(
                np.float32
            )
    return data


def create(path, data, **kw) -> ActStore:
    kw.setdefault("shard_rows", 8)
    return ActStore.create(
        path, prompt_ids=data["pid"], n_tokens=data["lens"], datasets=data["ds"], splits=data["sp"],
        sites=kw.pop("sites", SITES), views=kw.pop("views", VIEWS), vocab_size=V, attrs={"model": "m0", "k": 1},
        decision=data["dec"], tok_ids=data["tok_ids"], **kw,
    )


def feed(writer: StoreWriter, data: dict, start: int, stop: int, step: int = 5) -> None:
    """Append prompts start..stop in uneven pieces (as an extractor would)."""
    off = np.concatenate([[0], np.cumsum(data["lens"])])
    a = start
    while a < stop:
        b = min(stop, a + step)
        views = {s: {v: data[(s, v)][a:b] for v in VIEWS[s] if v != "tokens"} for s in SITES}
        toks = {s: data[(s, "tokens")][off[a] : off[b]] for s in SITES if "tokens" in VIEWS[s]}
        writer.append(views, toks, data["logits"][a:b])
        a = b
        step = 3 if step == 5 else 5


def write_all(path, data, **kw) -> ActStore:
    st = create(path, data, **kw)
    with st.writer() as w:
        feed(w, data, w.start, len(data["pid"]))
    return ActStore.open(path)


def test_round_trip_values_index_and_stats(tmp_path):
    data = make_data()
    st = write_all(tmp_path / "a.zarr", data)
    n = len(data["pid"])
    assert st.complete and st.n == n and st.sites == list(SITES)
    assert st.attrs["model"] == "m0" and st.attrs["params"]["k"] == 1 and st.attrs["rows_done"] == n
    for s in SITES:
        for v in VIEWS[s]:
            np.testing.assert_array_equal(st.read(s, v), data[(s, v)])
            mean, std = st.stats(s, v)
            x = data[(s, v)].astype(np.float64)
            np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(std, x.std(0), rtol=1e-9)
    np.testing.assert_array_equal(st.read_logits(), data["logits"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(st.read(None, "logits"), st.read("logits", "logits"))
    np.testing.assert_array_equal(st.index("prompt_id"), data["pid"])
    np.testing.assert_array_equal(st.index("n_tokens"), data["lens"])
    np.testing.assert_array_equal(st.index("tok_offset"), np.concatenate([[0], np.cumsum(data["lens"])[:-1]]))
    np.testing.assert_array_equal(st.index("decision"), data["dec"])
    assert list(st.index("dataset")) == data["ds"] and list(st.index("split")) == data["sp"]
    np.testing.assert_array_equal(st.index("tok_prompt"), np.repeat(data["pid"], data["lens"]))
    np.testing.assert_array_equal(st.index("tok_pos"), np.concatenate([np.arange(x) for x in data["lens"]]))
    np.testing.assert_array_equal(st.index("tok_id"), data["tok_ids"])
    sp, ds = np.array(data["sp"]), np.array(data["ds"])
    np.testing.assert_array_equal(st.rows_where(split="val"), np.flatnonzero(sp == "val"))
    np.testing.assert_array_equal(st.rows_where(split="test", dataset="control"),
                                  np.flatnonzero((sp == "test") & (ds == "control")))
    assert st.rows_where(split="nope").size == 0
    rows = np.array([7, 3, 3, 50, 0])
    np.testing.assert_array_equal(st.read("L2.mlp_out", "mean", rows), data[("L2.mlp_out", "mean")][rows])
    tr = st.token_rows(np.array([4, 1]))
    tok = data[("L0.resid_post", "tokens")]
    off = st.index("tok_offset")
    want = np.concatenate([tok[off[4] : off[4] + data["lens"][4]], tok[off[1] : off[1] + data["lens"][1]]])
    np.testing.assert_array_equal(st.read("L0.resid_post", "tokens", tr), want)
    with pytest.raises(MechdiffError, match="no view"):
        st.read("L2.mlp_out", "tokens")
    with pytest.raises(MechdiffError, match="not in store"):
        st.read("L9.resid_post", "last")


def test_float16_store_and_compressor(tmp_path):
    data = make_data(n=20, seed=3)
    st = write_all(tmp_path / "h.zarr", data, dtype="float16", compressor="zstd")
    x = data[("L0.resid_post", "last")]
    np.testing.assert_array_equal(st.read("L0.resid_post", "last"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(st.stats("L0.resid_post", "last")[0],
                               x.astype(np.float16).astype(np.float64).mean(0), rtol=1e-10)


def test_sharded_file_count(tmp_path):
    n, sites = 1000, {f"L{i}.resid_post": 16 for i in range(8)}
    views = {s: ["last", "mean"] for s in sites}
    st = ActStore.create(tmp_path / "f.zarr", prompt_ids=np.arange(n), n_tokens=np.full(n, 50),
                         datasets=["d"] * n, splits=["train"] * n, sites=sites, views=views, shard_rows=1024)
    rng = np.random.default_rng(0)
    with st.writer() as w:
        for _ in range(0, n, 100):
            w.append({s: {v: rng.normal(size=(100, 16)).astype(np.float32) for v in views[s]} for s in sites})
    files = [os.path.join(r, f) for r, _d, fs in os.walk(tmp_path / "f.zarr") for f in fs]
    data_files = [f for f in files if not f.endswith("zarr.json")]
    site_files = [f for f in data_files if ".resid_post" in f]
    # one shard file per (site, view); index arrays at most one each (all-zero ones are not written at all)
    assert len(site_files) == 8 * 2
    assert len(site_files) <= len(data_files) <= len(site_files) + 5
    assert len(files) - len(data_files) == 1 + 8 + 16 + 5  # zarr.json: root, groups, site arrays, index arrays


def test_a_damaged_chunk_is_a_one_line_error(tmp_path):
    """A truncated shard file fails its decode (the shard index's checksum): the read names the store and the
    array. (Flipped bytes inside a chunk's data are not checksummed; DVC's md5 of the store catches them.)"""
    data = make_data(n=20, seed=1)
    st = write_all(tmp_path / "d.zarr", data)
    chunks = [os.path.join(r, f) for r, _d, fs in os.walk(tmp_path / "d.zarr" / "L0.resid_post" / "last")
              for f in fs if f != "zarr.json"]
    assert chunks
    for f in chunks:
        os.truncate(f, 10)
    st = ActStore.open(tmp_path / "d.zarr")
    with pytest.raises(MechdiffError, match=r"L0\.resid_post/last is damaged .*dvc checkout"):
        st.read("L0.resid_post", "last")
    with pytest.raises(MechdiffError, match="damaged"):
        st.read("L0.resid_post", "last", rows=np.array([0, 3]))
    with pytest.raises(MechdiffError, match="damaged"):
        next(iter(st.iter_batches("L0.resid_post", "last", batch_size=4)))
    np.testing.assert_array_equal(st.read("L0.resid_post", "mean"), data[("L0.resid_post", "mean")])


def test_a_missing_shard_or_array_is_a_one_line_error_not_zeros(tmp_path):
    """zarr reads a missing shard file as the fill value (zeros): the store refuses instead, and names it. An
    all-zero block is still written, so it is no false alarm."""
    data = make_data(n=40, seed=2)
    data[("L2.mlp_out", "last")][8:16] = 0  # exactly the second shard (shard_rows 8)
    st = write_all(tmp_path / "m.zarr", data)
    np.testing.assert_array_equal(st.read("L2.mlp_out", "last"), data[("L2.mlp_out", "last")])
    last = tmp_path / "m.zarr" / "L0.resid_post" / "last" / "c"
    assert sorted(int(p.name) for p in last.iterdir()) == [0, 1, 2, 3, 4]
    os.remove(last / "3" / "0")
    tok = tmp_path / "m.zarr" / "L0.resid_post" / "tokens" / "c"
    shutil.rmtree(tok / min(os.listdir(tok)))
    st = ActStore.open(tmp_path / "m.zarr")
    missing = r"shard L0\.resid_post/last/c/3/0 is missing \(it would read as zeros\).*dvc checkout"
    with pytest.raises(MechdiffError, match=missing):
        st.read("L0.resid_post", "last")
    with pytest.raises(MechdiffError, match=missing):
        st.read("L0.resid_post", "last", rows=np.array([0, 1]))  # the check covers the array, not only the rows
    with pytest.raises(MechdiffError, match=missing):
        next(iter(st.iter_batches("L0.resid_post", "last", batch_size=4)))
    with pytest.raises(MechdiffError, match=r"shard L0\.resid_post/tokens/c/0/0 is missing"):
        st.read("L0.resid_post", "tokens")
    np.testing.assert_array_equal(st.read("L0.resid_post", "mean"), data[("L0.resid_post", "mean")])
    os.remove(tmp_path / "m.zarr" / "L2.mlp_out" / "mean" / "zarr.json")
    with pytest.raises(MechdiffError, match=r"the array L2\.mlp_out/mean is missing or its metadata"):
        ActStore.open(tmp_path / "m.zarr").read("L2.mlp_out", "mean")
    os.remove(tmp_path / "m.zarr" / "logits" / "zarr.json")
    with pytest.raises(MechdiffError, match=r"the array logits is missing or its metadata"):
        ActStore.open(tmp_path / "m.zarr").read_logits()


def test_two_rank_store_with_an_all_zero_shared_token_shard_reads_back(tmp_path):
    """A token shard two ranks share is written by `finalize_ranks` from both ranks' pieces: all zero, it is still
    stored, so the missing-shard check does not refuse a valid store."""
    data = make_data(n=40, seed=3)
    data[("L0.resid_post", "tokens")][:] = 0
    st = create(tmp_path / "r.zarr", data, tok_shard_rows=64)
    off = np.concatenate([[0], np.cumsum(data["lens"])])
    for rank in range(2):
        lo, hi = st.rank_slice(rank, 2)
        with st.writer(rows=(lo, hi), world=2) as w:
            views = {s: {v: data[(s, v)][lo:hi] for v in VIEWS[s] if v != "tokens"} for s in SITES}
            toks = {s: data[(s, "tokens")][off[lo] : off[hi]] for s in SITES if "tokens" in VIEWS[s]}
            w.append(views, toks, data["logits"][lo:hi])
    st.finalize_ranks(2)
    st = ActStore.open(tmp_path / "r.zarr")
    assert st.complete and (off[st.rank_slice(1, 2)[0]] % 64) != 0  # the slices' border falls inside a token shard
    np.testing.assert_array_equal(st.read("L0.resid_post", "tokens"), data[("L0.resid_post", "tokens")])
    np.testing.assert_array_equal(st.read("L2.mlp_out", "last"), data[("L2.mlp_out", "last")])


def test_resume_after_crash_between_blocks(tmp_path):
    data = make_data()
    ref = write_all(tmp_path / "ref.zarr", data)
    st = create(tmp_path / "c.zarr", data)
    with pytest.raises(RuntimeError), st.writer() as w:
        feed(w, data, 0, 29)  # 3 blocks of 8 committed, 5 rows buffered
        raise RuntimeError("killed")
    st2 = ActStore.open(tmp_path / "c.zarr")
    assert st2.rows_done == 24 and not st2.complete
    with pytest.raises(MechdiffError, match="incomplete"):
        st2.read("L0.resid_post", "last")
    st3 = create(tmp_path / "c.zarr", data)
    w = st3.writer()
    assert w.start == 24
    feed(w, data, 24, len(data["pid"]))
    w.close()
    _assert_same(ActStore.open(tmp_path / "c.zarr"), ref)


def _assert_same(a: ActStore, b: ActStore) -> None:
    assert a.complete and b.complete
    for s in SITES:
        for v in VIEWS[s]:
            np.testing.assert_array_equal(a.read(s, v), b.read(s, v))
            for x, y in zip(a.stats(s, v), b.stats(s, v)):
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(a.read_logits(), b.read_logits())
    assert a._root.attrs["stats"]["L0.resid_post"]["tokens"]["n"] == len(a.index("tok_prompt"))


@pytest.mark.parametrize("where", ["state", "tokens"])
def test_crash_mid_flush_does_not_advance(tmp_path, monkeypatch, where):
    data = make_data()
    ref = write_all(tmp_path / "ref.zarr", data)
    calls = {"n": 0}
    name = "_commit_state" if where == "state" else "_write_tokens"
    orig = getattr(StoreWriter, name)

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == (2 if where == "state" else 4):
            raise OSError("disk died mid-flush")
        return orig(self, *a, **k)

    monkeypatch.setattr(StoreWriter, name, boom)
    st = create(tmp_path / "m.zarr", data)
    with pytest.raises(OSError), st.writer() as w:
        feed(w, data, 0, len(data["pid"]))
    monkeypatch.setattr(StoreWriter, name, orig)
    done = ActStore.open(tmp_path / "m.zarr").rows_done
    assert done in (8, 16) and done < len(data["pid"])
    # block arrays beyond rows_done may be written already; the resumed run rewrites them exactly once
    st = create(tmp_path / "m.zarr", data)
    with st.writer() as w:
        assert w.start == done
        feed(w, data, done, len(data["pid"]))
    _assert_same(ActStore.open(tmp_path / "m.zarr"), ref)


def test_mismatched_params_raise_and_resume_false_replaces(tmp_path):
    data = make_data(n=20)
    p = tmp_path / "x.zarr"
    write_all(p, data)
    other = dict(data, pid=data["pid"] + 1000)
    with pytest.raises(MechdiffError, match="prompt_ids.*delete it or use a new path"):
        create(p, other)
    with pytest.raises(MechdiffError, match="sites"):
        create(p, data, sites={"L0.resid_post": 8, "L3.mlp_out": 5},
               views={"L0.resid_post": ["last"], "L3.mlp_out": ["last"]})
    with pytest.raises(MechdiffError, match="dtype"):
        create(p, data, dtype="float16")
    with pytest.raises(MechdiffError, match="model"):
        ActStore.create(p, prompt_ids=data["pid"], n_tokens=data["lens"], datasets=data["ds"], splits=data["sp"],
                        sites=SITES, views=VIEWS, vocab_size=V, attrs={"model": "other", "k": 1},
                        decision=data["dec"], tok_ids=data["tok_ids"], shard_rows=8)
    # a complete matching store is returned as is
    assert create(p, data).complete
    st = create(p, other, resume=False)
    assert not st.complete and st.rows_done == 0
    np.testing.assert_array_equal(st.index("prompt_id"), other["pid"])


def test_bad_inputs(tmp_path):
    data = make_data(n=10)
    with pytest.raises(MechdiffError, match="no prompts"):
        ActStore.create(tmp_path / "e.zarr", prompt_ids=np.array([], dtype=int), n_tokens=np.array([], dtype=int),
                        datasets=[], splits=[], sites=SITES, views=VIEWS)
    with pytest.raises(MechdiffError, match="not unique"):
        create(tmp_path / "u.zarr", dict(data, pid=np.zeros(10, dtype=int)))
    st = create(tmp_path / "b.zarr", data)
    w = st.writer()
    with pytest.raises(MechdiffError, match="shape"):
        w.append({s: {v: np.zeros((2, 3), np.float32) for v in VIEWS[s]} for s in SITES})
    with pytest.raises(MechdiffError, match="logits"):
        w.append({s: {v: data[(s, v)][:2] for v in VIEWS[s] if v != "tokens"} for s in SITES},
                 {"L0.resid_post": data[("L0.resid_post", "tokens")][: data["lens"][:2].sum()]})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f.txt").write_text("x")
    with pytest.raises(MechdiffError, match="not an activation store"):
        create(tmp_path / "junk", data)


def test_writer_memory_is_bounded_by_the_buffer(tmp_path):
    n, d, shard, L = 2048, 64, 128, 8
    sites = {"L1.resid_post": d}
    views = {"L1.resid_post": ["last", "mean", "tokens"]}
    lens = np.full(n, L)
    st = ActStore.create(tmp_path / "mem.zarr", prompt_ids=np.arange(n), n_tokens=lens, datasets=["d"] * n,
                         splits=["s"] * n, sites=sites, views=views, shard_rows=shard, tok_shard_rows=256)
    corpus_bytes = (2 * n + L * n) * d * 4  # 5 MiB of activations in all
    rng = np.random.default_rng(0)
    piece = {v: rng.normal(size=(100 * (L if v == "tokens" else 1), d)).astype(np.float32) for v in views["L1.resid_post"]}
    w = st.writer()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for a in range(0, n, 100):
        m = min(100, n - a)
        pc = {k: x[: m * (L if k == "tokens" else 1)] for k, x in piece.items()}
        w.append({"L1.resid_post": {"last": pc["last"], "mean": pc["mean"]}}, {"L1.resid_post": pc["tokens"]})
    w.close()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert w.max_buffered_rows == shard and w.max_buffered_tokens <= 256
    assert w.buffer_bytes == (2 * shard + 256) * d * 4
    assert peak < corpus_bytes / 4, (peak, corpus_bytes)
    st = ActStore.open(tmp_path / "mem.zarr")
    assert st.complete
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    rows = sum(len(b) for b in st.iter_batches("L1.resid_post", "tokens", 100, buffer_rows=512))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert rows == L * n
    assert peak < L * n * d * 4 / 4, peak  # the reader holds about 3 buffers (0.4 MiB), never the 4 MiB array


def _labelled_store(tmp_path, n=300, d=3, shard=32) -> ActStore:
    """A store whose row i has value i in column 0 (rows identify themselves); tokens row t has t."""
    lens = np.full(n, 2)
    st = ActStore.create(tmp_path / "lab.zarr", prompt_ids=np.arange(n), n_tokens=lens, datasets=["d"] * n,
                         splits=["s"] * n, sites={"L0.resid_pre": d}, views={"L0.resid_pre": ["last", "tokens"]},
                         shard_rows=shard)
    with st.writer() as w:
        for a in range(0, n, 50):
            x = np.zeros((50, d), np.float32)
            x[:, 0] = np.arange(a, a + 50)
            t = np.zeros((100, d), np.float32)
            t[:, 0] = np.arange(2 * a, 2 * a + 100)
            w.append({"L0.resid_pre": {"last": x}}, {"L0.resid_pre": t})
    return ActStore.open(tmp_path / "lab.zarr")


def test_iter_batches_covers_each_row_once_shuffled_and_seeded(tmp_path):
    st = _labelled_store(tmp_path)
    ids = lambda bs: np.concatenate([b[:, 0] for b in bs]).astype(int)  # noqa: E731
    b1 = list(st.iter_batches("L0.resid_pre", "last", 64, seed=1, buffer_rows=100, epochs=2))
    assert [len(b) for b in b1] == [64, 64, 64, 64, 44] * 2
    e1, e2 = ids(b1[:5]), ids(b1[5:])
    np.testing.assert_array_equal(np.sort(e1), np.arange(300))
    np.testing.assert_array_equal(np.sort(e2), np.arange(300))
    assert not np.array_equal(e1, np.arange(300)) and not np.array_equal(e1, e2)
    np.testing.assert_array_equal(ids(st.iter_batches("L0.resid_pre", "last", 64, seed=1, buffer_rows=100,
                                                      epochs=2)), ids(b1))
    assert not np.array_equal(ids(st.iter_batches("L0.resid_pre", "last", 64, seed=2, buffer_rows=100)), e1)
    # within a buffer rows from different blocks mix: neighbours are rarely consecutive
    assert np.mean(np.abs(np.diff(e1)) == 1) < 0.1
    seq = ids(st.iter_batches("L0.resid_pre", "last", 7, shuffle=False))
    np.testing.assert_array_equal(seq, np.arange(300))
    sub = np.array([299, 5, 77, 78, 150, 5])
    got = ids(st.iter_batches("L0.resid_pre", "last", 4, rows=sub, seed=0))
    np.testing.assert_array_equal(np.sort(got), np.unique(sub))
    tok = ids(st.iter_batches("L0.resid_pre", "tokens", 128, seed=0, buffer_rows=256))
    np.testing.assert_array_equal(np.sort(tok), np.arange(600))
    with pytest.raises(MechdiffError):
        next(st.iter_batches("L0.resid_pre", "last", 0))


@pytest.mark.parametrize("rows", [None, np.arange(0, 600, 3)])
def test_iter_batches_cache_reads_once_and_changes_no_batch(tmp_path, monkeypatch, rows):
    """Over several epochs the selected rows are read from the store once (when they fit in cache_bytes), and
    every batch equals the streamed one (cache_bytes=0), bit for bit."""
    st = _labelled_store(tmp_path)
    calls = []
    read = type(st)._read_range
    monkeypatch.setattr(type(st), "_read_range", lambda self, *a: calls.append(a) or read(self, *a))
    kw = dict(rows=rows, seed=3, buffer_rows=256, epochs=3)
    streamed = list(st.iter_batches("L0.resid_pre", "tokens", 50, cache_bytes=0, **kw))
    n_streamed, calls[:] = len(calls), []
    cached = list(st.iter_batches("L0.resid_pre", "tokens", 50, **kw))
    assert len(calls) * 3 == n_streamed and len(set(calls)) == len(calls)  # each block once instead of per epoch
    assert len(cached) == len(streamed)
    for a, b in zip(cached, streamed, strict=True):
        np.testing.assert_array_equal(a, b)
    calls[:] = []
    small = list(st.iter_batches("L0.resid_pre", "tokens", 50, cache_bytes=100, **kw))  # does not fit: streams
    assert len(calls) == n_streamed and all(np.array_equal(a, b) for a, b in zip(small, streamed, strict=True))


def test_delta_view_and_materialise(tmp_path):
    db, dt = make_data(seed=1), make_data(seed=2)
    base = write_all(tmp_path / "base.zarr", db)
    tuned = write_all(tmp_path / "tuned.zarr", dt)
    dv = DeltaView(base, tuned)
    assert dv.sites == list(SITES) and dv.views("L0.resid_post") == VIEWS["L0.resid_post"]
    for s in SITES:
        for v in VIEWS[s]:
            want = dt[(s, v)] - db[(s, v)]
            np.testing.assert_array_equal(dv.read(s, v), want)
            m, sd = dv.stats(s, v)
            np.testing.assert_allclose(m, want.astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(sd, want.astype(np.float64).std(0), rtol=1e-9)
    rows = np.array([3, 40, 1])
    want = dt[("L2.mlp_out", "last")] - db[("L2.mlp_out", "last")]
    np.testing.assert_array_equal(dv.read("L2.mlp_out", "last", rows), want[rows])
    got = np.concatenate(list(dv.iter_batches("L0.resid_post", "tokens", 16, seed=4, buffer_rows=40)))
    a = np.concatenate(list(tuned.iter_batches("L0.resid_post", "tokens", 16, seed=4, buffer_rows=40)))
    b = np.concatenate(list(base.iter_batches("L0.resid_post", "tokens", 16, seed=4, buffer_rows=40)))
    np.testing.assert_array_equal(got, a - b)
    np.testing.assert_allclose(dv.read_logits(), tuned.read_logits() - base.read_logits())
    other = write_all(tmp_path / "o.zarr", make_data(seed=5, prompt_seed=1))
    with pytest.raises(MechdiffError, match="different prompts"):
        DeltaView(base, other)


def test_pair_stores_must_hold_the_same_prompt_texts(tmp_path):
    """Two stores of the same prompt ids pass; with one vocabulary, token counts that differ by one constant pass
    (two chat templates), counts that differ at some prompts only (a text edited after one store was extracted)
    fail, except at the longest count (a prompt cut at max_len); other prompt ids always fail."""
    db = make_data(n=30, seed=1)
    base = write_all(tmp_path / "b.zarr", db)
    longer = {**db, "lens": db["lens"] + 3}  # another template: every prompt 3 tokens longer
    longer["tok_ids"] = np.zeros(int(longer["lens"].sum()), dtype=np.int64)
    for s in SITES:
        if "tokens" in VIEWS[s]:
            longer[(s, "tokens")] = np.zeros((int(longer["lens"].sum()), SITES[s]), np.float32)
    check_pair_stores(base, write_all(tmp_path / "t.zarr", make_data(n=30, seed=2)), one_vocab=True)
    check_pair_stores(base, write_all(tmp_path / "l.zarr", longer), one_vocab=True)
    edited = {**longer, "lens": longer["lens"].copy()}
    i = int(np.argmin(edited["lens"]))
    edited["lens"][i] += 1  # one text edited
    edited["tok_ids"] = np.zeros(int(edited["lens"].sum()), dtype=np.int64)
    for s in SITES:
        if "tokens" in VIEWS[s]:
            edited[(s, "tokens")] = np.zeros((int(edited["lens"].sum()), SITES[s]), np.float32)
    stale = write_all(tmp_path / "e.zarr", edited)
    with pytest.raises(MechdiffError, match="tokenised 1 of 30 prompts to other lengths .* run dvc repro"):
        check_pair_stores(base, stale, one_vocab=True)
    check_pair_stores(base, stale, one_vocab=False)  # two vocabularies tokenise differently anyway
    with pytest.raises(MechdiffError, match="hold different prompts"):
        check_pair_stores(base, write_all(tmp_path / "o.zarr", make_data(n=30, seed=5, prompt_seed=1)),
                          one_vocab=False)
