"""evaluate: the attack grid's properties on small seeded models (robust <= clean, the untouched modality is
unchanged, budgets and boxes respected, batch-size invariance) and the shared experiment data/config helpers."""
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from crmt_nb.data import synthetic_preference, mfeat
from crmt_nb.models import JointModel, joint_model
from crmt_nb.evaluate import AttackSpec, paper_protocol, radius_grid, evaluate, _adv
from crmt_nb.experiment import experiment_data, train_config

def _linear(seed):
    torch.manual_seed(seed)
    d = synthetic_preference(300, 4, (8, 8), (3.0, 1.0), seed=seed)
    m = JointModel([nn.Identity(), nn.Identity()], [8, 8], 4)
    opt = torch.optim.Adam(m.parameters(), 0.05)
    xs, y = d.train[torch.arange(len(d.train))]
    for _ in range(80):
        loss = nn.functional.cross_entropy(m(xs).logits, y); opt.zero_grad(); loss.backward(); opt.step()
    return d, m.eval()

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_robust_accuracy_at_most_clean_and_monotone(seed):
    d, m = _linear(seed)
    radii = (0.25, 0.5, 1.0, 2.0)
    r = evaluate(m, d.test, paper_protocol(d.names) + radius_grid(d.names, radii), device='cpu')
    acc = r.set_index(['attack', 'modality', 'eps'])['value']
    clean = acc[('clean', 'none', 0.0)]
    assert clean > 0.7
    assert (r.query("attack in ('fgm', 'pgd')")['value'] <= clean + 1e-9).all()
    for n in d.names:                                  # a linear model: PGD at a larger radius never does better
        curve = [acc[('pgd', n, e)] for e in radii]
        assert all(a >= b - 1e-9 for a, b in zip(curve, curve[1:])), curve
    # the strong modality (margin 3) is the one the model relies on: attacking it hurts more
    assert acc[('pgd', 'm0', 2.0)] <= acc[('pgd', 'm1', 2.0)]

def test_zero_radius_is_clean_and_batch_size_invariant():
    d, m = _linear(3)
    specs = [AttackSpec('clean', 'none'), AttackSpec('pgd', 'm0', 0.0), AttackSpec('fgm', 'all', 0.0),
             AttackSpec('pgd', 'all', 0.7), AttackSpec('fgm', 'm1', 0.7), AttackSpec('missing', 'm1')]
    a = evaluate(m, d.test, specs, batch_size=256, device='cpu')
    b = evaluate(m, d.test, specs, batch_size=7, device='cpu')
    fct.test_close(a['value'].values, b['value'].values, eps=1e-9)
    fct.test_eq(a['value'][0], a['value'][1]); fct.test_eq(a['value'][0], a['value'][2])
    fct.test_eq(len(evaluate(m, d.test, specs + specs, device='cpu')), len(specs))   # each condition once

def test_adversarial_inputs_respect_budget_box_and_leave_the_other_modality():
    torch.manual_seed(0)
    d = mfeat(('pix', 'fou'))
    model = joint_model(d.shapes, d.n_classes).eval()
    xs, y = d.test[torch.arange(64)]
    names, boxes = d.names, d.boxes
    for attack in ('fgm', 'pgd'):
        for m, eps in ((0, 1.5), (1, 3.0)):
            adv = _adv(model, xs, y, AttackSpec(attack, names[m], eps), names, boxes, 4)
            other = 1 - m
            assert torch.equal(adv[other], xs[other]), 'the untouched modality changed'
            norms = (adv[m] - xs[m]).flatten(1).norm(dim=1)
            assert (norms <= eps * (1 + 1e-5)).all() and norms.max() > 0.5 * eps
        adv = _adv(model, xs, y, AttackSpec(attack, 'all', 2.0), names, boxes, 4)
        joint = torch.cat([(a - x).flatten(1) for a, x in zip(adv, xs)], 1).norm(dim=1)
        assert (joint <= 2.0 * (1 + 1e-5)).all()
        assert adv[0].min() >= 0 and adv[0].max() <= 1, 'the pix image left its box [0, 1]'
    miss = _adv(model, xs, y, AttackSpec('missing', 'pix'), names, boxes, 4)
    assert torch.equal(miss[1], xs[1]) and not miss[0].any()
    fct.test_fail(lambda: _adv(model, xs, y, AttackSpec('pgd', 'audio', 1.0), names, boxes, 4), contains="unknown modality 'audio'")
    fct.test_fail(lambda: _adv(model, xs, y, AttackSpec('missing', 'all'), names, boxes, 4), contains='missing needs one modality')

def test_logit_models_are_evaluated_too():
    d, m = _linear(4)
    class Logits(nn.Module):                           # e.g. MSEFM's ExFM predictor: returns a tensor
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, *xs): return self.m(*xs).logits
    specs = paper_protocol(d.names)
    fct.test_close(evaluate(Logits(m), d.test, specs, device='cpu')['value'].values,
                   evaluate(m, d.test, specs, device='cpu')['value'].values, eps=1e-9)

def test_experiment_data_and_config():
    fct.test_eq(experiment_data('mini', 'mfeat pix+fou').names, ('pix', 'fou'))
    fct.test_eq(experiment_data('smoke', 'mfeat fou+kar').shapes, ((76,), (64,)))
    fct.test_fail(lambda: experiment_data('paper', 'ks'), contains='needs data_root')
    c = train_config('smoke', 'OGM', epochs=3)
    fct.test_eq((c['epochs'], c['max_train']), (3, 128))
    fct.test_eq(train_config('paper', 'JT')['model'], 'resnet18')
