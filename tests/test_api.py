"""The drop-in surface: Module compatibility, argument forms, layouts, and the build itself."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext import CrossEntropyLoss, cross_entropy


def test_module_is_a_torch_cross_entropy_loss():
    w = torch.rand(5)
    ours = CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    for attr in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(ours, attr) == getattr(theirs, attr)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_module_loads_torch_state_dict_and_follows_to():
    theirs = torch.nn.CrossEntropyLoss(weight=torch.rand(5))
    ours = CrossEntropyLoss(weight=torch.ones(5))
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    ours = ours.to(torch.float64)
    assert ours.weight.dtype == torch.float64
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    torch.testing.assert_close(ours(x, t), theirs.double()(x, t))


def test_module_follows_device(device):
    m = CrossEntropyLoss(weight=torch.rand(4)).to(device)
    assert m.weight.device.type == device
    x, t = torch.randn(3, 4, device=device), torch.randint(0, 4, (3,), device=device)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x, t, m.weight))


def test_uint8_targets_equal_int64(device):
    x = torch.randn(8, 6, 3, device=device, requires_grad=True)
    t = torch.randint(0, 6, (8, 3), device=device)
    a = cross_entropy(x, t.to(torch.uint8))
    b = cross_entropy(x, t)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True), (False, True)])
def test_legacy_reduction_arguments(size_average, reduce):
    x, t = torch.randn(4, 3), torch.randint(0, 3, (4,))
    expected = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(cross_entropy(x, t, size_average=size_average, reduce=reduce), expected)


def test_probability_targets_match_torch():
    x, p = torch.randn(4, 3, 2), torch.softmax(torch.randn(4, 3, 2), 1)
    torch.testing.assert_close(cross_entropy(x, p, label_smoothing=0.1), F.cross_entropy(x, p, label_smoothing=0.1))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_strided_logits_need_no_copy_and_match(device, layout):
    g = torch.Generator().manual_seed(0)
    if layout == "transposed":  # (N, C) whose class dim has stride N
        x = torch.randn(7, 40, generator=g).to(device).t()
    elif layout == "channels_last":  # (N, C, H, W) whose class dim has stride 1 but rows are not contiguous
        x = torch.randn(2, 6, 5, 4, generator=g).to(device).to(memory_format=torch.channels_last)
    else:  # every other column: rows are strided
        x = torch.randn(9, 20, generator=g).to(device)[:, ::2]
    x.requires_grad_()
    t = torch.randint(0, x.shape[1], (x.shape[0], *x.shape[2:]), generator=g).to(device)
    ref = x.detach().contiguous().requires_grad_()
    loss = cross_entropy(x, t, label_smoothing=0.1)
    expected = F.cross_entropy(ref, t, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_expanded_target(device):
    x = torch.randn(5, 7, device=device)
    t = torch.tensor([3], device=device).expand(5)
    torch.testing.assert_close(cross_entropy(x, t), F.cross_entropy(x, t.contiguous()))


def test_out_of_range_target_raises_index_error():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError, match="Target 5 is out of bounds."):
        cross_entropy(x, torch.tensor([0, 5, 1]))


def _toolkit_matches_torch():
    nvcc = os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc"
    if torch.version.cuda is None or not (os.path.exists(nvcc) or shutil.which("nvcc")):
        return False
    out = subprocess.run([nvcc if os.path.exists(nvcc) else "nvcc", "--version"], capture_output=True, text=True)
    return f"release {torch.version.cuda.split('.')[0]}." in out.stdout


@pytest.mark.skipif(os.environ.get("FORCE_CPU") == "1", reason="CPU-only build was asked for")
def test_cuda_kernels_built_wherever_a_matching_toolkit_exists():
    """Guards CI: a toolkit matching torch's CUDA must give a CUDA build, so broken CUDA code fails the build."""
    if not _toolkit_matches_torch():
        pytest.skip("no CUDA toolkit matching torch's CUDA version here")
    assert softmax_ce_ext.cuda_built(), softmax_ce_ext.build_info()
    assert softmax_ce_ext.build_info()["backend"] == "cuda"


def test_cuda_tuning_is_set_and_restored():
    """softmax_ce_ext.tuning (what tests and benchmarks use to compare CUDA kernel families): every setting can be
    read back; `using` restores all of them, also after an error; a rejected value changes nothing."""
    from softmax_ce_ext import tuning

    before = tuning.get()
    assert set(before) == set(tuning.FIELDS)
    changed = dict(path="stream", slice_kb=8, cluster_max=2, prefetch=False, ring_kb=12, lean=False, warp_ring=3,
                   grad_piece_kb=64, kdim_fold=not before["kdim_fold"], warp_keep=not before["warp_keep"],
                   cluster_async=not before["cluster_async"], warp_group=not before["warp_group"],
                   dynamic_rows=not before["dynamic_rows"], pdl=not before["pdl"])
    with tuning.using(**changed):
        assert tuning.get() == changed
    assert tuning.get() == before
    with pytest.raises(KeyError):
        with tuning.using(ring_kb=16):
            raise KeyError("inside")
    assert tuning.get() == before
    for bad in (dict(ring_kb=228), dict(slice_kb=0), dict(cluster_max=3), dict(path="fast"), dict(warp_ring=1),
                dict(warp_ring=5), dict(grad_piece_kb=2), dict(grad_piece_kb=4097)):
        with pytest.raises(ValueError):
            tuning.set(prefetch=not before["prefetch"], **bad)
        assert tuning.get() == before
    with pytest.raises(TypeError, match="ring"):
        tuning.set(ring=8)


def test_cuda_tuning_built_in_defaults_match_the_extension():
    """tuning.BUILT_IN (the baseline tests and benchmarks set) is what the extension starts with when no
    SOFTMAX_CE_CUDA_* variable is set: one fresh process, the environment cleared of them."""
    import json
    import sys

    from softmax_ce_ext import tuning

    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTMAX_CE_CUDA_")}
    code = "import json, softmax_ce_ext.tuning as t; print(json.dumps(t.get()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == tuning.BUILT_IN


def test_build_records_its_torch():
    """The build names the torch it was built against (the load error below quotes it)."""
    assert softmax_ce_ext.build_info()["torch"] == torch.__version__


def _import_copy(tmp_path, edit):
    """Imports a copy of the package whose files `edit` changed, in a fresh interpreter: (returncode, stderr)."""
    import pathlib

    package = pathlib.Path(softmax_ce_ext.__file__).parent
    copy = tmp_path / "softmax_ce_ext"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    edit(copy)
    code = ("import warnings; warnings.simplefilter('error'); import softmax_ce_ext; "
            f"assert softmax_ce_ext.__file__.startswith({str(tmp_path)!r}), softmax_ce_ext.__file__")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path, timeout=120)
    return run.returncode, run.stderr


def test_kernels_that_fail_to_load_say_why(tmp_path):
    """A _C that cannot load (most often: torch upgraded after the build) raises an ImportError that names both
    torch versions and the rebuild, not only the linker's undefined symbol."""
    def break_kernels(copy):
        for so in copy.glob("_C*.so"):
            so.write_bytes(b"not a shared object")
        (copy / "_build_info.py").write_text("BUILD = {'backend': 'cpu', 'why': '', 'archs': '', 'torch': '1.0.0'}\n")

    code, err = _import_copy(tmp_path, break_kernels)
    assert code != 0
    assert "ImportError: softmax_ce_ext: the compiled kernels (_C) failed to load" in err
    assert "built against torch 1.0.0" in err and f"this is torch {torch.__version__}" in err
    assert "pip install --no-build-isolation" in err


def test_kernels_built_for_another_minor_version_warn(tmp_path):
    """Kernels that load under a torch of another minor version than their build's warn (the ABI may differ);
    a patch release does not."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]

    def record(version):
        return lambda copy: (copy / "_build_info.py").write_text(
            f"BUILD = {{'backend': 'cpu', 'why': '', 'archs': '', 'torch': '{version}'}}\n")

    code, err = _import_copy(tmp_path / "minor", record(f"{major}.{int(minor) + 1}.0"))
    assert code != 0 and "RuntimeWarning: softmax_ce_ext was built against torch" in err, err
    code, err = _import_copy(tmp_path / "patch", record(f"{major}.{minor}.99+other"))
    assert code == 0, err


def test_sdist_carries_every_source(tmp_path):
    """An sdist builds on its own: it carries every file under csrc/ (setuptools adds only the chosen backend's
    .cpp/.cu, never the headers: before MANIFEST.in, an sdist made here held 4 of csrc's 22 files)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(repo, "setup.py")):
        pytest.skip("not a source checkout")
    tree = tmp_path / "tree"
    shutil.copytree(repo, tree, ignore=shutil.ignore_patterns(".git", ".venv", ".whl", "build", "dist", "*.so",
                                                              "__pycache__", "*.egg-info", ".hypothesis"))
    env = {**os.environ, "FORCE_CPU": "1"}  # the CPU-only build's sources: the CUDA ones must come from the manifest
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    import tarfile
    (archive,) = (tmp_path / "dist").iterdir()
    with tarfile.open(archive) as tar:
        carried = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {os.path.relpath(os.path.join(d, f), repo) for d, _, files in os.walk(os.path.join(repo, "csrc"))
              for f in files}
    needed |= {"setup.py", "pyproject.toml", "README.md", "softmax_ce_ext/__init__.py", "softmax_ce_ext/py.typed"}
    assert not needed - carried, f"missing from the sdist: {sorted(needed - carried)}"
