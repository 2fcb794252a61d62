"""What updates the trainable module in a step: optimizers, LR schedule, loss scaling, clipping.

:class:`Optimization` bundles the main optimizer (SGD or AdamW over the student and the adapters),
the LR schedule, the ``GradScaler`` of float16 steps, gradient clipping, the optimizers KD terms
bring for their own parameters (:meth:`~kdsweep.kd.term.KDTerm.own_optimizer`, stepped only when
:meth:`~kdsweep.kd.term.KDTerm.steps_at` says so) and the frozen-backbone warm-up of the training
config. ``train_one_epoch`` only calls :meth:`Optimization.zero_grad`, :meth:`backward` and
:meth:`step`; it knows nothing of any method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdsweep.config import TrainConfig
from kdsweep.kd.term import KDTerm

__all__ = ["Optimization", "amp_settings", "float32_settings", "build_optimization", "make_optimizer", "warmup_cosine"]


@dataclass
class Optimization:
    """Everything that updates parameters in one training step (see the module docstring).

    Attributes:
        optimizer, scheduler: the main optimizer and its per-step LR schedule.
        params: the main optimizer's parameters, which the gradient-norm clip covers together. The
            parameters of a term that brings its own optimizer (ScaleKD's assistant and its Adam) are
            not among them: their gradients neither count in the student's norm nor get clipped.
        grad_clip: max total gradient norm, or None.
        scaler: a ``GradScaler`` for float16 steps, or None.
        amp_dtype: the autocast dtype of the forward (float16, bfloat16), or None (float32).
        term_optimizers: ``(optimizer, steps_at(progress) -> bool)`` of the terms that bring one.
        frozen, freeze_until: trainable parameters (the student's backbone body) that take no part in
            training while ``progress < freeze_until``: :meth:`begin` sets ``requires_grad=False``
            on them for that span, so autograd computes no gradient for them (and, the body being
            the first part of the network, no backward through it at all) and DDP reduces none.
        rewrap: called whenever :meth:`begin` changes which parameters require gradients: DDP
            fixes its buckets when it wraps a module, so a DDP-wrapped module is wrapped again
            (:meth:`kdsweep.train.distiller.Distiller.rewrap`); None without DDP.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[Tensor]
    grad_clip: float | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    term_optimizers: list[tuple[torch.optim.Optimizer, Callable[[float], bool]]] = field(default_factory=list)
    frozen: list[Tensor] = field(default_factory=list)
    freeze_until: float = 0.0
    rewrap: Callable[[], None] | None = None
    _frozen_now: bool = field(default=False, init=False, repr=False)

    @property
    def amp(self) -> bool:
        return self.amp_dtype is not None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *(opt for opt, _ in self.term_optimizers)]

    def begin(self, progress: float) -> None:
        """Before a step's forward: freeze :attr:`frozen` (``requires_grad_(False)``) while
        ``progress < freeze_until``, thaw it after; on every change call :attr:`rewrap`. The change
        happens at the same step on every worker (``progress`` is the same), as DDP's wrapping
        collectives need. ``progress``: the fraction of training done before this step."""
        want = bool(self.frozen) and progress < self.freeze_until
        if want == self._frozen_now:
            return
        for p in self.frozen:
            p.requires_grad_(not want)
        self._frozen_now = want
        if self.rewrap is not None:
            self.rewrap()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def backward(self, total: Tensor) -> None:
        """Backward of the step's total loss (scaled, then unscaled, with a scaler)."""
        if self.scaler is None:
            total.backward()
            return
        self.scaler.scale(total).backward()
        for opt in self.optimizers:
            self.scaler.unscale_(opt)

    def step(self, progress: float) -> None:
        """Clip, step every active optimizer, then the scaler and the schedule. ``progress``: the
        fraction of training done before this step. A frozen parameter has no gradient (see
        :meth:`begin`; a caller that skipped it still gets its gradients dropped), so no optimizer
        moves it, weight decay included."""
        if progress < self.freeze_until:
            for p in self.frozen:
                p.grad = None
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        active = [self.optimizer, *(opt for opt, steps_at in self.term_optimizers if steps_at(progress))]
        for opt in active:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "extra_optimizers": [opt.state_dict() for opt, _ in self.term_optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for (opt, _), opt_state in zip(self.term_optimizers, state.get("extra_optimizers", [])):
            opt.load_state_dict(opt_state)


def make_optimizer(params: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over ``params``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def warmup_cosine(total_iters: int, warmup_iters: int, schedule: str) -> Callable[[int], float]:
    """LR multiplier per iteration: linear warm-up, then cosine / step (x0.1 at 2/3 and 8/9) / constant."""

    def factor(it: int) -> float:
        if warmup_iters > 0 and it < warmup_iters:
            return 0.001 + (1 - 0.001) * it / warmup_iters
        if schedule == "constant":
            return 1.0
        progress = min(max(it - warmup_iters, 0) / max(total_iters - warmup_iters, 1), 1.0)
        if schedule == "step":
            return 0.01 if progress >= 8 / 9 else 0.1 if progress >= 2 / 3 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def float32_settings(cfg: TrainConfig) -> dict[str, bool]:
    """Set how CUDA computes float32 for this process from ``cfg.tf32`` (see
    :class:`~kdsweep.config.TrainConfig`): TF32 for matmuls and cuDNN convolutions, or strict
    float32 for both. Returns the flags as set. A worker process trains one run, so the global
    flags are the run's."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype | None, torch.amp.GradScaler | None]:
    """``(enabled, dtype, scaler)`` of mixed precision for ``cfg`` on ``device``.

    ``amp_dtype: auto`` is float16 on CUDA (with a ``GradScaler``: float16 gradients underflow
    without loss scaling) and bfloat16 elsewhere (the CPU's autocast dtype; bfloat16 has float32's
    exponent range, so it needs no scaler). An explicit ``float16`` gets a ``GradScaler`` on any
    device that has one (the CPU too, in torch >= 2.3).
    """
    if not cfg.amp:
        return False, None, None
    name = cfg.amp_dtype if cfg.amp_dtype != "auto" else ("float16" if device.type == "cuda" else "bfloat16")
    dtype = getattr(torch, name)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return True, dtype, scaler


def build_optimization(trainable: nn.Module, student: nn.Module, cfg: TrainConfig, device: torch.device,
                       steps_per_epoch: int) -> Optimization:
    """The :class:`Optimization` of a run: the KD terms in ``trainable`` that bring their own
    optimizer get it (their parameters leave the main optimizer and its gradient clip), everything
    else trains under ``cfg``'s optimizer with a warm-up then ``cfg.lr_schedule`` over ``cfg.epochs``
    epochs; the student's backbone body is frozen for the first ``cfg.freeze_backbone`` of training.

    Args:
        trainable: the module that trains (possibly wrapped by DDP): the student and the terms.
        student: the unwrapped student.
    """
    inner = getattr(trainable, "module", trainable)
    owned: set[int] = set()
    term_optimizers: list[tuple[torch.optim.Optimizer, Callable[[float], bool]]] = []
    for term in getattr(inner, "terms", {}).values():
        if not isinstance(term, KDTerm):
            continue
        own = term.own_optimizer()
        if own is None:
            continue
        owned.update(id(p) for group in own.param_groups for p in group["params"])
        term_optimizers.append((own, term.steps_at))
    params = [p for p in trainable.parameters() if p.requires_grad]
    main = [p for p in params if id(p) not in owned]
    optimizer = make_optimizer(main, cfg)
    total = max(steps_per_epoch * cfg.epochs, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, min(cfg.warmup_iters, steps_per_epoch * cfg.epochs // 2), cfg.lr_schedule)
    )
    _, amp_dtype, scaler = amp_settings(cfg, device)
    # the body's trainable parameters only: torchvision's own frozen stages (trainable_backbone_layers)
    # stay frozen when the warm-up freeze ends
    frozen = [p for p in student.backbone.body.parameters() if p.requires_grad] if cfg.freeze_backbone > 0 else []
    return Optimization(optimizer=optimizer, scheduler=scheduler, params=main, grad_clip=cfg.grad_clip, scaler=scaler,
                        amp_dtype=amp_dtype, term_optimizers=term_optimizers, frozen=frozen,
                        freeze_until=cfg.freeze_backbone)
