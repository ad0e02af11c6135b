"""Structural alignment: pair model entries and checkpoint entries that names alone did not pair.

``tg.plan(model, ckpt, align=True)`` runs this after rules and the base-model prefix, on what is
left over on both sides (model entries still missing, checkpoint entries still unused). It reads
names, shapes and dtype kinds only, never tensor bytes, so it works on lazy and sharded sources.

How it decides:

1. **Units.** Entries are grouped by leaf module: a conv's weight; a BatchNorm's weight, bias,
   running stats and ``num_batches_tracked``. A unit's *signature* is the multiset of its
   shapes (and whether they are floating point); ``num_batches_tracked`` is left out of it.
2. **Regions, largest structure first.** The leftovers form one region. Inside a region,
   module subtrees with the same multiset of unit signatures are paired first, the biggest
   first (``encoder.layer`` with ``blocks``, then each layer with each block), and every pair
   becomes a smaller region. A layout grouped differently (Hugging Face's ``conv_stem`` holds
   torchvision's ``features.0`` and ``features.1``) falls through to smaller subtrees and
   single units. Then units are paired inside the region.
3. **Classes.** Items (subtrees or units) of one signature form a class. One item on each
   side is paired when the region is *complete* (both sides hold the same signatures), when
   the structure occurs once in the whole model and once in the whole checkpoint, or when
   names or neighbours support it. Several items are paired by rank when both sides have a
   trustworthy order: the model's registration order (or, with ``example_inputs=``, the order its
   modules run in one forward traced on meta: :mod:`.trace`), and the checkpoint's file order unless
   the file sorts its keys (safetensors does: ``layer.10`` before ``layer.2``); otherwise only
   numbers in paths order them (``layer.2`` before ``layer.10``, ``conv1`` before ``conv2``).
   Without order: by names (``q`` ~ ``query``, ``attn`` ~ ``attention``; every distinguishing
   word on both sides must agree) or by neighbours (a norm sits next to the linear it follows
   in the model, and with it in the checkpoint). Order is dropped where ranks would cross pairs
   already made (implementations that register parallel branches, a shortcut and the main
   path, in opposite orders); when order and names disagree, nothing of that class is paired.
4. **Gaps.** What is left between paired units is paired in order when the layouts agree; a
   pair whose shapes differ (a first conv with 1 input channel instead of 3) becomes a shape
   mismatch that ``adapt=`` can adapt, never a load.
5. **Single tensors** whose shape occurs once in the model and once in the checkpoint are
   paired last (a ``cls_token`` moved into another module).

6. **Layouts** (:mod:`.layouts`): a checkpoint module stored ``[in, out]`` (transformers'
   ``Conv1D``) is aligned transposed when only its transposed shapes fit a model module (or its
   layer says so); a fused checkpoint tensor (``qkv``, ``gate_up``) is split into the model's
   sibling pieces, or a fused model tensor joined from the checkpoint's, in the order their names
   say, the fused module named for its pieces or its parent. With the plan's name matches,
   :func:`.layouts.orient` then transposes the pairs stored the other way round, square ones only
   on evidence (siblings, the layer pattern, the model's ``Conv1D`` modules), else ambiguous.
   These pairs become ``transform`` entries; ``rope_permute`` is never proposed.

Every pair carries a confidence and a reason (all confidences are in one table,
:class:`Confidences`). Pairs below :data:`MIN_CONFIDENCE` are never made; items with
same-shaped candidates that could not be told apart are reported as ``ambiguous`` with their
candidates, and stay missing.

The package: :mod:`.vocabulary` (words in names, synonyms, similarity), :mod:`.units` (both
sides as trees of units), :mod:`.aligner` (the algorithm and its confidences), :mod:`.layouts`
(transposes and fused tensors), :mod:`.trace` (the model's execution order, from one forward on a
meta copy). Applying an
alignment to a plan is :func:`torchgraft.planner.align_plan`; exporting it as rules is
:func:`torchgraft.rules.export_rules`; drawing it is :func:`torchgraft.report.alignment_renderable`.

Example:
    >>> plan = tg.plan(hf_mobilenet, "mobilenet_v2-b0353104.pth", align=True)
    >>> plan.aligned["mobilenet_v2.conv_stem.first_conv.convolution.weight"]
    {'source': 'features.0.0.weight', 'confidence': 0.95, 'reason': 'only tensor of shape (32, 3, 3, 3) in ...'}
    >>> rules = plan.aligned_rules()   # paste into tg.load(..., rules=rules) to skip alignment next time
"""

from __future__ import annotations

from ..rules import export_rules  # where ``align`` users have always found it
from .aligner import CONFIDENCE, MIN_CONFIDENCE, Aligned, Alignment, Confidences, align, source_order_trusted
from .layouts import Layout, orient
from .trace import ExecutionOrder, trace_order

__all__ = [
    "CONFIDENCE",
    "MIN_CONFIDENCE",
    "Aligned",
    "Alignment",
    "Confidences",
    "ExecutionOrder",
    "Layout",
    "align",
    "export_rules",
    "orient",
    "source_order_trusted",
    "trace_order",
]
