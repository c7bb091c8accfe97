"""The papers' reported numbers (crmt_nb.paper): tidy rows, per-item consistency, SoE Table 1's training times."""
import math
import pandas as pd, pytest
from crmt_nb.paper import reported, _SOE_T1

TIDY = ['item', 'dataset', 'method', 'attack', 'modality', 'eps', 'metric', 'value', 'source']


@pytest.mark.parametrize('paper', ['crmt', 'soe'])
def test_every_item_is_tidy(paper):
    "Every item has the tidy columns, source='paper', and a value or a 'no paper numbers to compare' note."
    df = reported(paper)
    for item in df['item'].unique():
        d = reported(paper, item)
        assert set(TIDY) <= set(d.columns) and (d.source == 'paper').all() and (d['item'] == item).all()
        noted = d['note'].fillna('').str.startswith('no paper numbers to compare') if 'note' in d else False
        assert (d.value.notna() | noted).all(), item


def test_soe_table1_hours_and_ratios():
    "Hours are the appendix's h + min/60; the ratios to ADP are hours / ADP's hours and ADP's is 1."
    t = reported('soe', 'table1')
    h = t[t.metric == 'train_hours'].set_index('method')['value']
    r = t[t.metric == 'train_ratio_to_ADP'].set_index('method')['value']
    assert set(h.index) == set(r.index) == {'GAL', 'DVERGE', 'ADP', 'MoRE', 'SoE'}
    for m, (hh, mm) in _SOE_T1.items():
        assert math.isclose(h[m], hh + mm / 60) and 0 <= mm < 60
        assert math.isclose(r[m], h[m] / h['ADP'])
    assert r['ADP'] == 1.0 and r['DVERGE'] > r['SoE'] > r['MoRE'] > max(r['ADP'], r['GAL']) - 1e-9
    assert abs(r['GAL'] - r['ADP']) < 0.01                 # ADP ≈ GAL (one minute apart)
    assert set(t.epochs) == {100} and t.device.nunique() == 1


def test_soe_table1_rows_concatenate_with_ours():
    "Our rows (same tidy columns, source='ours') pivot beside the paper's by method and metric."
    t = reported('soe', 'table1')
    ours = t.assign(source='ours', value=t.value * 2)
    p = pd.concat([t, ours]).pivot_table(index=['method', 'metric'], columns='source', values='value')
    assert (p['ours'] == 2 * p['paper']).all() and len(p) == 10
