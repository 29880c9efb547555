"""Lineage graphs for people and tools outside quantmill: quantmill JSON and W3C PROV-JSON.

Why the ledger goes along: an exported subgraph is only as good as the auditor's reason to trust
it. Each record of the export carries its ledger link (the chained copy of the record, its sha256
and the entry hash), so ``check_lineage_json`` can show, offline, that every record in the file
is the one that was chained and, given the registry, that those links are still in its chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from prov.constants import PROV, PROV_LABEL, PROV_ROLE, PROV_TYPE
from prov.identifier import Namespace
from prov.model import ProvDocument
from sqlalchemy import select
from sqlalchemy.orm import Session

from quantmill.registry.chain import entry_hash, sha256_text, tail
from quantmill.registry.convert import correction_entity, location_entity
from quantmill.registry.entities import ArtifactLocation, Correction, LineageGraph
from quantmill.registry.hashing import canonical_json
from quantmill.registry.models import (
    ArtifactLocationRow,
    CorrectionRow,
    LedgerRow,
    RunCompletionRow,
    RunEdgeRow,
)
from quantmill.registry.store import Registry

#: The namespace of every quantmill identifier and attribute in PROV documents.
QUANTMILL_NS = Namespace("quantmill", "urn:quantmill:")
#: ``format`` of the quantmill JSON export; bump it when its layout changes.
LINEAGE_FORMAT = "quantmill-lineage/1"

#: Fields of each exported record that must equal its chained copy (the ledger payload).
_CHECKED_FIELDS = {
    "artifacts": ("kind", "name", "sha256", "size_bytes", "uri", "format", "metadata"),
    "artifact_locations": ("artifact_id", "uri", "role", "details", "created_by"),
    "runs": ("job_id", "kind", "name", "recipe", "recipe_sha256", "plugins", "versions",
             "flow_run_id", "host", "started_by"),
    "metrics": ("run_id", "artifact_id", "evaluator", "dataset_artifact_id", "name", "value",
                "unit", "protocol", "protocol_sha256", "supersedes_id"),
    "corrections": ("target_type", "target_id", "changes", "reason", "author"),
}


# --- reading what the graph's records are in the database ----------------------------------


def _corrections(session: Session, graph: LineageGraph) -> list[Correction]:
    """Corrections of the graph's artifacts, runs and metrics, oldest first."""
    targets = {
        "artifact": list(graph.artifacts),
        "run": list(graph.runs),
        "metric": [metric.id for metric in graph.metrics],
    }
    found: list[Correction] = []
    for target_type, ids in targets.items():
        if ids:
            rows = session.scalars(select(CorrectionRow).where(
                CorrectionRow.target_type == target_type, CorrectionRow.target_id.in_(ids)))
            found.extend(correction_entity(row) for row in rows)
    return sorted(found, key=lambda c: c.id)


def _locations(session: Session, graph: LineageGraph) -> list[ArtifactLocation]:
    """The recorded locations of the graph's artifacts, by id (each artifact's primary place
    is its own ``uri``, exported with it)."""
    if not graph.artifacts:
        return []
    query = select(ArtifactLocationRow).where(
        ArtifactLocationRow.artifact_id.in_(list(graph.artifacts)))
    rows = session.scalars(query.order_by(ArtifactLocationRow.id))
    return [location_entity(row) for row in rows]


def _record_ids(
    session: Session, graph: LineageGraph, corrections: Iterable[Correction],
    locations: Iterable[ArtifactLocation],
) -> dict[str, list[int]]:
    """The ids, per chained table, of every database row the graph was built from."""
    wanted = {(e.run_id, e.artifact_id, e.direction, e.role) for e in graph.edges}
    edge_ids: list[int] = []
    completion_ids: list[int] = []
    if graph.runs:
        for row in session.scalars(select(RunEdgeRow).where(
                RunEdgeRow.run_id.in_(list(graph.runs)))):
            if (row.run_id, row.artifact_id, row.direction, row.role) in wanted:
                edge_ids.append(row.id)
        completion_ids = list(session.scalars(select(RunCompletionRow.id).where(
            RunCompletionRow.run_id.in_(list(graph.runs)))))
    return {
        "artifacts": sorted(graph.artifacts),
        "artifact_locations": sorted(loc.id for loc in locations if loc.id is not None),
        "runs": sorted(graph.runs),
        "run_edges": sorted(edge_ids),
        "run_completions": sorted(completion_ids),
        "metrics": sorted(metric.id for metric in graph.metrics),
        "corrections": sorted(c.id for c in corrections),
    }


def _ledger_links(session: Session, records: dict[str, list[int]]) -> list[LedgerRow]:
    links: list[LedgerRow] = []
    for record_type, ids in records.items():
        if ids:
            links.extend(session.scalars(select(LedgerRow).where(
                LedgerRow.record_type == record_type, LedgerRow.record_id.in_(ids))))
    return sorted(links, key=lambda link: link.seq)


def _link_json(link: LedgerRow) -> dict[str, Any]:
    return {
        "seq": int(link.seq),
        "record_type": link.record_type,
        "record_id": link.record_id,
        "payload": link.payload,
        "record_sha256": link.record_sha256,
        "prev_hash": link.prev_hash,
        "entry_hash": link.entry_hash,
    }


def _read(
    registry: Registry, graph: LineageGraph
) -> tuple[list[ArtifactLocation], list[Correction], list[dict], tuple]:
    """Locations, corrections, ledger links and the chain's head, in one read transaction."""
    with registry.session() as session:
        locations = _locations(session, graph)
        corrections = _corrections(session, graph)
        links = [_link_json(link) for link in _ledger_links(
            session, _record_ids(session, graph, corrections, locations))]
        head = tail(session)
    return locations, corrections, links, head


# --- quantmill JSON ------------------------------------------------------------------------


def lineage_json(registry: Registry, graph: LineageGraph) -> dict[str, Any]:
    """``graph.to_json()`` plus the recorded locations of its artifacts, the corrections of its
    records, and their ledger links.

    ``locations`` lists every recorded place of the graph's artifacts (``artifact_id`` says
    whose; an artifact's primary place is its ``uri``). ``ledger.records`` holds, for every row
    the export shows (artifacts, their locations, runs, their edges and completions, metrics,
    corrections), the chained copy and hashes; ``ledger.head_hash`` is the chain's head at
    export time.
    """
    locations, corrections, links, (entries, head_hash) = _read(registry, graph)
    return {
        "format": LINEAGE_FORMAT,
        **graph.to_json(),
        "locations": [location.to_json() for location in locations],
        "corrections": [c.to_json() for c in corrections],
        "ledger": {"entries": entries, "head_hash": head_hash, "records": links},
    }


def _check_links(links: list[dict[str, Any]], problems: list[str]) -> dict[tuple, dict]:
    """Recompute each link's hashes; return the chained copies by (record_type, record_id)."""
    copies: dict[tuple[str, int], dict[str, Any]] = {}
    for link in links:
        where = f"ledger #{link['seq']} ({link['record_type']} #{link['record_id']})"
        if sha256_text(link["payload"]) != link["record_sha256"]:
            problems.append(f"{where}: the chained copy does not match its sha256")
        recomputed = entry_hash(link["prev_hash"], link["seq"], link["record_type"],
                                link["record_id"], link["record_sha256"])
        if recomputed != link["entry_hash"]:
            problems.append(f"{where}: entry_hash does not recompute")
        copies[(link["record_type"], link["record_id"])] = json.loads(link["payload"])
    return copies


def _check_record(record_type: str, record: dict[str, Any], copies: dict, problems: list[str]
                  ) -> None:
    copy = copies.get((record_type, record["id"]))
    where = f"{record_type} #{record['id']}"
    if copy is None:
        problems.append(f"{where}: no ledger link in the export")
        return
    for name in _CHECKED_FIELDS[record_type]:
        if canonical_json(record.get(name)) != canonical_json(copy.get(name)):
            problems.append(f"{where}: {name} is {record.get(name)!r} in the export but "
                            f"{copy.get(name)!r} in the chained copy")


def check_lineage_json(doc: dict[str, Any], registry: Registry | None = None) -> list[str]:
    """Problems found in an export from ``lineage_json`` (empty: it is consistent).

    Offline: every link's hashes recompute, and every artifact, location, run, edge, run
    status, metric and correction in the file equals its chained copy. With ``registry``:
    every link (by seq and entry hash) and the exported head are still in that registry's
    chain.
    """
    problems: list[str] = []
    links = doc.get("ledger", {}).get("records", [])
    copies = _check_links(links, problems)
    for record_type, key in (("artifacts", "artifacts"), ("artifact_locations", "locations"),
                             ("runs", "runs"),
                             ("metrics", "metrics"), ("corrections", "corrections")):
        for record in doc.get(key, []):
            _check_record(record_type, record, copies, problems)
    chained_edges = {(c["run_id"], c["artifact_id"], c["direction"], c["role"])
                     for (kind, _), c in copies.items() if kind == "run_edges"}
    for edge in doc.get("edges", []):
        if (edge["run_id"], edge["artifact_id"], edge["direction"], edge["role"]) \
                not in chained_edges:
            problems.append(f"edge {edge}: no ledger link in the export")
    ended = {c["run_id"]: c for (kind, _), c in copies.items() if kind == "run_completions"}
    for run in doc.get("runs", []):
        completion = ended.get(run["id"])
        chained_status = completion["status"] if completion else "running"
        if run["status"] != chained_status:
            problems.append(f"runs #{run['id']}: status is {run['status']!r} in the export but "
                            f"{chained_status!r} in the chain")
    if registry is not None:
        _check_against_chain(registry, doc, links, problems)
    return problems


def _check_against_chain(registry: Registry, doc: dict[str, Any], links: list[dict],
                         problems: list[str]) -> None:
    seqs = [link["seq"] for link in links]
    head_hash = doc.get("ledger", {}).get("head_hash")
    with registry.session() as session:
        stored = dict(session.execute(select(LedgerRow.seq, LedgerRow.entry_hash).where(
            LedgerRow.seq.in_(seqs))).tuples().all()) if seqs else {}
        head_found = session.scalars(select(LedgerRow.seq).where(
            LedgerRow.entry_hash == head_hash)).first() if head_hash else None
    for link in links:
        if stored.get(link["seq"]) != link["entry_hash"]:
            problems.append(f"ledger #{link['seq']}: not in the registry's chain with this "
                            f"entry hash")
    if head_hash and head_found is None:
        problems.append(f"the exported head {head_hash} is not in the registry's chain")


# --- W3C PROV ------------------------------------------------------------------------------


def _attrs(values: dict[str, Any]) -> dict[Any, Any]:
    """PROV attributes from plain values: quantmill-namespaced names, None left out,
    containers as canonical JSON text (PROV attribute values are scalars)."""
    out: dict[Any, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        key = name if not isinstance(name, str) else QUANTMILL_NS[name]
        out[key] = canonical_json(value) if isinstance(value, dict | list) else value
    return out


def _agent_id(user: str) -> Any:
    return QUANTMILL_NS[f"agent-{quote(user, safe='')}"]


def lineage_prov(registry: Registry, graph: LineageGraph) -> dict[str, Any]:
    """The graph as a W3C PROV document, returned as parsed PROV-JSON.

    Artifacts, measurements and corrections are entities; runs are activities; whoever started
    a run or wrote a correction is an agent (a person). Input edges are ``used``, output edges
    ``wasGeneratedBy`` (both with the edge's role), each output ``wasDerivedFrom`` each input of
    its run, a measurement ``wasDerivedFrom`` the artifact it measured, and a corrected
    measurement ``wasRevisionOf`` the one it replaced. Every record carries its ledger entry
    hash (``quantmill:ledger_entry_hash``) to check it against the chain.
    """
    _, corrections, links, _ = _read(registry, graph)
    chained = {(link["record_type"], link["record_id"]): link["entry_hash"] for link in links}
    qm = QUANTMILL_NS
    doc = ProvDocument()
    doc.add_namespace(qm)
    agents: set[str] = set()

    def agent(user: str) -> Any:
        if user not in agents:
            agents.add(user)
            doc.agent(_agent_id(user), {PROV_TYPE: PROV["Person"], PROV_LABEL: user})
        return _agent_id(user)

    for artifact_id, artifact in sorted(graph.artifacts.items()):
        doc.entity(qm[f"artifact-{artifact_id}"], {
            PROV_TYPE: qm["Artifact"], PROV_LABEL: artifact.name, **_attrs({
                "artifact_id": artifact_id, "kind": artifact.kind, "sha256": artifact.sha256,
                "size_bytes": artifact.size_bytes, "uri": artifact.uri,
                "format": artifact.format, "metadata": artifact.metadata,
                "created_at": artifact.created_at, "depth": graph.depths[artifact_id],
                "ledger_entry_hash": chained.get(("artifacts", artifact_id))})})
    for run_id, run in sorted(graph.runs.items()):
        doc.activity(qm[f"run-{run_id}"], run.started_at, run.finished_at, {
            PROV_TYPE: qm["Run"], PROV_LABEL: run.name, **_attrs({
                "run_id": run_id, "kind": run.kind, "job_id": run.job_id, "status": run.status,
                "recipe_sha256": run.recipe_sha256, "recipe": run.recipe,
                "plugins": run.plugins, "versions": run.versions, "host": run.host,
                "flow_run_id": run.flow_run_id, "error": run.error,
                "ledger_entry_hash": chained.get(("runs", run_id))})})
        doc.wasAssociatedWith(qm[f"run-{run_id}"], agent(run.started_by))
    inputs: dict[int, list[int]] = {}
    for edge in graph.edges:
        run = graph.runs[edge.run_id]
        entity, activity = qm[f"artifact-{edge.artifact_id}"], qm[f"run-{edge.run_id}"]
        if edge.direction == "input":
            inputs.setdefault(edge.run_id, []).append(edge.artifact_id)
            doc.used(activity, entity, run.started_at, other_attributes={PROV_ROLE: edge.role})
        else:
            doc.wasGeneratedBy(entity, activity, run.finished_at,
                               other_attributes={PROV_ROLE: edge.role})
    for edge in graph.edges:
        if edge.direction == "output":
            for input_id in sorted(set(inputs.get(edge.run_id, []))):
                doc.wasDerivedFrom(qm[f"artifact-{edge.artifact_id}"],
                                   qm[f"artifact-{input_id}"], qm[f"run-{edge.run_id}"])
    metric_ids = {metric.id for metric in graph.metrics}
    for metric in graph.metrics:
        node = qm[f"metric-{metric.id}"]
        doc.entity(node, {PROV_TYPE: qm["Measurement"],
                          PROV_LABEL: f"{metric.evaluator}.{metric.name}", **_attrs({
                              "metric_id": metric.id, "evaluator": metric.evaluator,
                              "name": metric.name, "value": metric.value, "unit": metric.unit,
                              "protocol": metric.protocol,
                              "protocol_sha256": metric.protocol_sha256,
                              "dataset_artifact_id": metric.dataset_artifact_id,
                              "run_id": metric.run_id, "created_at": metric.created_at,
                              "ledger_entry_hash": chained.get(("metrics", metric.id))})})
        doc.wasDerivedFrom(node, qm[f"artifact-{metric.artifact_id}"])
        if metric.run_id in graph.runs:
            doc.wasGeneratedBy(node, qm[f"run-{metric.run_id}"])
        if metric.supersedes_id in metric_ids:
            doc.wasRevisionOf(node, qm[f"metric-{metric.supersedes_id}"])
    for correction in corrections:
        node = qm[f"correction-{correction.id}"]
        target = qm[f"{correction.target_type}-{correction.target_id}"]
        doc.entity(node, {PROV_TYPE: qm["Correction"], qm["target"]: target, **_attrs({
            "target_type": correction.target_type, "target_id": correction.target_id,
            "changes": correction.changes, "reason": correction.reason,
            "created_at": correction.created_at,
            "ledger_entry_hash": chained.get(("corrections", correction.id))})})
        doc.wasAttributedTo(node, agent(correction.author))
    return json.loads(doc.serialize(format="json"))
