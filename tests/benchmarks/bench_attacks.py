"""Benchmark of crmt_nb.attacks (not collected by pytest). Run:

    .venv/bin/python tests/benchmarks/bench_attacks.py [--batch 64] [--steps 10] [--repeats 7] [--threads 2]

On a shared, oversubscribed machine use --threads 1: with 2 OpenMP threads competing with other processes the
timings swing by 10x between repeats and the ratios are meaningless.

1. overhead ratio  t_pgd / (steps · t_fwd+bwd)  for a two-modality JointModel (SmallCNN encoders, 3×32×32 + 1×32×32)
   on CPU; t_fwd+bwd = one forward + the backward w.r.t. the inputs (what one PGD step must pay; target ≤ 1.15).
   The ratio against forward + a full backward (parameters too) is printed as well.
2. samples/s of our pgd_l2 beside torchattacks' PGDL2 on the equivalent single-modality model (the image encoder
   alone), same settings (eps 0.5, alpha 0.1, no random start, box [0, 1]), interleaved repeats of the same run.
3. the library's own work per step (pgd_l2 on a near-free model), a load-independent bound on the ratio of 1.
All numbers are medians over `--repeats` timed runs after one warm-up (wall clock and process CPU time).
"""
import argparse, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F
from crmt_nb.models import joint_model
from crmt_nb.attacks import pgd_l2


class Logits(nn.Module):
    "Return only the fused logits (torchattacks needs a tensor)."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, *xs): return self.m(*xs).logits


def timed(fn):
    "(wall seconds, process CPU seconds) of one call."
    w, c = time.perf_counter(), time.process_time(); fn()
    return time.perf_counter() - w, time.process_time() - c


def fwd_bwd_inputs(model, xs, y):
    xs = tuple(x.detach().requires_grad_(True) for x in xs)
    torch.autograd.grad(F.cross_entropy(model(*xs), y, reduction='sum'), xs)


def fwd_bwd_full(model, xs, y):
    xs = tuple(x.detach().requires_grad_(True) for x in xs)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(*xs), y, reduction='sum').backward()


class NearFree(nn.Module):
    "A model that costs almost nothing: what remains of pgd_l2's time is the library's own per-step work."
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(10))
    def forward(self, *xs): return sum(x.flatten(1)[:, :10] for x in xs) + self.w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, S, R = a.batch, a.steps, a.repeats
    mm = Logits(joint_model([(3, 32, 32), (1, 32, 32)], 10)).eval()
    xs = (torch.rand(B, 3, 32, 32), torch.rand(B, 1, 32, 32)); y = torch.randint(0, 10, (B,))
    boxes = [(0, 1), (0, 1)]
    single = Logits(joint_model([(3, 32, 32)], 10)).eval()
    x1 = xs[0]
    fb2 = lambda: [fwd_bwd_inputs(mm, xs, y) for _ in range(S)]
    fb2_full = lambda: [fwd_bwd_full(mm, xs, y) for _ in range(S)]
    pgd2 = lambda: pgd_l2(mm, xs, y, 0.5, steps=S, alpha=0.1, boxes=boxes)
    fb1 = lambda: [fwd_bwd_inputs(single, (x1,), y) for _ in range(S)]
    pgd1 = lambda: pgd_l2(single, x1, y, 0.5, steps=S, alpha=0.1, boxes=(0, 1))
    try:
        import torchattacks
        atk = torchattacks.PGDL2(single, eps=0.5, alpha=0.1, steps=S, random_start=False)
        ta1 = lambda: atk(x1, y)
    except ImportError:
        print('torchattacks not installed: skipping the comparison'); ta1 = None
    # paired, interleaved measurements: each repeat times an attack right beside its reference, so machine load
    # (other processes on a shared box) hits both alike; the medians of the per-repeat ratios are reported.
    blocks = [('2-mod: steps x fwd+bwd(inputs)', fb2), ('2-mod: steps x fwd+bwd(full)', fb2_full),
              ('2-mod: pgd_l2', pgd2), ('1-mod: steps x fwd+bwd(inputs)', fb1), ('1-mod: pgd_l2', pgd1)]
    if ta1 is not None: blocks.append(('1-mod: torchattacks PGDL2', ta1))
    for _, f in blocks: f()                                           # warm-up
    wall = {k: [] for k, _ in blocks}; cpu = {k: [] for k, _ in blocks}
    for _ in range(R):
        for k, f in blocks:
            w, c = timed(f); wall[k].append(w); cpu[k].append(c)
    med = lambda xs: statistics.median(xs)
    print(f'batch {B}, steps {S}, {R} repeats, {torch.get_num_threads()} threads; medians (wall | process CPU)')
    for k, _ in blocks:
        sps = f'   {B / med(wall[k]):7.1f} samples/s (wall)' if 'fwd' not in k else ''
        print(f'  {k:34s} {med(wall[k]) * 1e3:9.1f} ms | {med(cpu[k]) * 1e3:9.1f} ms{sps}')
    def ratio(a, b, d):
        return med([x / z for x, z in zip(d[a], d[b])])
    for lab, d in (('wall', wall), ('cpu', cpu)):
        print(f'[{lab}] t_pgd / (steps * t_fwd+bwd): 2-modality {ratio("2-mod: pgd_l2", "2-mod: steps x fwd+bwd(inputs)", d):.3f} '
              f'(vs full backward {ratio("2-mod: pgd_l2", "2-mod: steps x fwd+bwd(full)", d):.3f}), '
              f'1-modality {ratio("1-mod: pgd_l2", "1-mod: steps x fwd+bwd(inputs)", d):.3f}   target <= 1.15')
        if ta1 is not None:
            print(f'[{lab}] single modality: t_ours / t_torchattacks = {ratio("1-mod: pgd_l2", "1-mod: torchattacks PGDL2", d):.3f}')
    if ta1 is not None:
        print(f'single modality samples/s (wall medians): ours {B / med(wall["1-mod: pgd_l2"]):.1f}, '
              f'torchattacks {B / med(wall["1-mod: torchattacks PGDL2"]):.1f}; '
              f'two modalities, ours {B / med(wall["2-mod: pgd_l2"]):.1f}')
    free = NearFree()
    t_free = med([timed(lambda: pgd_l2(free, xs, y, 0.5, steps=S, alpha=0.1, boxes=boxes))[1] for _ in range(R)])
    t_fb = med(cpu['2-mod: steps x fwd+bwd(inputs)']) / S
    print(f'library work per step (2 modalities, near-free model, CPU): {t_free / S * 1e3:.2f} ms vs one fwd+bwd '
          f'{t_fb * 1e3:.1f} ms -> load-independent bound on the ratio: {1 + t_free / S / t_fb:.3f}')


if __name__ == '__main__':
    main()
