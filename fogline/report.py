"""The demo's report: one JSON object, and a table for people."""

from __future__ import annotations

from typing import Any

import numpy as np


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def agent_rows(agents: list[Any], devices: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per agent: the model and version its device reports, where it listens."""
    rows = []
    for agent in agents:
        models = devices.get(agent.name, {}).get("models") or [{}]
        rows.append(
            {
                "device_id": agent.name,
                "model": models[0].get("name"),
                "version": models[0].get("version"),
                "url": agent.url,
                "state": devices.get(agent.name, {}).get("state"),
            }
        )
    return rows


def latency_summary(phase: Any) -> dict[str, float | None]:
    """p50/p99 of the answers served locally and of those escalated to the cloud."""
    return {
        "local_p50": pct(phase.latency_ms["edge"], 50),
        "local_p99": pct(phase.latency_ms["edge"], 99),
        "escalated_p50": pct(phase.latency_ms["cloud"], 50),
        "escalated_p99": pct(phase.latency_ms["cloud"], 99),
    }


def run_fields(
    agents: list[dict[str, Any]],
    rollout: dict[str, Any],
    endpoints: dict[str, str],
    broker: Any,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The part of every demo's report about the run: rollout, agents, endpoints, broker."""
    return {
        "rollout_seconds": rollout["seconds"],
        "rollout_state": rollout["state"],
        "agents": agents,
        "endpoints": endpoints,
        "broker": {"kind": broker.kind, "url": broker.url},
        "build_seconds": round(timings.get("build_seconds", 0.0), 2),
    }


def rollout_ok(report: dict[str, Any], rollout: dict[str, Any]) -> bool:
    """Every demo's bar: the rollout succeeded, no request failed, every agent serves it."""
    return (
        rollout["state"] == "succeeded"
        and report["errors"] == 0
        and all(a["version"] == rollout["version"] for a in report["agents"])
    )


def build_report(
    *,
    agents: list[Any],
    devices: dict[str, Any],
    compression: dict[str, Any],
    rollout: dict[str, Any],
    results: dict[str, Any],
    broker: Any,
    endpoints: dict[str, str],
    timings: dict[str, float],
    turn: dict[str, Any] | None = None,
) -> dict[str, Any]:
    edge, cloud, hybrid, heavy = (results[k] for k in ("edge", "cloud", "hybrid", "heavy"))
    report = {
        "accuracy": {
            "edge": round(edge.accuracy, 4),
            "cloud": round(cloud.accuracy, 4),
            "hybrid": round(hybrid.accuracy, 4),
        },
        "escalated_fraction": round(hybrid.escalated_fraction, 4),
        "escalation_reasons": hybrid.reasons,
        "latency_ms": latency_summary(hybrid),
        "heavy_requests": {
            "requests": heavy.requests,
            "served_by_cloud": len(heavy.latency_ms["cloud"]),
            "reasons": heavy.reasons,
        },
        "samples": hybrid.samples,
        "errors": sum(r.errors for r in results.values()),
        "degraded": hybrid.degraded,
        "model_bytes": {
            "fp32": compression["fp32_bytes"],
            "int8": compression["int8_bytes"],
            "cloud_fp32": compression["cloud_bytes"],
        },
        "offline_accuracy": {
            "fp32": round(compression["fp32_accuracy"], 4),
            "int8": round(compression["int8_accuracy"], 4),
            "cloud": round(compression["cloud_fp32_accuracy"], 4),
        },
        "trained_models_from_cache": bool(compression.get("trained_models_from_cache")),
        **run_fields(agent_rows(agents, devices), rollout, endpoints, broker, timings),
    }
    if turn is not None:
        report["hard_example_turn"] = turn
    report["ok"] = rollout_ok(report, rollout)
    if turn is not None and "rollout" in turn:
        # After the turn every agent serves the retrained version, not the first one.
        retrained = {**turn["rollout"], "version": turn["retrained"]["version"]}
        report["ok"] = (
            rollout["state"] == "succeeded"
            and rollout_ok(report, retrained)
            and turn["after"]["errors"] == 0
        )
    return report


def render_table(r: dict[str, Any]) -> str:
    acc = r["accuracy"]
    lines = [
        *header_lines(r, "Fogline demo report"),
        f"model bytes       fp32 {r['model_bytes']['fp32']:,}  int8 {r['model_bytes']['int8']:,}"
        f"  (cloud model {r['model_bytes']['cloud_fp32']:,})"
        + ("  trained earlier: from --model-cache" if r.get("trained_models_from_cache") else ""),
        "",
        f"{'accuracy':<18}{'edge only':>12}{'cloud only':>12}{'hybrid':>12}",
        f"{'':<18}{acc['edge']:>12.2%}{acc['cloud']:>12.2%}{acc['hybrid']:>12.2%}",
        "",
        f"escalated         {r['escalated_fraction']:.1%} of {r['samples']} requests "
        f"{r['escalation_reasons']}",
        f"heavy (batch 16)  {r['heavy_requests']['served_by_cloud']}"
        f"/{r['heavy_requests']['requests']} served by the cloud",
        *latency_lines(r),
        "",
        *turn_lines(r.get("hard_example_turn")),
        *where_lines(r),
    ]
    return "\n".join(lines)


def turn_lines(turn: dict[str, Any] | None) -> list[str]:
    """The hard-example turn: what came back from the fleet, what shipped, what changed."""
    if turn is None:
        return []
    hard, before = turn["hard_examples"], turn["before"]
    head = (
        f"hard examples     {hard['rows']} uploaded by {hard['devices']} agents "
        f"(of {hard['escalated_uncertain']} uncertain escalations)"
    )
    if "skipped" in turn:
        return [head, f"retrained         no: {turn['skipped']}", ""]
    new, roll, after = turn["retrained"], turn["rollout"], turn["after"]
    return [
        head,
        f"retrained         v{new['version']} on {new['training_rows']} rows in "
        f"{new['train_seconds']:.1f} s (int8 test accuracy {new['int8_accuracy']:.2%})",
        f"staged rollout    {roll['state']} in {roll['seconds']:.1f} s "
        f"({roll['stages']} stages, {roll['soak_s']:g} s soak, traffic flowing)",
        f"{'same traffic':<18}{'escalated':>12}{'hybrid acc':>12}",
        f"{'  before v' + before['version']:<18}{before['escalated_fraction']:>12.1%}"
        f"{before['hybrid_accuracy']:>12.2%}",
        f"{'  after v' + after['version']:<18}{after['escalated_fraction']:>12.1%}"
        f"{after['hybrid_accuracy']:>12.2%}",
        *_held_out_lines(turn.get("held_out")),
        f"turn took         {turn['seconds']:.1f} s",
        "",
    ]


def _held_out_lines(held: dict[str, Any] | None) -> list[str]:
    if held is None:
        return []
    title = f"held out ({held['rows']} rows, {held['hard_examples_left_out']} left out)"
    return [
        title,
        *(
            f"{'  ' + when + ' v' + p['version']:<18}{p['escalated_fraction']:>12.1%}"
            f"{p['hybrid_accuracy']:>12.2%}"
            for when, p in (("before", held["before"]), ("after", held["after"]))
        ),
    ]


def header_lines(r: dict[str, Any], title: str) -> list[str]:
    """The start of every demo's report: its title, the broker, the rollout."""
    return [
        "",
        title,
        "=" * len(title),
        f"broker            {r['broker']['kind']} at {r['broker']['url']}",
        f"rollout           {r['rollout_state']} in {r['rollout_seconds']:.2f} s "
        f"to {len(r['agents'])} agents",
    ]


def latency_lines(r: dict[str, Any]) -> list[str]:
    lat = r["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    return [
        f"latency local     p50 {ms(lat['local_p50'])}  p99 {ms(lat['local_p99'])}",
        f"latency escalated p50 {ms(lat['escalated_p50'])}  p99 {ms(lat['escalated_p99'])}",
    ]


def where_lines(r: dict[str, Any]) -> list[str]:
    """The end of every demo's report: the agents, the endpoints, the tokens, the result."""
    return [
        "agents:",
        *[f"  {a['device_id']:<10} {a['model']} v{a['version']}  {a['url']}" for a in r["agents"]],
        f"control plane     {r['endpoints']['control']}",
        f"cloud fallback    {r['endpoints']['fallback']}",
        *[f"{k + ' token':<18}{v}" for k, v in (r.get("tokens") or {}).items()],
        f"result            {'OK' if r['ok'] else 'FAILED'}",
    ]
