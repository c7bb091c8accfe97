"""Paper-scale data (crmt_nb.paper_data, crmt_nb.prep) on tiny fixtures: layouts, shapes, frame rule, errors,
the Kaldi filterbank, and the preprocessing commands end to end (ffmpeg-dependent parts skip without it)."""
import math, pickle, shutil, subprocess, sys, types, warnings
from pathlib import Path
import numpy as np, pytest, torch
import fastcore.test as fct
from crmt_nb import paper_data as pd_
from crmt_nb import prep
from crmt_nb.paper_data import (paper_splits, ClipDataset, ClipError, PaperDataError, make_fixture, read_list,
                                select_frames, frame_name, AUDIO_MEAN, AUDIO_STD)

HAS_FFMPEG = shutil.which('ffmpeg') is not None
needs_ffmpeg = pytest.mark.skipif(not HAS_FFMPEG, reason='ffmpeg is not installed (apt-get install ffmpeg) — '
                                  'the end-to-end video preprocessing tests need it')

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

# ---------------------------------------------------------------- Kaldi filterbank
def _fbank_literal(x, sr, n_mels=128):
    "Kaldi's fbank written out per frame in numpy float64 (a slow second implementation)."
    N, S = int(sr * 0.025), int(sr * 0.010); L = 1 << (N - 1).bit_length()
    mel = lambda f: 1127.0 * np.log(1 + f / 700.0)
    ml, mh = mel(20.0), mel(sr / 2); d = (mh - ml) / (n_mels + 1)
    H = np.zeros((n_mels, L // 2 + 1))
    for b in range(n_mels):
        l, c, r = ml + b * d, ml + (b + 1) * d, ml + (b + 2) * d
        for j in range(L // 2):
            m = mel(j * sr / L)
            if l < m < r: H[b, j] = (m - l) / (c - l) if m <= c else (r - m) / (r - c)
    w = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (N - 1)) for i in range(N)])
    out = []
    for k in range(1 + (len(x) - N) // S):
        f = x[k * S:k * S + N].astype(np.float64); f = f - f.mean()
        f = np.concatenate([[f[0] - 0.97 * f[0]], f[1:] - 0.97 * f[:-1]])
        P = np.abs(np.fft.rfft(f * w, n=L)) ** 2
        out.append(np.log(np.maximum(H @ P, np.finfo(np.float32).eps)))
    return np.array(out)

@pytest.mark.parametrize('sr', [16000, 22050])
def test_fbank_matches_literal_kaldi(sr):
    g = torch.Generator().manual_seed(sr)
    x = 0.3 * torch.randn(sr // 4, generator=g) + 0.2 * torch.sin(torch.arange(sr // 4) * 0.05)
    ours = prep.kaldi_fbank(x, sr).double().numpy()
    ref = _fbank_literal(x.numpy(), sr)
    fct.test_eq(ours.shape, ref.shape)
    assert np.abs(ours - ref).max() < 2e-3, np.abs(ours - ref).max()

def test_fbank_matches_torchaudio():
    ta = pytest.importorskip('torchaudio')
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(2, 16000, generator=g) * 0.1
    wav = wav - wav.mean()
    ref = ta.compliance.kaldi.fbank(wav, htk_compat=True, sample_frequency=16000, use_energy=False,
                                    window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)
    fct.test_close(prep.kaldi_fbank(wav, 16000), ref, eps=1e-3)

def test_spectrogram_uses_channel0_global_mean_and_pads():
    sr = 16000; t = torch.arange(sr) / sr
    st = torch.stack([torch.sin(2 * math.pi * 440 * t) + 0.5, 0.1 * torch.cos(2 * math.pi * 3000 * t) - 0.5])
    s = prep.spectrogram(st, sr)
    fb = prep.kaldi_fbank(st[0] - st.mean(), sr)
    fct.test_eq(s.shape, (1024, 128)); assert s.dtype == np.float32
    fct.test_close(s[:len(fb)], ((fb - AUDIO_MEAN) / (2 * AUDIO_STD)).numpy(), eps=1e-5)
    fct.test_close(s[len(fb):], np.full((1024 - len(fb), 128), -AUDIO_MEAN / (2 * AUDIO_STD), np.float32), eps=1e-6)
    long = prep.spectrogram(torch.randn(12 * sr, generator=torch.Generator().manual_seed(0)), sr)
    fct.test_eq(long.shape, (1024, 128))                                              # 1198 frames trimmed
    fct.test_fail(lambda: prep.spectrogram(torch.zeros(100), sr), contains='shorter than one 25 ms window')

def test_wav_roundtrip(tmp_path):
    x = torch.sin(torch.arange(1000) * 0.1) * 0.5
    prep.write_wav(tmp_path / 'a.wav', torch.stack([x, -x]), 8000)
    y, sr = prep.read_wav(tmp_path / 'a.wav')
    fct.test_eq(sr, 8000); fct.test_eq(y.shape, (2, 1000)); fct.test_close(y, torch.stack([x, -x]), eps=1e-4)

# ---------------------------------------------------------------- preprocessing commands
def _make_video(path, seconds=2, rate=10, tone=1000, size='64x48'):
    subprocess.run(['ffmpeg', '-nostdin', '-loglevel', 'error', '-y', '-f', 'lavfi', '-i',
                    f'testsrc=duration={seconds}:size={size}:rate={rate}', '-f', 'lavfi', '-i',
                    f'sine=frequency={tone}:duration={seconds}:sample_rate=16000', '-c:v', 'mpeg4', '-c:a', 'aac',
                    '-shortest', str(path)], check=True)

@needs_ffmpeg
def test_video_to_batches_end_to_end(tmp_path, capsys):
    raw = tmp_path / 'raw' / 'classA'; raw.mkdir(parents=True)
    for i in range(4): _make_video(raw / f'vid{i}.mp4', tone=500 + 500 * i)
    (tmp_path / 'raw' / 'broken.mp4').write_bytes(b'not a video')
    root = tmp_path / 'data' / 'ks'
    fct.test_eq(prep.prep_cli(['frames', '--videos', str(tmp_path / 'raw'), '--root', str(root)]), 1)   # one failure
    out = capsys.readouterr().out
    assert 'frames: 4 made, 0 already present, 1 failed' in out and 'FAILED broken' in out
    assert not (root / 'frames' / 'broken').exists() and not list((root / 'frames').glob('.*'))      # no partial output
    assert 'broken' in (root / 'prep_frames_failed.txt').read_text()
    for i in range(4): assert pd_.count_frames(root / 'frames' / f'vid{i}') >= 3
    fct.test_eq(prep.prep_cli(['audio', '--videos', str(tmp_path / 'raw'), '--root', str(root)]), 1)
    assert 'audio: 4 made' in capsys.readouterr().out
    s = np.load(root / 'audio' / 'vid1.npy'); fct.test_eq(s.shape, (1024, 128))
    centres = torch.linspace(float(prep.mel_scale(20.)), float(prep.mel_scale(8000.)), 130)[1:-1]
    peak = int(np.bincount(s[20:150].argmax(1)).argmax())                            # the 1 kHz tone's mel bin
    assert abs(peak - int((centres - prep.mel_scale(1000.)).abs().argmin())) <= 1
    (tmp_path / 'train.txt').write_text('vid0 0\nvid1 1\n'); (tmp_path / 'test.txt').write_text('vid2 0\nvid3 1\n')
    fct.test_eq(prep.prep_cli(['lists', '--root', str(root), '--format', 'list', '--train', str(tmp_path / 'train.txt'),
                               '--test', str(tmp_path / 'test.txt')]), 0)
    sp = paper_splits('ks', tmp_path / 'data', val='test')
    (xv, xa), y = _batch(sp.train, 2)
    fct.test_eq(xv.shape, (2, 3, 3, 224, 224)); fct.test_eq(xa.shape, (2, 1, 1024, 128)); fct.test_eq(y, torch.tensor([0, 1]))
    # resumable: a rerun makes nothing, and a good clip is never overwritten
    mt = (root / 'audio' / 'vid0.npy').stat().st_mtime_ns
    fct.test_eq(prep.prep_frames(tmp_path / 'raw', root, progress=False).present.__len__(), 4)
    r = prep.prep_audio(tmp_path / 'raw', root, progress=False)
    fct.test_eq((len(r.done), len(r.present)), (0, 4)); fct.test_eq((root / 'audio' / 'vid0.npy').stat().st_mtime_ns, mt)
    # a corrupted .npy is remade on the next run
    np.save(root / 'audio' / 'vid0.npy', np.zeros((3, 3), np.float32))
    fct.test_eq(prep.prep_audio(tmp_path / 'raw', root, progress=False).done, ['vid0'])
    fct.test_eq(prep.prep_cli(['check', '--dataset', 'ks', '--root', str(tmp_path / 'data'), '--full']), 0)
    assert '0 unusable' in capsys.readouterr().out

class _FakeTVL1:
    "Stands in for OpenCV's TV-L1 where OpenCV is absent: flow = (mean difference, constant) per pixel."
    def calc(self, a, b, _):
        f = np.zeros(a.shape + (2,), np.float32)
        f[..., 0] = (b.astype(np.float32) - a.astype(np.float32)) / 10; f[..., 1] = 3.0
        return f

@needs_ffmpeg
def test_ucf_video_to_flow_batches(tmp_path):
    raw = tmp_path / 'UCF-101' / 'Archery'; raw.mkdir(parents=True)
    for i in range(2): _make_video(raw / f'v_Archery_g0{i}_c01.avi', seconds=1, rate=8)
    root = tmp_path / 'ucf101'
    r = prep.prep_frames(tmp_path / 'UCF-101', root, fps=0, progress=False)
    fct.test_eq(len(r.done), 2)
    n = pd_.count_frames(root / 'frames' / 'v_Archery_g00_c01'); assert n >= 7
    try: factory = prep.tvl1_factory()
    except RuntimeError: factory = _FakeTVL1
    r = prep.prep_flow(root, factory=factory, progress=False)
    fct.test_eq((len(r.done), r.failed), (2, {}))
    fct.test_eq(pd_.count_frames(root / 'flow' / 'v_Archery_g00_c01' / 'u'), n - 1)
    if factory is _FakeTVL1:
        v = pd_.read_jpeg(root / 'flow' / 'v_Archery_g00_c01' / 'v' / frame_name(1), 'v', grey=True)
        assert (v.float() - round(18 * 255 / 30)).abs().max() <= 2                    # v = 3 → round(18·255/30) = 153
    fct.test_eq(len(prep.prep_flow(root, factory=factory, progress=False).present), 2)   # resumable
    sp_dir = tmp_path / 'ucfTrainTestlist'; sp_dir.mkdir()
    (sp_dir / 'classInd.txt').write_text('1 ApplyEyeMakeup\n2 Archery\n')
    (sp_dir / 'trainlist01.txt').write_text('Archery/v_Archery_g00_c01.avi 2\n')
    (sp_dir / 'testlist01.txt').write_text('Archery/v_Archery_g01_c01.avi\n')
    fct.test_eq(prep.prep_cli(['lists', '--root', str(root), '--format', 'ucf101', '--ucf-splits', str(sp_dir)]), 0)
    fct.test_eq(read_list(root / 'lists' / 'train.txt'), [('v_Archery_g00_c01', 1)])
    sp = paper_splits('ucf101', tmp_path, val='test')
    fct.test_eq(sp.n_classes, 2)
    (xv, xf), y = _batch(sp.test, 1)
    fct.test_eq(xv.shape, (1, 3, 3, 224, 224)); fct.test_eq(xf.shape, (1, 2, 3, 224, 224)); fct.test_eq(y, torch.tensor([1]))

def test_missing_ffmpeg_message(tmp_path, monkeypatch):
    monkeypatch.setattr(prep.shutil, 'which', lambda name: None)
    fct.test_fail(prep.require_ffmpeg, contains='apt-get install ffmpeg')
    (tmp_path / 'v.mp4').write_bytes(b'x')
    fct.test_eq(prep.prep_cli(['frames', '--videos', str(tmp_path), '--root', str(tmp_path / 'out')]), 2)

def test_missing_opencv_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'cv2', None)                                     # import cv2 → ImportError
    fct.test_fail(prep.tvl1_factory, contains='pip install opencv-contrib-python-headless')
    monkeypatch.setitem(sys.modules, 'cv2', types.ModuleType('cv2'))                  # a cv2 without contrib
    fct.test_fail(prep.tvl1_factory, contains='build without contrib')
    fct.test_fail(lambda: prep.prep_flow(tmp_path), contains='opencv-contrib')

@pytest.mark.filterwarnings('ignore::UserWarning')          # scipy's WavFileWarning on the junk file
def test_failed_spectrogram_leaves_nothing(tmp_path):
    (tmp_path / 'src').mkdir(); (tmp_path / 'src' / 'bad.wav').write_bytes(b'RIFF....WAVEjunk')
    prep.write_wav(tmp_path / 'src' / 'good.wav', torch.sin(torch.arange(8000) * 0.3), 16000)
    r = prep.prep_audio(tmp_path / 'src', tmp_path / 'root', progress=False)
    fct.test_eq((r.done, list(r.failed)), (['good'], ['bad']))
    fct.test_eq(sorted(p.name for p in (tmp_path / 'root' / 'audio').iterdir()), ['good.npy'])

# ---------------------------------------------------------------- lists from official files
def test_lists_vggsound_and_kinetics(tmp_path):
    (tmp_path / 'vgg.csv').write_text('abc,30,dog barking,train\nxyz,0,cat meowing,test\nqq-_1,12,dog barking,test\n')
    res = prep.prep_lists(tmp_path / 'v', 'vggsound', csv_file=tmp_path / 'vgg.csv')
    fct.test_eq(res['classes'], 2)
    fct.test_eq(read_list(tmp_path / 'v' / 'lists' / 'test.txt'), [('xyz_000000', 0), ('qq-_1_000012', 1)])
    (tmp_path / 'k.csv').write_text('label,youtube_id,time_start,time_end,split\nplaying drums,aa,10,20,train\n'
                                    'knitting,bb,0,10,train\nplaying drums,cc,5,15,validate\nknitting,dd,1,11,test\n')
    (tmp_path / 'ks_classes.txt').write_text('playing drums\n')
    res = prep.prep_lists(tmp_path / 'k', 'kinetics', csv_file=tmp_path / 'k.csv', classes_file=tmp_path / 'ks_classes.txt')
    fct.test_eq((res['train'], res['test'], res['other_classes']), (1, 1, 1))
    fct.test_eq(read_list(tmp_path / 'k' / 'lists' / 'train.txt'), [('aa_000010_000020', 0)])
    fct.test_eq(read_list(tmp_path / 'k' / 'lists' / 'test.txt'), [('cc_000005_000015', 0)])
    (tmp_path / 'k' / 'frames' / 'aa_000010_000020').mkdir(parents=True)
    (tmp_path / 'k' / 'frames' / 'aa_000010_000020' / frame_name(1)).write_bytes(b'x')
    fct.test_fail(lambda: prep.prep_lists(tmp_path / 'k', 'kinetics', csv_file=tmp_path / 'k.csv', only_present=True,
                                          classes_file=tmp_path / 'ks_classes.txt'), contains='no train or no test')
    fct.test_fail(lambda: prep.prep_lists(tmp_path / 'k', 'csv', csv_file=tmp_path / 'k.csv'), contains='header must have columns')

def test_python_m_entry_point():
    "One subprocess (imports torch: seconds): `python -m crmt_nb.prep` runs the CLI and reports a clear error."
    r = subprocess.run([sys.executable, '-m', 'crmt_nb.prep', 'check', '--dataset', 'ks', '--root', '/nonexistent'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'python -m crmt_nb.prep frames' in r.stderr

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
