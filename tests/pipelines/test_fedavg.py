import numpy as np
import torch

from fedward.config import TrainConfig, parse_config
from fedward.types import Layout, Update
from fedward.models import training
from fedward.models.flat import flatten
from fedward.strategies.fedavg import FedAvg
from tests.fedward.test_config import raw_config


def strategy():
    return FedAvg(parse_config(raw_config()))


def update(name, delta, n):
    return Update(round=1, hospital=name, delta=np.asarray(delta, np.float32), layout=Layout(("w",), ((len(delta),),)), num_examples=n, weight=n)


def test_fedavg_moves_by_the_example_weighted_mean_change():
    rng = np.random.default_rng(0)
    current = rng.normal(size=1000).astype(np.float32)
    vectors = [rng.normal(size=1000).astype(np.float32) for _ in range(3)]
    counts = [10, 300, 47]
    updates = [update(f"h{i}", v, n) for i, (v, n) in enumerate(zip(vectors, counts))]
    result = strategy().aggregate(1, current, updates, {})
    reference = current + np.average(np.stack(vectors).astype(np.float64), axis=0, weights=counts)
    np.testing.assert_allclose(result, reference, rtol=1e-6, atol=1e-6)
    assert result.dtype == np.float32
    assert all(np.array_equal(u.delta, v) for u, v in zip(updates, vectors))  # inputs untouched


def test_fedavg_keeps_the_weights_when_nobody_answered():
    assert strategy().aggregate(1, np.ones(3, np.float32), [], {"h0": "died"}) is None


def test_one_full_batch_step_of_fedavg_equals_centralized_sgd_on_the_union():
    torch.manual_seed(0)
    parts = [(torch.randn(n, 5), (torch.rand(n) < 0.4).float()) for n in (13, 40, 27)]
    config = TrainConfig(batch_size=1000, optimizer="sgd", momentum=0.0, lr=0.3)

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    start, _ = flatten(model())
    updates = []
    for i, (x, y) in enumerate(parts):
        local = model()
        training.train(local, x, y, epochs=1, lr=config.lr, seed=i, config=config)
        flat, layout = flatten(local)
        updates.append(Update(round=1, hospital=f"h{i}", delta=flat - start, layout=layout, num_examples=len(y), weight=len(y)))
    federated = strategy().aggregate(1, start, updates, {})

    # Reference: plain torch, one gradient step on the mean loss over the union.
    central = model()
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(central(x).squeeze(1), y)
    grads = torch.autograd.grad(loss, list(central.parameters()))
    with torch.no_grad():
        expected = torch.cat([(p - config.lr * g).reshape(-1) for p, g in zip(central.parameters(), grads)])
    np.testing.assert_allclose(federated, expected.numpy(), rtol=1e-5, atol=1e-6)
