"""Paper-scale data (crmt_nb.paper_data) on tiny fixtures: layouts, shapes, frame rule, errors. The preprocessing
(crmt_nb.prep: the Kaldi filterbank, the commands end to end) is tested in tests/test_prep.py."""
import math, pickle, shutil, subprocess, sys, types, warnings
from pathlib import Path
import numpy as np, pytest, torch
import fastcore.test as fct
from crmt_nb import paper_data as pd_
from crmt_nb.paper_data import (paper_splits, ClipDataset, ClipError, PaperDataError, make_fixture, read_list,
                                select_frames, frame_name, AUDIO_MEAN, AUDIO_STD)

def _batch(ds, n):
    return next(iter(ds.loader(n)))

# ---------------------------------------------------------------- layouts and shapes
@pytest.mark.parametrize('name,second', [('ks', (1, 1024, 128)), ('vggsound', (1, 1024, 128)), ('ucf101', (2, 3, 224, 224))])
def test_batches_have_model_shapes(tmp_path, name, second):
    make_fixture(tmp_path, name, n_clips=6, n_frames=7, n_classes=3)
    sp = paper_splits(name, tmp_path, val='test')
    for ds in (sp.train, sp.test):
        (xv, x2), y = _batch(ds, 3)
        fct.test_eq(xv.shape, (3, 3, 3, 224, 224)); fct.test_eq(x2.shape, (3, *second)); fct.test_eq(y.dtype, torch.long)
        assert xv.dtype == torch.float32 and 0 <= xv.min() and xv.max() <= 1          # not ImageNet-normalised
        if name == 'ucf101': assert 0 <= x2.min() and x2.max() <= 1
    fct.test_eq(sp.shapes[1], second)
    fct.test_eq(sp.n_classes, pd_.PAPER_DATASETS[name].n_classes)

def test_audio_is_the_stored_spectrogram(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=2, n_frames=4, n_classes=2)
    ds = ClipDataset('ks', root, read_list(root / 'lists' / 'test.txt'))
    (_, xa), _ = ds[0]
    fct.test_eq(xa[0], torch.from_numpy(np.load(root / 'audio' / f'{ds.ids[0]}.npy')))

def test_test_frames_are_deterministic_and_resized(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=2, n_frames=10, n_classes=2)
    ds = ClipDataset('ks', root, read_list(root / 'lists' / 'train.txt'))
    (a, _), _ = ds[0]; (b, _), _ = ds[0]
    fct.test_eq(a, b)
    from torchvision.transforms.v2 import functional as TF
    raw = pd_.read_jpeg(root / 'frames' / ds.ids[0] / frame_name(4), ds.ids[0])
    fct.test_close(a[:, 1], TF.resize(raw, [224, 224], antialias=True).float() / 255, eps=1e-6)   # t = 1·3 + 1 = 4

def test_classes_file_sets_n_classes(tmp_path):
    root = make_fixture(tmp_path, 'vggsound', n_clips=4, n_frames=4, n_classes=2)
    (root / 'classes.txt').write_text(''.join(f'c{i}\n' for i in range(310)))
    fct.test_eq(paper_splits('vggsound', tmp_path, val='test').n_classes, 310)

def test_data_root_can_be_the_dataset_folder(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=4, n_frames=4, n_classes=2)
    fct.test_eq(len(paper_splits('ks', root, val='test').train), 2)

# ---------------------------------------------------------------- frame selection rule
@pytest.mark.parametrize('n', [3, 4, 5, 6, 7, 9, 10, 11, 12, 30, 31, 100])
def test_frame_rule(n):
    seg = n // 3
    fct.test_eq(select_frames(n, False), [i * seg + max(seg // 2, 1) for i in range(3)])
    g = torch.Generator().manual_seed(n)
    seen = [set() for _ in range(3)]
    for _ in range(200):
        t = select_frames(n, True, g)
        for i, x in enumerate(t): seen[i].add(x)
    for i in range(3): fct.test_eq(seen[i], set(range(i * seg + 1, i * seg + seg + 1)))   # uniform over the segment
    assert all(1 <= x <= n for x in select_frames(n, False))
    off = [select_frames(n, True, g, official=True) for _ in range(50)]
    if n <= 6:
        assert all(t == [1, 1, 1] for t in off) and select_frames(n, False, official=True) == [1, 1, 1]
    else:
        assert max(max(t) for t in off) <= 9
        fct.test_eq(select_frames(n, False, official=True), select_frames(n, False))   # test frames not capped

@pytest.mark.parametrize('n', [0, 1, 2])
def test_frame_rule_short(n):
    fct.test_fail(lambda: select_frames(n, True), contains='at least 3 frames')

def test_clip_consistent_augmentation():
    g = torch.Generator().manual_seed(0)
    fr = [torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)] * 3
    per_frame = [pd_.augment_frames(fr, True, 32, generator=g) for _ in range(10)]
    assert any(not torch.equal(v[:, 0], v[:, 1]) for v in per_frame)           # the authors' per-frame draws differ
    for _ in range(10):
        v = pd_.augment_frames(fr, True, 32, clip_consistent=True, generator=g)
        fct.test_eq(v[:, 0], v[:, 1]); fct.test_eq(v[:, 1], v[:, 2])

def test_generator_makes_training_items_reproducible(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=2, n_frames=12, n_classes=2)
    items = [ClipDataset('ks', root, read_list(root / 'lists' / 'train.txt'), train=True,
                         generator=torch.Generator().manual_seed(3))[0][0][0] for _ in range(2)]
    fct.test_eq(items[0], items[1])

# ---------------------------------------------------------------- errors
def test_missing_data_root_and_folders(tmp_path):
    with pytest.raises(PaperDataError) as e: paper_splits('ks', tmp_path / 'nowhere')
    assert 'does not exist' in str(e.value) and 'python -m crmt_nb.prep frames' in str(e.value)
    with pytest.raises(PaperDataError) as e: paper_splits('ks', None)
    assert 'data_root' in str(e.value)
    root = make_fixture(tmp_path, 'ks', n_clips=4, n_frames=4, n_classes=2)
    shutil.rmtree(root / 'audio')
    with pytest.raises(PaperDataError) as e: paper_splits('ks', tmp_path)
    assert f'{root / "audio"} does not exist' in str(e.value) and 'audio/<clip_id>.npy' in str(e.value)
    assert 'python -m crmt_nb.prep audio' in str(e.value)
    u = make_fixture(tmp_path, 'ucf101', n_clips=4, n_frames=4, n_classes=2); shutil.rmtree(u / 'flow')
    fct.test_fail(lambda: paper_splits('ucf101', tmp_path), contains='python -m crmt_nb.prep flow')

def test_missing_list_file(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=4, n_frames=4, n_classes=2)
    (root / 'lists' / 'train.txt').unlink()
    with pytest.raises(PaperDataError) as e: paper_splits('ks', tmp_path)
    assert 'lists/train.txt does not exist' in str(e.value) and 'prep lists' in str(e.value)
    fct.test_fail(lambda: paper_splits('ks', tmp_path, val='list'), contains='does not exist')

def test_short_clip(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=4, n_frames=5, n_classes=2)
    for t in (3, 4, 5): (root / 'frames' / 'clip001' / frame_name(t)).unlink()
    with pytest.raises(ClipError) as e: paper_splits('ks', tmp_path, val='test')
    assert e.value.clip_id == 'clip001' and '2 frames' in str(e.value) and "on_error='skip'" in str(e.value)
    with pytest.warns(UserWarning, match='clip001'):
        sp = paper_splits('ks', tmp_path, val='test', on_error='skip')
    fct.test_eq(sp.train.ids, ['clip000']); assert 'clip001' in sp.train.skipped

def test_corrupt_jpeg(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=4, n_frames=4, n_classes=2)
    (root / 'frames' / 'clip002' / frame_name(2)).write_bytes(b'\xff\xd8 not a jpeg')
    sp = paper_splits('ks', tmp_path, val='test')               # cheap checks pass: found when read
    with pytest.raises(ClipError) as e: sp.test[0]
    assert e.value.clip_id == 'clip002' and 'unreadable JPEG' in str(e.value) and '000002.jpg' in str(e.value)
    sp = paper_splits('ks', tmp_path, val='test', on_error='skip')
    with pytest.warns(UserWarning, match='clip002'): (xv, xa), y = sp.test[0]
    assert xv.abs().sum() > 0                                    # the next real clip, never zeros
    fct.test_eq(xa[0], torch.from_numpy(np.load(root / 'audio' / 'clip003.npy')))
    fct.test_fail(lambda: paper_splits('ks', tmp_path, val='test', check='full'), contains='clip clip002')
    p = root / 'frames' / 'clip003' / frame_name(4); p.write_bytes(p.read_bytes()[:200])   # a truncated JPEG
    fct.test_fail(lambda: paper_splits('ks', tmp_path, val='test', check='full'), contains='clip003: unreadable JPEG')
    (root / 'frames' / 'clip003' / frame_name(1)).unlink()       # a hole in the numbering
    fct.test_fail(lambda: paper_splits('ks', tmp_path, val='test'), contains='not numbered 1..3 (highest 000004.jpg)')

@pytest.mark.parametrize('bad', ['shape', 'truncated', 'nan', 'int'])
def test_bad_spectrogram(tmp_path, bad):
    root = make_fixture(tmp_path, 'vggsound', n_clips=4, n_frames=3, n_classes=2)
    p = root / 'audio' / 'clip000.npy'
    if bad == 'shape': np.save(p, np.zeros((1000, 128), np.float32))
    elif bad == 'truncated': p.write_bytes(p.read_bytes()[:4000])
    elif bad == 'int': np.save(p, np.zeros((1024, 128), np.int64))
    else: a = np.load(p); a[3, 4] = np.nan; np.save(p, a)
    if bad == 'nan':                                              # header fine: found when read
        sp = paper_splits('vggsound', tmp_path, val='test')
        fct.test_fail(lambda: sp.train[0], contains='clip clip000: spectrogram')
        fct.test_fail(lambda: sp.train[0], contains='non-finite')
        return
    with pytest.raises(ClipError) as e: paper_splits('vggsound', tmp_path, val='test')
    assert e.value.clip_id == 'clip000'
    assert {'shape': 'has shape (1000, 128), expected (1024, 128)', 'truncated': 'unreadable spectrogram',
            'int': 'expected float'}[bad] in str(e.value)
    with pytest.warns(UserWarning): sp = paper_splits('vggsound', tmp_path, val='test', on_error='skip')
    assert 'clip000' not in sp.train.ids

def test_flow_count_mismatch(tmp_path):
    root = make_fixture(tmp_path, 'ucf101', n_clips=4, n_frames=6, n_classes=2)
    (root / 'flow' / 'clip000' / 'v' / frame_name(5)).unlink()
    fct.test_fail(lambda: paper_splits('ucf101', tmp_path, val='test'), contains='5 u flow frames but 4 v flow frames')

def test_bad_list_and_options(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=4, n_frames=3, n_classes=2)
    (root / 'lists' / 'test.txt').write_text('clip002 31\n')
    fct.test_fail(lambda: paper_splits('ks', tmp_path), contains='label 31 outside 0..30')
    (root / 'lists' / 'test.txt').write_text('clip002 1\n')
    fct.test_fail(lambda: paper_splits('ks', tmp_path, val='other'), contains="val must be")
    fct.test_fail(lambda: paper_splits('ks', tmp_path, on_error='zero'), contains="on_error must be")
    fct.test_fail(lambda: paper_splits('imagenet', tmp_path), contains='unknown paper dataset')

# ---------------------------------------------------------------- val split rule
def test_val_rules(tmp_path):
    root = make_fixture(tmp_path, 'ks', n_clips=40, n_frames=3, n_classes=2)
    sp = paper_splits('ks', tmp_path, val_fraction=0.25, seed=1)
    fct.test_eq((len(sp.train), len(sp.valid), len(sp.test)), (16, 4, 20))   # 10 per class: round(7.5) = 8 stay
    assert not set(sp.train.ids) & set(sp.valid.ids) and sp.valid.train is False and sp.train.train
    fct.test_eq(sp.valid.ids, paper_splits('ks', tmp_path, val_fraction=0.25, seed=1).valid.ids)
    assert sp.valid.ids != paper_splits('ks', tmp_path, val_fraction=0.25, seed=2).valid.ids
    sp = paper_splits('ks', tmp_path, val='test'); assert sp.valid is sp.test
    (root / 'lists' / 'val.txt').write_text('clip030 0\nclip031 1\n')
    fct.test_eq(paper_splits('ks', tmp_path, val='list').valid.ids, ['clip030', 'clip031'])

# ---------------------------------------------------------------- CIFAR-10
def _fake_cifar(root, n=20):
    d = Path(root) / 'cifar10' / 'cifar-10-batches-py'; d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(d / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'labels': list(range(10)) * (n // 10)}, f)
    with open(d / 'batches.meta', 'wb') as f: pickle.dump({'label_names': [f'c{i}' for i in range(10)]}, f)

def test_cifar10(tmp_path, monkeypatch):
    with pytest.raises(PaperDataError) as e: paper_splits('cifar10', tmp_path)
    assert 'cifar-10-batches-py is missing or incomplete' in str(e.value) and 'download=True' in str(e.value)
    assert 'data_batch_1' in str(e.value) and 'frames/' not in str(e.value)
    _fake_cifar(tmp_path)
    import torchvision
    monkeypatch.setattr(torchvision.datasets.CIFAR10, '_check_integrity', lambda self: True)   # fixture has no real md5s
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *a, **k: True)
    sp = paper_splits('cifar10', tmp_path)
    fct.test_eq((len(sp.train), len(sp.valid), len(sp.test)), (90, 10, 20))
    fct.test_eq((sp.names, sp.boxes, sp.shapes, sp.n_classes), (('image',), ((0.0, 1.0),), ((3, 32, 32),), 10))
    (x,), y = _batch(sp.train, 8); fct.test_eq(x.shape, (8, 3, 32, 32)); assert 0 <= x.min() and x.max() <= 1
    raw = torch.from_numpy(sp.test.data[0]).permute(2, 0, 1).float() / 255
    fct.test_eq(sp.test[0][0][0], raw)                                                # test: no augmentation
    tr = pd_.ImageDataset(sp.test.data[:1], [0], train=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    crops = {(t, l) for t in range(9) for l in range(9)}
    for _ in range(20):                                                               # a 32-crop of the 4-padded image, maybe flipped
        x = tr[0][0][0]
        assert any(torch.equal(x, padded[:, t:t + 32, l:l + 32]) or torch.equal(x, padded[:, t:t + 32, l:l + 32].flip(-1))
                   for t, l in crops)
    fct.test_eq(paper_splits('cifar10', tmp_path / 'cifar10', val='test').valid is not None, True)

def test_ucf_official_reads_rgb_among_first_six(tmp_path, monkeypatch):
    make_fixture(tmp_path, 'ucf101', n_clips=2, n_frames=30, n_classes=2, hw=(8, 8))
    seen = []
    real = pd_.read_jpeg
    monkeypatch.setattr(pd_, 'read_jpeg', lambda p, cid, grey=False: (seen.append((Path(p).parent.name, Path(p).name)), real(p, cid, grey))[1])
    for official, rgb in ((True, ['000001.jpg', '000003.jpg', '000005.jpg']), (False, ['000005.jpg', '000015.jpg', '000025.jpg'])):
        seen.clear()
        paper_splits('ucf101', tmp_path, val='test', official=official, size=16).test[0]
        fct.test_eq([n for d, n in seen if d not in ('u', 'v')], rgb)
        fct.test_eq([n for d, n in seen if d == 'u'], ['000004.jpg', '000013.jpg', '000022.jpg'])   # 29 flow frames: seg 9, i·9 + 4
