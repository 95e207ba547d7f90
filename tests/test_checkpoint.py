"""Checkpoints: exact round trip, no pickle anywhere, manifests, and refusal of crafted files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from posttrain import checkpoint
from posttrain.errors import UserError
from posttrain.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(list(model.named_parameters()), 1e-2, 0.1)
    scheduler = build_scheduler(optimizer, 10, 0.2, "cosine")
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    loss = model(torch.randn(3, 4)).pow(2).sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    model, optimizer, scheduler = _setup()
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    path = checkpoint.save_checkpoint(str(tmp_path), 3, {"model": model},
                                      {"optimizer": optimizer, "scheduler": scheduler}, {"epoch": 1})
    lr_at_save = scheduler.get_last_lr()
    expected_draws = (random.random(), torch.rand(3))
    _train_step(model, optimizer, scheduler)
    after_one_more = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt, fresh_sched = _setup(seed=1)
    random.seed(123)
    torch.manual_seed(123)
    state = checkpoint.load_checkpoint(path, {"model": fresh}, {"optimizer": fresh_opt, "scheduler": fresh_sched})
    assert state == {"step": 3, "epoch": 1}
    # the RNG continues where it was saved: the same draws come out
    assert random.random() == expected_draws[0]
    torch.testing.assert_close(torch.rand(3), expected_draws[1], rtol=0, atol=0)
    assert fresh_sched.get_last_lr() == lr_at_save and fresh_sched.last_epoch == 3
    # and the next step gives bit-identical weights to the uninterrupted run
    checkpoint.set_rng_state(json.loads((path / "rng-0.json").read_text()))
    random.random(), torch.rand(3)
    _train_step(fresh, fresh_opt, fresh_sched)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, after_one_more[name], rtol=0, atol=0, msg=name)


def test_checkpoint_holds_no_pickle(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_step(model, optimizer, scheduler)
    path = checkpoint.save_checkpoint(str(tmp_path), 1, {"model": model},
                                      {"optimizer": optimizer, "scheduler": scheduler}, {})
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.pt", "rng-0.json", "scheduler.json",
                     "trainer_state.json"]
    # the one .pt file loads with the restricted unpickler
    torch.load(path / "optimizer.pt", weights_only=True)
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == set(names) - {"manifest.json"}
    assert all(manifest[n] == (path / n).stat().st_size for n in manifest)


class _RunsCode:
    """Unpickling this object calls os.system: the attack a crafted checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["optimizer.pt"])
def test_crafted_pickle_in_checkpoint_is_refused_without_running(tmp_path, victim):
    model, optimizer, scheduler = _setup()
    path = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, {"model": model},
                                      {"optimizer": optimizer, "scheduler": scheduler}, {})
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, path / victim)
    checkpoint._write_manifest(path)  # the attacker rewrites the manifest too
    with pytest.raises(UserError, match="refused to load"):
        checkpoint.load_checkpoint(checkpoint.resolve_checkpoint("latest", str(tmp_path / "run")),
                                   {"model": model}, {"optimizer": optimizer, "scheduler": scheduler})
    assert not marker.exists(), "the crafted pickle ran code"


def test_crafted_rng_file_is_not_unpickled(tmp_path):
    model, optimizer, scheduler = _setup()
    path = checkpoint.save_checkpoint(str(tmp_path), 1, {"model": model},
                                      {"optimizer": optimizer, "scheduler": scheduler}, {})
    marker = tmp_path / "pwned"
    # an old-style rng.pt pickle is never read; a non-JSON rng file is a clean error
    torch.save({"python": _RunsCode(marker)}, path / "rng-0.json")
    with pytest.raises(UserError, match="rng-0.json"):
        checkpoint.load_checkpoint(path, {"model": model}, {"optimizer": optimizer, "scheduler": scheduler})
    assert not marker.exists()


def test_latest_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
    model, optimizer, scheduler = _setup()
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), step, {"model": model},
                                   {"optimizer": optimizer, "scheduler": scheduler}, {})
    newest = tmp_path / "checkpoint-4"
    with open(newest / "model.safetensors", "ab") as handle:  # a torn write: size no longer matches
        handle.write(b"x")
    assert checkpoint.resolve_checkpoint("latest", str(tmp_path)) == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in capsys.readouterr().out
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.resolve_checkpoint(str(newest), str(tmp_path))


def test_total_limit_removes_by_rename_then_delete(tmp_path):
    model, optimizer, scheduler = _setup()
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), step, {"model": model},
                                   {"optimizer": optimizer, "scheduler": scheduler}, {}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_no_unrestricted_torch_load_in_the_package():
    offenders = [f"{p}:{n}" for p in (REPO / "posttrain").rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert offenders == []


def test_a_save_killed_half_way_leaves_latest_on_the_previous_checkpoint(tmp_path):
    """What a SIGKILL during save_checkpoint leaves behind: a half-written .tmp folder, or a half-deleted old one."""
    model, optimizer, scheduler = _setup()
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), step, {"model": model},
                                   {"optimizer": optimizer, "scheduler": scheduler}, {})
    half = tmp_path / "checkpoint-6.tmp"  # killed while writing step 6: files there, no manifest, never renamed
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    (half / "trainer_state.json").write_text("{}")
    doomed = tmp_path / "checkpoint-1.deleting"  # killed while removing an old one
    doomed.mkdir()
    (doomed / "trainer_state.json").write_text("{}")
    assert checkpoint.resolve_checkpoint("latest", str(tmp_path)) == tmp_path / "checkpoint-4"
    # and the next save of step 6 replaces the leftover instead of tripping over it
    path = checkpoint.save_checkpoint(str(tmp_path), 6, {"model": model}, {"optimizer": optimizer, "scheduler": scheduler}, {})
    assert checkpoint.is_complete(path) and not half.exists()
