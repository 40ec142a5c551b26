"""Great Expectations, run the same way by every stage that checks data: suites over pandas frames.

An ephemeral context (nothing written but what we ask for), one validation per suite, and each
expectation's result flattened into a plain dict for JSON reports and HTML pages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def run_suites(frames: dict[str, "pd.DataFrame"], suites: dict[str, list[Any]], docs: Path | None = None) -> list[Any]:
    """Validate each frame with the suite of the same name; with `docs`, build GX's HTML data docs there."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX logs chatter at INFO, and this module pins its own logger at INFO on import, past the parent's level.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm bar per validation
    if docs is not None:
        context.update_data_docs_site("local_site", {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = context.data_sources.add_pandas("tlpipe")
    results = []
    for name, expectations in suites.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        results.append((name, definition.run(batch_parameters={"dataframe": frames[name]}, result_format="SUMMARY")))
    if docs is not None:
        context.build_data_docs()
    return results


def summarize(suite: str, result: Any, severity: str) -> dict[str, Any]:
    """One expectation's outcome as plain JSON: what was expected, with which arguments, what was seen."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    entry: dict[str, Any] = {"suite": suite, "expectation": config.type, "kwargs": kwargs,
                             "severity": severity, "success": bool(result.success)}
    if config.description:
        entry["description"] = config.description
    for key in ("observed_value", "element_count", "unexpected_count", "partial_unexpected_list"):
        if key in result.result:
            entry[key] = result.result[key]
    if result.exception_info.get("raised_exception"):
        entry["exception"] = result.exception_info.get("exception_message")
    return entry
