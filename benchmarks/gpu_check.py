"""The GPU check: what one short run on a lent GPU can settle, as Markdown tables.

    bash benchmarks/gpu_check.sh OUT_DIR [--part correctness|perf|all] [--dry-run]
    python benchmarks/gpu_check.py --out OUT_DIR [--part ...] [--dry-run] [--device cuda|cpu]

Part `correctness` (about 3 minutes on an H100):
  1. `pytest -m gpu`: the GPU-only tests.
  2. kernels: every S²-Attn kernel that loads (sdpa, torch-varlen, flex, flash, te), bf16,
     against a float32 mask-formula attention (forward and q/k/v gradients; GQA with the kv
     groups split between the head halves, and a kv group straddling them; batch 2; and the
     second slice of a context-parallel split, whose straddling group varlen kernels run as
     G/2 queries over G keys aligned bottom-right: the alignment is checked here); then, after
     that warm-up, the same call under `torch.cuda.set_sync_debug_mode("error")`.
  3. training: 5 TP=1 steps of a tiny model with each kernel against SDPA's losses.
  4. resume: 3 steps, save, 2 more; a resumed trainer must hold the saved weights and Adam
     state bit for bit and repeat the last 2 losses (equal under
     torch.use_deterministic_algorithms, else within 1e-3 relative).
  5. export: the checkpoint exported to HF; perplexity on the GPU against the same on the CPU
     of this host (MEGALONG_DEVICE=cpu): mean NLL within 1e-4.
Part `perf` (about 4 minutes):
  1. attention forward + backward at Llama-2-7B heads: S²-Attn per kernel against dense and the
     ideal fold at 8k, 32k and 64k (flex: its compile time apart), `benchmarks/attention.py`.
  2. whole steps, 8 Llama-2-7B-shaped layers, bf16, no recompute: the fastest S² kernel at 32k
     and dense, at 16k and 32k, in one run of `benchmarks/train_step.py` (the attention-alone
     Amdahl bound measured in the same processes, MFU by docs/PERF.md's formula).
It ends with what it could not check. `--dry-run` prints the plan and exits (any machine);
`--device cpu --tiny` runs correctness steps 2-5 at toy sizes on CPU (the tests do).
Wheels a bare GPU machine needs (carry [".whl"]): megatron-core 0.16.1 (about 3 MiB); the lent
machines have torch, transformers, peft and pytest.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

KERNEL_NAMES = ("sdpa", "torch-varlen", "flex", "flash", "te")
NOT_CHECKABLE = (
    "NCCL across GPUs (TP/SP, PP, DP, the CP halo exchange): one GPU per lent machine",
    "Transformer Engine (spec, attention kernel, TE LoRA adapters, FP8) and flash-attn, where "
    "they are not installed (TE's wheel is over the carry limit; flash-attn builds from source)",
    "megatron's distributed optimizer with overlapped gradient reduction / parameter gather "
    "(needs data-parallel ranks)",
    "multi-node launch (torchrun across nodes, Slurm)",
)

PLAN = {
    "correctness": [
        "pytest -m gpu tests",
        "kernels: {kernels} in bf16 vs a float32 mask formula (fwd + grads; GQA split / "
        "straddling kv group / CP rank 1 of 2 with its bottom-right straddling group; b = 2; "
        "N = {n}, G = {g}), then under set_sync_debug_mode('error')",
        "training: 5 TP=1 steps of the tiny model per kernel vs SDPA (bf16, N = {train_n})",
        "resume: 3 steps + save + 2; resumed weights and Adam state bit for bit; last 2 losses",
        "export: HF export; perplexity on {device} vs on the CPU of this host (mean NLL, 1e-4)",
    ],
    "perf": [
        "attention fwd+bwd (32 heads, d 128, bf16): S² per kernel vs dense vs ideal fold at "
        "8k, 32k, 64k (flex compile time apart)",
        "whole steps (8 Llama-2-7B layers, bf16, no recompute): fastest S² kernel at 32k and "
        "dense at 16k and 32k, Amdahl bound, MFU",
    ],
}


class Report:
    """Markdown sections printed as they come and written to OUT/<part>.md."""

    def __init__(self, out_dir: str, part: str):
        self.path = os.path.join(out_dir, f"{part}.md")
        self.lines = []

    def section(self, title: str, rows=None, header=None, text=None) -> None:
        block = [f"\n### {title}\n"]
        if text:
            block.append(text)
        if rows:
            block.append("| " + " | ".join(header) + " |")
            block.append("|" + "---|" * len(header))
            block += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        print("\n".join(block), flush=True)
        self.lines += block
        with open(self.path, "w") as handle:
            handle.write("\n".join(self.lines) + "\n")


# ------------------------------------------------------------------ correctness: kernels


def _s2_mask(seq_len, group_size, shifted, device):
    """DESIGN.md §5's formula, written out independently of megalong's group code."""
    import torch

    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    half = group_size // 2 if shifted else 0
    return (j <= i) & ((i + half) // group_size == (j + half) // group_size)


def reference_s2_float32(q, k, v, group_size):
    """Float32 softmax attention with one mask per global head (h >= nh/2 shifted)."""
    import torch
    import torch.nn.functional as F

    seq_len, _, heads, dim = q.shape
    per_kv = heads // k.shape[2]
    masks = torch.stack([_s2_mask(seq_len, group_size, h >= heads // 2, q.device)
                         for h in range(heads)])
    qf, kf, vf = (x.float().permute(1, 2, 0, 3) for x in (q, k, v))
    kf, vf = (x.repeat_interleave(per_kv, dim=1) for x in (kf, vf))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=masks[None], scale=dim ** -0.5)
    return out.permute(2, 0, 1, 3)


def _kernel_cases(tiny: bool):
    """(label, N, G, heads, kv heads, batch, head dim, context-parallel slice?)."""
    n, g, d = (128, 32, 16) if tiny else (2048, 512, 64)
    return [("GQA, kv groups split between the halves", n, g, 8, 2, 2, d, False),
            ("a kv group straddling the halves", 3 * g, g, 6, 3, 2, d, False),
            ("CP rank 1 of 2: the straddling group (bottom-right for varlen kernels)", n, g, 8, 2,
             2, d, True)]


def _second_cp_slice(q, k, v, group_size: int, kernel: str):
    """S²-Attn of CP rank 1 of 2: tokens [N/2, N), the halo taken from the whole K/V."""
    from megalong.attention.context_parallel import halo_plan, s2_attention_on_slice

    local = q.shape[0] // 2
    plan = halo_plan(q.shape[2], k.shape[2], group_size, local, 1, 2)
    heads = slice(plan.recv.kv_start, plan.recv.kv_end)
    halo = tuple(x[local - group_size // 2:local, :, heads] for x in (k, v))
    return s2_attention_on_slice(q[local:], k[local:], v[local:], group_size, local, halo,
                                 kernel=kernel)


def check_kernels(report, device: str, tiny: bool) -> list:
    """Returns the kernels that passed every case."""
    import torch

    from megalong.attention import s2_attention
    from megalong.attention.kernels import KernelUnavailableError, resolve_kernel

    rows, passed = [], []
    dtype = torch.bfloat16
    for name in KERNEL_NAMES:
        try:
            resolve_kernel(name, torch.device(device), dtype)
        except KernelUnavailableError as err:
            rows.append([name, "—", "—", "—", "not run: " + " ".join(str(err).split())[:150]])
            continue
        ok = True
        for label, n, g, heads, kv_heads, batch, dim, cp in _kernel_cases(tiny):
            gen = torch.Generator().manual_seed(n + heads)
            qkv = [torch.randn(n, batch, h, dim, generator=gen).to(device, dtype).requires_grad_()
                   for h in (heads, kv_heads, kv_heads)]
            weight = torch.randn(n // 2 if cp else n, batch, heads, dim, generator=gen).to(device)
            if cp:
                def attend(q, k, v, g=g, name=name):
                    return _second_cp_slice(q, k, v, g, name)

                def reference(q, k, v, g=g):
                    return reference_s2_float32(q, k, v, g)[q.shape[0] // 2:]
            else:
                def attend(q, k, v, g=g, name=name):
                    return s2_attention(q, k, v, g, kernel=name)

                def reference(q, k, v, g=g):
                    return reference_s2_float32(q, k, v, g)

            def run(fn, inputs):
                out = fn(*inputs)
                grads = torch.autograd.grad((out.float() * weight).sum(), inputs)
                return out.float(), [x.float() for x in grads]

            try:
                started = time.perf_counter()
                out, grads = run(attend, qkv)
                first_call_s = time.perf_counter() - started
                ref, ref_grads = run(reference, [x.detach().float().requires_grad_() for x in qkv])
                error = max(_relative(out, ref), *(_relative(a, b) for a, b in zip(grads, ref_grads)))
                sync = _sync_free(lambda: run(attend, qkv), device)
            except Exception as err:  # a kernel that fails is a finding, not the end of the run
                rows.append([name, label, "—", "—", f"FAILED: {type(err).__name__}: "
                             f"{' '.join(str(err).split())[:160]}"])
                ok = False
                continue
            good = error <= 2e-2
            ok = ok and good and sync != "no"
            rows.append([name, label, f"{error:.2e}", sync,
                         ("ok" if good else "TOO FAR") + f" (first call {first_call_s:.2f} s)"])
        if ok:
            passed.append(name)
    report.section("S²-Attn kernels, bf16, against a float32 mask formula", rows,
                   ["kernel", "case", "max rel. error (out, dq, dk, dv)", "sync-free",
                    "verdict"])
    return passed


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _sync_free(fn, device: str) -> str:
    """'yes' if fn() runs without a host-device synchronisation, after a warm-up."""
    if device != "cuda":
        return "n/a (CPU)"
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "yes"
    except RuntimeError as err:
        return f"no ({' '.join(str(err).split())[:80]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


# ------------------------------------------------------------------ correctness: the trainer


def prepare_model_and_data(work: str, seq_length: int) -> dict:
    """A random tiny Llama (HF) converted at TP=1, random token documents as a megatron
    IndexedDataset, and a word-level HF tokenizer of the model's vocabulary (the `tokenizers`
    library comes with transformers: no sentencepiece wheel to carry)."""
    import dataclasses

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megalong.conversion import hf_to_megatron
    from megalong.convert.random_hf import write_random_hf_model
    from megalong.config.arch import PRESETS

    from tokenizers import Tokenizer, models

    arch = dataclasses.replace(PRESETS["tiny"], vocab_size=1000)
    paths = {"hf": f"{work}/hf_base", "base": f"{work}/base", "data": f"{work}/data/corpus",
             "tokenizer": f"{work}/tokenizer"}
    os.makedirs(f"{work}/data", exist_ok=True)
    os.makedirs(paths["tokenizer"], exist_ok=True)
    words = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, arch.vocab_size)]
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(
        os.path.join(paths["tokenizer"], "tokenizer.json"))
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(paths["data"] + ".bin", dtype=np.uint16)
    for _ in range(64):
        document = rng.integers(0, arch.vocab_size, int(rng.integers(seq_length // 2, 4 * seq_length)))
        builder.add_document(document.astype(np.uint16), [document.size])
    builder.finalize(paths["data"] + ".idx")
    write_random_hf_model(paths["hf"], arch, std=0.08)
    hf_to_megatron(paths["hf"], paths["base"], seq_length=seq_length)
    return paths


def _train_argv(paths, seq_length, kernel, iters, save=None, load=None, bf16=True):
    argv = ["--load", load or paths["base"], "--data-path", paths["data"], "--seq-length",
            str(seq_length), "--micro-batch-size", "1", "--global-batch-size", "2",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--attention-kernel", kernel, "--log-interval", "1", "--tokenizer",
            paths["tokenizer"]]
    if bf16:
        argv.append("--bf16")
    if save:
        argv += ["--save", save, "--save-interval", "1000"]
    return argv


def _trainer(argv):
    from megalong.cli.train import parse_and_validate
    from megalong.training.setup import build_trainer

    return build_trainer(parse_and_validate(argv))


def _steps(trainer, first: int, last: int) -> list:
    from megalong.training.loop import train_step

    return [train_step(trainer, iteration)[0] for iteration in range(first, last)]


def _training_state(trainer) -> dict:
    """Model weights and every optimizer tensor (fp32 main weights, Adam moments), on the CPU."""
    state = {f"model.{k}": v.detach().cpu().clone() for k, v in trainer.models[0].state_dict().items()
             if hasattr(v, "detach")}
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    for i, opt in enumerate(optimizers):
        inner = opt.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        for j, param in enumerate(params):
            state[f"opt{i}.param{j}"] = param.detach().cpu().clone()
            for key, value in inner.state.get(param, {}).items():
                if hasattr(value, "detach"):
                    state[f"opt{i}.param{j}.{key}"] = value.detach().cpu().clone()
    return state


def check_training(report, paths, seq_length: int, kernels: list, device: str) -> None:
    import torch

    rows, baseline = [], None
    for kernel in ["sdpa"] + [k for k in kernels if k != "sdpa"]:
        try:
            losses = _steps(_trainer(_train_argv(paths, seq_length, kernel, 5)), 0, 5)
        except Exception as err:
            rows.append([kernel, "—", "—", f"FAILED: {type(err).__name__}: {str(err)[:160]}"])
            continue
        baseline = baseline or losses
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, baseline))
        rows.append([kernel, " ".join(f"{x:.4f}" for x in losses), f"{worst:.1e}",
                     "ok" if worst <= 2e-2 else "TOO FAR"])
    report.section(f"5 TP=1 training steps per kernel (tiny model, bf16, N = {seq_length})", rows,
                   ["kernel", "losses", "max rel. diff vs sdpa", "verdict"])

    # Resume: the straight run saves at 3 and goes on; a resumed trainer must match it.
    torch.use_deterministic_algorithms(True, warn_only=True)
    save = f"{paths['base']}_resume"
    first = _trainer(_train_argv(paths, seq_length, "sdpa", 5, save=save))
    _steps(first, 0, 3)
    from megalong.training.loop import save as save_checkpoint

    save_checkpoint(first, 3)
    saved_state = _training_state(first)
    straight = _steps(first, 3, 5)
    del first
    resumed = _trainer(_train_argv(paths, seq_length, "sdpa", 5, load=save))
    loaded_state = _training_state(resumed)
    differing = sorted(k for k in saved_state
                       if k not in loaded_state or not torch.equal(saved_state[k], loaded_state[k]))
    again = _steps(resumed, resumed.iteration, 5)
    torch.use_deterministic_algorithms(False)
    worst = max(abs(a - b) / abs(b) for a, b in zip(again, straight))
    rows = [["state after load (weights, fp32 main weights, Adam moments)",
             f"{len(saved_state) - len(differing)}/{len(saved_state)} tensors equal",
             "ok" if not differing else f"DIFFERENT: {', '.join(differing[:4])}"],
            ["losses of steps 4-5, straight vs resumed",
             f"{straight} vs {again} (max rel. {worst:.1e})",
             "ok (equal)" if again == straight else ("ok (1e-3)" if worst <= 1e-3 else "TOO FAR")]]
    report.section("Save and resume (sdpa, bf16, deterministic algorithms)", rows,
                   ["check", "result", "verdict"])
    paths["trained"] = save


def check_export_and_perplexity(report, paths, seq_length: int, device: str) -> None:
    """HF export of the trained checkpoint; perplexity here against the CPU of this host."""
    from megalong.conversion import megatron_to_hf

    export = f"{paths['trained']}_hf"
    megatron_to_hf(paths["trained"], export, merge_lora=True, overwrite=True)
    results = {}
    # The eval runs its own process group: not this process's rendezvous.
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for where, env in ((device, {}), ("cpu", {"MEGALONG_DEVICE": "cpu"})):
        out = f"{export}_ppl_{where}.json"
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_ppl.py"), "--hf-dir",
                        export, "--data", paths["data"], "--seq-lengths", str(seq_length),
                        "--max-windows", "8", "--json", out, "--quiet"],
                       check=True, env={**clean, **env})
        with open(out) as handle:
            results[where] = json.load(handle)["results"][0]["loss"]
    diff = abs(results[device] - results["cpu"])
    report.section("HF export, perplexity on this device vs on the CPU", [[
        f"{results[device]:.6f}", f"{results['cpu']:.6f}", f"{diff:.1e}",
        "ok" if diff <= 1e-4 else "TOO FAR"]], [f"mean NLL ({device})", "mean NLL (cpu)",
                                                 "difference", "verdict"])


def run_correctness(report, args) -> None:
    if args.device == "cuda":
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
                                cwd=ROOT, capture_output=True, text=True)
        tail = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        failures = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
        report.section("pytest -m gpu", [[tail, "ok" if result.returncode == 0 else
                                          "FAILED: " + "; ".join(failures[:5])]],
                       ["summary", "verdict"])
    kernels = check_kernels(report, args.device, args.tiny)
    seq_length = 256 if args.tiny else 1024
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    paths = prepare_model_and_data(work, seq_length)
    check_training(report, paths, seq_length, kernels, args.device)
    check_export_and_perplexity(report, paths, seq_length, args.device)


# ------------------------------------------------------------------ performance


def run_perf(report, args) -> None:
    kernels = [k for k in KERNEL_NAMES if _loads(k, args.device)]
    sizes, heads, dim = ("1024,2048", 4, 32) if args.tiny else ("8192,32768,65536", 32, 128)
    out = os.path.join(args.out, "attention.json")
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, "attention.py"), "--device", args.device,
                    "--sizes", sizes, "--heads", str(heads), "--dim", str(dim), "--repeats", "10",
                    "--kernels", ",".join(kernels), "--json", out], check=False)
    rows = json.load(open(out)) if os.path.exists(out) else []
    report.section(f"Attention forward + backward, bf16, {heads} heads x {dim}, G = N/4 "
                   f"({time.perf_counter() - started:.0f} s)", [
        [r["kernel"], r["seq_len"], f"{1e3 * r['dense_s']:.2f}", f"{1e3 * r['s2_s']:.2f}",
         f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{100 * r['of_ideal']:.0f} %",
         f"{r['s2_first_calls_s']:.1f}"] for r in rows],
        ["kernel", "N", "dense (ms)", "S² (ms)", "S² speed-up", "ideal fold", "S² / ideal",
         "S² first calls incl. compile (s)"])
    longest = max((r["seq_len"] for r in rows), default=None)
    at_longest = {r["kernel"]: r["s2_s"] for r in rows if r["seq_len"] == longest}
    best = min(at_longest, key=at_longest.get) if at_longest else "sdpa"
    steps_out = os.path.join(args.out, "steps.json")
    shape = (["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
              "--num-heads", "4", "--num-kv-heads", "4", "--vocab-size", "1000"] if args.tiny else
             ["--num-layers", "8", "--hidden-size", "4096", "--ffn-hidden-size", "11008",
              "--num-heads", "32", "--num-kv-heads", "32", "--vocab-size", "32000"])
    lengths = "512,1024" if args.tiny else "16384,32768"
    subprocess.run([sys.executable, os.path.join(HERE, "train_step.py"), "--device", args.device,
                    "--bf16", "--recompute", "none", "--steps", "5", "--seq-lengths", lengths,
                    "--arms", "megalong-s2,megalong-dense", *shape,
                    f"--megalong-args=--attention-kernel {best}", "--json", steps_out],
                   check=False)
    report.section(f"Whole steps: S² with {best} (fastest at N = {longest}) vs dense",
                   text=f"{shape[1]} layers, bf16, no recompute, LoRA+, N = {lengths}: the table "
                        f"train_step.py printed above (layers, recompute, Amdahl bound, MFU; "
                        f"also {steps_out}).")


def _loads(kernel: str, device: str) -> bool:
    import torch

    from megalong.attention.kernels import KernelUnavailableError, resolve_kernel

    try:
        resolve_kernel(kernel, torch.device(device), torch.bfloat16)
        return True
    except KernelUnavailableError:
        return False


# ------------------------------------------------------------------ main


def print_plan(args, parts) -> None:
    n, g = (128, 32) if args.tiny else (2048, 512)
    fields = {"kernels": ", ".join(KERNEL_NAMES), "n": n, "g": g, "device": args.device,
              "train_n": 256 if args.tiny else 1024}
    for part in parts:
        print(f"## part {part}")
        for i, step in enumerate(PLAN[part], 1):
            print(f"{i}. {step.format(**fields)}")
    print("## not checkable here")
    for item in NOT_CHECKABLE:
        print(f"- {item}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="directory for the tables")
    parser.add_argument("--part", choices=["correctness", "perf", "all"], default="all")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    parts = ["correctness", "perf"] if args.part == "all" else [args.part]
    if args.dry_run:
        print_plan(args, parts)
        return 0
    os.makedirs(args.out, exist_ok=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for the CPU smoke run",
              file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["MEGALONG_DEVICE"] = "cpu"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    header = (f"torch {torch.__version__}, "
              + (torch.cuda.get_device_name() if args.device == "cuda" else "CPU")
              + f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for part in parts:
        report = Report(args.out, part)
        report.section(f"GPU check, part {part}", text=header)
        started = time.perf_counter()
        (run_correctness if part == "correctness" else run_perf)(report, args)
        report.section(f"Part {part} took {time.perf_counter() - started:.0f} s",
                       text="Not checkable here:\n" + "\n".join(f"- {i}" for i in NOT_CHECKABLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
