"""Run a trained checkpoint on new data: ``python predict.py ckpt_path=<file.ckpt> input=<...>``.

- Detection / multi-label: ``input=`` an image file, a folder (every file in it, sorted) or a glob.
  Writes ``predictions.json`` (``output=``, default in the run folder) with one entry per readable
  image, and annotated copies under ``<run folder>/images/`` unless ``save_images=false``. Files that
  are not readable images are named in a warning and skipped.
- Translation: ``input=FILE [output=FILE]`` writes one line per input line (an empty line stays empty);
  ``input=-`` translates standard input line by line to standard output (logs go to standard error).

A thin shell around ``tasks.api.load``; see docs/use.md.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from datamodules.errors import DataError
from tasks.runtime import ConfigError, open_overrides, register_resolvers, register_schema, to_plain

register_resolvers()
register_schema()
log = logging.getLogger("mtdetr")


def expand_input(spec: str) -> list[str]:
    """A file, a folder (its files, sorted; not recursive) or a glob pattern -> file paths."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file())
    if path.is_file():
        return [str(path)]
    found = sorted(p for p in glob.glob(os.path.expanduser(spec)) if os.path.isfile(p))
    if not found:
        raise ConfigError(f"input={spec}: no such file or folder, and no file matches it as a glob pattern.")
    return found


def predict_images(predictor, cfg: DictConfig, out_dir: Path) -> list[dict]:
    from tqdm import tqdm

    from tasks.attention import draw_image_attention
    from tasks.draw import draw_predictions

    files = expand_input(cfg.input)
    output = Path(cfg.output) if cfg.output else out_dir / "predictions.json"
    image_dir = out_dir / "images"
    results, skipped = [], []
    with tqdm(total=len(files), unit="image", desc="predicting", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(files), cfg.batch_size):
            chunk = files[start:start + cfg.batch_size]
            loaded, problems = predictor.load_images(chunk)
            for problem in problems:
                log.warning(f"skipped, not a readable image: {problem}")
            skipped += problems
            bar.update(len(chunk) - len(loaded))
            rows = predictor.predict_loaded(loaded, cfg.threshold, cfg.batch_size, bar.update)
            if cfg.attention:
                draw_image_attention(predictor, loaded, cfg.threshold, out_dir / "attention")
            if cfg.save_images:
                image_dir.mkdir(parents=True, exist_ok=True)
                for (_, pil), row in zip(loaded, rows):
                    draw_predictions(pil, row).save(_unique(image_dir, Path(row["file"]).name))
            results += rows
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n")  # one image a line
    log.info(f"{len(results)} image(s) predicted, {len(skipped)} skipped: {output}"
             + (f"; annotated copies in {image_dir}" if cfg.save_images and results else ""))
    return results


def _unique(folder: Path, name: str) -> Path:
    """``folder/name`` as a PNG/JPEG-writable path that no earlier image of this run took."""
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    suffix = suffix if suffix in (".jpg", ".jpeg", ".png", ".bmp", ".webp") else ".png"
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, n = folder / f"{stem}_{n}{suffix}", n + 1
    return path


def translate_text(predictor, cfg: DictConfig, out_dir: Path) -> list[str] | None:
    from tasks.attention import draw_sentence_attention

    decoding = to_plain(cfg.decoding) or {}
    if cfg.input == "-":  # interactive / pipe: one line in, one line out, at once
        for line in iter(sys.stdin.readline, ""):
            text = line.rstrip("\r\n")
            sys.stdout.write(predictor.translate([text], **decoding)[0] + "\n")
            sys.stdout.flush()
        return None
    path = Path(cfg.input).expanduser()
    if not path.is_file():
        raise ConfigError(f"input={cfg.input}: no such file (translation reads a text file, one sentence a line, "
                          "or input=- for standard input).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}).") from e
    translations = predictor.translate(lines, batch_size=cfg.batch_size, **decoding)
    if cfg.attention:
        draw_sentence_attention(predictor, lines, decoding, out_dir / "attention")
    text = "".join(f"{t}\n" for t in translations)
    if cfg.output == "-":
        sys.stdout.write(text)
        return translations
    output = Path(cfg.output) if cfg.output else out_dir / f"{path.name}.translated"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    log.info(f"{len(lines)} line(s) translated: {output}")
    return translations


def predict(cfg: DictConfig):
    from tasks.api import load

    predictor = load(cfg.ckpt_path, task_name=cfg.task_name, device=cfg.device, precision=cfg.precision)
    out_dir = Path(cfg.paths.output_dir)
    if predictor.task_name == "translation":
        return translate_text(predictor, cfg, out_dir)
    if cfg.decoding:
        raise ConfigError("decoding.* settings are for translation checkpoints; this one is "
                          f"{predictor.task_name}")
    if cfg.attention and predictor.task_name != "detection":
        raise ConfigError(f"attention=true draws detection and translation attention; this is a {predictor.task_name} "
                          "checkpoint")
    return predict_images(predictor, cfg, out_dir)


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except MissingMandatoryValue as e:
        sys.exit(f"error: missing mandatory value {e.full_key} — set it on the command line, e.g. {e.full_key}=...")
    except (ConfigError, InstantiationException, DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.argv = open_overrides(sys.argv, ("decoding",))
    main()
