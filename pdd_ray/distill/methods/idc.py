"""IDC as a base method (Kim et al. 2022, "Dataset Condensation via Efficient Synthetic-Data
Parameterization"), the second base method of the PDD paper (pdd-reference §10).

What is stored and what is trained on
    **Multi-formation** (``decode``): every stored H×W image holds an f×f grid of
    (H/f)×(W/f) patches; each patch, bilinearly upsampled back to H×W, is one training image,
    so N stored images decode to N·f² training images (labels repeated). The stage loop
    optimises and freezes *stored* images; everything that trains on a union (validation,
    transitions, evaluation, the artifact) sees decoded ones. Output order follows IDC's
    ``decode_zoom``: patch-major — all images' patch (0, 0), then all images' patch (0, 1), …
    — labels ``labels.repeat(f*f)``.

Initialisation (``init_images``, IDC's ``mix``)
    f² real images of the class are downsampled (area averaging; IDC uses nearest) into the
    f×f quadrants of one stored image. ``idc.init: real`` keeps the driver's one real image
    per stored image.

One outer iteration (``update``) = one IDC inner iteration
    For every class: a real batch of ``batch_real`` images and the class's decoded synthetic
    images (frozen stages decoded once as constants, the new ones decoded differentiably;
    at most ``batch_syn_max`` of them, sampled with ``g``) are concatenated and augmented
    with ONE shared DSA parameter draw (Siamese); the cross-entropy gradients of the
    network's **conv weights only** (4-D parameters: biases, norm parameters and the
    classifier are skipped) on real (no graph) and synthetic (``create_graph``) data are
    compared with the sum of squared differences (IDC's ``metric='mse'``), summed over
    classes. IDC steps the images after each class; here the per-class gradients are summed
    into one image step. Each class's loss only reaches that class's images, so the summed
    gradient is exactly the per-class gradients side by side -- but with momentum 0.5 this is
    NOT IDC's update: each of IDC's per-class steps also applies every other class's decaying
    momentum buffer, so over one outer iteration IDC's images move by a different (larger)
    amount. A deliberate simplification (one optimiser step and one all-reduce per iteration).

The matching network, and why a resumed run equals an uninterrupted one
    IDC builds a network, then alternates matching with one pass of real-data training, and
    re-creates the network every ``inner_loop`` inner iterations. Here the network of
    iteration ``i`` on worker ``rank`` is *defined* as: block ``b = i // inner_loop``; a
    network built from ``derive_seed(seed, "stage", k, "idc-net", b, "rank", rank)`` (stage 1:
    a fresh random ConvNet; stage k > 1: one of the conditioning networks — networks trained
    on the decoded union S_<k by the transition — picked with that seed); then, for each
    earlier iteration ``j`` of the block, ``net_steps`` SGD steps (lr ``net_lr``, momentum,
    weight decay) on ``batch_train`` per-sample-augmented real images drawn from
    ``derive_seed(…, "idc-train", j, "rank", rank)``. The network only ever sees real data, so
    this does not depend on the images. The instance caches the network and advances it
    incrementally; any other call (a fresh worker after a restart from a checkpoint, a
    different rank) rebuilds it and replays at most ``inner_loop - 1`` iterations' training,
    so ``update(i)`` is bit-identical whether iterations 0..i-1 ran in this process or not.

Conditioning (PDD on IDC)
    The official code trains a *new* random network on the earlier unions (200 epochs each)
    at every outer iteration. We instead sample from a set of networks trained once per stage
    by the transition (``distill.transition_syn_epochs`` on the decoded union, the same conditioning networks
    every base method without trajectories uses), then keep training the drawn network on
    real data as IDC does. Cheaper by the number of networks, and they still start from S_<k.

Projection
    IDC clamps pixels to [0, 1] before its normalisation. Our images live in model space
    (mean/std normalised or ZCA-whitened), so ``project`` clamps the new stored images to the
    per-channel [min, max] of the real training images in that space — exactly IDC's box for
    mean/std data whose pixels span [0, 1], a loose box under ZCA. We clamp after every image
    step; IDC clamps at the start of every outer iteration.

Other departures from the official code: no CutMix in the network's real-data training
(only DSA per sample); the DSA strategy is ``idc.augment`` (default: ``augment.strategy``)
applied with all families at once (``idc.augment_mode: all``), IDC uses ``color_crop_cutout``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pdd_ray.augment import DiffAugment
from pdd_ray.config import DistillConfig, IdcConfig
from pdd_ray.distill.methods.base import BaseMethod, MethodContext, SettingsContext, Update
from pdd_ray.errors import PddError
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import build_seeded
from pdd_ray.seeding import derive_seed, generator
from pdd_ray.sgd import SGD


def multiformation(images: torch.Tensor, labels: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N stored images → N·factor² training images (patch-major order, labels repeated).

    Differentiable: each (H/f)×(W/f) patch is bilinearly upsampled (``align_corners=False``,
    as IDC's ``nn.Upsample``) back to H×W. ``factor`` 1 is the identity.
    """
    if factor == 1:
        return images, labels
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise PddError(f"idc.factor = {factor} does not divide the image size {h}x{w}; pick a factor that divides it")
    ph, pw = h // factor, w // factor
    patches = [images[:, :, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] for i in range(factor) for j in range(factor)]
    decoded = F.interpolate(torch.cat(patches), size=(h, w), mode="bilinear", align_corners=False)
    return decoded, labels.repeat(factor * factor)


def mix_images(real: torch.Tensor, factor: int) -> torch.Tensor:
    """IDC's ``mix`` init: ``factor²`` groups of real images → one stored image per group member.

    ``real`` holds ``factor² · n`` images; image ``q · n + m`` (quadrant ``q = i·f + j``,
    row-major) is area-downsampled into quadrant (i, j) of stored image ``m``.
    """
    n = real.shape[0] // (factor * factor)
    h, w = real.shape[-2:]
    ph, pw = h // factor, w // factor
    out = real.new_zeros((n, *real.shape[1:]))
    for i in range(factor):
        for j in range(factor):
            q = i * factor + j
            out[:, :, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] = F.interpolate(
                real[q * n : (q + 1) * n], size=(ph, pw), mode="area")
    return out


class IdcMethod(BaseMethod):
    """Gradient matching of conv weights on multi-formation-decoded synthetic images (see module doc)."""

    name = "idc"
    learns_alpha = False
    needs_trajectories = False
    needs_real_data = True
    section = "idc"

    def __init__(self, ctx: MethodContext, device: torch.device) -> None:
        super().__init__(ctx, device)
        p = self.settings
        self.real_x, self.real_y, self.real_idx = self.load_real()
        dims = [0, 2, 3]
        self.pix_min = self.real_x.amin(dim=dims).view(1, -1, 1, 1)
        self.pix_max = self.real_x.amax(dim=dims).view(1, -1, 1, 1)
        self.new_y = ctx.sets.new_labels.to(device)
        self.classes = sorted(set(self.new_y.tolist()))
        self.new_idx = {c: torch.nonzero(self.new_y == c).flatten() for c in self.classes}
        with torch.no_grad():
            fx, fy = multiformation(ctx.sets.frozen_images.to(device), ctx.sets.frozen_labels.to(device), p["factor"])
        self.frozen_dec = {c: fx[fy == c] for c in self.classes}
        strategy = p["augment"] if p["augment"] is not None else ctx.augment
        self.dsa = DiffAugment(strategy, mode=p["augment_mode"])  # Siamese draws for matching
        self.dsa_train = DiffAugment(strategy)  # per-sample draws for the network's real-data steps
        self._net: torch.nn.Module | None = None
        self._opt: SGD | None = None
        self._key: tuple[int, int] | None = None  # (block, rank) of the cached network
        self._done = 0  # the cached network has been trained after iterations [block start, _done)

    # ------------------------------------------------------------------------------------------
    # static facts
    # ------------------------------------------------------------------------------------------

    @classmethod
    def stage_settings(cls, ctx: SettingsContext, section: IdcConfig) -> dict[str, Any]:
        i = section
        return {"factor": i.factor, "batch_real": i.batch_real, "batch_syn_max": i.batch_syn_max,
                "inner_loop": i.inner_loop, "net_steps": i.net_steps, "batch_train": i.batch_train,
                "net_lr": i.net_lr, "net_momentum": i.net_momentum, "net_weight_decay": i.net_weight_decay,
                "augment": i.augment, "augment_mode": i.augment_mode, "init": i.init,
                "stored_ipc": ctx.distill.ipc_per_stage}

    @classmethod
    def image_lr(cls, distill: DistillConfig, section: IdcConfig) -> float:
        return section.lr_img

    @classmethod
    def decode(cls, settings: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return multiformation(images, labels, int(settings["factor"]))

    @classmethod
    def decode_info(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """What the artifact records about the decode (its stage files hold decoded images)."""
        f = int(settings["factor"])
        return {"kind": "multiformation", "factor": f, "stored_images_per_class": settings.get("stored_ipc"),
                "decoded_per_stored": f * f, "order": "patch-major (all images' patch (0,0), then (0,1), ...)",
                "note": "stage files hold the decoded training images; each stored image was an f x f grid of "
                        "patches, each bilinearly upsampled to full size"}

    @classmethod
    def init_images(cls, settings: dict[str, Any], bundle, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """IDC's ``mix`` init: ``ipc`` stored images per class, class-major, each made of f² real
        images of its class downsampled into the f×f quadrants; None for ``init: real`` (the
        driver then uses one real image per stored image)."""
        f = int(settings["factor"])
        if settings.get("init", "mix") != "mix" or f == 1:
            return None
        g = generator(derive_seed(seed, "idc-mix-init", ipc, f))
        xs, ys = [], []
        need = ipc * f * f
        for c in range(bundle.num_classes):
            idx = torch.nonzero(bundle.train_y == c).flatten()
            if idx.numel() == 0:
                continue
            order = torch.randperm(idx.numel(), generator=g)
            if order.numel() < need:  # tiny classes: cycle through them
                order = order.repeat((need + order.numel() - 1) // order.numel())
            xs.append(mix_images(bundle.train_x[idx[order[:need]]], f))
            ys.append(bundle.train_y[idx[:1]].repeat(ipc))
        return torch.cat(xs), torch.cat(ys)

    # ------------------------------------------------------------------------------------------
    # per-iteration work
    # ------------------------------------------------------------------------------------------

    def project(self, images: torch.Tensor) -> None:
        images.clamp_(min=self.pix_min, max=self.pix_max)

    def _build(self, block: int, rank: int) -> None:
        p = self.settings
        seed = derive_seed(self.ctx.seed, "stage", self.ctx.stage, "idc-net", block, "rank", rank)
        net = build_seeded(self.ctx.spec, seed).to(self.device)
        if len(self.nets):
            pick = self.nets.indices[int(torch.randint(len(self.nets), (1,), generator=generator(seed)))]
            FlatModel(net).load_flat(self.nets.weights(pick, 0, self.device))
        net.train()
        self._net = net
        self._opt = SGD(net.parameters(), lr=p["net_lr"], momentum=p["net_momentum"],
                        weight_decay=p["net_weight_decay"])
        self._key = (block, rank)
        self._done = block * p["inner_loop"]

    def _train_after(self, iteration: int, rank: int) -> None:
        """The network's real-data SGD steps that follow matching step ``iteration``."""
        p = self.settings
        g = generator(derive_seed(self.ctx.seed, "stage", self.ctx.stage, "idc-train", iteration, "rank", rank))
        n = self.real_x.shape[0]
        for _ in range(p["net_steps"]):
            idx = torch.randperm(n, generator=g)[: p["batch_train"]].to(self.device)
            xb = self.real_x[idx]
            if self.dsa_train.enabled:
                xb = self.dsa_train(xb, generator=g)
            loss = F.cross_entropy(self._net(xb), self.real_y[idx])
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
            self._opt.step()

    def network(self, iteration: int, rank: int) -> torch.nn.Module:
        """The matching network of ``iteration`` on ``rank`` (see the module doc): the cached one
        advanced, or rebuilt from its block's seed with the block's training replayed."""
        block = iteration // self.settings["inner_loop"]
        if self._net is None or self._key != (block, rank) or self._done > iteration:
            self._build(block, rank)
        for j in range(self._done, iteration):
            self._train_after(j, rank)
        self._done = iteration
        return self._net

    def update(self, iteration: int, rank: int, new_images: torch.Tensor, alpha: torch.Tensor,
               g: torch.Generator) -> Update:
        p = self.settings
        net = self.network(iteration, rank)
        conv = [w for w in net.parameters() if w.dim() == 4]
        grad = torch.zeros_like(new_images)
        total = 0.0
        for c in self.classes:
            ridx = self.real_idx[c]
            pick = ridx[torch.randperm(ridx.numel(), generator=g)[: p["batch_real"]].to(ridx.device)]
            xr, yr = self.real_x[pick], self.real_y[pick]
            dec, _ = multiformation(new_images[self.new_idx[c]], self.new_y[self.new_idx[c]], p["factor"])
            syn = torch.cat([self.frozen_dec[c], dec])
            if syn.shape[0] > p["batch_syn_max"]:
                syn = syn[torch.randperm(syn.shape[0], generator=g)[: p["batch_syn_max"]].to(syn.device)]
            ys = torch.full((syn.shape[0],), c, dtype=yr.dtype, device=yr.device)
            n = xr.shape[0]
            both = self.dsa(torch.cat([xr, syn]), generator=g, shared=True)
            g_real = torch.autograd.grad(F.cross_entropy(net(both[:n]), yr), conv)
            g_syn = torch.autograd.grad(F.cross_entropy(net(both[n:]), ys), conv, create_graph=True)
            loss = sum(((gr.detach() - gs) ** 2).sum() for gr, gs in zip(g_real, g_syn))
            total += float(loss.detach())
            gx, = torch.autograd.grad(loss, new_images, allow_unused=True)
            if gx is not None:
                grad += gx
        return Update(total, grad)
