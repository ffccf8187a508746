"""Rank 0's image records on the stage's progress actor: they travel as NumPy arrays (tensors
would make that actor import torch, about 4 CPU seconds per stage) and reach the tracker's
sink as the tensors rank 0 recorded."""

from __future__ import annotations

import numpy as np
import ray
import torch

from pdd_ray.distill.stage import _Recorder
from pdd_ray.distill.stage_progress import ProgressBoard, _forward


class _Sink:
    """A StageSink that keeps what it is given."""

    def __init__(self) -> None:
        self.images_seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.metrics_seen: list[tuple[int, dict]] = []

    def metrics(self, step: int, **values: float) -> None:
        self.metrics_seen.append((step, values))

    def images(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images_seen.append((step, images, labels))


def test_image_records_travel_as_numpy_and_reach_the_sink_as_the_recorded_tensors(ray_session):
    board = ProgressBoard.remote()
    recorder = _Recorder(board)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    try:
        recorder.images(5, images, labels)
        recorder.flush()
        [(kind, step, payload)] = ray.get(board.drain.remote())
        assert kind == "images" and step == 5
        assert all(isinstance(a, np.ndarray) for a in payload), [type(a) for a in payload]

        sink = _Sink()
        recorder.images(7, images, labels)
        recorder.flush()
        _forward(board, sink)
        [(step, got_images, got_labels)] = sink.images_seen
        assert step == 7
        torch.testing.assert_close(got_images, images, rtol=0, atol=0)
        assert torch.equal(got_labels, labels)
    finally:
        ray.kill(board)
