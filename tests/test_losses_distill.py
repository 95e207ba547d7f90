"""Generalised JSD of GKD / on-policy distillation (losses.generalized_jsd_loss): hand values and TRL's formula."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import generalized_jsd, generalized_jsd_loss

# one position, vocabulary of 2: teacher P = (1/2, 1/2), student Q = (1/4, 3/4)
TEACHER = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)
STUDENT = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)


def test_beta_0_is_the_forward_kl_by_hand():
    # KL(P || Q) = 1/2·ln((1/2)/(1/4)) + 1/2·ln((1/2)/(3/4)) = 1/2·ln(4/3)
    assert float(generalized_jsd_loss(STUDENT, TEACHER, beta=0.0)) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)


def test_beta_1_is_the_reverse_kl_by_hand():
    # KL(Q || P) = 1/4·ln((1/4)/(1/2)) + 3/4·ln((3/4)/(1/2)) = 1/4·ln(1/2) + 3/4·ln(3/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(generalized_jsd_loss(STUDENT, TEACHER, beta=1.0)) == pytest.approx(expected, abs=1e-12)
    # per token, the reverse KL is Σ q (log q - log p) of the student's own distribution
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), (log_q.exp() * (log_q - log_p)).sum(-1))


def test_beta_half_is_the_jensen_shannon_divergence_by_hand():
    # M = 1/2·P + 1/2·Q = (3/8, 5/8)
    kl_p_m = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)  # = 1/2·ln(16/15)
    kl_q_m = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    expected = 0.5 * kl_p_m + 0.5 * kl_q_m  # ≈ 0.033822
    assert float(generalized_jsd_loss(STUDENT, TEACHER, beta=0.5)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.0338219, abs=1e-6)


def test_beta_between_weighs_the_mixture_by_beta():
    # β = 0.25: M = 1/4·P + 3/4·Q = (5/16, 11/16); JSD = 1/4·KL(P||M) + 3/4·KL(Q||M)
    m = (0.25 * 0.5 + 0.75 * 0.25, 0.25 * 0.5 + 0.75 * 0.75)
    kl_p_m = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_q_m = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    expected = 0.25 * kl_p_m + 0.75 * kl_q_m
    assert float(generalized_jsd_loss(STUDENT, TEACHER, beta=0.25)) == pytest.approx(expected, abs=1e-12)


def test_top_k_renormalises_both_over_the_teachers_top_k_by_hand():
    # teacher ∝ (4, 2, 1): its top 2 are tokens 0 and 1, P = (2/3, 1/3); student ∝ (1, 1, 2) restricted there: Q = (1/2, 1/2)
    teacher = torch.tensor([[math.log(4.0), math.log(2.0), 0.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 0.0, math.log(2.0)]], dtype=torch.float64)
    reverse = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))  # = 1/2·ln(9/8)
    assert float(generalized_jsd_loss(student, teacher, beta=1.0, top_k=2)) == pytest.approx(reverse, abs=1e-12)
    forward = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    assert float(generalized_jsd_loss(student, teacher, beta=0.0, top_k=2)) == pytest.approx(forward, abs=1e-12)
    # k = V is the full divergence; the student's gradient on the token outside the teacher's top k is 0
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5, top_k=3), generalized_jsd(student, teacher, 0.5))
    student.requires_grad_(True)
    generalized_jsd_loss(student, teacher, beta=0.5, top_k=2).backward()
    assert student.grad[0, 2] == 0 and student.grad[0, :2].abs().sum() > 0


def test_temperature_divides_both_logits():
    s, t = STUDENT * 2, TEACHER * 2
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.5, temperature=2.0), generalized_jsd_loss(STUDENT, TEACHER, beta=0.5))


def test_mask_leaves_out_prompt_and_padding_tokens():
    # position 0 is the hand case; position 1 (masked) is far from the teacher and must not count
    student = torch.cat([STUDENT, torch.tensor([[[10.0, -10.0]]], dtype=torch.float64)], dim=1)
    teacher = torch.cat([TEACHER, torch.tensor([[[-10.0, 10.0]]], dtype=torch.float64)], dim=1)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert float(generalized_jsd_loss(student, teacher, mask, beta=0.0)) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    both = generalized_jsd_loss(student, teacher, torch.ones_like(mask), beta=0.0)
    assert float(both) == pytest.approx(float(generalized_jsd(student, teacher, 0.0).mean()))
    assert float(generalized_jsd_loss(student, teacher, torch.zeros_like(mask), beta=0.0)) == 0.0  # no token: 0, not nan


def test_gradient_flows_to_the_student_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, requires_grad=True), torch.randn(2, 3, 7, requires_grad=True)
    generalized_jsd_loss(student, teacher, torch.ones(2, 3), beta=0.5).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_gradient():
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):
        student = logits.clone().requires_grad_(True)
        loss = generalized_jsd_loss(student, logits, beta=beta)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-12 and float(student.grad.abs().max()) < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_equals_trls_gkd_loss_value_and_gradient(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    torch.manual_seed(1)
    student = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100  # prompt positions
    labels[2, 3:] = -100  # padding
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    ours = generalized_jsd_loss(student, teacher, (labels != -100).double(), beta=beta)
    (grad_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, theirs.to(ours.dtype))
    torch.testing.assert_close(grad_ours, grad_theirs)
