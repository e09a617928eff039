"""The reference trainer megalong is measured against: what a user runs without megalong.

    python benchmarks/reference_hf.py [--seq-length 8192] [--attention s2|dense]
                                      [--recompute full|none] [--steps 6] [--device cpu|cuda]

- Hugging Face `LlamaForCausalLM`, random weights from a `LlamaConfig` (nothing downloaded),
  torch SDPA attention;
- PEFT `LoraConfig(r=8, lora_alpha=16, target_modules=q,k,v,o, lora_dropout=0)`, plus the
  embedding and every RMSNorm trainable (`requires_grad`, as LongLoRA's own training script
  does with `--trainable_params embed,norm`); lm_head frozen;
- S²-Attn transcribed from Algorithm 1 of the LongLoRA paper (arXiv 2309.12307), registered with
  transformers' `AttentionInterface` as "s2_reference". Algorithm 1 rolls the second half of the
  heads by -G/2, attends within groups of G and rolls back; the roll makes the last group
  [N - G/2, N) + [0, G/2), through which the first G/2 tokens see the last ones (a future-token
  leak). This is the leak-free variant: that wrapped group is split into its two halves, each a
  causal group of its own (what LongLoRA's flash-attn varlen path does);
- AdamW (torch), gradient clipping 1.0, HF gradient checkpointing (whole decoder layers, the
  same as megatron's `--recompute-granularity full`) when `--recompute full`.

Kept unchanged once committed: megalong's optimisations are measured against this file.
"""

import argparse
import json
import math
import sys
import time
import warnings

ATTENTION_NAME = "s2_reference"


# ------------------------------------------------------------------- S²-Attn, Algorithm 1


def _causal_groups(q, k, v, group_size, scale, enable_gqa):
    """q [b, h, n, d], k/v [b, h_kv, n, d] -> causal attention within consecutive groups of
    group_size tokens (n a multiple of it), groups folded into the batch."""
    import torch.nn.functional as F

    b, _, n, d = q.shape
    groups = n // group_size

    def fold(x):  # [b, h, n, d] -> [b * groups, h, G, d]
        return (x.view(b, x.shape[1], groups, group_size, d).transpose(1, 2)
                .reshape(b * groups, x.shape[1], group_size, d))

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, scale=scale,
                                         enable_gqa=enable_gqa)
    return out.view(b, groups, q.shape[1], group_size, d).transpose(1, 2).reshape(q.shape)


def s2_attention_reference(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
    """transformers attention function: query [b, h, n, d], key/value [b, h_kv, n, d] ->
    ([b, n, h, d], None). Group size G = module.config.s2_group_size."""
    import torch

    if attention_mask is not None:
        raise ValueError("the S²-Attn reference takes unpadded batches (no attention mask)")
    if dropout:
        raise ValueError("the S²-Attn reference has no attention dropout")
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    G = module.config.s2_group_size
    if n % G or G % 2:
        raise ValueError(f"sequence length {n} must be a multiple of the even group size {G}")
    # Split the heads into two halves. Each kv head serves heads // kv_heads query heads; with
    # an even number of kv heads the halves split the kv heads too (grouped-query SDPA), else
    # K/V are repeated per query head first, as the paper's pseudocode (H heads of qkv) has it.
    if kv_heads % 2 == 0:
        enable_gqa = kv_heads != heads
    else:
        rep = heads // kv_heads
        key, value = (x.repeat_interleave(rep, dim=1) for x in (key, value))
        kv_heads, enable_gqa = heads, False
    q1, q2 = query.chunk(2, dim=1)
    k1, k2 = key.chunk(2, dim=1)
    v1, v2 = value.chunk(2, dim=1)

    # Unshifted half: groups [0, G), [G, 2G), ...
    out1 = _causal_groups(q1, k1, v1, G, scaling, enable_gqa)

    # Shifted half: the paper's roll(-G/2) gives groups [G/2, 3G/2), ..., and the wrapped
    # [N - G/2, N) + [0, G/2). Leak-free: the middle groups as rolled, the two ends apart.
    half = G // 2
    out2 = torch.empty_like(q2)
    if n > G:
        mid = slice(half, n - half)
        out2[:, :, mid] = _causal_groups(q2[:, :, mid], k2[:, :, mid], v2[:, :, mid], G, scaling,
                                         enable_gqa)
    ends = [torch.cat([x[:, :, :half], x[:, :, n - half:]], dim=2) for x in (q2, k2, v2)]
    ends_out = _causal_groups(*ends, half, scaling, enable_gqa)
    out2[:, :, :half] = ends_out[:, :, :half]
    out2[:, :, n - half:] = ends_out[:, :, half:]

    out = torch.cat([out1, out2], dim=1)  # [b, h, n, d]
    return out.transpose(1, 2).contiguous(), None


def register_s2_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, s2_attention_reference)
    return ATTENTION_NAME


# ------------------------------------------------------------------- model and step


def build_reference(*, hidden_size, ffn_hidden_size, num_layers, num_heads, num_kv_heads,
                    vocab_size, seq_length, attention="s2", group_size_ratio=0.25,
                    recompute="full", lora_rank=8, lora_alpha=16.0, lr=2e-5,
                    device="cpu", bf16=False, seed=1234):
    """(model, optimizer): HF Llama with random weights, PEFT LoRA on q,k,v,o, embedding and
    norms trainable, AdamW over what trains."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    attn_impl = register_s2_attention() if attention == "s2" else "sdpa"
    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=ffn_hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab_size,
        max_position_embeddings=max(seq_length, 4096), rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation=attn_impl, use_cache=False,
    )
    config.s2_group_size = int(round(seq_length * group_size_ratio))
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if recompute == "full":
        with warnings.catch_warnings():  # renamed activation_checkpointing_* in transformers 5.2x
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():  # LongLoRA's --trainable_params embed,norm
        if "embed" in name or "norm" in name:
            param.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return model, optimizer


def train_step(model, optimizer, tokens, clip_grad=1.0) -> float:
    """One optimizer step on tokens [b, n] (labels = the tokens; HF shifts them)."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
    optimizer.step()
    return loss.item()


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # transformers' checkpointing renames
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--ffn-hidden-size", type=int, default=1408)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--attention", choices=["s2", "dense"], default="s2")
    parser.add_argument("--recompute", choices=["full", "none"], default="full")
    parser.add_argument("--steps", type=int, default=6, help="steps, the first one a warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    import torch

    model, optimizer = build_reference(
        hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        vocab_size=args.vocab_size, seq_length=args.seq_length, attention=args.attention,
        recompute=args.recompute, device=args.device, bf16=args.bf16)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length),
                           generator=gen).to(args.device)
    times, losses = [], []
    for _ in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, tokens))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[1:]) or times
    median = timed[len(timed) // 2]
    tokens_per_step = args.micro_batch_size * args.seq_length
    print(json.dumps({"median_step_s": median, "tokens_per_s": tokens_per_step / median,
                      "losses": losses, "finite": all(math.isfinite(x) for x in losses)}))


if __name__ == "__main__":
    sys.exit(main())
