"""Bad config is named before any data is read: one line with the key, the value and what was expected."""
from __future__ import annotations

import os
import sys

import pytest
from conftest import ROOT, sciml


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epochs=abc", "trainer.max_epochs=abc: expected int or None"),
    ("data.batch_size=abc", "data.batch_size=abc: expected int"),
    ("optimizer.lrr=0.1", "unknown key optimizer.lrr, did you mean optimizer.lr?"),
    ("data.batch_size=[1,", "malformed override: no viable alternative at input '[1,'"),
    ("task.working_points=maybe", "task.working_points=maybe: expected bool"),
    ("optimizer.lr_scaling=cubic", "optimizer.lr_scaling=cubic: expected one of 'linear', 'sqrt', 'none'"),
    ("hydra.run.dir=/etc/hostname/run", "hydra.run.dir: cannot write the run directory '/etc/hostname/run'"),
])
def test_bad_config_is_one_line_before_any_data(tmp_path, override, message):
    missing = tmp_path / "never-read.h5"  # a data file that does not exist: a data error would name it
    result = sciml("+plugin=hep", f"data.path={missing}", override, f"hydra.run.dir={tmp_path / 'run'}"
                   if not override.startswith("hydra.run.dir") else "seed=1", cwd=tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "never-read" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists(), "nothing is written before the config is checked"


def test_every_trainer_argument_is_settable_without_plus():
    from sciml import searchpath
    from sciml.__main__ import _add_plus_for_target_keys, precheck

    searchpath.register()  # as main() does before composing
    argv = ["+plugin=hep", "trainer.limit_train_batches=300", "trainer.max_epochs=2", "data.max_memory_gb=1.5"]
    # max_memory_gb is listed in conf/data/core.yaml: only the Trainer key the yaml omits gets its '+'
    assert _add_plus_for_target_keys(argv) == ["+plugin=hep", "+trainer.limit_train_batches=300",
                                               "trainer.max_epochs=2", "data.max_memory_gb=1.5"]
    assert precheck([*argv, "hydra.run.dir=/tmp/sciml-precheck"])[1] == "+trainer.limit_train_batches=300"


def test_checker_reads_declared_parameters():
    """A target class may declare its keys (e.g. a datamodule forwarding extra keys to a reader class)."""
    import inspect

    from omegaconf import OmegaConf

    from sciml.config_check import check
    from sciml.errors import SciMLError

    cfg = OmegaConf.create({"data": {"_target_": f"{__name__}.Declared", "reader": "x", "patch": 3}})
    check(cfg)
    cfg.data.patch = "big"
    with pytest.raises(SciMLError, match="data.patch=big: expected int"):
        check(cfg)
    cfg.data = {"_target_": f"{__name__}.Declared", "reader": "x", "pach": 3}
    with pytest.raises(SciMLError, match="unknown key data.pach, did you mean data.patch?"):
        check(cfg)
    assert inspect.isclass(Declared)


class Declared:
    def __init__(self, reader: str, **kwargs):
        pass

    @classmethod
    def config_parameters(cls, node):
        import inspect

        kind = inspect.Parameter.KEYWORD_ONLY
        return {"reader": inspect.Parameter("reader", kind, annotation=str),
                "patch": inspect.Parameter("patch", kind, annotation=int)}


def test_help_starts_with_sciml_usage():
    result = sciml("--help", timeout=120)
    assert result.returncode == 0
    head = result.stdout[:2500]
    assert head.startswith("sciml: ")
    for text in ("+plugin=NAME", "Installed plugins: climate, hail, hep, tumor", "predict", "export", "compare",
                 "Run directory", "docs/", "Hydra's help follows"):
        assert text in head, text
    assert "== Configuration groups ==" in result.stdout


def test_works_from_the_folder_that_holds_the_clone(tmp_path):
    """`git clone ... sciml && sciml/.venv/bin/python -m sciml` in the clone's parent folder: the clone (a folder
    named sciml without __init__.py) must not shadow the package."""
    os.symlink(ROOT, tmp_path / "sciml")
    import subprocess

    result = subprocess.run([sys.executable, "-m", "sciml", "--list-plugins"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hep" in result.stdout and "tumor" in result.stdout
