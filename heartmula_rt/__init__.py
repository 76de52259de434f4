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

# The public names load lazily (PEP 562), so that `heartmula-rt plan` and --help need no torch.
_EXPORTS = {
    "BatchInterrupted": "runtime.decode",
    "CodecParams": "request",
    "GenerationInterrupted": "runtime.decode",
    "Pipeline": "runtime.pipeline",
    "PipelineConfig": "runtime.loader",
    "SamplingParams": "request",
    "SongRequest": "request",
    "UserError": "errors",
    "load_pipeline": "runtime.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'heartmula_rt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
