"""Layer kinds of an architecture description: what the budget, the FLOPs model and the config checks ask of it."""
from ssmcompress import architecture


def test_a_description_without_layer_kinds_is_a_pure_ssm():
    # records written before hybrids were supported describe pure Mamba models and have no `layers`
    info = dict(n_layer=4)
    assert architecture.kinds(info) == "MMMM" and architecture.ffn(info) == "----"
    assert architecture.ssm_layers(info) == [0, 1, 2, 3] and architecture.attention_layers(info) == []
    assert architecture.uniform(info) and not architecture.is_hybrid(info)


def test_hybrid_layers_are_read_by_kind():
    info = dict(n_layer=6, layers="MM*P-E", ffn="GGGG--")
    assert architecture.ssm_layers(info) == [0, 1, 3]
    assert architecture.attention_layers(info) == [2, 3]
    assert architecture.is_hybrid(info) and not architecture.uniform(info)
    assert architecture.describe(info) == ("6 layers: 2 SSM, 1 attention, 1 SSM + attention, 1 MLP, "
                                           "1 mixture of experts")


def test_a_pure_ssm_with_mixed_feed_forward_blocks_is_not_uniform():
    assert not architecture.uniform(dict(n_layer=3, layers="MMM", ffn="GEG"))
    assert architecture.uniform(dict(n_layer=3, layers="MMM", ffn="GGG"))


def test_layer_names_read_as_english():
    assert architecture.layer_name("*") == "an attention layer"
    assert architecture.layer_name("E") == "a mixture of experts layer"
    assert architecture.layer_name("M") == "an SSM layer"
