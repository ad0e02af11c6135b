"""Run a model and a reference on the same inputs; say how far apart they are, output by output and layer by layer.

The cheap check that catches what shapes cannot: a square weight loaded transposed, q/k rows in
the wrong rotary layout, a norm's weight and bias swapped. Both models run once each, in eval mode
under ``torch.no_grad``; neither is changed (training flags restored, hooks removed, also on error).

Per layer, forward hooks record the output of every module in the order the modules run. The two
sequences are paired by execution order among outputs of equal shape (the models may name their
modules differently: a nanoGPT-style ``blocks.0.attn`` and transformers' ``transformer.h.0.attn``),
and the first pair whose difference exceeds the tolerance is the first divergence.

torch is imported on first use, so ``import torchgraft`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["DEFAULT_TOLERANCES", "Difference", "VerifyResult", "verify"]

#: ``(atol, rtol)`` by the least precise floating-point dtype among both models' parameters and
#: buffers (float32 when neither has any); narrower floats (float8) take bfloat16's.
#: An element agrees when ``|model - reference| <= atol + rtol * |reference|`` (torch.isclose's rule).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
_NARROW = "bfloat16"

#: Module outputs whose sampled values differ by less than this fraction of their norm count as
#: "the same values" when pairing layers (only a tie-break between equally shaped candidates).
_PAIRING_CLOSENESS = 0.1
_FINGERPRINT_SIZE = 256
#: At most this many (model output, reference output) cells in the pairing table (int32: 100 MB).
_MAX_PAIRING_CELLS = 25_000_000
#: Layer rows that ``str(result)`` shows around the first divergence.
_CONTEXT_ROWS = 2


@dataclass
class Difference:
    """How far one output (or one module's output) of the model is from the reference's.

    Attributes:
        model: the output's name in the model's outputs (``"logits"``, ``"0"``, ``"output"`` for a
            plain tensor) or the module's path (``"blocks.0.attn.c_proj"``; ``"... (call 2)"`` when a
            module runs more than once).
        reference: the same in the reference model.
        shape, reference_shape: the two tensors' shapes.
        max_abs: the largest ``|model - reference|``; ``inf`` when the shapes differ or a value is NaN
            on one side only (NaN on both sides counts as equal).
        max_rel: the largest ``|model - reference| / max(|reference|, eps)``, ``eps`` the machine
            epsilon of the less precise of the two dtypes (values smaller than that count as it).
        ok: every element within ``atol + rtol * |reference|``, and the shapes equal.
        reason: in words, why not ok (``"shapes differ: ..."``, ``"12 of 320 values beyond ..."``).
        model_aliases, reference_aliases: other modules whose output was the very same tensor (a
            container returning its last child's output, a dropout in eval mode); the name shown is
            the first module that produced it.
    """

    model: str
    reference: str
    shape: list[int]
    reference_shape: list[int]
    max_abs: float
    max_rel: float
    ok: bool
    reason: str = ""
    model_aliases: list[str] = field(default_factory=list)
    reference_aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``inf`` / ``nan`` as the strings ``"inf"`` / ``"nan"``)."""
        d = dataclasses.asdict(self)
        d["max_abs"], d["max_rel"] = _json_float(self.max_abs), _json_float(self.max_rel)
        return d

    def describe(self) -> str:
        """``model 'blocks.0.attn.c_proj' / reference 'h.0.attn.c_proj': max abs 3.2, max rel 41``."""
        names = f"model {self.model!r} / reference {self.reference!r}"
        if self.reason.startswith("shapes differ"):
            return f"{names}: {self.reason}"
        return f"{names}: max abs {_num(self.max_abs)}, max rel {_num(self.max_rel)}"


@dataclass
class VerifyResult:
    """What :func:`verify` found. ``str(result)`` is a short table; ``to_dict()`` is JSON-ready.

    Attributes:
        ok: every compared output agrees within ``atol`` / ``rtol``, and at least one was compared.
            Layers do not decide it (they are paired by a heuristic); they say where a difference starts.
        max_abs, max_rel: the largest differences over the compared outputs (``inf`` when an output
            pair has different shapes or nothing could be compared).
        atol, rtol: the tolerances used (given, or :data:`DEFAULT_TOLERANCES` by ``dtype``).
        dtype: the least precise floating-point dtype of the two models, which chose the defaults.
        outputs: model output name -> :class:`Difference` (the compared pairs).
        layers: one :class:`Difference` per paired module output, in execution order (empty
            with ``per_layer=False`` or when nothing could be paired; ``notes`` says which).
        first_divergence: the first of ``layers`` that is not ok, or ``None``.
        model_layers, reference_layers: how many distinct module outputs each model produced.
        notes: what was not compared and why, in words.
        model, reference: the two models' class names.
    """

    ok: bool
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    dtype: str
    outputs: dict[str, Difference] = field(default_factory=dict)
    layers: list[Difference] = field(default_factory=list)
    first_divergence: Difference | None = None
    model_layers: int = 0
    reference_layers: int = 0
    notes: list[str] = field(default_factory=list)
    model: str = ""
    reference: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of every field."""
        return {
            "ok": self.ok,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "atol": self.atol,
            "rtol": self.rtol,
            "dtype": self.dtype,
            "model": self.model,
            "reference": self.reference,
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "layers": [d.to_dict() for d in self.layers],
            "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
            "model_layers": self.model_layers,
            "reference_layers": self.reference_layers,
            "notes": list(self.notes),
        }

    @property
    def summary(self) -> str:
        """One line: the verdict, the largest differences and the tolerances."""
        verdict = "OK" if self.ok else "DIFFERENT"
        return (
            f"verify {self.model} against {self.reference}: {verdict} (max abs {_num(self.max_abs)}, "
            f"max rel {_num(self.max_rel)}; {self.dtype} atol {self.atol:g}, rtol {self.rtol:g})"
        )

    @property
    def layers_lines(self) -> list[str]:
        """The per-layer result in words: how many pairs, then the first divergence (``[]`` without layers)."""
        if not self.layers:
            return []
        first = self.first_divergence
        counts = (
            f"layers: {len(self.layers)} module outputs paired by execution order and shape "
            f"(of {self.model_layers} in the model, {self.reference_layers} in the reference)"
        )
        return [counts, f"first divergence: {first.describe()}" if first else "every paired layer within tolerance"]

    def _renderable(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = [Text(self.summary, style="bold")]
        if self.outputs:
            parts.append(_table(Table, "output", self.outputs.values()))
            parts += [Text(f"{d.model!r}: {d.reason}") for d in self.outputs.values() if d.reason]
        if self.layers:
            parts += [Text(line) for line in self.layers_lines]
            if self.first_divergence is not None:
                at = next(i for i, d in enumerate(self.layers) if d is self.first_divergence)
                shown = self.layers[max(0, at - _CONTEXT_ROWS) : at + _CONTEXT_ROWS + 1]
                parts.append(_table(Table, "layer", shown))
        parts += [Text(note) for note in self.notes]
        return Group(*parts)

    def __rich__(self):
        return self._renderable()

    def __str__(self) -> str:
        from .report import render_text

        return render_text(self._renderable())

    def __repr__(self) -> str:
        first = f"; first divergence at {self.first_divergence.describe()}" if self.first_divergence else ""
        return (
            f"<VerifyResult {'ok' if self.ok else 'NOT ok'}: max abs {_num(self.max_abs)}, "
            f"max rel {_num(self.max_rel)}{first}>"
        )


def verify(
    model: nn.Module,
    reference_model: nn.Module,
    inputs: torch.Tensor | Sequence[Any] | Mapping[str, Any],
    *,
    per_layer: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyResult:
    """Run ``model`` and ``reference_model`` on the same inputs and compare their outputs and layers.

    Each model runs once, in eval mode under ``torch.no_grad``, on its own copy of the inputs
    moved to its device (the device of its first parameter or buffer), floating-point inputs cast
    to its floating-point dtype. Outputs are compared by name: tensors, tuples and lists (``"0"``,
    ``"1"``), dicts, dataclasses and transformers' ``ModelOutput`` (the fields both have, such as
    ``logits`` or ``last_hidden_state``); when no names are shared (a plain tensor against a
    ``ModelOutput``) they are paired by position and ``notes`` says so. Different shapes make the
    result not ok, with the shapes in words; nothing raises for them.

    With ``per_layer`` (the default), forward hooks record every module's output (its first tensor
    when it returns a tuple or a ``ModelOutput``, copied at once so later in-place operations do not
    change it); the two sequences are paired in execution order among outputs of equal shape, and
    ``first_divergence`` names the first pair beyond the tolerance. Modules that run without hooks
    (scripted or compiled code) are not seen; when nothing pairs, only the outputs are compared and
    ``notes`` says so. Recording keeps a copy of every module's output until the comparison ends:
    pass ``per_layer=False`` for models whose activations do not fit twice.

    Args:
        model: the model to check, usually the one :func:`torchgraft.load` filled.
        reference_model: the model it should agree with (the original implementation, or the same
            class loaded by its own code). It may name its modules differently.
        inputs: one tensor (``model(x)``), a tuple or list of positional arguments
            (``model(*inputs)``) or a dict of keyword arguments (``model(**inputs)``, a tokenizer's
            ``BatchEncoding`` too); nested lists and dicts of tensors are copied as well.
        per_layer: also compare module outputs layer by layer.
        atol, rtol: an element agrees when ``|model - reference| <= atol + rtol * |reference|``.
            By default from :data:`DEFAULT_TOLERANCES` for the least precise floating-point dtype of
            the two models: float32 ``1e-5`` / ``1e-4``, float16 ``1e-2`` / ``1e-2``, bfloat16
            ``5e-2`` / ``5e-2``, float64 ``1e-8`` / ``1e-7``.

    Returns:
        A :class:`VerifyResult`: ``ok``, ``max_abs``, ``max_rel``, ``outputs``, ``layers``,
        ``first_divergence`` and ``notes``.

    Raises:
        TypeError: a model is not an ``nn.Module``, or ``inputs`` is not a tensor, tuple, list or
            dict with string keys.
        ValueError: a model still has tensors on the meta device (load it first), or a tolerance
            is negative.
        Exception: whatever a model raises on the inputs, with a note naming which model it was.

    Example:
        >>> import torch, torchgraft as tg
        >>> from torchgraft.demo.mobilenet_v2 import mobilenet_v2
        >>> from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
        >>> config = MobileNetV2Config(num_labels=1000, tf_padding=False, layer_norm_eps=1e-5)
        >>> model = MobileNetV2ForImageClassification(config)
        >>> tg.load(model, "mobilenet_v2-b0353104.pth", align=True)   # torchvision's file, transformers' names
        >>> reference = mobilenet_v2()
        >>> tg.load(reference, "mobilenet_v2-b0353104.pth")
        >>> result = tg.verify(model, reference, torch.randn(1, 3, 224, 224))
        >>> result.ok, result.first_divergence
        (True, None)
        >>> print(result)       # outputs, the layers paired, the first layer that diverges if one does
    """
    from torch import nn

    for role, m in (("model", model), ("reference_model", reference_model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"verify: {role} must be a torch.nn.Module, not {type(m).__name__}")
        _check_materialised(m, role)
    _check_inputs(inputs)
    dtype = _least_precise(model, reference_model)
    default_atol, default_rtol = DEFAULT_TOLERANCES[dtype]
    atol = default_atol if atol is None else float(atol)
    rtol = default_rtol if rtol is None else float(rtol)
    if not (atol >= 0 and rtol >= 0):  # also refuses NaN
        raise ValueError(f"verify: atol and rtol must be >= 0, not atol={atol}, rtol={rtol}")

    out_a, rec_a = _run(model, inputs, per_layer, "model")
    out_b, rec_b = _run(reference_model, inputs, per_layer, "reference model")
    outputs, notes = _compare_outputs(out_a, out_b, atol, rtol)
    layers: list[Difference] = []
    if per_layer:
        layers, layer_notes = _compare_layers(rec_a, rec_b, atol, rtol)
        notes += layer_notes
    first = next((d for d in layers if not d.ok), None)
    ok = bool(outputs) and all(d.ok for d in outputs.values())
    if ok and first is not None:
        notes.append(
            f"The outputs agree, but a layer does not (first at {first.describe()}): a difference the outputs "
            "hide, or two unrelated modules paired because their outputs have the same shape."
        )
    return VerifyResult(
        ok=ok,
        max_abs=max((d.max_abs for d in outputs.values()), default=math.inf),
        max_rel=max((d.max_rel for d in outputs.values()), default=math.inf),
        atol=atol,
        rtol=rtol,
        dtype=dtype,
        outputs=outputs,
        layers=layers,
        first_divergence=first,
        model_layers=len(rec_a),
        reference_layers=len(rec_b),
        notes=notes,
        model=type(model).__name__,
        reference=type(reference_model).__name__,
    )


# ---------------------------------------------------------------------------
# Checks


def _check_materialised(model: nn.Module, role: str) -> None:
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"verify: the {role} ({type(model).__name__}) has {len(meta)} tensors on the meta device ({shown}): "
            "load its weights first (tg.load(model, checkpoint)) or build it on a real device"
        )


def _check_inputs(inputs: Any) -> None:
    import torch

    if isinstance(inputs, (torch.Tensor, tuple, list)):
        return
    if isinstance(inputs, Mapping):
        if bad := [k for k in inputs if not isinstance(k, str)]:
            raise TypeError(
                f"verify: a dict of inputs is passed as keyword arguments; its keys must be strings, not {bad[0]!r}"
            )
        return
    hint = " (convert it with torch.from_numpy)" if type(inputs).__module__.startswith("numpy") else ""
    raise TypeError(
        "verify: inputs must be a tensor, a tuple or list of positional arguments, or a dict of keyword arguments, "
        f"not {type(inputs).__name__}{hint}"
    )


def _floating_dtypes(model: nn.Module) -> list[torch.dtype]:
    return [t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]


def _least_precise(*models: nn.Module) -> str:
    """The least precise floating-point dtype of the models' tensors, as a key of DEFAULT_TOLERANCES."""
    import torch

    dtypes = {d for m in models for d in _floating_dtypes(m)}
    if not dtypes:
        return "float32"
    narrowest = max(dtypes, key=lambda d: torch.finfo(d).eps)
    name = str(narrowest).removeprefix("torch.")
    return name if name in DEFAULT_TOLERANCES else _NARROW


# ---------------------------------------------------------------------------
# Running one model


@dataclass
class _Record:
    name: str
    tensor: torch.Tensor
    aliases: list[str] = field(default_factory=list)


class _Recorder:
    """Forward hooks that keep a copy of each module's first output tensor, in the order modules finish."""

    def __init__(self) -> None:
        self.records: list[_Record] = []
        self._calls: dict[str, int] = {}
        # (data_ptr, shape, stride, dtype, device) -> (weak reference to the output, its version, record index)
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[Any], int, int]] = {}

    def hook(self, name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                return
            calls = self._calls[name] = self._calls.get(name, 0) + 1
            label = name if calls == 1 else f"{name} (call {calls})"
            key, version = _identity(tensor)
            if key is not None:
                seen = self._seen.get(key)
                if seen is not None and seen[0]() is not None and seen[1] == version:
                    self.records[seen[2]].aliases.append(label)  # the very same values: a container, a no-op
                    return
                self._seen[key] = (weakref.ref(tensor), version, len(self.records))
            self.records.append(_Record(label, tensor.detach().clone()))

        return record


def _identity(tensor: torch.Tensor) -> tuple[tuple[Any, ...] | None, int]:
    """What makes two output tensors the same values: memory, layout and the in-place version counter."""
    try:
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, str(tensor.device))
        return key, tensor._version
    except (RuntimeError, NotImplementedError, AttributeError):  # tensor subclasses, inference tensors
        return None, -1


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A module's main output: itself, or the first tensor of a tuple / list / dict / ModelOutput."""
    import torch

    if isinstance(output, torch.Tensor):
        return output if output.layout == torch.strided else None
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if (t := _first_tensor(item)) is not None:
                return t
    return None


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floating = _floating_dtypes(model)
    return device, floating[0] if floating else None


def _copy_inputs(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """The inputs for one model: every tensor copied to its device (floating ones cast to its dtype)."""
    import torch

    if isinstance(obj, torch.Tensor):
        cast = dtype if dtype is not None and obj.is_floating_point() else None
        return obj.detach().to(device=device, dtype=cast, copy=True)
    if isinstance(obj, Mapping):
        return {k: _copy_inputs(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_copy_inputs(v, device, dtype) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_copy_inputs(v, device, dtype) for v in obj)
    return obj


def _run(model: nn.Module, inputs: Any, per_layer: bool, role: str) -> tuple[Any, list[_Record]]:
    """One forward pass in eval mode under no_grad; every module's training flag restored, hooks removed."""
    import torch

    device, dtype = _placement(model)
    copied = _copy_inputs(inputs, device, dtype)
    recorder = _Recorder()
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        model.eval()
        if per_layer:
            handles = [m.register_forward_hook(recorder.hook(n)) for n, m in model.named_modules() if n]
        with torch.no_grad():
            try:
                if isinstance(copied, torch.Tensor):
                    output = model(copied)
                elif isinstance(copied, Mapping):
                    output = model(**copied)
                else:
                    output = model(*copied)
            except Exception as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"torchgraft.verify: raised by the {role} ({type(model).__name__}) on the given inputs")
                raise
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return output, recorder.records


# ---------------------------------------------------------------------------
# Comparing


def _leaves(obj: Any, prefix: str, found: list[tuple[str, Any]], skipped: list[str]) -> None:
    """Name every tensor in an output: ``logits``, ``0``, ``hidden_states.2``; non-tensors go to ``skipped``."""
    import torch

    if isinstance(obj, torch.Tensor):
        found.append((prefix or "output", obj))
        return
    join = (lambda k: f"{prefix}.{k}") if prefix else str
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = list(zip(obj._fields, obj))
    elif isinstance(obj, (tuple, list)):
        items = list(enumerate(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif obj is None:
        return
    else:
        skipped.append(f"{prefix or 'output'!r} ({type(obj).__name__})")
        return
    for k, v in items:
        _leaves(v, join(k), found, skipped)


def _compare_outputs(out_a: Any, out_b: Any, atol: float, rtol: float) -> tuple[dict[str, Difference], list[str]]:
    found_a: list[tuple[str, Any]] = []
    found_b: list[tuple[str, Any]] = []
    skipped_a: list[str] = []
    skipped_b: list[str] = []
    _leaves(out_a, "", found_a, skipped_a)
    _leaves(out_b, "", found_b, skipped_b)
    notes = []
    by_name_b = dict(found_b)
    common = [n for n, _ in found_a if n in by_name_b]
    if common:
        pairs = [(n, t, n, by_name_b[n]) for n, t in found_a if n in by_name_b]
        only_a = [n for n, _ in found_a if n not in by_name_b]
        only_b = [n for n, _ in found_b if n not in set(common)]
        if only_a:
            notes.append(f"Not compared, only in the model's outputs: {_names(only_a)}.")
        if only_b:
            notes.append(f"Not compared, only in the reference's outputs: {_names(only_b)}.")
    else:
        pairs = [(na, ta, nb, tb) for (na, ta), (nb, tb) in zip(found_a, found_b)]
        if pairs:
            shown = ", ".join(f"{na!r} ~ {nb!r}" for na, _, nb, _ in pairs[:4])
            notes.append(f"The outputs share no names: paired by position ({shown}).")
        if len(found_a) > len(pairs):
            notes.append(f"Not compared, only in the model's outputs: {_names([n for n, _ in found_a[len(pairs) :]])}.")
        if len(found_b) > len(pairs):
            notes.append(
                f"Not compared, only in the reference's outputs: {_names([n for n, _ in found_b[len(pairs) :]])}."
            )
    if skipped_a and skipped_a == skipped_b:
        notes.append(f"Not compared, not tensors in either model's outputs: {_names(skipped_a, quote=False)}.")
    else:
        if skipped_a:
            notes.append(f"Not compared, not tensors in the model's outputs: {_names(skipped_a, quote=False)}.")
        if skipped_b:
            notes.append(f"Not compared, not tensors in the reference's outputs: {_names(skipped_b, quote=False)}.")
    if not pairs:
        notes.append(f"Nothing compared: the model returned {len(found_a)} tensors and the reference {len(found_b)}.")
    return {na: _difference(na, ta, nb, tb, atol, rtol) for na, ta, nb, tb in pairs}, notes


def _compare_layers(
    rec_a: list[_Record], rec_b: list[_Record], atol: float, rtol: float
) -> tuple[list[Difference], list[str]]:
    if not rec_a or not rec_b:
        which = " and ".join(w for w, r in (("the model", rec_a), ("the reference", rec_b)) if not r)
        return [], [
            (
                f"Layers not compared: no module outputs were recorded in {which} (modules without sub-modules, "
                "or code that runs without forward hooks, such as scripted or compiled modules); outputs only."
            )
        ]
    if len(rec_a) * len(rec_b) > _MAX_PAIRING_CELLS:
        return [], [
            (
                f"Layers not compared: {len(rec_a)} x {len(rec_b)} module outputs are too many to pair "
                f"(more than {_MAX_PAIRING_CELLS:,} combinations); outputs only."
            )
        ]
    pairs = _pair(rec_a, rec_b)
    if not pairs:
        return [], [
            (
                "Layers not compared: no module output of the model has the shape of one of the reference's "
                "in the same order; outputs only."
            )
        ]
    layers = []
    for i, j in pairs:
        a, b = rec_a[i], rec_b[j]
        d = _difference(a.name, a.tensor, b.name, b.tensor, atol, rtol)
        d.model_aliases, d.reference_aliases = list(a.aliases), list(b.aliases)
        layers.append(d)
    notes = []
    if len(pairs) < 0.5 * min(len(rec_a), len(rec_b)):
        notes.append(
            f"Only {len(pairs)} of {len(rec_a)} model and {len(rec_b)} reference module outputs pair by shape "
            "and order: the models are built differently, and a layer pair may be two unrelated modules."
        )
    return layers, notes


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Up to 256 evenly spaced values, as float64 on the CPU (NaN / Inf as 0)."""
    import torch

    flat = tensor.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros(_FINGERPRINT_SIZE, dtype=torch.float64)
    index = torch.linspace(0, n - 1, min(n, _FINGERPRINT_SIZE), device=flat.device).round().long()
    values = flat[index].detach().to("cpu", torch.float64)
    if values.is_complex():
        values = torch.view_as_real(values).reshape(-1)
    return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)


def _pair(rec_a: list[_Record], rec_b: list[_Record]) -> list[tuple[int, int]]:
    """Pair two sequences of module outputs in order: the most pairs of equal shape, then the most with equal values.

    A longest-common-subsequence alignment where a pair of equal shapes scores 1, or 2 when sampled
    values agree too (so a module only one model has, such as a separate activation module, is
    skipped rather than shifting every later pair).
    """
    import torch

    n, m = len(rec_a), len(rec_b)
    score = torch.zeros(n, m, dtype=torch.int32)
    by_shape_b: dict[tuple[int, ...], list[int]] = {}
    for j, r in enumerate(rec_b):
        by_shape_b.setdefault(tuple(r.tensor.shape), []).append(j)
    by_shape_a: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rec_a):
        by_shape_a.setdefault(tuple(r.tensor.shape), []).append(i)
    for shape, rows in by_shape_a.items():
        cols = by_shape_b.get(shape)
        if not cols:
            continue
        fa = torch.stack([_fingerprint(rec_a[i].tensor) for i in rows])
        fb = torch.stack([_fingerprint(rec_b[j].tensor) for j in cols])
        distance = torch.cdist(fa, fb)
        close = distance <= _PAIRING_CLOSENESS * fb.norm(dim=1).unsqueeze(0) + 1e-12
        score[torch.tensor(rows).unsqueeze(1), torch.tensor(cols).unsqueeze(0)] = 1 + close.int()
    # dp[i, j]: best total over rec_a[:i], rec_b[:j]; one row at a time, the row's running max
    # standing in for the "skip a reference output" move.
    dp = torch.zeros(n + 1, m + 1, dtype=torch.int32)
    for i in range(1, n + 1):
        prev = dp[i - 1]
        take = torch.where(score[i - 1] > 0, prev[:-1] + score[i - 1], prev[:-1])
        dp[i, 1:] = torch.maximum(prev[1:], take).cummax(0).values
    pairs = []
    i, j = n, m
    table = dp.numpy()
    while i > 0 and j > 0:
        if table[i][j] == table[i - 1][j]:
            i -= 1
        elif table[i][j] == table[i][j - 1]:
            j -= 1
        else:  # neither skip keeps the total: rec_a[i - 1] and rec_b[j - 1] are a pair
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def _difference(name_a: str, a: Any, name_b: str, b: Any, atol: float, rtol: float) -> Difference:
    """Compare two tensors elementwise, on the reference's device.

    In float32 when both are float32 or narrower (the difference of two float32 values is exact
    enough to measure), else in float64 (complex: complex64 / complex128).
    """
    import torch

    shape_a, shape_b = list(a.shape), list(b.shape)
    if shape_a != shape_b:
        return Difference(
            name_a, name_b, shape_a, shape_b, math.inf, math.inf, False,
            reason=f"shapes differ: model {shape_a}, reference {shape_b}",
        )  # fmt: skip
    if a.numel() == 0:
        return Difference(name_a, name_b, shape_a, shape_b, 0.0, 0.0, True)
    narrow = all(t.is_floating_point() and t.element_size() <= 4 for t in (a, b))
    if a.is_complex() or b.is_complex():
        wide = torch.complex64 if narrow or a.dtype == b.dtype == torch.complex64 else torch.complex128
    else:
        wide = torch.float32 if narrow else torch.float64
    x = (a.to_dense() if a.layout != torch.strided else a).detach().to(device=b.device, dtype=wide)
    y = (b.to_dense() if b.layout != torch.strided else b).detach().to(dtype=wide)
    if torch.equal(x, y):
        return Difference(name_a, name_b, shape_a, shape_b, 0.0, 0.0, True)
    diff = torch.abs(x - y)
    magnitude = y.abs()
    bad = diff > (magnitude * rtol).add_(atol)
    max_abs = float(diff.max())
    if not math.isfinite(max_abs):  # NaN on both sides (or the same infinity) agrees; NaN on one side does not
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        diff = torch.where(same, torch.zeros((), dtype=diff.dtype, device=diff.device), diff)
        diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
        bad = ~same & (bad | torch.isinf(diff))
        max_abs = float(diff.max())
    rel = diff.div_(magnitude.clamp_min_(max(_eps(a.dtype), _eps(b.dtype))))  # diff is not needed after this
    max_rel = float(torch.nan_to_num(rel, nan=math.inf).max()) if math.isinf(max_abs) else float(rel.max())
    beyond = int(bad.sum())
    reason = (
        f"{beyond} of {a.numel()} values beyond atol + rtol * |reference| (atol {atol:g}, rtol {rtol:g})"
        if beyond
        else ""
    )
    return Difference(name_a, name_b, shape_a, shape_b, max_abs, max_rel, beyond == 0, reason)


def _eps(dtype: torch.dtype) -> float:
    import torch

    if dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    if dtype.is_complex:
        return float(torch.finfo(dtype.to_real()).eps)
    return 1.0  # integers and bool: a difference is at least 1


# ---------------------------------------------------------------------------
# Words


def _num(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return "0" if x == 0 else f"{x:.3g}"


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _names(names: list[str], limit: int = 6, *, quote: bool = True) -> str:
    shown = ", ".join(repr(n) if quote else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _table(table_cls: Any, kind: str, rows: Any):
    table = table_cls(show_lines=False, expand=False)
    table.add_column(f"{kind} (model)", overflow="fold")
    table.add_column("reference", overflow="fold")
    table.add_column("shape", overflow="fold")
    table.add_column("max abs", justify="right", no_wrap=True)
    table.add_column("max rel", justify="right", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    for d in rows:
        shape = str(d.shape) if d.shape == d.reference_shape else f"{d.shape} vs {d.reference_shape}"
        table.add_row(d.model, d.reference, shape, _num(d.max_abs), _num(d.max_rel), "yes" if d.ok else "NO")
    return table
