"""A file-system model registry: versioned artifacts plus a ``current`` pointer per model.

Layout::

    <root>/
      <model>/
        <version>/          an artifact directory (see models.artifacts)
        <version>/ ...
        current             JSON {"version", "promoted_at", "previous": [older currents...]}
        .lock               serialises promote / rollback of this model

``current`` is rewritten atomically (temp file + fsync + ``os.replace``), so readers see either
the old or the new pointer, never a partial one. :meth:`ModelRegistry.promote` verifies the
artifact (metadata and checksums) before pointing at it; :meth:`ModelRegistry.rollback`
returns to the version that was current before the last promotion.

The root defaults to ``$SHOPPULSE_MODELS_DIR`` or ``artifacts/models`` (git-ignored).
Module-level :func:`list_models`, :func:`promote`, :func:`rollback` and :func:`current` wrap
the class for the CLI (``shoppulse models list|promote|rollback``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import ArtifactError, is_legacy, read_metadata, replace_file, verify_artifact

DEFAULT_ROOT = "artifacts/models"
ENV_ROOT = "SHOPPULSE_MODELS_DIR"
CURRENT_FILE = "current"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown model/version, nothing to roll back)."""


@dataclass
class ModelInfo:
    name: str
    versions: list[str]
    current: str | None
    previous: list[str] = field(default_factory=list)
    promoted_at: str | None = None


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' or '-' (max 128), "
            "starting with a letter or digit"
        )
    return name


def _natural_key(s: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p]


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


class ModelRegistry:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    # ---------------------------------------------------------------- paths
    def model_dir(self, model: str) -> Path:
        return self.root / _check_name("model", model)

    def version_dir(self, model: str, version: str) -> Path:
        """Where ``model``/``version`` lives (save a new artifact straight here)."""
        return self.model_dir(model) / _check_name("version", version)

    # ---------------------------------------------------------------- queries
    def versions(self, model: str) -> list[str]:
        d = self.model_dir(model)
        if not d.is_dir():
            return []
        return sorted(
            (p.name for p in d.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "metadata.json").is_file()),
            key=_natural_key,
        )

    def _read_pointer(self, model: str) -> dict[str, Any] | None:
        p = self.model_dir(model) / CURRENT_FILE
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(
                f"pointer {p} is unreadable ({exc}); run `shoppulse models promote {model} VERSION` to rewrite it"
            ) from exc
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise RegistryError(
                f"pointer {p} is malformed; run `shoppulse models promote {model} VERSION` to rewrite it"
            )
        data.setdefault("previous", [])
        return data

    def current(self, model: str) -> str | None:
        """The promoted version of ``model``, or ``None`` if none was promoted."""
        ptr = self._read_pointer(model)
        return ptr["version"] if ptr else None

    def current_dir(self, model: str) -> Path:
        """Directory of the promoted version; raises :class:`RegistryError` when there is none."""
        v = self.current(model)
        if v is None:
            raise RegistryError(
                f"model {model!r} has no promoted version under {self.root}; "
                f"run `shoppulse models promote {model} VERSION` first"
            )
        return self.version_dir(model, v)

    def list_models(self) -> list[ModelInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or not _NAME.match(p.name):
                continue
            ptr = self._read_pointer(p.name)
            out.append(
                ModelInfo(
                    name=p.name,
                    versions=self.versions(p.name),
                    current=ptr["version"] if ptr else None,
                    previous=list(ptr["previous"]) if ptr else [],
                    promoted_at=ptr.get("promoted_at") if ptr else None,
                )
            )
        return out

    # ---------------------------------------------------------------- changes
    @contextmanager
    def lock(self, model: str) -> Iterator[None]:
        """Hold ``model``'s lock: promote, rollback and the format migration never interleave."""
        d = self.model_dir(model)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _write_pointer(self, model: str, data: dict[str, Any]) -> None:
        replace_file(self.model_dir(model) / CURRENT_FILE, (json.dumps(data, indent=2) + "\n").encode("utf-8"))

    def _verify(self, model: str, version: str) -> dict[str, Any]:
        vdir = self.version_dir(model, version)
        if not vdir.is_dir():
            have = ", ".join(self.versions(model)) or "none"
            raise RegistryError(f"model {model!r} has no version {version!r} under {self.root} (versions: {have})")
        try:
            meta = verify_artifact(vdir)
        except ArtifactError as exc:
            raise RegistryError(f"refusing to point {model!r} at {version!r}: {exc}") from exc
        if is_legacy(meta):
            raise RegistryError(
                f"refusing to point {model!r} at {version!r}: its weights are in the old torch.save "
                "format, which serving does not load; run `shoppulse models migrate` first"
            )
        return meta

    def register(self, model: str, artifact_dir: str | Path, version: str | None = None) -> str:
        """Copy a verified artifact into the registry as ``model``/``version`` (default: its own
        version); returns the version. Does not promote it."""
        meta = verify_artifact(artifact_dir)
        version = _check_name("version", version or str(meta["version"]))
        dest = self.version_dir(model, version)
        if dest.exists():
            raise RegistryError(f"{model!r} version {version!r} already exists; versions are immutable, use a new one")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=dest.parent))
        try:
            shutil.copytree(artifact_dir, tmp, dirs_exist_ok=True)
            verify_artifact(tmp)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def promote(self, model: str, version: str) -> ModelInfo:
        """Make ``version`` current after verifying its artifact; the old current is kept for rollback."""
        with self.lock(model):
            self._verify(model, version)
            ptr = self._read_pointer(model)
            previous = list(ptr["previous"]) if ptr else []
            if ptr and ptr["version"] == version:
                return self._info(model)
            if ptr:
                previous.append(ptr["version"])
            self._write_pointer(
                model,
                {
                    "version": version,
                    "promoted_at": dt.datetime.now(dt.UTC).isoformat(),
                    "previous": previous,
                },
            )
            return self._info(model)

    def rollback(self, model: str) -> ModelInfo:
        """Return to the version that was current before the last promotion."""
        with self.lock(model):
            ptr = self._read_pointer(model)
            if ptr is None:
                raise RegistryError(f"model {model!r} has no promoted version; nothing to roll back")
            previous = list(ptr["previous"])
            if not previous:
                raise RegistryError(
                    f"model {model!r} is at its first promoted version {ptr['version']!r}; nothing "
                    f"to roll back to (promote a specific version with `shoppulse models promote`)"
                )
            target = previous.pop()
            self._verify(model, target)
            self._write_pointer(
                model,
                {
                    "version": target,
                    "promoted_at": dt.datetime.now(dt.UTC).isoformat(),
                    "previous": previous,
                    "rolled_back_from": ptr["version"],
                },
            )
            return self._info(model)

    def _info(self, model: str) -> ModelInfo:
        ptr = self._read_pointer(model)
        return ModelInfo(
            model,
            self.versions(model),
            ptr["version"] if ptr else None,
            list(ptr["previous"]) if ptr else [],
            ptr.get("promoted_at") if ptr else None,
        )

    def describe(self, model: str, version: str) -> dict[str, Any]:
        """Metadata of one version (no checksum work)."""
        return read_metadata(self.version_dir(model, version))


# -------------------------------------------------------------------- module-level API
def list_models(root: str | Path | None = None) -> list[ModelInfo]:
    return ModelRegistry(root).list_models()


def promote(model: str, version: str, root: str | Path | None = None) -> ModelInfo:
    return ModelRegistry(root).promote(model, version)


def rollback(model: str, root: str | Path | None = None) -> ModelInfo:
    return ModelRegistry(root).rollback(model)


def current(model: str, root: str | Path | None = None) -> str | None:
    return ModelRegistry(root).current(model)
