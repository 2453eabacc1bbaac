"""methods.losses.NTXentLoss against lightly's NTXentLoss, the reference it replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightly.loss import NTXentLoss as LightlyNTXentLoss
from lightly.utils import dist

from ssl_robust.methods.losses import NTXentLoss
from tests.helpers import host_syncs


def _pair(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    out1 = out0 + 0.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return out0.requires_grad_(), out1.requires_grad_()


def _loss_and_grads(
    loss_fn: torch.nn.Module, out0: torch.Tensor, out1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = out0.detach().clone().requires_grad_(), out1.detach().clone().requires_grad_()
    loss = loss_fn(a, b)
    loss.backward()
    assert a.grad is not None and b.grad is not None
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize(("batch", "dim", "temperature"), [(2, 3, 0.5), (16, 8, 0.5), (33, 5, 0.1)])
def test_ntxent_equals_lightly_loss_and_gradients(batch: int, dim: int, temperature: float) -> None:
    # float64 inputs: the float32 similarities are the only rounding on our side.
    out0, out1 = _pair(batch, dim, seed=batch)
    ours = _loss_and_grads(NTXentLoss(temperature), out0, out1)
    ref = _loss_and_grads(LightlyNTXentLoss(temperature), out0.float(), out1.float())
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-5, atol=1e-6)
    assert ours[0] > 0 and ours[1].abs().sum() > 0  # not a degenerate case


def test_ntxent_known_answer_for_two_orthogonal_pairs() -> None:
    # Two images whose views coincide, orthogonal to each other: each view's positive has
    # similarity 1 and its two negatives 0, so every row's loss is
    # -log(e^(1/T) / (e^(1/T) + 2 e^0)) = log(1 + 2 e^(-1/T)).
    t = 0.5
    out = torch.eye(2, 4)
    loss = NTXentLoss(t)(out, out.clone())
    expected = torch.log1p(2 * torch.exp(torch.tensor(-1 / t)))
    torch.testing.assert_close(loss, expected)


def test_ntxent_emulated_two_ranks_equals_lightly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 1 of 2: the other rank's projections come first in the gathered batch, the
    # positives sit at columns B + i and the own-view entries at (i, B + i).
    other0, other1 = _pair(6, 4, seed=7)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)

    calls: list[int] = []

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Both losses gather the normalised first views, then the second: the other rank's
        # come from (other0, other1) in that order.
        other = (other0, other1)[len(calls) % 2]
        calls.append(1)
        return (torch.nn.functional.normalize(other.detach().to(x.dtype), dim=1), x)

    monkeypatch.setattr(dist, "gather", gather)
    out0, out1 = _pair(6, 4, seed=8)
    ours = _loss_and_grads(NTXentLoss(0.5, gather_distributed=True), out0, out1)
    ref = _loss_and_grads(
        LightlyNTXentLoss(0.5, gather_distributed=True), out0.float(), out1.float()
    )
    assert len(calls) == 4
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-5, atol=1e-6)
    single = NTXentLoss(0.5)(out0.float(), out1.float())
    assert not torch.isclose(ours[0].float(), single)  # the other rank's negatives counted


def test_ntxent_builds_its_masks_on_the_projections_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the meta device (shapes only), two emulated ranks: a mask made on the host, as
    # lightly's dist.eye_rank makes it, fails here as masked_fill on a GPU refuses it.
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "gather", lambda x: (torch.zeros_like(x), x))
    out0 = torch.randn(4, 8, device="meta", requires_grad=True)
    loss = NTXentLoss(0.5, gather_distributed=True)(out0, torch.randn(4, 8, device="meta"))
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == ()
    assert out0.grad is not None and out0.grad.shape == (4, 8)


def test_ntxent_similarities_stay_float32_under_bf16_autocast() -> None:
    out0, out1 = _pair(64, 32, seed=3)
    exact = NTXentLoss(0.1)(out0.double(), out1.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = NTXentLoss(0.1)(out0.float(), out1.float())
        theirs = LightlyNTXentLoss(0.1)(out0.float(), out1.float())
    assert ours.dtype == torch.float32
    assert abs(ours.double() - exact) < 1e-5
    assert abs(theirs.double() - exact) > 10 * abs(ours.double() - exact)  # bf16 logits


def test_ntxent_makes_no_host_synchronising_call() -> None:
    out0, out1 = _pair(8, 4, seed=1)
    with host_syncs() as ours:
        NTXentLoss(0.5)(out0.float(), out1.float()).backward()
    with host_syncs() as theirs:
        LightlyNTXentLoss(0.5)(out0.float(), out1.float()).backward()
    assert ours == []
    assert any("index" in op for op, _where in theirs)  # the detector sees lightly's mask


def test_ntxent_refuses_a_memory_bank_argument() -> None:
    with pytest.raises(TypeError):
        NTXentLoss(0.5, memory_bank_size=128)  # type: ignore[call-arg]


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: our loss and lightly's on this rank's shard, with gradients."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        out0, out1 = _pair(5, 4, seed=20 + rank)
        ours = _loss_and_grads(NTXentLoss(0.5, gather_distributed=True), out0.float(), out1.float())
        ref = _loss_and_grads(
            LightlyNTXentLoss(0.5, gather_distributed=True), out0.float(), out1.float()
        )
        alone = NTXentLoss(0.5)(out0.float(), out1.float())
        torch.save({"ours": ours, "ref": ref, "alone": alone}, f"{out}/rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_ntxent_equals_lightly_across_two_gloo_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for mine, theirs in zip(got["ours"], got["ref"]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        assert not torch.isclose(got["ours"][0], got["alone"])  # the other rank's negatives
