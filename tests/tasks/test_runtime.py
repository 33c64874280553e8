"""The hardware probe behind ``trainer.precision``'s default, forced both ways (not read off this machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.runtime import auto_precision, fast_bf16_available


@pytest.mark.parametrize("flags,want", [("sse4_2 avx2 fma", "32-true"), ("avx2 avx512f avx512bw", "32-true"),
                                        ("avx512f avx512_bf16", "bf16-mixed"), ("avx2 amx_bf16 amx_tile", "bf16-mixed"),
                                        (None, "32-true")], ids=["avx2", "avx512", "avx512-bf16", "amx", "no-cpuinfo"])
def test_default_precision_follows_the_cpu_flags(flags, want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    read = Path.read_text

    def cpuinfo(self, *args, **kwargs):
        if str(self) != "/proc/cpuinfo":
            return read(self, *args, **kwargs)
        if flags is None:
            raise OSError("no /proc/cpuinfo")
        return f"processor\t: 0\nflags\t\t: {flags}\n"

    monkeypatch.setattr(Path, "read_text", cpuinfo)
    assert auto_precision("auto") == auto_precision("cpu") == want
    assert fast_bf16_available("cpu") is (want == "bf16-mixed")
    assert not fast_bf16_available("mps")  # another accelerator: no claim


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "fp32-only"])
@pytest.mark.parametrize("overrides", [["task=detection"], ["task=multilabel"],
                                       ["task=detection", "experiment=detr_r50_coco"]], ids=["small", "q2l", "r50"])
def test_channels_last_trunk_follows_the_hardware(overrides, native_bf16, monkeypatch):
    """model.channels_last resolves from the same probe as the precision: channels-last where bf16
    is native, NCHW on fp32-only CPUs (where its convolution backward is slower)."""
    from hydra import compose, initialize_config_dir

    import tasks.runtime as runtime

    runtime.register_resolvers()
    runtime.register_schema()
    monkeypatch.setattr(runtime, "fast_bf16_available", lambda accelerator="auto": native_bf16)
    with initialize_config_dir(config_dir=str(runtime.ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "logger=none"])
    assert cfg.model.channels_last is native_bf16
