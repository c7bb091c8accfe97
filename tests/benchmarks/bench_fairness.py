"""Before/after ledger of the fairness fixes of issue #10 (for the closing note). Not collected by pytest. Run:

    .venv/bin/python tests/benchmarks/bench_fairness.py [--seeds 0 1 2] [--root runs/bench] [--csv out.csv]

On the mini profile (mfeat pix+fou, the shared training config of the experiment notebooks), trains JT, CRMT-JT,
MMAT and CRMT-AT at the current defaults, and with each fix toggled back to its old value, one at a time:

* `L1 unbounded`: `l1_floor=None` (the literal Eq 12 without the code's +1e-5; item 1) — CRMT-JT, CRMT-AT
* `AT eps 0.1`: the AT radius the paper uses at its evaluation radius 0.5, not the profile's multi_eps / 5 (item 2) — MMAT, CRMT-AT
* `a_init 0.1`: the authors' initial integration weights, not the profile's (item 3) — CRMT-JT, CRMT-AT
* `step-2 Adam 1e-2`: the old mini step-2 optimiser (item 4) — CRMT-JT, CRMT-AT; skipped (reported as the default)
  when the current default is that optimiser
* `all old`: every one of them at once — MMAT, CRMT-JT, CRMT-AT

and prints, per (method, variant), the means over seeds of clean accuracy, multi-modal l2-PGD at the profile's
multi_eps (1.5) and uni-modal l2-PGD at uni_eps (3.0) on each modality (4 steps of eps/3, no random start), with the
selected checkpoint (the notebooks' default). Models are cached under `--root` (a re-run resumes).
"""
import argparse, time
import pandas as pd, torch
from crmt_nb.core import get_profile
from crmt_nb.experiment import get_or_train, train_config, load_dataset
from crmt_nb.evaluate import evaluate, AttackSpec
from crmt_nb.methods import METHODS

OLD = {'L1 unbounded': dict(l1_floor=None), 'AT eps 0.1': dict(eps=0.1), 'a_init 0.1': dict(a_init=0.1),
       'step-2 Adam 1e-2': dict(step2_optimizer='adam', step2_lr=1e-2)}
APPLIES = {'L1 unbounded': ('CRMT-JT', 'CRMT-AT'), 'AT eps 0.1': ('MMAT', 'CRMT-AT'), 'a_init 0.1': ('CRMT-JT', 'CRMT-AT'),
           'step-2 Adam 1e-2': ('CRMT-JT', 'CRMT-AT')}
METHODS_ = ('JT', 'CRMT-JT', 'MMAT', 'CRMT-AT')


def variants(p) -> list[tuple[str, str, dict]]:
    "(method, variant, overrides): the defaults, each fix toggled back alone, and all of them together."
    now = {m: METHODS[m](**train_config(p, m)['options']) for m in METHODS_}       # the options as the method sees them
    out = [(m, 'current default', {}) for m in METHODS_]
    for v, ov in OLD.items():
        for m in APPLIES[v]:
            if all(getattr(now[m], k) == x for k, x in ov.items()): continue      # the default already is the old value
            out.append((m, v, ov))
    for m in ('MMAT', 'CRMT-JT', 'CRMT-AT'):
        ov = {k: x for v, o in OLD.items() if m in APPLIES[v] for k, x in o.items() if getattr(now[m], k) != x}
        if ov and ov not in [o for mm, _, o in out if mm == m]: out.append((m, 'all old', ov))
    return out


def main():
    torch.set_num_threads(1)          # tiny models on a shared CPU: one thread is far faster (training uses 1 too)
    ap = argparse.ArgumentParser()
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--root', default='runs/bench')
    ap.add_argument('--csv', default=None)
    a = ap.parse_args()
    p, splits = get_profile('mini'), load_dataset('mfeat pix+fou')
    names = splits.names
    specs = [AttackSpec('clean', 'none'), AttackSpec('pgd', 'all', p.multi_eps)] + [AttackSpec('pgd', n, p.uni_eps) for n in names]
    cols = ['clean', f'pgd multi {p.multi_eps:g}'] + [f'pgd {n} {p.uni_eps:g}' for n in names]
    rows, t0 = [], time.perf_counter()
    todo = sorted(variants(p), key=lambda v: ('AT' in v[0], v[1] != 'current default'))   # cheap ones first (AT is ~5x)
    print('old values:', {m: sorted({v for mm, v, _ in todo if mm == m}) for m in METHODS_}, flush=True)
    for method, variant, ov in todo:
        for seed in a.seeds:
            t1 = time.perf_counter()
            t = get_or_train(splits, method, train_config(p, method, **ov), seed, profile='mini', device='cpu', root=a.root, progress=False)
            acc = evaluate(t.predictor, splits.test, specs, steps=p.attack_steps, device='cpu').value.tolist()
            rows.append(dict(method=method, variant=variant, seed=seed, **dict(zip(cols, acc))))
            print(f'{method:8s} {variant:18s} seed {seed}: ' + ' '.join(f'{c} {v:.3f}' for c, v in zip(cols, acc)) +
                  f'  ({time.perf_counter() - t1:.0f} s)', flush=True)
            if a.csv: pd.DataFrame(rows).to_csv(a.csv, index=False)                 # partial results survive an interruption
        done = pd.DataFrame(rows).query('method == @method and variant == @variant')[cols].mean()
        print(f'  -> {method} {variant} mean over {len(a.seeds)} seeds: ' + ' '.join(f'{c} {v:.3f}' for c, v in done.items()), flush=True)
    df = pd.DataFrame(rows)
    if a.csv: df.to_csv(a.csv, index=False)
    g = df.groupby(['method', 'variant'], sort=False)[cols]
    mean, sd = g.mean(), g.std()
    table = pd.DataFrame({c: [f'{m:.3f} ± {s:.3f}' for m, s in zip(mean[c], sd[c])] for c in cols}, index=mean.index)
    print(f'\nmfeat pix+fou, mini profile, seeds {a.seeds}, selected checkpoints: mean ± sd over seeds '
          f'(PGD {p.attack_steps} steps of ε/3; multi ε {p.multi_eps:g}, uni ε {p.uni_eps:g})\n')
    print(table.to_markdown())
    base = mean.xs('current default', level='variant')
    delta = (mean - base.reindex(mean.index.get_level_values('method')).set_axis(mean.index)).round(3)
    print('\nchange from the current default (old value − current default):\n')
    print(delta.drop('current default', level='variant').to_markdown())
    print(f'\n{time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
    main()
