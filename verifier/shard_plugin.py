"""pytest plugin: `--shard I/N` keeps this shard's part of the collection (verifier/shards.py).

Registered from the root conftest.py (and by `python -m verifier gate`, `-p verifier.shard_plugin`),
so `pytest -n 4 cases/ --shard 2/4` works as well as `python -m verifier gate --shard 2/4`.

Selection happens at collection: every process (each xdist worker collects for itself) computes the
same split of the same collection and deselects the other shards' cases, so xdist schedules only
this shard's. The whole collection and this shard's part reach the controller (from a worker through
xdist's `workeroutput`) and are written into the gate report's `shard` field, so merge-reports can
name a case that no shard ran, or that two did.
"""

from __future__ import annotations

import pytest

from verifier import durations as durations_file
from verifier.report import bare_nodeid
from verifier.shards import Shard, select

_INFO = pytest.StashKey[dict]()
OUTPUT_KEY = "graphgate_shard"  # this plugin's entry in an xdist worker's workeroutput


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as error:
        raise pytest.UsageError(f"--shard: {error}") from None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphgate-shards", "graphgate sharding")
    group.addoption("--shard", type=_shard, default=None, metavar="I/N",
                    help="run only shard I of N (deterministic; xdist groups stay whole; balanced by "
                         "the durations file)")
    group.addoption("--shard-durations", default=None, metavar="PATH",
                    help="durations file the split balances by (default: the checkout's cases/durations.json)")


def group_names(item: pytest.Item) -> set[str]:
    """The names of the item's xdist_group marks (the gate allows one: cases/conftest.py)."""
    return {str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")}


def group_of(item: pytest.Item) -> str | None:
    """The item's xdist group as xdist's loadgroup names it (several marks: their names, sorted, joined)."""
    names = group_names(item)
    return "_".join(sorted(names)) if names else None


@pytest.hookimpl(trylast=True)  # after -k / -m and xdist's "@group" suffix: shard what is left
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = config.getoption("--shard")
    if shard is None:
        return
    try:
        durations = durations_file.read_default_or_empty(config.getoption("--shard-durations"))
    except ValueError as error:
        raise pytest.UsageError(f"--shard-durations: {error}") from None
    cases = [(bare_nodeid(item.nodeid), group_of(item)) for item in items]
    chosen = select(cases, shard, durations)
    keep = [item for item, (nodeid, _) in zip(items, cases) if nodeid in chosen]
    dropped = [item for item, (nodeid, _) in zip(items, cases) if nodeid not in chosen]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    info = {"index": shard.index, "count": shard.count, "collected": sorted(n for n, _ in cases),
            "selected": sorted(chosen)}
    config.stash[_INFO] = info
    if hasattr(config, "workeroutput"):  # an xdist worker: ship it to the controller
        config.workeroutput[OUTPUT_KEY] = info


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown without xdist
def pytest_testnodedown(node, error) -> None:
    """Controller: a worker's shard record (every worker computes the same one)."""
    info = getattr(node, "workeroutput", {}).get(OUTPUT_KEY)
    if info is not None:
        node.config.stash[_INFO] = info


@pytest.hookimpl(tryfirst=True)  # before the report plugin's controller writes the JSON
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    shard = config.getoption("--shard")
    if shard is None or hasattr(config, "workerinput"):
        return
    info = config.stash.get(_INFO, None) or {"index": shard.index, "count": shard.count, "collected": [],
                                             "selected": []}
    controller = config.pluginmanager.get_plugin("graphgate-controller")
    if controller is not None:
        controller.report.shard = info
    if session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and info["collected"]:
        session.exitstatus = pytest.ExitCode.OK  # an empty shard of a non-empty collection is not a failure
