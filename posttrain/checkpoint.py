"""Atomic checkpoints with exact resume, and the final Hugging Face-format save.

A checkpoint-STEP/ folder holds, and nothing in it is a pickle:

    {module}.safetensors   weights of each trained module (model, critic, ...)
    {optimizer}.pt         optimizer state: tensors and numbers only, read with
                           ``torch.load(weights_only=True)``
    scheduler.json         the learning-rate schedule's position
    rng-{rank}.json        python, torch CPU and every CUDA device's RNG state
    trainer_state.json     step, data position, logging window, recipe scalars
    manifest.json          every file above with its size, written last

It is written to a temporary folder and renamed into place only when complete,
so a run killed mid-save never leaves a half checkpoint; ``latest`` takes the
newest folder whose manifest matches its files.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from posttrain import distributed
from posttrain.errors import UserError

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"


def rng_state() -> dict:
    """Every RNG this process draws from, as JSON-safe lists."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _remove(folder: Path) -> None:
    """Rename, then delete: a half-deleted folder never looks like a checkpoint."""
    if not folder.exists():
        return
    doomed = folder.with_name(folder.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_atomic(final: Path, write) -> None:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)  # flush file contents before the rename publishes them
    _remove(final)
    os.replace(tmp, final)


def _write_manifest(folder: Path) -> None:
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every file it lists has its recorded size."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save_checkpoint(output_dir: str, step: int, modules: dict, optimizers: dict, state: dict,
                    total_limit: int = 0) -> Path:
    """Write output_dir/checkpoint-STEP atomically; keep the newest ``total_limit``.

    ``optimizers`` maps names to objects with ``state_dict()``; a learning-rate
    scheduler (a plain dict of numbers) goes to JSON, anything else to a
    tensors-only ``.pt`` file.
    """
    final = Path(output_dir) / f"{PREFIX}{step}"

    def write(tmp: Path) -> None:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))  # tied weights are stored once
        for name, opt in optimizers.items():
            if isinstance(opt, torch.optim.lr_scheduler.LRScheduler):
                (tmp / f"{name}.json").write_text(json.dumps(opt.state_dict()))
            else:
                torch.save(opt.state_dict(), tmp / f"{name}.pt")
        (tmp / f"rng-{distributed.rank()}.json").write_text(json.dumps(rng_state()))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        _write_manifest(tmp)

    _write_atomic(final, write)
    if total_limit > 0:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            _remove(old)
    return final


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoint folders of output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_checkpoint(value: str, output_dir: str) -> Path | None:
    """`latest` -> the newest complete checkpoint in output_dir (None if there is none); a path -> that folder.

    A newest checkpoint whose files do not match its manifest is reported and
    the one before it is used.
    """
    if not value:
        return None
    if value == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            if is_complete(path):
                return path
            print(f"posttrain: warning: {path} is incomplete or corrupt (files differ from {MANIFEST}); skipping it")
        return None
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"resume_from_checkpoint: {value!r} is not a checkpoint folder (no trainer_state.json)")
    if not is_complete(path):
        raise UserError(f"resume_from_checkpoint: {value!r} is incomplete or corrupt (files differ from {MANIFEST})")
    return path


def load_tensors(path: Path):
    """A tensors-only .pt file; anything that would run code when unpickled is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: refused to load: not a plain tensor file ({reason[:200]})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read checkpoint file ({err})") from None


def load_checkpoint(path: Path, modules: dict, optimizers: dict) -> dict:
    """Restore modules, optimizers and RNG from ``path``; returns the recipe's state dict."""
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise UserError(f"{path}: missing {file.name} (written by an older posttrain, or not a checkpoint)")
        load_model(module, str(file), device=str(distributed.device()))
    for name, opt in optimizers.items():
        if isinstance(opt, torch.optim.lr_scheduler.LRScheduler):
            opt.load_state_dict(_read_json(path / f"{name}.json"))
        else:
            opt.load_state_dict(load_tensors(path / f"{name}.pt"))
    rng_file = path / f"rng-{distributed.rank()}.json"
    if not rng_file.is_file():  # resuming at another world size: ranks without their own state take rank 0's
        rng_file = path / "rng-0.json"
    set_rng_state(_read_json(rng_file))
    return _read_json(path / "trainer_state.json")


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
