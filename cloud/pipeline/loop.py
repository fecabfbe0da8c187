"""The one training loop: built-in zoo models and users' models go through it alike.

Data order is a pure function of (seed, epoch, rank, world size): a
``DistributedSampler`` draws it, on one process as on many. With the
optimizer, scheduler, running loss and torch's RNG state (augmentation,
dropout) in each checkpoint, a resumed run replays exactly what the
uninterrupted run would have done. Under ``torchrun`` the model is wrapped in
``DistributedDataParallel`` and each rank takes ``batch_size / world`` rows
per step, so a step still sees ``batch_size`` rows in total and the recipe
means the same thing on any number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from cloud.pipeline.checkpoint import check_config, load_latest, save_checkpoint
from cloud.pipeline.distributed import DistContext, mean_across, sum_across
from cloud.pipeline.factory import TrainingData
from cloud.pipeline.progress import NullProgress, Progress
from cloud.pipeline.recipe import Recipe

logger = logging.getLogger(__name__)

_VAL_BATCH = 512

# A training loss other than the dataset's own: (model output, targets, the rows' indices
# in the train split) -> loss. Distillation uses it to add the teacher's soft targets.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CheckpointPlan:
    directory: Path
    every: int  # optimizer steps between checkpoints
    resume: bool = False


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module  # the bare module (never the DDP wrapper), in eval mode
    epochs: int
    steps: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None  # classification only

    def metrics(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
        }


class _TrainView(nn.Module):
    """What the loss sees: ``logits`` if the model has it, else ``forward``'s first output.

    NOTE: DDP syncs gradients only through its own ``forward``, so the loss must
    go through this module's ``forward``, never ``model.logits`` directly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits = getattr(self.model, "logits", None)
        out = logits(*inputs) if callable(logits) else self.model(*inputs)
        return out[0] if isinstance(out, tuple | list) else out


@dataclass
class _State:
    """Where the run is; what a checkpoint saves besides module states."""

    epoch: int = 0  # 0-based epoch in progress
    batch: int = 0  # next batch within it
    global_step: int = 0
    loss_total: float = 0.0
    loss_rows: int = 0


def _loss(data: TrainingData, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if data.is_classification:
        return nn.functional.cross_entropy(out.float(), target)
    return nn.functional.mse_loss(out.float().reshape(target.shape), target.float())


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def evaluate_torch(
    view: nn.Module, data: TrainingData, device: torch.device
) -> tuple[float, float | None]:
    """(mean val loss, val accuracy or None) of the model in eval mode."""
    view.eval()
    total, correct, rows = 0.0, 0, len(data.val_targets)
    with torch.no_grad():
        for start in range(0, rows, _VAL_BATCH):
            xb = [v[start : start + _VAL_BATCH].to(device) for v in data.val_inputs.values()]
            yb = data.val_targets[start : start + _VAL_BATCH].to(device)
            out = view(*xb)
            total += float(_loss(data, out, yb)) * len(yb)
            if data.is_classification:
                correct += int((out.argmax(dim=-1) == yb).sum())
    view.train()
    return total / rows, (correct / rows if data.is_classification else None)


def _config(recipe: Recipe, seed: int, ctx: DistContext, n_train: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "world_size": ctx.world_size,
        "train_rows": n_train,
    }


class _Trainer:
    """One run's moving parts; ``fit`` below is the only way in."""

    def __init__(
        self,
        model: nn.Module,
        data: TrainingData,
        recipe: Recipe,
        ctx: DistContext,
        *,
        seed: int,
        amp: bool,
        loss: LossFn | None = None,
    ) -> None:
        self.model, self.data, self.recipe, self.ctx, self.seed = model, data, recipe, ctx, seed
        self.loss = loss
        self.device = ctx.device
        model.to(self.device)
        view: nn.Module = _TrainView(model)
        if ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            view = DistributedDataParallel(view, device_ids=ids)
        self.view = view
        self.plain_view = view.module if isinstance(view, DistributedDataParallel) else view
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=recipe.epochs
        )
        self.amp = amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        # fp16 needs loss scaling; bf16 (and fp32) do not.
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16
        )
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(len(data.train_targets)),  # type: ignore[arg-type]  # only len() is used
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=True,
            seed=seed,
        )
        self.rank_batch = max(1, recipe.batch_size // ctx.world_size)
        self.state = _State()

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.sampler.num_samples / self.rank_batch)

    def config(self) -> dict[str, Any]:
        return _config(self.recipe, self.seed, self.ctx, len(self.data.train_targets))

    def snapshot(self, loss_total: float, loss_rows: int) -> dict[str, Any]:
        """The checkpoint; ``loss_*`` are the running sums over *all* ranks."""
        s = self.state
        cuda = self.device.type == "cuda"
        return {
            "config": self.config(),
            "epoch": s.epoch,
            "batch": s.batch,
            "global_step": s.global_step,
            "loss_total": loss_total,
            "loss_rows": loss_rows,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        check_config(saved["config"], self.config())
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        # NOTE: every rank is seeded alike and draws alike, so rank 0's RNG state is everyone's.
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        # The saved running loss is every rank's together: rank 0 carries it on,
        # the others start from zero, so the epoch's mean across ranks comes out right.
        mine = (saved["loss_total"], saved["loss_rows"]) if self.ctx.is_main else (0.0, 0)
        self.state = _State(saved["epoch"], saved["batch"], saved["global_step"], *mine)

    def step(self, idx: torch.Tensor) -> None:
        data = self.data
        xb = {k: v[idx] for k, v in data.train_inputs.items()}
        if data.augment is not None:
            xb = data.augment(xb)
        xb, yb = _to(xb, self.device), data.train_targets[idx].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
        )
        with autocast:
            out = self.view(*xb.values())
            loss = self.loss(out, yb, idx) if self.loss else _loss(data, out, yb)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.loss_total += float(loss.detach()) * len(idx)
        self.state.loss_rows += len(idx)
        self.state.batch += 1
        self.state.global_step += 1

    def epoch_order(self) -> torch.Tensor:
        self.sampler.set_epoch(self.state.epoch)
        return torch.tensor(list(iter(self.sampler)), dtype=torch.long)


def fit(
    model: nn.Module,
    data: TrainingData,
    recipe: Recipe,
    *,
    seed: int = 0,
    ctx: DistContext | None = None,
    checkpoints: CheckpointPlan | None = None,
    progress: Progress | None = None,
    amp: bool = True,
    loss: LossFn | None = None,
) -> TrainResult:
    """Train ``model`` on ``data``; resume from ``checkpoints`` if asked and one exists.

    ``loss`` replaces the dataset's training loss (validation keeps the dataset's).
    """
    ctx = ctx or DistContext()
    trainer = _Trainer(model, data, recipe, ctx, seed=seed, amp=amp, loss=loss)
    if checkpoints is not None and checkpoints.resume:
        saved = load_latest(checkpoints.directory)
        if saved is not None:
            trainer.restore(saved)
        else:
            logger.info("no checkpoint in %s: starting from the beginning", checkpoints.directory)
    show = progress if (progress is not None and ctx.is_main) else NullProgress()
    per_epoch = trainer.batches_per_epoch
    show.start(per_epoch * recipe.epochs, recipe.epochs, trainer.state.global_step)
    try:
        val = _epochs(trainer, checkpoints, show)
    finally:
        show.close()
    model.eval()
    s = trainer.state
    return TrainResult(model, recipe.epochs, s.global_step, val[0], val[1], val[2])


def _checkpoint(trainer: _Trainer, directory: Path) -> None:
    """Rank 0 writes; every rank takes part in summing the running loss first."""
    s, ctx = trainer.state, trainer.ctx
    total, rows = sum_across(ctx, s.loss_total, s.loss_rows)
    if ctx.is_main:
        save_checkpoint(directory, s.global_step, trainer.snapshot(total, rows))


def _epochs(
    trainer: _Trainer, checkpoints: CheckpointPlan | None, show: Progress
) -> tuple[float, float, float | None]:
    """Run the remaining epochs; return (train loss, val loss, val accuracy) of the last."""
    s, ctx, recipe = trainer.state, trainer.ctx, trainer.recipe
    train_loss, val_loss, val_acc = float("nan"), float("nan"), None
    trainer.view.train()
    while s.epoch < recipe.epochs:
        order = trainer.epoch_order()
        while s.batch < trainer.batches_per_epoch:
            idx = order[s.batch * trainer.rank_batch : (s.batch + 1) * trainer.rank_batch]
            trainer.step(idx)
            show.step(1, len(idx) * ctx.world_size, s.loss_total / s.loss_rows)
            if checkpoints and s.global_step % checkpoints.every == 0:
                _checkpoint(trainer, checkpoints.directory)
        train_loss = mean_across(ctx, s.loss_total, s.loss_rows)
        trainer.scheduler.step()
        val_loss, val_acc = evaluate_torch(trainer.plain_view, trainer.data, trainer.device)
        s.epoch, s.batch, s.loss_total, s.loss_rows = s.epoch + 1, 0, 0.0, 0
        figure = f"val acc {val_acc:.2%}" if val_acc is not None else f"val loss {val_loss:.4g}"
        show.epoch_end(s.epoch, recipe.epochs, train_loss, figure)
        logger.debug("epoch %d: loss %.4f, %s", s.epoch, train_loss, figure)
    return train_loss, val_loss, val_acc
