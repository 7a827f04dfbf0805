"""Optimisation engines behind the one training loop.

An engine owns the optimizer, LR schedule, clipping and gradient accumulation. The loop calls
`backward(loss)` then `step()` once per micro-batch; the engine steps the optimizer at accumulation
boundaries. `TorchEngine` is the plain in-process engine; the DeepSpeed engine wraps
`deepspeed.initialize` with the same two calls (it already has exactly this contract).
"""
from __future__ import annotations

import math

import torch

from pipeline.config import OptimConfig


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warmup, then linear/cosine decay to 0 (or constant) over optimizer steps."""
    warm = cfg.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return f


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # a torch optimizer (not DeepSpeed's fused one): no JIT build on CPU, same math everywhere
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class TorchEngine:
    """Plain torch: AdamW + LambdaLR + clipping + accumulation, in this process."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
        self.module = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.cfg.grad_accum:
            return
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = int(state["micro"])
