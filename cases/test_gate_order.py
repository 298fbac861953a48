"""The gate's fail-fast order (cases/gate_order.py) keeps a fast detector for every failpoint.

A fast detector is a case of tier 1 (cheap single cases, handed out first on three workers) or a
lead detector of the four_ranks group (started at once on the fourth). The census
(bench/results/detector-census-*.json, `python -m verifier selftest --census`) says which cases fail
for which failpoint; a failpoint without a fast detector would again wait minutes in a `-x` run.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gate_order

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def census() -> dict:
    paths = sorted(RESULTS.glob("detector-census-*.json"))
    assert paths, f"no detector census in {RESULTS}"
    return json.loads(paths[-1].read_text())


def fake_item(nodeid: str, group: str | None = None):
    marker = SimpleNamespace(args=(group,), kwargs={}) if group else None
    return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: marker if name == "xdist_group" else None)


def is_fast(nodeid: str) -> bool:
    """Tier 1, or (for the head group's files) one of its lead detectors."""
    if gate_order.gate_order_key(fake_item(nodeid), {})[0] == 1:
        return True
    head_leads = tuple(d for d in gate_order.LEAD_DETECTORS if d.startswith("test_parallel.py"))
    return gate_order._position(nodeid, head_leads) is not None


def test_every_failpoint_of_the_census_has_a_detector_that_starts_first():
    slow = [entry["failpoint"] for entry in census()["failpoints"]
            if not any(is_fast(d.split("@")[0]) for d in entry["detectors"])]
    assert slow == [], f"failpoints whose every detector starts late: {slow}"


def test_the_order_is_tiered_and_keeps_collection_order_inside_a_tier():
    items = [fake_item("cases/test_config.py::test_a"), fake_item("cases/test_launch.py::test_b"),
             fake_item("cases/test_graph.py::test_graph_step_matches_eager[x]", "graph-x"),
             fake_item("cases/test_router.py::test_noaux_tc_matches_reference[c]"), fake_item("cases/test_golden.py::test_d"),
             fake_item("cases/test_parallel.py::test_e", "four_ranks"),
             fake_item("cases/test_routing_replay_recorder.py::test_f"), fake_item("cases/test_config.py::test_g")]
    gate_order.sort_items(items)
    assert [i.nodeid.split("::")[1] for i in items] == [
        "test_e", "test_f", "test_noaux_tc_matches_reference[c]", "test_d", "test_graph_step_matches_eager[x]", "test_b", "test_a", "test_g"]
