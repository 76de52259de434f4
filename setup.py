from pathlib import Path

from setuptools import setup

setup(
    name="heartmula-rt",
    version="0.1.0",
    description="A lean, fast runtime for the HeartMuLa music model and its HeartCodec decoder",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and quant/ live at the top of the repo but install inside the package.
    packages=[
        "heartmula_rt",
        "heartmula_rt.model",
        "heartmula_rt.model.codec",
        "heartmula_rt.memory",
        "heartmula_rt.runtime",
        "heartmula_rt.cli",
        "heartmula_rt.serve",
        "heartmula_rt.bench",
        "heartmula_rt.kernels",
        "heartmula_rt.quant",
    ],
    package_data={"heartmula_rt.serve": ["static/*"]},
    package_dir={
        "heartmula_rt": "heartmula_rt",
        "heartmula_rt.kernels": "kernels",
        "heartmula_rt.quant": "quant",
    },
    install_requires=[
        # 2.5: torch.library.custom_op (2.4), SDPA's enable_gqa and tinygemm's uint8 int4
        # packing (2.5). A pinned CPU wheel installed first (see README) satisfies this as is.
        "torch>=2.5",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "soundfile>=0.12",  # libsndfile >= 1.1 bundled: wav, flac, ogg and mp3
        "huggingface_hub>=0.20",
        "tqdm",
    ],
    extras_require={
        # triton: CPU builds of torch lack it; tests run its kernels with TRITON_INTERPRET=1.
        # bitsandbytes: its CPU NF4 matmul checks the GPU path's re-packing.
        # httpx and selenium: the server's tests over real HTTP and in a real browser (Debian's
        # chromium and chromium-driver, which .ci/run installs). pytest-xdist: a test file per
        # core (README, "Tests").
        "test": [
            "pytest",
            "pytest-xdist",
            "pytest-timeout",
            "scipy",
            "ruff",
            "matplotlib",
            "triton>=3.2",
            "bitsandbytes>=0.50",
            "httpx",
            "selenium>=4.10",
            "peft>=0.13",  # tests/test_lora.py: its adapters are made by PEFT itself
            # tests/test_reference.py's resampling; the muq package (.[ref]) needs transformers
            # 4 where peft pulls 5, so .ci/run gives its tests a folder of their own.
            "soxr>=0.3",
        ],
        # `heartmula-rt serve`: the HTTP service and its web page.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # `heartmula-rt serve --ray`: the same API over model replicas on Ray Serve (with
        # .[serve]); only heartmula_rt/serve/ray_app.py imports it. 2.60: the version tested
        # (an ingress whose app is built when its replica starts needs a recent Serve).
        "ray": ["ray[serve]>=2.60"],
        # --quant nf4 at speed on a GPU.
        "nf4": ["bitsandbytes>=0.50"],
        # benchmarks/: the GPU micro-benchmarks, and `heartmula-rt bench --plot`.
        "bench": ["pytest-benchmark", "matplotlib"],
        # Reference audio (--ref-audio, `heartmula-rt embed`): MuQ-MuLan through the muq package
        # (whose 0.1.0 needs transformers 4, and pulls torchaudio: install the torch wheel first,
        # so pip keeps it) and soxr to resample. docs/reference-audio.md.
        "ref": ["muq>=0.1.0", "transformers>=4.40,<5", "soxr>=0.3"],
    },
    entry_points={"console_scripts": ["heartmula-rt=heartmula_rt.cli:main"]},
)
