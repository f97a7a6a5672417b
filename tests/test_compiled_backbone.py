"""The whole decoder as one region (the GPU's CUDA-graph step): one graph, the eager values.

The CUDA-graph capture and replay need a GPU (bench/train_speed.py and bench/resume_check.py measure
them there); here the decoder's forward as one function is checked on the CPU: traced as one graph
without a break, its compiled forward and backward give what the eager model gives, and the
graphed backbone runs eagerly wherever it may not replay.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _lora_model(tiny_model_dir):
    from lora_cli.config import LoraSettings
    from lora_cli.model.load import attach_lora, load_model, prepare_for_training

    model = load_model(tiny_model_dir, "none", "fp32", "cpu")
    prepare_for_training(model, quantized=False, upcast=False, checkpoint_layers=0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), "tiny",
                             tiny_model_dir)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect worth comparing
            torch.nn.init.normal_(p, std=0.5)
    peft_model.train()
    return peft_model


def _packed_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 64), generator=g)
    positions = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]).repeat(2, 1)
    return ids, positions


def test_the_decoder_traces_as_one_graph_without_a_break(tiny_model_dir):
    from lora_cli.model.backbone import backbone_function

    peft_model = _lora_model(tiny_model_dir)
    decoder = peft_model.get_base_model().get_decoder()
    ids, positions = _packed_batch(peft_model.config.vocab_size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(backbone_function(decoder, own_mask=True))(ids, None, positions)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_compiled_decoder_gives_the_eager_hidden_states_and_lora_gradients(tiny_model_dir):
    from lora_cli.model.backbone import backbone_function
    from lora_cli.model.backbone import block_causal_mask

    peft_model = _lora_model(tiny_model_dir)
    decoder = peft_model.get_base_model().get_decoder()
    ids, positions = _packed_batch(peft_model.config.vocab_size)
    lora = [p for p in peft_model.parameters() if p.requires_grad]

    def run(forward):
        for p in lora:
            p.grad = None
        hidden = forward()
        (hidden.float() ** 2).mean().backward()
        return hidden.detach(), [p.grad.clone() for p in lora]

    eager_h, eager_g = run(lambda: decoder(input_ids=ids, attention_mask=block_causal_mask(positions),
                                           position_ids=positions, use_cache=False).last_hidden_state)
    torch._dynamo.reset()
    compiled = torch.compile(backbone_function(decoder, own_mask=True), backend="aot_eager", dynamic=False)
    compiled_h, compiled_g = run(lambda: compiled(ids, None, positions))
    torch.testing.assert_close(compiled_h, eager_h, rtol=1e-5, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in eager_g)
    for got, want in zip(compiled_g, eager_g):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the packed examples stay apart inside the region: changing the last example leaves the first unchanged
    other = ids.clone()
    other[:, 50:] = 3
    moved = compiled(other, None, positions).detach()
    torch.testing.assert_close(moved[:, :50], compiled_h[:, :50], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved[:, 50:], compiled_h[:, 50:])


def _decoder_and_its_eager_output(tiny_model_dir):
    """(the LoRA model's decoder, packed ids, positions, its eager last hidden states)."""
    from lora_cli.model.backbone import block_causal_mask

    peft_model = _lora_model(tiny_model_dir)
    decoder = peft_model.get_base_model().get_decoder()
    ids, positions = _packed_batch(peft_model.config.vocab_size)
    want = decoder(input_ids=ids, attention_mask=block_causal_mask(positions), position_ids=positions,
                   use_cache=False).last_hidden_state
    return decoder, ids, positions, want


def test_the_graphed_backbone_runs_eagerly_off_the_gpu_without_gradients_and_with_an_explicit_mask(tiny_model_dir):
    from lora_cli.model.backbone import GraphedBackbone, block_causal_mask

    decoder, ids, positions, want = _decoder_and_its_eager_output(tiny_model_dir)
    graphed = GraphedBackbone(decoder, own_mask=True)
    torch.testing.assert_close(graphed(ids, None, positions), want)
    with torch.no_grad():
        torch.testing.assert_close(graphed(ids, block_causal_mask(positions), positions), want)
    assert graphed.captures == 0 and graphed.graphed is None


def test_detached_gradients_no_longer_share_memory_with_what_a_graph_would_overwrite():
    from lora_cli.model.backbone import detach_grads

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    static = [torch.ones(3), torch.full((2,), 2.0)]
    params[0].grad, params[1].grad = static[0].detach(), static[1].detach()  # as autograd may keep them
    detach_grads(params)
    static[0].fill_(7.0)  # the next replay
    assert params[0].grad.tolist() == [1.0, 1.0, 1.0] and params[1].grad.tolist() == [2.0, 2.0]
    assert params[2].grad is None


def test_a_decoder_that_cannot_be_captured_trains_eagerly_and_says_why(tiny_model_dir):
    from lora_cli.model.backbone import GraphedBackbone

    class Uncapturable(GraphedBackbone):
        def replayable(self, input_ids):
            return True  # as on a GPU

        def _capture(self, input_ids, position_ids):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    decoder, ids, positions, want = _decoder_and_its_eager_output(tiny_model_dir)
    graphed = Uncapturable(decoder, own_mask=True)
    torch.testing.assert_close(graphed(ids, None, positions), want)
    assert graphed.failure == "RuntimeError: operation not permitted when stream is capturing"
    torch.testing.assert_close(graphed(ids, None, positions), want)  # and stays eager
