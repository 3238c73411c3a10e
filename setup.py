"""mmfusion: multimodal transformers in JAX/Flax (image, text, audio; contrastive + generative)."""
import setuptools

setuptools.setup(
    name="mmfusion",
    version="0.1.0",
    description="Multimodal transformers in JAX/Flax: towers, fusion, contrastive and generative pretraining.",
    packages=setuptools.find_packages(include=["mmfusion", "mmfusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        # TensorFlow only feeds data (tf.data); the CPU build keeps it off accelerators.
        "tensorflow-cpu>=2.18,<2.22",
        "tensorflow-datasets>=4.9.7,<4.10",
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.0,<1.2",
        "numpy>=1.26",
        "tqdm>=4.66",
        # TFDS needs it to register builders defined inside packages (yours too).
        "importlib-resources>=6",
    ],
    extras_require={
        # Speaking the spoken datasets: eSpeak NG 1.52 as a shared library (GPL-3.0), loaded
        # at render time only (mmfusion/data/tts.py).
        "speech": ["espeakng-loader>=0.2.4,<0.3"],
        # The notebooks in colabs/ (plots, inline figures); mmfusion.notebook needs them.
        "explore": ["matplotlib>=3.8", "ipython>=8"],
        # Importing public weights (python -m mmfusion.import_weights): safetensors files and
        # CLIP's tokenizer.json; PyTorch .pt files need torch besides.
        "weights": ["safetensors>=0.4", "tokenizers>=0.20"],
        # Quantised training (config.model.quantize='int8'): Google's AQT, pure Python.
        "quantize": ["aqtp>=0.9,<0.10"],
        # pocketsphinx (BSD-2-Clause) only for the ASR check of the spoken data; jupytext,
        # nbclient and ipykernel execute the notebooks headless.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 "espeakng-loader>=0.2.4,<0.3", "pocketsphinx>=5.0,<6",
                 "matplotlib>=3.8", "ipython>=8", "jupytext>=1.16", "nbclient>=0.10",
                 "nbformat>=5.9", "ipykernel>=6.29", "aqtp>=0.9,<0.10",
                 # The reference models of the weight-import parity tests (CPU torch: the
                 # bound keeps pip on the CPU build where it lies on disk, not a CUDA one).
                 "torch>=2.4,<=2.13.0", "transformers>=4.50", "safetensors>=0.4",
                 "tokenizers>=0.20"],
        # Only the open_clip peer of benchmarks/train_step.py; nothing else imports them.
        "bench": ["torch", "open_clip_torch"],
    },
)
