"""End-to-end tests of the DPO recipe (posttrain.recipes.dpo), in-process on tiny real models.

The policy starts from the random tiny_qwen fixture; DPO's signal does not need a trained
start. At step 1 the policy equals the reference, so h = 0 and every loss type has a value
known in closed form, which several tests use to check that the option was really applied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.data import collate_preferences, preference_examples, read_rows
from posttrain.losses import dpo_loss
from posttrain.metrics import read_metrics
from posttrain.models import load_policy_and_reference
from posttrain.recipes import dpo

TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")


def dpo_config(output_dir: Path, model: Path, data: Path, **overrides):
    values = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(output_dir),
              "num_threads": "1", "progress": "false", "seed": "0", "per_device_train_batch_size": "8",
              "logging_steps": "1"}
    values.update({k: str(v) for k, v in overrides.items()})
    return load_config("dpo", None, values)


def run_dpo(output_dir: Path, model: Path, data: Path, **overrides) -> list[dict]:
    dpo.main(dpo_config(output_dir, model, data, **overrides))
    return read_metrics(output_dir / "metrics.jsonl")


def small_preference(tmp_path: Path, arith_data, n: int = 32) -> Path:
    lines = arith_data["preference"].read_text().splitlines()[:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- a run that learns


@pytest.mark.slow
def test_dpo_learns_preferences(tmp_path, tiny_qwen, arith_data):
    records = run_dpo(tmp_path / "out", tiny_qwen, arith_data["preference"], learning_rate=3e-3, beta=1.0,
                      max_steps=160, per_device_train_batch_size=16, logging_steps=5, lr_scheduler_type="constant")
    assert [r["step"] for r in records] == list(range(5, 161, 5))
    first, last = records[:2], records[-8:]
    assert mean(r["rewards/accuracies"] for r in last) > 0.6
    assert mean(r["rewards/accuracies"] for r in last) > mean(r["rewards/accuracies"] for r in first) + 0.1
    assert mean(r["rewards/margins"] for r in last) > 0.1
    assert mean(r["loss"] for r in last) < math.log(2) - 0.05
    # the final model is a plain causal LM whose weights moved away from the reference
    out = tmp_path / "out"
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen2"
    final = load_file(str(out / "model.safetensors"))
    initial = load_file(str(Path(tiny_qwen) / "model.safetensors"))
    assert all(not torch.equal(final[k], initial[k]) for k in initial)
    assert (out / "plots" / "rewards_accuracies.png").is_file()


# ------------------------------------------------------------------------ chosen-side gradient


def one_batch(cfg, tokenizer, size: int = 4):
    rows = read_rows(cfg.dataset_name)[:size]
    pairs = preference_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
    return collate_preferences(pairs, list(range(len(pairs))), tokenizer.pad_token_id)


def test_dpo_step_gradient_flows_through_the_chosen_side(tmp_path, tiny_qwen, arith_data, monkeypatch):
    cfg = dpo_config(tmp_path / "out", tiny_qwen, arith_data["preference"])
    tokenizer, policy, ref = load_policy_and_reference(cfg)
    batch = one_batch(cfg, tokenizer, size=4)

    calls = []
    real_pair_logps = dpo.pair_logps

    def recording_pair_logps(model, b, normalization):
        out = real_pair_logps(model, b, normalization)
        calls.append((model, out))
        return out

    monkeypatch.setattr(dpo, "pair_logps", recording_pair_logps)
    loss, stats = dpo.dpo_step(cfg, policy, ref, batch, None)
    (policy_call,) = [out for model, out in calls if model is policy]
    chosen, rejected, _ = policy_call
    assert chosen.requires_grad and rejected.requires_grad
    grad_chosen, grad_rejected = torch.autograd.grad(loss, [chosen, rejected], retain_graph=True)
    # policy == reference at the start, so h = 0 and d loss / d chosen_i = -beta * sigmoid(0) / B
    expected = torch.full((4,), -cfg.beta * 0.5 / 4)
    torch.testing.assert_close(grad_chosen, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_rejected, -expected, rtol=1e-5, atol=1e-7)

    # the parameters get a non-zero gradient, and the chosen rows alone produce one as well
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in policy.parameters() if p.grad is not None))
    assert norm > 0
    policy.zero_grad(set_to_none=True)
    chosen_only, _, _ = real_pair_logps(policy, batch, "sum")
    chosen_only.sum().backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert sum(float(p.grad.abs().sum()) for p in policy.parameters()) > 0
    assert stats["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_pair_logps_and_dpo_loss_give_chosen_gradient(tmp_path, tiny_qwen, arith_data):
    cfg = dpo_config(tmp_path / "out", tiny_qwen, arith_data["preference"])
    tokenizer, policy, ref = load_policy_and_reference(cfg)
    batch = one_batch(cfg, tokenizer, size=3)
    chosen, rejected, token_logps = dpo.pair_logps(policy, batch, "sum")
    assert chosen.shape == rejected.shape == (3,)
    assert token_logps.shape[0] == 6
    # the sequence log-prob is the sum of the response tokens' log-probs of the chosen rows
    mask = batch.tokens.loss_mask
    torch.testing.assert_close(chosen, (token_logps[:3] * mask[:3]).sum(-1))
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = dpo.pair_logps(ref, batch, "sum")
    shifted_ref = ref_chosen - 1.0  # make h non-zero so the gradient is not the symmetric value
    losses, _, _ = dpo_loss(chosen, rejected, shifted_ref, ref_rejected, beta=0.1)
    (grad,) = torch.autograd.grad(losses.mean(), chosen)
    h = (chosen - rejected - shifted_ref + ref_rejected).detach()
    torch.testing.assert_close(grad, -0.1 * torch.sigmoid(-0.1 * h) / 3)
    assert (grad != 0).all()


# ------------------------------------------------------------------------------- loss variants


@pytest.mark.parametrize("overrides, expected_first_loss", [
    ({"loss_type": "ipo", "beta": 0.1}, (0 - 1 / (2 * 0.1)) ** 2),  # (h - 1/(2 beta))^2 at h = 0
    ({"loss_type": "hinge", "beta": 0.1}, 1.0),  # relu(1 - beta h) at h = 0
    ({"loss_type": "sigmoid", "label_smoothing": 0.1}, math.log(2)),  # (0.9 + 0.1) * -log sigmoid(0)
    ({"logps_normalization": "mean"}, math.log(2)),
], ids=["ipo", "hinge", "label_smoothing", "logps_mean"])
def test_dpo_loss_variants_run(tmp_path, tiny_qwen, arith_data, overrides, expected_first_loss):
    data = small_preference(tmp_path, arith_data)
    records = run_dpo(tmp_path / "out", tiny_qwen, data, max_steps=2, learning_rate=1e-3, **overrides)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["loss"] is not None and math.isfinite(r["loss"])
        assert all(r[k] is not None and math.isfinite(r[k]) for k in TRL_KEYS)
    assert records[0]["loss"] == pytest.approx(expected_first_loss, rel=1e-4)
    assert records[1]["loss"] != pytest.approx(expected_first_loss, rel=1e-6)  # the policy moved after step 1


def test_dpo_mean_normalization_scales_logps_per_token(tmp_path, tiny_qwen, arith_data):
    data = small_preference(tmp_path, arith_data)
    by_norm = {norm: run_dpo(tmp_path / norm, tiny_qwen, data, max_steps=1, logps_normalization=norm)[0]
               for norm in ("sum", "mean")}
    # arith responses are 3 or 4 tokens (2-3 digits + EOS), so each per-token mean lies between sum/3 and
    # sum/4, and so does their batch mean
    for key in ("logps/chosen", "logps/rejected"):
        total, per_token = by_norm["sum"][key], by_norm["mean"][key]
        assert total < per_token < 0
        assert total / 3 - 1e-4 <= per_token <= total / 4 + 1e-4


# -------------------------------------------------------------------------- reference handling


def test_dpo_precomputed_reference_matches_live_reference(tmp_path, tiny_qwen, arith_data):
    data = small_preference(tmp_path, arith_data)
    common = dict(max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant")
    live = run_dpo(tmp_path / "live", tiny_qwen, data, precompute_ref_log_probs="false", **common)
    pre = run_dpo(tmp_path / "pre", tiny_qwen, data, precompute_ref_log_probs="true", **common)
    assert [r["step"] for r in live] == [r["step"] for r in pre] == [1, 2, 3]
    assert pre[0]["loss"] == pytest.approx(live[0]["loss"], abs=1e-5)
    for a, b in zip(live, pre):
        for key in ("loss",) + TRL_KEYS:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    # after the first update the policy differs from the reference: rewards are no longer 0
    assert abs(live[2]["rewards/chosen"]) > 1e-4


def test_dpo_rpo_alpha_logs_nll_loss(tmp_path, tiny_qwen, arith_data):
    data = small_preference(tmp_path, arith_data)
    plain = run_dpo(tmp_path / "plain", tiny_qwen, data, max_steps=2)
    rpo = run_dpo(tmp_path / "rpo", tiny_qwen, data, max_steps=2, rpo_alpha=1.0)
    assert "nll_loss" not in plain[0]
    assert all("nll_loss" in r and math.isfinite(r["nll_loss"]) and r["nll_loss"] > 0 for r in rpo)
    # step 1: h = 0, so loss = log 2 + rpo_alpha * nll; the NLL is a per-token mean (a random model: ~log V)
    assert rpo[0]["loss"] == pytest.approx(math.log(2) + rpo[0]["nll_loss"], rel=1e-5)
    assert rpo[0]["nll_loss"] == pytest.approx(math.log(259), rel=0.15)
    assert plain[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)


def test_dpo_logs_trl_named_metrics(tmp_path, tiny_qwen, arith_data):
    data = small_preference(tmp_path, arith_data)
    records = run_dpo(tmp_path / "out", tiny_qwen, data, max_steps=3, learning_rate=1e-2)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for r in records:
        for key in ("step", "epoch", "loss", "learning_rate", "elapsed_s") + TRL_KEYS:
            assert key in r and r[key] is not None, (key, r)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    # step 1: policy == reference, so the implicit rewards are exactly 0 and no pair counts as won
    assert records[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert records[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert records[0]["rewards/accuracies"] == 0.0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["final"]["step"] == 3


def test_dpo_separate_reference_model_changes_rewards(tmp_path, tiny_qwen, tiny_llama, arith_data):
    data = small_preference(tmp_path, arith_data)
    same = run_dpo(tmp_path / "same", tiny_qwen, data, max_steps=1)
    other = run_dpo(tmp_path / "other", tiny_qwen, data, max_steps=1, ref_model_name_or_path=tiny_llama)
    # the policy's own log-probs are the same; only the reference (and so the rewards) differ
    assert other[0]["logps/chosen"] == pytest.approx(same[0]["logps/chosen"], abs=1e-5)
    assert same[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert abs(other[0]["rewards/chosen"] - same[0]["rewards/chosen"]) > 1e-3
    assert abs(other[0]["rewards/margins"]) > 1e-4
    assert other[0]["loss"] != pytest.approx(math.log(2), abs=1e-5)


def test_ipo_uses_per_token_averaged_logps_by_default_as_trl(tmp_path, tiny_qwen, arith_data):
    """IPO's target 1/(2β) is for averaged log-ratios: the default config averages, and the loss is TRL's."""
    from posttrain.models import token_logps

    data = small_preference(tmp_path, arith_data)
    cfg = dpo_config(tmp_path / "out", tiny_qwen, data, loss_type="ipo", beta=0.1)
    assert cfg.logps_normalization == "mean"
    assert dpo_config(tmp_path / "o2", tiny_qwen, data, loss_type="ipo", logps_normalization="sum").logps_normalization == "sum"
    assert dpo_config(tmp_path / "o3", tiny_qwen, data).logps_normalization == "sum"

    tokenizer, policy, ref = load_policy_and_reference(cfg)
    with torch.no_grad():  # move the policy off the reference so h != 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = one_batch(cfg, tokenizer)
    loss, _ = dpo.dpo_step(cfg, policy, ref, batch, None)

    # TRL's IPO, written out: per-token averaged log-probs of each side, then (logits - 1/(2β))², mean over pairs
    tokens = batch.tokens
    with torch.no_grad():
        def avg(model):
            lp = token_logps(model, tokens.input_ids, tokens.attention_mask)
            return (lp * tokens.loss_mask).sum(-1) / tokens.loss_mask.sum(-1)

        pol, rf = avg(policy), avg(ref)
    B = len(batch)
    logits = (pol[:B] - pol[B:]) - (rf[:B] - rf[B:])
    expected = ((logits - 1 / (2 * 0.1)) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    summed = dpo_config(tmp_path / "o4", tiny_qwen, data, loss_type="ipo", beta=0.1, logps_normalization="sum")
    assert float(dpo.dpo_step(summed, policy, ref, batch, None)[0]) != pytest.approx(float(expected), rel=1e-3)
