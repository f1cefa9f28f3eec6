"""Data-parallel runs under torchrun (2 processes, gloo) against the single-process results.

Extraction: the store written by two ranks is bit-identical to the one-process store (same threads, and the
ranks' slices are whole shards, so every batch holds the same prompts), statistics equal to float rounding;
a rank killed after its first commit resumes its own slice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mechdiff.data.store import RANK_DIR, ActStore
from mechdiff.errors import MechdiffError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _worker as W  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def torchrun(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "_worker.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"torchrun failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def assert_same_store(a: ActStore, b: ActStore) -> None:
    assert a.complete and b.complete
    assert a.sites == b.sites
    for name in ("prompt_id", "n_tokens", "tok_offset", "dataset", "split", "decision", "tok_prompt", "tok_pos",
                 "tok_id"):
        np.testing.assert_array_equal(a.index(name), b.index(name))
    for s in a.sites:
        for v in a.views(s):
            np.testing.assert_array_equal(a.read(s, v), b.read(s, v), err_msg=f"{s}/{v}")
            for x, y in zip(a.stats(s, v), b.stats(s, v)):
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)  # Chan merges in another order
    np.testing.assert_array_equal(a.read_logits(), b.read_logits())
    assert a.attrs["rows_done"] == b.attrs["rows_done"] and a.attrs["tok_done"] == b.attrs["tok_done"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> ActStore:
    out = tmp_path_factory.mktemp("single") / "s.zarr"
    W.run_extract(str(out), threads=1)
    return ActStore.open(out)


def test_two_rank_extraction_equals_single_process(single, tmp_path):
    out = tmp_path / "d.zarr"
    torchrun("extract", str(out))
    d = ActStore.open(out)
    assert_same_store(single, d)
    assert not (out / RANK_DIR).exists()
    # the slices share token shards: the test exercises the kept pieces
    lo, hi = d.rank_slice(1, 2)
    assert lo % W.SHARD_ROWS == 0 and int(d.index("tok_offset")[lo]) % d.attrs["layout"]["tok_shard_rows"] != 0


def test_killed_rank_resumes_its_slice(single, tmp_path):
    out = tmp_path / "k.zarr"
    res = torchrun("extract", str(out), "--crash-rank", "1", check=False)
    assert res.returncode != 0
    st = ActStore.open(out)
    assert not st.complete
    states = st.rank_states()
    lo1, hi1 = st.rank_slice(1, 2)
    assert states[lo1]["rows_done"] == lo1 + W.SHARD_ROWS and not states[lo1]["complete"]  # one shard committed
    # another number of processes must not continue it (one process, or three with other slices)
    with pytest.raises(MechdiffError, match="partly written by 2 processes: resume it with extract.nproc: 2"):
        W.run_extract(str(out))
    res = torchrun("extract", str(out), nproc=3, check=False)
    assert res.returncode != 0 and "resume it with extract.nproc: 2" in res.stderr
    torchrun("extract", str(out))
    assert_same_store(single, ActStore.open(out))


def test_more_ranks_than_shards(tmp_path):
    """Three ranks on a store of one shard: empty slices write nothing
    (no progress file that could collide with a neighbour's) and the store still equals the one-process one."""
    out = tmp_path / "m.zarr"
    torchrun("extract-small", str(out), nproc=3)
    ref = tmp_path / "ref.zarr"
    W.run_extract(str(ref), threads=1, n_prompts=7)
    assert_same_store(ActStore.open(ref), ActStore.open(out))
    assert [ActStore.open(out).rank_slice(r, 3) for r in range(3)] == [(0, 0), (0, 0), (0, 7)]


def test_rank_slices_tile_the_store(single):
    for world in (1, 2, 3, 7):
        sl = [single.rank_slice(r, world) for r in range(world)]
        assert sl[0][0] == 0 and sl[-1][1] == single.n
        assert all(a[1] == b[0] for a, b in zip(sl, sl[1:]))
        assert all(lo % W.SHARD_ROWS == 0 for lo, _ in sl)


def _weights(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    (f,) = d.glob("*.safetensors")
    return load_file(str(f))


@pytest.fixture(scope="module")
def sae_single(tmp_path_factory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("sae") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        W.run_sae(str(out))
    finally:
        torch.set_num_threads(threads)
    return out


def test_ddp_sae_equals_single_process_and_resumes(sae_single, tmp_path):
    """Two ranks, each on half of every global batch, gradients summed: the one-process SAE up to float
    summation order (dead latents and the AuxK loss included); a run killed after a checkpoint resumes to it."""
    out = tmp_path / "ddp"
    torchrun("ddp", str(out))
    one, two = _weights(sae_single), _weights(out)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    log1 = json.loads((sae_single / "train_log.json").read_text())[-1]
    log2 = json.loads((out / "train_log.json").read_text())[-1]
    assert log1["aux"] > 0 and log1["dead_pct"] > 0  # the dead-latent path ran
    for key in ("fvu", "l0", "aux", "dead_pct", "tokens", "step"):
        assert log2[key] == pytest.approx(log1[key], rel=1e-4, abs=1e-6), key
    killed = tmp_path / "killed"
    res = torchrun("ddp", str(killed), "--crash-step", "20", check=False)
    assert res.returncode != 0 and (killed / "checkpoints" / "latest.json").is_file()
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 20
    torchrun("ddp", str(killed))
    resumed = _weights(killed)
    for k in one:
        np.testing.assert_allclose(resumed[k], two[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_many_saes_over_ranks_equal_one_process(tmp_path):
    """Three SAEs spread over two ranks (round robin) are the SAEs one process trains, bit for bit."""
    import torch

    torchrun("many", str(tmp_path / "ranks"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1, 2):
            W.run_sae(str(tmp_path / f"one{seed}"), seed=seed)
            a, b = _weights(tmp_path / f"one{seed}"), _weights(tmp_path / "ranks" / f"sae{seed}")
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"sae{seed} {k}")
    finally:
        torch.set_num_threads(threads)
