"""The decoding step written for the Llama family computes what transformers' forward computes."""

import pytest
import torch

from lora_cli.infer.decode import Decoder, cache_length
from lora_cli.infer.generation import Sampling, generate_with
from lora_cli.infer.plain_copy import build_copy, refresh

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import build_llama, build_llama_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_llama(folder, len(build_llama_tokenizer(folder)))
    return folder


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory):
    """A random Mistral without a sliding window (as Mistral v0.3): GQA, untied output matrix."""
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, initializer_range=0.3,
                        tie_word_embeddings=False, eos_token_id=2, pad_token_id=2)
    MistralForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _model(folder, targets, seed: int = 0):
    """The tiny model in fp32, with a LoRA (B drawn, not zero) on `targets`, or none."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if not targets:
        return model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _one_step(model, ids, valid, nxt, rope_matmul: bool = False):
    """Prefill the left-padded prompts, feed `nxt` through the fused step: its logits and transformers'."""
    decoder = Decoder(build_copy(model, torch.float32, CPU), CPU)
    assert decoder.step_kind == "fused"
    decoder.fused.rope_matmul = rope_matmul
    batch, width = ids.shape
    with torch.no_grad():
        slot = decoder._slot(batch, cache_length(width, 4))
        decoder._prefill(slot, ids, valid)
        slot.tok.copy_(nxt)
        slot.mask.index_fill_(-1, slot.cache_pos, 0.0)
        decoder.fused(slot)
        full, seen = torch.cat([ids, nxt], 1), torch.cat([valid, torch.ones_like(nxt, dtype=torch.bool)], 1)
        positions = (seen.long().cumsum(-1) - 1).clamp(min=0)
        want = model(input_ids=full, attention_mask=seen.long(), position_ids=positions).logits[:, -1]
    return slot.logits.clone(), want


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("family, targets", [(f, t) for f in ("qwen2", "llama") for t in
                                             [(), ("q_proj", "v_proj"), ("gate_proj", "up_proj"), ALL]]
                         + [("mistral", ()), ("mistral", ALL)])
def test_one_fused_step_gives_transformers_logits_to_fp32_tolerance(family, targets, request, one_thread):
    folder = {"qwen2": "tiny_model_dir", "llama": "tiny_llama_dir", "mistral": "tiny_mistral_dir"}[family]
    model = _model(request.getfixturevalue(folder), targets)
    assert model.config.model_type == family
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (3, 11), generator=g)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[0, :6], valid[2, :1] = False, False  # rows of 5, 11 and 10 tokens, left-padded
    got, want = _one_step(model, ids, valid, torch.tensor([[7], [30], [251]]))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    if targets:  # the adapter is in the step: the base alone answers otherwise
        with model.disable_adapter():
            base, _ = _one_step(model, ids, valid, torch.tensor([[7], [30], [251]]))
        assert (base - got).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_rotary_as_one_matmul_as_on_a_gpu_gives_transformers_logits(family, tiny_model_dir, tiny_llama_dir, one_thread):
    model = _model(tiny_model_dir if family == "qwen2" else tiny_llama_dir, ("q_proj", "k_proj", "up_proj"))
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    nxt = torch.tensor([[12], [40]])
    got, want = _one_step(model, ids, valid, nxt, rope_matmul=True)
    by_roll, _ = _one_step(model, ids, valid, nxt)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got - by_roll).abs().max() <= 1e-5 * want.abs().max()


def test_greedy_answers_of_the_tiny_llama_through_the_fused_step_equal_eager(tiny_llama_dir, one_thread):
    model = _model(tiny_llama_dir, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    tokenizer = _tokenizer(tiny_llama_dir)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, len(tokenizer), (n,), generator=g).tolist() for n in (3, 40, 11, 1, 25)]
    sampling = Sampling(max_new_tokens=20)
    eager = generate_with(model, tokenizer, CPU, prompts, sampling, 8)
    decoder = Decoder(build_copy(model, torch.float32, CPU), CPU)
    calls = []
    real = decoder.fused.__call__
    decoder.fused = lambda slot: (calls.append(1), real(slot))
    fast = generate_with(model, tokenizer, CPU, prompts, sampling, 8, decoder=decoder)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert len(calls) == max(len(a.token_ids) + a.stopped for a in fast) - 1  # every step after the prefill
    assert len({tuple(a.token_ids) for a in eager}) == len(prompts)


def test_refresh_writes_into_the_fused_stacks_in_place(tiny_model_dir):
    model = _model(tiny_model_dir, ("q_proj", "v_proj", "up_proj"))
    copy = build_copy(model, torch.float32, CPU)
    group = copy.fused_step.layers[0].qkv
    address, before = group.weight.data_ptr(), group.lora_b.clone()
    lora = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        lora.lora_B["default"].weight.mul_(3)
    refresh(copy, model)
    assert group.weight.data_ptr() == address
    rows = lora.lora_B["default"].weight.shape[0]
    assert torch.allclose(group.lora_b[:rows, :4], 3 * before[:rows, :4])  # q's block, scale folded in
    assert torch.equal(group.lora_b[:rows, 4:], before[:rows, 4:])  # v's block untouched, k's rows zero
    assert not group.lora_b[rows:rows + 32].any()
    assert copy.model.layers[0].self_attn.q_proj.weight.data_ptr() == address


def test_an_architecture_without_a_written_step_decodes_through_transformers_and_says_so(tmp_path, one_thread):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=2, pad_token_id=2)
    model = Qwen3ForCausalLM(cfg).eval()
    decoder = Decoder(build_copy(model, torch.float32, CPU), CPU)
    assert decoder.step_kind == "transformers"
    assert decoder.notes == ["decoding step: transformers' forward (a step is written for llama, qwen2, mistral "
                             "models only, not qwen3)"]
    ids = torch.randint(5, 300, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    fast = decoder.run(ids, valid, Sampling(max_new_tokens=6), [-1], 2)
    model.generation_config.eos_token_id = None  # no stop token: six tokens each, as the fast run above
    with torch.no_grad():
        eager = model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=6, do_sample=False,
                               pad_token_id=2)
    assert torch.equal(fast, eager[:, 6:])


def test_transformers_step_is_kept_when_asked_for(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LORA_CLI_TRANSFORMERS_STEP", "1")
    decoder = Decoder(build_copy(_model(tiny_model_dir, ("q_proj",)), torch.float32, CPU), CPU)
    assert decoder.step_kind == "transformers"
    assert decoder.notes == ["decoding step: transformers' forward (LORA_CLI_TRANSFORMERS_STEP=1 is set)"]


def test_a_model_with_sliding_window_layers_keeps_transformers_step(one_thread):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1, eos_token_id=2, pad_token_id=2)
    decoder = Decoder(build_copy(Qwen2ForCausalLM(cfg).eval(), torch.float32, CPU), CPU)
    assert decoder.step_kind == "transformers"
    assert decoder.notes == ["decoding step: transformers' forward (the model has sliding-window attention layers)"]
