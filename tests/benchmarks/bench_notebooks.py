"""Benchmark of the hot cells of the slowest CRMT notebooks, before vs after a change (not collected by pytest). Run:

    git archive <ref> crmt_nb | tar -x -C /tmp/before          # the reference library (e.g. the main branch)
    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_notebooks.py --before /tmp/before \\
        --models runs/mini [--seeds 0] [--parts fig1,certified,official] [--repeats 1]

`--models` is a run folder whose `models/` holds the mini models trained by the *reference* code (e.g. a finished
`make reproduce`): both variants load those checkpoints (nothing is trained; a missing one is skipped), so the
change is timed on the same weights and its numbers are compared **exactly** with the reference's.

Each variant runs in its own process (`--worker`; the reference imported from `--before`, the other from this
checkout) on one thread, the two interleaved `--repeats` times; medians of wall and process-CPU seconds. The parts
are the notebooks' hot cells on the mini profile:

* `fig1`      crmt_fig1_fig4 cell 6: `evaluate` of clean + uni-modal PGD at 10 radii per modality + missing,
              per (method, seed) — MSEFM (white-box through ExFM's ISTA) dominates;
* `certified` crmt_certified_vs_empirical cell 4 without the empirical Lipschitz estimates (another module):
              `certified_radius` (two forms) and `pgd_radius` (18 radii × 30 steps) per (method, seed);
* `official`  crmt_official_vs_fixed `measure` without the Lipschitz estimates: `evaluate` of the paper protocol on
              the recipes that are cached, per (recipe, seed).

The machine this runs on may be shared: CPU seconds are the steadier measure of the work done.
"""
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

FIG1 = ['JT', 'MMAT', 'Mixup', 'MSEFM', 'CRMT-AT']
FIG1_RADII = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
CERTIFIED = ['CRMT-JT', 'JT']
OFFICIAL = {'CRMT-JT': ('CRMT-JT', {}), 'CRMT-AT': ('CRMT-AT', {}), 'CRMT-Mix': ('CRMT-Mix', {}),
            'CRMT-JT official': ('CRMT-JT', dict(official=True)), 'CRMT-Mix official': ('CRMT-Mix', dict(official=True))}


def _import_variant(root: str | None):
    "Import crmt_nb from `root` (the reference) instead of this checkout's editable install."
    if root:
        sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '') and
                            'editable' not in getattr(f, '__name__', '')]
        sys.path.insert(0, str(Path(root).resolve()))
    import crmt_nb
    return crmt_nb


def _worker(a):
    crmt_nb = _import_variant(a.root)
    import numpy as np, torch
    torch.set_num_threads(1)
    from crmt_nb import experiment as ex, bounds
    from crmt_nb.core import ModelCache, run_dir, load_torch
    from crmt_nb.train import Trained
    from crmt_nb.evaluate import AttackSpec, radius_grid, evaluate, paper_protocol, encoder_lipschitz, pgd_radius
    if a.code_hash: ex.training_code_hash = lambda: a.code_hash       # the checkpoints' key: the reference code's
    splits = ex.load_dataset('mfeat pix+fou'); names, test = splits.names, splits.test
    prof = ex.get_profile('mini')
    out = {'crmt_nb': str(Path(crmt_nb.__file__).parent), 'code': ex.training_code_hash(), 'rows': []}

    def trained(method, seed, overrides=None):
        cfg = ex.train_config('mini', method, model='small', **(overrides or {}))
        path = ModelCache(run_dir('mini', a.models) / 'models').path(splits.name, method, ex.cache_key(cfg, splits), seed)
        if not path.exists(): return None
        ck = load_torch(path)                                      # read only: the cache is not written
        model, meth = ex.build(cfg, splits)
        meth.bind_data(splits); model.load_state_dict(ck['model']); meth.load_state_dict(ck['method'])
        return Trained(model.eval(), meth, None, cfg)

    def timed(part, label, seed, fn):
        w, c = time.perf_counter(), time.process_time(); val = fn()
        out['rows'].append(dict(part=part, unit=f'{label} s{seed}', wall=time.perf_counter() - w,
                                cpu=time.process_time() - c, value=val))

    for seed in a.seeds:
        if 'fig1' in a.parts:
            specs = [AttackSpec('clean', 'none')] + radius_grid(names, FIG1_RADII, 'pgd') + [AttackSpec('missing', n) for n in names]
            for m in FIG1:
                if (t := trained(m, seed)) is None: print(f'skip {m} s{seed}: not cached', file=sys.stderr); continue
                timed('fig1', m, seed, lambda: evaluate(t.predictor, test, specs)['value'].tolist())
        if 'certified' in a.parts:
            grid = tuple(float(e) for e in np.geomspace(0.05, 20, 18)); boxes = tuple(test.boxes)
            for m in CERTIFIED:
                if (t := trained(m, seed)) is None: print(f'skip {m} s{seed}: not cached', file=sys.stderr); continue
                def cell():
                    model, pred = t.model.eval(), t.predictor
                    L, vals = encoder_lipschitz(model, splits.shapes), []
                    for xs, y in test.loader(256):
                        r = [bounds.certified_radius(model, xs, y, L), bounds.certified_radius(model, xs, y, L, tight=True),
                             pgd_radius(pred, xs, y, grid, steps=30, boxes=boxes)]
                        vals += [v.detach().double().tolist() for v in r]
                    return vals
                timed('certified', m, seed, cell)
        if 'official' in a.parts:
            specs = paper_protocol(names, prof.multi_eps, prof.uni_eps)
            for label, (m, o) in OFFICIAL.items():
                if (t := trained(m, seed, o)) is None: print(f'skip {label} s{seed}: not cached', file=sys.stderr); continue
                timed('official', label, seed, lambda: evaluate(t.predictor, test, specs, steps=prof.attack_steps)['value'].tolist())
    json.dump(out, sys.stdout)


def _run(variant_root, a, code_hash=None) -> dict:
    cmd = [sys.executable, __file__, '--worker', '--models', a.models, '--parts', ','.join(a.parts),
           '--seeds', ','.join(map(str, a.seeds))] + (['--root', variant_root] if variant_root else []) + \
          (['--code-hash', code_hash] if code_hash else [])
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--before', help='a folder holding the reference crmt_nb package')
    p.add_argument('--models', required=True, help='a run folder with models/ trained by the reference code')
    p.add_argument('--seeds', default='0'); p.add_argument('--parts', default='fig1,certified,official')
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--worker', action='store_true'); p.add_argument('--root'); p.add_argument('--code-hash')
    a = p.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(',')]; a.parts = a.parts.split(',')
    a.models = str(Path(a.models).resolve())
    if a.worker: return _worker(a)
    if not a.before: p.error('--before is required')
    runs = {'before': [], 'after': []}
    for _ in range(a.repeats):                                # interleaved: both variants see the same load
        b = _run(a.before, a); runs['before'].append(b)
        runs['after'].append(_run(None, a, code_hash=b['code']))
    b0, a0 = runs['before'][0], runs['after'][0]
    print(f"reference: {b0['crmt_nb']}   this checkout: {a0['crmt_nb']}   checkpoints keyed by code {b0['code']}")
    print(f"{a.repeats} interleaved repeat(s), medians; one thread; seconds\n")
    print(f"{'part':10} {'unit':22} {'wall before':>11} {'wall after':>10} {'cpu before':>10} {'cpu after':>9} {'cpu ratio':>9}  identical")
    tot = {}
    for i, rb in enumerate(b0['rows']):
        ra = a0['rows'][i]; assert ra['unit'] == rb['unit']
        med = lambda v, k: statistics.median(r['rows'][i][k] for r in runs[v])
        wb, wa, cb, ca = med('before', 'wall'), med('after', 'wall'), med('before', 'cpu'), med('after', 'cpu')
        same = all(r['rows'][i]['value'] == rb['value'] for v in runs for r in runs[v])
        t = tot.setdefault(rb['part'], [0, 0, 0, 0, True]); t[0] += wb; t[1] += wa; t[2] += cb; t[3] += ca; t[4] &= same
        print(f"{rb['part']:10} {rb['unit']:22} {wb:11.1f} {wa:10.1f} {cb:10.1f} {ca:9.1f} {cb / ca:9.2f}  {same}")
    print()
    for part, (wb, wa, cb, ca, same) in tot.items():
        print(f"{part:10} {'TOTAL':22} {wb:11.1f} {wa:10.1f} {cb:10.1f} {ca:9.1f} {cb / ca:9.2f}  {same}")


if __name__ == '__main__':
    main()
