"""Test-only: a `heartmula-rt serve` child started with this folder on PYTHONPATH and
HEARTMULA_RT_TEST_FAKE_EMBEDDER=1 embeds reference clips with a stand-in for MuQ-MuLan (a fixed
random projection of the clip's loudness in 16 parts, tests/test_reference_wiring.py's
FakeMulan) instead of loading the published weights (tests/test_reference_serve.py). It counts
its loads in HEARTMULA_RT_TEST_FAKE_EMBEDDER_LOG, a file, one line each. Nothing else changes."""

import os

if os.environ.get("HEARTMULA_RT_TEST_FAKE_EMBEDDER") == "1":
    import torch
    from torch import nn

    from heartmula_rt.model import reference

    class FakeMulan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.proj = nn.Parameter(torch.randn(reference.REFERENCE_DIM, 16, generator=g))

        def forward(self, wavs: torch.Tensor) -> torch.Tensor:
            x = wavs[0]
            parts = x[: x.shape[0] // 16 * 16].view(16, -1).abs().mean(dim=1)
            return (self.proj @ parts)[None]

    def _load(device="cpu", *, cache_dir=None):
        log = os.environ.get("HEARTMULA_RT_TEST_FAKE_EMBEDDER_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{device}\n")
        return reference.embedder_of(FakeMulan(), device)

    reference.load_embedder = _load
