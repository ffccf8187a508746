"""pdd_ray.training: the shared loop's optimiser is a faster form of the same SGD."""

from __future__ import annotations

import torch

from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.seeding import generator
from pdd_ray.sgd import SGD
from pdd_ray.training import TrainRecipe, make_optimizer, train


def test_foreach_sgd_trains_to_the_same_weights_as_the_per_parameter_loop() -> None:
    spec = ModelSpec("convnet", 1, 3, 8, width=8, depth=2)
    torch.manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 3
    recipe = TrainRecipe(epochs=4, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=8, augment="crop_scale_rotate")
    fast, plain = build_seeded(spec, 0), build_seeded(spec, 0)
    opt = make_optimizer(fast, recipe)
    assert isinstance(opt, SGD)  # the multi-tensor update, without torch.optim (tests/test_sgd.py)
    train(fast, x, y, recipe, generator(1), optimizer=opt)
    loop = torch.optim.SGD(plain.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, foreach=False)
    train(plain, x, y, recipe, generator(1), optimizer=loop)
    for a, b in zip(fast.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(fast.parameters()), next(build_seeded(spec, 0).parameters()))  # it trained
