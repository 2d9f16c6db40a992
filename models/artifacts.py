"""Versioned, verified model artifacts.

An artifact is one directory::

    <dir>/
      weights.safetensors  the state dict in safetensors: raw tensors and a JSON header, no code
      vocab.json           optional: the item vocabulary, a JSON list of item id strings
      metadata.json        kind, version, created, config, training data summary,
                           feature_spec_hash, vocab {file, sha256, size}, metrics,
                           weights {file, sha256, bytes, tensors, format}, torch version

:func:`save_artifact` writes everything into a temporary sibling directory and renames it into
place, so a reader never sees a half-written artifact. :func:`load_artifact` checks the format,
the size and sha256 of every file, the model kind, the expected feature-spec hash and the
expected vocabulary **before** it hands anything back; any problem raises :class:`ArtifactError`
with what is wrong and what to do. Nothing is half-loaded: the caller gets a complete
:class:`Artifact` or an exception.

Loading never unpickles: the weights are parsed by safetensors from the very bytes whose sha256
was just checked. Artifacts of format version 1 (``weights.pt`` written by ``torch.save``) are
still listed and verified, but :func:`load_artifact` refuses them and says to run
``shoppulse models migrate`` (:mod:`models.migrate`), which converts them in place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT = "shoppulse-model-artifact"
#: Version 2: weights in safetensors. Version 1 (``LEGACY_FORMAT_VERSION``) kept them in a
#: ``torch.save`` pickle; only :mod:`models.migrate` reads those.
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_FORMAT = "safetensors"
METADATA_FILE = "metadata.json"
VOCAB_FILE = "vocab.json"

ANY: Any = object()
"""Sentinel for ``expected_feature_spec_hash``: do not check (the default)."""

_REQUIRED = ("format", "format_version", "kind", "version", "created", "weights", "feature_spec_hash")


class ArtifactError(Exception):
    """An artifact that cannot be used: missing, corrupt, truncated or for other inputs."""


@dataclass(frozen=True)
class Artifact:
    """A fully verified artifact."""

    path: Path
    metadata: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    vocab: list[str] | None

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def version(self) -> str:
        return self.metadata["version"]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (artifacts, benchmark inputs, event logs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_weights(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """A flat ``{name: tensor}`` state dict as safetensors bytes (CPU copies, so tied weights
    such as SASRec's shared item embedding are stored once per name, as safetensors requires)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"state_dict entry {name!r} is {type(t).__name__}, not a tensor")
        tensors[str(name)] = t.detach().to("cpu", copy=True).contiguous()
    return safetensors_save(tensors)


def vocab_sha256(vocab: Sequence[str]) -> str:
    """Fingerprint of an item vocabulary (same as :meth:`models.sequences.ItemVocab.sha256`)."""
    return hashlib.sha256(json.dumps(list(vocab), separators=(",", ":")).encode("utf-8")).hexdigest()


def decode_weights(path: Path, weights: bytes) -> dict[str, torch.Tensor]:
    """Tensors (on the CPU) of safetensors bytes; parsing them runs no code."""
    try:
        return safetensors_load(weights)
    except (SafetensorError, ValueError) as exc:
        raise ArtifactError(
            f"artifact {path}: weights could not be read ({type(exc).__name__}: {exc}); re-copy the artifact or retrain"
        ) from exc


def weights_entry(weights: bytes, tensors: int) -> dict[str, Any]:
    """The ``weights`` entry of ``metadata.json`` for safetensors bytes holding ``tensors`` tensors."""
    return {
        "file": WEIGHTS_FILE,
        "format": WEIGHTS_FORMAT,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "bytes": len(weights),
        "tensors": tensors,
    }


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably: a reader sees the old or the new file,
    and after a crash it is one of them (temp file in the same folder, fsync, rename, fsync folder)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _fsync_write(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_file(path: Path) -> None:
    """Delete ``path`` durably if it exists: an unlink is atomic, the folder's fsync makes it survive a crash."""
    if path.exists():
        path.unlink()
        _fsync_dir(path.parent)


def metadata_bytes(metadata: Mapping[str, Any]) -> bytes:
    """``metadata.json``'s bytes; plain JSON only (no NaN, no objects)."""
    try:
        text = json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"metadata is not plain JSON ({exc}); pass only str/number/list/dict values") from exc
    return (text + "\n").encode("utf-8")


def save_artifact(
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    kind: str,
    version: str,
    config: Mapping[str, Any] | None = None,
    vocab: Sequence[str] | None = None,
    feature_spec_hash: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a new artifact directory atomically and return its path.

    ``directory`` must not exist yet (artifacts are immutable: write a new version instead).
    """
    target = Path(directory)
    if target.exists():
        raise ArtifactError(
            f"artifact directory {target} already exists; artifacts are immutable, save under a new version"
        )
    if not isinstance(version, str) or not version:
        raise ArtifactError("version must be a non-empty string")
    weights = encode_weights(state_dict)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _fsync_write(tmp / WEIGHTS_FILE, weights)
        vocab_meta = None
        if vocab is not None:
            items = [str(v) for v in vocab]
            _fsync_write(tmp / VOCAB_FILE, json.dumps(items, separators=(",", ":")).encode("utf-8"))
            vocab_meta = {
                "file": VOCAB_FILE,
                "sha256": vocab_sha256(items),
                "size": len(items),
                "file_sha256": sha256_file(tmp / VOCAB_FILE),
            }
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "version": version,
            "created": dt.datetime.now(dt.UTC).isoformat(),
            "config": dict(config or {}),
            "feature_spec_hash": feature_spec_hash,
            "vocab": vocab_meta,
            "training_data": dict(training_data or {}),
            "metrics": dict(metrics or {}),
            "weights": weights_entry(weights, len(state_dict)),
            "torch_version": torch.__version__,
            "extra": dict(extra or {}),
        }
        _fsync_write(tmp / METADATA_FILE, metadata_bytes(metadata))
        _fsync_dir(tmp)
        os.rename(tmp, target)  # atomic on POSIX; fails if target appeared meanwhile
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Parse and structurally check ``metadata.json`` (no checksum work)."""
    path = Path(directory)
    fix = "re-copy the artifact directory from its source, or retrain and save a new version"
    if not path.is_dir():
        raise ArtifactError(
            f"artifact directory {path} does not exist; check the path or run "
            "`shoppulse models list` to see the available versions"
        )
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"artifact {path} has no {METADATA_FILE}; it is incomplete or not an artifact; {fix}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {path}: {METADATA_FILE} is unreadable or corrupt ({exc}); {fix}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"artifact {path}: {METADATA_FILE} is not a JSON object; {fix}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ArtifactError(f"artifact {path}: {METADATA_FILE} lacks {missing}; {fix}")
    if meta["format"] != FORMAT:
        raise ArtifactError(f"artifact {path}: format {meta['format']!r} is not {FORMAT!r}; not a ShopPulse artifact")
    if meta["format_version"] not in (FORMAT_VERSION, LEGACY_FORMAT_VERSION):
        raise ArtifactError(
            f"artifact {path}: format version {meta['format_version']} is not supported "
            f"(this code reads {FORMAT_VERSION}); load it with matching code or retrain"
        )
    w = meta["weights"]
    if not isinstance(w, dict) or not {"file", "sha256", "bytes"} <= set(w):
        raise ArtifactError(f"artifact {path}: weights entry in {METADATA_FILE} is incomplete; {fix}")
    return meta


def _check_file(path: Path, name: str, sha: str, size: int | None) -> bytes:
    """The file's bytes, after checking its size and sha256 against the metadata."""
    fix = "the file is corrupt or was modified; re-copy the artifact or retrain and save a new version"
    if os.path.basename(name) != name:
        raise ArtifactError(f"artifact {path}: file name {name!r} in metadata is not a plain file name")
    f = path / name
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise ArtifactError(
            f"artifact {path}: {name} is missing or unreadable ({exc}); re-copy the whole artifact directory"
        ) from exc
    actual = len(data)
    if size is not None and actual != size:
        raise ArtifactError(
            f"artifact {path}: {name} is {actual} bytes, metadata says {size} "
            f"({'truncated' if actual < size else 'grown'}); {fix}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha:
        raise ArtifactError(
            f"artifact {path}: sha256 of {name} is {digest[:12]}..., metadata says {sha[:12]}...; {fix}"
        )
    return data


def verified_files(directory: str | Path) -> tuple[dict[str, Any], bytes]:
    """Metadata and the weights' bytes, after checking the size and sha256 of every file.

    Works for both format versions (the migration reads version 1 through it).
    """
    path = Path(directory)
    meta = read_metadata(path)
    w = meta["weights"]
    weights = _check_file(path, w["file"], w["sha256"], w["bytes"])
    v = meta.get("vocab")
    if v is not None:
        if not isinstance(v, dict) or not {"file", "sha256", "file_sha256"} <= set(v):
            raise ArtifactError(f"artifact {path}: vocab entry in {METADATA_FILE} is incomplete; re-copy or retrain")
        _check_file(path, v["file"], v["file_sha256"], None)
    return meta, weights


def verify_artifact(directory: str | Path) -> dict[str, Any]:
    """Check metadata and the size and sha256 of every file; return the metadata."""
    return verified_files(directory)[0]


def is_legacy(meta: Mapping[str, Any]) -> bool:
    """True for a format-version-1 artifact (``torch.save`` weights): ``shoppulse models migrate`` converts it."""
    return meta.get("format_version") == LEGACY_FORMAT_VERSION


def check_state_dict(path: Path, state: Any, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` if it is a flat ``{name: tensor}`` dict with as many tensors as the metadata says."""
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ArtifactError(
            f"artifact {path}: weights are not a flat {{name: tensor}} state dict; retrain and save again"
        )
    if len(state) != meta["weights"].get("tensors", len(state)):
        raise ArtifactError(
            f"artifact {path}: weights hold {len(state)} tensors, metadata says "
            f"{meta['weights']['tensors']}; re-copy or retrain"
        )
    return state


def load_artifact(
    directory: str | Path,
    *,
    expected_kind: str | None = None,
    expected_feature_spec_hash: Any = ANY,
    expected_vocab: Sequence[str] | None = None,
    expected_vocab_sha256: str | None = None,
    map_location: str | torch.device = "cpu",
) -> Artifact:
    """Verify and load an artifact; raises :class:`ArtifactError` on any mismatch.

    Args:
        expected_kind: refuse an artifact of another model kind.
        expected_feature_spec_hash: refuse one trained on another feature spec (``None`` means
            "must have none"; leave the default :data:`ANY` to skip the check).
        expected_vocab / expected_vocab_sha256: refuse one with another item vocabulary.
    """
    path = Path(directory)
    meta, weights = verified_files(path)
    if is_legacy(meta):
        raise ArtifactError(
            f"artifact {path} keeps its weights in the old torch.save format (format version "
            f"{LEGACY_FORMAT_VERSION}), which is not loaded because unpickling can run code; run "
            "`shoppulse models migrate` to convert the registry in place (versions and current "
            "pointers are kept)"
        )
    if expected_kind is not None and meta["kind"] != expected_kind:
        raise ArtifactError(
            f"artifact {path} holds a {meta['kind']!r} model, expected {expected_kind!r}; "
            "point to an artifact of the right model"
        )
    if expected_feature_spec_hash is not ANY and meta["feature_spec_hash"] != expected_feature_spec_hash:
        raise ArtifactError(
            f"artifact {path} was trained on feature spec {meta['feature_spec_hash']!r} but this worker computes "
            f"{expected_feature_spec_hash!r}; retrain the model on the current feature spec, or deploy the code "
            "version whose feature spec matches the model"
        )
    vocab: list[str] | None = None
    vmeta = meta.get("vocab")
    if vmeta is not None:
        try:
            data = json.loads((path / vmeta["file"]).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(
                f"artifact {path}: vocabulary file is unreadable ({exc}); re-copy the artifact"
            ) from exc
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ArtifactError(f"artifact {path}: vocabulary must be a list of item id strings; re-copy or retrain")
        if vocab_sha256(data) != vmeta["sha256"]:
            raise ArtifactError(f"artifact {path}: vocabulary does not match its recorded sha256; re-copy or retrain")
        vocab = data
    want_sha = expected_vocab_sha256
    if expected_vocab is not None:
        want_sha = vocab_sha256([str(v) for v in expected_vocab])
    if want_sha is not None:
        have = vmeta["sha256"] if vmeta is not None else None
        if have != want_sha:
            raise ArtifactError(
                f"artifact {path} was trained on item vocabulary {str(have)[:12]}... but {want_sha[:12]}... is "
                "expected; item indices would point at the wrong items. Use the artifact's own vocabulary or "
                "retrain on the current catalogue"
            )
    state = check_state_dict(path, decode_weights(path, weights), meta)
    return Artifact(path=path, metadata=meta, state_dict={k: v.to(map_location) for k, v in state.items()}, vocab=vocab)
