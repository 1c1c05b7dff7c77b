"""Where every choice between implementations of mmsecvit's ops is made.

Each op has a list of backends in order of preference. A backend is taken when its check finds no reason
against the inputs; :func:`choose_backend` returns the first such one and :func:`why_not` says, for every
backend before it, what ruled it out. The last backend of each op is plain PyTorch and always applies.

The compiled CPU kernels (``mmsecvit/ops/csrc``) are built twice, for AVX-512 and for AVX2 + FMA; the
build for the best instruction set that both this CPU and PyTorch's own dispatch allow is used
(``ATEN_CPU_CAPABILITY=avx2`` lowers both). The switch :func:`use_kernels`, or the environment variable
``MMSECVIT_KERNELS`` (``0`` for the PyTorch paths only, ``avx2`` or ``avx512`` to pick a build), chooses
what may run; :func:`kernel_isa` says what does. Reasons for the choices are in docs/performance.md.
"""
import contextlib
import importlib
import os
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

KERNELS_ENV = 'MMSECVIT_KERNELS'
# Instruction sets of the kernel builds, best first, with the extension module and PyTorch's name of each.
KERNEL_ISAS = ('avx512', 'avx2')
_KERNEL_MODULES = {'avx512': 'mmsecvit.ops._kernels_avx512', 'avx2': 'mmsecvit.ops._kernels_avx2'}
_TORCH_CAPABILITIES = {'avx512': ('AVX512',), 'avx2': ('AVX512', 'AVX2')}

# Thresholds of the choices below.
KERNEL_HEAD_DIMS = (16, 32)  # head sizes the attention and ranking kernels are compiled for
KERNEL_MAX_CLUSTER = 256  # longest cluster of the attention kernel (kMaxCluster in cluster_attention.cpp)
CHUNKED_MAX_CLUSTER = 256  # longer clusters (global attention) go to PyTorch's fused attention
CHUNK_SCORES = 2 ** 18  # scores held at once by the chunked attention (in float32 about the L2 cache)
RADIX_SORT_MIN_TOKENS = 4096  # from this many tokens per head, rankings sort integer keys
POINTWISE_CONV_MIN_TOKENS = 1024  # from this many positions, 1x1 projections run as oneDNN convolutions
KERNEL_DEPTHWISE_SIZES = (3, 5)
KERNEL_MAX_VALUES_5X5 = 2 ** 19  # larger maps take oneDNN's 5x5 depthwise convolution
HALF_DTYPES = (torch.bfloat16, torch.float16)  # CPU depthwise convolutions in these may run in float32
ONEDNN_HALF_BACKWARD_MAX_KERNEL = 3  # oneDNN's half-precision depthwise backward is slow for larger kernels


def _parse_setting(value: str) -> Optional[str]:
    """'0'/'1'/'avx2'/'avx512' of ``MMSECVIT_KERNELS``: None for no kernels, else the best ISA allowed."""
    value = value.strip().lower()
    if value in ('', '1', 'on', 'true', 'auto'):
        return KERNEL_ISAS[0]
    if value in ('0', 'off', 'false', 'none'):
        return None
    if value in KERNEL_ISAS:
        return value
    raise ValueError(f'{KERNELS_ENV}={value!r}: use 0 (PyTorch paths only), 1 (the best kernel build for '
                     f'this CPU) or one of {KERNEL_ISAS}')


def _cpu_isas() -> tuple:
    capability = torch.backends.cpu.get_cpu_capability()
    return tuple(isa for isa in KERNEL_ISAS if capability in _TORCH_CAPABILITIES[isa])


def _load(isa: str):
    """The kernel module of ``isa``, or the reason it cannot run here."""
    if isa not in _CPU_ISAS:
        capability = torch.backends.cpu.get_cpu_capability()
        return f'the CPU (or ATEN_CPU_CAPABILITY) gives PyTorch {capability}, not {isa.upper()}'
    try:
        module = importlib.import_module(_KERNEL_MODULES[isa])
    except ImportError as error:
        return f'{_KERNEL_MODULES[isa]} is not built ({error}); run `make setup`'
    return module if module.supported() else f'this CPU lacks {isa.upper()}'


# Probed once at import, so that the choices below are plain lookups (traceable by torch.compile).
_CPU_ISAS = _cpu_isas()
# Whether oneDNN convolves each half-precision dtype on this CPU (else PyTorch's far slower fallback does).
_ONEDNN_HALF = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}
_modules: Dict[str, object] = {isa: _load(isa) for isa in KERNEL_ISAS}  # module, or why it cannot run
_AVAILABLE_ISAS = tuple(isa for isa in KERNEL_ISAS if not isinstance(_modules[isa], str))
# kernel_isa() for each setting: the best available build at or below the allowed one.
_CHOSEN_ISA: Dict[Optional[str], Optional[str]] = {
    allowed: next((isa for isa in KERNEL_ISAS[KERNEL_ISAS.index(allowed):] if isa in _AVAILABLE_ISAS), None)
    for allowed in KERNEL_ISAS}
_CHOSEN_ISA[None] = None
_allowed_isa = _parse_setting(os.environ.get(KERNELS_ENV, ''))


def cpu_isas() -> List[str]:
    """Instruction sets of the kernel builds that this CPU runs, as PyTorch's dispatch sees it, best first."""
    return list(_CPU_ISAS)


def available_isas() -> List[str]:
    """Instruction sets whose kernel build is present and runs on this CPU, best first."""
    return list(_AVAILABLE_ISAS)


def kernel_isa() -> Optional[str]:
    """The instruction set of the kernels in use, or None where only the PyTorch paths run."""
    return _CHOSEN_ISA[_allowed_isa]


def kernels() -> ModuleType:
    """The kernel module in use (see :func:`kernel_isa`); raises where there is none."""
    isa = kernel_isa()
    if isa is None:
        raise RuntimeError(f'no mmsecvit kernel runs here: {kernel_unavailable_reason()}')
    return _modules[isa]


def kernel_unavailable_reason() -> str:
    """Why no kernel runs (empty where one does)."""
    if kernel_isa() is not None:
        return ''
    if _allowed_isa is None:
        return 'the kernels are switched off (use_kernels(False) or MMSECVIT_KERNELS=0)'
    return '; '.join(_modules[isa] for isa in KERNEL_ISAS[KERNEL_ISAS.index(_allowed_isa):])


def set_kernels(enabled: bool = True, isa: Optional[str] = None) -> None:
    """Allow the compiled kernels (the best build for this CPU, or at most ``isa``), or switch them off."""
    global _allowed_isa
    if isa is not None and isa not in KERNEL_ISAS:
        raise ValueError(f'isa must be one of {KERNEL_ISAS} or None, got {isa!r}')
    _allowed_isa = (isa or KERNEL_ISAS[0]) if enabled else None


@contextlib.contextmanager
def use_kernels(enabled: bool = True, isa: Optional[str] = None) -> Iterator[None]:
    """Context manager of :func:`set_kernels`: ``with use_kernels(False):`` runs the PyTorch paths only."""
    global _allowed_isa
    previous = _allowed_isa
    set_kernels(enabled, isa)
    try:
        yield
    finally:
        _allowed_isa = previous


# Checks shared by the backends: each returns the reasons against a path, empty when it applies.

def _traced() -> List[str]:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return ['TorchScript tracing (FLOP counting, ONNX export) records PyTorch operations']
    if torch.onnx.is_in_onnx_export():
        return ['the ONNX export (also torch.export-based, dynamo=True) records PyTorch operations']
    return []


def _cpu_float32(*tensors: torch.Tensor) -> List[str]:
    reasons = []
    if any(t.device.type != 'cpu' for t in tensors):
        reasons.append('the tensors are not on the CPU')
    if any(t.dtype != torch.float32 for t in tensors):
        reasons.append('the tensors are not float32')
    if torch.is_autocast_enabled('cpu'):
        reasons.append('CPU autocast is on')
    return reasons + _traced()


def _kernel_runs() -> List[str]:
    return [] if kernel_isa() is not None else [kernel_unavailable_reason()]


def _ranking_kernel(packed: torch.Tensor) -> List[str]:
    reasons = _cpu_float32(packed) + _kernel_runs()
    if packed.shape[-1] not in KERNEL_HEAD_DIMS:
        reasons.append(f'head_dim {packed.shape[-1]} is not one of {KERNEL_HEAD_DIMS}')
    return reasons


def _attention_kernel(packed: torch.Tensor, cluster_len: int) -> List[str]:
    reasons = _ranking_kernel(packed)
    if cluster_len > KERNEL_MAX_CLUSTER:
        reasons.append(f'clusters of {cluster_len} tokens are longer than {KERNEL_MAX_CLUSTER}')
    return reasons


def _attention_chunked(packed: torch.Tensor, cluster_len: int) -> List[str]:
    reasons = []
    if packed.device.type != 'cpu':
        reasons.append('the tensors are not on the CPU (the fused attention is faster there)')
    if packed.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled('cpu'):
        reasons.append('not float32 or float64 outside autocast')
    if cluster_len > CHUNKED_MAX_CLUSTER:
        reasons.append(f'clusters of {cluster_len} tokens are longer than {CHUNKED_MAX_CLUSTER}')
    return reasons + _traced()


def _radix_sort(scores: torch.Tensor) -> List[str]:
    reasons = _traced()
    if scores.device.type != 'cpu' or scores.dtype != torch.float32:
        reasons.append('not float32 scores on the CPU')
    if scores.shape[-1] < RADIX_SORT_MIN_TOKENS:
        reasons.append(f'fewer than {RADIX_SORT_MIN_TOKENS} tokens per head')
    return reasons


def _onnx_topk(scores: torch.Tensor) -> List[str]:
    if not torch.onnx.is_in_onnx_export():
        return ['not an ONNX export (ONNX has no stable sort; TopK ranks the tokens there)']
    return []


def _gelu_depthwise_kernel(x: torch.Tensor, weight: torch.Tensor) -> List[str]:
    """x: channels-last NCHW input of a stride-1 'same' depthwise convolution (of GELU's output)."""
    reasons = _cpu_float32(x, weight) + _kernel_runs()
    if weight.shape[-1] not in KERNEL_DEPTHWISE_SIZES:
        reasons.append(f'kernel size {weight.shape[-1]} is not one of {KERNEL_DEPTHWISE_SIZES}')
    if x.stride(1) != 1:
        reasons.append('the channels are not contiguous')
    return reasons


def _depthwise_kernel(x: torch.Tensor, weight: torch.Tensor) -> List[str]:
    reasons = _gelu_depthwise_kernel(x, weight)
    if weight.shape[-1] == 5 and x.numel() > KERNEL_MAX_VALUES_5X5:
        reasons.append(f'5x5 kernel on more than {KERNEL_MAX_VALUES_5X5} values (oneDNN is faster)')
    return reasons


def _depthwise_backward(x: torch.Tensor, weight: torch.Tensor) -> List[str]:
    reasons = _traced()
    if x.device.type != 'cpu':
        reasons.append('the tensors are not on the CPU (cuDNN has a fast backward)')
    if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled('cpu'):
        reasons.append('not float32 or float64 outside autocast')
    return reasons


def _depthwise_float32(x: torch.Tensor, weight: torch.Tensor, backward: bool = False) -> List[str]:
    """x: input of a depthwise convolution; backward: whether its gradients are to be computed too."""
    reasons = []
    if any(t.device.type != 'cpu' for t in (x, weight)):
        reasons.append('the tensors are not on the CPU (cuDNN is fast in half precision)')
    if torch.float64 in (x.dtype, weight.dtype):
        reasons.append('float64 tensors (which autocast leaves as they are)')
    # The dtype the convolution would run in.
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
    else:
        dtype = x.dtype if x.dtype in HALF_DTYPES else weight.dtype
    kernel_size, name = weight.shape[-1], str(dtype).replace('torch.', '')
    if dtype not in HALF_DTYPES:
        reasons.append('no bfloat16 or float16 tensors and no CPU autocast to them')
    elif _ONEDNN_HALF[dtype] and not backward:
        reasons.append(f'oneDNN convolves {name} on this CPU, faster than float32 and the casts')
    elif _ONEDNN_HALF[dtype] and kernel_size <= ONEDNN_HALF_BACKWARD_MAX_KERNEL:
        reasons.append(f'oneDNN convolves {name} on this CPU and its {kernel_size}x{kernel_size} backward is as '
                       'fast as float32 and the casts')
    return reasons


def _pointwise_conv(x: torch.Tensor) -> List[str]:
    reasons = _cpu_float32(x)
    if x.shape[1] * x.shape[2] < POINTWISE_CONV_MIN_TOKENS:
        reasons.append(f'fewer than {POINTWISE_CONV_MIN_TOKENS} positions')
    return reasons


def _recompute_norm(x: torch.Tensor) -> List[str]:
    return _cpu_float32(x)


def _fold_batch_norm(norm: torch.nn.Module) -> List[str]:
    reasons = _traced()
    if torch.is_grad_enabled():
        reasons.append('a gradient is recorded')
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) or not norm.affine or norm.running_mean is None:
        reasons.append('the norm is not an affine batch norm with running statistics')
    elif norm.training:
        reasons.append('the batch norm is in training mode')
    return reasons


def _joined_value_grad() -> List[str]:
    if torch.compiler.is_compiling():
        return ['torch.compile cannot trace an autograd function that returns its input']
    return _traced()


def _recompute_ffn() -> List[str]:
    if torch.compiler.is_compiling():
        return ['under torch.compile the partitioner chooses what to recompute (the hand-written backward '
                'calls torch.autograd.grad, which dynamo does not trace)']
    return _traced()


def _regroup_weight(x: torch.Tensor) -> List[str]:
    positions, channels = x.shape[0] * x.shape[1] * x.shape[2], x.shape[-1]
    if positions < channels:
        return [f'{positions} positions, fewer than {channels} channels: the output is smaller to regroup']
    return []


def _always(*args, **kwargs) -> List[str]:
    return []


# Backends of each op, best first; the last one always applies.
BACKENDS: Dict[str, Dict[str, Callable[..., List[str]]]] = {
    'cluster_attention': {'kernel': _attention_kernel, 'chunked': _attention_chunked, 'fused': _always},
    'ranking': {'kernel': _ranking_kernel, 'torch': _always},
    'argsort': {'radix': _radix_sort, 'topk': _onnx_topk, 'argsort': _always},
    'depthwise': {'kernel': _depthwise_kernel, 'torch': _always},
    'gelu_depthwise': {'kernel': _gelu_depthwise_kernel, 'torch': _always},
    'depthwise_backward': {'flipped_conv': _depthwise_backward, 'autograd': _always},
    'depthwise_precision': {'float32': _depthwise_float32, 'native': _always},
    'linear': {'conv1x1': _pointwise_conv, 'linear': _always},
    'norm_linear': {'recompute_norm': _recompute_norm, 'plain': _always},
    'conv_norm': {'folded': _fold_batch_norm, 'plain': _always},
    'split_values': {'joined_grad': _joined_value_grad, 'autograd': _always},
    'ffn': {'recompute': _recompute_ffn, 'plain': _always},
    'qkv_layout': {'regroup_weight': _regroup_weight, 'regroup_output': _always},
}


def choose_backend(op: str, *args: Any, **kwargs: Any) -> str:
    """The first backend of ``op`` (a key of :data:`BACKENDS`) that applies to these inputs."""
    return next(name for name, check in _backends(op).items() if not check(*args, **kwargs))


def why_not(op: str, *args: Any, **kwargs: Any) -> Dict[str, List[str]]:
    """For each backend of ``op`` before the chosen one, the reasons it was not taken."""
    reasons = {}
    for name, check in _backends(op).items():
        found = check(*args, **kwargs)
        if not found:
            break
        reasons[name] = found
    return reasons


def _backends(op: str) -> Dict[str, Callable[..., List[str]]]:
    if op not in BACKENDS:
        raise KeyError(f'unknown op {op!r}; choose one of {sorted(BACKENDS)}')
    return BACKENDS[op]
