"""Child process of the hostile tests: open corpus files and report, one JSON line per case.

    python tests/hostile/run_cases.py CORPUS_DIR safe NAME [NAME ...]     # through torchgraft
    python tests/hostile/run_cases.py CORPUS_DIR control NAME [NAME ...]  # torch.load(weights_only=False)

``safe`` opens each case's path with ``tg.open(**options)`` and loads every tensor; ``control``
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


def _safe(root: Path, case: dict) -> dict:
    import torchgraft as tg

    try:
        src = tg.open(root / case["path"], **case["options"])
        shapes = {name: list(src[name].load().shape) for name in src}
        src.close()
        return {"status": "ok", "tensors": shapes}
    except tg.UnsafeCheckpointError as e:
        return {"status": "unsafe", "message": str(e), "globals": e.globals, "dangerous": getattr(e, "dangerous", [])}
    except tg.CheckpointError as e:
        return {"status": "error", "message": str(e)}
    except ValueError as e:
        return {"status": "invalid_option", "message": str(e)}
    except BaseException as e:  # noqa: BLE001 - anything else is a defect the test reports
        return {
            "status": "escaped",
            "type": type(e).__name__,
            "message": str(e)[:500],
            "traceback": traceback.format_exc()[-2000:],
        }


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
    faulthandler.enable()
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(_ADDRESS_SPACE, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    cases = [c for c in json.loads((root / "manifest.json").read_text()) if c["name"] in names]
    import torch  # noqa: F401  (imported before the baseline so that it is not counted)

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
