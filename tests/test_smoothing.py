"""Randomized smoothing (crmt_nb.smoothing): exact statistics, closed-form radii of linear models, statistical soundness
against PGD on the smoothed classifier, abstention, determinism, and the noise-augmented training methods."""
import math, pytest, numpy as np, scipy.stats, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from crmt_nb.smoothing import (ABSTAIN, certify, predict, class_counts, clopper_pearson_lower, binomial_pvalue,
                               certified_accuracy, gaussian_noise, noise_sigmas, modality_scales)
from crmt_nb.models import joint_model
from crmt_nb.attacks import pgd_l2
from crmt_nb.data import mfeat
from crmt_nb.experiment import train_config, train_model
from crmt_nb.core import num_threads


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models: one thread is faster than two (and much faster on a loaded machine)."
    with num_threads(1): yield


def test_clopper_pearson_equals_scipy():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 5000)); k = int(rng.integers(0, n + 1)); a = float(10 ** rng.uniform(-5, -0.5))
        ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * a, method='exact').low
        fct.test_close(float(clopper_pearson_lower(k, n, a)), ref, eps=1e-10)
    ks = np.array([0, 1, 50, 100]); fct.test_close(clopper_pearson_lower(ks, 100, 0.01),
                                                   [scipy.stats.binomtest(int(k), 100).proportion_ci(0.98, 'exact').low for k in ks], eps=1e-12)
    fct.test_fail(lambda: clopper_pearson_lower(5, 4, 0.01), contains='k <= n')
    fct.test_fail(lambda: clopper_pearson_lower(1, 4, 0.0), contains='alpha')


def test_binomial_pvalue_equals_scipy():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = (int(v) for v in rng.integers(0, 300, 2))
        ref = scipy.stats.binomtest(a, a + b, 0.5).pvalue if a + b else 1.0
        fct.test_close(float(binomial_pvalue(a, b)), ref, eps=1e-10)


class Linear(nn.Module):
    "A multi-modal linear classifier: logits = Σ_m x^(m) W^(m) + b."
    def __init__(self, ws, b): super().__init__(); self.ws, self.b = ws, b
    def forward(self, *xs): return sum(x @ w for x, w in zip(xs, self.ws)) + self.b


def _binary(seed, d=(3, 4), B=10):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(k, generator=g) for k in d]
    ws = [torch.stack([torch.zeros(k), wk], 1) for k, wk in zip(d, w)]           # logits (0, w·x + b)
    xs = tuple(0.4 * torch.randn(B, k, generator=g) for k in d)
    s = sum(x @ wk for x, wk in zip(xs, w)) + 0.1
    return Linear(ws, torch.tensor([0., 0.1])), xs, w, s


@pytest.mark.parametrize('sigmas', [(0.5, 0.5), (0.6, 0.2)])
def test_linear_binary_radius_closed_form(sigmas):
    "Certified radii of a linear binary model never exceed the true distances and approach them as n grows."
    model, xs, w, s = _binary(0)
    scale = math.sqrt(sum(sg**2 * float(wk.pow(2).sum()) for sg, wk in zip(sigmas, w)))
    z_true = (s.abs() / scale).double()                                  # exact whitened distance = Φ⁻¹(p_A)
    d_joint = s.abs().double() / math.sqrt(sum(float(wk.pow(2).sum()) for wk in w))
    d_uni = torch.stack([s.abs().double() / float(wk.norm()) for wk in w], 1)
    gaps = []
    for n in (500, 10_000, 100_000):
        c = certify(model, xs, sigmas, n0=64, n=n, alpha=0.001, generator=torch.Generator().manual_seed(n), batch_size=2**16)
        ok = c.prediction != ABSTAIN
        fct.test_eq(c.prediction[ok], (s[ok] > 0).long())
        assert (c.z <= z_true + 1e-9).all() and (c.radius <= d_joint + 1e-9).all() and (c.radii <= d_uni + 1e-9).all()
        if sigmas[0] == sigmas[1]: assert (c.radius[ok] <= d_joint[ok]).all()   # isotropic: the l2 distance is the bound
        gaps.append(float((z_true - c.z)[z_true < 2.5].mean()))          # Φ⁻¹ of the CP bound saturates at large z
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05, gaps
    if sigmas[0] == sigmas[1]:                                             # isotropic: the joint radius is the l2 distance
        near = z_true < 2.5
        fct.test_close(c.radius[near], d_joint[near], eps=0.05 * float(d_joint[near].max()))


def _facet_distances(model, xs):
    "(top class, (B, K) distances to the hyperplanes h_A = h_j of the linear model (inf at j = A)): its cell's facets."
    logits = model(*xs); top = logits.argmax(1)
    Wf = torch.cat(model.ws)                                               # (d, K): the full weight
    diff = Wf[:, top].t()[:, None, :] - Wf.t()[None, :, :]                 # (B, K, d) w_A − w_j
    marg = logits.gather(1, top[:, None]) - logits
    return top, torch.where(marg > 0, marg / diff.norm(dim=2).clamp_min(1e-12), torch.full_like(marg, math.inf)).double()


def test_linear_multiclass_radius_below_distance():
    """K = 4 linear models, isotropic noise: σΦ⁻¹(p̲_A) ≤ min_j (h_A − h_j)/‖w_A − w_j‖, the distance to the base classifier's
    cell boundary (p_A ≤ P(h_A > h_j) = Φ(d_j/σ) for every j); with one competitor in reach it approaches that distance."""
    g = torch.Generator().manual_seed(3)
    W = [torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)]
    xs = (0.5 * torch.randn(16, 3, generator=g), 0.5 * torch.randn(16, 5, generator=g))
    sigma, run = 0.4, lambda m, n, seed: certify(m, xs, sigma, n0=64, n=n, alpha=0.001, generator=torch.Generator().manual_seed(seed), batch_size=2**16)
    for b in ([0., 0., 0., 0.], [0., 0., -30., -30.]):                       # four classes in reach / two
        model = Linear(W, torch.tensor(b)); top, dist = _facet_distances(model, xs)
        c_small, c_big = run(model, 2000, 0), run(model, 100_000, 1)
        for c in (c_small, c_big):
            ok = c.prediction != ABSTAIN
            fct.test_eq(c.prediction[ok], top[ok])
            assert (c.radius <= dist.min(1).values).all()
    near = (dist.min(1).values < 2.0 * sigma) & (c_big.prediction != ABSTAIN)      # the two-class model
    assert near.sum() >= 4
    assert (c_big.radius[near] >= c_small.radius[near]).all()
    assert (c_big.radius[near] > dist.min(1).values[near] - 0.05 * sigma).all(), (c_big.radius[near], dist[near])


class SoftSmoothed(nn.Module):
    "A differentiable estimate of the smoothed classifier: log mean_i softmax f(x + ε_i), with fixed draws ε_i."
    def __init__(self, f, sigmas, shapes, draws=256, seed=0):
        super().__init__(); self.f, self.sigmas, g = f, sigmas, torch.Generator().manual_seed(seed)
        self.noise = [s * torch.randn(draws, *sh, generator=g) for s, sh in zip(sigmas, shapes)]
    def forward(self, *xs):
        B, k = len(xs[0]), len(self.noise[0])
        noisy = [(x[:, None] + e[None]).flatten(0, 1) for x, e in zip(xs, self.noise)]
        p = F.softmax(self.f(*noisy).logits, 1).view(B, k, -1).mean(1)
        return p.clamp_min(1e-12).log()


def _random_model(seed, shapes, K=3):
    torch.manual_seed(seed)
    m = joint_model(shapes, K, d_feat=8).eval()
    with torch.no_grad():
        for p in m.parameters(): p.mul_(2.0)                               # sharper boundaries near the data
    return m


class Scaled(nn.Module):
    "`model` of x = r_i · u (per-sample r_i): an l2 ball of radius ε around u is one of radius ε·r_i around x."
    def __init__(self, model, r): super().__init__(); self.model, self.r = model, r
    def forward(self, *us): return self.model(*(u * self.r.view(-1, *[1] * (u.dim() - 1)) for u in us))


def test_soundness_against_pgd_on_the_smoothed_classifier():
    """Random small models: PGD on the smoothed classifier inside 0.99 × the certified radius (joint ball, and each
    modality alone) flips a certified prediction no more often than α allows; at 3 × the radius it does flip some."""
    shapes, alpha, sigmas = [(6,), (4,)], 0.01, (0.5, 0.3)
    flips = tried = power = 0
    for seed in range(2):
        f = _random_model(seed, shapes)
        gx = torch.Generator().manual_seed(seed)
        xs = (torch.randn(40, 6, generator=gx), torch.randn(40, 4, generator=gx))
        c = certify(f, xs, sigmas, n0=64, n=2000, alpha=alpha, generator=torch.Generator().manual_seed(seed))
        ok = c.prediction != ABSTAIN
        xs_c, y_c = tuple(x[ok] for x in xs), c.prediction[ok]
        soft = SoftSmoothed(f, sigmas, shapes, draws=64, seed=seed + 100)
        for mods, r in [(None, c.radius[ok])] + [(m, c.radii[ok, m]) for m in range(2)]:
            r = r.float().clamp_min(1e-6); us = tuple(x / r[:, None] for x in xs_c)
            for factor in (0.99, 3.0):
                adv_u = pgd_l2(Scaled(soft, r), us, y_c, factor, steps=12, alpha=2.5 * factor / 12, modalities=mods, loss='margin')
                adv = tuple(u * r[:, None] for u in adv_u)
                g = predict(f, adv, sigmas, n=1000, alpha=0.001, generator=torch.Generator().manual_seed(seed + 7))
                flipped = (g != ABSTAIN) & (g != y_c)
                if factor < 1:
                    d2 = sum((a - x).pow(2).sum(1) / s**2 for a, x, s in zip(adv, xs_c, sigmas))
                    assert (d2.sqrt() <= c.z[ok] * 0.99 + 1e-4).all()          # the attack stayed in the certified set
                    flips += int(flipped.sum()); tried += len(y_c)
                else: power += int(flipped.sum())
    allowed = int(scipy.stats.binom.ppf(0.999, tried, alpha))
    assert tried >= 120 and flips <= allowed, (flips, tried, allowed)
    assert power >= 10, power                                                  # the attack can flip the smoothed classifier


def test_abstention_when_pA_at_most_half():
    "A coin-flip base classifier (p_A = ½ exactly): certify abstains (radius 0), predict abstains."
    coin = Linear([torch.tensor([[0., 1.]])], torch.zeros(2))              # class 1 iff x + ε > 0, at x = 0
    xs = (torch.zeros(8, 1),)
    c = certify(coin, xs, 1.0, n0=32, n=5000, alpha=0.001, generator=torch.Generator().manual_seed(0))
    fct.test_eq(c.prediction, torch.full((8,), ABSTAIN)); assert (c.p_lower <= 0.5).all()
    fct.test_eq(c.radius, torch.zeros(8, dtype=torch.float64)); fct.test_eq(c.radii, torch.zeros(8, 1, dtype=torch.float64))
    fct.test_eq(predict(coin, xs, 1.0, n=5000, generator=torch.Generator().manual_seed(1)), torch.full((8,), ABSTAIN))
    fct.test_eq(certified_accuracy(c.radius, c.prediction, torch.ones(8, dtype=torch.long), [0.0]), np.array([0.0]))
    f = _random_model(0, [(6,), (4,)])
    xs = (torch.randn(30, 6), torch.randn(30, 4))
    c = certify(f, xs, (2.0, 2.0), n0=32, n=300, alpha=0.001, generator=torch.Generator().manual_seed(0))
    fct.test_eq(c.prediction == ABSTAIN, c.p_lower <= 0.5)                 # abstain exactly when p̲_A ≤ ½
    assert (c.radius[c.prediction != ABSTAIN] > 0).all()


def test_same_generator_same_certificates():
    f = _random_model(1, [(6,), (4,)])
    xs = (torch.randn(20, 6), torch.randn(20, 4))
    run = lambda seed, bs=4096: certify(f, xs, (0.5, 0.3), n0=32, n=500, generator=torch.Generator().manual_seed(seed), batch_size=bs)
    a, b, c = run(0), run(0), run(1)
    fct.test_eq(a.prediction, b.prediction); fct.test_eq(a.p_lower, b.p_lower); fct.test_eq(a.radii, b.radii)
    assert not torch.equal(a.p_lower, c.p_lower)                           # another generator: other draws
    n1 = class_counts(f, xs, (0.5, 0.3), 300, torch.Generator().manual_seed(0), batch_size=64)
    fct.test_eq(n1.sum(1), torch.full((20,), 300))


def test_bad_inputs_name_the_fix():
    f = _random_model(0, [(6,), (4,)]); xs = (torch.randn(2, 6), torch.randn(2, 4))
    fct.test_fail(lambda: certify(f, xs, (0.5,)), contains='one sigma per modality')
    fct.test_fail(lambda: certify(f, xs, (0.0, 0.0)), contains='at least one sigma')
    fct.test_fail(lambda: class_counts(f, xs, 0.5, 0), contains='num and batch_size must be >= 1')
    fct.test_fail(lambda: noise_sigmas(mfeat(('pix', 'fou')).train, -1.0), contains='> 0')


def test_noise_methods_train_reproducibly_on_their_sigmas():
    D = mfeat(('pix', 'fou'))
    cfg = train_config('smoke', 'JT+noise', noise_scale=0.3, max_train=128)
    fct.test_eq(cfg['options']['noise_scale'], 0.3)
    a, b = (train_model(D, cfg, seed=0, device='cpu', progress=False) for _ in range(2))
    fct.test_close(a.method.noise_sigmas, tuple(0.3 * s for s in modality_scales(D.train)))
    for k, v in a.model.state_dict().items(): fct.test_eq(v, b.model.state_dict()[k])
    clean = train_model(D, train_config('smoke', 'JT', max_train=128), seed=0, device='cpu', progress=False)
    assert any(not torch.equal(v, clean.model.state_dict()[k]) for k, v in a.model.state_dict().items() if v.is_floating_point())
