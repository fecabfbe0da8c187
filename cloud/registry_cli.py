"""``fogline model list|show|lineage``: the registry's versions, figures and ancestry.

They ask the control plane (``--control``/``$FOGLINE_CONTROL``, a viewer token
from ``--token``/``$FOGLINE_TOKEN``) and print a table, or the API's JSON/YAML
with ``-o json|yaml`` (``--json``).
"""

from __future__ import annotations

import argparse
from typing import Any

from cloud.cli_output import add_output_args, render, table
from cloud.control_cli import api_command, client_args
from cloud.control_client import ControlApi
from common.lineage import LATENCY_P50_MS_B1, THROUGHPUT_B32, parse_ref
from common.names import check_name

HEADER = [
    "NAME",
    "VERSION",
    "VARIANT",
    "PRECISION",
    "QUALITY",
    "P50 B1 MS",
    "B32 ROWS/S",
    "SIZE",
    "PARENT",
    "METHOD",
]


def split_ref(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION``, checked before either becomes part of a URL."""
    if ":" in text:
        return parse_ref(text, "model")
    return check_name(text, "model name"), None


def _quality(metrics: dict[str, Any]) -> str | None:
    metric, value = metrics.get("quality_metric"), metrics.get("quality")
    if value is None:
        return None
    return f"{value:.2%}" if metric == "accuracy" else f"{metric} {value:.4f}"


def _num(value: Any, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def _size(n: Any) -> str | None:
    if n is None:
        return None
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def version_row(v: dict[str, Any]) -> list[Any]:
    metrics = v.get("metrics") or {}
    lineage = v.get("lineage") or {}
    return [
        v["name"],
        v["version"],
        v["variant"],
        v.get("precision"),
        _quality(metrics),
        _num(metrics.get(LATENCY_P50_MS_B1), ".3f"),
        _num(metrics.get(THROUGHPUT_B32), ".0f"),
        _size(metrics.get("size_bytes")),
        lineage.get("parent"),
        lineage.get("method"),
    ]


def _versions_table(versions: list[dict[str, Any]]) -> str:
    return table([version_row(v) for v in versions], HEADER)


def _show_table(doc: dict[str, Any]) -> str:
    parts = [_versions_table(doc["versions"])]
    for v in doc["versions"]:
        title = f"{v['name']}:{v['version']} ({v['variant']})"
        files = table(
            [[f["name"], f["role"], f["size"]] for f in v.get("files", [])],
            ["FILE", "ROLE", "BYTES"],
        )
        params = (v.get("lineage") or {}).get("params") or {}
        shown = ", ".join(f"{k}={params[k]}" for k in sorted(params)) or "-"
        figures = ", ".join(f"{k} {val:.4g}" for k, val in (v.get("evaluation") or {}).items())
        parts.append(f"{title}\n  params: {shown}\n  evaluation: {figures or '-'}\n{files}")
    engines = doc.get("engines") or []
    if engines:
        rows = [
            [
                e["version"],
                e["package"],
                e["precision"],
                (e.get("target") or {}).get("arch"),
                _size(e["artifact"]["size"]),
            ]
            for e in engines
        ]
        header = ["VERSION", "ENGINE PACKAGE", "PRECISION", "ARCH", "SIZE"]
        parts.append(
            "TensorRT engines (for devices with that GPU and TensorRT)\n" + table(rows, header)
        )
    return "\n\n".join(parts)


def _node_line(node: dict[str, Any]) -> str:
    variants = node.get("variants") or []
    if not variants:
        return f"{node['ref']}  (not in the registry)"
    methods = sorted({str((v.get("lineage") or {}).get("method") or "-") for v in variants})
    figures = []
    for v in variants:
        metrics = v.get("metrics") or {}
        quality = _quality(metrics) or "-"
        figures.append(f"{v['variant']}: {quality}, {_size(metrics.get('size_bytes')) or '-'}")
    return f"{node['ref']}  {'/'.join(methods)}  [{'; '.join(figures)}]"


def lineage_tree(doc: dict[str, Any]) -> str:
    """The nodes as a tree: roots first, each child indented under its parent."""
    nodes = {n["ref"]: n for n in doc["nodes"]}
    children: dict[str, list[str]] = {}
    roots = []
    for ref, node in nodes.items():
        parents = [p for p in node["parents"] if p in nodes]
        for parent in parents:
            children.setdefault(parent, []).append(ref)
        if not parents:
            roots.append(ref)
    focus = set(doc.get("focus") or [])
    lines: list[str] = []

    def walk(ref: str, prefix: str, last: bool, top: bool, path: frozenset[str]) -> None:
        mark = "  <" if ref in focus else ""
        branch = "" if top else ("└── " if last else "├── ")
        lines.append(prefix + branch + _node_line(nodes[ref]) + mark)
        kids = [c for c in children.get(ref, []) if c not in path]  # never loop
        inner = prefix + ("" if top else ("    " if last else "│   "))
        for i, child in enumerate(kids):
            walk(child, inner, i == len(kids) - 1, False, path | {ref})

    for root in roots:
        walk(root, "", True, True, frozenset())
    return "\n".join(lines)


@api_command
async def _list(args: argparse.Namespace, api: ControlApi) -> int:
    doc = await api.get("/api/models")
    print(render(doc, args.output, lambda d: _versions_table(d["models"])))
    return 0


@api_command
async def _show(args: argparse.Namespace, api: ControlApi) -> int:
    name, version = split_ref(args.ref)
    path = f"/api/models/{name}" + (f"?version={version}" if version else "")
    print(render(await api.get(path), args.output, _show_table))
    return 0


@api_command
async def _lineage(args: argparse.Namespace, api: ControlApi) -> int:
    name, version = split_ref(args.ref)
    path = f"/api/models/{name}/lineage" + (f"?version={version}" if version else "")
    print(render(await api.get(path), args.output, lineage_tree))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``list``, ``show`` and ``lineage`` to the ``fogline model`` group."""
    listing = subparsers.add_parser(
        "list",
        help="list published versions with figures, parent and method",
        description="Every published version and variant: quality (accuracy or mean cosine), "
        "ONNX Runtime latency p50 at batch 1, throughput at batch 32, model size, the parent "
        "it was made from and how (train, int8-static-qdq, prune-structured-30%%, distill).",
    )
    show = subparsers.add_parser(
        "show",
        help="one model's versions, variants, files, metrics and lineage",
        description="NAME: every version of the model; NAME:VERSION: that version's variants, "
        "with files, evaluation figures and lineage parameters.",
    )
    show.add_argument("ref", metavar="NAME[:VERSION]", help="model, or one version of it")
    tree = subparsers.add_parser(
        "lineage",
        help="the ancestry tree of a model or version",
        description="Ancestors and descendants of NAME:VERSION (or of every version of NAME) "
        "as a tree: each line a version with its method, quality and size; '<' marks the "
        "version(s) asked about.",
    )
    tree.add_argument("ref", metavar="NAME[:VERSION]", help="model, or one version of it")
    for p, func in ((listing, _list), (show, _show), (tree, _lineage)):
        client_args(p)
        add_output_args(p)
        p.set_defaults(func=func)
