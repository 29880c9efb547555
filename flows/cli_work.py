"""``quantmill work list|clean``: what interrupted jobs left in their storage's work areas.

Imported at the end of ``quantmill.flows.cli``, which owns the ``work`` command group.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from quantmill.flows.cli import console, user_errors, work_app

RecipeOption = typer.Option(None, "--recipe", exists=True, dir_okay=False,
                            help="Use this recipe's storage (default: QUANTMILL_STORAGE_URL, "
                                 "else local storage).")


def _storage(recipe: Path | None):  # noqa: ANN202 - a StorageBackend
    from quantmill.flows.recipe import default_storage, load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    catalog = Catalog(get_plugin_manager())
    return load_job(recipe, catalog).storage if recipe else default_storage(catalog)


@work_app.command("list")
@user_errors
def work_list(recipe: Path | None = RecipeOption) -> None:
    """Work areas of interrupted jobs: whose, and how far each got."""
    from quantmill.flows.work import summaries

    found = summaries(_storage(recipe))
    if not found:
        console.print("no work areas: no interrupted job is waiting to resume")
        return
    table = Table("key", "recipe", "method", "job", "finished blocks", "stored checkpoint")
    for area in found:
        done = "none" if area.last_block is None else f"0-{area.last_block}"
        table.add_row(area.key[:16], str(area.about.get("recipe", "?")),
                      str(area.about.get("quantizer", "?")),
                      str(area.about.get("job_id", "?"))[:12], done,
                      (area.checkpoint_sha256 or "")[:16] or "-")
    console.print(table)


@work_app.command("clean")
@user_errors
def work_clean(
    keys: list[str] = typer.Argument(None, help="Key prefixes to remove (see `work list`)."),
    all_areas: bool = typer.Option(False, "--all", help="Remove every work area."),
    recipe: Path | None = RecipeOption,
) -> None:
    """Remove work areas: their jobs will start from block 0 if run again."""
    from quantmill.plugins.errors import QuantmillError

    storage = _storage(recipe)
    present = storage.work_area_keys()
    if all_areas:
        chosen = present
    elif keys:
        chosen = []
        for prefix in keys:
            matches = [k for k in present if k.startswith(prefix)]
            if len(matches) != 1:
                raise QuantmillError(f"work area '{prefix}': "
                                     f"{'no' if not matches else 'more than one'} area "
                                     "matches (see `quantmill work list`)")
            chosen.extend(matches)
    else:
        raise QuantmillError("name the work areas to remove, or pass --all")
    for key in chosen:
        storage.work_area(key).clear()
    console.print(f"removed {len(chosen)} work area(s)")
