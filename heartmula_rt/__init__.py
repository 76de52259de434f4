"""heartmula-rt: a lean, fast runtime for the HeartMuLa music model and its HeartCodec decoder.

import heartmula_rt
pipe = heartmula_rt.load_pipeline(model_path)  # the GPU if there is one
song = heartmula_rt.SongRequest.of("piano,happy", "[verse]\\n...", max_seconds=60, seed=1)
wav = pipe.generate(song)  # float32 [2, N] at 48 kHz
"""

__version__ = "0.1.0"  # before the imports: submodules read it while the package loads

import os

# torch's OpenMP runtime (libgomp) reads this once, as torch loads. Its default has idle workers
# spin for milliseconds at every op's end, which stalls every op when another process holds a
# core (decoding one tiny window took 25 s instead of 1.3; benchmarks/README.md). Passive
# workers sleep at once; a value the user set is kept, and it is too late once torch is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .decode import GenerationInterrupted
from .errors import UserError
from .pipeline import Pipeline, PipelineConfig, load_pipeline
from .request import CodecParams, SamplingParams, SongRequest

__all__ = [
    "CodecParams",
    "GenerationInterrupted",
    "Pipeline",
    "PipelineConfig",
    "SamplingParams",
    "SongRequest",
    "UserError",
    "load_pipeline",
]
