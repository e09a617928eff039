"""Convert Llama checkpoints between Hugging Face and megatron-core distributed format.

  hf-to-megatron --hf-dir DIR --out DIR [--tp N] [--pp M] [--seq-length N] [--peft-adapter DIR]
  megatron-to-hf --load DIR --out DIR [--merge-lora] [--peft-adapter DIR]
  compare --a DIR --b DIR        (tensor-by-tensor check of two HF directories)

Arguments are checked before torch is imported, so a mistake costs no start-up time.
"""

import argparse
import os
import sys

from megalong.atomic import check_out_dir
from megalong.checkpoint_manifest import select_iteration
from megalong.config.arch import validate_tp
from megalong.config.checkpoint import read_metadata
from megalong.config.hf_config import arch_from_hf_config, read_hf_dir_config
from megalong.config.parallel import ParallelConfig
from megalong.config.peft import read_peft_config
from megalong.config.yarn import refuse_linear_with_yarn
from megalong.data.files import check_writable_dir
from megalong.errors import MegalongError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    to_mc = sub.add_parser("hf-to-megatron", help="HF LlamaForCausalLM dir -> megatron-core checkpoint")
    to_mc.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors or .bin)")
    to_mc.add_argument("--out", required=True, help="checkpoint directory to write (created atomically)")
    to_mc.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                       help="tensor-parallel ranks that write the checkpoint; also pads the vocabulary "
                            "to a multiple of --make-vocab-size-divisible-by x tp (default 1)")
    to_mc.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                       help="pipeline-parallel ranks that write the checkpoint (default 1)")
    to_mc.add_argument("--seq-length", type=int, default=None,
                       help="target training length; sets the default interpolation factor "
                            "ceil(seq-length / max_position_embeddings)")
    to_mc.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                       help="linear RoPE position interpolation factor (overrides the default and "
                            "any factor recorded in config.json)")
    to_mc.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocabulary to a multiple of this x tp (default 128)")
    to_mc.add_argument("--peft-adapter", default=None, metavar="DIR",
                       help="a PEFT LoRA adapter directory to bring onto the converted base: its "
                            "factors become megalong adapters, its modules_to_save (or LongLoRA's "
                            "trainable_params.bin: embedding and norms) replace the base tensors")
    to_mc.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    to_hf = sub.add_parser("megatron-to-hf", help="megatron-core checkpoint -> HF LlamaForCausalLM dir")
    to_hf.add_argument("--load", required=True, help="checkpoint directory (its latest iteration is exported)")
    to_hf.add_argument("--out", default=None,
                       help="HF directory to write (created atomically); needs --merge-lora when "
                            "the checkpoint holds LoRA adapters")
    to_hf.add_argument("--merge-lora", action="store_true",
                       help="fold the checkpoint's LoRA adapters into the exported weights")
    to_hf.add_argument("--peft-adapter", default=None, metavar="DIR",
                       help="write the checkpoint's LoRA adapters as a PEFT adapter directory "
                            "(embedding and norms as modules_to_save), loadable with "
                            "peft.PeftModel.from_pretrained on the base HF model")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="dtype of the exported weights (default float32). The whole model "
                            "is held in memory once: bfloat16 builds it in bf16, half the RAM "
                            "(exact for bf16-trained checkpoints; a float32 checkpoint merged "
                            "with --merge-lora is then rounded twice, within a few bf16 steps)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0,
                       help="largest safetensors shard in GiB (default 5)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    compare = sub.add_parser("compare", help="compare two HF directories tensor by tensor")
    compare.add_argument("--a", required=True, help="first HF directory")
    compare.add_argument("--b", required=True, help="second HF directory")
    return parser


def validate(args) -> None:
    """Everything that can be checked without torch."""
    def positive(name, value):
        if value is not None and value < 1:
            raise MegalongError(f"--{name} must be >= 1, got {value}")

    if args.command == "compare":
        for path in (args.a, args.b):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise MegalongError(f"{path} is not an HF model directory (no config.json)")
        return
    outputs = [("out", args.out)]
    if args.command == "megatron-to-hf":
        outputs.append(("peft-adapter", args.peft_adapter))
    for flag, path in outputs:
        if path is None:
            continue
        check_out_dir(path, args.overwrite, what=f"--{flag}")
        check_writable_dir(os.path.dirname(os.path.abspath(path)), what=f"--{flag} {path}: directory")
    if args.command == "hf-to-megatron":
        for name in ("tp", "pp", "seq_length", "make_vocab_size_divisible_by"):
            positive(name.replace("_", "-"), getattr(args, name))
        factor = args.rotary_seq_len_interpolation_factor
        if factor is not None and factor < 1:
            raise MegalongError(f"--rotary-seq-len-interpolation-factor must be >= 1, got {factor}")
        config, config_path = read_hf_dir_config(args.hf_dir)
        arch, _ = arch_from_hf_config(config, config_path)
        validate_tp(arch, args.tp, args.pp)
        refuse_linear_with_yarn(arch.yarn_rope, factor, "--rotary-seq-len-interpolation-factor")
        if args.peft_adapter:
            read_peft_config(args.peft_adapter)
    else:
        select_iteration(args.load)  # a missing or truncated file is named before torch
        read_metadata(args.load).check_export(args.load, out=args.out, merge_lora=args.merge_lora,
                                              peft_adapter=args.peft_adapter)
        if args.max_shard_size_gb <= 0:
            raise MegalongError("--max-shard-size-gb must be > 0")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    validate(args)
    # torch from here on: the arguments are good
    from megalong import conversion
    from megalong.convert.compare import compare_hf_checkpoints

    if args.command == "compare":
        rows, identical = compare_hf_checkpoints(args.a, args.b)
        print("| tensor | shape | max abs diff |\n|---|---|---|")
        for name, shape, diff in rows:
            print(f"| {name} | {shape} | {'-' if diff is None else f'{diff:.3g}'} |")
        print(f"\n{len(rows)} tensors: {'identical' if identical else 'DIFFERENT'}")
        if not identical:
            raise MegalongError(f"{args.a} and {args.b} differ")
    elif args.command == "hf-to-megatron":
        conversion.hf_to_megatron(
            args.hf_dir, args.out, seq_length=args.seq_length,
            parallel=ParallelConfig(tensor_model_parallel_size=args.tp,
                                    pipeline_model_parallel_size=args.pp),
            interpolation_factor=args.rotary_seq_len_interpolation_factor,
            vocab_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite,
            peft_adapter=args.peft_adapter)
    else:
        conversion.megatron_to_hf(args.load, args.out, overwrite=args.overwrite, dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                                  merge_lora=args.merge_lora, peft_adapter=args.peft_adapter)


def console() -> None:
    sys.exit(run_cli(main))
