"""Accuracy-driven int8 search: try configurations, keep the fastest inside the gate.

What it tries, in stages, for the op types the model has (each stage only
where it can help, since a transformer candidate costs a minute on two cores):

1. dynamic (MatMulInteger; never on Conv, where ConvInteger is ~12x slower
   than fp32) and static QDQ with MinMax calibration, each with per-channel
   and per-tensor weights. In a fused transformer graph (``cloud.pipeline.fusion``)
   dynamic also quantizes Attention and EmbedLayerNormalization (QAttention,
   QEmbedLayerNormalization: the fast path); QDQ has no such ops and leaves them fp32;
2. if static MinMax missed the gate on quality: Entropy and Percentile calibration
   (the same graph, so the same speed: only worth it to rescue quality);
3. the best-quality config so far with each rounding option: 7-bit weights
   (``reduce_range``), asymmetric weights, symmetric activations (static);
4. the best-quality config with each op type in turn kept fp32 (Q/DQ around
   a small layer can cost more than it saves);
5. if no whole-model config passed (stages 1-3): the best-quality config with named
   nodes kept fp32: MatMuls between two activations (attention scores, static only),
   then the 1/12, 1/6, 1/3 of nodes whose inputs have the heaviest outliers (largest
   peak-to-RMS ratio on calibration rows: the ones one int8 scale fits worst),
   then up to two bisection steps towards the fewest such nodes that pass.

Each candidate is scored on the data (``cloud.pipeline.quality``), judged by the
gate (quality, and size where the gate has a size budget: a candidate over it
fails whatever its quality), and the ones that pass are timed against the fp32
parent, interleaved (``cloud.pipeline.speed_compare``). The winner is the highest
throughput at the requested batch; ties in speed do not matter, the table shows them.

NOTE: torch-free.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cloud.pipeline.gate import QualityGate
from cloud.pipeline.model_data import ModelData
from cloud.pipeline.quantize import (
    CALIBRATIONS,
    COMPUTE_OP_TYPES,
    DEFAULT_OP_TYPES,
    DYNAMIC,
    DYNAMIC_ONLY_OP_TYPES,
    STATIC,
    TABLE_OP_TYPES,
    NothingQuantizedError,
    QuantConfig,
    pre_process,
    quantize,
)
from cloud.pipeline.speed_compare import Speed, measure, session_runner

logger = logging.getLogger(__name__)

OUTLIER_ROWS = 16
OUTLIER_SHARES = (1 / 12, 1 / 6, 1 / 3)  # of the quantizable nodes, heaviest outliers first
BISECT_STEPS = 2  # then halve the gap between the last count that failed and one that passed


@dataclass
class Trial:
    """One configuration tried: its quality, the gate's verdict and (if it passed) speed."""

    config: QuantConfig
    path: Path
    size_bytes: int
    quality: float
    miss: str | None  # why it failed the gate; None = passed
    oversize: bool = False  # missed the size budget (whatever its quality)
    speed: Speed | None = None
    speedup: float | None = None  # throughput / fp32 throughput, same rounds

    @property
    def passed(self) -> bool:
        return self.miss is None


@dataclass
class SearchResult:
    metric: str
    parent_quality: float
    parent_size: int
    parent_speed: Speed
    trials: list[Trial]

    @property
    def best(self) -> Trial | None:
        timed = [t for t in self.trials if t.passed and t.speed is not None]
        return max(timed, key=lambda t: t.speed.throughput if t.speed else 0.0, default=None)


def _graph_facts(prepared: Path) -> tuple[set[str], list[str], list[str]]:
    """(quantizable op types present, activation×activation MatMuls, quantizable nodes)."""
    import onnx

    graph = onnx.load(str(prepared)).graph
    weights = {i.name for i in graph.initializer}
    # A Gather counts only when it reads a table of weights (not a shape lookup).
    nodes = [
        n
        for n in graph.node
        if n.op_type in COMPUTE_OP_TYPES
        or (n.op_type in TABLE_OP_TYPES and any(i in weights for i in n.input))
    ]
    act_act = [
        n.name for n in nodes if n.op_type == "MatMul" and not any(i in weights for i in n.input)
    ]
    return {n.op_type for n in nodes}, act_act, [n.name for n in nodes]


def outlier_ranking(prepared: Path, feeds: dict[str, np.ndarray]) -> list[str]:
    """Nodes with weights by the peak-to-RMS ratio of their activation input, worst first.

    (MatMuls between two activations are handled apart: dynamic int8 never quantizes them.)
    """
    import onnx

    model = onnx.load(str(prepared))
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    probes: dict[str, str] = {}  # node -> its first non-weight input
    for n in graph.node:
        if n.op_type in COMPUTE_OP_TYPES:
            acts = [i for i in n.input if i and i not in weights]
            if acts and len(acts) < len([i for i in n.input if i]):
                probes[n.name] = acts[0]
    known = {o.name for o in graph.output}
    for tensor in sorted(set(probes.values()) - known):
        graph.output.append(
            onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
        )
    with tempfile.TemporaryDirectory(prefix="fogline-probe-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        from common.onnx_runtime import open_session

        session = open_session(path)
        names = [o.name for o in session.get_outputs()]
        rows = {k: v[:OUTLIER_ROWS] for k, v in feeds.items()}
        values = dict(zip(names, session.run(names, rows), strict=True))
    scores = {}
    for node, tensor in probes.items():
        x = np.asarray(values[tensor], dtype=np.float64)
        rms = float(np.sqrt((x**2).mean())) if x.size else 0.0
        scores[node] = float(np.abs(x).max()) / rms if rms > 0 else 0.0
    return sorted(scores, key=lambda n: -scores[n])


def base_candidates(op_types: set[str]) -> list[QuantConfig]:
    """Whole-model configurations for the op types the model has."""
    present = tuple(t for t in DEFAULT_OP_TYPES if t in op_types)
    dynamic_ops = tuple(t for t in present if t != "Conv")
    static_ops = tuple(t for t in present if t not in DYNAMIC_ONLY_OP_TYPES)
    out = []
    if dynamic_ops:
        out += [QuantConfig(DYNAMIC, pc, op_types=dynamic_ops) for pc in (True, False)]
    if static_ops:
        out += [QuantConfig(STATIC, pc, "minmax", op_types=static_ops) for pc in (True, False)]
    return out


def option_candidates(best: QuantConfig) -> list[QuantConfig]:
    """``best`` with each quantizer option that changes rounding, not the graph.

    7-bit weights (``reduce_range``) keep the u8 x s8 pair sums of AVX2 kernels without
    VNNI from saturating; asymmetric weights give each channel a zero point; static
    configs also try symmetric activations (zero point 0).
    """
    out = [replace(best, reduce_range=True), replace(best, weight_symmetric=False)]
    if best.method == STATIC:
        out.append(replace(best, activation_symmetric=True))
    return out


def calibration_candidates(static: QuantConfig) -> list[QuantConfig]:
    """The other calibration methods for a static config (same graph: same speed)."""
    return [replace(static, calibration=c) for c in CALIBRATIONS if c != static.calibration]


def op_type_exclusions(best: QuantConfig, op_types: set[str]) -> list[QuantConfig]:
    """``best`` with each of its op types in turn kept fp32 (when it has several)."""
    present = [t for t in best.op_types if t in op_types]
    return [replace(best, exclude_op_types=(t,)) for t in present] if len(present) > 1 else []


def layer_exclusions(best: QuantConfig, act_act: list[str], ranked: list[str]) -> list[QuantConfig]:
    """``best`` with named nodes kept fp32: attention MatMuls, then outlier-heavy nodes."""
    out = []
    if act_act and best.method == STATIC:  # dynamic never quantizes them
        out.append(replace(best, exclude_nodes=tuple(act_act)))
    for share in OUTLIER_SHARES:
        k = max(1, round(len(ranked) * share))
        if k < len(ranked):
            out.append(replace(best, exclude_nodes=tuple(sorted(ranked[:k]))))
    return out


def _between(trials: list[Trial], best: QuantConfig, ranked: list[str]) -> int | None:
    """A node count halfway between the most that failed and the fewest that passed."""
    counts = {
        len(t.config.exclude_nodes): t.passed
        for t in trials
        if replace(t.config, exclude_nodes=()) == best and t.config.exclude_nodes
        and set(t.config.exclude_nodes) <= set(ranked)
    }  # fmt: skip
    fewest_pass = min((k for k, ok in counts.items() if ok), default=None)
    most_fail = max((k for k, ok in counts.items() if not ok and k < (fewest_pass or 0)),
                    default=0)  # fmt: skip
    if fewest_pass is None or fewest_pass - most_fail < 2:
        return None
    return (fewest_pass + most_fail) // 2


Scorer = Callable[[Path], float]


def search(
    fp32: Path,
    calibration: dict[str, np.ndarray],
    data: ModelData,
    workdir: Path,
    score: Scorer,
    gate: QualityGate,
    *,
    metric: str,
    parent_quality: float,
    speed_batch: int = 32,
    calibration_batch: int = 64,
    rounds: int = 3,
    speed_feeds: dict[str, np.ndarray] | None = None,
) -> SearchResult:
    """Try the configurations on ``fp32``; the models land in ``workdir``.

    Speed is measured on ``speed_feeds`` (default: the data's rows), e.g. full-length
    token rows while quality is judged on shorter real sentences.
    """
    prepared = pre_process(fp32, workdir / "prepared.onnx")
    op_types, act_act, _ = _graph_facts(prepared)
    parent_size = fp32.stat().st_size
    trials: list[Trial] = []

    def attempt(config: QuantConfig) -> None:
        path = workdir / f"candidate-{len(trials)}.onnx"
        try:
            quantize(fp32, path, config, calibration, batch=calibration_batch)
        except NothingQuantizedError as exc:
            trials.append(Trial(config, path, 0, float("nan"), str(exc)))
            return
        quality, size = score(path), path.stat().st_size
        size_miss = gate.size_miss(size, parent_size)
        miss = gate.miss(metric, parent_quality, quality)
        miss = "; ".join(m for m in (miss, size_miss) if m) or None
        trial = Trial(config, path, size, quality, miss, oversize=size_miss is not None)
        logger.info("tried %s: %s %.4f %s", config.label(), metric, quality, trial.miss or "ok")
        trials.append(trial)

    def untried(configs: list[QuantConfig]) -> list[QuantConfig]:
        return [c for c in configs if all(t.config != c for t in trials)]  # small models repeat

    def best_quality() -> Trial:
        """The best quality within the size budget (any size if none is)."""
        return max(trials, key=lambda t: (t.size_bytes > 0 and not t.oversize,
                                          t.quality if t.size_bytes else -1.0))  # fmt: skip

    for config in base_candidates(op_types):
        attempt(config)
    # Calibration changes quality, not the graph (nor its size): worth trying only where
    # MinMax missed on quality.
    static = next((t for t in trials if t.config.method == STATIC and t.size_bytes), None)
    if static is not None and not static.passed and not static.oversize:
        for config in calibration_candidates(static.config):
            attempt(config)
    # Rounding options of the best so far: same graph, same speed, maybe better quality.
    for config in untried(option_candidates(best_quality().config)):
        attempt(config)
    # Layers kept fp32: op types always (Q/DQ around a small layer can cost more than
    # it saves); named nodes only when no whole-model config passed.
    # NOTE: judged before stage 3: keeping a whole op type fp32 (say every MatMul) may pass
    # the gate but gives up the speed, so it must not stop the search for single nodes.
    whole_model_passed = any(t.passed for t in trials)
    best = best_quality().config
    for config in untried(op_type_exclusions(best, op_types)):
        attempt(config)
    if not whole_model_passed:  # from the best whole-model config, not a stage-3 one
        ranked = outlier_ranking(prepared, calibration)
        for config in untried(layer_exclusions(best, act_act, ranked)):
            attempt(config)
        for _ in range(BISECT_STEPS):  # the fewest fp32 nodes that still pass
            k = _between(trials, best, ranked)
            if k is None:
                break
            attempt(replace(best, exclude_nodes=tuple(sorted(ranked[:k]))))
    passed = [t for t in trials if t.passed]
    runners = {"fp32": session_runner(fp32)}
    runners.update({str(i): session_runner(t.path) for i, t in enumerate(trials) if t.passed})
    # Nothing passed: still time the parent once, the table's caption gives its figures.
    speeds = measure(
        runners, speed_feeds or data.inputs, batch=speed_batch, rounds=rounds if passed else 1
    )
    parent_speed = speeds["fp32"]
    for i, trial in enumerate(trials):
        if str(i) in speeds:
            trial.speed = speeds[str(i)]
            trial.speedup = trial.speed.throughput / parent_speed.throughput
    return SearchResult(metric, parent_quality, parent_size, parent_speed, trials)
