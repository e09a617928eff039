"""Greedy and top-p generation on the megatron model, with a KV cache (any TP and PP).

The cache is megatron-core's StaticInferenceContext passed as `inference_context` to
GPTModel.forward: megatron's Attention stores each layer's K/V (before RoPE) in preallocated
[max_len, batch, heads, d] buffers, and once `sequence_len_offset` > 0 it switches the core
attention to attn_mask_type no_mask, which S2CoreAttention honours (a decode step's one query
sees every cached key). Each step runs through megatron's forward schedules, so pipeline stages
pass activations as in training; the chosen token is broadcast from the last stage's first TP
rank, so every rank feeds the same token next.

    new_tokens = generate(model, prompt_ids, max_new_tokens=32, vocab_size=arch.vocab_size)
"""

from dataclasses import dataclass
from functools import partial
from typing import Optional

from megalong import runtime
from megalong.errors import MegalongError
from megalong.records import iter_records


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int = 1234

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "Sampling":
        if not self.temperature >= 0:
            raise MegalongError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MegalongError(f"--top-p must lie in (0, 1], got {self.top_p}")
        return self


def choose_next_token(logits, sampling: Sampling, generator=None):
    """logits [b, V] (padded vocabulary already removed) -> token ids [b]."""
    import torch

    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked higher
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    picks = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return picks.to(logits.device)


def _logits_step(inference_context, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None,
                   inference_context=inference_context, runtime_gather_output=True)

    def keep_logits(logits):
        return logits.sum() * 0.0, {"logits": logits.detach()}

    return output, keep_logits


def _last_logits(model, tokens, position_ids, inference_context):
    """Logits of the last position [b, V_padded] on the last stage, None elsewhere. With a
    context, megatron materialises only the last position; without one, all positions are
    computed (and gathered over TP) and the last is taken."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = get_forward_backward_func()(
        forward_step_func=partial(_logits_step, inference_context),
        data_iterator=iter([{"tokens": tokens, "position_ids": position_ids}]),
        model=model, num_microbatches=1, seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0], forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]["logits"][:, -1, :]


def _broadcast_from_last_stage(token):
    """The token chosen on the last stage's first TP rank, on every rank of the model."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.broadcast(token, parallel_state.get_tensor_model_parallel_src_rank(),
                   group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(token, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return token


def generate_one(model, prompt: list[int], *, max_new_tokens: int, vocab_size: int,
                 sampling: Sampling = Sampling(), eos_id: Optional[int] = None,
                 use_cache: bool = True) -> list[int]:
    """The new tokens after `prompt` (stopping after eos_id, which is included). Call on every
    rank of the model with the same arguments; every rank returns the same tokens."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    if not prompt:
        raise MegalongError("the prompt is empty: generation needs at least one token")
    if model.training:
        raise MegalongError("generate() needs the model in eval() mode (dense attention)")
    device = runtime.device()
    sampling.validate()
    generator = None
    if not sampling.greedy:
        # Seeded per TP rank group identically; the broadcast below makes the choice binding.
        generator = torch.Generator().manual_seed(sampling.seed)
    total = len(prompt) + max_new_tokens
    context = StaticInferenceContext(1, total) if use_cache else None
    sequence = torch.tensor([prompt], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    with torch.no_grad():
        while len(new_tokens) < max_new_tokens:
            offset = context.sequence_len_offset if context is not None else 0
            step_tokens = sequence[:, offset:]
            positions = torch.arange(offset, sequence.shape[1], device=device).unsqueeze(0)
            logits = _last_logits(model, step_tokens, positions, context)
            if context is not None:
                context.sequence_len_offset += step_tokens.shape[1]
                context.enable_decode_mode()
            token = torch.zeros(1, dtype=torch.long, device=device)
            if is_last:
                token = choose_next_token(logits[:, :vocab_size], sampling, generator)
            token = _broadcast_from_last_stage(token)
            new_tokens.append(int(token.item()))
            if eos_id is not None and new_tokens[-1] == eos_id:
                break
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
    return new_tokens


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, vocab_size: int,
             sampling: Sampling = Sampling(), eos_id: Optional[int] = None,
             use_cache: bool = True) -> list[list[int]]:
    """generate_one for each prompt in turn (prompts may differ in length)."""
    return [generate_one(model, p, max_new_tokens=max_new_tokens, vocab_size=vocab_size,
                         sampling=sampling, eos_id=eos_id, use_cache=use_cache) for p in prompts]


def read_prompts(path: str) -> list[str]:
    """A text file is one prompt; a .jsonl file holds one {"prompt": ...} object per line."""
    import os

    if not os.path.isfile(path):
        raise MegalongError(f"--prompt-file {path} does not exist")
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            raise MegalongError(f"--prompt-file {path} is empty")
        return [text.rstrip("\n")]
    prompts = []
    for where, item in iter_records(path):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise MegalongError(f'{where} lacks a "prompt" string')
        prompts.append(item["prompt"])
    if not prompts:
        raise MegalongError(f"--prompt-file {path} holds no prompts")
    return prompts
