"""Export a trained detection or multi-label checkpoint: ``python export.py ckpt_path=<file.ckpt>``.

Writes ``<run folder>/model.onnx`` (``output=`` elsewhere); inputs ``images`` float32 ``[B, 3, H, W]``
(normalised) and ``pixel_mask`` bool ``[B, H, W]`` (True = padding); outputs ``boxes, scores, labels``
(detection) or ``scores`` (multi-label), the raw heads with ``postprocess=false``. See docs/use.md.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from datamodules.errors import DataError
from tasks.runtime import ConfigError, register_resolvers, register_schema

register_resolvers()
register_schema()
log = logging.getLogger("mtdetr")


def export(cfg: DictConfig) -> Path:
    from tasks.api import load
    from tasks.export import example_inputs, export_onnx, exportable, max_difference, onnx_metadata

    if cfg.format != "onnx":
        raise ConfigError(f"format={cfg.format}: the only export format is onnx")
    if (cfg.height is None) != (cfg.width is None):
        raise ConfigError("set both height and width (a fixed input size), or neither (dynamic)")
    predictor = load(cfg.ckpt_path, task_name=cfg.task_name, device="cpu", precision="32")
    module = exportable(predictor, postprocess=cfg.postprocess, top_k=cfg.top_k)
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / "model.onnx"
    images, mask = example_inputs(cfg.height, cfg.width)
    export_onnx(module, output, (images, mask), dynamic_size=cfg.height is None and cfg.width is None,
                opset=cfg.opset, metadata=onnx_metadata(predictor, module))
    log.info(f"wrote {output} (outputs: {', '.join(module.output_names())})")
    if cfg.verify and importlib.util.find_spec("onnxruntime"):
        log.info(f"onnxruntime vs PyTorch (float32): max abs difference {max_difference(module, output, images, mask):.2e}")
    return output


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except MissingMandatoryValue as e:
        sys.exit(f"error: missing mandatory value {e.full_key} — set it on the command line, e.g. {e.full_key}=...")
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
