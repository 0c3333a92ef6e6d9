"""A transformers model end to end, no download: random weights from a config, save_pretrained,
``qpack pack`` the folder, load it back packed into a fresh model, generate greedily. The
tokens must equal those of the dequantized model (``qpack.load`` + ``load_state_dict``)."""

import pytest
import torch

import qpack
import qpack.packed
from qpack.cli import main
from qpack.packed import PackedLinear, summary

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra: pip install -e '.[dev]'")


def _gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _generate(model, prompt):
    model.eval()
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("make,bits,kernel", [(_gpt2, "8", "dequantize"), (_llama, "8", "int8mm"), (_llama, "4", None)])
def test_generate_from_packed_weights(tmp_path, make, bits, kernel):
    torch.manual_seed(0)
    make().save_pretrained(tmp_path / "model")
    assert main(["pack", str(tmp_path / "model"), "-o", str(tmp_path / "model.qpk"), "-b", bits,
                 "-g", "channel", "-q"]) == 0
    torch.manual_seed(1)  # fresh models start from other random weights
    reference = make()
    reference.load_state_dict(qpack.load(tmp_path / "model.qpk"), strict=False)  # lm_head is tied
    packed = make()
    result = qpack.load_into(packed, tmp_path / "model.qpk", packed=True, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    kinds = summary(packed)
    kernel = kernel or ("fused" if qpack.packed.fused_rows() else "int4mm")
    assert kinds.get(kernel, 0) >= 4, kinds
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    prompt = torch.tensor([[5, 17, 42, 3]])
    want = _generate(reference, prompt)
    assert want.shape[1] == 16
    assert torch.equal(_generate(packed, prompt), want)
    state = packed.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(state[name], tensor), name
