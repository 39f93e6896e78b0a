"""The one interface every evaluation offers its callers (the trainer, the SSAPO loop, the runner):
``evaluate(params, step) -> dict``."""

from __future__ import annotations

import abc
from typing import Any, Dict

__all__ = ["Evaluator"]


class Evaluator(abc.ABC):
    """An evaluation of a policy: what it measures and on which data is fixed at construction;
    :meth:`evaluate` measures one set of parameters."""

    @abc.abstractmethod
    def evaluate(self, params: Any, step: int) -> Dict[str, Any]:
        """The evaluation of ``params`` (the policy after optimizer step ``step``) as a JSON-ready
        dict; every figure in it carries its 95% interval."""
