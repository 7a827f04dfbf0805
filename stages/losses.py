"""The LBR loss terms, each a pure function of tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over positions where `mask` is 1."""
    m = mask.bool()
    if not m.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[m].float(), labels[m])


def comp_loss(decode_logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """L_comp: NLL of the target given only the soft prompts P(z)."""
    return token_nll(decode_logits, target_ids, target_mask)


def rate_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_rate = KL(N(mu, exp(logvar)) || N(0, I)), averaged over tokens and dimensions."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).mean()


def info_nce(q: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE: each query's positive among all `docs` (in-batch positives + hard negatives).

    `q` (B, d) and `docs` (M, d) are L2-normalised; `labels[i]` indexes q[i]'s positive in `docs`.
    """
    if tau <= 0:
        raise ValueError(f"temperature tau={tau} must be > 0")
    logits = q.float() @ docs.float().T / tau
    return F.cross_entropy(logits, labels)


def bow_loss(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
    """Bag-of-words NLL (LLaRA's EBAE/EBAR): one distribution per text (B, V) must give every target token
    high probability. mean: over all target tokens of the batch; sum: summed per-text token means."""
    lp = torch.log_softmax(logits.float(), -1)
    m = target_mask.to(lp.dtype)
    nll = -(lp.gather(1, target_ids) * m)
    if reduction == "sum":
        return (nll.sum(1) / m.sum(1).clamp(min=1)).sum()
    return nll.sum() / m.sum().clamp(min=1)
