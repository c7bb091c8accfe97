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
