"""``exclude`` on real ``transformers`` models with tied weights: GPT-2, BERT and T5 from small configs with
random weights (no download). Their output layers share the word embeddings, and ``named_parameters()``
lists each shared tensor under its first name only; a glob on any of its names excludes it alike whether
the model or its ``named_parameters()`` is passed (wrapped models: ``test_silent_noops.py``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradclip_algo import apply_gradient_clipping

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]' installs it)"
)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=8,
        intermediate_size=16,
        vocab_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertForMaskedLM(config)


def t5() -> nn.Module:
    config = transformers.T5Config(
        num_layers=1, num_decoder_layers=1, num_heads=2, d_model=8, d_kv=4, d_ff=16, vocab_size=32
    )
    return transformers.T5ForConditionalGeneration(config)


# the model, a glob on its output layer's names, and the first name of the tied word embeddings
MODELS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "gpt2": (gpt2, "lm_head.*", "transformer.wte.weight"),
    "bert": (bert, "cls.*", "bert.embeddings.word_embeddings.weight"),
    "t5": (t5, "lm_head.*", "shared.weight"),
}
FORMS = ("module", "named_parameters()")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", MODELS)
def test_a_glob_on_the_output_layer_excludes_the_tied_embeddings(name: str, form: str) -> None:
    make, glob, tied = MODELS[name]
    torch.manual_seed(0)
    model = make()
    params = dict(model.named_parameters())
    assert any(p is params[tied] for n, p in model.named_parameters(remove_duplicate=False) if n != tied)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    parameters = model if form == "module" else model.named_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the glob matches a name, so nothing warns
        apply_gradient_clipping(parameters, "norm", 1e-3, exclude=[glob])
    assert torch.equal(params[tied].grad, torch.ones_like(params[tied]))  # excluded: untouched
    clipped = [p.grad for n, p in params.items() if n != tied and not n.startswith(glob[:-1])]
    assert clipped and all(grad.abs().max() < 1 for grad in clipped)
