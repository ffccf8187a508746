"""One MTT/PDD outer iteration done the way the official code does it, for side-by-side timing.

Why: the speed targets of ``benchmarks/speed.py`` are ratios to the official research code on
the same machine. Numbers copied from another day (the platform notes' anchors) drift with the
machine's state by 20-30 %, so this module re-creates the official step here and times it in
the same process tree, under the same thread count, right beside pdd_ray's.

What is re-created (an independent re-implementation of the published recipe, not the
official source):

* the model: a ConvNet (conv 3x3 -> GroupNorm(C, C) instance norm -> ReLU -> 2x2 average pool)
  x depth, then a linear classifier, run from one flat parameter vector by swapping the
  module's parameters for views of that vector before each call (the official
  ``ReparamModule`` approach);
* DSA in the official "single" mode: one family per call, per-image parameters drawn from the
  global RNG, the affine families building their 2x3 matrices image by image in Python on
  the CPU (the other families draw on the images' device, as the official code does), crop
  through a padded, permuted copy and advanced indexing, cutout through a mask;
* the unroll: a fresh random permutation split into ``batch_syn`` chunks, ``syn_steps`` plain
  SGD steps ``w <- w - lr * grad`` with ``autograd.grad(create_graph=True)``, the normalised
  parameter distance, and one ``backward()`` to the images and the learning rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# DSA strengths of the official ParamDiffAug
_SCALE, _ROTATE, _CROP, _CUTOUT, _FLIP = 1.2, 15.0, 0.125, 0.5, 0.5
_BRIGHT, _SAT, _CONTRAST = 1.0, 2.0, 0.5
_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def build_convnet(channels: int, size: int, width: int, depth: int, classes: int = 10) -> nn.Module:
    """The official ConvNet layout (instance norm as GroupNorm(C, C), average pooling)."""
    layers: list[nn.Module] = []
    c = channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                   nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
        c = width
        size //= 2

    class _Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(width * size * size, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.features(x)
            # official: out.view(...), which fails on 1-channel crops (odd strides); same cost
            return self.classifier(out.reshape(out.size(0), -1))

    return _Net()


class Reparam:
    """Runs ``module`` from a flat vector by replacing its parameters with views of it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.slots: list[tuple[nn.Module, str, torch.Size]] = []
        for mod in module.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                self.slots.append((mod, name, p.shape))
        self.flat0 = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        for mod, name, _ in self.slots:
            delattr(mod, name)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = flat.split([shape.numel() for _, _, shape in self.slots])
        for (mod, name, shape), piece in zip(self.slots, pieces):
            setattr(mod, name, piece.view(shape))
        return self.module(x)


def _scale(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sx = torch.rand(n) * (_SCALE - 1.0 / _SCALE) + 1.0 / _SCALE
    sy = torch.rand(n) * (_SCALE - 1.0 / _SCALE) + 1.0 / _SCALE
    theta = torch.tensor([[[float(sx[i]), 0.0, 0.0], [0.0, float(sy[i]), 0.0]] for i in range(n)])
    grid = F.affine_grid(theta, list(x.shape), align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    a = (torch.rand(n) - 0.5) * 2 * _ROTATE / 180 * math.pi
    theta = torch.tensor([[[math.cos(a[i]), math.sin(-a[i]), 0.0], [math.sin(a[i]), math.cos(a[i]), 0.0]]
                          for i in range(n)])
    grid = F.affine_grid(theta, list(x.shape), align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _flip(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < _FLIP, x.flip(3), x)


def _color(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device) - 0.5) * _BRIGHT
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (torch.rand(n, 1, 1, 1, device=x.device) * _SAT) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (torch.rand(n, 1, 1, 1, device=x.device) + _CONTRAST) + m


def _crop(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * _CROP + 0.5), int(w * _CROP + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    d = x.device
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=d), torch.arange(h, device=d), torch.arange(w, device=d), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    d = x.device
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=d), torch.arange(ch, device=d), torch.arange(cw, device=d), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


_OPS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa_single(x: torch.Tensor) -> torch.Tensor:
    """One randomly chosen family per call (official aug_mode 'S')."""
    fam = _FAMILIES[int(torch.randint(0, len(_FAMILIES), (1,)).item())]
    return _OPS[fam](x).contiguous()


def official_iteration(net: Reparam, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
                       labels: torch.Tensor, lr: torch.Tensor, syn_steps: int, batch_syn: int) -> float:
    """One outer iteration: unroll, normalised distance, ``backward()``; returns the loss."""
    params = [start.clone().requires_grad_(True)]
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(len(images)), batch_syn))
        idx = chunks.pop()
        x = dsa_single(images[idx])
        ce = F.cross_entropy(net(params[-1], x), labels[idx])
        grad = torch.autograd.grad(ce, params[-1], create_graph=True)[0]
        params.append(params[-1] - lr * grad)
    loss = F.mse_loss(params[-1], target, reduction="sum") / F.mse_loss(start, target, reduction="sum")
    loss.backward()
    return float(loss.detach())
