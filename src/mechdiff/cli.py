"""The `mechdiff` console script: data materialisation, inspection and remotes.

The pipeline itself runs through DVC (`dvc repro`); this script covers what
sits around it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mechdiff.errors import DAMAGED, MechdiffError, first_line

EPILOG = """\
typical use:
  make run                        # venv + data + dvc repro on the default pair
  mechdiff data                   # materialise data/ (dvc pull, else rebuild from the package's corpora)
  mechdiff params [--check]       # validate params.yaml, print it, check models, tokenizers and data
  mechdiff sites                  # which sites/views `extract` stores for the current params
  mechdiff remote add s3://bucket/path [--endpoint-url URL]   # configure the default DVC remote
  mechdiff remote check           # is the remote configured and reachable?
  mechdiff plots-offline          # `dvc plots show/diff` pages that work without a network
"""


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else (shutil.which("dvc") or "dvc")


def _sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True)


def _same_as_recorded(root: Path, *, may_be_edited: bool = False) -> bool:
    """Whether data/ holds the files data.dvc records. DVC does not compare a workspace whose recorded files are not in
    its cache (`dvc status` says "not in cache" for an edited data/ too), so hash data/ with `dvc commit` (which puts
    its files into the cache) and compare the hash with the recorded one; data.dvc is left as it was. A data/ that
    `may_be_edited` is not committed under a link cache type (its files would become links into the cache, which a
    later `dvc gc` may delete): False then."""
    import yaml

    dvcfile = root / "data.dvc"
    link = _sh([_dvc(), "config", "cache.type"], root).stdout if may_be_edited else ""
    if "symlink" in link or "hardlink" in link:
        return False
    recorded = dvcfile.read_text()

    def md5(text: str) -> object:
        try:
            return ((yaml.safe_load(text) or {}).get("outs") or [{}])[0].get("md5")
        except (yaml.YAMLError, AttributeError, IndexError):
            return None

    try:
        r = _sh([_dvc(), "commit", "-f", "-q", "data.dvc"], root)
        now, then = md5(dvcfile.read_text()), md5(recorded)
        return r.returncode == 0 and then is not None and now == then
    finally:
        dvcfile.write_text(recorded)


def cmd_data(ns: argparse.Namespace) -> int:
    """Materialise data/ so that `dvc status data.dvc` is clean."""
    root = Path(ns.root)
    data_dir = root / "data"
    dvcfile = root / "data.dvc"
    if dvcfile.exists() and data_dir.exists():
        st = _sh([_dvc(), "status", "data.dvc"], root)
        if st.returncode == 0 and "changed" not in st.stdout and "deleted" not in st.stdout:
            print("data/ is up to date")
            return 0
        if st.returncode == 0 and "not in cache" in st.stdout and "modified" not in st.stdout and _same_as_recorded(
                root, may_be_edited=True):
            print("data/ is up to date (its files are now in the DVC cache too)")
            return 0
    if dvcfile.exists() and data_dir.exists() and any(data_dir.iterdir()):  # edited or partial: keep it, never delete a user's edit
        keep = root / f"data.bak-{time.strftime('%Y%m%d-%H%M%S')}"
        data_dir.rename(keep)
        print(f"data/ differed from data.dvc: moved it to {keep.name}/ (to use an edited corpus instead, move it "
              "back, `dvc add data` and commit data.dvc)")
    pulled = False
    if dvcfile.exists() and not ns.rebuild:
        remotes = _sh([_dvc(), "remote", "list"], root).stdout.strip()
        if remotes:
            r = _sh([_dvc(), "pull", "-q", "data.dvc"], root)
            pulled = r.returncode == 0
            print("restored data/ with `dvc pull` (from the DVC cache or remote)" if pulled
                  else "DVC remote did not answer; rebuilding data/")
    if not pulled:
        from mechdiff.data.corpus import write_default_corpora

        if data_dir.exists():
            shutil.rmtree(data_dir)
        files = write_default_corpora(data_dir)
        print(f"wrote {len(files)} corpus files into {data_dir}")
    if dvcfile.exists():
        if not _same_as_recorded(root):  # hashes the files and puts them into the local cache
            raise MechdiffError(
                "the rebuilt data/ differs from data.dvc (the corpus code changed): run `dvc add data` and commit data.dvc"
            )
    else:
        r = _sh([_dvc(), "add", "-q", "data"], root)
        if r.returncode != 0:
            raise MechdiffError(f"`dvc add data` failed: {r.stderr.strip().splitlines()[-1] if r.stderr else ''}")
        print("created data.dvc: commit it with git")
    print("data/ ready (dvc status data.dvc is clean)")
    return 0


#: datasets a stage cannot run without (features compares cultural with control prompts)
STAGE_DATASETS = {"features": ("cultural", "control")}


def layer_params(p) -> list[tuple[str, int]]:
    """(params key, layer) of every layer the params name (sites, layer lists, single layers)."""
    from mechdiff.model.sites import Site

    out = [(f"transport.sites ({s})", Site.parse(s).layer) for s in p.transport.sites]
    out += [(f"steer.sites ({s})", Site.parse(s).layer) for s in p.steer.sites if s != "layers"]
    lists = {"extract.detail_layers": p.extract.detail_layers, "sae.layers": p.sae.layers}
    if "layers" in p.steer.sites:  # read only by the "layers" configuration of the steering stage
        lists["steer.layers"] = p.steer.layers
    if isinstance(p.probes.concat_layers, list):  # else "auto": the stored layers
        lists["probes.concat_layers"] = p.probes.concat_layers
    if not p.pair.tuned.id and p.pair.tuned.recipe == "finetune":  # read only when the pipeline fine-tunes
        lists["pair.finetune.layers"] = p.pair.finetune.layers or []
    for key, layers in lists.items():
        out += [(key, int(x)) for x in layers]
    out += [("hsae.layer", p.hsae.layer), ("gates.layer", p.gates.layer)]
    if not p.pair.tuned.id and p.pair.tuned.recipe == "edit":
        out.append(("pair.edit.layer", p.pair.edit.layer))
    return out


def _check_layers(p, n_layers: int) -> list[str]:
    """Every layer the params name exists in a model of n_layers blocks."""
    bad = [f"{k}: layer {x}" for k, x in layer_params(p) if not 0 <= x < n_layers]
    if not bad:
        return []
    return [f"{'; '.join(bad[:4])}{f' (and {len(bad) - 4} more)' if len(bad) > 4 else ''}: out of range, the base "
            f"model has {n_layers} blocks (0..{n_layers - 1})"]


def _check_stored_layers(p, n_layers: int) -> list[str]:
    """Layers a stage reads from the store's resid_post rows are among those `extract` writes; the gates' layer
    has the SAEs they read."""
    from mechdiff.model.sites import Site, plan_sites

    plan = plan_sites(n_layers, stride=p.extract.layer_stride, detail_layers=p.extract.detail_layers,
                      extra=p.transport.sites, token_layers=p.sae.layers)
    stored = sorted(Site.parse(s).layer for s in plan if s.endswith(".resid_post"))
    missing = [x for x in p.probes.concat_layers if x not in stored] if isinstance(p.probes.concat_layers, list) else []
    problems = []
    if missing:
        problems.append(f"probes.concat_layers: layer {', '.join(map(str, missing))} is not stored by extract "
                        f"(resid_post at {', '.join(map(str, stored))}): pick stored layers or add them to "
                        "extract.detail_layers")
    lacking = [src for src in ("base", "tuned", "delta") if src not in p.sae.sources]
    if p.gates.layer not in p.sae.layers or lacking:
        problems.append(f"gates.layer: the gates read the base, tuned and delta SAEs at L{p.gates.layer}, but the "
                        f"SAEs are trained at sae.layers {p.sae.layers} for sae.sources {p.sae.sources}: set "
                        "gates.layer to one of sae.layers, with base, tuned and delta in sae.sources")
    return problems


def _check_models(p, root: Path = Path(".")) -> list[str]:
    """Model specs resolve (no download); layers the params name are in range; with two given models, their
    tokenizers vs pair.fairness.enabled. A GGUF file is parsed once for its config and its tokenizer."""
    from mechdiff.model.load import gguf_read_once

    with gguf_read_once():
        return _check_models_read(p, root)


def _check_models_read(p, root: Path) -> list[str]:
    from mechdiff.model.load import check_spec, check_tokens_fit, check_vocab, spec_shape, spec_tokenizer

    problems, infos = [], {}
    specs = {"base": p.pair.base, "tuned": p.pair.tuned} if p.pair.tuned.id else {"base": p.pair.base}
    for which, spec in specs.items():
        try:
            infos[which] = check_spec(spec.id, gguf_file=spec.gguf_file, revision=spec.revision,
                                      key=f"pair.{which}.id")
        except MechdiffError as e:
            problems.append(str(e))
    shapes, bad_config = {}, set()
    for w, info in infos.items():
        try:
            shapes[w] = spec_shape(info, revision=specs[w].revision)
        except DAMAGED as e:  # a hub model not cached yet: the stages check their layers after download
            if info["kind"] == "dir":
                bad_config.add(w)
                problems.append(f"pair.{w}.id: cannot read the model's config.json in {info['path']} "
                                f"({first_line(e, 120)}): fix or re-download it")
            elif info["kind"] in ("gguf", "package"):
                bad_config.add(w)
                problems.append(f"pair.{w}.id: cannot read the GGUF file {Path(info['path']) / info['gguf_file']} "
                                f"({first_line(e, 120)}): it is damaged or cut short (an "
                                "interrupted download?): re-download it")
    if shapes.get("base", (None,))[0]:
        problems += _check_layers(p, shapes["base"][0]) or _check_stored_layers(p, shapes["base"][0])
    width = shapes.get("base", (None, None, None))[1]
    problems += _check_heads(p, shapes.get("base", (None, None, None))[2])
    if width and not p.pair.tuned.id and p.pair.tuned.recipe == "edit":
        from mechdiff.model.recipes import check_edit_layer, check_edit_rank

        try:
            n_blocks = shapes["base"][0]
            if n_blocks and 0 <= p.pair.edit.layer < n_blocks:  # out of range: named by _check_layers above
                check_edit_layer(p.pair.edit.layer, p.pair.edit.site, n_blocks)
            check_edit_rank(p.pair.edit.rank, width)
        except MechdiffError as e:
            problems.append(str(e))
    if width:
        from mechdiff.analysis.patching import check_reported_rank

        try:
            check_reported_rank(p.rank, width)
        except MechdiffError as e:
            problems.append(str(e))
    if len(shapes) == 2:
        for i, what in enumerate(("blocks", "hidden size")):
            b, t = shapes["base"][i], shapes["tuned"][i]
            if b and t and b != t:
                problems.append(f"pair.tuned.id: the tuned model has {t} {what} but the base has {b}: diff a model "
                                "against its own fine-tune")
    toks = {}
    for w, info in infos.items():  # every model needs its tokenizer; a hub one not cached yet is checked later
        if w in bad_config:  # the tokenizer loader reads config.json too: its error would blame the tokenizer
            continue
        try:
            toks[w] = spec_tokenizer(info, revision=specs[w].revision)
        except (OSError, ValueError, KeyError) as e:
            if info["kind"] != "hub":
                where = info.get("path", specs[w].id)
                problems.append(f"pair.{w}.id: no usable tokenizer in {where} (tokenizer.json or "
                                f"tokenizer_config.json missing or unreadable: {str(e).splitlines()[0][:120]})")
            continue
        try:
            check_tokens_fit(toks[w], shapes.get(w, (None,) * 4)[3], f"pair.{w}.id")
        except MechdiffError as e:
            problems.append(str(e))
    if len(toks) == 2:
        try:
            check_vocab(toks["base"], toks["tuned"], fairness=p.pair.fairness.enabled)
        except MechdiffError as e:
            problems.append(str(e))
    return problems + _check_sae_width(p, width) + _check_pretrained(p, width, root)


def _check_heads(p, n_heads: int | None) -> list[str]:
    """Head indices the params name (patch.attn_heads, pair.edit.heads when the edit recipe runs) exist."""
    if not n_heads:
        return []
    named = {"patch.attn_heads": p.patch.attn_heads if isinstance(p.patch.attn_heads, list) else []}
    if not p.pair.tuned.id and p.pair.tuned.recipe == "edit":
        named["pair.edit.heads"] = p.pair.edit.heads or []
    return [f"{key}: head {max(heads) if max(heads) >= n_heads else min(heads)} is out of range, the base model has "
            f"{n_heads} attention heads (0..{n_heads - 1})" for key, heads in named.items()
            if heads and (max(heads) >= n_heads or min(heads) < 0)]


def _check_sae_width(p, width: int | None) -> list[str]:
    """What the SAEs' width (sae.expansion x the model's width) bounds: sae.k and probes.sparse_k."""
    if not width:
        return []
    latents = p.sae.expansion * width
    problems = []
    if p.sae.k > latents:
        problems.append(f"sae.k: {p.sae.k} exceeds the SAE width {latents} (sae.expansion {p.sae.expansion} x the "
                        f"model's width {width}): lower sae.k or raise sae.expansion")
    big = [k for k in p.probes.sparse_k if k > latents]
    if big and not p.sae.pretrained:  # an imported SAE has its own width
        problems.append(f"probes.sparse_k: {big} exceed the SAE width {latents} (sae.expansion x the model's width "
                        f"{width}): use k <= {latents}")
    return problems


def _check_pretrained(p, width: int | None, root: Path) -> list[str]:
    """Local `sae.pretrained` files load and read activations of the model's width (hub ones: at the stage); a
    relative path is read from the repository root, as the stage reads it."""
    from mechdiff.sae.pretrained import load_pretrained

    problems = []
    for key, spec in p.sae.pretrained.items():
        if str(spec).startswith("hf:"):
            continue
        path = Path(spec).expanduser()
        try:
            load_pretrained(str(path if path.is_absolute() else root / path), d_in=width)
        except MechdiffError as e:
            problems.append(f"sae.pretrained {key}: {e}")
        except Exception as e:  # noqa: BLE001 - whatever a foreign file does, the check reports it and goes on
            problems.append(f"sae.pretrained {key}: {spec} is not readable ({type(e).__name__}: {str(e)[:120]})")
    return problems


def _check_data(p, root: Path) -> list[str]:
    """Sources exist and have records; the datasets the enabled stages need are among them."""
    from mechdiff.data.corpus import source_datasets

    key = "data.sources" if p.data.sources is not None else "data.dir"
    try:
        names = source_datasets(root / p.data.dir, p.data.sources)
    except MechdiffError as e:
        return [f"{key}: {e}"]
    problems = []
    have = ", ".join(sorted(names)) or "none"
    if not p.pair.tuned.id and p.pair.tuned.recipe == "finetune" and p.pair.finetune.dataset not in names:
        problems.append(f"pair.finetune.dataset: {p.pair.finetune.dataset!r} is not in the corpus (datasets: {have}): "
                        f"choose one of them or add it to {key}")
    for stage, needed in STAGE_DATASETS.items():
        missing = [d for d in needed if d not in names]
        if missing and p.sae.layers:
            problems.append(f"{key}: the {stage} stage needs datasets {', '.join(needed)}; {', '.join(missing)} "
                            f"missing (datasets: {have}): add a source named {missing[0]!r}")
    wanted = {"behaviour.datasets": list(p.behaviour.datasets), "steer.target": [p.steer.target],
              "steer.controls": list(p.steer.controls), "steer.neutral": [p.steer.neutral],
              "heads.dataset": [p.heads.dataset], "probes.target": [p.probes.target],
              "probes.control": [p.probes.control]}
    if not p.pair.tuned.id and p.pair.tuned.recipe == "finetune" and p.pair.finetune.objective in (
            "signature", "answer"):  # those objectives keep the retain sets' behaviour (lm reads none)
        wanted["pair.finetune.retain"] = list(p.pair.finetune.retain)
    for what, needed in wanted.items():
        missing = [d for d in needed if d not in names]
        if missing:
            problems.append(f"{what}: {', '.join(missing)} not in the corpus (datasets: {have}): "
                            f"choose among them or add a source to {key}")
    local = all(not (isinstance(src, dict) and "hf" in src) for src in p.data.sources or [])
    for key, srcs in (("data.sources", p.data.sources), ("data.eval_sources", p.data.eval_sources)):
        for src in srcs or []:  # hub datasets: cached here, or the hub answers
            why = _hf_source_problem(src, root) if isinstance(src, dict) and "hf" in src else None
            if why:
                problems.append(f"{key}: {why}")
    if local and not problems:  # the prepare stage's prompts: no dataset may leave a split empty (hub ones: there)
        from mechdiff.data.corpus import prepared_prompts

        try:
            prompts = prepared_prompts(root / p.data.dir, p.data.sources, max_per_dataset=p.data.max_per_dataset,
                                       splits=p.data.splits, seed=p.seed)
        except MechdiffError as e:
            problems.append(str(e))
        else:  # the steer stage's rule, on every train prompt (the stage counts those fairness keeps: fewer or as many)
            groups = {q.group for q in prompts if q.dataset == p.steer.target and q.split == "train"}
            wrong = p.steer.groups_problem(len(groups), at_most=True) if p.steer.contrast == "controls" else None
            if groups and wrong:
                problems.append(wrong)
    from mechdiff.data.corpus import MC_SOURCES

    ekey = "data.eval_sources" if p.data.eval_sources is not None else "data.dir"
    try:
        evals = source_datasets(root / p.data.dir, p.data.eval_sources or MC_SOURCES)
    except MechdiffError as e:
        return [*problems, f"{ekey}: {e}"]
    if p.steer.neutral_mc not in evals:
        problems.append(f"steer.neutral_mc: {p.steer.neutral_mc!r} is not among the scored sets "
                        f"({', '.join(sorted(evals)) or 'none'}): choose one or add it to data.eval_sources")
    from mechdiff.data.corpus import load_concepts

    try:
        parents = load_concepts(root / p.data.dir)["parents"]
    except MechdiffError as e:
        problems.append(f"data.dir (the geometry stage's concept hierarchy): {e}")
    else:  # the hsae stage's teacher: one parent latent per concept parent, its children under it
        name, kids = max(((k, len(v["children"])) for k, v in parents.items()), key=lambda kv: kv[1])
        if kids > p.hsae.children:
            problems.append(f"hsae.children: {p.hsae.children} child latents per parent, but concept parent {name!r} "
                            f"has {kids} children ({p.data.dir}/concepts.json): raise hsae.children to {kids}")
        if len(parents) > p.hsae.width:
            problems.append(f"hsae.width: {p.hsae.width} parent latents, fewer than the {len(parents)} concept "
                            f"parents the teacher initialises ({p.data.dir}/concepts.json): raise hsae.width")
    if p.hsae.view == "tokens" and p.hsae.layer not in p.sae.layers:
        problems.append(f"hsae.layer: L{p.hsae.layer} has no `tokens` view in the store (every-token rows are kept "
                        f"at sae.layers {p.sae.layers}): add {p.hsae.layer} to sae.layers or set hsae.view to last")
    return problems


def _check_devices(p) -> list[str]:
    """Device params name a device this machine has."""
    import torch

    problems = []
    for key in ("extract", "sae", "patch", "steer", "heads"):
        dev = str(getattr(p, key).device)
        kind = dev.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            problems.append(f"{key}.device: {dev!r} but this machine has no CUDA device: use cpu")
        elif kind not in ("cpu", "cuda", "mps", "xpu"):
            problems.append(f"{key}.device: unknown device {dev!r}: use cpu or cuda")
    return problems


def _check_sections(path: Path) -> list[str]:
    """Every key of the params is written in params.yaml: `dvc repro` reads them from the file, where a missing one
    stops it (`load_params` would fill in the default and hide that)."""
    from mechdiff.params import missing_keys, read_raw

    missing = missing_keys(read_raw(path))
    if not missing:
        return []
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    return [f"params.yaml: {shown} missing: every stage reads its keys from the file; restore "
            f"{'them' if len(missing) > 1 else 'it'} (git checkout params.yaml, or copy from the repository's params.yaml)"]


def cmd_params(ns: argparse.Namespace) -> int:
    """Validate params.yaml, print it back as typed values, and check cheaply what `dvc repro` would fail on."""
    import dataclasses
    import json

    from mechdiff.params import load_params

    root = Path(ns.root)
    p = load_params(root / "params.yaml")
    if not ns.check:
        print(json.dumps(dataclasses.asdict(p), indent=2))
    # a missing key first, alone: the other checks would read its default, which dvc repro never runs with
    problems = (_check_sections(root / "params.yaml")
                or _check_models(p, root) + _check_data(p, root) + _check_devices(p))
    for msg in problems:
        print(f"mechdiff: error: {msg}", file=sys.stderr)
    if problems:
        return 2
    print("params: ok (models resolve, tokenizers fit pair.fairness, data sources and datasets present)")
    tip = dtype_tip(p)
    if tip:
        print(tip)
    return 0


def dtype_tip(p) -> str | None:
    """A suggestion to run the models in bf16 where this CPU has native bf16 matrix units (None otherwise)."""
    from mechdiff.model.kernels import cpu_bf16_units

    units = cpu_bf16_units()
    if not units or p.extract.dtype != "float32" or not str(p.extract.device).startswith("cpu"):
        return None
    return (f"params: tip: this CPU has native bf16 matrix units ({units}): `dvc exp run -S pair.dtype=bfloat16 "
            f"-S extract.dtype=bfloat16 -S sae.select_dtype=bfloat16` runs every model forward (and the SAEs' top-k "
            f"selection) in bf16, faster on these units; every statistic stays float32/float64, but near-zero "
            f"quantities move (README 'bf16 runs' has the measured times and costs). The dtype is an explicit param, so "
            f"float32 runs reproduce on machines without bf16 units.")


def cmd_sites(ns: argparse.Namespace) -> int:
    """Print the sites and views `extract` stores for the current params and model."""
    from mechdiff.model.sites import plan_sites
    from mechdiff.params import load_params

    p = load_params(Path(ns.root) / "params.yaml")
    n = ns.n_layers
    if n is not None and n < 1:
        raise MechdiffError(f"--n-layers must be >= 1 (the model's number of blocks), got {n}")
    if n is None:
        from mechdiff.pipeline import model_dir

        cfg = Path(ns.root) / model_dir("base") / "config.json"
        if not cfg.exists():
            raise MechdiffError(f"no {model_dir('base')} yet: run `dvc repro model_base` or pass --n-layers")
        import json

        c = json.loads(cfg.read_text())
        n = c.get("num_hidden_layers") or c.get("n_layer")
    plan = plan_sites(n, stride=p.extract.layer_stride, detail_layers=p.extract.detail_layers,
                      extra=p.transport.sites, token_layers=p.sae.layers)
    for site, views in plan.items():
        print(f"{site:20s} {', '.join(views)}")
    return 0


def _hf_source_problem(src: dict, root: Path) -> str | None:
    """Why an `hf` source cannot load here, found without downloading (`mechdiff params --check`): a hub dataset
    that is in neither local cache (the hub's files or `datasets`' prepared copy) while the hub does not answer.
    None when it may load: data files, a builder or canonical name (no "/"), a folder under the repository root
    (where the prepare stage runs `load_dataset`), a cached dataset, or a reachable hub."""
    from mechdiff.data.corpus import hf_offline_hint

    hf, name = str(src["hf"]), str(src.get("name"))
    if src.get("data_files") is not None or "/" not in hf or (root / hf).exists():
        return None
    try:
        from datasets import config as ds_config
        from huggingface_hub import constants as hub_constants
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    roots = [Path(hub_constants.HF_HUB_CACHE) / f"datasets--{hf.replace('/', '--')}",
             Path(ds_config.HF_DATASETS_CACHE) / hf.replace("/", "___")]
    if src.get("cache_dir") is not None:
        roots.append(Path(str(src["cache_dir"])) / hf.replace("/", "___"))
    if any(r.is_dir() for r in roots):
        return None
    from mechdiff.model.load import hub_reachable

    if hub_reachable():
        return None
    return (f"dataset {hf!r} of source {name!r} is in no local cache and the Hugging Face hub does not answer: "
            + hf_offline_hint(hf, name))


def cmd_remote(ns: argparse.Namespace) -> int:
    """Configure or check the default DVC remote."""
    from mechdiff import remote

    root = Path(ns.root)
    if ns.action == "add":
        if not ns.url:
            raise MechdiffError("usage: mechdiff remote add URL [--name storage] [--endpoint-url URL]")
        name = ns.name or remote.DEFAULT_REMOTE
        stored = remote.configure_remote(root, ns.url, name=name, endpoint_url=ns.endpoint_url)
        print(f"remote {name!r} -> {ns.url} (default)")
        if remote.is_local_url(stored):
            where = remote.local_remote_path(stored, root)
            if not where.is_dir():
                print(f"note: {where} does not exist yet: `dvc push` creates it (`dvc pull` from it finds nothing), "
                      "so check the path if it should hold shared results")
        plugin = remote.remote_plugin_for(ns.url)
        if plugin:
            import importlib.util

            if importlib.util.find_spec(plugin.replace("-", "_")) is None:
                print(f"this remote needs the DVC plugin {plugin}: {remote.plugin_install_hint(ns.url)}")
    else:  # without --name, the remote `dvc pull` / `dvc push` use: the repo's default
        remote.check_remote(root, ns.name, for_pull=not ns.for_push)
        print(f"remote {ns.name or remote.default_remote(root)!r} is configured and reachable")
    return 0


OFFLINE_TEMPLATE = "tmp/plots_offline.html"  # under .dvc/ (ignored by git), as DVC reads plots.html_template


def cmd_plots_offline(ns: argparse.Namespace) -> int:
    """Write an offline page template for DVC's plots pages and make it this clone's default."""
    from mechdiff.report.dvc_plots import offline_template

    root = Path(ns.root)
    if not (root / ".dvc").is_dir():
        raise MechdiffError(f"{root.resolve()} is not a DVC repository (no .dvc/): run it from the project root")
    path = offline_template(root / ".dvc" / OFFLINE_TEMPLATE)
    r = _sh([_dvc(), "config", "--local", "plots.html_template", OFFLINE_TEMPLATE], root)
    if r.returncode != 0:
        raise MechdiffError(f"`dvc config --local plots.html_template` failed: {(r.stderr or '').strip()[:200]}")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB, Vega inlined) and set it as plots.html_template in "
          ".dvc/config.local: `dvc plots show` and `dvc plots diff` pages now work offline "
          "(undo: dvc config --local --unset plots.html_template)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per task."""
    ap = argparse.ArgumentParser(
        prog="mechdiff",
        description="Reproducible model diffing: what did fine-tuning change inside a language model, where, "
        "and in how many directions? The pipeline runs with `dvc repro`; this tool prepares and inspects it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--root", default=".", help="repository root (default: .)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser(
        "data", help="materialise data/ (dvc pull when a remote answers, else rebuild)",
        description="Make data/ match data.dvc: `dvc pull data.dvc` when a DVC remote answers, else rebuild the "
        "corpora from the package. A data/ that differs from data.dvc (an edited or partial corpus) is never "
        "deleted: it is moved to data.bak-<time>/ first (to use an edited corpus instead, move it back, "
        "`dvc add data` and commit data.dvc). `make data` runs this.")
    d.add_argument("--rebuild", action="store_true", help="rebuild from the package's corpora without pulling")
    d.set_defaults(fn=cmd_data)
    pp = sub.add_parser(
        "params", help="validate params.yaml, print the effective values, check models and data",
        description="Validate params.yaml (types, ranges, names) and print the effective values with every "
        "default filled in; then check, without loading weights or downloading, that the models resolve (config, "
        "weights, tokenizer), that every layer the params name exists in the base model, that the tokenizers "
        "suit pair.fairness, and that the corpora hold the datasets the stages need. One line per problem; "
        "exit 2 if any. `make run` runs `mechdiff params --check` before `dvc repro`.")
    pp.add_argument("--check", action="store_true", help="only the checks (what `make run` does before dvc repro)")
    pp.set_defaults(fn=cmd_params)
    s = sub.add_parser(
        "sites", help="list the sites and views extract stores",
        description="List the sites (L<layer>.<resid_post|attn_out|mlp_out>) and views (last, mean, tokens) the "
        "extract stage writes for the current params (extract.layer_stride, extract.detail_layers, "
        "transport.sites, sae.layers), with the base model's depth read from its config.")
    s.add_argument("--n-layers", type=int, default=None, help="number of decoder blocks (default: read the base model)")
    s.set_defaults(fn=cmd_sites)
    r = sub.add_parser(
        "remote", help="configure (add) or check the DVC remote",
        description="`mechdiff remote add URL` makes URL the default DVC remote (written to .dvc/config, so "
        "commit it to share it; credentials stay in .dvc/config.local or the environment). `mechdiff remote "
        "check` tests that the remote --name (default: the repo's default remote, the one `dvc pull` uses) is configured, that its DVC plugin is installed "
        "and that its location exists (something was pushed there), so `dvc pull` can work; with --for-push only "
        "that it can be reached (an empty remote is fine before the first push). One line per problem.")
    r.add_argument("action", choices=["add", "check"])
    r.add_argument("url", nargs="?", help="remote URL: s3://, gs://, azure://, ssh://, or a directory")
    r.add_argument("--name", default=None, help="remote name (add: default storage; check: default the repo's "
                   "default remote)")
    r.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto, ...)")
    r.add_argument("--for-push", action="store_true",
                   help="check: only that the remote is reachable (an empty remote is fine before the first push)")
    r.set_defaults(fn=cmd_remote)
    o = sub.add_parser(
        "plots-offline", help="make `dvc plots show/diff` pages work without a network",
        description="DVC's plots pages load Vega from a CDN, so offline they are blank. This writes a page "
        f"template with Vega, Vega-Lite and Vega-Embed inlined to .dvc/{OFFLINE_TEMPLATE} (vl-convert-python's "
        "bundle) and sets it as this clone's plots.html_template (.dvc/config.local), so every later `dvc plots "
        "show` / `dvc plots diff` page works offline.")
    o.set_defaults(fn=cmd_plots_offline)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mechdiff` console script."""
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.fn(ns) or 0)
    except MechdiffError as e:
        print(f"mechdiff: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mechdiff params | head`: the reader closed stdout; stop quietly, as `cat` does
        if not _reader_gone(sys.stdout):
            raise  # a broken pipe elsewhere (a socket, a child's stdin) is a real error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return 141


def _reader_gone(stream) -> bool:
    """Whether the pipe behind `stream` has lost its reader (poll reports an error on its write end); True when
    that cannot be told (no poll, no file descriptor)."""
    import select

    try:
        p = select.poll()
        p.register(stream.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


if __name__ == "__main__":
    sys.exit(main())
