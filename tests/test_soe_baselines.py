"""The baselines' losses equal literal transcriptions of their formulas on small tensors (GAL, ADP, DVERGE, MoRE,
the averaging ensemble), and DVERGE's distillation stays in its ball and moves towards the target features."""
import math, pytest, torch, torch.nn as nn, torch.nn.functional as F
from crmt_nb.core import num_threads
from crmt_nb.soe_models import SubOutput, Collaboration, CifarResNet, soe_model
from crmt_nb.soe_training import build_soe
from crmt_nb.soe_baselines import gal_loss, adp_loss, dverge_loss, distill, Ensemble, MoRE, DVERGE, SOE_METHODS

@pytest.fixture(autouse=True)
def one_thread():
    with num_threads(1): yield

class Quad(nn.Module):
    "A member whose input gradient depends on x: z = (Wx + b)² + Vx."
    def __init__(self, d=4, K=3):
        super().__init__(); self.l, self.v = nn.Linear(d, K), nn.Linear(d, K, bias=False)
    def forward(self, x): return SubOutput(self.l(x) ** 2 + self.v(x), None, x)

def test_gal_matches_formula():
    torch.manual_seed(0)
    col = Collaboration([Quad() for _ in range(3)], 'average'); x = torch.randn(5, 4); y = torch.randint(0, 3, (5,))
    for lam in (0.5, 2.0):
        L, _ = gal_loss(col, x, y, lam)
        per_sample = []
        for b in range(5):
            gs = []
            for e in col.experts:
                xb = x[b:b + 1].clone().requires_grad_(True)
                gs.append(torch.autograd.grad(F.cross_entropy(e(xb).logits, y[b:b + 1]), xb)[0].flatten())
            cos = [torch.dot(gs[i], gs[j]) / (gs[i].norm() * gs[j].norm()) for i in range(3) for j in range(i + 1, 3)]
            per_sample.append(math.log(sum(math.exp(c.item()) for c in cos) + 1e-20))
        ce = sum(F.cross_entropy(e(x).logits, y).item() for e in col.experts) / 3
        assert L.item() == pytest.approx(ce + lam * sum(per_sample) / 5, abs=1e-5)

def test_gal_penalty_trains_the_members():
    col = Collaboration([Quad() for _ in range(3)], 'average'); x = torch.randn(5, 4); y = torch.randint(0, 3, (5,))
    L0, _ = gal_loss(col, x, y, 0.0); L1, _ = gal_loss(col, x, y, 1.0)
    g0 = torch.autograd.grad(L0, col.experts[0].l.weight)[0]; g1 = torch.autograd.grad(L1, col.experts[0].l.weight)[0]
    assert not torch.allclose(g0, g1)                                # the cosine term has a gradient (create_graph)

def test_adp_matches_formula():
    torch.manual_seed(1)
    z = torch.randn(3, 7, 6); y = torch.randint(0, 6, (7,))
    for a, b in [(2.0, 0.5), (0.0, 1.0), (1.0, 0.0)]:
        ce = sum(F.cross_entropy(z[i], y).item() for i in range(3)); H = LD = 0.0
        for s in range(7):
            p = [torch.softmax(z[i, s].double(), 0) for i in range(3)]; pb = sum(p) / 3
            H += -sum(pb[k].item() * math.log(pb[k].item() + 1e-20) for k in range(6)) / 7
            N = torch.stack([torch.cat([pi[:y[s]], pi[y[s] + 1:]]) for pi in p]); N = N / N.norm(dim=1, keepdim=True)
            LD += torch.logdet(N @ N.T + 1e-6 * torch.eye(3, dtype=torch.float64)).item() / 7
        assert adp_loss(z, y, a, b).item() == pytest.approx(ce - a * H - b * LD, abs=1e-4)

def test_dverge_loss_matches_formula():
    torch.manual_seed(2)
    col = soe_model(8, 3, in_ch=1, n_classes=5, widths=(4, 4, 8), mean=(0.5,), std=(0.5,), combine='average', e_head=False)
    xd = [torch.rand(4, 1, 10, 10) for _ in range(3)]; y = torch.randint(0, 5, (4,))
    lit = 0.0
    for j in range(3):
        for i in range(3):
            if i != j: lit += F.cross_entropy(col.experts[j](xd[i]).logits, y).item()
    assert dverge_loss(col, xd, y).item() == pytest.approx(lit, abs=1e-5)
    # member j gets no gradient from its own distilled images
    L = dverge_loss(col, [xd[0], xd[0] * 0 + 0.5, xd[0] * 0 + 0.5], y)
    g = torch.autograd.grad(L, col.experts[0].fc.weight)[0]
    assert torch.allclose(g, torch.autograd.grad(F.cross_entropy(col.experts[0](xd[1] * 0 + 0.5).logits, y) * 2,
                                                 col.experts[0].fc.weight)[0], atol=1e-6)

def test_distillation_ball_box_and_feature_distance():
    torch.manual_seed(3)
    t = CifarResNet(8, (4, 4, 8), in_ch=1, mean=(0.5,), std=(0.5,)).train()
    x, xt = torch.rand(6, 1, 12, 12), torch.rand(6, 1, 12, 12)
    for layer in (0, 1, 3):
        xd = distill(t, x, xt, layer, eps=0.07, alpha=0.01, steps=8)
        assert (xd - x).abs().max() <= 0.07 + 1e-6 and xd.min() >= 0 and xd.max() <= 1
        with torch.no_grad(), torch.inference_mode():
            t.eval(); d0 = (t.features_at(x, layer) - t.features_at(xt, layer)).pow(2).sum()
            d1 = (t.features_at(xd, layer) - t.features_at(xt, layer)).pow(2).sum(); t.train()
        assert d1 < d0
    assert t.training                                               # mode restored

def test_more_mixture_and_ensemble_loss():
    torch.manual_seed(4)
    kw = dict(in_ch=1, n_classes=5, widths=(4, 4, 8), mean=(0.5,), std=(0.5,))
    mo = build_soe(MoRE(adversarial=False), 8, 3, **kw); x = torch.rand(4, 1, 10, 10); y = torch.randint(0, 5, (4,))
    out = mo(x); w = torch.softmax(mo.gate(x), 1)
    assert torch.allclose(out.logits, sum(w[:, i:i + 1] * mo.experts[i](x).logits for i in range(3)), atol=1e-5)
    L, _ = MoRE(adversarial=False).loss(mo, (x,), y)
    assert L.item() == pytest.approx(F.cross_entropy(out.logits, y).item(), abs=1e-5)
    en = build_soe(Ensemble(), 8, 3, **kw)
    L, lg = Ensemble(adversarial=False).loss(en, (x,), y)
    assert L.item() == pytest.approx(sum(F.cross_entropy(e(x).logits, y).item() for e in en.experts), abs=1e-5)
    assert torch.allclose(lg.exp(), sum(torch.softmax(e(x).logits, 1) for e in en.experts) / 3, atol=1e-6)

def test_registry_has_every_method():
    assert {'SoE', 'SoE-sub', 'SoE-std', 'SoE-official', 'Ensemble', 'Ensemble-std', 'GAL', 'ADP', 'DVERGE', 'MoRE'} <= set(SOE_METHODS)
    assert SOE_METHODS['GAL'].cls.leaky and not SOE_METHODS['DVERGE']().adversarial and SOE_METHODS['SoE-official']().official

@pytest.mark.parametrize('method', ['SoE', 'DVERGE'])
def test_soe_trained_resumes_a_killed_training_to_the_same_weights(method, tmp_path, monkeypatch):
    "soe_trained checkpoints every epoch: stopped after epoch 1 of 2 and called again, it ends where an unbroken run ends."
    from pathlib import Path
    from types import SimpleNamespace
    from crmt_nb.core import get_profile
    from crmt_nb.data import mnist5k
    from crmt_nb import train as T
    from crmt_nb.soe_baselines import soe_trained
    run = lambda d: SimpleNamespace(splits=mnist5k(), profile=get_profile('smoke'), device='cpu', root=Path(d))
    whole = soe_trained(run(tmp_path / 'a'), method, 0)
    save_last, epochs = T._Fit.save_last, []
    def stop_after_first(self, *a):
        save_last(self, *a); epochs.append(a[-2])
        if len(epochs) == 1: raise KeyboardInterrupt('killed')
    monkeypatch.setattr(T._Fit, 'save_last', stop_after_first)
    with pytest.raises(KeyboardInterrupt): soe_trained(run(tmp_path / 'b'), method, 0)
    resumed = soe_trained(run(tmp_path / 'b'), method, 0)
    assert epochs == [1, 2], 'the second call trains epoch 2 only'
    for (k, v), w in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()): assert torch.equal(v, w), k
    assert not list((tmp_path / 'b').rglob('*.ckpt')), 'the checkpoints go once the model is saved'
