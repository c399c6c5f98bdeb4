"""Import boundaries (DESIGN section 2), checked in a fresh interpreter."""

import subprocess
import sys

import pytest

FORBIDDEN = {
    "distbp.nn": ("ray", "pyarrow", "click"),
    "distbp.activations": ("ray", "pyarrow", "click"),
    "distbp.losses": ("ray", "pyarrow", "click"),
    "distbp.optim": ("ray", "pyarrow", "click"),
    "distbp.gradcheck": ("ray", "pyarrow", "click"),
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_math_modules_import_no_ray_pyarrow_or_click(module):
    code = f"import sys, {module}; print(' '.join(m for m in {FORBIDDEN[module]!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
