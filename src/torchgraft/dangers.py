"""What a global can do when a pickle calls it: one table for messages, ``allow_globals`` and ``torchgraft scan``.

A guard rail, not the protection itself: that is torch's ``weights_only`` allow-list, which
refuses everything not on it. This module imports nothing from torchgraft (errors, the pickle
scanner and ``torchgraft scan`` all use it) and nothing heavy.

Example:
    >>> danger_of("posix.system")
    'runs commands / touches files'
    >>> dangerous_globals(["collections.OrderedDict", "builtins.eval"])
    ['builtins.eval']
"""

from __future__ import annotations

__all__ = ["DANGERS", "UNRESOLVED_STACK_GLOBAL", "danger_of", "dangerous_globals"]

#: What the pickle scanner records for a ``STACK_GLOBAL`` whose module and name it cannot resolve.
UNRESOLVED_STACK_GLOBAL = "<unresolved STACK_GLOBAL>"

_CMD, _CODE, _FILES, _IMPORT = "runs commands", "runs code", "touches files", "imports modules"
#: What a global can do when a pickle calls it, by full name or by module (every global of the module).
#: One table for messages, ``allow_globals`` refusals and ``torchgraft scan``; the protection itself
#: is torch's allow-list, which refuses everything not on it.
DANGERS: dict[str, str] = {
    "os": f"{_CMD} / {_FILES}", "posix": f"{_CMD} / {_FILES}", "nt": f"{_CMD} / {_FILES}",
    "subprocess": _CMD, "commands": _CMD, "pty": _CMD, "sys": "changes the interpreter",
    "runpy": _CODE, "importlib": _IMPORT, "code": _CODE, "codeop": _CODE, "pdb": _CODE, "bdb": _CODE,
    "shutil": _FILES, "socket": "opens network connections", "webbrowser": "opens URLs",
    "ctypes": "calls native code", "marshal": "loads code objects", "pickle": "unpickles more data",
    "_pickle": "unpickles more data", "dill": "unpickles more data", "cloudpickle": "unpickles more data",
    "multiprocessing": "starts processes", "asyncio": _CODE, "timeit": _CODE, "trace": _CODE,
    "cProfile": _CODE, "profile": _CODE, "types": "builds code objects", "torch.hub": "downloads and runs code",
    "numpy.testing": _CODE, "pip": "installs packages", "setuptools": _CODE,
    "builtins.eval": _CODE, "builtins.exec": _CODE, "builtins.compile": _CODE, "builtins.breakpoint": _CODE,
    "builtins.__import__": _IMPORT, "builtins.getattr": "reaches any attribute",
    "builtins.setattr": "changes any attribute", "builtins.delattr": "changes any attribute",
    "builtins.open": "opens files", "builtins.globals": "reaches the interpreter's state",
    "builtins.locals": "reaches the interpreter's state", "builtins.vars": "reaches the interpreter's state",
    "builtins.input": "reads the terminal", "builtins.help": _CODE, "builtins.memoryview": "reads raw memory",
    "__builtin__.eval": _CODE, "__builtin__.exec": _CODE,
    "functools.partial": "calls any function", "functools.reduce": "calls any function",
    "operator.attrgetter": "reaches any attribute", "operator.methodcaller": "calls any method",
    "operator.call": "calls any function", "torch.load": "unpickles more data",
    UNRESOLVED_STACK_GLOBAL: "a global that cannot be resolved statically",
}  # fmt: skip


def danger_of(name: str) -> str:
    """What ``name`` can do when a pickle calls it (from :data:`DANGERS`), or ``""`` when nothing is known."""
    if name in DANGERS:
        return DANGERS[name]
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        hint = DANGERS.get(".".join(parts[:i]))
        if hint:
            return hint
    return ""


def dangerous_globals(names: list[str]) -> list[str]:
    """Those of ``names`` known to run code, commands or imports when a pickle calls them.

    A guard rail for messages and for ``allow_globals``; not the protection itself (that is
    torch's allow-list, which refuses everything not on it).
    """
    return [n for n in names if danger_of(n)]
