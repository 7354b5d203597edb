"""Content identity of a model's weights (``model_identity``): what a run's manifest records under
``inputs.model`` and every resume checks, so a run never mixes two versions of a model. Checking the
weights here (safetensors headers and sizes, GGUF magic, shards present) is also what makes missing
or truncated weights fail before a run writes anything.

What identifies a model (``file_digest``), per file of its directory (or its GGUF file):

- files up to ``FULL_HASH_MAX`` bytes (config.json, tokenizer files, small weights): name, size and
  the SHA-256 of every byte (cached per path, size and mtime);
- larger files (the weights of real models): name, size and ``sample_sha256``, the SHA-256 of the
  file's header (a safetensors header: every tensor's name, dtype, shape and offsets; else the first
  MiB) and of ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BYTES`` spread evenly over the file, the last one
  ending at its end: at most ~4 MiB read whatever the model's size, so identifying an 8B model costs
  milliseconds, not minutes. A new checkpoint (a fine-tune, another quantisation, another layout)
  changes it; an edit of a few values that no sampled block covers does not.

Paths and mtimes are recorded nowhere in the comparison (the same bytes elsewhere are the same
model). In a Ray run this is computed next to the weights, by a task with a pool actor's resources
(``raysens.backends.remote``): the driver reads no weight file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .hub import ModelLoadError, cache_root, packaged_model_path
from .registry import _PIP_NAME, _RANDOM_PRESETS, _looks_like_path, source_kind

FULL_HASH_MAX = 64 << 20  # files up to this size are hashed whole; larger ones by header + samples
SAMPLE_BLOCKS = 64  # blocks read from a large file, spread evenly, the last ending at its end
SAMPLE_BYTES = 64 << 10  # bytes per block
HEAD_BYTES = 1 << 20  # the "header" of a large file that is not safetensors


def sample_digest(path: str | Path) -> dict:
    """``{"file", "size", "sample_sha256", "sample"}`` of a large file: the SHA-256 of its header and
    of ``SAMPLE_BLOCKS`` evenly spread blocks (see the module doc). Reads at most a few MiB."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"{size}|".encode())
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        start = 8 + n if p.suffix == ".safetensors" and 0 < n and 8 + n <= size else min(size, HEAD_BYTES)
        f.seek(0)
        h.update(f.read(start))
        span = size - start
        for i in range(SAMPLE_BLOCKS):
            off = start + (span - SAMPLE_BYTES) * i // max(1, SAMPLE_BLOCKS - 1) if span > SAMPLE_BYTES else start
            f.seek(max(start, off))
            h.update(f.read(SAMPLE_BYTES))
    return {"file": p.name, "size": size, "sample_sha256": h.hexdigest(),
            "sample": f"header + {SAMPLE_BLOCKS} x {SAMPLE_BYTES} bytes"}


def file_digest(path: str | Path) -> dict:
    """``{"file", "size", "sha256"}`` of a file up to ``FULL_HASH_MAX`` bytes (the SHA-256 computed once
    and cached under ``cache_root()/digests`` keyed by the file's absolute path, size and mtime: a
    rewritten file has a new mtime, hence a new digest); ``sample_digest`` of a larger one."""
    p = Path(path).resolve()
    st = p.stat()
    if st.st_size > FULL_HASH_MAX:
        return sample_digest(p)
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = cache_root() / "digests" / f"{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    out = {"file": p.name, "size": st.st_size, "sha256": h.hexdigest()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out))
        tmp.replace(cache)
    except OSError:  # a read-only cache only costs the hashing next time
        pass
    return out


def _check_safetensors(path: Path) -> None:
    """The header parses and every tensor lies inside the file (a truncated file is caught)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"load_model: weights file {str(path)!r} is not a valid safetensors file ({exc})") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"load_model: weights file {str(path)!r} is truncated ({size} bytes, its header "
                             f"needs {8 + n + end})")


def _dir_files(path: Path) -> list[dict]:
    """Digests of a model directory's files; refuses a directory without (valid) safetensors weights."""
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    weights = [f for f in files if f.suffix == ".safetensors"]
    if not weights:
        pickled = [f.name for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise ModelLoadError(
            f"load_model: directory {str(path)!r} has no safetensors weights (model.safetensors or its shards)"
            + (f"; it has {pickled}, which raysens never unpickles" if pickled else ""))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"load_model: {str(index)!r} is unreadable ({exc})") from None
        missing = sorted(sh for sh in shards if not (path / sh).is_file())
        if missing:
            raise ModelLoadError(f"load_model: directory {str(path)!r} lacks weight shards {missing}")
    for f in weights:
        _check_safetensors(f)
    return [file_digest(f) for f in files]


def model_identity(name: str, *, trust_remote_code: bool = False) -> dict:
    """What the weights of ``name`` are, for a run's manifest (``inputs.model``), checked on resume.

    Local directories, GGUF files and the packaged models: every file's size and digest
    (``file_digest``: whole small files, header + samples of large ones), after checking the weights
    are there and readable (safetensors headers and sizes, the GGUF magic), so missing or truncated
    weights fail before a run writes anything.
    ``random:<preset>``: the preset and the torch / transformers versions that generate its weights.
    A hub id: the files of its locally cached snapshot (none known: only the id).
    """
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    kind = source_kind(name)
    if kind == "random":
        preset = name[len("random:"):]
        if preset not in _RANDOM_PRESETS:
            raise ModelLoadError(f"load_model: unknown random preset {preset!r}; choose from {sorted(_RANDOM_PRESETS)}")
        return {"kind": "random", "preset": preset, "config": _RANDOM_PRESETS[preset][0],
                "torch": version("torch"), "transformers": version("transformers")}
    if kind == "packaged":
        path = packaged_model_path(name)
        out = {"kind": "packaged", "package": _PIP_NAME[name], "version": version(_PIP_NAME[name]),
               "path": str(path)}
    elif kind in ("gguf", "missing") or (kind == "local" and _looks_like_path(name)):
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise ModelLoadError(f"load_model: model path {name!r} does not exist ({path})")
        out = {"kind": "gguf" if path.is_file() else "dir", "path": str(path)}
    elif kind == "local":
        path = Path(name).expanduser().resolve()
        out = {"kind": "dir", "path": str(path)}
    else:  # a hub id (a synthetic name has no files either: only its name is recorded)
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached, or no huggingface_hub: only the id is known
            return {"kind": "hub", "id": name, "files": None}
        out = {"kind": "hub", "id": name, "path": str(path)}
    if path.is_file():
        if path.suffix == ".gguf":
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ModelLoadError(f"load_model: {str(path)!r} is not a GGUF file (bad magic bytes)")
        out["files"] = [file_digest(path)]
    else:
        if not (path / "config.json").exists():
            raise ModelLoadError(f"load_model: directory {name!r} has no config.json")
        out["files"] = _dir_files(path)
    return out


def checked_identity(name: str, *, trust_remote_code: bool = False) -> dict:
    """``model_identity`` after loading the tokenizer and config (``load_tokenizer_and_config``): what a
    Ray run checks in a task next to the weights (``backends.remote``), where an in-process run's
    ``run.prepare.prepare`` checks it, so that a broken model fails before anything is written."""
    from .hub import load_tokenizer_and_config

    load_tokenizer_and_config(name, trust_remote_code=trust_remote_code)
    return model_identity(name, trust_remote_code=trust_remote_code)
