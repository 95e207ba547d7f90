"""Atomic checkpoints with exact resume, and the final Hugging Face-format save.

A checkpoint-STEP/ folder holds, and nothing in it is a pickle:

    {module}.safetensors   weights of each trained module (model, critic, ...): whole
    {module}/              ... or, under FSDP2, its shards (torch.distributed.checkpoint,
                           safetensors files with their offsets)
    optimizer.pt           optimizer state keyed by parameter name: tensors and numbers,
                           read with ``torch.load(weights_only=True)``
    optimizer/ + optimizer.json   ... or, under FSDP2, its sharded tensors and its
                           param groups
    scheduler.json         the learning-rate schedule's position
    rng-{rank}.json        python, torch CPU and every CUDA device's RNG state, per rank
    trainer_state.json     step, data position, logging window, recipe scalars
    manifest.json          every file above with its size, written last

Whole and sharded checkpoints both resume at any world size (FSDP2 shards
are re-cut to the new ranks; a whole file is sharded on load). A checkpoint
is written to a temporary folder and renamed into place only when every rank
is done, so a run killed mid-save never leaves a half checkpoint; ``latest``
takes the newest folder whose manifest matches its files.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

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


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file())


def _fsync_tree(folder: Path) -> None:
    for f in _files(folder):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def remove_checkpoint(folder: Path) -> None:
    """Rename, then delete: a half-deleted folder never looks like a checkpoint."""
    if not folder.exists():
        return
    doomed = folder.with_name(folder.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_atomic(final: Path, write) -> None:
    """Run ``write(tmp)`` on every rank, then publish ``tmp`` as ``final`` from rank 0 once all are done."""
    tmp = final.with_name(final.name + ".tmp")
    if distributed.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    distributed.barrier()
    write(tmp)
    distributed.barrier()
    if distributed.is_main():
        _fsync_tree(tmp)  # flush file contents before the rename publishes them
        remove_checkpoint(final)
        os.replace(tmp, final)
    distributed.barrier()


def _write_manifest(folder: Path) -> None:
    files = {str(f.relative_to(folder)): f.stat().st_size for f in _files(folder) if f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every file it lists has its recorded size."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------- sharded state (FSDP2)


def _dcp_save(state: dict, folder: Path) -> None:
    """Every rank writes its shards of ``state`` (a flat dict of tensors) as safetensors into ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
             no_dist=not distributed.is_distributed())


def _dcp_load(state: dict, folder: Path) -> None:
    """Fill ``state`` (a flat dict of tensors, sharded or whole) in place from the safetensors in ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not distributed.is_distributed())
    except Exception as err:  # noqa: BLE001 - a damaged or foreign shard folder is the user's to fix
        raise UserError(f"{folder}: cannot read sharded checkpoint ({type(err).__name__}: {str(err)[:200]})") from None


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied LM head)."""
    first: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        first.setdefault(id(param), name)
    return tied


def _untied(state: dict, model: nn.Module) -> dict:
    """``state`` without a tied head's second name: each tensor is stored once, as transformers does."""
    tied = _tied_names(model)
    return {k: v for k, v in state.items() if k not in tied}


def _flat_optimizer_state(optimizer_state: dict) -> dict:
    """{"state.<param>.<key>": tensor} views of an optimizer state dict keyed by parameter name."""
    return {f"state.{name}.{key}": value for name, entries in optimizer_state["state"].items()
            for key, value in entries.items() if torch.is_tensor(value)}


def _optimizer_container(modules: dict) -> nn.Module:
    """One module holding every trained module, so optimizer state is keyed by `name.parameter`."""
    return nn.ModuleDict(modules)


def _save_optimizer(tmp: Path, name: str, container: nn.Module, optimizer, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(container, optimizer)
    if sharded:
        _dcp_save(_flat_optimizer_state(state), tmp / name)
        if distributed.is_main():
            (tmp / f"{name}.json").write_text(json.dumps(state["param_groups"]))
    elif distributed.is_main():
        torch.save(state, tmp / f"{name}.pt")


def _load_optimizer(path: Path, name: str, container: nn.Module, optimizer, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    if (path / name).is_dir():  # sharded on disk: fill this run's own layout in place
        state = get_optimizer_state_dict(container, optimizer)
        _dcp_load(_flat_optimizer_state(state), path / name)
        state["param_groups"] = _read_json(path / f"{name}.json")
        set_optimizer_state_dict(container, optimizer, state)
    else:  # whole on disk: sharded on load under FSDP2
        state = load_tensors(path / f"{name}.pt")
        set_optimizer_state_dict(container, optimizer, state, options=StateDictOptions(full_state_dict=sharded))


def _save_module(tmp: Path, name: str, module: nn.Module) -> None:
    if distributed.is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        _dcp_save(_untied(get_model_state_dict(module), module), tmp / name)
    elif distributed.is_main():
        save_model(module, str(tmp / f"{name}.safetensors"))  # tied weights are stored once


def _load_module(path: Path, name: str, module: nn.Module) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    whole = path / f"{name}.safetensors"
    if (path / name).is_dir():
        state = _untied(get_model_state_dict(module), module)
        _dcp_load(state, path / name)
        set_model_state_dict(module, state, options=StateDictOptions(strict=False))  # tied copies fill themselves
    elif not whole.is_file():
        raise UserError(f"{path}: missing {whole.name} (written by an older posttrain, or not a checkpoint)")
    elif distributed.is_sharded(module):
        set_model_state_dict(module, load_file(str(whole)), options=StateDictOptions(full_state_dict=True))
    else:
        load_model(module, str(whole), device=str(distributed.device()))


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(output_dir: str, step: int, modules: dict, optimizers: dict, state: dict,
                    total_limit: int = 0) -> Path:
    """Write output_dir/checkpoint-STEP atomically (every rank calls it); keep the newest ``total_limit``.

    ``optimizers`` maps names to optimizers (over the parameters of
    ``modules``) and learning-rate schedulers (saved as JSON).
    """
    final = Path(output_dir) / f"{PREFIX}{step}"
    sharded = any(distributed.is_sharded(m) for m in modules.values())
    for name, module in modules.items():
        check_finite(module, f"checkpoint-{step} ({name})")

    def write(tmp: Path) -> None:
        for name, module in modules.items():
            _save_module(tmp, name, module)
        for name, opt in optimizers.items():
            if isinstance(opt, torch.optim.lr_scheduler.LRScheduler):
                if distributed.is_main():
                    (tmp / f"{name}.json").write_text(json.dumps(opt.state_dict()))
            else:
                _save_optimizer(tmp, name, _optimizer_container(modules), opt, sharded)
        (tmp / f"rng-{distributed.rank()}.json").write_text(json.dumps(rng_state()))
        distributed.barrier()
        if distributed.is_main():
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
            _write_manifest(tmp)

    _write_atomic(final, write)
    if total_limit > 0 and distributed.is_main():
        for old in list_checkpoints(output_dir)[:-total_limit]:
            remove_checkpoint(old)
    distributed.barrier()
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
    """Restore modules, optimizers and this rank's RNG from ``path``; returns the recipe's state dict."""
    sharded = any(distributed.is_sharded(m) for m in modules.values())
    for name, module in modules.items():
        _load_module(path, name, module)
    for name, opt in optimizers.items():
        if isinstance(opt, torch.optim.lr_scheduler.LRScheduler):
            opt.load_state_dict(_read_json(path / f"{name}.json"))
        else:
            _load_optimizer(path, name, _optimizer_container(modules), opt, sharded)
    rng_file = path / f"rng-{distributed.rank()}.json"
    if not rng_file.is_file():  # resuming on more ranks than were saved: the new ranks take rank 0's
        rng_file = path / "rng-0.json"
    set_rng_state(_read_json(rng_file))
    return _read_json(path / "trainer_state.json")


def check_finite(module: nn.Module, what: str) -> None:
    """Refuse to save weights that hold NaN or inf (on every rank's shard: the decision is shared)."""
    finite = [torch.isfinite(distributed.local_tensor(p)).all() for p in module.parameters()]
    bad = bool(finite) and not bool(torch.stack(finite).all())  # one host sync for all the weights
    if distributed.any_rank(bad):
        from posttrain.training import TrainingStopped

        raise TrainingStopped(f"{what} has non-finite weights and was not saved; lower learning_rate or check the data")


def save_module_file(module: nn.Module, path: Path) -> None:
    """One module's full weights as a safetensors file, written by rank 0 (gathered first under FSDP2)."""
    check_finite(module, str(path))
    state = distributed.full_state_dict(module)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        if state is None:
            save_model(module, str(path))
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    distributed.barrier()


def _plain_class(module: nn.Module) -> type:
    """The module's own class, under the DDP / FSDP2 subclass that wrapping put on it."""
    return next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed"))


def save_pretrained(model, tokenizer, output_dir: str | Path, replica=None, merge_adapter: bool = True,
                    copy_base: bool = False) -> None:
    """Final model in Hugging Face format, directly in output_dir, written by rank 0.

    A LoRA model is saved as peft saves it (adapter_config.json,
    adapter_model.safetensors): with ``merge_adapter`` in output_dir/adapter/,
    beside the merged full weights in output_dir; without, alone in
    output_dir. ``copy_base`` also writes the adapter's base model to
    output_dir/base/ and points the adapter there (for a base in a temporary folder).

    Under FSDP2 every rank calls it: the full state dict is gathered to rank 0
    (on the CPU) first. A sharded LoRA model is saved from ``replica()``, an
    unsharded copy of the model that rank 0 builds to load it into.
    """
    output_dir = Path(output_dir)
    check_finite(model, "the final model")
    state = distributed.full_state_dict(model)
    if not distributed.is_main():
        distributed.barrier()
        return
    if state is not None and hasattr(model, "merge_and_unload"):
        model = replica()
        model.load_state_dict(state)
        state = None
    elif state is not None:
        state = _untied(state, model)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / ".final.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    if hasattr(model, "merge_and_unload"):
        adapter = staging / "adapter" if merge_adapter else staging
        _save_adapter(model, adapter)
        if copy_base:
            shutil.copytree(model.peft_config["default"].base_model_name_or_path, staging / "base")
            _point_adapter_at(adapter, output_dir / "base")
        model = model.merge_and_unload() if merge_adapter else None
    if model is not None:
        wrapped_class = type(model)
        model.__class__ = _plain_class(model)  # so config.json names the transformers class, not the wrapper
        try:
            model.save_pretrained(str(staging), state_dict=state)
        finally:
            model.__class__ = wrapped_class
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    _fsync_tree(staging)
    for f in staging.iterdir():
        if (output_dir / f.name).is_dir():
            shutil.rmtree(output_dir / f.name)
        os.replace(f, output_dir / f.name)
    staging.rmdir()
    distributed.barrier()


def _save_adapter(model, folder: Path) -> None:
    """The peft adapter files of ``model`` (adapter_config.json, adapter_model.safetensors) in ``folder``."""
    wrapped_class = type(model)
    model.__class__ = _plain_class(model)
    try:
        model.save_pretrained(str(folder))
    finally:
        model.__class__ = wrapped_class
    (folder / "README.md").unlink(missing_ok=True)  # peft's blank card: the run writes its own


def _point_adapter_at(folder: Path, base: Path) -> None:
    """Set the adapter's base_model_name_or_path (an absolute path, as peft loads it from any working directory)."""
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
