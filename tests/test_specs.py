"""Canonical specs: process-independent descriptions of layers, and the kernel store that
is identified by them.

Every exported layer's spec round trip is checked by the contract kit
(``tests/test_contract.py``); here: what "canonical" means (equal layers whatever the
spelling of their arguments), functions by importable name, specs computed in another
process, layers defined outside widenets, and the two store cases that repr-based
identities got wrong: another declared width of the same kernel, and an ``Elementwise``
store resumed from another process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import widenets as wn
from widenets import tiles as tiles_module
from widenets.specs import NotCanonicalError, from_spec


def net_with(width: int, activation: wn.Layer, parameterization: str = "ntk") -> wn.Layer:
    return wn.Sequential(wn.Linear(width, 1.5, 0.05, parameterization), activation,
                         wn.Linear(width, 1.2, 0.1, parameterization),
                         wn.Linear(1, 1.0, parameterization=parameterization))


def test_equal_arguments_spelled_differently_give_equal_layers():
    assert wn.AvgPool2d(2) == wn.AvgPool2d((2, 2), stride=(2, 2))
    assert wn.Linear(3, W_std=1, b_std=0) == wn.Linear(3, W_std=1.0, b_std=None)
    assert wn.Conv1d(4, 3) == wn.Conv1d(4, (3,), stride=1)
    assert hash(wn.AvgPool2d(2)) == hash(wn.AvgPool2d((2, 2), stride=2))
    assert wn.Linear(3) != wn.Linear(4) and wn.Erf(1.0, 2.0) != wn.Erf(1.0, 3.0)
    assert wn.ReLU() != wn.Abs()  # same base class, different layers
    assert len({wn.ReLU(), wn.ReLU(), wn.Sequential(wn.Linear(2), wn.ReLU())}) == 2


def test_functions_are_described_by_their_importable_name():
    layer = wn.Elementwise(torch.tanh, degree=32)
    spec = layer.spec()
    assert spec["args"]["fn"] == {"function": "torch:tanh"}
    assert repr(layer) == "Elementwise(fn=torch.tanh, fn_prime=None, degree=32)"
    rebuilt = from_spec(json.loads(json.dumps(spec)))
    assert rebuilt == layer and rebuilt.fn is torch.tanh


def test_a_lambda_has_no_canonical_spec_but_equality_still_works():
    layer = wn.Elementwise(lambda t: t * t)
    with pytest.raises(NotCanonicalError, match="cannot be imported by name"):
        layer.spec()
    assert layer == layer and hash(layer) == hash(layer)
    assert layer != wn.Elementwise(lambda t: t * t)  # another function object
    assert "<lambda>" in repr(layer) and "0x" not in repr(layer)


SPEC_NET_SOURCE = (
    "wn.Sequential(wn.Conv2d(8, 3, padding='same', W_std=1.5, b_std=0.05), "
    "wn.Elementwise(torch.sin), wn.AvgPool2d(2), wn.GlobalAvgPool(), wn.Linear(1))"
)
#: The networks whose stores another process writes: name -> source.
STORE_NET_SOURCES = {
    "narrow": "wn.Sequential(wn.Linear(16, 1.5, 0.05), wn.ReLU(), wn.Linear(16, 1.2, 0.1), "
              "wn.Linear(1, 1.0))",
    "tanh": "wn.Sequential(wn.Linear(8, 1.5, 0.05), wn.Elementwise(torch.tanh, degree=24), "
            "wn.Linear(8, 1.2, 0.1), wn.Linear(1, 1.0))",
}
X = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def other_process(tmp_path_factory) -> dict:
    """One fresh Python process: the spec and repr of ``SPEC_NET_SOURCE``, and a finished
    store (tiles of 4) of each network of ``STORE_NET_SOURCES`` on ``X``."""
    folder = tmp_path_factory.mktemp("other_process")
    torch.save(X, folder / "x.pt")
    stores = "\n".join(
        f"wn.kernel_matrix({source}, x, get=('nngp', 'ntk'), tile=4, "
        f"store={str(folder / name)!r}, progress=False)"
        for name, source in STORE_NET_SOURCES.items())
    script = (
        "import json, torch, widenets as wn\n"
        f"net = {SPEC_NET_SOURCE}\n"
        "print(json.dumps(net.spec(), sort_keys=True))\n"
        "print(repr(net))\n"
        f"x = torch.load({str(folder / 'x.pt')!r})\n"
        + stores + "\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return {"spec": json.loads(out[0]), "repr": out[1], "folder": folder}


def test_specs_are_the_same_in_another_process(other_process):
    net = eval(SPEC_NET_SOURCE)  # the very source the other process ran
    assert other_process["spec"] == net.spec()
    assert other_process["repr"] == repr(net)


class Doubling(wn.Layer):
    """A layer defined outside widenets: x -> 2x (kernel times 4)."""

    def __init__(self, scale: float = 2.0) -> None:
        self.scale = scale

    def kernel_rule(self, k):
        s2 = self.scale**2
        return k.replace(nngp=s2 * k.nngp, ntk=None if k.ntk is None else s2 * k.ntk,
                         var1=s2 * k.var1, var2=None if k.var2 is None else s2 * k.var2)


def test_layers_defined_elsewhere_are_named_by_module_and_qualname():
    spec = Doubling(3.0).spec()
    assert spec == {"layer": f"{__name__}:Doubling", "args": {"scale": 3.0}}
    assert from_spec(spec) == Doubling(3.0)


def test_kernel_spec_leaves_out_widths_only_where_they_do_not_enter_the_kernel():
    narrow, wide = net_with(16, wn.ReLU()), net_with(512, wn.ReLU())
    assert narrow != wide and narrow.kernel_spec() == wide.kernel_spec()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(narrow.kernel(x), wide.kernel(x))
    # The standard parameterization's NTK depends on the widths: they stay.
    standard = (net_with(16, wn.ReLU(), "standard"), net_with(512, wn.ReLU(), "standard"))
    assert standard[0].kernel_spec() != standard[1].kernel_spec()
    assert not torch.equal(standard[0].kernel(x), standard[1].kernel(x))
    # A concatenation weighs its branches by width: they stay too.
    concat = [wn.Sequential(wn.FanOut(2), wn.Parallel(wn.Linear(w), wn.Linear(8, 2.0)),
                            wn.FanInConcat(), wn.Linear(1)) for w in (8, 24)]
    assert concat[0].kernel_spec() != concat[1].kernel_spec()
    assert not torch.equal(concat[0].kernel(x), concat[1].kernel(x))


# ------------------------------------------------------------------ stores across processes
def store_from_other_process(other_process: dict, name: str, tmp_path: Path) -> Path:
    """A copy (so that tests may change it) of a store the other process wrote."""
    copy = tmp_path / f"{name}.zarr"
    shutil.copytree(other_process["folder"] / name, copy)
    return copy


def forget_tiles(store: Path, count: int) -> list[str]:
    """Remove ``count`` finished-tile markers, as if the writer had been killed."""
    markers = sorted(p for p in (store / "done").iterdir() if not p.name.startswith("."))
    for marker in markers[:count]:
        marker.unlink()
    return [m.name for m in markers[:count]]


def resume_counting(net: wn.Layer, store: Path, monkeypatch) -> tuple[object, list[str]]:
    computed = []
    original = tiles_module.compute_tile

    def counting(net_, x1, x2, tile, names, *side):
        computed.append(tile.key)
        return original(net_, x1, x2, tile, names, *side)

    monkeypatch.setattr(tiles_module, "compute_tile", counting)
    result = wn.kernel_matrix(net, X, get=("nngp", "ntk"), tile=4, store=store,
                              progress=False)
    return result, computed


def test_another_declared_width_resumes_the_same_store(other_process, tmp_path, monkeypatch):
    store = store_from_other_process(other_process, "narrow", tmp_path)
    forgotten = forget_tiles(store, 2)
    wide = net_with(512, wn.ReLU())
    result, computed = resume_counting(wide, store, monkeypatch)
    assert sorted(computed) == sorted(forgotten)  # the other tiles came from the store
    expected = wide.kernel(X, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(result[name], expected[name], rtol=1e-13, atol=0)


def test_another_width_in_the_standard_parameterization_is_refused(tmp_path):
    store = tmp_path / "k.zarr"
    wn.kernel_matrix(net_with(16, wn.ReLU(), "standard"), X, tile=4, store=store,
                     progress=False)
    with pytest.raises(ValueError, match="holds a different computation: its architecture"):
        wn.kernel_matrix(net_with(512, wn.ReLU(), "standard"), X, tile=4, store=store,
                         progress=False)


def test_an_elementwise_store_resumes_from_another_process(other_process, tmp_path,
                                                          monkeypatch):
    store = store_from_other_process(other_process, "tanh", tmp_path)
    forgotten = forget_tiles(store, 3)
    net = net_with(8, wn.Elementwise(torch.tanh, degree=24))
    result, computed = resume_counting(net, store, monkeypatch)
    assert sorted(computed) == sorted(forgotten)
    expected = net.kernel(X, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(result[name], expected[name], rtol=1e-13, atol=0)


def test_a_store_of_a_lambda_is_refused_with_a_clear_message(tmp_path):
    net = net_with(8, wn.Elementwise(lambda t: torch.tanh(t), degree=24))
    with pytest.raises(ValueError, match="another process can rebuild.*define it at module"):
        wn.kernel_matrix(net, X, tile=4, store=tmp_path / "k.zarr", progress=False)
    assert not (tmp_path / "k.zarr").exists()
    # without a store, nothing changes
    torch.testing.assert_close(wn.kernel_matrix(net, X, tile=4, progress=False),
                               net.kernel(X), rtol=1e-13, atol=0)
