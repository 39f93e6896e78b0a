"""The run's settings fingerprint: a resumed run must be the run that was started.

The first run in a workdir records its result-changing settings in ``workdir/settings.json``
(every config field except those in :data:`NOT_RESULT_CHANGING`). A rerun that has something
to resume compares its own: a difference refuses in one line listing ``field: old -> new``
(:class:`~sgpo_jax.errors.CheckpointError`), unless the caller allows it (the CLI's
``--allow_config_change``; then the new settings are recorded and a line says what changed).
Raising ``train.max_steps`` or ``train.epochs`` (modes dpo and sgpo) continues the run to the
new length (the learning-rate schedule then spans the new length) and the resume line says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from ml_collections import ConfigDict

from sgpo_jax.data.pairs import data_shards
from sgpo_jax.errors import CheckpointError
from sgpo_jax.training.workdir import read_json, write_json

__all__ = ["EXTENDABLE", "NOT_RESULT_CHANGING", "SETTINGS_FILE", "check_settings", "result_settings"]

SETTINGS_FILE = "settings.json"

# Fields that may differ between a run and its resumption, each with the reason.
NOT_RESULT_CHANGING = {
    "checkpoint.every": "when checkpoints are written, not what is trained",
    "checkpoint.keep": "how many checkpoints are kept",
    "checkpoint.directory": "where checkpoints are written (a run finds its own there)",
    "export": "whether the final policy is written out",
    "eval.limit": "how many held-out tasks are scored (evaluation only)",
    "eval.batch_size": "evaluation batching only",
    "mesh.data": "device layout only: checkpoints reshard onto any mesh",
    "mesh.fsdp": "device layout only: checkpoints reshard onto any mesh",
    "mesh.tensor": "device layout only: checkpoints reshard onto any mesh",
    "model.remat": "recomputes activations in the backward pass; same values",
    "model.attention": "attention kernel choice; the same function (equal up to float rounding)",
    "model.logps_chunk": "chunking of the output-layer log-probs; the same function",
    "train.micro_batches": "gradient accumulation splits the same batch (memory only)",
    "train.reference_batch_size": "forward-only batching; the same log-probs",
    "train.eval_every": "how often the held-out pairs are scored (evaluation only)",
}
# Fields whose increase continues a dpo/sgpo run (to the new length) instead of refusing.
EXTENDABLE = ("train.max_steps", "train.epochs")


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(value))}  # tuples as lists, as the file holds them


def result_settings(config: ConfigDict) -> Dict[str, Any]:
    """``{dotted field: value}`` of every result-changing setting of ``config``; ``data.shards``
    as resolved (0 = one per process), since the pair order depends on the number itself."""
    settings = {k: v for k, v in _flatten(config.to_dict()).items() if k not in NOT_RESULT_CHANGING}
    settings["data.shards"] = data_shards(config.data)
    return settings


def check_settings(config: ConfigDict, workdir: Path, *, resuming: bool, allow_change: bool = False,
                   record: bool = True) -> List[str]:
    """Compares ``config`` with the settings recorded in ``workdir`` when ``resuming`` (there is
    a checkpoint or stage to continue from), then records ``config``'s. Returns the notes for the
    resume line (an extended length, allowed changes); raises :class:`CheckpointError` listing
    every differing field otherwise. Every process calls it (process 0 reads and writes);
    ``record=False`` only checks (the dry run)."""
    path = Path(workdir) / SETTINGS_FILE
    new = result_settings(config)
    old = read_json(path) if resuming else None
    notes: List[str] = []
    if old is not None:
        changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
        extended = []
        if config.train.mode != "ssapo":
            extended = [k for k in changed if k in EXTENDABLE and _longer(old, new)]
        rest = [k for k in changed if k not in extended]
        pairs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in rest]
        if pairs and not allow_change:
            raise CheckpointError(f"{workdir} holds a run with other settings ({'; '.join(pairs)}); its checkpoints "
                                  "would continue under the new ones",
                                  "use a new --workdir, or pass --allow_config_change to continue anyway")
        notes += [f"{k} raised {old[k]!r} -> {new[k]!r}: continuing to the new length (the learning-rate schedule "
                  "spans it)" for k in extended]
        notes += [f"settings changed as allowed (--allow_config_change): {'; '.join(pairs)}"] if pairs else []
    if record and old != new:
        write_json(path, new)
    return notes


def _longer(old: Dict[str, Any], new: Dict[str, Any]) -> bool:
    """Whether ``new`` asks for more steps than ``old`` with everything else of the length alike:
    max_steps raised (or epochs raised while max_steps stays -1)."""
    old_steps, new_steps = old.get("train.max_steps", -1), new.get("train.max_steps", -1)
    if old_steps > 0 or new_steps > 0:
        return new_steps > 0 and (old_steps <= 0 or new_steps > old_steps) and (
            old_steps > 0 or old.get("train.epochs") == new.get("train.epochs"))
    return new.get("train.epochs", 0) > old.get("train.epochs", 0)
