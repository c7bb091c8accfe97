"""The step-2 optimiser on the mini profile: a learning-rate sweep (issue #10, item 4). Not collected by pytest. Run:

    .venv/bin/python tests/benchmarks/bench_step2_lr.py [--seeds 0 1 2] [--lrs 1e-2 3e-3 1e-3 3e-4 1e-4] [--root runs/bench]

CRMT-JT on mfeat pix+fou = CRMT step 1 (the mini profile's shared config: the `CRMT-step1` model of the model
cache, selected on the validation split) then step 2 — Adam over the integration weights a only, the profile's
step-2 epochs, selected on the validation split as `fit` does — at each learning rate, every variant starting
from the same step-1 model of its seed. 'step 1 only' is the reference (no step 2). Per variant: clean accuracy,
multi-modal l2-PGD at the profile's multi_eps (4 steps of eps/3, no random start), and the mean EMPIRICAL radius
(the paper's bound with tau~ estimated on the train split; tau~ of s^(m) does not depend on a, so one estimate per
seed; misclassified samples count 0). Prints medians and means +- sd over the seeds.
"""
import argparse, copy, time
import numpy as np, pandas as pd, torch
from crmt_nb.core import get_profile, seed_everything, num_threads
from crmt_nb.experiment import get_or_train, train_config, load_dataset
from crmt_nb.train import fit, loaders, Predictor
from crmt_nb.methods_crmt import CRMTStep2
from crmt_nb.evaluate import evaluate, AttackSpec
from crmt_nb import bounds


def mean_empirical_radius(model, ds, tau) -> float:
    r = [bounds.empirical_radius(model, xs, y, tau).clamp_min(0) for xs, y in ds.loader(256)]
    return torch.cat(r).mean().item()


def measure(model, predictor, splits, eps, tau) -> dict:
    acc = evaluate(predictor, splits.test, [AttackSpec('clean', 'none'), AttackSpec('pgd', 'all', eps)], steps=4, device='cpu')
    return {'clean': acc.value.iloc[0], f'pgd multi {eps:g}': acc.value.iloc[1],
            'empirical radius': mean_empirical_radius(model, splits.test, tau)}


def step2(t1, splits, cfg, seed, optimizer, lr, epochs) -> torch.nn.Module:
    "Step 2 from a copy of the step-1 model, as CRMT-JT's second stage (eval-mode BN, one optimiser, selection on valid)."
    model = copy.deepcopy(t1.model)
    m2 = CRMTStep2(epochs=epochs, optimizer=optimizer, lr=lr)
    g = seed_everything(seed)
    tr, va, _ = loaders(splits, cfg['batch_size'], g, 'cpu', max_train=cfg['max_train'])
    fit(model, m2, tr, va, epochs=epochs, optimizer=m2.make_optimizer(model), device='cpu', seed=seed, progress=False)
    return model.eval()


def main():
    torch.set_num_threads(1)          # tiny models on a shared CPU: one thread is far faster (training uses 1 too)
    ap = argparse.ArgumentParser()
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--lrs', type=float, nargs='+', default=[1e-2, 3e-3, 1e-3, 3e-4, 1e-4])
    ap.add_argument('--root', default='runs/bench')
    ap.add_argument('--dataset', default='mfeat pix+fou')
    a = ap.parse_args()
    p, splits = get_profile('mini'), load_dataset(a.dataset)
    cfg = train_config(p, 'CRMT-step1')
    rows, t0 = [], time.perf_counter()
    for seed in a.seeds:
        t1 = get_or_train(splits, 'CRMT-step1', cfg, seed, profile='mini', device='cpu', root=a.root, progress=False)
        with num_threads(1):
            tau = bounds.empirical_lipschitz(t1.model, splits.train.loader(256))
            rows.append({'variant': 'step 1 only', 'seed': seed, **measure(t1.model, t1.predictor, splits, p.multi_eps, tau)})
            for lr in a.lrs:
                m = step2(t1, splits, cfg, seed, 'adam', lr, p.step2_epochs)
                rows.append({'variant': f'adam {lr:g}', 'seed': seed, **measure(m, Predictor(m, t1.method), splits, p.multi_eps, tau)})
        print(f'seed {seed} done ({time.perf_counter() - t0:.0f} s)', flush=True)
    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if c not in ('variant', 'seed')]
    order = list(dict.fromkeys(df.variant))
    med = df.groupby('variant', sort=False)[cols].median().reindex(order)
    mean, sd = df.groupby('variant', sort=False)[cols].mean().reindex(order), df.groupby('variant', sort=False)[cols].std().reindex(order)
    table = pd.DataFrame({c: [f'{m:.3f} ± {s:.3f} (median {d:.3f})' for m, s, d in zip(mean[c], sd[c], med[c])] for c in cols}, index=order)
    print(f'\nCRMT-JT step 2 (Adam over a, {p.step2_epochs} epochs, selected on valid) on {a.dataset}, mini profile, '
          f'seeds {a.seeds}: mean ± sd (median) over seeds; PGD 4 steps at ε = {p.multi_eps:g}\n')
    print(table.rename_axis('step 2').to_markdown())
    print(f'\n{time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
    main()
