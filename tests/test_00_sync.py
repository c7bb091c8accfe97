"""The library is exactly what the notebooks export, and the notebooks are committed clean.
Runs first (file name) so that a stale crmt_nb/ fails before any other test uses it."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.clean import clean_nb

CFG = get_config()
ROOT = Path(CFG.config_path)
BIN = Path(sys.executable).parent
NBS = sorted(p for p in CFG.nbs_path.rglob('*.ipynb')
             if not any(s.startswith(('_', '.')) for s in p.relative_to(CFG.nbs_path).parts))

def test_library_matches_notebooks(tmp_path):
    "nbdev_export in a scratch copy of the project gives byte-identical crmt_nb/*.py."
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    shutil.copytree(CFG.nbs_path, tmp_path / 'nbs')
    (tmp_path / 'crmt_nb').mkdir()
    subprocess.run([str(BIN / 'nbdev_export')], cwd=tmp_path, check=True, capture_output=True)
    made = {p.relative_to(tmp_path / 'crmt_nb') for p in (tmp_path / 'crmt_nb').rglob('*.py')}
    have = {p.relative_to(CFG.lib_path) for p in CFG.lib_path.rglob('*.py')}
    assert made == have, f'modules differ: only exported {sorted(map(str, made - have))}, only in crmt_nb {sorted(map(str, have - made))}'
    stale = [str(p) for p in sorted(made) if (tmp_path / 'crmt_nb' / p).read_text() != (CFG.lib_path / p).read_text()]
    assert not stale, f'crmt_nb/ is out of sync with nbs/ for {stale}: edit the notebook, run `nbdev_export`, commit both'

@pytest.mark.parametrize('nb', NBS, ids=lambda p: str(p.relative_to(CFG.nbs_path)))
def test_notebook_is_clean(nb):
    "A notebook is committed exactly as `nbdev_clean` leaves it (no outputs, no stray metadata)."
    raw = json.loads(nb.read_text())
    cleaned = json.loads(nb.read_text())
    clean_nb(cleaned, clear_all=CFG.get('clear_all', False) in (True, 'True'),
             allowed_metadata_keys=set(CFG.get('allowed_metadata_keys', '').split()),
             allowed_cell_metadata_keys=set(CFG.get('allowed_cell_metadata_keys', '').split()),
             clean_ids=CFG.get('clean_ids', True) in (True, 'True'))
    assert raw == cleaned, f'{nb.name} is not clean: run `nbdev_clean` and commit it'
    assert raw['metadata'].get('kernelspec', {}).get('language') == 'python', f'{nb.name} needs a python kernelspec (papermill)'

def test_readme_matches_index():
    "README.md is nbs/index.ipynb rendered to markdown (`make readme`)."
    md = subprocess.run([str(BIN / 'jupyter'), 'nbconvert', '--to', 'markdown', '--stdout', '--log-level', 'ERROR',
                         str(CFG.nbs_path / 'index.ipynb')], check=True, capture_output=True, text=True).stdout
    assert (ROOT / 'README.md').read_text() == md, 'README.md is out of step with nbs/index.ipynb: run `make readme`'
