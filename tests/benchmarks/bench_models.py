"""Orth head forward+backward (fuse from features, M=2, K=31, d=512, batch 64): rownorm closed form vs
orthonormal (QR parametrisation, QRRows) vs an SVD-loop reference of the authors' OWNNorm with one row per group,
and a candidate polar parametrisation (W W^T)^(-1/2) W for the orthonormal head.
Run: .venv/bin/python tests/benchmarks/bench_models.py   (medians; timings on a shared CPU are noisy)"""
import statistics, time, torch
from crmt_nb.models import JointModel

torch.set_num_threads(1)
K, d, B, REPS = 31, 512, 64, 200

def svd_loop(w):
    "OWNNorm(groups=K) as described in crmt-spec §2.3: per row, centre, whiten with the SVD of the 1×1 covariance."
    rows = []
    for z in w.split(1, dim=0):
        zc = z - z.mean(dim=1, keepdim=True)
        U, L, _ = torch.linalg.svd(zc @ zc.t())
        rows.append(U @ torch.diag(L.rsqrt()) @ U.t() @ zc)
    return torch.cat(rows)

class Polar(torch.nn.Module):
    "A candidate cheap orthonormal parametrisation (not in the library): W̃ = (W Wᵀ)^(-1/2) W via a K×K eigh."
    def forward(self, w):
        L, U = torch.linalg.eigh(w @ w.t())
        return U @ torch.diag(L.rsqrt()) @ U.t() @ w

class QR(torch.nn.Module):
    "Another candidate: W̃ᵀ = Q of the reduced QR of Wᵀ, columns sign-fixed by diag(R) (stable backward, full rank)."
    def forward(self, w):
        Q, R = torch.linalg.qr(w.t())
        return (Q * torch.sign(torch.diagonal(R)).unsqueeze(0)).t()

class SVDLoopHead(JointModel):
    def head_weights(self): return tuple(svd_loop(lin.weight) for lin in self.fcs)

def bench(model):
    feats = tuple(torch.randn(B, d, requires_grad=True) for _ in range(2))
    def step():
        model.zero_grad(set_to_none=True)
        model.fuse(feats).logits.sum().backward()
    for _ in range(10): step()
    ts = []
    for _ in range(REPS):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

enc = [torch.nn.Identity(), torch.nn.Identity()]
torch.manual_seed(0)
models = {'concat': JointModel(enc, [d, d], K),
          'rownorm': JointModel(enc, [d, d], K, head='orth', orth='rownorm'),
          'orthonormal (QR)': JointModel(enc, [d, d], K, head='orth', orth='orthonormal'),
          'svd-loop reference': SVDLoopHead(enc, [d, d], K, head='orth', orth='rownorm')}
polar = JointModel(enc, [d, d], K, head='orth', orth='rownorm'); polar.orth = 'orthonormal'
for lin in polar.fcs: torch.nn.utils.parametrize.register_parametrization(lin, 'weight', Polar())
models['polar (eigh, candidate)'] = polar
for w in polar.head_weights(): assert torch.allclose(w @ w.t(), torch.eye(K), atol=1e-5)
qr = JointModel(enc, [d, d], K, head='orth', orth='rownorm'); qr.orth = 'orthonormal'
for lin in qr.fcs: torch.nn.utils.parametrize.register_parametrization(lin, 'weight', QR())
models['qr (candidate)'] = qr
for w in qr.head_weights(): assert torch.allclose(w @ w.t(), torch.eye(K), atol=1e-5)
ref = models['svd-loop reference']; ref.load_state_dict(models['rownorm'].state_dict())
for a, b in zip(ref.head_weights(), models['rownorm'].head_weights()): assert torch.allclose(a, b, atol=1e-5)
t = {name: bench(m) for name, m in models.items()}
for name, s in t.items():
    print(f'{name:24s} median fwd+bwd {s * 1e3:8.3f} ms   ×{s / t["rownorm"]:6.2f} of rownorm')
