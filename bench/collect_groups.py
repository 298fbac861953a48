"""A pytest plugin for bench/gate_schedule.py: prints each collected case's node id and xdist group
as `GROUP ["node id", "group" or null]`, in collection order (after cases/conftest.py's order)."""

from __future__ import annotations

import json


def pytest_collection_finish(session):
    for item in session.items:
        marker = item.get_closest_marker("xdist_group")
        group = (marker.args[0] if marker.args else marker.kwargs.get("name")) if marker else None
        print("GROUP " + json.dumps([item.nodeid, group]))
