"""IDC as a PDD base method: multi-formation, mix init, the matching update, resume, end to end."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pdd_ray.config import load_config
from pdd_ray.distill.methods import METHODS, Conditioning, MethodContext, SettingsContext, StageSets, method_class
from pdd_ray.distill.methods.idc import IdcMethod, multiformation
from pdd_ray.errors import PddError
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.seeding import generator


CLASSES = 3
SPEC = ModelSpec("convnet", 1, CLASSES, 8, width=8, depth=2)


def _params(**kw):
    p = {"factor": 2, "batch_real": 16, "batch_syn_max": 128, "inner_loop": 4, "net_steps": 2, "batch_train": 32,
         "net_lr": 0.01, "net_momentum": 0.9, "net_weight_decay": 5e-4, "augment": None, "augment_mode": "all",
         "init": "mix", "stored_ipc": 2}
    p.update(kw)
    return p


def _task(frozen_per_class: int = 1, new_per_class: int = 2, augment: str = "crop_scale_rotate", **params):
    """A stage's method context: 20 real images per class whose classes differ in mean brightness."""
    g = generator(0)
    real_y = torch.arange(CLASSES).repeat_interleave(20)
    real_x = torch.randn(len(real_y), 1, 8, 8, generator=g) * 0.5 + real_y.view(-1, 1, 1, 1).float()
    frozen_y = torch.arange(CLASSES).repeat_interleave(frozen_per_class)
    new_y = torch.arange(CLASSES).repeat_interleave(new_per_class)
    frozen_x = torch.randn(len(frozen_y), 1, 8, 8, generator=g)
    new = torch.randn(len(new_y), 1, 8, 8, generator=g).requires_grad_(True)
    ctx = MethodContext(
        stage=1, seed=3, spec=SPEC, augment=augment, settings=_params(**params),
        sets=StageSets(frozen_images=frozen_x, frozen_labels=frozen_y, init_images=new.detach(), new_labels=new_y),
        conditioning=Conditioning("", None, []), real_ref=(real_x, real_y),
    )
    return ctx, new


def _update(method: IdcMethod, new: torch.Tensor, iteration: int = 0, seed: int = 7, rank: int = 0):
    return method.update(iteration, rank, new, torch.tensor(0.01), generator(seed))


# ----------------------------------------------------------------------------------------------
# registry and config
# ----------------------------------------------------------------------------------------------


def test_registered_and_config_checks_the_factor():
    assert method_class("idc") is IdcMethod and METHODS["idc"] is IdcMethod
    assert (IdcMethod.learns_alpha, IdcMethod.needs_trajectories, IdcMethod.needs_real_data) == (False, False, True)
    cfg = load_config("digits", ["method=idc", "idc.factor=4", "idc.lr_img=0.1"])
    assert cfg.distill.method == "idc" and IdcMethod.image_lr(cfg.distill, cfg.idc) == 0.1
    assert IdcMethod.stage_settings(SettingsContext(cfg.distill, 10, 1), cfg.idc)["factor"] == 4
    with pytest.raises(PddError, match=r"idc.factor = 3 does not divide the image size 8"):
        load_config("digits", ["distill.method=idc", "idc.factor=3"])
    load_config("digits", ["idc.factor=3"])  # another method: the idc section is not used
    with pytest.raises(PddError, match="augmentation family"):
        load_config("digits", ["distill.method=idc", "idc.augment=crp"])


# ----------------------------------------------------------------------------------------------
# multi-formation decode and mix init
# ----------------------------------------------------------------------------------------------


def test_decode_matches_a_hand_computation_and_repeats_labels():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    y = torch.tensor([3, 7])
    dx, dy = IdcMethod.decode({"factor": 2}, x, y)
    assert dx.shape == (8, 1, 4, 4)
    assert dy.tolist() == [3, 7] * 4  # patch-major: all images' patch (0,0), then (0,1), (1,0), (1,1)
    # bilinear x2 (align_corners=False) of a 2x2 patch P is U P U^T with these row weights
    u = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    for q, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for n in range(2):
            patch = x[n, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            assert torch.allclose(dx[q * 2 + n, 0], u @ patch @ u.T), (q, n)
    # factor 1 is the identity; a factor that does not divide the side is refused
    same, _ = IdcMethod.decode({"factor": 1}, x, y)
    assert same is x
    with pytest.raises(PddError, match="idc.factor = 3"):
        multiformation(x, y, 3)


def test_decode_is_differentiable_patch_by_patch():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    dx, _ = multiformation(x, torch.tensor([0, 1]), 2)
    dx[0].sum().backward()  # image 0's top-left patch only
    g = x.grad
    assert g[0, :, :4, :4].abs().min() > 0
    assert g[0, :, 4:, :].abs().sum() == 0 and g[0, :, :, 4:].abs().sum() == 0 and g[1].abs().sum() == 0


def test_mix_init_puts_downsampled_real_images_in_the_quadrants():
    g = generator(1)
    train_y = torch.arange(CLASSES).repeat_interleave(10)
    train_x = torch.randn(len(train_y), 1, 8, 8, generator=g)
    bundle = SimpleNamespace(train_x=train_x, train_y=train_y, num_classes=CLASSES)
    x, y = IdcMethod.init_images(_params(), bundle, 2, seed=0)
    assert x.shape == (CLASSES * 2, 1, 8, 8) and y.tolist() == [0, 0, 1, 1, 2, 2]
    small = F.avg_pool2d(train_x, 2)  # area downsampling by 2
    used = []
    for n in range(x.shape[0]):
        for i in range(2):
            for j in range(2):
                quad = x[n, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                hits = [r for r in range(len(train_x)) if torch.allclose(small[r], quad, atol=1e-6)]
                assert len(hits) == 1 and train_y[hits[0]] == y[n]
                used.append(hits[0])
    assert len(set(used)) == len(used)  # f^2 * ipc distinct real images per class
    again, _ = IdcMethod.init_images(_params(), bundle, 2, seed=0)
    assert torch.equal(x, again)
    assert IdcMethod.init_images(_params(init="real"), bundle, 2, seed=0) is None


# ----------------------------------------------------------------------------------------------
# the matching update
# ----------------------------------------------------------------------------------------------


def test_frozen_images_get_no_gradient_and_stay_bit_identical():
    task, new = _task()
    frozen_before = task.sets.frozen_images.clone()
    method = IdcMethod(task, torch.device("cpu"))
    res = _update(method, new)
    assert res.grad_images.shape == new.shape and torch.isfinite(res.grad_images).all()
    for c in range(CLASSES):  # every class's new images are matched
        assert res.grad_images[task.sets.new_labels == c].abs().sum() > 0
    assert not task.sets.frozen_images.requires_grad and task.sets.frozen_images.grad is None
    assert torch.equal(task.sets.frozen_images, frozen_before)
    # the frozen stages do take part in the synthetic batch: other frozen images, other loss
    task2, _ = _task()
    task2 = replace(task2, sets=replace(task2.sets, frozen_images=task2.sets.frozen_images + 1.0))
    assert _update(IdcMethod(task2, torch.device("cpu")), new).loss != res.loss


def test_matching_loss_falls_on_a_fixed_network():
    task, new = _task(frozen_per_class=0, augment="none", inner_loop=1000, net_steps=0)
    method = IdcMethod(task, torch.device("cpu"))
    opt = torch.optim.SGD([new], lr=0.05, momentum=0.5)
    losses = []
    for _ in range(15):
        res = _update(method, new, iteration=0, seed=11)  # same network, same real batch
        losses.append(res.loss)
        new.grad = res.grad_images
        opt.step()
        with torch.no_grad():
            method.project(new)
    assert losses[-1] < 0.7 * losses[0], losses


def test_project_clamps_to_the_real_pixel_range():
    task, new = _task()
    method = IdcMethod(task, torch.device("cpu"))
    real_x = task.real_ref[0]
    x = torch.full_like(new, 100.0)
    x[0] = -100.0
    method.project(x)
    assert torch.equal(x[1], torch.full_like(x[1], real_x.max().item()))
    assert torch.equal(x[0], torch.full_like(x[0], real_x.min().item()))


def test_same_seeds_same_update_and_rank_changes_the_draws():
    task, new = _task()
    a = _update(IdcMethod(task, torch.device("cpu")), new, iteration=2)
    b = _update(IdcMethod(task, torch.device("cpu")), new, iteration=2)
    assert a.loss == b.loss and torch.equal(a.grad_images, b.grad_images)
    c = _update(IdcMethod(task, torch.device("cpu")), new, iteration=2, rank=1)
    assert not torch.equal(a.grad_images, c.grad_images)


def test_resumed_network_equals_the_uninterrupted_one():
    """update(i) in a fresh instance (a worker restarted from a checkpoint at i) equals update(i)
    after 0..i-1 ran in the same instance: the network is rebuilt and its training replayed."""
    task, new = _task(inner_loop=4, net_steps=2)
    running = IdcMethod(task, torch.device("cpu"))
    seq = {it: _update(running, new, iteration=it, seed=100 + it) for it in range(7)}
    for it in (1, 3, 4, 6):  # inside block 0, the first of block 1, inside block 1
        fresh = _update(IdcMethod(task, torch.device("cpu")), new, iteration=it, seed=100 + it)
        assert fresh.loss == seq[it].loss and torch.equal(fresh.grad_images, seq[it].grad_images), it
    # the network really trains between matching steps (so the replay matters) and is
    # re-drawn every inner_loop iterations
    m = IdcMethod(task, torch.device("cpu"))
    w0 = FlatModel(m.network(0, 0)).flatten()
    w3 = FlatModel(m.network(3, 0)).flatten()
    w4 = FlatModel(m.network(4, 0)).flatten()
    w4_fresh = FlatModel(IdcMethod(task, torch.device("cpu")).network(4, 0)).flatten()
    assert not torch.equal(w0, w3) and not torch.equal(w3, w4) and not torch.equal(w0, w4)
    assert torch.equal(w4, w4_fresh)


class _Nets:
    """Two known conditioning networks (stage k > 1)."""

    def __init__(self) -> None:
        self.indices = [4, 9]
        self.flat = {i: FlatModel(build_seeded(SPEC, 100 + i)).flatten() for i in self.indices}

    def __len__(self) -> int:
        return len(self.indices)

    def weights(self, index: int, epoch: int, device: torch.device) -> torch.Tensor:
        assert epoch == 0  # snapshot 0: the network trained on S_<k
        return self.flat[index].to(device)


def test_later_stages_draw_the_matching_network_from_the_pool():
    task, _ = _task(inner_loop=1)
    used = set()
    for block in range(8):
        method = IdcMethod(task, torch.device("cpu"))
        method.nets = _Nets()
        w = FlatModel(method.network(block, 0)).flatten()  # inner_loop 1: a new network, no training yet
        hits = [i for i, f in method.nets.flat.items() if torch.equal(w, f)]
        assert len(hits) == 1
        used.add(hits[0])
    assert used == {4, 9}


# ----------------------------------------------------------------------------------------------
# end to end: two tiny stages through the driver
# ----------------------------------------------------------------------------------------------

IDC_OVERRIDES = ["method=idc", "idc.factor=2", "idc.batch_real=16", "idc.inner_loop=2", "idc.net_steps=1",
                 "idc.batch_train=64", "distill.iterations=4"]


@pytest.fixture(scope="module")
def idc_run(ray_session, tmp_path_factory, frozen_spy, tiny_overrides):
    from pdd_ray.distill import driver
    from pdd_ray.prepare import prepare

    out = tmp_path_factory.mktemp("idc")
    cfg = load_config("digits", tiny_overrides(str(out)) + IDC_OVERRIDES)
    prepared = prepare(cfg)
    with frozen_spy() as frozen_seen:
        result = driver.distill(cfg, prepared, progress=False)
    return cfg, prepared, result, frozen_seen


def test_two_stages_stored_frozen_and_decoded(idc_run):
    from pdd_ray.distill.records import load_stage

    cfg, prepared, result, frozen_seen = idc_run
    n_stored = prepared.bundle.num_classes * cfg.distill.ipc_per_stage
    f2 = cfg.idc.factor**2
    assert len(result.outcomes) == 2 and result.expert_keys[0] is None and result.expert_keys[1] is not None
    for out, stage in zip(result.outcomes, result.stages):
        assert out.images.shape == (n_stored, 1, 8, 8)
        assert len(out.losses) == cfg.distill.iterations and all(l == l for l in out.losses)
        assert stage.images.shape == (n_stored * f2, 1, 8, 8)
        assert torch.equal(stage.labels, out.labels.repeat(f2))
    recorded = load_stage(result.directory, 1)
    assert torch.equal(frozen_seen[2][0], recorded.images)  # stage 2 froze stage 1's stored images
    assert torch.equal(result.outcomes[0].images, recorded.images)
    assert not torch.equal(result.outcomes[0].images, result.outcomes[1].images)


def test_artifact_holds_decoded_images_and_records_the_decode(idc_run):
    from pdd_ray.distill.artifact import load_distilled

    cfg, prepared, result, _ = idc_run
    art = load_distilled(result.artifact)
    n_stored = sum(o.images.shape[0] for o in result.outcomes)
    assert art.images.shape[0] == n_stored * cfg.idc.factor**2
    for a, s in zip(art.stages, result.stages):
        assert torch.equal(a.images, s.images) and torch.equal(a.labels, s.labels)
    dec = art.manifest["decode"]
    assert dec["kind"] == "multiformation" and dec["factor"] == cfg.idc.factor
    assert dec["stored_images_per_class"] == cfg.distill.ipc_per_stage


def test_run_table_counts_stored_images_and_shows_the_decoded_ones(idc_run):
    """The budget is stored images per class (what the random baseline is compared at)."""
    import numpy as np

    from pdd_ray.evaluation import EvalResult
    from pdd_ray.pipeline import RunReport

    cfg, _, result, _ = idc_run
    scores = {"test": np.full((2, 2), 0.5)}
    rows = RunReport(result, {"convnet": EvalResult("pdd", "convnet", scores)}, None, None).rows()
    ipc, f2 = cfg.distill.ipc_per_stage, cfg.idc.factor**2
    assert [r[1] for r in rows] == [f"ipc {ipc} ({ipc * f2} decoded)", f"ipc {2 * ipc} ({2 * ipc * f2} decoded)"]
