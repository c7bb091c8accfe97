"""The paper profile end to end before any GPU hour is spent: every experiment notebook of the registry, run by
`crmt-reproduce --profile paper-dry` (the `paper` code path — the papers' loaders and augmentation, ResNet-18
encoders, the paper's attack protocol — with the budgets cut to a step or two) on generated data in every paper
layout (`make_fixtures`). The same batch is interrupted by a broken clip and resumed without retraining; the CUDA
code paths (bf16 autocast, channels-last, pinned memory, non-blocking copies) run on the CPU; and a `gpu` test
runs the dry run on CUDA where there is one."""
import json, os, shutil, subprocess, sys, time, warnings
from pathlib import Path
import pandas as pd, pytest, torch
import fastcore.test as fct
from crmt_nb.core import get_profile, PROFILES, CUDA_PATHS_ENV, cuda_paths, autocast, to_device, load_torch
from crmt_nb.paper_data import make_fixtures, frame_name, read_list
from crmt_nb.reproduce import EXPERIMENTS
from crmt_nb.experiment import experiment_data, get_or_train, train_config
from crmt_nb.train import loaders, _prep, _start
from crmt_nb.evaluate import evaluate, paper_protocol
from crmt_nb.paper_models import paper_model

BIN = Path(sys.executable).parent
CLI = 'from crmt_nb.reproduce import reproduce_cli; reproduce_cli()'

def _reproduce(cwd, *args, env=None, timeout=3600):
    "`crmt-reproduce ARGS` as a user runs it: a separate process, the batch's log on stdout."
    return subprocess.run([str(BIN / 'python'), '-c', CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})

def _lines(r, tag): return [l for l in r.stdout.splitlines() if l.startswith(tag)]

def _models(out: Path) -> dict:
    "Every cached model under `out/models`: path → mtime_ns."
    return {p: p.stat().st_mtime_ns for p in (out / 'models').rglob('*.pt')}

def _break_test_clip(ucf: Path) -> tuple[str, dict]:
    "Garble every RGB frame of the first UCF101 test clip (found only when read: after training); its bytes, to restore."
    cid = read_list(ucf / 'lists' / 'test.txt')[0][0]
    saved = {p: p.read_bytes() for p in sorted((ucf / 'frames' / cid).iterdir())}
    for p in saved: p.write_bytes(b'\xff\xd8 garbage')
    return cid, saved

# ---------------------------------------------------------------- the profile
def test_paper_dry_is_paper_with_budgets_cut():
    dry, paper = get_profile('paper-dry'), PROFILES['paper']
    fct.test_eq((dry.data, dry.family, dry.optimizer, dry.lr, dry.lr_step, dry.multi_eps, dry.uni_eps, dry.attack_steps),
                (paper.data, 'paper', paper.optimizer, paper.lr, paper.lr_step, paper.multi_eps, paper.uni_eps, paper.attack_steps))
    assert dry.epochs == dry.step2_epochs == 1 and dry.max_train <= 4 and dry.max_eval <= 4
    from crmt_nb.soe_baselines import SOE_PROFILES
    same = {k for k in SOE_PROFILES['paper'] if SOE_PROFILES['paper'][k] == SOE_PROFILES['paper-dry'][k]}
    assert {'depth', 'n_experts', 'widths', 'optimizer', 'lr', 'attack'} <= same, same

# ---------------------------------------------------------------- the dry run, interrupted and resumed
@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('paper-data')
    make_fixtures(root)
    return root

@pytest.fixture(scope='module')
def dry_run(data_root, tmp_path_factory):
    """The whole registry under paper-dry, twice: first with a UCF101 test clip garbled (the notebooks that read it fail
    after training), then repaired. Module-scoped: the tests below read its outputs."""
    cwd = tmp_path_factory.mktemp('dry')
    args = ('--profile', 'paper-dry', '--data-root', data_root, '--out', 'runs/dry', '--workers', '2', '--no-progress')
    cid, saved = _break_test_clip(data_root / 'ucf101')
    t0 = time.perf_counter(); first = _reproduce(cwd, *args); t1 = time.perf_counter()
    models = _models(cwd / 'runs' / 'dry')
    for p, b in saved.items(): p.write_bytes(b)
    second = _reproduce(cwd, *args); t2 = time.perf_counter()
    yield dict(out=cwd / 'runs' / 'dry', first=first, second=second, cid=cid, models=models, seconds=(t1 - t0, t2 - t1))
    shutil.rmtree(cwd / 'runs' / 'dry' / 'models', ignore_errors=True)     # ~2 GB of ResNet-18 checkpoints

@pytest.fixture
def scratch(tmp_path):
    "`tmp_path`, removed after the test (paper-dry checkpoints are ~90 MB each; pytest keeps old tmp folders)."
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)

def test_every_notebook_runs_on_the_paper_code_path(dry_run):
    out, r = dry_run['out'], dry_run['second']
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in EXPERIMENTS:
        d = out / name
        assert (d / f'{name}.ipynb').exists() and not (d / f'{name}.failed.ipynb').exists(), name
        df = pd.read_csv(d / f'{name}.csv')
        assert len(df) and df['value'].notna().all(), name
        stamp = json.loads((d / '.stamp.json').read_text())
        fct.test_eq(stamp['parameters']['profile'], 'paper-dry')
        rec = json.loads((d / '.needs.json').read_text())      # every model-cache request was declared (crmt_nb.plan)
        assert set(rec['requested']) <= set(rec['declared']), (name, set(rec['requested']) - set(rec['declared']))
    report = (out / 'report.md').read_text()
    assert 'profile `paper-dry`' in report and '**failed' not in report.lower()
    print('\npaper-dry seconds per notebook (first run; a rerun of the failed ones after the repair):')
    secs = {n: json.loads((out / n / '.stamp.json').read_text())['seconds'] for n in EXPERIMENTS}
    for n, s in sorted(secs.items(), key=lambda kv: -kv[1]): print(f'  {n:32s} {s:7.1f}')
    print(f"  wall: first batch {dry_run['seconds'][0]:.0f} s, resumed batch {dry_run['seconds'][1]:.0f} s")

def test_the_dry_run_trained_the_papers_models(dry_run):
    """ResNet-18 encoders on the clip datasets (the MMT transformer for Table 3 on VGGSound), ResNet-20 SoE members on
    CIFAR-10 (Table 4 also depths 2/8/14, standard training) — every checkpoint at paper-dry; no SoE model on the built-in MNIST-5k (only crmt_many_views declares mfeat)."""
    root = dry_run['out'] / 'models'
    ckpts = [(p.relative_to(root).parts[0], load_torch(p)['config']) for p in root.rglob('*.pt')]
    datasets = {ds for ds, _ in ckpts}
    assert {'ks', 'ucf101', 'vggsound', 'cifar10'} <= datasets and 'mnist5k' not in datasets, sorted(datasets)
    for ds, cfg in ckpts:
        fct.test_eq((cfg['optimizer'], cfg['profile']), ('sgd', 'paper-dry'))
        if ds in ('ks', 'ucf101'): fct.test_eq(cfg['model'], 'resnet18')
        if ds == 'vggsound': fct.test_eq(cfg['model'], 'mmt')
        if ds == 'cifar10':                     # ResNet-20, but for Table 4's standard-trained depth sweep
            assert cfg['depth'] == 20 or (cfg['method'] in ('SoE-std', 'Ensemble-std') and cfg['depth'] in (2, 8, 14)), cfg

def test_an_interrupted_dry_run_keeps_its_work_and_resumes(dry_run):
    first, second, out = dry_run['first'], dry_run['second'], dry_run['out']
    failed = [l.split()[1].rstrip(':') for l in _lines(first, '[FAIL]')]
    assert first.returncode != 0 and failed, first.stdout[-3000:]
    for l in _lines(first, '[FAIL]'): assert dry_run['cid'] in l and 'unreadable JPEG' in l, l   # names the clip
    done_first = [l.split()[1] for l in _lines(first, '[done]')]
    assert done_first and not set(done_first) & set(failed)
    ucf = [p for p in dry_run['models'] if 'ucf101' in p.parts]
    assert ucf, 'the notebooks that failed at evaluation trained (and kept) their models first'
    # the rerun: finished notebooks are skipped, the failed ones run again, and no kept model is retrained
    fct.test_eq(sorted(l.split()[1].rstrip(':') for l in _lines(second, '[skip]')), sorted(done_first))
    fct.test_eq(sorted(l.split()[1] for l in _lines(second, '[done]')), sorted(failed))
    for p, mtime in dry_run['models'].items(): fct.test_eq(p.stat().st_mtime_ns, mtime)

# ---------------------------------------------------------------- the CUDA code paths, on the CPU
@pytest.fixture
def cuda_paths_on_cpu(monkeypatch):
    monkeypatch.setenv(CUDA_PATHS_ENV, '1')
    assert cuda_paths('cpu')

def test_cuda_paths_layout_pinning_and_copies(cuda_paths_on_cpu, data_root):
    sp = experiment_data('paper-dry', 'ks', data_root)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*pin_memory.*')        # no accelerator: pinning is a no-op here
        tr, va, te = loaders(sp, 2, torch.Generator().manual_seed(0), 'cpu', max_train=2)
        assert tr.pin_memory and va.pin_memory and te.pin_memory
        xs, y = next(iter(tr))
    xs = _prep(xs, torch.device('cpu'))
    fct.test_eq([x.dim() for x in xs], [5, 4])
    assert xs[1].is_contiguous(memory_format=torch.channels_last)
    img, clip = _prep((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3, 8, 8)), torch.device('cpu'))   # a 3-channel image: NHWC
    assert img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous() and clip.is_contiguous()
    x, = to_device((torch.ones(2, 3),), 'cpu'); fct.test_eq(x, torch.ones(2, 3))
    model = paper_model('ks', n_classes=2)
    _start(model, tr, va, torch.device('cpu'), 0)
    conv = model.encoders[0].trunk.layer1[0].conv1.weight                 # 64 -> 64 channels: NHWC differs
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with autocast('cpu'): fct.test_eq((torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.bfloat16)

@pytest.mark.parametrize('method', ['JT', 'MMAT', 'CRMT-JT'])
def test_cuda_paths_train_and_attack(cuda_paths_on_cpu, data_root, scratch, method):
    "One paper-dry model trained under CPU bf16 autocast, channels-last and pinned loaders, then attacked (paper protocol)."
    sp = experiment_data('paper-dry', 'ucf101' if method == 'CRMT-JT' else 'ks', data_root)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*pin_memory.*')
        t = get_or_train(sp, method, train_config('paper-dry', method), 0, profile='paper-dry', device='cpu', root=scratch, progress=False)
    assert t.history['loss'].notna().all() and len(t.history)
    r = evaluate(t.predictor, sp.test.head(2), paper_protocol(sp.names), device='cpu')
    assert r['value'].between(0, 1).all() and len(r) == len(paper_protocol(sp.names))

def test_cuda_paths_notebook_end_to_end(data_root, scratch):
    "The cheapest paper-dry experiment of the registry, with every CUDA path taken on the CPU."
    name = 'crmt_fig5_ablation' if 'crmt_fig5_ablation' in EXPERIMENTS else next(iter(EXPERIMENTS))
    r = _reproduce(scratch, '--profile', 'paper-dry', '--data-root', data_root, '--out', 'runs/cp', '--only', name,
                   '--no-progress', env={CUDA_PATHS_ENV: '1'})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_dry_run_on_cuda(data_root, scratch):
    "The whole registry under paper-dry on CUDA (skipped without a GPU): what the CPU cannot show."
    r = _reproduce(scratch, '--profile', 'paper-dry', '--data-root', data_root, '--out', 'runs/gpu', '--device', 'cuda',
                   '--workers', '1', '--no-progress')
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert not _lines(r, '[FAIL]')
