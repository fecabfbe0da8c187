"""``fogline model train``: a zoo model or your own, on one process or many.

NOTE: importing this module must stay cheap and torch-free (``fogline`` builds
its whole parser on edge devices too); the handler imports the pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.pipeline.recipe import Recipe
from cloud.pipeline.zoo import KIND_ALIASES, ZOO, entry
from common.cli_errors import one_line_errors
from common.errors import InvalidInputError

if TYPE_CHECKING:
    from cloud.pipeline.factory import TrainingData
    from cloud.pipeline.loop import TrainResult

logger = logging.getLogger(__name__)

CONTRACT = """\
your own model:
  --factory pkg.module:make_model   make_model() -> torch.nn.Module; forward(*inputs) takes one
                                    tensor per input (in the dataset's input order) and returns
                                    the output (or a tuple, one per output name). If the module
                                    has logits(*inputs), the loss uses it (forward may end in a
                                    softmax). Exported to ONNX with a dynamic batch axis.
  --dataset pkg.module:make_dataset make_dataset() -> cloud.pipeline.factory.TrainingData(
                                    train_inputs={name: Tensor[N, ...]}, train_targets=Tensor[N],
                                    val_inputs={...}, val_targets=..., output_names=("out",),
                                    loss=None|"cross_entropy"|"mse", augment=None|fn(batch)->batch,
                                    dynamic_axes={name: {axis: label}} beyond the batch axis)
                                    Integer targets: classification (cross-entropy, accuracy);
                                    float targets: regression (MSE).
  Both are called with no arguments after the seed is set; the current directory is importable.
  --data-out D.npz writes the val split (one array per input, plus 'labels' or 'reference'),
  ready for `fogline model compress --data D.npz` and `fogline model package --data D.npz`.

many processes (DistributedDataParallel; gloo on CPU, NCCL + mixed precision on CUDA):
  torchrun --nproc_per_node 2 -m fogline model train --model digits-edge --out m.onnx
  Rank 0 alone writes checkpoints, the ONNX file, --data-out and --metrics-out. Each rank
  takes batch_size / world rows per step, so the recipe means the same on any world size.

checkpoints: --checkpoint-dir D --checkpoint-every N writes ckpt-<step>.pt atomically every
  N steps (weights, optimizer, data position, RNG); --resume continues from the newest one
  and ends where the uninterrupted run would have (same seed, same world size).
"""


def _model_choices() -> list[str]:
    return [*ZOO, *KIND_ALIASES]


def _specs(args: argparse.Namespace) -> tuple[str, str, Recipe, str]:
    """(model spec, dataset spec, recipe, label) from the zoo or --factory/--dataset."""
    if args.factory or args.dataset:
        if not (args.factory and args.dataset):
            raise InvalidInputError("--factory and --dataset go together")
        if args.model or args.kind:
            raise InvalidInputError("give --model/--kind or --factory/--dataset, not both")
        return args.factory, args.dataset, Recipe(), args.factory
    name = args.model or args.kind
    if name is None:
        raise InvalidInputError("say what to train: --model NAME or --factory/--dataset")
    e = entry(name)
    return e.model, e.dataset, e.recipe, KIND_ALIASES.get(name, name)


def load_extra(source: str) -> dict[str, Any]:
    """The arrays of ``--extra-data SOURCE``: a D.npz path, or ``hard-examples:MODEL``."""
    import io

    import numpy as np

    from cloud.control_client import CONTROL_ENV, DEFAULT_CONTROL, TOKEN_ENV, ControlClient
    from common.names import check_name

    kind, _, model = source.partition(":")
    try:
        if kind == "hard-examples" and model:
            client = ControlClient(
                os.environ.get(CONTROL_ENV, DEFAULT_CONTROL), token=os.environ.get(TOKEN_ENV)
            )
            data = client.get_bytes(f"/api/hard-examples/{check_name(model, 'model name')}")
            npz = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            npz = np.load(Path(source), allow_pickle=False)
        with npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"--extra-data {source}: {exc}") from exc


def _checkpoint_plan(args: argparse.Namespace) -> Any:
    from cloud.pipeline.loop import CheckpointPlan

    if args.checkpoint_dir is None:
        if args.resume:
            raise InvalidInputError("--resume needs --checkpoint-dir")
        return None
    if args.checkpoint_every < 1:
        raise InvalidInputError(
            f"--checkpoint-every must be at least 1, got {args.checkpoint_every}"
        )
    return CheckpointPlan(args.checkpoint_dir, args.checkpoint_every, args.resume)


def cmd_train(args: argparse.Namespace) -> int:
    """Train, then (rank 0) export ONNX and write the optional data and metrics files."""
    from cloud.pipeline.distributed import DistContext, barrier, process_group
    from cloud.pipeline.progress import default_progress
    from cloud.pipeline.train import train

    model_spec, dataset_spec, base, label = _specs(args)
    recipe = base.override(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    plan = _checkpoint_plan(args)
    ctx = DistContext.from_env(os.environ)
    with process_group(ctx):
        if ctx.is_main:
            print(
                f"training {label} (seed {args.seed}, {recipe.epochs} epochs, "
                f"{ctx.world_size} process{'es' if ctx.distributed else ''})",
                file=sys.stderr,
            )
        result, data = train(
            model_spec,
            dataset_spec,
            recipe,
            seed=args.seed,
            ctx=ctx,
            checkpoints=plan,
            progress=default_progress(),
            amp=not args.no_amp,
            extra=[(source, load_extra(source)) for source in args.extra_data or ()],
        )
        if ctx.is_main:
            _write_outputs(args, result, data, ctx.world_size)
        barrier(ctx)  # no rank leaves (and tears the group down) before the files exist
    return 0


def _write_outputs(
    args: argparse.Namespace, result: TrainResult, data: TrainingData, world: int
) -> None:
    """Export ONNX, check it against torch on the val rows, write --data-out/--metrics-out."""
    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.model_data import save_model_data
    from cloud.pipeline.onnx_model import run_outputs

    examples = {k: v[:1].cpu() for k, v in data.val_inputs.items()}
    path = export_onnx(
        result.model,
        args.out,
        examples=examples,
        output_names=data.output_names,
        dynamic_axes=data.dynamic_axes,
    )
    val = {k: v.cpu().numpy() for k, v in data.val_inputs.items()}
    targets = data.val_targets.cpu().numpy()
    first = run_outputs(path, val)[data.output_names[0]]
    figures = result.metrics() | {"world_size": world, "onnx_bytes": path.stat().st_size}
    if data.is_classification:
        figures["onnx_val_accuracy"] = float((first.argmax(axis=-1) == targets).mean())
    if args.data_out is not None:
        kind = "labels" if data.is_classification else "reference"
        save_model_data(args.data_out, val, **{kind: targets})
    if args.metrics_out is not None:
        args.metrics_out.write_text(json.dumps(figures, indent=2) + "\n")
    acc = figures.get("onnx_val_accuracy")
    quality = f"val accuracy {acc:.2%}" if acc is not None else f"val loss {result.val_loss:.4g}"
    print(f"wrote {path} ({figures['onnx_bytes']} bytes), {quality}")
    if args.data_out is not None:
        print(f"wrote {args.data_out} ({len(targets)} val rows)")


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a zoo model or your own PyTorch model and export it to ONNX",
        description="Train a model from the built-in zoo ("
        + "; ".join(f"{k}: {v.description}" for k, v in ZOO.items())
        + ") or your own (--factory/--dataset), then export one ONNX file.",
        epilog=CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_argument_group("what to train")
    which.add_argument("--model", choices=_model_choices(), help="a zoo model")
    which.add_argument("--kind", choices=sorted(KIND_ALIASES), help="alias: edge = digits-edge")
    which.add_argument("--factory", metavar="PKG.MODULE:NAME", help="your model factory")
    which.add_argument("--dataset", metavar="PKG.MODULE:NAME", help="your dataset factory")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (Adam)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step, all ranks")
    p.add_argument("--seed", type=int, default=0, help="weight init / data order seed (default 0)")
    p.add_argument(
        "--data-out",
        type=Path,
        default=None,
        metavar="D.npz",
        help="write the val split, for compress/package --data",
    )
    p.add_argument("--metrics-out", type=Path, default=None, help="write final metrics as JSON")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="where checkpoints go")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--extra-data",
        action="append",
        metavar="SOURCE",
        help="more training rows (repeatable): a D.npz file (model inputs + labels/reference), "
        "or hard-examples:MODEL, the examples the fleet escalated for MODEL with the cloud's "
        "answers, fetched from the control plane ($FOGLINE_CONTROL, viewer $FOGLINE_TOKEN)",
    )
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.set_defaults(func=one_line_errors(cmd_train))
