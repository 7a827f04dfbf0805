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

from stages.losses import bow_loss, comp_loss, info_nce, rate_loss, token_nll
from stages.model import READOUTS, LBRModel, pad_id

TASKS = ("continue", "reconstruct", "mixed")
COMPS = ("decode", "bow")


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1 ("learn"): L_lm + comp_weight * L_comp + beta * L_rate.

    objective="lm" is the plain-LM ablation: only L_lm, the bottleneck is not trained.
    comp="decode": L_comp = NLL of the target decoded from the soft prompts P(z) (a second forward);
    comp="bow": L_comp = bag-of-words NLL of the target's tokens read from z through the LM head (EBAE;
    no second forward).
    """

    objective: str = "ib"           # ib | lm
    comp: str = "decode"            # decode | bow
    lm_fraction: float = 1.0        # share of next-token positions L_lm is computed on (LM-head cost)
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
        if self.comp not in COMPS:
            raise ValueError(f"stage1.comp={self.comp!r} must be one of {COMPS}")
        if not 0 < self.lm_fraction <= 1:
            raise ValueError(f"stage1.lm_fraction={self.lm_fraction} must be in (0, 1]")
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
    refine: str = "decode"          # decode | bow: the form of L_comp on the positives (as stage1.comp)
    chunk_size: int = 0             # GradCache: embed in chunks of this many rows (0: plain, one pass)
    readout: str | None = None      # None: the stage-1 model's; bottleneck | joint | dual (stages.model.READOUTS)
    idf_corpus: str | None = None   # corpus (stage-1 formats) to fit idf token weights of the mean on at the
                                    # start (stages.model.TOKEN_WEIGHTINGS); None: keep the start model's
    idf_power: float = 2.0          # weight = idf ** power (2 measured best of 1/2/3 on the dev sets)
    idf_max_docs: int = 100_000     # first N documents of idf_corpus (df ratios settle long before)

    def __post_init__(self):
        if self.readout is not None and self.readout not in READOUTS:
            raise ValueError(f"stage2.readout={self.readout!r} must be one of {READOUTS} or unset")
        if self.tau <= 0:
            raise ValueError(f"stage2.tau={self.tau} must be > 0")
        if self.idf_power < 0:
            raise ValueError(f"stage2.idf_power={self.idf_power} must be >= 0")
        if self.idf_max_docs < 1:
            raise ValueError(f"stage2.idf_max_docs={self.idf_max_docs} must be >= 1")
        if self.refine not in COMPS:
            raise ValueError(f"stage2.refine={self.refine!r} must be one of {COMPS}")
        if self.chunk_size < 0:
            raise ValueError(f"stage2.chunk_size={self.chunk_size} must be >= 0 (0 turns GradCache off)")
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
    enc = model.encode_batch(ids, mask, sample=ib, generator=generator)
    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=ids.device)
    if cfg.lm_weight > 0 and ids.size(1) > 1:
        parts["lm"] = _lm_on_positions(model, enc.hidden, ids, mask, cfg.lm_fraction, generator)
        total = total + cfg.lm_weight * parts["lm"]
    if ib:
        t_ids, t_mask = trim(batch["target_ids"], batch["target_mask"])
        parts["comp"] = _comp(model, enc.z, t_ids, t_mask, cfg.comp)
        total = total + cfg.comp_weight * parts["comp"]
        parts["rate"] = rate_loss(enc.mu, enc.logvar)
        if cfg.beta > 0:
            total = total + cfg.beta * parts["rate"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _comp(model: LBRModel, z: torch.Tensor, t_ids: torch.Tensor, t_mask: torch.Tensor, form: str) -> torch.Tensor:
    """L_comp in either form: decode t from P(z) (second forward), or bag-of-words of t from z (EBAE)."""
    if form == "bow":
        return bow_loss(model.bow_logits(z), t_ids, t_mask)
    return comp_loss(model.decode_logits(z, t_ids, t_mask), t_ids, t_mask)


def _lm_on_positions(model: LBRModel, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, fraction: float,
                     generator: torch.Generator | None) -> torch.Tensor:
    """L_lm over a random `fraction` of the text's next-token positions (all when 1.0).

    Why: the LM head of a 49k-vocabulary model costs as much per token as eight decoder layers; an
    unbiased subset of positions keeps the domain next-token signal at a fraction of that cost.
    """
    seq = ids.size(1)
    keep = mask[:, 1:].bool()
    if fraction < 1.0:
        r = torch.rand(keep.shape, generator=generator, device=ids.device) if generator is not None \
            else torch.rand(keep.shape, device=ids.device)
        keep = keep & (r < fraction)
        if not keep.any():
            keep = mask[:, 1:].bool()
    logits = model.lm_head()(hidden[:, : seq - 1][keep])
    return token_nll(logits, ids[:, 1:][keep], torch.ones_like(ids[:, 1:][keep]))


Gather = Callable[[torch.Tensor], torch.Tensor]


def _stage2_inputs(batch: dict[str, torch.Tensor]):
    """Trimmed (queries, positives, flattened negatives or None) as (ids, mask) pairs."""
    q = trim(batch["q_ids"], batch["q_mask"])
    p = trim(batch["p_ids"], batch["p_mask"])
    n = None
    if "n_ids" in batch and batch["n_ids"].numel():
        n = trim(batch["n_ids"].flatten(0, 1), batch["n_mask"].flatten(0, 1))
    return q, p, n


def _draw_eps(model: LBRModel, rows: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The positives' reparameterisation noise for the whole batch, drawn once (GradCache slices it)."""
    shape = (rows, model.num_bottleneck, model.embedding_dim)
    if generator is not None:
        return torch.randn(shape, generator=generator, device=like.device)
    return torch.randn(shape, device=like.device)


def _cl(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, cfg: Stage2Config,
        gather: Gather | None, rank: int) -> torch.Tensor:
    """InfoNCE of the local queries against positives (+ hard negatives), gathered across workers."""
    bsz = q.size(0)
    labels = torch.arange(bsz, device=q.device)
    if gather is not None:
        # positives of all workers first, then all hard negatives: keep the positive block contiguous
        pos = gather(pos)
        neg = gather(neg) if neg is not None else None
        labels = labels + rank * bsz
    d = torch.cat([pos] + ([neg] if neg is not None else []), 0)
    return info_nce(q, d, labels, cfg.tau)


def _refine_terms(model: LBRModel, encs: list, p_enc, p_ids: torch.Tensor, p_mask: torch.Tensor,
                  cfg: Stage2Config) -> dict[str, torch.Tensor]:
    """lam-term (L_comp on the positives) and the rate term, as plain means over this set of rows."""
    parts: dict[str, torch.Tensor] = {}
    if cfg.lam > 0:
        t_ids, t_mask = p_ids[:, : cfg.target_len], p_mask[:, : cfg.target_len]
        parts["comp"] = _comp(model, p_enc.z, t_ids, t_mask, cfg.refine)
    parts["rate"] = rate_loss(torch.cat([e.mu.flatten(0, 1) for e in encs]),
                              torch.cat([e.logvar.flatten(0, 1) for e in encs]))
    return parts


def compute_loss_stage2(model: LBRModel, batch: dict[str, torch.Tensor], cfg: Stage2Config,
                        gather: Gather | None = None, rank: int = 0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_stage2 = InfoNCE(q; positives + hard negatives) + lam * L_comp(positives) + beta * L_rate.

    `gather`, when given, concatenates a tensor across workers *with* gradient (rank-major order); the
    labels are then offset by `rank * local_batch`, so every query sees every worker's documents.
    """
    (q_ids, q_mask), (p_ids, p_mask), n = _stage2_inputs(batch)
    bott = model.num_bottleneck > 0
    sample = bott and cfg.lam > 0
    eps = _draw_eps(model, p_ids.size(0), p_ids, generator) if sample else None
    q_enc = model.encode_batch(q_ids, q_mask)
    p_enc = model.encode_batch(p_ids, p_mask, sample=sample, eps=eps)
    encs = [q_enc, p_enc]
    neg = None
    if n is not None:
        n_enc = model.encode_batch(*n)
        neg = model.embed_from_encoded(n_enc)
        encs.append(n_enc)
    parts = {"cl": _cl(model.embed_from_encoded(q_enc), model.embed_from_encoded(p_enc), neg, cfg, gather, rank)}
    total = parts["cl"]
    if bott:
        parts.update(_refine_terms(model, encs, p_enc, p_ids, p_mask, cfg))
        if "comp" in parts:
            total = total + cfg.lam * parts["comp"]
        if cfg.beta > 0:
            total = total + cfg.beta * parts["rate"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ---------------------------------------------------------------------- GradCache (stage 2)
def _embed_rows(model: LBRModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ids, mask = trim(ids, mask)
    return model.embed_from_encoded(model.encode_batch(ids, mask))


def _chunk_surrogate(model: LBRModel, q: tuple, p: tuple, n: tuple | None, grads: tuple, eps, cfg: Stage2Config,
                     weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One chunk's re-encode with gradient: <emb, cached dL/demb> plus its weighted share of the
    per-row terms (refinement and rate), so the chunks' gradients sum to the full batch's exactly."""
    q_ids, q_mask = trim(*q)
    p_ids, p_mask = trim(*p)
    q_enc = model.encode_batch(q_ids, q_mask)
    p_enc = model.encode_batch(p_ids, p_mask, sample=eps is not None, eps=eps)
    sur = (model.embed_from_encoded(q_enc) * grads[0]).sum() + (model.embed_from_encoded(p_enc) * grads[1]).sum()
    encs = [q_enc, p_enc]
    if n is not None:
        n_enc = model.encode_batch(*trim(*n))
        sur = sur + (model.embed_from_encoded(n_enc) * grads[2]).sum()
        encs.append(n_enc)
    parts: dict[str, torch.Tensor] = {}
    if model.num_bottleneck > 0:
        raw = _refine_terms(model, encs, p_enc, p_ids, p_mask, cfg)
        if "comp" in raw:
            parts["comp"] = raw["comp"] * weights["comp"]
            sur = sur + cfg.lam * parts["comp"]
        parts["rate"] = raw["rate"] * weights["rate"]
        if cfg.beta > 0:
            sur = sur + cfg.beta * parts["rate"]
    return sur, parts


def grad_cache_stage2(model: LBRModel, forward: Callable, backward: Callable[[torch.Tensor], None], batch: dict[str, torch.Tensor],
                      cfg: Stage2Config, gather: Gather | None = None, rank: int = 0,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 2 with cached gradients (Gao et al., GradCache): same loss and gradients as
    `compute_loss_stage2` on the whole batch, with activations held for one chunk of rows at a time.

    1. embed every row without a graph, in chunks; 2. InfoNCE on the full batch (gathered across workers
    as usual) with the embeddings as leaves -> dL/demb; 3. per chunk, re-encode with a graph and
    backpropagate <emb, dL/demb> + the chunk's share of the per-row terms. `forward(fn, *args)` runs
    `fn(model, *args)` through the engine's module call (DDP/ZeRO hooks); `backward(loss)` is called once
    per chunk. `model` is the unwrapped LBRModel (shapes only). Returns the full loss (detached) and its parts.
    """
    (q_ids, q_mask), (p_ids, p_mask), n = _stage2_inputs(batch)
    bsz, c = q_ids.size(0), cfg.chunk_size
    nneg = n[0].size(0) // bsz if n is not None else 0
    starts = list(range(0, bsz, c))

    def rows(t: tuple, a: int, b: int, per: int = 1) -> tuple:
        return t[0][a * per: b * per], t[1][a * per: b * per]

    with torch.no_grad():
        qe = torch.cat([forward(_embed_rows, *rows((q_ids, q_mask), a, a + c)) for a in starts])
        pe = torch.cat([forward(_embed_rows, *rows((p_ids, p_mask), a, a + c)) for a in starts])
        ne = torch.cat([forward(_embed_rows, *rows(n, a, a + c, nneg)) for a in starts]) if n is not None else None
    leaves = [x.detach().requires_grad_(True) for x in (qe, pe) + ((ne,) if ne is not None else ())]
    cl = _cl(leaves[0], leaves[1], leaves[2] if ne is not None else None, cfg, gather, rank)
    grads = torch.autograd.grad(cl, leaves)

    bott = model.num_bottleneck > 0
    eps = _draw_eps(model, bsz, p_ids, generator) if bott and cfg.lam > 0 else None
    t_mask = p_mask[:, : cfg.target_len]
    total_t = float(t_mask.sum())
    total_rows = bsz * (2 + nneg)
    sums: dict[str, float] = {}
    for a in starts:
        b = min(a + c, bsz)
        w = {"comp": float(t_mask[a:b].sum()) / max(total_t, 1.0), "rate": (b - a) * (2 + nneg) / total_rows}
        g = tuple(x[a * per: b * per] for x, per in zip(grads, (1, 1, nneg)))
        sur, parts = forward(_chunk_surrogate, rows((q_ids, q_mask), a, b), rows((p_ids, p_mask), a, b),
                             rows(n, a, b, nneg) if n is not None else None, g,
                             eps[a:b] if eps is not None else None, cfg, w)
        backward(sur)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    total = float(cl.detach())
    if bott:
        total += cfg.lam * sums.get("comp", 0.0) + (cfg.beta * sums["rate"] if cfg.beta > 0 else 0.0)
    return torch.tensor(total), {"cl": float(cl.detach()), **sums}
