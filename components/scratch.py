"""Stage `scratch`: the from-scratch baseline that transfer is measured against, or a "skipped" report.

With scratch.enabled, the target model is trained from random weights on the cleaned target splits,
with fine-tuning's budget and recipe (components.training.scratch), and its test accuracy and
validation curve go to paths.scratch_report, which evaluate turns into the transfer gain. A stage
of its own, so a gate threshold (evaluate:) never retrains it. Off, the default, it writes
{"trained": false} without importing Keras, so the default run pays nothing for it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from components.core.config import Params
from components.core.reports import ScratchReport, write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScratchResult:
    trained: bool
    test_accuracy: float | None = None

    def __str__(self) -> str:
        if not self.trained:
            return "skipped (scratch.enabled is false): no transfer gain measured"
        return f"from-scratch baseline: test accuracy {self.test_accuracy:.4f}"


def run(params: Params) -> ScratchResult:
    if not params.scratch.enabled:
        write_report(params.paths.scratch_report, ScratchReport(trained=False, reason="scratch.enabled is false"))
        return ScratchResult(False)
    from components.training.scratch import train_scratch

    baseline = train_scratch(params)
    write_report(params.paths.scratch_report, ScratchReport(
        trained=True, test_accuracy=round(baseline.test_accuracy, 6), train_images=baseline.train_images,
        fit=asdict(baseline.fit)))
    return ScratchResult(True, baseline.test_accuracy)
