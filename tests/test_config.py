"""Config validation: every mistake is one line naming the key; the resolved config round-trips."""
import subprocess
import sys

import pytest
import yaml

from quantbench.core.errors import ConfigError
from quantbench.quant.recipes import PRESETS
from quantbench.run.config import dump_config, load_config, parse_config, read_yaml_mapping


@pytest.mark.parametrize("data, key, words", [
    ({"modle": "default"}, "modle", "unknown key"),
    ({"eval": {"seq_len": "long"}}, "eval.seq_len", "integer"),
    ({"eval": {"seq_len": 4}}, "eval.seq_len", "greater than or equal"),
    ({"eval": {"seq_len": 64, "stride": 128}}, "eval", "stride"),
    ({"recipes": ["w9a9"]}, "recipes", "unknown preset 'w9a9'"),
    ({"recipes": [{"name": "x", "weights": {"bits": 4, "granularity": "group"}}]}, "recipes", "group_size"),
    ({"recipes": [{"name": "x", "activations": {"granularity": "token", "dynamic": False}}]}, "recipes", "static"),
    ({"recipes": [{"name": "x", "weights": {"bits": 1}}]}, "weights.bits", "greater than or equal"),
    ({"recipes": ["fp", "fp"]}, "<root>", "unique"),
    ({"recipes": [{"name": "kvt", "kv": {"bits": 8, "granularity": "tensor"}}]}, "recipes[0] (kvt)",
     "kv granularity 'tensor' is not supported"),
    ({"recipes": []}, "recipes", "non-empty"),
])
def test_config_errors_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    msg = str(e.value)
    assert "\n" not in msg
    assert key in msg and words in msg


def test_presets_and_overrides_resolve():
    cfg = parse_config({"recipes": ["fp", {"preset": "w4a16-g64", "name": "w4-g32", "weights": {
        "bits": 4, "granularity": "group", "group_size": 32}}]})
    assert cfg.recipes[0] == PRESETS["fp"]
    assert cfg.recipes[1].weights.group_size == 32 and cfg.recipes[1].name == "w4-g32"


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config({"recipes": ["fp", "w8a8-token", "w4a16-g64"], "seed": 3})
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg and again.fingerprint() == cfg.fingerprint()


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipes: [fp\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_cli_prints_one_line_without_traceback(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model: default\nevall: {seq_len: 64}\n")
    proc = subprocess.run([sys.executable, "-m", "quantbench.cli", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: config: evall: unknown key"


@pytest.mark.parametrize("text, key, lines", [
    ("model: default\nseed: 1\neval:\n  seq_len: 64\nrecipes: [fp]\n\n\n\neval:\n  seq_len: 32\n",
     "eval", "lines 3 and 9"),
    ("eval:\n  seq_len: 64\n  stride: 32\n  seq_len: 128\n", "seq_len", "lines 2 and 4"),
    ("recipes:\n- name: a\n  weights: {bits: 4, bits: 8}\n", "bits", "both on line 3"),
    ("recipes:\n- name: a\n  mitigations:\n  - {name: smoothquant, options: {alpha: 0.5}}\n"
     "  - name: clip\n    options:\n      ratio: 1\n      ratio: 2\n", "ratio", "lines 7 and 8"),
])
def test_duplicate_yaml_key_at_any_depth_is_an_error(tmp_path, text, key, lines):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    assert yaml.safe_load(text)  # plain YAML keeps the last value silently
    with pytest.raises(ConfigError) as e:
        read_yaml_mapping(p)
    assert str(e.value) == f"config {p}: key '{key}' appears twice ({lines})"


def test_merge_keys_and_equal_keys_in_separate_mappings_are_not_duplicates(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("base: &b {bits: 4, symmetric: true}\nw: {<<: *b, bits: 8}\n"
                 "recipes:\n- {name: a, weights: {bits: 4}}\n- {name: b, weights: {bits: 8}}\n")
    data = read_yaml_mapping(p)
    assert data["w"] == {"bits": 8, "symmetric": True}
    assert [r["weights"]["bits"] for r in data["recipes"]] == [4, 8]


def test_cli_refuses_a_config_with_a_duplicate_key(tmp_path, capsys):
    from reliability_common import assert_error, cli

    p = tmp_path / "dup.yaml"
    p.write_text("model: default\nrecipes: [fp]\nseed: 1\nseed: 2\nnot_a_key: 0\n")  # never a run, even if undetected
    assert_error(cli(capsys, "run", "-c", p, "--out", tmp_path / "out"),
                 f"config {p}: key 'seed' appears twice (lines 3 and 4)")
    assert not (tmp_path / "out").exists()
