"""``dilaserve generate`` as people and scripts call it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dilaserve.cli import main
from dilaserve.generation.reference import GenerationConfig, generate


def test_json_lines_in_request_order(llada_dir, llada, capsys):
    rc = main(["generate", "--model", str(llada_dir), "--prompt-ids", "5,6,7", "--prompt-ids", "9,10",
               "--gen-length", "16", "--block-length", "8", "--threshold", "0.7", "--cache", "dual", "--json"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt_ids"] for r in lines] == [[5, 6, 7], [9, 10]]
    expected = generate(llada, [9, 10], GenerationConfig(gen_length=16, block_length=8, threshold=0.7, cache="dual"))
    assert lines[1]["canvas_ids"] == expected.canvas_ids and lines[1]["nfe"] == expected.nfe
    assert {"canvas_ids", "token_ids", "text", "nfe"} <= set(lines[0])


def test_text_prompt_uses_chat_template(llada_dir, capsys):
    assert main(["generate", "--model", str(llada_dir), "--prompt", "What is 2+2?", "--gen-length", "8",
                 "--block-length", "8", "--steps", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["prompt_ids"]) > len("What is 2+2?")  # template tokens were added


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir", "--prompt-ids", "1"], "does not exist"),
        (["--prompt-ids", "1", "--gen-length", "30", "--block-length", "8"], "not divisible by block_length"),
        (["--prompt-ids", "1", "--gen-length", "32", "--block-length", "8", "--steps", "6"], "number of blocks"),
        (["--prompt-ids", "1,99999"], "outside the vocabulary"),
        (["--prompt-ids", "1", "--threshold", "-0.1"], "threshold must be in"),
        ([], "at least one --prompt"),
    ],
)
def test_bad_input_exits_nonzero_with_message(llada_dir, capsys, args, message):
    if "--model" not in args:
        args = ["--model", str(llada_dir), *args]
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err


def test_non_dilaserve_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "not a supported diffusion LM" in capsys.readouterr().err


def test_console_script_runs(llada_dir):
    out = subprocess.run(
        [sys.executable, "-m", "dilaserve.cli", "generate", "--model", str(llada_dir), "--prompt-ids", "3,4",
         "--gen-length", "8", "--block-length", "8", "--steps", "2", "--json"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout)["nfe"] == 2
