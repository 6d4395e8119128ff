"""Hostile and broken input: crafted checkpoint folders, flags and output folders, each refused with one line
(exit 2 for bad input, 1 only for "problems found"), no traceback, nothing outside the folder read, no foreign
file changed. Built from the tiny checkpoints of tests/conftest.py; CLI calls in-process where possible."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from omnilab.checkpoint import Checkpoint, pack_header
from omnilab.cli import main
from omnilab.outdir import LOCK_NAME, TEMP_TAG, OutDir, FolderBusy

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    data = edit(data) or data
    path.write_text(json.dumps(data))


def text_config(data: dict) -> dict:
    return data["thinker_config"]["text_config"] if "thinker_config" in data else data


def index_of(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def write_shard(path: Path, header: dict, data_bytes: int) -> None:
    path.write_bytes(pack_header(header) + b"\0" * data_bytes)


def add_index_shard(folder: Path, tensor: str, shard: str) -> None:
    edit_json(index_of(folder), lambda d: d["weight_map"].__setitem__(tensor, shard))


# ------------------------------------------------------------------------------------------ code from a checkpoint


def test_auto_map_is_a_problem_and_its_code_never_runs(capsys, tiny_omni, copy_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_omni)
    marker = tmp_path / "ran"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    edit_json(path / "config.json", lambda d: d.__setitem__("auto_map", {"AutoConfig": "evil.EvilConfig"}))
    edit_json(path / "tokenizer_config.json",
              lambda d: d.__setitem__("auto_map", {"AutoTokenizer": ["evil.EvilTokenizer", None]}))
    code, out, err = run(capsys, "verify", path, "--json")
    report = json.loads(out)  # stdout is JSON: no prompt was printed into it
    assert code == 1 and "remote_code" in report["counts"], report["counts"]
    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["problems"]
    assert not marker.exists()


def test_verify_with_stdin_closed_never_prompts(tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    (path / "evil.py").write_text("raise SystemExit(99)\n")
    edit_json(path / "tokenizer_config.json",
              lambda d: d.__setitem__("auto_map", {"AutoTokenizer": ["evil.EvilTokenizer", None]}))
    r = subprocess.run([sys.executable, "-m", "omnilab", "verify", str(path)], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and "[y/N]" not in r.stdout + r.stderr and "remote_code" in r.stdout, r.stderr


def test_every_transformers_loader_refuses_remote_code():
    """Every from_pretrained call of the package and scripts passes trust_remote_code=False; model loaders
    (not tokenizers, processors or configs) pass use_kernels=False too."""
    calls = 0
    for file in list((REPO / "omnilab").rglob("*.py")) + list((REPO / "scripts").rglob("*.py")):
        text = file.read_text()
        for m in re.finditer(r"(\w+)\.from_pretrained\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            args = text[m.end():i]
            calls += 1
            assert "trust_remote_code=False" in args, f"{file}: {m.group(0)}{args}"
            loader = m.group(1)
            if not re.search(r"Tokenizer|Processor|FeatureExtractor|Config", loader):
                assert "use_kernels=False" in args, f"{file}: {m.group(0)}{args}"
    assert calls >= 5


# ------------------------------------------------------------------------------------------ files outside the folder


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_naming_a_file_outside_is_not_read(capsys, tiny_moe, copy_checkpoint, name):
    path = copy_checkpoint(tiny_moe)
    add_index_shard(path, "model.layers.0.extra.weight", name)
    ck = Checkpoint(path)
    assert ck.shard_info[name]["status"] == "unsafe" and ck.shard_info[name]["file_bytes"] == 0
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "unsafe_path" in out and "outside" in out


def test_symlinked_shard_out_of_the_folder(capsys, tiny_moe, copy_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_moe)
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(set(json.loads(index_of(path).read_text())["weight_map"].values()))[0]
    os.replace(path / shard, outside / shard)
    (path / shard).symlink_to(outside / shard)
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "unsafe_path" in out and "symlink" in out
    code, out, err = run(capsys, "generate", path, "--input-ids", "1,2", "--max-new-tokens", "1")
    one_line(err)
    assert code == 2
    code, out, err = run(capsys, "verify", path, "--follow-symlinks")  # the explicit flag
    assert code == 0, out


def test_symlink_inside_the_folder_is_fine(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    shard = sorted(set(json.loads(index_of(path).read_text())["weight_map"].values()))[0]
    (path / "blobs").mkdir()
    os.replace(path / shard, path / "blobs" / shard)
    (path / shard).symlink_to(Path("blobs") / shard)
    assert run(capsys, "verify", path)[0] == 0


def test_fifo_as_shard_does_not_hang(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    shard = sorted(set(json.loads(index_of(path).read_text())["weight_map"].values()))[0]
    (path / shard).unlink()
    os.mkfifo(path / shard)
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "not_a_file" in out


def test_fifo_as_config_is_refused(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    (path / "config.json").unlink()
    os.mkfifo(path / "config.json")
    code, out, err = run(capsys, "verify", path)
    assert code == 2
    one_line(err, "config.json", "not a regular file")


@pytest.mark.parametrize("extra", ["/dev/zero", "../../etc/passwd"])
def test_manifest_extras_outside_the_folder(capsys, tiny_moe, tmp_path, extra):
    out = tmp_path / "x"
    assert run(capsys, "extract", tiny_moe, out, "--json")[0] == 0
    edit_json(out / "manifest.json", lambda d: d["extras"].__setitem__(extra, {"bytes": 1, "sha256": "0"}))
    code, _, err = run(capsys, "verify", out)
    assert code == 2
    one_line(err, "manifest.json", extra)


def test_manifest_tensor_file_outside_the_folder(capsys, tiny_moe, tmp_path):
    out = tmp_path / "x"
    assert run(capsys, "extract", tiny_moe, out, "--json")[0] == 0
    edit_json(out / "manifest.json",
              lambda d: next(iter(d["tensors"].values())).__setitem__("file", "/etc/passwd"))
    code, _, err = run(capsys, "verify", out)
    assert code == 2
    one_line(err, "manifest.json", "outside")


# ------------------------------------------------------------------------------------------ headers and config


def _rewrite_first_shard(path: Path, edit) -> str:
    from collections import Counter

    from omnilab.checkpoint import read_header

    shard = Counter(json.loads(index_of(path).read_text())["weight_map"].values()).most_common(1)[0][0]
    header, start = read_header(path / shard)
    data = (path / shard).read_bytes()[start:]
    edit(header)
    (path / shard).write_bytes(pack_header(header) + data)
    return shard


def _overlap(header):
    names = [n for n in header if n != "__metadata__"]
    a, b = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]


def _unknown_dtype(header):
    name = next(n for n in header if n != "__metadata__")
    header[name]["dtype"] = "Q7"


def _negative_span(header):
    name = next(n for n in header if n != "__metadata__")
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]


def _float_shape(header):
    name = next(n for n in header if n != "__metadata__")
    header[name]["shape"] = [1.5]


def _bad_metadata(header):
    header["__metadata__"] = ["not", "an", "object"]


@pytest.mark.parametrize("edit", [_overlap, _unknown_dtype, _negative_span, _float_shape])
def test_broken_header_entries_are_problems_and_generate_refuses(capsys, tiny_moe, copy_checkpoint, edit):
    path = copy_checkpoint(tiny_moe)
    _rewrite_first_shard(path, edit)
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "bad_header" in out, out
    code, out, err = run(capsys, "generate", path, "--input-ids", "1,2", "--max-new-tokens", "1")
    assert code == 2
    one_line(err)


def test_metadata_not_an_object(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    _rewrite_first_shard(path, _bad_metadata)
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "__metadata__" in out


def test_header_length_past_the_file(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    shard = sorted(set(json.loads(index_of(path).read_text())["weight_map"].values()))[0]
    with open(path / shard, "r+b") as f:
        f.write((2**62).to_bytes(8, "little"))
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "bad_header" in out


@pytest.mark.parametrize("field, value, words", [
    ("num_experts_per_tok", 99, "num_experts_per_tok"),
    ("num_experts_per_tok", 0, "num_experts_per_tok"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("num_attention_heads", 0, "num_attention_heads"),
    ("hidden_size", "64", "hidden_size"),
])
def test_insane_config_values(capsys, tiny_moe, copy_checkpoint, field, value, words):
    path = copy_checkpoint(tiny_moe)
    edit_json(path / "config.json", lambda d: text_config(d).__setitem__(field, value))
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "config:" in out and words in out, out
    code, out, err = run(capsys, "generate", path, "--input-ids", "1,2", "--max-new-tokens", "1")
    assert code == 2
    one_line(err, "config.json", words)


@pytest.mark.parametrize("text", ["[1, 2, 3]", "{not json", '"a string"', "\xff\xfe"])
def test_config_not_an_object(capsys, tiny_moe, copy_checkpoint, text):
    path = copy_checkpoint(tiny_moe)
    (path / "config.json").write_bytes(text.encode("latin-1"))
    for verb in ("verify", "inspect"):
        code, _, err = run(capsys, verb, path)
        assert code == 2
        one_line(err, "config.json")


@pytest.mark.parametrize("index, words", [
    ({"weight_map": {}}, "empty"),
    ([1, 2], "not a JSON object"),
    ({"weight_map": {"a": 3}}, "shard file names"),
    ({"metadata": {}}, "weight_map"),
])
def test_broken_index(capsys, tiny_moe, copy_checkpoint, index, words):
    path = copy_checkpoint(tiny_moe)
    index_of(path).write_text(json.dumps(index))
    code, _, err = run(capsys, "verify", path)
    assert code == 2
    one_line(err, "model.safetensors.index.json", words)


def test_wrong_tokenizer_for_the_multimodal_ids(capsys, tiny_omni, copy_checkpoint):
    """A tokenizer whose ids contradict the config's multimodal token ids (a generic Qwen3 tokenizer beside a
    Qwen3-Omni checkpoint): verify and inspect name it."""
    path = copy_checkpoint(tiny_omni)
    tok = json.loads((path / "tokenizer.json").read_text())
    im_start = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_start|>")
    edit_json(path / "config.json", lambda d: d["thinker_config"].__setitem__("audio_token_id", im_start))
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and "special_tokens" in out and "audio_token_id" in out and "<|im_start|>" in out
    code, out, _ = run(capsys, "inspect", path, "--json")
    assert any(p["kind"] == "special_tokens" and "generate" not in p["breaks"] for p in json.loads(out)["problems"])


def test_problems_say_which_verbs_they_break(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    _rewrite_first_shard(path, _overlap)
    code, out, _ = run(capsys, "verify", path, "--json")
    assert all("generate" in p["breaks"] for p in json.loads(out)["problems"] if p["kind"] == "bad_header")


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("argv, words", [
    (["--expert-budget", "inf"], "inf"),
    (["--expert-budget", "nan"], "nan"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-5"], "--top-k"),
    (["--max-new-tokens", "-4"], "--max-new-tokens"),
    (["--seed", str(2**70)], "--seed"),
    (["--device", "meta"], "--device"),
    (["--input-ids", "1,x"], "--input-ids"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, tiny_moe, argv, words):
    with pytest.raises(SystemExit) if argv[0] in ("--expert-budget", "--seed", "--input-ids") else _noop():
        code, _, err = run(capsys, "generate", tiny_moe, "--input-ids", "1,2", *argv)
        assert code == 2
        one_line(err, words)
    if argv[0] in ("--expert-budget", "--seed", "--input-ids"):  # argparse's own refusal: exit 2, names the flag
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_invalid_utf8_prompt(capsys, tiny_moe):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_moe), "--prompt", bad])
    assert e.value.code == 2 and "UTF-8" in capsys.readouterr().err


def test_nonexistent_path_refused_before_heavy_imports():
    code = ("import sys, omnilab.cli as c; r = c.main(['generate', '/no/such/ckpt', '--prompt', 'hi']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; sys.exit(r)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "/no/such/ckpt: no such file or folder" in r.stderr, r.stderr


def test_prompt_past_the_position_limit(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    edit_json(path / "config.json", lambda d: text_config(d).__setitem__("max_position_embeddings", 8))
    code, _, err = run(capsys, "generate", path, "--input-ids", ",".join(["1"] * 10), "--max-new-tokens", "2")
    assert code == 2
    one_line(err, "max_position_embeddings")
    code, _, err = run(capsys, "compare", path, "--input-ids", ",".join(["1"] * 10))
    assert code == 2
    one_line(err, "max_position_embeddings")


def test_unexpected_errors_are_one_line_and_debug_shows_them(capsys, tiny_moe, monkeypatch):
    import omnilab.cli as cli

    def boom(args):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(cli, "cmd_inspect", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser(), "inspect", boom))
    code, _, err = run(capsys, "inspect", tiny_moe)
    assert code == 2
    one_line(err, "AttributeError", "--debug")
    with pytest.raises(AttributeError):
        main(["inspect", str(tiny_moe), "--debug"])


def _with(parser, verb, func):
    for action in parser._subparsers._group_actions:
        action.choices[verb].set_defaults(func=func)
    return parser


def test_help_shows_defaults_and_path(capsys):
    for verb in ("inspect", "verify", "generate", "compare", "extract", "trace"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        assert re.search(r"\n  path +\w", text), verb
        if verb in ("generate", "trace", "extract"):
            assert "(default:" in text or "default:" in text, verb
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 32)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the Python face


@pytest.fixture(scope="module")
def model(tiny_moe):
    from omnilab.model.decoder import SelectiveMoE

    return SelectiveMoE.from_checkpoint(tiny_moe)


@pytest.mark.parametrize("kw, words", [
    (dict(temperature=0, greedy=False), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(max_new_tokens=-4), "max_new_tokens"), (dict(temperature=math.inf), "temperature"),
    (dict(seed=2**64), "seed"),
])
def test_python_face_refuses_bad_sampling(model, kw, words):
    with pytest.raises(ValueError, match=words):
        model.generate([1, 2], **kw)


def test_python_face_refuses_pinned_out_of_range(tiny_moe):
    from omnilab.model.decoder import SelectiveMoE

    with pytest.raises(ValueError, match="pinned expert"):
        SelectiveMoE.from_checkpoint(tiny_moe, pinned=[(0, 999)])


def test_audio_past_the_limit_is_refused_before_reading(tmp_path):
    from omnilab.model.multimodal import read_wav

    wav = tmp_path / "long.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(16000 * 3, dtype=np.int16).tobytes())
    with pytest.raises(ValueError, match="at most 1 s"):
        read_wav(wav, max_seconds=1)
    assert read_wav(wav).shape == (16000 * 3,)


def test_documents_are_cut_before_tokenizing():
    from omnilab.trace.corpus import MAX_CHARS_PER_TOKEN, tokenize

    seen = []

    def tokenizer(texts):
        seen.extend(len(t) for t in texts)
        return {"input_ids": [list(range(len(t) % 50)) for t in texts]}

    ids = tokenize(tokenizer, ["x" * 20_000_000, "short"], 64, 320)
    assert max(seen) == 64 * MAX_CHARS_PER_TOKEN and len(ids[0]) <= 64


# ------------------------------------------------------------------------------------------ writers own their folder


def test_extract_refuses_a_foreign_folder_and_changes_nothing(capsys, tiny_moe, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "extract", tiny_moe, out)
    assert code == 2
    one_line(err, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_second_writer_gets_one_line(capsys, tiny_moe, tmp_path):
    out = tmp_path / "x"
    with OutDir(out):  # another writer holds the folder
        code, _, err = run(capsys, "extract", tiny_moe, out)
        assert code == 2
        one_line(err, "another omnilab process")
        with pytest.raises(FolderBusy):
            OutDir(out).acquire()


def test_disk_full_is_one_line_and_resumable(capsys, tiny_moe, tmp_path, monkeypatch):
    import omnilab.extraction.write as write

    out = tmp_path / "x"
    real, calls = os.pwrite, [0]

    def full(fd, data, at):
        calls[0] += 1
        if calls[0] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(write.os, "pwrite", full)
    code, _, err = run(capsys, "extract", tiny_moe, out, "--workers", "1", "--json")
    assert code == 2
    one_line(err, "No space left on device")
    assert "BufferError" not in err and not list(out.rglob(f"*{TEMP_TAG}*"))
    monkeypatch.setattr(write.os, "pwrite", real)
    code, outp, err = run(capsys, "extract", tiny_moe, out, "--json")
    assert code == 0 and json.loads(outp)["skipped"] > 0 and json.loads(outp)["complete"]
    assert run(capsys, "verify", out, "--source", tiny_moe)[0] == 0


def test_disk_full_in_a_real_process(tiny_moe, tmp_path):
    """RLIMIT_FSIZE: the kernel refuses writes past a size (EFBIG); one line, no traceback, resumable."""
    out = tmp_path / "x"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); from omnilab.cli import main; "
            f"sys.exit(main(['extract', {str(tiny_moe)!r}, {str(out)!r}, '--json']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, "File too large")
    r = subprocess.run([sys.executable, "-m", "omnilab", "extract", str(tiny_moe), str(out), "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["complete"], r.stderr


def test_two_concurrent_extracts(tiny_moe, tmp_path):
    out = tmp_path / "x"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "omnilab", "extract", str(tiny_moe), str(out), "--json", "--workers", "1",
           "--pause-after-file", "0.01"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in results) in ([0, 0], [0, 2]), results
    for c, err in results:
        if c == 2:
            one_line(err, "another omnilab process")
    from omnilab.extraction.verify import verify_extraction

    assert verify_extraction(out, source=tiny_moe) == []


def test_write_json_unique_temporary_and_no_leftover(tmp_path, monkeypatch):
    from omnilab import outdir
    from omnilab.jsonio import write_json

    target = tmp_path / "a.json"
    write_json(target, {"a": 1})
    (tmp_path / "a.json.tmp").write_text("someone's")  # the old fixed temporary name: never touched
    monkeypatch.setattr(outdir.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1} and (tmp_path / "a.json.tmp").read_text() == "someone's"
    assert not list(tmp_path.glob(f"*{TEMP_TAG}*"))


@pytest.mark.parametrize("files", [
    {"manifest.json": '{"theirs": 1}', "documents.parquet": "theirs"},
    {"x.tmp-123": "theirs"},
    {"plan.json": "[1, 2]"},
])
def test_trace_refuses_foreign_folders_and_changes_nothing(capsys, tiny_moe, tmp_path, files):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "one two three"}) + "\n")
    out = tmp_path / "t"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    code, _, err = run(capsys, "trace", tiny_moe, "--corpus", corpus, "--out", out)
    assert code == 2
    one_line(err, str(out))
    for name, text in files.items():
        assert (out / name).read_text() == text
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == sorted(files)


def test_trace_folder_held_by_another_writer(capsys, tiny_moe, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "one two three"}) + "\n")
    out = tmp_path / "t"
    with OutDir(out):
        code, _, err = run(capsys, "trace", tiny_moe, "--corpus", corpus, "--out", out)
    assert code == 2
    one_line(err, "another omnilab process")


def test_a_binary_jsonl_corpus_is_named(capsys, tiny_moe, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "one"}\n' + bytes(range(128, 256)) * 4)
    code, _, err = run(capsys, "trace", tiny_moe, "--corpus", corpus, "--out", tmp_path / "t")
    assert code == 2
    one_line(err, str(corpus), "not UTF-8")


def test_a_damaged_shard_of_our_own_trace_is_written_again_on_resume(capsys, tiny_moe, tmp_path):
    """A 5-byte shard left in a trace's own folder is not trusted because it exists: the resumed run rewrites it,
    and the finished trace reads back whole."""
    import pyarrow.parquet as pq

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} one two three four"}) + "\n" for i in range(4)))
    out = tmp_path / "t"
    assert run(capsys, "trace", tiny_moe, "--corpus", corpus, "--out", out, "--json")[0] == 0
    shards = sorted((out / "shards").glob("*.parquet"))
    rows = [pq.read_metadata(s).num_rows for s in shards]
    shards[0].write_bytes(b"PAR1x")  # 5 bytes: the run was cut while writing it
    code, stdout, err = run(capsys, "trace", tiny_moe, "--corpus", corpus, "--out", out, "--json")
    assert code == 0, err
    assert [pq.read_metadata(s).num_rows for s in shards] == rows
    assert json.loads(stdout)["rows"] == sum(rows)


def test_two_trace_processes_into_one_folder_leave_one_trace_or_a_refusal(tiny_moe, tmp_path):
    """Two `omnilab trace` processes started together on one --out: each exits 0 or refuses in one line (exit 2),
    at least one finishes, and the folder then holds one whole trace that a third run resumes without work."""
    import pyarrow.parquet as pq

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 40}) + "\n" for i in range(12)))
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "omnilab", "trace", str(tiny_moe), "--corpus", str(corpus), "--out", str(out),
           "--batch-tokens", "64", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(code in (0, 2) for code, _, _ in results), results
    assert any(code == 0 for code, _, _ in results), results
    for code, _, err in results:
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    manifest = json.loads((out / "manifest.json").read_text())
    rows = sum(pq.read_metadata(out / s["file"]).num_rows for s in manifest["shards"])
    assert rows == manifest["rows"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["rows"] == manifest["rows"]
