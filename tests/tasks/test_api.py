"""tasks.api.load: a checkpoint alone gives a ready model with plain-Python results (fast, no training)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from tasks.api import load, pick_task, read_checkpoint, without_weight_sources
from tasks.detection import DetectionTask
from tasks.runtime import ConfigError

SMALL = dict(backbone="resnet18", frozen_bn=False, trainable_layers=5, stride=16, d_model=32, nhead=4,
             num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0, num_queries=6)
INFO = {"num_classes": 2, "class_names": ["cat", "dog"], "category_ids": [3, 8]}


def write_checkpoint(path, pretrained: str | None = None) -> DetectionTask:
    torch.manual_seed(0)
    task = DetectionTask(model=SMALL, data_info=INFO)
    hparams = dict(task.hparams)
    hparams["model"] = {**hparams["model"], "pretrained_backbone": pretrained}
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams,
                "mtdetr": {"task": "detection", "data": None, "metrics": {},
                           "preprocessing": {"val_scale": 64, "max_size": 96, "size_divisibility": 32}}}, path)
    return task


def test_detector_predicts_plain_python_with_exif_orientation(tmp_path):
    write_checkpoint(tmp_path / "m.ckpt", pretrained=str(tmp_path / "not-here.pth"))  # never read again
    detector = load(tmp_path / "m.ckpt", device="cpu")
    stored = Image.new("RGB", (60, 40), (10, 200, 30))
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: the oriented image is 40 x 60
    stored.save(tmp_path / "rotated.jpg", exif=exif)
    results = detector.predict([tmp_path / "rotated.jpg", Image.new("RGB", (30, 20))], threshold=0.0)
    assert [(r["width"], r["height"]) for r in results] == [(40, 60), (30, 20)]
    for r in results:
        assert len(r["boxes"]) == len(r["labels"]) == len(r["scores"]) > 0
        assert set(r["labels"]) <= {"cat", "dog"}
        assert all(0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"] for x1, y1, x2, y2 in r["boxes"])
    json.dumps(results)  # plain Python all the way down
    assert results == detector.predict([tmp_path / "rotated.jpg", Image.new("RGB", (30, 20))], threshold=0.0)
    high = detector.predict([tmp_path / "rotated.jpg"], threshold=0.99)
    assert all(s >= 0.99 for s in high[0]["scores"])


@pytest.mark.slow
def test_bf16_precision_runs_and_bad_settings_are_one_line_errors(tmp_path):
    write_checkpoint(tmp_path / "m.ckpt")
    detector = load(tmp_path / "m.ckpt", device="cpu", precision="bf16")
    assert detector.predict([Image.new("RGB", (32, 32))], threshold=0.0)[0]["labels"]
    with pytest.raises(ConfigError, match="precision='8'"):
        load(tmp_path / "m.ckpt", device="cpu", precision="8").predict([Image.new("RGB", (32, 32))])
    with pytest.raises(ConfigError, match="device="):
        load(tmp_path / "m.ckpt", device="tpu")


def test_unreadable_files_are_named_not_raised(tmp_path):
    write_checkpoint(tmp_path / "m.ckpt")
    detector = load(tmp_path / "m.ckpt", device="cpu")
    (tmp_path / "x.txt").write_text("hello")
    loaded, problems = detector.load_images([tmp_path / "x.txt"])
    assert loaded == [] and len(problems) == 1 and "x.txt" in problems[0] and "\n" not in problems[0]


def test_checkpoint_errors_name_the_file_and_what_is_supported(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "mtdetr": {"task": "pose"}}, tmp_path / "p.ckpt")
    with pytest.raises(ConfigError, match="'pose'.*supported: detection, multilabel, translation, multitask"):
        read_checkpoint(tmp_path / "p.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="not an mtdetr"):
        read_checkpoint(tmp_path / "plain.ckpt")


def test_weight_sources_are_dropped_at_any_depth_and_multitask_needs_a_task_name():
    settings = {"pretrained_backbone": "/w.pth", "d_model": 8,
                "detection": {"init_from": "hf:x", "pretrained_backbone": "DEFAULT", "nhead": 2}}
    assert without_weight_sources(settings) == {"pretrained_backbone": None, "d_model": 8,
                                                "detection": {"init_from": None, "pretrained_backbone": None,
                                                              "nhead": 2}}
    task = DetectionTask(model=SMALL, data_info=INFO)
    assert pick_task(task, None)[1] == "detection"
    with pytest.raises(ConfigError, match="only for multitask"):
        pick_task(task, "translation")

    class FakeMulti:
        task_names = ["detection", "translation"]

        def task(self, name):
            return name

    assert pick_task(FakeMulti(), "translation") == ("translation", "translation")
    with pytest.raises(ConfigError, match=re.escape("task_name=<detection|translation>")):
        pick_task(FakeMulti(), None)


@pytest.mark.slow
def test_a_checkpoint_from_before_position_offset_keeps_the_cell_centre_positions(tmp_path):
    write_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert load(tmp_path / "new.ckpt", device="cpu").task.model.adapter.position_offset == \
        ckpt["hyper_parameters"]["model"].get("position_offset", 0.5)
    ckpt["hyper_parameters"]["model"].pop("position_offset", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load(tmp_path / "old.ckpt", device="cpu").task.model.adapter.position_offset == 0.5


def test_a_translation_checkpoint_from_before_the_decoding_group_keeps_its_decoding():
    """Older checkpoints kept ``mode`` and ``decoding`` in the model settings and the test split's in
    ``test_decoding``: they load with the same decoding (test: beam 3; validation: greedy to 6 tokens)."""
    from tasks.api import build_task
    from tasks.translation import TranslationTask

    info = {"vocab_size": 40, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4}
    model = {"d_model": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 32}
    task = TranslationTask(model=model, data_info=info)
    old = {**dict(task.hparams), "model": {**model, "mode": "autoregressive",
                                            "decoding": {"strategy": "greedy", "max_len_b": 6}},
           "test_decoding": {"strategy": "beam", "beam_size": 3}}
    old.pop("mode"), old.pop("decoding")
    loaded = build_task({"state_dict": task.state_dict(), "hyper_parameters": old,
                         "mtdetr": {"task": "translation", "data": None, "metrics": {}}})
    assert loaded.mode == "autoregressive"
    assert loaded.decoding == {"strategy": "beam", "max_len_b": 6, "beam_size": 3}
    assert loaded.val_decoding == {"strategy": "greedy"}
