"""Tokenize text, JSONL or a procedural task into sleeptrain WebDataset shards + manifest.json.

Modes (one of):
  --text FILE [FILE ...]   one document per file, per non-empty line (--split-lines) or per
                           blank-line separated block (--split-blank)
  --jsonl FILE [FILE ...]  one document per line, the string in --field (default "text")
  --task NAME              --n samples of a generator (--task-arg key=value, --split, --seed);
                           its loss masks travel with the samples

Text documents are tokenizer.encode(doc) + [eos]; empty documents are skipped. Every sample
carries its own sha256 member and the manifest the sha256 of every shard; the loader checks
both while reading (sleeptrain/data/format.py). Examples:

    python tools/make_shards.py --text corpus/*.txt --split-blank --out data/corpus
    python tools/make_shards.py --jsonl docs.jsonl --field body --tokenizer tok/ --out data/docs
    python tools/make_shards.py --task rule110 --task-arg width=32 --split train --n 100000 \\
        --seed 0 --out data/rule110_train

Bad arguments exit with status 2, errors found in the input data with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sleeptrain.config import ConfigError, parse_override
from sleeptrain.data.format import MANIFEST
from sleeptrain.data.tasks import build_task
from sleeptrain.data.tokenizers import Tokenizer, build_tokenizer
from sleeptrain.data.writer import existing_outputs, write_shards

Doc = tuple[np.ndarray, np.ndarray | None]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of make_shards."""
    p = argparse.ArgumentParser(
        prog="make_shards", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--text", nargs="+", metavar="FILE", help="plain UTF-8 text files")
    mode.add_argument("--jsonl", nargs="+", metavar="FILE", help="JSON-lines files")
    mode.add_argument("--task", metavar="NAME", help="procedural task (rule110, depo)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split-lines", action="store_true",
                       help="--text: one document per non-empty line")
    split.add_argument("--split-blank", action="store_true",
                       help="--text: documents separated by blank lines")
    p.add_argument("--field", help="--jsonl: the field holding the text (default: text)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="--task: a task config option (repeatable; YAML-parsed value)")
    p.add_argument("--split", choices=["train", "test"], help="--task: the split (default train)")
    p.add_argument("--n", type=_positive_int, help="--task: number of samples (required)")
    p.add_argument("--seed", type=_nonnegative_int, help="--task: stream seed (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--tokenizer", metavar="byte|DIR",
                   help="'byte' or a local Hugging Face tokenizer directory (default: byte)")
    p.add_argument("--eos-token", help="the eos token of a Hugging Face tokenizer (default: "
                   "from its tokenizer_config.json / special_tokens_map.json)")
    p.add_argument("--max-samples", type=_positive_int, default=100_000, metavar="N",
                   help="samples per shard at most (default: 100000)")
    p.add_argument("--max-bytes", type=_positive_int, default=1_000_000_000, metavar="N",
                   help="start a new shard once a shard's payload reaches N bytes "
                        "(default: 1e9)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset (manifest and shards of --prefix) in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _check_mode_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for an option given with a mode it does not apply to, or a missing file."""
    mode = "text" if args.text is not None else "jsonl" if args.jsonl is not None else "task"
    applies = {
        "--split-lines": (args.split_lines, ("text",)),
        "--split-blank": (args.split_blank, ("text",)),
        "--field": (args.field is not None, ("jsonl",)),
        "--task-arg": (bool(args.task_arg), ("task",)),
        "--split": (args.split is not None, ("task",)),
        "--n": (args.n is not None, ("task",)),
        "--seed": (args.seed is not None, ("task",)),
        "--tokenizer": (args.tokenizer is not None, ("text", "jsonl")),
        "--eos-token": (args.eos_token is not None, ("text", "jsonl")),
    }
    for option, (given, modes) in applies.items():
        if given and mode not in modes:
            p.error(f"{option} does not apply to --{mode} (only to "
                    f"{' / '.join('--' + m for m in modes)})")
    if mode == "task" and args.n is None:
        p.error("--task needs --n (the number of samples)")
    for path in args.text or args.jsonl or []:
        if not Path(path).is_file():
            p.error(f"input file {path!r} does not exist")


def _text_docs(paths: list[str], how: str) -> Iterator[str]:
    """Yield the documents of text files: whole files, lines or blank-line separated blocks."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                if how == "file":
                    yield f.read()
                    continue
                block: list[str] = []
                for line in f:
                    line = line.rstrip("\r\n")
                    if how == "lines":
                        if line.strip():
                            yield line
                    elif line.strip():
                        block.append(line)
                    elif block:
                        yield "\n".join(block)
                        block = []
                if block:
                    yield "\n".join(block)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 ({e})") from None


def _jsonl_docs(paths: list[str], field: str) -> Iterator[str]:
    """Yield the ``field`` string of every non-blank line of JSONL files."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {field!r} in this line")
                if not isinstance(record[field], str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} is a "
                                     f"{type(record[field]).__name__}, not a string")
                yield record[field]


def _encode_docs(texts: Iterator[str], tok: Tokenizer) -> Iterator[Doc]:
    """Yield ``encode(text) + [eos]`` of each text (an empty array for an empty text)."""
    for text in texts:
        ids = tok.encode(text) + [tok.eos_id] if text else []
        yield np.asarray(ids, dtype=np.uint32), None


def main(argv: list[str] | None = None) -> int:
    """Run make_shards; returns the exit status (argument errors exit with 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    _check_mode_options(p, args)
    if existing_outputs(args.out, args.prefix) and not args.overwrite:
        p.error(f"--out {args.out!r} already holds a dataset ({MANIFEST} or {args.prefix!r} "
                "shards); pass --overwrite to replace it")
    total = None
    if args.task is not None:
        try:
            task_args = dict(parse_override(item) for item in args.task_arg)
            task = build_task(args.task, **task_args)
        except (ConfigError, ValueError) as e:
            p.error(f"--task {args.task}: {e}")
        split = args.split or "train"
        seed = args.seed or 0
        tok_info: dict[str, Any] = {"kind": "task", "task": args.task, "task_args": task_args,
                                    "vocab_size": task.vocab_size, "eos_id": None, "pad_id": 0}
        source = {"mode": "task", "task": args.task, "task_args": task_args, "split": split,
                  "n": args.n, "seed": seed}
        total = args.n
        docs: Iterator[Doc] = (
            (np.asarray(ex.tokens, dtype=np.uint32), np.asarray(ex.loss_mask, dtype=np.uint8))
            for ex in (task.example_at(split, seed, i) for i in range(args.n))
        )
    else:
        try:
            tok = build_tokenizer(args.tokenizer or "byte", eos_token=args.eos_token)
        except (OSError, ImportError, ValueError) as e:
            p.error(f"--tokenizer: {e}")
        tok_info = tok.describe()
        if args.text is not None:
            how = "lines" if args.split_lines else "blank" if args.split_blank else "file"
            source = {"mode": "text", "files": args.text, "split": how}
            texts = _text_docs(args.text, how)
            if how == "file":
                total = len(args.text)
        else:
            field = args.field or "text"
            source = {"mode": "jsonl", "files": args.jsonl, "field": field}
            texts = _jsonl_docs(args.jsonl, field)
        docs = _encode_docs(texts, tok)
    try:
        man = write_shards(docs, args.out, args.prefix, tok_info, args.max_samples,
                           args.max_bytes, source, progress=not args.no_progress,
                           overwrite=args.overwrite, total=total)
    except (ValueError, OSError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {man['n_docs']} documents, {man['n_tokens']} tokens in {man['n_shards']} "
          f"shards ({man['skipped_empty']} empty skipped) to {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
