"""Census on tiny random models with planted outliers: it must find exactly what was planted."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from quantbench.census import run_census, write_census
from quantbench.census.analysis import token_class
from quantbench.core.errors import UnsupportedArchitecture
from quantbench.run.config import CensusConfig

DELIM = 10  # token id the test tokenizer decodes to a newline
P = 5  # planted non-initial outlier position


class TableTokenizer:
    def decode(self, ids: list[int]) -> str:
        return {DELIM: "\n", 11: " the", 12: "."}.get(ids[0], f"w{ids[0]}")


def _set_input(channel: int, value: float, positions: tuple[int, ...]):
    """Forward pre-hook writing `value` into input channel `channel` at `positions` (a planted
    down-projection input outlier, as produced by a massive gate/up activation)."""
    def hook(_m, args):
        x = args[0].clone()
        x[:, list(positions), channel] = value
        return (x,)
    return hook


def _ids(n: int = 4, t: int = 32, first: int | None = None) -> torch.Tensor:
    ids = torch.randint(13, 128, (n, t), generator=torch.Generator().manual_seed(0))
    ids[:, P] = DELIM
    if first is not None:
        ids[:, 0] = first
    return ids


def _standouts(census: dict) -> set[tuple]:
    return {(i, m, kind, j) for i, layer in enumerate(census["weights"]["layers"]) for m, w in layer.items()
            for kind in ("rows", "cols") for j in w[kind]}


@pytest.fixture(scope="module")
def planted_llama() -> dict:
    """Layer 1's down_proj writes residual dim 7 at positions 0 and P (input channel 20, weight
    W[7, 20]); layer 3's down_proj cancels it (channel 30, W[7, 30] < 0); q_proj column 9 of layer 0
    is scaled up 40x."""
    m = tiny_model("llama", layers=4, attn_implementation="sdpa")
    blocks = m.model.layers
    with torch.no_grad():
        blocks[1].mlp.down_proj.weight[7, 20] = 5.0
        blocks[3].mlp.down_proj.weight[7, 30] = -5.0
        blocks[0].self_attn.q_proj.weight[:, 9] *= 40
    blocks[1].mlp.down_proj.register_forward_pre_hook(_set_input(20, 1000.0, (0, P)))
    blocks[3].mlp.down_proj.register_forward_pre_hook(_set_input(30, 1000.0, (0, P)))
    return run_census(m, _ids(), TableTokenizer(), CensusConfig(), batch_size=2)


def test_activation_outliers_found_exactly(planted_llama):
    c = planted_llama
    assert c["summary"]["outlier_dims"] == [7]
    assert c["summary"]["outlier_layers"] == [1, 2]
    assert {(t["seq"], t["pos"]) for t in c["token_classes"]["tokens"]} == {(s, p) for s in range(4) for p in (0, P)}
    top = c["layers"][1]
    assert (top["dim"], top["pos"]) in {(7, 0), (7, P)} and top["max_abs"] == pytest.approx(5000, rel=0.01)
    assert top["ratio"] > 1e4 and top["kurtosis"] > 100
    down_in = [[d["dim"] for d in L["mlp.down_proj"]["outlier_dims"]] for L in c["linear_inputs"]]
    assert down_in == [[], [20], [], [30]]


def test_token_classes_and_lifecycle(planted_llama):
    c = planted_llama
    assert c["token_classes"]["shares"] == {"initial": 0.5, "delimiter": 0.5, "weak_semantic": 0.0, "other": 0.0}
    (life,) = c["lifecycle"]
    assert (life["dim"], life["emerges"], life["persists"], life["disappears"]) == (7, 1, [1, 2], 3)
    assert life["writer"]["module"] == "mlp" and life["writer"]["column"] == 20
    assert life["writer"]["column_share"] == pytest.approx(1.0, abs=0.01)
    assert life["canceller"]["module"] == "mlp" and life["canceller"]["column"] == 30 and life["canceller"]["cancels"]


def test_weight_outliers_and_linkage(planted_llama):
    c = planted_llama
    assert _standouts(c) == {(0, "self_attn.q_proj", "cols", 9), (1, "mlp.down_proj", "cols", 20),
                             (1, "mlp.down_proj", "rows", 7), (3, "mlp.down_proj", "cols", 30),
                             (3, "mlp.down_proj", "rows", 7)}
    lk = c["linkage"]
    assert lk["dims_writer_row_outlier"] == 1.0 and lk["writer_column_outlier"] == 1.0
    assert lk["down_input_outlier_channels"] == 2 and lk["down_input_channels_col_outlier"] == 1.0
    sinks = {(t["seq"], t["pos"]) for t in c["token_classes"]["tokens"]}
    assert 0.0 <= lk["outlier_positions_that_are_sinks"] <= 1.0 and lk["outlier_positions"] == len(sinks)
    assert c["prequantized"]["detected"] is False


def test_planted_sink_gpt2_and_conv1d_orientation():
    """GPT-2 (Conv1D weights stored [in, out]): head 2 of layer 0 attends to position 0 (token 1 has a
    large embedding dim 3 that head 2's keys read; its queries are a constant bias); layer 0's MLP
    writes residual dim 11 at position 0 through input channel 40."""
    m = tiny_model("gpt2", layers=2, attn_implementation="sdpa")
    h0 = m.transformer.h[0]
    with torch.no_grad():
        m.transformer.wte.weight[1, 3] = 10.0
        w, b = h0.attn.c_attn.weight, h0.attn.c_attn.bias  # [64, 192]: q | k | v, heads of 16
        w[:, 32], b[32] = 0.0, 5.0  # head 2 query coordinate 0: constant
        w[:, 96], b[96] = 0.0, 0.0
        w[3, 96] = 5.0  # head 2 key coordinate 0 reads embedding dim 3
        h0.mlp.c_proj.weight[40, 11] = 5.0  # [256, 64]: input 40 -> residual dim 11
    h0.mlp.c_proj.register_forward_pre_hook(_set_input(40, 1000.0, (0,)))
    c = run_census(m, _ids(first=1), TableTokenizer(), CensusConfig())
    assert [r["heads_first_sink_share"] for r in c["layers"]] == [0.25, 0.0]
    assert c["layers"][0]["first_token_mass_by_head"][2] > 0.95
    assert c["summary"]["outlier_dims"] == [11]
    assert c["token_classes"]["shares"]["initial"] == 1.0
    assert c["linkage"]["outlier_positions_that_are_sinks"] == 1.0
    assert c["linkage"]["sink_positions_that_are_outliers"] == 1.0
    (life,) = c["lifecycle"]
    assert (life["emerges"], life["disappears"], life["writer"]["column"]) == (0, None, 40)
    assert c["weights"]["layers"][0]["mlp.c_proj"]["rows"] == [11]
    assert c["weights"]["layers"][0]["mlp.c_proj"]["cols"] == [40]
    assert c["linkage"]["dims_writer_row_outlier"] == 1.0


def test_prequantized_weights_detected():
    m = tiny_model("llama")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.reshape(-1, 32)  # [out * in / 32, 32] blocks of 32 inputs
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
                scale = (hi - lo) / 15
                mod.weight.copy_((((w - lo) / scale).round() * scale + lo).reshape(mod.weight.shape))
    c = run_census(m, _ids(2, 16), None, CensusConfig())
    pq = c["prequantized"]
    assert pq["detected"] and pq["grid_bits"] == 4 and pq["share_of_linears"] == 1.0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "gpt_neox", "phi", "qwen2"])
def test_every_family_streams_and_cleans_up(kind, tmp_path):
    m = _family(kind)
    impl = m.config._attn_implementation
    ids = _ids(2, 16)
    c = run_census(m, ids, None, CensusConfig(), batch_size=1)
    c2 = run_census(m, ids, None, CensusConfig(), batch_size=2)
    assert len(c["layers"]) == 2 and all(len(r["first_token_mass_by_head"]) == 4 for r in c["layers"])
    assert all(len(L) >= 3 for L in c["linear_inputs"])
    for a, b in zip(c["layers"], c2["layers"]):  # streaming: batch split does not change results
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-4)
        assert a["first_token_mass_by_head"] == pytest.approx(b["first_token_mass_by_head"], rel=1e-4)
    assert not any(mod._forward_hooks for mod in m.modules())
    assert m.config._attn_implementation == impl
    if kind == "llama":
        paths = write_census(c, tmp_path)
        assert all(p.stat().st_size > 0 for p in paths) and len(paths) == 6


def test_hooks_removed_on_error():
    m = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(IndexError):
        run_census(m, torch.full((1, 8), 10_000), None, CensusConfig())
    assert not any(mod._forward_hooks for mod in m.modules())
    assert m.config._attn_implementation == "sdpa"


def test_unsupported_architecture_names_what_is_missing():
    class Odd(torch.nn.Module):
        """An LM without decoder layers: embedding -> head."""

        config = type("Cfg", (), {"model_type": "mamba", "vocab_size": 16})()

        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, **_):
            return type("Out", (), {"logits": self.head(self.embed(input_ids))})()

    with pytest.raises(UnsupportedArchitecture, match="mamba.*no decoder layer list") as e:
        run_census(Odd(), torch.randint(0, 16, (1, 8)))
    assert "\n" not in str(e.value)


def test_token_class_rules():
    assert token_class("anything", 0) == "initial"
    assert [token_class(t, 3) for t in ("\n", ".", " ,", " the", " of", " Paris")] == \
        ["delimiter", "delimiter", "delimiter", "weak_semantic", "weak_semantic", "other"]


def _family(kind: str) -> torch.nn.Module:
    """Tiny 2-layer models of the families conftest does not build."""
    import transformers as tf

    if kind in ("llama", "gpt2", "opt"):
        return tiny_model(kind, attn_implementation="sdpa")
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, num_key_value_heads=4)
    cfg, cls = {
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
        "phi": (tf.PhiConfig, tf.PhiForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }[kind]
    config = cfg(**common)
    config._attn_implementation = "sdpa"
    return cls(config).eval()
