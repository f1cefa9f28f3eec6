"""Stage models: load the base (or tuned) model once and save it as safetensors under artifacts/models/."""

import os
import sys
import time
from pathlib import Path

import mechdiff.model.recipes as _recipes
import mechdiff.pipeline as P
from mechdiff.data.corpus import load_prompts
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.load import (
    check_pair,
    load_model,
    load_saved,
    load_spec_tokenizer,
    pair_template_warning,
    save_model,
    take_pair_template,
    wants_other_template,
)
from mechdiff.model.recipes import (
    CHECKPOINT_EVERY_S,
    check_finetune,
    finetune,
    finetune_signature,
    plant_edit,
)
from mechdiff.params import load_params
from mechdiff.resume import environment, files_digest, fingerprint, prepare_output


def main() -> None:
    which = sys.argv[1] if len(sys.argv) == 2 else ""
    if which not in ("base", "tuned"):
        raise MechdiffError("usage: python stages/models.py base|tuned")
    p = load_params()
    t0 = time.time()
    if which == "base":
        spec = p.pair.base
        model, tok = load_model(spec.id, gguf_file=spec.gguf_file, revision=spec.revision, dtype=p.pair.dtype)
        meta = {"role": "base", "spec": spec.id, "gguf_file": spec.gguf_file}
        t = p.pair.tuned
        # one prompt format per pair (data.chat_template): the base may take the tuned model's chat template
        if t.id and wants_other_template(tok, "base", p.data.chat_template):
            took = take_pair_template(tok, load_spec_tokenizer(t.id, gguf_file=t.gguf_file, revision=t.revision),
                                      "base", p.data.chat_template)
            if took:
                meta["chat_template"] = "the tuned model's"
                print(f"models: {took}")
        save_model(model, tok, P.model_dir("base"), meta)
        print(f"models: base {spec.id} saved in {time.time() - t0:.0f}s")
        return
    t = p.pair.tuned
    if t.id:
        model, tok = load_model(t.id, gguf_file=t.gguf_file, revision=t.revision, dtype=p.pair.dtype)
        base, btok = load_saved(P.model_dir("base"), dtype=p.pair.dtype)
        check_pair(base, btok, model, tok, fairness=p.pair.fairness.enabled)
        meta = {"role": "tuned", "spec": t.id}
        took = take_pair_template(tok, btok, "tuned", p.data.chat_template)  # the mirror case
        if took:
            meta["chat_template"] = "the base model's"
            print(f"models: {took}")
        warning = pair_template_warning(btok, tok) if p.data.chat else None
        if warning:
            print(f"models: warning: {warning}")
        summary = {"recipe": 0}
    elif t.recipe == "finetune":
        model, tok = load_saved(P.model_dir("base"), dtype=p.pair.dtype)
        ft = p.pair.finetune
        train = [q for q in load_prompts(P.PROMPTS) if q.split == "train"]
        chosen = [q for q in train if q.dataset == ft.dataset]
        texts = [q.text for q in chosen]
        if not texts:
            raise MechdiffError(f"pair.finetune.dataset {ft.dataset!r} has no train prompts: check data/, data.sources "
                                "and data.splits")
        if ft.objective in ("signature", "answer"):
            retain = [q.text for q in train if q.dataset in ft.retain and q.dataset != ft.dataset]
            if ft.objective == "answer" and not all(q.reference for q in chosen):
                raise MechdiffError(f"pair.finetune.objective answer needs a reference answer on every "
                                    f"{ft.dataset!r} record: use a dataset with references (e.g. math)")
            answers = dict(answers=[q.reference for q in chosen]) if ft.objective == "answer" else dict(
                signature=ft.signature)
        else:
            retain, answers = None, {}
        every = os.environ.get("MECHDIFF_CHECKPOINT_S", str(CHECKPOINT_EVERY_S))
        try:
            every_s = float(every)
        except ValueError:
            every_s = -1.0
        if not every_s >= 0:
            raise MechdiffError(f"MECHDIFF_CHECKPOINT_S={every!r}: give the seconds between fine-tune checkpoints, "
                                "a number >= 0")
        # every check the fine-tune makes, before the output folder (maybe a finished tuned model) is replaced
        check_finetune(model, texts, retain, **answers, layers=ft.layers, steps=ft.steps, lr=ft.lr,
                       batch_size=ft.batch_size, max_len=ft.max_len)
        # an interrupted fine-tune resumes from its last state in the (persisted) output folder, if that state
        # came from these settings, this base model, these prompts (texts, datasets, splits, references) and this
        # code (the package and this script), in this environment (libraries, CPU kind: `resume.environment`)
        import mechdiff.model.cache  # noqa: F401  (the fine-tune imports it lazily: hashed with the rest)

        pkg = Path(_recipes.__file__).parents[1]  # the package's modules this process runs: the stage's code deps
        code = sorted({Path(m.__file__) for m in list(sys.modules.values())
                       if getattr(m, "__file__", None) and Path(m.__file__).is_relative_to(pkg)}) + [Path(__file__)]
        fp = fingerprint([vars(ft), p.seed, p.data.chat, p.pair.dtype, files_digest(P.model_dir("base")),
                          files_digest(P.PROMPTS), [files_digest(f) for f in code], environment()])
        prepare_output(P.model_dir("tuned"), fp)
        resume = dict(checkpoint=P.model_dir("tuned") / "finetune_state.pt", checkpoint_every=every_s)
        if ft.objective in ("signature", "answer"):
            losses = finetune_signature(
                model, tok, texts, retain, **answers, layers=ft.layers, steps=ft.steps, lr=ft.lr,
                batch_size=ft.batch_size, max_len=ft.max_len, seed=p.seed, retain_weight=ft.retain_weight,
                chat=p.data.chat, **resume)
        else:
            losses = finetune(model, tok, texts, layers=ft.layers, steps=ft.steps, lr=ft.lr,
                              batch_size=ft.batch_size, max_len=ft.max_len, seed=p.seed, **resume)
        write_csv(P.plot("finetune_loss.csv"), [{"step": i, "loss": v} for i, v in enumerate(losses)])
        meta = {"role": "tuned", "recipe": "finetune", "finetune": vars(ft), "n_texts": len(texts)}
        summary = {"n_texts": len(texts), "loss_first": losses[0], "loss_last": losses[-1]}
    else:
        model, tok = load_saved(P.model_dir("base"), dtype=p.pair.dtype)
        e = p.pair.edit
        info = plant_edit(model, layer=e.layer, kind=e.site, rank=e.rank, scale=e.scale, seed=p.seed, heads=e.heads)
        meta = {"role": "tuned", "recipe": "edit", "edit": info.to_json()}
        # heads as text ("1,5", or "all" for the whole site): DVC's metrics tables leave out lists and nulls
        summary = {"edit_layer": e.layer, "edit_site": e.site, "edit_rank": e.rank, "edit_scale": e.scale,
                   "edit_heads": "all" if e.heads is None else ",".join(map(str, e.heads))}
    if not (t.recipe == "finetune" and not t.id):
        write_csv(P.plot("finetune_loss.csv"), [])
    save_model(model, tok, P.model_dir("tuned"), meta)
    write_json(P.metric("model_tuned.json"), {**summary, "seconds": time.time() - t0})
    print(f"models: tuned saved in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    run_stage(main)
