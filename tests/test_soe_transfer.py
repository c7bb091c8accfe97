"""The transfer bank of the SoE appendix: perturbations in their ℓ∞ ball and [0,1], crafted once per run folder
(cache hit, lock, key), reproducible from a fresh folder, and acc1 = the per-sample worst case over a set's variants."""
from pathlib import Path
from types import SimpleNamespace
import pytest, torch, torch.nn as nn
from crmt_nb.core import get_profile, num_threads
from crmt_nb.data import mnist5k
from crmt_nb.soe_baselines import soe_eval
import crmt_nb.soe_transfer as st
from crmt_nb.soe_transfer import (TransferBank, transfer_bank, transfer_accuracy, surrogate, small_set_names,
                                  eval_batch, SURROGATE_SEED)

@pytest.fixture(autouse=True)
def one_thread():
    with num_threads(1): yield

def fake_run(root):
    return SimpleNamespace(splits=mnist5k(), profile=get_profile('smoke'), device=torch.device('cpu'), root=Path(root))

@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp('transfer'))

@pytest.mark.parametrize('eps', [0.05, 0.2])
def test_perturbations_stay_in_the_ball_and_box(shared, eps):
    bank = transfer_bank(shared, eps)
    assert len(bank.sets) == 2 * 5 * len(soe_eval('smoke')['surrogates'])
    for name, xa in bank.sets.items():
        assert xa.shape == bank.x.shape
        assert (xa - bank.x).abs().max().item() <= eps + 1e-6, name
        assert xa.min().item() >= 0 and xa.max().item() <= 1, name

def test_crafted_once_then_read(shared, monkeypatch):
    first = transfer_bank(shared, 0.1)
    def boom(*a, **k): raise AssertionError('the bank was crafted a second time')
    monkeypatch.setattr(st, 'transfer_sets', boom)
    again = transfer_bank(shared, 0.1)
    assert all(torch.equal(first.sets[k], again.sets[k]) for k in first.sets)
    assert torch.equal(first.y, again.y) and first.idx == again.idx
    files = list(Path(shared.root).glob('transfer/mnist5k/bank-eps0.1/*.pt'))
    assert len(files) == 1 and not list(Path(shared.root).glob('transfer/**/.*.tmp*'))

def test_key_follows_the_settings(shared):
    a, b = transfer_bank(shared, 0.1), transfer_bank(shared, 0.1, steps=1)
    c = transfer_bank(shared, 0.1, n_eval=16)
    assert len({str(sorted(x.key.items())) for x in (a, b, c)}) == 3
    assert len(c.y) == 16 and c.idx == eval_batch(shared, 16)[2]
    assert not torch.equal(a.sets['baseline3_ce_mpgd_0'], b.sets['baseline3_ce_mpgd_0'])

def test_same_seed_same_examples_in_a_fresh_folder(shared, tmp_path):
    a, b = transfer_bank(shared, 0.1), transfer_bank(fake_run(tmp_path), 0.1)
    assert all(torch.equal(a.sets[k], b.sets[k]) for k in a.sets)
    c = transfer_bank(fake_run(tmp_path), 0.1, seed=1)
    assert not torch.equal(a.sets['baseline3_ce_mpgd_0'], c.sets['baseline3_ce_mpgd_0'])

def test_surrogate_is_a_holdout_standard_ensemble(shared):
    t = surrogate(shared, 3)
    assert t.model.combine == 'average' and len(t.model.experts) == 3 and 'eps' not in t.config['options']
    assert list(Path(shared.root).glob(f'models/mnist5k/Ensemble-std/*-seed{SURROGATE_SEED + 3}.pt'))

def test_small_set_needs_baseline3(shared):
    with pytest.raises(ValueError, match='must include 3'): transfer_bank(shared, 0.1, surrogates=(5, 8))

class Lin(nn.Module):
    def __init__(self, d, K, g): super().__init__(); self.w = nn.Parameter(torch.randn(d, K, generator=g))
    def forward(self, x): return x.flatten(1) @ self.w

@pytest.mark.parametrize('seed', range(6))
def test_acc1_is_the_per_sample_worst_case(seed):
    g = torch.Generator().manual_seed(seed)
    B, K, V = 40, 3, 7
    x = torch.rand(B, 1, 2, 2, generator=g); y = torch.randint(0, K, (B,), generator=g)
    names = [f'v{i}' for i in range(V)]
    sets = {n: (x + 0.3 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1) for n in names}
    bank = TransferBank(0.3, x, y, list(range(B)), sets, tuple(names[:3]), {})
    model = Lin(4, K, g)
    acc = transfer_accuracy(model, bank)
    ok = torch.stack([(model(sets[n]).argmax(1) == y) for n in names])
    assert acc['all'] == pytest.approx(ok.all(0).float().mean().item())
    assert acc['small'] == pytest.approx(ok[:3].all(0).float().mean().item())
    assert acc['all'] <= acc['small'] + 1e-12
    assert all(acc['small'] <= acc[f'variant:{n}'] + 1e-12 for n in names[:3])
    assert all(acc['all'] <= acc[f'variant:{n}'] + 1e-12 for n in names)

def test_small_set_names():
    assert small_set_names() == ('baseline3_ce_mpgd_0', 'baseline3_ce_sgm_0', 'baseline3_ce_mdi2_0')
