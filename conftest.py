"""Root pytest configuration: hypothesis profiles and the shared fixtures.

Profiles (choose with `--hypothesis-profile NAME`):
  ci       the default: deterministic (derandomized), sized to keep the whole gate a few minutes on 2 cores
  dev      random seeds, more examples, for local exploration
  nightly  thousands of examples; run it on purpose, never in CI
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=100, **_COMMON)
settings.register_profile("nightly", max_examples=2000, **_COMMON)
settings.load_profile("ci")

pytest_plugins = ["fixtures.pytest_fixtures", "verifier.plugin", "verifier.shard_plugin"]  # the gate report; --shard I/N


def pytest_addoption(parser, pluginmanager):
    if pluginmanager.get_plugin("xdist") is None:
        # pyproject's addopts carry `--dist loadgroup` (it must reach xdist's workers, which re-read
        # the ini file but not the controller's options); without xdist (`-p no:xdist`, or not
        # installed) the option would be unknown and a single case could not run as printed.
        parser.addoption("--dist", default="no", metavar="MODE",
                         help="xdist's scheduling mode; accepted and ignored while xdist is not loaded")
    parser.addoption("--failpoints", default="", metavar="NAMES",
                     help="plant these engine failpoints (comma-separated) in every engine the cases "
                          "build; the gate must then fail (see engine/failpoints.py)")


def pytest_configure(config):
    if config.pluginmanager.get_plugin("xdist") is None:  # xdist registers its own marker
        config.addinivalue_line("markers", "xdist_group(name): run on one xdist worker (no effect without xdist)")


def pytest_collection_finish(session):
    """Move everything alive after collection (Paddle, the engine, the collected cases: most of a
    worker's heap, none of it garbage) out of the cyclic collector's reach with `gc.freeze()`.
    Every full collection of the run, and the five pytest makes at the end of a session, otherwise
    walk that heap again: about 1.3 s per worker at the end alone, and 2-4% of a worker's CPU
    during the run (measured on test_graph.py + test_router.py: 1.6-2.3 s of gc against
    1.1-1.6 s frozen). Objects created later are collected as before."""
    import gc

    gc.collect()
    gc.freeze()
