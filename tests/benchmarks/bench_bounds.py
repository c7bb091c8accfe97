"""Benchmarks of crmt_nb.bounds (not collected by pytest). Run:

    .venv/bin/python tests/benchmarks/bench_bounds.py [--repeats 7] [--threads 1] [--batch 64]

1. empirical_lipschitz (one batched backward per batch, `is_grads_batched=True`) vs a per-class backward loop, at
   K = 31 classes (the KS size), two modalities, orth head, for an MLP model and a SmallCNN model; both compute the
   same (M, K) table (checked) over the same batches. Target: batched ≥ 2× faster. (On CPU, torch has no vmap
   batching rule for convolution/batch-norm backward: the profiler shows one convolution_backward per class, so
   CNN encoders gain little; Linear layers batch.)
2. Orth head forward+backward from cached features (M = 2, K = 31, d = 512, batch 64): the closed-form `rownorm`
   (what the model uses) vs an SVD-loop reference in the style of OWNNorm with one row per group (centre the row,
   whiten with the SVD of its 1×1 covariance), written here.
Medians over `--repeats` timed runs after a warm-up; wall-clock seconds. On a shared CPU use --threads 1.
"""
import argparse, statistics, time
import torch
from crmt_nb.models import joint_model, rownorm
from crmt_nb.bounds import empirical_lipschitz


def median_time(fn, repeats):
    fn()                                                                   # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


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


def svd_loop_rows(w):
    "OWNNorm-style per-group whitening with one row per group: an SVD per row (the reference, slow)."
    out = []
    for row in w.split(1, dim=0):
        c = row - row.mean(dim=1, keepdim=True)
        U, S, _ = torch.linalg.svd(c @ c.t())
        out.append(U @ torch.diag(S.rsqrt()) @ U.t() @ c)
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeats', type=int, default=7); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--batch', type=int, default=64); ap.add_argument('--n-batches', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    print(f'torch {torch.__version__}, threads {a.threads}, repeats {a.repeats}')

    # 1. empirical Lipschitz, K = 31, for an all-MLP model (mfeat-like views) and an all-CNN model
    K = 31
    for label, shapes in [('MLP 76+64', [(76,), (64,)]), ('SmallCNN 1x16x16 x2', [(1, 16, 16), (1, 16, 16)])]:
        model = joint_model(shapes, K, head='orth').eval()
        batches = [(tuple(torch.rand(a.batch, *s) for s in shapes), torch.randint(0, K, (a.batch,)))
                   for _ in range(a.n_batches)]
        ref = loop_lipschitz(model, batches); got = empirical_lipschitz(model, batches)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), (got - ref).abs().max()
        t_b, _ = median_time(lambda: empirical_lipschitz(model, batches), a.repeats)
        t_l, _ = median_time(lambda: loop_lipschitz(model, batches), a.repeats)
        print(f'[1] empirical_lipschitz {label}, K={K}, {a.n_batches}x{a.batch} samples: batched {t_b * 1e3:.1f} ms, '
              f'per-class loop {t_l * 1e3:.1f} ms, speed-up {t_l / t_b:.2f}x (target >= 2x)')

    # 2. orth head forward + backward
    d, B = 512, a.batch
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
    t_c, _ = median_time(step(rownorm), max(a.repeats, 21))
    t_s, _ = median_time(step(svd_loop_rows), max(a.repeats, 21))
    print(f'[2] orth head fwd+bwd (M=2, K={K}, d={d}, B={B}): rownorm closed form {t_c * 1e3:.2f} ms, '
          f'SVD loop {t_s * 1e3:.2f} ms, ratio {t_s / t_c:.1f}x')


if __name__ == '__main__':
    main()
