"""The run's own guards: reused output folders, `latest` with nothing to resume, non-finite training, pickle models."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import torch

from posttrain import cli
from posttrain.metrics import read_metrics


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def sft_args(model, data, out, *extra):
    return ["sft", "--model_name_or_path", model, "--dataset_name", data, "--output_dir", out, "--max_steps", "4",
            "--logging_steps", "1", "--num_threads", "1", "--progress", "false", *extra]


def small_sft(tmp_path, arith_data, n=32):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(arith_data["sft"].read_text().splitlines(keepends=True)[:n]))
    return path


def test_output_dir_of_another_run_is_refused_until_overwrite(tmp_path, tiny_qwen, arith_data):
    data, out = small_sft(tmp_path, arith_data), tmp_path / "out"
    assert run(*sft_args(tiny_qwen, data, out, "--save_steps", "1", "--save_total_limit", "5"))[0] == 0
    before = sorted(p.name for p in out.glob("checkpoint-*"))
    assert before == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    code, err = run(*sft_args(tiny_qwen, data, out, "--max_steps", "2", "--save_steps", "1"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds another run" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == before, "nothing of the old run was touched"
    # overwrite: the old checkpoints go first, so `latest` and save_total_limit only see the new run's
    code, _ = run(*sft_args(tiny_qwen, data, out, "--max_steps", "2", "--save_steps", "1", "--overwrite_output_dir", "true"))
    assert code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_latest_with_no_checkpoint_says_so(tmp_path, tiny_qwen, arith_data):
    data, out = small_sft(tmp_path, arith_data), tmp_path / "out"
    code, err = run(*sft_args(tiny_qwen, data, out, "--resume_from_checkpoint", "latest"))
    assert code == 2 and "no complete checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_huge_learning_rate_stops_without_writing_non_finite_weights(tmp_path, tiny_qwen, arith_data):
    data, out = small_sft(tmp_path, arith_data), tmp_path / "out"
    code, err = run(*sft_args(tiny_qwen, data, out, "--learning_rate", "1e30", "--max_steps", "30",
                              "--max_nonfinite_steps", "3", "--save_steps", "1", "--lr_scheduler_type", "constant"))
    # the run had started (its memory table printed, indented lines under a heading, and the note on defaults
    # unlike TRL's); it stops with one line
    said = [line for line in err.strip().splitlines() if not line.startswith(("memory estimate", "  ", "posttrain: note: "))]
    assert code == 1 and len(said) == 1, err
    assert "non-finite" in err
    assert not (out / "model.safetensors").exists(), "a final model with non-finite weights was written"
    records = read_metrics(out / "metrics.jsonl")
    assert any(r.get("nonfinite_steps") for r in records)
    from safetensors.torch import load_file

    for ckpt in out.glob("checkpoint-*"):  # every checkpoint that was written holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_pickle_only_model_folder_is_refused_unless_allowed(tmp_path, tiny_qwen, arith_data):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_qwen, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_qwen).state_dict(), folder / "pytorch_model.bin")
    data = small_sft(tmp_path, arith_data)
    code, err = run(*sft_args(folder, data, tmp_path / "out"))
    assert code == 2 and "pickle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert run(*sft_args(folder, data, tmp_path / "out2", "--allow_pickle", "true"))[0] == 0


def test_crafted_pickle_model_folder_never_runs(tmp_path, tiny_qwen, arith_data):
    import os
    import pickle

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(json.loads((tiny_qwen / "config.json").read_text())))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode()))
    code, err = run(*sft_args(folder, small_sft(tmp_path, arith_data), tmp_path / "out"))
    assert code == 2 and "pickle" in err
    assert not (tmp_path / "pwned").exists()
