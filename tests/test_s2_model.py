"""S²-Attn inside the whole megatron model: TP=2 computes the TP=1 function (loss and every
gradient), eval() is HF's dense model, and a tiny Llama trains with it."""

import pytest
import torch

from megalong.spawn import run_on_ranks
from test_model import VOCAB, hf_logits
from test_training import train_args, train_layouts
from megalong.config.parallel import ParallelConfig

SEQ = 64  # G = 16: four groups, shifted half with 8-token end groups


def _full_grad(name, param, tp_size):
    """The TP=1 layout of a parameter's gradient, gathered from every TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    grad = param.grad.detach()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return grad
    shards = [torch.empty_like(grad) for _ in range(tp_size)]
    dist.all_gather(shards, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if name.endswith("linear_fc1.weight"):  # rank r holds [gate_r; up_r]
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups])
    return torch.cat(shards, dim=param.partition_dim)


def s2_loss_grads_and_eval_logits(hf_dir, tokens, tp):
    from megalong import runtime
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.config.hf_config import arch_from_hf_config
    from megalong.config.arch import padded_vocab_size
    from megalong.convert.model_io import load_hf_weights
    from megalong.model.forward import run_microbatches
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    reader = HFCheckpointReader(hf_dir)
    arch, _ = arch_from_hf_config(reader.config, hf_dir)
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    model = build_llama(arch, ModelOptions(seq_length=SEQ, padded_vocab_size=padded,
                                           attention="s2", group_size=SEQ // 4, initialize=False))
    load_hf_weights(model, reader.get, arch, padded)
    model.train()
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(tokens.shape[0], SEQ)}
    (out,) = run_microbatches(model, [batch], forward_only=False)
    grads = {name: _full_grad(name, p, tp) for name, p in model.named_parameters()}
    model.eval()
    logits = full_logits(model, tokens[:, :-1])[..., :VOCAB]
    return float(out["loss_sum"]), grads, logits


@pytest.mark.slow
def test_tp2_s2_equals_tp1_and_eval_is_hf_dense(tiny_hf_dir):
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(5))
    loss1, grads1, logits1 = run_on_ranks(s2_loss_grads_and_eval_logits, 1, tiny_hf_dir, tokens, 1)[0]
    loss2, grads2, _ = run_on_ranks(s2_loss_grads_and_eval_logits, 2, tiny_hf_dir, tokens, 2)[0]
    assert abs(loss2 - loss1) <= 1e-5 * abs(loss1)
    assert grads1.keys() == grads2.keys()
    for name, grad in grads1.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (grads2[name] - grad).abs().max() <= 1e-5 * scale, name
    # eval() switches to dense causal attention: HF's logits on the same weights.
    assert (logits1 - hf_logits(tiny_hf_dir, tokens[:, :-1])).abs().max() <= 1e-4
    # ...and S²-Attn in training really differs from dense (else the TP check proves little).
    dense_loss = torch.nn.functional.cross_entropy(
        hf_logits(tiny_hf_dir, tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1),
        reduction="sum").item()
    assert abs(dense_loss - loss1) > 1e-3 * abs(loss1)


@pytest.mark.slow
def test_tiny_llama_trains_with_s2(tiny_megatron_ckpt, corpus, sp_model):
    # Full fine-tuning: every weight learns, so 30 steps show S²-Attn training clearly (LoRA+
    # training with S²-Attn is covered by test_training and the quickstart).
    args = train_args(tiny_megatron_ckpt, corpus, sp_model, "--attention", "s2", "--lr", "2e-3",
                      "--lr-decay-style", "constant", "--full-finetune", iters=30)
    (losses,), = run_on_ranks(train_layouts, 1, [args])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses
