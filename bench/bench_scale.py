"""Synthetic-scale measurement of the activation store and a DVC push/pull (not part of the test suite).

    .venv/bin/python bench/bench_scale.py                      # 1,000,000 x 1024 float32 rows (4.1 GB)
    .venv/bin/python bench/bench_scale.py --quick              # 100,000 rows (0.4 GB), about 35 s
    .venv/bin/python bench/bench_scale.py --rows 2000000 --width 1024 --shard-rows 16384 \\
        --dir /tmp/scale --keep --json /tmp/w/scale.json

What it does, in order, in a fresh temporary directory (``--dir``; removed at the end unless ``--keep``):

1. write: ``ActStore.create`` one site ``L0.resid_post`` (width ``--width``) with the ``last`` view, then
   stream seeded Gaussian float32 blocks of ``--shard-rows`` rows through ``store.writer().append``. The RNG
   time is measured apart from the append time, so the write throughput is the store's own (copy into the
   writer buffer, zarr shard write, running statistics). "write+sync" adds an ``os.sync()`` at the end, so
   the bytes are on disk rather than in the page cache.
2. read: ``iter_batches(site, "last", batch_size=4096, shuffle=True)`` over every row once, then the same
   with ``shuffle=False``, then whole-shard slices of the zarr array. Before each pass the store's files
   are evicted from the page cache (``posix_fadvise(DONTNEED)`` after ``sync``) so the passes read from disk
   (``--warm`` skips the eviction). Each pass checks the row count and compares its float64 column sums
   with the store's running mean x n.
3. DVC: ``git init``, ``dvc init``, ``dvc remote add -d local <dir>/remote``, then timed ``dvc add`` (hash +
   copy into ``.dvc/cache``), ``dvc push`` (default ``-j``), delete the workspace store and ``.dvc/cache``,
   ``dvc pull``; the pulled store must match (sha256 of the first, middle and last shard files, the full
   file listing with sizes, and rows re-read and compared with the regenerated blocks).

Peak memory: ``ru_maxrss`` of this process (its lifetime peak: resetting ``VmHWM`` also resets
``ru_maxrss``, so the script keeps the peak before each reset), and per phase the larger of the sampled
``VmRSS`` (a 20 ms sampling thread) and ``VmHWM`` after resetting it (``/proc/self/clear_refs``); DVC
commands' peak RSS is their ``VmHWM``, polled. A plain-file baseline (1 GiB written, synced, read cold
and warm) gives the disk's own ceiling. Disk needed: about 3x the store (store, DVC cache, remote).

How long: measured 188 s and 207 s at the default size (243 s with ``--shard-rows 1024``) on a 2-CPU VM
with an ext4 virtual disk and other jobs running; ``--quick`` about 35 s. See docs/SCALE.md for results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SITE, VIEW = "L0.resid_post", "last"
BATCH = 4096
GB = 1e9


# --------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssMonitor:
    """Samples VmRSS every `interval` s; `phase(name)` records the peak RSS (MB) seen while it runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_kb = 0
        self.lifetime_kb = 0  # VmHWM before each reset: resetting VmHWM also resets ru_maxrss
        self.phases: dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))
            self._stop.wait(self.interval)

    @contextmanager
    def phase(self, name: str):
        self.lifetime_kb = max(self.lifetime_kb, _status_kb("VmHWM"))
        hwm_ok = _reset_hwm()
        self.peak_kb = _status_kb("VmRSS")
        try:
            yield
        finally:
            peak = max(self.peak_kb, _status_kb("VmRSS"), _status_kb("VmHWM") if hwm_ok else 0)
            self.phases[name] = round(peak / 1024, 1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


# --------------------------------------------------------------------------------------------- helpers


def _block(seed: int, i: int, rows: int, width: int) -> np.ndarray:
    """Block i of the synthetic data: deterministic per (seed, i), so any block can be regenerated."""
    return np.random.default_rng([seed, i]).standard_normal((rows, width), dtype=np.float32)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _du(root: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under root."""
    fs = _files(root)
    return len(fs), sum(p.stat().st_size for p in fs), sum(p.stat().st_blocks * 512 for p in fs)


def _evict(root: Path) -> None:
    """Drop root's files from the page cache (clean pages only, hence the sync first)."""
    os.sync()
    for p in _files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _shard_files(store_dir: Path) -> list[Path]:
    return _files(store_dir / SITE / VIEW / "c")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run a command; wall time, exit code and the child's peak RSS.

    The peak is VmHWM of the child's /proc status, polled every 20 ms until it exits (VmHWM never decreases,
    so the last reading is the peak up to the last 20 ms). ``os.wait4``'s ru_maxrss would not do: at exec,
    Linux folds the forking process's peak RSS into the child's ru_maxrss, so it reports this process's.
    """
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        hwm = 0
        status = f"/proc/{p.pid}/status"
        while p.poll() is None:
            try:
                with open(status) as f:
                    hwm = max(hwm, next((int(x.split()[1]) for x in f if x.startswith("VmHWM:")), 0))
            except (OSError, StopIteration):
                pass
            time.sleep(0.02)
        dt = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{text[-4000:]}")
    return {"cmd": " ".join(cmd[1:] if cmd[0].endswith("dvc") else cmd), "s": round(dt, 2),
            "peak_rss_mb": round(hwm / 1024, 1), "tail": text.strip().splitlines()[-1:] if text.strip() else []}


# --------------------------------------------------------------------------------------------- phases


def disk_baseline(base: Path, nbytes: int) -> dict:
    """Plain-file sequential write (+ sync) and cold / warm read of `nbytes`, 64 MiB at a time: the disk and
    page-cache ceiling the store's numbers compare with."""
    x = _block(0, 0, 1 << 14, 1024).tobytes()  # 64 MiB
    n = max(1, nbytes // len(x))
    p = base / "baseline.bin"
    t0 = time.perf_counter()
    with open(p, "wb") as f:
        for _ in range(n):
            f.write(x)
    t_write = time.perf_counter() - t0
    os.sync()
    t_sync = time.perf_counter() - t0
    out = {"bytes": n * len(x), "write_GBps": round(n * len(x) / GB / t_write, 3),
           "write_sync_GBps": round(n * len(x) / GB / t_sync, 3)}
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    buf = bytearray(len(x))
    for kind in ("cold", "warm"):
        t0 = time.perf_counter()
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        out[f"read_{kind}_GBps"] = round(n * len(x) / GB / (time.perf_counter() - t0), 3)
    p.unlink()
    return out



def write_store(store_dir: Path, a: argparse.Namespace, mon: RssMonitor) -> dict:
    from mechdiff.data.store import ActStore

    n, d = a.rows, a.width
    t0 = time.perf_counter()
    store = ActStore.create(
        store_dir, prompt_ids=np.arange(n, dtype=np.int64), n_tokens=np.ones(n, dtype=np.int32),
        datasets=["synthetic"] * n, splits=["train"] * n, sites={SITE: d}, views={SITE: [VIEW]},
        shard_rows=a.shard_rows, dtype="float32", resume=False,
    )
    t_create = time.perf_counter() - t0
    t_gen = t_append = 0.0
    blk = a.shard_rows
    with mon.phase("write"):
        with store.writer() as w:
            for i, r0 in enumerate(range(0, n, blk)):
                m = min(blk, n - r0)
                g0 = time.perf_counter()
                x = _block(a.seed, i, m, d)
                g1 = time.perf_counter()
                w.append({SITE: {VIEW: x}}, n=m)
                t_append += time.perf_counter() - g1
                t_gen += g1 - g0
                del x
            c0 = time.perf_counter()
        t_append += time.perf_counter() - c0  # close(): the last partial shard
        s0 = time.perf_counter()
        os.sync()
        t_sync = time.perf_counter() - s0
    st = ActStore.open(store_dir)
    assert st.complete and st.rows_done == n, (st.complete, st.rows_done)
    nbytes = n * d * 4
    files, app, alloc = _du(store_dir)
    return {
        "create_s": round(t_create, 2), "gen_s": round(t_gen, 2), "append_s": round(t_append, 2),
        "sync_s": round(t_sync, 2), "data_bytes": nbytes,
        "write_GBps": round(nbytes / GB / t_append, 3), "write_rows_per_s": round(n / t_append),
        "write_sync_GBps": round(nbytes / GB / (t_append + t_sync), 3),
        "write_sync_rows_per_s": round(n / (t_append + t_sync)),
        "gen_GBps": round(nbytes / GB / t_gen, 3),
        "files": files, "shard_files": len(_shard_files(store_dir)), "bytes_apparent": app, "bytes_on_disk": alloc,
        "commits": w.commits, "writer_buffer_mb": round(w.buffer_bytes / 2**20, 1),
    }


def read_pass(store_dir: Path, a: argparse.Namespace, mode: str) -> dict:
    from mechdiff.data.store import ActStore

    if not a.warm:
        _evict(store_dir)
    st = ActStore.open(store_dir)
    n, d = st.n, st.width(SITE)
    mean, _ = st.stats(SITE, VIEW)
    colsum = np.zeros(d, dtype=np.float64)
    rows = batches = 0
    t_consume = 0.0
    t0 = time.perf_counter()
    if mode == "shards":  # whole-shard slices straight from the zarr array
        z, sh = st.array(SITE, VIEW), st.attrs["layout"]["shard_rows"]
        it = (np.asarray(z[r : min(n, r + sh)], dtype=np.float32) for r in range(0, n, sh))
    else:
        it = st.iter_batches(SITE, VIEW, batch_size=BATCH, shuffle=mode == "shuffled", seed=a.seed)
    for b in it:
        c0 = time.perf_counter()
        rows += len(b)
        batches += 1
        colsum += b.sum(axis=0, dtype=np.float64)
        t_consume += time.perf_counter() - c0
    dt = time.perf_counter() - t0
    err = float(np.max(np.abs(colsum / n - mean)))
    if rows != n or err > 1e-4:
        raise SystemExit(f"read {mode}: {rows} rows (expected {n}), column-mean error {err:.2e}")
    nbytes = n * d * 4
    return {
        "mode": mode, "cold": not a.warm, "s": round(dt, 2), "consume_s": round(t_consume, 2),
        "rows": rows, "batches": batches, "GBps": round(nbytes / GB / dt, 3), "rows_per_s": round(n / dt),
        "GBps_excl_consume": round(nbytes / GB / (dt - t_consume), 3), "colmean_max_err": err,
    }


def dvc_round_trip(base: Path, store_dir: Path, a: argparse.Namespace, mon: RssMonitor) -> dict:
    dvc = str(Path(sys.executable).with_name("dvc"))
    if not Path(dvc).exists():
        dvc = shutil.which("dvc") or "dvc"
    repo, remote = store_dir.parent, base / "remote"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "remote", "add", "-d", "local", str(remote)]):
        _run(cmd, repo, env)
    cache_type = subprocess.run([dvc, "config", "cache.type"], cwd=repo, env=env, capture_output=True,
                                text=True).stdout.strip() or "default (reflink,copy)"

    shards = _shard_files(store_dir)
    picks = sorted({0, len(shards) // 2, len(shards) - 1})
    before = {str(shards[i].relative_to(store_dir)): _sha256(shards[i]) for i in picks}
    listing = {str(p.relative_to(store_dir)): p.stat().st_size for p in _files(store_dir)}
    nbytes = sum(listing.values())

    out: dict = {"cache_type": cache_type, "bytes": nbytes, "store_files": len(listing)}
    if not a.warm:
        _evict(store_dir)
    with mon.phase("dvc"):
        out["add"] = _run([dvc, "add", "-q", store_dir.name], repo, env)
        out["cache_files"] = _du(repo / ".dvc" / "cache")[0]
        if not a.warm:
            _evict(repo / ".dvc" / "cache")
        out["push"] = _run([dvc, "push", "-q"], repo, env)
        r_files, r_app, _ = _du(remote)
        out["remote_files"], out["remote_bytes"] = r_files, r_app
        shutil.rmtree(store_dir)
        shutil.rmtree(repo / ".dvc" / "cache")
        if not a.warm:
            _evict(remote)
        out["pull"] = _run([dvc, "pull", "-q"], repo, env)
        out["cache_files_after_pull"] = _du(repo / ".dvc" / "cache")[0]
    for k in ("add", "push", "pull"):
        out[k]["GBps"] = round(nbytes / GB / out[k]["s"], 3)
        out[k]["files_per_s"] = round(len(listing) / out[k]["s"], 1)

    # the pulled store must be the same bytes and read back the same rows
    after = {k: _sha256(store_dir / k) for k in before}
    listing2 = {str(p.relative_to(store_dir)): p.stat().st_size for p in _files(store_dir)}
    if after != before or listing2 != listing:
        raise SystemExit("dvc pull: the pulled store differs from the pushed one")
    from mechdiff.data.store import ActStore

    st = ActStore.open(store_dir)
    blk = a.shard_rows
    n_blocks = -(-a.rows // blk)
    for i in sorted({0, n_blocks // 2, n_blocks - 1}):
        r0, r1 = i * blk, min(a.rows, (i + 1) * blk)
        if not np.array_equal(st.read(SITE, VIEW, rows=np.arange(r0, r1)), _block(a.seed, i, r1 - r0, a.width)):
            raise SystemExit(f"dvc pull: rows {r0}..{r1} differ from the data written")
    out["verified"] = {"sha256_shards": len(before), "listing_files": len(listing2), "row_blocks_compared": 3}
    return out


# --------------------------------------------------------------------------------------------- report


def _table(res: dict) -> str:
    w, rd, dv, mem = res["write"], res["read"], res.get("dvc"), res["peak_rss_mb"]
    gb = w["data_bytes"] / GB
    lines = [
        f"store: {res['rows']:,} rows x {res['width']} float32 = {gb:.2f} GB, shard_rows {res['shard_rows']:,} "
        f"({res['shard_rows'] * res['width'] * 4 / 2**20:.0f} MiB/shard file), "
        f"{w['files']} files ({w['shard_files']} shard files), {w['bytes_on_disk'] / GB:.2f} GB on disk",
        "",
        f"{'phase':<42}{'seconds':>9}{'GB/s':>8}{'rows/s':>12}{'peak RSS MB':>13}",
        f"{'data generation (RNG, not timed)':<42}{w['gen_s']:>9.2f}{w['gen_GBps']:>8.2f}{'':>12}{'':>13}",
        f"{'write (append + close)':<42}{w['append_s']:>9.2f}{w['write_GBps']:>8.2f}{w['write_rows_per_s']:>12,}"
        f"{mem['phases'].get('write', 0):>13.0f}",
        f"{'write + os.sync()':<42}{w['append_s'] + w['sync_s']:>9.2f}{w['write_sync_GBps']:>8.2f}"
        f"{w['write_sync_rows_per_s']:>12,}{'':>13}",
    ]
    for r in rd:
        name = {"shuffled": "read iter_batches shuffle=True", "sequential": "read iter_batches shuffle=False",
                "shards": "read whole-shard slices"}[r["mode"]]
        name += " (cold)" if r["cold"] else " (warm)"
        lines.append(f"{name:<42}{r['s']:>9.2f}{r['GBps']:>8.2f}{r['rows_per_s']:>12,}"
                     f"{mem['phases'].get('read_' + r['mode'], 0):>13.0f}")
    if dv:
        for k in ("add", "push", "pull"):
            lines.append(f"{'dvc ' + k:<42}{dv[k]['s']:>9.2f}{dv[k]['GBps']:>8.2f}{'':>12}{dv[k]['peak_rss_mb']:>13.0f}")
        lines += ["", f"dvc: cache.type {dv['cache_type']}, store {dv['store_files']} files, cache {dv['cache_files']} "
                      f"files, remote {dv['remote_files']} files / {dv['remote_bytes'] / GB:.2f} GB; pulled store "
                      f"verified ({dv['verified']['sha256_shards']} shard sha256, {dv['verified']['listing_files']}-file "
                      f"listing, {dv['verified']['row_blocks_compared']} row blocks)"]
    b = res["disk_baseline"]
    lines.append(f"disk baseline (plain file, {b['bytes'] / GB:.2f} GB, 64 MiB I/O): write {b['write_GBps']:.2f} GB/s, "
                 f"write+sync {b['write_sync_GBps']:.2f} GB/s, cold read {b['read_cold_GBps']:.2f} GB/s, "
                 f"warm read {b['read_warm_GBps']:.2f} GB/s")
    lines.append(f"this process: ru_maxrss {mem['ru_maxrss']:.0f} MB; total {res['total_s']:.0f} s; load average "
                 f"(1 min) {res['env']['loadavg_start'][0]} at start, {res['env']['loadavg_end'][0]} at end "
                 f"on {res['env']['cpus']} CPUs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--quick", action="store_true", help="100,000 rows")
    ap.add_argument("--warm", action="store_true", help="do not evict the store from the page cache before reads")
    ap.add_argument("--no-dvc", action="store_true", help="skip the DVC round trip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args(argv)
    if min(a.rows, a.width, a.shard_rows) < 1:
        ap.error(f"--rows, --width and --shard-rows must be >= 1 (got {a.rows}, {a.width}, {a.shard_rows})")
    if a.quick:
        a.rows = 100_000

    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="mechdiff-scale-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    store_dir = base / "repo" / "act.zarr"
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    need = 3 * a.rows * a.width * 4
    free = shutil.disk_usage(base).free
    if not a.no_dvc and free < need * 1.05:
        raise SystemExit(f"{base}: {free / GB:.1f} GB free, the run needs about {need / GB:.1f} GB (store, cache, remote)")

    import dvc as _dvc
    import zarr

    mon = RssMonitor()
    t0 = time.perf_counter()
    res: dict = {
        "rows": a.rows, "width": a.width, "shard_rows": a.shard_rows, "dtype": "float32", "seed": a.seed,
        "dir": str(base),
        "env": {"python": platform.python_version(), "numpy": np.__version__, "zarr": zarr.__version__,
                "dvc": _dvc.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
                "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
                "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
    }
    try:
        res["disk_baseline"] = disk_baseline(base, min(a.rows * a.width * 4, 1 << 30))
        res["write"] = write_store(store_dir, a, mon)
        res["read"] = []
        for mode in ("shuffled", "sequential", "shards"):
            with mon.phase("read_" + mode):
                res["read"].append(read_pass(store_dir, a, mode))
        if not a.no_dvc:
            res["dvc"] = dvc_round_trip(base, store_dir, a, mon)
    finally:
        mon.stop()
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    # clear_refs resets ru_maxrss along with VmHWM, so the lifetime peak also takes the max over phases
    ru = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, mon.lifetime_kb)
    res["peak_rss_mb"] = {"ru_maxrss": round(max(ru / 1024, *mon.phases.values()), 1), "phases": mon.phases}
    print(_table(res))
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from mechdiff.errors import exit_on_error

    exit_on_error(lambda: sys.exit(main()), "bench_scale.py")
