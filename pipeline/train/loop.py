"""The one training loop, shared by both LBR stages and every engine (plain torch, DDP, DeepSpeed).

It knows nothing about Ray: the caller gives it batches (an iterator per epoch), an engine, and
callbacks for logging and checkpoints. Steps count optimizer steps; every worker runs exactly
`cfg.steps` of them (epochs restart the batch source; short final batches are the source's job to
drop), so collective calls never wait on a worker that ran out of data.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

from pipeline.config import TrainConfig
from stages.model import LBRModel
from stages.objectives import Gather, compute_loss_stage1, compute_loss_stage2, grad_cache_stage2

BatchSource = Callable[[int], Iterable[dict]]


def _batches(source: BatchSource, start_epoch: int = 0) -> Iterator[tuple[int, dict]]:
    epoch = start_epoch
    while True:
        empty = True
        for batch in source(epoch):
            empty = False
            yield epoch, batch
        if empty:
            raise ValueError("the training data yields no batch: fewer rows than batch_size per worker?")
        epoch += 1


def count_tokens(batch: dict) -> int:
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("mask")))


def compute_loss(model: LBRModel, batch: dict, cfg: TrainConfig, gather: Gather | None = None, rank: int = 0,
                 generator: torch.Generator | None = None):
    if cfg.stage == "generative":
        return compute_loss_stage1(model, batch, cfg.stage1, generator=generator)
    return compute_loss_stage2(model, batch, cfg.stage2, gather=gather, rank=rank, generator=generator)


def train_loop(model: LBRModel, engine, source: BatchSource, cfg: TrainConfig, *, start_step: int = 0,
               rank: int = 0, device: torch.device | str = "cpu", gather: Gather | None = None,
               log: Callable[[dict], None] | None = None,
               checkpoint: Callable[[int], None] | None = None,
               stop: Callable[[], bool] | None = None) -> dict:
    """Run optimizer steps `start_step+1 .. cfg.steps`; returns the last logged record.

    `model` is the unwrapped LBRModel; `engine(objective, ...)` runs the loss through the (possibly
    wrapped) module's forward, and owns backward/step.
    `log(record)` gets {step, loss, <parts>, lr, tokens_per_s, tokens, data_s} (tokens_per_s: the interval's
    tokens over its compute time, which excludes the previous `log` call itself; data_s: seconds of the interval
    spent waiting for the input source, so an input-bound run shows itself); `checkpoint(step)` is called on every
    rank (DeepSpeed checkpoints are collective) every `cfg.checkpoint_every` steps and at the end.
    """
    model.train()
    accum = cfg.optim.grad_accum
    # skip the batches already consumed before a resume, so data order continues where it stopped
    it = _batches(source)
    for _ in range(start_step * accum):
        next(it)
    last: dict = {}
    t0, tokens, waited = time.perf_counter(), 0, 0.0
    for step in range(start_step + 1, cfg.steps + 1):
        sums: dict[str, float] = {}
        for micro in range(accum):
            tw = time.perf_counter()
            _, batch = next(it)
            batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
            waited += time.perf_counter() - tw
            g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro * 7 + rank)
            with engine.autocast():                 # bf16 autocast on GPU for the torch engines; else a no-op
                if cfg.grad_cache():
                    def backward_chunk(sur: torch.Tensor) -> None:
                        engine.backward(sur / accum)
                        engine.step()               # one engine micro-step per chunk
                    loss, parts = grad_cache_stage2(model, engine, backward_chunk, batch, cfg.stage2, gather=gather,
                                                    rank=rank, generator=g)
                else:
                    loss, parts = engine(compute_loss, batch, cfg, gather=gather, rank=rank, generator=g)
                    engine.backward(loss / accum)
                    engine.step()
            tokens += count_tokens(batch)
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = time.perf_counter() - t0
            last = {"step": step, **sums, "lr": engine.get_lr(), "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                    "tokens": tokens, "data_s": round(waited, 4)}
            if log is not None:
                log(last)
            t0, tokens, waited = time.perf_counter(), 0, 0.0
        if checkpoint is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                                       or step == cfg.steps):
            checkpoint(step)
        if stop is not None and stop():
            break
    return last
