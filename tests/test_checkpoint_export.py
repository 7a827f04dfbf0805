"""A training checkpoint becomes a loadable LBRModel folder, tied embeddings included (SmolLM2 ties
its input embeddings to the LM head; safetensors stores such a pair under one name)."""
import numpy as np
import torch

from pipeline.config import load_train_config
from pipeline.train.engines import TorchEngine
from pipeline.train.ray_runner import export_model
from stages import LBRModel
from stages.tiny import build_tiny_backbone


def test_export_of_tied_embedding_checkpoint(tmp_path):
    bb = build_tiny_backbone(tmp_path / "tied", tie_embeddings=True)
    cfg = load_train_config(None, ["stage=generative", "model.num_bottleneck=2", "model.lora_r=4"])
    torch.manual_seed(cfg.seed)
    from pipeline.train.start_model import prepare_model

    model = prepare_model(cfg, bb)
    assert model.lm.config.tie_word_embeddings
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)           # "trained"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    TorchEngine(model, cfg.optim, 1).save(str(ckpt), 1)
    export_model(cfg, bb, ckpt, tmp_path / "model")
    texts = ["protein kinase", "return value"]
    np.testing.assert_allclose(LBRModel.from_pretrained(tmp_path / "model").encode(texts), model.encode(texts),
                               atol=1e-6)
