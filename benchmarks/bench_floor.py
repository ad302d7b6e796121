"""What the matrix-free methods cannot go below on panel B: the cost of their parts.

CG, LiSSA, Arnoldi and Nystroem are built from products of the curvature with
blocks of vectors, per-sample gradients and one (test x train) matrix product. This
script times each of those parts on panel B (digits MLP 64-32-32-10, 3,466
parameters, 1,000 train / 200 test), with one torch thread, three ways where that
applies:

* ours: ``CurvatureOperator.data_mv`` (torch.func, batches of 256 samples);
* pyDVL 0.10: ``HessianOperator.apply`` over a DataLoader of 256;
* by hand: the exact Hessian-vector product of this very MLP (tanh, cross-entropy)
  written out as batched matrix products over the whole training set at once
  (forward tangents, backward pass and its tangents), blocks of 500 samples,
  checked against ours. It has no framework overhead at all, so it is a floor for
  any implementation that does not form the p x p matrix.

Then the floor of a method is the sum of its parts: a speed-up over pyDVL above
(pyDVL's time / floor) is out of reach without forming the p x p matrix.

Run:  python benchmarks/bench_floor.py      (needs the benchmark extra)
The table is printed and saved to benchmarks/results/floor.md.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from panels import panel_b, timed
from torch.utils.data import DataLoader, TensorDataset

from skinfluence._adapters import build_adapter
from skinfluence._gradients import per_sample_grads
from skinfluence.solvers import CurvatureOperator

RESULTS = Path(__file__).parent / "results" / "floor.md"
REG = 0.1


def hand_hvp(layers, X, Y, V):
    """``V @ H`` (H the Hessian of the SUMMED cross-entropy) for a tanh MLP given as a
    list of nn.Linear, every sample at once; V is (k, p) in the flat order
    weight, bias of each layer in turn."""
    k, o = V.shape[0], 0
    dW, db = [], []
    for L in layers:
        nw, nb = L.weight.numel(), L.bias.numel()
        dW.append(V[:, o : o + nw].reshape(k, *L.weight.shape))
        db.append(V[:, o + nw : o + nw + nb])
        o += nw + nb
    last = len(layers) - 1
    with torch.no_grad():
        a, z = [X], []
        for i, L in enumerate(layers):
            z.append(a[-1] @ L.weight.T + L.bias)
            if i < last:
                a.append(torch.tanh(z[-1]))
        P = torch.softmax(z[-1], -1)
        d = P.clone()
        d[torch.arange(len(Y)), Y] -= 1  # d loss / d logits
        da, dz = [None], []
        for i, L in enumerate(layers):  # forward tangents
            t = torch.matmul(a[i], dW[i].transpose(1, 2)) + db[i][:, None, :]
            if da[i] is not None:
                t = t + da[i] @ L.weight.T
            dz.append(t)
            if i < last:
                da.append((1 - a[i + 1] ** 2) * t)
        dd = P * dz[-1] - P * (P * dz[-1]).sum(-1, keepdim=True)  # softmax Hessian
        out = [None] * len(layers)
        for i in range(last, -1, -1):  # backward pass and its tangent
            L = layers[i]
            gW = torch.matmul(dd.transpose(1, 2), a[i])
            if da[i] is not None:
                gW = gW + torch.matmul(d.T, da[i])
            out[i] = torch.cat([gW.reshape(k, -1), dd.sum(1)], 1)
            if i == 0:
                break
            s = 1 - a[i] ** 2
            back = d @ L.weight
            dback = dd @ L.weight + torch.matmul(d, dW[i])
            dd = s * dback - 2 * a[i] * da[i] * back
            d = s * back
        return torch.cat(out, 1)


def hand_blocks(layers, X, Y, V, block=500):
    """:func:`hand_hvp` summed over blocks of samples (the best block size on this
    machine: the whole set at once overflows the caches)."""
    return sum(hand_hvp(layers, X[s : s + block], Y[s : s + block], V) for s in range(0, len(X), block))


def main():
    torch.set_num_threads(1)
    from pydvl.influence.torch.operator import HessianOperator

    model, Xtr, ytr, Xte, yte = panel_b()
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    a = build_adapter(model, loss=F.cross_entropy)
    X, Y = a.features(Xtr), a.targets(ytr)
    a.bind(X, len(X))
    op = CurvatureOperator(a, X, Y, "exact", REG, 256)
    dl = DataLoader(TensorDataset(torch.as_tensor(Xtr), torch.as_tensor(ytr)), batch_size=256)
    hop = HessianOperator(model, F.cross_entropy, dl)
    p, n = a.n_params, len(X)
    torch.manual_seed(0)
    rows = []
    for k in (200, 30):
        V = torch.randn(k, p)
        t_o, ours = timed(lambda V=V: op.data_mv(V), 5)
        t_p, _ = timed(lambda V=V: hop.apply(V), 5)
        t_h, hand = timed(lambda V=V: hand_blocks(layers, X, Y, V) / n, 5)
        err = float((hand - ours).norm() / ours.norm())
        rows.append((f"Hessian x {k} vectors, 1,000 points", t_o, t_p, t_h, f"{err:.1e}"))
    Xall, Yall = torch.cat([X, a.features(Xte)]), torch.cat([Y, a.targets(yte)])
    t_g, G = timed(lambda: per_sample_grads(a, Xall, Yall), 5)
    rows.append(("per-sample gradients, 1,200 points", t_g, None, None, ""))
    Gte, Gtr = G[n:].contiguous(), G[:n].contiguous()
    t_m, _ = timed(lambda: Gte @ Gtr.T, 5)
    rows.append(("(200 x p) @ (p x 1,000) product", t_m, None, None, ""))

    def cell(t):
        return "" if t is None else f"{t:.4f}"

    lines = [
        "# Floors of the matrix-free methods on panel B",
        "",
        f"Produced by `python benchmarks/bench_floor.py` (best of 5 after a warm-up, 1 torch "
        f"thread, torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}). "
        "Seconds. \"by hand\": the exact Hessian-vector product of this MLP written out as "
        "batched matrix products over all samples at once; \"rel. diff\" is its distance "
        "to ours.",
        "",
        "| part | ours | pyDVL | by hand | rel. diff |",
        "|---|---|---|---|---|",
        *[f"| {r[0]} | {cell(r[1])} | {cell(r[2])} | {cell(r[3])} | {r[4]} |" for r in rows],
        "",
    ]
    hvp200_hand, hvp30_hand = rows[0][3], rows[1][3]
    nys_floor = hvp30_hand + t_g + t_m
    lines += [
        f"Nystroem (rank 30) cannot take less than its sketch product, the gradients and "
        f"the final product: {hvp30_hand:.4f} + {t_g:.4f} + {t_m:.4f} = {nys_floor:.4f} s.",
        f"CG pays one 200-vector product per block iteration ({hvp200_hand:.4f} s by hand, "
        f"{rows[0][1]:.4f} s ours, {rows[0][2]:.4f} s pyDVL): the speed-up over pyDVL at "
        "equal iteration counts is bounded by the ratio of those products.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
