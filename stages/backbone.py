"""Load a causal-LM backbone and its tokenizer from local files only (no hub)."""
from __future__ import annotations

from pathlib import Path


def load_backbone(path: str | Path, gguf_file: str | None = None, num_layers: int | None = None):
    """Return (model, tokenizer) for a local `AutoModelForCausalLM` folder, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"backbone path {path} does not exist")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if num_layers is not None:
        layers = model.get_decoder().layers
        if not 0 < num_layers <= len(layers):
            raise ValueError(f"num_layers={num_layers} must be in 1..{len(layers)}")
        model.get_decoder().layers = layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    return model, tok
