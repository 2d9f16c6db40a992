"""Serving: the models the worker scores with, loaded from the registry, one pass per batch.

:class:`BatchScorer` holds the champion (the registry's ``current``) churn/propensity classifier
(the MLP or the logistic regression, whichever training served) and next-item recommender
(SASRec or co-occurrence), plus, per model kind, the challenger on trial when the registry names
one. It checks the registry between batches and swaps in new champion and challenger versions
(hot reload; a cleared challenger pointer unloads the challenger), and keeps the last good model
when a new artifact is corrupt or refuses to load. With no trained models in the registry it
serves the hand-set heuristic, and says so in every result.
No Kafka here: :mod:`streams.worker.pipeline` calls it and decides, per shopper and model kind,
whose results are published (:meth:`models.registry.Challenger.serves`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from features.spec import FeatureSpec
from features.state import ShopperState
from models.artifacts import METADATA_FILE, ArtifactError
from models.classifiers import ShopperClassifier
from models.heuristic import PurchaseIntentHeuristic
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.nextitem import VocabRecommender, resolve_device
from models.recommenders import load_recommender
from models.registry import Challenger, ModelRegistry, RegistryError

log = logging.getLogger(__name__)

#: Output score names.
CHURN = "churn_risk"
PURCHASE = "purchase_propensity"


@dataclass(slots=True)
class ShopperScores:
    """What the models say about one shopper."""

    scores: dict[str, float]
    recommendations: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class InferenceTimings:
    """Seconds spent in each model's forward pass for the last batch (for metrics)."""

    classifier_s: float = 0.0
    nextitem_s: float = 0.0
    #: The challengers' passes (shadow or split), so their cost can be told apart from the champion's.
    challenger_classifier_s: float = 0.0
    challenger_nextitem_s: float = 0.0


#: A loaded model of either kind.
LoadedModel = ShopperClassifier | VocabRecommender


class BatchScorer:
    """Scores a batch of shoppers with the registry's current models.

    Args:
        spec: the feature vector the classifier must have been trained on (hash checked).
        registry_root: the model registry folder; None = the registry default.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        top_k: recommendations per shopper.
        reload_interval_s: how often, in seconds, to look for a new current version.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        registry_root: Path | None = None,
        device: str = "auto",
        top_k: int = 10,
        reload_interval_s: float = 5.0,
    ) -> None:
        self.spec = spec
        self.registry = ModelRegistry(registry_root)
        self.device = resolve_device(None if device == "auto" else device)
        self.top_k = top_k
        self.reload_interval_s = reload_interval_s
        self.heuristic = PurchaseIntentHeuristic(spec)
        self.classifier: ShopperClassifier | None = None
        self.recommender: VocabRecommender | None = None
        self.load_errors = 0
        self.timings = InferenceTimings()
        self._tried: dict[str, tuple[str, int | None] | None] = {CLASSIFIER_MODEL: None, NEXTITEM_MODEL: None}
        # Challenger per model kind: what is loaded, and the last pointer tried (tried once per write).
        self._challengers: dict[str, tuple[Challenger, LoadedModel, tuple[str, int | None]]] = {}
        self._tried_challenger: dict[str, object] = {CLASSIFIER_MODEL: None, NEXTITEM_MODEL: None}
        self._next_check = 0.0
        self.refresh(force=True)

    @property
    def challengers(self) -> dict[str, Challenger]:
        """Model name -> the challenger loaded for it now (empty when none is on trial)."""
        return {name: loaded[0] for name, loaded in self._challengers.items()}

    @property
    def champion_versions(self) -> dict[str, str]:
        """Model name -> the champion version served (the heuristic's name and version without a classifier)."""
        return self.served

    @property
    def model_versions(self) -> dict[str, str]:
        """Score or output name -> version that produced it."""
        if self.classifier is None:
            return {self.heuristic.name: self.heuristic.version}
        versions = {
            CHURN: f"{CLASSIFIER_MODEL}:{self.classifier.version}",
            PURCHASE: f"{CLASSIFIER_MODEL}:{self.classifier.version}",
        }
        if self.recommender is not None:
            versions["recommendations"] = f"{NEXTITEM_MODEL}:{self.recommender.version}"
        return versions

    @property
    def served(self) -> dict[str, str]:
        """Registry model -> version being served (the heuristic when no classifier is loaded)."""
        if self.classifier is None:
            return {self.heuristic.name: self.heuristic.version}
        served = {CLASSIFIER_MODEL: str(self.classifier.version)}
        if self.recommender is not None:
            served[NEXTITEM_MODEL] = str(self.recommender.version)
        return served

    def refresh(self, force: bool = False) -> bool:
        """Load any champion or challenger whose registry version changed or was rewritten in place
        (a format migration), unload a cleared challenger; True when something was swapped."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return False
        self._next_check = now + self.reload_interval_s
        swapped = False
        for name in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
            swapped = self._refresh_champion(name) | swapped
            swapped = self._refresh_challenger(name) | swapped
        return swapped

    def _refresh_champion(self, name: str) -> bool:
        try:
            version = self.registry.current(name)
        except RegistryError:
            version = None
        if version is None or self._written(name, version) == self._tried[name]:
            return False
        self._tried[name] = self._written(name, version)  # tried once per write, good or bad
        model = self._load(name, version, f"fix the artifact or run `shoppulse models rollback {name}`")
        if model is None:
            return False
        if isinstance(model, ShopperClassifier):
            self.classifier = model
        else:
            self.recommender = model
        log.info("serving %s version %s on %s", name, version, self.device)
        return True

    def _refresh_challenger(self, name: str) -> bool:
        try:
            challenger = self.registry.challenger(name)
        except RegistryError as exc:
            if self._tried_challenger[name] != str(exc):
                self._tried_challenger[name] = str(exc)
                self.load_errors += 1
                log.error("%s; keeping the challenger already loaded, if any", exc)
            return False
        if challenger is None:
            self._tried_challenger[name] = None
            if self._challengers.pop(name, None) is None:
                return False
            log.info("challenger of %s cleared; serving the champion alone", name)
            return True
        written = (challenger, self._written(name, challenger.version))
        if written == self._tried_challenger[name]:
            return False
        self._tried_challenger[name] = written  # tried once per write, good or bad
        loaded = self._challengers.get(name)
        if loaded is not None and loaded[2] == written[1]:
            model: LoadedModel | None = loaded[1]  # same artifact, new mode/share/salt: no reload
        else:
            model = self._load(
                name,
                challenger.version,
                f"fix the artifact, or end the trial with `shoppulse models clear-challenger {name}`",
            )
        if model is None:
            return False
        self._challengers[name] = (challenger, model, written[1])
        log.info(
            "challenger of %s: version %s in %s mode (share %.3f) on %s",
            name,
            challenger.version,
            challenger.mode,
            challenger.share,
            self.device,
        )
        return True

    def _load(self, name: str, version: str, remedy: str) -> LoadedModel | None:
        """``name``/``version`` loaded and checked, or None (logged, counted) when it cannot serve.

        Each candidate scores one row before it is swapped in: a model that loads but cannot run
        (say, another input width) is refused here instead of failing every batch.
        """
        model: LoadedModel
        try:
            directory = self.registry.version_dir(name, version)
            if name == CLASSIFIER_MODEL:
                model = ShopperClassifier.load(directory, expected_feature_spec_hash=self.spec.hash, device=self.device)
                with torch.inference_mode():
                    model.predict_proba(np.zeros((1, self.spec.dim), dtype=np.float32))
            else:
                model = load_recommender(directory, device=self.device)
                with torch.inference_mode():
                    model.recommend([[]], k=self.top_k)
        except (ArtifactError, RegistryError, OSError, ValueError, RuntimeError) as exc:
            self.load_errors += 1
            log.error(
                "could not load %s version %s (%s); keeping the model already loaded — %s", name, version, exc, remedy
            )
            return None
        return model

    def _written(self, name: str, version: str) -> tuple[str, int | None]:
        """A version and when its metadata was written: `shoppulse models migrate` rewrites a
        version in place, so the converted artifact counts as new and is tried again."""
        try:
            return version, (self.registry.version_dir(name, version) / METADATA_FILE).stat().st_mtime_ns
        except (RegistryError, OSError):
            return version, None

    @torch.inference_mode()
    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[ShopperScores]:
        """One forward pass per model for the whole batch."""
        if self.classifier is None:
            return [ShopperScores(s) for s in self.heuristic.score(states, features)]
        started = time.perf_counter()
        results = [ShopperScores(scores) for scores in _classify(self.classifier, features)]
        self.timings.classifier_s = time.perf_counter() - started
        if self.recommender is not None:
            started = time.perf_counter()
            for result, recommended in zip(results, self._recommend(self.recommender, states), strict=True):
                result.recommendations = recommended
            self.timings.nextitem_s = time.perf_counter() - started
        return results

    def _recommend(
        self, recommender: VocabRecommender, states: Sequence[ShopperState]
    ) -> list[list[tuple[str, float]]]:
        return recommender.recommend([state.history_item_ids() for state in states], k=self.top_k)

    @torch.inference_mode()
    def score_challenger(
        self, model: str, states: Sequence[ShopperState], features: np.ndarray
    ) -> list[ShopperScores]:
        """The challenger of ``model`` over the whole batch, one forward pass: for the classifier,
        ``scores`` filled and no recommendations; for the next-item model, recommendations and no
        scores. Raises ``LookupError`` when no challenger is loaded for ``model`` (see
        :attr:`challengers`)."""
        if model not in self._challengers:
            raise LookupError(f"no challenger loaded for {model!r} (loaded: {sorted(self._challengers) or 'none'})")
        loaded = self._challengers[model][1]
        started = time.perf_counter()
        if isinstance(loaded, ShopperClassifier):
            results = [ShopperScores(scores) for scores in _classify(loaded, features)]
            self.timings.challenger_classifier_s = time.perf_counter() - started
            return results
        results = [ShopperScores({}, recommended) for recommended in self._recommend(loaded, states)]
        self.timings.challenger_nextitem_s = time.perf_counter() - started
        return results

    @torch.inference_mode()
    def churn_reasons(self, features: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]:
        """The features that raise each row's churn risk most, with how much.

        Occlusion: the risk drop when one feature is set to its mean over the classifier's
        training rows (:attr:`ShopperClassifier.reference_features`, stored in the artifact); one
        batched pass of ``rows × features``, meant for the few rows that alert. The reference ships
        with the model, so the reasons depend on the shopper and the model alone: not on which
        worker computed them, how long it has run, or what else it scored.
        """
        if self.classifier is None or len(features) == 0:
            return [[] for _ in range(len(features))]
        baseline = self.classifier.reference_features
        n, d = features.shape
        occluded = np.repeat(features[:, None, :], d, axis=1)
        occluded[:, np.arange(d), np.arange(d)] = baseline
        risk = self.classifier.predict_proba(features)["churn"]
        without = self.classifier.predict_proba(occluded.reshape(n * d, d))["churn"].reshape(n, d)
        contribution = risk[:, None] - without
        names = self.spec.names
        reasons = []
        for row in contribution:
            order = np.argsort(-row)[:top]
            reasons.append([(names[j], round(float(row[j]), 4)) for j in order if row[j] > 0])
        return reasons


def _classify(classifier: ShopperClassifier, features: np.ndarray) -> list[dict[str, float]]:
    """Churn risk and purchase propensity per row, one forward pass."""
    probabilities = classifier.predict_proba(features)
    churn, purchase = probabilities["churn"], probabilities["purchase"]
    return [{CHURN: float(c), PURCHASE: float(p)} for c, p in zip(churn, purchase, strict=True)]
