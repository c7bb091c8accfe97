"""Property tests of crmt_nb.attacks: budgets, boxes, untouched modalities, FGM = one PGD step, determinism,
model mode, attack strength against closed-form distances and against torchattacks, l∞-PGD and Square."""
import math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from crmt_nb.attacks import fgm, pgd_l2, drop_modality, pgd_linf, square_linf, robust_accuracy
from crmt_nb.models import joint_model, MMOutput

TOL = 1e-5

# ---------------------------------------------------------------------------------------------------- helpers
class AnyRank(nn.Module):
    "One small ReLU encoder per modality (any per-sample shape), summed features, linear head; returns MMOutput."
    def __init__(self, shapes, k=4, d=16):
        super().__init__()
        self.encs = nn.ModuleList(nn.Sequential(nn.Linear(max(1, math.prod(s)), d), nn.ReLU()) for s in shapes)
        self.head = nn.Linear(d, k)
    def forward(self, *xs):
        feats = tuple(e(x.reshape(x.shape[0], -1)) for e, x in zip(self.encs, xs))
        return MMOutput(self.head(sum(feats)), (), feats)

def norms(adv, xs):
    "(M, B) per-modality l2 norms of the perturbation."
    return torch.stack([(a - x).reshape(x.shape[0], -1).norm(dim=1) for a, x in zip(adv, xs)])

SHAPES = [(), (5,), (2, 6), (1, 4, 5), (2, 3, 3)]

def random_case(seed, B=12):
    g = torch.Generator().manual_seed(seed)
    M = 1 + seed % 3
    idx = torch.randperm(len(SHAPES), generator=g)[:M].tolist()
    shapes = [SHAPES[i] for i in idx]
    torch.manual_seed(seed)
    model = AnyRank(shapes)
    boxes = [(0.0, 1.0) if torch.rand(1, generator=g).item() < 0.5 else None for _ in shapes]
    xs = tuple(torch.rand(B, *s, generator=g) if b else 2 * torch.randn(B, *s, generator=g) for s, b in zip(shapes, boxes))
    y = torch.randint(0, 4, (B,), generator=g)
    return model, xs, y, boxes

def in_box(adv, boxes):
    return all(b is None or (a.min() >= b[0] and a.max() <= b[1]) for a, b in zip(adv, boxes))

# ---------------------------------------------------------------------------------------------------- budgets and boxes
@pytest.mark.parametrize('seed', range(12))
@pytest.mark.parametrize('random_start', [False, True])
def test_joint_ball_and_boxes(seed, random_start):
    model, xs, y, boxes = random_case(seed)
    for eps in (0.1, 0.7, 3.0):
        adv = pgd_l2(model, xs, y, eps, steps=5, alpha=eps / 2, boxes=boxes, random_start=random_start,
                     generator=torch.Generator().manual_seed(seed))
        assert isinstance(adv, tuple) and len(adv) == len(xs)
        fct.test_eq([a.shape for a in adv], [x.shape for x in xs])
        n = norms(adv, xs).square().sum(0).sqrt()
        assert n.max() <= eps * (1 + TOL), (eps, n.max())
        assert n.max() > 0.2 * eps                                   # it did move (boxes may stop it short of ε)
        assert in_box(adv, boxes)

@pytest.mark.parametrize('seed', range(12))
def test_per_modality_balls(seed):
    model, xs, y, boxes = random_case(seed)
    M = len(xs)
    eps = [0.2 + 0.5 * m for m in range(M)]
    for rs in (False, True):
        adv = pgd_l2(model, xs, y, eps, steps=6, boxes=boxes, random_start=rs)
        n = norms(adv, xs)
        for m in range(M): assert n[m].max() <= eps[m] * (1 + TOL)
        assert in_box(adv, boxes)
    adv = fgm(model, xs, y, eps, boxes=boxes)
    for m in range(M): assert norms(adv, xs)[m].max() <= eps[m] * (1 + TOL)

def test_per_modality_is_not_joint():
    "Per-modality budgets let each modality use its whole ε_m: the joint norm exceeds max ε_m (not one joint ball)."
    torch.manual_seed(0)
    model = AnyRank([(6,), (7,)])
    xs = (torch.randn(32, 6), torch.randn(32, 7)); y = torch.randint(0, 4, (32,))
    for adv in (pgd_l2(model, xs, y, [0.5, 0.3], steps=1, alpha=[0.5, 0.3]), fgm(model, xs, y, [0.5, 0.3])):
        n = norms(adv, xs)                                        # each gradient normalised on its own: one step
        fct.test_close(n[0], torch.full_like(n[0], 0.5), eps=1e-5)   # of α_m lands on each sphere (unboxed)
        fct.test_close(n[1], torch.full_like(n[1], 0.3), eps=1e-5)

def test_tensor_boxes_and_one_sided():
    torch.manual_seed(1)
    model = AnyRank([(3, 4)])
    x = torch.rand(10, 3, 4) * 0.5; y = torch.randint(0, 4, (10,))
    lo, hi = torch.zeros(3, 1), torch.tensor([[0.5], [0.6], [0.7]])
    adv = pgd_l2(model, (x,), y, 5.0, steps=5, boxes=[(lo, hi)])[0]
    assert (adv >= lo).all() and (adv <= hi).all()
    adv = pgd_l2(model, (x,), y, 5.0, steps=5, boxes=[(0.0, None)])[0]
    assert adv.min() >= 0 and adv.max() > 0.71                   # no upper end

# ---------------------------------------------------------------------------------------------------- uni-modal
@pytest.mark.parametrize('seed', [1, 2, 4, 5, 7, 8])                 # M = 1 + seed % 3 >= 2
def test_untouched_modalities_bit_identical(seed):
    model, xs, y, boxes = random_case(seed)
    M = len(xs)
    for m in range(M):
        for adv in (pgd_l2(model, xs, y, 1.0, steps=4, alpha=1 / 3, modalities=m, boxes=boxes, random_start=True),
                    pgd_l2(model, xs, y, [1.0 if i == m else 0.0 for i in range(M)], steps=4, boxes=boxes),
                    fgm(model, xs, y, 1.0, modalities=[m], boxes=boxes)):
            for i in range(M):
                if i != m: assert torch.equal(adv[i], xs[i])
            assert norms(adv, xs)[m].max() <= 1 + TOL and norms(adv, xs)[m].max() > 0.5

def test_uni_modal_equals_per_modality_vector():
    "The authors' ε-vector [ε, 0] and modalities=0 with a float ε are the same attack."
    torch.manual_seed(2)
    model = AnyRank([(2, 6), (5,)])
    xs = (torch.rand(16, 2, 6), torch.randn(16, 5)); y = torch.randint(0, 4, (16,))
    a = pgd_l2(model, xs, y, [1.0, 0.0], steps=4, alpha=[1 / 3, 0.0], boxes=[(0, 1), None])
    b = pgd_l2(model, xs, y, 1.0, steps=4, alpha=1 / 3, modalities=0, boxes=[(0, 1), None])
    for u, v in zip(a, b): fct.test_close(u, v, eps=1e-6)

# ---------------------------------------------------------------------------------------------------- FGM = 1 PGD step
@pytest.mark.parametrize('seed', range(6))
def test_fgm_is_one_pgd_step(seed):
    model, xs, y, boxes = random_case(seed)
    for eps in (0.3, [0.3 + 0.1 * m for m in range(len(xs))]):
        a = fgm(model, xs, y, eps, boxes=boxes)
        b = pgd_l2(model, xs, y, eps, steps=1, alpha=eps, boxes=boxes)
        for u, v in zip(a, b): fct.test_close(u, v, eps=1e-6)
        c = pgd_l2(model, xs, y, eps, steps=2, alpha=eps, boxes=boxes)    # a second step does change things
        assert any((u - v).abs().max() > 1e-4 for u, v in zip(a, c))

def test_fgm_is_normalised_gradient():
    "FGM on an unboxed linear model moves exactly ε along −(w_y − w_k) (binary CE gradient direction)."
    torch.manual_seed(3)
    lin = nn.Linear(7, 2)
    x = torch.randn(5, 7); y = torch.tensor([0, 1, 0, 1, 1])
    adv = fgm(lin, x, y, 0.4)
    dw = lin.weight[0] - lin.weight[1]
    sgn = torch.where(y == 0, -1.0, 1.0)[:, None]
    fct.test_close(adv - x, 0.4 * sgn * dw.detach() / dw.norm().detach(), eps=1e-6)

# ---------------------------------------------------------------------------------------------------- randomness, mode, grads
def test_deterministic_and_global_rng_untouched():
    model, xs, y, boxes = random_case(4)
    img = torch.rand(6, 1, 8, 8); yi = torch.randint(0, 4, (6,))
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 4))
    runs = {
        'pgd_l2': lambda g: pgd_l2(model, xs, y, 0.5, steps=3, boxes=boxes, random_start=True, generator=g),
        'pgd_l2_per': lambda g: pgd_l2(model, xs, y, [0.5] * len(xs), steps=3, boxes=boxes, random_start=True, generator=g),
        'pgd_linf': lambda g: (pgd_linf(cnn, img, yi, 0.1, steps=3, boxes=(0, 1), random_start=True, generator=g),),
        'pgd_linf_normal': lambda g: (pgd_linf(cnn, img, yi, 0.1, steps=3, random_start=0.01, generator=g),),
        'square': lambda g: (square_linf(cnn, img, yi, 0.1, n_queries=30, boxes=(0, 1), generator=g),),
    }
    for name, run in runs.items():
        state = torch.get_rng_state()
        a, b = run(torch.Generator().manual_seed(7)), run(torch.Generator().manual_seed(7))
        c = run(torch.Generator().manual_seed(8))
        assert torch.equal(torch.get_rng_state(), state), f'{name} touched the global RNG'
        for u, v in zip(a, b): assert torch.equal(u, v), name
        assert any(not torch.equal(u, w) for u, w in zip(a, c)), f'{name}: generator ignored'
        state = torch.get_rng_state(); run(None)
        assert torch.equal(torch.get_rng_state(), state), f'{name} (no generator) touched the global RNG'

def test_random_start_is_in_ball_and_spread():
    "With steps=0 the random start itself: inside the joint ball, and near its surface in high dimension."
    torch.manual_seed(5)
    model = AnyRank([(3, 8, 8), (20,)])
    xs = (torch.rand(64, 3, 8, 8), torch.randn(64, 20)); y = torch.randint(0, 4, (64,))
    adv = pgd_l2(model, xs, y, 0.5, steps=0, random_start=True, generator=torch.Generator().manual_seed(0))
    n = norms(adv, xs).square().sum(0).sqrt()
    assert n.max() <= 0.5 * (1 + TOL) and n.min() > 0.45        # uniform in a 212-dim ball: radius ≈ ε·U^(1/212)

def test_model_mode_restored_and_no_param_grads():
    model, xs, y, boxes = random_case(2)
    model.train(); model.head.eval()                              # a mixed state is restored module by module
    seen = []
    class Spy(nn.Module):
        def forward(self, x): seen.append(self.training); return x
    model.encs[0].append(Spy())
    pgd_l2(model, xs, y, 0.5, steps=2, boxes=boxes)
    assert seen and not any(seen)                                 # eval during the attack
    assert model.training and not model.head.training and model.encs[0].training
    assert all(p.grad is None for p in model.parameters())
    seen.clear(); pgd_l2(model, xs, y, 0.5, steps=1, boxes=boxes, eval_mode=False)
    assert all(seen)                                              # eval_mode=False keeps the caller's mode

    class Boom(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(3, 2)
        def forward(self, x): raise RuntimeError('boom')
    b = Boom().train()
    for atk in (lambda: pgd_l2(b, (torch.randn(2, 3),), torch.tensor([0, 1]), 0.5),
                lambda: pgd_linf(b, torch.randn(2, 3), torch.tensor([0, 1]), 0.5),
                lambda: square_linf(b, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 0.1)):
        fct.test_fail(atk, contains='boom')
        assert b.training and b.lin.training

def test_zero_gradient_gives_no_nan():
    "A modality the model ignores has a zero gradient: no NaN, no movement (the authors' uni-modal FGM gives NaN)."
    class IgnoresSecond(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(4, 3)
        def forward(self, a, b): return self.lin(a) + 0 * b.sum(1, keepdim=True)
    m = IgnoresSecond()
    xs = (torch.randn(5, 4), torch.randn(5, 6)); y = torch.randint(0, 3, (5,))
    for adv in (fgm(m, xs, y, [0.0, 1.0]), pgd_l2(m, xs, y, 1.0, modalities=1), pgd_l2(m, xs, y, [0.5, 1.0])):
        assert all(torch.isfinite(a).all() for a in adv)
        assert torch.equal(adv[1], xs[1])

def test_output_type_device_dtype():
    torch.manual_seed(0)
    model = AnyRank([(4,), (2, 3)]).double()
    xs = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, 3, dtype=torch.float64)); y = torch.tensor([0, 1, 2])
    adv = pgd_l2(model, xs, y, 0.5, steps=2)
    assert all(a.dtype == torch.float64 and a.device == x.device and not a.requires_grad for a, x in zip(adv, xs))
    lin = nn.Linear(4, 3)
    out = pgd_l2(lin, torch.randn(3, 4), y, 0.5, steps=2)          # plain tensor in → plain tensor out
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4)

def test_clear_errors():
    model, xs, y, boxes = random_case(1)                          # M = 2
    fct.test_fail(lambda: pgd_l2(model, xs, y, [0.5]), contains='one budget per modality')
    fct.test_fail(lambda: pgd_l2(model, xs, y, 0.5, modalities=5), contains='out of range')
    fct.test_fail(lambda: pgd_l2(model, xs, y, 0.5, boxes=[(0, 1)]), contains='one entry per modality')
    fct.test_fail(lambda: pgd_l2(model, xs, y, -1.0), contains='>= 0')
    fct.test_fail(lambda: pgd_l2(model, xs, y[:3], 0.5), contains='batch size')
    fct.test_fail(lambda: pgd_l2(model, xs, y, 0.5, loss='hinge'), contains="'ce' or 'margin'")
    fct.test_fail(lambda: pgd_l2(model, (xs[0].long(),) + xs[1:], y, 0.5), contains='floating-point')
    fct.test_fail(lambda: square_linf(model, xs, y, 0.1), contains='single-input')
    fct.test_fail(lambda: square_linf(nn.Identity(), torch.rand(3, 5), y[:3], 0.1), contains='(B, C, H, W)')

def test_drop_modality():
    xs = (torch.rand(4, 1, 3, 3), torch.randn(4, 5), torch.randn(4, 2))
    d = drop_modality(xs, 1)
    assert torch.equal(d[1], torch.zeros(4, 5)) and d[0] is xs[0] and d[2] is xs[2]
    d = drop_modality(xs, [0, 2])
    assert d[0].abs().sum() == 0 and d[2].abs().sum() == 0 and d[1] is xs[1]
    fct.test_fail(lambda: drop_modality(xs, 3), contains='out of range')

# ---------------------------------------------------------------------------------------------------- strength: closed form
class LinearTwo(nn.Module):
    "h = W1 vec(x1) + W2 x2 + b, binary: the minimal l2 perturbations are known in closed form."
    def __init__(self):
        super().__init__(); self.l1 = nn.Linear(2 * 3 * 4, 2); self.l2 = nn.Linear(6, 2, bias=False)
    def forward(self, x1, x2): return self.l1(x1.flatten(1)) + self.l2(x2)

@pytest.mark.parametrize('loss', ['ce', 'margin'])
def test_linear_model_closed_form(loss):
    torch.manual_seed(0)
    model = LinearTwo()
    xs = (torch.randn(400, 2, 3, 4), torch.randn(400, 6))
    with torch.no_grad(): z = model(*xs)
    y = z.argmax(1); m = (z.max(1).values - z.min(1).values)          # margin h_y − h_k > 0
    sgn = torch.where(y == 0, 1.0, -1.0)
    d1 = (model.l1.weight[0] - model.l1.weight[1]).norm().item()      # ‖Δw^(1)‖
    d2 = (model.l2.weight[0] - model.l2.weight[1]).norm().item()
    pred = lambda a: model(*a).argmax(1)
    cases = [  # (attack kwargs, margin decrease achievable per sample = the closed form)
        (dict(eps=None, modalities=None), lambda e: e * math.hypot(d1, d2)),     # joint ball: ε·‖[Δw1; Δw2]‖
        (dict(eps=None, modalities=0), lambda e: e * d1),                        # uni-modal
        (dict(eps=None, modalities=1), lambda e: e * d2)]
    checked = 0
    with torch.no_grad(): q = torch.quantile(m, torch.tensor([0.3, 0.7])).tolist()
    for kw, reach in cases:
        for target in q:                                              # ε so that a chunk of samples is on each side
            eps = target / reach(1.0)
            adv = pgd_l2(model, xs, y, steps=10, alpha=eps / 4, loss=loss, **dict(kw, eps=eps))
            flipped = pred(adv) != y
            dist = m / reach(1.0)                                     # closed-form minimal distance of each sample
            clear = (dist / eps - 1).abs() > 0.01
            assert torch.equal(flipped[clear], (dist < eps)[clear]), kw
            checked += int(clear.sum())
    # per-modality budgets: flips iff ε1‖Δw1‖ + ε2‖Δw2‖ > margin
    for e1, e2 in ((0.5, 0.2), (0.1, 1.0)):
        adv = pgd_l2(model, xs, y, [e1, e2], steps=10, alpha=[e1 / 4, e2 / 4], loss=loss)
        reach = e1 * d1 + e2 * d2
        clear = (m / reach - 1).abs() > 0.01
        assert torch.equal((pred(adv) != y)[clear], (m < reach)[clear])
        assert 0 < int((m < reach).sum()) < len(m)                    # both outcomes occur
    assert checked > 1000

# ---------------------------------------------------------------------------------------------------- trained models
@pytest.fixture(scope='module')
def mnist_model():
    "A small CNN trained for a few seconds on MNIST-5k (clean accuracy 0.87 on the 200 test images)."
    from crmt_nb.data import mnist5k
    s = mnist5k()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = s.train.xs[0], s.train.y
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(y), generator=g).split(128):
            opt.zero_grad(); F.cross_entropy(net(x[idx]), y[idx]).backward(); opt.step()
    net.eval()
    xt, yt = s.test.xs[0][:200], s.test.y[:200]
    assert robust_accuracy(net, xt, yt) > 0.8
    return net, xt, yt

def test_pgd_at_least_as_strong_as_torchattacks(mnist_model):
    ta = pytest.importorskip('torchattacks')
    net, x, y = mnist_model
    for eps, steps in ((1.0, 10), (1.5, 4)):
        alpha = eps / 4
        ours = pgd_l2(net, x, y, eps, steps=steps, alpha=alpha, boxes=(0, 1))
        theirs = ta.PGDL2(net, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
        acc_ours, acc_theirs = robust_accuracy(net, ours, y), robust_accuracy(net, theirs, y)
        clean = robust_accuracy(net, x, y)
        assert acc_ours <= acc_theirs + 0.01, (eps, acc_ours, acc_theirs)
        assert acc_ours < clean - 0.2                                      # and it is an actual attack
        assert (ours - theirs).abs().max() < 1e-3                          # same settings → the same iterates

def test_pgd_linf_ball_box_and_strength(mnist_model):
    net, x, y = mnist_model
    for rs in (False, True, 0.001):
        adv = pgd_linf(net, x, y, 0.1, steps=10, alpha=0.025, boxes=(0, 1), random_start=rs,
                       generator=torch.Generator().manual_seed(0))
        assert (adv - x).abs().max() <= 0.1 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1                          # after ≥ 1 step the box holds for every start
        assert robust_accuracy(net, adv, y) < robust_accuracy(net, x, y) - 0.2
    tup = pgd_linf(net, (x,), y, 0.1, steps=3, boxes=[(0, 1)])
    assert isinstance(tup, tuple) and (tup[0] - x).abs().max() <= 0.1 + 1e-6

def test_square_ball_box_strength(mnist_model):
    net, x, y = mnist_model
    x, y = x[:64], y[:64]
    adv = square_linf(net, x, y, 0.2, n_queries=200, boxes=(0, 1), generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    clean, rob = robust_accuracy(net, x, y), robust_accuracy(net, adv, y)
    assert rob < clean - 0.2, (clean, rob)
    with torch.no_grad(): wrong = net(x).argmax(1) != y
    assert torch.equal(adv[wrong], x[wrong])                              # misclassified inputs are not touched
    more = square_linf(net, x, y, 0.2, n_queries=400, boxes=(0, 1), generator=torch.Generator().manual_seed(0))
    assert robust_accuracy(net, more, y) <= rob + 0.02                    # more queries never much worse
