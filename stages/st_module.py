"""sentence-transformers export: an LBR model folder loads with `SentenceTransformer(path)`.

`save_pretrained` writes a `modules.json` naming `LBRSentenceModule`, an input module that tokenises
exactly like `LBRModel.encode` and pools with the bottleneck (normalize(mean_k mu_k)) — or the
baseline pooling — so both give the same vectors.
"""
from __future__ import annotations

from pathlib import Path

from sentence_transformers.base.modules import InputModule

from stages.model import LBRModel, pad_id, pad_right


class LBRSentenceModule(InputModule):
    save_in_root = True
    config_file_name = "lbr_st_module.json"

    def __init__(self, model: LBRModel):
        super().__init__()
        self.lbr = model
        self.tokenizer = model.tokenizer
        self.max_seq_length = model.config.max_length

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        texts = [prompt + t for t in inputs] if prompt else list(inputs)
        ids, mask = pad_right(self.lbr.tokenize(texts), pad_id(self.tokenizer))
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, features: dict, **kwargs) -> dict:
        enc = self.lbr.encode_batch(features["input_ids"], features["attention_mask"])
        features["sentence_embedding"] = self.lbr.embed_from_encoded(enc)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.lbr.embedding_dim

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.lbr.save_pretrained(Path(output_path))

    @classmethod
    def load(cls, model_name_or_path: str, **kwargs) -> LBRSentenceModule:
        return cls(LBRModel.from_pretrained(model_name_or_path))
