"""Property tests of crmt_nb.models and crmt_nb.paper_models: the papers' ResNet-18 encoders, paper_model, the MMT,
the two heads, a_init, and that crmt_nb.models (hence the attacks) loads without torchvision."""
import subprocess, sys, math
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from crmt_nb.models import JointModel, MMOutput, MMT, joint_model, rownorm
from crmt_nb.paper_models import (ClipEncoder, SpectrogramEncoder, mmt_model, paper_model, resnet18_encoder,
                                  PAPER_DATASETS, IMAGENET_MEAN, IMAGENET_STD)

TINY = dict(frame_size=32, n_frames=2, spec_shape=(32, 16), patch=8, dim=32, depth_modality=1, depth_joint=1, heads=2)

def clip(b=2, c=3, t=3, s=64, seed=0):
    return torch.rand(b, c, t, s, s, generator=torch.Generator().manual_seed(seed))

def spec(b=2, h=128, w=32, seed=1):
    return torch.randn(b, 1, h, w, generator=torch.Generator().manual_seed(seed))

# ---------------------------------------------------------------- ResNet-18 encoders
@pytest.mark.parametrize('modality,x', [('visual', clip()), ('flow', clip(c=2)), ('audio', spec())])
def test_encoder_shapes(modality, x):
    enc = resnet18_encoder(modality).eval()
    with torch.no_grad(): fct.test_eq(enc(x).shape, (2, 512))
    fct.test_eq(enc.trunk.conv1.in_channels, x.shape[1])
    # the trunk is torchvision's ResNet-18 (BasicBlock, 2-2-2-2), not a copy
    from torchvision.models.resnet import ResNet, BasicBlock
    assert isinstance(enc.trunk, ResNet) and isinstance(enc.trunk.layer4[1], BasicBlock)
    fct.test_eq([len(getattr(enc.trunk, f'layer{i}')) for i in range(1, 5)], [2, 2, 2, 2])

def test_audio_feature_map_matches_paper_geometry():
    "(1024, 128) spectrogram → (512, 32, 4) feature map as in crmt-spec §1.2 (checked on a 1-sample batch)."
    enc = resnet18_encoder('audio').eval()
    with torch.no_grad(): fct.test_eq(enc.trunk(torch.randn(1, 1, 1024, 128)).shape, (1, 512, 32, 4))

@pytest.mark.parametrize('seed', [0, 1])
def test_clip_fold_unfold_equals_frame_by_frame(seed):
    "Folding T into the batch = running the trunk per frame, stacking, 3-D average over (T, h, w)."
    torch.manual_seed(seed)
    enc = resnet18_encoder('visual').eval()
    x = clip(b=3, t=3, seed=seed)
    x[1] = x[1].flip(1)           # frames differ per sample, so a batch/time mix-up would show
    with torch.no_grad():
        fm = enc.frames(x)
        fct.test_eq(fm.shape, (3, 512, 3, 2, 2))
        for t in range(3):
            fct.test_close(fm[:, :, t], enc.trunk(enc.norm(x[:, :, t])), eps=1e-5)
        ref = torch.stack([enc.trunk(enc.norm(x[:, :, t])).mean((2, 3)) for t in range(3)], 1).mean(1)
        fct.test_close(enc(x), ref, eps=1e-5)
        # per-sample: sample b depends only on clip b
        fct.test_close(enc(x[1:2]), enc(x)[1:2], eps=1e-5)

def test_normalisation_inside_the_model():
    "The visual encoder's first layer is ImageNet normalisation; flow uses 0.1307/0.3081; audio is the identity."
    v, f, a = (resnet18_encoder(m) for m in ('visual', 'flow', 'audio'))
    fct.test_close(v.norm.mean, torch.tensor(IMAGENET_MEAN)); fct.test_close(v.norm.std, torch.tensor(IMAGENET_STD))
    fct.test_close(f.norm.mean, torch.tensor([0.1307])); fct.test_close(f.norm.std, torch.tensor([0.3081]))
    assert isinstance(a.norm, nn.Identity)
    x = torch.full((1, 3, 1, 2, 2), 0.485)
    fct.test_close(v.norm(x)[:, 0], torch.zeros(1, 1, 2, 2), eps=1e-6)

@pytest.mark.parametrize('dataset', list(PAPER_DATASETS))
@pytest.mark.parametrize('head', ['concat', 'orth'])
def test_paper_model(dataset, head):
    torch.manual_seed(0)
    m = paper_model(dataset, head=head).eval()
    K = {'ks': 31, 'ucf101': 101, 'vggsound': 309}[dataset]
    fct.test_eq(m.n_classes, K); assert isinstance(m, JointModel)
    xs = (clip(b=1, t=2, s=32), clip(b=1, c=2, t=2, s=32) if dataset == 'ucf101' else spec(b=1, h=64, w=32))
    with torch.no_grad(): out = m(xs)
    assert isinstance(out, MMOutput)
    fct.test_eq(out.logits.shape, (1, K)); fct.test_eq([f.shape for f in out.features], [(1, 512), (1, 512)])
    fct.test_eq(paper_model('vggsound', n_classes=310).n_classes, 310)

def test_pretrained_and_bad_names_raise():
    fct.test_fail(lambda: paper_model('ks', pretrained=True), contains='load a state_dict')
    fct.test_fail(lambda: resnet18_encoder('rgb'), contains="expected one of ['visual', 'flow', 'audio']")
    fct.test_fail(lambda: paper_model('kinetics'), contains='unknown dataset')

@pytest.mark.parametrize('modality,x,msg', [
    ('visual', torch.rand(2, 3, 32, 32), '5-D input (B, C, T, H, W) with C=3'),
    ('visual', torch.rand(2, 1, 2, 32, 32), 'with C=3, got shape (2, 1, 2, 32, 32)'),
    ('flow', torch.rand(2, 3, 2, 32, 32), 'with C=2'),
    ('audio', torch.randn(2, 64, 32), 'x.unsqueeze(1)'),
    ('audio', torch.randn(2, 2, 64, 32), '4-D input (B, C, H, W) with C=1')])
def test_wrong_rank_or_channels(modality, x, msg):
    fct.test_fail(lambda: resnet18_encoder(modality)(x), contains=msg)

def test_channels_last_same_output():
    "channels_last model/inputs (4-D; channels_last_3d for clips) give the same features as contiguous ones."
    torch.manual_seed(0)
    for modality, x, fmt in [('audio', spec(), torch.channels_last), ('visual', clip(s=32), torch.channels_last_3d),
                             ('flow', clip(c=2, s=32), torch.channels_last_3d)]:
        enc = resnet18_encoder(modality).eval()
        with torch.no_grad():
            ref = enc(x)
            cl = resnet18_encoder(modality).eval(); cl.load_state_dict(enc.state_dict())
            cl = cl.to(memory_format=torch.channels_last)
            assert cl.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            fct.test_close(cl(x.contiguous(memory_format=fmt)), ref, eps=1e-4)
            fct.test_close(cl(x), ref, eps=1e-4)
            fct.test_close(enc(x.contiguous(memory_format=fmt)), ref, eps=1e-4)

def test_resnet_backward_in_train_mode():
    torch.manual_seed(0)
    m = paper_model('ks', head='orth').train()
    out = m(clip(b=2, t=2, s=32), spec(b=2, h=64, w=32))
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 3])).backward()
    for enc in m.encoders: assert enc.trunk.conv1.weight.grad.abs().sum() > 0
    assert m.a.grad is not None

# ---------------------------------------------------------------- MMT
@pytest.mark.parametrize('head,orth', [('concat', 'rownorm'), ('orth', 'rownorm'), ('orth', 'orthonormal')])
def test_mmt_forward_backward(head, orth):
    torch.manual_seed(0)
    m = mmt_model('vggsound', head=head, orth=orth, n_classes=7, **TINY)
    assert isinstance(m, MMT) and isinstance(m, JointModel)
    xs = (torch.rand(4, 3, 2, 32, 32), torch.randn(4, 1, 32, 16))
    out = m(xs)
    fct.test_eq(out.logits.shape, (4, 7)); fct.test_eq([f.shape for f in out.features], [(4, 32), (4, 32)])
    # JointModel's head contract: h = Σ a ⊙ (W φ) + b, unimodal = W φ
    fct.test_close(out.logits, sum(a * s for a, s in zip(m.integration, out.unimodal)) + m.bias, eps=1e-5)
    for s, f, w in zip(out.unimodal, out.features, m.head_weights()): fct.test_close(s, f @ w.t(), eps=1e-5)
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    for p in (m.encoders[0].embed.weight, m.encoders[0].cls, m.encoders[0].pos, m.encoders[1].embed.weight,
              m.joint[0].self_attn.in_proj_weight, m.out_norm.weight, m.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # gradients w.r.t. inputs (what the attacks need)
    xg = tuple(x.clone().requires_grad_() for x in xs)
    g = torch.autograd.grad(m(xg).logits.sum(), xg)
    assert all(gi.abs().sum() > 0 for gi in g)

def test_mmt_features_mix_modalities():
    "φ^(v) depends on the audio input through the joint layers (why the certified bounds do not apply)."
    torch.manual_seed(0)
    m = mmt_model('vggsound', n_classes=5, **TINY).eval()
    v, a = torch.rand(2, 3, 2, 32, 32), torch.randn(2, 1, 32, 16)
    with torch.no_grad(): f0, f1 = m(v, a).features, m(v, a + 1).features
    assert (f0[0] - f1[0]).abs().max() > 1e-4
    m0 = mmt_model('vggsound', n_classes=5, **{**TINY, 'depth_joint': 0}).eval()   # no joint layers: no mixing
    with torch.no_grad(): g0, g1 = m0(v, a).features, m0(v, a + 1).features
    fct.test_close(g0[0], g1[0], eps=1e-6)

def test_mmt_ucf_and_three_modalities():
    torch.manual_seed(0)
    m = mmt_model('ucf101', **TINY)
    fct.test_eq(m(torch.rand(2, 3, 2, 32, 32), torch.rand(2, 2, 2, 32, 32)).logits.shape, (2, 101))
    from crmt_nb.models import TokenStream
    s = [TokenStream((3, 2, 16, 16), 16, 8, 1, 2), TokenStream((1, 16, 8), 16, 4, 1, 2), TokenStream((1, 8, 8), 16, 4, 0, 2)]
    m3 = MMT(s, 16, 4, depth_joint=1, heads=2, head='orth')
    out = m3(torch.rand(2, 3, 2, 16, 16), torch.randn(2, 1, 16, 8), torch.randn(2, 1, 8, 8))
    fct.test_eq(out.logits.shape, (2, 4)); fct.test_eq(len(out.features), 3)

def test_mmt_bad_input():
    m = mmt_model('vggsound', n_classes=5, **TINY)
    fct.test_fail(lambda: m(torch.rand(2, 3, 2, 32, 32), torch.randn(2, 1, 16, 16)), contains='built for inputs (1, 32, 16)')
    fct.test_fail(lambda: m(torch.rand(2, 3, 32, 32), torch.randn(2, 1, 32, 16)), contains='5-D input')
    fct.test_fail(lambda: m(torch.rand(2, 3, 2, 32, 32)), contains='2 modalities but got 1')

@pytest.mark.parametrize('builder', [lambda: mmt_model('vggsound', head='orth', n_classes=6, **TINY),
                                     lambda: paper_model('ks', n_classes=6)])
def test_determinism_under_seed(builder):
    "Same seed → same parameters and bit-identical outputs; another seed → different parameters."
    xs = lambda m: ((torch.rand(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(5)),
                     torch.randn(2, 1, 32, 16, generator=torch.Generator().manual_seed(6))))
    outs, params = [], []
    for seed in (0, 0, 1):
        torch.manual_seed(seed); m = builder().eval()
        with torch.no_grad(): outs.append(m(xs(m)).logits)
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    fct.test_eq(outs[0], outs[1]); fct.test_eq(params[0], params[1])
    assert not torch.equal(params[0], params[2])

# ---------------------------------------------------------------- orth head constraints survive training
@pytest.mark.parametrize('orth', ['rownorm', 'orthonormal'])
@pytest.mark.parametrize('M', [2, 3])
def test_orth_constraints_after_optimizer_steps(orth, M):
    torch.manual_seed(0)
    K = 31
    m = joint_model([(40,)] * M, K, head='orth', orth=orth, d_feat=64)
    before = [w.detach().clone() for w in m.head_weights()]
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        xs = tuple(torch.randn(32, 40, generator=g) for _ in range(M)); y = torch.randint(0, K, (32,), generator=g)
        opt.zero_grad(); nn.functional.cross_entropy(m(xs).logits, y).backward(); opt.step()
    for w, w0 in zip(m.head_weights(), before):
        w = w.detach()
        assert (w - w0).abs().max() > 1e-3, 'head weights did not move: no gradient through the parametrisation'
        fct.test_close(w.norm(dim=1), torch.ones(K), eps=1e-5)
        if orth == 'orthonormal': fct.test_close(w @ w.t(), torch.eye(K), eps=1e-5)
        else:
            fct.test_close(w.mean(1), torch.zeros(K), eps=1e-6)
            assert (w @ w.t() - torch.eye(K)).abs().max() > 1e-3       # rownorm rows are NOT mutually orthogonal
    assert (m.integration.detach() - 0.1).abs().max() > 0              # a^(m) is trained too

def test_rownorm_closed_form():
    w = torch.randn(5, 9, dtype=torch.float64)
    c = w - w.mean(1, keepdim=True)
    fct.test_close(rownorm(w), c / c.norm(dim=1, keepdim=True), eps=1e-12)


# ---------------------------------------------------------------- the chapter split and a_init
def test_models_and_attacks_load_without_torchvision():
    code = ('import sys, crmt_nb.models, crmt_nb.attacks, crmt_nb.losses\n'
            'assert "torchvision" not in sys.modules, "crmt_nb.models imports torchvision"\n'
            'from crmt_nb.models import JointModel, MMOutput, logits_of\n'
            'assert "torchvision" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('first', ['crmt_nb.paper_models', 'crmt_nb.models'])
def test_paper_models_import_in_either_order(first):
    "No import cycle between models and paper_models."
    subprocess.run([sys.executable, '-c', f'import {first}, crmt_nb.paper_models, crmt_nb.models, crmt_nb.methods'], check=True)


@pytest.mark.parametrize('a_init', [0.1, 1.0, -0.5])
def test_a_init_reaches_the_model(a_init):
    fct.test_eq(joint_model([(6,), (5,)], 4, head='orth', a_init=a_init).integration.detach(), torch.full((2, 4), a_init))
    fct.test_eq(JointModel([nn.Identity()] * 3, [4] * 3, 5, head='orth', a_init=a_init).integration.detach(), torch.full((3, 5), a_init))
    fct.test_eq(paper_model('ks', head='orth', a_init=a_init).integration.detach(), torch.full((2, 31), a_init))
    fct.test_eq(mmt_model('vggsound', head='orth', n_classes=7, a_init=a_init, **TINY).integration.detach(), torch.full((2, 7), a_init))
    fct.test_eq(joint_model([(6,), (5,)], 4, head='orth').integration.detach(), torch.full((2, 4), 0.1))   # default: the authors'
    for bad in (float('nan'), float('inf'), '1', True):
        fct.test_fail(lambda: joint_model([(6,), (5,)], 4, head='orth', a_init=bad), contains='a_init')


# ---------------------------------------------------------------- the mini MMT (vector tokens, padding, uni-modal scores)
from crmt_nb.models import TokenStream, small_mmt
from crmt_nb.losses import margin_loss

MFEAT = [(1, 16, 15), (76,)]          # mfeat pix (a 16×15 digit) and fou (76 coefficients)


@pytest.mark.parametrize('d,chunk', [(76, 4), (76, 8), (47, 5), (6, 6), (10, 3)])
def test_vector_stream_chunks_are_linear_in_consecutive_features(d, chunk):
    "Token i of a vector is W_e · x[i·p:(i+1)·p] (zero-padded) + b_e + pos_i: a linear embedding of chunk i only."
    torch.manual_seed(d + chunk)
    s = TokenStream((d,), 8, chunk, depth=0)
    n = math.ceil(d / chunk)
    fct.test_eq(s.n_tokens, n)
    x = torch.randn(3, d)
    ref = nn.functional.pad(x, (0, n * chunk - d)).view(3, n, chunk) @ s.embed.weight.view(8, chunk).t() + s.embed.bias
    fct.test_close(s(x)[:, 1:], ref + s.pos[:, 1:], eps=1e-5)
    fct.test_close(s(x)[:, 0], s.cls[:, 0].expand(3, -1) + s.pos[:, 0], eps=1e-6)


@pytest.mark.parametrize('patch,chunk', [(4, 8), ((4, 5), 4), (3, 5), ((5, 4), 19)])
def test_small_mmt_sees_every_pixel_and_feature(patch, chunk):
    "Edges are zero-padded, never dropped: the fused logits have a non-zero gradient w.r.t. every input entry."
    torch.manual_seed(0)
    m = small_mmt(MFEAT, 10, patch=patch, chunk=chunk).eval()
    xs = (torch.rand(4, 1, 16, 15, requires_grad=True), torch.randn(4, 76, requires_grad=True))
    g = torch.autograd.grad(m(xs).logits.pow(2).sum(), xs)
    for gi in g: assert (gi.abs().sum(0) > 0).all(), 'an input entry has no influence on the output'


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('head,orth', [('concat', 'rownorm'), ('orth', 'rownorm'), ('orth', 'orthonormal')])
def test_mmt_unimodal_scores_are_the_head_on_each_class_token(seed, head, orth):
    """MMOutput.unimodal[m] = W̃^(m) z_{c(m)}: the head's rows of modality m on class token m after the joint layers;
    the fused logits are Σ_m a^(m) ⊙ unimodal[m] + b; CRMT's L1 on them reaches both streams."""
    torch.manual_seed(seed)
    m = small_mmt(MFEAT, 10, head=head, orth=orth, patch=(4, 5), chunk=4, a_init=0.3 + seed).eval()
    g = torch.Generator().manual_seed(seed)
    xs = (torch.rand(5, 1, 16, 15, generator=g), torch.randn(5, 76, generator=g))
    out = m(xs)
    toks = [s(x) for s, x in zip(m.encoders, xs)]
    z = m.out_norm(m.joint(torch.cat(toks, 1)))
    cls = (z[:, 0], z[:, toks[0].shape[1]])                      # class token of pix, then of fou
    for u, c, w in zip(out.unimodal, cls, m.head_weights()): fct.test_close(u, c @ w.t(), eps=1e-5)
    fct.test_close(out.logits, sum(a * u for a, u in zip(m.integration, out.unimodal)) + m.bias, eps=1e-5)
    if orth == 'orthonormal':
        for w in m.head_weights(): fct.test_close(w @ w.t(), torch.eye(10), eps=1e-5)
    y = torch.randint(0, 10, (5,), generator=g)
    margin_loss(out.unimodal, y).backward()
    for s in m.encoders: assert s.embed.weight.grad.abs().sum() > 0


def test_mmt_unimodal_score_depends_on_the_other_modality():
    "Why CRMT step 2 does not apply to the MMT: s^(pix) moves when only fou moves (and not without joint layers)."
    for depth_joint, mixes in ((1, True), (0, False)):
        torch.manual_seed(0)
        m = small_mmt(MFEAT, 10, head='orth', orth='orthonormal', patch=(4, 5), depth_joint=depth_joint).eval()
        pix, fou = torch.rand(3, 1, 16, 15), torch.randn(3, 76)
        with torch.no_grad(): d = (m(pix, fou + 1).unimodal[0] - m(pix, fou).unimodal[0]).abs().max().item()
        assert (d > 1e-4) == mixes, (depth_joint, d)


def test_small_mmt_checks_its_inputs():
    m = small_mmt(MFEAT, 10)
    fct.test_fail(lambda: m(torch.rand(2, 1, 16, 15), torch.randn(2, 75)), contains='2-D input (B, d) with d=76')
    fct.test_fail(lambda: m(torch.rand(2, 16, 15), torch.randn(2, 76)), contains='x.unsqueeze(1)')
    fct.test_fail(lambda: small_mmt(MFEAT, 10, chunk=(1, 4)), contains='patch must be an int')
    fct.test_fail(lambda: small_mmt(MFEAT, 10, chunk=80), contains='larger than the input')
