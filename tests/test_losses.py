"""Tests of crmt_nb.losses: L1 (Eq 12) against the literal formula and the authors' form, stability, the CRMT-Mix
forms, and the step-2 bound loss against a literal per-sample computation of Eq 10."""
import math, itertools
import pytest, torch, torch.nn.functional as F
import fastcore.test as fct
from crmt_nb.models import joint_model
from crmt_nb.losses import margin_loss, margin_loss_mix, bound_loss
from crmt_nb.bounds import empirical_radius


def _eq12_literal(s, y, floor=0.0):
    "Eq 12 (+ `floor` inside the log) term by term in float64."
    s = s.double(); M, B, K = s.shape
    vals = []
    for i in range(B):
        tot = sum(sum(math.exp(s[m, i, k]) for k in range(K) if k != y[i]) / math.exp(s[m, i, y[i]]) for m in range(M))
        vals.append(math.log(tot + floor))
    return sum(vals) / B


def _official_literal(s, y):
    "The authors' L1: log(Σ_m(Σ_k e^{s_k} e^{-s_y} − 1) + 1e-5), float64."
    s = s.double(); M, B, K = s.shape
    vals = [math.log(sum(sum(math.exp(s[m, i, k]) for k in range(K)) * math.exp(-s[m, i, y[i]]) - 1 for m in range(M)) + 1e-5)
            for i in range(B)]
    return sum(vals) / B


@pytest.mark.parametrize('M', [2, 3])
@pytest.mark.parametrize('scale', [0.1, 1.0, 5.0])
def test_margin_loss_equals_eq12(M, scale):
    g = torch.Generator().manual_seed(M)
    for _ in range(3):
        s = torch.randn(M, 7, 6, generator=g) * scale; y = torch.randint(0, 6, (7,), generator=g)
        lit = _eq12_literal(s, y)
        fct.test_close(margin_loss(s, y, floor=None).item(), lit, eps=1e-5)           # the unbounded option = Eq 12
        fct.test_close(margin_loss(s, y, floor=0).item(), lit, eps=1e-5)
        fct.test_close(margin_loss(list(s), y, floor=None).item(), lit, eps=1e-5)     # a sequence of (B,K)
        # the default: Eq 12 with the floor 1e-5 inside the log, exact in float64
        fct.test_close(margin_loss(s.double(), y).item(), _eq12_literal(s, y, 1e-5), eps=1e-10)
        fct.test_close(margin_loss(s.double(), y, floor=0.3).item(), _eq12_literal(s, y, 0.3), eps=1e-10)
        fct.test_close(margin_loss(s, y, official=True).item(), _official_literal(s, y), eps=1e-4)
        # the official form is the default (floor 1e-5) up to fp32 cancellation; both differ from Eq 12 by the floor
        fct.test_close(margin_loss(s, y, official=True).item(), margin_loss(s, y).item(), eps=1e-4)
        fct.test_close(margin_loss(s, y, official=True).item(), lit, eps=1e-3 if scale < 5 else 1e-2)


def test_margin_loss_stable_and_differentiable():
    g = torch.Generator().manual_seed(0)
    for sign in (1, -1):
        s = (torch.randn(2, 8, 5, generator=g).sign() * 1e4 * sign).requires_grad_(True)
        y = torch.randint(0, 5, (8,), generator=g)
        loss = margin_loss(s, y)
        assert torch.isfinite(loss)
        loss.backward(); assert torch.isfinite(s.grad).all()
    s = torch.tensor([[[1e4, -1e4, 0.]], [[-1e4, 1e4, 5.]]])
    fct.test_close(margin_loss(s, torch.tensor([0])).item(), 2e4, eps=1e-2)          # log e^{2e4} + ...
    assert not torch.isfinite(margin_loss(s, torch.tensor([0]), official=True))       # the naive exp overflows
    # monotone: increasing the true class score lowers L1
    s = torch.randn(2, 4, 5, generator=g); y = torch.tensor([0, 1, 2, 3]); s2 = s.clone()
    s2[:, torch.arange(4), y] += 1.0
    assert margin_loss(s2, y) < margin_loss(s, y)


@pytest.mark.parametrize('floor', [1e-5, 1e-2])
def test_margin_loss_bounded_below_by_log_floor(floor):
    "The default L1 is ≥ log(floor) for any scores, reaches it for large margins, finite with finite grads at ±1e4."
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 30.0, 1e4):
        s = (torch.randn(2, 16, 6, generator=g) * scale).requires_grad_(True); y = torch.randint(0, 6, (16,), generator=g)
        for f in (margin_loss, lambda s, y, floor: margin_loss_mix(s, y, y.roll(1), 0.3, floor)):
            loss = f(s, y, floor=floor)
            assert torch.isfinite(loss) and loss >= math.log(floor) - 1e-5, (scale, loss.item())
            s.grad = None; loss.backward(); assert torch.isfinite(s.grad).all()
    sep = torch.full((2, 4, 5), -1e4); y = torch.arange(4)
    sep[:, torch.arange(4), y] = 1e4                                                     # every margin 2e4
    sep.requires_grad_(True)
    per = margin_loss(sep, y, floor=floor)
    fct.test_close(per.item(), math.log(floor), eps=1e-6); per.backward()
    assert torch.isfinite(sep.grad).all() and sep.grad.abs().max() < 1e-6               # flat at the floor
    assert margin_loss(sep, y, floor=None) < -1e4                                        # Eq 12 keeps falling
    fct.test_fail(lambda: margin_loss(sep, y, floor=-1e-5), contains='floor must be None or a finite number >= 0')
    fct.test_fail(lambda: margin_loss_mix(sep, y, y, 0.5, floor=float('nan')), contains='floor must be')


def test_margin_loss_model_output_and_errors():
    torch.manual_seed(0)
    m = joint_model([(6,), (5,)], 4, head='orth').eval()
    out = m((torch.randn(3, 6), torch.randn(3, 5))); y = torch.tensor([0, 1, 2])
    fct.test_close(margin_loss(out, y), margin_loss(torch.stack(out.unimodal), y), eps=1e-7)
    fct.test_fail(lambda: margin_loss(torch.randn(3, 4), y), contains='M tensors of shape (B, K)')
    fct.test_fail(lambda: margin_loss(torch.randn(2, 3, 4), torch.tensor([0, 1])), contains='2 labels for a batch of 3')


def _mix_literal(s, ya, yb, lam, official, floor=0.0):
    s = s.double(); M, B, K = s.shape; vals = []
    for i in range(B):
        tot = 0.
        for m in range(M):
            t = lam * s[m, i, ya[i]] + (1 - lam) * s[m, i, yb[i]]
            if official:
                n = sum(math.exp(s[m, i, k]) for k in range(K)) - s[m, i, ya[i]] - (s[m, i, yb[i]] if ya[i] != yb[i] else 0)
            else:
                n = sum(math.exp(s[m, i, k]) for k in range(K) if k not in (ya[i], yb[i]))
            tot += n * math.exp(-t)
        vals.append(math.log(tot + floor) if tot + floor > 0 else -math.inf)
    return sum(vals) / B


@pytest.mark.parametrize('lam', [0.0, 0.3, 1.0])
def test_margin_loss_mix(lam):
    g = torch.Generator().manual_seed(int(lam * 10))
    s = torch.randn(2, 9, 5, generator=g); ya = torch.randint(0, 5, (9,), generator=g)
    yb = ya[torch.randperm(9, generator=g)]; yb[0] = ya[0]                           # include a same-target pair
    fct.test_close(margin_loss_mix(s, ya, yb, lam, floor=None).item(), _mix_literal(s, ya, yb, lam, False), eps=1e-5)
    fct.test_close(margin_loss_mix(s.double(), ya, yb, lam).item(), _mix_literal(s, ya, yb, lam, False, 1e-5), eps=1e-10)
    fct.test_close(margin_loss_mix(s, ya, yb, lam, official=True).item(), _mix_literal(s, ya, yb, lam, True), eps=1e-5)
    fct.test_close(margin_loss_mix(s, ya, ya, lam), margin_loss(s, ya), eps=1e-6)    # same targets → L1 (same floor)
    fct.test_close(margin_loss_mix(s, ya, ya, lam, floor=None), margin_loss(s, ya, floor=None), eps=1e-6)
    # the official form differs from the intended one (it subtracts logits, not exp(logits))
    assert abs(margin_loss_mix(s, ya, yb, lam, official=True) - margin_loss_mix(s, ya, yb, lam)) > 1e-3
    big = torch.randn(2, 9, 5, generator=g) * 1e4
    assert torch.isfinite(margin_loss_mix(big, ya, yb, lam))
    # per-sample λ
    lams = torch.rand(9, generator=g)
    per = torch.stack([margin_loss_mix(s[:, i:i + 1], ya[i:i + 1], yb[i:i + 1], lams[i]) for i in range(9)]).mean()
    fct.test_close(margin_loss_mix(s, ya, yb, lams), per, eps=1e-6)


def _r_literal(a, b, s, y, tau, j, abs_a):
    "Eq 10 per sample, written out with loops (float64)."
    a, b, s, tau = a.double(), b.double(), s.double(), tau.double(); M, B, K = s.shape
    h = (a[:, None, :] * s).sum(0) + b
    out = []
    for i in range(B):
        yi = int(y[i]); rs = {}
        for jj in range(K):
            if jj == yi: continue
            num = sum(a[m, yi] * s[m, i, yi] - a[m, jj] * s[m, i, jj] for m in range(M)) + b[yi] - b[jj]
            aa = a.abs() if abs_a else a
            den = math.sqrt(sum((aa[m, yi] * tau[m, yi] + aa[m, jj] * tau[m, jj]) ** 2 for m in range(M)))
            rs[jj] = num / den
        if j == 'min': out.append(min(rs.values()))
        else:
            runner = max((k for k in range(K) if k != yi), key=lambda k: h[i, k])
            out.append(rs[runner])
    return torch.tensor(out), h.argmax(1) == y


@pytest.mark.parametrize('M', [2, 3])
def test_bound_loss_matches_eq10(M):
    torch.manual_seed(M)
    shapes = [(6,), (5,), (4,)][:M]
    m = joint_model(shapes, 4, head='orth', d_feat=8).eval()
    with torch.no_grad(): m.a.copy_(torch.randn(M, 4)); m.bias.copy_(torch.randn(4))    # some a < 0
    xs = tuple(torch.randn(20, *s) for s in shapes); y = torch.randint(0, 4, (20,))
    with torch.no_grad(): cached = m(xs).unimodal
    s = torch.stack(cached); tau = torch.rand(M, 4) + 0.1
    for j, samples, abs_a in itertools.product(('runner_up', 'min'), ('all', 'correct'), (True, False)):
        r, ok = _r_literal(m.a.detach(), m.bias.detach(), s, y, tau, j, abs_a)
        ref = -(r[ok].mean() if samples == 'correct' else r.mean())
        got = bound_loss(m, cached, y, tau, j=j, samples=samples, abs_a=abs_a)
        fct.test_close(got.item(), ref.item(), eps=1e-5)
        fct.test_close(bound_loss((m.a, m.bias), s, y, tau, j=j, samples=samples, abs_a=abs_a), got, eps=1e-7)
    # the min-j, |a| variant is the empirical radius of bounds with the same τ̃
    fct.test_close(bound_loss(m, cached, y, tau, j='min'), -empirical_radius(m, xs, y, tau).mean(), eps=1e-5)
    # runner-up j never gives a smaller bound than the min over j
    assert bound_loss(m, cached, y, tau) <= bound_loss(m, cached, y, tau, j='min') + 1e-6


def test_bound_loss_step2_gradients_only_reach_a():
    torch.manual_seed(0)
    m = joint_model([(6,), (5,)], 4, head='orth', d_feat=8)
    xs = (torch.randn(16, 6), torch.randn(16, 5)); y = torch.randint(0, 4, (16,))
    out = m(xs)                                                     # NOT detached: bound_loss detaches the scores
    loss = bound_loss(m, out, y, torch.rand(2, 4) + 0.1)
    loss.backward()
    assert m.a.grad is not None and m.a.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if n != 'a'), [n for n, p in m.named_parameters() if p.grad is not None]
    # a few SGD steps on a with cached scores increase the mean bound
    with torch.no_grad(): cached = tuple(u.clone() for u in m(xs).unimodal)
    tau = torch.rand(2, 4) + 0.1
    opt = torch.optim.SGD([m.a], lr=0.05)
    before = bound_loss(m, cached, y, tau).item()
    for _ in range(20):
        opt.zero_grad(); l = bound_loss(m, cached, y, tau); l.backward(); opt.step()
    assert bound_loss(m, cached, y, tau).item() < before


def test_bound_loss_errors_and_edge_cases():
    torch.manual_seed(0)
    m = joint_model([(6,), (5,)], 4, head='orth', d_feat=8)
    s = torch.randn(2, 5, 4); y = torch.randint(0, 4, (5,))
    fct.test_fail(lambda: bound_loss(m, s, y, torch.ones(2, 4), j='closest'), contains="'runner_up' or 'min'")
    fct.test_fail(lambda: bound_loss(m, s, y, torch.ones(2, 4), samples='some'), contains="'all' or 'correct'")
    fct.test_fail(lambda: bound_loss(m, s, y, torch.ones(3, 4)), contains='tau must be (M, K)')
    # no correctly classified sample → 0, still differentiable
    with torch.no_grad(): h = (m.a[:, None] * s).sum(0) + m.bias
    wrong = (h.argmax(1) + 1) % 4
    l = bound_loss(m, s, wrong, torch.ones(2, 4), samples='correct')
    fct.test_eq(l.item(), 0.0); l.backward()
    # τ ≡ 0 (e.g. the official get_lip for audio AND a zero visual row) does not produce NaN
    assert torch.isfinite(bound_loss(m, s, y, torch.zeros(2, 4)))
