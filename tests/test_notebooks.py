"""Every library notebook runs without error (nbdev's test runner). The experiment notebooks run through
papermill with their smoke defaults in tests/test_reproduce.py — as `crmt-reproduce` runs them."""
import pytest
from fastcore.basics import listify
from nbdev.test import test_nb as run_nb   # renamed: pytest would collect a bare `test_nb`
from test_00_sync import CFG, NBS          # one list of notebooks for the sync, cleanliness and execution tests

LIBRARY = [nb for nb in NBS if 'experiments' not in nb.relative_to(CFG.nbs_path).parts]

@pytest.mark.parametrize('nb', LIBRARY, ids=lambda p: str(p.relative_to(CFG.nbs_path)))
def test_notebook(nb):
    ok, secs = run_nb(nb, skip_flags=listify(CFG.tst_flags.split()), basepath=CFG.config_path)
    assert ok, f'{nb.name} failed (run it in JupyterLab or with `nbdev_test --path {nb}` to see the error)'
