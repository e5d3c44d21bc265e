"""The coreinfer command: every option documented with its default, clear errors, a quiet main path (slow)."""

import argparse
import json
import subprocess
import sys

import pytest

from coreinfer.runtime.cli import HelpFormatter, build_parser, main

CLI = [sys.executable, "-m", "coreinfer.runtime.cli"]


def _subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    subs = _subcommands(build_parser())
    assert {"generate", "bench", "export"} <= set(subs)
    checked = 0
    for name, parser in subs.items():
        if not parser.add_help:  # eval, lm-eval, pipeline hand their arguments to their own parsers
            continue
        assert parser.formatter_class is HelpFormatter, name
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), label
            if action.option_strings:
                if action.default is None:
                    assert "default" in action.help, f"{label}: a None default must say what it does"
                else:
                    assert f"(default: {action.default})" in text, label
            checked += 1
    assert checked > 30


def test_generate_has_top_k_and_passes_it_on():
    args = build_parser().parse_args(["generate", "hi", "--top-k", "7", "--sample", "--no-chat"])
    assert args.top_k == 7 and args.sample and args.chat is False
    assert build_parser().parse_args(["generate", "hi"]).chat is None  # None: the chat template when there is one


def test_bad_input_is_a_clear_error():
    proc = subprocess.run(CLI + ["generate", "hi", "--beta", "1.5"], capture_output=True, text=True)
    assert proc.returncode == 2 and "beta must be in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def test_export_to_a_non_empty_folder_writes_nothing(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export", "a prompt", str(tmp_path)]) == 2  # refused before any model loads
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_main_path_is_quiet_and_answers():
    """The README's call, with FutureWarnings as errors: an answer on stdout, no bars or warnings on stderr."""
    gen = subprocess.run(CLI + ["generate", "Capital of Peru?", "--max-new-tokens", "12", "--method", "dense"],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    text, _, summary = gen.stdout.partition("\n\n[")
    assert "Peru" in gen.stdout and text.strip()
    assert "Loading" not in gen.stderr and "Warning" not in gen.stderr and gen.stderr.strip().startswith("[dense")
    gen = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-m", "coreinfer.runtime.cli", "generate",
                          "Hello, my name is", "--json", "--max-new-tokens", "6", "--beta", "0.5", "--no-chat"],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    assert out["stats"]["method_used"] == "stability" and len(out["token_ids"]) <= 6 and gen.stderr == ""


@pytest.mark.slow
def test_bench_json():
    bench = subprocess.run(CLI + ["bench", "--json", "--new-tokens", "8", "--repeats", "1", "--beta", "0.4"],
                           capture_output=True, text=True, check=True)
    result = json.loads(bench.stdout)
    assert [r["method"] for r in result["rows"]] == ["dense", "stability"]
    assert result["rows"][1]["ffn_bytes_ratio_vs_dense"] < 1


def test_export_command_writes_a_loadable_sparse_model(tokenizer, tmp_path, capsys):
    import torch

    from coreinfer.runtime.export import intermediate_sizes, load_sparse_model
    from tests.conftest import tiny_lm

    lm, reference = tiny_lm("llama", tokenizer)
    reference.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompt = "Paris is the capital of France and"
    assert main(["export", prompt, str(tmp_path / "out"), "--model", str(tmp_path / "model"), "--beta", "0.5",
                 "--layers", "1:3", "--no-chat"]) == 0
    assert "2 sparse layers (1..2) with [64] FFN neurons of 128" in capsys.readouterr().out
    assert intermediate_sizes(tmp_path / "out") == {1: 64, 2: 64}
    expected = lm.sparse_model(prompt, beta=0.5, layers="1:3")  # the same core sets from the same weights
    ids = lm.encode(prompt)
    with torch.no_grad():
        assert torch.equal(load_sparse_model(tmp_path / "out", dtype=torch.float32)(input_ids=ids).logits,
                           expected(input_ids=ids).logits)
