"""The shared epoch loop: step counts that use every micro-batch, and RNG hygiene of evaluation."""

from __future__ import annotations

import pytest
import torch

from posttrain import checkpoint
from posttrain.config import load_config
from posttrain.training import fit, total_steps


class _Rows:
    def __init__(self, index):
        self.index = index

    def to(self, device):
        return self

    def __len__(self):
        return len(self.index)


def test_total_steps_round_up_per_epoch_as_the_hf_trainer(tmp_path):
    cfg = load_config("sft", None, {"dataset_name": "x.jsonl", "gradient_accumulation_steps": "4",
                                    "num_train_epochs": "3"})
    # 10 micro-batches, accumulation 4: steps of 4, 4, 2 in each epoch -> 3 per epoch, 9 in all (not ceil(30/4) = 8)
    assert total_steps(cfg, 10) == 9
    cfg.num_train_epochs = 1.5
    assert total_steps(cfg, 10) == 5  # ceil(1.5 x 3)


def test_fit_uses_every_micro_batch_of_every_epoch(tmp_path):
    cfg = load_config("sft", None, {"dataset_name": "x.jsonl", "output_dir": str(tmp_path), "progress": "false",
                                    "gradient_accumulation_steps": "4", "num_train_epochs": "3",
                                    "per_device_train_batch_size": "4", "logging_steps": "1"})
    model = torch.nn.Linear(2, 1)
    seen = []

    def make_batch(indices):
        return _Rows(indices)

    def loss_fn(batch):
        seen.append(list(batch.index))
        return model(torch.ones(len(batch), 2)).pow(2).mean(), {}

    record = fit(cfg, model, [5] * 40, make_batch, loss_fn)  # 40 rows, batch 4: 10 micro-batches per epoch
    assert len(seen) == 30, "every micro-batch of the 3 epochs is trained on"
    assert sorted(i for batch in seen for i in batch) == sorted(list(range(40)) * 3)
    assert record["epoch"] == pytest.approx(3.0)


def test_evaluation_restores_the_rng_it_reseeds(tiny_qwen, arith_data):
    from posttrain.data import prompt_examples, read_rows
    from posttrain.evaluation import evaluate
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.rewards import RewardSource, RewardSources, resolve_reward_func

    tokenizer, model = load_tokenizer(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    examples = prompt_examples(read_rows(str(arith_data["eval"]))[:4], tokenizer, 64)
    rewards = RewardSources([RewardSource("exact_match", 1.0, func=resolve_reward_func("exact_match"))], 0)
    torch.manual_seed(7)
    before = checkpoint.rng_state()
    evaluate(model, tokenizer, examples, rewards, max_new_tokens=3, seed=123)
    assert checkpoint.rng_state() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_rng_covers_every_cuda_device():
    state = checkpoint.rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(3, device="cuda")
    checkpoint.set_rng_state(state)
    torch.testing.assert_close(torch.rand(3, device="cuda"), expected, rtol=0, atol=0)


def test_rl_epoch_sees_every_prompt_once():
    """10 prompts, global batch 4: ceil(10/4) = 3 rollouts are one epoch and show each prompt once (the last
    batch is completed from the next epoch's order); two epochs (5 rollouts) show each prompt twice."""
    from collections import Counter

    from posttrain.training import PromptStream

    stream = PromptStream(10, 4, seed=0)
    taken = [stream.next() for _ in range(5)]
    assert all(len(batch) == 4 for batch in taken)
    flat = [i for batch in taken for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert Counter(flat) == dict.fromkeys(range(10), 2)
    assert PromptStream(10, 4, 0).next() == taken[0] and flat[:10] != flat[10:20]  # seeded; a new order each epoch
    # the epoch ends inside the third batch; a stream rebuilt from a saved state continues identically
    ends = []
    replay = PromptStream(10, 4, seed=0)
    for _ in range(5):
        replay.next()
        ends.append(replay.epoch_done())
    assert ends == [False, False, True, False, True]
    resumed = PromptStream(10, 4, seed=0)
    for _ in range(2):
        resumed.next()
    resumed = PromptStream(10, 4, 0, **{"epoch": resumed.state()["epoch"], "offset": resumed.state()["prompt_offset"]})
    assert [resumed.next() for _ in range(3)] == taken[2:]
