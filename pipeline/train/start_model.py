"""The model a training stage starts from (DESIGN §1 stage rules): a backbone for stage 1 or the
LLM+CL baseline, a stage-1 folder for LBR stage 2."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import TrainConfig
from stages.model import CONFIG_NAME, LBRModel


def is_lbr_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def idf_texts(cfg: TrainConfig) -> list[str]:
    """The first stage2.idf_max_docs documents (title + text) of stage2.idf_corpus: a local path or any
    pyarrow filesystem URI, in any stage-1 layout, read file by file and validated by the stage-1 rules (the
    Ray path's own reader: a bad record fails with file, line and reason unless data.skip_bad_records)."""
    from itertools import islice

    from pipeline.train.stream import file_rows, open_source
    from stages.readers import make_quarantine

    s2 = cfg.stage2
    as_corpus = dataclasses.replace(cfg, stage="generative")    # read it as a stage-1 corpus
    src = open_source(s2.idf_corpus, as_corpus)
    q = make_quarantine(cfg.data.skip_bad_records, None)
    rows = (r for path in src.files for r in file_rows(src, as_corpus, path, q))
    texts = [r["text"].strip() for r in islice(rows, s2.idf_max_docs)]
    if not texts:
        raise ValueError(f"stage2.idf_corpus={s2.idf_corpus}: no documents to fit the idf weights on")
    return texts


TOKEN_WEIGHTS_FILE = "token_weights.safetensors"


def save_token_weights(model: LBRModel, path: str | Path) -> Path:
    """The model's idf weights and fit summary as one small file (vocab floats), written atomically: the Ray
    driver fits once and every worker and the export load this instead of re-reading the corpus."""
    import json
    import os

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"token_weight": model.token_weight.detach().cpu().contiguous()}, str(tmp),
              metadata={"info": json.dumps(model.token_weight_info or {})})
    os.replace(tmp, path)
    return path


def load_token_weights(model: LBRModel, path: str | Path) -> LBRModel:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        weights, info = f.get_tensor("token_weight"), json.loads((f.metadata() or {}).get("info", "{}"))
    model.set_token_weights(weights, {**info, "loaded_from": str(path)})
    return model


def _with_stage2_weights(model: LBRModel, cfg: TrainConfig, token_weights: str | Path | None) -> LBRModel:
    if cfg.stage2.idf_corpus:
        if token_weights is not None:
            return load_token_weights(model, token_weights)
        model.fit_token_weights(idf_texts(cfg), power=cfg.stage2.idf_power)
    return model


def prepare_model(cfg: TrainConfig, model_path: str | Path, token_weights: str | Path | None = None) -> LBRModel:
    """Stage rules of DESIGN §1: stage 2 starts from a stage-1 folder, or is the LLM+CL baseline.
    Stage 2's readout and idf token weights (stage2.readout, stage2.idf_corpus) are set here, so they
    travel with the model it writes. `token_weights`: a save_token_weights file fitted earlier on
    stage2.idf_corpus (the Ray driver's), loaded instead of fitting again."""
    from pipeline.model_paths import resolve_model_dir

    model_path = Path(resolve_model_dir(model_path))      # a run folder stands for its model/
    if not model_path.exists():
        raise FileNotFoundError(f"--model {model_path} does not exist")
    if cfg.stage == "contrastive":
        if cfg.baseline == "llm_cl":
            if is_lbr_folder(model_path):
                raise ValueError(f"--baseline llm_cl trains a plain backbone, but {model_path} is an LBR folder")
            m = cfg.model
            pooling = m.pooling if m.pooling in ("last", "mean") else "last"
            return _with_stage2_weights(LBRModel.from_backbone(
                model_path, num_bottleneck=0, pooling=pooling, max_length=m.max_length, lora_r=m.lora_r,
                lora_alpha=m.lora_alpha, lora_targets=m.lora_targets, num_layers=m.num_layers), cfg, token_weights)
        if not is_lbr_folder(model_path):
            raise ValueError(f"stage 2 (contrastive) needs a stage-1 output folder as --model; {model_path} is a "
                             "plain backbone. Run stage 1 first, or pass --baseline llm_cl for the LLM+CL baseline.")
        model = LBRModel.from_pretrained(model_path)
        if cfg.stage2.readout and cfg.stage2.readout != model.config.readout:
            # the readout is part of the saved config: stage 2's choice travels with the model it writes
            model.set_readout(cfg.stage2.readout)
        return _with_stage2_weights(model, cfg, token_weights)
    if is_lbr_folder(model_path):
        return LBRModel.from_pretrained(model_path)          # continue stage 1 from an earlier run
    m = cfg.model
    return LBRModel.from_backbone(model_path, num_bottleneck=m.num_bottleneck, pooling=m.pooling,
                                  latent_dim=m.latent_dim, max_length=m.max_length, lora_r=m.lora_r,
                                  lora_alpha=m.lora_alpha, lora_targets=m.lora_targets, num_layers=m.num_layers,
                                  head_init=m.head_init, bottleneck_init=m.bottleneck_init,
                                  bottleneck_prompt=m.bottleneck_prompt, readout=m.readout)
