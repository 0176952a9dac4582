"""Thread safety: the functions that evaluate a user's module, called from several threads.

``empirical_ntk`` (every implementation), ``empirical_nngp``, a linearized or second-order
``TaylorExpansion`` and ``monte_carlo_kernel`` are called by 8 threads at once on one
shared model, in rounds started together by a ``threading.Barrier`` so that the calls
overlap. Every result must equal the single-threaded one (to 1e-12), and the model must be
left exactly as it was: the same ``nn.Parameter`` and buffer objects with the same values,
``requires_grad`` and training mode, no hook left on any submodule, and an SGD step on it
still works. The outcome does not depend on how the threads are scheduled: a correct
implementation passes whatever the interleaving.
"""

from __future__ import annotations

import threading
from functools import partial

import pytest
import torch
from torch import nn

import widenets as wn
from tests.test_empirical import DTYPE, IMPLEMENTATIONS, MODELS, assert_unchanged, inputs, snapshot
from widenets.linearize import taylor_expand

N_THREADS = 8
ROUNDS = 2


def in_threads(task, n_threads: int = N_THREADS) -> list:
    """``[task(i, sync) for i in range(n_threads)]``, each in its own thread; ``sync()``
    waits until every thread reaches it (the start of a round). The first exception of
    any thread is raised here."""
    barrier = threading.Barrier(n_threads)
    results: list = [None] * n_threads
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = task(i, barrier.wait)
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)
            barrier.abort()  # the others stop waiting for this thread

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        # A thread's own error, rather than the BrokenBarrierError it caused in the others.
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                   errors[0])
    return results


def hooks_left(model: nn.Module) -> dict[str, int]:
    """Hooks of any kind (forward, backward, state-dict...) registered on any submodule."""
    return {
        f"{name or 'model'}.{attribute}": len(value)
        for name, module in model.named_modules()
        for attribute, value in vars(module).items()
        if attribute.endswith("hooks") and isinstance(value, dict) and value
    }


def assert_model_intact(model: nn.Module, shape: tuple[int, ...], before: dict,
                        objects: dict) -> None:
    """Same parameter and buffer objects, values, flags and mode; no hooks; SGD works."""
    assert_unchanged(model, before)
    assert hooks_left(model) == {}
    params = dict(model.named_parameters())
    assert params.keys() == objects["params"].keys()
    for name, p in params.items():
        assert p is objects["params"][name], name
        assert isinstance(p, nn.Parameter), name
    buffers = dict(model.named_buffers())
    assert buffers.keys() == objects["buffers"].keys()
    assert all(b is objects["buffers"][n] for n, b in buffers.items())
    # Training still works on the model: one SGD step moves every trainable parameter.
    x = inputs(shape, 4, seed=40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    optimizer.step()
    for name, p in params.items():
        moved = not torch.equal(p.detach(), before["state"][name])
        assert moved == p.requires_grad, name


def shared_model(name: str) -> tuple[nn.Module, tuple[int, ...], dict, dict]:
    make, shape = MODELS[name]
    model = make()
    objects = {"params": dict(model.named_parameters()),
               "buffers": dict(model.named_buffers())}
    return model, shape, snapshot(model), objects


CALLS = {
    **{f"ntk-{impl}": partial(wn.empirical_ntk, outputs="full", implementation=impl,
                              batch_size=2) for impl in IMPLEMENTATIONS},
    "nngp": partial(wn.empirical_nngp, outputs="full"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_kernels_from_threads(name):
    model, shape, before, objects = shared_model(name)
    xs = [(inputs(shape, 3, seed=10 + i), inputs(shape, 2, seed=30 + i))
          for i in range(N_THREADS)]
    expected = [{call: fn(model, *x) for call, fn in CALLS.items()} for x in xs]

    def task(i, sync):
        rounds = []
        for _ in range(ROUNDS):
            sync()
            rounds.append({call: fn(model, *xs[i]) for call, fn in CALLS.items()})
        return rounds

    for i, rounds in enumerate(in_threads(task)):
        for got in rounds:
            for call, value in got.items():
                torch.testing.assert_close(value, expected[i][call], rtol=1e-12, atol=1e-12,
                                           msg=f"{call}, thread {i}")
    assert_model_intact(model, shape, before, objects)


@pytest.mark.parametrize("degree", [1, 2])
def test_taylor_expansion_from_threads(degree):
    """One TaylorExpansion, moved away from w0, evaluated and differentiated by several
    threads at once; each thread also builds its own expansion of the shared model."""
    model, shape, before, objects = shared_model("mlp")
    lin = taylor_expand(model, degree)
    with torch.no_grad():
        for p in lin.params:
            p.add_(0.3 * torch.randn(p.shape, dtype=DTYPE, generator=torch.Generator()
                                     .manual_seed(p.numel())))
    xs = [inputs(shape, 3, seed=50 + i) for i in range(N_THREADS)]

    def evaluate(expansion, x):
        out = expansion(x)
        grads = torch.autograd.grad(out.square().sum(), list(expansion.params))
        return out.detach(), grads

    expected = [evaluate(lin, x) for x in xs]
    with torch.no_grad():
        at_w0 = [model(x) for x in xs]

    def task(i, sync):
        rounds = []
        for _ in range(ROUNDS):
            sync()
            own = taylor_expand(model, degree)
            rounds.append((evaluate(lin, xs[i]), own(xs[i]).detach()))
        return rounds

    for i, rounds in enumerate(in_threads(task)):
        for (out, grads), own in rounds:
            torch.testing.assert_close(out, expected[i][0], rtol=1e-12, atol=1e-12)
            for grad, reference in zip(grads, expected[i][1]):
                torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(own, at_w0[i], rtol=1e-12, atol=1e-12)
    # The expansion's private copy of the model keeps its own parameters too.
    assert hooks_left(lin._module) == {}
    assert all(isinstance(p, nn.Parameter) for p in lin._module.parameters())
    assert_model_intact(model, shape, before, objects)


def test_monte_carlo_kernel_from_threads():
    """Separate generators: each thread's estimate equals the single-threaded one with
    the same seed, whatever the other threads do."""
    net = wn.Sequential(wn.Conv2d(3, 3, padding="same"), wn.ReLU(), wn.Flatten(),
                        wn.Linear(4))
    x1, x2 = inputs((2, 3, 3), 3, seed=60), inputs((2, 3, 3), 2, seed=61)

    def estimate(seed):
        return wn.monte_carlo_kernel(net, x1, x2, get=("nngp", "ntk"), n_samples=2,
                                     generator=torch.Generator().manual_seed(seed))

    expected = [estimate(i) for i in range(N_THREADS)]

    def task(i, sync):
        sync()
        return estimate(i)

    for got, reference in zip(in_threads(task), expected):
        torch.testing.assert_close(got.nngp, reference.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.ntk, reference.ntk, rtol=1e-12, atol=1e-12)
