"""CUDA against CPU: kernels, finite twins, empirical and Monte Carlo kernels, linearized
models and predictions computed from CUDA tensors give the CPU answers.

Each test computes the same thing twice, once with tensors (and models) on the CPU in
float64, the reference, and once with them on :data:`DEVICE`, and checks that the device
result is where it should be (on the inputs' device; ``wn.kernel_matrix`` returns CPU
tensors, as documented) and within rounding of the reference:

* analytic kernels (``net.kernel``, ``wn.kernel_matrix``): each entry within
  ``tol * sqrt(K(x, x) K(x', x'))`` of the CPU float64 value (the accuracy measure of the
  README), ``tol = 1e-10`` in float64 and ``1e-5`` in float32;
* everything else (finite twins, empirical and Monte Carlo kernels, linearized models,
  predictions): largest difference relative to the largest reference entry.

All tests carry the ``cuda`` marker (``pytest -m cuda``, ``make gpu-check``) and are
skipped, with the reason, when ``torch.cuda.is_available()`` is False. Nothing here
depends on timing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import widenets as wn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
    ),
]

#: The device under test (the current CUDA device). The reference is always the CPU.
DEVICE = "cuda"

W_STD, B_STD = 1.5, 0.05
#: Kernel accuracy, relative to sqrt(K(x, x) K(x', x')), by compute dtype.
KERNEL_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def normal(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal float64 CPU tensor, from its own seeded generator."""
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def dense(activation: wn.Layer) -> wn.Layer:
    return wn.Sequential(
        wn.Linear(64, W_std=W_STD, b_std=B_STD), activation,
        wn.Linear(64, W_std=W_STD, b_std=B_STD), type(activation)(),
        wn.Linear(1, W_std=W_STD, b_std=B_STD),
    )


def cnn(readout: str) -> wn.Layer:
    """Two convolutions (``same``, then strided ``circular``), then pooling or Flatten."""
    layers = [
        wn.Conv2d(8, 3, padding="same", W_std=W_STD, b_std=B_STD), wn.ReLU(),
        wn.Conv2d(8, 3, stride=2, padding="circular", W_std=W_STD, b_std=B_STD), wn.ReLU(),
    ]
    if readout == "pool":  # full spatial covariance (P^2 numbers per pair of images)
        layers += [wn.AvgPool2d(2), wn.GlobalAvgPool()]
    else:  # per-position covariance only
        layers += [wn.Flatten()]
    return wn.Sequential(*layers, wn.Linear(1, W_std=W_STD, b_std=B_STD))


#: name: (architecture, x1, x2), all inputs float64 on the CPU.
ARCHITECTURES = {
    "dense-relu": lambda: (dense(wn.ReLU()), normal(12, 10, seed=1), normal(7, 10, seed=2)),
    "dense-erf": lambda: (dense(wn.Erf()), normal(12, 10, seed=3), normal(7, 10, seed=4)),
    "cnn-pool": lambda: (cnn("pool"), normal(6, 3, 8, 8, seed=5), normal(4, 3, 8, 8, seed=6)),
    "cnn-flatten": lambda: (cnn("flatten"), normal(6, 3, 8, 8, seed=7),
                            normal(4, 3, 8, 8, seed=8)),
}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |got - expected| / max |expected|``, ``got`` brought to the CPU in float64."""
    assert got.shape == expected.shape
    expected = expected.detach()
    difference = got.detach().cpu().to(torch.float64) - expected
    return float(difference.abs().max() / expected.abs().max())


def kernel_error(net: wn.Layer, x1: torch.Tensor, x2: torch.Tensor | None, name: str,
                 got: torch.Tensor) -> float:
    """Largest ``|got - K| / sqrt(K(x, x) K(x', x'))`` over the entries, with ``K`` the CPU
    float64 kernel of CPU float64 inputs ``x1``, ``x2``."""
    expected = net.kernel(x1, x2, get=name)
    diagonal1 = net.kernel(x1, None, get=name).diagonal()
    diagonal2 = diagonal1 if x2 is None else net.kernel(x2, None, get=name).diagonal()
    scale = torch.sqrt(diagonal1[:, None] * diagonal2[None, :])
    assert got.shape == expected.shape
    return float(((got.cpu().to(torch.float64) - expected).abs() / scale).max())


def on_device(x: torch.Tensor | None, dtype: torch.dtype = torch.float64):
    return None if x is None else x.to(device=DEVICE, dtype=dtype)


# --- analytic kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float64", "float32 inputs", "dtype=float32"])
@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_kernel_on_device_matches_cpu(arch, second, precision):
    """``net.kernel`` of device inputs: NNGP and NTK on the inputs' device, in the compute
    dtype (float32 inputs, or float64 inputs with ``dtype=torch.float32``), within 1e-10
    (float64) or 1e-5 (float32) of the CPU float64 kernel; ``x2=None`` exactly symmetric."""
    net, x1, x2 = ARCHITECTURES[arch]()
    x2 = None if second == "x2=None" else x2
    dtype = torch.float64 if precision == "float64" else torch.float32
    input_dtype = torch.float32 if precision == "float32 inputs" else torch.float64
    d1, d2 = on_device(x1, input_dtype), on_device(x2, input_dtype)
    options = {"dtype": torch.float32} if precision == "dtype=float32" else {}
    kernels = net.kernel(d1, d2, get=("nngp", "ntk"), **options)
    for name in ("nngp", "ntk"):
        got = kernels[name]
        assert got.device == d1.device, name
        assert got.dtype == dtype, name
        if x2 is None:
            assert torch.equal(got, got.T), name
        assert kernel_error(net, x1, x2, name, got) <= KERNEL_TOLERANCE[dtype], name


def test_single_kernel_by_name_on_device():
    """``get="ntk"`` (a name, not a tuple) returns one device tensor equal to the CPU one."""
    net, x1, x2 = ARCHITECTURES["dense-relu"]()
    got = net.kernel(on_device(x1), on_device(x2), get="ntk")
    assert isinstance(got, torch.Tensor) and got.device.type == DEVICE
    assert kernel_error(net, x1, x2, "ntk", got) <= 1e-10


def test_numpy_x2_follows_the_device_of_x1():
    """A NumPy ``x2`` beside a device tensor ``x1`` is moved to ``x1``'s device."""
    net, x1, x2 = ARCHITECTURES["dense-erf"]()
    d1 = on_device(x1)
    got = net.kernel(d1, x2.numpy(), get="nngp")
    assert got.device == d1.device
    assert kernel_error(net, x1, x2, "nngp", got) <= 1e-10


def test_inputs_on_two_devices_are_refused():
    """A device ``x1`` with a CPU tensor ``x2`` is refused with a ValueError naming both."""
    net, x1, x2 = ARCHITECTURES["dense-relu"]()
    with pytest.raises(ValueError, match="dtype and device"):
        net.kernel(on_device(x1), x2)


@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
def test_kernel_matrix_of_device_inputs_matches_cpu_kernel(second):
    """``wn.kernel_matrix`` of device inputs, over several tiles: CPU tensors (as
    documented) in the inputs' dtype, equal to ``net.kernel`` on the CPU within 1e-10."""
    net, x1, x2 = ARCHITECTURES["cnn-pool"]()
    x2 = None if second == "x2=None" else x2
    got = wn.kernel_matrix(net, on_device(x1), on_device(x2), get=("nngp", "ntk"), tile=4,
                           progress=False)
    for name in ("nngp", "ntk"):
        assert got[name].device.type == "cpu", name
        assert got[name].dtype == torch.float64, name
        assert kernel_error(net, x1, x2, name, got[name]) <= 1e-10, name


def test_kernel_matrix_store_of_device_inputs(tmp_path):
    """A store written from device inputs: ``kernel_matrix`` and ``load_kernel`` give the
    CPU kernel, and the same call again (same device inputs) resumes from the store."""
    pytest.importorskip("zarr")
    net, x1, _ = ARCHITECTURES["dense-relu"]()
    store = tmp_path / "ntk.zarr"
    first = wn.kernel_matrix(net, on_device(x1), tile=5, store=store, progress=False)
    again = wn.kernel_matrix(net, on_device(x1), tile=5, store=store, progress=False)
    loaded = wn.load_kernel(store)
    assert torch.equal(first, again) and torch.equal(first, loaded)
    assert kernel_error(net, x1, None, "ntk", first) <= 1e-10


# --- finite twins ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_twin_on_device_has_the_cpu_parameters(arch, dtype):
    """``net.build(..., device=DEVICE)`` with a seeded generator: every parameter and buffer
    on the device, bit for bit the CPU twin's (drawn on the CPU, then cast and moved)."""
    net, x1, _ = ARCHITECTURES[arch]()
    shape = tuple(x1.shape[1:])
    cpu = net.build(shape, torch.Generator().manual_seed(7), dtype=dtype)
    dev = net.build(shape, torch.Generator().manual_seed(7), dtype=dtype, device=DEVICE)
    cpu_state, dev_state = cpu.state_dict(), dev.state_dict()
    assert list(cpu_state) == list(dev_state) and cpu_state
    for name, value in dev_state.items():
        assert value.device.type == DEVICE, name
        assert value.dtype == cpu_state[name].dtype, name
        assert torch.equal(value.cpu(), cpu_state[name]), name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_twin_forward_on_device_matches_cpu(arch):
    """The float64 twin built on the device computes the CPU twin's outputs within 1e-10.
    (float64 only: float32 convolutions on CUDA may use TF32, about 3 digits.)"""
    net, x1, _ = ARCHITECTURES[arch]()
    shape = tuple(x1.shape[1:])
    cpu = net.build(shape, torch.Generator().manual_seed(11), dtype=torch.float64)
    dev = net.build(shape, torch.Generator().manual_seed(11), dtype=torch.float64,
                    device=DEVICE)
    d1 = on_device(x1)
    with torch.no_grad():
        expected, got = cpu(x1), dev(d1)
    assert got.device == d1.device and got.dtype == torch.float64
    assert relative_error(got, expected) <= 1e-10


# --- empirical kernels of torch modules -------------------------------------------------


def seeded(seed: int, *modules: nn.Module) -> nn.Module:
    """``nn.Sequential(*modules)`` in float64, initialised from ``seed`` (global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(*modules).to(torch.float64)


#: name: (model factory, per-example input shape); CPU float64 models, three outputs.
MODELS = {
    "mlp": (lambda: seeded(1, nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                           nn.Linear(16, 3)), (6,)),
    "cnn": (lambda: seeded(2, nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 3)), (2, 7, 7)),
}


def model_and_inputs(name: str):
    """CPU model, its copy on the device, and CPU inputs ``x1`` (9 examples), ``x2`` (5)."""
    make, shape = MODELS[name]
    model = make()
    return model, copy.deepcopy(model).to(DEVICE), normal(9, *shape, seed=20), \
        normal(5, *shape, seed=21)


@pytest.mark.parametrize("outputs", ["mean", "full"])
@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vector", "structured"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_ntk_on_device_matches_cpu(name, implementation, second, outputs):
    """``wn.empirical_ntk`` of a device model and device inputs, with each implementation:
    on the device, equal to the CPU model's kernel within 1e-10; the model is unchanged."""
    model, dev_model, x1, x2 = model_and_inputs(name)
    x2 = None if second == "x2=None" else x2
    before = copy.deepcopy(dev_model.state_dict())
    options = {"outputs": outputs, "implementation": implementation, "batch_size": 4}
    expected = wn.empirical_ntk(model, x1, x2, **options)
    d1 = on_device(x1)
    got = wn.empirical_ntk(dev_model, d1, on_device(x2), **options)
    assert got.device == d1.device and got.dtype == torch.float64
    assert relative_error(got, expected) <= 1e-10
    for key, value in dev_model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("outputs", ["mean", "full"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_nngp_on_device_matches_cpu(name, outputs):
    """``wn.empirical_nngp`` of a device model: on the device, the CPU values within 1e-10."""
    model, dev_model, x1, x2 = model_and_inputs(name)
    expected = wn.empirical_nngp(model, x1, x2, outputs=outputs)
    got = wn.empirical_nngp(dev_model, on_device(x1), on_device(x2), outputs=outputs)
    assert got.device.type == DEVICE
    assert relative_error(got, expected) <= 1e-10


def test_empirical_ntk_of_a_device_model_refuses_cpu_tensors():
    """CPU tensor inputs to a device model are refused with a ValueError naming both
    devices (NumPy inputs would be moved; a tensor is the user's choice of device)."""
    _, dev_model, x1, _ = model_and_inputs("mlp")
    with pytest.raises(ValueError, match="model's parameters are on"):
        wn.empirical_ntk(dev_model, x1)


def test_empirical_ntk_of_a_device_model_moves_numpy_inputs():
    """NumPy inputs to a device model are computed on its device, as the CPU kernel."""
    model, dev_model, x1, _ = model_and_inputs("mlp")
    got = wn.empirical_ntk(dev_model, x1.numpy())
    assert got.device.type == DEVICE
    assert relative_error(got, wn.empirical_ntk(model, x1)) <= 1e-10


@pytest.mark.parametrize("arch", ["dense-relu", "cnn-pool"])
def test_monte_carlo_kernel_on_device_matches_cpu(arch):
    """``wn.monte_carlo_kernel`` of device inputs: both kernels on the device, and with the
    same seeded generator the same twins as on the CPU (drawn on the CPU), so the same
    estimate within 1e-10."""
    net, x1, x2 = ARCHITECTURES[arch]()
    x1, x2 = x1[:5], x2[:3]

    def estimate(a, b):
        return wn.monte_carlo_kernel(net, a, b, get=("nngp", "ntk"), n_samples=3,
                                     generator=torch.Generator().manual_seed(5))

    expected = estimate(x1, x2)
    d1 = on_device(x1)
    got = estimate(d1, on_device(x2))
    for name in ("nngp", "ntk"):
        assert got[name].device == d1.device, name
        assert got[name].dtype == torch.float64, name
        assert relative_error(got[name], expected[name]) <= 1e-10, name


# --- linearized models ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["linearize a device model", "move a linearized CPU model"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_linearized_model_on_device(name, how):
    """``wn.linearize`` on the device (of a device model, or a CPU expansion moved with
    ``.to``): parameters on the device; at ``w0`` it computes the model; a step away from
    ``w0`` its outputs and its gradients equal the CPU expansion's within 1e-10."""
    model, dev_model, x, _ = model_and_inputs(name)
    lin_cpu = wn.linearize(model)
    if how == "linearize a device model":
        lin_dev = wn.linearize(dev_model)
    else:
        lin_dev = wn.linearize(model).to(DEVICE)
    assert all(p.device.type == DEVICE for p in lin_dev.parameters())
    assert all(b.device.type == DEVICE for b in lin_dev.buffers())
    dx = on_device(x)
    with torch.no_grad():
        at_w0 = lin_dev(dx)
        assert at_w0.device == dx.device
        assert relative_error(at_w0, model(x)) <= 1e-10
        generator = torch.Generator().manual_seed(3)
        for p_cpu, p_dev in zip(lin_cpu.params, lin_dev.params):
            delta = 0.1 * torch.randn(p_cpu.shape, dtype=p_cpu.dtype, generator=generator)
            p_cpu.add_(delta)
            p_dev.add_(delta.to(DEVICE))
    expected, got = lin_cpu(x), lin_dev(dx)
    assert relative_error(got, expected) <= 1e-10
    expected.square().sum().backward()
    got.square().sum().backward()
    for p_cpu, p_dev in zip(lin_cpu.params, lin_dev.params):
        assert p_dev.grad.device.type == DEVICE
        assert relative_error(p_dev.grad, p_cpu.grad) <= 1e-10


# --- predictions ------------------------------------------------------------------------------


def regression_data():
    """x_train (16, 5), two-output targets, x_test (6, 5): float64 CPU tensors."""
    x_train, x_test = normal(16, 5, seed=30), normal(6, 5, seed=31)
    y_train = torch.stack([torch.sin(x_train.sum(1)), torch.cos(x_train[:, 0])], dim=1)
    return x_train, y_train, x_test


#: Predictions solve linear systems with the training kernels, which amplify rounding
#: differences between devices by their condition numbers: below 400 here (measured: a
#: random relative perturbation of 1e-15 of the kernels moves every answer by at most
#: 4e-14 of its largest entry), so 1e-10 leaves a wide margin.
PREDICTION_TOLERANCE = 1e-10


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_gp_inference_on_device_matches_cpu(get):
    """``wn.predict.gp_inference`` with device training data and test inputs: mean and
    covariance on the device, in float64, the CPU answers within 1e-10."""
    net = dense(wn.ReLU())
    x_train, y_train, x_test = regression_data()
    expected = wn.predict.gp_inference(net, x_train, y_train, diag_reg=1e-4)(x_test, get=get)
    posterior = wn.predict.gp_inference(net, on_device(x_train), on_device(y_train),
                                        diag_reg=1e-4)
    got = posterior(on_device(x_test), get=get)
    for what, value, reference in zip(("mean", "cov"), got, expected):
        assert value.device.type == DEVICE and value.dtype == torch.float64, what
        assert relative_error(value, reference) <= PREDICTION_TOLERANCE, what


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_gradient_descent_mse_ensemble_on_device_matches_cpu(get):
    """``wn.predict.gradient_descent_mse_ensemble`` with device data, at ``t = inf`` and at
    times ``[0, 1, 10]`` (given as a device tensor): mean and covariance on the device,
    the CPU answers within 1e-10."""
    net = dense(wn.Erf())
    x_train, y_train, x_test = regression_data()
    cpu = wn.predict.gradient_descent_mse_ensemble(net, x_train, y_train, learning_rate=0.5,
                                                   diag_reg=1e-4)
    dev = wn.predict.gradient_descent_mse_ensemble(net, on_device(x_train), on_device(y_train),
                                                   learning_rate=0.5, diag_reg=1e-4)
    times = torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64)
    for t_cpu, t_dev in ((None, None), (times, times.to(DEVICE))):
        expected = cpu(x_test, t=t_cpu, get=get)
        got = dev(on_device(x_test), t=t_dev, get=get)
        for what, value, reference in zip(("mean", "cov"), got, expected):
            assert value.device.type == DEVICE and value.dtype == torch.float64, what
            assert relative_error(value, reference) <= PREDICTION_TOLERANCE, what


def test_gradient_descent_mse_of_a_device_empirical_ntk_matches_cpu():
    """``wn.predict.gradient_descent_mse`` of a device model's empirical NTK, with its
    initial outputs and test kernel on the device: the trajectory of the linearized network
    on the device, the CPU one within 1e-10."""
    model, dev_model, x_train, x_test = model_and_inputs("mlp")
    y_train = torch.cos(x_train[:, :3])
    times = torch.tensor([0.0, 1.0, 10.0, np.inf], dtype=torch.float64)

    def trajectory(m, xt, xs, y):
        fn = wn.predict.gradient_descent_mse(wn.empirical_ntk(m, xt), y, learning_rate=0.1,
                                             diag_reg=1e-4)
        with torch.no_grad():
            f_train_0, f_test_0 = m(xt), m(xs)
        return fn(times, f_train_0, f_test_0, wn.empirical_ntk(m, xs, xt))

    expected = trajectory(model, x_train, x_test, y_train)
    got = trajectory(dev_model, on_device(x_train), on_device(x_test), on_device(y_train))
    for what, value, reference in zip(("train", "test"), got, expected):
        assert value.device.type == DEVICE and value.dtype == torch.float64, what
        assert relative_error(value, reference) <= PREDICTION_TOLERANCE, what


@pytest.mark.parametrize("dynamics", ["gradient_descent", "gradient_descent_momentum"])
def test_ode_predictions_from_device_tensors_match_cpu(dynamics):
    """``wn.predict.gradient_descent`` (cross-entropy) and ``gradient_descent_momentum``
    (MSE), given the training kernel, targets, initial outputs and test kernel as device
    tensors: outputs on the kernel's device (as documented), equal to the CPU answers
    within 1e-10 (the ODE is integrated by SciPy on the host from the same numbers)."""
    net = dense(wn.ReLU())
    x_train, _, x_test = regression_data()
    k_train, k_test_train = net.kernel(x_train, get="ntk"), net.kernel(x_test, x_train, get="ntk")
    one_hot = nn.functional.one_hot(torch.arange(16) % 3, 3).to(torch.float64)
    f_train_0, f_test_0 = 0.1 * normal(16, 3, seed=40), 0.1 * normal(6, 3, seed=41)
    times = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)

    def trajectory(move):
        if dynamics == "gradient_descent":
            fn = wn.predict.gradient_descent("cross_entropy", move(k_train), move(one_hot),
                                             learning_rate=0.1)
        else:
            fn = wn.predict.gradient_descent_momentum("mse", move(k_train), move(one_hot),
                                                      learning_rate=0.01, momentum=0.9)
        return fn(move(times), move(f_train_0), move(f_test_0), move(k_test_train))

    expected = trajectory(lambda t: t)
    got = trajectory(on_device)
    for what, value, reference in zip(("train", "test"), got, expected):
        assert value.device.type == DEVICE and value.dtype == torch.float64, what
        assert relative_error(value, reference) <= PREDICTION_TOLERANCE, what


def test_cuda_tiles_are_larger_and_give_the_cpu_kernel(monkeypatch):
    """On the GPU a tile holds more pairs than on the CPU (fewer, larger operations); with
    the free-memory bound forced low, the many small tiles give the same kernel."""
    from widenets import engine

    net, x1, _ = ARCHITECTURES["dense-relu"]()
    d1 = on_device(x1)
    assert engine.tile_budget(False, d1) > engine.TILE_ENTRIES
    large = net.kernel(d1, None, get=("nngp", "ntk"))
    monkeypatch.setattr(engine, "TILE_ENTRIES", 16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    small = net.kernel(d1, None, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        assert kernel_error(net, x1, None, name, small[name]) <= 1e-10, name
        torch.testing.assert_close(small[name], large[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_gradients_on_device_match_cpu(get):
    """Gradients through the kernel with respect to the inputs and to a ``W_std`` tensor,
    computed on the device, equal the CPU ones (float64)."""
    x1, x2 = normal(6, 4, seed=31), normal(5, 4, seed=32)
    grads = {}
    for device in ("cpu", DEVICE):
        w = torch.tensor(1.4, dtype=torch.float64, device=device, requires_grad=True)
        a = x1.to(device, copy=True).requires_grad_(True)  # a leaf on every device
        net = wn.Sequential(wn.Linear(8, W_std=w, b_std=0.1), wn.Erf(),
                            wn.Linear(8, W_std=w, b_std=0.1), wn.ReLU(), wn.Linear(1, W_std=w))
        kernel = net.kernel(a, x2.to(device), get=get)
        assert kernel.requires_grad, device
        grads[device] = tuple(g.cpu() for g in torch.autograd.grad(kernel.sum(), (a, w)))
    for got, expected in zip(grads[DEVICE], grads["cpu"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


SEQUENCE_NETS = {
    "attention-masked": lambda: wn.Sequential(
        wn.Conv1d(64, 3, padding="same", W_std=W_STD, b_std=B_STD), wn.ReLU(),
        wn.SelfAttention(n_heads=2, b_std=0.1, causal=True, pos_emb="sum"), wn.Erf(),
        wn.GlobalAvgPool(), wn.Linear(1)),
    "graph-dropout": lambda: wn.Sequential(
        wn.Conv1d(64, 1, dilation=2, W_std=W_STD, b_std=B_STD), wn.ReLU(), wn.Dropout(0.2),
        wn.Aggregate(), wn.Conv1d(64, 1), wn.ReLU(), wn.GlobalAvgPool(), wn.Linear(1)),
    "seq2seq": lambda: wn.Sequential(
        wn.Conv1d(64, 3, padding="same", W_std=W_STD, b_std=B_STD), wn.ReLU(),
        wn.SelfAttention(b_std=0.1), wn.Conv1d(1, 1)),
    "rnn-stacked": lambda: wn.Sequential(
        wn.Conv1d(64, 1, W_std=W_STD, b_std=B_STD), wn.ReLU(),
        wn.RNN(wn.Erf(), W_std=1.2, U_std=1.0, b_std=0.1),
        wn.Recurrent(wn.Sequential(wn.Parallel(wn.Linear(64), wn.Linear(64, 0.9, 0.1)),
                                   wn.FanInSum(), wn.ReLU())),
        wn.GlobalAvgPool(), wn.Linear(1)),
    "rnn-last": lambda: wn.Sequential(
        wn.RNN(wn.ReLU(), W_std=1.1, U_std=1.0, b_std=0.2), wn.LastStep(), wn.Linear(1)),
}


@pytest.mark.parametrize("name", sorted(SEQUENCE_NETS))
def test_sequence_layers_with_masks_and_graphs_on_device_match_cpu(name):
    net = SEQUENCE_NETS[name]()
    x1, x2 = normal(5, 3, 7, seed=31), normal(4, 3, 7, seed=32)
    lengths1, lengths2 = torch.tensor([7, 3, 5, 1, 6]), torch.tensor([2, 7, 4, 7])
    side = {"mask1": torch.arange(7) < lengths1[:, None],
            "mask2": torch.arange(7) < lengths2[:, None]}
    if name == "graph-dropout":
        side["adjacency1"] = (normal(5, 7, 7, seed=33) > 0).double()
        side["adjacency2"] = (normal(4, 7, 7, seed=34) > 0).double()
    on_device = {key: value.to(DEVICE) for key, value in side.items()}
    for second in (None, x2):
        pick = (lambda d: {k: v for k, v in d.items() if k.endswith("1")}) if second is None \
            else (lambda d: d)
        cpu = net.kernel(x1, second, get=("nngp", "ntk"), **pick(side))
        gpu = net.kernel(x1.to(DEVICE), None if second is None else second.to(DEVICE),
                         get=("nngp", "ntk"), **pick(on_device))
        for kernel in ("nngp", "ntk"):
            assert gpu[kernel].device.type == torch.device(DEVICE).type
            scale = float(cpu[kernel].abs().max())
            error = float((gpu[kernel].cpu() - cpu[kernel]).abs().max()) / scale
            assert error < KERNEL_TOLERANCE[torch.float64], (kernel, error)


@pytest.mark.parametrize("name", ["attention-masked", "rnn-stacked"])
def test_masked_twin_and_monte_carlo_on_device(name):
    net = SEQUENCE_NETS[name]()
    x = normal(4, 3, 7, seed=35)
    mask = torch.arange(7) < torch.tensor([7, 3, 5, 2])[:, None]
    twin = net.build((3, 7), torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = twin(x, mask=mask)
    got = twin.to(DEVICE)(x.to(DEVICE), mask=mask.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-12)
    estimate = wn.monte_carlo_kernel(net, x.to(DEVICE), None, get="ntk", n_samples=2,
                                     generator=torch.Generator().manual_seed(1),
                                     mask1=mask.to(DEVICE))
    reference = wn.monte_carlo_kernel(net, x, None, get="ntk", n_samples=2,
                                      generator=torch.Generator().manual_seed(1), mask1=mask)
    torch.testing.assert_close(estimate.cpu(), reference, rtol=1e-8, atol=1e-10)
