"""Content identity of a model's weights (``model_identity``): what a run's manifest records under
``inputs.model`` and every resume checks, so a run never mixes two versions of a model. File
digests are computed once and cached (``file_digest``). Checking the weights here (safetensors
headers and sizes, GGUF magic, shards present) is also what makes missing or truncated weights fail
before a run writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .models import (_PACKAGED, _PIP_NAME, _RANDOM_PRESETS, ModelLoadError, _looks_like_path, cache_root,
                     packaged_model_path)

def file_digest(path: str | Path) -> dict:
    """``{"file", "size", "sha256"}`` of one file. The SHA-256 is computed once and cached under
    ``cache_root()/digests`` keyed by the file's absolute path, size and mtime (a rewritten file has a
    new mtime, hence a new digest)."""
    p = Path(path).resolve()
    st = p.stat()
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

    Local directories, GGUF files and the packaged models: every file's size and SHA-256 (cached,
    ``file_digest``), after checking the weights are there and readable (safetensors headers and
    sizes, the GGUF magic), so missing or truncated weights fail before a run writes anything.
    ``random:<preset>``: the preset and the torch / transformers versions that generate its weights.
    A hub id: the files of its locally cached snapshot (none known: only the id).
    """
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    if name.startswith("random:"):
        preset = name[len("random:"):]
        if preset not in _RANDOM_PRESETS:
            raise ModelLoadError(f"load_model: unknown random preset {preset!r}; choose from {sorted(_RANDOM_PRESETS)}")
        return {"kind": "random", "preset": preset, "config": _RANDOM_PRESETS[preset][0],
                "torch": version("torch"), "transformers": version("transformers")}
    if name in _PACKAGED:
        path = packaged_model_path(name)
        out = {"kind": "packaged", "package": _PIP_NAME[name], "version": version(_PIP_NAME[name]),
               "path": str(path)}
    elif name.endswith(".gguf") or _looks_like_path(name):
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise ModelLoadError(f"load_model: model path {name!r} does not exist ({path})")
        out = {"kind": "gguf" if path.is_file() else "dir", "path": str(path)}
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser().resolve()
        out = {"kind": "dir", "path": str(path)}
    else:
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
