"""The scheduling cores import neither torch nor Ray, so the simulator and planner can drive
them at cluster scale and tests can use plain fakes."""

import subprocess
import sys


def test_cores_import_no_torch_or_ray():
    code = (
        "import sys; import dilaserve.engine.core, dilaserve.engine.scheduler, dilaserve.engine.cost_model, "
        "dilaserve.engine.sampling_params, dilaserve.engine.kv_pages, dilaserve.engine.chunk_control; "
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
