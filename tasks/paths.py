"""Absolute paths, and the OmegaConf resolver that makes config paths absolute.

Hydra may run jobs elsewhere (a launcher's worker, a Prefect worker), so every path in a resolved config
is absolute: `${root:data/x.csv}` resolves against the repository root (or $DOLPHIN_HOME if set).
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def home() -> Path:
    """Where relative paths resolve: $DOLPHIN_HOME, else the repository root."""
    return Path(os.environ.get("DOLPHIN_HOME") or REPO_ROOT).resolve()


def resolve_root(rel: str = "") -> str:
    p = Path(rel)
    # Shipped data and what `make engines` builds come from the repository; outputs go under DOLPHIN_HOME.
    base = REPO_ROOT if p.parts[:1] in (("data",), (".engines",)) else home()
    return str(p if p.is_absolute() else (base / p))


def default_block_size(device: str) -> int:
    """vLLM's own default KV block size on a device: 16 on GPUs, 128 on its CPU build (platforms/cpu.py,
    whose attention needs a multiple of 32)."""
    return 128 if device == "cpu" else 16


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", resolve_root)
    if not OmegaConf.has_resolver("default_block_size"):
        OmegaConf.register_new_resolver("default_block_size", default_block_size)
