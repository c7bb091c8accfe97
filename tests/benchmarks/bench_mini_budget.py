"""What halving the mini budgets would do to SoE Table 3 (issue #14: the mini batch within 20 minutes). Not collected
by pytest. Run, after a full mini batch (its model cache holds the budget-5 models):

    .venv/bin/python tests/benchmarks/bench_mini_budget.py --reference runs/mini [--epochs 3 --sub-epochs 2] [--queries 250]

Table 3's five methods x the mini seeds, trained by `soe_trained` at the mini profile's settings except the training
epochs (mini: 5 = 3 sub-model + 2 collaboration epochs) and attacked with Square (`square_collab`) on the seed-0
evaluation subset (250 images) exactly as the notebook does, at the mini query budget (500) and at `--queries`.
The budget-5 models are read from the reference run's cache (matched by their stored training config), the others
are trained into `--root`; the (5 epochs, 500 queries) cell is the reference run's soe_table3_square.csv (attacked
again when `--n-eval` is not the notebook's 250, e.g. `--seeds 0 --n-eval 20` for a quick look). Prints, per budget: the mean Square robust accuracy per method and eps, the clean
accuracy, Table 3's first claim (SoE the most robust at every eps) and the wall time of the training and of Square.
"""
import argparse, glob, time
from pathlib import Path
from types import SimpleNamespace
import pandas as pd, torch
from crmt_nb.core import get_profile, get_device, num_threads
from crmt_nb.data import mnist5k
from crmt_nb.soe_baselines import soe_trained, soe_eval, soe_key, SOE_METHODS
from crmt_nb.soe_training import build_soe
from crmt_nb.soe_attacks import square_collab, predict
from crmt_nb.soe_transfer import eval_batch

METHODS = ['GAL', 'ADP', 'MoRE', 'DVERGE', 'SoE']


def reference_model(run, ref: Path, method: str, seed: int) -> torch.nn.Module:
    "The budget-5 model of (method, seed) in the reference cache: the checkpoint whose stored config is soe_config's."
    cfg, arch, _ = soe_key(run, method)
    for f in sorted(glob.glob(str(ref / 'models' / run.splits.name / method / f'*-seed{seed}.pt'))):
        ck = torch.load(f, weights_only=True, map_location='cpu')
        if ck['config'] == cfg:
            model = build_soe(SOE_METHODS[method](**cfg['options']), **arch); model.load_state_dict(ck['model'])
            return model.eval()
    raise FileNotFoundError(f'no {method} seed {seed} model with the mini config under {ref}/models: run the mini batch first')


def square(run, model, eps, n_eval, queries, s=0):
    "(clean, Square) accuracy on the seed-s evaluation subset, Square seeded by s: the notebook's `square_accuracy`."
    x, y, _ = eval_batch(run, n_eval, s)
    xa = square_collab(model, x, y, eps, queries, generator=torch.Generator().manual_seed(s))
    return (predict(model, x) == y).float().mean().item(), (predict(model, xa) == y).float().mean().item()


def reference_rows(ref_dir: Path, seeds, full_q) -> list[dict]:
    "The (5 epochs, mini queries) rows: the reference run's soe_table3_square.csv."
    ref = pd.read_csv(ref_dir / 'soe_table3_square' / 'soe_table3_square.csv')
    ref = ref[ref.method.isin(METHODS) & ref.seed.isin(seeds)]
    sq, cl = ref[ref.metric == 'accuracy'], ref[ref.metric == 'clean_accuracy']
    return [dict(epochs=5, queries=full_q, method=r.method, seed=r.seed, eps=r.eps, square=r.value,
                  clean=cl[(cl.method == r.method) & (cl.seed == r.seed) & (cl.eps == r.eps)].value.mean()) for r in sq.itertuples()]


def main():
    a = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a.add_argument('--reference', type=Path, required=True, help='a finished mini run folder (runs/mini)')
    a.add_argument('--root', type=Path, default=Path('runs/bench_budget'))
    a.add_argument('--epochs', type=int, default=3); a.add_argument('--sub-epochs', type=int, default=2)
    a.add_argument('--queries', type=int, default=250)
    a.add_argument('--seeds', type=int, nargs='+', default=None)
    a.add_argument('--n-eval', type=int, default=None, help="images attacked (default: the mini protocol's 250)")
    o = a.parse_args()
    prof = get_profile('mini')
    run = SimpleNamespace(splits=mnist5k(), profile=prof, root=o.root.resolve(), device=get_device('cpu'))
    ev, seeds = soe_eval(prof), o.seeds or list(prof.seeds)
    full_q = ev['square_queries']
    n_eval = o.n_eval or ev['n_eval']
    from_ref = n_eval == ev['n_eval']           # the (5 epochs, mini queries) cell: the reference run's own table
    budgets = [(5, o.queries), (o.epochs, full_q), (o.epochs, o.queries)] + ([] if from_ref else [(5, full_q)])
    rows, t_train, t_sq = [], 0.0, {}
    with num_threads(1):
        for seed in seeds:
            for m in METHODS:
                models = {5: reference_model(run, o.reference, m, seed)}
                t0 = time.perf_counter()
                models[o.epochs] = soe_trained(run, m, seed, epochs=o.epochs, sub_epochs=o.sub_epochs).model
                t_train += time.perf_counter() - t0
                for E, Q in budgets:
                    t0 = time.perf_counter()
                    for eps in ev['eps']:
                        clean, rob = square(run, models[E], eps, n_eval, Q)
                        rows.append(dict(epochs=E, queries=Q, method=m, seed=seed, eps=eps, clean=clean, square=rob))
                    t_sq[E, Q] = t_sq.get((E, Q), 0.0) + time.perf_counter() - t0
                print(f'seed {seed} {m} done; training {t_train:.0f} s so far', flush=True)
    if from_ref: rows += reference_rows(o.reference, seeds, full_q)
    df = pd.DataFrame(rows); o.root.mkdir(parents=True, exist_ok=True); df.to_csv(o.root / 'bench_mini_budget.csv', index=False)
    pd.set_option('display.width', 200)
    for (E, Q), d in df.groupby(['epochs', 'queries'], sort=False):
        per = d.groupby(['method', 'seed', 'eps'])['square'].mean()
        mean = per.groupby(['method', 'eps']).mean().unstack('eps').reindex(METHODS)
        sd = per.groupby(['method', 'eps']).std(ddof=1).unstack('eps').reindex(METHODS)
        best = mean.drop('SoE').max()
        wins = int((mean.loc['SoE'] > best).sum())
        wall = 'the reference run' if (E, Q) == (5, full_q) and from_ref else f'Square wall {t_sq[E, Q]:.0f} s'
        print(f'\n== training epochs {E}, Square {Q} queries ({wall}); '
              f'clean accuracy {d.clean.mean():.3f}; SoE the most robust at {wins} of {mean.shape[1]} eps')
        cell = lambda m, s: f'{100 * m:.1f}' if s != s else f'{100 * m:.1f} ± {100 * s:.1f}'   # one seed: no sd
        print(pd.DataFrame({e: [cell(mean.loc[m, e], sd.loc[m, e]) for m in METHODS] for e in mean.columns}, index=METHODS))
        print('SoE lead over the best baseline (points):', ', '.join(f'eps={e:g}: {100 * (mean.loc["SoE", e] - best[e]):+.1f}'
                                                               for e in mean.columns))
    print(f'\ntraining of the epochs-{o.epochs} models: {t_train:.0f} s')


if __name__ == '__main__':
    main()
