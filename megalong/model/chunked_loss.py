"""Cross entropy over a vocab-parallel lm_head, a chunk of tokens at a time, so the full
[tokens, vocabulary] logits never exist (at 100k tokens x 32k vocabulary they would be 12.8 GB in
float32, the largest activation of a LongLoRA run). The result equals megatron-core's
vocab_parallel_cross_entropy on the output layer's logits: per-token loss, padded vocabulary
columns excluded, TP-sharded vocabulary reduced with one max and two sums per chunk.

The gradient costs no extra GEMM when the lm_head is frozen (LoRA+): the loss is the last op, so
each chunk's d(loss)/d(hidden) is formed in the forward while its logits are at hand, and the
backward only scales it by the incoming per-token gradient. A trainable lm_head (full
fine-tuning, tied embeddings) needs that gradient for its weight, so the backward recomputes each
chunk's logits instead: one extra lm_head GEMM per step."""

from typing import Optional

import torch
import torch.distributed as dist


def _softmax_and_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                      vocab_size: int, group: Optional[dist.ProcessGroup]):
    """logits [c, V_local] float32 (overwritten with softmax), labels [c] global ids ->
    (per-token loss [c], softmax [c, V_local], target mask, local target index)."""
    local = logits.shape[1]
    if vocab_start + local > vocab_size:  # padded rows of the lm_head are not tokens
        logits[:, max(vocab_size - vocab_start, 0):] = float("-inf")
    row_max = logits.amax(dim=1)  # not max(): its argmax makes it 4x slower than amax on CPU
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(row_max.unsqueeze(1))
    here = (labels >= vocab_start) & (labels < vocab_start + local)
    index = (labels - vocab_start).clamp(0, local - 1).unsqueeze(1)
    target = logits.gather(1, index).squeeze(1) * here
    sum_exp = logits.exp_().sum(dim=1)
    if group is not None:
        dist.all_reduce(target, group=group)
        dist.all_reduce(sum_exp, group=group)
    logits.div_(sum_exp.unsqueeze(1))
    return sum_exp.log() - target, logits, here, index


class _ChunkBuffers:
    """One chunk's float32 logits, and a buffer in the weight's dtype for the GEMMs' sides, both
    allocated once per call: a fresh chunk-sized tensor per chunk costs page faults on CPU (in a
    bf16 8k step, each chunk's bf16 cast took longer than its GEMM; into a buffer, ~15x less)."""

    def __init__(self, rows: int, weight: torch.Tensor):
        shape = (rows, weight.shape[0])
        self.logits = torch.empty(shape, dtype=torch.float32, device=weight.device)
        self.staging = (None if weight.dtype == torch.float32
                        else torch.empty(shape, dtype=weight.dtype, device=weight.device))

    def logits_of(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if self.staging is None:
            return torch.matmul(hidden, weight.t(), out=self.logits[:rows])
        staged = torch.matmul(hidden, weight.t(), out=self.staging[:rows])
        return self.logits[:rows].copy_(staged)

    def in_weight_dtype(self, d_logits: torch.Tensor) -> torch.Tensor:
        if self.staging is None:
            return d_logits
        return self.staging[:d_logits.shape[0]].copy_(d_logits)


def _loss_gradient(softmax, here, index):
    """d(loss)/d(logits) = softmax - one_hot(label), in place."""
    softmax.scatter_add_(1, index, -here.to(softmax.dtype).unsqueeze(1))
    return softmax


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """hidden [T, h] (already gathered/copied into the TP region), weight [V_local, h],
    labels [T] -> per-token loss [T] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, vocab_size, chunk_tokens, group,
                grad_hidden, grad_weight):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # Frozen lm_head: each chunk's input gradient is ready in the forward (no extra GEMM).
        early = torch.empty_like(hidden) if grad_hidden and not grad_weight else None
        buffers = _ChunkBuffers(min(chunk_tokens, hidden.shape[0]), weight)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            losses[rows], softmax, here, index = _softmax_and_loss(
                buffers.logits_of(hidden[rows], weight), labels[rows], vocab_start, vocab_size,
                group)
            if early is not None:
                d_logits = buffers.in_weight_dtype(_loss_gradient(softmax, here, index))
                torch.matmul(d_logits, weight, out=early[rows])
        ctx.meta = (vocab_start, vocab_size, chunk_tokens, group, grad_hidden, grad_weight)
        ctx.save_for_backward(*([early] if early is not None else [hidden, weight, labels]))
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        vocab_start, vocab_size, chunk_tokens, group, grad_hidden, grad_weight = ctx.meta
        scale = grad_losses.unsqueeze(1)
        none = (None,) * 7
        if not grad_weight:
            (early,) = ctx.saved_tensors
            return (early * scale.to(early.dtype),) + (None,) + none
        hidden, weight, labels = ctx.saved_tensors
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buffers = _ChunkBuffers(min(chunk_tokens, hidden.shape[0]), weight)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            _, softmax, here, index = _softmax_and_loss(
                buffers.logits_of(hidden[rows], weight), labels[rows], vocab_start, vocab_size,
                group)
            d_logits = _loss_gradient(softmax, here, index).mul_(scale[rows])
            if d_hidden is not None:
                torch.matmul(buffers.in_weight_dtype(d_logits), weight, out=d_hidden[rows])
            d_weight.addmm_(d_logits.t(), hidden[rows].float())
        return (d_hidden, d_weight.to(weight.dtype)) + none


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          vocab_start: int, vocab_size: int, chunk_tokens: int,
                          group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token loss of `labels` under logits = hidden @ weight.T (this rank's vocabulary
    columns [vocab_start, vocab_start + weight.shape[0]); columns >= vocab_size are padding).
    hidden [..., h] and labels [...] of the same leading shape; returns float32 of that shape."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    grad_on = torch.is_grad_enabled()
    flat = hidden.reshape(-1, hidden.shape[-1])
    losses = ChunkedVocabParallelCrossEntropy.apply(
        flat, weight, labels.reshape(-1), vocab_start, vocab_size, chunk_tokens, group,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return losses.view(labels.shape)
