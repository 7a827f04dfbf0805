"""Export an LBR model as a stock sentence-transformers folder: loads with `SentenceTransformer(dir)`,
no `trust_remote_code`, and gives the same vectors as `LBRModel.encode` (checked at export).

Why this shape: an LBR embedding is normalize(mean_k mu_k) with mu_k = W_mu h_k + b, where h_k is the
LM's last hidden state at the k-th bottleneck row appended after the text. Everything in it maps onto
stock modules, exactly and for any K:

* the K bottleneck rows become K new special tokens whose input embeddings are those rows; the
  tokenizer's post-processor appends them after the text (and adds nothing else: LBR tokenises without
  BOS/EOS), right padding, so positions are 0..n+K-1 as in `encode_batch`;
* `Transformer` runs the decoder (LoRA merged) and returns every hidden state;
* `WordWeights` gives the K bottleneck tokens weight 1 and every other token 0, so `Pooling(mean)` is
  mean_k h_k (token_weights_sum = K);
* mean_k (W_mu h_k + b) = W_mu (mean_k h_k) + b, so one `Dense` with identity activation is mu's mean;
* `Normalize`.

The dual readout (stages.model.READOUTS) is refused: it sums two separately normalised vectors.

The joint readout (W_mu applied to the mean over text *and* bottleneck rows) is the same without
`WordWeights`; with idf token weights (LBRConfig.token_weighting) a `WordWeights` carries them (bottleneck
rows 1), and Pooling(mean) divides by their sum exactly as `encode_batch` does.

Baseline poolings (K = 0): `Pooling(lasttoken)` / `Pooling(mean)`, then `Normalize`.

The one difference: an empty text. `LBRModel.tokenize` feeds one EOS token for it; the export feeds
no text token (only the K bottleneck tokens, or an empty row for K = 0). The bottleneck ids lie beyond
the vocabulary and are not added tokens: only the post-processor emits them, no text can.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from stages.io import atomic_dir
from stages.model import LBRModel

BOTTLENECK_TOKEN = "<|lbr_bottleneck_{}|>"
EXPORT_MARKER = "lbr_export.json"
CHECK_TEXTS = ["a short text", "Aspirin inhibits cyclooxygenase and lowers the risk of stroke.",
               "def add(a, b):\n    return a + b", "x " * 40]


def _tokenizer_for_export(tok, k: int, first_id: int):
    """A copy of `tok` whose post-processor appends K bottleneck ids (first_id, first_id+1, ...) after the
    text and adds nothing else. The ids lie beyond the vocabulary and are not added tokens, so no text can
    ever produce them: only the post-processor emits them."""
    from tokenizers.processors import TemplateProcessing

    tok = _copy_tokenizer(tok)
    names = [BOTTLENECK_TOKEN.format(i) for i in range(k)]
    ids = list(range(first_id, first_id + k))
    single = " ".join(["$A", *names]) if names else "$A"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=list(zip(names, ids)))
    tok.padding_side = "right"
    return tok, ids


def _copy_tokenizer(tok):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, local_files_only=True)


def export_sentence_transformers(model: LBRModel | str | Path, out: str | Path, check: bool = True) -> Path:
    """Write `out` (atomically): a folder stock sentence-transformers loads without remote code.

    `check`: load the written folder without remote code and compare its vectors with LBRModel.encode
    (max abs difference <= 1e-5), refusing to publish an export that differs.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
        WordWeights,
    )

    lbr = copy.deepcopy(model) if isinstance(model, LBRModel) else LBRModel.from_pretrained(model)
    if lbr.config.readout == "dual":
        # the sum of two separately normalised vectors has no stock module
        raise ValueError("readout='dual' (normalize(W_mu m + b) + normalize(m)) has no stock sentence-transformers "
                         "form; encode with LBRModel.from_pretrained(folder).encode, or load a model folder you "
                         "wrote with SentenceTransformer(folder, trust_remote_code=True) (README: Safety)")
    lbr.eval()
    want = lbr.encode(CHECK_TEXTS, batch_size=3) if check else None
    k = lbr.num_bottleneck
    lm = lbr.lm.merge_and_unload() if hasattr(lbr.lm, "merge_and_unload") else lbr.lm
    decoder = lm.get_decoder()
    first_id = max(len(lbr.tokenizer), decoder.get_input_embeddings().num_embeddings)
    tok, ids = _tokenizer_for_export(lbr.tokenizer, k, first_id)
    if k:
        decoder.resize_token_embeddings(first_id + k)
        emb = decoder.get_input_embeddings().weight
        with torch.no_grad():
            emb[ids] = lbr.bottleneck.detach().to(emb.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tdir = Path(tmp) / "transformer"
        decoder.save_pretrained(tdir)
        tok.save_pretrained(tdir)
        first = Transformer(str(tdir), max_seq_length=lbr.config.max_length + k)
        modules = [first]
        d = decoder.config.hidden_size
        n_rows = first.auto_model.get_input_embeddings().num_embeddings
        vocab = [f"<|lbr_row_{i}|>" for i in range(n_rows)]     # WordWeights: one weight per embedding row
        names = [BOTTLENECK_TOKEN.format(i) for i in range(k)]
        for name, i in zip(names, ids):
            vocab[i] = name
        if lbr.config.token_weighting != "none":
            # idf-weighted mean: each text row its fitted weight, each bottleneck row 1 (as in encode_batch)
            w = lbr.token_weight.detach().float().cpu().tolist()
            weights = {vocab[i]: w[i] for i in range(min(len(w), n_rows))}
            weights.update(dict.fromkeys(names, 1.0))
            modules.append(WordWeights(vocab=vocab, word_weights=weights, unknown_word_weight=1.0))
        if k:
            if lbr.config.readout == "bottleneck":   # 1 for the bottleneck ids, 0 for every other row
                modules.append(WordWeights(vocab=vocab, word_weights=dict.fromkeys(names, 1.0),
                                           unknown_word_weight=0.0))
            # joint readout: the (weighted) mean over text and bottleneck rows, then the same Dense
            modules.append(Pooling(d, pooling_mode="mean"))
            dense = Dense(d, lbr.w_mu.out_features, bias=True, activation_function=torch.nn.Identity())
            with torch.no_grad():
                dense.linear.weight.copy_(lbr.w_mu.weight)
                dense.linear.bias.copy_(lbr.w_mu.bias)
            modules.append(dense)
        else:
            modules.append(Pooling(d, pooling_mode="lasttoken" if lbr.config.pooling == "last" else "mean"))
        modules.append(Normalize())
        st = SentenceTransformer(modules=modules, device="cpu")
        with atomic_dir(out) as dst:
            st.save(str(dst))
            (dst / EXPORT_MARKER).write_text(json.dumps(
                {"format": "lbr-st-export/1", "num_bottleneck": k, "pooling": lbr.config.pooling,
                 "readout": lbr.config.readout, "token_weighting": lbr.config.token_weighting,
                 "bottleneck_tokens": [BOTTLENECK_TOKEN.format(i) for i in range(k)]}, indent=2) + "\n")
            if check:
                _check_export(dst, want)
    return Path(out)


def _check_export(folder: Path, want: np.ndarray, atol: float = 1e-5) -> None:
    """Load `folder` the way a user would (no remote code) and compare vectors with LBRModel.encode."""
    from sentence_transformers import SentenceTransformer

    types = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    foreign = [t for t in types if not t.startswith("sentence_transformers.")]
    if foreign:
        raise ValueError(f"export would need remote code for {foreign}")
    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=False)
    got = st.encode(CHECK_TEXTS, batch_size=2, convert_to_numpy=True)
    err = float(np.abs(got - want).max())
    if err > atol:
        raise ValueError(f"sentence-transformers export differs from LBRModel.encode by {err:.2e} (> {atol})")
