"""Edge cases of the command line: every bad flag or OUT is one line naming it and exit 2, never a traceback or
a silent overwrite; `inspect | head` ends quietly; generate's summary names the hit rate as such."""

import json
import subprocess
import sys

import pytest
import torch

from omnilab.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("flags, named", [
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--temperature", "0"], "--temperature"),
    (["--device", "gpu0"], "--device"),
])
def test_generate_refuses_bad_flags_in_one_line(capsys, tiny_moe, flags, named):
    code, out, err = run(capsys, "generate", str(tiny_moe), "--input-ids", "1,2,3", *flags)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and named in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build or machine without CUDA")
def test_generate_on_cuda_without_cuda_is_one_line(capsys, tiny_moe):
    code, _, err = run(capsys, "generate", str(tiny_moe), "--input-ids", "1,2,3", "--device", "cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device cuda" in err and "CUDA" in err


def test_stop_ids_errors_name_stop_ids(capsys, tiny_moe):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_moe), "--input-ids", "1,2,3", "--stop-ids", "a,b"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--stop-ids" in err.splitlines()[-1] and "--input-ids takes" not in err


def test_stop_ids_none_generates_to_max_new_tokens(capsys, tiny_moe):
    code, out, err = run(capsys, "generate", str(tiny_moe), "--input-ids", "1,2,3", "--stop-ids", "none",
                         "--max-new-tokens", "3", "--greedy", "--json")
    report = json.loads(out)
    assert code == 0 and len(report["new_token_ids"]) == 3 and report["stopped"] is False


def test_generate_summary_names_the_hit_rate(capsys, tiny_moe):
    """Under a budget (the eager engine with its expert cache) the summary gives the hit rate; with every expert
    resident it names the engine and says every expert is resident."""
    import omnilab as ol

    budget = str(ol.load(tiny_moe).cache.store.expert_bytes * 8)
    code, _, err = run(capsys, "generate", str(tiny_moe), "--input-ids", "1,2,3", "--max-new-tokens", "2", "--greedy",
                       "--expert-budget", budget)
    summary = err.strip().splitlines()[-1]
    assert code == 0 and "hit rate " in summary and summary.index("hit rate") < summary.index("hits")
    assert "[engine eager (cpu-resident: the expert budget" in err
    code, _, err = run(capsys, "generate", str(tiny_moe), "--input-ids", "1,2,3", "--max-new-tokens", "2", "--greedy")
    assert code == 0 and "[engine cpu-resident]" in err and "every expert resident" in err.strip().splitlines()[-1]


def test_extract_refuses_a_foreign_non_empty_folder(capsys, tiny_moe, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "model.safetensors.index.json").write_text("{}")
    code, _, err = run(capsys, "extract", str(tiny_moe), str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(out) in err and "manifest.json" in err
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors.index.json"]


def test_extract_into_a_file_is_one_line(capsys, tiny_moe, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    code, _, err = run(capsys, "extract", str(tiny_moe), str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Errno" not in err and "not a folder" in err
    assert out.read_text() == "x"


def test_extract_resumes_into_its_own_extraction(capsys, tiny_moe, tmp_path):
    out = tmp_path / "ex"
    assert run(capsys, "extract", str(tiny_moe), str(out), "--json")[0] == 0
    code, stdout, _ = run(capsys, "extract", str(tiny_moe), str(out), "--json")
    assert code == 0 and json.loads(stdout)["written"] == 0


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_inspect_into_a_closed_pipe_ends_quietly(tiny_moe, json_flag):
    """`omnilab inspect PATH | head`: the reader is gone before the first write."""
    proc = subprocess.Popen([sys.executable, "-m", "omnilab", "inspect", str(tiny_moe), *json_flag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err
