"""persona-screen: screen fine-tuning corpora for persona shifts with persona vectors.

    import screener
    run = screener.screen("data/train.jsonl", traits=["evil"])   # or a list of records, a datasets.Dataset
    run.scores("evil").head()

The API is `screener.api` (imported when first used, so `import screener` stays light); every failure is
a `ScreenerError` with the command line's exit code.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from screener.errors import BusyError, QueryError, ScreenerError, StorageError, UserError, WorkerError

if TYPE_CHECKING:
    from screener.api import Run, open_run, score, screen

__version__ = "0.1.0"
__all__ = [
    "BusyError",
    "QueryError",
    "Run",
    "ScreenerError",
    "StorageError",
    "UserError",
    "WorkerError",
    "__version__",
    "open_run",
    "score",
    "screen",
]
_API = ("Run", "open_run", "score", "screen")


def __getattr__(name: str) -> Any:
    if name in (*_API, "api"):
        api = importlib.import_module("screener.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'screener' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`screener.screen` stays the API's function once the submodule `screener.screen` (the pipeline) is
    imported: the import system sets the package's attribute to a submodule when it loads it, and this
    one shares the function's name. The submodule is in sys.modules, where `from screener.screen import
    ...`, pickling and `importlib.import_module` find it."""

    @property
    def screen(self) -> Any:
        return importlib.import_module("screener.api").screen

    @screen.setter
    def screen(self, module: types.ModuleType) -> None:
        pass


sys.modules[__name__].__class__ = _Package
