"""``shoppulse models migrate``: convert format-version-1 artifacts (``torch.save`` weights) to
safetensors, in place, one version at a time.

The only code that still reads a ``torch.save`` file, and it does so only after the file's size
and sha256 matched the artifact's own metadata, with ``torch.load(weights_only=True)`` (torch
>= 2.10, past the known ``weights_only`` loader CVEs). Serving never imports this module.

Per version, atomically: ``weights.safetensors`` is written and fsynced next to ``weights.pt``
and read back tensor for tensor; then ``metadata.json`` is replaced in one rename (the commit
point: before it the version is a complete version-1 artifact, after it a complete version-2
one); then ``weights.pt`` is removed. A crash at any step leaves a loadable or migratable
artifact, and running the command again finishes the job. Version directories, their names and
the registry's ``current`` pointers are never touched; each model's registry lock is held so a
promotion or rollback cannot interleave.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import (
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    check_state_dict,
    decode_weights,
    encode_weights,
    is_legacy,
    metadata_bytes,
    read_metadata,
    replace_file,
    verified_files,
    weights_entry,
)
from .registry import ModelRegistry

#: What happened to one version.
CONVERTED = "converted"
WOULD_CONVERT = "would convert"
CURRENT = "already safetensors"
FAILED = "failed"


@dataclass(frozen=True)
class Migration:
    """The outcome for one ``model``/``version``; ``detail`` says what was done or what is wrong."""

    model: str
    version: str
    outcome: str
    detail: str


def _legacy_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a version-1 artifact whose files match their recorded sha256."""
    meta, weights = verified_files(directory)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
        raise ArtifactError(
            f"artifact {directory}: the torch.save weights could not be read "
            f"({type(exc).__name__}: {exc}); retrain this version"
        ) from exc
    return meta, check_state_dict(directory, state, meta)


def migrate_artifact(directory: str | Path, dry_run: bool = False) -> tuple[str, str]:
    """Convert one artifact directory in place; returns ``(outcome, detail)``.

    Raises :class:`ArtifactError` when a version-1 artifact fails its checks (nothing changed).
    """
    path = Path(directory)
    meta = read_metadata(path)
    if not is_legacy(meta):
        migrated = meta.get("migrated")
        stale = path / migrated["from_weights"]["file"] if migrated else None
        if stale is not None and stale.is_file():  # a crash after the commit point left it behind
            if not dry_run:
                stale.unlink()
            return CURRENT, f"{'would remove' if dry_run else 'removed'} the leftover {stale.name}"
        return CURRENT, "nothing to do"
    meta, state = _legacy_state(path)
    old_weights = dict(meta["weights"])
    if dry_run:
        return WOULD_CONVERT, f"{old_weights['file']} ({len(state)} tensors) -> {WEIGHTS_FILE}"
    weights = encode_weights(state)
    replace_file(path / WEIGHTS_FILE, weights)
    again = decode_weights(path, (path / WEIGHTS_FILE).read_bytes())
    if again.keys() != state.keys() or not all(
        torch.equal(again[name], tensor) and again[name].dtype == tensor.dtype for name, tensor in state.items()
    ):
        (path / WEIGHTS_FILE).unlink()
        raise ArtifactError(f"artifact {path}: the converted weights do not read back equal; nothing changed")
    new_meta = dict(meta)
    new_meta["format_version"] = FORMAT_VERSION
    new_meta["weights"] = weights_entry(weights, len(state))
    new_meta["migrated"] = {
        "from_format_version": meta["format_version"],
        "from_weights": old_weights,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    replace_file(path / METADATA_FILE, metadata_bytes(new_meta))  # the commit point
    (path / old_weights["file"]).unlink(missing_ok=True)
    return (
        CONVERTED,
        f"{old_weights['file']} -> {WEIGHTS_FILE} ({len(state)} tensors, sha256 "
        f"{new_meta['weights']['sha256'][:12]}...)",
    )


def migrate_registry(registry: ModelRegistry, dry_run: bool = False) -> list[Migration]:
    """Convert every version of every model in ``registry``; one failure does not stop the rest."""
    done = []
    for info in registry.list_models():
        with registry.lock(info.name):
            for version in info.versions:
                try:
                    outcome, detail = migrate_artifact(registry.version_dir(info.name, version), dry_run)
                except (ArtifactError, OSError) as exc:
                    outcome, detail = FAILED, str(exc)
                done.append(Migration(info.name, version, outcome, detail))
    return done
