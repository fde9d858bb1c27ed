"""scripts/benchmark_keras_hub.py without keras-hub: one `error:` line saying how to install it, status 2."""

from __future__ import annotations

import sys

from scripts_loader import load_script

from t5gemma2_jax import cli


def test_without_keras_hub_it_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_BACKEND", "jax")          # the script sets it when unset; keep ours as it was
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` fails, installed or not
    bench = load_script("benchmark_keras_hub")
    out = tmp_path / "r.jsonl"
    status = cli.run(lambda: bench.main(["--preset", "tiny", "--encoder-length", "16", "--decoder-length", "8",
                                         "--json", str(out)]))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("error: keras-hub is not installed") and "pip install -c constraints.txt keras-hub==0.32.0 keras" in err
    assert "not the project's" in err and not out.exists()
