"""Padding-free batches (`padding_free: true`): rows packed into one sequence give the padded path's numbers.

Every comparison runs the same real tiny model on the same rows twice, right-padded (B, L) and packed (1, N)
with positions restarting at 0 per row and no attention mask, in fp32: per-token log-probs, the SFT loss,
reward-model scores, the DPO loss and all their gradients agree to float rounding, and whole runs end at
the same weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from posttrain.config import load_config
from posttrain.data import Example, PackedBatch, PreferenceExample, TokenBatch, collate_examples, collate_preferences, pack_examples
from posttrain.errors import UserError
from posttrain.losses import packed_sequence_logps
from posttrain.metrics import read_metrics
from posttrain.models import check_padding_free, disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer, token_logps
from posttrain.recipes import dpo, rm, sft

FAMILIES = ("qwen2_tied", "llama3", "mistral")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unequal_examples(tokenizer, n: int = 5, seed: int = 0) -> list[Example]:
    """Prompt + completion rows of clearly unequal token lengths (one token per character here: 4 + 7i to 6 + 7i tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = "".join(rng.choice("abcdefgh+=") for _ in range(2 + 4 * i + rng.randrange(3)))
        completion = "".join(rng.choice("0123456789") for _ in range(1 + 3 * i))
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        cut = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        out.append(Example(ids[:cut], ids[cut:] + [tokenizer.eos_token_id]))
    assert len({len(e.prompt_ids) + len(e.completion_ids) for e in out}) == n
    return out


def unpack(packed: torch.Tensor, batch: PackedBatch, width: int) -> torch.Tensor:
    """(1, N-1) per-position values of a packed batch laid out as the padded (R, width) ones (slow reference)."""
    out = packed.new_zeros(len(batch), width)
    starts = batch.cu_seqlens.tolist()
    for r in range(len(batch)):
        n = starts[r + 1] - starts[r] - 1  # positions of row r that predict a token of row r
        out[r, :n] = packed[0, starts[r]:starts[r] + n]
    return out


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(padded: dict, packed: dict) -> None:
    assert set(padded) == set(packed) and padded
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in padded.values())


# --------------------------------------------------------------------------- collation, by hand


def test_pack_examples_layout_by_hand():
    # rows: prompt [11, 12] + completion [13]; prompt [21] + completion [22, 23] with weights [0, 1]
    examples = [Example([11, 12], [13]), Example([21], [22, 23], [0, 1])]
    batch = pack_examples(examples)
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 23]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 3, 6]
    # position t predicts token t+1: 11->12 (prompt, 0), 12->13 (1), 13->21 (next row: 0), 21->22 (weight 0), 22->23 (1)
    assert batch.loss_mask.tolist() == [[0, 1, 0, 0, 1]]
    assert batch.row_of_token.tolist() == [0, 0, 0, 1, 1]
    assert batch.attention_mask is None and len(batch) == 2
    # completion_only=False trains on every token of the row, but still never across the boundary
    assert pack_examples(examples, completion_only=False).loss_mask.tolist() == [[1, 1, 0, 1, 1]]
    padded = collate_examples(examples, pad_id=0)
    assert padded.loss_mask.sum() == batch.loss_mask.sum()  # SFT's token-weighted accumulation sees the same count
    assert isinstance(collate_examples(examples, 0, padding_free=True), PackedBatch)
    assert isinstance(padded, TokenBatch) and padded.position_ids is None


def test_packed_preferences_put_chosen_rows_then_rejected_rows():
    pairs = [PreferenceExample(Example([1], [2, 3]), Example([1], [4])),
             PreferenceExample(Example([5, 6], [7]), Example([5, 6], [8, 9, 10]), margin=0.5)]
    batch = collate_preferences(pairs, [4, 9], pad_id=0, padding_free=True)
    assert batch.tokens.input_ids.tolist() == [[1, 2, 3, 5, 6, 7, 1, 4, 5, 6, 8, 9, 10]]
    assert batch.tokens.cu_seqlens.tolist() == [0, 3, 6, 8, 13]
    assert batch.index.tolist() == [4, 9] and batch.margin.tolist() == [0.0, 0.5] and len(batch) == 2
    values = torch.arange(13.0)[None]
    assert batch.tokens.at_last_token(values).tolist() == [2.0, 5.0, 7.0, 12.0]


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_packed_sequence_logps_equals_a_loop_over_rows(normalization):
    torch.manual_seed(0)
    logps = torch.randn(1, 11, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1]]).float()
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])  # row 2 has no response token: 0, not NaN
    got = packed_sequence_logps(logps, mask, rows, 4, normalization)
    expected = []
    for r in range(4):
        sel = rows == r
        total = (logps[0, sel] * mask[0, sel]).sum()
        expected.append(total / mask[0, sel].sum().clamp_min(1) if normalization == "mean" else total)
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected)
    assert got[2] == 0
    (g_got,) = torch.autograd.grad(got.sum(), logps)
    (g_exp,) = torch.autograd.grad(expected.sum(), logps)
    torch.testing.assert_close(g_got, g_exp)


# ------------------------------------------------------------- packed forward == padded forward


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_log_probs_and_sft_loss_equal_the_padded_ones(model_families, family):
    path = str(model_families[family])
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    examples = unequal_examples(tokenizer)
    padded = collate_examples(examples, tokenizer.pad_token_id)
    packed = collate_examples(examples, tokenizer.pad_token_id, padding_free=True)
    assert packed.input_ids.shape[1] == int(padded.attention_mask.sum()) < padded.input_ids.numel()

    loss_padded, stats_padded = sft.sft_loss(model, padded)
    loss_padded.backward()
    g_padded = grads(model)
    loss_packed, stats_packed = sft.sft_loss(model, packed)
    loss_packed.backward()
    g_packed = grads(model)
    assert float(stats_packed["num_tokens"]) == float(stats_padded["num_tokens"])
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert_same_grads(g_padded, g_packed)

    # every per-token log-prob of every row, not only the response ones
    with torch.no_grad():
        lp_padded = token_logps(model, padded.input_ids, padded.attention_mask)
        lp_packed = token_logps(model, packed.input_ids, None, position_ids=packed.position_ids)
    real = padded.attention_mask[:, 1:].bool()
    torch.testing.assert_close(unpack(lp_packed, packed, lp_padded.shape[1])[real], lp_padded[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.sequence_logps(lp_packed), padded.sequence_logps(lp_padded), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_tied", "llama3"])
def test_attention_stays_within_each_packed_row(model_families, family):
    path = str(model_families[family])
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, trainable=False)
    examples = unequal_examples(tokenizer, n=3)
    altered = list(examples)
    # row 1 gets other tokens (same length): rows 0 and 2 must not notice
    altered[1] = Example([(t + 7) % len(tokenizer) for t in examples[1].prompt_ids], examples[1].completion_ids[::-1])
    before, after = pack_examples(examples), pack_examples(altered)
    assert not torch.equal(before.input_ids, after.input_ids)
    with torch.no_grad():
        lp_before = token_logps(model, before.input_ids, None, position_ids=before.position_ids)
        lp_after = token_logps(model, after.input_ids, None, position_ids=after.position_ids)
        third = examples[2].prompt_ids + examples[2].completion_ids
        alone = token_logps(model, torch.tensor([third]), torch.ones(1, len(third), dtype=torch.long))
    # a row's last position scores the next row's first token (loss mask 0): only targets inside rows count
    within = torch.ones_like(before.row_of_token, dtype=torch.bool)
    within[before.cu_seqlens[1:-1] - 1] = False
    other = within & (before.row_of_token != 1)
    assert not torch.allclose(lp_before[0, before.row_of_token == 1], lp_after[0, before.row_of_token == 1], atol=1e-3)
    torch.testing.assert_close(lp_after[0, other], lp_before[0, other], rtol=0, atol=1e-6)
    # and the last row scores exactly as it does alone (its positions restart at 0)
    start = int(before.cu_seqlens[2])
    torch.testing.assert_close(lp_before[0, start:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_tied", "llama3"])
def test_packed_reward_scores_equal_the_padded_ones(model_families, family):
    path = str(model_families[family])
    tokenizer = load_tokenizer(path)
    model = load_scalar_model(path, "model_name_or_path")
    rm.use_distinct_pad(model, tokenizer)
    with torch.no_grad():  # a random head, so the scores (and the trunk's gradients) are not all 0
        model.score.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    examples = unequal_examples(tokenizer, n=6)
    pairs = [PreferenceExample(examples[i], examples[i + 3], margin=0.25 * i) for i in range(3)]
    cfg = load_config("rm", None, {"dataset_name": "unused.jsonl", "center_rewards_coefficient": "0.1"})
    results = {}
    for padding_free in (False, True):
        batch = collate_preferences(pairs, [0, 1, 2], tokenizer.pad_token_id, padding_free)
        with torch.no_grad():
            scores = rm.pair_scores(model, batch)
        loss, stats = rm.rm_step(cfg, model, batch)
        loss.backward()
        results[padding_free] = (torch.cat(scores), loss.detach(), stats, grads(model))
    (s0, l0, st0, g0), (s1, l1, st1, g1) = results[False], results[True]
    assert float(s0.abs().min()) > 1e-3  # real, distinct scores
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st1["rewards/margins"], st0["rewards/margins"], rtol=1e-5, atol=1e-5)
    assert_same_grads(g0, g1)


@pytest.mark.parametrize("family", ["qwen2_tied", "llama3"])
@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_packed_dpo_loss_equals_the_padded_one(model_families, family, normalization):
    path = str(model_families[family])
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path)
    ref = load_causal_lm(path, trainable=False)
    with torch.no_grad():  # a reference that differs from the policy, so every term is non-trivial
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    examples = unequal_examples(tokenizer, n=6, seed=3)
    pairs = [PreferenceExample(examples[i], examples[5 - i]) for i in range(3)]
    cfg = load_config("dpo", None, {"dataset_name": "unused.jsonl", "rpo_alpha": "0.5",
                                    "logps_normalization": normalization})
    results = {}
    for padding_free in (False, True):
        batch = collate_preferences(pairs, [0, 1, 2], tokenizer.pad_token_id, padding_free)
        loss, stats = dpo.dpo_step(cfg, policy, ref, batch, None)
        loss.backward()
        results[padding_free] = (loss.detach(), stats, grads(policy))
    (l0, st0, g0), (l1, st1, g1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for key in ("nll_loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(st1[key], st0[key], rtol=1e-5, atol=1e-5, msg=key)
    assert abs(float(st0["rewards/margins"])) > 1e-4
    assert_same_grads(g0, g1)


# ------------------------------------------------------------------- absolute positions, ALiBi


def _save_with_tokenizer(model, tokenizer, out: Path) -> str:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_gpt2_absolute_positions_pack_correctly(tmp_path, tiny_qwen):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = load_causal_lm(_save_with_tokenizer(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2"))
    check_padding_free(model)  # accepted: the wpe embedding reads the restarted positions
    assert model.training  # and the check leaves the train mode as it was
    disable_dropout(model)  # GPT-2 ships with dropout on: the two forwards would draw different masks
    examples = unequal_examples(tokenizer)
    padded = collate_examples(examples, tokenizer.pad_token_id)
    packed = pack_examples(examples)
    loss_padded, _ = sft.sft_loss(model, padded)
    loss_packed, _ = sft.sft_loss(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)


@pytest.fixture
def tiny_bloom(tmp_path, tiny_qwen) -> str:
    """A random tiny Bloom: ALiBi positions from the attention mask, no position_ids."""
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save_with_tokenizer(BloomForCausalLM(config), tokenizer, tmp_path / "bloom")


def test_a_family_that_cannot_pack_is_refused(tiny_bloom):
    model = load_causal_lm(tiny_bloom)
    with pytest.raises(UserError, match="padding_free: BloomForCausalLM .*packed rows see each other"):
        check_padding_free(model)


def test_cli_refuses_padding_free_for_bloom_in_one_line(tmp_path, tiny_bloom, cli):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+2=", "completion": "3"}] * 4)
    proc = cli("sft", "--model_name_or_path", tiny_bloom, "--dataset_name", data, "--output_dir", tmp_path / "out",
               "--padding_free", "--progress", "false", "--max_steps", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("posttrain: error: padding_free: BloomForCausalLM") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- whole runs: same final weights


def varied_sft_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{rng.randrange(10 ** rng.randrange(1, 6))}+{rng.randrange(10 ** rng.randrange(1, 6))}=",
             "completion": str(rng.randrange(10 ** rng.randrange(1, 9)))} for _ in range(n)]


def test_padding_free_sft_cli_run_ends_at_the_padded_runs_weights(tmp_path, tiny_qwen, cli):
    data = write_jsonl(tmp_path / "sft.jsonl", varied_sft_rows())
    common = ["--model_name_or_path", tiny_qwen, "--dataset_name", data, "--max_steps", "3",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
              "--logging_steps", "1", "--progress", "false", "--seed", "0"]
    for name, extra in (("padded", []), ("packed", ["--padding_free"])):
        proc = cli("sft", *common, "--output_dir", tmp_path / name, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    padded, packed = read_metrics(tmp_path / "padded" / "metrics.jsonl"), read_metrics(tmp_path / "packed" / "metrics.jsonl")
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w_padded = load_file(str(tmp_path / "padded" / "model.safetensors"))
    w_packed = load_file(str(tmp_path / "packed" / "model.safetensors"))
    initial = load_file(str(Path(tiny_qwen) / "model.safetensors"))
    assert set(w_packed) == set(w_padded)
    for name in w_padded:
        torch.testing.assert_close(w_packed[name], w_padded[name], rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(w_padded[n], initial[n]) for n in w_padded)


def test_padding_free_dpo_run_ends_at_the_padded_runs_weights(tmp_path, tiny_qwen, arith_data):
    lines = arith_data["preference"].read_text().splitlines()[:16]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    weights = {}
    for padding_free in ("false", "true"):
        out = tmp_path / f"dpo_{padding_free}"
        cfg = load_config("dpo", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(data),
                                        "output_dir": str(out), "num_threads": "1", "progress": "false", "seed": "0",
                                        "per_device_train_batch_size": "4", "gradient_accumulation_steps": "2",
                                        "max_steps": "2", "logging_steps": "1", "learning_rate": "1e-3",
                                        "padding_free": padding_free})
        dpo.main(cfg)
        weights[padding_free] = load_file(str(out / "model.safetensors"))
        weights[padding_free + "_metrics"] = read_metrics(out / "metrics.jsonl")
    for a, b in zip(weights["false_metrics"], weights["true_metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    initial = load_file(str(Path(tiny_qwen) / "model.safetensors"))
    for name in weights["false"]:
        torch.testing.assert_close(weights["true"][name], weights["false"][name], rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(weights["false"][n], initial[n]) for n in initial)


def test_padding_free_rm_run_ends_at_the_padded_runs_weights_and_accuracy(tmp_path, tiny_qwen, arith_data):
    lines = arith_data["preference"].read_text().splitlines()[:20]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    runs = {}
    for padding_free in ("false", "true"):
        out = tmp_path / f"rm_{padding_free}"
        rm.main(load_config("rm", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(data),
                                         "output_dir": str(out), "num_threads": "1", "progress": "false", "seed": "0",
                                         "per_device_train_batch_size": "4", "max_steps": "2", "logging_steps": "1",
                                         "learning_rate": "1e-3", "eval_split": "0.2", "padding_free": padding_free}))
        runs[padding_free] = (load_file(str(out / "model.safetensors")),
                              json.loads((out / "summary.json").read_text())["report"]["pair_accuracy"])
    (w_padded, acc_padded), (w_packed, acc_packed) = runs["false"], runs["true"]
    assert acc_packed == acc_padded
    assert float(w_padded["score.weight"].abs().max()) > 0  # the head (zero at the start) was trained
    # (Adam moves a weight by about the learning rate whatever its gradient's size, so the trunk's first, tiny
    # gradients, taken through a head still of size 1e-3, leave float-rounding differences near 1e-6 here)
    for name in w_padded:
        torch.testing.assert_close(w_packed[name], w_padded[name], rtol=0, atol=1e-5, msg=name)


def test_padding_free_is_a_field_of_sft_rm_dpo_only():
    for stage in ("sft", "rm", "dpo"):
        assert load_config(stage, None, {"dataset_name": "x.jsonl"}).padding_free is False
        assert load_config(stage, None, {"dataset_name": "x.jsonl", "padding_free": "true"}).padding_free is True
    for stage in ("ppo", "grpo"):
        with pytest.raises(UserError, match="unknown field"):
            load_config(stage, None, {"dataset_name": "x.jsonl", "padding_free": "true"})


def test_check_leaves_an_honest_model_unchanged(tiny_qwen):
    model = load_causal_lm(str(tiny_qwen))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    check_padding_free(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
