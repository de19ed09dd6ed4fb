"""Command line: ``sleeptrain train | eval | generate | data preview``.

    sleeptrain train CONFIG [key=value ...]
    sleeptrain eval RUN_DIR [--n N] [key=value ...]
    sleeptrain eval RUN_DIR --suite ruler|babilong|gsm [--tasks a,b] [--lengths 4k,8k] [--n N]
    sleeptrain generate RUN_DIR --prompt-file F [--lines] [--max-new-tokens K] [--ids]
    sleeptrain data preview TASK [key=value ...] [--n N] [--split train|test] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from sleeptrain.train.signals import process_stop_flag

    # before torch is imported: a SIGTERM during start-up is then a stop request, not a kill
    process_stop_flag().install()
    from sleeptrain.config import load_config
    from sleeptrain.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"error: --max-steps must be >= 1, got {args.max_steps}")
    summary = train(cfg, max_steps=args.max_steps, source=args.config,
                    trust_checkpoint=args.trust_checkpoint)
    if summary["exit"] == "max_steps":
        print(f"saved step {summary['step']} after --max-steps {args.max_steps}")
    if summary["exit"] == "stopped":
        print(f"stopped at step {summary['step']} (checkpoint saved in {summary['run_dir']})")
    return 0


def _load_run(args: argparse.Namespace):
    """(config, model with the latest checkpoint's weights, checkpoint path) of a run."""
    from sleeptrain.api import load_run
    from sleeptrain.train.checkpoint import CheckpointError

    try:
        extra = {"trust": True} if args.trust_checkpoint else {}
        return load_run(args.run_dir, args.overrides, **extra)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


def _step_of(ckpt: Path) -> str:
    name = Path(ckpt).name
    return str(int(name.split("_")[1])) if name.startswith("step_") else name


def _passes_list(args: argparse.Namespace) -> list[int]:
    """``--passes 1,2,4``: the N to evaluate at, in one process (empty: the run's own N or a
    ``sleep.passes=`` override). Errors name the flag and the culprit."""
    if not args.passes:
        return []
    if args.suite != "tasks":
        raise SystemExit("error: --passes is for task evaluation; with --suite use "
                         "sleep.passes=N")
    if any(o.split("=", 1)[0].strip() == "sleep.passes" for o in args.overrides):
        raise SystemExit("error: --passes and a sleep.passes= override both set N; give one")
    try:
        passes = [int(x) for x in args.passes.split(",")]
    except ValueError:
        raise SystemExit(f"error: --passes {args.passes!r}: a comma list of integers, "
                         "e.g. 1,2,4,6") from None
    bad = [m for m in passes if m < 1]
    if bad or len(set(passes)) != len(passes):
        raise SystemExit(f"error: --passes {args.passes!r}: each N >= 1, none twice")
    if len(passes) > 1 and args.out and "{passes}" not in args.out:
        raise SystemExit(f"error: --out {args.out!r} names one file for {len(passes)} values "
                         "of --passes; put {passes} in it, e.g. eval_N{passes}.json")
    return passes


def cmd_eval(args: argparse.Namespace) -> int:
    if args.suite != "tasks":
        _passes_list(args)  # --passes with a suite: a clear error
        return _eval_suite(args)
    import copy

    from sleeptrain.config import autocast_on
    from sleeptrain.data.tasks import build_task
    from sleeptrain.eval.harness import write_json_atomic
    from sleeptrain.eval.tasks import evaluate_task, format_table

    run = Path(args.run_dir)
    passes = _passes_list(args)
    if passes:  # an explicit N, as an override is: it wins over a stage's N
        args.overrides = [*args.overrides, f"sleep.passes={passes[0]}"]
    cfg, model, ckpt = _load_run(args)
    task = build_task(cfg.data.task, **dict(cfg.data.task_args))
    dev = next(model.parameters()).device
    for m in passes or [int(cfg.sleep.passes)]:
        sleep_cfg = copy.deepcopy(cfg.sleep)
        sleep_cfg.passes = m
        model.use_sleep(sleep_cfg)  # validated, and the default of what the model runs
        res = evaluate_task(model, task, sleep_cfg, args.n or cfg.train.eval_examples,
                            cfg.data.eval_batch_size, cfg.train.seed, dev,
                            autocast=autocast_on(cfg.train, dev.type))
        res["checkpoint"] = str(ckpt)
        res["passes"] = m
        print(format_table(res, "t" if cfg.data.task == "rule110" else "k"))
        if passes:
            out = Path(args.out.replace("{passes}", str(m)) if args.out
                       else run / f"eval_N{m}.json")
        else:
            out = Path(args.out) if args.out else run / "eval.json"
        write_json_atomic(out, res)
        print(f"wrote {out} (checkpoint {ckpt}, passes {m})")
    return 0


def _eval_suite(args: argparse.Namespace) -> int:
    from sleeptrain.data.tokenizers import build_tokenizer
    from sleeptrain.eval.harness import DEFAULT_TASKS, SUITES, parse_lengths, run_suite

    if args.suite not in SUITES:
        raise SystemExit(f"error: --suite {args.suite!r}: one of tasks, {', '.join(SUITES)}")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    try:
        lengths = parse_lengths(args.lengths)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tasks = args.tasks.split(",") if args.tasks else DEFAULT_TASKS[args.suite]
    cfg, model, ckpt = _load_run(args)
    spec = args.tokenizer or cfg.data.tokenizer
    if not spec:
        raise SystemExit("error: the run has no data.tokenizer; pass --tokenizer byte|DIR")
    tok = build_tokenizer(spec)
    if tok.vocab_size > cfg.model.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tok.vocab_size} ids, more than "
                         f"model.vocab_size={cfg.model.vocab_size}")
    out = Path(args.out) if args.out else Path(args.run_dir) / f"eval_{args.suite}"
    title = (f"{args.suite}: {Path(args.run_dir).resolve().name}, step {_step_of(ckpt)}, "
             f"N={cfg.sleep.passes}, L={cfg.sleep.window_len}")
    try:
        recs = run_suite(model, tok, args.suite, tasks, lengths, args.n or 20, out,
                         seed=args.seed, eos_id=tok.eos_id, title=title,
                         batch_size=args.batch_size, cuda_graph=args.cuda_graph)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if recs:
        print((out / "results.md").read_text(), end="")
        heat = ", heatmap.png" if (out / "heatmap.png").is_file() else ""
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        print(f"wrote {out}/results.csv, results.md{heat} (checkpoint {ckpt}, passes "
              f"{cfg.sleep.passes}, window {cfg.sleep.window_len}, weights {dtype}: "
              f"model.params_dtype=... to evaluate in another)")
        if cfg.log.wandb != "disabled":
            import wandb

            wandb.init(project=cfg.log.wandb_project, mode=cfg.log.wandb,
                       name=f"{Path(args.run_dir).name}-eval-{args.suite}", dir=str(out))
            cols = ["task", "length", "n", "score"]
            wandb.log({f"eval/{args.suite}": wandb.Table(
                columns=cols, data=[[r[c] for c in cols] for r in recs])})
            wandb.finish()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sleeptrain.data.tokenizers import build_tokenizer
    from sleeptrain.infer import generate

    path = Path(args.prompt_file)
    if not path.is_file():
        raise SystemExit(f"error: --prompt-file {path} does not exist")
    text = path.read_text()
    prompts_text = [ln for ln in text.splitlines() if ln.strip()] if args.lines else [text]
    cfg, model, ckpt = _load_run(args)
    tok = None
    if args.ids:
        try:
            prompts = [[int(x) for x in p.split()] for p in prompts_text]
        except ValueError as e:
            raise SystemExit(f"error: --ids: {path} must hold whitespace-separated token ids "
                             f"({e})") from None
    else:
        spec = args.tokenizer or cfg.data.tokenizer
        if not spec:
            raise SystemExit("error: the run has no data.tokenizer; pass --tokenizer byte|DIR, "
                             "or --ids with token ids in the prompt file")
        tok = build_tokenizer(spec)
        prompts = [tok.encode(p) for p in prompts_text]
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.model.vocab_size]
    if bad:
        raise SystemExit(f"error: token id {bad[0]} is outside the model's vocabulary "
                         f"(model.vocab_size={cfg.model.vocab_size})")
    eos = None if args.no_eos or tok is None else tok.eos_id
    outs = generate(model, prompts, args.max_new_tokens, eos_id=eos)
    for p, o in zip(prompts, outs, strict=True):
        rec = {"prompt_tokens": len(p), "output_ids": o}
        if tok is not None:
            rec["output"] = tok.decode(o)
        print(json.dumps(rec, ensure_ascii=False))
    print(f"# {len(prompts)} prompt(s), checkpoint {ckpt}, passes {cfg.sleep.passes}, "
          f"window {cfg.sleep.window_len}", file=sys.stderr)
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from sleeptrain.config import parse_override
    from sleeptrain.data.tasks import build_task

    try:
        task = build_task(args.task, **dict(parse_override(o) for o in args.options))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    stream = task.stream(args.split, args.seed, 0)
    for _ in range(args.n):
        ex = next(stream)
        rec = {"text": ex.text, "tokens": ex.tokens, "loss_mask": ex.loss_mask, **ex.fields}
        print(json.dumps(rec))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sleeptrain.config import load_config
    from sleeptrain.plan import plan_report, preflight

    cfg = load_config(args.config, args.overrides)
    print(plan_report(cfg, args.gpus, args.seq_len or None, args.gpu_name,
                      args.gpu_memory_gib or None))
    if args.preflight:
        for line in preflight(cfg, args.gpus):
            print(f"preflight ok: {line}")
    if args.run_dir_file:
        Path(args.run_dir_file).write_text(str(cfg.train.run_dir) + "\n")
    return 0


def trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that has no digest record (written by an older "
                        "sleeptrain or copied from elsewhere): only for files you trust")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sleeptrain", description="Train and evaluate sleep models.")
    # the deepspeed launcher passes --local_rank=N before the command (LOCAL_RANK in the
    # environment says the same and is what is used)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train (or resume) the run of a config")
    tr.add_argument("config", help="YAML config file (see configs/)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sleep.passes=4")
    tr.add_argument("--max-steps", type=int, default=None,
                    help="save and stop after this many optimizer steps in this process "
                         "(the schedule still follows train.steps)")
    trust_flag(tr)
    tr.set_defaults(fn=cmd_train)
    pl = sub.add_parser("plan", help="check a config's parallel layout for G GPUs and print "
                        "parameters, sleep-aware FLOPs per token and a per-GPU memory estimate")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=4")
    pl.add_argument("--gpus", type=int, required=True, help="world size (GPUs in the job)")
    pl.add_argument("--seq-len", type=int, default=0, help="tokens per row (default: the "
                    "task's rows for data.source=task, else data.seq_len)")
    pl.add_argument("--gpu-name", default="H100", help="for the throughput line and the "
                    "memory check (H100, H200, A100..)")
    pl.add_argument("--gpu-memory-gib", type=float, default=0.0,
                    help="one GPU's memory for the fit check (default: by --gpu-name)")
    pl.add_argument("--preflight", action="store_true",
                    help="also check shards vs readers and a writable run directory")
    pl.add_argument("--run-dir-file", default="",
                    help="write train.run_dir, as the config and overrides resolve it, here")
    pl.set_defaults(fn=cmd_plan)
    ev = sub.add_parser("eval", help="evaluate a run's latest checkpoint: its task's accuracy "
                        "by depth, or a long-context suite (RULER, BABILong, GSM)")
    ev.add_argument("run_dir")
    ev.add_argument("--suite", default="tasks", help="tasks | ruler | babilong | gsm")
    ev.add_argument("--tasks", default="", help="comma list (default: the suite's all)")
    ev.add_argument("--lengths", default="4k,8k,16k,32k", help="context lengths, e.g. 4k,1M")
    # --examples: the same under torchrun, whose argument parser takes "--n" for an
    # ambiguous abbreviation of its own options (--nnodes, --nproc-per-node, ...)
    ev.add_argument("--n", "--examples", dest="n", type=int, default=0,
                    help="examples (tasks: default train.eval_examples; suites: per cell, 20)")
    ev.add_argument("--out", default="", help="suite output dir (default RUN_DIR/eval_SUITE);"
                    " tasks: the JSON file (default RUN_DIR/eval.json; with --passes "
                    "RUN_DIR/eval_N{passes}.json, {passes} replaced by each N)")
    ev.add_argument("--passes", default="", help="tasks: evaluate at each N of this comma "
                    "list (e.g. 1,2,4,6) in one process, the model loaded once")
    trust_flag(ev)
    ev.add_argument("--tokenizer", default="", help="byte | DIR (default: data.tokenizer)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=32,
                    help="suites: samples per inference batch (prefill and decode together)")
    ev.add_argument("--cuda-graph", action="store_true",
                    help="suites on CUDA: replay the batched decode step as a CUDA graph")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sleep.passes=4")
    ev.set_defaults(fn=cmd_eval)
    ge = sub.add_parser("generate", help="greedy continuation with streaming sleep inference")
    ge.add_argument("run_dir")
    ge.add_argument("--prompt-file", required=True, help="the prompt (whole file, or --lines)")
    ge.add_argument("--lines", action="store_true", help="one prompt per non-empty line")
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--tokenizer", default="", help="byte | DIR (default: data.tokenizer)")
    ge.add_argument("--ids", action="store_true", help="prompts are token ids, not text")
    ge.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's eos")
    trust_flag(ge)
    ge.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sleep.passes=4")
    ge.set_defaults(fn=cmd_generate)
    da = sub.add_parser("data", help="task data utilities")
    dsub = da.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="print task examples as JSON lines")
    pv.add_argument("task", help="rule110 | depo")
    pv.add_argument("options", nargs="*", help="task options key=value, e.g. t_max=8")
    pv.add_argument("--n", type=int, default=3)
    pv.add_argument("--split", default="train", choices=["train", "test"])
    pv.add_argument("--seed", type=int, default=0)
    pv.set_defaults(fn=cmd_data_preview)
    return ap


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` where ``key=value`` overrides may also follow options
    (``eval RUN --n 64 sleep.passes=2``, ``import-hf HF OUT --insert-gdn 4,8
    sleep.window_len=512``): argparse leaves those it met after an option unparsed; they join
    the command's ``overrides``. Anything else unparsed is an error naming it."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _groups_alive() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no group
    return dist is not None and dist.is_available() and dist.is_initialized()


def main(argv: list[str] | None = None) -> int:
    """Runs one command. The process groups it initialized are destroyed before it returns
    (those it found are left): a gloo group alive at interpreter exit can abort the process in
    its worker threads (SIGABRT, "terminate called without an active exception") after a run
    that finished."""
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    found = _groups_alive()
    try:
        return _run(args)
    finally:
        if not found and _groups_alive():
            from sleeptrain.parallel import destroy_parallel

            destroy_parallel()


def _run(args: argparse.Namespace) -> int:
    from sleeptrain.config import ConfigError

    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # a checkpoint or shard that cannot be used: its message names it; no traceback
        from sleeptrain.data.format import ShardError
        from sleeptrain.train.checkpoint import CheckpointError

        if isinstance(e, CheckpointError | ShardError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
