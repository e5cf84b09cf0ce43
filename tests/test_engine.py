"""The training and inference loops on a linear model whose every step can be computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dvpt_core.engine import predict, train_one_epoch

CPU = torch.device("cpu")


def batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for n in sizes]


def sgd_by_hand(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], lr: float, clip: float | None) -> tuple[nn.Module, float]:
    """Plain SGD steps on the mean cross-entropy, clipping the global gradient norm; the epoch's loss
    is the sample-weighted mean of the batch losses before each step."""
    model = copy.deepcopy(model)
    total, seen = 0.0, 0
    for images, labels in data:
        loss = nn.functional.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6)) if clip else 1.0
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * factor * g
        total += float(loss) * len(labels)
        seen += len(labels)
    return model, total / seen


@pytest.mark.parametrize("clip", [None, 0.05])
def test_one_epoch_is_sgd_on_every_batch_with_clipping_and_a_sample_weighted_loss(clip: float | None) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches([5, 3, 2])
    expected_model, expected_loss = sgd_by_hand(model, data, lr=0.5, clip=clip)
    steps: list[int] = []
    loss = train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.5), steps.append, CPU, grad_clip=clip)
    assert steps == [1, 2, 3]
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for got, want in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.training


def test_max_steps_stops_the_epoch_and_frozen_tensors_are_not_clipped_in() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    data = batches([5, 3, 2])
    head = copy.deepcopy(model[1])
    features = [(model[0](x).detach(), y) for x, y in data[:2]]
    expected_head, expected_loss = sgd_by_hand(head, features, lr=0.1, clip=0.05)
    steps: list[int] = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = train_one_epoch(model, data, torch.optim.SGD(trainable, lr=0.1), steps.append, CPU, grad_clip=0.05, max_steps=2)
    assert steps == [1, 2]
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(model[1].weight, expected_head.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(model[0].weight, frozen)


def test_an_empty_epoch_has_zero_loss() -> None:
    model = nn.Linear(4, 3)
    assert train_one_epoch(model, [], torch.optim.SGD(model.parameters(), lr=0.1), lambda step: None, CPU) == 0.0


def test_predict_returns_every_batch_in_order_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    data = batches([2, 3])
    logits, labels = predict(model, data, CPU)
    assert not model.training
    images = torch.cat([b[0] for b in data])
    with torch.no_grad():
        torch.testing.assert_close(logits, model[0](images))
    assert torch.equal(labels, torch.cat([b[1] for b in data]))
    assert logits.dtype == torch.float32 and not logits.requires_grad


def test_a_one_sample_epoch_reports_that_samples_loss() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches([1])
    expected = float(nn.functional.cross_entropy(model(data[0][0]), data[0][1]))
    loss = train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), lambda step: None, CPU)
    assert loss == pytest.approx(expected, rel=1e-6)


def test_batches_without_a_length_are_read_up_to_max_steps() -> None:
    """A streaming loader (a generator, no ``len``) is read lazily: the bar gets max_steps as its
    total and the epoch stops there without asking for another batch."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches([2, 2, 2])
    read: list[int] = []

    def stream():
        for index, batch in enumerate(data):
            read.append(index)
            yield batch

    steps: list[int] = []
    train_one_epoch(model, stream(), torch.optim.SGD(model.parameters(), lr=0.1), steps.append, CPU, max_steps=2)
    assert steps == [1, 2] and read == [0, 1]
    train_one_epoch(model, stream(), torch.optim.SGD(model.parameters(), lr=0.1), steps.append, CPU)
    assert steps == [1, 2, 1, 2, 3]
