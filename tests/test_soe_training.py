"""SoE training through the one loop `fit`: the XOR toy (collaboration of two linear sub-models vs their averaging
ensemble), same seed ⇒ same weights, the phase schedule with the optimiser/scheduler kept, depth 2/8/14/20 train."""
import math, pytest, torch
from crmt_nb.core import num_threads
from crmt_nb.data import xor_toy, split_arrays
from crmt_nb.soe_models import Collaboration, linear_expert
from crmt_nb.soe_training import soe_fit, SoE, build_soe, SOE_METHODS
import crmt_nb.soe_baselines  # registers the baselines

@pytest.fixture(autouse=True)
def one_thread():
    with num_threads(1): yield

@pytest.fixture(scope='module')
def xor(): return xor_toy(n=1000, seed=0)

def _xor_fit(xor, name, seed=0):
    m = SOE_METHODS[name]()
    build = lambda: Collaboration([linear_expert(2, 2, m.e_head) for _ in range(2)], m.combine)
    return soe_fit(build, m, xor, epochs=30, lr=0.05, optimizer='adam', milestones=[], batch_size=64, seed=seed)

@pytest.mark.parametrize('seed', [0, 1])
def test_xor_collaboration_beats_linear_averaging(xor, seed):
    soe = _xor_fit(xor, 'SoE-std', seed).history.test_acc.iloc[-1]
    avg = _xor_fit(xor, 'Ensemble-std', seed).history.test_acc.iloc[-1]
    assert soe >= 0.95, soe
    assert avg <= 0.60, avg

def _tiny_images(n=24, c=1, hw=12, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, hw, hw, generator=g); y = torch.arange(n) % K
    return split_arrays('tiny', (x,), y, ('image',), ((0.0, 1.0),), (0.5, 0.25, 0.25), seed, (False,))

KW = dict(in_ch=1, n_classes=4, widths=(4, 4, 8), mean=(0.5,), std=(0.5,))

def test_same_seed_same_weights_and_phases():
    data = _tiny_images()
    def run(seed):
        m = SoE(eps=0.1, alpha=0.05, steps=2, random_start=True)
        return soe_fit(lambda: build_soe(m, 8, 2, **KW), m, data, epochs=3, lr=0.05, batch_size=6, seed=seed, milestones=[2])
    a, b, c = run(0), run(0), run(1)
    sa, sb, sc = (t.model.state_dict() for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    h = a.history
    assert list(h.phase) == ['sub', 'collab', 'collab']                 # default sub_epochs = epochs // 2
    assert list(h.lr) == pytest.approx([0.05, 0.05, 0.005])         # one MultiStepLR across the phase switch
    assert {'loss', 'acc', 'adv_acc', 'selection_quality'} <= set(h.columns) and h.loss.map(math.isfinite).all()

@pytest.mark.parametrize('schedule,phases', [('sequential', ['sub', 'collab']), ('sub', ['sub', 'sub']),
                                             ('collab', ['collab', 'collab']), ('both', ['both', 'both'])])
def test_schedules(schedule, phases):
    m = SoE(eps=0.1, alpha=0.05, steps=1, schedule=schedule)
    t = soe_fit(lambda: build_soe(m, 2, 2, **KW), m, _tiny_images(), epochs=2, lr=0.05, batch_size=12, test=False)
    assert list(t.history.phase) == phases

def test_adversarial_batch_sizes():
    m = SoE(eps=0.1, alpha=0.05, steps=1); model = build_soe(m, 2, 3, **KW)
    m.generator = m.device_generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 1, 12, 12), torch.randint(0, 4, (5,))
    for phase, n in [('sub', 15), ('collab', 5), ('both', 20)]:
        m.phase = phase; xa, ya = m.adversarial_batch(model, x, y)
        assert xa.shape[0] == ya.shape[0] == n and (xa - x.repeat(n // 5, 1, 1, 1)).abs().max() <= 0.1 + 1e-6

@pytest.mark.parametrize('depth', [2, 8, 14, 20])
def test_depths_build_and_train_one_step(depth):
    data = _tiny_images(n=8, c=3, hw=16)
    m = SoE(eps=0.03, alpha=0.01, steps=1)
    kw = dict(in_ch=3, n_classes=4)
    t = soe_fit(lambda: build_soe(m, depth, 3, **kw), m, data, epochs=1, lr=0.05, batch_size=4, max_train=4, test=False)
    assert math.isfinite(t.history.loss.iloc[0])
    from crmt_nb.core import seed_everything
    seed_everything(0); init = build_soe(m, depth, 3, **kw).state_dict()
    moved = [k for k, v in t.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert any('fc_aux' in k for k in moved) and any('stem' in k for k in moved)   # the trunk and the E head both trained
