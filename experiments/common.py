"""What every experiment shares: config resolution, the workdir, result files, the printed table."""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import ml_collections


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Apply ``config.smoke_settings`` when ``config.smoke`` is set; return a locked copy."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.get("smoke"):
        for key, value in config.smoke_settings.items():
            if key not in config:
                raise KeyError(f"smoke_settings.{key}: not a key of the config; accepted: {sorted(config)}.")
            config[key] = value
    config.lock()
    return config


def check_choice(field: str, values: Iterable[str], accepted: Sequence[str]) -> None:
    bad = [v for v in values if v not in accepted]
    if bad:
        raise ValueError(f"config.{field}: {bad} not known; accepted: {', '.join(accepted)}.")


def prepare_workdir(workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    return workdir


def write_json(path: str, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
