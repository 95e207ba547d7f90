"""Chunked LM-head log-probs (losses.chunked_head_logps, models.token_logps) against the plain path.

The plain path is the model's own (B, T, V) logits, ``/ T``, then logit_y - logsumexp: values must
agree to 1e-6 and gradients (hidden states, head weight, every model parameter) to 1e-5 in float32.
The values' bound is 1e-6 absolute plus 1e-6 relative: a matmul over a chunk of rows and a
logsumexp over a contiguous chunk may round differently from the same over the whole batch, by a
few float32 ulps (4.8e-7 each at |log p| = 4..8; a random model's log-probs are near -log V = -5.6).
Gradients agree to 1e-5 of their largest entry where that exceeds 1: a random model's entropy
gradient reaches 10^2 at the embedding rows of frequent tokens, which sum many such terms.
Under bf16 autocast both paths run the head in bf16, so they agree to bf16 precision only.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain import losses as L
from posttrain import models as M

VOCAB, HIDDEN = 37, 8
VALUES = {"atol": 1e-6, "rtol": 1e-6}


def assert_grad_close(got, want):
    """1e-5, relative to the gradient's largest entry where that exceeds 1."""
    assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)


def plain_logps(hidden, weight, bias, targets, temperature=1.0):
    """The full (..., V) logits, then logit_y - logsumexp and -Σ p log p (losses' plain-logits functions)."""
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    return L.selective_log_softmax(logits, targets), L.entropy_from_logits(logits)


def head_inputs(dtype=torch.float32, bias=True, shape=(3, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    # logits of a few units, as a trained head gives (log-probs down to about -10)
    hidden = torch.randn(*shape, HIDDEN, generator=gen, dtype=dtype).requires_grad_()
    weight = (0.7 * torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype)).requires_grad_()
    b = torch.randn(VOCAB, generator=gen, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, VOCAB, shape, generator=gen)
    upstream = torch.randn(*shape, generator=gen, dtype=dtype), torch.randn(*shape, generator=gen, dtype=dtype)
    return hidden, weight, b, targets, upstream


def grads(logps, entropy, upstream, params, entropy_grad):
    """d/dparams of Σ g1·logps (+ Σ g2·entropy when the entropy carries gradient)."""
    loss = (logps * upstream[0]).sum() + ((entropy * upstream[1]).sum() if entropy_grad else 0.0)
    return torch.autograd.grad(loss, [p for p in params if p is not None])


@pytest.mark.parametrize("chunk_tokens", [1, 4, 5, 21, 64, None])  # 21 tokens: 4 and 5 leave a short last chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_the_plain_path(chunk_tokens, temperature, bias):
    hidden, weight, b, targets, upstream = head_inputs(bias=bias)
    for entropy_grad in (False, True):
        logps, entropy = L.chunked_head_logps(hidden, weight, b, targets, temperature, chunk_tokens,
                                              return_entropy=True, entropy_grad=entropy_grad)
        ref_logps, ref_entropy = plain_logps(hidden, weight, b, targets, temperature)
        assert logps.dtype == torch.float32 and logps.shape == targets.shape
        assert_close(logps, ref_logps, **VALUES)
        assert_close(entropy, ref_entropy, **VALUES)
        assert entropy.requires_grad == entropy_grad
        params = (hidden, weight, b)
        for got, want in zip(grads(logps, entropy, upstream, params, entropy_grad),
                             grads(ref_logps, ref_entropy, upstream, params, entropy_grad)):
            assert_grad_close(got, want)


def test_logps_alone_without_entropy():
    hidden, weight, b, targets, upstream = head_inputs()
    logps = L.chunked_head_logps(hidden, weight, b, targets, 1.3, chunk_tokens=6)
    ref = plain_logps(hidden, weight, b, targets, 1.3)[0]
    assert_close(logps, ref, **VALUES)
    for got, want in zip(grads(logps, None, upstream, (hidden, weight, b), False),
                         grads(ref, None, upstream, (hidden, weight, b), False)):
        assert_grad_close(got, want)


def test_float64_gradcheck_with_entropy_gradient():
    """Finite differences in float64: the hand-written backward is the derivative of the forward."""
    hidden, weight, b, targets, _ = head_inputs(dtype=torch.float64, shape=(2, 3))

    def both(h, w, bias):
        return L.chunked_head_logps(h, w, bias, targets, 0.8, chunk_tokens=4, return_entropy=True, entropy_grad=True)

    assert torch.autograd.gradcheck(both, (hidden, weight, b))


def test_entropy_gradient_alone():
    """Only the entropy reaches the loss (its log-probs unused): the logps gradient is absent, not zero-filled."""
    hidden, weight, b, targets, upstream = head_inputs()
    entropy = L.chunked_head_logps(hidden, weight, b, targets, 0.9, 5, return_entropy=True, entropy_grad=True)[1]
    ref = plain_logps(hidden, weight, b, targets, 0.9)[1]
    got = torch.autograd.grad((entropy * upstream[1]).sum(), (hidden, weight, b))
    want = torch.autograd.grad((ref * upstream[1]).sum(), (hidden, weight, b))
    for g, w in zip(got, want):
        assert_grad_close(g, w)


def test_bf16_autocast_matches_the_plain_path_under_the_same_autocast():
    """Both paths run the head matmuls in bf16 (8-bit mantissa, relative step 2^-8 = 0.004) and the softmax in
    float32; they differ only in rounding order, so they agree within torch.testing's own bf16 tolerance
    (rtol 1.6e-2) scaled to the magnitude of each tensor. The backward is called outside the autocast block,
    as training loops do: the recomputation restores the forward's autocast state (without it the bf16
    logit gradient would meet the float32 weight in a matmul and fail)."""
    hidden, weight, b, targets, upstream = head_inputs(shape=(4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, entropy = L.chunked_head_logps(hidden, weight, b, targets, 1.0, 9, return_entropy=True,
                                              entropy_grad=True)
        ref_logps, ref_entropy = plain_logps(hidden, weight, b, targets)
    assert logps.dtype == torch.float32
    assert_close(logps, ref_logps, atol=1.6e-2 * ref_logps.abs().max().item(), rtol=0)
    assert_close(entropy, ref_entropy, atol=1.6e-2 * ref_entropy.abs().max().item(), rtol=0)
    got = grads(logps, entropy, upstream, (hidden, weight, b), True)
    want = grads(ref_logps, ref_entropy, upstream, (hidden, weight, b), True)
    for g, w, p in zip(got, want, (hidden, weight, b)):
        assert g.dtype == p.dtype
        assert_close(g, w, atol=1.6e-2 * w.abs().max().item(), rtol=0)
    # and bf16 really was used: float32 values differ from the autocast ones by more than float32 rounding
    fp32 = L.chunked_head_logps(hidden, weight, b, targets, 1.0, 9)
    assert (fp32 - logps).abs().max() > 1e-4


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor over the vocabulary (last dim V) any operation produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[-1] == VOCAB:
                self.numel = max(self.numel, value.numel())
        return out


def test_no_tensor_holds_more_than_one_chunk_of_logits():
    hidden, weight, b, targets, upstream = head_inputs(shape=(4, 25))
    with LargestTensor() as chunked:
        logps, entropy = L.chunked_head_logps(hidden, weight, b, targets, 0.7, 10, return_entropy=True,
                                              entropy_grad=True)
        grads(logps, entropy, upstream, (hidden, weight, b), True)
    with LargestTensor() as plain:
        grads(*plain_logps(hidden, weight, b, targets, 0.7), upstream, (hidden, weight, b), True)
    assert plain.numel == 100 * VOCAB  # all 4 x 25 positions at once
    assert chunked.numel == 10 * VOCAB  # one chunk of 10


def test_default_chunk_is_bounded_by_logits_not_tokens():
    assert L.head_chunk_tokens(151_936) * 151_936 <= L.HEAD_CHUNK_LOGITS
    assert L.head_chunk_tokens(151_936) >= 128
    assert L.head_chunk_tokens(10**9) == 1


# ------------------------------------------------------------------ through models.token_logps


def gpt2_model(vocab=50, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64))


def plain_token_logps(model, ids, mask, **kw):
    args = dict(logits_to_keep=0, return_entropy=False, return_hidden=False, entropy_grad=False, temperature=1.0)
    args.update(kw)
    targets = ids[:, 1:] if not args["logits_to_keep"] else ids[:, -args["logits_to_keep"]:]
    return M._logps_from_logits(model, ids, mask, M.position_ids_from_mask(mask), targets, **args)


def batch(vocab, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return ids, mask


def load_family(model_families, name):
    model = M.load_causal_lm(str(model_families[name]))
    return M.disable_dropout(model)


def check_equal_to_plain(model, ids, mask, **kw):
    """token_logps (chunked) and the model's own logits give the same values and parameter gradients."""
    assert M.chunkable_head(model) is not None
    params = [p for p in model.parameters() if p.requires_grad]
    outs = {}
    for name, fn in (("chunked", M.token_logps), ("plain", plain_token_logps)):
        out = fn(model, ids, mask, **kw)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out if o.requires_grad)
        outs[name] = ([o.detach() for o in out], torch.autograd.grad(loss, params, allow_unused=True))
    (values, grads_chunked), (ref_values, grads_plain) = outs["chunked"], outs["plain"]
    for got, want in zip(values, ref_values):
        assert_close(got, want, **VALUES)
    for p, got, want in zip(params, grads_chunked, grads_plain):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_grad_close(got, want)
    return values


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied", "llama3", "mistral"])
def test_token_logps_equal_the_plain_path_on_model_families(model_families, name):
    model = load_family(model_families, name)
    ids, mask = batch(model.config.vocab_size)
    assert model.config.tie_word_embeddings == (name == "qwen2_tied")
    values = check_equal_to_plain(model, ids, mask)
    assert values[0].shape == (3, 10)
    # RL: last 4 positions, temperature, entropy with its gradient and the trunk's hidden states for a value head
    values = check_equal_to_plain(model, ids, mask, logits_to_keep=4, temperature=0.7, return_entropy=True,
                                  entropy_grad=True, return_hidden=True)
    assert [tuple(v.shape) for v in values] == [(3, 4), (3, 4), (3, 11, 32)]
    check_equal_to_plain(model, ids, mask, logits_to_keep=4, temperature=1.5, return_entropy=True)


def test_token_logps_on_gpt2_and_without_gradients():
    model = M.disable_dropout(gpt2_model())
    ids, mask = batch(50)
    check_equal_to_plain(model, ids, mask, temperature=0.9, return_entropy=True, entropy_grad=True)
    with torch.no_grad():
        logps, entropy = M.token_logps(model, ids, mask, 5, return_entropy=True, entropy_grad=True)
    assert not logps.requires_grad and not entropy.requires_grad
    assert_close(logps, plain_token_logps(model, ids, mask, logits_to_keep=5).detach(), **VALUES)


def test_lora_on_the_trunk_keeps_the_chunked_head_and_its_gradients(model_families):
    model = M.apply_lora(load_family(model_families, "qwen2_untied"), r=2, alpha=4, target_modules="q_proj,v_proj")
    for p in model.parameters():  # nonzero B so that the adapters shape the log-probs
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask = batch(model.config.vocab_size)
    check_equal_to_plain(model, ids, mask, logits_to_keep=6, return_entropy=True, entropy_grad=True)


def test_lora_on_the_head_falls_back_to_the_model_logits(model_families):
    model = M.apply_lora(load_family(model_families, "llama3"), r=2, alpha=4, target_modules="lm_head,q_proj")
    assert M.chunkable_head(model) is None
    ids, mask = batch(model.config.vocab_size)
    assert_close(M.token_logps(model, ids, mask), plain_token_logps(model, ids, mask), atol=0, rtol=0)


def test_soft_capped_logits_fall_back_to_the_model_logits():
    """Gemma-2 applies tanh soft-capping after its head: only the model's own logits are right."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=0.5))
    assert M.chunkable_head(model) is None
    ids, mask = batch(40)
    logps = M.token_logps(model, ids, mask, temperature=0.8)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=M.position_ids_from_mask(mask)).logits[:, :-1]
    assert logits.abs().max() <= 0.5  # capped
    assert_close(logps, (logits / 0.8).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunked", [True, False])
def test_score_mask_scores_only_the_masked_positions(tiny_qwen, chunked, monkeypatch):
    """With score_mask the masked positions equal the unmasked call (values and gradients); the rest are 0."""
    from posttrain import models

    model = models.load_causal_lm(str(tiny_qwen))
    if not chunked:
        monkeypatch.setattr(models, "chunkable_head", lambda model: None)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    mask = torch.zeros(3, 8, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 5:7] = 1
    mask[2, -1] = 1
    full = models.token_logps(model, ids, attn)
    (full * mask).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    part = models.token_logps(model, ids, attn, score_mask=mask)
    part.sum().backward()
    assert torch.equal(part[mask == 0], torch.zeros(int((mask == 0).sum())))
    torch.testing.assert_close(part[mask == 1], full.detach()[mask == 1], atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], atol=1e-5, rtol=1e-4, msg=name)
