"""A kernel matrix computed in tiles into a resumable on-disk store.

``wn.kernel_matrix(net, x, store=PATH, tile=T)`` computes ``K(x, x)`` tile by tile (only
the tiles on and above the diagonal: the others are their transposes) and writes each
finished tile to a Zarr store, marked done by a file in ``PATH/done/``. Here, on the
NTK of a fully connected ReLU network on the digits (sorted by class):

1. a first call computes every tile;
2. the markers of the last tiles are removed, which is what the store looks like after
   a process killed before finishing them (Ctrl-C, ``kill -9``): the same call again
   computes only those tiles;
3. a third call finds every tile done and computes nothing;

then ``wn.load_kernel`` reads the store back, and a random subset is checked against
``net.kernel``. The same code works for any N: memory holds the output and one tile.

Run:  python examples/large_kernel_store.py [--out DIR] [--quick] [--seed N] [--store PATH]
Writes DIR/large_kernel_store.png (default DIR: example-output). Without ``--store`` the
store lives in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import torch

import widenets as wn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def markers(store: Path) -> dict[tuple[int, int], bytes]:
    """The store's finished tiles: (first row, first column) -> contents of the marker
    (the tile's rows, columns and the SHA-256 of its numbers)."""
    done = {}
    for path in (store / "done").iterdir():
        text = path.read_bytes()
        info = json.loads(text)
        done[info["rows"][0], info["cols"][0]] = text + str(path.stat().st_mtime_ns).encode()
    return done


def computed_by(store: Path, before: dict, call) -> tuple[object, set]:
    """Run ``call()`` and return its result and the tiles whose markers it (re)wrote."""
    result = call()
    after = markers(store)
    return result, {key for key, value in after.items() if before.get(key) != value}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=None, help="store folder (default: temporary)")
    args = parser.parse_args(argv)
    n, tile, n_lost = (600, 100, 4) if args.quick else (1797, 256, 6)

    digits = wn.datasets.load_digits()  # all 1797 digits, no split
    order = np.argsort(digits.labels_train, kind="stable")  # by class
    order = order[np.linspace(0, len(order) - 1, n).round().astype(int)]  # n of them
    x, labels = torch.from_numpy(digits.x_train[order]), digits.labels_train[order]
    net = wn.Sequential(wn.Linear(512, W_std=1.5, b_std=0.05), wn.ReLU(),
                        wn.Linear(512, W_std=1.5, b_std=0.05), wn.ReLU(),
                        wn.Linear(10, W_std=1.5, b_std=0.05))

    temporary = tempfile.TemporaryDirectory() if args.store is None else None
    store = Path(args.store or temporary.name) / "ntk.zarr"
    shutil.rmtree(store, ignore_errors=True)  # start from scratch (this example's store)

    def call():
        return wn.kernel_matrix(net, x, get="ntk", tile=tile, store=store, progress=False)

    first, computed_1 = computed_by(store, {}, call)
    kept = markers(store)
    lost = sorted(kept)[-n_lost:]  # as if the first call had died before these tiles
    for r0, c0 in lost:
        (store / "done" / f"{r0}-{c0}").unlink()
        del kept[r0, c0]
    second, computed_2 = computed_by(store, kept, call)
    third, computed_3 = computed_by(store, markers(store), call)
    loaded = wn.load_kernel(store)

    rng = np.random.default_rng(args.seed)
    rows, cols = rng.choice(n, size=100, replace=False), rng.choice(n, size=80, replace=False)
    direct = net.kernel(x[rows], x[cols], get="ntk")
    check = float((loaded[rows][:, cols] - direct).abs().max() / direct.abs().max())

    fig, (ax_k, ax_t) = plt.subplots(1, 2, figsize=(11, 5.2))
    b = max(1, n // 150)  # show means over b x b blocks of entries: a small, light image
    starts_b = np.arange(0, n, b)
    sizes = np.diff(np.append(starts_b, n))
    blocks = np.add.reduceat(np.add.reduceat(loaded.numpy(), starts_b, 0), starts_b, 1)
    image = ax_k.imshow(blocks / np.outer(sizes, sizes), cmap="viridis",
                        interpolation="nearest", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    fig.colorbar(image, ax=ax_k, label="NTK")
    centres = [np.flatnonzero(labels == c).mean() for c in range(10)]
    ax_k.set_xticks(centres, [str(c) for c in range(10)])
    ax_k.set_yticks(centres, [str(c) for c in range(10)])
    ax_k.set(xlabel="digit images, by class", ylabel="digit images, by class",
             title=f"NTK of {n} digits from the store, by class\n(means over {b} x {b} blocks)")
    n_tiles = -(-n // tile)
    status = np.zeros((n_tiles, n_tiles))  # 0: lower triangle, the transpose of a tile
    for (r0, c0) in computed_1:
        status[r0 // tile, c0 // tile] = 1
    for (r0, c0) in computed_2:
        status[r0 // tile, c0 // tile] = 2
    colors = ["#dddddd", "#4c72b0", "#dd8452"]
    ax_t.imshow(status, cmap=matplotlib.colors.ListedColormap(colors), vmin=0, vmax=2)
    for edge in np.arange(n_tiles + 1) - 0.5:
        ax_t.axhline(edge, color="white", lw=1)
        ax_t.axvline(edge, color="white", lw=1)
    ax_t.set(xticks=[], yticks=[], xlabel=f"column tiles ({tile} digits each)",
             ylabel=f"row tiles ({tile} digits each)",
             title=f"Tiles: call 1 computed {len(computed_1)}, call 2 {len(computed_2)}, "
                   f"call 3 {len(computed_3)}")
    handles = [matplotlib.patches.Patch(color=c, label=text) for c, text in zip(colors, [
        "transpose of a computed tile", "computed by call 1",
        f"lost, recomputed by call 2 ({n_lost})"])]
    ax_t.legend(handles=handles, loc="lower left", fontsize=8)
    fig.suptitle(f"wn.kernel_matrix(..., tile={tile}, store=...): resumable; the stored "
                 f"kernel equals net.kernel to {check:.1e} (relative, on a subset)")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "large_kernel_store.png"
    fig.savefig(figure, dpi=110)
    plt.close(fig)

    result = {
        "figure": str(figure), "n": n, "tile": tile, "tiles": len(computed_1),
        "computed": [len(computed_1), len(computed_2), len(computed_3)],
        "recomputed_are_lost": computed_2 == set(lost),
        "calls_agree": bool(torch.equal(first, second) and torch.equal(second, third)
                            and torch.equal(third, loaded)),
        "max_relative_difference_to_net_kernel": check,
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    if temporary is not None:
        temporary.cleanup()
    return result


if __name__ == "__main__":
    main()
