from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ssl_robust.methods import BYOL, METHODS, SimCLR
from ssl_robust.methods.monitor import OnlineMonitor, knn_accuracy_counts
from ssl_robust.methods.optim import OptimizerSpec, scaled_lr
from ssl_robust.models.backbones import build_backbone
from ssl_robust.pipelines import build_method, pretrain
from tests.callbacks import RecordHostSyncs


def _method(name: str, **kw: Any) -> pl.LightningModule:
    torch.manual_seed(0)
    enc = build_backbone("convnet", width=4)
    extra = {"temperature": 0.5} if name == "simclr" else {"pred_hidden_dim": 16, "base_tau": 0.9}
    return METHODS[name](
        backbone=enc,
        num_classes=3,
        batch_size_per_device=16,
        optimizer=OptimizerSpec(),
        proj_hidden_dim=16,
        proj_out_dim=8,
        knn_k=5,
        **extra,
        **kw,
    )


def _views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=g)
    return [
        x + 0.05 * torch.randn(x.shape, generator=g),
        x + 0.05 * torch.randn(x.shape, generator=g),
    ]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fast_dev_run_every_method(name: str, tiny_pretrain_cfg: Callable[..., DictConfig]) -> None:
    metrics = pretrain(tiny_pretrain_cfg(f"method={name}", "trainer.fast_dev_run=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


class _Layout(pl.Callback):
    """Records whether each view of a training batch is channels_last and, for every call of
    the online backbone in a training step: the autocast dtype (None: off), whether its input
    and the first conv's weights are channels_last, and the dtype of the features."""

    def __init__(self) -> None:
        self.views: list[bool] = []
        self.calls: list[tuple[Any, bool, bool, torch.dtype]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        self.views += [v.is_contiguous(memory_format=torch.channels_last) for v in batch[0]]

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        conv = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d))

        def hook(backbone: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            if not backbone.training:
                return  # a validation call
            on = torch.is_autocast_enabled("cpu")
            self.calls.append(
                (
                    torch.get_autocast_dtype("cpu") if on else None,
                    args[0].is_contiguous(memory_format=torch.channels_last),
                    conv.weight.is_contiguous(memory_format=torch.channels_last),
                    out.dtype,
                )
            )

        module.backbone.register_forward_hook(hook)


@pytest.mark.parametrize(
    ("overrides", "autocast", "channels_last"),
    [
        (("optim.name=lars",), None, False),
        (("trainer.precision=bf16-mixed", "trainer.channels_last=true"), torch.bfloat16, True),
        (("method=byol", "data.augment=gpu", "trainer.channels_last=true"), None, True),
        (("method=byol", "trainer.precision=bf16-mixed"), torch.bfloat16, False),
    ],
    ids=["lars", "bf16-channels-last", "byol-device-views", "byol-bf16"],
)
def test_fast_dev_run_options(
    overrides: tuple[str, ...],
    autocast: torch.dtype | None,
    channels_last: bool,
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    layout = _Layout()
    metrics = pretrain(tiny_pretrain_cfg(*overrides, "trainer.fast_dev_run=true"), [layout])
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # One training step (fast_dev_run), the online backbone once per view: in the precision and
    # the memory format asked for, views and weights alike.
    assert layout.views == [channels_last] * 2
    features = autocast or torch.float32
    assert layout.calls == [(autocast, channels_last, channels_last, features)] * 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_decreases_on_a_fixed_batch(name: str) -> None:
    model = _method(name)
    views = _views()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss, _ = model.ssl_loss(views)  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_views_pass_separately_or_jointly_through_batchnorm() -> None:
    from ssl_robust.methods.views import forward_views

    bn = torch.nn.BatchNorm1d(3, affine=False)  # training mode: the pass's own statistics
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 3, generator=g), 5.0 + 2.0 * torch.randn(6, 3, generator=g)]

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return bn(x), 2 * x

    apart = forward_views(fn, views, joint=False)
    together = forward_views(fn, views, joint=True)
    for (normed, doubled), v in zip(apart, views):
        # Each view normalised by its own statistics: zero mean per channel.
        torch.testing.assert_close(normed.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
        torch.testing.assert_close(doubled, 2 * v)
    # One pass: the views share the statistics; the second (mean 5) lies above the first.
    joint_normed = torch.cat([together[0][0], together[1][0]])
    torch.testing.assert_close(joint_normed.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    assert (together[1][0].mean(0) > 0.8).all() and (together[0][0].mean(0) < -0.8).all()
    torch.testing.assert_close(together[1][1], 2 * views[1])
    # Views of other sizes keep theirs.
    uneven = forward_views(fn, [views[0][:2], views[1][:5]], joint=True)
    assert [len(out[1]) for out in uneven] == [2, 5]
    torch.testing.assert_close(uneven[1][1], 2 * views[1][:5])


@pytest.mark.parametrize("joint", [False, True])
def test_simclr_loss_follows_lightlys_benchmark_step(joint: bool) -> None:
    # lightly's CIFAR-10 benchmark: z0 = forward(x0); z1 = forward(x1); NTXentLoss(z0, z1) --
    # one pass per view (joint_views=false); joint_views=true passes both at once.
    from lightly.loss import NTXentLoss as LightlyNTXent

    model = _method("simclr", joint_views=joint)
    x0, x1 = _views()
    loss, features = model.ssl_loss([x0, x1])  # type: ignore[operator]
    head, backbone = model.projection_head, model.backbone
    if joint:
        f = backbone(torch.cat([x0, x1]))
        z0, z1 = head(f).chunk(2)
        f0 = f[:16]
    else:
        f0 = backbone(x0)
        z0, z1 = head(f0), head(backbone(x1))
    torch.testing.assert_close(loss, LightlyNTXent(temperature=0.5)(z0, z1))
    torch.testing.assert_close(features, f0)


@pytest.mark.parametrize("joint", [False, True])
def test_byol_loss_follows_lightlys_benchmark_step(joint: bool) -> None:
    # lightly's benchmark: p0 = forward(x0), z0 = forward_momentum(x0), p1, z1 the same for x1,
    # loss 0.5 (criterion(p0, z1) + criterion(p1, z0)) with lightly's negative cosine; here
    # that plus 1, so the gradients (and what the presets' learning rate does) are lightly's.
    from lightly.loss import NegativeCosineSimilarity

    model = _method("byol", joint_views=joint)
    m: Any = model
    x0, x1 = _views()
    loss, features = model.ssl_loss([x0, x1])  # type: ignore[operator]

    def online(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = m.backbone(x)
        return f, m.prediction_head(m.projection_head(f))

    def target(x: torch.Tensor) -> torch.Tensor:
        return m.projection_head_momentum(m.backbone_momentum(x))

    if joint:
        f, p = online(torch.cat([x0, x1]))
        (p0, p1), (z0, z1), f0 = p.chunk(2), target(torch.cat([x0, x1])).chunk(2), f[:16]
    else:
        (f0, p0), (_, p1), z0, z1 = online(x0), online(x1), target(x0), target(x1)
    criterion = NegativeCosineSimilarity()
    lightly_loss = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    torch.testing.assert_close(loss, 1.0 + lightly_loss)
    cos = F.cosine_similarity  # known form: 1 - the mean cosine of the two directions
    expected = 1.0 - 0.5 * (cos(p0, z1).mean() + cos(p1, z0).mean())
    torch.testing.assert_close(loss, expected)
    # The same gradients as lightly's loss.
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss, params, allow_unused=True)
    theirs = torch.autograd.grad(lightly_loss, params, allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(features, f0)
    # The two ways differ: BatchNorm sees other batches.
    other = _method("byol", joint_views=not joint)
    assert not torch.allclose(other.ssl_loss([x0, x1])[0], loss)  # type: ignore[operator]


def test_build_method_rejects_unknown(tiny_pretrain_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_pretrain_cfg()
    cfg.method.name = "swav"
    with pytest.raises(
        ValueError, match=r"unknown method 'swav'; choose from \['byol', 'simclr'\]"
    ):
        build_method(cfg, build_backbone("convnet", 4), 10)


class _Capture(pl.Callback):
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        online = [p.detach().clone() for p in module.backbone.parameters()]
        target = [p.detach().clone() for p in module.backbone_momentum.parameters()]
        self.records.append({"online": online, "target": target, "tau": module.momentum()})

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, out: Any, batch: Any, idx: int
    ) -> None:
        self.records[-1]["target_after"] = [
            p.detach().clone() for p in module.backbone_momentum.parameters()
        ]
        opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.records[-1]["target_in_optimizer"] = any(
            id(p) in opt_ids for p in module.backbone_momentum.parameters()
        )


def test_byol_target_is_a_momentum_copy(tiny_pretrain_cfg: Callable[..., DictConfig]) -> None:
    cap = _Capture()
    pretrain(
        tiny_pretrain_cfg("method=byol", "method.base_tau=0.9", "trainer.max_epochs=1"),
        callbacks=[cap],
    )
    assert len(cap.records) == 3
    for rec in cap.records:
        assert not rec["target_in_optimizer"]
        tau = rec["tau"]
        for o, t, t_after in zip(rec["online"], rec["target"], rec["target_after"]):
            # update_momentum: target <- tau * target + (1 - tau) * online, before the step.
            torch.testing.assert_close(t_after, tau * t + (1 - tau) * o)
    # The schedule rises from base_tau to 1 along a half cosine over the run's 3 optimizer steps
    # (lightly's cosine_schedule reaches the end value at the last step).
    assert [r["tau"] for r in cap.records] == pytest.approx([0.9, 0.95, 1.0])


def test_knn_matches_hand_computed_example() -> None:
    # Bank on the unit circle; labels 0 near angle 0, 1 near angle pi/2.
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    bank_labels = torch.tensor([0, 0, 1, 1, 1])
    # Query at 20 degrees with k=5, t=0.1: class weights sum exp(cos/t) per class.
    q = torch.tensor([[0.94, 0.34]])
    bn = torch.nn.functional.normalize(bank, dim=1)
    qn = torch.nn.functional.normalize(q, dim=1)
    sims = (qn @ bn.t())[0]
    w0 = torch.exp(sims[:2] / 0.1).sum()
    w1 = torch.exp(sims[2:] / 0.1).sum()
    expected = 0 if w0 > w1 else 1
    assert expected == 0  # by hand: cos(20deg) terms dominate
    assert int(knn_accuracy_counts(q, torch.tensor([0]), bank, bank_labels, 2, k=5, t=0.1)) == 1
    # With k=3 only the three most similar vote: [1,0], [0.9,0.1] and [0.2,1.0] -> still class 0.
    assert int(knn_accuracy_counts(q, torch.tensor([0]), bank, bank_labels, 2, k=3, t=0.1)) == 1
    # A query at 80 degrees goes to class 1; scale of features does not matter (cosine).
    q2 = torch.tensor([[0.17, 0.98]]) * 7.0
    assert (
        int(knn_accuracy_counts(q2, torch.tensor([1]), bank * 3.0, bank_labels, 2, k=5, t=0.1)) == 1
    )


def test_monitor_gathers_bank_and_scores() -> None:
    mon = OnlineMonitor(feat_dim=2, num_classes=2, knn_k=2, knn_t=0.1)
    mon.add_to_bank(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    stats = mon.evaluate(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), torch.tensor([0, 1]))
    assert float(stats["val/knn_acc"]) == 1.0 and "val/online_acc" in stats
    mon.reset_bank()
    with pytest.raises(RuntimeError, match="bank is empty"):
        mon.evaluate(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_online_probe_never_backpropagates_into_encoder(name: str) -> None:
    model = _method(name)
    views, labels = _views(), torch.randint(0, 3, (16,))
    model.trainer = pl.Trainer(
        max_steps=1, logger=False, enable_progress_bar=False
    )  # for momentum()
    model.trainer.fit_loop.epoch_loop  # noqa: B018 - attached only for estimated_stepping_batches
    model.log = lambda *a, **k: None  # type: ignore[method-assign]
    if isinstance(model, BYOL):
        model.momentum = lambda: 1.0  # type: ignore[method-assign]  # no target update in this test
    total = model.training_step((views, labels), 0)
    total.backward()
    with_probe = [p.grad.clone() for p in model.backbone.parameters()]
    probe_grad = model.monitor.probe.weight.grad  # type: ignore[union-attr]
    assert probe_grad is not None and probe_grad.abs().sum() > 0  # the probe does learn
    model.zero_grad()
    ssl, _ = model.ssl_loss(views)  # type: ignore[operator]
    ssl.backward()
    for a, p in zip(with_probe, model.backbone.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)


def test_lr_scaling_rule() -> None:
    assert scaled_lr(0.06, 512, 128, "linear") == pytest.approx(0.24)
    assert scaled_lr(0.06, 512, 128, "sqrt") == pytest.approx(0.12)
    assert scaled_lr(0.06, 512, 128, "none") == pytest.approx(0.06)
    with pytest.raises(ValueError, match="lr_scaling"):
        OptimizerSpec(lr_scaling="cubic")
    with pytest.raises(
        ValueError, match=r"unknown optimizer 'adam'; choose from \['lars', 'sgd'\]"
    ):
        OptimizerSpec(name="adam")


def test_simclr_and_byol_are_registered() -> None:
    assert {"byol": BYOL, "simclr": SimCLR} == METHODS


@pytest.mark.slow
def test_compiled_backbone_trains_and_exports_plain_weights(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    cfg = tiny_pretrain_cfg("model.compile=true", "trainer.max_epochs=1")
    metrics = pretrain(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    from ssl_robust.models.export import load_encoder

    enc, _ = load_encoder(cfg.run.dir)  # keys without torch.compile's "_orig_mod." prefix
    assert all("_orig_mod" not in k for k in enc.state_dict())


def test_probe_step_ignores_unlabeled_images_like_dropping_them() -> None:
    torch.manual_seed(0)
    monitor = OnlineMonitor(feat_dim=6, num_classes=3, knn_k=5, knn_t=0.1, probe=True)
    features = torch.randn(8, 6)
    labels = torch.tensor([0, -1, 2, 1, -1, 2, 0, -1])
    loss, acc = monitor.probe_step(features, labels)
    keep = labels >= 0
    assert monitor.probe is not None
    logits = monitor.probe(features[keep])
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels[keep]))
    torch.testing.assert_close(acc, (logits.argmax(1) == labels[keep]).float().mean())
    # Only unlabeled images: no loss and no accuracy, rather than NaN.
    loss, acc = monitor.probe_step(features, torch.full((8,), -1))
    assert loss.item() == 0.0 and acc.item() == 0.0


@pytest.mark.parametrize("decay_all", [False, True])
def test_norms_and_biases_decay_only_when_asked(decay_all: bool) -> None:
    from types import SimpleNamespace

    from ssl_robust.methods.optim import configure

    backbone = build_backbone("convnet", width=4)
    trainer = SimpleNamespace(
        world_size=1, accumulate_grad_batches=1, estimated_stepping_batches=10, max_epochs=1
    )
    spec = OptimizerSpec(weight_decay=5e-4, decay_norm_bias=decay_all)
    config, _ = configure(SimpleNamespace(trainer=trainer), spec, 16, [backbone], None)  # type: ignore[arg-type]
    decay_of = {
        id(p): g["weight_decay"] for g in config["optimizer"].param_groups for p in g["params"]
    }
    norm_bias = [p for p in backbone.parameters() if p.ndim <= 1]
    assert norm_bias and all(decay_of[id(p)] == (5e-4 if decay_all else 0.0) for p in norm_bias)
    assert all(decay_of[id(p)] == 5e-4 for p in backbone.parameters() if p.ndim > 1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_model_compile_compiles_every_encoder_a_step_runs(
    name: str, tiny_pretrain_cfg: Callable[..., DictConfig]
) -> None:
    """BYOL deep-copies its backbone for the momentum target before model.compile applies:
    compiling only `backbone` left the target running eagerly in every step."""
    from ssl_robust.methods import compile_backbones

    cfg = tiny_pretrain_cfg(f"method={name}")
    method = build_method(cfg, build_backbone("convnet", 4), 10)
    keys = set(method.state_dict())
    compile_backbones(method)
    encoders = [m for n, m in method.named_children() if n in ("backbone", "backbone_momentum")]
    assert len(encoders) == (2 if name == "byol" else 1)
    assert all(m._compiled_call_impl is not None for m in encoders)
    assert set(method.state_dict()) == keys  # checkpoints and exports keep their keys


def test_the_knn_monitor_runs_in_float32_under_bf16_autocast() -> None:
    """lightly's benchmark (84.8 / 86.8) computed the similarities in float32; under a bf16
    autocast they were bf16 products."""
    torch.manual_seed(0)
    bank = torch.randn(500, 64)
    bank_labels = torch.randint(0, 10, (500,))
    query = bank[:200] + 0.3 * torch.randn(200, 64)
    labels = bank_labels[:200]
    plain = knn_accuracy_counts(query, labels, bank, bank_labels, 10, k=20, t=0.1)
    seen = []
    real_mm = torch.mm

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real_mm(a, b)
        seen.append(out.dtype)
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "mm", mm)
        under_autocast = knn_accuracy_counts(query, labels, bank, bank_labels, 10, k=20, t=0.1)
    assert seen and all(d == torch.float32 for d in seen)
    assert int(under_autocast) == int(plain)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_steps_make_no_host_synchronising_call(
    name: str, tiny_pretrain_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU one such call per step (an .item(), a boolean mask) makes the host wait for the
    # device, so Lightning's per-step host work becomes GPU idle time (BENCHMARKS.md). Each
    # step is recorded up to the next one's start: Lightning's metric handling after the step
    # (a prog_bar=True metric is read every step) and the next batch's views included. The
    # loggers' .item() every trainer.log_every_n_steps steps is kept out by a long interval.
    from ssl_robust.data import gpu_views

    # The views as on a GPU: the CPU's hue path gathers by index (a nonzero) on purpose.
    jitter = gpu_views.color_jitter

    def gpu_path(*args: Any, **kwargs: Any) -> torch.Tensor:
        return jitter(*args, **{**kwargs, "hue_by_index": False})

    monkeypatch.setattr(gpu_views, "color_jitter", gpu_path)
    record = RecordHostSyncs()
    pretrain(
        tiny_pretrain_cfg(f"method={name}", "data.augment=gpu", "trainer.log_every_n_steps=1000"),
        [record],
    )
    assert len(record.per_step) == 6  # 2 epochs x 3 batches, each recorded
    assert [found for found in record.per_step if found] == []


def test_the_host_sync_recorder_sees_what_makes_a_gpu_wait() -> None:
    from tests.helpers import host_syncs

    x = torch.arange(6.0)
    mask = x > 2
    with host_syncs() as found:
        x.sum() * 2 + x.mean()  # stays on the device
        torch.where(mask, x, 0.0)
        x.masked_fill(mask, 0.0)
    assert found == []
    with host_syncs() as found:
        x[mask]  # a nonzero inside
        x[mask] = 0.0
        float(x.sum())
        bool(mask.any())
        mask.nonzero()
    ops = [op.split(".")[1] for op, _where in found]
    assert ops == ["index", "index_put_", "_local_scalar_dense", "_local_scalar_dense", "nonzero"]
    assert all("tests/test_methods.py:" in where for _op, where in found)  # where they are
