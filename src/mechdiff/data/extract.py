"""Run a model over prompts in batches and stream the activations at chosen sites into an ActStore."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff import dist as _dist
from mechdiff.data.store import RANK_DIR, VIEWS, ActStore, StoreWriter
from mechdiff.errors import MechdiffError
from mechdiff.model import sites as _sites
from mechdiff.model.kernels import packed_linears
from mechdiff.model.sites import Site
from mechdiff.model.tokens import batches, encode, pad_id, template_opening

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_VIEWS = ["last", "mean"]


def set_threads(threads: int | None = None) -> int:
    """Use `threads` torch threads (default: the CPUs this process may run on, never more); return the count."""
    n = int(threads) if threads else min(torch.get_num_threads(), _dist.available_cpus())
    if n < 1:
        raise MechdiffError(f"threads must be >= 1, got {threads}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _window(shard_rows: int, batch_size: int) -> int:
    """Prompts sorted by length together: a divisor of shard_rows (so resumed runs batch alike) near 16 batches."""
    target = max(batch_size, 16 * batch_size)
    for w in range(min(shard_rows, target), 0, -1):
        if shard_rows % w == 0:
            return w
    return 1


def _norm_sites(sites: Sequence[Site | str], model: nn.Module) -> list[Site]:
    if not sites:
        raise MechdiffError("no sites to extract: give at least one site, e.g. L12.resid_post")
    out = []
    for s in sites:
        if isinstance(s, str):
            s = Site.parse(s)
        if not isinstance(s, Site):
            raise MechdiffError(f"bad site {s!r}: use mechdiff.model.sites.Site or a name like 'L12.resid_post'")
        out.append(s)
    out = list(dict.fromkeys(out))
    nl = _sites.n_layers(model)
    for s in out:
        if not 0 <= s.layer < nl:
            raise MechdiffError(f"site {s.name}: layer out of range, the model has {nl} blocks (0..{nl - 1})")
    return out


def _norm_views(views: Mapping[Any, Sequence[str]] | None, sites: list[Site]) -> dict[str, list[str]]:
    views = {(k.name if isinstance(k, Site) else str(k)): v for k, v in (views or {}).items()}
    names = {s.name for s in sites}
    unknown = set(views) - names - {"*"}
    if unknown:
        raise MechdiffError(f"views given for sites not extracted: {sorted(unknown)}; extracted: {sorted(names)}")
    out = {}
    for s in sites:
        v = list(dict.fromkeys(views.get(s.name, views.get("*", DEFAULT_VIEWS))))
        if not v or any(x not in VIEWS for x in v):
            raise MechdiffError(f"site {s.name}: views must be a non-empty subset of {', '.join(VIEWS)}, got {v}")
        out[s.name] = v
    return out


def _prompt_fields(prompts: Sequence[Any]) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    if len(prompts) == 0:
        raise MechdiffError("no prompts to extract: the corpus or split is empty")
    try:
        pids = np.asarray([int(p.pid) for p in prompts], dtype=np.int64)
        texts = [p.text for p in prompts]
        ds = [str(p.dataset) for p in prompts]
        sp = [str(p.split) for p in prompts]
    except (AttributeError, TypeError, ValueError) as exc:
        raise MechdiffError(f"prompts need .pid (int), .text, .dataset and .split (corpus.Prompt): {exc}") from exc
    return pids, texts, ds, sp


def _run_model(model: nn.Module, dtype: str, device: str) -> nn.Module:
    """The model in `dtype` on `device`: a cast copy when the dtype differs (the caller's model is kept)."""
    if dtype not in DTYPES:
        raise MechdiffError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    tdt = DTYPES[dtype]
    p = next(model.parameters(), None)
    if p is None:
        raise MechdiffError(f"{type(model).__name__} has no parameters: not a model")
    run = copy.deepcopy(model).to(tdt) if p.dtype != tdt else model
    try:
        return run.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise MechdiffError(f"cannot move the model to device {device!r}: {str(exc).splitlines()[0]}") from exc


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise MechdiffError(f"{type(model).__name__} has no LM head: cannot store logits")
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def extract(
    model: nn.Module, tokenizer: Any, prompts: list, sites: list[Site], views: dict[str, list[str]], path: str | Path,
    *, batch_size: int = 16, dtype: str = "float32", chat: bool = True, max_len: int = 256,
    store_logits: bool = False, device: str = "cpu", progress: bool = True, resume: bool = True,
    shard_rows: int = 1024, attrs: dict | None = None, store_dtype: str = "float32", compressor: str | None = None,
    threads: int | None = None, attention_mask: bool = False, pack_weights: bool = True, prefix_cache: bool = True,
) -> ActStore:
    """Extract activations at `sites` for `prompts` into the store at `path` and return it (opened read-only).

    Views per site: 'last' (decision token), 'mean' (attention-masked mean over the prompt), 'tokens' (every
    token); `views` maps site names (or '*') to views, default last + mean. The model runs in `dtype` under
    inference mode and stops after the last needed block unless `store_logits`, which computes the LM head at
    the decision token only. Stored arrays and statistics are float32 (or `store_dtype`). With `resume`, an
    interrupted store made with the same params continues where it stopped.

    Batches are right-padded, so under causal attention no real token ever attends to padding: by default the
    padding mask is not passed to the model (attention then takes its fast causal path; outputs at real tokens
    are the same). Set `attention_mask=True` for a model whose positions or attention depend on the mask.
    Under torchrun (several processes, `mechdiff.dist`), each rank extracts its own shard-aligned slice of the
    prompts into the same store (no collective during the forward passes; one barrier after rank 0 creates the
    store) and the last rank to finish merges the statistics (`finish_ranks`); a killed rank resumes its slice.
    A model in another dtype than `dtype` is copied and cast (the caller's model is unchanged); it is moved
    to `device` in place. On CPU, `pack_weights` runs the blocks' linear layers on oneDNN-packed weights
    (mechdiff.model.kernels; same dtype, one extra copy of the weights while extracting).

    With `prefix_cache`, the tokens every prompt starts with (`Encoded.shared_prefix`: a chat template's
    constant opening, 24 of SmolLM2's ~45 tokens per prompt) run once (`sites.SharedPrefix`): each batch
    continues from their keys and values and their activations are copied into every prompt's rows. The
    first prompts are checked against full forwards (`model.cache.cache_check`: float32 agrees to ~1e-7
    relative); a model that fails the check or keeps no usable KV cache is extracted with full forwards (a
    warning says so).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise MechdiffError(f"batch_size must be >= 1, got {batch_size}")
    site_list = _norm_sites(sites, model)
    vw = _norm_views(views, site_list)
    pids, texts, ds, sp = _prompt_fields(prompts)
    enc = encode(tokenizer, texts, chat=chat, max_len=max_len)
    opening = template_opening(tokenizer, chat)
    if enc.shared_prefix < opening:
        import warnings

        warnings.warn(f"the prompts share only {enc.shared_prefix} of the chat template's {opening} opening tokens (a "
                      "prompt cut from the left by max_len?): the opening runs for every prompt, and SAEs of the "
                      "tokens view train on its positions (data.max_len, or drop the longest prompts)",
                      RuntimeWarning, stacklevel=2)
    lengths = enc.lengths
    flat = np.fromiter((t for ids in enc.ids for t in ids), dtype=np.int64, count=int(lengths.sum()))
    d = _sites.model_width(model)
    user = dict(attrs or {})
    model_id = user.pop("model", None) or getattr(getattr(model, "config", None), "_name_or_path", None) \
        or type(model).__name__
    meta = {
        "model": str(model_id), "model_dtype": dtype, "chat": chat, "max_len": max_len,
        "store_logits": store_logits, "tokenizer": type(tokenizer).__name__,
        "token_ids_sha": hashlib.sha256(flat.tobytes()).hexdigest()[:16], **user,
    }
    rank, world = _dist.rank_world()

    def create() -> ActStore:
        return ActStore.create(
            path, prompt_ids=pids, n_tokens=lengths, datasets=ds, splits=sp, sites={s.name: d for s in site_list},
            views=vw, vocab_size=_vocab(model) if store_logits else None, attrs=meta, dtype=store_dtype,
            shard_rows=shard_rows, compressor=compressor, resume=resume,
            decision=np.asarray(enc.decision, dtype=np.int64), tok_ids=flat,
        )

    if world > 1:  # rank 0 creates (or reopens) the store, the others open it after the one barrier
        store = create() if rank == 0 else None
        _dist.barrier()
        store = store or ActStore.open(path, "r+")
    else:
        store = create()
    if store.complete:
        return ActStore.open(path)
    _check_layout(store, world)
    rows = store.rank_slice(rank, world) if world > 1 else None
    if rows is not None and rows[0] == rows[1]:  # more ranks than shards: nothing to extract here
        finish_ranks(store, world)
        return ActStore.open(path)
    set_threads(threads or (_dist.local_threads() if world > 1 else None))
    run = _run_model(model, dtype, device)
    was_training = run.training
    run.eval()
    prefix = enc.shared_prefix if prefix_cache else 0
    # bf16 / fp16: the cache is checked on a float32 copy (`SharedPrefix.checked`), made before the weights pack
    half = next(run.parameters()).dtype in (torch.bfloat16, torch.float16)
    twin = _sites.float32_twin(run) if prefix >= 2 and half else None
    try:
        with store.writer(rows, world) as writer, torch.inference_mode(), \
                packed_linears(_sites.get_body(run), rows_hint=batch_size * 64,
                               enabled=pack_weights and str(device).startswith("cpu")):
            # one discarded 4-token forward on the extraction's own path (stopping where it stops): the first
            # forward of a process can differ from the later ones (kernels.warm_up)
            warm = torch.zeros(1, 4, dtype=torch.long, device=device)
            _sites.capture(run, warm, None, site_list,
                           logits_at=torch.tensor([3], device=device) if store_logits else None)
            lo = 0 if rows is None else rows[0]
            pre = _sites.SharedPrefix.checked(run, enc, site_list, prefix, logits=store_logits,
                                              pass_mask=attention_mask, device=device, check_model=twin) \
                if writer.start < writer.end else None
            if twin is not None:
                twin = None
                if str(device).startswith("cuda"):
                    torch.cuda.empty_cache()  # the copy's memory back to the device before the extraction's batches
            _loop(run, enc, pids, site_list, vw, writer, batch_size=batch_size, pad=pad_id(tokenizer),
                  device=device, store_logits=store_logits, d=d, n=writer.end, shard_rows=shard_rows,
                  pass_mask=attention_mask, pre=pre,
                  bar=tqdm(total=int(lengths[lo : writer.end].sum()), initial=int(lengths[lo : writer.start].sum()),
                           unit="tok", unit_scale=True, disable=not progress, position=rank,
                           desc=f"extract {Path(path).name}" + (f" [rank {rank}/{world}]" if world > 1 else "")))
    finally:
        if was_training:
            run.train()
    if world > 1:
        finish_ranks(store, world)
    return ActStore.open(path)


def _check_layout(store: ActStore, world: int) -> None:
    """An unfinished store continues only with the number of processes that started it."""
    states = list(store.rank_states().values())
    started = {(int(st["lo"]), int(st["hi"])) for st in states}
    if not started and world == 1:
        shutil.rmtree(store.path / RANK_DIR, ignore_errors=True)  # pieces of ranks killed before any commit
        return
    if world == 1 or (started and not started <= {store.rank_slice(r, world) for r in range(world)}):
        was = sorted({st.get("world") for st in states} - {None})
        by = f"{was[0]} processes" if len(was) == 1 else "several processes" if started else "one process"
        n = f"extract.nproc: {was[0]}" if len(was) == 1 else "extract.nproc: 1" if not started else "extract.nproc"
        raise MechdiffError(f"store {store.path} was partly written by {by}: resume it with {n}, or delete it "
                            "to start again")


def finish_ranks(store: ActStore, world: int, *, wait_s: float = 120.0) -> bool:
    """After this rank's slice: finalize the store if every rank has finished (one rank at a time, under a
    lock file, so the last to finish does it); True when the store is complete. No collective is involved."""
    lock = store.path / ".finalize.partial"  # a killed holder's lock is removed on resume (store.create)
    t0 = time.monotonic()
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if time.monotonic() - t0 > wait_s:
                return False
            time.sleep(0.2)
    try:
        ActStore.open(store.path, "r+").finalize_ranks(world)
        return True
    except MechdiffError:
        return False  # a slice is unfinished: its rank finalizes when it ends
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _loop(run: nn.Module, enc, pids: np.ndarray, site_list: list[Site], vw: dict[str, list[str]],
          writer: StoreWriter, *, batch_size: int, pad: int, device: str, store_logits: bool, d: int, n: int,
          shard_rows: int, pass_mask: bool, bar, pre: _sites.SharedPrefix | None = None) -> None:
    """Process prompts window by window (in store order), sorting by length within a window; with `pre`, the
    prompts' shared opening ran once (`sites.SharedPrefix`) and every batch continues from it."""
    lengths = enc.lengths
    W = _window(shard_rows, batch_size)
    row_views = [(s.name, v) for s in site_list for v in vw[s.name] if v != "tokens"]
    tok_sites = [s.name for s in site_list if "tokens" in vw[s.name]]
    vocab = writer.vocab_size
    P = pre.n if pre is not None else 0
    # the prefix's own rows of every prompt's `tokens` view, converted once
    heads = {name: pre.acts[name].float().cpu().numpy() for name in tok_sites} if pre is not None else {}
    with bar:
        for w0 in range(writer.start, n, W):
            idx = np.arange(w0, min(n, w0 + W))
            loc_off = np.concatenate([[0], np.cumsum(lengths[idx])])
            out = {s.name: {} for s in site_list}
            for s, v in row_views:
                out[s][v] = np.empty((len(idx), d), dtype=np.float32)
            toks = {s: np.empty((int(loc_off[-1]), d), dtype=np.float32) for s in tok_sites}
            logits = np.empty((len(idx), vocab), dtype=np.float16) if store_logits else None
            for rows, ids, mask, pos in batches(enc, idx, batch_size, pad, device=device):
                if pre is not None:  # positions P.. of every prompt; the prefix's own rows come from `pre`
                    acts, lg = pre.capture(run, ids, mask if pass_mask else None, site_list,
                                           logits_at=pos if store_logits else None)
                else:
                    acts, lg = _sites.capture(run, ids, mask if pass_mask else None, site_list,
                                              logits_at=pos if store_logits else None)
                local = rows - w0
                lens = mask.sum(1)
                maskf = mask[:, P:].bool().unsqueeze(-1)
                ar = torch.arange(len(rows), device=ids.device)
                for s in site_list:
                    a = acts[s.name]
                    bad = None
                    if "last" in vw[s.name]:
                        last = a[ar, pos - P].float()
                        bad = ~torch.isfinite(last).all(1)
                        out[s.name]["last"][local] = last.cpu().numpy()
                    if "mean" in vw[s.name] or "tokens" in vw[s.name]:
                        total = torch.where(maskf, a, 0).float().sum(1)
                        if pre is not None:
                            total = total + pre.sums[s.name]
                        mean = total / lens.unsqueeze(1).float()
                        b2 = ~torch.isfinite(mean).all(1)
                        bad = b2 if bad is None else bad | b2
                        if "mean" in vw[s.name]:
                            out[s.name]["mean"][local] = mean.cpu().numpy()
                    if bad is not None and bool(bad.any()):
                        r = int(rows[int(torch.nonzero(bad)[0, 0])])
                        raise MechdiffError(
                            f"non-finite activations at {s.name} for prompt id {int(pids[r])}: "
                            f"try dtype float32, or check the model weights"
                        )
                    if "tokens" in vw[s.name]:
                        af = a.float().cpu().numpy()
                        head = heads.get(s.name)
                        for j, r in enumerate(local):
                            L = int(lengths[w0 + r])
                            o = loc_off[r]
                            if head is not None:
                                toks[s.name][o : o + P] = head
                            toks[s.name][o + P : o + L] = af[j, : L - P]
                if store_logits:
                    if not bool(torch.isfinite(lg).all()):
                        j = int(torch.nonzero(~torch.isfinite(lg).all(1))[0, 0])
                        raise MechdiffError(f"non-finite logits for prompt id {int(pids[rows[j]])}: try dtype float32")
                    logits[local] = lg.cpu().numpy().astype(np.float16)
                bar.update(int(lens.sum()))
            writer.append(out, toks or None, logits, n=len(idx))
