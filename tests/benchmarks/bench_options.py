"""What the two speed options that change numbers would save, and how much they change (not collected by pytest):

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_options.py --models runs/mini --code-hash <hash> [--seeds 0]

* `MSEFM(ista_gram=False)`: ISTA's A·(DDᵀ) as (A·D)·Dᵀ — crmt_fig1_fig4's MSEFM `evaluate` (clean, uni-modal PGD at 10
  radii per modality, missing) with the reference Gram form vs the factored one: seconds and the accuracies that move;
* `pgd_radius(stop_at_flip=True)`: crmt_certified_vs_empirical's PGD radius search (18 radii × 30 steps) where a
  sample leaves the search at its first flip: seconds and the samples whose radius changes.

`--models` holds mini checkpoints; `--code-hash` is the training-code hash they are keyed by (the reference code's,
printed by bench_notebooks.py; default: this checkout's). Interleaved repeats, medians, one thread.
"""
import argparse, statistics, time
import numpy as np, torch
from crmt_nb import experiment as ex
from crmt_nb.core import ModelCache, run_dir, load_torch
from crmt_nb.train import Trained
from crmt_nb.evaluate import AttackSpec, radius_grid, evaluate, pgd_radius

FIG1_RADII = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


def load_trained(models, splits, method, seed):
    "A cached mini model, read only (None if it is not in the cache)."
    cfg = ex.train_config('mini', method, model='small')
    path = ModelCache(run_dir('mini', models) / 'models').path(splits.name, method, ex.cache_key(cfg, splits), seed)
    if not path.exists(): return None
    ck = load_torch(path); model, meth = ex.build(cfg, splits)
    meth.bind_data(splits); model.load_state_dict(ck['model']); meth.load_state_dict(ck['method'])
    return Trained(model.eval(), meth, None, cfg)


def timed(fn):
    w, c = time.perf_counter(), time.process_time(); v = fn()
    return v, time.perf_counter() - w, time.process_time() - c


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--models', required=True); p.add_argument('--code-hash'); p.add_argument('--seeds', default='0')
    p.add_argument('--repeats', type=int, default=1); p.add_argument('--parts', default='ista,radius')
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.code_hash: ex.training_code_hash = lambda: a.code_hash
    splits = ex.load_dataset('mfeat pix+fou'); names, test = splits.names, splits.test
    print(f'{a.repeats} interleaved repeat(s), medians; one thread; seconds (wall / process CPU)\n')
    for seed in map(int, a.seeds.split(',')):
        if 'ista' in a.parts and (t := load_trained(a.models, splits, 'MSEFM', seed)) is not None:
            specs = [AttackSpec('clean', 'none')] + radius_grid(names, FIG1_RADII, 'pgd') + [AttackSpec('missing', n) for n in names]
            res = {True: [], False: []}
            for _ in range(a.repeats):
                for gram in (True, False):
                    t.method.ista_gram = gram
                    res[gram].append(timed(lambda: evaluate(t.predictor, test, specs)['value'].to_numpy()))
            (v1, *_), (v2, *_) = res[True][0], res[False][0]
            w = {g: statistics.median(r[1] for r in res[g]) for g in res}; c = {g: statistics.median(r[2] for r in res[g]) for g in res}
            print(f'MSEFM s{seed} fig1 evaluate  ista_gram=True {w[True]:.1f} / {c[True]:.1f}   ista_gram=False {w[False]:.1f} / '
                  f'{c[False]:.1f}   CPU ratio {c[True] / c[False]:.2f}×;  accuracies changed: {(v1 != v2).sum()} of {len(v1)}, '
                  f'max |Δ| {np.abs(v1 - v2).max():.4f} ({np.abs(v1 - v2).max() * len(test):.0f} of {len(test)} samples)')
        if 'radius' in a.parts:
            grid = tuple(float(e) for e in np.geomspace(0.05, 20, 18)); boxes = tuple(test.boxes)
            for m in ('CRMT-JT', 'JT'):
                if (t := load_trained(a.models, splits, m, seed)) is None: continue
                pred = t.predictor
                def search(stop):
                    return torch.cat([pgd_radius(pred, xs, y, grid, steps=30, boxes=boxes, stop_at_flip=stop)
                                      for xs, y in test.loader(256)])
                res = {False: [], True: []}
                for _ in range(a.repeats):
                    for stop in (False, True): res[stop].append(timed(lambda: search(stop)))
                r1, r2 = res[False][0][0], res[True][0][0]
                w = {g: statistics.median(r[1] for r in res[g]) for g in res}; c = {g: statistics.median(r[2] for r in res[g]) for g in res}
                fin = torch.isfinite(r1)
                print(f'{m} s{seed} pgd_radius  all radii {w[False]:.1f} / {c[False]:.1f}   stop_at_flip {w[True]:.1f} / {c[True]:.1f}   '
                      f'CPU ratio {c[False] / c[True]:.2f}×;  radii changed: {int((r1 != r2).sum())} of {len(r1)} '
                      f'(median finite radius {r1[fin].median():.4f} vs {r2[torch.isfinite(r2)].median():.4f}; '
                      f'max rel. change {((r2[fin] - r1[fin]) / r1[fin]).abs().max():.3g})')


if __name__ == '__main__':
    main()
