"""A new user's first hour (#25): bad rows in a user's own file, two jobs building one cache, messages that point at
the fix, and the planner offline."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import assert_single_error, ok, run, train_args

import fsdp_train as ft


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(prep, tmp_path, data, *extra):
    args = train_args(prep, tmp_path / "runs", "p", "-s", 32, *extra, data=data)
    return run([sys.executable, "fsdp_train.py", "prepare", *args])


def test_rows_with_null_non_string_or_empty_fields_are_skipped_and_counted(prep, tmp_path):
    lines = [line for f in sorted((ft.Path("data")).rglob("*.txt")) for line in f.read_text().splitlines() if line]
    rows = [{"text": line} for line in lines[:200]]
    for i in (3, 50, 51, 120):
        rows[i] = {"text": None}
    rows[7], rows[8] = {"text": ""}, {"text": "   "}
    proc = ok(_prepare(prep, tmp_path, _jsonl(tmp_path / "mine.jsonl", rows)))
    assert "194 examples" not in proc.stdout  # the examples are the rows read; the skipped ones are said apart
    assert (
        "6 rows skipped (4 where 'text' is null, 2 where 'text' is empty; first: row 3: 'text' is null)" in proc.stdout
    )

    chat = [{"messages": [{"role": "user", "content": "Who lit the lamp?"}, {"role": "assistant", "content": c}]}
            for c in ["The keeper.", None, "", "At dusk."]]  # fmt: skip
    chat.append({"messages": None})
    proc = ok(
        _prepare(prep, tmp_path, _jsonl(tmp_path / "chat.jsonl", chat), "--chat-template", "configs/chatml.jinja")
    )
    assert (
        "3 rows skipped (1 where 'messages' is null or empty, 1 where an assistant message's 'content' is empty, "
        "1 where an assistant message's 'content' is null; first: row 1: an assistant message's 'content' is null)"
    ) in proc.stdout

    alpaca = [{"instruction": "Say hi", "output": "hi"}, {"instruction": None, "output": "x"}]
    proc = ok(
        _prepare(prep, tmp_path, _jsonl(tmp_path / "alpaca.jsonl", alpaca), "--chat-template", "configs/chatml.jinja")
    )
    assert "1 rows skipped (1 where 'instruction' is null; first: row 1" in proc.stdout

    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": None}, {"text": ""}])
    line = assert_single_error(_prepare(prep, tmp_path, bad), "no train row can be trained: 2 rows skipped")
    assert "first: row 0: 'text' is null" in line


@pytest.mark.slow
def test_two_jobs_building_the_same_cache_at_once_both_train(prep, tmp_path):
    """A sweep: two experiments on one --save-dir and the same data start together. Both tokenize (each sleeps 3 s
    before its rename, so they overlap for sure); the second rename finds the first's cache and uses it."""
    import subprocess

    from conftest import ROOT

    env = {**ft.os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FSDP_TRAIN_FAULT": "sleep_in_prepare:0:3"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "fsdp_train.py"]
    jobs = [
        subprocess.Popen([*launcher, *map(str, train_args(prep, tmp_path, exp, "--stop-at-step", 1, "-s", 48))],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for exp in ("a", "b")
    ]  # fmt: skip
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert sum("FAULT sleep_in_prepare" in out for out in outputs) == 2  # both built it
    assert sum("Another job finished the same train data cache first" in out for out in outputs) == 1
    caches = list((tmp_path / ".cache" / "tokenized").iterdir())
    assert len(caches) == 1 and (caches[0] / "info.json").is_file()  # no temp folder left behind
