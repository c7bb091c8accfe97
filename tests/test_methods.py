"""The thirteen training methods: each trains above chance, and each method's defining invariant holds."""
import copy, math, pytest, torch, torch.nn.functional as F
import fastcore.test as fct
from crmt_nb.core import seed_everything
from crmt_nb.data import mfeat
from crmt_nb.models import joint_model
from crmt_nb.train import fit, loaders, Method, Context
from crmt_nb.experiment import train_config, train_model
from crmt_nb.methods import METHODS, build_model
from crmt_nb.methods_imbalance import OGM, PMR, GB, ogm_coefficients, unimodal_logits
from crmt_nb.methods_robust import Mixup, MMAT, MSEFM, official_at_sample, check_at_budget
from crmt_nb.attacks import pgd_l2
from crmt_nb.methods_crmt import CRMT, CRMTStep2
from crmt_nb.losses import margin_loss, bound_loss
from crmt_nb import bounds

D = mfeat(('pix', 'fou'))


def batch(n=64, seed=0):
    idx = torch.randperm(len(D.train), generator=torch.Generator().manual_seed(seed))[:n]
    return D.train[idx]


def weights(model):
    return torch.cat([v.detach().flatten().float() for v in model.state_dict().values()])


@pytest.mark.parametrize('name', list(METHODS))
def test_every_method_trains_above_chance(name):
    extra = {'step2_epochs': 1} if METHODS[name].cls is CRMT else {'ista_iters': 50} if name == 'MSEFM' else {}
    cfg = train_config('smoke', name, epochs=2, max_train=256, lr=1e-2, **extra)
    t = train_model(D, cfg, seed=0, device='cpu', progress=False)
    assert t.history.valid_acc.max() > 0.25, t.history          # chance is 0.1
    assert t.model.head == METHODS[name].head
    if name in ('CRMT-JT', 'CRMT-AT', 'CRMT-Mix', 'CRMT-step2'): fct.test_eq(t.history.stage.max(), 2)


def test_ogm_coefficient_and_only_encoder_grads():
    xs, y = batch()
    torch.manual_seed(0)
    model = joint_model(D.shapes, 10)
    ogm = OGM(alpha=0.7, ge=False)
    ogm.setup(Context(model, None)); ogm.on_epoch_start(Context(model, None, epoch=0))
    loss, _ = ogm.loss(model, xs, y); loss.backward()
    with torch.no_grad():
        out = model(xs)
        s = [F.softmax(o, 1)[torch.arange(len(y)), y].sum() for o in unimodal_logits(model, out)]
    dom = int(s[1] > s[0])
    rho = float(s[dom] / s[1 - dom])
    assert rho > 1
    fct.test_close(ogm.coef[dom], 1 - math.tanh(0.7 * rho), eps=1e-5)
    fct.test_eq(float(ogm.coef[1 - dom]), 1.0)
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    ogm.after_backward(model)
    for n, p in model.named_parameters():
        if n.startswith(f'encoders.{dom}.') and p.dim() >= 2: fct.test_close(p.grad, g0[n] * ogm.coef[dom], eps=1e-7)
        else: fct.test_eq(p.grad, g0[n])                       # other encoder, biases/BN, head: untouched
    # with GE: head gradients still untouched, every encoder weight gradient changed, noise from the loop's generator
    ge = OGM(alpha=0.7); gen = torch.Generator().manual_seed(0)
    ge.setup(Context(model, None, generator=gen, device_generator=gen)); ge.on_epoch_start(Context(model, None, epoch=0))
    model.zero_grad(); ge.loss(model, xs, y)[0].backward(); g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    ge.after_backward(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, g0[n]) != (n.startswith('encoders.') and p.dim() >= 2), n
    # outside the window nothing is modulated
    ogm.on_epoch_start(Context(model, None, epoch=99)); model.zero_grad(); ogm.loss(model, xs, y)[0].backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}; ogm.after_backward(model)
    assert all(torch.equal(p.grad, g0[n]) for n, p in model.named_parameters())
    fct.test_close(ogm_coefficients(torch.tensor([1., 4.]), 0.1), torch.tensor([1., 1 - math.tanh(0.4)]))


def test_gb_weights_nonnegative_sum_to_one():
    g = seed_everything(0)
    tr, va, _ = loaders(D, 64, g, 'cpu', max_train=128, max_eval=64)
    model = joint_model(D.shapes, 10)
    gb = GB(super_epoch=1)
    fit(model, gb, tr, va, epochs=2, optimizer=torch.optim.Adam(model.parameters(), 3e-3), progress=False)
    w = gb.weights
    fct.test_eq(w.shape, (3,))
    assert (w >= 0).all(); fct.test_close(w.sum(), 1.0, eps=1e-6)
    assert not torch.allclose(w, torch.full((3,), 1 / 3))        # it was really re-estimated


def test_pmr_prototypes_are_class_means_at_ema_0():
    g = seed_everything(0)
    tr, _, _ = loaders(D, 64, g, 'cpu', max_train=200)
    model = joint_model(D.shapes, 10)
    X, Y = D.train.head(200)[torch.arange(200)]
    pmr = PMR(momentum=0.0, proto_frac=1.0); pmr.setup(Context(model, tr))
    pmr.on_epoch_start(Context(model, tr, epoch=0))
    model.eval()
    with torch.no_grad(): feats = model.features(X)
    means = [torch.stack([f[Y == k].mean(0) for k in range(10)]) for f in feats]
    for p, m in zip(pmr.protos, means): fct.test_close(p, m, eps=1e-4)
    # EMA μ: c ← (1 − μ) c_new + μ c_old
    pmr.momentum = 0.5; old = [p.clone() for p in pmr.protos]
    with torch.no_grad():
        for p in model.parameters(): p.mul_(1.1)
        feats = model.features(X)
    pmr.on_epoch_start(Context(model, tr, epoch=1))
    for p, o, f in zip(pmr.protos, old, feats):
        fct.test_close(p, 0.5 * torch.stack([f[Y == k].mean(0) for k in range(10)]) + 0.5 * o, eps=1e-4)


def test_mixup_lambda_1_is_jt():
    out = []
    for meth in (Method(), Mixup(lam=1.0)):
        g = seed_everything(0); tr, _, _ = loaders(D, 64, g, 'cpu', max_train=128)
        model = joint_model(D.shapes, 10)
        fit(model, meth, tr, epochs=2, optimizer=torch.optim.SGD(model.parameters(), 0.05, momentum=0.9), select_on='last', progress=False)
        out.append(weights(model))
    fct.test_eq(out[0], out[1])
    g = seed_everything(0); tr, _, _ = loaders(D, 64, g, 'cpu', max_train=128)
    model = joint_model(D.shapes, 10)
    fit(model, Mixup(), tr, epochs=2, optimizer=torch.optim.SGD(model.parameters(), 0.05, momentum=0.9), select_on='last', progress=False)
    assert not torch.equal(weights(model), out[0])


@pytest.mark.parametrize('official', [False, True])
def test_mmat_examples_in_eps_ball(official):
    xs, y = batch()
    torch.manual_seed(0); model = joint_model(D.shapes, 10).train()
    m = MMAT(official=official); m.bind_data(D)
    bn = model.encoders[0][1]; rm = bn.running_mean.clone()
    xa = m.adversarial(model, xs, y)
    r = torch.sqrt(sum((a - x).flatten(1).square().sum(1) for a, x in zip(xa, xs)))
    assert (r <= 0.1 + 1e-5).all() and r.mean() > (0.09 if not official else 0.01)   # theirs: shorter steps (1e-6 term)
    assert model.training                                    # mode restored
    if not official: assert xa[0].min() >= 0 and xa[0].max() <= 1 and torch.equal(bn.running_mean, rm)
    else: assert not torch.equal(bn.running_mean, rm)        # the authors' AT runs in train mode (BN stats move)
    loss, logits = m.loss(model, xs, y)
    assert loss > F.cross_entropy(model(xs).logits, y)        # adversarial loss is larger than the clean one


def _authors_at(data, labels, model, epsilon):
    "Literal transcription of the authors' generate_AT_sample (train.py): batch-mean CE, per-sample sqrt(|g|² + 1e-6)."
    alpha = epsilon / 5; batch_size = data[0].shape[0]
    data_adv = [data[v].clone().detach() for v in range(2)]
    for t in range(5):
        for v in range(2): data_adv[v].requires_grad = True
        preds_iter = model(data_adv[0], data_adv[1]).logits
        model.zero_grad()
        err = torch.nn.CrossEntropyLoss()(preds_iter, labels); err.backward()
        grad = [data_adv[v].grad.data.reshape(batch_size, -1) for v in range(2)]
        grad_norm = (torch.norm(grad[0], dim=1) ** 2).reshape((batch_size, 1)) + (torch.norm(grad[1], dim=1) ** 2).reshape((batch_size, 1))
        grad_norm = torch.sqrt(grad_norm + 1e-6)
        for v in range(2):
            grad[v] = (grad[v] / grad_norm.expand(grad[v].shape)).view(data[v].shape)
            i_adv = data_adv[v].detach() + alpha * grad[v]
            eta = torch.clamp(i_adv - data[v], min=-epsilon * 2, max=epsilon * 2)
            data_adv[v] = (data[v] + eta).detach()
    return data_adv[0], data_adv[1]


@pytest.mark.parametrize('head,eps', [('concat', 0.1), ('orth', 0.5)])
def test_official_at_sample_equals_authors_formula(head, eps):
    xs, y = batch()
    torch.manual_seed(1); model = joint_model(D.shapes, 10, head=head).train()
    with torch.no_grad():                                   # small input gradients, as on a trained model: the 1e-6 matters
        if head == 'orth': model.a.mul_(1e-2)
        else: [lin.weight.mul_(1e-2) for lin in model.fcs]
    twin = copy.deepcopy(model)
    ours, theirs = official_at_sample(model, xs, y, eps), _authors_at(xs, y, twin, eps)
    for a, b in zip(ours, theirs): fct.test_close(a, b, eps=1e-6)
    for k, v in model.state_dict().items(): fct.test_close(v.float(), twin.state_dict()[k].float(), eps=1e-6)  # BN stats too
    m = MMAT(official=True, eps=eps); m.bind_data(D)
    via = m.adversarial(copy.deepcopy(twin), xs, y)
    for a, b in zip(via, _authors_at(xs, y, copy.deepcopy(twin), eps)): fct.test_close(a, b, eps=1e-6)
    r = lambda xa: torch.sqrt(sum((a - x).flatten(1).square().sum(1) for a, x in zip(xa, xs)))
    rp = r(pgd_l2(copy.deepcopy(twin), xs, y, eps, steps=5, alpha=eps / 5))
    assert (r(ours) <= eps + 1e-6).all() and r(ours).median() < 0.9 * rp.median()      # not the proper PGD


def test_at_sample_switch_alone_is_the_authors_sampler():
    "CRMT-AT with at_sample='official' (nothing else official) draws exactly the authors' AT examples."
    xs, y = batch()
    torch.manual_seed(2); model = joint_model(D.shapes, 10, head='orth').train()
    m = METHODS['CRMT-AT'](at_sample='official', eps=0.3); m.bind_data(D)
    assert not m.official and m.orth == 'orthonormal' and m.step2_recipe == 'ours'
    for a, b in zip(m.adversarial(copy.deepcopy(model), xs, y), _authors_at(xs, y, copy.deepcopy(model), 0.3)):
        fct.test_close(a, b, eps=1e-6)
    fct.test_eq(METHODS['CRMT-AT'](official=True).at_sample, 'official')
    fct.test_fail(lambda: MMAT(at_sample='fgsm'), contains="at_sample must be 'pgd' or 'official'")


def test_at_budget_is_a_checked_option():
    xs, y = batch()
    torch.manual_seed(0); model = joint_model(D.shapes, 10, head='orth').train()
    for make in (lambda **k: MMAT(**k), lambda **k: METHODS['CRMT-AT'](**k)):
        m = make(eps=0.5); m.bind_data(D)
        fct.test_eq(check_at_budget(m.eps, m.steps, m.step_size), (0.5, 5, 0.1))          # α = ε/steps by default
        r = torch.sqrt(sum((a - x).flatten(1).square().sum(1) for a, x in zip(m.adversarial(model, xs, y), xs)))
        assert (r <= 0.5 + 1e-5).all() and r.mean() > 0.45
        m3 = make(eps=0.3, steps=2, step_size=0.05); m3.bind_data(D)
        r3 = torch.sqrt(sum((a - x).flatten(1).square().sum(1) for a, x in zip(m3.adversarial(model, xs, y), xs)))
        assert (r3 <= 0.1 + 1e-5).all()                                                    # 2 steps of 0.05
        for bad, msg in [(dict(eps=-0.1), 'AT eps'), (dict(eps=float('inf')), 'AT eps'), (dict(steps=0), 'AT steps'),
                         (dict(steps=1.5), 'AT steps'), (dict(step_size=0.0), 'AT step_size'), (dict(eps='0.1'), 'AT eps')]:
            fct.test_fail(lambda: make(**bad), contains=msg)


def test_crmt_a_init_and_l1_floor_options():
    for name in ('CRMT-JT', 'CRMT-AT', 'CRMT-Mix', 'OJT', 'CRMT-step1', 'CRMT-step2'):
        fct.test_eq(METHODS[name]().a_init, 0.1)
        fct.test_eq(METHODS[name](a_init=1.0).a_init, 1.0)
        fct.test_eq(METHODS[name](a_init=1.0, official=True).a_init, 0.1)                 # official keeps the authors' 0.1
    m = METHODS['CRMT-JT'](a_init=0.7)
    model = joint_model(D.shapes, 10, head=m.head, orth=m.orth, a_init=m.a_init)
    fct.test_eq(model.integration.detach(), torch.full((2, 10), 0.7))
    fct.test_fail(lambda: METHODS['CRMT-JT'](a_init=float('nan')), contains='a_init must be a finite number')
    xs, y = batch(32)
    model.eval()
    for floor in (None, 1e-5, 1e-2):
        c = METHODS['CRMT-step1'](l1_floor=floor); c.loss(model, xs, y)
        fct.test_close(c.terms['margin'], margin_loss(model(xs).unimodal, y, floor=floor), eps=1e-6)


def test_build_model_uses_method_a_init():
    m = METHODS['CRMT-JT'](a_init=1.0)
    fct.test_eq(build_model(m, D.shapes, 10).integration.detach(), torch.ones(2, 10))


def test_crmt_at_margin_term_is_l1_on_adversarial_batch():
    xs, y = batch()
    m = METHODS['CRMT-AT'](); m.bind_data(D)
    torch.manual_seed(0); model = build_model(m, D.shapes, 10).train()
    twin = copy.deepcopy(model)                              # the state the attack saw (the loss's forward moves BN stats)
    loss, _ = m.loss(model, xs, y)
    xa = m.adversarial(twin, xs, y)
    out = twin(xa)
    fct.test_close(m.terms['margin'], margin_loss(out.unimodal, y), eps=1e-5)
    fct.test_close(loss, F.cross_entropy(out.logits, y) + 2.0 * margin_loss(out.unimodal, y), eps=1e-5)
    with torch.no_grad(): assert abs(float(m.terms['margin'] - margin_loss(model(xs).unimodal, y))) > 1e-4


@pytest.mark.parametrize('official', [False, True])
def test_crmt_step2_changes_only_a_and_raises_bound(official):
    g = seed_everything(0)
    tr, _, _ = loaders(D, 64, g, 'cpu', max_train=192)
    m = METHODS['CRMT-step1'](official=official)
    model = build_model(m, D.shapes, 10)
    fit(model, m, tr, epochs=2, optimizer=torch.optim.Adam(model.parameters(), 3e-3), select_on='last', progress=False)
    one = [next(iter(tr))]                                   # step 2 on one training batch
    xs, y = one[0]
    s2 = CRMTStep2(epochs=10, official=official, optimizer='sgd', lr=0.01 if not official else 1e-6,
                   weight_decay=0.0 if not official else 1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage2 = type('S2', (CRMT,), {'next_stage': lambda self: s2})(rho=0, official=official)
    fit(model, stage2, one, epochs=0, optimizer=torch.optim.SGD(model.parameters(), 0.0), select_on='last', progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert 'a' in changed
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == {'a'}                                  # encoders and W̃ untouched
    if not official: fct.test_eq(changed, {'a'})                     # and BN statistics too (eval-mode BN)
    if official: fct.test_eq(s2.tau[1], torch.zeros(10))             # the authors' get_lip: audio τ ≡ 0
    # the mean bound it optimises, on that batch, with its τ̃ and its BN mode (official: train mode), did not go down
    model.train(s2.train_bn)
    with torch.no_grad():
        uni = model(xs).unimodal
        kw = dict(j=s2.j, samples=s2.samples, abs_a=not official)
        r_after = -bound_loss(model, uni, y, s2.tau, **kw)
        a_now = model.a.detach().clone(); model.a.data.copy_(before['a'])
        r_before = -bound_loss(model, uni, y, s2.tau, **kw)
        model.a.data.copy_(a_now)
    assert r_after > r_before, (r_before, r_after)


def test_msefm_exfm_defence():
    g = seed_everything(0)
    tr, va, _ = loaders(D, 64, g, 'cpu', max_train=256, max_eval=64)
    model = joint_model(D.shapes, 10)
    m = MSEFM(n_atoms=128, ista_iters=100)
    fit(model, m, tr, va, epochs=1, optimizer=torch.optim.Adam(model.parameters(), 3e-3), progress=False)
    fct.test_eq([tuple(d.shape) for d in m.dicts], [(128, 64), (128, 64)])
    xs, y = batch(32, 1)
    with torch.no_grad():
        plain = model(xs).logits
        assert not torch.allclose(m.predict(model, xs), plain, atol=1e-4)
        m.mix = 0.0; fct.test_close(m.predict(model, xs), plain, eps=1e-5)


@pytest.mark.parametrize('name', ['JT', 'CRMT-step1'])
def test_mmt_model_kind_trains_above_chance(name):
    "model='mmt' (CRMT Table 3): the config's transformer is built, with the method's head, and trains."
    from crmt_nb.models import MMT
    cfg = train_config('smoke', name, epochs=3, max_train=512, lr=3e-3, model='mmt',
                       model_options=dict(dim=16, patch=(4, 5), chunk=4))
    t = train_model(D, cfg, seed=0, device='cpu', progress=False)
    assert isinstance(t.model, MMT) and t.model.head == METHODS[name].head
    fct.test_eq([s.n_tokens for s in t.model.encoders], [12, 19])
    assert t.history.valid_acc.max() > 0.25, t.history          # chance is 0.1
    fct.test_eq(t.history.stage.max(), 1)                         # CRMT-step1: no step 2
