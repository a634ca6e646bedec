"""Stage bundles: exact round trips, one copy of tied weights, and clear errors for damage."""

from __future__ import annotations

import json

import pytest
import torch

from splitlearn_async import (
    BundleCorruptError,
    BundleError,
    MissingPartError,
    SplitPointError,
    load_stages,
    save_stages,
    split_model,
)
from tests.support.tiny_models import left_padded_batch, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    stages = split_model(model, (2, 4))
    return model, stages, save_stages(stages, tmp_path / "bundle")


def _assert_same_tensors(a, b):
    ta, tb = a.checkpoint_tensors(), b.checkpoint_tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def test_round_trip_is_exact_for_every_family(family, tmp_path):
    stages = split_model(tiny_model(family), (2, 4))
    loaded = load_stages(save_stages(stages, tmp_path / family))
    for original, restored in zip(stages, loaded):
        _assert_same_tensors(original, restored)
    ids, mask = left_padded_batch([4, 6])
    with torch.no_grad():
        a = stages.top(stages.trunk(stages.bottom(ids, mask), mask), mask)
        b = loaded.top(loaded.trunk(loaded.bottom(ids, mask), mask), mask)
    assert torch.equal(a, b)


def test_layout_manifest_and_tied_embedding_stored_once(saved):
    model, stages, root = saved
    assert model.config.tie_word_embeddings
    assert sorted(p.name for p in root.iterdir()) == ["bottom", "top", "trunk"]
    top = json.loads((root / "top" / "manifest.json").read_text())
    assert top["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in top["tensors"]
    trunk = json.loads((root / "trunk" / "manifest.json").read_text())
    assert trunk["layer_range"] == [2, 4] and trunk["family"] == "llama" and trunk["dtype"] == "float32"
    assert trunk["format_version"] == 1 and len(trunk["files"]["model.safetensors"]["sha256"]) == 64
    assert all(name.startswith("model.layers.") for name in trunk["tensors"])
    loaded = load_stages(root)
    assert loaded.top.lm_head.weight is loaded.bottom.embed.weight  # still one tensor in memory


def test_server_gets_only_the_trunk_directory(saved, tmp_path):
    import shutil

    _, stages, root = saved
    server_copy = tmp_path / "server" / "trunk"
    shutil.copytree(root / "trunk", server_copy)
    loaded = load_stages(server_copy, parts=("trunk",))
    assert loaded.bottom is None and loaded.top is None
    _assert_same_tensors(stages.trunk, loaded.trunk)
    with pytest.raises(MissingPartError) as info:
        load_stages(server_copy, parts=("top",))
    assert "'top'" in str(info.value) and "trunk" in str(info.value)


def test_missing_part(saved):
    _, _, root = saved
    import shutil

    shutil.rmtree(root / "top")
    with pytest.raises(MissingPartError, match="no 'top' part"):
        load_stages(root)
    assert load_stages(root, parts=("bottom", "trunk")).top is None


def test_corrupted_weights_fail_checksum(saved):
    _, _, root = saved
    path = root / "trunk" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleCorruptError, match="sha256"):
        load_stages(root, parts=("trunk",))


def test_truncated_weights(saved):
    _, _, root = saved
    path = root / "trunk" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleCorruptError, match="truncated"):
        load_stages(root, parts=("trunk",))


def test_missing_weights_file(saved):
    _, _, root = saved
    (root / "bottom" / "model.safetensors").unlink()
    with pytest.raises(BundleCorruptError, match="missing"):
        load_stages(root, parts=("bottom",))


def test_wrong_checksum_in_manifest(saved):
    _, _, root = saved
    path = root / "trunk" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleCorruptError, match="does not match the sha256"):
        load_stages(root, parts=("trunk",))


def test_unreadable_manifest(saved):
    _, _, root = saved
    (root / "trunk" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleCorruptError, match="not valid JSON"):
        load_stages(root)


def test_future_format_version(saved):
    _, _, root = saved
    path = root / "trunk" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99"):
        load_stages(root)


def test_split_points_must_match_the_bundle(saved):
    _, _, root = saved
    with pytest.raises(SplitPointError, match=r"split at \(2, 4\)"):
        load_stages(root, (1, 3))
    assert load_stages(root, (2, 4)).trunk.layer_range == (2, 4)


def test_top_without_its_tied_embedding(saved, tmp_path):
    import shutil

    _, _, root = saved
    client = tmp_path / "client"
    shutil.copytree(root / "top", client / "top")
    shutil.copytree(root / "trunk", client / "trunk")
    with pytest.raises(MissingPartError, match="bottom/"):
        load_stages(client, parts=("top",))


def test_no_pickle_anywhere_in_a_bundle(saved):
    _, _, root = saved
    suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}
