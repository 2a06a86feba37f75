"""The teacher's end-to-end option: EfficientNet-Lite0 fine-tuned on rendered pixels (meant for
GPU nodes; here a tiny run on the CPU checks the code path)."""

import numpy as np
import pytest
import torch

from dudch import DudchError, evaluate, nets, prepare
from dudch.features import efficientnet_backbone
from dudch.teacher import TeacherConfig, fit

CONFIG = prepare.PrepareConfig(max_items=40, image_size=64, min_label_size=1, min_word_count=1,
                               keep_pixels=True)


@pytest.fixture(scope="module")
def prepared(openclipart_root, tmp_path_factory):
    directory = tmp_path_factory.mktemp("prepared")
    features, labels, _ = prepare.prepare(f"openclipart:{openclipart_root}", directory / "cache", CONFIG, progress=False)
    prepare.save(directory, features=features, labels=labels)
    return directory, features, labels


def test_prepare_keeps_pixels_in_a_memory_mappable_file(prepared):
    directory, features, _ = prepared
    loaded = prepare.load_features(directory, expect=("image", "text"))
    assert isinstance(loaded["pixels"], np.memmap)
    assert loaded["pixels"].shape == (len(features["image"]), 64, 64, 3) and loaded["pixels"].dtype == np.uint8
    np.testing.assert_array_equal(loaded["pixels"], features["pixels"])


def test_fine_tuning_updates_the_backbone_and_round_trips(prepared, tmp_path):
    _, features, labels = prepared
    train = features["train"]
    config = TeacherConfig(bits=8, epochs=1, batch_size=8, text_hidden=32, image_input="pixels")
    teacher = fit(features["image"][train], features["text"][train], config, pixels=features["pixels"][train])
    assert teacher.takes_pixels
    pretrained = efficientnet_backbone().state_dict()["net._conv_stem.weight"]
    assert not torch.equal(teacher.image[0].state_dict()["net._conv_stem.weight"], pretrained)

    h_image, h_text = nets.hash_outputs(teacher, features["pixels"][:10], features["text"][:10])
    assert h_image.shape == (10, 8) and np.isfinite(h_image).all()
    nets.save(tmp_path / "model.pt", teacher, config)
    loaded, _ = nets.load(tmp_path / "model.pt")
    np.testing.assert_allclose(nets.hash_outputs(loaded, features["pixels"][:10], features["text"][:10])[0],
                               h_image, rtol=1e-5, atol=1e-5)
    rows, _ = evaluate.score({"teacher": evaluate.teacher_codes(teacher, features)}, features, labels, 8, curves=False)
    assert all(0 <= r["map_all"] <= 1 for r in rows)


def test_fine_tuning_without_pixels_is_one_clear_line(prepared):
    _, features, _ = prepared
    with pytest.raises(DudchError, match="needs the rendered pixels"):
        fit(features["image"], features["text"], TeacherConfig(bits=8, epochs=1, image_input="pixels"))
    teacher = fit(features["image"], features["text"], TeacherConfig(bits=8, epochs=1, text_hidden=8))
    no_pixels = {k: v for k, v in features.items() if k != "pixels"}
    assert nets.image_input(teacher, no_pixels) is no_pixels["image"]
