"""Every experiment declares the cached models it reads before it trains (crmt_nb.plan), and `crmt-reproduce --plan`
lists them — on smoke and on the paper code path (paper-dry fixtures) — without training anything. That the declared
needs cover every model a notebook really requests is checked on whole batches: tests/test_reproduce.py (smoke, every
notebook) and tests/test_paper_dryrun.py (paper-dry) read each notebook's `.needs.json`."""
import json, subprocess, sys
from pathlib import Path
import pytest
from crmt_nb.reproduce import EXPERIMENTS
from crmt_nb.plan import read_plan
from crmt_nb.paper_data import make_fixtures

BIN = Path(sys.executable).parent
TRAINS = ('.trained(', 'soe_trained', 'soe_prefetch(', 'transfer_bank(', 'surrogate(')

def _code(name):
    cells = json.loads(EXPERIMENTS[name].notebook.read_text())['cells']
    return [''.join(c['source']) for c in cells if c['cell_type'] == 'code']

def _trains(src: str) -> bool:
    return any(t in line for line in src.splitlines() if not line.lstrip().startswith(('from ', 'import ', '#'))
               for t in TRAINS)

@pytest.mark.parametrize('name', sorted(EXPERIMENTS))
def test_every_notebook_declares_before_it_trains(name):
    code = _code(name)
    decl = [i for i, s in enumerate(code) if 'declare(run' in s]
    assert len(decl) == 1, f'{name}: needs exactly one declare(run, [...]) cell (crmt_nb.plan), found {len(decl)}'
    first = next((i for i, s in enumerate(code) if _trains(s)), None)
    assert first is None or decl[0] < first, f'{name}: code cell {first} trains before the declare cell {decl[0]}'

def _plan(cwd, *args):
    return subprocess.run([str(BIN / 'crmt-reproduce'), '--plan', '--workers', '2', '--no-progress', *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=900)

def _needs(out: Path, names) -> dict:
    return {n.key: n for name in names for n in read_plan(out / name)['needs']}

def test_plan_lists_each_model_once_and_trains_nothing(tmp_path):
    names = ['crmt_fig1_fig4', 'crmt_fig3_vulnerability']      # they share models (SoE needs: the paper-dry test)
    r = _plan(tmp_path, '--profile', 'smoke', '--only', ','.join(names), '--out', 'p')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / 'p'
    assert not list(out.rglob('*.pt')) and not (out / 'models').exists(), '--plan must not train anything'
    needs = _needs(out, names)
    models = [n for n in needs.values() if n.kind != 'bank']
    text = (out / 'plan.md').read_text()
    assert text in r.stdout and f'**{len(models)} models**' in text, text[:500]
    assert f'{sum(n.kind == "bank" for n in needs.values())} transfer bank(s), used by {len(names)} notebook(s)' in text
    per = {name: {n.key for n in read_plan(out / name)['needs']} for name in names}
    assert per['crmt_fig1_fig4'] & per['crmt_fig3_vulnerability'], 'Fig 1/4 and Fig 3 share MMAT and CRMT-AT: the same cache files'
    rows = [l for l in text.splitlines() if l.startswith('| ') and not l.startswith('| kind')]
    assert len(rows) == len(needs), 'one line per distinct need'
    assert all('crmt_fig1_fig4, crmt_fig3_vulnerability' in l for l in rows if ' MMAT ' in l), 'a shared model names both notebooks'
    # a second plan of unchanged notebooks reads the stamped plans back
    again = _plan(tmp_path, '--profile', 'smoke', '--only', ','.join(names), '--out', 'p')
    assert again.returncode == 0 and again.stdout.count('[plan]') == len(names)
    assert (out / 'plan.md').read_text() == text

def test_plan_of_the_paper_model_set(tmp_path):
    "paper-dry: the paper's code path on generated fixtures — ResNet-18 pairs on KS, ResNet-20 members on CIFAR-10."
    root = tmp_path / 'data'; make_fixtures(root)
    names = ['crmt_table1_table2', 'soe_table3_square']
    r = _plan(tmp_path, '--profile', 'paper-dry', '--data-root', root, '--only', ','.join(names), '--out', 'p')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list((tmp_path / 'p').rglob('*.pt'))
    needs = _needs(tmp_path / 'p', names).values()
    assert {n.dataset for n in needs} == {'ks', 'cifar10'}
    for n in needs:
        if n.kind == 'crmt': assert n.args['config']['model'] == 'resnet18' and n.args['config']['optimizer'] == 'sgd', n
        else: assert n.kind == 'soe' and n.args['overrides'].get('options', {}).get('eps', 0.02) == 0.02, n   # per-ε models (the paper)
    assert '**' in r.stdout and 'paper-dry' in r.stdout
