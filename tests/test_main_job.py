"""The README's main job end to end on SmolLM2 at a tiny budget: it writes the graph, the SVG and
a report whose numbers match the graph it wrote."""
import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_main_job_writes_graph_svg_and_report(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "circuits.main", "--sites", "resid.[5-7]", "--tokens", "2048", "--train-batch", "512", "--eval-tokens", "128",
           "--ce-tokens", "64", "--prompts", "4", "--edge-prompts", "2", "--top-k", "5", "--corpus-tokens", "512",
           "--circuit-sites", "resid.5,resid.7", "--curve-nodes", "40", "--explain", "1",
           "--runs", str(tmp_path / "runs"), "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    graph = json.loads((out / "circuit.json").read_text())
    report = (out / "report.md").read_text()
    assert f"{len(graph['nodes'])} nodes, {len(graph['edges'])} edges" in report
    assert "circuit sites: resid.5, resid.7;" in report and "resid.6" in report  # resid.6: trained, not in the circuit
    assert "faithfulness of the graph's" in report and "nodes needed" in report
    assert {n["site"] for n in graph["nodes"] if n.get("kind") in ("feature", "error")} <= {"resid.5", "resid.7"}
    svg = (out / "circuit.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "metric" in svg
    features = [n for n in graph["nodes"] if n.get("kind") == "feature"]
    assert features, "a circuit without feature nodes tests no dashboards"
    for n in features:  # one dashboard page per feature node, linked from the SVG
        page = f"{n['site']}/f{n['feature']}.html"
        assert (out / "dashboards" / page).exists() and f"dashboards/{page}" in svg
    assert (out / "dashboards" / "index.html").exists()
    explained = [n for n in features if n.get("explanation")]
    assert len({(n["site"], n["feature"]) for n in explained}) == 1       # --explain 1
    assert explained[0]["explanation"] in report and "| detection |" in report
    assert str(out.resolve()) in done.stdout  # the job names its output directory at the end


def test_interpret_records_a_feature_it_cannot_score(monkeypatch, tmp_path, loud_llama, random_topk):
    """A feature active in every window has no negatives: its explanation is kept with the reason,
    it has no detection score, and the dashboards are still written."""
    import networkx as nx

    from circuits import interpret
    from circuits.autointerp.explain import Explanation

    graph = nx.DiGraph()
    graph.add_node("resid.0/f3", kind="feature", site="resid.0", feature=3, effect=1.0)

    def no_negatives(*args, **kwargs):
        raise ValueError("scoring needs activating and non-activating windows, got 10 and 0; build more")
    monkeypatch.setattr(interpret, "score_detection", no_negatives)
    monkeypatch.setattr(interpret, "explain", lambda *a, **k: Explanation("names of people", True, "names of people"))
    monkeypatch.setattr(interpret, "LocalClient", lambda model: None)
    ids = torch.randint(2, 250, (8, 40), generator=torch.Generator().manual_seed(0))
    out = interpret.interpret_circuit(graph, loud_llama, {"resid.0": random_topk}, ids, tmp_path / "dash",
                                      cache_dir=tmp_path / "cache", n_explain=1, progress=False)
    d = graph.nodes["resid.0/f3"]
    assert d["explanation"].startswith("names of people (not scored: scoring needs")
    assert d["detection"] is None and out[("resid.0", 3)]["scores"] == {}
    assert (tmp_path / "dash" / "resid.0" / "f3.html").exists()
