"""Batched generation (``generate_batch``) checked against transformers' own ``generate``.

The model is a tiny random Llama in float64 with untied, larger-than-usual weights, so that its
greedy continuations vary (a default-initialised one repeats a single token) and a padded batch
cannot flip a near tie that an unpadded run would break the other way. It knows only the
tokenizer's first 2048 tokens, which keeps the tests fast; the prompts are token ids among them
(rendering chats into prompts is tested with ``tunesmith infer``).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunesmith import decoding
from tunesmith.decoding import draw
from tunesmith.engine import enable_activation_checkpointing
from tunesmith.errors import ConfigError
from tunesmith.generation import GenerationOptions, generate_batch, stream_reply

VOCABULARY = 2048
GREEDY = GenerationOptions(max_new_tokens=10)
SAMPLED = GenerationOptions(max_new_tokens=10, temperature=0.8, top_k=200, top_p=0.9, repetition_penalty=1.3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small are multiplied twenty times faster by one thread than by a crowd."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def toy_model(tokenizer) -> LlamaForCausalLM:
    """The same float64 model every time it is built, whatever the global RNG's state."""
    config = LlamaConfig(
        vocab_size=VOCABULARY,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return toy_model(tokenizer)


#: three prompts of different lengths, so that the batch pads them differently
PROMPTS = [[1, 300, 1200], [1, *range(700, 1900, 150)], [5, 17, 1999, 640, 2000]]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    assert max(tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) < VOCABULARY
    return PROMPTS


def transformers_ids(model, tokenizer, prompt: list[int], options: GenerationOptions, seed: int | None = None, eos=None) -> list[int]:
    """One prompt, unpadded, through transformers' generate; sampled from the global RNG seeded with ``seed``."""
    input_ids = torch.tensor([prompt])
    sampling = {"do_sample": False} if options.greedy else {
        "do_sample": True, "temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
    }
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=options.max_new_tokens,
            repetition_penalty=options.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id, **sampling,
        )
    return output[0, len(prompt) :].tolist()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_batch_equals_transformers_per_prompt_unpadded(model, tokenizer, prompts):
    completions = generate_batch(model, tokenizer, prompts, GREEDY, num_return_sequences=2)
    expected = [transformers_ids(model, tokenizer, prompt, GREEDY) for prompt in prompts]
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2]
    assert [c.token_ids for c in completions] == [ids for ids in expected for _ in range(2)]
    assert len({tuple(ids) for ids in expected}) == len(prompts), "the model must continue each prompt differently"
    for completion in completions:
        assert completion.finish_reason == "length"
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_sampling_equals_transformers_drawing_the_same_numbers(model, tokenizer, prompts, monkeypatch):
    # transformers draws with torch.multinomial, tunesmith with decoding.draw (tested on its own
    # below); here transformers draws as tunesmith does, from the global generator. A fresh CPU
    # generator and the freshly seeded global one yield the same stream, so the same tokens mean
    # that temperature, top-k, top-p and the repetition penalty shaped the same distribution.
    monkeypatch.setattr(torch, "multinomial", lambda probabilities, num_samples: draw(probabilities, None)[:, None])
    for prompt in prompts:
        ours = generate_batch(model, tokenizer, [prompt], SAMPLED, generator=seeded(5))[0].token_ids
        assert ours == transformers_ids(model, tokenizer, prompt, SAMPLED, seed=5)


@pytest.mark.parametrize("widest", [torch.float64, torch.float32], ids=["float64", "float32 (a device without float64)"])
def test_draw_picks_each_index_with_its_probability_and_never_one_of_probability_zero(widest, monkeypatch):
    asked = []
    monkeypatch.setattr(decoding, "widest_float", lambda device: asked.append(device) or widest)
    probabilities = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float32)
    draws = 200_000
    drawn = draw(probabilities.repeat(draws, 1), seeded(0)).view(draws, 2)
    counts = torch.stack([torch.bincount(drawn[:, row], minlength=5) for row in range(2)]).double()
    tolerance = 5 * (0.25 / draws) ** 0.5  # five standard deviations at worst (p = 0.5)
    assert torch.allclose(counts / draws, probabilities.double(), atol=tolerance)
    assert counts[0, 1] == counts[0, 4] == 0 and counts[1, 4] == draws
    assert torch.equal(draw(probabilities.repeat(draws, 1), seeded(0)).view(draws, 2), drawn)
    assert asked == [torch.device("cpu")] * 2


def test_seeded_sampling_is_reproducible_varied_and_leaves_the_global_rng_alone(model, tokenizer, prompts):
    global_state = torch.get_rng_state()
    first = generate_batch(model, tokenizer, prompts, SAMPLED, num_return_sequences=3, generator=seeded(1))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert generate_batch(model, tokenizer, prompts, SAMPLED, num_return_sequences=3, generator=seeded(1)) == first
    assert generate_batch(model, tokenizer, prompts, SAMPLED, num_return_sequences=3, generator=seeded(2)) != first
    for index in range(len(prompts)):
        siblings = {tuple(c.token_ids) for c in first if c.prompt_index == index}
        assert len(siblings) == 3, f"prompt {index}: its completions must differ from each other"

    # Without a generator, options.seed seeds a fresh one: the same seed, the same completions.
    with_seed = GenerationOptions(**{**SAMPLED.__dict__, "seed": 1})
    assert generate_batch(model, tokenizer, prompts, with_seed) == generate_batch(model, tokenizer, prompts, with_seed)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_per_prompt_options_and_generators_sample_each_prompt_as_it_would_alone(model, tokenizer, prompts):
    """What a server batching unrelated requests relies on: each prompt's own options, length and
    generator, unaffected by its batch; every token's logprob under the unfiltered distribution."""
    from tunesmith.decoding import decode, generation_mode

    options = [GREEDY, SAMPLED, GenerationOptions(max_new_tokens=4, temperature=1.5, top_p=0.5)]
    special = {"pad_token_id": tokenizer.pad_token_id, "stop_token_ids": [tokenizer.eos_token_id]}
    with generation_mode(model):
        *_, together = decode(model, prompts, options, generator=[seeded(index) for index in range(3)], **special)
        for index, prompt in enumerate(prompts):
            *_, alone = decode(model, [prompt], options[index], generator=seeded(index), **special)
            assert together[index].token_ids == alone[0].token_ids
            assert together[index].logprobs == pytest.approx(alone[0].logprobs)
    assert [len(row.token_ids) for row in together] == [10, 10, 4]
    first_logprobs = model(torch.tensor([prompts[1]])).logits[0, -1].double().log_softmax(-1)
    assert together[1].logprobs[0] == pytest.approx(first_logprobs[together[1].token_ids[0]].item())


def test_rows_that_join_and_leave_a_running_batch_decode_as_they_would_alone(model, tokenizer, prompts):
    """What continuous batching relies on: a prompt added while others run (its cache padded on
    the left to theirs, or theirs to its), and rows dropped when they end, change no other row."""
    from tunesmith.decoding import DecodeBatch, decode, generation_mode

    options = [GREEDY, SAMPLED, GenerationOptions(max_new_tokens=6, temperature=1.5, top_p=0.5)]
    special = {"pad_token_id": tokenizer.pad_token_id, "stop_token_ids": [tokenizer.eos_token_id]}
    # A short greedy prompt; a longer one with a repetition penalty; a shorter one, once the batch is wide.
    joins_at_step = {0: [0], 2: [1], 5: [2]}
    with generation_mode(model):
        alone = [
            list(decode(model, [prompt], options[i], generator=seeded(i), num_return_sequences=2, **special))[-1]
            for i, prompt in enumerate(prompts)
        ]
        batch = DecodeBatch(model, **special)
        running, step = {}, 0
        while step in joins_at_step or batch.rows:
            for i in joins_at_step.get(step, []):
                running[i] = batch.add([prompts[i]], [options[i]], [seeded(i)], [2])
            batch.step()
            step += 1
            for i in [i for i, rows in running.items() if all(row.finish_reason for row in rows)]:
                rows = running.pop(i)
                assert [row.token_ids for row in rows] == [row.token_ids for row in alone[i]], f"prompt {i}"
                for row, row_alone in zip(rows, alone[i]):
                    assert row.logprobs == pytest.approx(row_alone.logprobs)
                batch.drop(rows)
    assert not running and step == 12


def test_stop_strings_and_stop_tokens_end_their_rows_only(model, tokenizer, prompts):
    greedy = [transformers_ids(model, tokenizer, prompt, GREEDY) for prompt in prompts]
    full_text = tokenizer.decode(greedy[0], skip_special_tokens=True)
    stop = tokenizer.decode(greedy[0][3:5])
    assert stop.strip() and stop not in tokenizer.decode(greedy[1]) + tokenizer.decode(greedy[2])

    completions = generate_batch(model, tokenizer, prompts, GREEDY, stop_strings=[stop])
    assert completions[0].finish_reason == "stop"
    assert completions[0].text == full_text[: full_text.index(stop)]
    assert completions[0].token_ids == greedy[0][:5], "the tokens end with the one completing the stop string"
    # The other rows go on beside the finished one (fed padding, masked) exactly as alone.
    assert [(c.token_ids, c.finish_reason) for c in completions[1:]] == [(greedy[1], "length"), (greedy[2], "length")]

    # A stop token ends its row and is kept, as transformers keeps its eos.
    stop_token = greedy[1][2]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_token]
    try:
        completions = generate_batch(model, tokenizer, prompts, GREEDY)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    expected = greedy[1][: greedy[1].index(stop_token) + 1]
    assert completions[1].token_ids == expected == transformers_ids(model, tokenizer, prompts[1], GREEDY, eos=[stop_token])
    assert completions[1].finish_reason == "stop"


def test_model_is_put_in_generation_mode_and_restored_even_after_an_error(model, tokenizer, prompts):
    enable_activation_checkpointing(model)
    model.train()
    model.model.layers[0].eval()  # a frozen part left in eval mode stays so
    model.config.use_cache = False
    seen = []

    def record(module, args, kwargs):
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in module.modules())
        seen.append((module.training, checkpointing, module.config.use_cache, torch.is_grad_enabled()))

    def check_restored():
        assert model.training and not model.model.layers[0].training and model.model.layers[1].training
        assert model.model.layers[0].gradient_checkpointing and model.model.layers[1].gradient_checkpointing
        assert model.config.use_cache is False

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_batch(model, tokenizer, prompts[:1], GenerationOptions(max_new_tokens=3))
        assert seen == [(False, False, True, False)] * 3
        check_restored()

        def fail(done: bool) -> bool:
            raise RuntimeError("collective failed")

        with pytest.raises(RuntimeError, match="collective failed"):
            generate_batch(model, tokenizer, prompts[:1], GenerationOptions(max_new_tokens=3), all_finished=fail)
        check_restored()

    finally:
        hook.remove()
        model.activation_checkpointing_disable()
        model.config.use_cache = True
        model.eval()


def test_a_stream_closed_early_restores_the_model(tiny_model_dir, tokenizer):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).train()
    stream = stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], GenerationOptions(max_new_tokens=50))
    next(stream)
    assert not model.training
    stream.close()
    assert model.training


def test_a_peft_lora_model_generates_like_transformers(model, tokenizer, prompts):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        adapted = get_peft_model(model, config)
    try:
        adapted.train()
        completions = generate_batch(adapted, tokenizer, prompts, GREEDY)
        assert adapted.training
        adapted.eval()
        expected = [transformers_ids(adapted, tokenizer, prompt, GREEDY) for prompt in prompts]
        assert [c.token_ids for c in completions] == expected
    finally:
        adapted.unload()
    assert [c.token_ids for c in generate_batch(model, tokenizer, prompts, GREEDY)] != expected, "the adapter changed nothing"


def test_all_finished_keeps_a_finished_process_stepping_until_every_process_is_done(model, tokenizer, prompts):
    greedy = [transformers_ids(model, tokenizer, prompt, GREEDY) for prompt in prompts]
    stop_strings = [tokenizer.decode(ids[2:4]) for ids in greedy]
    options = GenerationOptions(max_new_tokens=10)
    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        alone = generate_batch(model, tokenizer, prompts, options, stop_strings=stop_strings)
        alone_forwards = len(forwards)
        forwards.clear()
        answers = []

        def all_finished(done: bool) -> bool:  # as if another process needed two more steps
            answers.append(done)
            return answers.count(True) == 3

        together = generate_batch(model, tokenizer, prompts, options, stop_strings=stop_strings, all_finished=all_finished)
    finally:
        hook.remove()
    assert all(c.finish_reason == "stop" for c in alone) and max(len(c.token_ids) for c in alone) < 8
    assert together == alone
    assert len(forwards) == alone_forwards + 2
    assert answers[-3:] == [True, True, True] and not any(answers[:-3])


def test_bad_arguments_say_what_is_wrong(model, tokenizer, prompts):
    with pytest.raises(ConfigError, match="prompt 1 has no tokens"):
        generate_batch(model, tokenizer, [prompts[0], []], GREEDY)
    with pytest.raises(ConfigError, match="stop strings '###': expected a list"):
        generate_batch(model, tokenizer, prompts, GREEDY, stop_strings="###")
    with pytest.raises(ConfigError, match="num_return_sequences 0"):
        generate_batch(model, tokenizer, prompts, GREEDY, num_return_sequences=0)
    with pytest.raises(ConfigError, match="needs at least one prompt"):
        generate_batch(model, tokenizer, [], GREEDY, all_finished=lambda done: True)
    assert generate_batch(model, tokenizer, [], GREEDY) == []
    with torch.device("meta"):
        elsewhere = LlamaForCausalLM(model.config)
    with pytest.raises(ConfigError, match=r"the generator is on cpu but the model is on meta; make it there: torch.Generator\(device='meta'\)"):
        generate_batch(elsewhere, tokenizer, prompts, SAMPLED, generator=seeded(0))
