"""Lineage exports on SQLite and PostgreSQL: quantmill JSON whose records can be checked against
the hash chain, and W3C PROV-JSON that the ``prov`` package reads back."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from prov.model import (
    ProvActivity,
    ProvAgent,
    ProvAssociation,
    ProvAttribution,
    ProvDerivation,
    ProvDocument,
    ProvEntity,
    ProvGeneration,
    ProvUsage,
)

from quantmill.registry import NewArtifact, NewMetric, Registry
from quantmill.registry.export import (
    LINEAGE_FORMAT,
    check_lineage_json,
    lineage_json,
    lineage_prov,
)


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _put(reg: Registry, label: str, kind: str) -> int:
    return reg.upsert_artifact(kind=kind, name=label, sha256=sha(label), size_bytes=100,
                               uri=f"file:///store/{label}", format="raw").id


def build_history(reg: Registry) -> dict[str, int]:
    """base + wiki -(calibration)-> calib; base + calib -(quantization)-> ckpt (2 metrics, one
    corrected); ckpt -(evaluation, failed)-> nothing. Corrections of the checkpoint and the
    quantization run."""
    ids = {"base": _put(reg, "base", "model"), "wiki": _put(reg, "wiki", "dataset")}
    cal = reg.start_run(job_id="j", kind="calibration", name="cal", recipe={"n": 4},
                        plugins={"text": "1"}, versions={"torch": "2.13"},
                        inputs=[(ids["base"], "tokenizer_model"), (ids["wiki"], "data")])
    reg.finish_run(cal.id, outputs=[NewArtifact(kind="calibration_set", name="calib",
                                                sha256=sha("calib"), size_bytes=8,
                                                uri="file:///store/calib", format="st",
                                                role="calibration_set")])
    ids["calib"] = reg.get_artifact(sha("calib")).id
    quant = reg.start_run(job_id="j", kind="quantization", name="rtn", recipe={"bits": 4},
                          plugins={"rtn": "1"}, versions={"torch": "2.13"},
                          flow_run_id="flow-1",
                          inputs=[(ids["base"], "base_model"), (ids["calib"], "calibration")])
    reg.finish_run(quant.id, outputs=[NewArtifact(
        kind="checkpoint", name="ckpt", sha256=sha("ckpt"), size_bytes=50,
        uri="file:///store/ckpt", format="gptq", role="quantized_checkpoint",
        metadata={"method": "rtn", "bits": 4})],
        metrics=[NewMetric(evaluator="perplexity", name="perplexity", value=31.25, unit="",
                           protocol={"windows": 4}, artifact_sha256=sha("ckpt"),
                           dataset_artifact_id=ids["wiki"]),
                 NewMetric(evaluator="size", name="size_bytes", value=50.0,
                           artifact_sha256=sha("ckpt"))])
    ids["ckpt"] = reg.get_artifact(sha("ckpt")).id
    ids["cal"], ids["quant"] = cal.id, quant.id
    ppl = next(m for m in reg.metrics_for_artifact(ids["ckpt"]) if m.name == "perplexity")
    ids["ppl_old"] = ppl.id
    ids["ppl_new"] = reg.correct_metric(ppl.id, 30.5, reason="full split", author="carol").id
    reg.correct("artifact", ids["ckpt"], {"name": "ckpt-w4"}, reason="typo", author="dave")
    reg.correct("run", quant.id, {"host": "gpu-2"}, reason="wrong host", author="carol")
    failed = reg.start_run(job_id="k", kind="evaluation", name="eval", recipe={}, plugins={},
                           versions={}, inputs=[(ids["ckpt"], "model")])
    reg.fail_run(failed.id, "out of memory")
    ids["failed"] = failed.id
    return ids


def test_lineage_json_carries_corrections_and_ledger_links(registry: Registry) -> None:
    ids = build_history(registry)
    graph = registry.upstream(ids["ckpt"])
    doc = lineage_json(registry, graph)
    assert doc["format"] == LINEAGE_FORMAT
    assert {k: doc[k] for k in graph.to_json()} == json.loads(json.dumps(graph.to_json()))
    assert [(c["target_type"], c["author"]) for c in doc["corrections"]] == [
        ("metric", "carol"), ("artifact", "dave"), ("run", "carol")]
    links = doc["ledger"]["records"]
    by_type: dict[str, set[int]] = {}
    for link in links:
        by_type.setdefault(link["record_type"], set()).add(link["record_id"])
    assert by_type["artifacts"] == set(graph.artifacts)
    assert by_type["runs"] == set(graph.runs) == {ids["cal"], ids["quant"]}
    assert by_type["metrics"] == {m.id for m in graph.metrics}
    assert len(by_type["run_edges"]) == len(graph.edges) == 6
    assert len(by_type["run_completions"]) == 2
    assert len(by_type["corrections"]) == 3
    assert [link["seq"] for link in links] == sorted(link["seq"] for link in links)
    count, head = registry.head()
    assert (doc["ledger"]["entries"], doc["ledger"]["head_hash"]) == (count, head)
    assert check_lineage_json(doc) == []
    assert check_lineage_json(json.loads(json.dumps(doc)), registry) == []
    # later writes do not invalidate an export: its links stay in the chain
    _put(registry, "later", "note")
    assert check_lineage_json(doc, registry) == []


def test_check_lineage_json_names_tampering(registry: Registry) -> None:
    ids = build_history(registry)
    doc = lineage_json(registry, registry.upstream(ids["ckpt"]))

    edited = copy.deepcopy(doc)
    metric = next(m for m in edited["metrics"] if m["id"] == ids["ppl_new"])
    metric["value"] = 12.0
    assert check_lineage_json(edited) == [
        f"metrics #{ids['ppl_new']}: value is 12.0 in the export but 30.5 in the chained copy"]

    edited = copy.deepcopy(doc)
    edited["runs"][0]["status"] = "failed"
    edited["edges"].append({"run_id": ids["quant"], "artifact_id": ids["wiki"],
                            "direction": "input", "role": "sneaked"})
    problems = check_lineage_json(edited)
    assert any("status is 'failed'" in p for p in problems)
    assert any("sneaked" in p and "no ledger link" in p for p in problems)

    edited = copy.deepcopy(doc)
    link = next(li for li in edited["ledger"]["records"] if li["record_type"] == "artifacts")
    link["payload"] = link["payload"].replace('"size_bytes":100', '"size_bytes":1')
    assert any("does not match its sha256" in p for p in check_lineage_json(edited))

    edited = copy.deepcopy(doc)
    link = edited["ledger"]["records"][0]
    link["entry_hash"] = "0" * 64
    problems = check_lineage_json(edited, registry)
    assert any("entry_hash does not recompute" in p for p in problems)
    assert any(f"ledger #{link['seq']}: not in the registry's chain" in p for p in problems)

    edited = copy.deepcopy(doc)
    edited["ledger"]["head_hash"] = "f" * 64
    assert check_lineage_json(edited, registry) == [
        f"the exported head {'f' * 64} is not in the registry's chain"]


def _records(document: ProvDocument, kind: type) -> list[Any]:
    return list(document.get_records(kind))


def test_prov_round_trip(registry: Registry) -> None:
    ids = build_history(registry)
    graph = registry.upstream(ids["ckpt"])
    doc = lineage_prov(registry, graph)
    assert doc["prefix"]["quantmill"] == "urn:quantmill:"
    read = ProvDocument.deserialize(content=json.dumps(doc), format="json")

    runs, metrics = graph.runs, graph.metrics
    inputs = [e for e in graph.edges if e.direction == "input"]
    outputs = [e for e in graph.edges if e.direction == "output"]
    assert len(_records(read, ProvEntity)) == len(graph.artifacts) + len(metrics) + 3  # + 3
    assert len(_records(read, ProvActivity)) == len(runs) == 2
    assert len(_records(read, ProvUsage)) == len(inputs) == 4
    generated_metrics = [m for m in metrics if m.run_id in runs]
    assert len(_records(read, ProvGeneration)) == len(outputs) + len(generated_metrics) == 5
    # each output from each input of its run (cal: 1x2, quant: 1x2), each metric from its
    # artifact (3), and the corrected perplexity as a revision of the old one
    derivations = _records(read, ProvDerivation)
    assert len(derivations) == 2 + 2 + len(metrics) + 1
    agents = {str(a.identifier) for a in _records(read, ProvAgent)}
    user = graph.runs[ids["cal"]].started_by
    assert len(agents) == len({user, "carol", "dave"})
    assert len(_records(read, ProvAssociation)) == 2
    assert len(_records(read, ProvAttribution)) == 3  # one per correction

    entity = next(r for r in _records(read, ProvEntity)
                  if str(r.identifier) == f"quantmill:artifact-{ids['ckpt']}")
    attributes = {str(k): v for k, v in entity.attributes}
    assert attributes["quantmill:sha256"] == sha("ckpt")
    assert attributes["quantmill:size_bytes"] == 50
    assert attributes["quantmill:uri"] == "file:///store/ckpt"
    assert json.loads(attributes["quantmill:metadata"]) == {"method": "rtn", "bits": 4}
    link = next(li for li in lineage_json(registry, graph)["ledger"]["records"]
                if li["record_type"] == "artifacts" and li["record_id"] == ids["ckpt"])
    assert attributes["quantmill:ledger_entry_hash"] == link["entry_hash"]

    quant = next(r for r in _records(read, ProvActivity)
                 if str(r.identifier) == f"quantmill:run-{ids['quant']}")
    assert quant.get_startTime() == graph.runs[ids["quant"]].started_at
    assert quant.get_endTime() == graph.runs[ids["quant"]].finished_at
    run_attributes = {str(k): v for k, v in quant.attributes}
    assert run_attributes["quantmill:status"] == "succeeded"
    assert run_attributes["quantmill:flow_run_id"] == "flow-1"
    roles = {str(v) for u in _records(read, ProvUsage) for k, v in u.attributes
             if str(k) == "prov:role"}
    assert roles == {"tokenizer_model", "data", "base_model", "calibration"}
    values = {r.identifier.localpart: dict((str(k), v) for k, v in r.attributes)
              for r in _records(read, ProvEntity)}
    assert values[f"metric-{ids['ppl_new']}"]["quantmill:value"] == 30.5


def test_prov_of_a_downstream_graph(registry: Registry) -> None:
    ids = build_history(registry)
    graph = registry.downstream(ids["ckpt"])
    assert set(graph.runs) == {ids["failed"]}
    read = ProvDocument.deserialize(content=json.dumps(lineage_prov(registry, graph)),
                                    format="json")
    (activity,) = _records(read, ProvActivity)
    attributes = {str(k): v for k, v in activity.attributes}
    assert (attributes["quantmill:status"], attributes["quantmill:error"]) == (
        "failed", "out of memory")
    assert len(_records(read, ProvUsage)) == 1
    assert _records(read, ProvGeneration) == []
    doc = lineage_json(registry, graph)
    assert check_lineage_json(doc, registry) == []
