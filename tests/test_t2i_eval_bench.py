"""The text-to-image next-token GPT in ``var-eval sample`` (a prompts file plays the classes) and in the one
``var-bench`` table (Infinity and the bundled text-to-image GPT as setups, with their own columns)."""
import json

import numpy as np
import pytest

from var.cli.eval import main as eval_main
from var.errors import ConfigError, PromptError


def test_var_eval_sample_text_to_image_gpt_with_a_prompts_file(tmp_path):
    """The bundled text-to-image GPT with any next-token sampler: image i answers prompt i % P, the record names
    the prompts and the bundle's weights."""
    (tmp_path / "p.txt").write_text("a pink star\na teal square with horizontal stripes\n")
    rc = eval_main(["sample", "--sampler", "sjd", "--prompts-file", str(tmp_path / "p.txt"), "--per-class", "2",
                    "--shard-size", "2", "--out", str(tmp_path / "eval"), "--device", "cpu", "--cfg-scale", "2"])
    assert rc == 0
    assert len(list((tmp_path / "eval" / "images").glob("*.png"))) == 4
    assert np.load(tmp_path / "eval" / "images.npz")["arr_0"].shape[0] == 4
    record = json.loads((tmp_path / "eval" / "sampling.json").read_text())
    text = json.dumps(record)
    assert "a teal square with horizontal stripes" in text and "t2i_bundled" in text and '"sjd"' in text
    assert "cfg_scale" in text


def test_var_eval_sample_text_to_image_bad_input(tmp_path):
    (tmp_path / "p.txt").write_text("a pink star\n\na red ring\n")
    with pytest.raises(PromptError, match="p.txt:2: empty line"):
        eval_main(["sample", "--sampler", "next_token", "--prompts-file", str(tmp_path / "p.txt"),
                   "--out", str(tmp_path / "e"), "--device", "cpu"])
    (tmp_path / "q.txt").write_text("a pink star\n")
    with pytest.raises(ConfigError, match="not a next-token sampler|prompts"):
        eval_main(["sample", "--sampler", "next_scale", "--prompts-file", str(tmp_path / "q.txt"),
                   "--out", str(tmp_path / "e2"), "--device", "cpu"])
