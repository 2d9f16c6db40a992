"""A file-system model registry: versioned artifacts plus two named pointers per model.

Layout::

    <root>/
      <model>/
        <version>/          an artifact directory (see models.artifacts)
        <version>/ ...
        current             the champion: JSON {"version", "promoted_at", "previous": [older currents...]}
        challenger          optional: JSON {"version", "mode", "share", "salt", "promoted_at"}
        .lock               serialises every pointer change of this model

``current`` (the champion, what serving publishes) and ``challenger`` (a version on trial, in
``shadow`` mode: scored for every shopper but never published, or in ``split`` mode: published for
a salted-hash ``share`` of shoppers, :mod:`models.variants`) are rewritten atomically (temp file +
fsync + ``os.replace``), so readers see either the old or the new pointer, never a partial one.
Every pointer change verifies the artifact (metadata and checksums) before pointing at it;
:meth:`ModelRegistry.rollback` returns to the version that was current before the last promotion,
also after :meth:`ModelRegistry.promote_challenger` made the challenger champion.

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
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import ArtifactError, is_legacy, read_metadata, remove_file, replace_file, verify_artifact
from .variants import CHALLENGER, CHAMPION, in_share

DEFAULT_ROOT = "artifacts/models"
ENV_ROOT = "SHOPPULSE_MODELS_DIR"
CURRENT_FILE = "current"
CHALLENGER_FILE = CHALLENGER
#: The registry's two aliases per model: ``champion`` is the ``current`` pointer.
CHAMPION_ALIAS = CHAMPION
CHALLENGER_ALIAS = CHALLENGER
#: Shadow: scored for every shopper, never published. Split: published for ``share`` of shoppers.
SHADOW = "shadow"
SPLIT = "split"
MODES: tuple[str, ...] = (SHADOW, SPLIT)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Pointer files share the model folder with the version folders, so no version may take their names.
_RESERVED_VERSIONS = frozenset({CURRENT_FILE, CHALLENGER_FILE})


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown model/version, nothing to roll back)."""


@dataclass(frozen=True)
class Challenger:
    """The version on trial for one model and how it is served (see the module docstring).

    ``salt`` keys the shopper hash of the split: kept with the pointer so every worker, and every
    restart, puts a shopper on the same side; a new experiment gets a new salt.
    """

    model: str
    version: str
    mode: str
    share: float
    salt: str

    def serves(self, user_id: str) -> bool:
        """Whether this shopper is published the challenger's results (split mode, inside the share)."""
        return self.mode == SPLIT and in_share(user_id, self.salt, self.share)


@dataclass
class ModelInfo:
    name: str
    versions: list[str]
    current: str | None
    previous: list[str] = field(default_factory=list)
    promoted_at: str | None = None
    challenger: Challenger | None = None


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
        if version in _RESERVED_VERSIONS:
            raise RegistryError(f"invalid version name {version!r}: it is the name of a registry pointer file")
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

    def _read_json_pointer(self, model: str, name: str, fix: str) -> dict[str, Any] | None:
        """The pointer file ``name`` of ``model`` (None when absent); ``fix`` is the command that rewrites it."""
        p = self.model_dir(model) / name
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"pointer {p} is unreadable ({exc}); run `{fix}` to rewrite it") from exc
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise RegistryError(f"pointer {p} is malformed; run `{fix}` to rewrite it")
        return data

    def _read_pointer(self, model: str) -> dict[str, Any] | None:
        data = self._read_json_pointer(model, CURRENT_FILE, f"shoppulse models promote {model} VERSION")
        if data is not None:
            data.setdefault("previous", [])
        return data

    def challenger(self, model: str) -> Challenger | None:
        """The version on trial for ``model``, or None.

        A challenger pointer naming the champion's version is stale (a promotion of that version,
        or a :meth:`promote_challenger` interrupted between its two writes) and reads as None.
        """
        fix = f"shoppulse models clear-challenger {model}` or `shoppulse models promote {model} VERSION --as challenger"
        data = self._read_json_pointer(model, CHALLENGER_FILE, fix)
        if data is None:
            return None
        mode, share, salt = data.get("mode"), data.get("share"), data.get("salt")
        if (
            mode not in MODES
            or not isinstance(share, int | float)
            or isinstance(share, bool)
            or not 0.0 < share <= 1.0
            or not isinstance(salt, str)
        ):
            raise RegistryError(f"pointer {self.model_dir(model) / CHALLENGER_FILE} is malformed; run `{fix}`")
        if data["version"] == self.current(model):
            return None
        return Challenger(model, data["version"], mode, float(share), salt)

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
            out.append(self._info(p.name))
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

    def _write_pointer(self, model: str, data: dict[str, Any], name: str = CURRENT_FILE) -> None:
        replace_file(self.model_dir(model) / name, (json.dumps(data, indent=2) + "\n").encode("utf-8"))

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
            self._promote_locked(model, version)
            return self._info(model)

    def _promote_locked(self, model: str, version: str) -> None:
        self._verify(model, version)
        ptr = self._read_pointer(model)
        previous = list(ptr["previous"]) if ptr else []
        if ptr and ptr["version"] == version:
            return
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

    def set_challenger(
        self, model: str, version: str, mode: str, share: float = 1.0, salt: str | None = None
    ) -> Challenger:
        """Put ``version`` on trial against the champion (verified first; replaces any challenger).

        ``share`` is the split's fraction of shoppers, in (0, 1]; shadow mode scores every shopper,
        so its share is stored as 1. ``salt`` defaults to a fresh random one: a new experiment
        reshuffles which shoppers see the challenger.
        """
        if mode not in MODES:
            raise RegistryError(f"challenger mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not 0.0 < share <= 1.0:
            raise RegistryError(f"challenger share must be in (0, 1], not {share!r}")
        with self.lock(model):
            self._verify(model, version)
            champion = self.current(model)
            if champion is None:
                raise RegistryError(
                    f"model {model!r} has no champion to challenge; "
                    f"run `shoppulse models promote {model} VERSION` first"
                )
            if champion == version:
                raise RegistryError(f"{model!r} version {version!r} is the champion already; challenge it with another")
            challenger = Challenger(
                model, version, mode, 1.0 if mode == SHADOW else float(share), salt or secrets.token_hex(8)
            )
            self._write_pointer(
                model,
                {
                    "version": challenger.version,
                    "mode": challenger.mode,
                    "share": challenger.share,
                    "salt": challenger.salt,
                    "promoted_at": dt.datetime.now(dt.UTC).isoformat(),
                },
                CHALLENGER_FILE,
            )
            return challenger

    def clear_challenger(self, model: str) -> Challenger | None:
        """End the trial: remove the challenger pointer; returns the challenger it named (None if none)."""
        with self.lock(model):
            try:
                challenger = self.challenger(model)
            except RegistryError:
                challenger = None  # a malformed pointer is what clearing is for
            remove_file(self.model_dir(model) / CHALLENGER_FILE)
            return challenger

    def promote_challenger(self, model: str) -> ModelInfo:
        """Make the challenger champion and end the trial; the old champion is kept for rollback.

        The champion pointer is written first: a crash before the challenger pointer is removed
        leaves a challenger naming the champion, which :meth:`challenger` reads as none.
        """
        with self.lock(model):
            challenger = self.challenger(model)
            if challenger is None:
                raise RegistryError(
                    f"model {model!r} has no challenger to promote; set one with "
                    f"`shoppulse models promote {model} VERSION --as challenger --mode shadow`"
                )
            self._promote_locked(model, challenger.version)
            remove_file(self.model_dir(model) / CHALLENGER_FILE)
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
            self.challenger(model),
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
