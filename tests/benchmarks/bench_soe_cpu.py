"""CPU options for the SoE mini models that were measured and not enabled (issue #14). Not collected by pytest. Run:

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_soe_cpu.py [--n-train 640] [--repeats 3]

The SoE mini models (3 ResNet-8 experts, widths 8/16/32 on 14x14 MNIST) on one thread, as the mini batch runs them:
* [1] one training epoch on `--n-train` images per method (the mini config), NCHW vs channels-last model and inputs
  (fp32; the path `core.cuda_paths` enables on CUDA), with the training loss of both (channels-last is not bitwise equal);
* [2] white-box PGD-20 and Square (100 queries) on 250 test images of an untrained SoE collaboration, NCHW vs channels-last;
* [3] one conv-BN-ReLU layer forward + backward at the three stage shapes: the three experts' layers one by one vs one
  grouped conv (groups=3, what stacking the experts would run), and fp32 vs bf16 CPU autocast.
Interleaved repeats, medians of wall seconds.
"""
import argparse, statistics, time
import torch
import crmt_nb.train as train_mod
from crmt_nb.data import mnist5k
from types import SimpleNamespace
from crmt_nb.core import get_profile
from crmt_nb.soe_baselines import soe_key, SOE_METHODS
from crmt_nb.soe_training import soe_fit, build_soe
from crmt_nb.soe_attacks import square_collab, pgd_collab

METHODS = ['ADP', 'GAL', 'DVERGE', 'MoRE', 'SoE']
CL = torch.channels_last


def arch(method, splits) -> tuple[dict, dict]:
    "(config, architecture) of `method`'s mini model on `splits`, as `soe_trained` builds it."
    cfg, a, _ = soe_key(SimpleNamespace(splits=splits, profile=get_profile('mini')), method)
    return cfg, a


def epoch(method, splits, n, channels_last: bool):
    "(seconds, loss) of one mini-config epoch of `method` on n images."
    cfg, a = arch(method, splits); m = SOE_METHODS[method](**cfg['options'])
    real = train_mod.cuda_paths
    train_mod.cuda_paths = (lambda d: True) if channels_last else real    # `_prep`/`_start`: channels-last model and inputs
    try:
        t0 = time.perf_counter()
        t = soe_fit(lambda: build_soe(m, **a), m, splits, 1, lr=cfg['lr'], weight_decay=0, optimizer='adam',
                    milestones=(), batch_size=cfg['batch_size'], max_train=n, seed=0, threads=1, test=False)
        return time.perf_counter() - t0, float(t.history['loss'].iloc[-1])
    finally: train_mod.cuda_paths = real


def attacks(model, x, y, channels_last: bool):
    mdl = model.to(memory_format=CL if channels_last else torch.contiguous_format)
    xx = x.contiguous(memory_format=CL) if channels_last else x.contiguous()
    t0 = time.perf_counter(); pgd_collab(mdl, xx, y, 0.15, 'dverge', 20, 1, torch.Generator().manual_seed(1)); t1 = time.perf_counter()
    square_collab(mdl, xx, y, 0.15, 100, generator=torch.Generator().manual_seed(4))
    return t1 - t0, time.perf_counter() - t1


def layer(B, C, H, grouped: bool, bf16: bool, reps: int = 20):
    "Median seconds of conv3x3-BN-ReLU forward + backward for the 3 experts at one stage shape."
    if grouped:
        mods = [torch.nn.Sequential(torch.nn.Conv2d(3 * C, 3 * C, 3, padding=1, bias=False, groups=3), torch.nn.BatchNorm2d(3 * C), torch.nn.ReLU())]
        xs = [torch.randn(B, 3 * C, H, H, requires_grad=True)]
    else:
        mods = [torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1, bias=False), torch.nn.BatchNorm2d(C), torch.nn.ReLU()) for _ in range(3)]
        xs = [torch.randn(B, C, H, H, requires_grad=True) for _ in range(3)]
    def once():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            out = sum(m(x).float().sum() for m, x in zip(mods, xs))
        out.backward()
    for _ in range(3): once()
    ts = []
    for _ in range(reps): t0 = time.perf_counter(); once(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    a = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a.add_argument('--n-train', type=int, default=640); a.add_argument('--repeats', type=int, default=3)
    o = a.parse_args()
    torch.set_num_threads(1)
    splits = mnist5k()
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {o.repeats}, CPU capability '
          f'{torch.backends.cpu.get_cpu_capability()}')
    print(f'[1] one mini epoch on {o.n_train} images (s, medians): NCHW | channels-last -> ratio; last-batch loss NCHW | channels-last')
    for meth in METHODS:
        r = {False: [], True: []}; loss = {}
        for _ in range(o.repeats):
            for cl in (False, True): s, loss[cl] = epoch(meth, splits, o.n_train, cl); r[cl].append(s)
        nc, cl = statistics.median(r[False]), statistics.median(r[True])
        print(f'    {meth:7s} {nc:6.2f} | {cl:6.2f} -> {nc / cl:.2f}x; loss {loss[False]:.5f} | {loss[True]:.5f}')
    cfg, a = arch('SoE', splits); torch.manual_seed(0)
    model = build_soe(SOE_METHODS['SoE'](**cfg['options']), **a).eval()
    x = torch.stack([splits.test[i][0][0] for i in range(250)]); y = torch.tensor([int(splits.test[i][1]) for i in range(250)])
    r = {False: [], True: []}
    for _ in range(o.repeats):
        for cl in (False, True): r[cl].append(attacks(model, x, y, cl))
    med = {cl: [statistics.median(t[i] for t in r[cl]) for i in range(2)] for cl in r}
    print('[2] attacks on 250 images of an SoE collaboration (s, medians): NCHW | channels-last -> ratio')
    for i, name in enumerate(['PGD-20', 'Square-100']):
        print(f'    {name:10s} {med[False][i]:6.2f} | {med[True][i]:6.2f} -> {med[False][i] / med[True][i]:.2f}x')
    print('[3] conv3x3-BN-ReLU fwd+bwd of the 3 experts, batch 64 (ms, medians): separate fp32 | grouped fp32 | separate bf16 | grouped bf16')
    for C, H in ((8, 14), (16, 7), (32, 4)):
        t = [1e3 * layer(64, C, H, g, b) for b in (False, True) for g in (False, True)]
        print(f'    {C:2d} ch {H:2d}x{H:<2d}  {t[0]:6.2f} | {t[1]:6.2f} | {t[2]:6.2f} | {t[3]:6.2f}   (grouped {t[0] / t[1]:.2f}x, bf16 {t[0] / t[2]:.2f}x)')


if __name__ == '__main__':
    main()
