"""Our top-level packages must not take an import name another distribution owns. transformers 5.25 depends on
Hugging Face's `kernels`; a top-level `kernels/` of ours shadowed it from the repo root and broke every model import."""

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")


def test_no_top_level_name_of_ours_belongs_to_another_installed_distribution():
    owners = md.packages_distributions()
    clashes = {name: owners[name] for name in OURS
               if any(d.lower().replace("_", "-") != "hpc-grpo" for d in owners.get(name, []))}
    assert OURS and not clashes, clashes


def test_from_the_repo_root_kernels_is_hugging_faces_and_transformers_imports():
    """Run from the repo root, as a user does: `import kernels` must find Hugging Face's package (when installed),
    and a transformers Qwen2 model and the GRPO loop import and build."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or not (spec.origin or '').startswith({str(ROOT) + '/'!r}), spec\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                 num_attention_heads=2, num_key_value_heads=1, vocab_size=32))\n"
        "import grpo.loop, grpo_kernels\n"
        "print('kernels found:', spec is not None)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    if any(r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r
           for r in md.requires("transformers") or []):  # a hard dependency from 5.25 on: it must be found
        assert "kernels found: True" in p.stdout, p.stdout
