"""A staged rollout's plan and its gates: pure decisions, tested with tables.

What the operator asks for (stages, soak, targets, thresholds) is checked here,
once, before anything is stored; which devices each stage takes and whether a
stage's figures breach a gate are functions of their inputs, nothing else.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import InvalidInputError
from common.names import check_name

DEFAULT_STAGES = (5.0, 25.0, 100.0)
MAX_STAGES = 20
MAX_SOAK_S = 7 * 86400.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_stages(value: object) -> list[float]:
    """``"5%,25%,100%"`` or a list of percentages: rising, in (0, 100], ending at 100."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or len(items) > MAX_STAGES:
        raise InvalidInputError(f"stages must be 1 to {MAX_STAGES} percentages, e.g. 5%,25%,100%")
    out: list[float] = []
    for item in items:
        text = str(item).strip().removesuffix("%") if isinstance(item, str) else item
        try:
            pct = float(text) if not isinstance(text, bool) else math.nan
        except (TypeError, ValueError):
            raise InvalidInputError(f"stage {str(item)[:20]!r} is not a percentage") from None
        if not math.isfinite(pct) or not 0 < pct <= 100:
            raise InvalidInputError(f"stage {str(item)[:20]!r} must be above 0% and at most 100%")
        if out and pct <= out[-1]:
            raise InvalidInputError("stages must rise, e.g. 5%,25%,100%")
        out.append(pct)
    if out[-1] != 100:
        raise InvalidInputError("the last stage must be 100%")
    return out


def parse_duration(value: object, what: str = "soak") -> float:
    """``"10m"``, ``"30s"``, ``"1h"``, ``"500ms"`` or a number of seconds; in [0, 7 days]."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be a duration such as 10m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise InvalidInputError(f"{what} {str(value)[:20]!r} must be a duration such as 10m")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SOAK_S:
        raise InvalidInputError(f"{what} must be between 0s and {MAX_SOAK_S / 86400:g} days")
    return seconds


@dataclass(frozen=True)
class Targets:
    """``all``, a list of device ids, or labels every target must carry."""

    all: bool = False
    devices: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse(value: object) -> Targets:
        if value == "all":
            return Targets(all=True)
        if isinstance(value, list):
            return Targets(devices=tuple(_unique([check_name(d, "device id") for d in value])))
        if not isinstance(value, str) or not value:
            raise InvalidInputError("'to' must be 'all', device ids (a,b) or labels (k=v,k=v)")
        parts = [p.strip() for p in value.split(",")]
        if all("=" in p for p in parts):
            labels = [p.split("=", 1) for p in parts]
            return Targets(
                labels=tuple(
                    (check_name(k, "label key"), check_name(v, "label value")) for k, v in labels
                )
            )
        if any("=" in p for p in parts):
            raise InvalidInputError("'to' mixes device ids and labels")
        return Targets(devices=tuple(_unique([check_name(p, "device id") for p in parts])))

    def to_json(self) -> Any:
        if self.all:
            return "all"
        if self.labels:
            return ",".join(f"{k}={v}" for k, v in self.labels)
        return list(self.devices)

    def matches(self, device_id: str, labels: dict[str, str]) -> bool:
        if self.all:
            return True
        if self.labels:
            return all(labels.get(k) == v for k, v in self.labels)
        return device_id in self.devices


@dataclass(frozen=True)
class Gates:
    max_failure_rate: float = 0.05  # install failures, and the error rate's increase
    max_escalation_increase: float = 0.05  # escalation rate, new minus previous (absolute)
    max_latency_increase: float = 0.2  # local p95 latency, relative to the previous version
    # ... and by at least this much, in ms: a sub-millisecond p95 moves by more than 20%
    # whenever the host is busy (a demo's canary: 0.8 -> 5.4 ms on a loaded 2-core CI).
    min_latency_increase_ms: float = 1.0

    @staticmethod
    def parse(doc: dict[str, Any]) -> Gates:
        values = {}
        for key, default in asdict(Gates()).items():
            value = doc.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"'{key}' must be a number")
            if not math.isfinite(value) or not 0 <= value <= 100:
                raise InvalidInputError(f"'{key}' must be a number in [0, 100]")
            values[key] = float(value)
        return Gates(**values)


def stage_sizes(stages: list[float], count: int) -> list[int]:
    """How many devices have the new version after each stage (cumulative, at least 1)."""
    sizes: list[int] = []
    for pct in stages:
        size = min(count, max(1, math.ceil(count * pct / 100 - 1e-9)))
        sizes.append(max(size, sizes[-1] if sizes else 0))
    return sizes


def assign_stages(devices: list[str], stages: list[float]) -> dict[str, int]:
    """device -> the stage (0-based) that gives it the new version; sorted ids, stable."""
    ordered = sorted(devices)
    out: dict[str, int] = {}
    start = 0
    for index, size in enumerate(stage_sizes(stages, len(ordered))):
        for device in ordered[start:size]:
            out[device] = index
        start = size
    return out


@dataclass(frozen=True)
class Figures:
    """Totals of telemetry reports for one version on a set of devices."""

    requests: float = 0.0
    escalated: float = 0.0
    errors: float = 0.0
    local_count: float = 0.0
    p95_sum: float = 0.0  # sum of (report p95 x its local requests)

    @staticmethod
    def of(doc: dict[str, float]) -> Figures:
        return Figures(**{k: float(doc.get(k, 0.0)) for k in asdict(Figures())})

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.requests if self.requests else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def latency_p95_ms(self) -> float | None:
        return self.p95_sum / self.local_count if self.local_count else None


def judge(
    stage: int,
    installs: tuple[int, int],
    new: Figures,
    old: Figures,
    gates: Gates,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the stage's report, the first breach or None).

    ``installs`` is (failed, attempted) this stage. A metric with no traffic on the new
    version, or no baseline on the previous one, is reported as not judged.
    """
    failed, attempted = installs
    checks: list[dict[str, Any]] = []

    def check(
        metric: str,
        value: float | None,
        baseline: float | None,
        threshold: float,
        relative: bool = False,
        min_increase: float = 0.0,
    ) -> None:
        entry: dict[str, Any] = {"metric": metric, "value": value, "baseline": baseline}
        entry["threshold"] = threshold
        if value is None or (baseline is None and metric != "install_failure_rate"):
            entry["judged"] = False
        else:
            base = baseline or 0.0
            delta = (value - base) / base if relative and base > 0 else value - base
            if relative and base <= 0:
                entry["judged"] = False
                checks.append(entry)
                return
            entry["judged"] = True
            entry["increase"] = delta if metric != "install_failure_rate" else None
            entry["breached"] = (
                value if metric == "install_failure_rate" else delta
            ) > threshold and value - base > min_increase
        checks.append(entry)

    check(
        "install_failure_rate",
        failed / attempted if attempted else None,
        None,
        gates.max_failure_rate,
    )
    check("error_rate", new.error_rate, old.error_rate, gates.max_failure_rate)
    check(
        "escalation_rate", new.escalation_rate, old.escalation_rate, gates.max_escalation_increase
    )
    check(
        "latency_p95_ms",
        new.latency_p95_ms,
        old.latency_p95_ms,
        gates.max_latency_increase,
        relative=True,
        min_increase=gates.min_latency_increase_ms,
    )
    report = {
        "stage": stage,
        "requests": new.requests,
        "baseline_requests": old.requests,
        "checks": checks,
    }
    for entry in checks:
        if entry.get("breached"):
            breach = {
                "stage": stage,
                "metric": entry["metric"],
                "value": entry["value"],
                "baseline": entry["baseline"],
                "threshold": entry["threshold"],
            }
            return report, breach
    return report, None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
