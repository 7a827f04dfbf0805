"""Per-batch objectives of both LBR stages, and the tokenised batch layouts they consume.

`compute_loss_stage1` / `compute_loss_stage2` are pure: a model, a batch of tensors and a typed
config in; the total loss and every part out. The training loop, whichever engine runs it, only
calls these. Cross-worker negatives enter stage 2 through an optional `gather` callable, so this
module never touches torch.distributed.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stages.losses import comp_loss, info_nce, lm_loss, rate_loss
from stages.model import LBRModel, pad_id

TASKS = ("continue", "reconstruct", "mixed")


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1 ("learn"): L_lm + comp_weight * L_comp + beta * L_rate.

    objective="lm" is the plain-LM ablation: only L_lm, the bottleneck is not trained.
    """

    objective: str = "ib"           # ib | lm
    task: str = "mixed"             # continue | reconstruct | mixed  (ours)
    beta: float = 0.01              # bottleneck strength
    lm_weight: float = 1.0
    comp_weight: float = 1.0
    context_len: int = 96
    target_len: int = 32

    def __post_init__(self):
        if self.objective not in ("ib", "lm"):
            raise ValueError(f"stage1.objective={self.objective!r} must be 'ib' or 'lm'")
        if self.task not in TASKS:
            raise ValueError(f"stage1.task={self.task!r} must be one of {TASKS}")
        for name in ("beta", "lm_weight", "comp_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"stage1.{name}={getattr(self, name)} must be >= 0")
        for name in ("context_len", "target_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage1.{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2 ("represent"): L_cl + lam * L_comp(positives) + beta * L_rate."""

    tau: float = 0.05               # InfoNCE temperature
    lam: float = 0.1                # generative refinement weight (ours); 0 turns it off exactly
    beta: float = 0.01
    query_len: int = 64
    doc_len: int = 128
    target_len: int = 32            # tokens of the positive reconstructed from its z
    num_negatives: int = 0          # hard negatives per query taken from the data (0: in-batch only)

    def __post_init__(self):
        if self.tau <= 0:
            raise ValueError(f"stage2.tau={self.tau} must be > 0")
        for name in ("lam", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"stage2.{name}={getattr(self, name)} must be >= 0")
        for name in ("query_len", "doc_len", "target_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage2.{name}={getattr(self, name)} must be >= 1")
        if self.num_negatives < 0:
            raise ValueError(f"stage2.num_negatives={self.num_negatives} must be >= 0")


# ---------------------------------------------------------------------- batch building
def split_example(ids: Sequence[int], task: str, context_len: int, target_len: int, key: str = "") -> tuple[list, list]:
    """Split one document's tokens into (context, target) for stage 1.

    continue: target is the text that follows the context; reconstruct: target is the context itself;
    mixed: one of the two, chosen by a stable hash of `key` (deterministic across workers and runs).
    """
    ids = list(ids)
    if task == "mixed":
        task = "continue" if zlib.crc32(key.encode()) % 2 == 0 else "reconstruct"
    if task == "continue" and len(ids) >= 2:
        cut = context_len if len(ids) > context_len else max(1, len(ids) // 2)
        return ids[:cut], ids[cut: cut + target_len]
    ctx = ids[:context_len]
    return ctx, ctx[:target_len]


def _pad_np(seqs: list[list[int]], pad: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), length), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[:length]
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _tok(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return [x if x else [eos] for x in ids]


def stage1_arrays(tokenizer, texts: Sequence[str], keys: Sequence[str], cfg: Stage1Config,
                  fixed: bool = True) -> dict[str, np.ndarray]:
    """Tokenise texts into stage-1 arrays. `fixed`: pad to configured lengths (Ray Data needs it)."""
    ids = _tok(tokenizer, texts, cfg.context_len + cfg.target_len)
    pairs = [split_example(x, cfg.task, cfg.context_len, cfg.target_len, k) for x, k in zip(ids, keys)]
    pad = pad_id(tokenizer)
    c_len = cfg.context_len if fixed else max(len(c) for c, _ in pairs)
    t_len = cfg.target_len if fixed else max(max(len(t) for _, t in pairs), 1)
    c_ids, c_mask = _pad_np([c for c, _ in pairs], pad, c_len)
    t_ids, t_mask = _pad_np([t for _, t in pairs], pad, t_len)
    return {"input_ids": c_ids, "attention_mask": c_mask, "target_ids": t_ids, "target_mask": t_mask}


def stage2_arrays(tokenizer, queries: Sequence[str], positives: Sequence[str],
                  negatives: Sequence[Sequence[str]] | None, cfg: Stage2Config, fixed: bool = True) -> dict[str, np.ndarray]:
    """Tokenise (query, positive, negatives) rows. Rows must carry exactly cfg.num_negatives negatives."""
    pad = pad_id(tokenizer)
    q = _tok(tokenizer, queries, cfg.query_len)
    p = _tok(tokenizer, positives, cfg.doc_len)
    q_ids, q_mask = _pad_np(q, pad, cfg.query_len if fixed else max(map(len, q)))
    p_ids, p_mask = _pad_np(p, pad, cfg.doc_len if fixed else max(map(len, p)))
    out = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}
    n = cfg.num_negatives
    if n > 0:
        if negatives is None:
            raise ValueError(f"stage2.num_negatives={n} but the rows carry no negatives")
        flat = []
        for i, negs in enumerate(negatives):
            negs = list(negs)
            if len(negs) < n:
                raise ValueError(f"row {i}: {len(negs)} negatives, stage2.num_negatives={n} needs {n}")
            flat.extend(negs[:n])
        nn_ = _tok(tokenizer, flat, cfg.doc_len)
        n_ids, n_mask = _pad_np(nn_, pad, cfg.doc_len if fixed else max(map(len, nn_)))
        out["n_ids"] = n_ids.reshape(len(q), n, -1)
        out["n_mask"] = n_mask.reshape(len(q), n, -1)
    return out


def to_tensors(arrays: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device) for k, v in arrays.items()}


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop all-padding columns at the right (fixed-length Ray batches waste compute otherwise)."""
    n = int(mask.sum(-1).max().item()) if mask.numel() else 0
    n = max(n, 1)
    return ids[..., :n], mask[..., :n]


# ---------------------------------------------------------------------- objectives
def compute_loss_stage1(model: LBRModel, batch: dict[str, torch.Tensor], cfg: Stage1Config,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_stage1 = lm_weight * L_lm + comp_weight * L_comp + beta * L_rate (objective='ib').

    beta == 0 leaves L_rate out of the graph entirely (reported, not optimised).
    """
    ids, mask = trim(batch["input_ids"], batch["attention_mask"])
    ib = cfg.objective == "ib" and model.num_bottleneck > 0
    enc = model.encode_batch(ids, mask, sample=ib, with_lm_logits=cfg.lm_weight > 0, generator=generator)
    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=ids.device)
    if cfg.lm_weight > 0:
        parts["lm"] = lm_loss(enc.lm_logits, ids, mask)
        total = total + cfg.lm_weight * parts["lm"]
    if ib:
        t_ids, t_mask = trim(batch["target_ids"], batch["target_mask"])
        parts["comp"] = comp_loss(model.decode_logits(enc.z, t_ids, t_mask), t_ids, t_mask)
        total = total + cfg.comp_weight * parts["comp"]
        parts["rate"] = rate_loss(enc.mu, enc.logvar)
        if cfg.beta > 0:
            total = total + cfg.beta * parts["rate"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


Gather = Callable[[torch.Tensor], torch.Tensor]


def compute_loss_stage2(model: LBRModel, batch: dict[str, torch.Tensor], cfg: Stage2Config,
                        gather: Gather | None = None, rank: int = 0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_stage2 = InfoNCE(q; positives + hard negatives) + lam * L_comp(positives) + beta * L_rate.

    `gather`, when given, concatenates a tensor across workers *with* gradient (rank-major order); the
    labels are then offset by `rank * local_batch`, so every query sees every worker's documents.
    """
    q_ids, q_mask = trim(batch["q_ids"], batch["q_mask"])
    p_ids, p_mask = trim(batch["p_ids"], batch["p_mask"])
    bsz = q_ids.size(0)
    bott = model.num_bottleneck > 0
    q_enc = model.encode_batch(q_ids, q_mask)
    p_enc = model.encode_batch(p_ids, p_mask, sample=bott and cfg.lam > 0, generator=generator)
    q = model.embed_from_encoded(q_enc)
    docs = [model.embed_from_encoded(p_enc)]
    encs = [q_enc, p_enc]
    if "n_ids" in batch and batch["n_ids"].numel():
        n_ids, n_mask = trim(batch["n_ids"].flatten(0, 1), batch["n_mask"].flatten(0, 1))
        n_enc = model.encode_batch(n_ids, n_mask)
        docs.append(model.embed_from_encoded(n_enc))
        encs.append(n_enc)
    d = torch.cat(docs, 0)
    labels = torch.arange(bsz, device=q.device)
    if gather is not None:
        # positives of all workers first, then all hard negatives: keep the positive block contiguous
        pos_all = gather(docs[0])
        neg_all = gather(docs[1]) if len(docs) > 1 else None
        d = torch.cat([pos_all] + ([neg_all] if neg_all is not None else []), 0)
        labels = labels + rank * bsz
    parts = {"cl": info_nce(q, d, labels, cfg.tau)}
    total = parts["cl"]
    if bott:
        if cfg.lam > 0:
            t_ids, t_mask = p_ids[:, : cfg.target_len], p_mask[:, : cfg.target_len]
            parts["comp"] = comp_loss(model.decode_logits(p_enc.z, t_ids, t_mask), t_ids, t_mask)
            total = total + cfg.lam * parts["comp"]
        parts["rate"] = rate_loss(torch.cat([e.mu.flatten(0, 1) for e in encs]),
                                  torch.cat([e.logvar.flatten(0, 1) for e in encs]))
        if cfg.beta > 0:
            total = total + cfg.beta * parts["rate"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
