"""Tests of the reward-model recipe (posttrain.recipes.rm), starting from the random tiny Qwen2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from reward_helpers import read_jsonl, run_interrupted, run_recipe, thirds

from posttrain.config import load_config
from posttrain.data import collate_preferences, preference_examples, read_rows
from posttrain.errors import UserError
from posttrain.models import load_scalar_model, load_tokenizer, sequence_scores
from posttrain.recipes.rm import rm_step


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pref_split(tmp_path_factory, arith_data):
    """64 training pairs (few enough to fit in 160 steps) and 64 held-out pairs of the arith task."""
    rows = read_jsonl(arith_data["preference"])
    out = tmp_path_factory.mktemp("rm_data")
    return write_jsonl(out / "train.jsonl", rows[:64]), write_jsonl(out / "eval.jsonl", rows[64:128])


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, tiny_qwen, pref_split):
    train, held_out = pref_split
    out = tmp_path_factory.mktemp("rm_run")
    records, summary = run_recipe("rm", out, model_name_or_path=tiny_qwen, dataset_name=train,
                                  eval_dataset_name=held_out, per_device_train_batch_size=16, learning_rate=3e-3,
                                  lr_scheduler_type="constant", max_steps=160, logging_steps=10)
    return out, records, summary


def encode_pair_texts(tokenizer, row) -> list[list[int]]:
    """Token ids of prompt + response + EOS for the chosen and the rejected response, as the data module builds them."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    return [prompt + tokenizer(row[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for k in ("chosen", "rejected")]


@pytest.mark.slow
def test_rm_accuracy_rises(rm_run):
    _, records, _ = rm_run
    assert [r["step"] for r in records] == list(range(10, 161, 10))
    accuracy, loss = [r["accuracy"] for r in records], [r["loss"] for r in records]
    first, last = thirds(accuracy)
    assert last >= 0.85 and last > first + 0.1, f"accuracy did not rise: {accuracy}"
    first_loss, last_loss = thirds(loss)
    assert last_loss < 0.5 * first_loss, f"loss did not fall: {loss}"
    assert loss[0] == pytest.approx(math.log(2), abs=0.05)  # the head starts at 0: every pair ties at first
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "eval/pair_accuracy"):
        assert all(key in r for r in records), key
    margins = [r["rewards/margins"] for r in records]
    assert thirds(margins)[1] > thirds(margins)[0]


@pytest.mark.slow
def test_rm_reports_pair_accuracy(rm_run, pref_split):
    """summary.json's report.pair_accuracy equals the held-out accuracy of the saved model, recomputed by HF."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, records, summary = rm_run
    report = summary["report"]
    assert report["eval_pairs"] == 64
    assert isinstance(report["pair_accuracy"], float) and 0.0 <= report["pair_accuracy"] <= 1.0
    assert records[-1]["eval/pair_accuracy"] == pytest.approx(report["pair_accuracy"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    correct = 0
    with torch.no_grad():
        for row in read_jsonl(pref_split[1]):
            chosen, rejected = (model(torch.tensor([ids])).logits[0, 0] for ids in encode_pair_texts(tokenizer, row))
            correct += int(chosen > rejected)
    assert report["pair_accuracy"] == pytest.approx(correct / 64)
    assert report["pair_accuracy"] > 0.55, "the reward model does not generalise at all to held-out pairs"


@pytest.mark.slow
def test_rm_saved_model_scores_like_sequence_scores(rm_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _, _ = rm_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        ids = tokenizer("57+68=125<|im_end|>", return_tensors="pt", add_special_tokens=False)
        logits = model(**ids).logits
        assert logits.shape == (1, 1)
        ours = sequence_scores(model, ids["input_ids"], ids["attention_mask"])
        torch.testing.assert_close(ours, logits[:, 0])
        assert logits.abs().item() > 0  # the head was trained away from 0

        # a right-padded batch of two lengths: HF pools at the last non-pad token, and so do we
        batch = tokenizer(["57+68=125<|im_end|>", "9+9=18<|im_end|>"], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        assert (batch["attention_mask"] == 0).any()
        torch.testing.assert_close(sequence_scores(model, batch["input_ids"], batch["attention_mask"]),
                                   model(**batch).logits[:, 0])
        assert not torch.allclose(model(**batch).logits[0], model(**batch).logits[1])
    # load_scalar_model keeps a trained head (it only zeroes the head of a causal-LM checkpoint)
    reloaded = load_scalar_model(str(out), "model_name_or_path", trainable=False)
    torch.testing.assert_close(reloaded.score.weight.cpu(), model.score.weight)


# ------------------------------------------------------------------ margin and centring


def _pairs_batch(tiny_qwen, tmp_path, margins, device):
    rows = [{"prompt": "12+34=", "chosen": "46", "rejected": "45"},
            {"prompt": "55+66=", "chosen": "121", "rejected": "111"},
            {"prompt": "70+81=", "chosen": "151", "rejected": "141"}]
    for row, margin in zip(rows, margins):
        if margin is not None:
            row["margin"] = margin
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer = load_tokenizer(str(tiny_qwen))
    examples = preference_examples(read_rows(path), tokenizer, 64, 32)
    return collate_preferences(examples, list(range(len(examples))), tokenizer.pad_token_id).to(device)


@pytest.fixture
def scored_model(tiny_qwen):
    """The tiny trunk with a random (non-zero) scalar head, so chosen and rejected scores differ."""
    model = load_scalar_model(str(tiny_qwen), "model_name_or_path")
    torch.manual_seed(0)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return model


def _rm_cfg(tmp_path, **fields):
    overrides = {"dataset_name": "unused.jsonl", "output_dir": str(tmp_path / "out")}
    overrides.update({k: str(v) for k, v in fields.items()})
    return load_config("rm", None, overrides)


def test_rm_step_uses_margin(tmp_path, tiny_qwen, scored_model):
    margins = [1.0, 0.5, 2.0]
    with_margin = _pairs_batch(tiny_qwen, tmp_path, margins, scored_model.device)
    without = _pairs_batch(tiny_qwen, tmp_path, [None, None, None], scored_model.device)
    assert with_margin.margin.tolist() == margins
    assert without.margin.tolist() == [0.0, 0.0, 0.0]
    cfg = _rm_cfg(tmp_path)
    loss_m, _ = rm_step(cfg, scored_model, with_margin)
    loss_0, stats = rm_step(cfg, scored_model, without)
    chosen = sequence_scores(scored_model, without.tokens.input_ids[:3], without.tokens.attention_mask[:3])
    rejected = sequence_scores(scored_model, without.tokens.input_ids[3:], without.tokens.attention_mask[3:])
    assert not torch.allclose(chosen, rejected)
    # Llama 2: -log sigma(r_w - r_l - m)
    torch.testing.assert_close(loss_0, -F.logsigmoid(chosen - rejected).mean())
    margin = torch.tensor(margins, device=chosen.device)
    torch.testing.assert_close(loss_m, -F.logsigmoid(chosen - rejected - margin).mean())
    assert loss_m > loss_0  # a positive margin asks for more: the loss is higher
    torch.testing.assert_close(stats["rewards/margins"], (chosen - rejected).mean().detach())
    torch.testing.assert_close(stats["accuracy"], (chosen > rejected).float().mean())


def test_rm_step_center_rewards_coefficient(tmp_path, tiny_qwen, scored_model):
    batch = _pairs_batch(tiny_qwen, tmp_path, [None, None, None], scored_model.device)
    plain, _ = rm_step(_rm_cfg(tmp_path), scored_model, batch)
    centred, _ = rm_step(_rm_cfg(tmp_path, center_rewards_coefficient=0.25), scored_model, batch)
    scores = sequence_scores(scored_model, batch.tokens.input_ids, batch.tokens.attention_mask)
    chosen, rejected = scores[:3], scores[3:]
    assert (chosen + rejected).abs().sum() > 0
    # Eisenstein et al.: + c * mean((r_w + r_l)^2)
    torch.testing.assert_close(centred - plain, 0.25 * ((chosen + rejected) ** 2).mean())


def test_rm_run_margin_changes_loss(tmp_path, tiny_qwen, pref_split):
    """End to end: the head starts at 0, so the first loss is softplus(m): log 2 without margin, log(1+e) with m=1."""
    rows = read_jsonl(pref_split[0])[:32]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    margin = write_jsonl(tmp_path / "margin.jsonl", [{**r, "margin": 1.0} for r in rows])
    fields = dict(model_name_or_path=tiny_qwen, per_device_train_batch_size=8, learning_rate=3e-3, max_steps=2,
                  logging_steps=1, eval_split=0)
    records_plain, _ = run_recipe("rm", tmp_path / "plain", dataset_name=plain, **fields)
    records_margin, _ = run_recipe("rm", tmp_path / "margin", dataset_name=margin, **fields)
    assert records_plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records_margin[0]["loss"] == pytest.approx(math.log(1 + math.e), abs=1e-5)
    assert records_margin[1]["loss"] != pytest.approx(records_plain[1]["loss"], abs=1e-3)


def test_rm_run_center_rewards_coefficient_changes_loss(tmp_path, tiny_qwen, pref_split):
    fields = dict(model_name_or_path=tiny_qwen, dataset_name=pref_split[0], per_device_train_batch_size=16,
                  learning_rate=1e-2, max_steps=8, logging_steps=1, eval_split=0, lr_scheduler_type="constant")
    plain, _ = run_recipe("rm", tmp_path / "plain", **fields)
    centred, _ = run_recipe("rm", tmp_path / "centred", **fields, center_rewards_coefficient=1.0)
    # step 1: every score is 0, so the penalty is 0 too
    assert centred[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)
    assert any(c["loss"] != pytest.approx(p["loss"], abs=1e-4) for c, p in zip(centred[1:], plain[1:]))


def test_rm_margin_must_be_a_number(tmp_path, tiny_qwen):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                                                {"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": "big"}])
    with pytest.raises(UserError, match=r"bad\.jsonl:2.*margin"):
        preference_examples(read_rows(path), load_tokenizer(str(tiny_qwen)), 64, 32)


# ------------------------------------------------------------------ resume


def _rm_resume_fields(tiny_qwen, pref_split, **extra):
    return dict(model_name_or_path=tiny_qwen, dataset_name=pref_split[0], per_device_train_batch_size=8,
                learning_rate=3e-3, max_steps=6, save_steps=3, eval_split=0, **extra)


def test_rm_resume_reproduces_uninterrupted_run(tmp_path, tiny_qwen, pref_split):
    fields = _rm_resume_fields(tiny_qwen, pref_split, logging_steps=1)
    full, _ = run_recipe("rm", tmp_path / "full", **fields)
    run_interrupted("rm", tmp_path / "interrupted", **fields)
    resumed, _ = run_recipe("rm", tmp_path / "interrupted", **fields, resume_from_checkpoint="latest")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        for key in ("loss", "accuracy", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_rm_resume_inside_a_logging_window(tmp_path, tiny_qwen, pref_split):
    fields = _rm_resume_fields(tiny_qwen, pref_split, logging_steps=2)  # checkpoint-3 is mid-window (steps 3-4)
    full, _ = run_recipe("rm", tmp_path / "full", **fields)
    run_interrupted("rm", tmp_path / "interrupted", **fields)
    resumed, _ = run_recipe("rm", tmp_path / "interrupted", **fields, resume_from_checkpoint="latest")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [2, 4, 6]
    for a, b in zip(full, resumed):
        for key in ("loss", "accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


# ------------------------------------------------------------------ the saved model in transformers


def without_pad_token(source, target, unk_is_eos: bool = False):
    """A copy of a model folder whose tokenizer and config name no pad token.

    With ``unk_is_eos`` the tokenizer's unk (and bos) is its EOS, as in GPT-2,
    so no distinct existing special token can serve as pad.
    """
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    if unk_is_eos:
        tokenizer.unk_token = tokenizer.bos_token = tokenizer.eos_token
    tokenizer.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config.pop("pad_token_id", None)
    (target / "config.json").write_text(json.dumps(config))
    return target


ROWS_OF_THREE_LENGTHS = ["57+68=125<|im_end|>", "9+9=18<|im_end|>",
                         "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"]


@pytest.mark.parametrize("pad, expected_pad", [("own", "<|endoftext|>"), ("none", "<|endoftext|>"),  # its unk
                                               ("none_unk_is_eos", "<|pad|>")])  # added by the recipe
def test_rm_saved_model_pools_where_training_read(tmp_path, tiny_qwen, pref_split, pad, expected_pad):
    """transformers' own forward of the saved reward model equals posttrain's sequence_scores on right- and
    left-padded batches, whether the tokenizer had a pad token, had none, or had none and no spare special token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    start = tiny_qwen if pad == "own" else without_pad_token(tiny_qwen, tmp_path / "start", pad == "none_unk_is_eos")
    out = tmp_path / "rm"
    run_recipe("rm", out, model_name_or_path=start, dataset_name=pref_split[0], per_device_train_batch_size=8,
               learning_rate=3e-2, max_steps=2, logging_steps=1, eval_split=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert tokenizer.pad_token == expected_pad and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    for side in ("right", "left"):
        batch = tokenizer(ROWS_OF_THREE_LENGTHS, return_tensors="pt", padding=True, padding_side=side,
                          add_special_tokens=False)
        assert (batch["attention_mask"] == 0).any()
        with torch.no_grad():
            ours = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
            theirs = model(**batch).logits[:, 0]
        assert ours.abs().min() > 0  # the head was trained away from 0
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
