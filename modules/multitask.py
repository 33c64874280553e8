"""One ``Seq2SeqTransformer`` shared by several task models: each task sees it through a ``TaskTransformer``.

A task model (``DETR``, ``Query2Label``, ``LabelSequenceModel``, ``TranslationModel``) calls
``self.transformer.encode(...)`` / ``.decode_states(...)`` / ``.init_cache()`` and reads ``.d_model``. Replacing
its ``transformer`` attribute with a ``TaskTransformer`` over the shared instance makes every task run
the same weights, while the view

- adds the task's learned embedding to the decoder input (and, optionally, to the encoder input), so
  the shared decoder knows which task it serves;
- keeps the task's position convention (DETR-style positions at every layer, or NMT-style positions
  added once at the input) through ``Seq2SeqTransformer``'s per-call ``pos_at_every_layer``.

The shared module is held as a plain reference, not a submodule: its parameters belong to whoever owns
it (``tasks.multitask.MultiTask`` registers it once), so they appear once in ``parameters()`` and in
checkpoints. Plain PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .transformer import LayerCache, Seq2SeqTransformer

EMBED_WHERE = ("none", "decoder", "both")


class TaskTransformer(nn.Module):
    """A task's view of a shared :class:`Seq2SeqTransformer` (same call signature).

    Args:
        shared: the shared transformer (not registered as a submodule; see the module docstring).
        pos_at_every_layer: this task's position convention (the ``pos_at_every_layer`` its own
            transformer would have had).
        embed: where the learned task embedding is added: ``decoder`` (every decoder input position),
            ``both`` (the encoder input too) or ``none``.
        init_std: standard deviation of the embedding's initial values.
    """

    def __init__(self, *, shared: Seq2SeqTransformer, pos_at_every_layer: bool, embed: str = "decoder",
                 init_std: float = 0.1) -> None:
        super().__init__()
        if embed not in EMBED_WHERE:
            raise ValueError(f"task embedding must be one of {EMBED_WHERE}, got {embed!r}")
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule
        self.d_model, self.nhead = shared.d_model, shared.nhead
        self.pos_at_every_layer, self.embed_where = pos_at_every_layer, embed
        self.embedding = nn.Parameter(torch.randn(shared.d_model) * init_std) if embed != "none" else None

    @property
    def num_decoder_layers(self) -> int:
        return self.shared.num_decoder_layers

    def _add_embedding(self, x: Tensor) -> Tensor:
        return x + self.embedding.to(x.dtype)

    def init_cache(self) -> list[LayerCache]:
        return self.shared.init_cache()

    def encode(self, src: Tensor, src_pos: Tensor | None = None, src_padding_mask: Tensor | None = None,
               pack: bool = False) -> Tensor:
        if self.embed_where == "both":
            src = self._add_embedding(src)
        return self.shared.encode(src, src_pos, src_padding_mask, pos_at_every_layer=self.pos_at_every_layer,
                                  pack=pack)

    def decode_states(self, tgt: Tensor, memory: Tensor, *args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
        """``Seq2SeqTransformer.decode_states`` with the task embedding added to ``tgt`` (also to the new positions
        only, when decoding step by step with a cache: every position gets it)."""
        if self.embedding is not None:
            tgt = self._add_embedding(tgt)
        return self.shared.decode_states(tgt, memory, *args, pos_at_every_layer=self.pos_at_every_layer, **kwargs)

    def extra_repr(self) -> str:
        return f"shared=Seq2SeqTransformer(d_model={self.d_model}), pos_at_every_layer={self.pos_at_every_layer}, " \
               f"embedding={self.embed_where}"
