"""Comparisons and tool loading shared by the tests."""
import importlib.util
from pathlib import Path

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
TOOLS = Path(__file__).resolve().parents[1] / 'tools'


def assert_float32_close(got, want, terms=1):
    """A float32 result against a float64 reference: within float32 rounding of a sum of ``terms`` values of
    the reference's largest magnitude (a bound of 64 * eps * sqrt(terms) * max(|want|, 1e-3))."""
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(want.abs().max().item(), 1e-3)
    error = (got.double() - want.double()).abs().max().item()
    bound = 64 * FLOAT32_EPS * max(terms, 1) ** 0.5 * scale
    assert error <= bound, f'max difference {error:.3g} exceeds {bound:.3g} (largest value {scale:.3g})'


def relative_error(got, want):
    """||got - want|| / ||want|| in float64, with ``got`` brought to ``want``'s device."""
    want = want.double()
    return ((got.double().to(want.device) - want).norm() / want.norm()).item()


def load_tool(path):
    """Import ``tools/<path>.py`` (e.g. ``'analysis_tools/benchmark'``) as a module."""
    spec = importlib.util.spec_from_file_location(path.rsplit('/', 1)[-1], TOOLS / f'{path}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_torch_thread():
    """Run on one thread (use as a fixture): the reference model's many tiny ops crawl when threads contend
    for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
