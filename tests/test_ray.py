"""`crmt-reproduce --executor ray` on a real local Ray cluster (`ray.init(num_cpus=2)`): a CRMT + SoE subset of the
smoke batch gives the same CSVs as the local executor; one training task, killed right after its first epoch
checkpoint, is retried by Ray and resumes from that checkpoint (no epoch trained twice, no model trained by two
tasks); the report names the executor."""
import json, os, time
from collections import defaultdict
from pathlib import Path
import pandas as pd
import pytest
import ray
from crmt_nb.reproduce import reproduce
from crmt_nb.ray_executor import TEST_ENV

SUBSET = ['modality_preference', 'soe_table2_submodels', 'soe_fig2_collaboration_ablation']   # CRMT, SoE, SoE with transfer banks

@pytest.fixture(scope='module')
def batches(tmp_path_factory):
    d = tmp_path_factory.mktemp('ray'); (d / 'hooks').mkdir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    os.environ[TEST_ENV] = str(d / 'hooks')
    try:
        logs = []; t0 = time.perf_counter()
        reproduce('smoke', only=','.join(SUBSET), out=d / 'ray', executor='ray', progress=False, log=logs.append)
        t_ray = time.perf_counter() - t0
    finally:
        del os.environ[TEST_ENV]; ray.shutdown()
    t0 = time.perf_counter()
    reproduce('smoke', only=','.join(SUBSET), out=d / 'local', workers=2, progress=False, log=lambda s: None)
    t_local = time.perf_counter() - t0
    print(f'\nsmoke subset {SUBSET}: Ray executor {t_ray:.0f} s (plan, train, evaluate), local executor {t_local:.0f} s (2 workers)')
    return dict(dir=d, logs=logs, seconds=(t_ray, t_local))

def test_same_csvs_as_the_local_executor(batches):
    d = batches['dir']
    for name in SUBSET:
        a, b = pd.read_csv(d / 'ray' / name / f'{name}.csv'), pd.read_csv(d / 'local' / name / f'{name}.csv')
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    assert sorted(p.relative_to(d / 'ray') for p in (d / 'ray' / 'models').rglob('*.pt')) == \
           sorted(p.relative_to(d / 'local') for p in (d / 'local' / 'models').rglob('*.pt')), 'the same model files'

def test_the_models_were_trained_as_tasks_before_the_notebooks(batches):
    logs, d = batches['logs'], batches['dir'] / 'ray'
    trained = [i for i, l in enumerate(logs) if l.startswith('[train]')]
    done = [i for i, l in enumerate(logs) if l.startswith('[done]')]
    assert trained and len(done) == len(SUBSET) and max(trained) < min(done), logs
    for name in SUBSET:                                  # every request of the notebooks was declared
        rec = json.loads((d / name / '.needs.json').read_text())
        assert set(rec['requested']) <= set(rec['declared']), name
    n_files = len(list((d / 'models').rglob('*.pt'))) + len(list((d / 'transfer').rglob('*.pt')))
    assert len(trained) == n_files, 'each model (and bank) once, by a training task'

def test_a_killed_training_is_retried_and_resumes(batches):
    hooks = batches['dir'] / 'hooks'
    killed = (hooks / 'killed').read_text().strip().split('\t')
    pid, ckpt, stage, ep = killed[0], killed[1], int(killed[2]), int(killed[3])
    by_model = defaultdict(list)
    for line in (hooks / 'epochs.log').read_text().splitlines():
        p, c, s, e = line.split('\t'); by_model[c].append((p, int(s), int(e)))
    runs = by_model[ckpt]
    first = [(s, e) for p, s, e in runs if p == pid]
    retry = [(s, e) for p, s, e in runs if p != pid]
    assert first and retry, f'the killed task was not retried: {runs}'
    assert max(first) == (stage, ep - 1) and not set(first) & set(retry), f'the retry trained again epochs the killed task had saved: {runs}'
    assert not Path(ckpt).exists() and Path(ckpt).with_suffix('.pt').exists(), 'the finished model, its checkpoints removed'
    for c, rs in by_model.items():
        if c != ckpt: assert len({p for p, *_ in rs}) == 1, f'{c} trained by more than one process: {rs}'

def test_the_report_names_the_executor(batches):
    d = batches['dir']
    assert 'Executor of this batch: Ray (local cluster: 2 CPU(s), 0 GPU(s))' in (d / 'ray' / 'report.md').read_text()
    assert 'Executor of this batch: local process pool (2 worker(s))' in (d / 'local' / 'report.md').read_text()
