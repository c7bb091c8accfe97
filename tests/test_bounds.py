"""Property tests of crmt_nb.bounds: margin identity, exactness on linear encoders, soundness of the certified radius
against a strong local l2-PGD, soundness/tightness of lipschitz_upper, empirical_lipschitz against a per-class loop."""
import math, itertools
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from crmt_nb.models import JointModel, MLP, SmallCNN, joint_model
from crmt_nb.bounds import (margins, integration_factors, certified_radius, unimodal_certified_radius,
                            empirical_lipschitz, empirical_radius, lipschitz_upper, vulnerability, pair_factors)
from crmt_nb.lipschitz import conv_norm_upper, conv_as_matrix

HEADS = [('concat', 'rownorm'), ('orth', 'rownorm'), ('orth', 'orthonormal')]


def _randomise_bn(model, g):
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.running_mean.normal_(generator=g).mul_(0.1); mod.running_var.uniform_(0.05, 2.0, generator=g)
                mod.weight.uniform_(0.5, 2.0, generator=g).mul_(torch.randint(0, 2, mod.weight.shape, generator=g) * 2 - 1)
                mod.bias.normal_(generator=g).mul_(0.1)


def _model(shapes, K, head, orth, g, d_feat=6):
    encs = [MLP(s[0], d_feat, hidden=(12,)) if len(s) == 1 else SmallCNN(s[0], d_feat, width=3) for s in shapes]
    m = JointModel(encs, [d_feat] * len(shapes), K, head=head, orth=orth)
    _randomise_bn(m, g)
    if head == 'orth':
        with torch.no_grad(): m.a.copy_(torch.randn(m.a.shape, generator=g))     # include negative weights
    return m.eval()


def _inputs(shapes, B, g):
    return tuple(torch.randn(B, *s, generator=g) for s in shapes)


# ---------------------------------------------------------------- Def 3.2 / Eq 3
@pytest.mark.parametrize('head,orth', HEADS)
@pytest.mark.parametrize('M', [2, 3])
def test_margin_identity(head, orth, M):
    g = torch.Generator().manual_seed(10 + M)
    shapes = [(1, 6, 6), (7,), (5,)][:M]
    for trial in range(3):
        m = _model(shapes, 5, head, orth, g, d_feat=6)
        xs = _inputs(shapes, 12, g); y = torch.randint(0, 5, (12,), generator=g)
        with torch.no_grad():
            out = m(xs); z = margins(m, xs, y); c, beta = integration_factors(m, y)
        fct.test_eq(z.shape, (12, M, 5)); fct.test_eq(c.shape, (12, M, 5)); fct.test_eq(beta.shape, (12, 5))
        h = out.logits
        fct.test_close((c * z).sum(1) + beta, h.gather(1, y[:, None]) - h, eps=1e-5)
        # per-modality contribution: concat → (W_y − W_k)φ ; orth → a_y s_y − a_k s_k
        a = m.integration.detach()
        for mm, s in enumerate(out.unimodal):
            ref = a[mm][y] * s.gather(1, y[:, None])[:, 0]
            ref = ref[:, None] - a[mm][None] * s
            fct.test_close(c[:, mm] * z[:, mm], ref, eps=1e-5)
        if head == 'concat':                                         # c = ‖W_y − W_k‖ literally
            W = m.head_weights()
            for mm in range(M):
                lit = (W[mm][y][:, None, :] - W[mm][None]).norm(dim=-1)
                fct.test_close(c[:, mm], lit.detach(), eps=1e-5)
        fct.test_eq(z[torch.arange(12), :, y], torch.zeros(12, M))


# ---------------------------------------------------------------- linear encoders: exact distance
def _linear_model(dims, K, head, orth, g, d_feat=6):
    encs = [nn.Linear(d, d_feat) for d in dims]
    m = JointModel(encs, [d_feat] * len(dims), K, head=head, orth=orth)
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if head == 'orth': m.a.copy_(torch.randn(m.a.shape, generator=g))
    return m.eval()


def _exact_distance(m, xs, y):
    "Closed-form distance to the decision boundary of a model affine in the joint input."
    with torch.no_grad():
        h = m(xs).logits
        G = [(a[:, None] * w) @ e.weight for a, w, e in zip(m.integration, m.head_weights(), m.encoders)]
        eta = torch.stack([(Gm[:, None] - Gm[None]).norm(dim=-1) for Gm in G])          # (M,K,K) exact per pair
        gj = h.gather(1, y[:, None]) - h
        den = eta[:, y, :].pow(2).sum(0).sqrt()
        r = (gj / den).masked_fill(F.one_hot(y, h.shape[1]).bool(), math.inf).min(1).values
    return r, eta


@pytest.mark.parametrize('head,orth', HEADS)
@pytest.mark.parametrize('M', [2, 3])
def test_linear_encoders_exact(head, orth, M):
    g = torch.Generator().manual_seed(20 + M)
    dims = [5, 4, 3][:M]
    for trial in range(3):
        m = _linear_model(dims, 4, head, orth, g)
        xs = tuple(torch.randn(16, d, generator=g) for d in dims)
        y = m(xs).logits.argmax(1)
        exact, eta = _exact_distance(m, xs, y)
        L = [lipschitz_upper(e, (d,)) for e, d in zip(m.encoders, dims)]
        for e, l in zip(m.encoders, L): fct.test_close(l, torch.linalg.matrix_norm(e.weight.double(), 2).item(), eps=1e-9)
        for tight in (False, True):
            r = certified_radius(m, xs, y, L, tight=tight)
            assert (r <= exact * (1 + 1e-5) + 1e-6).all(), (r, exact)
        fct.test_close(certified_radius(m, xs, y, eta), exact, eps=1e-5)       # Thm 3.3 with exact constants
        # uni-modal exact distance (Prop 3.4 with exact constants)
        for mm in range(M):
            with torch.no_grad():
                h = m(xs).logits; gj = h.gather(1, y[:, None]) - h
                ru = (gj / eta[mm][y]).masked_fill(F.one_hot(y, 4).bool(), math.inf).min(1).values
            fct.test_close(unimodal_certified_radius(m, xs, y, eta, mm), ru, eps=1e-5)
            assert (unimodal_certified_radius(m, xs, y, L, mm) <= ru * (1 + 1e-5) + 1e-6).all()
        # wrong labels: ≤ 0
        assert (certified_radius(m, xs, (y + 1) % 4, L) <= 0).all()
        # the attack used below reaches the boundary just outside the exact distance (attack strength check)
        if trial == 0 and M == 2:
            flipped = _pgd_flips(m, xs, y, exact * 1.02, steps=60, restarts=1)
            assert flipped.all(), flipped


# ---------------------------------------------------------------- soundness vs a strong local l2-PGD
def _pgd_flips(model, xs, y, eps, steps=60, restarts=2, modalities=None, g=None):
    """Per-sample-budget joint l2-PGD, all runs in one batch: the untargeted CW margin from x and from `restarts − 1`
    random starts, and the targeted margin h_y − h_j from x for every class j. True where any iterate of any run
    changes the prediction."""
    B = y.shape[0]; idx = list(range(len(xs))) if modalities is None else list(modalities)
    K = model(xs).logits.shape[1]
    runs = [(None, False)] + [(None, True)] * (restarts - 1) + [(j, False) for j in range(K)]
    R = len(runs)
    X = tuple(x.repeat(R, *[1] * (x.dim() - 1)) for x in xs)
    Y = y.repeat(R); E = eps.clamp_min(0).detach().repeat(R)
    T = torch.tensor([-1 if t is None else t for t, _ in runs]).repeat_interleave(B)
    T = torch.where(T == Y, -1, T)                                   # target = own class → untargeted
    rand = torch.tensor([r for _, r in runs]).repeat_interleave(B)
    shp = lambda t, x: t.reshape(-1, *[1] * (x.dim() - 1))
    delta = [torch.zeros_like(x) for x in X]
    for i in idx: delta[i] = torch.randn(X[i].shape, generator=g)
    n = torch.sqrt(sum(delta[i].flatten(1).pow(2).sum(1) for i in idx)).clamp_min(1e-12)
    scale = E * torch.rand(len(Y), generator=g) * rand
    for i in idx: delta[i] = delta[i] / shp(n, X[i]) * shp(scale, X[i])
    flipped = torch.zeros(len(Y), dtype=torch.bool)
    own = F.one_hot(Y, K).bool(); Tc = T.clamp_min(0)
    for t in range(steps + 1):
        ds = [d.clone().requires_grad_(i in idx) for i, d in enumerate(delta)]
        h = model(tuple(x + d for x, d in zip(X, ds))).logits
        hy = h.gather(1, Y[:, None])[:, 0]
        marg = hy - h.masked_fill(own, -math.inf).max(1).values
        flipped |= (marg <= 0).detach()
        if t == steps: break
        obj = torch.where(T < 0, marg, hy - h.gather(1, Tc[:, None])[:, 0])
        grads = torch.autograd.grad(-obj.sum(), [ds[i] for i in idx])
        alpha = 2.5 * E / steps * (1 if t < steps // 2 else 0.4)
        gn = torch.sqrt(sum(gr.flatten(1).pow(2).sum(1) for gr in grads)).clamp_min(1e-12)
        for i, gr in zip(idx, grads): delta[i] = delta[i] + gr / shp(gn, gr) * shp(alpha, gr)
        n = torch.sqrt(sum(delta[i].flatten(1).pow(2).sum(1) for i in idx)).clamp_min(1e-12)
        f = (E / n).clamp(max=1)
        for i in idx: delta[i] = delta[i] * shp(f, delta[i])
    return flipped.reshape(R, B).any(0)


def test_certified_radius_sound_against_pgd():
    g = torch.Generator().manual_seed(123)
    n_models = 0; n_cert = 0
    for (head, orth), M, trial in itertools.product(HEADS[:2] + [HEADS[2]], [2, 3], range(4)):
        if head == 'orth' and orth == 'orthonormal' and trial > 1: continue
        shapes = [(1, 6, 6), (6,), (5,)][:M] if trial % 2 == 0 else [(6,), (5,), (4,)][:M]
        m = _model(shapes, 4, head, orth, g, d_feat=6)
        with torch.no_grad():
            for e in m.encoders:                                    # larger weights → larger logit gaps
                for mod in e.modules():
                    if isinstance(mod, (nn.Linear, nn.Conv2d)): mod.weight.mul_(2.0)
        xs = _inputs(shapes, 16, g)
        y = m(xs).logits.argmax(1).detach()
        L = [lipschitz_upper(e, s) for e, s in zip(m.encoders, shapes)]
        r = certified_radius(m, xs, y, L)
        assert (r > 0).all()
        n_models += 1; n_cert += int((r > 0).sum())
        flipped = _pgd_flips(m, xs, y, 0.99 * r, steps=50, restarts=2, g=g)
        assert not flipped.any(), f'{head}/{orth} M={M}: PGD inside 0.99×certified radius changed {int(flipped.sum())} predictions'
        ru = unimodal_certified_radius(m, xs, y, L, modality=0)
        assert (ru >= r - 1e-6).all()                              # attacking fewer modalities can only be harder
        flipped = _pgd_flips(m, xs, y, 0.99 * ru, steps=50, restarts=1, modalities=[0], g=g)
        assert not flipped.any()
    assert n_models >= 20 and n_cert >= 20 * 16


def _orth_relu_model(M, K, head, orth, g, d=6):
    "ReLU encoders from scaled orthogonal layers with positive biases: locally linear, and the bound is nearly exact."
    encs = []
    for _ in range(M):
        layers, shift = [], torch.zeros(d)
        for _ in range(2):                                    # pre-activations = (product of layers) x + 20 > 0
            lin = nn.Linear(d, d)
            with torch.no_grad():
                q = torch.linalg.qr(torch.randn(d, d, generator=g)).Q * (0.5 + 1.5 * torch.rand(1, generator=g))
                lin.weight.copy_(q); lin.bias.copy_(20.0 - q @ shift); shift = torch.full((d,), 20.0)
            layers += [lin, nn.ReLU()]
        encs.append(nn.Sequential(*layers))
    m = JointModel(encs, [d] * M, K, head=head, orth=orth)
    with torch.no_grad():
        if head == 'orth': m.a.copy_(torch.randn(m.a.shape, generator=g))
        m.bias.zero_(); m.bias.copy_(-m(tuple(torch.zeros(1, d) for _ in range(M))).logits[0])   # logits(0) = 0
    return m.eval()


@pytest.mark.parametrize('head,orth', HEADS)
def test_certified_radius_nearly_tight(head, orth):
    "On locally linear models the certificate is nearly exact: PGD at 0.99 r never flips, PGD at 1.05 r mostly does."
    g = torch.Generator().manual_seed(77)
    for M in (2, 3):
        m = _orth_relu_model(M, 4, head, orth, g)
        xs = tuple(torch.randn(24, 6, generator=g) * 0.5 for _ in range(M))
        y = m(xs).logits.argmax(1)
        L = [lipschitz_upper(e, (6,)) for e in m.encoders]
        r = certified_radius(m, xs, y, L, tight=True)
        assert (r >= certified_radius(m, xs, y, L) - 1e-6).all()          # tight form ≥ the Thm 3.5 form
        assert not _pgd_flips(m, xs, y, 0.99 * r, steps=50, restarts=2, g=g).any()
        assert _pgd_flips(m, xs, y, 1.05 * r, steps=50, restarts=2, g=g).float().mean() >= 0.5
        ru = unimodal_certified_radius(m, xs, y, L, 1, tight=True)
        assert not _pgd_flips(m, xs, y, 0.99 * ru, steps=50, restarts=1, modalities=[1], g=g).any()
        assert _pgd_flips(m, xs, y, 1.05 * ru, steps=50, restarts=1, modalities=[1], g=g).float().mean() >= 0.5


# ---------------------------------------------------------------- vulnerability / radius plumbing
def test_vulnerability_forms():
    g = torch.Generator().manual_seed(5)
    m = _model([(6,), (5,)], 4, 'orth', 'rownorm', g)
    L = torch.tensor([2.0, 0.5]); a = m.integration.detach().abs()
    eta = vulnerability(m, L)
    fct.test_eq(eta.shape, (2, 4, 4)); fct.test_eq(torch.diagonal(eta, dim1=1, dim2=2), torch.zeros(2, 4))
    lit = (a[:, :, None] + a[:, None, :]) * L[:, None, None]
    fct.test_close(eta, lit.double().masked_fill(torch.eye(4, dtype=torch.bool), 0), eps=1e-6)
    tight = vulnerability(m, L, tight=True)
    assert (tight <= eta + 1e-9).all()                              # triangle inequality
    fct.test_close(tight, pair_factors(m) * L[:, None, None], eps=1e-9)
    tau = torch.rand(2, 4, generator=g)
    fct.test_close(vulnerability(m, tau), ((a * tau)[:, :, None] + (a * tau)[:, None, :]).double().masked_fill(torch.eye(4, dtype=torch.bool), 0), eps=1e-6)
    mc = _model([(6,), (5,)], 4, 'concat', 'rownorm', g)
    fct.test_close(vulnerability(mc, L), pair_factors(mc) * L[:, None, None], eps=1e-9)
    fct.test_fail(lambda: vulnerability(m, torch.ones(3)), contains='must have shape')
    fct.test_fail(lambda: vulnerability(m, -torch.ones(2)), contains='>= 0')


def test_radius_nonpositive_when_misclassified():
    g = torch.Generator().manual_seed(6)
    m = _model([(6,), (5,)], 5, 'concat', 'rownorm', g)
    xs = _inputs([(6,), (5,)], 32, g)
    y = torch.randint(0, 5, (32,), generator=g)
    pred = m(xs).logits.argmax(1)
    L = [lipschitz_upper(e, s) for e, s in zip(m.encoders, [(6,), (5,)])]
    for r in (certified_radius(m, xs, y, L), unimodal_certified_radius(m, xs, y, L, 1),
              empirical_radius(m, xs, y, torch.rand(2, 5, generator=g))):
        assert (r[pred != y] <= 0).all() and (r[pred == y] > 0).all()


# ---------------------------------------------------------------- lipschitz_upper
def _power_gain(f, x, iters=25, g=None):
    "Power iteration on J(x)^T J(x) with double-backward JVPs: a lower estimate of ‖J(x)‖₂."
    v = torch.randn(x.shape, generator=g)
    for _ in range(iters):
        v = v / v.norm()
        xx = x.clone().requires_grad_(True); out = f(xx)
        w = torch.zeros_like(out, requires_grad=True)
        jt_w, = torch.autograd.grad(out, xx, w, create_graph=True)
        jv, = torch.autograd.grad(jt_w, w, v)                        # J v
        v, = torch.autograd.grad(out, xx, jv)                        # J^T J v
    return (jv.norm()).item()


def _ratio_ascent(f, x, steps=40, g=None):
    "Maximise ‖f(x) − f(x')‖/‖x − x'‖ over x' by gradient ascent (lower estimate of Lip f)."
    d = (torch.randn(x.shape, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([d], lr=0.02); best = 0.
    for _ in range(steps):
        ratio = (f(x + d) - f(x)).norm() / d.norm()
        best = max(best, ratio.item()); opt.zero_grad(); (-ratio).backward(); opt.step()
    return best


def _found_gain(mod, shape, g, points=3):
    mod = mod.eval()
    f = lambda t: mod(t[None])[0]
    best = 0.
    for _ in range(points):
        x = torch.randn(shape, generator=g)
        best = max(best, _power_gain(f, x, g=g), _ratio_ascent(f, x, g=g))
    return best


@pytest.mark.parametrize('cfg', [
    dict(cls=nn.Conv2d, args=(3, 6, 3), kw=dict(stride=1, padding=1), shape=(3, 8, 8)),
    dict(cls=nn.Conv2d, args=(4, 6, 3), kw=dict(stride=2, padding=1), shape=(4, 9, 9)),
    dict(cls=nn.Conv2d, args=(2, 4, 5), kw=dict(stride=2, padding=2), shape=(2, 10, 10)),
    dict(cls=nn.Conv2d, args=(2, 5, 7), kw=dict(stride=2, padding=3), shape=(2, 12, 12)),
    dict(cls=nn.Conv2d, args=(3, 4, 1), kw=dict(stride=2, padding=0), shape=(3, 7, 7)),
    dict(cls=nn.Conv2d, args=(3, 4, 3), kw=dict(stride=1, padding=0), shape=(3, 8, 7)),
    dict(cls=nn.Conv2d, args=(4, 6, 3), kw=dict(stride=1, padding=2, dilation=2), shape=(4, 8, 8)),
    dict(cls=nn.Conv2d, args=(4, 6, 3), kw=dict(stride=1, padding=1, groups=2), shape=(4, 8, 8)),
    dict(cls=nn.Conv2d, args=(3, 4, 3), kw=dict(stride=1, padding='same'), shape=(3, 6, 6)),
    dict(cls=nn.Conv1d, args=(3, 4, 3), kw=dict(stride=2, padding=1), shape=(3, 16)),
    dict(cls=nn.Conv3d, args=(2, 3, 3), kw=dict(stride=(1, 2, 2), padding=1), shape=(2, 4, 6, 6)),
])
def test_conv_upper_vs_exact(cfg):
    g = torch.Generator().manual_seed(7)
    conv = cfg['cls'](*cfg['args'], **cfg['kw'])
    with torch.no_grad(): conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / 3)
    A = conv_as_matrix(conv, cfg['shape'])
    exact = torch.linalg.matrix_norm(A, 2).item()
    ub = lipschitz_upper(conv, cfg['shape'])
    assert exact <= ub * (1 + 1e-9), (exact, ub)
    assert ub <= 1.5 * exact, (exact, ub)                             # tight for single layers
    assert _found_gain(conv, cfg['shape'], g, points=1) <= ub * (1 + 1e-5)
    # with a BatchNorm folded in (eval mode)
    d = len(cfg['shape']) - 1
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d](conv.out_channels)
    _randomise_bn(bn, g)
    seq = nn.Sequential(conv, bn).eval()
    sc = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    nout = A.shape[0] // conv.out_channels
    exact_bn = torch.linalg.matrix_norm(A * sc.repeat_interleave(nout)[:, None], 2).item()
    ub_bn = lipschitz_upper(seq, cfg['shape'])
    assert exact_bn <= ub_bn * (1 + 1e-9) and ub_bn <= 1.5 * exact_bn, (exact_bn, ub_bn)
    assert ub_bn <= ub * sc.abs().max().item() * (1 + 1e-9)          # folding is never looser than the product


def test_reshaped_kernel_norm_is_not_a_bound():
    "The reason for conv_norm_upper: the spectral_norm-style reshaped kernel norm underestimates the operator."
    g = torch.Generator().manual_seed(8)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad(): conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    exact = torch.linalg.matrix_norm(conv_as_matrix(conv, (3, 12, 12)), 2).item()
    assert torch.linalg.matrix_norm(conv.weight.detach().flatten(1), 2).item() < exact <= lipschitz_upper(conv, (3, 12, 12))


def test_linear_bn_pool_exact():
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(7, 5)
    fct.test_close(lipschitz_upper(lin, (7,)), torch.linalg.matrix_norm(lin.weight.double(), 2).item(), eps=1e-9)
    bn = nn.BatchNorm2d(4); _randomise_bn(bn, g)
    fct.test_close(lipschitz_upper(bn, (4, 5, 5)), (bn.weight.double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)).max().item(), eps=1e-9)
    bn1 = nn.BatchNorm1d(5); _randomise_bn(bn1, g)
    exact = torch.linalg.matrix_norm(lin.weight.double() * (bn1.weight.double() / torch.sqrt(bn1.running_var.double() + bn1.eps))[:, None], 2).item()
    fct.test_close(lipschitz_upper(nn.Sequential(lin, bn1), (7,)), exact, eps=1e-9)
    # pooling: exact operator norms of linear pools by materialisation
    for pool, shape in [(nn.AvgPool2d(2), (2, 6, 6)), (nn.AvgPool2d(3, 2, 1), (2, 7, 7)), (nn.AdaptiveAvgPool2d(1), (3, 5, 7)),
                        (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)), (nn.AvgPool3d((1, 2, 2)), (1, 2, 4, 4))]:
        n = math.prod(shape)
        A = pool(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1).t()
        exact = torch.linalg.matrix_norm(A, 2).item(); ub = lipschitz_upper(pool, shape)
        assert exact <= ub * (1 + 1e-9) and ub <= 1.5 * exact, (pool, exact, ub)
    fct.test_close(lipschitz_upper(nn.AdaptiveAvgPool2d(1), (3, 5, 7)), 1 / math.sqrt(35), eps=1e-12)
    # max pool with overlapping windows: the bound 2 is attained (one pixel in 4 windows)
    mp = nn.MaxPool2d(3, 2, 1)
    ub = lipschitz_upper(mp, (1, 8, 8)); fct.test_close(ub, 2.0, eps=1e-12)
    x = torch.zeros(1, 1, 8, 8); x2 = x.clone(); x2[0, 0, 1, 1] = 1.
    fct.test_close((mp(x2) - mp(x)).norm().item(), 2.0, eps=1e-6)
    fct.test_close(lipschitz_upper(nn.MaxPool2d(2), (1, 8, 8)), 1.0, eps=1e-12)


def test_residual_blocks_and_encoders_sound():
    tvr = pytest.importorskip('torchvision.models.resnet')
    g = torch.Generator().manual_seed(11)
    down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    mods = [(tvr.BasicBlock(4, 4), (4, 6, 6)),
            (tvr.BasicBlock(4, 6, stride=2, downsample=down), (4, 7, 7)),
            (tvr.Bottleneck(8, 2), (8, 5, 5)),
            (SmallCNN(1, 6, width=3), (1, 9, 8)),
            (MLP(6, 5, hidden=(8, 8)), (6,)),
            (nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten()), (1, 3, 5, 5))]
    for mod, shape in mods:
        _randomise_bn(mod, g)
        with torch.no_grad():
            for p in mod.parameters():
                if p.dim() > 1: p.mul_(2.0)
        ub = lipschitz_upper(mod, shape)
        found = _found_gain(mod, shape, g, points=2)
        assert 0 < found <= ub * (1 + 1e-5), (type(mod).__name__, found, ub)
    # the block bound is branch + skip
    blk = mods[0][0]
    br = lipschitz_upper(nn.Sequential(blk.conv1, blk.bn1, blk.relu, blk.conv2, blk.bn2), (4, 6, 6))
    fct.test_close(lipschitz_upper(blk, (4, 6, 6)), br + 1, eps=1e-9)
    # a whole torchvision ResNet (BasicBlock, one block per stage) runs and is finite; training flags are restored
    net = tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=8).train()
    ub = lipschitz_upper(net, (3, 32, 32))
    assert math.isfinite(ub) and ub > 0 and net.training and net.layer1[0].bn1.training


def test_lipschitz_upper_errors():
    fct.test_fail(lambda: lipschitz_upper(nn.TransformerEncoderLayer(8, 2), (4, 8)), contains='transformer')
    fct.test_fail(lambda: lipschitz_upper(nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2)), (8,)), contains='MultiheadAttention')
    fct.test_fail(lambda: lipschitz_upper(nn.LSTM(3, 4), (5, 3)), contains='module type LSTM')
    fct.test_fail(lambda: lipschitz_upper(nn.BatchNorm1d(3, track_running_stats=False), (3,)), contains='batch statistics')
    fct.test_fail(lambda: lipschitz_upper(nn.Conv2d(1, 2, 3, padding=1, padding_mode='circular'), (1, 5, 5)), contains='padding_mode')

    class Custom(nn.Module):                                         # the plug-in protocol
        def forward(self, x): return 3 * x
        def lipschitz_upper(self, input_shape): return 3.0
    fct.test_eq(lipschitz_upper(nn.Sequential(Custom(), nn.ReLU(), Custom()), (4,)), 9.0)


# ---------------------------------------------------------------- empirical_lipschitz
def _loop_reference(model, batches, pairs=False):
    "Per-class backward loop: τ̂[m,k] = max_i ‖∇_{x^(m)} s_k^(m)(x_i)‖ (pairs: ‖∇(a_y s_y − a_j s_j)‖)."
    model.eval(); M = len(batches[0][0]); K = model.n_classes; a = model.integration.detach()
    ref = torch.zeros(M, K, K) if pairs else torch.zeros(M, K)
    for xs, _ in batches:
        xs = tuple(x.clone().requires_grad_(True) for x in xs)
        uni = model(xs).unimodal
        for m in range(M):
            if pairs:
                for y_, j in itertools.product(range(K), range(K)):
                    if y_ == j: continue
                    gr, = torch.autograd.grad(a[m, y_] * uni[m][:, y_].sum() - a[m, j] * uni[m][:, j].sum(), xs[m], retain_graph=True)
                    ref[m, y_, j] = max(ref[m, y_, j], gr.flatten(1).norm(dim=1).max())
            else:
                for k in range(K):
                    gr, = torch.autograd.grad(uni[m][:, k].sum(), xs[m], retain_graph=True)
                    ref[m, k] = max(ref[m, k], gr.flatten(1).norm(dim=1).max())
    return ref


def _official_reference(model, batches):
    "A literal transcription of the authors' get_lip bookkeeping (crmt-spec §2.7), two modalities."
    model.eval(); K = model.n_classes; L = torch.zeros(2, K)
    for xs, _ in batches:
        xv, xa = (x.clone().requires_grad_(True) for x in xs)
        out = model(xv, xa).logits
        for t in range(K):
            out[:, t].sum().backward(retain_graph=True)
            for m, x in enumerate((xv, xa)):
                g = x.grad.clone()
                xa.grad.zero_()                                       # only audio zeroed, before it is read
                L[m, t] = max(L[m, t], g.flatten(1).norm(dim=1).max())
    return L


@pytest.mark.parametrize('head,orth', HEADS)
@pytest.mark.parametrize('M', [2, 3])
def test_empirical_lipschitz_matches_loop(head, orth, M):
    g = torch.Generator().manual_seed(30 + M)
    shapes = [(1, 6, 6), (7,), (5,)][:M]
    m = _model(shapes, 5, head, orth, g).train()                       # BN is put in eval by the function
    batches = [(_inputs(shapes, 6, g), torch.randint(0, 5, (6,), generator=g)) for _ in range(2)]
    tau = empirical_lipschitz(m, batches)
    assert m.training                                                   # mode restored
    ref = _loop_reference(m, batches)
    fct.test_close(tau, ref, eps=1e-5)
    fct.test_close(empirical_lipschitz(m, batches, class_chunk=2), ref, eps=1e-5)
    fct.test_close(empirical_lipschitz(m, [xs for xs, _ in batches]), ref, eps=1e-5)      # batches of xs only
    eta = empirical_lipschitz(m, batches, pairs=True)
    fct.test_close(eta, _loop_reference(m, batches, pairs=True), eps=1e-4)
    # the empirical radius is the formula with these numbers
    xs, y = batches[0]
    r1 = empirical_radius(m, xs, y, tau); r2 = empirical_radius(m, xs, y, eta)
    assert ((r2 >= r1 - 1e-5) | (r1 <= 0)).all()                       # pair gradients ≤ |a_y|τ_y + |a_j|τ_j


def test_empirical_lipschitz_official():
    g = torch.Generator().manual_seed(40)
    for head, orth in HEADS[:2]:
        shapes = [(1, 6, 6), (7,)]
        m = _model(shapes, 5, head, orth, g)
        batches = [(_inputs(shapes, 6, g), torch.randint(0, 5, (6,), generator=g)) for _ in range(2)]
        off = empirical_lipschitz(m, batches, official=True)
        fct.test_eq(off[1], torch.zeros(5))                            # τ(audio) ≡ 0
        fct.test_close(off, _official_reference(m, batches), eps=1e-5)
        assert not torch.allclose(off[0], empirical_lipschitz(m, batches)[0])
    m3 = _model([(7,), (5,), (4,)], 3, 'orth', 'rownorm', g)
    fct.test_fail(lambda: empirical_lipschitz(m3, [(_inputs([(7,), (5,), (4,)], 2, g), None)], official=True), contains='two-modality')
    fct.test_fail(lambda: empirical_lipschitz(m3, [(_inputs([(7,), (5,), (4,)], 2, g), None)], official=True, pairs=True), contains='pairs')
    fct.test_fail(lambda: empirical_lipschitz(m3, [torch.randn(2, 7)]), contains='wrap a single batch')


def _autograd_loop(model, batches, official=False):
    "Per-class loop over the scores empirical_lipschitz differentiates: Σ_m s^(m) (or the fused logits, official)."
    model.eval(); best = None
    for xs, _ in batches:
        xs = tuple(x.clone().requires_grad_(True) for x in xs)
        out = model(xs); S = out.logits if official else sum(out.unimodal)
        if best is None: best = torch.zeros(len(xs), S.shape[1])
        for c in range(S.shape[1]):
            obj = S[:, :c + 1].sum() if official else S[:, c].sum()
            for m, gr in enumerate(torch.autograd.grad(obj, xs, retain_graph=True, allow_unused=True, materialize_grads=True)):
                best[m, c] = max(best[m, c], gr.flatten(1).norm(dim=1).max())
    if official: best[1] = 0
    return best


@pytest.mark.parametrize('seed', range(6))
def test_empirical_lipschitz_fast_path_property(seed):
    "Random JointModels (MLP / 1- and 3-channel SmallCNN encoders of odd sizes, concat / orth heads, d_feat below and above K,"
    " M = 2, 3): the per-encoder fast path equals the per-class loop, the generic batched backward and itself in chunks."
    from unittest import mock
    import crmt_nb.bounds as bd
    g = torch.Generator().manual_seed(100 + seed)
    M = 2 + seed % 2
    pool = [(1, 7, 6), (3, 6, 6), (9,), (5,), (1, 5, 8)]
    shapes = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:M]]
    head, orth = HEADS[seed % 3]
    K = int(torch.randint(2, 8, (1,), generator=g)); d = int(torch.randint(3, 9, (1,), generator=g))
    if orth == 'orthonormal': d = max(d, K)
    m = _model(shapes, K, head, orth, g, d_feat=d)
    batches = [(_inputs(shapes, B, g), torch.randint(0, K, (B,), generator=g)) for B in (3, 5)]
    assert bd._per_encoder(m) and all(bd._transpose_program(e, x) is not None for e, x in zip(m.encoders, batches[0][0]))
    ref = _loop_reference(m, batches)
    tau = empirical_lipschitz(m, batches)
    fct.test_close(tau, ref, eps=1e-5)
    fct.test_close(empirical_lipschitz(m, batches, class_chunk=1), ref, eps=1e-5)
    with mock.patch.object(bd, '_per_encoder', lambda mm: False):                  # the generic path agrees
        fct.test_close(empirical_lipschitz(m, batches), ref, eps=1e-5)
    fct.test_close(empirical_lipschitz(m, batches, pairs=True), _loop_reference(m, batches, pairs=True), eps=1e-4)
    if M == 2:
        off = empirical_lipschitz(m, batches, official=True)
        fct.test_close(off, _official_reference(m, batches), eps=1e-5)
        fct.test_close(off, _autograd_loop(m, batches, official=True), eps=1e-5)


def test_empirical_lipschitz_fallbacks():
    "An encoder that is not piecewise linear (Tanh) uses autograd per encoder; the MMT (joint features) the generic path."
    import crmt_nb.bounds as bd
    from crmt_nb.models import small_mmt
    g = torch.Generator().manual_seed(7)
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU())
    m = JointModel([enc, SmallCNN(1, 5, width=3)], [5, 5], 4, head='orth')
    _randomise_bn(m, g)
    with torch.no_grad(): m.a.normal_(generator=g)
    batches = [(_inputs([(6,), (1, 6, 6)], 4, g), None)]
    assert bd._transpose_program(enc, batches[0][0][0]) is None
    fct.test_close(empirical_lipschitz(m, batches), _loop_reference(m, batches), eps=1e-5)
    fct.test_close(empirical_lipschitz(m, batches, pairs=True), _loop_reference(m, batches, pairs=True), eps=1e-4)
    fct.test_close(empirical_lipschitz(m, batches, official=True), _official_reference(m, batches), eps=1e-5)
    mmt = small_mmt([(1, 8, 8), (8,)], 3).eval()
    assert not bd._per_encoder(mmt)
    b2 = [(_inputs([(1, 8, 8), (8,)], 3, g), None)]
    fct.test_close(empirical_lipschitz(mmt, b2), _autograd_loop(mmt, b2), eps=1e-5)



def test_paper_resnet_encoders_sound():
    "The paper's ResNet-18 encoders of crmt_nb.paper_models (normalise, per-frame trunk, pool) get a finite sound bound."
    import crmt_nb.paper_models as cm
    g = torch.Generator().manual_seed(13)
    for modality, shape in [('visual', (3, 2, 32, 32))]:                 # ClipEncoder: normalise, per-frame trunk, 3-D pool
        enc = cm.resnet18_encoder(modality).eval()
        ub = lipschitz_upper(enc, shape)
        x = torch.randn(1, *shape, generator=g).requires_grad_(True); u = torch.randn(512, generator=g)
        found = torch.autograd.grad(enc(x)[0] @ (u / u.norm()), x)[0].norm().item()      # ≤ ‖J(x)‖₂
        assert math.isfinite(ub) and 0 < found <= ub, (modality, found, ub)


# ---------------------------------------------------------------- M > 2 (the theory is a sum over modalities)
def _padded(m2, extra_shapes, g):
    "An (2 + len(extra_shapes))-modality copy of `m2` whose extra modalities do not reach the logits (zero head rows / a)."
    shapes_enc = [MLP(s[0], 6, hidden=(12,)) for s in extra_shapes]
    m = JointModel(list(m2.encoders) + shapes_enc, [6] * (2 + len(extra_shapes)), m2.n_classes, head=m2.head, orth=m2.orth)
    with torch.no_grad():
        m.bias.copy_(m2.bias)
        for i, lin in enumerate(m.fcs):
            if m.orth == 'orthonormal':                                  # W̃ is a parametrisation: copy the raw weight
                lin.parametrizations.weight.original.copy_(m2.fcs[i].parametrizations.weight.original if i < 2 else torch.randn_like(lin.parametrizations.weight.original))
            else: lin.weight.copy_(m2.fcs[i].weight if i < 2 else torch.zeros_like(lin.weight))
        if m.head == 'orth': m.a.copy_(torch.cat([m2.a, torch.zeros(len(extra_shapes), m2.n_classes)]))
    return m.eval()


@pytest.mark.parametrize('head,orth', HEADS)
@pytest.mark.parametrize('M', [3, 4, 5, 6])
def test_bounds_general_in_M(head, orth, M):
    "M = 3..6: η̂ (pairs) and τ̂ match the brute-force loop; a 2-modality model padded with silent modalities keeps its η and radii."
    g = torch.Generator().manual_seed(50 + M)
    shapes = [(7,), (5,), (4,), (6,), (3,), (8,)][:M]
    m = _model(shapes, 4, head, orth, g)
    batches = [(_inputs(shapes, 5, g), torch.randint(0, 4, (5,), generator=g))]
    fct.test_close(empirical_lipschitz(m, batches, pairs=True), _loop_reference(m, batches, pairs=True), eps=1e-4)
    fct.test_close(empirical_lipschitz(m, batches), _loop_reference(m, batches), eps=1e-5)
    m2 = _model(shapes[:2], 4, head, orth, g); mp = _padded(m2, shapes[2:], g)
    xs = _inputs(shapes, 16, g); y = m2(xs[:2]).logits.argmax(1)
    fct.test_close(mp(xs).logits, m2(xs[:2]).logits, eps=1e-5)
    eta2, etap = (empirical_lipschitz(mm, [(x, y)], pairs=True) for mm, x in ((m2, xs[:2]), (mp, xs)))
    fct.test_close(etap[:2], eta2, eps=1e-5); fct.test_eq(etap[2:], torch.zeros_like(etap[2:]))
    L = [lipschitz_upper(e, s) for e, s in zip(mp.encoders, shapes)]
    fct.test_close(certified_radius(mp, xs, y, L, tight=True), certified_radius(m2, xs[:2], y, L[:2], tight=True), eps=1e-5)
    for k in range(M):                                                  # uni-modal radius: ∞ on a silent modality
        r = unimodal_certified_radius(mp, xs, y, L, k, tight=True)
        if k >= 2: assert torch.isinf(r).all()
        else: fct.test_close(r, unimodal_certified_radius(m2, xs[:2], y, L[:2], k, tight=True), eps=1e-5)
