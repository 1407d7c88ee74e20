"""README.md's config-format example is a valid config (every field it shows exists and validates)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from quantbench.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_format_example_validates():
    section = README.read_text().split("## Config format", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    cfg = RunConfig.model_validate(yaml.safe_load(block))
    mine = cfg.recipes[-1]
    assert [o.match for o in mine.overrides] == ["model.layers.11.mlp.down_proj", r"re:model\.layers\.(0|1)\..*"]
    assert mine.overrides[1].activations is None and "activations" in mine.overrides[1].replaces()
    assert cfg.export == ("w8a8-token",) and cfg.recommend.min_task_retention_pct is None
