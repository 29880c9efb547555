"""Every shipped example recipe validates (paths resolve once the demo model is present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantmill.flows.recipe import load_recipe_file, parse_recipe

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_recipe_parses_and_plugins_accept_it(path: Path) -> None:
    from quantmill.flows.recipe import build_plugin
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    recipe, text = load_recipe_file(path)
    assert parse_recipe(__import__("yaml").safe_load(text), path.parent) == recipe
    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    q = recipe.quantization
    quantizer = build_plugin(catalog.quantizers, q.method, q.options, "quantization", path.parent)
    assert quantizer.default_spec().bits == q.options["bits"]
    for index, section in enumerate(recipe.evaluation):
        evaluator = build_plugin(catalog.evaluators, section.evaluator, section.options,
                                 f"evaluation.{index}", path.parent)
        evaluator.check()  # the shipped datasets resolve relative to the recipe
    assert len(EXAMPLES) >= 2
