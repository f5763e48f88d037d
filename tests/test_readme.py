"""README's main-job command works as written (on the example model shipped in examples/)."""

from __future__ import annotations

import json
import re
import shlex

from conftest import ROOT
from lrprune_caffe.cli.main import main


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.S)


def test_main_job_command(tmp_path, monkeypatch, capsys):
    cmds = [c for c in readme_commands() if "lrprune-caffe compress" in c and c.startswith("pip install")]
    assert len(cmds) == 1, "README keeps one install + main-job line"
    assert "\n" not in cmds[0].strip(), "one line"
    argv = shlex.split(cmds[0].split("&&", 1)[1])
    assert argv[0] == "lrprune-caffe"
    argv = argv[1:]
    i = argv.index("-o")
    argv[i + 1] = str(tmp_path / "lenet")
    monkeypatch.chdir(ROOT)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "top-1 accuracy" in out
    rep = json.loads((tmp_path / "lenet" / "report.json").read_text())
    acc = rep["verification"]["blobs"]["prob"]
    assert acc["top1_ref"] > 0.96 and acc["top1_test"] > 0.9
    assert {"model.onnx", "masks.npz", "report.md"} <= {p.name for p in (tmp_path / "lenet").iterdir()}


def test_test_command_matches_ci():
    cmds = [c for c in readme_commands() if "pytest" in c]
    assert cmds and "pip install" in cmds[0]
    test_cmd = cmds[0].split("&&", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.replace("python ", "python3 ") in ci or test_cmd in ci
