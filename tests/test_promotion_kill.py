"Promotion and its record are one step: a process killed (SIGKILL) at any point of the write leaves aliases and events that agree."
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd

from lifecycle.registry import Registry, events, register, set_alias
from lifecycle.train import build_pipeline

# The child promotes version 2 and kills itself with SIGKILL just before (or just after) its k-th file-system
# step: each rename that makes a write visible, and each removal. Every point of the write is hit in turn.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from lifecycle.registry import Registry, set_alias
    root, k, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    steps = [0]
    def deadly(function):
        def step(*args, **kwargs):
            steps[0] += 1
            if steps[0] == k and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = function(*args, **kwargs)
            if steps[0] == k and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return step
    os.replace, os.rename, os.unlink = deadly(os.replace), deadly(os.rename), deadly(os.unlink)
    set_alias(Registry(root), "champion", 2, "kill test")
    print(steps[0])
""")


def _template(root):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.uniform(20, 80, 100), "chol": rng.uniform(100, 400, 100)})
    labels = (frame["age"] > 50).astype(int)
    registry = Registry(root)
    for seed in (0, 1):
        register(registry, build_pipeline("logistic_regression", ["age", "chol"], [], seed).fit(frame, labels), {"metrics": {}})
    set_alias(registry, "champion", 1, "first")


def test_a_kill_at_every_point_of_a_promotion_leaves_aliases_and_events_in_agreement(tmp_path):
    template = tmp_path / "template"
    _template(template)
    kills, outcomes = 0, set()
    for when in ("before", "after"):
        for k in range(1, 50):
            project = tmp_path / f"{when}-{k}"
            shutil.copytree(template, project)
            done = subprocess.run([sys.executable, "-c", CHILD, str(project), str(k), when], capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                assert k > int(done.stdout.split()[-1]), "the child finished without reaching its kill point"
                break
            assert done.returncode == -signal.SIGKILL, done.stderr
            kills += 1
            registry = Registry(project)  # the next process to open the registry
            champion, history = registry.aliases()["champion"], events(registry)
            assert [event["version"] for event in history] == ([1] if champion == 1 else [1, 2]), (when, k, champion, history)
            assert history[-1]["version"] == champion
            assert not (registry.path / "alias-change.json").exists()
            outcomes.add(champion)
        else:
            raise AssertionError("the promotion never completed")
    # both outcomes occur: a kill before the change is recorded changes nothing, one after it completes it
    assert kills >= 6 and outcomes == {1, 2}, (kills, outcomes)
    print(f"kills during promotion: {kills}, records missing: 0")
