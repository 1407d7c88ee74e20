"""Config validation: every mistake is one line naming the key; the resolved config round-trips."""
import subprocess
import sys

import pytest
import yaml

from quantbench.config import dump_config, load_config, parse_config
from quantbench.errors import ConfigError
from quantbench.quant.recipes import PRESETS


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
