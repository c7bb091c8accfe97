"""The training loop: determinism, exact resume, NaN guard, selection, checkpoints, config, model cache."""
import pytest, torch
import fastcore.test as fct
from crmt_nb.core import seed_everything, load_torch, content_hash
from crmt_nb.data import mfeat
from crmt_nb.train import fit, loaders, accuracy, Method
from crmt_nb.experiment import train_config, train_model, get_or_train, optimizer_of, scheduler_of, NOT_TRAINING_CODE
from crmt_nb.core import library_hash
from crmt_nb.methods import METHODS, build_model

D = mfeat(('pix', 'fou'))


def small_cfg(method, **kw):
    return train_config('smoke', method, **{'epochs': 2, 'max_train': 128, 'lr': 3e-3, **kw})


def weights(model):
    return torch.cat([v.detach().flatten().float() for v in model.state_dict().values()])


@pytest.mark.parametrize('name', ['Mixup', 'OGM'])
def test_same_seed_same_weights(name):
    a = train_model(D, small_cfg(name), seed=3, device='cpu', progress=False)
    b = train_model(D, small_cfg(name), seed=3, device='cpu', progress=False)
    c = train_model(D, small_cfg(name), seed=4, device='cpu', progress=False)
    fct.test_eq(weights(a.model), weights(b.model))
    assert not torch.equal(weights(a.model), weights(c.model))


class Interrupt(Exception): pass


def _run(name, ckpt, stop_at=None, **opts):
    "Train `name` for 3 (+2 step-2) epochs; optionally raise at the start of (stage, epoch) = stop_at."
    cfg = small_cfg(name, epochs=3, step2_epochs=2, **opts) if name.startswith('CRMT') else small_cfg(name, epochs=3, **opts)
    g = seed_everything(0)
    method = METHODS[name](**cfg['options'])
    model = build_model(method, D.shapes, 10)
    tr, va, _ = loaders(D, 64, g, 'cpu', max_train=128, max_eval=64)
    stages = [method] + ([method.next_stage()] if method.next_stage() else [])
    if stop_at is not None:
        st = stages[stop_at[0]]; orig = st.on_epoch_start
        def hook(ctx, st=st, orig=orig):
            if (ctx.stage, ctx.epoch) == stop_at and not getattr(st, '_stopped', False):
                st._stopped = True; raise Interrupt()
            return orig(ctx)
        st.on_epoch_start = hook
    opt = optimizer_of(cfg, model.parameters())
    return model, fit(model, method, tr, va, epochs=3, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                      ckpt_dir=ckpt, resume=True, seed=0, progress=False)


@pytest.mark.parametrize('name,stop_at', [('Mixup', (0, 2)), ('CRMT-Mix', (1, 1))])
def test_resume_equals_uninterrupted(tmp_path, name, stop_at):
    m_full, h_full = _run(name, tmp_path / 'full')
    with pytest.raises(Interrupt): _run(name, tmp_path / 'cut', stop_at)
    ck = load_torch(tmp_path / 'cut' / 'last.pt')            # weights_only=True load of a real checkpoint
    fct.test_eq((ck['stage'], ck['epoch']), stop_at)
    # a fresh process would build a fresh model (other init) and resume from the checkpoint
    torch.manual_seed(123)
    m_res, h_res = _run(name, tmp_path / 'cut')
    fct.test_eq(weights(m_res), weights(m_full))
    cols = ['stage', 'epoch', 'loss', 'acc', 'valid_acc', 'selected']
    fct.test_eq(h_res[cols].values.tolist(), h_full[cols].values.tolist())


def test_nan_guard_names_epoch_and_batch():
    g = seed_everything(0)
    tr, _, _ = loaders(D, 32, g, 'cpu', max_train=128)
    batches = [((xs[0], xs[1] * (float('inf') if b == 2 else 1.0)), y) for b, (xs, y) in enumerate(tr)]
    model = build_model(Method(), D.shapes, 10)
    fit(model, Method(), batches[:2], epochs=1, optimizer=torch.optim.SGD(model.parameters(), 1e-3), select_on='last', progress=False)
    with pytest.raises(FloatingPointError, match=r'epoch 1, batch 2'):
        fit(model, Method(), batches, epochs=1, optimizer=torch.optim.SGD(model.parameters(), 1e-3), select_on='last', progress=False)


def test_selection_on_valid_and_options():
    g = seed_everything(0)
    tr, va, te = loaders(D, 64, g, 'cpu', max_train=128, max_eval=100)
    model = build_model(Method(), D.shapes, 10)
    h = fit(model, Method(), tr, va, epochs=4, optimizer=torch.optim.SGD(model.parameters(), 0.2, momentum=0.9),
            test_dl=te, progress=False)
    best = h.loc[h.valid_acc.idxmax()]
    assert bool(best.selected) and h.selected.sum() == 1
    fct.test_close(accuracy(model, va), best.valid_acc, eps=1e-9)      # the model holds the selected weights
    fct.test_close(accuracy(model, te), best.test_acc, eps=1e-9)
    fct.test_fail(lambda: fit(model, Method(), tr, None, epochs=1, optimizer=torch.optim.SGD(model.parameters(), 0)), contains="needs valid_dl")
    fct.test_fail(lambda: fit(model, Method(), tr, va, epochs=1, select_on='test', optimizer=torch.optim.SGD(model.parameters(), 0)), contains='needs test_dl')
    fct.test_fail(lambda: fit(model, Method(), tr, va, epochs=1, select_on='best', optimizer=torch.optim.SGD(model.parameters(), 0)), contains="'valid', 'test' or 'last'")


def test_train_config_paper_values():
    c = train_config('paper', 'CRMT-JT')
    fct.test_eq({k: c[k] for k in ('optimizer', 'lr', 'momentum', 'weight_decay', 'epochs', 'lr_step', 'lr_gamma', 'batch_size')},
                dict(optimizer='sgd', lr=1e-3, momentum=0.9, weight_decay=1e-4, epochs=140, lr_step=60, lr_gamma=0.1, batch_size=64))
    m = METHODS['CRMT-JT'](**c['options'])
    fct.test_eq((m.rho, m.next_stage().epochs), (2.0, 45))
    s2 = METHODS['CRMT-JT'](**{**c['options'], 'official': True}).next_stage()
    fct.test_close(s2.lr, 3e-5, eps=1e-12)
    fct.test_eq((s2.weight_decay, s2.momentum, s2.train_bn, s2.recreate_optimizer), (1e-2, 0.9, True, True))
    opt = optimizer_of(c, build_model(m, D.shapes, 10).parameters())
    assert isinstance(opt, torch.optim.SGD) and isinstance(scheduler_of(c, opt), torch.optim.lr_scheduler.StepLR)
    # an override of an option and of the epochs; unknown names fail
    fct.test_eq(train_config('mini', 'OGM', alpha=0.8)['options']['alpha'], 0.8)
    fct.test_eq(train_config('mini', 'OGM', epochs=14)['options']['window'], (0, 5))
    fct.test_fail(lambda: train_config('mini', 'XYZ'), contains='unknown method')
    fct.test_fail(lambda: train_config('mini', 'OGM', alpah=0.1), contains="has no option 'alpah'")


def test_get_or_train_caches(tmp_path):
    cfg = small_cfg('MSEFM', epochs=1, ista_iters=20)
    t1 = get_or_train(D, 'MSEFM', cfg, seed=0, profile='smoke', device='cpu', root=tmp_path, progress=False)
    files = sorted(p.name for p in (tmp_path / 'models').rglob('*.pt'))
    t2 = get_or_train(D, 'MSEFM', cfg, seed=0, profile='smoke', device='cpu', root=tmp_path, progress=False)
    fct.test_eq(weights(t1.model), weights(t2.model))
    assert t2.method.dicts is not None                        # the method's learned state is cached too
    xs, y = D.test[torch.arange(50)]
    with torch.no_grad(): fct.test_eq(t1.predictor(xs), t2.predictor(xs))
    fct.test_eq(sorted(p.name for p in (tmp_path / 'models').rglob('*.pt')), files)
    key = {**cfg, 'code': library_hash(NOT_TRAINING_CODE),                 # the key, written out: config, code, data
           'data': {'shapes': D.shapes, 'n_classes': D.n_classes, 'sizes': (len(D.train), len(D.valid))}}
    fct.test_eq(files, [f'{content_hash(key)}-seed0.pt'])        # the resumable training checkpoints were removed
    fct.test_fail(lambda: get_or_train(D, 'JT', cfg, root=tmp_path), contains="config is for method 'MSEFM'")


def _weights_at(threads, cfg):
    torch.set_num_threads(threads)          # the caller's thread count, which training must not depend on
    return weights(train_model(D, cfg, seed=3, device='cpu', progress=False).model)

def test_same_weights_whatever_the_callers_thread_count():
    "Training runs under cfg['cpu_threads'], so processes with different thread settings train identical models."
    before = torch.get_num_threads()
    try:
        cfg = small_cfg('JT', epochs=3, max_train=256)
        assert cfg['cpu_threads'] == 1
        fct.test_eq(_weights_at(2, cfg), _weights_at(1, cfg))
        assert torch.get_num_threads() == 1      # restored to the caller's count
    finally: torch.set_num_threads(before)


# --- step 2 semantics (ours vs the authors') and the fixed-epoch model ------------------------------------------

def _crmt_run(official, select_on='valid', last=None):
    """CRMT-JT, 3 step-1 + 2 step-2 epochs, selected on a label-shifted validation split (the better the model, the
    lower its score: selection keeps an early step-1 epoch). Returns the model, the history, the step-1 weights after
    each epoch and the weights step 2 started from."""
    g = seed_everything(0)
    tr, va, _ = loaders(D, 64, g, 'cpu', max_train=128, max_eval=100)
    anti = [(xs, (y + 1) % 10) for xs, y in va]
    method = METHODS['CRMT-JT'](official=official, step2_epochs=2, step2_optimizer='adam', step2_lr=1e-2, base_lr=3e-3)
    model = build_model(method, D.shapes, 10)
    snaps, start = [], {}
    method.on_epoch_end = lambda ctx: snaps.append({k: v.clone() for k, v in ctx.model.state_dict().items()}) or {}
    s2 = method.next_stage(); orig = s2.on_epoch_start
    def probe(ctx):
        if ctx.epoch == 0: start.update({k: v.clone() for k, v in ctx.model.state_dict().items()})
        return orig(ctx)
    if last is None: s2.on_epoch_start = probe            # (a probe bound to this stage would leak into fit's fresh copy)
    h = fit(model, method, tr, anti, epochs=3, optimizer=torch.optim.Adam(model.parameters(), 3e-3), select_on=select_on,
            seed=0, progress=False, last=last)
    return model, h, snaps, start


def _same(a: dict, b: dict) -> bool: return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('official', [False, True])
def test_step2_start_and_keep(official):
    model, h, snaps, start = _crmt_run(official)
    s1 = h[h.stage == 1]
    sel1 = int(s1.valid_acc.values.argmax())                  # the best step-1 epoch (first of ties, as `select`)
    assert sel1 != len(snaps) - 1                              # it is not the last one: the two rules differ here
    # ours starts step 2 from the selected step-1 epoch, the authors' from the last one
    assert _same(start, snaps[-1] if official else snaps[sel1])
    assert not _same(start, snaps[sel1] if official else snaps[-1])
    if official:        # one selection over both steps: the kept epoch is the best of all five
        fct.test_eq(h.selected.sum(), 1)
        best = h.loc[h.valid_acc.idxmax()]
        assert best.selected
        if best.stage == 1: assert _same(model.state_dict(), snaps[int(best.epoch) - 1])    # a step-1 epoch kept
    else:               # one per step, and the model ends with a step-2 epoch (its a differs from step 1's)
        fct.test_eq(h.groupby('stage').selected.sum().tolist(), [1, 1])
        assert not torch.equal(model.integration.detach(), snaps[sel1]['a'])


def test_official_can_keep_a_step1_epoch():
    "The label-shifted split makes the least trained epochs best: the authors' rule keeps step 1's first epoch."
    model, h, snaps, _ = _crmt_run(True)
    sel = h[h.selected.astype(bool)]
    fct.test_eq((int(sel.stage.iloc[0]), int(sel.epoch.iloc[0])), (1, int(h[h.stage == 1].valid_acc.values.argmax()) + 1))
    assert _same(model.state_dict(), snaps[int(sel.epoch.iloc[0]) - 1])
    d_model, d_h, _, _ = _crmt_run(False)                     # ours always ends in step 2
    assert d_h[d_h.selected.astype(bool)].stage.max() == 2


@pytest.mark.parametrize('official', [False, True])
def test_fixed_epoch_model_is_what_select_last_trains(official):
    lt = {}
    _crmt_run(official, last=lt)
    m_last, h_last, _, _ = _crmt_run(official, select_on='last')
    assert _same(lt['model'], m_last.state_dict())
    fct.test_eq(len(lt['history']), 0 if official else 2)     # ours re-ran step 2 from the last step-1 epoch


def test_fixed_epoch_of_a_one_stage_method_and_the_cache(tmp_path):
    cfg = small_cfg('MSEFM', epochs=3, ista_iters=20)
    t = get_or_train(D, 'MSEFM', cfg, seed=0, profile='smoke', device='cpu', root=tmp_path, progress=False)
    tl = get_or_train(D, 'MSEFM', cfg, seed=0, profile='smoke', device='cpu', root=tmp_path, progress=False, checkpoint='last')
    ref = train_model(D, {**cfg, 'select_on': 'last'}, seed=0, device='cpu', progress=False)
    fct.test_eq(weights(tl.model), weights(ref.model))
    fct.test_eq(tl.method.dicts, ref.method.dicts)            # the ExFM dictionaries of the last epoch's model
    fct.test_eq(len(list((tmp_path / 'models').rglob('*.pt'))), 1)   # one training, one cache entry, two models
    fct.test_fail(lambda: get_or_train(D, 'MSEFM', cfg, root=tmp_path, checkpoint='best'), contains="'selected' or 'last'")
