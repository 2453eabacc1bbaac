"""Behavioural tests of the attacks on a tiny logistic regression trained in the test."""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_robust.evaluate import attacks as attacks_mod
from ssl_robust.evaluate.attacks import (
    eot_grad,
    pgd,
    random_search,
    rescore,
    robust_accuracy,
    robust_accuracy_steps,
    sanity_attack_costs,
    sanity_checks,
)

N_CLASSES = 3
SHAPE = (1, 4, 4)


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Three linearly separable classes in [0, 1]^(1x4x4): 0.5 + 0.2 * a +-1 prototype + noise."""
    protos = torch.sign(torch.randn(N_CLASSES, *SHAPE, generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    x = 0.5 + 0.2 * protos[y] + 0.05 * torch.randn(n, *SHAPE, generator=gen)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    x_train, y_train = make_data(300, seed=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, N_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x_test, y_test = make_data(96, seed=2)
    return model, x_test, y_test


def acc_of(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_tiny_model_learns(trained):
    model, x, y = trained
    assert acc_of(model, x, y) == 1.0


def test_eps_zero_returns_x_exactly(trained):
    model, x, y = trained
    calls = []

    def counted(inp: Tensor) -> Tensor:
        calls.append(1)
        return model(inp)

    for norm in ("linf", "l2"):
        x_adv = pgd(counted, x, y, norm=norm, eps=0.0, steps=5)
        assert torch.equal(x_adv, x)
        assert acc_of(model, x_adv, y) == acc_of(model, x, y)
    assert not calls


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.5), ("l2", 2.0)])
def test_large_eps_breaks_everything(trained, norm, eps):
    model, x, y = trained
    x_adv = pgd(
        model, x, y, norm=norm, eps=eps, steps=20, generator=torch.Generator().manual_seed(0)
    )
    assert acc_of(model, x_adv, y) <= 0.02


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.3), ("linf", 0.3), ("l2", 1.0)])
@pytest.mark.parametrize("random_start", [True, False])
def test_perturbation_in_ball_and_box(trained, norm, eps, random_start):
    model, x, y = trained
    # Push some pixels to the box edges so that the [0, 1] clamp is exercised.
    x = x.clone()
    x[:, :, 0, 0] = 0.0
    x[:, :, -1, -1] = 1.0
    gen = torch.Generator().manual_seed(3)
    x_adv = pgd(model, x, y, norm=norm, eps=eps, steps=7, random_start=random_start, generator=gen)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.1


def test_single_step_matches_hand_fgsm(trained):
    """One step without random start is FGSM (Linf) / a normalised gradient step (L2).

    For logistic regression z = W x + b the CE input gradient is W^T (softmax(z) - onehot(y)).
    """
    model, x, y = trained
    lin = model[1]
    probs = (x.flatten(1) @ lin.weight.T + lin.bias).softmax(1)
    grad = ((probs - F.one_hot(y, N_CLASSES).float()) @ lin.weight).view_as(x)  # (B, 1, 4, 4)
    eps = 0.05
    expected_linf = (x + eps * grad.sign()).clamp(0, 1)
    got = pgd(model, x, y, "linf", eps, step_size=eps, steps=1, random_start=False, keep="last")
    torch.testing.assert_close(got, expected_linf)

    eps = 0.4
    g_norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected_l2 = (x + eps * grad / g_norm).clamp(0, 1)
    got = pgd(model, x, y, "l2", eps, step_size=eps, steps=1, random_start=False, keep="last")
    torch.testing.assert_close(got, expected_l2)


def test_default_step_size_is_madry_rule(trained):
    model, x, y = trained
    eps, steps = 0.04, 2
    explicit = pgd(
        model,
        x,
        y,
        "linf",
        eps,
        step_size=2.5 * eps / steps,
        steps=steps,
        random_start=False,
        keep="last",
    )
    default = pgd(model, x, y, "linf", eps, steps=steps, random_start=False, keep="last")
    torch.testing.assert_close(default, explicit)


def test_best_iterate_never_worse_than_last(trained):
    model, x, y = trained
    for norm, eps in (("linf", 0.15), ("l2", 0.5)):
        kwargs = {"norm": norm, "eps": eps, "steps": 10, "step_size": eps}  # big steps oscillate
        best = pgd(model, x, y, keep="best", generator=torch.Generator().manual_seed(0), **kwargs)
        last = pgd(model, x, y, keep="last", generator=torch.Generator().manual_seed(0), **kwargs)
        assert acc_of(model, best, y) <= acc_of(model, last, y)


def test_targeted_reaches_target(trained):
    model, x, y = trained
    target = (y + 1) % N_CLASSES
    x_adv = pgd(model, x, target, "linf", 0.5, steps=20, targeted=True)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() >= 0.95


def test_margin_loss_attack_works(trained):
    model, x, y = trained
    x_adv = pgd(model, x, y, "linf", 0.5, steps=20, loss="margin")
    assert acc_of(model, x_adv, y) <= 0.02


def test_argument_validation(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=r"'linf'.*'l2'"):
        pgd(model, x, y, norm="l1", eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="eot"):
        pgd(model, x, y, eps=0.1, eot=0)
    with pytest.raises(ValueError, match="ce"):
        pgd(model, x, y, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="best"):
        pgd(model, x, y, eps=0.1, keep="first")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 3 - 1, y, eps=0.1)
    with pytest.raises(ValueError, match="draws"):
        rescore(model, x, y, draws=0)


class CountingNoisyModel:
    """Stochastic pipeline: Gaussian input noise, a fresh draw per call; counts its calls."""

    def __init__(self, model: nn.Module, sigma: float = 0.02) -> None:
        self.model, self.sigma = model, sigma
        self.gen = torch.Generator().manual_seed(123)
        self.grad_calls = 0
        self.nograd_calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_calls += 1
        else:
            self.nograd_calls += 1
        return self.model(x + self.sigma * torch.randn(x.shape, generator=self.gen))


@pytest.mark.parametrize(("steps", "eot"), [(3, 4), (5, 1), (1, 6)])
def test_eot_call_count(trained, steps, eot):
    model, x, y = trained
    noisy = CountingNoisyModel(model)
    pgd(noisy, x, y, "linf", 0.1, steps=steps, eot=eot, keep="last")
    assert (noisy.grad_calls, noisy.nograd_calls) == (steps * eot, 0)
    noisy = CountingNoisyModel(model)
    pgd(noisy, x, y, "linf", 0.1, steps=steps, eot=eot, keep="best")
    # Scoring the final iterate for the worst-case selection costs one EOT round without grads.
    assert (noisy.grad_calls, noisy.nograd_calls) == (steps * eot, eot)


def test_eot_gradient_variance_shrinks(trained):
    """A pipeline with random weights W + noise: averaging eot draws divides the variance by eot."""
    model, x, y = trained
    lin = model[1]
    gen = torch.Generator().manual_seed(7)

    def noisy(inp: Tensor) -> Tensor:
        w = lin.weight + 0.5 * torch.randn(lin.weight.shape, generator=gen)
        return inp.flatten(1) @ w.T + lin.bias

    x, y = x[:4], y[:4]
    estimates = {
        k: torch.stack([eot_grad(noisy, x, y, eot=k)[0] for _ in range(150)]) for k in (1, 16)
    }
    var1 = estimates[1].var(dim=0).mean()
    var16 = estimates[16].var(dim=0).mean()
    assert 8 < var1 / var16 < 32  # 16 in expectation
    # Both estimate the same mean gradient.
    mean_gap = (estimates[16].mean(0) - estimates[1].mean(0)).abs().mean()
    assert mean_gap < 3 * math.sqrt(var1.item() / 150)


def test_eot_grad_targeted_sign(trained):
    model, x, y = trained
    g_untargeted, obj_u, probs = eot_grad(model, x, y)
    g_targeted, obj_t, _ = eot_grad(model, x, y, targeted=True)
    torch.testing.assert_close(g_targeted, -g_untargeted)
    torch.testing.assert_close(obj_t, -obj_u)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x)))


class FlippingModel:
    """Swaps the top-2 logits of each sample with probability p, independently per call."""

    def __init__(self, model: nn.Module, p: float, seed: int = 0) -> None:
        self.model, self.p = model, p
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        top2 = logits.topk(2, dim=1).indices  # (B, 2)
        flip = torch.rand(x.shape[0], generator=self.gen) < self.p  # (B,)
        swapped = logits.clone()
        rows = torch.arange(x.shape[0])
        swapped[rows, top2[:, 0]] = logits[rows, top2[:, 1]]
        swapped[rows, top2[:, 1]] = logits[rows, top2[:, 0]]
        return torch.where(flip[:, None], swapped, logits)


def test_rescore_uses_fresh_randomness(trained):
    model, x, y = trained
    flipping = FlippingModel(model, p=0.3)
    out = rescore(flipping, x, y, draws=8)
    correct = out["correct"]
    assert correct.shape == (8, len(x)) and correct.dtype == torch.bool
    assert not (correct == correct[0]).all()  # draws differ
    assert out["acc"] == pytest.approx(correct.float().mean().item())
    assert out["acc_worst"] == pytest.approx(correct.all(0).float().mean().item())
    assert out["acc_worst"] <= out["acc"]
    assert out["acc"] == pytest.approx(0.7, abs=0.08)  # clean acc is 1, flips with p = 0.3
    assert out["acc_worst"] == pytest.approx(0.7**8, abs=0.06)
    torch.testing.assert_close(out["acc_per_draw"], correct.float().mean(1))
    # A deterministic pipeline has identical draws: worst == mean.
    det = rescore(model, x, y, draws=3)
    assert det["acc_worst"] == det["acc"] == 1.0


def test_robust_accuracy_returns_the_first_adversarial_examples_of_its_batches(trained):
    model, x, y = trained
    kw = {"norm": "linf", "eps": 0.15, "steps": 3, "eot": 1}
    out = robust_accuracy(
        model, (x, y), batch_size=32, generator=torch.Generator().manual_seed(0), examples=40, **kw
    )
    # The attack of each batch, in order, with the same random starts: 32 + the next 8.
    gen = torch.Generator().manual_seed(0)
    first = pgd(model, x[:32], y[:32], generator=gen, **kw)
    second = pgd(model, x[32:64], y[32:64], generator=gen, **kw)
    torch.testing.assert_close(out["x_adv"], torch.cat([first, second[:8]]))
    assert (out["x_adv"] - x[:40]).abs().max() <= 0.15 + 1e-6
    assert acc_of(model, out["x_adv"][:32], y[:32]) < acc_of(model, x[:32], y[:32])
    plain = robust_accuracy(model, (x, y), generator=torch.Generator().manual_seed(0), **kw)
    assert "x_adv" not in plain


def test_robust_accuracy_batches_and_costs(trained):
    model, x, y = trained
    steps, eot = 4, 2
    kw = {"norm": "linf", "eps": 0.15, "steps": steps, "eot": eot, "rescore_draws": 2}
    step_calls = [0]
    from_tensors = robust_accuracy(
        model,
        (x, y),
        batch_size=32,
        nfe_per_call=3,
        generator=torch.Generator().manual_seed(0),
        on_step=lambda: step_calls.__setitem__(0, step_calls[0] + 1),
        **kw,
    )
    # The progress hook: every step of every chunk, as many as robust_accuracy_steps says.
    assert (
        step_calls[0] == robust_accuracy_steps(len(x), 32, steps) == steps * math.ceil(len(x) / 32)
    )
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    from_loader = robust_accuracy(model, loader, generator=torch.Generator().manual_seed(0), **kw)
    assert from_tensors["acc"] == from_loader["acc"]
    assert from_tensors["n"] == len(x)
    assert from_tensors["clean_acc"] == acc_of(model, x, y)
    assert from_tensors["acc"] < from_tensors["clean_acc"]
    assert from_tensors["acc_worst"] <= from_tensors["acc"]
    assert from_tensors["attack_calls_per_image"] == (steps + 1) * eot
    assert from_tensors["attack_grad_calls_per_image"] == steps * eot
    assert from_tensors["attack_nfe_per_image"] == 3 * (steps + 1) * eot
    assert 0 < from_tensors["attack_wall_s"] <= from_tensors["wall_s"]
    # Matches a manual PGD + rescore over the whole set.
    gen = torch.Generator().manual_seed(0)
    x_adv = torch.cat(
        [pgd(model, xb, yb, "linf", 0.15, steps=steps, eot=eot, generator=gen) for xb, yb in loader]
    )
    assert from_loader["acc"] == pytest.approx(acc_of(model, x_adv, y))


def test_random_search_stays_in_ball_and_attacks(trained):
    model, x, y = trained
    for norm, eps in (("linf", 0.3), ("l2", 1.0)):
        x_adv = random_search(
            model, x, y, norm, eps, queries=100, generator=torch.Generator().manual_seed(0)
        )
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-6).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert acc_of(model, x_adv, y) < 0.5


class QuantizedModel(nn.Module):
    """Gradient masking by a step function: round() has zero gradient almost everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * 4) / 4)


class _Passes(nn.Module):
    """Counts the pipeline passes per image of ``model``, a pass with a backward as 3."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes = 0.0

    def forward(self, x: Tensor) -> Tensor:
        self.passes += (3 if torch.is_grad_enabled() and x.requires_grad else 1) * len(x)
        return self.model(x)


def test_sanity_checks_pass_on_honest_model(trained):
    model, x, y = trained
    counted = _Passes(model)
    started: list[tuple[int, str]] = []
    per_attack: list[float] = []

    def on_attack(i: int, what: str) -> None:
        started.append((i, what))
        per_attack.append(counted.passes / len(x))

    checks = sanity_checks(
        counted,
        x,
        y,
        "linf",
        eps_grid=(0.02, 0.06, 0.12, 0.25),
        steps=10,
        eot=1,
        rescore_draws=2,
        generator=torch.Generator().manual_seed(0),
        on_attack=on_attack,
    )
    per_attack.append(counted.passes / len(x))
    # The progress hook: every attack announced once, in order, each costing what
    # sanity_attack_costs says (the clean scoring comes before the first).
    costs = sanity_attack_costs(4, steps=10, eot=1, rescore_draws=2)
    assert [i for i, _ in started] == list(range(len(costs)))
    assert [b - a for a, b in itertools.pairwise(per_attack)] == costs
    assert costs[:7] == [33] * 5 + [63, 64] and costs[7:] == [102] * 4 + [3]
    assert [what.split(" eps")[0].split(",")[0] for _, what in started] == [
        *["PGD"] * 7, *["black-box"] * 4, "gradients"
    ]  # fmt: skip
    assert started[5][1].endswith("20 steps, EOT 1") and started[6][1].endswith("EOT 2")
    assert set(checks) == {
        "eps_monotone",
        "large_eps",
        "more_steps",
        "more_eot",
        "black_box",
        "nonzero_gradients",
    }
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["eps_monotone"]["values"]["acc"][0] == 1.0
    assert checks["large_eps"]["values"]["acc"] == 0.0


def test_sanity_checks_flag_gradient_masking(trained):
    model, x, y = trained
    masked = QuantizedModel(model)
    assert acc_of(masked, x, y) >= 0.95
    checks = sanity_checks(
        masked,
        x,
        y,
        "linf",
        eps_grid=(0.1, 0.2, 0.3),
        steps=10,
        eot=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert not checks["black_box"]["passed"]
    values = checks["black_box"]["values"]
    assert max(w - b for w, b in zip(values["white_box_acc"], values["black_box_acc"])) > 0.5
    assert not checks["nonzero_gradients"]["passed"]
    assert not checks["large_eps"]["passed"]


def test_a_deterministic_pipeline_skips_the_more_eot_check(trained):
    # For a deterministic model every EOT pass has the same gradient: more of them repeat the
    # baseline attack. Without the check the other checks are unchanged, and the progress
    # costs leave its attack out.
    model, x, y = trained
    x, y = x[:32], y[:32]

    def run(eot_check: bool) -> tuple[dict[str, dict[str, Any]], list[float]]:
        counted = _Passes(model)
        per_attack: list[float] = []
        checks = sanity_checks(
            counted,
            x,
            y,
            "linf",
            eps_grid=(0.06, 0.25),
            steps=5,
            black_box_queries=20,
            generator=torch.Generator().manual_seed(0),
            on_attack=lambda i, what: per_attack.append(counted.passes / len(x)),
            eot_check=eot_check,
        )
        per_attack.append(counted.passes / len(x))
        return checks, [b - a for a, b in itertools.pairwise(per_attack)]

    full, full_costs = run(True)
    checks, costs = run(False)
    assert set(full) - set(checks) == {"more_eot"}
    # The deterministic check it replaces could not fail: the same attack twice.
    assert full["more_eot"]["values"]["acc"][0] == full["more_eot"]["values"]["acc"][1]
    assert {c: checks[c] for c in checks} == {c: full[c] for c in checks}
    assert costs == sanity_attack_costs(2, steps=5, eot=1, black_box_queries=20, eot_check=False)
    assert full_costs == sanity_attack_costs(2, steps=5, eot=1, black_box_queries=20)
    assert len(full_costs) == len(costs) + 1


def test_sanity_checks_l2(trained):
    model, x, y = trained
    checks = sanity_checks(
        model,
        x,
        y,
        "l2",
        eps_grid=(0.1, 0.4, 0.8),
        steps=10,
        eot=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(c["passed"] for c in checks.values()), checks


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.17), ("l2", 0.5)])
def test_autoattack_on_deterministic_model(trained, norm, eps):
    """AutoAttack runs on a 3-class, 4 x 4 pipeline and is at least as strong as PGD-20."""
    pytest.importorskip("pyautoattack")
    model, x, y = trained
    x_aa = attacks_mod.autoattack(model, x, y, norm, eps, version="standard", batch_size=64)
    assert x_aa.shape == x.shape
    delta = (x_aa - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_aa.min() >= 0 and x_aa.max() <= 1
    x_pgd = pgd(model, x, y, norm, eps, steps=20, generator=torch.Generator().manual_seed(0))
    assert acc_of(model, x_pgd, y) < 0.9  # eps where the attack partially succeeds
    assert acc_of(model, x_aa, y) <= acc_of(model, x_pgd, y) + 0.02


def test_autoattack_keeps_the_installed_tracer(trained):
    # pyautoattack's dynamic-defence check ends with sys.settrace(None), which would switch
    # off coverage or a debugger for the rest of the process.
    pytest.importorskip("pyautoattack")
    model, x, y = trained

    def tracer(frame, event, arg):  # a do-nothing global tracer
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        attacks_mod.autoattack(
            model, x[:16], y[:16], "linf", 0.1, version="custom", attacks=["apgd-ce"]
        )
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


def test_autoattack_refuses_stochastic_pipeline(trained):
    pytest.importorskip("pyautoattack")
    model, x, y = trained
    with pytest.raises(ValueError, match="stochastic"):
        attacks_mod.autoattack(CountingNoisyModel(model), x, y, "linf", 0.1)
    with pytest.raises(ValueError, match="'linf'"):
        attacks_mod.autoattack(model, x, y, "l0", 0.1)


def test_autoattack_missing_package_raises_clear_import_error(trained, monkeypatch):
    model, x, y = trained
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        attacks_mod.autoattack(model, x, y, "linf", 0.1)


def test_sanity_checks_pass_on_stochastic_pipeline(trained):
    """With a tolerance of ~2 standard errors, EOT/steps comparisons hold despite the noise."""
    model, x, y = trained
    noisy = CountingNoisyModel(model, sigma=0.05)
    checks = sanity_checks(
        noisy,
        x,
        y,
        "linf",
        eps_grid=(0.05, 0.15, 0.25),
        steps=5,
        eot=2,
        rescore_draws=4,
        tol=0.07,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["more_eot"]["values"]["eot"] == [2, 4]


def test_l2_projection_leaves_points_inside_the_ball() -> None:
    x = torch.full((1, 3, 4, 4), 0.5)
    d = torch.zeros_like(x)
    d[0, 0, 0, 0] = 0.1  # ||d||_2 = 0.1 < 0.5
    assert torch.equal(attacks_mod._project(x + d, x, "l2", 0.5), x + d)
    # Outside it: rescaled onto the sphere, direction kept.
    torch.testing.assert_close(attacks_mod._project(x + 10 * d, x, "l2", 0.5), x + 5 * d)


def test_random_starts_are_uniform_in_the_ball() -> None:
    x = torch.full((2000, 3, 8, 8), 0.5)
    eps = 0.1
    # Linf: each coordinate uniform on [-eps, eps]: mean 0 and both ends reached.
    d = attacks_mod._random_start(x, "linf", eps, torch.Generator().manual_seed(0)) - x
    assert abs(d.mean().item()) < 0.002
    assert d.min() < -0.99 * eps and d.max() > 0.99 * eps and d.abs().max() <= eps
    # L2 in D = 192 dimensions: the radius is eps * U^(1/D), P(radius < 0.97 eps) =
    # 0.97^192 ~ 0.3 %; nearly all of a uniform ball's volume is next to its surface.
    d = attacks_mod._random_start(x, "l2", eps, torch.Generator().manual_seed(0)) - x
    radius = d.flatten(1).norm(dim=1)
    assert (radius <= eps + 1e-6).all()
    assert (radius > 0.97 * eps).float().mean() > 0.99


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_eot_on_a_deterministic_pipeline_changes_nothing(loss: str) -> None:
    # Averaging 4 identical passes is one pass: the same iterates, and the same choice among
    # them (the final iterate's objective is an average too, not a sum).
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2))
    kw = {"eps": 0.03, "steps": 3, "loss": loss}
    one = pgd(lin, x, y, eot=1, generator=torch.Generator().manual_seed(3), **kw)
    four = pgd(lin, x, y, eot=4, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(one, four)


class ScriptedModel:
    """Returns the logits scripted for its n-th call (plus a small input-dependent term, so
    that PGD moves), recording its inputs."""

    def __init__(self, script: list[list[float]]) -> None:
        self.script = torch.tensor(script)
        self.inputs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        base = self.script[len(self.inputs) - 1].expand(x.shape[0], -1)
        return base + 1e-4 * x.flatten(1).sum(1, keepdim=True) * torch.tensor([1.0, -1.0, 0.0])


def test_best_iterate_prefers_a_misclassified_one_over_a_higher_loss() -> None:
    # Label 0. Iterates x0, x1, x2 (2 steps, then the final scoring):
    #   x0 right, CE 0.91; x1 wrong (class 1), CE 0.74; x2 right, CE 1.05.
    # The worst case is x1, the only one fooled, though its CE is the lowest.
    script = [[0.3, 0.0, 0.0], [0.0, 0.1, -10.0], [0.1, 0.0, 0.05]]
    ce = [F.cross_entropy(torch.tensor([s]), torch.tensor([0])).item() for s in script]
    assert ce == pytest.approx([0.91, 0.74, 1.05], abs=0.01)
    model = ScriptedModel(script)
    x, y = torch.full((1, 1, 4, 4), 0.5), torch.tensor([0])
    out = pgd(model, x, y, eps=0.1, step_size=0.01, steps=2, random_start=False, loss="ce")
    assert len(model.inputs) == 3
    assert not torch.equal(model.inputs[1], model.inputs[0])
    assert not torch.equal(model.inputs[1], model.inputs[2])
    assert torch.equal(out, model.inputs[1])


def test_robust_accuracy_clean_accuracy_is_the_mean_over_draws(trained):
    # Right half the time, independently per call: with 4 draws the clean accuracy is ~0.5,
    # the worst case (right in all 4) ~1/16. The clean scoring is the pipeline's first 4 calls.
    model, x, y = trained
    out = robust_accuracy(
        FlippingModel(model, p=0.5, seed=5), (x, y), eps=0.01, steps=1, rescore_draws=4
    )
    clean = rescore(FlippingModel(model, p=0.5, seed=5), x, y, draws=4)
    assert out["clean_acc"] == pytest.approx(clean["acc"])
    assert out["clean_acc_worst"] == pytest.approx(clean["acc_worst"])
    assert out["clean_acc"] == pytest.approx(0.5, abs=0.1)
    assert out["clean_acc_worst"] < out["clean_acc"] - 0.2


def test_sanity_checks_run_the_stronger_attacks_where_accuracy_is_half_the_clean_one():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = lin(x).argmax(1).detach()
    checks = sanity_checks(
        lin,
        x,
        y,
        eps_grid=(0.002, 0.01, 0.03, 0.1),
        steps=5,
        generator=torch.Generator().manual_seed(0),
    )
    # Clean 1.0; PGD 0.97, 0.67, 0.22, 0.0: 0.67 is the closest to 1.0 / 2 (0.97 to 1.0).
    acc = checks["eps_monotone"]["values"]["acc"]
    assert acc == pytest.approx([1.0, 0.97, 0.67, 0.22, 0.0], abs=0.01)
    assert checks["more_steps"]["values"]["eps"] == checks["more_eot"]["values"]["eps"] == 0.01


class _ConstantMargin:
    """Logits that ignore the input (nothing is ever accepted); records the inputs."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.inputs.append(x.clone())
        return torch.tensor([1.0, 0.0]).expand(x.shape[0], -1)


def test_random_search_window_shrinks_on_schedule_and_reaches_every_row():
    # Linf, no proposal accepted: each proposal differs from the starting point (stripes of
    # +-eps per column) inside its window only, on every row of it (one sign per channel over
    # the window, 3 channels: some column differs unless all 3 signs match, 1/8).
    b, h, queries = 16, 16, 100
    x, y = torch.full((b, 3, h, h), 0.5), torch.zeros(b, dtype=torch.long)
    model = _ConstantMargin()
    out = random_search(
        model, x, y, "linf", 0.1, queries, p_init=0.8, generator=torch.Generator().manual_seed(0)
    )
    start, proposals = model.inputs[0], model.inputs[1:]
    assert torch.equal(out, start) and len(proposals) == queries - 1
    sides, rows = [], torch.zeros(h, dtype=torch.bool)
    for i, prop in enumerate(proposals, start=1):
        changed = (prop != start).any(dim=3).any(dim=1)  # (B, H): rows the window covers
        sides.append(int(changed.sum(dim=1).max()))
        if i > 40:  # windows of one pixel
            rows |= changed.any(dim=0)
    # Query i is at progress 100 i of 10,000: the area p_init = 0.8 halves past 10, 50, 200,
    # 500, 1000, 2000, 4000, 6000, 8000; side = round(sqrt(p * 16 * 16)).
    expected = [7] * 2 + [5] * 3 + [4] * 5 + [3] * 10 + [2] * 20 + [1] * 59
    assert sides == expected
    assert rows.all()  # the top offset reaches h - side, the last row


def test_random_search_stops_moving_misclassified_samples():
    # Sample 0 starts right and every proposal lowers its margin: each is accepted. Sample 1
    # starts misclassified: it keeps its starting point though proposals lower it further.
    calls: list[Tensor] = []

    def model(inp: Tensor) -> Tensor:
        calls.append(inp.clone())
        n = float(len(calls))
        return torch.tensor([[100.0 - n, 0.0], [-n, 0.0]])

    x, y = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.long)
    out = random_search(model, x, y, "linf", 0.1, 20, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 20
    assert torch.equal(out[0], calls[-1][0])
    assert torch.equal(out[1], calls[0][1])
    assert not torch.equal(calls[-1][1], calls[0][1])


def test_black_box_check_fails_when_it_beats_pgd_by_more_than_tol(monkeypatch):
    # PGD (stubbed) leaves all 100 images right; the black-box attack (stubbed) fools m of
    # them. Prediction: class 0 iff the mean pixel is above 0.5.
    def model(inp: Tensor) -> Tensor:
        m = inp.flatten(1).mean(1)
        return torch.stack([m, 1 - m], dim=1)

    x, y = torch.full((100, 1, 4, 4), 0.75), torch.zeros(100, dtype=torch.long)
    monkeypatch.setattr(attacks_mod, "pgd", lambda model, x, y, **kw: x.clone())
    for fooled, passed in ((1, True), (3, False)):

        def fake_black_box(model, x, y, *args, fooled=fooled, **kw):
            out = x.clone()
            out[:fooled] = 0.25
            return out

        monkeypatch.setattr(attacks_mod, "random_search", fake_black_box)
        checks = sanity_checks(
            model,
            x,
            y,
            eps_grid=(0.1,),
            steps=1,
            tol=0.02,
            generator=torch.Generator().manual_seed(0),
        )
        values = checks["black_box"]["values"]
        assert values["white_box_acc"] == [1.0]
        assert values["black_box_acc"] == [pytest.approx(1 - fooled / 100)]
        assert checks["black_box"]["passed"] is passed
