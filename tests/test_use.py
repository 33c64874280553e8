"""Using a trained checkpoint: eval.py, predict.py and tasks.api.load, end to end on tiny runs of
``python train.py`` (subprocesses, CPU)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datamodules.shapes import generate_shapes_dataset
from tasks.coco_eval import STAT_KEYS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2"}
TINY_MODEL = ["model.d_model=32", "model.nhead=4", "model.num_encoder_layers=1", "model.num_decoder_layers=1",
              "model.dim_feedforward=64", "model.num_queries=8"]
TINY_TEXT = ["task=translation", "model.d_model=32", "model.nhead=4", "model.num_encoder_layers=1",
             "model.num_decoder_layers=1", "model.dim_feedforward=64", "model.max_length=64", "data.vocab_size=400",
             "data.max_train_examples=48", "data.max_eval_examples=16", "data.max_tokens=512",
             "decoding.max_len_b=5", "decoding.max_len_a=0.5"]


def run(script: str, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          input=stdin, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def add_crowd_and_mask_areas(path: Path) -> None:
    """Crowd regions on every other image and areas smaller than w*h, as COCO's mask areas are."""
    data = json.loads(path.read_text())
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for a in data["annotations"]:
        a["area"] = round(0.55 * a["bbox"][2] * a["bbox"][3], 2)
    for img in data["images"][::2]:
        w, h = img["width"], img["height"]
        data["annotations"].append({"id": next_id, "image_id": img["id"], "category_id": 1, "iscrowd": 1,
                                    "bbox": [0, 0, w / 2, h / 2], "area": 0.3 * w * h})
        next_id += 1
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory) -> dict:
    """``python train.py task=detection data=coco`` on a COCO folder whose val.json has crowd regions."""
    tmp = tmp_path_factory.mktemp("det")
    root = generate_shapes_dataset(tmp / "data", num_train=16, num_val=8, image_size=64, min_objects=1,
                                   max_objects=3, seed=1)
    add_crowd_and_mask_areas(root / "val.json")
    run_dir = tmp / "run"
    run("train.py", "task=detection", "data=coco", f"data.root={root}", "data.batch_size=4", "data.num_workers=0",
        "data.train_scales=[64]", "data.val_scale=64", "data.max_size=80", *TINY_MODEL, "logger=csv",
        "trainer.max_epochs=2", "test=false", f"paths.log_dir={tmp}", f"hydra.run.dir={run_dir}",
        "callbacks.progress_bar.refresh_rate=0")
    return {"tmp": tmp, "root": root, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


@pytest.mark.slow
def test_eval_reproduces_val_map_and_cocoeval_by_hand(detection_run):
    ckpt, root, tmp = detection_run["ckpt"], detection_run["root"], detection_run["tmp"]
    saved = torch.load(ckpt, weights_only=True)["mtdetr"]
    assert saved["data"]["root"] == str(root) and saved["preprocessing"]["val_scale"] == 64
    out = tmp / "eval"
    run("eval.py", f"ckpt_path={ckpt}", f"data.train_json={tmp / 'missing.json'}", "logger=none",
        f"hydra.run.dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["AP"] - saved["metrics"]["val/mAP"]) < 1e-4
    assert abs(metrics["AP50"] - saved["metrics"]["val/mAP_50"]) < 1e-4
    assert metrics["AP50"] > 0  # the model found something: the comparison is not 0 == 0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "val.json"))
        ev = COCOeval(gt, gt.loadRes(str(out / "detections.json")), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    for key, value in zip(STAT_KEYS, ev.stats):
        assert abs(metrics[key] - value) < 1e-4, key
    for name in ("per_class.csv", "pr_curve.png", "confusion_matrix.png", "eval.log"):
        assert (out / name).is_file(), name
    assert "circle" in (out / "eval.log").read_text()  # the per-class table is printed (and logged)


@pytest.mark.slow
def test_eval_on_other_data_matches_classes_by_name(detection_run):
    ckpt, root, tmp = detection_run["ckpt"], detection_run["root"], detection_run["tmp"]
    data = json.loads((root / "val.json").read_text())
    renumber = {1: 30, 2: 10, 3: 20}  # same names, other ids and order
    for c in data["categories"]:
        c["id"] = renumber[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = renumber[a["category_id"]]
    (root / "other.json").write_text(json.dumps(data))
    out = tmp / "eval_other"
    run("eval.py", f"ckpt_path={ckpt}", "data=coco", f"data.root={root}", "data.val_json=other.json",
        "data.train_json=missing.json", "data.num_workers=0", "logger=none", f"hydra.run.dir={out}")
    other = json.loads((out / "metrics.json").read_text())
    # the same images (all 64x64: batch size 8 here, 4 in training, pads nothing), preprocessed as in training
    saved = torch.load(ckpt, weights_only=True)["mtdetr"]["metrics"]
    assert abs(other["AP"] - saved["val/mAP"]) < 1e-4 and other["AP50"] > 0
    detections = json.loads((out / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {10, 20, 30}
    data["categories"][0]["name"] = "hexagon"
    (root / "renamed.json").write_text(json.dumps(data))
    proc = run("eval.py", f"ckpt_path={ckpt}", "data=coco", f"data.root={root}", "data.val_json=renamed.json",
               "logger=none", f"hydra.run.dir={tmp / 'eval_bad'}", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "missing ['" in last and "extra ['hexagon']" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_predict_folder_skips_bad_files_and_exits_0(detection_run):
    ckpt, tmp = detection_run["ckpt"], detection_run["tmp"]
    folder = tmp / "photos"
    folder.mkdir()
    for i, size in enumerate([(64, 48), (40, 70), (64, 64)]):
        Image.new("RGB", size, (40 * i, 120, 200)).save(folder / f"img{i}.{'png' if i else 'jpg'}")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[:200])
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp / "predict"
    proc = run("predict.py", f"ckpt_path={ckpt}", f"input={folder}", "threshold=0.0", f"hydra.run.dir={out}")
    predictions = json.loads((out / "predictions.json").read_text())
    assert [Path(p["file"]).name for p in predictions] == ["img0.jpg", "img1.png", "img2.png"]
    assert [(p["width"], p["height"]) for p in predictions] == [(64, 48), (40, 70), (64, 64)]
    for p in predictions:
        assert len(p["boxes"]) == len(p["labels"]) == len(p["scores"]) > 0
        assert set(p["labels"]) <= {"circle", "square", "triangle"}
        assert all(0 <= x1 <= x2 <= p["width"] and 0 <= y1 <= y2 <= p["height"] for x1, y1, x2, y2 in p["boxes"])
    assert "truncated.jpg" in proc.stderr and "notes.txt" in proc.stderr
    assert sorted(os.listdir(out / "images")) == ["img0.jpg", "img1.png", "img2.png"]


@pytest.mark.slow
def test_api_load_never_reads_training_weight_sources(detection_run, tmp_path):
    """A checkpoint whose settings name a pretrained_backbone / init_from file that is gone still loads."""
    from tasks.api import load

    ckpt = torch.load(detection_run["ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["model"]["pretrained_backbone"] = str(tmp_path / "gone-resnet18.pth")
    import inspect

    from modules.detr import build_detr

    if "init_from" in inspect.signature(build_detr).parameters:  # a weight source of newer model configs
        ckpt["hyper_parameters"]["model"]["init_from"] = str(tmp_path / "gone.ckpt")
    path = tmp_path / "moved.ckpt"
    torch.save(ckpt, path)
    detector = load(path, device="cpu")
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    a = detector.predict([image], threshold=0.0)
    b = load(detection_run["ckpt"], device="cpu").predict([image], threshold=0.0)
    assert a == b and isinstance(a[0]["boxes"][0][0], float)  # same weights, plain Python


@pytest.mark.slow
def test_unsupported_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "pose.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "mtdetr": {"task": "pose"}}, path)
    (tmp_path / "a.png").write_bytes(b"")
    for script, extra in (("eval.py", []), ("predict.py", [f"input={tmp_path / 'a.png'}"])):
        proc = run(script, f"ckpt_path={path}", *extra, f"hydra.run.dir={tmp_path / script}", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "'pose'" in last and "detection" in last


@pytest.fixture(scope="module")
def translation_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mt")
    run("train.py", *TINY_TEXT, "logger=none", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "test=false",
        f"paths.log_dir={tmp}", f"paths.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'run'}",
        "callbacks.progress_bar.refresh_rate=0")
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_translate_file_keeps_one_line_per_line(translation_ckpt, tmp_path):
    src = tmp_path / "news.en"
    src.write_text("A man in a blue shirt.\n\nTwo dogs play in the snow.\n   \nA girl.\n", encoding="utf-8")
    out = tmp_path / "news.de"
    run("predict.py", f"ckpt_path={translation_ckpt}", f"input={src}", f"output={out}", "decoding.strategy=beam",
        "decoding.beam_size=2", f"hydra.run.dir={tmp_path / 'p'}")
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 6 and lines[-1] == ""  # 5 lines, each ended by a newline
    assert lines[1] == "" and lines[3] == ""


@pytest.mark.slow
def test_translate_stdin_prints_only_translations(translation_ckpt, tmp_path):
    proc = run("predict.py", f"ckpt_path={translation_ckpt}", "input=-", f"hydra.run.dir={tmp_path / 'p'}",
               stdin="A man in a blue shirt.\n\nTwo dogs.\n")
    from tasks.api import load

    expected = load(translation_ckpt, device="cpu").translate(["A man in a blue shirt.", "", "Two dogs."])
    assert proc.stdout == "".join(f"{t}\n" for t in expected)


@pytest.mark.slow
def test_eval_translation_bleu_chrf_and_hypotheses(translation_ckpt, tmp_path):
    out = tmp_path / "eval"
    run("eval.py", f"ckpt_path={translation_ckpt}", "logger=wandb", "decoding.max_len_b=3", f"hydra.run.dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["BLEU_signature"].startswith("nrefs:1") and "chrF" in metrics and metrics["sentences"] == 16
    assert metrics["decoding"]["max_len_b"] == 3
    assert len((out / "hypotheses.txt").read_text(encoding="utf-8").split("\n")) == 17
    assert list((out / "wandb").glob("offline-run-*"))  # the eval run went to W&B (offline here)


@pytest.mark.slow
def test_multilabel_eval_reproduces_val_scores_and_predicts(tmp_path):
    run("train.py", "task=multilabel", "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "data.num_train=16", "data.num_val=8", "data.batch_size=4", "data.num_workers=0", "model.d_model=32",
        "model.dim_feedforward=64", "test=false", f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'c'}",
        f"hydra.run.dir={tmp_path / 'run'}", "callbacks.progress_bar.refresh_rate=0")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run("eval.py", f"ckpt_path={ckpt}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    saved = torch.load(ckpt, weights_only=True)["mtdetr"]["metrics"]
    for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert abs(metrics[key] - saved[f"val/{key}"]) < 1e-4, key
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith("file,labels,predicted,score_circle")
    images = sorted((tmp_path / "c").glob("shapes-*/images/val_*.png"))[:2]
    from tasks.api import load

    results = load(ckpt, device="cpu").predict(images, threshold=0.0)
    assert [sorted(r["labels"]) for r in results] == [["circle", "square", "triangle"]] * 2  # all at threshold 0


@pytest.mark.slow
def test_multitask_checkpoint_takes_task_name(tmp_path):
    shapes = [f"data.{t}.{k}={v}" for t in ("detection", "multilabel") for k, v in
              (("num_train", 8), ("num_val", 4), ("image_size", 64), ("batch_size", 4), ("num_workers", 0))]
    run("train.py", "task=multitask", "data.translation=null", "task.tasks.translation=null", "data.steps_per_epoch=2",
        *shapes, "model.shared.d_model=32", "model.shared.nhead=4", "model.shared.num_encoder_layers=1",
        "model.shared.num_decoder_layers=1", "model.shared.dim_feedforward=64", "model.detection.num_queries=8",
        "trainer.max_epochs=1", "test=false", "logger=none", f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'run'}", "callbacks.progress_bar.refresh_rate=0")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = run("eval.py", f"ckpt_path={ckpt}", "logger=none", f"hydra.run.dir={tmp_path / 'e0'}", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "task_name=<detection|multilabel>" in proc.stderr
    run("eval.py", f"ckpt_path={ckpt}", "task_name=multilabel", "logger=none", f"hydra.run.dir={tmp_path / 'e1'}")
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    saved = torch.load(ckpt, weights_only=True)["mtdetr"]["metrics"]
    assert metrics["task"] == "multilabel" and abs(metrics["mAP"] - saved["multilabel/val/mAP"]) < 1e-4
    run("predict.py", f"ckpt_path={ckpt}", "task_name=detection", f"input={tmp_path / 'c'}/shapes-*/images/val_*.png",
        "save_images=false", f"hydra.run.dir={tmp_path / 'p'}")
    predictions = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(predictions) == 4 and all("boxes" in p for p in predictions)
    assert not (tmp_path / "p" / "images").exists()
    proc = run("export.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "task_name=<detection|multilabel>" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_predict_draws_detection_attention(detection_run, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in sorted(os.listdir(detection_run["root"] / "images"))[:2]:
        (folder / name).write_bytes((detection_run["root"] / "images" / name).read_bytes())
    out = tmp_path / "p"
    run("predict.py", f"ckpt_path={detection_run['ckpt']}", f"input={folder}", "threshold=0.0", "attention=true",
        "save_images=false", f"hydra.run.dir={out}")
    pictures = sorted(p.name for p in (out / "attention").iterdir())
    assert pictures == sorted(Path(n).stem + ".png" for n in os.listdir(folder))
    assert all(Image.open(out / "attention" / p).size[0] > 100 for p in pictures)


@pytest.mark.slow
def test_translation_attention_is_target_by_source_and_drawn(translation_ckpt, tmp_path):
    from tasks.api import load

    translator = load(translation_ckpt, device="cpu")
    weights, source, target = translator.attention("A man in a blue shirt.")
    assert weights.shape == (len(target), len(source)) and source[-1] == target[-1]  # both end with EOS
    assert torch.allclose(weights.sum(-1), torch.ones(len(target)), atol=1e-5)
    single, source1, _ = translator.attention("")  # only EOS to read: every row attends to it alone
    assert len(source1) == 1 and torch.allclose(single, torch.ones_like(single))
    src = tmp_path / "in.en"
    src.write_text("A man in a blue shirt.\n\nTwo dogs.\n", encoding="utf-8")
    out = tmp_path / "p"
    run("predict.py", f"ckpt_path={translation_ckpt}", f"input={src}", f"output={tmp_path / 'out.de'}",
        "attention=true", f"hydra.run.dir={out}")
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["line00001.png", "line00003.png"]


@pytest.mark.slow
def test_eval_draws_attention_of_the_first_samples(detection_run, translation_ckpt, tmp_path):
    run("eval.py", f"ckpt_path={detection_run['ckpt']}", "logger=none", "attention=true", "attention_samples=2",
        "score_threshold=0.0", f"hydra.run.dir={tmp_path / 'd'}")
    assert len(list((tmp_path / "d" / "attention").glob("*.png"))) == 2
    run("eval.py", f"ckpt_path={translation_ckpt}", "logger=none", "attention=true", "attention_samples=2",
        "decoding.max_len_b=3", f"hydra.run.dir={tmp_path / 't'}")
    assert sorted(p.name for p in (tmp_path / "t" / "attention").iterdir()) == ["line00001.png", "line00002.png"]


@pytest.mark.slow
def test_export_refuses_a_translation_checkpoint_in_one_line(translation_ckpt, tmp_path):
    proc = run("export.py", f"ckpt_path={translation_ckpt}", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error:") and "translation checkpoint" in last
    assert "predict.py" in last and not (tmp_path / "x" / "model.onnx").exists()
