"""Preprocessing (crmt_nb.prep) on a fresh machine: the bundled ffmpeg (imageio-ffmpeg, no system ffmpeg), 1-fps
frames, audio resampled to 16 kHz mono, the Kaldi filterbank against an independent float64 transcription of
Kaldi's `fbank`, `crmt-prep check`, and video → frames + spectrogram → loader end to end. Nothing here skips."""
import math, subprocess, sys, types, warnings
from pathlib import Path
import numpy as np, pytest, torch
import fastcore.test as fct
from crmt_nb import paper_data as pd_
from crmt_nb import prep
from crmt_nb.paper_data import paper_splits, make_fixture, read_list, frame_name, AUDIO_MEAN, AUDIO_STD

def _batch(ds, n):
    return next(iter(ds.loader(n)))

# ---------------------------------------------------------------- Kaldi's fbank, transcribed independently
# Kaldi (src/feat/feature-window.cc, mel-computations.cc, feature-fbank.cc), FbankOptions defaults except
# dither = 0: 25 ms frames every 10 ms, snip_edges (only whole frames), per frame: remove the DC offset,
# pre-emphasis 0.97 (w[i] -= 0.97 w[i-1] for i = N-1..1, then w[0] -= 0.97 w[0]), the window, zero padding to
# the next power of two, the power spectrum |X_k|^2 (k = 0..L/2), triangular mel filters over FFT bins
# 0..L/2-1 (not Nyquist) between low_freq = 20 Hz and high_freq = Nyquist, equally spaced in
# mel(f) = 1127 ln(1 + f/700), then log(max(energy, FLT_EPSILON)). Written loop by loop in float64, from the
# algorithm, not from crmt_nb.prep.
FLT_EPSILON = float(np.finfo(np.float32).eps)

def kaldi_window(kind, n):
    a = 2 * math.pi / (n - 1)
    w = []
    for i in range(n):
        if kind == 'hanning': w.append(0.5 - 0.5 * math.cos(a * i))
        elif kind == 'hamming': w.append(0.54 - 0.46 * math.cos(a * i))
        elif kind == 'povey': w.append((0.5 - 0.5 * math.cos(a * i)) ** 0.85)
        elif kind == 'rectangular': w.append(1.0)
        else: raise ValueError(kind)
    return np.array(w)

def kaldi_mel_banks(num_bins, padded, samp_freq, low_freq=20.0, high_freq=0.0):
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
    nyquist = 0.5 * samp_freq
    high = high_freq if high_freq > 0 else nyquist + high_freq
    width = samp_freq / padded
    ml, mh = mel(low_freq), mel(high)
    delta = (mh - ml) / (num_bins + 1)
    banks = np.zeros((num_bins, padded // 2 + 1))
    for b in range(num_bins):
        left, centre, right = ml + b * delta, ml + (b + 1) * delta, ml + (b + 2) * delta
        for i in range(padded // 2):
            m = mel(width * i)
            if left < m < right:
                banks[b, i] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    return banks

def kaldi_fbank_reference(wave, samp_freq, num_mel_bins=23, window_type='povey', preemph=0.97, remove_dc=True,
                          frame_length_ms=25.0, frame_shift_ms=10.0):
    wave = np.asarray(wave, dtype=np.float64)
    n, s = int(samp_freq * 0.001 * frame_length_ms), int(samp_freq * 0.001 * frame_shift_ms)
    padded = 1
    while padded < n: padded *= 2
    num_frames = 0 if len(wave) < n else 1 + (len(wave) - n) // s
    win, banks = kaldi_window(window_type, n), kaldi_mel_banks(num_mel_bins, padded, samp_freq)
    out = np.zeros((num_frames, num_mel_bins))
    for f in range(num_frames):
        w = wave[f * s:f * s + n].copy()
        if remove_dc: w -= w.mean()
        for i in range(n - 1, 0, -1): w[i] -= preemph * w[i - 1]
        w[0] -= preemph * w[0]
        w *= win
        x = np.zeros(padded); x[:n] = w
        power = np.abs(np.fft.rfft(x)) ** 2
        out[f] = np.log(np.maximum(banks @ power, FLT_EPSILON))
    return out

def test_reference_is_kaldi():
    "The transcription's own invariants: Kaldi's frame count, mel filters that peak at 1 at their centres, the 23-bin default."
    sr = 16000
    fct.test_eq(kaldi_fbank_reference(np.zeros(sr), sr).shape, (98, 23))                     # 1 + (16000 - 400) // 160
    fct.test_eq(kaldi_fbank_reference(np.zeros(399), sr).shape, (0, 23))
    fct.test_close(kaldi_fbank_reference(np.zeros(sr), sr), np.full((98, 23), math.log(FLT_EPSILON)))   # log energy floor
    b = kaldi_mel_banks(23, 512, sr)
    assert b[:, -1].sum() == 0 and (b.max(1) > 0.5).all() and (b.max(1) <= 1).all()
    assert (np.diff(b.argmax(1)) > 0).all()                                                   # centres increase
    inner = b[:, b[0].argmax() + 1:b[-1].argmax()].sum(0)                                     # adjacent triangles
    fct.test_close(inner, np.ones_like(inner), eps=1e-9)                                      # sum to 1 in between
    w = kaldi_window('povey', 400); fct.test_close(w[[0, 199, 399]], [0.0, (0.5 - 0.5 * math.cos(2 * math.pi * 199 / 399)) ** 0.85, 0.0])

def _waveforms():
    g = torch.Generator().manual_seed(0)
    t16 = torch.arange(16000) / 16000
    yield 'white noise', 0.3 * torch.randn(16000, generator=g), 16000
    yield 'tone + noise + DC', 0.5 * torch.sin(2 * math.pi * 440 * t16) + 0.05 * torch.randn(16000, generator=g) + 0.2, 16000
    yield 'chirp', 0.4 * torch.sin(2 * math.pi * (100 + 3000 * t16) * t16) + 0.01 * torch.randn(16000, generator=g), 16000
    yield 'quiet noise', 1e-3 * torch.randn(8000, generator=g), 16000
    yield 'speech-like bursts', torch.randn(11025, generator=g) * (torch.arange(11025) % 2205 < 900) * 0.2, 22050
    yield 'noise at 44.1 kHz', 0.2 * torch.randn(22050, generator=g), 44100

@pytest.mark.parametrize('name,wave,sr', list(_waveforms()), ids=[n for n, *_ in _waveforms()])
def test_fbank_matches_kaldi_reference(name, wave, sr):
    "Our kaldi_fbank (the authors' options: hanning window, 128 bins) equals Kaldi's algorithm to 1e-4 in log energy."
    ours = prep.kaldi_fbank(wave, sr).double().numpy()
    ref = kaldi_fbank_reference(wave.numpy(), sr, num_mel_bins=128, window_type='hanning')
    fct.test_eq(ours.shape, ref.shape)
    assert np.abs(ours - ref).max() < 1e-4, (name, np.abs(ours - ref).max())

def test_fbank_options_match_kaldi_reference():
    "The other options the function takes (no DC removal, no pre-emphasis, 23 bins) follow Kaldi too."
    wave = 0.3 * torch.randn(4000, generator=torch.Generator().manual_seed(1)) + 0.1
    for kw, rk in ((dict(remove_dc=False), dict(remove_dc=False)), (dict(preemph=0.0), dict(preemph=0.0)), (dict(n_mels=23), dict(num_mel_bins=23))):
        ref = kaldi_fbank_reference(wave.numpy(), 16000, **{'num_mel_bins': 128, 'window_type': 'hanning', **rk})
        assert np.abs(prep.kaldi_fbank(wave, 16000, **kw).double().numpy() - ref).max() < 1e-4, kw

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
    "A test video (testsrc pattern, a sine tone) made by the bundled ffmpeg (imageio-ffmpeg): no system ffmpeg needed."
    subprocess.run([prep.require_ffmpeg(), '-nostdin', '-loglevel', 'error', '-y', '-f', 'lavfi', '-i',
                    f'testsrc=duration={seconds}:size={size}:rate={rate}', '-f', 'lavfi', '-i',
                    f'sine=frequency={tone}:duration={seconds}:sample_rate=16000', '-c:v', 'mpeg4', '-c:a', 'aac',
                    '-shortest', str(path)], check=True)

def test_video_to_batches_end_to_end(tmp_path, capsys):
    raw = tmp_path / 'raw' / 'classA'; raw.mkdir(parents=True)
    for i in range(4): _make_video(raw / f'vid{i}.mp4', seconds=4, tone=500 + 500 * i)
    (tmp_path / 'raw' / 'broken.mp4').write_bytes(b'not a video')
    root = tmp_path / 'data' / 'ks'
    fct.test_eq(prep.prep_cli(['frames', '--videos', str(tmp_path / 'raw'), '--root', str(root)]), 1)   # one failure
    out = capsys.readouterr().out
    assert 'frames: 4 made, 0 already present, 1 failed' in out and 'FAILED broken' in out
    assert not (root / 'frames' / 'broken').exists() and not list((root / 'frames').glob('.*'))      # no partial output
    assert 'broken' in (root / 'prep_frames_failed.txt').read_text()
    for i in range(4): fct.test_eq(pd_.count_frames(root / 'frames' / f'vid{i}'), 4)             # one per second
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
    def missing(): raise RuntimeError('No ffmpeg exe could be found.')
    monkeypatch.setattr(prep.imageio_ffmpeg, 'get_ffmpeg_exe', missing)
    fct.test_fail(prep.require_ffmpeg, contains='pip install --force-reinstall imageio-ffmpeg')
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

# ---------------------------------------------------------------- ffmpeg from pip, frame rate, resampling, silence
def test_ffmpeg_is_the_bundled_binary():
    exe = Path(prep.require_ffmpeg())
    assert exe.is_file() and 'imageio_ffmpeg' in exe.parts, exe          # no apt-get: the binary of the pip wheel
    r = subprocess.run([str(exe), '-hide_banner', '-filters'], capture_output=True, text=True)
    assert r.returncode == 0 and ' fps ' in r.stdout

@pytest.mark.parametrize('seconds', [2, 3, 5, 7])
def test_one_frame_per_second(tmp_path, seconds):
    "`-vf fps=1` semantics: an n-second clip gives n frames (the authors' `-r 1` gave 7 from 5 s)."
    _make_video(tmp_path / 'v.mp4', seconds=seconds, rate=25)
    assert prep.extract_frames(tmp_path / 'v.mp4', tmp_path / 'f')
    fct.test_eq(pd_.count_frames(tmp_path / 'f'), seconds)
    assert not prep.extract_frames(tmp_path / 'v.mp4', tmp_path / 'f')               # resumable: already done
    prep.extract_frames(tmp_path / 'v.mp4', tmp_path / 'n', fps=0)
    fct.test_eq(pd_.count_frames(tmp_path / 'n'), 25 * seconds)                       # native rate (UCF101)

def _tone(sr, seconds=1.0, f=1000.0, channels=1):
    t = torch.arange(int(sr * seconds)) / sr
    x = 0.5 * torch.sin(2 * math.pi * f * t)
    return torch.stack([x, 0.5 * x][:channels]) if channels > 1 else x

def test_wav_is_resampled_to_16k_mono(tmp_path):
    "A 44.1 kHz stereo .wav gives the spectrogram of the same tone at 16 kHz mono (not one at its own rate)."
    src = tmp_path / 'src'; src.mkdir()
    prep.write_wav(src / 'hi.wav', _tone(44100, channels=2), 44100)
    prep.write_wav(src / 'lo.wav', 0.75 * _tone(16000), 16000)                        # the stereo mix: (x + x/2) / 2
    r = prep.prep_audio(src, tmp_path / 'root', progress=False)
    fct.test_eq(sorted(r.done), ['hi', 'lo'])
    hi, lo = (np.load(tmp_path / 'root' / 'audio' / f'{n}.npy') for n in ('hi', 'lo'))
    fct.test_eq(hi.shape, (1024, 128))
    n = 1 + (16000 - 400) // 160                                                      # frames of 1 s at 16 kHz
    assert (hi[n:] == hi[-1]).all() and not (hi[n - 2] == hi[-1]).all(), 'not 16 kHz: wrong number of frames'
    peak = lambda s: int(np.bincount(s[5:n - 5].argmax(1)).argmax())
    k = peak(lo); fct.test_eq(peak(hi), k)
    band = slice(k - 3, k + 4)                                                        # the tone's bands: same energy
    assert np.abs(hi[5:n - 5, band] - lo[5:n - 5, band]).max() < 0.02, np.abs(hi[5:n - 5, band] - lo[5:n - 5, band]).max()
    own_rate = prep.spectrogram(prep.read_wav(src / 'hi.wav')[0], 44100)              # what using 44.1 kHz gave:
    assert peak(own_rate) != k                                                        # the tone in another mel band

def test_silent_audio_warns(tmp_path):
    src = tmp_path / 'src'; src.mkdir()
    prep.write_wav(src / 'quiet.wav', torch.zeros(16000), 16000)
    with pytest.warns(UserWarning, match='quiet.wav: the audio is silent'):
        r = prep.prep_audio(src, tmp_path / 'root', progress=False)
    fct.test_eq(r.done, ['quiet'])
    prep.write_wav(src / 'loud.wav', _tone(16000), 16000)
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                                # a real signal does not warn
        prep.extract_spectrogram(src / 'loud.wav', tmp_path / 'loud.npy')

# ---------------------------------------------------------------- crmt-prep check and fixture
def _break(root, fault):
    "Damage clip `fault[1]` of a fixture in one of seven ways."
    kind, cid = fault
    f, a = root / 'frames' / cid, root / 'audio' / f'{cid}.npy'
    if kind == 'cut-off jpeg': p = f / frame_name(2); p.write_bytes(p.read_bytes()[:300])
    elif kind == 'garbage jpeg': (f / frame_name(1)).write_bytes(b'not a jpeg at all')
    elif kind == 'hole': (f / frame_name(2)).unlink()
    elif kind == 'too few frames': [(f / frame_name(t)).unlink() for t in range(3, 11)]
    elif kind == 'nan spectrogram': s = np.load(a); s[7, 3] = np.nan; np.save(a, s)
    elif kind == 'truncated spectrogram': a.write_bytes(a.read_bytes()[:1000])
    elif kind == 'missing spectrogram': a.unlink()

FAULTS = [('cut-off jpeg', 'clip000'), ('garbage jpeg', 'clip001'), ('hole', 'clip002'), ('too few frames', 'clip003'),
          ('nan spectrogram', 'clip006'), ('truncated spectrogram', 'clip007'), ('missing spectrogram', 'clip008')]

def test_check_finds_every_fault_without_full(tmp_path, capsys):
    root = make_fixture(tmp_path, 'ks', n_clips=12, n_frames=10, n_classes=2)
    fct.test_eq(prep.prep_cli(['check', '--dataset', 'ks', '--root', str(tmp_path)]), 0)
    assert '0 unusable' in capsys.readouterr().out
    for fault in FAULTS: _break(root, fault)
    fct.test_eq(prep.prep_cli(['check', '--dataset', 'ks', '--root', str(tmp_path)]), 1)   # non-zero: unusable clips
    out = capsys.readouterr().out
    assert '7 unusable' in out, out
    for (kind, cid), says in zip(FAULTS, ['cut off', 'no start-of-image', 'not numbered', 'need at least 3', 'non-finite',
                                          'unreadable spectrogram', 'is missing']):
        line = next(l for l in out.splitlines() if l.strip().startswith(f'{cid}:'))
        assert says in line, (kind, line)
    fct.test_eq(prep.prep_cli(['check', '--dataset', 'ks', '--root', str(tmp_path), '--full']), 1)
    assert '7 unusable' in capsys.readouterr().out

def test_fixture_command_makes_a_paper_data_root(tmp_path, capsys):
    fct.test_eq(prep.prep_cli(['fixture', '--root', str(tmp_path)]), 0)
    assert 'cifar10, ks, ucf101, vggsound' in capsys.readouterr().out
    for name in ('ks', 'vggsound', 'ucf101'):
        sp = paper_splits(name, tmp_path, check='content')
        assert len(sp.train) and len(sp.valid) and len(sp.test) and sp.n_classes == 2
    sc = paper_splits('cifar10', tmp_path)
    fct.test_eq((sc.n_classes, sc.shapes), (10, ((3, 32, 32),)))
