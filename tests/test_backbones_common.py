"""The backbone registry as the CLI shows it (`didi backbones`), and `import didi` staying light.

The helpers the backbone-adapter tests share (synthetic fine-tunes, an independent τ̃) are in helpers.py.
"""

from __future__ import annotations

import json

from didi.backbones import ADAPTERS
from didi.cli import main


def test_backbones_command_lists_every_builtin_adapter(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("state_dict", "open_clip", "hf_clip", "hf_llama"):
        assert rows[name]["class"].endswith(ADAPTERS[name].__name__)
    opts = {o["name"]: o for o in rows["hf_llama"]["options"]}
    assert opts["embeddings"]["default"] == "low_rank" and "nonmatrix_policy" in opts
    assert {o["name"] for o in rows["open_clip"]["options"]} >= {"model_name", "model_config", "include"}
    assert main(["backbones"]) == 0
    table = capsys.readouterr().out
    assert "open_clip" in table and "--backbone.fuse_qkv" in table


def test_import_didi_stays_light():
    import subprocess
    import sys

    # registering the built-in adapters imports neither open_clip nor transformers (lightning, imported by the
    # pipeline, may import transformers itself, so only didi.backbones is checked for it)
    code = (
        "import sys, didi.backbones; print(sorted({'open_clip', 'transformers'} & set(sys.modules)));"
        "import didi.cli; print('open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]
