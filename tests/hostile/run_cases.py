"""Child process of the hostile tests: open corpus files and report, one JSON line per case.

    python tests/hostile/run_cases.py CORPUS_DIR safe NAME [NAME ...]     # through torchgraft
    python tests/hostile/run_cases.py CORPUS_DIR control NAME [NAME ...]  # torch.load(weights_only=False)

``safe`` runs each case through torchgraft as its ``mode`` says: ``open`` (``tg.open(**options)``, every
tensor loaded), ``load`` (``tg.load`` into a small model, which must be bit-identical afterwards when it
fails), ``scan`` (``tg.scan``: its verdict), ``convert`` (``tg.convert`` into a folder, which must hold no
temporary file afterwards, nor anything at all when it fails) or ``plan`` (``tg.Plan.load`` of
``options["plan"]``, then ``tg.load`` with it). Every case also reports whether a class that a pickle
could patch (``pathlib.PurePath`` and DCP's metadata classes) changed. ``control``
unpickles the case's control file with plain ``torch.load(weights_only=False)`` (only ever on
the test's own payloads, to prove they are live). Each line is flushed as soon as a case ends,
so a crash or hang in one case shows which one it was. Memory is capped (``RLIMIT_AS``) so that
a runaway allocation fails fast instead of swapping the machine; the peak resident size is
reported so the tests can check that no case allocated more than a bounded amount.
"""

from __future__ import annotations

import faulthandler
import json
import resource
import sys
import traceback
from pathlib import Path

_ADDRESS_SPACE = 4 << 30


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(kind: str):
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)
            if kind == "bn":
                self.bn = torch.nn.BatchNorm1d(3)

    torch.manual_seed(1)
    return Net()


def _same(before: dict, model) -> bool:
    import torch

    after = model.state_dict()
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and before[k].shape == after[k].shape and torch.equal(before[k], after[k])
        for k in before
    )


def _run_mode(tg, root: Path, case: dict, target) -> dict:
    mode, options = case.get("mode", "open"), dict(case["options"])
    if mode == "open":
        src = tg.open(target, **options)
        shapes = {name: list(src[name].load().shape) for name in src}
        src.close()
        return {"status": "ok", "tensors": shapes}
    if mode == "scan":
        report = tg.scan(target)
        return {"status": f"scan-{report.verdict}", "globals": report.refused, "message": str(report.to_dict())[:2000]}
    if mode == "convert":
        out = root / f"converted-{case['name']}"
        out.mkdir(exist_ok=True)
        try:
            tg.convert(target, out, **options)
            return {"status": "ok", "tensors": {}, "files_left": sorted(p.name for p in out.iterdir())}
        except BaseException as e:
            e.files_left = sorted(p.name for p in out.iterdir())  # type: ignore[attr-defined]
            raise
    # load / plan: into a small model, which must be bit-identical when the load fails
    model = _model(options.pop("model", "linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        if mode == "plan":
            options["plan"] = tg.Plan.load(root / options.pop("plan"))
        tg.load(model, target, **options)
    except BaseException as e:
        e.model_unchanged = _same(before, model)  # type: ignore[attr-defined]
        raise
    src = tg.open(target)
    from_file = all(torch_equal(model.state_dict()[k], src[k].load()) for k in src if k in model.state_dict())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"status": "ok", "tensors": shapes, "from_file": from_file}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b.to(a.dtype))


def _class_state() -> dict:
    import pathlib

    from torch.distributed.checkpoint import metadata

    classes = [pathlib.PurePath, pathlib.Path, pathlib.PosixPath, pathlib.PurePosixPath]
    names = ("Metadata", "TensorStorageMetadata", "MetadataIndex", "TensorProperties")
    classes += [getattr(metadata, n) for n in names]
    return {f"{c.__module__}.{c.__qualname__}": sorted((k, id(v)) for k, v in vars(c).items()) for c in classes}


def _safe(root: Path, case: dict) -> dict:
    import torchgraft as tg

    target = case["path"] if case["path"].startswith("hf:") else root / case["path"]
    before = _class_state()
    result = _outcome(tg, root, case, target)
    result["classes_changed"] = sorted(k for k, v in _class_state().items() if before[k] != v)
    return result


def _outcome(tg, root: Path, case: dict, target) -> dict:
    try:
        return _run_mode(tg, root, case, target)
    except tg.UnsafeCheckpointError as e:
        return {"status": "unsafe", "message": str(e), "globals": e.globals, "dangerous": getattr(e, "dangerous", [])}
    except tg.CheckpointError as e:
        return {"status": "error", "message": str(e), **_after(e)}
    except tg.PlanError as e:
        return {"status": "plan_error", "message": str(e), **_after(e)}
    except ValueError as e:
        return {"status": "invalid_option", "message": str(e), **_after(e)}
    except BaseException as e:  # noqa: BLE001 - anything else is a defect the test reports
        return {
            "status": "escaped",
            "type": type(e).__name__,
            "message": str(e)[:500],
            "traceback": traceback.format_exc()[-2000:],
            **_after(e),
        }


def _after(e: BaseException) -> dict:
    return {k: getattr(e, k) for k in ("model_unchanged", "files_left") if hasattr(e, k)}


def _control(root: Path, case: dict) -> dict:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(
                root / (case["control"] or case["path"]), weights_only=False
            )  # UNSAFE on purpose: our own payloads
        return {"status": "loaded"}
    except BaseException as e:  # noqa: BLE001 - payloads often break the load after they ran; the marker counts
        return {"status": "raised", "type": type(e).__name__}


def main(argv: list[str]) -> int:
    root, mode, names = Path(argv[0]), argv[1], set(argv[2:])
    import os

    # hf: cases read the corpus's own cache, never the network (set before huggingface_hub is imported)
    os.environ.update(HF_HUB_CACHE=str(root / "hfcache"), HF_HUB_OFFLINE="1")
    faulthandler.enable()
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(_ADDRESS_SPACE, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    cases = [c for c in json.loads((root / "manifest.json").read_text()) if c["name"] in names]
    import torch  # noqa: F401  (imported before the baseline so that it is not counted)
    import torch.distributed.checkpoint  # noqa: F401

    import torchgraft  # noqa: F401

    baseline = _rss_mb()
    run = _safe if mode == "safe" else _control
    for case in cases:
        result = run(root, case)
        result.update(name=case["name"], rss_growth_mb=round(_rss_mb() - baseline, 1))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
