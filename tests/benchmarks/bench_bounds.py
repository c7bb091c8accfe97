"""Benchmarks of crmt_nb.bounds (not collected by pytest). Run (results: tests/benchmarks/results/bench_bounds.txt):

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_bounds.py [--repeats 7] [--threads 1] [--batch 64]

1. `empirical_lipschitz` vs a per-class backward loop (`loop_lipschitz`: K backwards of Σ_m s^(m) per batch, what the
   authors' get_lip does with the bookkeeping fixed), per architecture: an all-MLP model (76+64, K = 31), an all-CNN
   model (SmallCNN 1×16×16 ×2, K = 31; the issue's case) and the mini notebooks' model (mfeat pix 1×16×15 SmallCNN +
   fou 76 MLP, K = 10; also with `official=True` against the authors' loop), orth head, `--n-batches`×`--batch`
   samples. Both compute the same table (checked). Also timed: the generic path (one `is_grads_batched` backward
   through the whole model — the previous implementation). The repeats of all variants are interleaved; medians of
   wall-clock and of process CPU time (robust to a shared, oversubscribed machine) and the ratios of those medians.
   Target: ≥ 3× over the loop.
2. Where the CNN time goes: the conv input-gradient kernels of the SmallCNN's three layers at the loop's batch (B,
   the aten NCHW kernel autograd calls) and at the fast path's batch (K·B rows, `bounds._conv_input_grad`), in
   GFLOP/s (CPU time) against a 2048³ sgemm on the same thread, and the resulting floors of the issue's case.
3. Orth head forward+backward from cached features (M = 2, K = 31, d = 512, batch 64): the closed-form `rownorm`
   (what the model uses) vs an SVD-loop reference in the style of OWNNorm with one row per group.
"""
import argparse, statistics, time
from unittest import mock
import torch, torch.nn as nn
from crmt_nb import bounds
from crmt_nb.models import joint_model, rownorm
from crmt_nb.bounds import empirical_lipschitz


def timed(fn):
    "(wall s, CPU s) of one call."
    w, c = time.perf_counter(), time.process_time(); fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(fns: dict, repeats: int) -> dict:
    "name → (median wall, median CPU) over `repeats` rounds, each round running every fn once (after one warm-up)."
    for f in fns.values(): f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items(): ts[k].append(timed(f))
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in ts.items()}


def loop_lipschitz(model, batches):
    "Reference: one backward per class and batch (what the authors' get_lip does, with the bookkeeping fixed)."
    model.eval(); best = None
    for xs, _ in batches:
        xs = tuple(x.clone().requires_grad_(True) for x in xs)
        uni = model(xs).unimodal; K = uni[0].shape[1]
        S = sum(uni)
        if best is None: best = torch.zeros(len(xs), K)
        for k in range(K):
            gs = torch.autograd.grad(S[:, k].sum(), xs, retain_graph=True)
            for m, g in enumerate(gs): best[m, k] = max(best[m, k], g.flatten(1).norm(dim=1).max())
    return best


def official_loop(model, batches):
    "The authors' get_lip, literally: a backward of the fused logit per class; audio zeroed before it is read."
    model.eval(); L = None
    for xs, _ in batches:
        xv, xa = (x.clone().requires_grad_(True) for x in xs)
        out = model(xv, xa).logits
        if L is None: L = torch.zeros(2, out.shape[1])
        for t in range(out.shape[1]):
            out[:, t].sum().backward(retain_graph=True)
            g = xv.grad.clone(); xa.grad.zero_()
            L[0, t] = max(L[0, t], g.flatten(1).norm(dim=1).max())
    return L


def generic(model, batches, **kw):
    "empirical_lipschitz forced onto the generic path (one is_grads_batched backward of the whole model per batch)."
    with mock.patch.object(bounds, '_per_encoder', lambda m: False): return empirical_lipschitz(model, batches, **kw)


def conv_flops(enc, shape):
    "Per sample: the FLOPs of each Conv2d's input gradient (2·C_out·H_o·W_o·C_in/groups·kh·kw), with its input/output shapes."
    out = []
    hooks = [m.register_forward_hook(lambda mod, i, o: out.append((mod, tuple(i[0].shape), tuple(o.shape))))
             for m in enc.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad(): enc(torch.zeros(1, *shape))
    for h in hooks: h.remove()
    return [(mod, i, o, 2 * o[1] * o[2] * o[3] * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])
            for mod, i, o in out]


def bench_lipschitz(a):
    print(f'[1] empirical_lipschitz vs the per-class loop ({a.n_batches}x{a.batch} samples, orth head, medians of {a.repeats} '
          f'interleaved repeats; wall s | CPU s)')
    cases = [('MLP 76+64', [(76,), (64,)], 31, False), ('SmallCNN 1x16x16 x2', [(1, 16, 16), (1, 16, 16)], 31, False),
             ('mini pix 1x16x15 CNN + fou 76 MLP', [(1, 16, 15), (76,)], 10, False),
             ('mini, official=True', [(1, 16, 15), (76,)], 10, True)]
    rows = []
    for label, shapes, K, official in cases:
        torch.manual_seed(0)
        model = joint_model(shapes, K, head='orth').eval()
        with torch.no_grad(): model.a.uniform_(-1, 1)
        batches = [(tuple(torch.rand(a.batch, *s) for s in shapes), torch.randint(0, K, (a.batch,))) for _ in range(a.n_batches)]
        loop = (lambda: official_loop(model, batches)) if official else (lambda: loop_lipschitz(model, batches))
        ref, got, gen = loop(), empirical_lipschitz(model, batches, official=official), generic(model, batches, official=official)
        err = max((got - ref).abs().max().item(), (gen - ref).abs().max().item()) / ref.abs().max().item()
        assert err < 1e-4, (label, err)
        t = interleaved({'loop': loop, 'new': lambda: empirical_lipschitz(model, batches, official=official),
                         'generic': lambda: generic(model, batches, official=official)}, a.repeats)
        (lw, lc), (nw, nc), (gw, gc) = t['loop'], t['new'], t['generic']
        rows.append((label, K, lw, lc, nw, nc, gw, gc, err))
        print(f'    {label:34s} K={K:2d}: loop {lw:.3f} | {lc:.3f} s, empirical_lipschitz {nw:.3f} | {nc:.3f} s -> '
              f'speed-up {lw / nw:.2f}x | {lc / nc:.2f}x (target >= 3x); generic batched backward {gw:.3f} | {gc:.3f} s '
              f'({lw / gw:.2f}x | {lc / gc:.2f}x); max rel. diff to the loop {err:.1e}', flush=True)
    return rows


def bench_kernels(a, rows):
    print(f'[2] SmallCNN 1x16x16 conv input-gradient kernels (CPU time, medians of {max(a.repeats, 9)}), K=31, B={a.batch}')
    A = torch.randn(2048, 2048); Bm = torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / interleaved({'mm': lambda: A @ Bm}, max(a.repeats, 9))['mm'][1] / 1e9
    print(f'    sgemm 2048^3, one thread: {peak:.0f} GFLOP/s')
    torch.manual_seed(0); K, B = 31, a.batch
    enc = joint_model([(1, 16, 16)], K).encoders[0].eval()
    per_sample = 0; t_loop = t_new = 0.
    for conv, ishape, oshape, fl in conv_flops(enc, (1, 16, 16)):
        per_sample += fl
        g1 = torch.randn(B, *oshape[1:]); x1 = torch.empty(B, *ishape[1:])
        gK = torch.randn(K * B, *oshape[1:]).contiguous(memory_format=torch.channels_last)
        w = conv.weight.detach()
        with torch.no_grad():
            t = interleaved({'aten NCHW (the loop), batch B': lambda: torch.ops.aten.convolution_backward(
                                 g1, x1, w, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups, [True, False, False]),
                             'fast path, batch K*B': lambda: bounds._conv_input_grad(gK, conv, (K * B, *ishape[1:]))},
                            max(a.repeats, 9))
        (_, c1), (_, cK) = t['aten NCHW (the loop), batch B'], t['fast path, batch K*B']
        t_loop += K * c1; t_new += cK
        print(f'    conv {conv.in_channels}->{conv.out_channels} stride {conv.stride[0]} {ishape[2]}x{ishape[3]}: {fl / 1e3:.0f} kFLOP/sample; '
              f'loop kernel {B * fl / c1 / 1e9:.1f} GFLOP/s, fast-path kernel {K * B * fl / cK / 1e9:.1f} GFLOP/s')
    n_enc, n_b = 2, a.n_batches
    total = per_sample * K * B * n_enc * n_b
    (_, _, lw, lc, nw, nc, *_), = [r for r in rows if r[0].startswith('SmallCNN')]
    print(f'    issue case (2 encoders, {n_b}x{B} samples, K={K}): {total / 1e9:.2f} GFLOP of conv input gradients. '
          f'Floors: at the sgemm peak {total / peak / 1e9:.3f} s; with these kernels {n_enc * n_b * t_loop:.3f} s (loop) / '
          f'{n_enc * n_b * t_new:.3f} s (fast path).')
    print(f'    achieved (CPU time): loop {total / lc / 1e9:.1f} GFLOP/s, empirical_lipschitz {total / nc / 1e9:.1f} GFLOP/s of a '
          f'{peak:.0f} GFLOP/s sgemm; 3x over this loop needs {lc / 3:.3f} s, i.e. the whole fast path at '
          f'{3 * total / lc / 1e9:.1f} GFLOP/s.')


def svd_loop_rows(w):
    "OWNNorm-style per-group whitening with one row per group: an SVD per row (the reference, slow)."
    out = []
    for row in w.split(1, dim=0):
        c = row - row.mean(dim=1, keepdim=True)
        U, S, _ = torch.linalg.svd(c @ c.t())
        out.append(U @ torch.diag(S.rsqrt()) @ U.t() @ c)
    return torch.cat(out)


def bench_orth(a):
    K, d, B = 31, 512, a.batch
    ws = [torch.randn(K, d, requires_grad=True) for _ in range(2)]
    feats = [torch.randn(B, d) for _ in range(2)]
    amat = torch.full((2, K), 0.1, requires_grad=True); bias = torch.zeros(K, requires_grad=True)
    y = torch.randint(0, K, (B,))
    def step(norm):
        def run():
            h = sum(am * (f @ norm(w).t()) for am, f, w in zip(amat, feats, ws)) + bias
            torch.nn.functional.cross_entropy(h, y).backward()
        return run
    assert torch.allclose(rownorm(ws[0]), svd_loop_rows(ws[0]), atol=1e-5)
    t = interleaved({'c': step(rownorm), 's': step(svd_loop_rows)}, max(a.repeats, 21))
    print(f'[3] orth head fwd+bwd (M=2, K={K}, d={d}, B={B}): rownorm closed form {t["c"][0] * 1e3:.2f} ms, '
          f'SVD loop {t["s"][0] * 1e3:.2f} ms, ratio {t["s"][0] / t["c"][0]:.1f}x')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeats', type=int, default=7); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--batch', type=int, default=64); ap.add_argument('--n-batches', type=int, default=2)
    a = ap.parse_args()
    if a.repeats < 1 or a.batch < 1 or a.n_batches < 1: ap.error('--repeats, --batch and --n-batches must be >= 1')
    torch.set_num_threads(a.threads)
    print(f'torch {torch.__version__}, threads {a.threads}, repeats {a.repeats}')
    rows = bench_lipschitz(a)
    bench_kernels(a, rows)
    bench_orth(a)


if __name__ == '__main__':
    main()
