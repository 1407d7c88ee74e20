"""A search result as a Recipe: the base recipe plus one `overrides` entry per linear moved off it."""
from __future__ import annotations

import yaml

from ..quant.spec import Override, Recipe
from .options import options_for
from .search import Choice


def to_recipe(base: Recipe, choice: Choice, name: str) -> Recipe:
    opts = options_for(base)
    overrides = []
    for lin, k in choice.kept().items():
        o, fields = opts[k], {"match": lin}
        if o.weights != base.weights:
            fields["weights"] = o.weights
        if o.activations != base.activations:
            fields["activations"] = o.activations
        overrides.append(Override.model_validate(fields))
    return base.model_copy(update={"name": name, "overrides": (*base.overrides, *overrides)})


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as a config entry (defaults left out), ready to paste under `recipes:`."""
    d = recipe.model_dump(mode="json", exclude_defaults=True)
    for k in ("weights", "activations", "kv"):
        if getattr(recipe, k) is not None:
            d[k] = _spec(getattr(recipe, k))
    d["overrides"] = [{k: (_spec(v) if k in ("weights", "activations", "kv") and v is not None else v)
                       for k, v in ((f, getattr(o, f)) for f in ("match", *sorted(o.replaces())))}
                      for o in recipe.overrides]
    return yaml.safe_dump({"recipes": [d]}, sort_keys=False)


def _spec(spec) -> dict:
    """A QuantSpec with bits and granularity always written (the rest only when not default)."""
    return {"bits": spec.bits, "granularity": spec.granularity,
            **spec.model_dump(mode="json", exclude_defaults=True)}
