"""DPO's further loss types, CPO / SimPO and ORPO: each against its formula (TRL 1.16's) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import losses as L


def t(*values):
    return torch.tensor(values)


def assert_close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# pc=[-1,-2], pr=[-2,-1], rc=rr=[-1.5,-1.5]; beta 0.5:
# chosen log-ratio c = pc-rc = [0.5,-0.5], rejected r = pr-rr = [-0.5,0.5], h = c-r = [1,-1]
# beta*h = [0.5,-0.5], beta*c = [0.25,-0.25], beta*r = [-0.25,0.25]
DPO_ARGS = ([-1.0, -2.0], [-2.0, -1.0], [-1.5, -1.5], [-1.5, -1.5])
BETA, EPS = 0.5, 0.1


def _dpo(**kw):
    return L.dpo_loss(*(torch.tensor(a) for a in DPO_ARGS), beta=BETA, **kw)


EXPECTED = {
    # (-(1-eps) log s(bh) + eps log s(-bh)) / (1-2eps): pair 0 (0.9*0.474077 - 0.1*0.974077)/0.8 = 0.411577
    "robust": [(-(1 - EPS) * ls(bh) + EPS * ls(-bh)) / (1 - 2 * EPS) for bh in (0.5, -0.5)],
    # -log s(bc) - log s(-br): pair 0 2*0.575939 = 1.151878, pair 1 2*0.825939 = 1.651878
    "bco_pair": [-ls(bc) - ls(-br) for bc, br in ((0.25, -0.25), (-0.25, 0.25))],
    # 1 - s(bc) + s(br): pair 0 0.437823 + 0.437823 = 0.875646, pair 1 2*0.562177 = 1.124354
    "apo_zero": [1 - sig(bc) + sig(br) for bc, br in ((0.25, -0.25), (-0.25, 0.25))],
    # 1/(2 beta) = 1: (c-1)^2 + (r+1)^2 = [0.25 + 0.25, 2.25 + 2.25]
    "sppo_hard": [0.5, 4.5],
    # -log s(bc) - 0.5 log s(-bc) - 0.5 log s(-br): pair 0 0.575939 + 0.412970 + 0.287970 = 1.276878
    "nca_pair": [-ls(bc) - 0.5 * ls(-bc) - 0.5 * ls(-br) for bc, br in ((0.25, -0.25), (-0.25, 0.25))],
    # q_w = s(bh): q_w (log q_w - log 0.9) + q_l (log q_l - log 0.1): pair 0 -0.229510 + 0.501566 = 0.272056
    "exo_pair": [sig(bh) * (ls(bh) - math.log(1 - EPS)) + sig(-bh) * (ls(-bh) - math.log(EPS)) for bh in (0.5, -0.5)],
}


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_each_dpo_loss_type_is_its_formula(loss_type):
    losses, chosen, rejected = _dpo(loss_type=loss_type, label_smoothing=EPS)
    assert_close(losses, EXPECTED[loss_type])
    assert_close(chosen, t(0.25, -0.25))  # beta * c, for every loss type
    assert_close(rejected, t(-0.25, 0.25))


def test_hand_numbers_of_two_of_them():
    # the same formulas in plain numbers, so a slip in the helpers above cannot hide one in the loss
    assert_close(_dpo(loss_type="robust", label_smoothing=EPS)[0], t(0.411577, 1.036577))
    assert_close(_dpo(loss_type="exo_pair", label_smoothing=EPS)[0], t(0.272056, 0.810196))


def test_several_loss_types_are_the_weighted_sum():
    losses, _, _ = _dpo(loss_type=["sigmoid", "sppo_hard"], loss_weights=[1.0, 0.5])
    # sigmoid [0.474077, 0.974077] + 0.5 * sppo_hard [0.5, 4.5] = [0.724077, 3.224077]
    assert_close(losses, t(0.724077, 3.224077))
    assert_close(_dpo(loss_type=["sigmoid", "ipo"])[0], t(0.474077 + 0.0, 0.974077 + 4.0))  # weights default to 1
    with pytest.raises(ValueError, match="one weight per loss_type"):
        _dpo(loss_type=["sigmoid", "ipo"], loss_weights=[1.0])


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        _dpo(loss_type="exo_pair")


def test_dpo_loss_types_have_the_formulas_gradients():
    # float64 finite differences against autograd, over every loss type at once
    args = [torch.tensor(a, dtype=torch.float64, requires_grad=i < 2) for i, a in enumerate(DPO_ARGS)]
    for loss_type in L.DPO_LOSS_TYPES:
        assert torch.autograd.gradcheck(
            lambda pc, pr: L.dpo_loss(pc, pr, args[2], args[3], BETA, loss_type, EPS)[0], tuple(args[:2]))


# ===================================================================== CPO / SimPO (no reference)

# pc=[-1,-2], pr=[-2,-1] -> u = pc - pr = [1,-1]; beta 0.5 -> beta*u = [0.5,-0.5]
@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", [0.474077, 0.974077]),  # -log s(beta u)
    ("hinge", [0.5, 1.5]),  # relu(1 - beta u)
    ("ipo", [0.0, 4.0]),  # (u - 1/(2 beta))^2 = (u - 1)^2
    ("simpo", [math.log(2), -ls(-1.0)]),  # gamma 0.5: -log s(beta u - gamma) = [-log s(0), -log s(-1)] = [0.693147, 1.313262]
])
def test_cpo_loss_types(loss_type, expected):
    pc, pr = t(-1.0, -2.0), t(-2.0, -1.0)
    losses, chosen, rejected = L.cpo_loss(pc, pr, beta=0.5, loss_type=loss_type, simpo_gamma=0.5)
    assert_close(losses, expected)
    assert_close(chosen, t(-0.5, -1.0))  # beta * log pi, no reference
    assert_close(rejected, t(-1.0, -0.5))


def test_cpo_label_smoothing_and_unknown_type():
    losses, _, _ = L.cpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), beta=0.5, label_smoothing=0.1)
    # as conservative DPO: 0.9*0.474077 + 0.1*0.974077 = 0.524077, 0.9*0.974077 + 0.1*0.474077 = 0.924077
    assert_close(losses, t(0.524077, 0.924077))
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, simpo"):
        L.cpo_loss(t(-1.0), t(-2.0), loss_type="robust")


# ===================================================================== ORPO

def test_orpo_odds_ratio_term():
    pc, pr = t(-0.5, -1.0), t(-1.0, -0.5)  # mean token log-probs
    losses, chosen, rejected, stats = L.orpo_loss(pc, pr, beta=0.1)
    # log odds(y) = lp - log(1 - e^lp): log(1-e^-0.5) = -0.932752, log(1-e^-1) = -0.458675
    # pair 0: log OR = (-0.5 + 1) - (-0.932752 + 0.458675) = 0.974077; 0.1 * -log s(0.974077) = 0.1 * 0.320300
    z = 0.5 - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.0)))
    assert z == pytest.approx(0.974077, abs=1e-6)
    assert_close(losses, t(-0.1 * ls(z), -0.1 * ls(-z)))
    assert_close(losses, t(0.0320300, 0.1294377))
    assert_close(chosen, t(-0.05, -0.1))
    assert_close(rejected, t(-0.1, -0.05))
    assert_close(stats["log_odds_ratio"], (ls(z) + ls(-z)) / 2)  # TRL's name: the mean of log s(log OR)
    assert_close(stats["log_odds_chosen"], 0.0)  # TRL's name: the mean of log OR


def test_orpo_gradient_is_the_formulas():
    pc = torch.tensor([-0.5, -1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    L.orpo_loss(pc, pr, beta=0.1)[0].sum().backward()
    # d/dlp_w [-beta log s(z)] = -beta s(-z) dz/dlp_w, dz/dlp_w = 1 + e^lp/(1-e^lp) = 1/(1-e^lp)
    z = 0.5 - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.0)))
    expected = [-0.1 * sig(-z) / (1 - math.exp(-0.5)), -0.1 * sig(z) / (1 - math.exp(-1.0))]
    assert_close(pc.grad, expected, tol=1e-10)
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss
    # log(1 - e^x) stays finite close to 0, where 1 - e^x cancels
    assert torch.isfinite(L.log1mexp(torch.tensor([-1e-7, -50.0]))).all()
