"""Every supported family records: the neuron width is the MLP's inner size, and the stored
activations equal those the model computes (OPT flattens tokens before its MLP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import open_store
from engine.recorder import RecordConfig, record
from tests.test_record import full_activations
from tests.tiny import corpus_texts, make_tokenizer

CONFIGS = {
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1), 40),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1), 44),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=36, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16), 36),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0), 40),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=128), 128),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=52, num_hidden_layers=2, num_attention_heads=2,
                              word_embed_proj_dim=32, max_position_embeddings=128), 52),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2), 48),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=2, window_size=8,
                                     attention_types=[[["global", "local"], 1]],
                                     max_position_embeddings=128), 128),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=2, n_inner=56, n_positions=128), 56),
    "codegen": ("CodeGenConfig", dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=128,
                                      n_ctx=128), 128),
    "starcoder2": ("Starcoder2Config", dict(hidden_size=32, intermediate_size=60, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1), 60),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2), 128),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=2), 128),
    # Bloom with pretraining_tp > 1 and slow_but_exact never calls dense_4h_to_h.
    "bloom_tp": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=2, pretraining_tp=2,
                                     slow_but_exact=True), 128),
    "mpt": ("MptConfig", dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=128), 128),
    "nemotron": ("NemotronConfig", dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16), 44),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=36, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16), 36),
    "glm4": ("Glm4Config", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0), 40),
}

BLOCKS = {"opt": "decoder.layers", "gptj": "h", "gpt_neo": "h", "gpt_bigcode": "h", "codegen": "h",
          "falcon": "h", "bloom": "h", "bloom_tp": "h", "mpt": "blocks"}
"""Where each family keeps its blocks, when not in `layers`."""


def neuron_vector(family: str, block, x: torch.Tensor) -> torch.Tensor:
    """The MLP's inner activation recomputed from its input x, by the family's own formula
    (independent of the hook points the recorder uses)."""
    if family in ("mistral", "qwen2", "gemma", "gemma3_text"):
        m = block.mlp
        return m.act_fn(m.gate_proj(x)) * m.up_proj(x)
    if family in ("phi3", "glm4"):
        gate, up = block.mlp.gate_up_proj(x).chunk(2, dim=-1)
        return up * block.mlp.activation_fn(gate)
    if family == "opt":
        return block.activation_fn(block.fc1(x))
    if family == "phi":
        return block.mlp.activation_fn(block.mlp.fc1(x))
    if family in ("gptj", "codegen"):
        return block.mlp.act(block.mlp.fc_in(x))
    if family in ("gpt_neo", "gpt_bigcode", "starcoder2"):
        return block.mlp.act(block.mlp.c_fc(x))
    if family == "falcon":
        return block.mlp.act(block.mlp.dense_h_to_4h(x))
    if family in ("bloom", "bloom_tp"):
        return block.mlp.gelu_impl(block.mlp.dense_h_to_4h(x))
    if family == "mpt":
        return block.ffn.act(block.ffn.up_proj(x))
    if family == "nemotron":
        return block.mlp.act_fn(block.mlp.up_proj(x))
    raise ValueError(family)


FIRST_LINEAR = {"mistral": "mlp.gate_proj", "qwen2": "mlp.gate_proj", "gemma": "mlp.gate_proj",
                "gemma3_text": "mlp.gate_proj", "phi3": "mlp.gate_up_proj", "glm4": "mlp.gate_up_proj",
                "opt": "fc1", "phi": "mlp.fc1", "gptj": "mlp.fc_in", "codegen": "mlp.fc_in",
                "gpt_neo": "mlp.c_fc", "gpt_bigcode": "mlp.c_fc", "starcoder2": "mlp.c_fc",
                "falcon": "mlp.dense_h_to_4h", "bloom": "mlp.dense_h_to_4h",
                "bloom_tp": "mlp.dense_h_to_4h", "mpt": "ffn.up_proj", "nemotron": "mlp.up_proj"}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_records_what_the_model_computes(family, tmp_path, corpus_file):
    import transformers
    from transformers import AutoModelForCausalLM

    cls, kw, width = CONFIGS[family]
    tok = make_tokenizer(corpus_texts(40))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(vocab_size=len(tok), **kw))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = RecordConfig(model=str(tmp_path / "m"), corpus=str(corpus_file), out=str(tmp_path / "s"),
                       excerpt_len=12, top_k=3, random_k=4, batch_size=5, max_excerpts=25, progress=False)
    assert record(cfg, log=lambda *_: None).complete
    s = open_store(tmp_path / "s")
    assert s.n_neurons == [width, width]
    acts, _ = full_activations(tmp_path / "m", corpus_file, 25)
    assert acts[1].shape == (25, 12, width)
    for j in (0, width - 1):
        rec = s.neuron(1, j)
        emax = acts[1][:, :, j].max(axis=1)
        assert [r.excerpt_id for r in rec.most_positive_activation_records] == list(np.lexsort((np.arange(25), -emax))[:3])
        for r in rec.most_positive_activation_records + rec.random_sample:
            np.testing.assert_array_equal(np.float32(r.activations), acts[1][r.excerpt_id, :, j])

    # Independently: the recorded vector is the MLP's inner activation, recomputed from the input
    # of its first linear layer by the family's formula.
    block = model.base_model.get_submodule(BLOCKS.get(family, "layers"))[1]
    first = block.get_submodule(FIRST_LINEAR[family])
    seen = {}
    model.eval()  # as the recorder runs it (OPT has dropout)
    handle = first.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    ids = torch.tensor(np.asarray(s.token_ids).astype(np.int64))
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)
            want = neuron_vector(family, block, seen["x"]).reshape(25, 12, width).numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(acts[1], want, rtol=1e-4, atol=1e-5)
