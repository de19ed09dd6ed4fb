"""GSM-Infinite-style training shards (sleeptrain.eval.gsm): question first, then the
statements, then the answer, with the loss on the answer tokens only.

    python tools/make_gsm_shards.py --tokenizer HF_TOKENIZER_DIR --ops 1-8 --target-len 4000 \\
        --n 2000 --seed 1 --out data/gsm_train

Every document is ``encode(prompt + answer_prefix) + encode(" N") + [eos]`` with mask 1 on
``" N"`` and the eos (the problems of ``generate_gsm``: the question placed before the
context, distractors padding the prompt to --target-len tokens). ``--n`` problems per number
of operations. Use a seed other than evaluation's (``sleeptrain eval --suite gsm`` draws with
seed 0), so that no evaluation problem is trained on. Bad arguments exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _ops(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range A-B or a comma list") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_gsm_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer dir")
    p.add_argument("--ops", type=_ops, default=list(range(1, 9)), help="e.g. 1-8 or 2,4")
    p.add_argument("--target-len", type=int, required=True, help="prompt tokens per problem")
    p.add_argument("--n", type=int, required=True, help="problems per number of operations")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--max-samples", type=int, default=10_000, help="documents per shard")
    p.add_argument("--overwrite", action="store_true")
    return p


def gsm_docs(tok, ops: list[int], target_len: int, n: int, seed: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of every problem, the mask on the answer and the eos."""
    from sleeptrain.eval.gsm import generate_gsm

    for k in ops:
        for s in generate_gsm(k, target_len, tok, n, seed):
            prompt = tok.encode(s.input + s.answer_prefix)
            answer = [*tok.encode(" " + s.outputs[0]), tok.eos_id]
            tokens = np.asarray(prompt + answer, dtype=np.uint32)
            mask = np.zeros(tokens.size, dtype=np.uint8)
            mask[len(prompt):] = 1
            yield tokens, mask


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from sleeptrain.data.tokenizers import build_tokenizer
    from sleeptrain.data.writer import existing_outputs, write_shards
    from sleeptrain.eval.gsm import GSM_MAX_OPS

    if not args.ops or not all(1 <= k <= GSM_MAX_OPS for k in args.ops):
        p.error(f"--ops: every value must be in 1..{GSM_MAX_OPS}, got {args.ops}")
    if args.n < 1 or args.target_len < 1:
        p.error("--n and --target-len must be >= 1")
    if existing_outputs(args.out, "shard") and not args.overwrite:
        p.error(f"--out {args.out!r} already holds a dataset; pass --overwrite to replace it")
    try:
        tok = build_tokenizer(args.tokenizer)
    except (OSError, ImportError, ValueError) as e:
        p.error(f"--tokenizer: {e}")
    source = {"mode": "gsm", "ops": args.ops, "target_len": args.target_len, "n": args.n,
              "seed": args.seed}
    try:
        man = write_shards(gsm_docs(tok, args.ops, args.target_len, args.n, args.seed),
                           args.out, "shard", tok.describe(), args.max_samples, 1 << 30, source,
                           progress=False, overwrite=args.overwrite,
                           total=args.n * len(args.ops))
    except ValueError as e:
        print(f"make_gsm_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {man['n_docs']} problems, {man['n_tokens']} tokens in {man['n_shards']} "
          f"shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
