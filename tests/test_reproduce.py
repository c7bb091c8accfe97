"""The experiment registry, papermill parameter injection, skipping up-to-date runs, and the report."""
import json
import pandas as pd
import pytest
from crmt_nb.reproduce import EXPERIMENTS, experiments_dir, reproduce

NOTEBOOKS = sorted(experiments_dir().glob('*.ipynb'))

def test_registry_matches_folder():
    assert {p.stem for p in NOTEBOOKS} == set(EXPERIMENTS), 'every experiment notebook is registered, and only those'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_experiment_has_parameters_cell(nb):
    cells = json.loads(nb.read_text())['cells']
    tagged = [c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(tagged) == 1, f'{nb.name} needs exactly one cell tagged `parameters` (papermill injects after it)'
    code = [c for c in cells if c['cell_type'] == 'code']
    assert code[0] is tagged[0], f'{nb.name}: the parameters cell must be the first code cell'
    src = ''.join(tagged[0]['source'])
    for p in ('profile', 'out_dir', 'data_root', 'device', 'seeds'):
        assert f'{p} =' in src, f'{nb.name}: parameters cell lacks `{p}`'
    assert "profile = 'smoke'" in src, f'{nb.name}: the default profile must be smoke (seconds in the notebook tests)'

def test_injected_parameters_take_effect_and_runs_resume(tmp_path):
    logs = []
    kw = dict(profile='smoke', only='modality_preference', out=tmp_path, params=dict(seeds=[7], radii=[0.0, 1.5]), log=logs.append)
    report = reproduce(**kw)
    df = pd.read_csv(tmp_path / 'modality_preference' / 'modality_preference.csv')
    assert set(df['seed']) == {7}, 'the injected seeds did not reach the notebook'
    assert set(df.loc[df.attack == 'fgm', 'eps']) == {0.0, 1.5}, 'the injected radii did not reach the notebook'
    assert (tmp_path / 'modality_preference' / 'modality_preference.png').stat().st_size > 10_000
    text = report.read_text()
    assert '## Modality preference' in text and 'modality_preference/modality_preference.png' in text
    assert any(l.startswith('[done] modality_preference') for l in logs)
    logs.clear(); reproduce(**kw)
    assert logs[0] == '[skip] modality_preference: up to date'
    logs.clear(); reproduce(**{**kw, 'params': dict(seeds=[8], radii=[0.0, 1.5])})
    assert any(l.startswith('[done]') for l in logs), 'changed parameters must re-run the notebook'
    assert set(pd.read_csv(tmp_path / 'modality_preference' / 'modality_preference.csv')['seed']) == {8}


# ---- the batch runner under parallelism, interruption and bad input -------------------------------------------
import os, signal, subprocess, sys, time
from pathlib import Path
import nbformat
from crmt_nb.reproduce import Experiment, reproduce, EXPERIMENTS
from crmt_nb.core import project_root

BIN = Path(sys.executable).parent
PARAMS = "profile = 'smoke'\nseeds = None\nout_dir = None\ndata_root = None\ndevice = 'auto'\non_error = 'raise'\n"

def tiny_notebook(path: Path, body: str) -> Path:
    "An experiment-shaped notebook: the parameters cell, then `body`, which may use `out_dir`."
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'language': 'python', 'display_name': 'python3'}})
    p = nbformat.v4.new_code_cell(PARAMS); p.metadata['tags'] = ['parameters']
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True); nbformat.write(nb, path)
    return path

WRITE_CSV = """import pandas as pd, time
from crmt_nb.reproduce import save_results
time.sleep({sleep})
save_results(pd.DataFrame([dict(item='t', dataset='d', method='m', attack=on_error, modality='none', eps=0.0,
             seed=0, metric='m', value=1.0)]), out_dir, '{name}')
open(out_dir + '/../runs_of_{name}.txt', 'a').write('x')
"""

def tiny(tmp_path, name, sleep=0.0, body=None) -> Experiment:
    nb = tiny_notebook(tmp_path / 'nbs' / f'{name}.ipynb', body or WRITE_CSV.format(sleep=sleep, name=name))
    return Experiment(name, 'ours', 'test', f'Tiny {name}', path=str(nb))

def test_failure_is_not_published_and_does_not_stop_the_batch(tmp_path):
    bad = tiny(tmp_path, 'bad', body="raise FileNotFoundError('no folder /data/ks\\nexpected layout: ks/lists/train.txt\\nhint: run crmt-prep')")
    good = tiny(tmp_path, 'good')
    logs = []
    with pytest.raises(RuntimeError, match='1 experiment\\(s\\) failed: bad'):
        reproduce('smoke', out=tmp_path / 'out', workers=2, experiments=[bad, good], log=logs.append, progress=False)
    d = tmp_path / 'out' / 'bad'
    assert not (d / 'bad.ipynb').exists(), 'a failed run must never be published as <name>.ipynb'
    assert (d / 'bad.failed.ipynb').exists() and not (d / '.stamp.json').exists()
    fail = [l for l in logs if l.startswith('[FAIL] bad')]
    assert fail and 'FileNotFoundError: no folder /data/ks' in fail[0] and 'hint' not in fail[0], fail
    assert (tmp_path / 'out' / 'good' / 'good.csv').exists(), 'one failure must not abort the rest of the batch'
    report = (tmp_path / 'out' / 'report.md').read_text()
    assert '**1 failed:** `bad`' in report and 'no folder /data/ks' in report

def test_only_keeps_other_sections_and_times(tmp_path, monkeypatch):
    a, b = tiny(tmp_path, 'a'), tiny(tmp_path, 'b')
    for e in (a, b): monkeypatch.setitem(EXPERIMENTS, e.name, e)       # registered, as --only expects
    out = tmp_path / 'out'
    reproduce('smoke', out=out, experiments=[a, b], log=lambda s: None, progress=False)
    row_b = next(l for l in (out / 'report.md').read_text().splitlines() if l.startswith('| [b]'))
    reproduce('smoke', out=out, experiments=[a], force=True, log=lambda s: None, progress=False)   # like --only a
    text = (out / 'report.md').read_text()
    assert '## Tiny b' in text and row_b.replace('| done |', '| done (earlier run) |') in text
    logs = []
    reproduce('smoke', out=out, experiments=[a, b], log=logs.append, progress=False)       # everything up to date
    assert sorted(logs[:2]) == ['[skip] a: up to date', '[skip] b: up to date']
    assert row_b.replace('| done |', '| up to date |') in (out / 'report.md').read_text(), 'a skipping rerun keeps the times'

def _cli(tmp_path, *args, **kw):
    return subprocess.Popen([str(BIN / 'python'), '-c', 'import sys; from crmt_nb.reproduce import reproduce_cli; reproduce_cli()', *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)

TINY_CLI = """import sys, crmt_nb.reproduce as r
from pathlib import Path
exps = [r.Experiment(p.stem, 'ours', 'test', p.stem, path=str(p)) for p in sorted(Path('nbs').glob('*.ipynb'))]
r.EXPERIMENTS.clear(); r.EXPERIMENTS.update({e.name: e for e in exps})
if __name__ == '__main__': r.reproduce_cli()       # spawned workers import this file again
"""

def _tiny_cli(tmp_path, *args):
    "crmt-reproduce over the tiny notebooks in tmp_path/nbs (the registry replaced), as a separate process."
    (tmp_path / 'cli.py').write_text(TINY_CLI)
    return subprocess.Popen([str(BIN / 'python'), 'cli.py', *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

def test_two_batches_on_one_out_never_run_a_notebook_twice(tmp_path):
    tiny(tmp_path, 'slow', sleep=3)
    ps = [_tiny_cli(tmp_path, '--profile', 'smoke', '--out', 'runs/x', '--no-progress') for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert (tmp_path / 'runs' / 'x' / 'runs_of_slow.txt').read_text() == 'x', 'the notebook ran more than once'
    assert sum('[skip] slow' in o for o, _ in outs) == 1

def test_sigterm_and_sigkill_leave_nothing_half_written(tmp_path):
    tiny(tmp_path, 'sleeper', sleep=60)
    out = tmp_path / 'runs' / 'x' / 'sleeper'
    p = _tiny_cli(tmp_path, '--profile', 'smoke', '--out', 'runs/x')
    deadline = time.time() + 120
    while not list(out.glob('.sleeper.*.tmp*')) and time.time() < deadline: time.sleep(0.5)
    assert list(out.glob('.sleeper.*.tmp*')), 'the run never started'
    time.sleep(2); p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and 'Traceback' not in err and 'interrupted' in err.strip().splitlines()[-1], err
    assert not list(out.glob('.*.tmp*')), 'SIGTERM must remove the temporary files'
    assert not (out / 'sleeper.ipynb').exists()
    # SIGKILL of the whole batch (parent and worker) leaves a temporary file: the next run removes it
    p = _tiny_cli(tmp_path, '--profile', 'smoke', '--out', 'runs/x', '--no-progress')
    while not list(out.glob('.sleeper.*.tmp*')) and time.time() < deadline + 120: time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL); p.communicate(timeout=30)
    assert list(out.glob('.sleeper.*.tmp*'))
    (tmp_path / 'nbs' / 'sleeper.ipynb').unlink(); tiny(tmp_path, 'sleeper', sleep=0)
    p = _tiny_cli(tmp_path, '--profile', 'smoke', '--out', 'runs/x', '--no-progress')
    o, e = p.communicate(timeout=240)
    assert p.returncode == 0, (o, e)
    assert not list(out.glob('.*.tmp*')) and (out / 'sleeper.ipynb').exists()

def test_cli_spells_data_root_and_on_error_as_the_readme(tmp_path):
    tiny(tmp_path, 'opts')
    (tmp_path / 'data').mkdir()
    p = _tiny_cli(tmp_path, '--profile', 'smoke', '--out', 'runs/x', '--data-root', 'data', '--on-error', 'skip', '--no-progress')
    o, e = p.communicate(timeout=240)
    assert p.returncode == 0, (o, e)
    df = pd.read_csv(tmp_path / 'runs' / 'x' / 'opts' / 'opts.csv')
    assert df['attack'].tolist() == ['skip'], 'on_error did not reach the notebook'
    stamp = json.loads((tmp_path / 'runs' / 'x' / 'opts' / '.stamp.json').read_text())
    assert stamp['parameters']['data_root'] == str((tmp_path / 'data').resolve()), 'data_root must reach notebooks as an absolute path'
    p = _tiny_cli(tmp_path, '--profile', 'paper', '--data-root', 'nowhere')
    o, e = p.communicate(timeout=60)
    assert p.returncode == 1 and e.strip() == 'crmt-reproduce: --data-root nowhere: no such folder', e


# ---- every experiment notebook, as a user runs them: relative --out, 2 workers, a busy machine -------------------
def _burn(seconds):
    "A CPU-bound process (the machine is busy while the batch runs)."
    return subprocess.Popen([sys.executable, '-c', f'import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass'])

def test_smoke_batch_of_every_notebook_under_load(tmp_path):
    burners = [_burn(600) for _ in range(2)]
    try:
        p = _cli(tmp_path, '--profile', 'smoke', '--workers', '2', '--out', 'runs/x')
        out, err = p.communicate(timeout=1500)
    finally:
        for b in burners: b.kill()
    assert p.returncode == 0, out + err
    run = tmp_path / 'runs' / 'x'
    for name in EXPERIMENTS:
        d = run / name
        assert (d / f'{name}.ipynb').exists() and (d / f'{name}.csv').exists() and (d / f'{name}.png').exists(), name
        assert not (d / f'{name}.failed.ipynb').exists()
        assert pd.read_csv(d / f'{name}.csv')['value'].notna().all()
    unused = {}
    for name in EXPERIMENTS:     # what each notebook asked the model cache for (crmt_nb.plan's watcher): all declared
        rec = json.loads((run / name / '.needs.json').read_text())
        assert set(rec['requested']) <= set(rec['declared']), f"{name} requested undeclared {set(rec['requested']) - set(rec['declared'])}"
        if left := set(rec['declared']) - set(rec['requested']): unused[name] = sorted(left)
    print('\ndeclared but not requested (smoke):', unused or 'none')
    assert not [q for q in run.rglob('runs') if q.is_dir()], 'a runs/ folder nested inside an experiment folder'
    assert not list(run.rglob('.*.tmp*')), 'temporary files left behind'
    assert '[....]' in err and 'cell ' in err, 'no live progress lines'
    assert 'Kernel is running over TCP' not in out + err
    report = (run / 'report.md').read_text()
    assert 'only prove that the code runs' in report and all(f'## {e.title}' in report for e in EXPERIMENTS.values())
    p = _cli(tmp_path, '--profile', 'smoke', '--workers', '2', '--out', 'runs/x', '--no-progress')
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and out.count('[skip]') == len(EXPERIMENTS), out + err
    assert (run / 'report.md').read_text().count('| up to date |') == len(EXPERIMENTS)

@pytest.mark.parametrize('params, message', [
    (dict(seeds='abc'), "ValueError: parameter seeds must be a non-negative int or a list of them"),
    (dict(radii=[-1.0]), "ValueError: parameter radii must be non-negative numbers"),
    (dict(device='tpu'), "ValueError: parameter device"),
    (dict(sedes=[0]), "ValueError: unknown parameter(s) ['sedes'] for modality_preference"),
])
def test_bad_parameters_fail_before_any_work(tmp_path, params, message):
    logs = []
    with pytest.raises(RuntimeError, match='failed: modality_preference'):
        reproduce('smoke', only='modality_preference', out=tmp_path, params=params, log=logs.append, progress=False)
    fail = next(l for l in logs if l.startswith('[FAIL]'))
    assert message in fail and '(in cell [' in fail, fail
    assert not (tmp_path / 'models').exists(), 'nothing may be trained before the parameters are checked'

def test_readme_papermill_example_runs_on_a_fresh_clone(tmp_path):
    "The README's papermill-by-hand command, with the smoke budget and the output under tmp_path."
    readme = (project_root() / 'README.md').read_text()
    block = readme.split('To run one notebook by hand with papermill')[1].split('```bash')[1].split('```')[0]
    cmd = block.replace('\\\n', ' ').replace('-p profile mini', '-p profile smoke').replace('[0, 1, 2]', '[0]')
    cmd = cmd.replace('runs/', f'{tmp_path}/runs/').replace('.venv/bin/', f'{BIN}/')
    r = subprocess.run(['bash', '-c', cmd], cwd=project_root(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list((tmp_path / 'runs').rglob('modality_preference.csv'))
