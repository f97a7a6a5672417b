"""The fast decoding path (static cache, plain merged copy) answers exactly as eager `generate` does."""

import pytest
import torch

from lora_cli.infer.decode import Decoder, build_decoder
from lora_cli.infer.generation import Sampling, generate_with
from lora_cli.infer.plain_copy import build_copy, refresh


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _lora_model(folder, seed: int = 0):
    """The tiny model with a LoRA whose B is not zero, so merging it changes every answer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    return _lora_model(tiny_model_dir)


def _prompts(vocab: int, lengths=(3, 40, 11, 1, 25, 7), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _both(model, tokenizer, prompts, sampling, batch_size=8):
    eager = generate_with(model, tokenizer, torch.device("cpu"), prompts, sampling, batch_size)
    decoder = Decoder(build_copy(model, torch.float32, torch.device("cpu")), torch.device("cpu"))
    assert decoder.step_kind == "fused"  # the answers below come from the step written for the architecture
    fast = generate_with(model, tokenizer, torch.device("cpu"), prompts, sampling, batch_size, decoder=decoder)
    return eager, fast


def test_greedy_answers_of_a_mixed_length_batch_equal_eager_token_for_token(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))
    eager, fast = _both(peft_model, tokenizer, prompts, Sampling(max_new_tokens=24))
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert all(len(a.token_ids) == 24 for a in eager)
    assert len({tuple(a.token_ids) for a in eager}) == len(prompts)  # the rows really differ


def test_rows_stop_at_their_own_eos_at_different_steps_as_eager(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))
    free, _ = _both(peft_model, tokenizer, prompts, Sampling(max_new_tokens=24))
    # a stop token each row reaches at a different step: the tokens at steps 2, 9 and 15 of three rows
    extra = [free[0].token_ids[2], free[1].token_ids[9], free[2].token_ids[15]]
    peft_model.generation_config.eos_token_id = [tokenizer.eos_token_id, *extra]
    try:
        eager, fast = _both(peft_model, tokenizer, prompts, Sampling(max_new_tokens=24))
    finally:
        peft_model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert [a.stopped for a in fast] == [a.stopped for a in eager]
    assert len({len(a.token_ids) for a in eager if a.stopped}) >= 2  # eos came at different steps


def test_the_token_cap_and_batching_are_respected_as_eager(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer), lengths=(5, 30, 2, 17, 9))
    eager, fast = _both(peft_model, tokenizer, prompts, Sampling(max_new_tokens=5), batch_size=2)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert all(len(a.token_ids) == 5 and not a.stopped for a in fast)


def test_seeded_sampling_equals_eager_draw_for_draw(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))
    sampling = Sampling(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    eager, fast = _both(peft_model, tokenizer, prompts, sampling, batch_size=3)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    greedy = generate_with(peft_model, tokenizer, torch.device("cpu"), prompts, Sampling(max_new_tokens=16))
    assert [a.token_ids for a in fast] != [a.token_ids for a in greedy]


def test_repetition_options_equal_eager(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))
    sampling = Sampling(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)
    eager, fast = _both(peft_model, tokenizer, prompts, sampling)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]


def test_the_copy_merges_the_adapter_and_follows_it_when_refreshed_or_switched_off(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))[:3]
    copy = build_copy(peft_model, torch.float32, torch.device("cpu"))
    decoder = Decoder(copy, torch.device("cpu"))
    cpu, sampling = torch.device("cpu"), Sampling(max_new_tokens=12)
    with peft_model.disable_adapter():
        base = generate_with(peft_model, tokenizer, cpu, prompts, sampling)
        refresh(copy, peft_model)
        fast_base = generate_with(peft_model, tokenizer, cpu, prompts, sampling, decoder=decoder)
    assert [a.token_ids for a in fast_base] == [a.token_ids for a in base]
    refresh(copy, peft_model)
    fast = generate_with(peft_model, tokenizer, cpu, prompts, sampling, decoder=decoder)
    assert [a.token_ids for a in fast] != [a.token_ids for a in base]


def test_per_prompt_caps_cut_each_answer_at_its_own_cap(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))[:4]
    decoder, reason = build_decoder(peft_model, torch.device("cpu"), torch.float32)
    assert reason is None
    caps = [3, 10, 1, 7]
    answers = generate_with(peft_model, tokenizer, torch.device("cpu"), prompts, Sampling(max_new_tokens=10),
                            decoder=decoder, caps=caps)
    full = generate_with(peft_model, tokenizer, torch.device("cpu"), prompts, Sampling(max_new_tokens=10))
    assert [a.token_ids for a in answers] == [a.token_ids[:c] for a, c in zip(full, caps)]


def test_the_training_probe_answers_on_the_fast_path_as_eagerly(tmp_path_factory, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    import json

    from helpers import tiny_config
    from helpers.adapter_factory import data_dir, peaked_model_dir

    from lora_cli.train.recipe import train

    model_dir = peaked_model_dir(tmp_path_factory, tiny_model_dir)
    train_f, val_f = data_dir(tmp_path_factory)

    def probe_rows(name):
        cfg = tiny_config(model_dir, train_f, val_f, tmp_path / name, epochs=2, lr=2e-2, max_tokens=256,
                          eval_generate=4).replace({"model.quantization": "none"})
        result = train(cfg)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if r["type"] == "eval"]
        return result, [(r["stopped"], r["sample"], r["max_new_tokens"]) for r in evals], evals

    fast, fast_rows, evals = probe_rows("fast")
    monkeypatch.setenv("LORA_CLI_EAGER_GENERATE", "1")
    eager, eager_rows, _ = probe_rows("eager")
    assert fast_rows == eager_rows and len(fast_rows) == 3
    assert fast.summary.eval_losses == eager.summary.eval_losses
    assert evals[0]["generate_warmup_s"] > 0 and all(r["generate_warmup_s"] == 0 for r in evals[1:])
    assert 0 < fast.summary.probe_seconds <= fast.summary.seconds


def test_a_model_the_copy_cannot_hold_is_said_and_decoded_eagerly(tiny_model_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    decoder, reason = build_decoder(dora, torch.device("cpu"), torch.float32)
    assert decoder is None and "DoRA" in reason
    monkeypatch.setenv("LORA_CLI_EAGER_GENERATE", "1")
    assert build_decoder(model, torch.device("cpu"), torch.float32) == (None, "LORA_CLI_EAGER_GENERATE=1 is set")


def test_the_thread_count_that_decoded_faster_is_kept_and_fewer_threads_win_a_tie():
    from lora_cli.infer.cpu_decode import faster_threads

    assert faster_threads({2: [0.40, 0.42], 1: [0.07, 0.08]}) == 1  # a shared machine: one thread
    assert faster_threads({2: [0.04, 0.05], 1: [0.07, 0.08]}) == 2  # an idle one: both
    assert faster_threads({2: [0.05], 1: [0.05]}) == 1


def test_cpu_decoding_tries_two_thread_counts_keeps_one_and_restores_the_process_count(peft_model, tokenizer):
    prompts = _prompts(len(tokenizer))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eager, fast = _both(peft_model, tokenizer, prompts, Sampling(max_new_tokens=12))
        decoder = Decoder(build_copy(peft_model, torch.float32, torch.device("cpu")), torch.device("cpu"))
        again = [generate_with(peft_model, tokenizer, torch.device("cpu"), prompts, Sampling(max_new_tokens=12),
                               decoder=decoder) for _ in range(2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert decoder.cpu_threads in (1, 2)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert all([a.token_ids for a in run] == [a.token_ids for a in eager] for run in again)


def test_a_probe_answer_is_capped_at_one_and_a_half_times_its_reference_within_bounds():
    from lora_cli.train.probe import answer_cap

    assert answer_cap(265, 512) == 399  # 1.5 x (265 + eos)
    assert answer_cap(2, 512) == 16  # short answers keep room to stop
    assert answer_cap(400, 512) == 512  # never past --max-length


@pytest.mark.parametrize("pack_tokens", [256, 30])
def test_the_cpu_prefill_without_padding_fills_each_row_as_the_padded_batch_does(peft_model, tokenizer, monkeypatch,
                                                                                 pack_tokens):
    import lora_cli.infer.cpu_decode as cpu_decode
    import lora_cli.infer.decode as decode

    monkeypatch.setattr(cpu_decode, "PACK_TOKENS", pack_tokens)  # 30: several packs, the 40-token prompt alone
    from lora_cli.infer.generation import _left_padded

    ids, mask = _left_padded(_prompts(len(tokenizer)), tokenizer.pad_token_id, torch.device("cpu"))
    valid = mask.bool()
    decoder = Decoder(build_copy(peft_model, torch.float32, torch.device("cpu")), torch.device("cpu"))

    def prefill():
        slot = decoder._slot(ids.shape[0], decode.cache_length(ids.shape[1], 8))
        with torch.no_grad():
            logits = decoder._prefill(slot, ids, valid)
        keys = [layer.keys[:, :, :ids.shape[1]][valid[:, None, :].expand_as(layer.keys[:, :, :ids.shape[1], 0])]
                for layer in slot.cache.layers]
        return logits, keys, int(slot.cache.layers[0].cumulative_length)

    unpadded = prefill()
    decoder.unpadded_prefill = False
    padded = prefill()
    assert torch.allclose(unpadded[0], padded[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(unpadded[1], padded[1]))
    assert unpadded[2] == padded[2] == ids.shape[1]


def _extra_stops(model, tokenizer, answers):
    """Stop tokens three rows reach at different steps (their tokens at steps 2, 9 and 15), beside eos."""
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, answers[0].token_ids[2], answers[1].token_ids[9],
                                            answers[2].token_ids[15]]


def test_finished_rows_leave_the_cpu_batch_and_every_answer_stays_that_of_eager(peft_model, tokenizer):
    cpu, sampling = torch.device("cpu"), Sampling(max_new_tokens=24)
    prompts = _prompts(len(tokenizer))
    _extra_stops(peft_model, tokenizer, generate_with(peft_model, tokenizer, cpu, prompts, sampling))
    try:
        eager = generate_with(peft_model, tokenizer, cpu, prompts, sampling)
        decoder = Decoder(build_copy(peft_model, torch.float32, cpu), cpu)
        fast = generate_with(peft_model, tokenizer, cpu, prompts, sampling, decoder=decoder)
    finally:
        peft_model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert [a.stopped for a in fast] == [a.stopped for a in eager]
    # each row was decoded up to its own stop token, then left the batch
    assert decoder.row_steps == sum(len(a.token_ids) + a.stopped for a in fast)
    assert decoder.row_steps < len(prompts) * max(len(a.token_ids) + a.stopped for a in fast)


def test_sampled_rows_that_stop_early_keep_drawing_as_eager(peft_model, tokenizer):
    cpu = torch.device("cpu")
    sampling = Sampling(max_new_tokens=20, temperature=0.9, top_k=50, seed=3)
    prompts = _prompts(len(tokenizer))
    _extra_stops(peft_model, tokenizer, generate_with(peft_model, tokenizer, cpu, prompts, sampling))
    try:
        eager, fast = _both(peft_model, tokenizer, prompts, sampling)
    finally:
        peft_model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert sum(a.stopped for a in eager) >= 2


def test_cpu_attention_sees_only_the_filled_cache_and_answers_as_over_the_whole_cache(peft_model, tokenizer,
                                                                                      monkeypatch):
    import lora_cli.infer.cpu_decode as cpu_decode
    from lora_cli.infer.fused_step import FusedStep

    cpu, sampling = torch.device("cpu"), Sampling(max_new_tokens=12)
    prompts = _prompts(len(tokenizer))  # the longest has 40 tokens: a cache of 64
    copy = build_copy(peft_model, torch.float32, cpu)
    seen, real = [], FusedStep.attended

    def attended(slot):
        seen.append(real(slot))  # the number of cache positions this step attends to
        return seen[-1]

    monkeypatch.setattr(FusedStep, "attended", staticmethod(attended))
    filled = generate_with(peft_model, tokenizer, cpu, prompts, sampling, decoder=Decoder(copy, cpu))
    assert min(seen) == 41 and max(seen) == 40 + 11  # the prompt and the tokens fed so far, never all 64
    seen.clear()
    monkeypatch.setattr(cpu_decode, "attend_filled_only", lambda cache: False)
    whole = generate_with(peft_model, tokenizer, cpu, prompts, sampling, decoder=Decoder(copy, cpu))
    assert [a.token_ids for a in filled] == [a.token_ids for a in whole]
    assert set(seen) == {64}


def test_prompts_are_packed_in_order_up_to_the_token_budget_a_longer_one_alone():
    from lora_cli.infer.cpu_decode import packs

    assert packs([3, 40, 11, 1, 25, 7], 30) == [[0], [1], [2, 3], [4], [5]]
    assert packs([3, 40, 11], 256) == [[0, 1, 2]]


def test_a_bf16_cpu_copy_keeps_the_lora_b_side_in_fp32_and_adds_the_adapter(peft_model):
    copy = build_copy(peft_model, torch.bfloat16, torch.device("cpu"))
    name = next(n for n, m in copy.named_modules() if hasattr(m, "lora_B"))
    mine, theirs = copy.get_submodule(name), peft_model.get_base_model().get_submodule(name)
    assert mine.lora_B.dtype == torch.float32 and mine.weight.dtype == torch.bfloat16
    x = torch.randn(3, 5, mine.in_features)
    with torch.no_grad():
        want, base = theirs(x), theirs.get_base_layer()(x)
        got = mine(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() < 0.1 * (want - base).abs().max()  # within bf16 rounding of the adapter's delta


def test_the_probe_says_once_when_its_decoding_step_is_transformers_forward(tiny_model_dir, tmp_path_factory, tmp_path,
                                                                            monkeypatch):
    from helpers import RecordingReporter, tiny_config
    from helpers.adapter_factory import data_dir

    from lora_cli.train.recipe import train

    train_f, val_f = data_dir(tmp_path_factory)
    monkeypatch.setenv("LORA_CLI_TRANSFORMERS_STEP", "1")
    reporter = RecordingReporter()
    train(tiny_config(tiny_model_dir, train_f, val_f, tmp_path / "out", epochs=2, max_tokens=256, eval_generate=2)
          .replace({"model.quantization": "none"}), reporter=reporter)
    said = [m for m in reporter.messages if m.startswith("The stop-rate probe: ")]
    assert said == ["The stop-rate probe: decoding step: transformers' forward (LORA_CLI_TRANSFORMERS_STEP=1 is set)."]
