"""The command line every benchmark program shares: its description and ``--json``, and for those that run
the engine, a model given as a checkpoint directory or generated from a preset."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(doc: str, json_out: str = "one JSON object") -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc`` (the program's docstring), with ``--json``: print
    ``json_out`` as the last line."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", action="store_true", help=f"print {json_out} as the last line")
    return ap


def add_model(ap: argparse.ArgumentParser, preset: str) -> None:
    """``--preset`` (default ``preset``) and ``--checkpoint``; :func:`checkpoint` reads them."""
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--checkpoint", help="use this checkpoint directory instead of generating --preset")


def checkpoint(args: argparse.Namespace, tmp: str | Path) -> str:
    """The ``--checkpoint`` directory, or ``--preset`` generated into ``tmp``/ckpt."""
    if args.checkpoint:
        return args.checkpoint
    from qwen3vl_ray.engine.checkpoint import make_checkpoint  # transformers: only when a model is wanted

    return str(make_checkpoint(args.preset, Path(tmp) / "ckpt"))
