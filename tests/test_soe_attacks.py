"""Attacks on ensembles and collaborations: every attack stays in the l∞ ball and [0, 1], restores each module's mode,
is deterministic given its generator; worst-case bookkeeping (transfer 'robust under every variant', adaptive ≥ PGD)."""
import pytest, torch, torch.nn as nn
from crmt_nb.core import num_threads
from crmt_nb.soe_models import soe_model
from crmt_nb.soe_attacks import (linf_ascent, ce_objective, cw_objective, pgd_collab, adaptive_attack, square_collab,
                                 transfer_attack, transfer_sets, transfer_robust, worst_case, masking_check, predict,
                                 robustness_report, soft_selection_objective, diverse_input)

EPS = 0.08

@pytest.fixture(autouse=True)
def one_thread():
    with num_threads(1): yield

@pytest.fixture(scope='module')
def setup():
    torch.manual_seed(0)
    col = soe_model(8, 3, in_ch=1, n_classes=4, widths=(4, 4, 8), mean=(0.5,), std=(0.5,))
    x = torch.rand(10, 1, 10, 10); y = torch.randint(0, 4, (10,))
    return col, x, y

ATTACKS = {
    'pgd_code': lambda m, x, y, g: pgd_collab(m, x, y, EPS, 'code', steps=3, generator=g),
    'pgd_dverge': lambda m, x, y, g: pgd_collab(m, x, y, EPS, 'dverge', steps=3, restarts=2, generator=g),
    'adaptive': lambda m, x, y, g: adaptive_attack(m, x, y, EPS, steps=3, generator=g)[0],
    'square': lambda m, x, y, g: square_collab(m, x, y, EPS, n_queries=25, generator=g),
    'mpgd_cw': lambda m, x, y, g: transfer_attack(m, x, y, EPS, 'mpgd', 'cw', steps=3, generator=g),
    'mdi2': lambda m, x, y, g: transfer_attack(m, x, y, EPS, 'mdi2', 'ce', steps=3, generator=g, p=1.0),
    'sgm': lambda m, x, y, g: transfer_attack(m, x, y, EPS, 'sgm', 'ce', steps=3, generator=g),
}
RANDOM = {'pgd_code', 'pgd_dverge', 'adaptive', 'square', 'mpgd_cw', 'mdi2'}

@pytest.mark.parametrize('name', sorted(ATTACKS))
def test_ball_box_mode_generator(setup, name):
    col, x, y = setup
    col.train(); col.experts[1].eval(); col.experts[2].trunk.stem.eval()        # a mixed mode to restore
    modes = [m.training for m in col.modules()]
    a1 = ATTACKS[name](col, x, y, torch.Generator().manual_seed(5))
    assert [m.training for m in col.modules()] == modes
    assert a1.shape == x.shape and (a1 - x).abs().max() <= EPS + 1e-6 and a1.min() >= 0 and a1.max() <= 1
    a2 = ATTACKS[name](col, x, y, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)                                                  # same generator ⇒ same result
    if name in RANDOM:
        a3 = ATTACKS[name](col, x, y, torch.Generator().manual_seed(6))
        assert not torch.equal(a1, a3)                                          # the generator is really used
    assert not torch.equal(a1, x)
    col.eval()

def test_global_rng_untouched(setup):
    col, x, y = setup
    st = torch.get_rng_state()
    adaptive_attack(col, x, y, EPS, steps=2, generator=torch.Generator().manual_seed(0))
    transfer_attack(col, x, y, EPS, 'mdi2', steps=2, generator=torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(st, torch.get_rng_state())

def test_adaptive_at_least_as_strong_as_plain_pgd(setup):
    col, x, y = setup
    g = torch.Generator().manual_seed(1)
    plain = pgd_collab(col, x, y, EPS, 'code', steps=5, generator=g)
    plain_ok = predict(col, plain) == y
    _, robust, accs = adaptive_attack(col, x, y, EPS, steps=5, generator=g, extra={'pgd_code': plain})
    assert not (robust & ~plain_ok).any()                                      # robust under adaptive ⇒ robust under PGD
    assert robust.float().mean() <= min(accs.values()) + 1e-9
    assert set(accs) == {'pgd_code', 'pgd', 'soft', 'all', 'conf'}

def test_soft_selection_approaches_hard_selection(setup):
    col, x, y = setup
    with torch.no_grad():
        out = col.eval()(x)
        hard = nn.functional.cross_entropy(out.logits, y, reduction='sum')
        soft = soft_selection_objective(1e-4)(out, y)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-3)

class Threshold(nn.Module):
    "class 1 iff pixel 0 > 0.5"
    def forward(self, x): v = x.flatten(1)[:, :1]; return torch.cat([0.5 - v, v - 0.5], 1)

def test_worst_case_and_transfer_counting():
    y = torch.tensor([0, 0, 0, 0, 1]); x = torch.zeros(5, 1, 2, 2); x[4] = 1.0
    sets = {}
    for k, broken in enumerate([[0], [1], [0, 2]]):
        s = x.clone(); s[broken] = 1.0; sets[f'v{k}'] = s
    r = transfer_robust(Threshold(), sets, y)
    assert r['robust'].tolist() == [False, False, False, True, True]
    assert r['acc_all'] == pytest.approx(0.4) and r['acc_any'] == pytest.approx(1.0)
    xa, rob, accs = worst_case(Threshold(), x, y, sets)
    assert rob.tolist() == r['robust'].tolist() and torch.equal(xa[0], sets['v0'][0]) and torch.equal(xa[2], sets['v2'][2])
    assert accs == pytest.approx({'v0': 0.8, 'v1': 0.8, 'v2': 0.6})

def test_transfer_sets_names_and_count(setup):
    col, x, y = setup
    sets = transfer_sets({'b3': col, 'b5': col}, x[:4], y[:4], EPS, steps=1, generator=torch.Generator().manual_seed(0))
    assert len(sets) == 2 * 2 * 5 and 'b5_cw_mpgd_2' in sets and 'b3_ce_sgm_0' in sets
    assert not torch.equal(sets['b3_ce_mpgd_0'], sets['b3_ce_mpgd_1'])          # three different random starts

def test_masking_check_flags_black_box_beating_white_box():
    y = torch.tensor([0, 0, 0, 0]); x = torch.zeros(4, 1, 2, 2)
    weak = x.clone(); strong = x.clone(); strong[:2] = 1.0
    assert masking_check(Threshold(), x, y, weak, strong)['flag'] is True
    assert masking_check(Threshold(), x, y, strong, weak)['flag'] is False

def test_report_orders(setup):
    col, x, y = setup
    rep = robustness_report(col, x, y, EPS, steps=2, restarts=2, n_queries=10)
    assert rep['adaptive'] <= min(rep['pgd_code'], rep['pgd_dverge']) + 1e-9 and rep['clean'] >= rep['adaptive']
    assert isinstance(rep['masking_flag_pgd'], bool) and isinstance(rep['masking_flag'], bool)

def test_diverse_input_shape_and_identity():
    x = torch.rand(3, 1, 32, 32); g = torch.Generator().manual_seed(0)
    assert diverse_input(x, g, p=1.0).shape == x.shape and torch.equal(diverse_input(x, g, p=0.0), x)
