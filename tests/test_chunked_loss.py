"""The chunked lm_head + cross entropy (megalong/model/chunked_loss.py) against torch's
F.cross_entropy on whole logits, and inside the model against megatron-core's own loss path
(vocab_parallel_cross_entropy) at TP=1, TP=2 and TP=2 + SP, frozen and trainable lm_head; with
activation recompute (uniform, block) against none."""

import pytest
import torch
import torch.nn.functional as F

from megalong.model.chunked_loss import chunked_cross_entropy
from megalong.spawn import run_on_ranks
from test_model import VOCAB, hf_logits
from megalong.config.parallel import ParallelConfig


@pytest.mark.parametrize("trainable_weight", [False, True])
def test_equals_torch_cross_entropy_on_whole_logits(trainable_weight):
    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, padded_vocab, vocab = 37, 16, 64, 59  # 5 padded columns
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(padded_vocab, hidden_size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    upstream = torch.rand(tokens, generator=generator, dtype=torch.float64)  # e.g. a loss mask

    ref_hidden = hidden.clone().requires_grad_()
    ref_weight = weight.clone().requires_grad_(trainable_weight)
    logits = ref_hidden @ ref_weight[:vocab].t()  # padded columns are not part of the softmax
    expected = F.cross_entropy(logits, labels, reduction="none")
    (expected * upstream).sum().backward()

    for chunk in (1, 8, 37, 100):
        got_hidden = hidden.clone().requires_grad_()
        got_weight = weight.clone().requires_grad_(trainable_weight)
        loss = chunked_cross_entropy(got_hidden, got_weight, labels, vocab_start=0,
                                     vocab_size=vocab, chunk_tokens=chunk)
        (loss.double() * upstream).sum().backward()
        # float32 softmax, as megatron's cross entropy
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)
        if trainable_weight:
            assert got_weight.grad[vocab:].abs().max() == 0
            torch.testing.assert_close(got_weight.grad[:vocab], ref_weight.grad[:vocab],
                                       rtol=1e-5, atol=1e-6)


def test_no_grad_and_bad_chunk():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.tensor([0, 3, 9, 2])
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, vocab_start=0, vocab_size=10,
                                     chunk_tokens=3)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), labels, reduction="none"))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(hidden, weight, labels, vocab_start=0, vocab_size=10, chunk_tokens=0)


def model_loss_and_grads(hf_dir, tokens, layouts):
    """On every rank, for each (tp, sp, trainable lm_head, recompute method): the model's
    per-token loss and every trainable parameter's gradient with megatron's loss (chunk 0) and
    no recompute, then with chunks of 5 and the recompute method (None: none)."""
    from megalong import runtime
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.config.hf_config import arch_from_hf_config
    from megalong.config.arch import padded_vocab_size
    from megalong.convert.model_io import load_hf_weights
    from megalong.model.forward import position_ids_for
    from megalong.model.llama import ModelOptions, build_llama

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    upstream = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for tp, sp, trainable_head, recompute in layouts:
        runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
        reader = HFCheckpointReader(hf_dir)
        arch, _ = arch_from_hf_config(reader.config, hf_dir)
        padded = padded_vocab_size(arch.vocab_size, 128, tp)
        per_mode = []
        for chunk, method in ((0, None), (5, recompute)):
            opts = ModelOptions(seq_length=inputs.shape[1], padded_vocab_size=padded,
                                attention="full", sequence_parallel=sp, initialize=False,
                                loss_chunk_tokens=chunk, recompute_method=method or "uniform",
                                recompute_granularity="full" if method else None)
            model = build_llama(arch, opts)
            load_hf_weights(model, reader.get, arch, padded)
            for name, param in model.named_parameters():
                param.requires_grad = trainable_head or name != "output_layer.weight"
            calls = [0] * len(model.decoder.layers)  # forwards per layer: 2 when recomputed
            for i, layer in enumerate(model.decoder.layers):
                layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
            loss = model(inputs, position_ids_for(inputs), None, labels=labels)
            (loss * upstream).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            per_mode.append((loss.detach(), grads, calls))
        results.append(per_mode)
    return results


@pytest.mark.slow
def test_model_loss_and_grads_equal_megatron_loss_at_tp1_tp2_sp(tiny_hf_dir):
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(2))

    layouts = [(1, False, False, None), (1, False, True, None), (2, False, False, None),
               (2, True, True, None)]
    per_rank = run_on_ranks(model_loss_and_grads, 2, tiny_hf_dir, tokens, layouts)
    logits = hf_logits(tiny_hf_dir, tokens[:, :-1])
    hf_loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    for rank_results in per_rank:
        for (tp, sp, trainable, recompute), ((loss0, grads0, _), (loss5, grads5, calls)) in zip(
                layouts, rank_results):
            where = f"tp={tp} sp={sp} trainable lm_head={trainable} recompute={recompute}"
            torch.testing.assert_close(loss5, hf_loss, rtol=1e-4, atol=1e-4, msg=where)
            torch.testing.assert_close(loss5, loss0, rtol=1e-5, atol=1e-5, msg=where)
            assert grads5.keys() == grads0.keys()
            assert calls == [1, 1]
            assert ("output_layer.weight" in grads5) == trainable
            for name in grads0:
                torch.testing.assert_close(grads5[name], grads0[name], rtol=1e-4, atol=2e-5,
                                           msg=f"{where}: {name}")


@pytest.mark.slow
def test_uniform_and_block_recompute_equal_no_recompute(tiny_hf_dir):
    """Block recomputes layer 0 of 2 and keeps layer 1's activations; uniform recomputes both."""
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(4))
    layouts = [(1, False, False, "uniform"), (1, False, False, "block"), (2, True, True, "block")]
    # (ModelOptions.recompute_num_layers is 1: uniform checkpoints one layer at a time)
    per_rank = run_on_ranks(model_loss_and_grads, 2, tiny_hf_dir, tokens, layouts)
    for rank_results in per_rank:
        for layout, ((loss0, grads0, _), (loss5, grads5, calls)) in zip(layouts, rank_results):
            assert calls == ([2, 2] if layout[3] == "uniform" else [2, 1]), layout
            torch.testing.assert_close(loss5, loss0, rtol=1e-5, atol=1e-5, msg=str(layout))
            for name in grads0:
                torch.testing.assert_close(grads5[name], grads0[name], rtol=1e-4, atol=2e-5,
                                           msg=f"{layout}: {name}")


def test_bfloat16_inputs_follow_the_float32_softmax():
    """bf16 hidden and weight (GPU training): logits are cast to float32 for the softmax, and the
    gradients come back in bf16, within bf16's precision of the float64 result."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(50, 32, generator=generator, dtype=torch.float64)
    weight = 0.3 * torch.randn(70, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 64, (50,), generator=generator)
    reference = hidden.clone().requires_grad_()
    expected = F.cross_entropy(reference @ weight[:64].t(), labels, reduction="none")
    expected.sum().backward()
    for trainable in (False, True):
        got = hidden.to(torch.bfloat16).requires_grad_()
        w = weight.to(torch.bfloat16).requires_grad_(trainable)
        loss = chunked_cross_entropy(got, w, labels, vocab_start=0, vocab_size=64, chunk_tokens=16)
        loss.sum().backward()
        assert loss.dtype == torch.float32 and got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=0.02, atol=0.05)
        torch.testing.assert_close(got.grad.double(), reference.grad, rtol=0.05, atol=0.02)
