"""The version graph: who derives from whom, checked at publish and walked for display.

A node is a model version, ``name:version``, whatever its variants; an edge
goes from a version to the parent its lineage names. Publish admits an edge
only to a parent already in the registry, and never one whose ancestry holds
the version being published: so the graph has no cycle, by construction and
by check (a variant published later may not close a loop through an older
variant's parent either).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cloud.database import Database
from cloud.version_metrics import lineage_doc
from common.errors import ConflictError, InvalidInputError, NotFoundError
from common.lineage import parent_ref, parse_ref
from common.manifest import Manifest, SignedManifest
from common.names import check_name

MAX_DEPTH = 1000  # a walk longer than this is a corrupt table, not a lineage


@dataclass
class Node:
    name: str
    version: str
    parents: set[str] = field(default_factory=set)
    variants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "parents": sorted(self.parents),
            "variants": self.variants,
        }


def load_nodes(db: Database) -> dict[str, Node]:
    """Every version as a node (the table's lineage columns only: small rows)."""
    nodes: dict[str, Node] = {}
    rows = db.execute(
        "SELECT name, version, variant, lineage_parent, method, params, quality_metric,"
        " quality, latency_p50_ms_b1, throughput_b32, size_bytes FROM versions"
        " ORDER BY name, release, variant"
    )
    for name, version, variant, *rest in rows:
        node = nodes.setdefault(f"{name}:{version}", Node(name, version))
        if rest[0] is not None:
            node.parents.add(rest[0])
        node.variants.append({"variant": variant, **lineage_doc(tuple(rest))})
    return nodes


def ancestors(nodes: dict[str, Node], ref: str) -> list[str]:
    """``ref``'s ancestors, nearest first (each once, whatever the path)."""
    seen: list[str] = []
    queue = deque(sorted(nodes[ref].parents) if ref in nodes else [])
    while queue and len(seen) < MAX_DEPTH:
        parent = queue.popleft()
        if parent in seen:
            continue
        seen.append(parent)
        if parent in nodes:
            queue.extend(sorted(nodes[parent].parents))
    return seen


def descendants(nodes: dict[str, Node], ref: str) -> list[str]:
    children: dict[str, list[str]] = {}
    for node in nodes.values():
        for parent in node.parents:
            children.setdefault(parent, []).append(node.ref)
    seen: list[str] = []
    queue = deque([ref])
    while queue and len(seen) < MAX_DEPTH:
        for child in sorted(children.get(queue.popleft(), [])):
            if child not in seen and child != ref:
                seen.append(child)
                queue.append(child)
    return seen


def check_parent(db: Database, m: Manifest) -> None:
    """At publish: the lineage's parent exists, is what the package says it was made from,
    and does not descend from the version being published. Old-style bare ``parent``
    versions (no lineage object) are recorded as they are, unchecked, as before."""
    if m.lineage is None or m.lineage.parent is None:
        return
    name, version = parse_ref(m.lineage.parent)
    rows = db.execute(
        "SELECT signed_manifest FROM versions WHERE name=? AND version=?", (name, version)
    )
    if not rows:
        raise InvalidInputError(
            f"lineage parent {m.lineage.parent} is not in the registry: publish it first"
        )
    if m.lineage.parent_sha256 is not None:
        digests = {
            SignedManifest.from_dict(json.loads(r[0])).manifest.file("model").sha256 for r in rows
        }
        if m.lineage.parent_sha256 not in digests:
            raise InvalidInputError(
                f"lineage parent_sha256 {m.lineage.parent_sha256[:16]}… is not the model file "
                f"of any variant of {m.lineage.parent}: this was made from another model"
            )
    me = parent_ref(m.name, m.version)
    nodes = load_nodes(db)
    if m.lineage.parent == me or me in ancestors(nodes, m.lineage.parent):
        raise ConflictError(
            f"lineage parent {m.lineage.parent} descends from {me}: that would make a cycle"
        )


def lineage_view(db: Database, name: str, version: str | None = None) -> dict[str, Any]:
    """The ancestry tree around one version (or every version of a model): the versions
    themselves, all their ancestors and all their descendants, as nodes with parents."""
    check_name(name, "model name")
    nodes = load_nodes(db)
    if version is not None:
        focus = [parent_ref(name, version)]
    else:
        focus = [ref for ref, n in nodes.items() if n.name == name]
    focus = [ref for ref in focus if ref in nodes]
    if not focus:
        what = f"{name}:{version}" if version is not None else name
        raise NotFoundError(f"no model version {what} in the registry")
    keep: list[str] = []
    for ref in focus:
        for r in [*reversed(ancestors(nodes, ref)), ref, *descendants(nodes, ref)]:
            if r not in keep:
                keep.append(r)
    listed = [nodes[r].to_dict() if r in nodes else _missing(r) for r in keep]
    return {"focus": focus, "nodes": listed}


def _missing(ref: str) -> dict[str, Any]:
    """A parent named by an old-style record that was never published."""
    name, _, version = ref.partition(":")
    return {"ref": ref, "name": name, "version": version, "parents": [], "variants": []}
