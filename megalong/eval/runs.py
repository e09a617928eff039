"""The evaluation runs on the model's ranks: perplexity, passkey retrieval, generation. A CLI
resolves a ModelSource without torch (source.py) and hands one of the *_on_ranks functions to
run_on_model_ranks: under torchrun the current process is one of the ranks (ranks beyond tp*pp
are data parallel); otherwise tp*pp local gloo ranks are spawned (one runs in this process)."""

import os
import time

import torch.distributed as dist
from megatron.core import parallel_state

from megalong import runtime
from megalong.build import load_model
from megalong.config.model import EvalAttention
from megalong.data.tokenizer import load_tokenizer
from megalong.eval.data import open_eval_tokens
from megalong.eval.generate import Sampling, generate_one
from megalong.eval.passkey import fit_passkey_prompt, passkey_correct, summarize, sweep_cases
from megalong.eval.perplexity import evaluate_perplexity
from megalong.log import ProgressPrinter
from megalong.source import ModelSource
from megalong.spawn import run_on_ranks


def init_eval_runtime(source: ModelSource, seed: int = 1234) -> None:
    runtime.apply_patches("eval")  # megatron-core's notices that say nothing about an eval run
    runtime.init_distributed(source.parallel, seed=seed)


def build_eval_model(source: ModelSource, seq_length: int,
                     attention: EvalAttention = EvalAttention()):
    """This rank's stage of the model, weights loaded (LoRA adapters merged), eval mode, dense
    attention unless `attention` asks for a training pattern."""
    return load_model(source, seq_length=seq_length, merge_lora=True, **attention.model_options())


def run_on_model_ranks(source: ModelSource, fn, *args, timeout_s: float = 7 * 24 * 3600.0):
    """fn(*args) on the model's ranks; returns this process's result (under torchrun) or rank 0's.
    fn calls init_eval_runtime itself."""
    world = (source.parallel.tensor_model_parallel_size
             * source.parallel.pipeline_model_parallel_size)
    under_torchrun = "WORLD_SIZE" in os.environ
    if under_torchrun or world == 1:
        try:
            return fn(*args)
        finally:
            if not under_torchrun:
                runtime.shutdown()
    return run_on_ranks(fn, world, *args, timeout_s=timeout_s)[0]


def eval_ppl_on_ranks(source, data_path: str, seq_lengths, stride: int, max_windows,
                      micro_batch_size: int, data_dtype=None, progress: bool = True,
                      attention: EvalAttention = EvalAttention(),
                      repeat_probe: bool = False) -> dict:
    """One rank of tools/eval_ppl.py: build the model, read the data, evaluate every length."""
    init_eval_runtime(source)
    data = open_eval_tokens(data_path, vocab_size=source.arch.vocab_size, dtype=data_dtype)
    model = build_eval_model(source, max(seq_lengths), attention)
    rows = evaluate_perplexity(model, data.tokens, seq_lengths, stride=stride,
                               max_windows=max_windows, micro_batch_size=micro_batch_size,
                               progress=progress, attention=attention,
                               repeat_probe=repeat_probe)
    return {"kind": "perplexity", "model": source.describe(), "data": data.describe(),
            "stride": stride, "max_windows": max_windows, "attention": attention.describe(),
            "eval_attention": attention.pattern, "repeat_probe": repeat_probe, "results": rows}


def passkey_on_ranks(source, tokenizer_path: str, lengths, depths, trials: int, seed: int,
                     progress: bool = True) -> dict:
    """One rank of tools/passkey.py: every case, greedy with the KV cache, scored."""
    init_eval_runtime(source)
    tokenizer = load_tokenizer(tokenizer_path)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    cases = sweep_cases(lengths, depths, trials, seed)
    max_new = max(len(tokenizer.encode(" " + c.key)) for c in cases) + 2
    model = build_eval_model(source, max(lengths) + max_new)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = cases[dp_rank::dp_size]
    # a line per case (each is a generation, seconds to minutes long)
    printer = ProgressPrinter(interval_s=0, updating=False,
                              enabled=progress and dist.get_rank() == 0)
    records = []
    for number, case in enumerate(mine, 1):
        prompt = fit_passkey_prompt(tokenizer.encode, case.length, case.depth, case.key,
                                    extra_tokens=len(bos))
        ids = bos + tokenizer.encode(prompt.text)
        new = generate_one(model, ids, max_new_tokens=max_new, vocab_size=source.arch.vocab_size,
                           sampling=Sampling(), eos_id=tokenizer.eos_id)
        answer = tokenizer.decode(new)
        records.append({"length": case.length, "depth": case.depth, "trial": case.trial,
                        "key": case.key, "prompt_tokens": len(ids),
                        "key_depth": round(prompt.depth, 4), "answer": answer,
                        "correct": passkey_correct(answer, case.key)})
        printer.update(lambda: f"[passkey] {number}/{len(mine)}: length {case.length} depth "
                       f"{case.depth:g} key {case.key} -> {answer.strip()[:20]!r} "
                       f"({'ok' if records[-1]['correct'] else 'wrong'}), "
                       f"{printer.elapsed():.0f}s")
    if dp_size > 1:
        gathered = [None] * dp_size
        dist.all_gather_object(gathered, records, group=parallel_state.get_data_parallel_group())
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: (r["length"], r["depth"], r["trial"]))
    return {"kind": "passkey", "model": source.describe(), "tokenizer": tokenizer_path,
            "lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
            **summarize(records, lengths, depths), "cases": records}


def generate_on_ranks(source, tokenizer_path: str, prompts: list[str], max_new_tokens: int,
                      sampling: Sampling, use_cache: bool = True, add_bos: bool = True) -> dict:
    """One rank of tools/generate.py."""
    init_eval_runtime(source, seed=sampling.seed)
    tokenizer = load_tokenizer(tokenizer_path)
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    encoded = [bos + tokenizer.encode(p) for p in prompts]
    model = build_eval_model(source, max(len(ids) for ids in encoded) + max_new_tokens)
    outputs = []
    for prompt, ids in zip(prompts, encoded):
        start = time.monotonic()
        new = generate_one(model, ids, max_new_tokens=max_new_tokens,
                           vocab_size=source.arch.vocab_size, sampling=sampling,
                           eos_id=tokenizer.eos_id, use_cache=use_cache)
        outputs.append({"prompt": prompt, "prompt_tokens": len(ids), "tokens": new,
                        "completion": tokenizer.decode(new),
                        "seconds": round(time.monotonic() - start, 3)})
    return {"kind": "generation", "model": source.describe(), "tokenizer": tokenizer_path,
            "max_new_tokens": max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "seed": sampling.seed, "kv_cache": use_cache,
            "outputs": outputs}
