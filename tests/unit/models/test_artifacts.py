"""Artifacts: round trip, corrupt / truncated / tampered refused, spec and vocab mismatch; registry."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from models.artifacts import WEIGHTS_FILE, ArtifactError, load_artifact, save_artifact, sha256_file, verify_artifact
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec
from models.registry import ModelRegistry, RegistryError, current, list_models, promote, rollback
from models.sequences import ItemVocab

torch.set_num_threads(1)

VOCAB = ItemVocab([f"sku{i}" for i in range(1, 9)])


def make_rec(seed: int = 0) -> NextItemRecommender:
    torch.manual_seed(seed)
    model = SASRec(NextItemConfig(num_items=len(VOCAB), max_len=5, dim=8, layers=1, heads=2))
    model.popularity.copy_(torch.arange(len(VOCAB) + 1, dtype=torch.float32))
    return NextItemRecommender(model, VOCAB)


def test_round_trip_gives_identical_recommendations(tmp_path):
    rec = make_rec()
    path = rec.save(tmp_path / "v1", "v1", metrics={"HR@10": 0.5}, training_data={"users": 3})
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["kind"] == "nextitem-sasrec-ce" and meta["version"] == "v1"
    assert meta["feature_spec_hash"] is None and meta["vocab"]["size"] == 8 and len(meta["weights"]["sha256"]) == 64
    assert meta["metrics"] == {"HR@10": 0.5} and meta["training_data"] == {"users": 3}
    assert meta["format_version"] == 2 and meta["weights"]["format"] == "safetensors"
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "vocab.json", WEIGHTS_FILE]
    loaded = NextItemRecommender.load(path, expected_vocab_sha256=VOCAB.sha256())
    hist = [["sku1", "sku2"], [], ["sku7"]]
    assert loaded.recommend(hist, k=4) == rec.recommend(hist, k=4)
    assert loaded.version == "v1" and loaded.vocab == VOCAB
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directories left behind"


def test_artifacts_are_immutable(tmp_path):
    make_rec().save(tmp_path / "v1", "v1")
    with pytest.raises(ArtifactError, match="already exists"):
        make_rec().save(tmp_path / "v1", "v1")


def test_corrupt_weights_refused(tmp_path):
    path = make_rec().save(tmp_path / "a", "1")
    w = path / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"sha256 of {WEIGHTS_FILE}"):
        NextItemRecommender.load(path)


def test_truncated_weights_refused(tmp_path):
    path = make_rec().save(tmp_path / "a", "1")
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(path)


def test_missing_or_broken_metadata_refused(tmp_path):
    path = make_rec().save(tmp_path / "a", "1")
    meta = path / "metadata.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(path)
    meta.unlink()
    with pytest.raises(ArtifactError, match="no metadata.json"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


def test_checksum_mismatch_in_metadata_refused(tmp_path):
    path = make_rec().save(tmp_path / "a", "1")
    meta = json.loads((path / "metadata.json").read_text())
    meta["weights"]["sha256"] = "0" * 64
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="sha256"):
        verify_artifact(path)


def test_tampered_vocabulary_refused(tmp_path):
    path = make_rec().save(tmp_path / "a", "1")
    (path / "vocab.json").write_text(json.dumps([f"x{i}" for i in range(8)]))
    with pytest.raises(ArtifactError, match="vocab.json"):
        load_artifact(path)


def test_feature_spec_and_vocab_mismatch_refused(tmp_path):
    state = {"w": torch.ones(3)}
    path = save_artifact(
        tmp_path / "clf", state, kind="classifier", version="1", feature_spec_hash="abc", vocab=["a", "b"]
    )
    assert load_artifact(path, expected_feature_spec_hash="abc", expected_vocab=["a", "b"]).state_dict["w"].sum() == 3
    with pytest.raises(ArtifactError, match="feature spec 'abc'.*retrain"):
        load_artifact(path, expected_feature_spec_hash="def")
    with pytest.raises(ArtifactError, match="feature spec"):
        load_artifact(path, expected_feature_spec_hash=None)
    with pytest.raises(ArtifactError, match="vocabulary"):
        load_artifact(path, expected_vocab=["a", "c"])
    with pytest.raises(ArtifactError, match="vocabulary"):
        NextItemRecommender.load(make_rec().save(tmp_path / "n", "1"), expected_vocab_sha256=ItemVocab(["z"]).sha256())
    with pytest.raises(ArtifactError, match="expected 'nextitem-sasrec-ce'"):
        NextItemRecommender.load(path)


class Evil:
    """Unpickling this creates ``marker``: proof that a pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    path = save_artifact(tmp_path / "e", {"w": torch.zeros(1)}, kind="k", version="1")
    weights = path / WEIGHTS_FILE
    torch.save({"w": Evil(marker)}, weights)  # then "fix" the checksum to pass verification
    meta = json.loads((path / "metadata.json").read_text())
    meta["weights"].update(sha256=sha256_file(weights), bytes=weights.stat().st_size)
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="could not be read"):
        load_artifact(path)
    assert not marker.exists()


def test_shape_mismatch_with_model_code_refused(tmp_path):
    path = make_rec().save(tmp_path / "a", "1")
    meta = json.loads((path / "metadata.json").read_text())
    meta["config"]["dim"] = 16
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="does not match"):
        NextItemRecommender.load(path)


def test_registry_promote_rollback_list(tmp_path):
    root = tmp_path / "reg"
    reg = ModelRegistry(root)
    for v in ("1", "2", "10"):
        make_rec().save(reg.version_dir("nextitem", v), v)
    assert current("nextitem", root) is None
    assert [m.name for m in list_models(root)] == ["nextitem"]
    assert list_models(root)[0].versions == ["1", "2", "10"]
    promote("nextitem", "1", root)
    promote("nextitem", "10", root)
    info = promote("nextitem", "2", root)
    assert info.current == "2" and info.previous == ["1", "10"]
    assert reg.current_dir("nextitem") == root / "nextitem" / "2"
    assert rollback("nextitem", root).current == "10"
    assert rollback("nextitem", root).current == "1"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        rollback("nextitem", root)
    assert current("nextitem", root) == "1"
    assert NextItemRecommender.load(reg.current_dir("nextitem")).version == "1"
    assert not [p for p in (root / "nextitem").iterdir() if p.name.startswith(".current")]


def test_registry_refuses_unknown_or_corrupt_versions(tmp_path):
    reg = ModelRegistry(tmp_path)
    make_rec().save(reg.version_dir("m", "1"), "1")
    reg.promote("m", "1")
    with pytest.raises(RegistryError, match="no version '9'"):
        reg.promote("m", "9")
    path = make_rec().save(reg.version_dir("m", "2"), "2")
    (path / WEIGHTS_FILE).write_bytes(b"broken")
    with pytest.raises(RegistryError, match="refusing"):
        reg.promote("m", "2")
    assert reg.current("m") == "1"  # pointer untouched
    with pytest.raises(RegistryError, match="invalid model name"):
        reg.promote("../etc", "1")
    with pytest.raises(RegistryError, match="no promoted version"):
        reg.rollback("other")


def test_registry_register_copies_verified_artifact(tmp_path):
    src = make_rec().save(tmp_path / "build" / "v7", "v7")
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.register("nextitem", src) == "v7"
    assert reg.versions("nextitem") == ["v7"]
    with pytest.raises(RegistryError, match="already exists"):
        reg.register("nextitem", src)
