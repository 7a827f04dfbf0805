"""The LBR model: a causal LM with K learned bottleneck tokens and a variational head.

Encode: `[x_1..x_n][b_1..b_K]` through the LM with its ordinary causal mask; the bottleneck states
go through `mu = W_mu h`, `logvar = W_s h`. The embedding of a text is computed by `embed_from_encoded`
alone, in training and at inference: `normalize(mean_k mu_k)` with the bottleneck readout (the first
reading of the paper, the library default), or with the joint readout `normalize(W_mu mean(h) + b)` over
the text *and* bottleneck rows, which transferred better in every dev set measured (README, bench.quality).

Layout choice (why): each row is `tokens, bottleneck, padding` — padding always comes *after* the
bottleneck, so under the causal mask the bottleneck states cannot see pads and their positions do
not depend on the batch: embeddings are independent of batch composition and padding side.

Decode: `[P(z)][t]` — the same LM (same weights, same adapters) predicts `t` from the K soft prompts
only. Nothing from the encode pass but `z` enters it (no KV cache, no shared state).

Baseline poolings (`last`, `mean`) use the same API with K = 0 for the LLM+CL baseline.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.backbone import load_backbone
from stages.io import atomic_dir

POOLINGS = ("bottleneck", "last", "mean")
# what the embedding reads with bottleneck pooling: "bottleneck" = normalize(mean_k mu_k) (the compressed
# representation alone); "joint" = normalize(W_mu mean(h over text AND bottleneck positions) + b), i.e. the
# K mu_k pooled together with the text states mapped through the same head (why: measured, README);
# "dual" = normalize(W_mu m + b) + normalize(m) with m that same mean: the head's unit vector plus the
# unprojected one. Why: W_mu acts as a projection head (as in SimCLR) — contrastive training on the domains
# with pairs squeezes the directions only a pair-less domain needs (smallest singular value ~0.007 after
# 480 steps); the second term keeps every direction of the text states in the similarity (README)
READOUTS = ("bottleneck", "joint", "dual")
MEAN_READOUTS = ("joint", "dual")          # the readouts built on the mean over text and bottleneck rows
# how the text rows enter a mean (joint readout, mean pooling): "none" = plain mean; "idf" = weighted by a
# per-token weight fitted on a domain corpus (idf ** power, scaled so the corpus's average token weighs 1,
# as a bottleneck row does). Why: a plain mean lets frequent tokens dominate and blurs the rare domain
# terms that decide a match; weighting measured +0.03..0.08 nDCG@10 on the lexical dev sets (README).
TOKEN_WEIGHTINGS = ("none", "idf")
HEAD_INITS = ("identity", "random")
BOTTLENECK_INITS = ("prompt", "random")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the K bottleneck rows start as the embeddings of this text's tokens (cycled when K is larger):
# the bottleneck then reads as a summarising continuation of the text, not as K random vectors
DEFAULT_BOTTLENECK_PROMPT = "\nIn short, the text above is about"
CONFIG_NAME = "lbr_config.json"
WEIGHTS_NAME = "model.safetensors"
ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "stages.st_module.LBRSentenceModule"}]


def _check_dual(config: LBRConfig, hidden: int) -> None:
    dz = config.latent_dim or hidden
    if config.readout == "dual" and dz != hidden:
        raise ValueError(f"readout='dual' adds the head's output to the unprojected mean: it needs "
                         f"latent_dim == the backbone's hidden size {hidden} (got latent_dim={dz})")


@dataclass(frozen=True)
class LBRConfig:
    """Everything needed to rebuild an LBRModel from its folder (besides the weights)."""

    num_bottleneck: int = 8
    pooling: str = "bottleneck"
    latent_dim: int | None = None          # None: the backbone's hidden size
    max_length: int = 256                  # text tokens kept by encode (truncation)
    lora_r: int = 0                        # 0: full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_LINEAR
    num_layers: int | None = None          # keep only the first N decoder layers
    head_init: str = "identity"            # identity: mu = h_b at step 0 (not collapsed); random: old start
    bottleneck_init: str = "prompt"        # prompt: rows = embeddings of bottleneck_prompt's tokens; random
    bottleneck_prompt: str = DEFAULT_BOTTLENECK_PROMPT
    readout: str = "bottleneck"            # bottleneck | joint (see READOUTS)
    token_weighting: str = "none"          # none | idf (see TOKEN_WEIGHTINGS; the weights are in the folder)
    backbone: str = ""                     # where the backbone came from (provenance only)
    backbone_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}")
        if self.pooling == "bottleneck" and self.num_bottleneck < 1:
            raise ValueError(f"num_bottleneck={self.num_bottleneck} must be >= 1 with bottleneck pooling")
        if self.pooling != "bottleneck" and self.num_bottleneck != 0:
            raise ValueError(f"num_bottleneck={self.num_bottleneck} must be 0 with pooling={self.pooling!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1")
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r} must be >= 0")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init={self.head_init!r} must be one of {HEAD_INITS}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout={self.readout!r} must be one of {READOUTS}")
        if self.readout != "bottleneck" and self.pooling != "bottleneck":
            raise ValueError(f"readout={self.readout!r} needs bottleneck pooling (got pooling={self.pooling!r})")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token_weighting={self.token_weighting!r} must be one of {TOKEN_WEIGHTINGS}")
        if self.token_weighting != "none" and not (self.pooling == "mean" or self.readout in MEAN_READOUTS):
            raise ValueError(f"token_weighting={self.token_weighting!r} weights a mean over text rows: it needs "
                             f"mean pooling or the joint readout (got pooling={self.pooling!r}, "
                             f"readout={self.readout!r})")
        if self.bottleneck_init not in BOTTLENECK_INITS:
            raise ValueError(f"bottleneck_init={self.bottleneck_init!r} must be one of {BOTTLENECK_INITS}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_json(cls, d: dict) -> LBRConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in {CONFIG_NAME}: {sorted(unknown)}")
        d = dict(d)
        d["lora_targets"] = tuple(d.get("lora_targets", ()))
        return cls(**d)


@dataclass
class Encoded:
    """Output of the encode pass. `mu`, `logvar`, `z` are None for baseline poolings."""

    hidden: torch.Tensor                    # (B, L+K, d) final-layer states
    pooled: torch.Tensor | None = None      # (B, d) for last/mean pooling
    mu: torch.Tensor | None = None          # (B, K, dz)
    logvar: torch.Tensor | None = None      # (B, K, dz)
    z: torch.Tensor | None = None           # (B, K, dz): sample in training, mu otherwise


class LBRModel(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, config: LBRConfig):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.lm = lm
        d = lm.config.hidden_size
        dz = config.latent_dim or d
        k = config.num_bottleneck
        _check_dual(config, d)
        if k > 0:
            emb = lm.get_input_embeddings().weight.detach().float()
            self.bottleneck = nn.Parameter(_initial_rows(emb, k, tokenizer, config))
            self.w_mu = nn.Linear(d, dz)
            self.w_logvar = nn.Linear(d, dz)
            self.prompt = nn.Linear(dz, d)        # P: each z_k becomes one soft-prompt input embedding
            with torch.no_grad():
                if config.head_init == "identity":
                    # mu = h_b at step 0: the bottleneck states keep the backbone's own geometry instead
                    # of a random projection that maps every text to nearly the same vector
                    self.w_mu.weight.copy_(torch.eye(dz, d))
                    self.w_mu.bias.zero_()
                self.w_logvar.weight.mul_(0.01)
                self.w_logvar.bias.fill_(-4.0)      # start near-deterministic: small posterior variance
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)
        self.token_weight_info: dict | None = None     # summary of the last idf fit (run reports)
        if config.token_weighting != "none":
            self._add_token_weight()

    def set_readout(self, readout: str) -> None:
        """Switch the embedding's readout (stage 2's choice; it travels with the saved config)."""
        cfg = replace(self.config, readout=readout)        # LBRConfig validates the name and pooling
        _check_dual(cfg, self.hidden_size)
        self.config = cfg

    def _enable_token_weighting(self) -> None:
        """Switch the config to idf (validates pooling/readout) and add the buffer, once."""
        if self.config.token_weighting == "none":
            self.config = replace(self.config, token_weighting="idf")
            self._add_token_weight()

    def _add_token_weight(self) -> None:
        """The idf token weights, one per embedding row: ones (= the plain mean) until fit_token_weights
        or from_pretrained fills them; saved with the weights."""
        n_vocab = self._base().get_input_embeddings().weight.size(0)
        self.register_buffer("token_weight", torch.ones(n_vocab, dtype=torch.float32, device=self.device))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(cls, path: str | Path, num_bottleneck: int = 8, *, pooling: str = "bottleneck",
                      latent_dim: int | None = None, max_length: int = 256, lora_r: int = 0,
                      lora_alpha: int = 32, lora_dropout: float = 0.0,
                      lora_targets: Sequence[str] = ALL_LINEAR, num_layers: int | None = None,
                      gguf_file: str | None = None, head_init: str = "identity", bottleneck_init: str = "prompt",
                      bottleneck_prompt: str = DEFAULT_BOTTLENECK_PROMPT, readout: str = "bottleneck") -> LBRModel:
        """Wrap a local causal-LM backbone (folder or .gguf) as a fresh, untrained LBR model."""
        lm, tok = load_backbone(path, gguf_file=gguf_file, num_layers=num_layers)
        if pooling != "bottleneck" and num_bottleneck == 8:
            num_bottleneck = 0                      # the default K only applies to bottleneck pooling
        cfg = LBRConfig(num_bottleneck=num_bottleneck, pooling=pooling, latent_dim=latent_dim,
                        max_length=max_length, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        lora_targets=tuple(lora_targets), num_layers=num_layers, head_init=head_init,
                        bottleneck_init=bottleneck_init, bottleneck_prompt=bottleneck_prompt, readout=readout,
                        backbone=str(path),
                        backbone_config=lm.config.to_dict())
        tok = _prepare_tokenizer(tok)
        return cls(_maybe_lora(lm, cfg), tok, cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LBRModel:
        """Load a folder written by `save_pretrained` (safetensors + JSON; no pickles)."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path} is not an LBR model folder: {CONFIG_NAME} is missing")
        cfg = LBRConfig.from_json(json.loads(cfg_file.read_text()))
        bcfg = dict(cfg.backbone_config)
        model_type = bcfg.pop("model_type")
        hf_cfg = AutoConfig.for_model(model_type, **bcfg)
        torch_dtype = torch.get_default_dtype()
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        model = cls(_maybe_lora(lm, cfg), _prepare_tokenizer(tok), cfg)
        missing, unexpected = load_model(model, path / WEIGHTS_NAME, strict=False)
        # tied output embeddings are stored once; anything else missing is an error
        missing = [m for m in missing if not _is_tied(model, m)]
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_NAME}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
        model.eval()
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config, weights (safetensors) and tokenizer atomically: a crash leaves no half folder."""
        from safetensors.torch import save_model

        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_json(), indent=2, sort_keys=True) + "\n")
            save_model(self, str(tmp / WEIGHTS_NAME))
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            # lets `SentenceTransformer(path)` load this folder (stages/st_module.py)
            (tmp / "modules.json").write_text(json.dumps(ST_MODULES, indent=2) + "\n")
        return Path(path)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    @property
    def embedding_dim(self) -> int:
        if self.config.pooling == "bottleneck":
            return self.config.latent_dim or self.hidden_size
        return self.hidden_size

    @property
    def num_bottleneck(self) -> int:
        return self.config.num_bottleneck

    def _base(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def decoder(self) -> nn.Module:
        return self._base().get_decoder()

    def lm_head(self) -> nn.Module:
        return self._base().get_output_embeddings()

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self._base().get_input_embeddings()(ids)

    def forward(self, objective, *args, **kwargs):
        """Run `objective(self, *args, **kwargs)` as this module's forward.

        Why: DDP and DeepSpeed ZeRO-3 act in forward hooks (gradient sync, parameter gathering of the
        bottleneck rows held directly by this module); a loss computed through `engine(objective, ...)`
        gets them, whatever the objective calls inside.
        """
        return objective(self, *args, **kwargs)

    # ------------------------------------------------------------------ encode pass
    def encode_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sample: bool = False,
                     generator: torch.Generator | None = None,
                     eps: torch.Tensor | None = None) -> Encoded:
        """Run the encode pass on right-padded token ids (B, L) with their mask.

        Text tokens first, then (bottleneck pooling) the K bottleneck rows right after each row's last
        real token, then padding. The ordinary causal mask plus the padding mask is all the LM sees.
        `eps` (B, K, dz), when given, is the reparameterisation noise used when `sample` (GradCache draws
        it once per batch and slices it per chunk).
        """
        b, seq = input_ids.shape
        k = self.num_bottleneck
        lengths = attention_mask.long().sum(1)
        if (lengths < 1).any():
            raise ValueError("every text needs at least one token")
        tok_emb = self.token_embeddings(input_ids)
        if k > 0:
            total = seq + k
            pos = torch.arange(total, device=input_ids.device).unsqueeze(0).expand(b, total)
            rel = pos - lengths.unsqueeze(1)                     # index inside the bottleneck block
            is_tok = rel < 0
            is_bot = (rel >= 0) & (rel < k)
            tok_idx = pos.clamp(max=seq - 1)
            src_tok = torch.gather(tok_emb, 1, tok_idx.unsqueeze(-1).expand(b, total, tok_emb.size(-1)))
            src_bot = self.bottleneck.to(tok_emb.dtype)[rel.clamp(0, k - 1)]
            embeds = torch.where(is_tok.unsqueeze(-1), src_tok, src_bot)
            embeds = torch.where((is_tok | is_bot).unsqueeze(-1), embeds, torch.zeros_like(embeds))
            mask = (is_tok | is_bot).long()
        else:
            embeds, mask = tok_emb, attention_mask.long()
        position_ids = torch.arange(embeds.size(1), device=embeds.device).unsqueeze(0).expand(b, -1)
        hidden = self.decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        out = Encoded(hidden=hidden)
        if k > 0:
            idx = (lengths.unsqueeze(1) + torch.arange(k, device=hidden.device)).unsqueeze(-1)
            h_b = torch.gather(hidden, 1, idx.expand(b, k, hidden.size(-1)))
            out.mu = self.w_mu(h_b)
            out.logvar = self.w_logvar(h_b).clamp(-20.0, 10.0)
            if sample:
                if eps is None:
                    eps = torch.randn(out.mu.shape, generator=generator, device=out.mu.device, dtype=out.mu.dtype) \
                        if generator is not None else torch.randn_like(out.mu)
                eps = eps.to(out.mu.dtype)
                out.z = out.mu + torch.exp(0.5 * out.logvar) * eps
            else:
                out.z = out.mu
            if self.config.readout in MEAN_READOUTS:
                # text and bottleneck rows, no padding; a bottleneck row weighs 1 (an average token)
                w = mask.float()
                if self.config.token_weighting != "none":
                    w = torch.where(is_tok, self.token_weight[input_ids.gather(1, tok_idx)], w)
                m = _masked_mean(hidden, w)
                out.pooled = self.w_mu(m)
                if self.config.readout == "dual":
                    out.pooled = F.normalize(out.pooled, dim=-1) + F.normalize(m.to(out.pooled.dtype), dim=-1)
        elif self.config.pooling == "last":
            out.pooled = hidden[torch.arange(b, device=hidden.device), lengths - 1]
        else:
            w = attention_mask.float()
            if self.config.token_weighting != "none":
                w = w * self.token_weight[input_ids]
            out.pooled = _masked_mean(hidden, w)
        return out

    def embed_from_encoded(self, enc: Encoded) -> torch.Tensor:
        """THE embedding: normalize(mean_k mu_k), the joint readout, or the baseline pooling. Used everywhere."""
        v = enc.mu.mean(1) if self.num_bottleneck > 0 and self.config.readout == "bottleneck" else enc.pooled
        return F.normalize(v.float(), dim=-1)

    # ------------------------------------------------------------------ decode pass
    def soft_prompts(self, z: torch.Tensor) -> torch.Tensor:
        """P(z): (B, K, dz) -> (B, K, d), one soft prompt per bottleneck slot."""
        return self.prompt(z)

    def decode_logits(self, z: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) predicting target token t_i from [P(z), t_<i] only."""
        if self.num_bottleneck == 0:
            raise ValueError("decode needs bottleneck pooling (num_bottleneck > 0)")
        b, t = target_ids.shape
        k = self.num_bottleneck
        prompts = self.soft_prompts(z).to(self.bottleneck.dtype)
        embeds = torch.cat([prompts, self.token_embeddings(target_ids)], 1)
        mask = torch.cat([torch.ones(b, k, dtype=torch.long, device=z.device), target_mask.long()], 1)
        position_ids = torch.arange(k + t, device=z.device).unsqueeze(0).expand(b, -1)
        hidden = self.decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        return self.lm_head()(hidden[:, k - 1: k - 1 + t])

    def bow_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K, dz) -> (B, V): the LM head read on mean_k z_k (LLaRA's EBAE readout, no second forward).

        With the identity head this is the LM's own next-token distribution at the bottleneck; the
        bag-of-words loss on it forces the text's content through z at the cost of one matmul.
        """
        zbar = z.mean(1)
        if zbar.size(-1) != self.hidden_size:
            zbar = self.prompt(zbar)
        return self.lm_head()(zbar.to(self.bottleneck.dtype))

    # ------------------------------------------------------------------ token weights
    def fit_token_weights(self, texts: Sequence[str], power: float = 2.0, max_length: int = 512) -> dict:
        """Turn on idf token weighting, fitted on `texts` (a domain corpus; unlabelled text is enough).

        weight(t) = (log((N + 1) / (df(t) + 1)) + 1) ** power, then scaled so the corpus's average token
        weighs 1, like a bottleneck row. Tokens never seen get the largest weight (rare = informative).
        Returns a summary (documents, tokens, weight range) for the run report."""
        texts = list(texts)
        if not texts:
            raise ValueError("fit_token_weights: no texts to fit the idf weights on")
        if power < 0:
            raise ValueError(f"fit_token_weights: power={power} must be >= 0")
        self._enable_token_weighting()              # a readout with no text mean fails here, before any counting
        n_vocab = self.token_weight.numel()
        df = np.zeros(n_vocab, dtype=np.float64)
        tf = np.zeros(n_vocab, dtype=np.float64)
        for s in range(0, len(texts), 1024):         # in chunks: never every token list of the corpus at once
            for ids in self.tokenize(texts[s: s + 1024], max_length):
                a = np.asarray(ids, dtype=np.int64)
                a = a[(a >= 0) & (a < n_vocab)]
                df[np.unique(a)] += 1
                tf += np.bincount(a, minlength=n_vocab)
        w = (np.log((len(texts) + 1) / (df + 1)) + 1) ** power
        w /= float(tf @ w) / float(tf.sum())                 # the corpus's average token weighs 1
        return self.set_token_weights(torch.as_tensor(w, dtype=torch.float32), {
            "documents": len(texts), "tokens": int(tf.sum()), "power": power,
            "weight_min": round(float(w.min()), 4), "weight_max": round(float(w.max()), 4)})

    def set_token_weights(self, weights: torch.Tensor, info: dict | None = None) -> dict:
        """Turn on idf token weighting with given weights (one per embedding row, finite, > 0), e.g. fitted
        once by a driver and loaded by every worker. `info` (the fit summary) is kept in token_weight_info."""
        n_vocab = self._base().get_input_embeddings().weight.size(0)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (n_vocab,):
            raise ValueError(f"token weights have shape {tuple(weights.shape)}; this model needs ({n_vocab},)")
        if not bool(torch.isfinite(weights).all()) or not bool((weights > 0).all()):
            raise ValueError("token weights must be finite and > 0")
        self._enable_token_weighting()
        with torch.no_grad():
            self.token_weight.copy_(weights)
        self.token_weight_info = dict(info or {})
        return self.token_weight_info

    # ------------------------------------------------------------------ inference
    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids without special tokens, truncated to `max_length` (default: config.max_length)."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode expects strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        ml = max_length or self.config.max_length
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=ml)["input_ids"]
        fallback = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        return [x if x else [fallback] for x in ids]             # empty text: one EOS token, never zero

    @torch.no_grad()
    def encode(self, sentences: Sequence[str] | str, batch_size: int = 32, *, max_length: int | None = None,
               show_progress_bar: bool = False, convert_to_numpy: bool = True, **kwargs) -> np.ndarray:
        """Embed texts: float32 (N, d), L2-normalised, deterministic, batch- and padding-independent.

        MTEB-style signature: extra keyword arguments (prompt_name, task_name, …) are accepted and ignored.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        ids = self.tokenize(texts, max_length)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))   # length-sorted batches: less padding
        out = np.zeros((len(ids), self.embedding_dim), dtype=np.float32)
        pad = pad_id(self.tokenizer)
        for s in range(0, len(order), batch_size):
            chunk = order[s: s + batch_size]
            input_ids, mask = pad_right([ids[i] for i in chunk], pad)
            enc = self.encode_batch(input_ids.to(self.device), mask.to(self.device))
            out[chunk] = self.embed_from_encoded(enc).cpu().numpy()
        self.train(was_training)
        return out[0] if single else out


# ---------------------------------------------------------------------- helpers
def pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


def pad_right(seqs: Sequence[Sequence[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to `length` (default: the longest) -> (ids, mask) int64 tensors."""
    n = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[:n]
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the rows weighted by `mask` (0/1, or >= 0 token weights), summed in fp32 (bf16 cannot
    count past 256 exactly)."""
    m = mask.float().unsqueeze(-1)
    return ((hidden.float() * m).sum(1) / m.sum(1)).to(hidden.dtype)


def _initial_rows(emb: torch.Tensor, k: int, tokenizer, config: LBRConfig) -> torch.Tensor:
    """The K new bottleneck rows at construction (from_pretrained overwrites them with saved weights)."""
    d = emb.size(1)
    if config.bottleneck_init == "prompt" and tokenizer is not None and config.bottleneck_prompt:
        ids = tokenizer(config.bottleneck_prompt, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if 0 <= i < emb.size(0)]
        if ids:
            return torch.stack([emb[ids[j % len(ids)]] for j in range(k)]).clone()
    g = torch.Generator().manual_seed(0)
    return torch.randn(k, d, generator=g) * float(emb.std())   # at the scale of the token embeddings


def _prepare_tokenizer(tok):
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _maybe_lora(lm: nn.Module, cfg: LBRConfig) -> nn.Module:
    if cfg.lora_r <= 0:
        return lm
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in lm.named_modules()}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ValueError(f"lora_targets={list(cfg.lora_targets)} match no module of the backbone")
    return get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))


def _is_tied(model: LBRModel, name: str) -> bool:
    return name.endswith("lm_head.weight") and bool(getattr(model.lm.config, "tie_word_embeddings", False))
