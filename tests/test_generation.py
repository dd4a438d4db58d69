"""Generation with token reduction (ssmcompress.generation): mamba-ssm's decoding from the states a reduced prefill
cached, on both generations, on the CPU reference kernels."""
import pytest
import torch
from mamba_ssm.utils.generation import InferenceParams

from conftest import compose_config, tiny_model
from ssmcompress import generation, reduction
from ssmcompress.hosts import mamba_ssm

GENERATIONS = (2, 1)


def reducer_for(model, *overrides):
    cfg = compose_config(["model.random_init=true", *overrides])
    return reduction.from_config(model, cfg, mamba_ssm.model_info(model))


def greedy_by_full_forwards(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("gen", GENERATIONS)
def test_dense_generation_equals_greedy_full_forwards(gen, single_thread):
    model = tiny_model(gen, n_layer=4)
    ids = torch.randint(1, 4000, (2, 37))
    assert torch.equal(generation.generate(model, ids, 5), greedy_by_full_forwards(model, ids, 5))


@pytest.mark.parametrize("gen", GENERATIONS)
def test_no_reduction_layer_generates_what_dense_generates(gen, single_thread):
    model = tiny_model(gen, n_layer=4)
    ids = torch.randint(1, 4000, (3, 41))
    control = reducer_for(model, "method=ours", "ratio=0.3", "layers=[]")
    assert torch.equal(generation.generate(model, ids, 6, reducer=control), generation.generate(model, ids, 6))


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("method", ["ours", "evit", "tome"])
def test_each_layer_caches_the_states_of_the_tokens_it_saw(gen, method, single_thread):
    """After a reduced prefill, every layer's cached conv and SSM states equal that layer run alone on the
    (shortened) sequence it received; the last prompt position is kept, so decoding starts from its logits."""
    model = tiny_model(gen, n_layer=4)
    reducer = reducer_for(model, f"method={method}", "ratio=0.3", "layers=[1,2]")
    ids = torch.randint(1, 4000, (2, 40))
    seen, cache = {}, InferenceParams(max_seqlen=41, max_batch_size=2)
    hooks = [block.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, args), with_kwargs=True)
             for i, block in enumerate(model.backbone.layers)]
    with torch.no_grad(), reducer.prefilling():
        logits = model(ids, inference_params=cache, num_last_tokens=1).logits
    for hook in hooks:
        hook.remove()
    assert seen[3][0].shape[1] < 40  # later blocks saw fewer tokens
    for i, block in enumerate(model.backbone.layers):
        alone = InferenceParams(max_seqlen=41, max_batch_size=2)
        hidden, residual = seen[i]
        with torch.no_grad():
            block(hidden, residual, inference_params=alone)
        for cached, fresh in zip(cache.key_value_memory_dict[i], alone.key_value_memory_dict[i]):
            assert torch.equal(cached, fresh), f"layer {i}"
    last = torch.zeros(ids.shape, dtype=torch.bool)
    last[:, -1] = True
    traced = reducer(ids, protect=last)  # the same reduction as a scored forward protecting the last position
    assert (traced.positions.gather(1, traced.counts[:, None] - 1) == 39).all()
    assert torch.allclose(logits[:, -1], traced.logits[torch.arange(2), traced.counts - 1], atol=1e-5)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_a_prompt_generates_the_same_tokens_alone_and_in_a_batch_of_other_lengths(gen, single_thread):
    model = tiny_model(gen, n_layer=4)
    reducer = reducer_for(model, "method=ours", "ratio=0.3", "layers=[1,2]")
    prompts = [torch.randint(1, 4000, (n,)).tolist() for n in (30, 45, 30, 38)]
    together = generation.generate_each(model, prompts, 5, reducer=reducer, batch_size=4)
    alone = [generation.generate_each(model, [p], 5, reducer=reducer)[0] for p in prompts]
    assert together == alone and all(len(t) == 5 for t in together)


def test_sampling_is_mamba_ssms(single_thread):
    model = tiny_model(2, n_layer=2)
    ids = torch.randint(1, 4000, (2, 20))
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(generation.generate(model, ids, 4, sampling=generation.Sampling(top_k=0, top_p=0.9,
                                                                                        temperature=1.5)))
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (2, 24)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.generate(model, ids, 0)


def test_prompts_that_keep_different_counts_are_refused(single_thread):
    model = tiny_model(2, n_layer=4)
    reducer = reducer_for(model, "method=ours", "ratio=0.3", "layers=[1,2]")
    with pytest.raises(ValueError, match="empty"):
        generation.generate_each(model, [[5, 6], []], 2, reducer=reducer)
