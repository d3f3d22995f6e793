"""The architecture boundary (engine/arch.py), on tiny random models built offline.

Each supported family is accepted and its declared pieces (rotary function, K/V parts) give
the keys and values the layer itself computes; any other model type gets one line naming
the supported families, from the Python API and from the CLI (exit status 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from typer.testing import CliRunner

from earlyexit.engine import LayerEngine
from earlyexit.engine.arch import FAMILIES, SUPPORTED, Architecture, family_of
from earlyexit.errors import EarlyExitError
from earlyexit.models.load import LoadedModel

SIZES = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**SIZES),
    "mistral": MistralConfig(**SIZES),
    "qwen2": Qwen2Config(**SIZES),
    "qwen3": Qwen3Config(**SIZES),
    "gemma3": Gemma3TextConfig(
        **SIZES, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
}
UNSUPPORTED_MESSAGE = (
    "model type 'gpt2' is not supported: earlyexit runs the decoder-only families "
    "llama, gemma3, mistral, qwen2, qwen3"
)


def tiny(config: PretrainedConfig) -> LoadedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return LoadedModel(name=config.model_type, model=model, tokenizer=None, source="random")


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).eval()


def test_every_family_is_declared_once() -> None:
    assert [family.name for family in FAMILIES] == ["llama", "gemma3", "mistral", "qwen2", "qwen3"]
    assert set(SUPPORTED) == {"llama", "gemma3_text", "gemma3", "mistral", "qwen2", "qwen3"}
    assert {family_of(config).name for config in CONFIGS.values()} == set(CONFIGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_supported_family_is_accepted_and_copies_its_own_keys_values(name: str) -> None:
    engine = LayerEngine(tiny(CONFIGS[name]), kernels="plain")
    assert engine.arch.family.name == name
    module = type(engine.arch.layers[0].self_attn).__module__
    assert engine.arch.apply_rotary.__module__ == module  # the family's own rotary function
    # K/V copied from a state (rotary and key norm applied by arch's pieces) must be what the
    # layer itself computes from it, for both layer types where the family has two
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([0, 3])
    for layer in range(engine.num_layers):
        ran = engine.prefill(ids, pad, upto=layer)
        copied = engine.prefill(ids, pad, upto=layer)
        engine.run_layers(ran.hidden, ran.cache, layer, layer + 1)
        engine.copy_state_kv(copied.hidden, copied.cache, layer, layer + 1)
        for a, b in zip(ran.cache.layer_kv(layer), copied.cache.layer_kv(layer), strict=True):
            assert torch.equal(a, b)  # the same operations on the same inputs: bit-identical


def test_unsupported_model_type_gets_one_line() -> None:
    model = tiny_gpt2()
    for wrap in (
        lambda: Architecture.of(model),
        lambda: LayerEngine(LoadedModel("gpt2", model, None, "random"), kernels="plain"),
    ):
        with pytest.raises(EarlyExitError) as caught:
            wrap()
        assert str(caught.value) == UNSUPPORTED_MESSAGE


def test_unsupported_model_directory_fails_in_the_cli_with_one_line(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from earlyexit.cli import app

    vocab = {"[UNK]": 0, "hi": 1, "</s>": 2}
    words = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    directory = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    result = CliRunner().invoke(
        app, ["generate", "hi", "--model", str(directory), "--method", "full"]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # besides transformers' "Loading weights" progress bar (stderr), the error's one line
    lines = [line for line in result.output.splitlines() if not line.startswith("Loading weights")]
    assert [line for line in lines if line.strip()] == [f"error: {UNSUPPORTED_MESSAGE}"]
