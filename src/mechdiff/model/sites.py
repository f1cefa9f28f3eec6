"""Hook sites of any HF causal LM: find blocks; read, replace or add to activations at a site and position.

Public hook API (context managers; everything else in the project builds on these): `edit_at` (t -> fn(t)),
`read_at`, `replace_at` and `add_at` (at one position per row, or every position), `capture` (one
forward, activations of many sites), and `edit_heads_at` (the attention heads' outputs before the output
projection, laid out by `attention_heads`). `keep_block_outputs` / `reuse_blocks` skip the blocks before the
first edited one in repeated forwards of the same inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.errors import MechdiffError

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "fc2")  # fc2: blocks without an MLP module (OPT), whose last MLP layer is it


@dataclass(frozen=True, order=True)
class Site:
    """A hook site: decoder block `layer` (0-based) and activation `kind`."""

    layer: int
    kind: str = "resid_post"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MechdiffError(f"unknown site kind {self.kind!r}: use one of {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """The site's canonical name, e.g. 'L12.resid_post'."""
        return f"L{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> Site:
        """Parse 'L12.resid_post' (or 'L12' for resid_post) into a Site."""
        head, _, kind = name.partition(".")
        if not head.startswith("L") or not head[1:].isdigit():
            raise MechdiffError(f"bad site name {name!r}: write it as L<layer>.<kind>, e.g. L12.resid_post")
        return cls(int(head[1:]), kind or "resid_post")


class _Stop(Exception):
    """Raised inside a hook to end a forward pass after the last needed layer."""


def get_body(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (e.g. `model.model` for Llama)."""
    for name in ("model", "transformer", "gpt_neox", "decoder"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module) and find_blocks(sub, strict=False) is not None:
            return sub
    return model


def find_blocks(model: nn.Module, strict: bool = True) -> nn.ModuleList | None:
    """The ModuleList of decoder blocks (the one with num_hidden_layers entries)."""
    cfg = getattr(model, "config", None)
    n = None
    if cfg is not None:
        n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        if n is None and hasattr(cfg, "get_text_config"):
            n = getattr(cfg.get_text_config(), "num_hidden_layers", None)
    best: nn.ModuleList | None = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if n is not None and len(mod) == n:
                return mod
            if best is None or len(mod) > len(best):
                best = mod
    if n is None and best is not None:
        return best
    if strict:
        raise MechdiffError(
            f"cannot find the decoder blocks of {type(model).__name__}: it is not a supported causal LM"
        )
    return None


def n_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(find_blocks(model))


def _child(block: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for nm in names:
        sub = getattr(block, nm, None)
        if isinstance(sub, nn.Module):
            return sub
    raise MechdiffError(f"block {type(block).__name__} has no {what} submodule (looked for {', '.join(names)})")


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module whose input (resid_pre) or output (other kinds) is the site's activation."""
    blocks = find_blocks(model)
    if not 0 <= site.layer < len(blocks):
        raise MechdiffError(f"site {site.name}: layer out of range, the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
    block = blocks[site.layer]
    if site.kind in ("resid_pre", "resid_post"):
        return block
    if site.kind == "attn_out":
        return _child(block, _ATTN_NAMES, "attention")
    return _child(block, _MLP_NAMES, "MLP")


def _is_out_linear(m: nn.Module, d: int) -> bool:
    if isinstance(m, nn.Linear):
        return m.out_features == d
    w = getattr(m, "weight", None)  # GPT-2 style Conv1D stores (d_in, d_out)
    return type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2 and w.shape[1] == d


def output_projection(module: nn.Module, d: int, what: str) -> nn.Module:
    """The last Linear (or Conv1D) of `module` whose output width is `d`."""
    found = [m for m in module.modules() if _is_out_linear(m, d)]
    if not found:
        raise MechdiffError(f"{what} module {type(module).__name__} has no linear layer with {d} outputs to edit")
    return found[-1]


@dataclass(frozen=True)
class Heads:
    """The attention heads of a model: per layer the output projection, whose input is the heads' outputs
    concatenated (n_heads blocks of head_dim). Query heads: grouped-query attention shares keys and values
    between heads, not outputs, so every query head has its own block."""

    n_heads: int
    head_dim: int
    projections: tuple[nn.Module, ...]

    @property
    def n_layers(self) -> int:
        """Number of layers."""
        return len(self.projections)

    def block(self, h: int) -> slice:
        """Where head h sits in the projection's input."""
        return slice(h * self.head_dim, (h + 1) * self.head_dim)

    def matrix(self, layer: int) -> torch.Tensor:
        """(d, n_heads * head_dim) view W of the projection's weight: the heads write z W^T (plus any bias)."""
        proj = self.projections[layer]
        return proj.weight if isinstance(proj, nn.Linear) else proj.weight.T

    def weight(self, layer: int, h: int) -> torch.Tensor:
        """(d, head_dim) view W_h of head h's columns: head h writes z_h W_h^T into the residual stream."""
        return self.matrix(layer)[:, self.block(h)]


def _n_heads(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for c in (cfg, cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None):
        for name in ("num_attention_heads", "n_head", "num_heads"):
            v = getattr(c, name, None) if c is not None else None
            if isinstance(v, int) and v > 0:
                return v
    raise MechdiffError(f"{type(model).__name__}: the config names no number of attention heads "
                        "(num_attention_heads / n_head)")


def attention_heads(model: nn.Module) -> Heads:
    """Each layer's attention output projection and the head layout of its input (`Heads`)."""
    d, n = model_width(model), n_layers(model)
    H = _n_heads(model)
    projs = []
    for layer in range(n):
        proj = output_projection(site_module(model, Site(layer, "attn_out")), d, "attention")
        width = proj.in_features if isinstance(proj, nn.Linear) else int(proj.weight.shape[0])
        if width % H:
            raise MechdiffError(f"layer {layer}: the attention output projection takes {width} inputs, not a "
                                f"multiple of the {H} heads")
        projs.append(proj)
    widths = {(p.in_features if isinstance(p, nn.Linear) else int(p.weight.shape[0])) for p in projs}
    if len(widths) != 1:
        raise MechdiffError(f"attention output projections differ in width across layers ({sorted(widths)})")
    return Heads(H, widths.pop() // H, tuple(projs))


def _detached(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple | list):
        return type(out)(_detached(x) for x in out)
    return out


@contextlib.contextmanager
def keep_block_outputs(model: nn.Module, store: list) -> Iterator[None]:
    """Within the block, each decoder block's (detached) output of the last forward is kept in store[layer]."""
    blocks = find_blocks(model)
    store[:] = [None] * len(blocks)

    def keep(i: int):
        def hook(_m, _args, out):
            store[i] = _detached(out)

        return hook

    with _hooks([blk.register_forward_hook(keep(i)) for i, blk in enumerate(blocks)]):
        yield


@contextlib.contextmanager
def reuse_blocks(model: nn.Module, outputs: Sequence[Any], upto: int) -> Iterator[None]:
    """Within the block, decoder blocks 0..upto-1 do not run: each returns its kept output (`keep_block_outputs`
    of the same inputs). Exact when nothing before block `upto` is edited; saves their compute."""
    blocks = find_blocks(model)
    skipped = list(blocks)[: max(0, int(upto))]
    try:
        for blk, out in zip(skipped, outputs):
            blk.forward = lambda *a, _out=out, **k: _out
        yield
    finally:
        for blk in skipped:
            blk.__dict__.pop("forward", None)


def _first(x):
    return x[0] if isinstance(x, tuple | list) else x


def _with_first(out, new):
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _register_hook(model: nn.Module, site: Site, fn) -> list[torch.utils.hooks.RemovableHandle]:
    """Register `fn(tensor)` on the site's activation (B, T, d); the returned value (if any) replaces it.

    A site module that is a bare layer of the block (OPT's fc2, which sees flattened (B*T, d) rows) is shown to `fn`
    as (B, T, d): the block's input shape is read by a pre-hook on the block. Attention and MLP modules return
    (B, T, d) themselves and get no such hook."""
    mod, kind = site_module(model, site), site.kind
    if kind == "resid_pre":

        def pre(_m, args, kwargs):
            if args:
                new = fn(args[0])
                return ((new, *args[1:]), kwargs) if new is not None else None
            new = fn(kwargs["hidden_states"])
            if new is not None:
                kwargs = {**kwargs, "hidden_states": new}
                return args, kwargs
            return None

        return [mod.register_forward_pre_hook(pre, with_kwargs=True)]

    shape: list[int] = []  # (B, T) of the block's input, recorded only for a bare layer

    def block_in(_m, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        shape[:] = h.shape[:2] if isinstance(h, torch.Tensor) and h.dim() == 3 else []

    def post(_m, _args, out):
        t = _first(out)
        flat = t.dim() == 2 and len(shape) == 2 and t.shape[0] == shape[0] * shape[1]
        new = fn(t.reshape(shape[0], shape[1], t.shape[-1]) if flat else t)
        if new is None:
            return None
        return _with_first(out, new.reshape(t.shape) if flat else new)

    bare = next(mod.children(), None) is None  # attention / MLP modules return (B, T, d) themselves
    pre_hook = [find_blocks(model)[site.layer].register_forward_pre_hook(block_in, with_kwargs=True)] if bare else []
    return [*pre_hook, mod.register_forward_hook(post)]


def _call(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, body_only: bool,
          cache: Any = None, position_ids: torch.Tensor | None = None):
    target = get_body(model) if body_only else model
    if cache is None:
        return target(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                  use_cache=True)


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sites: Sequence[Site],
    *,
    logits_at: torch.Tensor | None = None,
    cache: Any = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Run the model once; return {site name: (B, T, d)} and, if `logits_at` (B,) positions are given, logits (B, V) there.

    Without `logits_at` the forward stops right after the last needed block and never runs the LM head (and
    fills a given KV `cache` only that far). With a `cache` the forward continues it (a prefix already in the
    cache; `position_ids` (B, T) then say where the tokens sit) and appends its own keys and values to it.
    """
    acts: dict[str, torch.Tensor] = {}
    sites = list(dict.fromkeys(sites))
    handles = []
    last_layer = max(s.layer for s in sites) if sites else -1
    for s in sites:
        def fn(t, _name=s.name):
            acts[_name] = t.detach()
        handles += _register_hook(model, s, fn)
    blocks = find_blocks(model)
    if logits_at is None and sites:
        def stop(_m, _a, _o):
            raise _Stop
        handles.append(blocks[last_layer].register_forward_hook(stop))
    with _hooks(handles):
        try:
            if logits_at is None:
                _call(model, input_ids, attention_mask, True, cache, position_ids)
                return acts, None
            out = _call(model, input_ids, attention_mask, True, cache, position_ids)
        except _Stop:
            return acts, None
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return acts, head_logits(model, hidden[torch.arange(hidden.shape[0]), logits_at])


class SharedPrefix:
    """The first `n` tokens every prompt of a set starts with (`tokens.shared_prefix`: a chat template's constant
    opening), run once: their site activations `acts` {site: (n, d)} (and `sums` over the n positions) and their
    KV cache, which `capture` continues for a batch of whole prompts. Build it with `checked`."""

    def __init__(self, model: nn.Module, ids: Sequence[int], sites: Sequence[Site], logits: bool, device: Any) -> None:
        from mechdiff.model.cache import empty_cache, filled_layers

        self.n = len(ids)
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        cache = empty_cache(model)
        # with logits the prompts run every block, so the prefix fills every layer's cache (its own logits are
        # not needed but keep the forward from stopping early); else it stops where the prompts stop
        acts, _ = capture(model, x, None, sites, cache=cache,
                          logits_at=torch.tensor([self.n - 1], device=device) if logits else None)
        self.acts = {k: v[0] for k, v in acts.items()}
        self.sums = {k: v.float().sum(0) for k, v in self.acts.items()}
        self.kv = filled_layers(cache)

    def capture(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, sites: Sequence[Site], *,
                logits_at: torch.Tensor | None = None):
        """`capture` of right-padded whole prompts `ids` (B, T) that start with the prefix, from its end: the site
        activations of positions n.. (B, T - n, d) and the logits at `logits_at` (whole-prompt positions).
        `mask` (B, T) is passed to the model as `capture` would (None: not passed)."""
        from mechdiff.model.cache import expanded_cache

        B, T = ids.shape
        cache = expanded_cache(model, self.kv, B)
        pos = torch.arange(self.n, T, device=ids.device).expand(B, -1)
        return capture(model, ids[:, self.n :], mask, sites, cache=cache, position_ids=pos,
                       logits_at=None if logits_at is None else logits_at - self.n)

    @classmethod
    def checked(cls, model: nn.Module, enc: Any, sites: Sequence[Site], n: int | None = None, *,
                logits: bool = False, pass_mask: bool = False, device: Any = None, check_rows: int = 4,
                check_model: nn.Module | None = None) -> SharedPrefix | None:
        """The shared prefix of the prompts of `enc` (first `n` tokens; default `enc.shared_prefix`) when it is
        worth running once (n >= 2) and the model continues a KV cache as its full forward computes: checked on
        the first `check_rows` prompts (`cache.cache_check`: float32 agrees to ~1e-7 relative). Else None, with a
        warning when the check failed or the model keeps no usable cache: the caller runs full forwards.

        `check_model`: a float32 model with the same weights and no packed layers (`float32_twin`), on which the
        check runs when `model` computes in bf16 / fp16. What the check asks (positions, mask and cache layout) does
        not depend on the dtype, and half precision's own rounding of two summation orders (2-3 % at some sites of
        SmolLM2 and of an 8B shape) is too close to a wrong cache's error (~5 %) to tell the two apart; in float32
        they are 1e-7 against 5e-2. The prefix itself then runs on `model`. Without one, the check runs on `model`
        in its own dtype."""
        import warnings

        from mechdiff.model.cache import CacheMismatch, UnknownCacheLayout

        n = enc.shared_prefix if n is None else int(n)
        if n < 2:
            return None
        device = device if device is not None else next(model.parameters()).device
        half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        refused = (UnknownCacheLayout, CacheMismatch, TypeError, NotImplementedError)
        try:
            if half and check_model is not None:
                try:
                    cls._agrees(check_model, enc, sites, n, logits, pass_mask, device, check_rows)
                    return cls(model, enc.ids[0][:n], sites, logits, device)
                except refused:
                    raise
                except Exception:  # noqa: BLE001 - the copy itself does not run (a tensor left in half precision):
                    pass  # the check runs on the model, in its own dtype
            return cls._agrees(model, enc, sites, n, logits, pass_mask, device, check_rows)
        # a model that takes no cache (TypeError, NotImplementedError), keeps one mechdiff does not read, or
        # continues it differently: full forwards; anything else (out of memory, a bug) is raised
        except refused as exc:
            warnings.warn(f"the shared-prefix cache is unavailable for {type(model).__name__} ({exc}); running "
                          "full forwards", RuntimeWarning, stacklevel=2)
            return None

    @classmethod
    def _agrees(cls, judge: nn.Module, enc: Any, sites: Sequence[Site], n: int, logits: bool, pass_mask: bool,
                device: Any, check_rows: int) -> SharedPrefix:
        """The prefix on `judge`, once its continuation of the first `check_rows` prompts agrees with their full
        forwards (`cache.cache_check`); else CacheMismatch (or the model's own error)."""
        from mechdiff.model.cache import CacheMismatch, cache_check
        from mechdiff.model.tokens import batches

        pre = cls(judge, enc.ids[0][:n], sites, logits, device)
        _, ids, mask, pos = next(batches(enc, np.arange(min(len(enc), check_rows)), check_rows, enc.pad,
                                         device=device, sort_by_length=False))
        m = mask if pass_mask else None
        got, lg = pre.capture(judge, ids, m, sites, logits_at=pos if logits else None)
        want, lw = capture(judge, ids, m, sites, logits_at=pos if logits else None)
        keep = mask[:, n:].bool().unsqueeze(-1)
        for s in sites:
            g, w = got[s.name], want[s.name]
            err, tol = cache_check(torch.where(keep, g, 0), torch.where(keep, w[:, n:], 0), w.dtype)
            err2, _ = cache_check(pre.acts[s.name], w[0, :n], w.dtype)
            if not max(err, err2) <= tol:
                raise CacheMismatch(f"{s.name} differs from a full forward by {max(err, err2):.3g} (relative)")
        if logits:
            err, tol = cache_check(lg, lw, next(judge.parameters()).dtype)
            if not err <= tol:
                raise CacheMismatch(f"logits differ from a full forward by {err:.3g} (relative)")
        return pre


def float32_twin(model: nn.Module, *, headroom: float = 1.5) -> nn.Module | None:
    """A float32 model with `model`'s weights for checking a cache path (`SharedPrefix.checked(check_model=)`):
    `model` itself when it is float32, else a float32 copy on its device when that fits in the device's free
    memory with `headroom` to spare (None when it does not, or `model` has no parameters). Call it on a model
    without packed layers (before `packed_linears`): a copy keeps its own plain linear layers."""
    import copy

    p = next(model.parameters(), None)
    if p is None:
        return None
    if p.dtype == torch.float32:
        return model
    need = headroom * 4 * sum(q.numel() for q in model.parameters())
    try:
        if p.device.type == "cuda":
            free = torch.cuda.mem_get_info(p.device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no reading of free memory: no copy, the check runs in the model's dtype
        return None
    if need > free:
        return None
    try:
        return copy.deepcopy(model).float().eval()
    except Exception:  # noqa: BLE001 - a model that does not copy or cast (or no memory after all): no check copy
        return None


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and any final logit soft-capping) to final hidden states (..., d)."""
    head = model.get_output_embeddings()
    if head is None:
        raise MechdiffError(f"{type(model).__name__} has no output embedding (LM head)")
    logits = head(hidden.to(head.weight.dtype))  # a no-op unless the model runs in another dtype (pair.dtype)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


@contextlib.contextmanager
def edit_at(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Within the block, the site's activation t (B, T, d) becomes fn(t) on every forward (None leaves t as is).

    The one public hook of the project: reading, replacing, adding, SAE splicing and steering are built on it.
    `fn` must not modify `t` in place (clone it first); stack several sites with `contextlib.ExitStack`.
    """
    with _hooks(_register_hook(model, site, fn)):
        yield


@contextlib.contextmanager
def edit_heads_at(model: nn.Module, heads: Heads, layer: int,
                  fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """`edit_at` one level finer: the heads' outputs z (B, T, n_heads * head_dim), the input of layer `layer`'s
    attention output projection, become fn(z) on every forward (None leaves z as is; do not modify z in place)."""

    def pre(_m, args, kwargs):
        z = args[0] if args else kwargs["input"]
        new = fn(z)
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "input": new})

    with _hooks([heads.projections[layer].register_forward_pre_hook(pre, with_kwargs=True)]):
        yield


@contextlib.contextmanager
def read_at(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """Within the block, fn(t) sees the site's (detached) activation t (B, T, d) on every forward; t is unchanged."""

    def read(t: torch.Tensor) -> None:
        fn(t.detach())

    with edit_at(model, site, read):
        yield


def _where(t: torch.Tensor, positions: torch.Tensor | None, rows: torch.Tensor | None):
    """Index of the (row, position) cells of t (B, T, d): one position per row, or every position when None."""
    if positions is None:
        return (slice(None) if rows is None else rows.to(t.device), slice(None))
    pos = torch.as_tensor(positions).long().to(t.device)
    r = torch.arange(t.shape[0], device=t.device) if rows is None else torch.as_tensor(rows).long().to(t.device)
    if r.shape != pos.shape:
        raise MechdiffError(f"positions must give one position per patched row: {tuple(pos.shape)} vs {tuple(r.shape)}")
    return (r, pos)


def _vectors_for(t: torch.Tensor, vectors: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    v = torch.as_tensor(vectors).to(device=t.device, dtype=t.dtype)
    return v[:, None, :] if positions is None and v.dim() == 2 else v


@contextlib.contextmanager
def replace_at(model: nn.Module, site: Site, positions: torch.Tensor | None, vectors: torch.Tensor, *,
               rows: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the site's activation at (rows[i], positions[i]) becomes vectors[i].

    rows None = every batch row in order (row b at positions[b]); positions None = every position of the rows
    (vectors (B, d) per row, or one (d,) vector).
    """

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[_where(t, positions, rows)] = _vectors_for(t, vectors, positions)
        return t

    with edit_at(model, site, fn):
        yield


@contextlib.contextmanager
def add_at(model: nn.Module, site: Site, positions: torch.Tensor | None, vectors: torch.Tensor, *,
           scale: float = 1.0, rows: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, scale * vectors[i] is added to the site's activation at (rows[i], positions[i]).

    Same indexing as `replace_at` (positions None = every position: steering a whole prompt).
    """

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        idx = _where(t, positions, rows)
        t[idx] = t[idx] + float(scale) * _vectors_for(t, vectors, positions)
        return t

    with edit_at(model, site, fn):
        yield


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (the ids it can read), or None when it has no such embedding."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else None


def model_width(model: nn.Module) -> int:
    """Residual stream width (hidden size)."""
    cfg = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return int(cfg.get_text_config().hidden_size)


def plan_sites(
    n_layers: int, *, stride: int, detail_layers: Sequence[int] = (), extra: Sequence[str] = (),
    token_layers: Sequence[int] = (),
) -> dict[str, list[str]]:
    """Which views to store at which sites: {site name: views}.

    resid_post `last`+`mean` every `stride` layers (and the last layer); `detail_layers` add attn_out and
    mlp_out; `extra` sites (e.g. transport sites) get `last`+`mean`; `token_layers` add every-token rows
    at resid_post (for SAEs). Layers out of range raise a one-line error.
    """
    plan: dict[str, list[str]] = {}

    def add(site: Site, views: Sequence[str]) -> None:
        if not 0 <= site.layer < n_layers:
            raise MechdiffError(
                f"site {site.name} is out of range: the model has {n_layers} blocks (0..{n_layers - 1}); fix params.yaml"
            )
        cur = plan.setdefault(site.name, [])
        cur.extend(v for v in views if v not in cur)

    for layer in [*range(0, n_layers, stride), n_layers - 1]:
        add(Site(layer, "resid_post"), ["last", "mean"])
    for layer in detail_layers:
        for kind in ("resid_post", "attn_out", "mlp_out"):
            add(Site(layer, kind), ["last", "mean"])
    for name in extra:
        add(Site.parse(name), ["last", "mean"])
    for layer in token_layers:
        add(Site(layer, "resid_post"), ["last", "mean", "tokens"])
    return dict(sorted(plan.items(), key=lambda kv: Site.parse(kv[0])))
