"""SoE models and selection: depth 6n+2 family (2/8/14/20), parameter counts, ĉ and argmax selection,
the equal-confidence reduction to max-softmax, Eq 7 bounds, the E-head loss, Proposition 2."""
import math, pytest, torch, torch.nn as nn, torch.nn.functional as F
from crmt_nb.core import num_threads
from crmt_nb.soe_models import (CifarResNet, SubModel, Collaboration, resnet_param_count, confidence, select, soe_model,
                                linear_expert, oracle_index, selection_quality, average_logits)
from crmt_nb.soe_training import eq7_loss, selection_loss, ehead_loss, ehead_target, per_model_ce, soe_objective

@pytest.fixture(autouse=True)
def one_thread():
    with num_threads(1): yield

def _count_by_hand(depth, w, in_ch, K, e_head):
    "ResNet parameter count written out layer by layer (independent of resnet_param_count's loop)."
    n = (depth - 2) // 6
    conv, bn = lambda ci, co, k: ci * co * k * k, lambda c: 2 * c
    total = conv(in_ch, w[0], 3) + bn(w[0]); c = w[0]
    for s in range(3):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            total += conv(c, w[s], 3) + bn(w[s]) + conv(w[s], w[s], 3) + bn(w[s])
            if stride != 1 or c != w[s]: total += conv(c, w[s], 1) + bn(w[s])
            c = w[s]
    d = c if n > 0 else c * 16
    return total + d * K + K + ((d + 1) if e_head else 0)

@pytest.mark.parametrize('depth', [2, 8, 14, 20])
@pytest.mark.parametrize('widths', [(16, 32, 64), (4, 8, 12)])
def test_param_count_formula(depth, widths):
    sub = SubModel(t := CifarResNet(depth, widths), t.d_out, 10)
    got = sum(p.numel() for p in sub.parameters())
    assert got == resnet_param_count(depth, widths) == _count_by_hand(depth, widths, 3, 10, True)

def test_resnet20_matches_spec_and_depth2_features():
    assert resnet_param_count(20, e_head=False) == 272_474         # ResNet-20 P path (spec §1.1)
    assert resnet_param_count(20) - resnet_param_count(20, e_head=False) == 65   # E head = Linear(64, 1), not 128
    assert CifarResNet(2).d_out == 256 and len(CifarResNet(2).blocks) == 0
    with pytest.raises(ValueError, match='6n\\+2'): CifarResNet(12)

def test_normalisation_inside_the_model():
    t = CifarResNet(2, (4, 4, 4), in_ch=1, mean=(0.5,), std=(0.25,))
    x = torch.rand(2, 1, 8, 8)
    ref = CifarResNet(2, (4, 4, 4), in_ch=1, mean=(0.,), std=(1.,)); ref.load_state_dict(t.state_dict(), strict=False)
    ref.normalize.mean.fill_(0.); ref.normalize.std.fill_(1.)
    t.eval(); ref.eval()
    assert torch.allclose(t(x), ref((x - 0.5) / 0.25), atol=1e-6)

def test_selection_is_argmax_of_rectified_confidence():
    torch.manual_seed(0)
    col = Collaboration([linear_expert(5, 4) for _ in range(4)]).eval()
    x = torch.randn(64, 5)
    with torch.no_grad(): out = col(x)
    c = torch.stack([torch.softmax(e(x).logits, 1).max(1).values * torch.sigmoid(e(x).conf_logit) for e in col.experts])
    assert torch.allclose(out.confidence, c, atol=1e-6)
    assert torch.equal(out.selected, c.argmax(0))
    with torch.no_grad():
        for b in range(64): assert torch.allclose(out.logits[b], col.experts[int(c[:, b].argmax())](x[b:b + 1]).logits[0], atol=1e-6)

def test_equal_confidence_reduces_to_max_softmax():
    torch.manual_seed(1)
    col = Collaboration([linear_expert(5, 4) for _ in range(3)]).eval()
    for e in col.experts: nn.init.zeros_(e.fc_aux.weight); nn.init.constant_(e.fc_aux.bias, -2.0)
    x = torch.randn(100, 5)
    with torch.no_grad():
        out = col(x); ms = torch.stack([torch.softmax(e(x).logits, 1).max(1).values for e in col.experts])
    assert torch.equal(out.selected, ms.argmax(0))
    # and unequal E heads change the choice somewhere (the test can fail)
    nn.init.normal_(col.experts[0].fc_aux.weight, std=5.0)
    with torch.no_grad(): assert not torch.equal(col(x).selected, ms.argmax(0))

def test_average_is_mean_softmax():
    z = torch.randn(3, 7, 5)
    assert torch.allclose(average_logits(z).exp(), sum(torch.softmax(z[i], 1) for i in range(3)) / 3, atol=1e-6)

@pytest.mark.parametrize('delta', [0.05, 0.3, 1.0, 4.0])
def test_eq7_bounds(delta):
    torch.manual_seed(2)
    ell = torch.rand(5, 400) * 10
    v, mn = eq7_loss(ell, delta, delta), ell.min(0).values
    assert (v >= mn - delta * math.log(5) - 1e-5).all() and (v <= mn + 1e-5).all()
    # both bounds are attained in the limits: all equal → lower bound, one much smaller → upper bound
    eq = torch.full((5, 1), 2.0); assert torch.allclose(eq7_loss(eq, delta, delta), 2.0 - delta * torch.tensor([math.log(5)]))
    far = torch.tensor([[0.], [1e3], [1e3], [1e3], [1e3]]); assert abs(eq7_loss(far, delta, delta).item()) < 1e-4

def test_eq7_literal_and_general_delta_sigma():
    ell = torch.rand(3, 20) * 3
    lit = torch.tensor([-0.4 * math.log(sum(math.exp(-ell[j, b].item() / 1.7) for j in range(3))) for b in range(20)])
    assert torch.allclose(eq7_loss(ell, 0.4, 1.7), lit, atol=1e-5)
    r = 0.4 / 1.7; v = eq7_loss(ell, 0.4, 1.7)
    assert (v <= r * ell.min(0).values + 1e-6).all() and (v >= r * ell.min(0).values - 0.4 * math.log(3) - 1e-6).all()

def test_weightings_and_official():
    z = torch.randn(3, 10, 4, requires_grad=True); y = torch.randint(0, 4, (10,))
    g7, = torch.autograd.grad(selection_loss(z, y, weighting='eq7'), z)
    g1, = torch.autograd.grad(selection_loss(z, y, weighting='v1'), z)
    assert torch.allclose(g7, g1, atol=1e-6)
    c = torch.rand(3, 10)
    lit = (torch.softmax(c, 0) * per_model_ce(z, y)).sum(0).mean()
    assert torch.allclose(selection_loss(z, y, c, 'v2'), lit)
    with pytest.raises(ValueError): selection_loss(z, y, weighting='nope')

def test_ehead_loss_is_bce_to_true_label_probability():
    torch.manual_seed(3)
    z = torch.randn(2, 9, 3, requires_grad=True); a = torch.randn(2, 9, requires_grad=True); y = torch.randint(0, 3, (9,))
    p = torch.softmax(z, -1); t = p.gather(2, y[None, :, None].expand(2, -1, 1))[..., 0]
    assert torch.allclose(ehead_target(z, y), t)
    q = p.max(-1).values * torch.sigmoid(a)
    assert torch.allclose(ehead_loss(z, a, y), F.binary_cross_entropy(q, t.detach()), atol=1e-6)
    assert torch.isfinite(torch.autograd.grad(ehead_loss(z * 100, a * 100, y), z)[0]).all()   # saturated ĉ: finite gradient

def test_proposition2_numerically():
    torch.manual_seed(4)
    z = torch.randn(4, 3000, 10) * 3; y = torch.randint(0, 10, (3000,))
    ell = per_model_ce(z, y); py = torch.softmax(z, -1).gather(2, y[None, :, None].expand(4, -1, 1))[..., 0]
    assert torch.equal(ell.argmin(0), py.argmax(0)) and torch.equal(oracle_index(z, y), ell.argmin(0))
    assert (torch.softmax(z, -1).amax(-1).argmax(0) != ell.argmin(0)).float().mean() > 0.05
    assert (ell.min(0).values <= -py.mean(0).log() + 1e-6).all()

def test_selection_quality_metric():
    z = torch.randn(3, 50, 4); y = torch.randint(0, 4, (50,))
    col_out = type('O', (), {})(); col_out.sub_logits = z; col_out.selected = oracle_index(z, y)
    assert selection_quality(col_out, y) == 1.0
    col_out.selected = (oracle_index(z, y) + 1) % 3
    assert selection_quality(col_out, y) == 0.0

def test_official_objective_is_released_v2_and_ehead_trains_trunk():
    from crmt_nb.soe_training import SoE
    torch.manual_seed(5)
    col = soe_model(8, 3, in_ch=1, n_classes=4, widths=(4, 4, 8), mean=(0.5,), std=(0.5,))
    x, y = torch.rand(6, 1, 10, 10), torch.randint(0, 4, (6,))
    out = col(x)
    v2 = selection_loss(out.sub_logits, y, out.confidence, 'v2') + ehead_loss(out.sub_logits, out.conf_logits, y)
    e7 = selection_loss(out.sub_logits, y) + ehead_loss(out.sub_logits, out.conf_logits, y)
    assert SoE(official=True).objective(out, y).item() == pytest.approx(v2.item(), abs=1e-6)
    assert SoE().objective(out, y).item() == pytest.approx(e7.item(), abs=1e-6) and abs(v2.item() - e7.item()) > 1e-4
    g = torch.autograd.grad(ehead_loss(out.sub_logits, out.conf_logits, y), col.experts[0].trunk.stem[0].weight)[0]
    assert g.abs().sum() > 0                                      # the E-head loss is not detached from the trunk (spec §7)
