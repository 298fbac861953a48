"""Rollout routing replay (R3): record which experts every token was routed to, persist one file
per finished request atomically, read it back verified.

  recorder.py    the per-step buffer and per-request tables (host side, after each step)
  table_file.py  the pickle-free file format (safetensors + metadata + checksum)
  store.py       atomic, optionally background writes; one writing rank
  reader.py      load_routing / wait_for with named errors (errors.py)
  session.py     recording wired into an engine (runner hook, finished requests -> store)
  replay.py      routing by a recording's ids, weights recomputed from the router's scores
"""

from __future__ import annotations

import dataclasses
import hashlib
import json


def model_identity(model_config) -> str:
    """sha256 of the model config's fields: a recording from another model does not match. The
    expert form (`moe_form`) is the engine's choice, not the model's: a recording made with one form
    replays under the other."""
    fields = dataclasses.asdict(model_config)
    fields.pop("moe_form", None)
    fields.pop("dtype", None)  # the compute dtype too: a float32 recording replays in a float64 engine
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
