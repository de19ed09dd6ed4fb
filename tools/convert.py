"""Checkpoint conversion between Hugging Face models and sleeptrain runs.

    python tools/convert.py import-hf HF_DIR OUT_RUN [--insert-gdn 4,8 [--gdn-mlp]]
        [--dtype float32] [key=value ...]
    python tools/convert.py export-hf RUN_DIR OUT_HF_DIR [--form llama|fla|custom]
    python tools/convert.py verify HF_DIR RUN_DIR [--tokens 1,2,3 | --length 32] [--tol 1e-4]
    torchrun --nproc-per-node=W tools/convert.py reshard RUN_DIR OUT_RUN parallel.tp=T
    python tools/convert.py deepspeed-to-run DS_RUN_DIR OUT_RUN [--tag step_00000100]
        [--trust-checkpoint]

import-hf reads a Hugging Face directory (config.json + *.safetensors, tensor by tensor): a
Llama / Qwen2 model, or a flash-linear-attention GatedDeltaNetForCausalLM (pure GDN or a
hybrid with attention layers), and writes a sleeptrain run directory (config.yaml + a step-0
sharded checkpoint); key=value
overrides set the sleep/loop settings (sleep.window_len=2048 sleep.passes=4
model.loop_start=4 model.loop_end=18). --insert-gdn places new GDN blocks (mixer only, or
with their own MLP with --gdn-mlp) before the given Hugging Face layers, with zero output
projections, so the converted model is the pretrained function. Fine-tune from it with
`sleeptrain train OUT_RUN/config.yaml train.init_from=OUT_RUN train.run_dir=runs/ft`.

export-hf writes a run as a Hugging Face directory: an attention-only run as Llama (Qwen2
with qkv biases), a run of G and A blocks as FLA's GatedDeltaNetForCausalLM (both load
without remote code and run one pass, no sleep), anything else, or --form custom, as a
self-contained modeling_sleeptrain.py (AutoModelForCausalLM with trust_remote_code) that runs
sleeptrain's window/sleep streaming inference. verify runs one prompt through both sides (one
window covering it; a custom-code model is compared with sleeptrain's streaming inference)
and exits 1 when the largest logit difference exceeds --tol. reshard rewrites the run's
latest checkpoint (weights, optimizer and training state) for the layout given by the
overrides, run with that layout's world size; it reads the result back and fails unless the
logits are identical. deepspeed-to-run reads a train.engine=deepspeed run's DeepSpeed
checkpoint (ZeRO 0-3, merged by DeepSpeed's zero_to_fp32 utilities; default: the newest
complete one; its files checked against the digest record the trainer wrote, before anything
is unpickled: a checkpoint without one needs --trust-checkpoint) and writes it as a
sleeptrain run (weights at that step), which export-hf and verify then take. Exit status 2:
bad arguments or an unconvertible checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    from sleeptrain.cli import trust_flag

    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("import-hf", help="Hugging Face Llama/Qwen2 -> sleeptrain run")
    im.add_argument("hf_dir")
    im.add_argument("out")
    im.add_argument("--insert-gdn", type=_ints, default=[], metavar="I,J",
                    help="insert new GDN blocks before these Hugging Face layers")
    im.add_argument("--gdn-mlp", action="store_true", help="inserted GDN blocks get an MLP")
    im.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    im.add_argument("overrides", nargs="*", help="config key=value, e.g. sleep.passes=4")
    ex = sub.add_parser("export-hf", help="attention-only sleeptrain run -> Hugging Face")
    ex.add_argument("run_dir")
    ex.add_argument("out")
    ex.add_argument("--form", choices=["llama", "fla", "custom"], default=None,
                    help="Hugging Face form (default: the one the block pattern allows)")
    ve = sub.add_parser("verify", help="compare logits of a Hugging Face model and a run")
    ve.add_argument("hf_dir")
    ve.add_argument("run_dir")
    ve.add_argument("--tokens", type=_ints, default=None, help="prompt token ids")
    ve.add_argument("--length", type=int, default=32, help="random prompt length")
    ve.add_argument("--tol", type=float, default=1e-4, help="largest allowed |logit diff|")
    ve.add_argument("--trust-remote-code", action="store_true",
                    help="let transformers run the Hugging Face directory's own code")
    rs = sub.add_parser("reshard", help="rewrite a run's checkpoint for another TP layout")
    rs.add_argument("run_dir")
    rs.add_argument("out")
    rs.add_argument("overrides", nargs="*", help="layout keys, e.g. parallel.tp=2")
    rs.add_argument("--logits-out", default=None, help="save the read-back check's logits")
    rs.add_argument("--no-check", action="store_true",
                    help="skip reading the result back (it builds a second model)")
    dsr = sub.add_parser("deepspeed-to-run",
                         help="train.engine=deepspeed checkpoint -> sleeptrain run")
    dsr.add_argument("run_dir")
    dsr.add_argument("out")
    dsr.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    trust_flag(dsr)
    return ap


def main(argv: list[str] | None = None) -> int:
    from sleeptrain.cli import parse_with_overrides

    args = parse_with_overrides(build_parser(), argv)
    from sleeptrain.config import ConfigError
    from sleeptrain.convert import ConversionError, export_hf, import_hf, load_run_model, verify
    from sleeptrain.train.checkpoint import CheckpointError

    try:
        if args.cmd == "import-hf":
            cfg, _ = import_hf(args.hf_dir, args.out, args.insert_gdn, args.gdn_mlp, args.dtype,
                               args.overrides)
            print(f"wrote {args.out}: pattern {cfg.model.pattern}, loop "
                  f"[{cfg.model.loop_start}, {cfg.model.loop_end}), window "
                  f"{cfg.sleep.window_len}, passes {cfg.sleep.passes}")
            return 0
        if args.cmd == "export-hf":
            cfg, model = load_run_model(args.run_dir)
            print(f"wrote {export_hf(model, cfg, args.out, args.form)}")
            return 0
        if args.cmd == "deepspeed-to-run":
            from sleeptrain.convert.deepspeed import deepspeed_to_run

            cfg, _, step = deepspeed_to_run(args.run_dir, args.out, args.tag,
                                            trust=args.trust_checkpoint)
            print(f"wrote {args.out}: step {step}, pattern {cfg.model.pattern} (weights only; "
                  f"export with export-hf, fine-tune further with train.init_from)")
            return 0
        if args.cmd == "reshard":
            if args.no_check and args.logits_out:
                raise ConversionError("--logits-out needs the read-back check (drop --no-check)")
            from sleeptrain.convert.reshard import reshard

            res = reshard(args.run_dir, args.out, args.overrides, args.logits_out,
                          check=not args.no_check)
            if res["rank"] == 0:
                print(json.dumps(res))
            return 0
        if args.length < 1:
            raise ConversionError(f"--length must be >= 1, got {args.length}")
        res = verify(args.hf_dir, args.run_dir, args.tokens, args.length,
                     trust_remote_code=args.trust_remote_code)
        ok = res["max_abs_diff"] <= args.tol
        print(json.dumps({**res, "tol": args.tol, "ok": ok}))
        return 0 if ok else 1
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
