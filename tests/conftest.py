import pytest
import torch

from mmsecvit.ops import dispatch, use_kernels


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=dispatch.cpu_isas())
def kernel(request):
    """The compiled kernel module of each instruction set this CPU runs (AVX2, and AVX-512 where present)."""
    with use_kernels(isa=request.param):
        assert dispatch.kernel_isa() == request.param, dispatch.kernel_unavailable_reason()
        yield dispatch.kernels()


@pytest.fixture(params=['pytorch'] + dispatch.cpu_isas())
def backend(request):
    """Runs the test with the PyTorch paths only, then with each kernel build; yields its name."""
    with use_kernels(request.param != 'pytorch', isa=None if request.param == 'pytorch' else request.param):
        yield request.param


@pytest.fixture(params=['chunked'] + [f'kernel-{isa}' for isa in dispatch.cpu_isas()])
def attention_impl(request):
    """The chunked PyTorch attention, then the attention kernel of each kernel build; yields the impl name."""
    impl, _, isa = request.param.partition('-')
    with use_kernels(bool(isa), isa=isa or None):
        yield impl


def pytest_addoption(parser):
    parser.addoption('--device', default='cpu',
                     help='device of tests/integration/test_device.py (tools/gpu_check.sh passes cuda)')


@pytest.fixture
def device(request):
    """The device under test, from ``--device``."""
    name = request.config.getoption('--device')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise pytest.UsageError(f'--device {name}: torch.cuda.is_available() is False')
    return torch.device(name)
