"""Atomic checkpoints with exact resume, and the final Hugging Face-format save.

A checkpoint-STEP/ folder holds every module's and optimizer's state, the
schedule, the RNG states (python, torch) and the recipe's own state (data
position, elapsed time, ...). It is written to a temporary folder and renamed
into place, so a run killed mid-save never leaves a half checkpoint that
`latest` would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from posttrain.errors import UserError

PREFIX = "checkpoint-"


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def _write_atomic(final: Path, write) -> None:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():  # flush file contents before the rename publishes them
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_checkpoint(output_dir: str, step: int, modules: dict, optimizers: dict, state: dict,
                    total_limit: int = 0) -> Path:
    """Write output_dir/checkpoint-STEP atomically; keep the newest ``total_limit``."""
    final = Path(output_dir) / f"{PREFIX}{step}"

    def write(tmp: Path) -> None:
        for name, module in modules.items():
            trainable = {k: v for k, v in module.state_dict().items()}
            torch.save(trainable, tmp / f"{name}.pt")
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"{name}.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))

    _write_atomic(final, write)
    if total_limit > 0:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_checkpoint(value: str, output_dir: str) -> Path | None:
    """`latest` -> the newest checkpoint in output_dir (None if there is none); a path -> that folder."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"resume_from_checkpoint: {value!r} is not a checkpoint folder (no trainer_state.json)")
    return path


def load_checkpoint(path: Path, modules: dict, optimizers: dict) -> dict:
    """Restore modules, optimizers and RNG from ``path``; returns the recipe's state dict."""
    for name, module in modules.items():
        module.load_state_dict(torch.load(path / f"{name}.pt", weights_only=True))
    for name, opt in optimizers.items():
        opt.load_state_dict(torch.load(path / f"{name}.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def save_pretrained(model, tokenizer, output_dir: str | Path) -> None:
    """Final model in Hugging Face format, directly in output_dir; LoRA adapters are merged first."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    staging = output_dir / ".final.tmp"

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    _write_atomic(staging, write)
    for f in staging.iterdir():
        os.replace(f, output_dir / f.name)
    staging.rmdir()
