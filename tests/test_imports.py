"""Every module of the package imports on its own, and `import posttrain` stays light.

Each module is imported in a process of its own in which no other posttrain
module has been imported, so a circular import or a module that only works
after another one was imported fails here. To keep this fast on a small
machine, one child process imports torch (which `import posttrain` needs
anyway) and then forks a fresh process per module; the "import posttrain is
light" check runs in a completely fresh interpreter.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import posttrain

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(posttrain.__path__, "posttrain."))

DRIVER = r"""
import importlib, json, os, sys, traceback
import torch  # noqa: F401  (third-party; loaded once, before any posttrain module)

assert not any(m == "posttrain" or m.startswith("posttrain.") for m in sys.modules), "posttrain preloaded"
results = {}
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a process in which no posttrain module is imported yet
        os.close(r)
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os.close(w)
        os._exit(code)
    os.close(w)
    err = b""
    while chunk := os.read(r, 65536):
        err += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    results[name] = [os.waitstatus_to_exitcode(status), err.decode(errors="replace")]
print("RESULTS " + json.dumps(results))
"""


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def import_results() -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, *MODULES, "posttrain.no_such_module_xyz"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_walk_packages_finds_the_whole_package():
    expected = {"posttrain.cli", "posttrain.config", "posttrain.data", "posttrain.losses", "posttrain.models",
                "posttrain.tasks.arith", "posttrain.recipes.sft", "posttrain.recipes.rm", "posttrain.recipes.dpo",
                "posttrain.recipes.ppo", "posttrain.recipes.grpo", "posttrain.__main__"}
    assert expected <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_in_a_fresh_process(import_results, name):
    code, err = import_results[name]
    assert code == 0, f"importing {name} failed:\n{err}"


def test_driver_detects_a_failing_import(import_results):
    # the harness itself must be able to fail
    code, err = import_results["posttrain.no_such_module_xyz"]
    assert code == 1 and "ModuleNotFoundError" in err


def test_import_posttrain_does_not_import_transformers():
    code = ("import json, sys, posttrain; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded  # the public API is torch functions
    # "importing the package imports torch and nothing heavier" (posttrain/__init__.py)
    for heavy in ("transformers", "datasets", "peft", "matplotlib"):
        assert heavy not in loaded, f"`import posttrain` imported {heavy}"
    # and the public API named in DESIGN.md §4 is there
    for name in ("dpo_loss", "reward_model_loss", "gae", "whiten", "kl_penalty", "ppo_policy_loss", "value_loss",
                 "group_advantages", "selective_log_softmax"):
        assert callable(getattr(posttrain, name))
