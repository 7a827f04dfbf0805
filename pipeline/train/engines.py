"""Optimisation engines behind the one training loop.

An engine owns the optimizer, LR schedule, clipping and gradient accumulation. The loop calls
`backward(loss)` then `step()` once per backward pass (a micro-batch, or a GradCache chunk of one);
the engine steps the optimizer every `cfg.micro_steps()` of them. Losses come in already divided by
the accumulation count. `TorchEngine` is the plain in-process engine; the DeepSpeed engine wraps
`deepspeed.initialize` with the same two calls (it already has exactly this contract).
"""
from __future__ import annotations

import contextlib
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


NEW_PARAM_PREFIXES = ("bottleneck", "w_mu", "w_logvar", "prompt")


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters in two groups: the backbone/adapters at `lr`, the new LBR parameters
    (bottleneck rows, variational head, soft-prompt map) at `new_lr` (default: the same)."""
    old, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if name.split(".")[0] in NEW_PARAM_PREFIXES else old).append(p)
    groups = [{"params": old, "lr": cfg.lr}]
    if new:
        groups.append({"params": new, "lr": cfg.new_lr or cfg.lr})
    return [g for g in groups if g["params"]]


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the plain torch engines: bf16 when asked for, or `auto` on a CUDA device; None
    (fp32) otherwise. `auto` stays fp32 on CPU, where bf16 autocast measured slower here. DeepSpeed casts
    the model itself (deepspeed_config), so its engine never autocasts."""
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def make_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # a torch optimizer (not DeepSpeed's fused one): no JIT build on CPU, same math everywhere
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class TorchEngine:
    """Plain torch: AdamW + LambdaLR + clipping + accumulation, in this process.

    `micro_steps` backward/step calls make one optimizer step (gradient accumulation x GradCache
    chunks); the loop scales each loss for accumulation itself, so `backward` adds gradients as given.
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, total_steps: int, micro_steps: int | None = None,
                 precision: str = "fp32"):
        self.module = model
        self.cfg = cfg
        self.device_type = next(model.parameters()).device.type
        self.amp_dtype = autocast_dtype(precision, self.device_type)
        self.micro_steps = micro_steps or cfg.grad_accum
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(param_groups(model, cfg), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.micro_steps:
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

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def autocast(self):
        """Context for one micro-step's forward and backward: bf16 autocast (fp32 master weights and
        optimizer state), or nothing in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def save(self, folder: str, step: int) -> None:
        """Weights (safetensors) + optimizer/scheduler (tensors only, loadable with weights_only)."""
        from safetensors.torch import save_model

        save_model(self.module, f"{folder}/model.safetensors")
        torch.save(self.state_dict(), f"{folder}/optim.pt")

    def load(self, folder: str) -> None:
        from safetensors.torch import load_model

        load_model(self.module, f"{folder}/model.safetensors", strict=False)
        self.load_state_dict(torch.load(f"{folder}/optim.pt", weights_only=True))


class DDPEngine(TorchEngine):
    """Plain DDP (gloo on CPU, NCCL on GPU) through Ray Train's prepare_model — a config switch."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, total_steps: int, rank: int,
                 micro_steps: int | None = None, precision: str = "fp32"):
        import ray.train.torch

        super().__init__(model, cfg, total_steps, micro_steps, precision)
        self.rank = rank
        self.wrapped = ray.train.torch.prepare_model(
            # buffers (the idf token weights) are identical on every rank: no per-forward broadcast
            model, parallel_strategy_kwargs={"find_unused_parameters": True, "broadcast_buffers": False})

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        if self.micro % self.micro_steps == self.micro_steps - 1 or not hasattr(self.wrapped, "no_sync"):
            loss.backward()
        else:
            with self.wrapped.no_sync():                 # sync gradients only at the boundary
                loss.backward()

    def save(self, folder: str, step: int) -> None:
        if self.rank == 0:
            super().save(folder, step)


def deepspeed_config(cfg, world_size: int, use_cuda: bool) -> dict:
    """DeepSpeed config from the typed run config (ZeRO stage, offload, precision, accumulation)."""
    e, o = cfg.engine, cfg.optim
    bf16 = e.precision == "bf16" or (e.precision == "auto" and use_cuda)
    stage = e.effective_zero(world_size, bf16)          # one fp32 worker: stage 0 (nothing to partition)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if e.offload and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_cuda}
    return {
        # one DeepSpeed micro-step per backward: accumulation x GradCache chunks
        "train_micro_batch_size_per_gpu": cfg.batch_size * o.grad_accum // cfg.micro_steps(),
        "gradient_accumulation_steps": cfg.micro_steps(),
        "train_batch_size": cfg.batch_size * o.grad_accum * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,     # a torch AdamW: no fused_adam JIT build on CPU
        "gradient_clipping": o.grad_clip if o.grad_clip > 0 else 0.0,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """deepspeed.initialize around the model, a torch AdamW and our LambdaLR schedule."""

    TAG = "ckpt"

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int, world_size: int, use_cuda: bool):
        import deepspeed

        self.cfg = cfg
        config = deepspeed_config(cfg, world_size, use_cuda)
        self.zero = config["zero_optimization"]["stage"]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(param_groups(model, cfg.optim), cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, model_parameters=params,
            config=config, dist_init_required=False)
        self.module = self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def autocast(self):
        return contextlib.nullcontext()             # bf16 is DeepSpeed's own (the model is cast)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)   # the loop already scaled for accumulation

    def step(self) -> None:
        self.engine.step()                          # DeepSpeed steps the optimizer at accumulation boundaries

    def get_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, folder: str, step: int) -> None:
        self.engine.save_checkpoint(folder, tag=self.TAG, client_state={"step": step})   # collective
        full_fp32 = self.zero < 3 and not self.engine.bfloat16_enabled()
        if (full_fp32 or self.zero == 0) and self.engine.global_rank == 0:
            # ZeRO 0-2 in fp32 keep the full weights on every rank: export them as safetensors. ZeRO-3
            # partitions (and bf16 runs' fp32 master weights) are merged at export by zero_to_fp32.
            from safetensors.torch import save_file

            # DeepSpeed flattens parameters into shared buffers: save independent copies
            state = {k: v.detach().clone().contiguous() for k, v in self.module.state_dict().items()}
            save_file(state, f"{folder}/model.safetensors")

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag=self.TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {folder}")
