"""Packing and the fused loss change nothing that an example sees (fp32, tiny model)."""

import pytest
import torch

from lora_cli.data.batching import collate_packed, collate_padded
from lora_cli.model.loss import linear_cross_entropy, plain_cross_entropy


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    m.config.use_cache = False
    return m


def _rows(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = length // 3
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def _per_example_losses(model, hidden, targets, spans):
    out = []
    for s, e in spans:
        loss, n = plain_cross_entropy(model.lm_head(hidden[:, s:e]), targets[:, s:e])
        out.append(loss.item() / n)
    return out


def test_packed_per_example_loss_equals_unpacked(tiny_model_dir):
    model = _model(tiny_model_dir)
    rows = _rows(6, model.config.vocab_size)
    packed = collate_packed(rows, pad_id=2, max_tokens=512)
    with torch.no_grad():
        hidden = model.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
        spans, start = [], 0
        for r in rows:
            spans.append((start, start + len(r["input_ids"])))
            start += len(r["input_ids"])
        packed_losses = _per_example_losses(model, hidden, packed.targets, spans)
        alone = []
        for r in rows:
            single = collate_padded([r], pad_id=2)
            h = model.model(input_ids=single.input_ids, attention_mask=single.attention_mask,
                            use_cache=False).last_hidden_state
            alone += _per_example_losses(model, h, single.targets, [(0, len(r["input_ids"]))])
    assert packed_losses == pytest.approx(alone, abs=1e-5)
    # the control: the same row with plain causal attention across examples differs
    with torch.no_grad():
        mask = torch.ones_like(packed.input_ids)
        crossed = model.model(input_ids=packed.input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert max(abs(a - b) for a, b in zip(_per_example_losses(model, crossed, packed.targets, spans), alone)) > 1e-3


def test_padded_batch_targets_ignore_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    b = collate_padded(rows, pad_id=2)
    assert b.targets.tolist() == [[6, 7, -100], [6, -100, -100]] and b.n_targets == 3 and b.n_real == 5


def test_packed_rows_never_predict_across_examples():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = collate_packed(rows, pad_id=2, max_tokens=64)
    assert b.targets[0, :5].tolist() == [6, 7, -100, 9, -100]
    assert b.position_ids[0, :5].tolist() == [0, 1, 2, 0, 1]
    assert b.n_real == 5 and b.input_ids.shape[1] == 64 and b.n_targets == 3


def test_fused_loss_and_gradient_match_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (2, 30))
    targets[0, :7] = -100
    loss, n = linear_cross_entropy(hidden, weight, targets, chunk=7)
    loss.backward()
    g_fused = hidden.grad.clone()
    hidden.grad = None
    ref, n_ref = plain_cross_entropy(hidden @ weight.t(), targets)
    ref.backward()
    assert n == n_ref == 53
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g_fused, hidden.grad, atol=1e-12)


def test_loss_module_on_a_packed_batch_equals_the_sum_over_examples(tiny_model_dir):
    """The training module (own block mask, precomputed target positions) against examples alone."""
    from lora_cli.config import LoraSettings
    from lora_cli.model.load import attach_lora, load_model, prepare_for_training
    from lora_cli.model.loss import make_loss_module

    model = load_model(tiny_model_dir, "none", "fp32", "cpu")
    prepare_for_training(model, False, False, 0)
    module = make_loss_module(attach_lora(model, LoraSettings(dropout=0.0)), fused=True).eval()
    rows = _rows(5, model.config.vocab_size, seed=3)
    with torch.no_grad():
        packed = collate_packed([rows[:3], rows[3:]], pad_id=2, max_tokens=128)  # two packed rows
        total, n = module(*packed.loss_args())
        alone = [module(*collate_padded([r], pad_id=2).loss_args()) for r in rows]
    assert n == sum(k for _, k in alone) == packed.n_targets
    assert total.item() == pytest.approx(sum(loss.item() for loss, _ in alone), rel=1e-5)


def test_memory_plan_checkpoints_only_what_the_budget_needs():
    from transformers import Qwen2Config

    from lora_cli.model.memory import GIB, plan_checkpointing

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2)
    roomy = plan_checkpointing(cfg, 8192, 80 * GIB, int(1.6 * GIB))
    tight = plan_checkpointing(cfg, 16384, 24 * GIB, int(1.6 * GIB))
    lean = plan_checkpointing(cfg, 8192, 8 * GIB, int(1.6 * GIB))
    assert roomy.checkpoint_layers == 0 and roomy.fits
    assert 0 < tight.checkpoint_layers < 28 and tight.fits and tight.estimated_peak_gib <= 24
    assert lean.checkpoint_layers > tight.checkpoint_layers
